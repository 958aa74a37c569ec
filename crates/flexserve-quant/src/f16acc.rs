//! Vector accumulation at f16 precision, for attention over an f16 KV cache.
//!
//! The key-query dot follows llama.cpp's f16 dot step for step (four 8-lane
//! accumulators over steps of 32, folded 0+2, 1+3, then 0+1, reduced with two
//! horizontal adds, the remaining products summed in f64), not the weights'
//! dot, whose order serves the tiled matmuls instead.
//!
//! The running weighted sum of value rows is rounded to f16 after every
//! update, as llama.cpp's CPU flash attention keeps it; reproducing that
//! rounding keeps greedy decoding on llama.cpp's tokens at near ties. The
//! product and the sum are rounded separately (no fused multiply-add): of the
//! two ways llama.cpp builds compute this step, that one reproduces the
//! recorded reference outputs (4 of 5 greedy continuations exact against 1
//! of 5 with the fused form).

use half::f16;

use crate::{DotFn, GgmlType, Isa};

/// `acc[i] = round_f16(acc[i] + w * v[i])`, `v` holding little-endian f16.
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

/// The accumulation kernels for `isa` (portable where the CPU lacks it).
pub fn f16_acc_for(isa: Isa) -> F16Acc {
    #[cfg(target_arch = "x86_64")]
    if isa.usable() >= Isa::Avx2 {
        return F16Acc { dot: dot_avx2, mad: mad_avx2, scale: scale_avx2 };
    }
    let _ = isa;
    let dot =
        crate::kernels_for(GgmlType::F16, Isa::Portable).ok().and_then(|k| k.dot).expect("F16 has a portable dot");
    F16Acc { dot, mad: mad_portable, scale: scale_portable }
}

/// The accumulation kernels for this CPU.
pub fn f16_acc() -> F16Acc {
    f16_acc_for(crate::active_isa())
}

#[inline(always)]
fn round(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

fn mad_portable(acc: &mut [f32], v: &[u8], w: f32) {
    for (a, b) in acc.iter_mut().zip(v.chunks_exact(2)) {
        let vv = f16::from_le_bytes([b[0], b[1]]).to_f32();
        *a = round(vv * w + *a);
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
    unsafe { dot_avx2_impl(n, k.as_ptr(), q.as_ptr()) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_avx2_impl(n: usize, k: *const u8, q: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let load = |p: *const u8, i: usize| _mm256_cvtph_ps(_mm_loadu_si128(p.add(2 * i).cast()));
    let main = n - n % 32;
    let mut acc = [_mm256_setzero_ps(); 4];
    for i in (0..main).step_by(32) {
        for (j, acc_j) in acc.iter_mut().enumerate() {
            *acc_j = _mm256_fmadd_ps(load(k, i + 8 * j), load(q, i + 8 * j), *acc_j);
        }
    }
    let all = _mm256_add_ps(_mm256_add_ps(acc[0], acc[2]), _mm256_add_ps(acc[1], acc[3]));
    let quad = _mm_add_ps(_mm256_castps256_ps128(all), _mm256_extractf128_ps::<1>(all));
    let dual = _mm_hadd_ps(quad, quad);
    let mut sum = _mm_cvtss_f32(_mm_hadd_ps(dual, dual)) as f64;
    let value = |p: *const u8, i: usize| f16::from_le_bytes(p.add(2 * i).cast::<[u8; 2]>().read_unaligned()).to_f32();
    for i in main..n {
        sum += (value(k, i) * value(q, i)) as f64;
    }
    sum as f32
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
            let r = _mm256_add_ps(_mm256_mul_ps(vv, wv), a);
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

    #[test]
    fn results_stay_on_the_f16_grid() {
        let mut acc = vec![0.1f32; 5];
        (f16_acc_for(Isa::Portable).mad)(&mut acc, &f16_bytes(&[1.0; 5]), 1e-4);
        for a in &acc {
            assert_eq!(*a, round(*a));
            assert_ne!(*a, 0.1 + 1e-4);
        }
    }

    /// llama.cpp's f16 dot, lane by lane (see the module comment).
    fn llama_cpp_dot(n: usize, k: &[u8], q: &[u8]) -> f32 {
        let value = |b: &[u8], i: usize| f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32();
        let main = n - n % 32;
        let mut acc = [[0f32; 8]; 4];
        for i in (0..main).step_by(32) {
            for (j, lanes) in acc.iter_mut().enumerate() {
                for (l, lane) in lanes.iter_mut().enumerate() {
                    let at = i + 8 * j + l;
                    *lane = value(k, at).mul_add(value(q, at), *lane);
                }
            }
        }
        let all: Vec<f32> = (0..8).map(|l| (acc[0][l] + acc[2][l]) + (acc[1][l] + acc[3][l])).collect();
        let quad: Vec<f32> = (0..4).map(|l| all[l] + all[l + 4]).collect();
        let folded = (quad[0] + quad[1]) + (quad[2] + quad[3]);
        (main..n).fold(folded as f64, |sum, i| sum + (value(k, i) * value(q, i)) as f64) as f32
    }

    #[test]
    fn the_key_query_dot_follows_llama_cpp() {
        for n in [1usize, 31, 32, 64, 67, 128] {
            let k = f16_bytes(&(0..n).map(|i| ((i * 7919) % 113) as f32 / 13.0 - 4.0).collect::<Vec<_>>());
            let q = f16_bytes(&(0..n).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect::<Vec<_>>());
            let want = llama_cpp_dot(n, &k, &q);
            if crate::detected_isa() >= Isa::Avx2 {
                assert_eq!((f16_acc_for(Isa::Avx2).dot)(n, &k, &q).to_bits(), want.to_bits(), "n = {n}");
            }
            let portable = (f16_acc_for(Isa::Portable).dot)(n, &k, &q);
            assert!((portable - want).abs() <= 1e-5 * want.abs().max(1.0), "n = {n}: {portable} vs {want}");
        }
    }

    #[test]
    fn simd_matches_portable_bit_for_bit() {
        let p = f16_acc_for(Isa::Portable);
        let s = f16_acc_for(Isa::Avx2);
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
