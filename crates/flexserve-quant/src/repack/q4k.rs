//! The `Q4_Kx8` layout: Q4_K rows in groups of eight, each row's values in a
//! lane of its own, so that the products need no horizontal sums.
//!
//! Per group and super-block column `b`, 1152 bytes (eight Q4_K blocks of
//! 144, so the rearranged matrix keeps the original's size):
//!
//! | bytes      | content |
//! |------------|---------|
//! | 0..16      | the eight rows' f16 `d` |
//! | 16..32     | the eight rows' f16 `dmin` |
//! | 32..96     | entry `e`: `scale | (min & 3) << 6` |
//! | 96..128    | byte `i`: `min >> 2` of entry `i` (low nibble), of entry `32 + i` (high) |
//! | 128..1152  | quants: byte `256c + 32m + 4r + i` is `qs[32c + 4m + i]` of row `r` |
//!
//! Entry `e = 16 * (j / 2) + 2 * r + j % 2` holds sub-block `j`'s 6-bit scale
//! and min of row `r`: zero-extending 16 entries of a sub-block pair to 16-bit
//! lanes puts both of row `r`'s values in one 32-bit lane, as the SIMD kernels
//! want them. A quant vector of 32 bytes holds, per 32-bit lane `r`, four
//! consecutive levels of row `r` of sub-block `2c` (low nibbles) and `2c + 1`
//! (high nibbles).
//!
//! Every kernel computes, per row and super-block, the exact integer sums
//! `isum = sum_j scale_j * sum(q * a)` and `msum = sum_j min_j * sum(a)`, then
//! `acc = fma(isum, d * d_a, acc)` and `acc_min = fma(msum, dmin * d_a,
//! acc_min)` in f32, and returns `acc - acc_min`: the arithmetic of
//! llama.cpp's rearranged Q4_K product for one token (`q4_K_8x8` GEMV, which
//! its CPU backend uses for every Q4_K matrix of whole groups of eight rows).
//! Its GEMM, which takes a sequence's tokens four at a time (the first
//! `n - n % 4` of a batch; the rest go through the GEMV), updates the two
//! accumulators once per sub-block pair instead (with that pair's sums), and
//! so do the kernels here for such tokens (`Product::grouped`). Neither is
//! the plain dot's (one chain, each super-block's difference added), which
//! llama.cpp's row-by-row path has: they differ in the last bits, and the
//! next activation quantization can turn that into a different quant.

use super::{Product, REPACK_ROWS};
use crate::kquants::{q4k, q8k, unpack_scales_mins, QK_K};
use crate::legacy::read_f16;
use crate::types::QuantError;
use flexserve_gguf::GgmlType;

/// Bytes of one group's super-block column.
pub(crate) const GROUP_BLOCK: usize = REPACK_ROWS * q4k::BYTES;
pub(crate) const DMIN_AT: usize = 2 * REPACK_ROWS;
/// The 64 entries of scale and low min bits.
pub(crate) const SCALES_AT: usize = 4 * REPACK_ROWS;
/// The 64 nibbles of high min bits.
pub(crate) const MINS_HI_AT: usize = SCALES_AT + 64;
pub(crate) const QS_AT: usize = MINS_HI_AT + 32;
const _: () = assert!(QS_AT + REPACK_ROWS * QK_K / 2 == GROUP_BLOCK);

/// The entry of sub-block `j` of row `r` (see the module docs).
const fn entry(j: usize, r: usize) -> usize {
    16 * (j / 2) + 2 * r + j % 2
}

/// Rearranges `rows` (a multiple of 8) Q4_K rows of `cols` elements into `Q4_Kx8`.
pub(super) fn repack(src: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    super::rearrange(GgmlType::Q4_K, src, rows, cols, |dst, blocks| {
        for (r, block) in blocks.iter().enumerate() {
            dst[2 * r..2 * r + 2].copy_from_slice(&block[0..2]);
            dst[DMIN_AT + 2 * r..DMIN_AT + 2 * r + 2].copy_from_slice(&block[2..4]);
            let (scales, mins) = unpack_scales_mins(&block[q4k::SCALES..q4k::QS]);
            for j in 0..8 {
                let e = entry(j, r);
                dst[SCALES_AT + e] = scales[j] | (mins[j] & 3) << 6;
                dst[MINS_HI_AT + e % 32] |= (mins[j] >> 2) << (4 * (e / 32));
            }
            let qs = &block[q4k::QS..];
            for c in 0..4 {
                for m in 0..8 {
                    let to = QS_AT + 256 * c + 32 * m + 4 * r;
                    dst[to..to + 4].copy_from_slice(&qs[32 * c + 4 * m..][..4]);
                }
            }
        }
    })
}

