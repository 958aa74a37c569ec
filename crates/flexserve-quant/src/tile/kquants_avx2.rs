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

use super::{check_tile, Shape, TileFn};
use crate::kquants::avx2::{f16_at, hsum_256, load};
use crate::kquants::{q4k, q6k, q8k, unpack_scales_mins};
use crate::legacy::avx2::pin;
use crate::GgmlType;
use std::arch::x86_64::*;

/// Weight rows and tokens of a Q4_K micro-tile: the 2 x 4 i32 super-block
/// sums stay in registers beside one row's levels and scales.
const Q4K_TILE: (usize, usize) = (2, 4);
/// Weight rows and tokens of a Q6_K micro-tile: decoding its levels costs
/// more than Q4_K's, so each decoded row is used for more tokens.
const Q6K_TILE: (usize, usize) = (1, 8);
/// Bytes of weight rows swept by one chunk of tokens (fits in L2).
const ROW_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of activation rows in one chunk of tokens.
const TOK_CHUNK_BYTES: usize = 128 * 1024;

pub(super) const Q4K: u8 = 0;
pub(super) const Q6K: u8 = 1;
/// Q6_K with one f32 chain per (row, token) instead of eight lanes (see
/// `crate::tile::sequence_tile_kernel_for`).
pub(super) const Q6K_CHAIN: u8 = 2;

/// The AVX2 tile kernel of `ty`, if there is one.
pub(super) fn tile(ty: GgmlType) -> Option<TileFn> {
    tile_of_tier::<false>(ty)
}

/// The tile kernel of `ty` for AVX2 (`WIDE` false) or AVX-512 (`WIDE` true).
pub(super) fn tile_of_tier<const WIDE: bool>(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::Q4_K => Some(tile_wrapper::<Q4K, WIDE>),
        GgmlType::Q6_K => Some(tile_wrapper::<Q6K, WIDE>),
        _ => None,
    }
}

/// The Q6_K tile kernel with one chain per (row, token), for AVX2 (`WIDE`
/// false) or AVX-512 (`WIDE` true).
pub(super) fn q6k_chain_of_tier<const WIDE: bool>() -> TileFn {
    tile_wrapper::<Q6K_CHAIN, WIDE>
}

