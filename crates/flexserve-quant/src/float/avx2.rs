//! AVX2 + FMA + F16C kernels for F32, F16 and BF16 rows.
//!
//! Dot products run 32 elements per iteration into four 8-lane FMA
//! accumulators, fold them pairwise (0+2, 1+3, then 0+1), reduce the last
//! vector with two horizontal adds and finish the remaining elements one by
//! one — the same order of operations as llama.cpp's AVX2 kernels.
//!
//! The functions handed out are safe wrappers: `kernels` is only called with
//! `Isa::Avx2` after `detected_isa` has confirmed the CPU features, and each
//! wrapper bounds the work by the slice lengths before using raw pointers.

use crate::{DequantizeFn, DotFn, GgmlType, Kernels, QuantizeFn};
use std::arch::x86_64::*;

/// Replaces the portable kernels of `portable.ty` with the AVX2 ones.
pub(super) fn kernels(portable: Kernels) -> Kernels {
    let (dequantize, quantize, dot): (DequantizeFn, QuantizeFn, DotFn) = match portable.ty {
        GgmlType::F32 => (portable.dequantize, portable.quantize, dot_f32),
        GgmlType::F16 => (dequantize_f16, quantize_f16, dot_f16),
        GgmlType::BF16 => (dequantize_bf16, portable.quantize, dot_bf16),
        _ => return portable,
    };
    Kernels { dequantize, quantize, dot: Some(dot), ..portable }
}

/// Checks that both rows hold `n` elements of `size` bytes.
fn check_dot(n: usize, w: &[u8], a: &[u8], size: usize) {
    assert!(
        w.len() >= n * size && a.len() >= n * size,
        "dot of {n} elements: rows of {} and {} bytes are too short",
        w.len(),
        a.len()
    );
}

fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(n, w, a, 4);
    // SAFETY: only handed out after the CPU was found to support AVX2, FMA and
    // F16C; both rows hold `n` f32 values, which is all the kernel reads.
    unsafe { dot_f32_avx2(n, w.as_ptr(), a.as_ptr()) }
}

fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(n, w, a, 2);
    // SAFETY: as in `dot_f32`, with `n` f16 values per row.
    unsafe { dot_f16_avx2(n, w.as_ptr(), a.as_ptr()) }
}

fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(n, w, a, 2);
    // SAFETY: as in `dot_f32`, with `n` bf16 values per row.
    unsafe { dot_bf16_avx2(n, w.as_ptr(), a.as_ptr()) }
}

fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    // SAFETY: CPU features as in `dot_f32`; reads `n` halves of `src` and
    // writes `n` floats of `dst`, both in bounds.
    unsafe { dequantize_f16_avx2(n, src.as_ptr(), dst.as_mut_ptr()) }
}

fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    let n = dst.len().min(src.len() / 2);
    // SAFETY: as in `dequantize_f16`.
    unsafe { dequantize_bf16_avx2(n, src.as_ptr(), dst.as_mut_ptr()) }
}

fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    let n = src.len().min(dst.len() / 2);
    // SAFETY: CPU features as in `dot_f32`; reads `n` floats of `src` and
    // writes `n` halves of `dst`, both in bounds.
    unsafe { quantize_f16_avx2(n, src.as_ptr(), dst.as_mut_ptr()) }
}

// ---------------------------------------------------------------------------
// Kernels. `unsafe` for `target_feature` and for the raw pointers, which
// must cover the counts given.

/// Folds four accumulators into one f32 (see the module comment).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn reduce4(acc: [__m256; 4]) -> f32 {
    let pair0 = _mm256_add_ps(acc[0], acc[2]);
    let pair1 = _mm256_add_ps(acc[1], acc[3]);
    let all = _mm256_add_ps(pair0, pair1);
    let quad = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps::<1>(all));
    let dual = _mm_hadd_ps(quad, quad);
    _mm_cvtss_f32(_mm_hadd_ps(dual, dual))
}

/// Adds the products of the elements past the last step of 32 to the folded
/// sum one by one, as the dots end (and the tiles, which must agree with them
/// bit for bit): in f32 for F32 rows, in f64 for the 16-bit formats, as their
/// portable kernels sum throughout.
#[inline]
pub(crate) fn add_tail(folded: f32, in_f64: bool, products: impl Iterator<Item = f32>) -> f32 {
    if in_f64 {
        products.fold(folded as f64, |sum, p| sum + p as f64) as f32
    } else {
        products.fold(folded, |sum, p| sum + p)
    }
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_bf16x8(p: *const u8) -> __m256 {
    let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn read_f16(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes(p.cast::<[u8; 2]>().read_unaligned());
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn read_bf16(p: *const u8) -> f32 {
    let bits = u16::from_le_bytes(p.cast::<[u8; 2]>().read_unaligned());
    f32::from_bits((bits as u32) << 16)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f32_avx2(n: usize, w: *const u8, a: *const u8) -> f32 {
    let (w, a) = (w.cast::<f32>(), a.cast::<f32>());
    let main = n - n % 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..main).step_by(32) {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let (wv, av) = (_mm256_loadu_ps(w.add(i + 8 * j)), _mm256_loadu_ps(a.add(i + 8 * j)));
            *acc_j = _mm256_fmadd_ps(wv, av, *acc_j);
        }
    }
    let tail = (main..n).map(|i| w.add(i).read_unaligned() * a.add(i).read_unaligned());
    add_tail(reduce4(acc), false, tail)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_f16_avx2(n: usize, w: *const u8, a: *const u8) -> f32 {
    let main = n - n % 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..main).step_by(32) {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let at = 2 * (i + 8 * j);
            *acc_j = _mm256_fmadd_ps(load_f16x8(w.add(at)), load_f16x8(a.add(at)), *acc_j);
        }
    }
    let tail = (main..n).map(|i| read_f16(w.add(2 * i)) * read_f16(a.add(2 * i)));
    add_tail(reduce4(acc), true, tail)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_bf16_avx2(n: usize, w: *const u8, a: *const u8) -> f32 {
    let main = n - n % 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..main).step_by(32) {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            let at = 2 * (i + 8 * j);
            *acc_j = _mm256_fmadd_ps(load_bf16x8(w.add(at)), load_bf16x8(a.add(at)), *acc_j);
        }
    }
    let tail = (main..n).map(|i| read_bf16(w.add(2 * i)) * read_bf16(a.add(2 * i)));
    add_tail(reduce4(acc), true, tail)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_f16_avx2(n: usize, src: *const u8, dst: *mut f32) {
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        _mm256_storeu_ps(dst.add(i), load_f16x8(src.add(2 * i)));
    }
    for i in main..n {
        dst.add(i).write(read_f16(src.add(2 * i)));
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
