//! Element-wise kernels the layers apply between matmuls: the scaled softmax
//! of attention scores and the SiLU-gated product of the feed-forward block.
//!
//! The SiLU-gated product follows llama.cpp's AVX-512 build exactly (see
//! [`silu_llama`]): its exponential is a fast polynomial that differs from the
//! correctly rounded one by an ulp now and then, and the feed-forward output
//! is quantized to 8 bits right after, where one ulp can move a quant.
//!
//! The softmax rests on one exponential: `2^k * p(r)` with `k = round(x * log2 e)`
//! (in f32), `r = x - k ln 2` and `p` the Taylor polynomial of degree 9,
//! both in f64 (on |r| <= ln 2 / 2 the polynomial's error is below 1e-11
//! relative), then `p(r)` rounded once to f32 and scaled by the exact
//! power of two. So the result is the correctly rounded exponential except
//! within about 1e-11 of a rounding midpoint: it agrees with the platform's
//! `expf` as closely as that does with itself across libraries, which keeps
//! greedy decoding on the reference tokens at near ties. Inputs are clamped
//! to the range where `2^k` is a normal f32. The portable variants run the
//! same operations in the same order, with `mul_add` where the SIMD ones
//! fuse, and sum in the same eight lanes, so every variant gives the same bits.

/// In-place `x[i] = exp(scale * x[i] - m) / sum` with `m` the largest scaled value.
pub type SoftmaxFn = fn(x: &mut [f32], scale: f32);
/// In-place `gate[i] = silu(gate[i]) * up[i]` over `gate.len()` elements
/// (`up` at least as long), where `silu(g) = g / (1 + exp(-g))`.
pub type SiluMulFn = fn(gate: &mut [f32], up: &[f32]);

#[derive(Clone, Copy)]
pub struct Activations {
    pub softmax_scaled: SoftmaxFn,
    pub silu_mul: SiluMulFn,
}

/// The portable kernels.
pub(crate) fn portable_kernels() -> Activations {
    Activations { softmax_scaled: softmax_portable, silu_mul: silu_mul_portable }
}

/// The AVX2 kernels (the AVX-512 tier's too), for a CPU with AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_kernels() -> Activations {
    Activations { softmax_scaled: avx2::softmax_scaled, silu_mul: avx2::silu_mul }
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2: f64 = std::f64::consts::LN_2;
/// Inputs beyond these give 2^k outside the normal range.
const EXP_MIN: f32 = -87.33;
const EXP_MAX: f32 = 88.37;
/// 1/9!, 1/8!, ..., 1/2!, 1, 1: the polynomial's coefficients, highest first.
const TAYLOR: [f64; 10] =
    [1.0 / 362_880.0, 1.0 / 40_320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];
/// Elements per vector: the portable sums use as many lanes.
const LANES: usize = 8;

