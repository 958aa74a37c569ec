//! AVX2 + FMA + F16C kernel for `Q4_Kx8` weights (layout in `q4k`).
//!
//! Per group of eight rows, sub-block and token, eight quant vectors (lane
//! `r`: four levels of row `r`) meet the matching activation quads broadcast
//! to every lane (`maddubs`); their 16-bit sums (at most 8 * 2 * 15 * 128 in
//! magnitude) take the sub-block's scale, duplicated into both halves of the
//! row's lane, with one `madd`, which leaves `scale * sum(q * a)` exact in
//! 32 bits. The min term is one `madd` per sub-block (the row's min in both
//! halves of its lane against the token's two 16-element sums of the
//! sub-block, as the activation block stores them). Then the portable dot's float
//! formula, lane by lane.

use super::q4k::{DMIN_AT, GROUP_BLOCK, MINS_HI_AT, QS_AT, SCALES_AT};
use super::sweep::{dup_pattern, prefetch, sweep, AHEAD_BYTES};
use super::{Product, Q4_K};
use crate::kquants::q8k;
use crate::simd::avx2::pin;
use std::arch::x86_64::*;

super::entry_points! {
    /// The `Q4_Kx8` product (see the module docs).
    q4_kx8 => products::<Q4_K>;
}

fn products<const L: u8>(product: Product) {
    sweep(product, 1, |p| {
        // SAFETY: the kernel is only handed out after the CPU was found to
        // support AVX2, FMA and F16C; `check_repacked` verified that every
        // group of `nb` blocks, the pass's activation rows and their outputs
        // (eight floats per token at `out_stride`) lie within the slices.
        unsafe {
            if p.grouped {
                group::<4, true>(p.nb, p.w, p.a, p.a_stride, p.out, p.out_stride)
            } else {
                let args = (p.nb, p.w, p.a, p.a_stride, p.out, p.out_stride);
                match p.tn {
                    4 => group::<4, false>(args.0, args.1, args.2, args.3, args.4, args.5),
                    3 => group::<3, false>(args.0, args.1, args.2, args.3, args.4, args.5),
                    2 => group::<2, false>(args.0, args.1, args.2, args.3, args.4, args.5),
                    _ => group::<1, false>(args.0, args.1, args.2, args.3, args.4, args.5),
                }
            }
        }
    });
}

/// A 32-bit lane's low 16-bit half copied into its high half.
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn duplicate_low(v: __m256i) -> __m256i {
    _mm256_or_si256(v, _mm256_slli_epi32::<16>(v))
}

