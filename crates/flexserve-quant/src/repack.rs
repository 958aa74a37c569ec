//! Weights rearranged at load time for matrix products that walk eight rows
//! at once, with llama.cpp's arithmetic for such rearranged weights.
//!
//! llama.cpp's default CPU path on AVX2 stores Q4_0 matrices whose row count
//! is a multiple of 8 in groups of eight interleaved rows, and computes each
//! output as
//!
//! ```text
//! acc = 0
//! for each block b:  acc = fma(f32(isum_b), f32(d_w[b]) * f32(d_a[b]), acc)
//! ```
//!
//! where `isum_b` is the exact integer dot of the block's 32 weight levels
//! (`q - 8`) with the 32 Q8_0 activation quants and the scale product is
//! rounded to f32 before the fused multiply-add. No horizontal sum of float
//! lanes follows: each lane of the accumulator belongs to one row. The plain
//! dot (`Kernels::dot`) instead keeps eight partial float sums per row and adds
//! them at the end, so its results differ in the last bits. The kernels here
//! reproduce the grouped arithmetic exactly, whatever the ISA, so a model
//! whose weights are rearranged agrees with default llama.cpp bit for bit in
//! its matrix products.
//!
//! # Layout (`Q4_0x8`)
//!
//! Rows are taken in groups of eight. A group holds, per block column `b`,
//! 144 bytes: the eight rows' f16 scales (row order), then 128 quant bytes
//! where byte `32 * m + 4 * r + i` (`m < 4`, `r < 8`, `i < 4`) is byte
//! `4 * m + i` of row `r`'s original block: its low nibble is element
//! `4 * m + i`, its high nibble element `16 + 4 * m + i`. A 32-byte load thus
//! gives, per 32-bit lane `r`, four consecutive elements of row `r`. The
//! rearranged matrix has exactly the size of the original.

#[cfg(target_arch = "x86_64")]
mod avx2;

use crate::legacy::{Q4_0_BYTES, Q8_0_BYTES, QK};
use crate::{detected_isa, GgmlType, Isa, QuantError};

/// Rows per interleaved group.
pub const REPACK_ROWS: usize = 8;
/// Bytes of one block column of a group: eight f16 scales and 128 quant bytes.
const GROUP_BLOCK_BYTES: usize = REPACK_ROWS * Q4_0_BYTES;
/// Offset of the quant bytes inside a group block.
const GROUP_QUANTS: usize = 2 * REPACK_ROWS;

/// Whether llama.cpp would rearrange a `ty` matrix of `rows` rows (and so
/// whether [`repack_q4_0x8`] accepts it).
pub fn repackable(ty: GgmlType, rows: usize, cols: usize) -> bool {
    ty == GgmlType::Q4_0 && rows > 0 && rows % REPACK_ROWS == 0 && cols > 0 && cols % QK == 0
}

/// Rearranges a row-major Q4_0 matrix of `rows x cols` into the `Q4_0x8`
/// layout (same size). `rows` must be a multiple of 8.
pub fn repack_q4_0x8(src: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    let ty = GgmlType::Q4_0;
    if cols % QK != 0 {
        return Err(QuantError::NotBlockMultiple { ty, n: cols, block: QK });
    }
    if rows % REPACK_ROWS != 0 {
        return Err(QuantError::RowsNotGroupMultiple { ty, rows, group: REPACK_ROWS });
    }
    let nb = cols / QK;
    let row_bytes = nb * Q4_0_BYTES;
    let expected = rows * row_bytes;
    if src.len() != expected {
        return Err(QuantError::BadLength { ty, n: rows * cols, expected, got: src.len() });
    }
    let mut out = vec![0u8; expected];
    for (group_src, group_dst) in
        src.chunks_exact(REPACK_ROWS * row_bytes).zip(out.chunks_exact_mut(REPACK_ROWS * row_bytes))
    {
        for (b, dst) in group_dst.chunks_exact_mut(GROUP_BLOCK_BYTES).enumerate() {
            for r in 0..REPACK_ROWS {
                let block = &group_src[r * row_bytes + b * Q4_0_BYTES..][..Q4_0_BYTES];
                dst[2 * r..2 * r + 2].copy_from_slice(&block[..2]);
                for m in 0..4 {
                    let to = GROUP_QUANTS + 32 * m + 4 * r;
                    dst[to..to + 4].copy_from_slice(&block[2 + 4 * m..2 + 4 * m + 4]);
                }
            }
        }
    }
    Ok(out)
}

