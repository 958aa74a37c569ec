//! AVX-512 F kernels for F32, F16 and BF16 rows: the AVX2 scheme of
//! `float/avx2.rs` at sixteen lanes.
//!
//! A dot product keeps one 16-lane FMA accumulator and takes the rows
//! sixteen elements at a time in order; it then adds the accumulator's upper
//! half onto its lower half and finishes as the AVX2 dot does (the same
//! eight-lane reduction, then the `n % 16` products left one by one). The
//! tile and GEMV kernels of this tier (`float/matmul.rs`) follow the same
//! order per (row, token) pair, so they equal this dot bit for bit; the dot
//! is their 1 x 1 micro-tile, made from this module's load and finish.
//!
//! Conversions keep their AVX2 kernels: an element converts to the same
//! value at any width, and the matmuls convert inside their own loops.

use super::avx2::{F16, F32};
use std::arch::x86_64::*;

/// Sixteen elements from element `i` of a row of format `F` at `p`, as f32.
///
/// # Safety
/// AVX-512 F must be available; sixteen elements from `i` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(crate) unsafe fn sixteen<const F: u8>(p: *const u8, i: usize) -> __m512 {
    match F {
        F32 => _mm512_loadu_ps(p.add(4 * i).cast()),
        F16 => _mm512_cvtph_ps(_mm256_loadu_si256(p.add(2 * i).cast())),
        _ => {
            let wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.add(2 * i).cast()));
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(wide))
        }
    }
}

/// Finishes a dot of `n` elements whose first `main` (`n - n % 16`) went
/// into `acc`: its halves added, then the AVX2 dot's finish.
///
/// # Safety
/// AVX-512 F must be available; both rows must hold `n` elements.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(crate) unsafe fn finish<const F: u8>(acc: __m512, n: usize, main: usize, w: *const u8, a: *const u8) -> f32 {
    let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    let folded = _mm256_add_ps(_mm512_castps512_ps256(acc), high);
    super::avx2::finish::<F>(folded, n, main, w, a)
}