#[allow(clippy::too_many_arguments)]
fn tile_wrapper<const F: u8, const WIDE: bool>(
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
    let ty = if F == Q4K { GgmlType::Q4_K } else { GgmlType::Q6_K };
    check_tile(ty, GgmlType::Q8_K, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    let chain = F == Q6K_CHAIN;
    if rows == 0 || toks == 0 {
        return;
    }
    let shape = Shape::of(ty, n, w_row_bytes, a_row_bytes, out_stride);
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA and F16C (and AVX-512 F/BW/VL/VNNI where `WIDE`);
    // `check_tile` verified that `rows` weight rows and `toks` activation rows
    // of `nb` super-blocks each, and `toks` output rows of `rows` floats, lie
    // within the slices at the given strides, which is exactly what the
    // kernel reads and writes.
    unsafe {
        if WIDE {
            super::kquants_avx512::sweep::<F>(shape, w.as_ptr(), rows, a.as_ptr(), toks, out.as_mut_ptr(), chain)
        } else {
            sweep::<F>(shape, w.as_ptr(), rows, a.as_ptr(), toks, out.as_mut_ptr(), chain)
        }
    }
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

/// Rows and tokens per cache chunk for micro-tiles of `tile` (rows, tokens):
/// whole micro-tiles, about `ROW_CHUNK_BYTES` of weights and
/// `TOK_CHUNK_BYTES` of activations.
pub(super) fn chunks(s: &Shape, tile: (usize, usize)) -> (usize, usize) {
    let row_chunk = (ROW_CHUNK_BYTES / s.w_stride.max(1)).max(1).div_ceil(tile.0) * tile.0;
    let tok_chunk = (TOK_CHUNK_BYTES / s.a_stride.max(1)).max(1).div_ceil(tile.1) * tile.1;
    (row_chunk, tok_chunk)
}

/// Walks `rows x toks` in chunks (`chunks`: rows, tokens): per chunk of tokens
/// and chunk of rows `r0..r1`, `prepare(r0, r1)`, then `micro(r, rr, t, tt, r0)`
/// for each micro-tile of `rr <= tile.0` rows from `r` by `tt <= tile.1` tokens
/// from `t`. Every chunk of rows passes a chunk of tokens while its
/// activations stay in L2.
#[inline(always)]
pub(super) fn for_each_micro_tile(
    rows: usize,
    toks: usize,
    tile: (usize, usize),
    (row_chunk, tok_chunk): (usize, usize),
    mut prepare: impl FnMut(usize, usize),
    mut micro: impl FnMut(usize, usize, usize, usize, usize),
) {
    for t_chunk in (0..toks).step_by(tok_chunk) {
        let t_chunk_end = toks.min(t_chunk + tok_chunk);
        for r_chunk in (0..rows).step_by(row_chunk) {
            let r_chunk_end = rows.min(r_chunk + row_chunk);
            prepare(r_chunk, r_chunk_end);
            for t in (t_chunk..t_chunk_end).step_by(tile.1) {
                let tt = tile.1.min(t_chunk_end - t);
                for r in (r_chunk..r_chunk_end).step_by(tile.0) {
                    micro(r, tile.0.min(r_chunk_end - r), t, tt, r_chunk);
                }
            }
        }
    }
}

/// The Q4_K sweep: the unpacked factors of every block of the current chunk
/// of rows are made once per chunk of tokens (not once per micro-tile), and
/// `micro(rr, tt, w, a, out, factors)` gets each micro-tile's first weight
/// row, activation row, output and factors.
///
/// # Safety
/// AVX2 and F16C must be available; `rows` weight rows and `toks` activation
/// rows of `s.nb` super-blocks at their strides must be readable and the
/// `rows x toks` outputs writable.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) unsafe fn q4k_sweep(
    s: Shape,
    w: *const u8,
    rows: usize,
    a: *const u8,
    toks: usize,
    out: *mut f32,
    tile: (usize, usize),
    mut micro: impl FnMut(usize, usize, *const u8, *const u8, *mut f32, *const Q4kFactors),
) {
    let chunks = chunks(&s, tile);
    with_q4k_factors(chunks.0.min(rows) * s.nb, Q4kFactors::zero(), |unpacked| {
        let factors = unpacked.as_mut_ptr();
        for_each_micro_tile(
            rows,
            toks,
            tile,
            chunks,
            |r_chunk, r_chunk_end| {
                for i in 0..r_chunk_end - r_chunk {
                    let row = w.add((r_chunk + i) * s.w_stride);
                    for b in 0..s.nb {
                        *factors.add(i * s.nb + b) = q4k_factors(row.add(b * q4k::BYTES));
                    }
                }
            },
            |r, rr, t, tt, r_chunk| {
                let (w, a, out) = (w.add(r * s.w_stride), a.add(t * s.a_stride), out.add(t * s.out_stride + r));
                micro(rr, tt, w, a, out, factors.add((r - r_chunk) * s.nb));
            },
        );
    })
}

/// Calls the micro-tile kernel `$micro` instantiated for `$rr x $tt`, one of
/// the listed shapes.
macro_rules! dispatch {
    ($rr:expr, $tt:expr, $micro:ident $args:tt, $(($r:literal, $t:literal)),*) => {
        match ($rr, $tt) {
            $(($r, $t) => $micro::<$r, $t> $args,)*
            (rr, tt) => unreachable!("no {rr} x {tt} micro-tile"),
        }
    };
}
pub(super) use dispatch;

/// The row-side factors of one Q4_K block, unpacked.
#[derive(Clone, Copy)]
pub(super) struct Q4kFactors {
    /// The eight sub-block scales as i16, in both 128-bit lanes.
    pub(super) scales: __m256i,
    /// The eight sub-block mins as i16, in both 128-bit lanes.
    mins: __m256i,
    pub(super) d: f32,
    neg_dmin: f32,
}

crate::scratch::scratch_fn! {
    /// Scratch for the unpacked factors of a chunk of rows.
    fn with_q4k_factors: Q4kFactors => Q4K_FACTORS;
}

impl Q4kFactors {
    fn zero() -> Q4kFactors {
        // SAFETY: all-zero bits are a valid value of every field.
        unsafe { std::mem::zeroed() }
    }
}

/// Unpacks the factors of the Q4_K block at `p`.
///
/// # Safety
/// AVX2 and F16C must be available and `p` must point to a readable Q4_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_factors(p: *const u8) -> Q4kFactors {
    let block = std::slice::from_raw_parts(p, q4k::BYTES);
    let (scales, mins) = unpack_scales_mins(&block[q4k::SCALES..q4k::QS]);
    Q4kFactors { scales: widen(scales), mins: widen(mins), d: f16_at(block, 0), neg_dmin: -f16_at(block, 2) }
}

