//! Q5_K: Q4_K plus a fifth bit per element kept in a 32-byte bit plane.

use super::q4k::min_term;
use super::q8k;
use super::{
    check_dot, check_row, quantize_affine_block, read_f16, unpack_scales_mins, write_f16, ScaleMinSearch, QK_K,
};
use flexserve_gguf::GgmlType;

pub(crate) const BYTES: usize = 4 + super::K_SCALE_SIZE + QK_K / 8 + QK_K / 2;
pub(crate) const SCALES: usize = 4;
pub(crate) const QH: usize = SCALES + super::K_SCALE_SIZE;
pub(crate) const QS: usize = QH + QK_K / 8;

const SEARCH: ScaleMinSearch = ScaleMinSearch { nmax: 31, rmin: -0.5, rdelta: 0.1, nstep: 15 };

/// The 256 unsigned 5-bit levels of a block: element `l` of sub-block `j`
/// takes its low four bits from the nibble as in Q4_K and its fifth bit from
/// bit `j` of `qh[l]`.
#[inline]
fn unpack_levels(block: &[u8]) -> [u8; QK_K] {
    let (qh, qs) = (&block[QH..QS], &block[QS..]);
    let mut out = [0u8; QK_K];
    for (c, out) in out.chunks_exact_mut(64).enumerate() {
        for l in 0..32 {
            let (q, h) = (qs[32 * c + l], qh[l] >> (2 * c));
            out[l] = (q & 0xF) | ((h & 1) << 4);
            out[l + 32] = (q >> 4) | (((h >> 1) & 1) << 4);
        }
    }
    out
}

pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    check_row(GgmlType::Q5_K, dst.len(), BYTES, src.len());
    for (block, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(block, 0);
        let dmin = read_f16(block, 2);
        let (scales, mins) = unpack_scales_mins(&block[SCALES..QH]);
        let levels = unpack_levels(block);
        for (j, (o, q)) in out.chunks_exact_mut(32).zip(levels.chunks_exact(32)).enumerate() {
            let (scale, offset) = (d * scales[j] as f32, dmin * mins[j] as f32);
            for (o, &q) in o.iter_mut().zip(q) {
                *o = scale * q as f32 - offset;
            }
        }
    }
}

pub(super) fn quantize(src: &[f32], dst: &mut [u8]) {
    check_row(GgmlType::Q5_K, src.len(), BYTES, dst.len());
    for (x, block) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)) {
        let q = quantize_affine_block(x, &SEARCH);
        write_f16(block, 0, q.d);
        write_f16(block, 2, q.dmin);
        block[SCALES..QH].copy_from_slice(&q.scales);
        let (qh, qs) = block[QH..].split_at_mut(QK_K / 8);
        qh.fill(0);
        for (c, out) in qs.chunks_exact_mut(32).enumerate() {
            let levels = &q.levels[64 * c..64 * c + 64];
            for l in 0..32 {
                let (lo, hi) = (levels[l], levels[l + 32]);
                out[l] = (lo & 0xF) | ((hi & 0xF) << 4);
                qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1));
            }
        }
    }
}

pub(super) fn dot(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q5_K, n, w, BYTES, a);
    let mut sum = 0.0f32;
    for (wb, ab) in w.chunks_exact(BYTES).zip(a.chunks_exact(q8k::BYTES)) {
        let (scales, mins) = unpack_scales_mins(&wb[SCALES..QH]);
        let levels = unpack_levels(wb);
        let a_qs = &ab[q8k::QS..q8k::BSUMS];
        let mut isum = 0i32;
        for (j, (q, a)) in levels.chunks_exact(32).zip(a_qs.chunks_exact(32)).enumerate() {
            let sub: i32 = q.iter().zip(a).map(|(&q, &a)| q as i32 * a as i8 as i32).sum();
            isum += scales[j] as i32 * sub;
        }
        let msum = min_term(&mins, ab);
        let d_a = q8k::block_scale(ab);
        sum += d_a * read_f16(wb, 0) * isum as f32 - d_a * read_f16(wb, 2) * msum as f32;
    }
    sum
}