/// Sub-block `j`'s scale and min of row `r` in the group block `blk`.
fn scale_min(blk: &[u8], j: usize, r: usize) -> (i32, i32) {
    let e = entry(j, r);
    let packed = blk[SCALES_AT + e];
    let high = (blk[MINS_HI_AT + e % 32] >> (4 * (e / 32))) & 0x0F;
    ((packed & 0x3F) as i32, (packed >> 6 | high << 2) as i32)
}

/// The portable product: row by row, the arithmetic of the module docs.
pub(super) fn portable(p: Product) {
    let Product { n, w, rows, a, a_row_bytes, n_tok, mut out, grouped, .. } = p;
    let nb = n / QK_K;
    // Tokens before this one are in llama.cpp's groups of four.
    let in_groups = if grouped { n_tok - n_tok % 4 } else { 0 };
    for (g, group) in w.chunks_exact(nb * GROUP_BLOCK).take(rows / REPACK_ROWS).enumerate() {
        for t in 0..n_tok {
            let act = &a[t * a_row_bytes..];
            let (mut acc, mut acc_min) = ([0f32; REPACK_ROWS], [0f32; REPACK_ROWS]);
            for (b, blk) in group.chunks_exact(GROUP_BLOCK).enumerate() {
                let ab = &act[b * q8k::BYTES..(b + 1) * q8k::BYTES];
                let d_a = q8k::block_scale(ab);
                for r in 0..REPACK_ROWS {
                    let sums = row_sums(blk, ab, r);
                    let (d, dmin) = (read_f16(blk, 2 * r), read_f16(blk, DMIN_AT + 2 * r));
                    let mut update = |isum: i32, msum: i32| {
                        acc[r] = crate::fma::fma_f32(isum as f32, d * d_a, acc[r]);
                        acc_min[r] = crate::fma::fma_f32(msum as f32, dmin * d_a, acc_min[r]);
                    };
                    if t < in_groups {
                        sums.iter().for_each(|&(isum, msum)| update(isum, msum));
                    } else {
                        update(sums.iter().map(|s| s.0).sum(), sums.iter().map(|s| s.1).sum());
                    }
                }
            }
            let result: [f32; REPACK_ROWS] = std::array::from_fn(|r| acc[r] - acc_min[r]);
            out.store(t, g * REPACK_ROWS, &result);
        }
    }
}

/// Row `r`'s exact integer sums `isum` and `msum` (see the module docs) of
/// the group block `blk` against the activation block `ab`, per sub-block
/// pair.
fn row_sums(blk: &[u8], ab: &[u8], r: usize) -> [(i32, i32); 4] {
    let a_qs = &ab[q8k::QS..q8k::BSUMS];
    let mut sums = [(0i32, 0i32); 4];
    for (c, (isum, msum)) in sums.iter_mut().enumerate() {
        let (mut lo, mut hi) = (0i32, 0i32);
        for m in 0..8 {
            for i in 0..4 {
                let q = blk[QS_AT + 256 * c + 32 * m + 4 * r + i];
                let at = 64 * c + 4 * m + i;
                lo += (q & 0x0F) as i32 * a_qs[at] as i8 as i32;
                hi += (q >> 4) as i32 * a_qs[at + 32] as i8 as i32;
            }
        }
        let ((s_lo, m_lo), (s_hi, m_hi)) = (scale_min(blk, 2 * c, r), scale_min(blk, 2 * c + 1, r));
        *isum = s_lo * lo + s_hi * hi;
        let sum_a = |j: usize| q8k::group_sum(ab, 2 * j) + q8k::group_sum(ab, 2 * j + 1);
        *msum = m_lo * sum_a(2 * c) + m_hi * sum_a(2 * c + 1);
    }
    sums
}
