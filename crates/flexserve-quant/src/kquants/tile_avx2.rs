//! AVX2 + FMA + F16C tile kernels for Q4_K and Q6_K weights against Q8_K
//! activations.
//!
//! Per super-block, each weight row's levels are decoded once and multiplied
//! with the activation quants of every token of the micro-tile, accumulating
//! `R x T` i32 sums in registers. Q4_K's packed 6-bit scales and mins are
//! unpacked once per chunk of tokens (not per micro-tile), and the minimum
//! products of two tokens share one vector.
//!
//! Q4_K: per block, the eight (row, token) pairs' i32 sums are reduced
//! together into one vector of exact block sums (and so are the minimum
//! terms), which then takes the portable dot's formula `sum += (d_a * d) *
//! isum - (d_a * dmin) * msum` lane by lane: four multiplications and two
//! additions for eight pairs, instead of a conversion, a product and an FMA on
//! eight lanes per pair. Every tier's Q4_K dot computes the same, so results
//! are bit-identical to it (and to the portable dot).
//!
//! Q6_K: each (row, token) pair keeps its own i32 super-block sum and f32
//! accumulators, built with the same integer products (lane for lane), the
//! same factors, the same FMAs and the same final reduction as the plain AVX2
//! dot, so results are bit-identical to it.
//!
//! What the AVX-512 tier's tiles share with these is in `tile_blocks`.

use super::tile_blocks::{
    checked_shape, chunks, dispatch, q4k_block_step, q4k_min_products, q4k_store, q4k_sweep, q4k_tokens, q8k_blocks,
    Q4kFactors, Q4K, Q6K, Q6K_CHAIN,
};
use super::{avx2::q6k_offsets, q4k, q6k, q8k};
use crate::shape::{for_each_micro_tile, Shape};
use crate::simd::avx2::{f16_at, hsum, hsum_i32, load, pin};
use crate::types::TileFn;
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Weight rows and tokens of a Q4_K micro-tile: the 2 x 4 i32 super-block
/// sums stay in registers beside one row's levels and scales.
const Q4K_TILE: (usize, usize) = (2, 4);
/// Weight rows and tokens of a Q6_K micro-tile: decoding its levels costs
/// more than Q4_K's, so each decoded row is used for more tokens.
const Q6K_TILE: (usize, usize) = (1, 8);

/// The AVX2 tile kernel of `ty`, if there is one.
pub(crate) fn tile(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::Q4_K => Some(tile_wrapper::<Q4K>),
        GgmlType::Q6_K => Some(tile_wrapper::<Q6K>),
        _ => None,
    }
}

/// The AVX2 Q6_K tile kernel with one chain per (row, token).
pub(crate) fn q6k_chain() -> TileFn {
    tile_wrapper::<Q6K_CHAIN>
}

#[allow(clippy::too_many_arguments)]
fn tile_wrapper<const F: u8>(
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    toks: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let Some(shape) = checked_shape::<F>(n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride) else {
        return;
    };
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA and F16C; `checked_shape` verified that `rows` weight
    // rows and `toks` activation rows of `nb` super-blocks each, and `toks`
    // output rows of `rows` floats, lie within the slices at the given
    // strides, which is exactly what the kernel reads and writes.
    unsafe { sweep::<F>(shape, w.as_ptr(), rows, a.as_ptr(), toks, out.as_mut_ptr(), F == Q6K_CHAIN) }
}