/// One group of eight rows at `w` against `T` Q8_K activation rows at `a`;
/// `PAIRS`: with the float update per sub-block pair (llama.cpp's four-token
/// arithmetic, see `q4k`), else per super-block.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `nb` group blocks at `w`, `T` rows
/// of `nb` Q8_K blocks at `a` (`a_stride` apart) and `4 * T * nb` words must
/// be readable, eight floats at `out + t * out_stride` writable for `t < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const T: usize, const PAIRS: bool>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let low = _mm256_set1_epi8(0x0F);
    let six_bits = _mm256_set1_epi32(0x3F);
    let dup = [0, 1].map(|half| _mm256_broadcastsi128_si256(dup_pattern(half)));
    // The level terms and the min terms in accumulators of their own, as
    // llama.cpp's rearranged Q4_K product keeps them (see `q4k`).
    let mut acc = [_mm256_setzero_ps(); T];
    let mut acc_min = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let blk = w.add(b * GROUP_BLOCK);
        prefetch(blk.wrapping_add(AHEAD_BYTES), GROUP_BLOCK);
        let quad = |t: usize, at: usize| {
            let quad = a.add(t * a_stride + b * q8k::BYTES + q8k::QS + at);
            _mm256_set1_epi32(quad.cast::<i32>().read_unaligned())
        };
        let entries = |c: usize| _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.add(SCALES_AT + 16 * c).cast()));
        // Per sub-block pair: the float update may take them one by one.
        let mut isums = [[_mm256_setzero_si256(); T]; 4];
        for (c, isum) in isums.iter_mut().enumerate() {
            let pair = entries(c);
            let scales = [_mm256_and_si256(pair, six_bits), _mm256_and_si256(_mm256_srli_epi32::<16>(pair), six_bits)];
            if T <= 2 {
                // Few tokens leave registers for both halves at once: each quant
                // vector is loaded once.
                let (scale_lo, scale_hi) = (duplicate_low(scales[0]), duplicate_low(scales[1]));
                let mut lo16 = [_mm256_setzero_si256(); T];
                let mut hi16 = [_mm256_setzero_si256(); T];
                for m in 0..8 {
                    let raw = _mm256_loadu_si256(blk.add(QS_AT + 256 * c + 32 * m).cast());
                    let lo = _mm256_and_si256(raw, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
                    for t in 0..T {
                        lo16[t] = _mm256_add_epi16(lo16[t], _mm256_maddubs_epi16(lo, quad(t, 64 * c + 4 * m)));
                        hi16[t] = _mm256_add_epi16(hi16[t], _mm256_maddubs_epi16(hi, quad(t, 64 * c + 32 + 4 * m)));
                    }
                }
                for t in 0..T {
                    let both =
                        _mm256_add_epi32(_mm256_madd_epi16(lo16[t], scale_lo), _mm256_madd_epi16(hi16[t], scale_hi));
                    isum[t] = _mm256_add_epi32(isum[t], both);
                }
                continue;
            }
            for (half, scale) in scales.into_iter().enumerate() {
                let scale = duplicate_low(scale);
                let mut s16 = [_mm256_setzero_si256(); T];
                for m in 0..8 {
                    let raw = _mm256_loadu_si256(blk.add(QS_AT + 256 * c + 32 * m).cast());
                    let levels = if half == 0 { raw } else { _mm256_srli_epi16::<4>(raw) };
                    let levels = _mm256_and_si256(levels, low);
                    for (t, s16_t) in s16.iter_mut().enumerate() {
                        let products = _mm256_maddubs_epi16(levels, quad(t, 64 * c + 32 * half + 4 * m));
                        *s16_t = _mm256_add_epi16(*s16_t, products);
                    }
                    pin(&mut s16);
                }
                for (isum_t, s16_t) in isum.iter_mut().zip(s16) {
                    *isum_t = _mm256_add_epi32(*isum_t, _mm256_madd_epi16(s16_t, scale));
                }
            }
        }
        let mut msums = [[_mm256_setzero_si256(); T]; 4];
        for (c, msum) in msums.iter_mut().enumerate() {
            let nibbles = _mm256_cvtepu8_epi16(_mm_loadu_si128(blk.add(MINS_HI_AT + 16 * (c % 2)).cast()));
            let high = if c < 2 {
                _mm256_and_si256(nibbles, _mm256_set1_epi16(0x0F))
            } else {
                _mm256_srli_epi16::<4>(nibbles)
            };
            let mins = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<6>(entries(c)), _mm256_set1_epi16(0x03)),
                _mm256_slli_epi16::<2>(high),
            );
            // Each sub-block's min in both halves of a row's lane.
            let (min_lo, min_hi) = (_mm256_shuffle_epi8(mins, dup[0]), _mm256_shuffle_epi8(mins, dup[1]));
            for (t, msum_t) in msum.iter_mut().enumerate() {
                // The token's 16-element sums of sub-blocks 2c and 2c+1, as stored.
                let sums = |j: usize| {
                    let at = a.add(t * a_stride + b * q8k::BYTES + q8k::BSUMS + 4 * j);
                    _mm256_set1_epi32(at.cast::<i32>().read_unaligned())
                };
                let both = _mm256_add_epi32(
                    _mm256_madd_epi16(min_lo, sums(2 * c)),
                    _mm256_madd_epi16(min_hi, sums(2 * c + 1)),
                );
                *msum_t = _mm256_add_epi32(*msum_t, both);
            }
        }
        let d = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
        let dmin = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(DMIN_AT).cast()));
        for t in 0..T {
            let d_a = _mm256_set1_ps(a.add(t * a_stride + b * q8k::BYTES).cast::<f32>().read_unaligned());
            let (level_factor, min_factor) = (_mm256_mul_ps(d, d_a), _mm256_mul_ps(dmin, d_a));
            let mut update = |isum: __m256i, msum: __m256i| {
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), level_factor, acc[t]);
                acc_min[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(msum), min_factor, acc_min[t]);
            };
            if PAIRS {
                for c in 0..4 {
                    update(isums[c][t], msums[c][t]);
                }
            } else {
                let total = |v: &[[__m256i; T]; 4]| {
                    _mm256_add_epi32(_mm256_add_epi32(v[0][t], v[1][t]), _mm256_add_epi32(v[2][t], v[3][t]))
                };
                update(total(&isums), total(&msums));
            }
        }
    }
    for t in 0..T {
        _mm256_storeu_ps(out.add(t * out_stride), _mm256_sub_ps(acc[t], acc_min[t]));
    }
}
