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
//! Kernels are looked up once (`kernels(ty)`) and then called in the hot loop
//! without further dispatch. SIMD variants are chosen at run time from the
//! CPU's features; the portable variant is always available and every SIMD
//! variant is tested against it.

pub use flexserve_gguf::GgmlType;

mod activation;
mod f16acc;
mod float;
mod gemv;
mod kquants;
mod legacy;
mod read;
mod repack;
// Per-thread buffers of the x86-64 kernels only; the portable ones need none.
#[cfg(target_arch = "x86_64")]
mod scratch;
mod tile;

pub use activation::{activations, activations_for, Activations, SiluMulFn, SoftmaxFn};
pub use f16acc::{f16_acc, f16_acc_for, F16Acc};
pub use gemv::{gemv_kernel, gemv_kernel_for, GemvFn};
pub use read::{read_checksum, read_kernel, read_kernel_for, ReadFn};
pub use repack::{ColumnPart, ColumnParts, Repacked, RepackedMatmulFn, REPACK_ROWS};
#[cfg(target_arch = "x86_64")]
pub use scratch::{scrub_thread_scratch, thread_scratch_is_zero};

/// The portable kernels keep no scratch between calls: nothing to scrub.
#[cfg(not(target_arch = "x86_64"))]
pub fn scrub_thread_scratch() {}

/// The portable kernels keep no scratch between calls: always scrubbed.
#[cfg(not(target_arch = "x86_64"))]
#[doc(hidden)]
pub fn thread_scratch_is_zero() -> bool {
    true
}
pub use tile::{tile_kernel, tile_kernel_for, TileFn};

/// `dst[i] = dequant(src)[i]`; `src.len()` must be the row size of `dst.len()` elements.
pub type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);
/// Quantizes `src` into `dst`, which must be the row size of `src.len()` elements.
pub type QuantizeFn = fn(src: &[f32], dst: &mut [u8]);
/// Dot product of `n` elements: weight row `w` (the weight type) and activation
/// row `a` (the weight type's `vec_dot_type`).
pub type DotFn = fn(n: usize, w: &[u8], a: &[u8]) -> f32;

/// The kernels for one tensor type.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub ty: GgmlType,
    /// The type activations are quantized to before `dot`.
    pub vec_dot_type: GgmlType,
    pub dequantize: DequantizeFn,
    pub quantize: QuantizeFn,
    /// `None` for types that only serve as activation formats (Q8_1, Q8_K).
    pub dot: Option<DotFn>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("tensor type {0} is not supported by the kernels")]
    Unsupported(GgmlType),
    #[error("row of {n} elements is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple { ty: GgmlType, n: usize, block: usize },
    #[error("{ty} matrix of {rows} rows cannot be interleaved in groups of {group}")]
    RowsNotGroupMultiple { ty: GgmlType, rows: usize, group: usize },
    #[error("{ty} row of {n} elements needs {expected} bytes, got {got}")]
    BadLength { ty: GgmlType, n: usize, expected: usize, got: usize },
}

/// Which implementation the kernel tables use, from the most portable up:
/// each tier's CPUs also run every lower tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// `Avx2` plus AVX-512 F, BW, VL and VNNI. Kernels written for it where it
    /// pays (the rearranged Q4_0/Q8_0 products); the rest use the AVX2 ones.
    Avx512,
}

impl Isa {
    /// Lower-case name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// `self`, lowered to the best tier this CPU runs: tests and benchmarks
    /// ask for a tier, and a CPU without it gets the best one it has.
    pub fn usable(self) -> Isa {
        self.min(detected_isa())
    }
}

/// The best instruction set this CPU offers that the kernels use.
pub fn detected_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        use std::is_x86_feature_detected as has;
        if has!("avx2") && has!("fma") && has!("f16c") {
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") && has!("avx512vnni") {
                return Isa::Avx512;
            }
            return Isa::Avx2;
        }
    }
    Isa::Portable
}

/// Process-wide cap on the tier the default kernel tables use (`u8::MAX`: none).
static ISA_LIMIT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Caps the tier that `kernels`, `tile_kernel`, `gemv_kernel`, `activations`,
/// `f16_acc`, `read_kernel` and `Repacked::kernel` pick from now on, for the
/// whole process, so that one CPU can compare its tiers (`flexserve bench
/// engine --isa avx2`).
/// Call it before a model is loaded: tables looked up earlier keep their tier.
/// Returns the tier in effect, which is lower than `limit` on a CPU without it.
pub fn limit_isa(limit: Isa) -> Isa {
    ISA_LIMIT.store(limit as u8, std::sync::atomic::Ordering::Relaxed);
    active_isa()
}

/// The tier the default kernel tables use: the CPU's best, unless `limit_isa`
/// capped it.
pub fn active_isa() -> Isa {
    let limit = match ISA_LIMIT.load(std::sync::atomic::Ordering::Relaxed) {
        0 => Isa::Portable,
        1 => Isa::Avx2,
        _ => Isa::Avx512,
    };
    detected_isa().min(limit)
}

/// Every tier this CPU runs, portable first (what tests compare).
pub fn usable_isas() -> Vec<Isa> {
    [Isa::Portable, Isa::Avx2, Isa::Avx512].into_iter().filter(|&isa| isa <= detected_isa()).collect()
}

/// Kernels for `ty` using the active tier (`active_isa`).
pub fn kernels(ty: GgmlType) -> Result<Kernels, QuantError> {
    kernels_for(ty, active_isa())
}

/// Kernels for `ty` restricted to `isa` (tests compare ISAs against each other).
/// Asking for an ISA the CPU lacks falls back to the portable kernels.
pub fn kernels_for(ty: GgmlType, isa: Isa) -> Result<Kernels, QuantError> {
    let isa = isa.usable();
    float::kernels(ty, isa)
        .or_else(|| legacy::kernels(ty, isa))
        .or_else(|| kquants::kernels(ty, isa))
        .ok_or(QuantError::Unsupported(ty))
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
