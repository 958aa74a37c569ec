//! Vector accumulation at f16 precision, for attention over an f16 KV cache,
//! with the arithmetic of llama.cpp's CPU flash attention in its AVX-512
//! build (the reference the engine is checked against), at every tier.
//!
//! The key-query dot follows llama.cpp's f16 dot on AVX-512 step for step:
//! four 16-lane accumulators over steps of 64 (one fused multiply-add per
//! element), folded 0+2 and 1+3, then 0+1, then reduced as
//! `_mm512_reduce_add_ps` does (upper 8 lanes onto the lower 8, upper 4 onto
//! the lower 4, lanes 0+2 and 1+3, then those two), the remaining products
//! (rounded to f32) summed in f64. The AVX2 kernel keeps each 16-lane
//! accumulator in two registers; the portable one lane by lane. Its own
//! 8-lane order would round differently, and the attention weights that
//! follow amplify a last-bit difference into a different f16 rounding of the
//! output.
//!
//! The running weighted sum of value rows is rounded to f16 after every
//! update, as llama.cpp's CPU flash attention keeps it, each update one fused
//! multiply-add (`acc + w * v`, rounded once to f32, then to f16), as its
//! SIMD loop computes it; rescaling multiplies and rounds to f16.

use half::f16;

use crate::types::DotFn;

/// `acc[i] = round_f16(fma(v[i], w, acc[i]))`, `v` holding little-endian f16.
pub type MadFn = fn(acc: &mut [f32], v: &[u8], w: f32);
/// `acc[i] = round_f16(acc[i] * s)`.
pub type ScaleFn = fn(acc: &mut [f32], s: f32);

#[derive(Clone, Copy)]
pub struct F16Acc {
    /// The dot of two f16 rows (a key and a query).
    pub dot: DotFn,
    pub mad: MadFn,
    pub scale: ScaleFn,
}

/// The portable kernels.
pub(crate) fn portable_kernels() -> F16Acc {
    F16Acc { dot: dot_portable, mad: mad_portable, scale: scale_portable }
}

/// The AVX2 kernels (the AVX-512 tier's too), for a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_kernels() -> F16Acc {
    F16Acc { dot: dot_avx2, mad: mad_avx2, scale: scale_avx2 }
}

#[inline(always)]
fn round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// Elements per step of the dot: four accumulators of 16 lanes.
const DOT_STEP: usize = 64;
const DOT_LANES: usize = 16;

/// Reduces one 16-lane accumulator as `_mm512_reduce_add_ps` does.
#[inline(always)]
fn reduce16(x: &[f32; DOT_LANES]) -> f32 {
    let t3: [f32; 8] = std::array::from_fn(|i| x[8 + i] + x[i]);
    let t6: [f32; 4] = std::array::from_fn(|i| t3[4 + i] + t3[i]);
    (t6[0] + t6[2]) + (t6[1] + t6[3])
}

/// The products past the last whole step, each rounded to f32, summed in f64 onto `sum`.
#[inline(always)]
fn dot_tail(sum: f32, k: &[u8], q: &[u8], from: usize, n: usize) -> f32 {
    let value = |b: &[u8], i: usize| f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
    (from..n).fold(sum as f64, |s, i| s + (value(k, i) * value(q, i)) as f64) as f32
}

fn dot_portable(n: usize, k: &[u8], q: &[u8]) -> f32 {
    assert!(k.len() >= 2 * n && q.len() >= 2 * n, "dot of {n} f16 values: rows of {} and {} bytes", k.len(), q.len());
    let value = |b: &[u8], i: usize| f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
    let main = n - n % DOT_STEP;
    let mut acc = [[0f32; DOT_LANES]; 4];
    for i in (0..main).step_by(DOT_STEP) {
        for (j, lanes) in acc.iter_mut().enumerate() {
            for (l, lane) in lanes.iter_mut().enumerate() {
                let at = i + DOT_LANES * j + l;
                *lane = value(k, at).mul_add(value(q, at), *lane);
            }
        }
    }
    let folded: [f32; DOT_LANES] = std::array::from_fn(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l]));
    dot_tail(reduce16(&folded), k, q, main, n)
}

