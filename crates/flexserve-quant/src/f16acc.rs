//! Vector accumulation at f16 precision, for attention over an f16 KV cache.
//!
//! The running weighted sum of value rows is rounded to f16 after every
//! update, as llama.cpp's CPU flash attention keeps it; reproducing that
//! rounding keeps greedy decoding on llama.cpp's tokens at near ties. The
//! product and the sum are rounded separately (no fused multiply-add): of the
//! two ways llama.cpp builds compute this step, that one reproduces the
//! recorded reference outputs (4 of 5 greedy continuations exact against 1
//! of 5 with the fused form).

use half::f16;

use crate::Isa;

/// `acc[i] = round_f16(acc[i] + w * v[i])`, `v` holding little-endian f16.
pub type MadFn = fn(acc: &mut [f32], v: &[u8], w: f32);
/// `acc[i] = round_f16(acc[i] * s)`.
pub type ScaleFn = fn(acc: &mut [f32], s: f32);

#[derive(Clone, Copy)]
pub struct F16Acc {
    pub mad: MadFn,
    pub scale: ScaleFn,
}

/// The accumulation kernels for `isa` (portable where the CPU lacks it).
pub fn f16_acc_for(isa: Isa) -> F16Acc {
    #[cfg(target_arch = "x86_64")]
    if isa.usable() >= Isa::Avx2 {
        return F16Acc { mad: mad_avx2, scale: scale_avx2 };
    }
    let _ = isa;
    F16Acc { mad: mad_portable, scale: scale_portable }
}

/// The accumulation kernels for this CPU.
pub fn f16_acc() -> F16Acc {
    f16_acc_for(crate::detected_isa())
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
