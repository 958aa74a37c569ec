//! The AVX2 building blocks of the x86-64 K-quant tiles, which the AVX2 and
//! AVX-512 tiers share: the checks and cache chunks of a tile, the walk of
//! a Q4_K tile with its rows' factors unpacked once per chunk, the token
//! side of a Q4_K super-block and its block step (the portable dot's formula
//! for eight (row, token) pairs at once), and the Q8_K blocks of a
//! micro-tile's tokens.

use super::{q4k, q8k, unpack_scales_mins};
use crate::shape::{check_tile, for_each_micro_tile, Shape};
use crate::simd::avx2::{f16_at, load};
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Bytes of weight rows swept by one chunk of tokens (fits in L2).
const ROW_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of activation rows in one chunk of tokens.
const TOK_CHUNK_BYTES: usize = 128 * 1024;

// The tile kernels' formats, a const parameter of the wrappers and sweeps.
pub(super) const Q4K: u8 = 0;
pub(super) const Q6K: u8 = 1;
/// Q6_K with one f32 chain per (row, token) instead of eight lanes (see
/// `dispatch::sequence_tile_kernel_for`).
pub(super) const Q6K_CHAIN: u8 = 2;

/// Checks a tile of format `F` (see `TileFn`) and gives its shape, or `None`
/// when it is empty (nothing to compute).
#[allow(clippy::too_many_arguments)]
pub(super) fn checked_shape<const F: u8>(
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    toks: usize,
    out: &[f32],
    out_stride: usize,
) -> Option<Shape> {
    let ty = if F == Q4K { GgmlType::Q4_K } else { GgmlType::Q6_K };
    check_tile(ty, GgmlType::Q8_K, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    (rows > 0 && toks > 0).then(|| Shape::of(ty, n, w_row_bytes, a_row_bytes, out_stride))
}

/// Rows and tokens per cache chunk for micro-tiles of `tile` (rows, tokens):
/// whole micro-tiles, about `ROW_CHUNK_BYTES` of weights and
/// `TOK_CHUNK_BYTES` of activations.
pub(super) fn chunks(s: &Shape, tile: (usize, usize)) -> (usize, usize) {
    let row_chunk = (ROW_CHUNK_BYTES / s.w_stride.max(1)).max(1).div_ceil(tile.0) * tile.0;
    let tok_chunk = (TOK_CHUNK_BYTES / s.a_stride.max(1)).max(1).div_ceil(tile.1) * tile.1;
    (row_chunk, tok_chunk)
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
