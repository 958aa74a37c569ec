//! AVX2 + FMA + F16C kernel for `Q6_Kx8` weights (layout in `q6k`).
//!
//! Per group of eight rows and sub-block, the level vectors (lane `r`: four
//! levels of row `r`, 0..63) meet the broadcast activation quads in
//! `maddubs`; two quads' 16-bit sums (at most 2 * 2 * 63 * 128 in magnitude)
//! take the sub-block's signed scale, duplicated into both halves of the
//! row's lane, with one `madd`: `scale * sum(q * a)` exact in 32 bits. One
//! `madd` per sub-block pair gathers `sum_s scale_s * sum_s(a)`, of which 32
//! times is taken off. Then the portable dot's float formula, lane by lane.

use super::q6k::{GROUP_BLOCK, HIGH_AT, LOW_AT, SCALES_AT};
use super::sweep::{by_tokens, dup_pattern, prefetch, sweep, AHEAD_BYTES};
use super::{Product, Q6_K};
use crate::kquants::q8k;
use crate::simd::avx2::pin;
use std::arch::x86_64::*;

super::entry_points! {
    /// The `Q6_Kx8` product (see the module docs).
    q6_kx8 => products::<Q6_K>;
}

fn products<const L: u8>(product: Product) {
    sweep(product, 1, |p| {
        // SAFETY: the kernel is only handed out after the CPU was found to
        // support AVX2, FMA and F16C; `check_repacked` verified that every
        // group of `nb` blocks, the pass's activation rows and their outputs
        // (eight floats per token at `out_stride`) lie within the slices.
        unsafe { by_tokens!(p.tn => group::<_>(p.nb, p.w, p.a, p.a_stride, p.out, p.out_stride)) }
    });
}

