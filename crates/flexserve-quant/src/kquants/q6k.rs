//! Q6_K: signed 6-bit levels with an i8 scale per 16 elements.

use half::f16;

use super::q8k;
use super::{check_dot, check_row, fit_symmetric_scale, nearest_int, read_f16, QK_K};
use flexserve_gguf::GgmlType;

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

/// Lanes of the x86 Q6_K dot product.
pub(crate) const LANES: usize = 8;

/// One super-block's integer sums as the eight lanes of llama.cpp's x86
/// Q6_K dot hold them (and so every kernel here): lane `l` takes, in each
/// 32-element chunk, the products of the unsigned levels (0..64) with the
/// activation quants at chunk bytes `4l..4l + 4`, times their 16-element
/// scale; the offset of 32 comes off at the end as
/// `32 * (bsum_2l * scale_2l + bsum_2l+1 * scale_2l+1)` (the activation
/// block's 16-element sums), so lane `l` mixes two partitions of the block. Each lane is then rounded to
/// f32 on its own (`acc_l = fma(d_a * d, lane_l, acc_l)`), which is why the
/// partition matters.
pub(crate) fn lane_sums(wb: &[u8], ab: &[u8]) -> [i32; LANES] {
    let levels = signed_levels(wb);
    let a_qs = &ab[q8k::QS..q8k::BSUMS];
    let scale = |s: usize| wb[SCALES + s] as i8 as i32;
    let mut lanes = [0i32; LANES];
    for (e, (&q, &a)) in levels.iter().zip(a_qs).enumerate() {
        lanes[e % 32 / 4] += scale(e / 16) * (q as i32 + 32) * a as i8 as i32;
    }
    for (l, lane) in lanes.iter_mut().enumerate() {
        *lane -= 32 * (q8k::group_sum(ab, 2 * l) * scale(2 * l) + q8k::group_sum(ab, 2 * l + 1) * scale(2 * l + 1));
    }
    lanes
}

/// llama.cpp's tiled Q6_K product (its CPU backend's path for eight tokens
/// or more of a sequence): per super-block the exact sum of the products,
/// times the weight's scale (rounded), then one fused multiply-add with the
/// activation's scale onto a single f32 chain.
pub(crate) fn dot_chain(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q6_K, n, w, BYTES, a);
    let mut acc = 0f32;
    for (wb, ab) in w.chunks_exact(BYTES).zip(a.chunks_exact(q8k::BYTES)) {
        let isum: i32 = lane_sums(wb, ab).iter().sum();
        acc = crate::fma::fma_f32(isum as f32 * read_f16(wb, D), q8k::block_scale(ab), acc);
    }
    acc
}

/// llama.cpp's x86 Q6_K dot: per super-block `acc_l = fma(d_a * d, lane_l,
/// acc_l)` over the lanes of [`lane_sums`], then the lanes folded 4 onto 0,
/// 2 onto 0, 1 onto 0.
pub(super) fn dot(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q6_K, n, w, BYTES, a);
    let mut acc = [0f32; LANES];
    for (wb, ab) in w.chunks_exact(BYTES).zip(a.chunks_exact(q8k::BYTES)) {
        let d = q8k::block_scale(ab) * read_f16(wb, D);
        crate::fma::fma_f32_lanes::<false>(d, &lane_sums(wb, ab).map(|l| l as f32), &mut acc);
    }
    let t: [f32; 4] = std::array::from_fn(|j| acc[j + 4] + acc[j]);
    (t[0] + t[2]) + (t[1] + t[3])
}