/// Eight bytes as i16, in both 128-bit lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
fn widen(bytes: [u8; 8]) -> __m256i {
    _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_set_epi64x(0, u64::from_le_bytes(bytes) as i64)))
}

/// The block scale `d` of the Q8_K block at `p`, in every lane.
///
/// # Safety
/// AVX must be available and `p` must point to a readable Q8_K block.
#[inline(always)]
pub(super) unsafe fn q8k_scale(p: *const u8) -> __m256 {
    _mm256_set1_ps(p.cast::<f32>().read_unaligned())
}

/// Block `b` of each of the `T` activation rows at `a`, and its scale in every lane.
///
/// # Safety
/// AVX must be available and block `b` of the `T` rows readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q8k_blocks<const T: usize>(s: &Shape, a: *const u8, b: usize) -> ([*const u8; T], [__m256; T]) {
    let ab: [*const u8; T] = std::array::from_fn(|t| a.add(t * s.a_stride + b * q8k::BYTES));
    (ab, ab.map(|block| q8k_scale(block)))
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

/// The token side of one Q4_K super-block for `T` tokens.
pub(super) struct Q4kTokens<const T: usize, const P: usize> {
    /// Each token's activation block.
    pub(super) ab: [*const u8; T],
    /// The block scales of tokens 4g..4g + 4 in `d_a[g]` (zero past `T`).
    pub(super) d_a: [__m128; 2],
    /// Tokens 2i and 2i + 1 (2i again past an odd end) side by side: their
    /// 16-element group sums added in pairs (one i16 per sub-block).
    pair_sums: [__m256i; P],
}

/// The token side of super-block `b` of the `T` activation rows at `a`
/// (`P` = `T` / 2 rounded up).
///
/// # Safety
/// AVX2 must be available and block `b` of the `T` rows readable.
// The loops walk the per-token arrays in step.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_tokens<const T: usize, const P: usize>(s: &Shape, a: *const u8, b: usize) -> Q4kTokens<T, P> {
    let mut tokens = Q4kTokens { ab: [a; T], d_a: [_mm_setzero_ps(); 2], pair_sums: [_mm256_setzero_si256(); P] };
    let mut scale = [0f32; 8];
    for t in 0..T {
        tokens.ab[t] = a.add(t * s.a_stride + b * q8k::BYTES);
        scale[t] = tokens.ab[t].cast::<f32>().read_unaligned();
    }
    // Built in registers (a vector load of the scalars just stored would
    // stall on store forwarding).
    tokens.d_a[0] = _mm_setr_ps(scale[0], scale[1], scale[2], scale[3]);
    if T > 4 {
        tokens.d_a[1] = _mm_setr_ps(scale[4], scale[5], scale[6], scale[7]);
    }
    for i in 0..T.div_ceil(2) {
        let (t0, t1) = (2 * i, (2 * i + 1).min(T - 1));
        let sums = _mm256_hadd_epi16(load(tokens.ab[t0].add(q8k::BSUMS)), load(tokens.ab[t1].add(q8k::BSUMS)));
        tokens.pair_sums[i] = _mm256_permute4x64_epi64::<0b11_01_10_00>(sums);
    }
    tokens
}

/// The minimum products of up to two rows (`f`) and the four tokens from
/// `2 * first_pair`: `[r][i]` holds, for tokens `2 (first_pair + i)` and the
/// next (low and high half), the four i32 partial sums of `mins[j] *
/// (sub-block j's activation sum)`; zero past the rows and tokens given.
///
/// # Safety
/// AVX2 must be available.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_min_products<const R: usize, const T: usize, const P: usize>(
    f: &[&Q4kFactors; R],
    tokens: &Q4kTokens<T, P>,
    first_pair: usize,
) -> [[__m256i; 2]; 2] {
    let mut products = [[_mm256_setzero_si256(); 2]; 2];
    let pairs = T.div_ceil(2).saturating_sub(first_pair).min(2);
    for r in 0..R {
        for i in 0..pairs {
            products[r][i] = _mm256_madd_epi16(f[r].mins, tokens.pair_sums[first_pair + i]);
        }
    }
    products
}

