//! Tensor block formats and the kernels the matmuls need.
//!
//! Every type offers three operations on a row of `n` elements (`n` a multiple
//! of the type's block size):
//! - `dequantize_row`: blocks -> f32,
//! - `quantize_row`: f32 -> blocks (reference quantizers, as the writer and
//!   the activation path use),
//! - a dot product between a weight row of the type and an activation row
//!   quantized to the type's `vec_dot_type` (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1
//!   for Q4_1/Q5_1, Q8_K for the K-quants, F16 for F16, BF16 for BF16, F32 for
//!   F32), matching how llama.cpp computes, so that results agree closely.
//!
//! Matrix products come as GEMV (one activation row), tile (several), a
//! two-step tile (activations laid out once for many row ranges) and, for
//! weights rearranged in groups of eight rows ([`Repacked`]), products on
//! that layout.
//!
//! A tensor's kernels are resolved once, when it loads ([`kernel_set`], a
//! [`KernelSet`] per tensor type and tier), and then called in the hot loop
//! without further dispatch. SIMD variants are chosen at run time from the
//! CPU's features; the portable variant is always available and every SIMD
//! variant is tested against it.
//!
//! # Layout
//!
//! - `types`, `shape`: the kernels' signatures and the checks of their shapes.
//! - `isa`: the tiers, their detection, the process-wide cap.
//! - `simd`: the SIMD helpers of each instruction set, shared by the
//!   families; `fma`, `scratch`: the portable FMA and per-thread buffers.
//! - The families, each with its formats, portable kernels and the kernels of
//!   every tier: `legacy` (the 32-element formats), `kquants`, `float`,
//!   `repack` (rearranged layouts), `looped` (tiles and GEMVs that loop a
//!   dot: the portable and NEON tiers'), and the kernels of no tensor type
//!   (`activation`, `f16acc`, `read`).
//! - `dispatch`: the one place that picks a tier's kernels.
//!
//! The modules form no import loops: `types`, `shape`, `isa`, `simd`, `fma`
//! and `scratch` import nothing of the families; a family imports no other
//! family's helpers (`repack` uses the block formats of `legacy` and
//! `kquants`, `looped` the dots it loops); only `dispatch` knows them all.

pub use flexserve_gguf::GgmlType;

mod activation;
mod dispatch;
mod f16acc;
mod float;
mod fma;
mod isa;
mod kquants;
mod legacy;
mod looped;
mod read;
mod repack;
// Per-thread buffers of the x86-64 kernels only; the portable ones need none.
#[cfg(target_arch = "x86_64")]
mod scratch;
mod shape;
mod simd;
mod types;

pub use activation::{Activations, SiluMulFn, SoftmaxFn};
pub use dispatch::{
    activations, activations_for, f16_acc, f16_acc_for, gemv_kernel, gemv_kernel_for, kernel_set, kernels, kernels_for,
    read_checksum, read_kernel, read_kernel_for, sequence_tile_kernel, sequence_tile_kernel_for, shared_act_layout_max,
    shared_act_tile, shared_act_tile_for, tile_kernel, tile_kernel_for, KernelSet, SEQUENCE_CHAIN_MIN_TOKENS,
};
pub use f16acc::F16Acc;
pub use isa::{active_isa, detected_isa, limit_isa, usable_isas, Isa};
pub use read::ReadFn;
pub use repack::{ColumnPart, ColumnParts, PackedKernels, Repacked, RepackedMatmulFn, REPACK_ROWS};
#[cfg(target_arch = "x86_64")]
pub use scratch::{scrub_thread_scratch, thread_scratch_is_zero};
pub use types::{DequantizeFn, DotFn, GemvFn, Kernels, QuantError, QuantizeFn, SharedActTile, TileFn};

/// The portable kernels keep no scratch between calls: nothing to scrub.
#[cfg(not(target_arch = "x86_64"))]
pub fn scrub_thread_scratch() {}

/// The portable kernels keep no scratch between calls: always scrubbed.
#[cfg(not(target_arch = "x86_64"))]
#[doc(hidden)]
pub fn thread_scratch_is_zero() -> bool {
    true
}

fn check_len(ty: GgmlType, n: usize, bytes: usize) -> Result<(), QuantError> {
    let block = ty.block_size();
    if !n.is_multiple_of(block) {
        return Err(QuantError::NotBlockMultiple { ty, n, block });
    }
    let expected = n / block * ty.type_size();
    if bytes != expected {
        return Err(QuantError::BadLength { ty, n, expected, got: bytes });
    }
    Ok(())
}

/// Checked convenience wrapper: dequantizes one row.
pub fn dequantize_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    check_len(ty, dst.len(), src.len())?;
    (kernels(ty)?.dequantize)(src, dst);
    Ok(())
}

/// Checked convenience wrapper: quantizes one row.
pub fn quantize_row(ty: GgmlType, src: &[f32], dst: &mut [u8]) -> Result<(), QuantError> {
    check_len(ty, src.len(), dst.len())?;
    (kernels(ty)?.quantize)(src, dst);
    Ok(())
}

/// Quantizes a whole row-major matrix of `rows x cols` f32 values into a new buffer.
pub fn quantize_matrix(ty: GgmlType, src: &[f32], cols: usize) -> Result<Vec<u8>, QuantError> {
    let k = kernels(ty)?;
    let row_bytes = cols / ty.block_size() * ty.type_size();
    check_len(ty, cols, row_bytes)?;
    let rows = src.len().checked_div(cols).unwrap_or(0);
    let mut out = vec![0u8; rows * row_bytes];
    for (s, d) in src.chunks_exact(cols).zip(out.chunks_exact_mut(row_bytes)) {
        (k.quantize)(s, d);
    }
    Ok(out)
}