#[inline(always)]
fn exp_portable(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let k = (x * LOG2E).round_ties_even();
    let r = (k as f64).mul_add(-LN2, x as f64);
    let mut p = TAYLOR[0];
    for c in &TAYLOR[1..] {
        p = p.mul_add(r, *c);
    }
    (p as f32) * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// Sums the eight lanes as the AVX2 reduction does: halves, then pairs, then the last two.
#[inline(always)]
fn reduce_lanes(l: [f32; LANES]) -> f32 {
    let q = [l[0] + l[4], l[1] + l[5], l[2] + l[6], l[3] + l[7]];
    (q[0] + q[2]) + (q[1] + q[3])
}

fn softmax_portable(x: &mut [f32], scale: f32) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v * scale));
    let main = x.len() - x.len() % LANES;
    let mut lanes = [0f32; LANES];
    for chunk in x[..main].chunks_exact_mut(LANES) {
        for (v, lane) in chunk.iter_mut().zip(&mut lanes) {
            *v = exp_portable(v.mul_add(scale, -max));
            *lane += *v;
        }
    }
    let mut sum = reduce_lanes(lanes);
    for v in &mut x[main..] {
        *v = exp_portable(v.mul_add(scale, -max));
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// `0x1.8p23`: added and subtracted, it rounds `x * log2(e)` to an integer.
const EXPF_SHIFT: f32 = 12_582_912.0;
/// llama.cpp's exponential's constants (its hexadecimal literals, as bits):
/// log2(e), ln 2 in two parts, and the polynomial's coefficients.
const EXPF_LOG2E: u32 = 0x3fb8_aa3b;
const EXPF_LN2_HI: u32 = 0x3f31_7200;
const EXPF_LN2_LO: u32 = 0x35bf_be8e;
const EXPF_C5: u32 = 0x3c07_2010;
const EXPF_C4: u32 = 0x3d2b_9f17;
const EXPF_C3: u32 = 0x3e2a_af33;
const EXPF_C2: u32 = 0x3eff_fedb;
const EXPF_C1: u32 = 0x3f7f_fff6;

/// llama.cpp's vector exponential of its AVX-512 build (`ggml_v_expf`, after
/// ARM's optimized routine), one element: `n = round(x log2 e)`, `b = x - n
/// ln 2` in two fused steps, `j` a degree-5 polynomial in `b` (fused steps in
/// its order), and `j * 2^n` rounded once (`scalef`); `|n| > 192` gives
/// infinity or zero. Within 1.5 ulp of the true value, and not the correctly
/// rounded one: the feed-forward block must use this one to agree.
#[inline(always)]
fn expf_llama(x: f32) -> f32 {
    let c = f32::from_bits;
    let z = x.mul_add(c(EXPF_LOG2E), EXPF_SHIFT);
    let n = z - EXPF_SHIFT;
    let b = (-n).mul_add(c(EXPF_LN2_LO), (-n).mul_add(c(EXPF_LN2_HI), x));
    let u = b * b;
    let j = c(EXPF_C5)
        .mul_add(b, c(EXPF_C4))
        .mul_add(u, c(EXPF_C3).mul_add(b, c(EXPF_C2)))
        .mul_add(u, c(EXPF_C1).mul_add(b, 1.0));
    if n.abs() > 192.0 {
        return if n <= 0.0 { 0.0 } else { f32::INFINITY };
    }
    scalef(j, n)
}

/// `j * 2^n` for an integral `n`, rounded once to f32 (as `vscalefps`): the
/// product is exact in f64, whose exponent range holds every case here.
#[inline(always)]
fn scalef(j: f32, n: f32) -> f32 {
    (j as f64 * f64::from_bits(((n as i64 + 1023) as u64) << 52)) as f32
}

/// `silu(g) = g / (1 + exp(-g))` with [`expf_llama`], as llama.cpp's
/// `ggml_v_silu` computes it.
#[inline(always)]
fn silu_llama(g: f32) -> f32 {
    g / (1.0 + expf_llama(0.0 - g))
}

/// Elements llama.cpp's SiLU-gated product takes per vector: past the last
/// whole vector of a row it computes `g / (1 + expf(-g))` with the C
/// library's `expf` instead.
const SILU_VECTOR: usize = 16;

/// [`silu_llama`] times `up`, every element.
fn silu_mul_poly(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = silu_llama(*g) * u;
    }
}

/// The elements past the last whole vector, with the C library's `expf`
/// (Rust's `f32::exp`), as llama.cpp's scalar tail computes them.
fn silu_mul_tail(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + (-*g).exp()) * u;
    }
}

