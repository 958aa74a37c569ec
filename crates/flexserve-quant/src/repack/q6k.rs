//! The `Q6_Kx8` layout: Q6_K rows in groups of eight, each row's values in a
//! lane of its own.
//!
//! Per group and super-block column, 1680 bytes (eight Q6_K blocks of 210,
//! so the rearranged matrix keeps the original's size):
//!
//! | bytes       | content |
//! |-------------|---------|
//! | 0..16       | the eight rows' f16 `d` |
//! | 16..144     | the i8 scales: entry `16 * (s / 2) + 2 * r + s % 2` is sub-block `s` of row `r` |
//! | 144..1168   | low four bits: vector `4p + j` (32 bytes), byte `4r + i` |
//! | 1168..1680  | high two bits: vector `2p + h` (32 bytes), byte `4r + i` |
//!
//! The 6-bit levels `q` (0..63; the value is `d * scale * (q - 32)`) of row
//! `r` come in sub-block pairs `p` (elements `32p..32p + 32`, sub-blocks `2p`
//! and `2p + 1`). Low-bit vector `4p + j` holds, in byte `4r + i`, element
//! `32p + 4j + i` in its low nibble and element `32p + 16 + 4j + i` in its
//! high one. High-bit vector `2p + h` holds, in byte `4r + i`, the top two
//! bits of elements `32p + 8h + i`, `32p + 16 + 8h + i`, `32p + 8h + 4 + i`
//! and `32p + 16 + 8h + 4 + i`, from bit 0 up. Every 32-bit lane of a vector
//! thus holds four consecutive levels of its row.
//!
//! Every kernel computes per row and super-block the exact integer sum
//! `isum = sum_s scale_s * sum((q - 32) * a)`, as `sum_s scale_s * sum(q * a)`
//! less `32 * sum_s scale_s * sum_s(a)` (the activation's 16-element sums),
//! then `acc += (d_a * d) * isum` in f32: the portable Q6_K dot's formula,
//! so products on this layout equal the plain dot bit for bit.

use super::{Product, REPACK_ROWS};
use crate::kquants::{q6k, q8k, QK_K};
use crate::legacy::read_f16;
use crate::types::QuantError;
use flexserve_gguf::GgmlType;

/// Bytes of one group's super-block column.
pub(crate) const GROUP_BLOCK: usize = REPACK_ROWS * q6k::BYTES;
pub(crate) const SCALES_AT: usize = 2 * REPACK_ROWS;
pub(crate) const LOW_AT: usize = SCALES_AT + 16 * REPACK_ROWS;
pub(crate) const HIGH_AT: usize = LOW_AT + 32 * 32;
const _: () = assert!(HIGH_AT + 16 * 32 == GROUP_BLOCK);

/// Row `r`'s 256 levels (0..63) of a Q6_K block.
fn levels(block: &[u8]) -> [u8; QK_K] {
    let mut out = [0u8; QK_K];
    for half in 0..2 {
        let ql = &block[64 * half..];
        let qh = &block[q6k::QH + 32 * half..];
        for l in 0..32 {
            let (a, b, h) = (ql[l], ql[l + 32], qh[l]);
            let at = 128 * half + l;
            out[at] = (a & 0xF) | (h & 3) << 4;
            out[at + 32] = (b & 0xF) | ((h >> 2) & 3) << 4;
            out[at + 64] = (a >> 4) | ((h >> 4) & 3) << 4;
            out[at + 96] = (b >> 4) | ((h >> 6) & 3) << 4;
        }
    }
    out
}

/// Rearranges `rows` (a multiple of 8) Q6_K rows of `cols` elements into `Q6_Kx8`.
pub(super) fn repack(src: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    super::rearrange(GgmlType::Q6_K, src, rows, cols, |dst, blocks| {
        for (r, block) in blocks.iter().enumerate() {
            dst[2 * r..2 * r + 2].copy_from_slice(&block[q6k::D..q6k::D + 2]);
            for s in 0..16 {
                dst[SCALES_AT + 16 * (s / 2) + 2 * r + s % 2] = block[q6k::SCALES + s];
            }
            let q = levels(block);
            for p in 0..8 {
                for i in 0..4 {
                    for j in 0..4 {
                        let (lo, hi) = (q[32 * p + 4 * j + i], q[32 * p + 16 + 4 * j + i]);
                        dst[LOW_AT + 32 * (4 * p + j) + 4 * r + i] = (lo & 0xF) | (hi & 0xF) << 4;
                    }
                    for h in 0..2 {
                        let top = |at: usize| q[32 * p + at + i] >> 4;
                        dst[HIGH_AT + 32 * (2 * p + h) + 4 * r + i] =
                            top(8 * h) | top(16 + 8 * h) << 2 | top(8 * h + 4) << 4 | top(16 + 8 * h + 4) << 6;
                    }
                }
            }
        }
    })
}

/// Level `e` (0..256) of row `r` in the group block `blk`.
fn level(blk: &[u8], r: usize, e: usize) -> i32 {
    let (p, within) = (e / 32, e % 32);
    let (upper, k) = (within / 16, within % 16);
    let (j, i) = (k / 4, k % 4);
    let low = blk[LOW_AT + 32 * (4 * p + j) + 4 * r + i] >> (4 * upper) & 0xF;
    // High-bit vector 2p + j/2, bit pair 2 * (2 * (j % 2) + upper).
    let high = blk[HIGH_AT + 32 * (2 * p + j / 2) + 4 * r + i] >> (2 * (2 * (j % 2) + upper)) & 3;
    (low | high << 4) as i32
}

/// The portable product: row by row, the arithmetic of the module docs.
pub(super) fn portable(p: Product) {
    super::portable_k_rows(p, GROUP_BLOCK, |blk, ab, r| {
        let a_qs = &ab[q8k::QS..q8k::BSUMS];
        let mut isum = 0i32;
        for s in 0..16 {
            let sub: i32 = (16 * s..16 * s + 16).map(|e| (level(blk, r, e) - 32) * a_qs[e] as i8 as i32).sum();
            isum += blk[SCALES_AT + 16 * (s / 2) + 2 * r + s % 2] as i8 as i32 * sub;
        }
        q8k::block_scale(ab) * read_f16(blk, 2 * r) * isum as f32
    })
}