/// Visits the whole `rows x toks` tile in cache-sized chunks of micro-tiles.
///
/// # Safety
/// As for `q4k_micro`, for all `rows` and `toks`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const F: u8>(
    s: Shape,
    w: *const u8,
    rows: usize,
    a: *const u8,
    toks: usize,
    out: *mut f32,
    chain: bool,
) {
    if F == Q4K {
        q4k_sweep(s, w, rows, a, toks, out, Q4K_TILE, |rr, tt, w, a, out, factors| {
            dispatch!(
                rr,
                tt,
                q4k_micro(s, w, a, out, factors),
                (2, 4),
                (2, 3),
                (2, 2),
                (2, 1),
                (1, 4),
                (1, 3),
                (1, 2),
                (1, 1)
            );
        });
    } else {
        for_each_micro_tile(
            rows,
            toks,
            Q6K_TILE,
            chunks(&s, Q6K_TILE),
            |_, _| {},
            |r, rr, t, tt, _| {
                let (w, a, out) = (w.add(r * s.w_stride), a.add(t * s.a_stride), out.add(t * s.out_stride + r));
                dispatch!(
                    rr,
                    tt,
                    q6k_micro(s, w, a, out, chain),
                    (1, 8),
                    (1, 7),
                    (1, 6),
                    (1, 5),
                    (1, 4),
                    (1, 3),
                    (1, 2),
                    (1, 1)
                );
            },
        );
    }
}

/// The Q4_K micro-tile of `R` weight rows (at `w`, `s.w_stride` apart) by
/// `T` tokens (at `a`, `s.a_stride` apart), written token-major to `out`
/// (tokens `s.out_stride` apart), with the rows' unpacked factors at `factors` (`s.nb` per row).
/// Per super-block each token's scale and group sums are prepared once; the
/// inner loop is then only loads, shuffles of the scales, `maddubs`, `madd`
/// and adds on `R x T` i32 sums held in registers. The minimum terms of two
/// tokens share one vector (low and high half).
///
/// # Safety
/// AVX2, FMA and F16C must be available; the `R` weight rows and `T`
/// activation rows of `s.nb` super-blocks and the `R * s.nb` factors must be
/// readable and the `R x T` outputs writable.
// The loops walk several per-row and per-token arrays in step.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_micro<const R: usize, const T: usize>(
    s: Shape,
    w: *const u8,
    a: *const u8,
    out: *mut f32,
    factors: *const Q4kFactors,
) {
    const PAIRS: usize = Q4K_TILE.1.div_ceil(2);
    let nibble = _mm256_set1_epi8(0x0F);
    // The portable dot's running sum of every pair, lane `4 r + t`.
    let mut acc = _mm256_setzero_ps();
    for b in 0..s.nb {
        let tokens = q4k_tokens::<T, PAIRS>(&s, a, b);
        let ab = tokens.ab;
        let f: [&Q4kFactors; R] = std::array::from_fn(|r| &*factors.add(r * s.nb + b));
        let mut sumi = [[_mm256_setzero_si256(); 4]; 2];
        // The four 64-level chunks written out rather than looped: straight-line
        // code runs at the same speed wherever the linker happens to place it.
        macro_rules! chunk {
            ($c:literal) => {
                for r in 0..R {
                    // Scales 2c and 2c + 1 in every i16 lane.
                    let s_lo = _mm256_shuffle_epi8(f[r].scales, _mm256_set1_epi16(0x0100 + 0x0404 * $c));
                    let s_hi = _mm256_shuffle_epi8(f[r].scales, _mm256_set1_epi16(0x0302 + 0x0404 * $c));
                    let bits = load(w.add(r * s.w_stride + b * q4k::BYTES + q4k::QS + 32 * $c));
                    let lo = _mm256_and_si256(bits, nibble);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), nibble);
                    for t in 0..T {
                        let q8 = ab[t].add(q8k::QS + 64 * $c);
                        let p_lo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, load(q8)), s_lo);
                        let p_hi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, load(q8.add(32))), s_hi);
                        sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_add_epi32(p_lo, p_hi));
                    }
                    pin(&mut sumi[r]);
                }
            };
        }
        chunk!(0);
        chunk!(1);
        chunk!(2);
        chunk!(3);
        acc = q4k_block_step(acc, &sumi, &q4k_min_products(&f, &tokens, 0), &f, tokens.d_a[0]);
    }
    q4k_store::<R, T>(&s, out, acc, 0);
}