fn mad_portable(acc: &mut [f32], v: &[u8], w: f32) {
    for (a, b) in acc.iter_mut().zip(v.chunks_exact(2)) {
        let vv = f16::from_le_bytes([b[0], b[1]]).to_f32();
        *a = round(vv.mul_add(w, *a));
    }
}

fn scale_portable(acc: &mut [f32], s: f32) {
    for a in acc.iter_mut() {
        *a = round(*a * s);
    }
}

#[cfg(target_arch = "x86_64")]
fn dot_avx2(n: usize, k: &[u8], q: &[u8]) -> f32 {
    assert!(k.len() >= 2 * n && q.len() >= 2 * n, "dot of {n} f16 values: rows of {} and {} bytes", k.len(), q.len());
    // SAFETY: only handed out when the CPU has AVX2, FMA and F16C; both rows
    // hold `n` f16 values (checked above), which is all the kernel reads.
    let main = unsafe { dot_avx2_impl(n - n % DOT_STEP, k.as_ptr(), q.as_ptr()) };
    dot_tail(main, k, q, n - n % DOT_STEP, n)
}

/// The reduced sum over the first `main` (a multiple of 64) elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2_impl(main: usize, k: *const u8, q: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let load = |p: *const u8, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast()));
    // Accumulator j's lanes 0..8 in `lo[j]`, lanes 8..16 in `hi[j]`.
    let mut lo = [_mm256_setzero_ps(); 4];
    let mut hi = [_mm256_setzero_ps(); 4];
    for i in (0..main).step_by(DOT_STEP) {
        for j in 0..4 {
            let at = i + DOT_LANES * j;
            lo[j] = _mm256_fmadd_ps(load(k, at), load(q, at), lo[j]);
            hi[j] = _mm256_fmadd_ps(load(k, at + 8), load(q, at + 8), hi[j]);
        }
    }
    let lo = _mm256_add_ps(_mm256_add_ps(lo[0], lo[2]), _mm256_add_ps(lo[1], lo[3]));
    let hi = _mm256_add_ps(_mm256_add_ps(hi[0], hi[2]), _mm256_add_ps(hi[1], hi[3]));
    let t3 = _mm256_add_ps(hi, lo);
    let t6 = _mm_add_ps(_mm256_extractf128_ps::<1>(t3), _mm256_castps256_ps128(t3));
    let t8 = _mm_add_ps(t6, _mm_movehl_ps(t6, t6));
    _mm_cvtss_f32(_mm_add_ss(t8, _mm_movehdup_ps(t8)))
}

