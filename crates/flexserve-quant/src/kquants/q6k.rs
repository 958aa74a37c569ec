//! Q6_K: signed 6-bit levels with an i8 scale per 16 elements.

use half::f16;

use super::q8k;
use super::{check_dot, check_row, fit_symmetric_scale, nearest_int, read_f16, QK_K};
use crate::GgmlType;

pub(crate) const BYTES: usize = QK_K / 2 + QK_K / 4 + QK_K / 16 + 2;
pub(crate) const QH: usize = QK_K / 2;
pub(crate) const SCALES: usize = QH + QK_K / 4;
pub(crate) const D: usize = SCALES + QK_K / 16;

/// The 256 signed levels (`q - 32`, in -32..32) of a block.
#[inline]
fn signed_levels(block: &[u8]) -> [i8; QK_K] {
    let mut out = [0i8; QK_K];
    for half in 0..2 {
        let ql = &block[64 * half..64 * half + 64];
        let qh = &block[QH + 32 * half..QH + 32 * half + 32];
        let out = &mut out[128 * half..128 * half + 128];
        for l in 0..32 {
            let (a, b, h) = (ql[l], ql[l + 32], qh[l]);
            out[l] = ((a & 0xF) | ((h & 3) << 4)) as i8 - 32;
            out[l + 32] = ((b & 0xF) | (((h >> 2) & 3) << 4)) as i8 - 32;
            out[l + 64] = ((a >> 4) | (((h >> 4) & 3) << 4)) as i8 - 32;
            out[l + 96] = ((b >> 4) | (((h >> 6) & 3) << 4)) as i8 - 32;
        }
    }
    out
}

pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    check_row(GgmlType::Q6_K, dst.len(), BYTES, src.len());
    for (block, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(block, D);
        let levels = signed_levels(block);
        for (s, (o, q)) in out.chunks_exact_mut(16).zip(levels.chunks_exact(16)).enumerate() {
            let scale = d * block[SCALES + s] as i8 as f32;
            for (o, &q) in o.iter_mut().zip(q) {
                *o = scale * q as f32;
            }
        }
    }
}

pub(super) fn quantize(src: &[f32], dst: &mut [u8]) {
    check_row(GgmlType::Q6_K, src.len(), BYTES, dst.len());
    for (x, block) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)) {
        quantize_block(x, block);
    }
}

fn quantize_block(x: &[f32], block: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let mut sub_scales = [0f32; 16];
    for (s, (xs, ls)) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).enumerate() {
        sub_scales[s] = fit_symmetric_scale(xs, 32, ls);
    }
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for &s in &sub_scales {
        if s.abs() > max_abs_scale {
            max_abs_scale = s.abs();
            max_scale = s;
        }
    }
    if max_abs_scale < super::GROUP_MAX_EPS {
        block.fill(0);
        return;
    }
    // The largest sub-block scale maps to -128, the full i8 range.
    let iscale = -128.0 / max_scale;
    let d_bits = f16::from_f32(1.0 / iscale);
    let q_scales = sub_scales.map(|s| nearest_int(iscale * s).clamp(-128, 127) as i8);
    let d = d_bits.to_f32();
    for (s, (xs, ls)) in x.chunks_exact(16).zip(levels.chunks_exact_mut(16)).enumerate() {
        let scale = d * q_scales[s] as f32;
        if scale == 0.0 {
            continue;
        }
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = (nearest_int(v / scale).clamp(-32, 31) + 32) as u8;
        }
    }

    for half in 0..2 {
        let lv = &levels[128 * half..128 * half + 128];
        for l in 0..32 {
            let (q1, q2, q3, q4) = (lv[l], lv[l + 32], lv[l + 64], lv[l + 96]);
            block[64 * half + l] = (q1 & 0xF) | ((q3 & 0xF) << 4);
            block[64 * half + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4);
            block[QH + 32 * half + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
    for (s, &q) in q_scales.iter().enumerate() {
        block[SCALES + s] = q as u8;
    }
    block[D..D + 2].copy_from_slice(&d_bits.to_le_bytes());
}

pub(super) fn dot(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q6_K, n, w, BYTES, a);
    let mut sum = 0.0f32;
    for (wb, ab) in w.chunks_exact(BYTES).zip(a.chunks_exact(q8k::BYTES)) {
        let levels = signed_levels(wb);
        let a_qs = &ab[q8k::QS..q8k::BSUMS];
        let mut isum = 0i32;
        for (s, (q, a)) in levels.chunks_exact(16).zip(a_qs.chunks_exact(16)).enumerate() {
            let sub: i32 = q.iter().zip(a).map(|(&q, &a)| q as i32 * a as i8 as i32).sum();
            isum += wb[SCALES + s] as i8 as i32 * sub;
        }
        sum += q8k::block_scale(ab) * read_f16(wb, D) * isum as f32;
    }
    sum
}