/// One group of eight rows at `w` against `T` Q8_K activation rows at `a`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `nb` group blocks at `w` and `T`
/// rows of `nb` Q8_K blocks at `a` (`a_stride` apart) must be readable,
/// eight floats at `out + t * out_stride` writable for `t < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let low = _mm256_set1_epi8(0x0F);
    let top = _mm256_set1_epi8(0x30);
    // Per 32-bit lane, the low (then the high) 16-bit half copied into both halves.
    let dup = [0, 1].map(|half| _mm256_broadcastsi128_si256(dup_pattern(half)));
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let blk = w.add(b * GROUP_BLOCK);
        prefetch(blk.wrapping_add(AHEAD_BYTES), GROUP_BLOCK);
        let act = |t: usize| a.add(t * a_stride + b * q8k::BYTES);
        let quad = |t: usize, at: usize| _mm256_set1_epi32(act(t).add(q8k::QS + at).cast::<i32>().read_unaligned());
        // Lane r: the scales of sub-blocks 2p (low half) and 2p+1 (high half).
        let scales = |p: usize| _mm256_cvtepi8_epi16(_mm_loadu_si128(blk.add(SCALES_AT + 16 * p).cast()));
        let mut isum = [_mm256_setzero_si256(); T];
        for p in 0..8 {
            let pair = scales(p);
            if T <= 2 {
                // Few tokens leave registers for both sub-blocks at once: each
                // quant vector is loaded and shifted once.
                let (scale_lo, scale_hi) = (_mm256_shuffle_epi8(pair, dup[0]), _mm256_shuffle_epi8(pair, dup[1]));
                for h in 0..2 {
                    let high = _mm256_loadu_si256(blk.add(HIGH_AT + 32 * (2 * p + h)).cast());
                    // Quad 2h+u's top bits: pairs 2u (low sub-block) and 2u+1 (high).
                    let tops = [
                        (_mm256_slli_epi16::<4>(high), _mm256_slli_epi16::<2>(high)),
                        (high, _mm256_srli_epi16::<2>(high)),
                    ];
                    let mut lo16 = [_mm256_setzero_si256(); T];
                    let mut hi16 = [_mm256_setzero_si256(); T];
                    for (u, (lo_top, hi_top)) in tops.into_iter().enumerate() {
                        let j = 2 * h + u;
                        let nibbles = _mm256_loadu_si256(blk.add(LOW_AT + 32 * (4 * p + j)).cast());
                        let lo = _mm256_or_si256(_mm256_and_si256(nibbles, low), _mm256_and_si256(lo_top, top));
                        let hi = _mm256_or_si256(
                            _mm256_and_si256(_mm256_srli_epi16::<4>(nibbles), low),
                            _mm256_and_si256(hi_top, top),
                        );
                        for t in 0..T {
                            lo16[t] = _mm256_add_epi16(lo16[t], _mm256_maddubs_epi16(lo, quad(t, 32 * p + 4 * j)));
                            hi16[t] = _mm256_add_epi16(hi16[t], _mm256_maddubs_epi16(hi, quad(t, 32 * p + 16 + 4 * j)));
                        }
                    }
                    for t in 0..T {
                        let both = _mm256_add_epi32(
                            _mm256_madd_epi16(lo16[t], scale_lo),
                            _mm256_madd_epi16(hi16[t], scale_hi),
                        );
                        isum[t] = _mm256_add_epi32(isum[t], both);
                    }
                }
                continue;
            }
            // upper 0: sub-block 2p (low nibbles), 1: sub-block 2p+1 (high nibbles).
            for (upper, dup) in dup.iter().enumerate() {
                let scale = _mm256_shuffle_epi8(pair, *dup);
                for h in 0..2 {
                    let high = _mm256_loadu_si256(blk.add(HIGH_AT + 32 * (2 * p + h)).cast());
                    let mut s16 = [_mm256_setzero_si256(); T];
                    for u in 0..2 {
                        let j = 2 * h + u;
                        let nibbles = _mm256_loadu_si256(blk.add(LOW_AT + 32 * (4 * p + j)).cast());
                        // The top bits of quad j sit at bit pair 2u + upper.
                        let (nibbles, tops) = match (upper, u) {
                            (0, 0) => (nibbles, _mm256_slli_epi16::<4>(high)),
                            (0, _) => (nibbles, high),
                            (_, 0) => (_mm256_srli_epi16::<4>(nibbles), _mm256_slli_epi16::<2>(high)),
                            _ => (_mm256_srli_epi16::<4>(nibbles), _mm256_srli_epi16::<2>(high)),
                        };
                        let levels = _mm256_or_si256(_mm256_and_si256(nibbles, low), _mm256_and_si256(tops, top));
                        for (t, s16_t) in s16.iter_mut().enumerate() {
                            let products = _mm256_maddubs_epi16(levels, quad(t, 32 * p + 16 * upper + 4 * j));
                            *s16_t = _mm256_add_epi16(*s16_t, products);
                        }
                        pin(&mut s16);
                    }
                    for (isum_t, s16_t) in isum.iter_mut().zip(s16) {
                        *isum_t = _mm256_add_epi32(*isum_t, _mm256_madd_epi16(s16_t, scale));
                    }
                }
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let mut offsets = _mm256_setzero_si256();
            for p in 0..8 {
                // The token's 16-element sums of sub-blocks 2p and 2p+1, as stored.
                let sums = _mm256_set1_epi32(act(t).add(q8k::BSUMS + 4 * p).cast::<i32>().read_unaligned());
                offsets = _mm256_add_epi32(offsets, _mm256_madd_epi16(scales(p), sums));
            }
            let exact = _mm256_sub_epi32(isum[t], _mm256_slli_epi32::<5>(offsets));
            let d_a = _mm256_set1_ps(act(t).cast::<f32>().read_unaligned());
            *acc_t = _mm256_add_ps(*acc_t, _mm256_mul_ps(_mm256_mul_ps(d_a, d), _mm256_cvtepi32_ps(exact)));
        }
    }
    for (t, acc_t) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(t * out_stride), *acc_t);
    }
}
