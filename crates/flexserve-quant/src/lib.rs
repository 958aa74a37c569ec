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
mod neon;
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
pub use tile::{
    sequence_tile_kernel, sequence_tile_kernel_for, shared_act_layout_max, shared_act_tile, shared_act_tile_for,
    tile_kernel, tile_kernel_for, SharedActTile, TileFn, SEQUENCE_CHAIN_MIN_TOKENS,
};

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

/// Which implementation the kernel tables use. Tiers of one architecture
/// are ordered from the most portable up (each tier's CPUs also run every
/// lower one); `Portable` is below every tier; tiers of different
/// architectures do not compare (`Isa::Neon >= Isa::Avx2` is false, and so
/// is `Isa::Neon <= Isa::Avx2`), so `PartialOrd` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    Portable,
    /// x86-64 with AVX2, FMA and F16C.
    Avx2,
    /// `Avx2` plus AVX-512 F, BW, VL and VNNI. Kernels written for it where it
    /// pays (the rearranged Q4_0/Q8_0 products); the rest use the AVX2 ones.
    Avx512,
    /// aarch64 with NEON (Advanced SIMD, part of every aarch64 Linux CPU);
    /// integer products by widening multiplies.
    Neon,
    /// `Neon` plus the dot-product instructions (`sdot`, Armv8.2's
    /// `dotprod`, e.g. Cortex-A55/A76).
    NeonDot,
}

/// Every tier, portable first, each architecture's from the lowest up.
const ALL_ISAS: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::NeonDot];

impl PartialOrd for Isa {
    fn partial_cmp(&self, other: &Isa) -> Option<std::cmp::Ordering> {
        let ((arch_a, rank_a), (arch_b, rank_b)) = (self.place(), other.place());
        (rank_a == 0 || rank_b == 0 || arch_a == arch_b).then(|| rank_a.cmp(&rank_b))
    }
}

impl Isa {
    /// Lower-case name, as reports print it.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
            Isa::Neon => "neon",
            Isa::NeonDot => "neon-dot",
        }
    }

    /// The tier named `name` (as `name` prints it).
    pub fn from_name(name: &str) -> Option<Isa> {
        ALL_ISAS.into_iter().find(|isa| isa.name() == name)
    }

    /// The architecture family (0 for portable, 1 x86-64, 2 aarch64) and
    /// the rank within it (0 for portable).
    fn place(self) -> (u8, u8) {
        match self {
            Isa::Portable => (0, 0),
            Isa::Avx2 => (1, 1),
            Isa::Avx512 => (1, 2),
            Isa::Neon => (2, 1),
            Isa::NeonDot => (2, 2),
        }
    }

    /// `self`, lowered to the best tier this CPU runs: tests and benchmarks
    /// ask for a tier, and a CPU without it gets the best one it has below
    /// it. A tier of another architecture has only `Portable` below it: an
    /// aarch64 CPU asked for `Avx2` gets `Portable`, never an x86 tier.
    pub fn usable(self) -> Isa {
        let best = detected_isa();
        if self <= best {
            self
        } else if best <= self {
            best
        } else {
            Isa::Portable
        }
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
    #[cfg(target_arch = "aarch64")]
    {
        use std::arch::is_aarch64_feature_detected as has;
        if has!("neon") {
            if has!("dotprod") {
                return Isa::NeonDot;
            }
            return Isa::Neon;
        }
    }
    Isa::Portable
}

/// Process-wide cap on the tier the default kernel tables use (`u8::MAX`:
/// none; else an index into `ALL_ISAS`).
static ISA_LIMIT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(u8::MAX);

/// Caps the tier that `kernels`, `tile_kernel`, `gemv_kernel`, `activations`,
/// `f16_acc`, `read_kernel` and `Repacked::kernel` pick from now on, for the
/// whole process, so that one CPU can compare its tiers (`flexserve bench
/// engine --isa avx2`).
/// Call it before a model is loaded: tables looked up earlier keep their tier.
/// Returns the tier in effect (`limit.usable()`), which is lower than `limit`
/// on a CPU without it, and `Portable` for another architecture's tier.
/// `limit_isa(detected_isa())` lifts the cap.
pub fn limit_isa(limit: Isa) -> Isa {
    let index = ALL_ISAS.iter().position(|&isa| isa == limit).expect("every tier is listed");
    ISA_LIMIT.store(index as u8, std::sync::atomic::Ordering::Relaxed);
    active_isa()
}

/// The tier the default kernel tables use: the CPU's best, unless `limit_isa`
/// capped it.
pub fn active_isa() -> Isa {
    match ALL_ISAS.get(ISA_LIMIT.load(std::sync::atomic::Ordering::Relaxed) as usize) {
        Some(limit) => limit.usable(),
        None => detected_isa(),
    }
}

