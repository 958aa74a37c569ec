//! AVX2 + FMA + F16C kernels for F32, F16 and BF16 rows.
//!
//! A dot product keeps one 8-lane FMA accumulator, takes the rows eight
//! elements at a time in order, reduces the accumulator (`hsum`) and adds the
//! remaining `n % 8` products one by one. One accumulator is a single chain of
//! FMAs, which alone would wait on the FMA latency; but it is the order that a
//! tile of several (row, token) pairs can follow with one register per pair,
//! so the tile and GEMV kernels (`float/matmul.rs`), which overlap many
//! such chains, give results bit-identical to this dot. The dot itself is
//! their 1 x 1 micro-tile; this module holds the loads and the finish they
//! share, and the conversions.
//!
//! The functions handed out are safe wrappers: `float::avx2_kernels` hands
//! them out only for the AVX2 and AVX-512 tiers, after `detected_isa` has
//! confirmed the CPU features, and each wrapper bounds the work by the slice
//! lengths before using raw pointers.

use crate::simd::avx2::{hsum, load_bf16x8, load_f16, load_f16x8};
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

// Format ids, used as a const generic so that each kernel is compiled per format.
pub(crate) const F32: u8 = 0;
pub(crate) const F16: u8 = 1;
pub(crate) const BF16: u8 = 2;

/// The format of id `f`.
pub(crate) const fn format_type(f: u8) -> GgmlType {
    match f {
        F32 => GgmlType::F32,
        F16 => GgmlType::F16,
        _ => GgmlType::BF16,
    }
}

/// Checks that both rows hold `n` elements of `size` bytes.
pub(crate) fn check_dot(n: usize, w: &[u8], a: &[u8], size: usize) {
    assert!(
        w.len() >= n * size && a.len() >= n * size,
        "dot of {n} elements: rows of {} and {} bytes are too short",
        w.len(),
        a.len()
    );
}

pub(super) fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    // SAFETY: only handed out after the CPU was found to support AVX2,
    // FMA and F16C; reads `n` halves of `src` and
    // writes `n` floats of `dst`, both in bounds.
    unsafe { dequantize_f16_avx2(n, src.as_ptr(), dst.as_mut_ptr()) }
}

pub(super) fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    // SAFETY: as in `dequantize_f16`.
    unsafe { dequantize_bf16_avx2(n, src.as_ptr(), dst.as_mut_ptr()) }
}

pub(super) fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    let n = src.len().min(dst.len() / 2);
    // SAFETY: only handed out after the CPU was found to support AVX2,
    // FMA and F16C; reads `n` floats of `src` and
    // writes `n` halves of `dst`, both in bounds.
    unsafe { quantize_f16_avx2(n, src.as_ptr(), dst.as_mut_ptr()) }
}

// ---------------------------------------------------------------------------
// Kernels. `unsafe` for `target_feature` and for the raw pointers, which
// must cover the counts given.

/// Finishes a dot of `n` elements whose first `main` (`n - n % 8`) went into
/// `acc`: reduces it, then adds the products of the elements left one by
/// one, in f32 for F32 rows and in f64 for the 16-bit formats, as their
/// portable kernels sum throughout.
///
/// # Safety
/// AVX2 and F16C must be available; both rows must hold `n` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn finish<const F: u8>(acc: __m256, n: usize, main: usize, w: *const u8, a: *const u8) -> f32 {
    let folded = hsum(acc);
    let products = (main..n).map(|i| element::<F>(w, i) * element::<F>(a, i));
    if F == F32 {
        products.fold(folded, |sum, p| sum + p)
    } else {
        products.fold(folded as f64, |sum, p| sum + p as f64) as f32
    }
}

/// Element `i` of a row of format `F` at `p`, as f32.
///
/// # Safety
/// F16C must be available; element `i` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn element<const F: u8>(p: *const u8, i: usize) -> f32 {
    match F {
        F32 => p.add(4 * i).cast::<f32>().read_unaligned(),
        F16 => load_f16(p.add(2 * i)),
        _ => read_bf16(p.add(2 * i)),
    }
}

/// Eight elements from element `i` of a row of format `F` at `p`, as f32.
///
/// # Safety
/// AVX2 and F16C must be available; eight elements from `i` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn eight<const F: u8>(p: *const u8, i: usize) -> __m256 {
    match F {
        F32 => _mm256_loadu_ps(p.add(4 * i).cast()),
        F16 => load_f16x8(p.add(2 * i)),
        _ => load_bf16x8(p.add(2 * i)),
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn read_bf16(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes(p.cast::<[u8; 2]>().read_unaligned());
    f32::from_bits((bits as u32) << 16)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_f16_avx2(n: usize, src: *const u8, dst: *mut f32) {
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        _mm256_storeu_ps(dst.add(i), load_f16x8(src.add(2 * i)));
    }
    for i in main..n {
        dst.add(i).write(load_f16(src.add(2 * i)));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_bf16_avx2(n: usize, src: *const u8, dst: *mut f32) {
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        _mm256_storeu_ps(dst.add(i), load_bf16x8(src.add(2 * i)));
    }
    for i in main..n {
        dst.add(i).write(read_bf16(src.add(2 * i)));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_f16_avx2(n: usize, src: *const f32, dst: *mut u8) {
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        let halves = _mm256_cvtps_ph::<{ _MM_FROUND_TO_NEAREST_INT }>(_mm256_loadu_ps(src.add(i)));
        _mm_storeu_si128(dst.add(2 * i).cast(), halves);
    }
    for i in main..n {
        let bits = half::f16::from_f32(src.add(i).read()).to_le_bytes();
        dst.add(2 * i).cast::<[u8; 2]>().write_unaligned(bits);
    }
}
