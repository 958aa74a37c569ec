//! Q4_K: 4-bit levels with a 6-bit scale and min per 32 elements.

use super::q8k;
use super::{
    check_dot, check_row, quantize_affine_block, read_f16, unpack_scales_mins, write_f16, ScaleMinSearch, QK_K,
};
use flexserve_gguf::GgmlType;

pub(crate) const BYTES: usize = 4 + super::K_SCALE_SIZE + QK_K / 2;
pub(crate) const SCALES: usize = 4;
pub(crate) const QS: usize = SCALES + super::K_SCALE_SIZE;

const SEARCH: ScaleMinSearch = ScaleMinSearch { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20 };

pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    check_row(GgmlType::Q4_K, dst.len(), BYTES, src.len());
    for (block, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = read_f16(block, 0);
        let dmin = read_f16(block, 2);
        let (scales, mins) = unpack_scales_mins(&block[SCALES..QS]);
        let qs = &block[QS..];
        for (c, chunk) in out.chunks_exact_mut(64).enumerate() {
            let (lo_out, hi_out) = chunk.split_at_mut(32);
            let (j_lo, j_hi) = (2 * c, 2 * c + 1);
            let (d_lo, m_lo) = (d * scales[j_lo] as f32, dmin * mins[j_lo] as f32);
            let (d_hi, m_hi) = (d * scales[j_hi] as f32, dmin * mins[j_hi] as f32);
            for (l, &q) in qs[32 * c..32 * c + 32].iter().enumerate() {
                lo_out[l] = d_lo * (q & 0xF) as f32 - m_lo;
                hi_out[l] = d_hi * (q >> 4) as f32 - m_hi;
            }
        }
    }
}

pub(super) fn quantize(src: &[f32], dst: &mut [u8]) {
    check_row(GgmlType::Q4_K, src.len(), BYTES, dst.len());
    for (x, block) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)) {
        let q = quantize_affine_block(x, &SEARCH);
        write_f16(block, 0, q.d);
        write_f16(block, 2, q.dmin);
        block[SCALES..QS].copy_from_slice(&q.scales);
        for (c, out) in block[QS..].chunks_exact_mut(32).enumerate() {
            let levels = &q.levels[64 * c..64 * c + 64];
            for (l, byte) in out.iter_mut().enumerate() {
                *byte = levels[l] | (levels[l + 32] << 4);
            }
        }
    }
}

/// Sum over sub-blocks of `scale_j * sum(q * a)` and of `min_j * sum(a)`
/// (the latter from the activation's group sums), then one multiply by the
/// super-block factors.
pub(super) fn dot(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q4_K, n, w, BYTES, a);
    let mut sum = 0.0f32;
    for (wb, ab) in w.chunks_exact(BYTES).zip(a.chunks_exact(q8k::BYTES)) {
        let (scales, mins) = unpack_scales_mins(&wb[SCALES..QS]);
        let qs = &wb[QS..];
        let a_qs = &ab[q8k::QS..q8k::BSUMS];
        let mut isum = 0i32;
        for c in 0..4 {
            let (mut lo, mut hi) = (0i32, 0i32);
            for l in 0..32 {
                let q = qs[32 * c + l];
                lo += (q & 0xF) as i32 * a_qs[64 * c + l] as i8 as i32;
                hi += (q >> 4) as i32 * a_qs[64 * c + 32 + l] as i8 as i32;
            }
            isum += scales[2 * c] as i32 * lo + scales[2 * c + 1] as i32 * hi;
        }
        let msum = min_term(&mins, ab);
        let d_a = q8k::block_scale(ab);
        sum += d_a * read_f16(wb, 0) * isum as f32 - d_a * read_f16(wb, 2) * msum as f32;
    }
    sum
}

/// `sum_j mins[j] * (sum of the activation quants of sub-block j)`.
pub(super) fn min_term(mins: &[u8; 8], a_block: &[u8]) -> i32 {
    (0..8).map(|j| mins[j] as i32 * (q8k::group_sum(a_block, 2 * j) + q8k::group_sum(a_block, 2 * j + 1))).sum()
}