/// Every tier this CPU runs, portable first (what tests compare).
pub fn usable_isas() -> Vec<Isa> {
    ALL_ISAS.into_iter().filter(|&isa| isa.usable() == isa).collect()
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

/// `a * b + c` rounded once (a fused multiply-add), as the portable kernels
/// reproduce the SIMD ones' FMAs. Where the build targets FMA hardware (and
/// on every aarch64 CPU, whose base instruction set has it) this is the
/// instruction; otherwise `mul_add` would call the C library's `fmaf`
/// for every element, so it is computed here: the product is exact in f64,
/// the sum is rounded to odd there (its exact error, from TwoSum, moves an
/// even result to the odd neighbour on the error's side), and rounding that
/// to f32 is the correctly rounded result, 29 spare bits being more than the
/// two that rounding to odd needs.
#[inline(always)]
pub(crate) fn fma_f32(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        return a.mul_add(b, c);
    }
    let (p, c) = (a as f64 * b as f64, c as f64);
    let s = p + c;
    let v = s - p;
    let err = (p - (s - v)) + (c - v);
    let bits = s.to_bits();
    let odd = if err != 0.0 && bits & 1 == 0 {
        // Away from zero when the error has the result's sign, else toward it.
        f64::from_bits(if (err > 0.0) == (s > 0.0) { bits + 1 } else { bits - 1 })
    } else {
        s
    };
    odd as f32
}

/// [`fma_f32`] on eight lanes at once: `acc[j] = fma(a, b[j], acc[j])`,
/// without branches, so that the lanes' f64 arithmetic vectorises. `HW`:
/// the caller is compiled for FMA hardware (`target_feature(enable =
/// "fma")`, see `with_fma`), where `mul_add` is the instruction.
#[inline(always)]
pub(crate) fn fma_f32_lanes<const HW: bool>(a: f32, b: &[f32; 8], acc: &mut [f32; 8]) {
    if HW || cfg!(any(target_feature = "fma", target_arch = "aarch64")) {
        for (c, &b) in acc.iter_mut().zip(b) {
            *c = a.mul_add(b, *c);
        }
        return;
    }
    let a = a as f64;
    for (c, &b) in acc.iter_mut().zip(b) {
        let (p, c64) = (a * b as f64, *c as f64);
        let s = p + c64;
        let v = s - p;
        let err = (p - (s - v)) + (c64 - v);
        let bits = s.to_bits();
        let to_odd = (err != 0.0) & (bits & 1 == 0);
        let step = if (err > 0.0) == (s > 0.0) { 1u64 } else { u64::MAX };
        *c = f64::from_bits(bits.wrapping_add(if to_odd { step } else { 0 })) as f32;
    }
}

/// Defines `$name(args) -> $ret` as `$body::<HW>(args)`, with `HW` true
/// where the CPU has FMA hardware: the portable kernels' fused
/// multiply-adds are then single instructions instead of [`fma_f32`]'s
/// emulation (the same results, several times faster).
macro_rules! with_fma {
    ($(#[$doc:meta])* fn $name:ident($($arg:ident: $ty:ty),*) -> $ret:ty = $body:ident;) => {
        $(#[$doc])*
        fn $name($($arg: $ty),*) -> $ret {
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("fma") {
                #[target_feature(enable = "fma")]
                unsafe fn fused($($arg: $ty),*) -> $ret {
                    $body::<true>($($arg),*)
                }
                // SAFETY: the CPU has FMA (checked above), all `fused` needs.
                return unsafe { fused($($arg),*) };
            }
            $body::<false>($($arg),*)
        }
    };
}
pub(crate) use with_fma;

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

#[cfg(test)]
mod tests {
    #[test]
    fn fma_f32_is_the_fused_multiply_add() {
        // Cases where the product's rounding matters, and near-cancellations.
        let mut x = 0x1234_5678u32;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            f32::from_bits((x & 0x807f_ffff) | ((100 + x % 56) << 23))
        };
        for _ in 0..200_000 {
            let (a, b) = (next(), next());
            for c in [next(), -(a * b), -(a * b) * (1.0 + f32::EPSILON), 0.0] {
                let want = a.mul_add(b, c);
                assert_eq!(super::fma_f32(a, b, c).to_bits(), want.to_bits(), "fma({a:e}, {b:e}, {c:e})");
            }
        }
        let tie = 1.0 + f32::EPSILON / 2.0;
        assert_eq!(super::fma_f32(tie, tie, -1.0), tie.mul_add(tie, -1.0));
        for _ in 0..20_000 {
            let a = next();
            let b: [f32; 8] = std::array::from_fn(|_| next());
            let mut acc: [f32; 8] = std::array::from_fn(|j| if j % 3 == 0 { -(a * b[j]) } else { next() });
            let want: Vec<f32> = acc.iter().zip(&b).map(|(&c, &b)| a.mul_add(b, c)).collect();
            super::fma_f32_lanes::<false>(a, &b, &mut acc);
            assert_eq!(acc.to_vec(), want);
        }
    }
}