/// One block of the portable dot for up to two rows by four tokens, lane
/// `4 r + t`: `acc + ((d_a * d) * isum - (d_a * dmin) * msum)` (`d_a`: the
/// four tokens' scales), where
/// `isum` is the exact sum of the eight lanes of `sumi[r][t]` and `msum`
/// that of the minimum products' lanes for the pair (`q4k_min_products`).
/// The integer sums are reduced for all eight pairs together, so the float
/// work is four multiplications and two additions for eight pairs. Lanes past
/// the rows and tokens given hold nothing of use.
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_block_step<const R: usize>(
    acc: __m256,
    sumi: &[[__m256i; 4]; 2],
    mins: &[[__m256i; 2]; 2],
    f: &[&Q4kFactors; R],
    d_a: __m128,
) -> __m256 {
    let h = |x, y| _mm256_hadd_epi32(x, y);
    // Per row: the four tokens' sums over the low 128-bit halves, then over the high ones.
    let g0 = h(h(sumi[0][0], sumi[0][1]), h(sumi[0][2], sumi[0][3]));
    let g1 = h(h(sumi[1][0], sumi[1][1]), h(sumi[1][2], sumi[1][3]));
    let isums = _mm256_add_epi32(_mm256_permute2x128_si256::<0x20>(g0, g1), _mm256_permute2x128_si256::<0x31>(g0, g1));
    // Lanes: row 0 tokens 0, 2, row 1 tokens 0, 2 | row 0 tokens 1, 3, row 1 tokens 1, 3.
    let m = h(h(mins[0][0], mins[0][1]), h(mins[1][0], mins[1][1]));
    let msums = _mm256_permutevar8x32_epi32(m, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    let row_pair = |x: f32, y: f32| _mm256_set_m128(_mm_set1_ps(y), _mm_set1_ps(x));
    let (d, neg_dmin) = if R == 2 {
        (row_pair(f[0].d, f[1].d), row_pair(f[0].neg_dmin, f[1].neg_dmin))
    } else {
        (row_pair(f[0].d, 0.0), row_pair(f[0].neg_dmin, 0.0))
    };
    let d_a = _mm256_set_m128(d_a, d_a);
    let level_factor = _mm256_mul_ps(d_a, d);
    // `-(d_a * dmin)`: negation is exact, so adding it subtracts the portable product.
    let min_factor = _mm256_mul_ps(d_a, neg_dmin);
    let level_terms = _mm256_mul_ps(level_factor, _mm256_cvtepi32_ps(isums));
    let min_terms = _mm256_mul_ps(min_factor, _mm256_cvtepi32_ps(msums));
    _mm256_add_ps(acc, _mm256_add_ps(level_terms, min_terms))
}

/// Writes the results of `R` rows and the `T` tokens from `first_token`
/// (at most four) from `acc` (lane `4 r + t`), token-major.
///
/// # Safety
/// AVX must be available and the outputs writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(super) unsafe fn q4k_store<const R: usize, const T: usize>(
    s: &Shape,
    out: *mut f32,
    acc: __m256,
    first_token: usize,
) {
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
    for r in 0..R {
        for t in first_token..T.min(first_token + 4) {
            *out.add(t * s.out_stride + r) = lanes[4 * r + t - first_token];
        }
    }
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
                let sumi = _mm256_sub_epi32(sumi[r][t], crate::kquants::avx2::q6k_offsets(wb[r], ab[t]));
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
            *out.add(t * s.out_stride + r) = if chain { chains[r][t] } else { hsum_256(acc[r][t]) };
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
pub(super) unsafe fn q6k_chain_step(acc: f32, sumi: __m256i, d_w: __m256, d_a: __m256) -> f32 {
    let isum = crate::kquants::avx2::hsum_i32_256(sumi) as f32;
    (isum * _mm256_cvtss_f32(d_w)).mul_add(_mm256_cvtss_f32(d_a), acc)
}