/// The Q6_K micro-tile (arguments as for `q4k_micro`, without factors).
/// Per super-block and group of 32 levels, each row's unsigned levels are
/// decoded once and multiplied with every token's quants (one `maddubs`);
/// the levels' offset comes off each lane at the end of the super-block, as
/// llama.cpp takes it (`q6k_offsets`), so that the lanes are the dot's. With
/// `chain`, the super-block's lanes are summed (exactly) and each (row,
/// token) keeps one f32 chain instead: `acc = fma(isum * d_w, d_a, acc)`.
///
/// # Safety
/// As for `q4k_micro`, without factors.
// The loops walk several per-row and per-token arrays in step.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_micro<const R: usize, const T: usize>(s: Shape, w: *const u8, a: *const u8, out: *mut f32, chain: bool) {
    let mut chains = [[0f32; T]; R];
    let nibble = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(0x30);
    // Byte pattern selecting scale s for the low 16 lanes and s + 1 for the high 16.
    let scale_pair = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..s.nb {
        let (ab, d_a) = q8k_blocks::<T>(&s, a, b);
        let mut wb = [w; R];
        let mut d_w = [_mm256_setzero_ps(); R];
        let mut scales = [_mm_setzero_si128(); R];
        for r in 0..R {
            wb[r] = w.add(r * s.w_stride + b * q6k::BYTES);
            d_w[r] = _mm256_set1_ps(f16_at(std::slice::from_raw_parts(wb[r], q6k::BYTES), q6k::D));
            scales[r] = _mm_loadu_si128(wb[r].add(q6k::SCALES).cast());
        }
        let mut sumi = [[_mm256_setzero_si256(); T]; R];
        for half in 0..2 {
            for k in 0..4 {
                for r in 0..R {
                    // Level group k of this half: the low or high nibbles of the
                    // first or second 32 `ql` bytes, with bit pair k of `qh` on top.
                    let low = load(wb[r].add(64 * half + 32 * (k % 2)));
                    let high = load(wb[r].add(q6k::QH + 32 * half));
                    let low = if k < 2 { low } else { _mm256_srli_epi16::<4>(low) };
                    let high = match k {
                        0 => _mm256_slli_epi16::<4>(high),
                        1 => _mm256_slli_epi16::<2>(high),
                        2 => high,
                        _ => _mm256_srli_epi16::<2>(high),
                    };
                    let q = _mm256_or_si256(_mm256_and_si256(low, nibble), _mm256_and_si256(high, two_bits));
                    let step = (8 * half + 2 * k) as i8;
                    let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(
                        scales[r],
                        _mm_add_epi8(scale_pair, _mm_set1_epi8(step)),
                    ));
                    for t in 0..T {
                        let a8 = load(ab[t].add(q8k::QS + 128 * half + 32 * k));
                        let p = _mm256_maddubs_epi16(q, a8);
                        sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(sc, p));
                    }
                    pin(&mut sumi[r]);
                }
            }
        }
        for r in 0..R {
            for t in 0..T {
                let sumi = _mm256_sub_epi32(sumi[r][t], q6k_offsets(wb[r], ab[t]));
                if chain {
                    chains[r][t] = q6k_chain_step(chains[r][t], sumi, d_w[r], d_a[t]);
                } else {
                    let d = _mm256_mul_ps(d_a[t], d_w[r]);
                    acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi), acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            *out.add(t * s.out_stride + r) = if chain { chains[r][t] } else { hsum(acc[r][t]) };
        }
    }
}

/// One super-block of the Q6_K chain (llama.cpp's tiled Q6_K product for
/// eight tokens or more): the exact sum of the lanes `sumi`, times the
/// weight's scale (rounded), then one fused multiply-add with the
/// activation's scale onto `acc`. `d_w` and `d_a` hold the scales in every lane.
///
/// # Safety
/// AVX2 and FMA must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_chain_step(acc: f32, sumi: __m256i, d_w: __m256, d_a: __m256) -> f32 {
    let isum = hsum_i32(sumi) as f32;
    (isum * _mm256_cvtss_f32(d_w)).mul_add(_mm256_cvtss_f32(d_a), acc)
}
