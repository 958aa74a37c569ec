//! AVX-512 (F, BW, VL, VNNI) kernel for `Q6_Kx8` weights (layout in `q6k`).
//!
//! One 512-bit vector covers two neighbouring groups (lanes 0..8 and 8..16).
//! Per sub-block pair, four low-bit and two high-bit vectors give eight
//! vectors of unsigned levels (four per 32-bit lane), which `vpdpbusd` dots
//! with the broadcast activation quads: every row's exact `sum(q * a)` per
//! sub-block in its lane. One `vpmulld` per sub-block applies the signed
//! scale; one `vpdpwssd` per sub-block pair gathers `sum_s scale_s * sum_s(a)`
//! (both scales of a row as 16-bit halves of its lane against the token's two
//! 16-element sums), of which 32 times is taken off. Then the portable dot's
//! float formula, lane by lane.

use super::q6k::{GROUP_BLOCK, HIGH_AT, LOW_AT, SCALES_AT};
use super::sweep::{by_tokens, prefetch, sweep, Pass, AHEAD_BYTES};
use super::{Product, Q6_K};
use crate::kquants::q8k;
use crate::simd::avx512::pin;
use std::arch::x86_64::*;

/// Groups per pass: one 512-bit vector covers two groups of eight rows.
const GROUPS: usize = 2;

super::entry_points! {
    /// The `Q6_Kx8` product (see the module docs).
    q6_kx8 => products::<Q6_K>;
}

fn products<const L: u8>(product: Product) {
    sweep(product, GROUPS, |p: Pass| {
        // A lone last group reads itself twice and stores only its own lanes.
        let (second, lanes) =
            if p.groups == GROUPS { (p.w.wrapping_add(p.group_bytes), 0xFFFF) } else { (p.w, 0x00FF) };
        // SAFETY: the kernel is only handed out after the CPU was found to
        // support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; `check_repacked`
        // verified that every group of `nb` blocks, the pass's activation rows
        // and their outputs (eight floats per group and token at `out_stride`)
        // lie within the slices, and `second` is a group of the pass.
        unsafe { by_tokens!(p.tn => pair::<_>(p.nb, p.w, second, p.a, p.a_stride, p.out, p.out_stride, lanes)) }
    });
}

/// The 32 bytes at `p0` (lanes 0..8) and at `p1` (lanes 8..16).
///
/// # Safety
/// AVX-512 F must be available; 32 bytes at `p0` and at `p1` readable.
#[inline]
#[target_feature(enable = "avx2,avx512f")]
unsafe fn load_pair(p0: *const u8, p1: *const u8) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(_mm256_loadu_si256(p0.cast())), _mm256_loadu_si256(p1.cast()))
}

/// Two groups at `w0` and `w1` against `T` activation rows at `a`; the
/// results of the lanes set in `lanes` are stored.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `nb` group
/// blocks at `w0` and at `w1` and `T` rows of `nb` Q8_K blocks at `a`
/// (`a_stride` apart) must be readable, the lanes of `lanes` among sixteen
/// floats at `out + t * out_stride` writable for `t < T`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair<const T: usize>(
    nb: usize,
    w0: *const u8,
    w1: *const u8,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: __mmask16,
) {
    let low = _mm512_set1_epi8(0x0F);
    let top = _mm512_set1_epi8(0x30);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let (b0, b1) = (w0.add(b * GROUP_BLOCK), w1.add(b * GROUP_BLOCK));
        prefetch(b0.wrapping_add(AHEAD_BYTES), GROUP_BLOCK);
        prefetch(b1.wrapping_add(AHEAD_BYTES), GROUP_BLOCK);
        let act = |t: usize| a.add(t * a_stride + b * q8k::BYTES);
        let quad = |t: usize, at: usize| _mm512_set1_epi32(act(t).add(q8k::QS + at).cast::<i32>().read_unaligned());
        let mut isum = [_mm512_setzero_si512(); T];
        let mut offsets = [_mm512_setzero_si512(); T];
        for p in 0..8 {
            let mut lo_sum = [_mm512_setzero_si512(); T];
            let mut hi_sum = [_mm512_setzero_si512(); T];
            for h in 0..2 {
                let high = load_pair(b0.add(HIGH_AT + 32 * (2 * p + h)), b1.add(HIGH_AT + 32 * (2 * p + h)));
                // Quads 2h and 2h+1: their top bits sit at bits 0-1 / 2-3 and 4-5 / 6-7.
                let tops = [
                    (_mm512_slli_epi16::<4>(high), _mm512_slli_epi16::<2>(high)),
                    (high, _mm512_srli_epi16::<2>(high)),
                ];
                for (u, (lo_top, hi_top)) in tops.into_iter().enumerate() {
                    let j = 2 * h + u;
                    let nibbles = load_pair(b0.add(LOW_AT + 32 * (4 * p + j)), b1.add(LOW_AT + 32 * (4 * p + j)));
                    let lo = _mm512_or_si512(_mm512_and_si512(nibbles, low), _mm512_and_si512(lo_top, top));
                    let hi = _mm512_or_si512(
                        _mm512_and_si512(_mm512_srli_epi16::<4>(nibbles), low),
                        _mm512_and_si512(hi_top, top),
                    );
                    for t in 0..T {
                        lo_sum[t] = _mm512_dpbusd_epi32(lo_sum[t], lo, quad(t, 32 * p + 4 * j));
                        hi_sum[t] = _mm512_dpbusd_epi32(hi_sum[t], hi, quad(t, 32 * p + 16 + 4 * j));
                    }
                    pin(&mut lo_sum);
                    pin(&mut hi_sum);
                }
            }
            // Lane r: the scales of sub-blocks 2p (low half) and 2p+1 (high half).
            let scales = _mm512_cvtepi8_epi16(_mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(b0.add(SCALES_AT + 16 * p).cast())),
                _mm_loadu_si128(b1.add(SCALES_AT + 16 * p).cast()),
            ));
            let scale_lo = _mm512_srai_epi32::<16>(_mm512_slli_epi32::<16>(scales));
            let scale_hi = _mm512_srai_epi32::<16>(scales);
            for t in 0..T {
                let scaled =
                    _mm512_add_epi32(_mm512_mullo_epi32(lo_sum[t], scale_lo), _mm512_mullo_epi32(hi_sum[t], scale_hi));
                isum[t] = _mm512_add_epi32(isum[t], scaled);
                // The token's 16-element sums of sub-blocks 2p and 2p+1, as stored.
                let sums = _mm512_set1_epi32(act(t).add(q8k::BSUMS + 4 * p).cast::<i32>().read_unaligned());
                offsets[t] = _mm512_dpwssd_epi32(offsets[t], scales, sums);
            }
        }
        let d = _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(b0.cast())),
            _mm_loadu_si128(b1.cast()),
        ));
        for t in 0..T {
            let exact = _mm512_sub_epi32(isum[t], _mm512_slli_epi32::<5>(offsets[t]));
            let d_a = _mm512_set1_ps(act(t).cast::<f32>().read_unaligned());
            acc[t] = _mm512_add_ps(acc[t], _mm512_mul_ps(_mm512_mul_ps(d_a, d), _mm512_cvtepi32_ps(exact)));
        }
    }
    for (t, acc_t) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(t * out_stride), lanes, *acc_t);
    }
}