fn silu_mul_portable(gate: &mut [f32], up: &[f32]) {
    let up = &up[..gate.len()];
    let main = gate.len() - gate.len() % SILU_VECTOR;
    silu_mul_poly(&mut gate[..main], &up[..main]);
    silu_mul_tail(&mut gate[main..], &up[main..]);
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use crate::simd::avx2::hsum;
    use std::arch::x86_64::*;

    pub(super) fn softmax_scaled(x: &mut [f32], scale: f32) {
        // SAFETY: only handed out when the CPU has AVX2, FMA and F16C; the
        // kernel stays within `x`.
        unsafe { softmax_impl(x, scale) }
    }

    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let up = &up[..gate.len()];
        // SAFETY: as in `softmax_scaled`; `up` holds `gate.len()` elements.
        unsafe { silu_mul_impl(gate, up) }
    }

    /// `p(r)` for four f32 inputs `x` and their `k`, rounded to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn poly4(x: __m128, k: __m128) -> __m128 {
        let r = _mm256_fmadd_pd(_mm256_cvtps_pd(k), _mm256_set1_pd(-LN2), _mm256_cvtps_pd(x));
        let mut p = _mm256_set1_pd(TAYLOR[0]);
        for c in &TAYLOR[1..] {
            p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(*c));
        }
        _mm256_cvtpd_ps(p)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn exp8(x: __m256) -> __m256 {
        let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_MIN)), _mm256_set1_ps(EXP_MAX));
        let k = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
            x,
            _mm256_set1_ps(LOG2E),
        ));
        let lo = poly4(_mm256_castps256_ps128(x), _mm256_castps256_ps128(k));
        let hi = poly4(_mm256_extractf128_ps::<1>(x), _mm256_extractf128_ps::<1>(k));
        let poly = _mm256_insertf128_ps::<1>(_mm256_castps128_ps256(lo), hi);
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)));
        _mm256_mul_ps(poly, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn softmax_impl(x: &mut [f32], scale: f32) {
        let main = x.len() - x.len() % LANES;
        let p = x.as_mut_ptr();
        let sv = _mm256_set1_ps(scale);
        let mut mv = _mm256_set1_ps(f32::NEG_INFINITY);
        // Every vector access below is at `i + LANES <= main <= x.len()`.
        for i in (0..main).step_by(LANES) {
            mv = _mm256_max_ps(mv, _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), sv));
        }
        // The largest value does not depend on the order in which it is found.
        let mut lanes = [0f32; LANES];
        _mm256_storeu_ps(lanes.as_mut_ptr(), mv);
        let max = x[main..].iter().fold(lanes.into_iter().fold(f32::NEG_INFINITY, f32::max), |m, &v| m.max(v * scale));
        let ms = _mm256_set1_ps(-max);
        let mut sum = _mm256_setzero_ps();
        for i in (0..main).step_by(LANES) {
            let e = exp8(_mm256_fmadd_ps(_mm256_loadu_ps(p.add(i)), sv, ms));
            _mm256_storeu_ps(p.add(i), e);
            sum = _mm256_add_ps(sum, e);
        }
        let mut total = hsum(sum);
        for v in &mut x[main..] {
            *v = exp_portable(v.mul_add(scale, -max));
            total += *v;
        }
        let inv = 1.0 / total;
        let inv_v = _mm256_set1_ps(inv);
        for i in (0..main).step_by(LANES) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv_v));
        }
        for v in &mut x[main..] {
            *v *= inv;
        }
    }

    /// [`expf_llama`] of eight values whose `n` lies in the normal range
    /// (`|n| <= 126`, where `2^n` is a normal f32 and the product rounds
    /// once); the caller computes the other vectors element by element.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn expf_llama8(x: __m256, n_out: &mut __m256) -> __m256 {
        let c = |bits: u32| _mm256_set1_ps(f32::from_bits(bits));
        let shift = _mm256_set1_ps(EXPF_SHIFT);
        let z = _mm256_fmadd_ps(x, c(EXPF_LOG2E), shift);
        let n = _mm256_sub_ps(z, shift);
        let b = _mm256_fnmadd_ps(n, c(EXPF_LN2_LO), _mm256_fnmadd_ps(n, c(EXPF_LN2_HI), x));
        let u = _mm256_mul_ps(b, b);
        let j = _mm256_fmadd_ps(
            _mm256_fmadd_ps(_mm256_fmadd_ps(c(EXPF_C5), b, c(EXPF_C4)), u, _mm256_fmadd_ps(c(EXPF_C3), b, c(EXPF_C2))),
            u,
            _mm256_fmadd_ps(c(EXPF_C1), b, _mm256_set1_ps(1.0)),
        );
        *n_out = n;
        // 2^n from its exponent bits: exact for the normal range.
        let pow2 = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        _mm256_mul_ps(j, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn silu_mul_impl(gate: &mut [f32], up: &[f32]) {
        let main = gate.len() - gate.len() % SILU_VECTOR;
        let (g, u) = (gate.as_mut_ptr(), up.as_ptr());
        let one = _mm256_set1_ps(1.0);
        let limit = _mm256_set1_ps(126.0);
        let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        // Every vector access is at `i + LANES <= main <= gate.len() == up.len()`.
        for i in (0..main).step_by(LANES) {
            let gv = _mm256_loadu_ps(g.add(i));
            let mut n = _mm256_setzero_ps();
            let e = expf_llama8(_mm256_sub_ps(_mm256_setzero_ps(), gv), &mut n);
            // Outside the normal range (or NaN), element by element.
            let outside = _mm256_cmp_ps::<_CMP_NLE_UQ>(_mm256_and_ps(n, abs), limit);
            if _mm256_movemask_ps(outside) != 0 {
                silu_mul_poly(&mut gate[i..i + LANES], &up[i..i + LANES]);
                continue;
            }
            let silu = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            _mm256_storeu_ps(g.add(i), _mm256_mul_ps(silu, _mm256_loadu_ps(u.add(i))));
        }
        silu_mul_tail(&mut gate[main..], &up[main..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, spread: f32) -> Vec<f32> {
        (0..n).map(|i| (((i * 7919) % 1013) as f32 / 1013.0 - 0.5) * spread).collect()
    }

    #[test]
    fn exp_is_correctly_rounded_nearly_always() {
        let (mut exact, mut total) = (0, 0);
        for i in 0..=200_000 {
            let x = (EXP_MIN + (EXP_MAX - EXP_MIN) * i as f32 / 200_000.0).min(EXP_MAX);
            let (got, want) = (exp_portable(x), (x as f64).exp() as f32);
            let ulps = (got.to_bits() as i64 - want.to_bits() as i64).abs();
            assert!(ulps <= 1, "exp({x}) = {got}, correctly rounded {want}: {ulps} ulps");
            exact += usize::from(ulps == 0);
            total += 1;
        }
        assert!(exact * 1000 >= total * 999, "{exact} of {total} correctly rounded");
        assert_eq!(exp_portable(0.0), 1.0);
        // Far below the range: the smallest normal power's neighbourhood, not garbage.
        assert!(exp_portable(-1000.0) < 1e-37 && exp_portable(-1000.0) >= 0.0);
        assert!(exp_portable(1000.0).is_finite());
    }

    #[test]
    fn softmax_sums_to_one_and_keeps_order() {
        let mut x = values(67, 20.0);
        let before = x.clone();
        (portable_kernels().softmax_scaled)(&mut x, 0.7);
        let sum: f32 = x.iter().sum();
        assert!((sum - 1.0).abs() < 1e-5, "{sum}");
        for i in 1..x.len() {
            assert_eq!(x[i] > x[i - 1], before[i] > before[i - 1]);
        }
        // Against the softmax computed in f64.
        let m = before.iter().map(|v| (v * 0.7) as f64).fold(f64::MIN, f64::max);
        let total: f64 = before.iter().map(|v| ((v * 0.7) as f64 - m).exp()).sum();
        for (got, v) in x.iter().zip(&before) {
            let want = (((v * 0.7) as f64 - m).exp() / total) as f32;
            assert!((got - want).abs() <= 1e-6 * want.max(1e-3), "{got} vs {want}");
        }
    }

    #[test]
    fn silu_matches_its_definition() {
        let g = values(37, 30.0);
        let u = values(37, 3.0);
        let mut out = g.clone();
        (portable_kernels().silu_mul)(&mut out, &u);
        for ((o, gv), uv) in out.iter().zip(&g).zip(&u) {
            let want = (*gv as f64 / (1.0 + (-*gv as f64).exp()) * *uv as f64) as f32;
            assert!((o - want).abs() <= 1e-6 * want.abs().max(1e-3), "silu({gv}) * {uv} = {o}, want {want}");
        }
    }

    /// The AVX2 kernels where this CPU has them.
    fn avx2_if_present() -> Option<Activations> {
        #[cfg(target_arch = "x86_64")]
        if crate::isa::detected_isa() >= crate::isa::Isa::Avx2 {
            return Some(avx2_kernels());
        }
        None
    }

    #[test]
    fn simd_matches_portable_bit_for_bit() {
        let p = portable_kernels();
        let s = avx2_if_present().unwrap_or_else(|| {
            eprintln!("no AVX2 on this CPU: both kernels are the portable one");
            p
        });
        for n in [1usize, 7, 8, 9, 64, 67, 513] {
            for spread in [1.0, 40.0, 400.0] {
                let x = values(n, spread);
                let (mut a, mut b) = (x.clone(), x.clone());
                (p.softmax_scaled)(&mut a, 0.125);
                (s.softmax_scaled)(&mut b, 0.125);
                assert_eq!(a, b, "softmax n = {n} spread {spread}");
                let up = values(n, 2.0);
                let (mut a, mut b) = (x.clone(), x.clone());
                (p.silu_mul)(&mut a, &up);
                (s.silu_mul)(&mut b, &up);
                assert_eq!(a, b, "silu n = {n} spread {spread}");
            }
        }
    }
}