#[cfg(target_arch = "x86_64")]
fn mad_avx2(acc: &mut [f32], v: &[u8], w: f32) {
    assert!(v.len() >= acc.len() * 2, "f16 row of {} bytes for {} values", v.len(), acc.len());
    // SAFETY: only handed out when the CPU has AVX2, FMA and F16C; lengths checked above.
    unsafe { mad_avx2_impl(acc, v, w) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn mad_avx2_impl(acc: &mut [f32], v: &[u8], w: f32) {
    use std::arch::x86_64::*;
    let n = acc.len();
    let wv = _mm256_set1_ps(w);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= acc.len() and 2 * (i + 8) <= v.len(); unaligned loads and stores.
        unsafe {
            let vv = _mm256_cvtph_ps(_mm_loadu_si128(v.as_ptr().add(2 * i) as *const __m128i));
            let a = _mm256_loadu_ps(acc.as_ptr().add(i));
            let r = _mm256_fmadd_ps(vv, wv, a);
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r);
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    mad_portable(&mut acc[i..], &v[2 * i..], w);
}

#[cfg(target_arch = "x86_64")]
fn scale_avx2(acc: &mut [f32], s: f32) {
    // SAFETY: only handed out when the CPU has AVX2, FMA and F16C.
    unsafe { scale_avx2_impl(acc, s) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_avx2_impl(acc: &mut [f32], s: f32) {
    use std::arch::x86_64::*;
    let n = acc.len();
    let sv = _mm256_set1_ps(s);
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= acc.len(); unaligned loads and stores.
        unsafe {
            let r = _mm256_mul_ps(_mm256_loadu_ps(acc.as_ptr().add(i)), sv);
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(r);
            _mm256_storeu_ps(acc.as_mut_ptr().add(i), _mm256_cvtph_ps(h));
        }
        i += 8;
    }
    scale_portable(&mut acc[i..], s);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f16_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
    }

    /// The AVX2 kernels where this CPU has them.
    fn avx2_if_present() -> Option<F16Acc> {
        #[cfg(target_arch = "x86_64")]
        if crate::isa::detected_isa() >= crate::isa::Isa::Avx2 {
            return Some(avx2_kernels());
        }
        None
    }

    #[test]
    fn results_stay_on_the_f16_grid() {
        let mut acc = vec![0.1f32; 5];
        (portable_kernels().mad)(&mut acc, &f16_bytes(&[1.0; 5]), 1e-4);
        for a in &acc {
            assert_eq!(*a, round(*a));
            assert_ne!(*a, 0.1 + 1e-4);
        }
    }

    /// llama.cpp's f16 dot of its AVX-512 build, written out as its macros
    /// expand: 16-lane accumulators folded 0+2, 1+3, 0+1, then
    /// `_mm512_reduce_add_ps` (halves of 256, then 128 bits, then lanes 0+2
    /// and 1+3, then the two), the rest in f64.
    fn llama_cpp_dot(n: usize, k: &[u8], q: &[u8]) -> f32 {
        let value = |b: &[u8], i: usize| f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
        let main = n - n % 64;
        let mut sum = vec![vec![0f32; 16]; 4];
        for i in (0..main).step_by(64) {
            for (j, lanes) in sum.iter_mut().enumerate() {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    *lane = value(k, i + 16 * j + l).mul_add(value(q, i + 16 * j + l), *lane);
                }
            }
        }
        let add = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x + y).collect::<Vec<f32>>();
        let x0 = add(&add(&sum[0], &sum[2]), &add(&sum[1], &sum[3]));
        let t3 = add(&x0[8..], &x0[..8]);
        let t6 = add(&t3[4..], &t3[..4]);
        let t8 = [t6[0] + t6[2], t6[1] + t6[3]];
        (main..n).fold((t8[0] + t8[1]) as f64, |s, i| s + (value(k, i) * value(q, i)) as f64) as f32
    }

    #[test]
    fn the_key_query_dot_follows_llama_cpp() {
        for n in [1usize, 31, 32, 64, 67, 128, 200, 256] {
            let k = f16_bytes(&(0..n).map(|i| ((i * 7919) % 113) as f32 / 13.0 - 4.0).collect::<Vec<_>>());
            let q = f16_bytes(&(0..n).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect::<Vec<_>>());
            let want = llama_cpp_dot(n, &k, &q);
            if let Some(avx2) = avx2_if_present() {
                assert_eq!((avx2.dot)(n, &k, &q).to_bits(), want.to_bits(), "n = {n}");
            }
            assert_eq!((portable_kernels().dot)(n, &k, &q).to_bits(), want.to_bits(), "n = {n}");
        }
    }

    #[test]
    fn simd_matches_portable_bit_for_bit() {
        let p = portable_kernels();
        let s = avx2_if_present().unwrap_or(p);
        for n in [1usize, 7, 8, 9, 64, 67, 128] {
            let v: Vec<f32> = (0..n).map(|i| ((i * 7919) % 113) as f32 / 13.0 - 4.0).collect();
            let bytes = f16_bytes(&v);
            let mut a: Vec<f32> = (0..n).map(|i| round((i as f32 * 0.37).sin())).collect();
            let mut b = a.clone();
            for step in 0..20 {
                let w = 0.9f32.powi(step) * 0.31;
                (p.mad)(&mut a, &bytes, w);
                (s.mad)(&mut b, &bytes, w);
                (p.scale)(&mut a, 0.77);
                (s.scale)(&mut b, 0.77);
            }
            assert_eq!(a, b, "n = {n}");
        }
    }
}
