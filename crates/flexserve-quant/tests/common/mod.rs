//! Helpers shared by the kernel test files.
#![allow(dead_code)]

use flexserve_quant::{detected_isa, kernels_for, GgmlType, Isa, Kernels};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The weight types with tile and GEMV kernels (the others loop the plain dot).
pub const MATRIX_TYPES: [GgmlType; 10] = [
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q8_0,
    GgmlType::Q4_K,
    GgmlType::Q6_K,
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
];

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

pub fn portable(ty: GgmlType) -> Kernels {
    kernels_for(ty, Isa::Portable).expect("portable kernels exist")
}

/// The lowest SIMD tier of this architecture: AVX2 on x86-64, NEON on
/// aarch64 (the portable kernels where the CPU lacks it).
pub fn base_simd() -> Isa {
    if cfg!(target_arch = "aarch64") {
        Isa::Neon
    } else {
        Isa::Avx2
    }
}

/// The kernels of `base_simd` where the CPU has them, else the portable ones again.
pub fn simd(ty: GgmlType) -> Kernels {
    kernels_for(ty, base_simd()).expect("kernels exist")
}

/// The SIMD tiers to test: `base_simd` always (the portable kernel where
/// the CPU lacks it), the higher tiers of its architecture (AVX-512;
/// NEON with the dot-product instructions) where the CPU has them.
pub fn simd_tiers() -> Vec<Isa> {
    let higher = if cfg!(target_arch = "aarch64") { Isa::NeonDot } else { Isa::Avx512 };
    [base_simd(), higher].into_iter().filter(|&isa| isa == base_simd() || isa <= detected_isa()).collect()
}

/// The kernels of `ty`: portable, then every tier of `simd_tiers`.
pub fn every_tier(ty: GgmlType) -> Vec<Kernels> {
    std::iter::once(portable(ty)).chain(simd_by_tier(ty).into_iter().map(|(_, k)| k)).collect()
}

/// The kernels of `ty` at every tier of `simd_tiers`.
pub fn simd_by_tier(ty: GgmlType) -> Vec<(Isa, Kernels)> {
    simd_tiers().into_iter().map(|isa| (isa, kernels_for(ty, isa).expect("kernels exist"))).collect()
}

pub fn row_bytes(ty: GgmlType, n: usize) -> usize {
    n / ty.block_size() * ty.type_size()
}

pub fn quantize(k: &Kernels, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; row_bytes(k.ty, x.len())];
    (k.quantize)(x, &mut out);
    out
}

pub fn dequantize(k: &Kernels, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    (k.dequantize)(bytes, &mut out);
    out
}

/// A copy of `bytes` that starts at an odd address, to catch aligned loads.
pub fn misaligned(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; bytes.len() + 1];
    let offset = if (buf.as_ptr() as usize).is_multiple_of(2) { 1 } else { 0 };
    buf[offset..offset + bytes.len()].copy_from_slice(bytes);
    (buf, offset)
}

/// The shapes of data the tests run over, one block-sized chunk at a time.
#[derive(Debug, Clone, Copy)]
pub enum Shape {
    /// Uniform in [-1, 1).
    Uniform,
    /// Roughly normal with a per-block scale spanning a few decades.
    Scaled,
    /// All zeros.
    Zero,
    /// One value repeated.
    Constant,
    /// Small values with one large outlier.
    Outlier,
    /// Positive values with a large common offset.
    Offset,
}

pub const SHAPES: [Shape; 6] =
    [Shape::Uniform, Shape::Scaled, Shape::Zero, Shape::Constant, Shape::Outlier, Shape::Offset];

/// `n` values whose every `block` consecutive values follow `shape`.
pub fn data(rng: &mut StdRng, shape: Shape, n: usize, block: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let len = block.min(n - out.len());
        match shape {
            Shape::Uniform => out.extend((0..len).map(|_| rng.gen_range(-1.0f32..1.0))),
            Shape::Scaled => {
                let scale = 10f32.powf(rng.gen_range(-2.0..2.0));
                out.extend((0..len).map(|_| {
                    let g: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum();
                    g * scale
                }));
            }
            Shape::Zero => out.resize(out.len() + len, 0.0),
            Shape::Constant => {
                let c = rng.gen_range(-3.0f32..3.0);
                out.resize(out.len() + len, c);
            }
            Shape::Outlier => {
                let start = out.len();
                out.extend((0..len).map(|_| rng.gen_range(-0.1f32..0.1)));
                let at = start + rng.gen_range(0..len);
                out[at] = if rng.gen() { 50.0 } else { -50.0 };
            }
            Shape::Offset => out.extend((0..len).map(|_| 20.0 + rng.gen_range(0.0f32..1.0))),
        }
    }
    out
}

/// Largest absolute value of `x`.
pub fn amax(x: &[f32]) -> f32 {
    x.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// `sum(a[i] * b[i])` in f64, and `sum(|a[i] * b[i]|)` (the size rounding errors scale with).
pub fn dot_and_magnitude(a: &[f32], b: &[f32]) -> (f64, f64) {
    a.iter().zip(b).fold((0.0, 0.0), |(s, m), (&x, &y)| {
        let p = x as f64 * y as f64;
        (s + p, m + p.abs())
    })
}