/// Matrix product of rearranged weights with Q8_0 activation rows:
/// `out[t * out_stride + r] = dot(weight row r, activation row t)` for
/// `r < rows` and `t < n_tok`, with llama.cpp's grouped arithmetic.
///
/// `w` holds `rows` (a multiple of 8) rows of `n` elements in the kernel's
/// layout, starting at a group boundary; activation row `t` starts at
/// `a[t * a_row_bytes]`. Panics when a slice is too short for the shape given
/// (a caller bug).
#[allow(clippy::too_many_arguments)]
pub type RepackedMatmulFn =
    fn(n: usize, w: &[u8], rows: usize, a: &[u8], a_row_bytes: usize, n_tok: usize, out: &mut [f32], out_stride: usize);

/// The `Q4_0x8` kernel for the best ISA of this CPU.
pub fn q4_0x8_kernel() -> RepackedMatmulFn {
    q4_0x8_kernel_for(detected_isa())
}

/// The `Q4_0x8` kernel restricted to `isa` (an ISA the CPU lacks gives the
/// portable kernel).
pub fn q4_0x8_kernel_for(isa: Isa) -> RepackedMatmulFn {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 if detected_isa() == Isa::Avx2 => avx2::q4_0x8,
        _ => portable_q4_0x8,
    }
}

/// Panics with a clear message unless the slices hold the shape described.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_q4_0x8(
    n: usize,
    w: &[u8],
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    n_tok: usize,
    out: &[f32],
    out_stride: usize,
) {
    assert!(n % QK == 0, "Q4_0x8 product: {n} elements is not a multiple of the block size {QK}");
    assert!(rows % REPACK_ROWS == 0, "Q4_0x8 product: {rows} rows is not a multiple of {REPACK_ROWS}");
    let nb = n / QK;
    assert!(w.len() >= rows * nb * Q4_0_BYTES, "Q4_0x8 product: {rows} rows of {n} need more than {} bytes", w.len());
    if n_tok == 0 {
        return;
    }
    assert!(a_row_bytes >= nb * Q8_0_BYTES, "Q4_0x8 product: activation stride {a_row_bytes} is below one row");
    assert!(
        a.len() >= (n_tok - 1) * a_row_bytes + nb * Q8_0_BYTES,
        "Q4_0x8 product: {n_tok} activation rows need more than {} bytes",
        a.len()
    );
    assert!(
        rows == 0 || (out_stride >= rows && out.len() >= (n_tok - 1) * out_stride + rows),
        "Q4_0x8 product: {n_tok} output rows of {rows} (stride {out_stride}) need more than {} floats",
        out.len()
    );
}

/// Portable kernel: the same arithmetic as the AVX2 one, lane by lane.
#[allow(clippy::too_many_arguments)]
fn portable_q4_0x8(
    n: usize,
    w: &[u8],
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_q4_0x8(n, w, rows, a, a_row_bytes, n_tok, out, out_stride);
    let nb = n / QK;
    for (g, group) in w.chunks_exact(nb * GROUP_BLOCK_BYTES).take(rows / REPACK_ROWS).enumerate() {
        for t in 0..n_tok {
            let act = &a[t * a_row_bytes..];
            let mut acc = [0f32; REPACK_ROWS];
            for (b, blk) in group.chunks_exact(GROUP_BLOCK_BYTES).enumerate() {
                let ab = &act[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
                let d_a = crate::legacy::read_f16(ab, 0);
                let qa = &ab[2..];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let mut isum = 0i32;
                    for m in 0..4 {
                        for i in 0..4 {
                            let byte = blk[GROUP_QUANTS + 32 * m + 4 * r + i];
                            let lo = (byte & 0x0F) as i32 - 8;
                            let hi = (byte >> 4) as i32 - 8;
                            isum += lo * qa[4 * m + i] as i8 as i32 + hi * qa[16 + 4 * m + i] as i8 as i32;
                        }
                    }
                    let scale = crate::legacy::read_f16(blk, 2 * r) * d_a;
                    *acc_r = (isum as f32).mul_add(scale, *acc_r);
                }
            }
            out[t * out_stride + g * REPACK_ROWS..][..REPACK_ROWS].copy_from_slice(&acc);
        }
    }
}
