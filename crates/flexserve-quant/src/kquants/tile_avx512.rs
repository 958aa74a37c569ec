//! AVX-512 (F, BW, VL, VNNI) tile kernels for Q4_K and Q6_K weights against
//! Q8_K activations.
//!
//! Q4_K: one 512-bit vector covers a 64-level chunk of a Q4_K block: its 32 bytes
//! of packed levels, copied into both halves, shifted by 0 and 4 and masked,
//! give the low nibbles (sub-block `2c`) in the lower half and the high
//! nibbles (sub-block `2c + 1`) in the upper half, which is exactly how the
//! chunk's 64 activation quants lie in memory. Per (row, token) pair and
//! chunk, `vpmaddubsw` forms the i16 pair products and `vpdpwssd` multiplies
//! them with the sub-block scales and adds them to 16 i32 sums: two
//! instructions for 64 levels, where the AVX2 kernel needs six for the same
//! levels in two halves.
//!
//! Lane `j` of the lower half then holds what lane `j` of the AVX2 kernel
//! sums for the low nibbles, and lane `8 + j` what it sums for the high
//! nibbles; integer sums are exact in any order, so folding the halves gives
//! the AVX2 kernel's eight lanes, and the AVX2 kernel's block step follows
//! (exact block sums, then the portable dot's formula for eight pairs at
//! once): results are bit-identical to the dot of every tier.
//!
//! Q6_K: the 64 low-nibble bytes of a half block give 64 levels' low bits
//! twice (low nibbles, then high nibbles), and its 32 high-bit bytes, copied
//! into both halves and shifted by a different amount per half, give the top
//! two bits of the same 64 levels: 64 unsigned levels (0..63) per vector, in
//! activation order. `maddubs(q, a)` gives the i16 pair products, then
//! `vpdpwssd` applies the four sub-block scales of the 64 levels: two
//! instructions per (row, token) and 64 levels. The folded lane sums are
//! the AVX2 kernel's, and once the levels' offset comes off each of them as
//! llama.cpp takes it (`q6k_offsets`), so are the results.

use super::tile_blocks::{
    checked_shape, chunks, dispatch, q4k_block_step, q4k_min_products, q4k_store, q4k_sweep, q4k_tokens, q8k_blocks,
    Q4kFactors, Q4K, Q6K, Q6K_CHAIN,
};
use super::{avx2::q6k_offsets, q4k, q6k, q8k};
use crate::shape::{for_each_micro_tile, Shape};
use crate::simd::avx2::{f16_at, hsum};
use crate::simd::avx512::pin;
use crate::types::TileFn;
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Weight rows and tokens of a micro-tile (both types): 16 i32 sum vectors
/// in registers, each decoded row used for eight tokens.
const TILE: (usize, usize) = (2, 8);

/// The AVX-512 tile kernel of `ty`, if there is one (the other types use
/// the AVX2 kernels).
pub(crate) fn tile(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::Q4_K => Some(tile_wrapper::<Q4K>),
        GgmlType::Q6_K => Some(tile_wrapper::<Q6K>),
        _ => None,
    }
}

/// The AVX-512 Q6_K tile kernel with one chain per (row, token).
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
    let (w, a, out) = (w.as_ptr(), a.as_ptr(), out.as_mut_ptr());
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; `checked_shape`
    // verified that `rows` weight rows and `toks` activation rows of `nb`
    // super-blocks each, and `toks` output rows of `rows` floats, lie within
    // the slices at the given strides, which is exactly what the kernel reads
    // and writes.
    unsafe {
        if F == Q4K {
            q4k_sweep_512(shape, w, rows, a, toks, out)
        } else {
            q6k_sweep_512(shape, w, rows, a, toks, out, F == Q6K_CHAIN)
        }
    }
}

/// Calls `$micro` for every micro-tile shape up to `TILE`.
macro_rules! dispatch_tile {
    ($rr:expr, $tt:expr, $micro:ident $args:tt) => {
        dispatch!(
            $rr,
            $tt,
            $micro $args,
            (2, 8),
            (2, 7),
            (2, 6),
            (2, 5),
            (2, 4),
            (2, 3),
            (2, 2),
            (2, 1),
            (1, 8),
            (1, 7),
            (1, 6),
            (1, 5),
            (1, 4),
            (1, 3),
            (1, 2),
            (1, 1)
        )
    };
}

/// # Safety
/// As for `q4k_micro`, for all `rows` and `toks`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_sweep_512(s: Shape, w: *const u8, rows: usize, a: *const u8, toks: usize, out: *mut f32) {
    q4k_sweep(s, w, rows, a, toks, out, TILE, |rr, tt, w, a, out, factors| {
        dispatch_tile!(rr, tt, q4k_micro(s, w, a, out, factors));
    });
}

/// # Safety
/// As for `q6k_micro`, for all `rows` and `toks`.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_sweep_512(s: Shape, w: *const u8, rows: usize, a: *const u8, toks: usize, out: *mut f32, chain: bool) {
    for_each_micro_tile(
        rows,
        toks,
        TILE,
        chunks(&s, TILE),
        |_, _| {},
        |r, rr, t, tt, _| {
            let (w, a, out) = (w.add(r * s.w_stride), a.add(t * s.a_stride), out.add(t * s.out_stride + r));
            dispatch_tile!(rr, tt, q6k_micro(s, w, a, out, chain));
        },
    );
}

/// The Q4_K micro-tile of `R` weight rows by `T` tokens (arguments as for
/// the AVX2 kernel's `q4k_micro`).
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; the `R`
/// weight rows and `T` activation rows of `s.nb` super-blocks and the
/// `R * s.nb` factors must be readable and the `R x T` outputs writable.
// The loops walk several per-row and per-token arrays in step.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q4k_micro<const R: usize, const T: usize>(
    s: Shape,
    w: *const u8,
    a: *const u8,
    out: *mut f32,
    factors: *const Q4kFactors,
) {
    const PAIRS: usize = TILE.1.div_ceil(2);
    const GROUPS: usize = TILE.1.div_ceil(4);
    let nibble = _mm512_set1_epi8(0x0F);
    // The upper half shifts by four: the high nibbles.
    let shifts = _mm512_inserti64x4::<1>(_mm512_setzero_si512(), _mm256_set1_epi16(4));
    // The portable dot's running sums, per group of four tokens: lane `4 r + t`.
    let mut acc = [_mm256_setzero_ps(); GROUPS];
    for b in 0..s.nb {
        let tokens = q4k_tokens::<T, PAIRS>(&s, a, b);
        let f: [&Q4kFactors; R] = std::array::from_fn(|r| &*factors.add(r * s.nb + b));
        let mut sumi = [[_mm512_setzero_si512(); T]; R];
        for c in 0..4 {
            // Scale 2c in the lower sixteen i16 lanes, 2c + 1 in the upper.
            let pick = _mm512_inserti64x4::<1>(_mm512_set1_epi16(2 * c as i16), _mm256_set1_epi16(2 * c as i16 + 1));
            let mut levels = [_mm512_setzero_si512(); R];
            let mut scales = [_mm512_setzero_si512(); R];
            for r in 0..R {
                let bits = _mm256_loadu_si256(w.add(r * s.w_stride + b * q4k::BYTES + q4k::QS + 32 * c).cast());
                levels[r] = _mm512_and_si512(_mm512_srlv_epi16(_mm512_broadcast_i64x4(bits), shifts), nibble);
                scales[r] = _mm512_permutexvar_epi16(pick, _mm512_castsi256_si512(f[r].scales));
            }
            for t in 0..T {
                let q8 = _mm512_loadu_si512(tokens.ab[t].add(q8k::QS + 64 * c).cast());
                for r in 0..R {
                    sumi[r][t] = _mm512_dpwssd_epi32(sumi[r][t], _mm512_maddubs_epi16(levels[r], q8), scales[r]);
                }
            }
            for r in 0..R {
                pin(&mut sumi[r]);
            }
        }
        for (g, acc) in acc.iter_mut().enumerate().take(T.div_ceil(4)) {
            // The halves folded: the eight lanes the AVX2 kernels sum (exact either way).
            let mut folded = [[_mm256_setzero_si256(); 4]; 2];
            for r in 0..R {
                for t in 4 * g..T.min(4 * g + 4) {
                    let v = sumi[r][t];
                    folded[r][t - 4 * g] =
                        _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
                }
            }
            let mins = q4k_min_products(&f, &tokens, 2 * g);
            *acc = q4k_block_step(*acc, &folded, &mins, &f, tokens.d_a[g]);
        }
    }
    for (g, acc) in acc.iter().enumerate().take(T.div_ceil(4)) {
        q4k_store::<R, T>(&s, out, *acc, 4 * g);
    }
}

/// The Q6_K micro-tile of `R` weight rows by `T` tokens (see the module docs).
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; the `R`
/// weight rows and `T` activation rows of `s.nb` super-blocks must be
/// readable and the `R x T` outputs writable.
// The loops walk several per-row and per-token arrays in step.
#[allow(clippy::needless_range_loop)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn q6k_micro<const R: usize, const T: usize>(s: Shape, w: *const u8, a: *const u8, out: *mut f32, chain: bool) {
    // With `chain`, one f32 chain per (row, token), as the AVX2 kernel's:
    // lane `t` of `chains[r]` is pair (r, t), all eight tokens updated at once.
    let mut chains = [_mm256_setzero_ps(); R];
    let nibble = _mm512_set1_epi8(0x0F);
    let two_bits = _mm512_set1_epi8(0x30);
    let halves = |lower: i16, upper: i16| _mm512_inserti64x4::<1>(_mm512_set1_epi16(lower), _mm256_set1_epi16(upper));
    // The high bits of levels 0..32 and 32..64 of a half sit at bits 0-1 and
    // 2-3 of its `qh` bytes, of levels 64..96 and 96..128 at bits 4-5 and 6-7:
    // shifts that bring them to bits 4-5, per vector half.
    let (high_up, high_down) = (halves(4, 2), halves(0, 2));
    // i16 lane `i` of a 64-level chunk belongs to sub-block `i / 8` of the chunk.
    let lane_sub_block = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)),
        _mm256_setr_epi16(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
    );
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..s.nb {
        let (ab, d_a) = q8k_blocks::<T>(&s, a, b);
        let mut wb = [w; R];
        let mut sub_scales = [_mm512_setzero_si512(); R];
        for r in 0..R {
            wb[r] = w.add(r * s.w_stride + b * q6k::BYTES);
            let bytes = _mm_loadu_si128(wb[r].add(q6k::SCALES).cast());
            sub_scales[r] = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(bytes));
        }
        let mut sumi = [[_mm512_setzero_si512(); T]; R];
        for half in 0..2 {
            for c in 0..2 {
                let pick = _mm512_add_epi16(lane_sub_block, _mm512_set1_epi16((8 * half + 4 * c) as i16));
                let mut levels = [_mm512_setzero_si512(); R];
                let mut scales = [_mm512_setzero_si512(); R];
                for r in 0..R {
                    let low = _mm512_loadu_si512(wb[r].add(64 * half).cast());
                    let low = if c == 0 { low } else { _mm512_srli_epi16::<4>(low) };
                    let high = _mm512_broadcast_i64x4(_mm256_loadu_si256(wb[r].add(q6k::QH + 32 * half).cast()));
                    let high =
                        if c == 0 { _mm512_sllv_epi16(high, high_up) } else { _mm512_srlv_epi16(high, high_down) };
                    levels[r] = _mm512_or_si512(_mm512_and_si512(low, nibble), _mm512_and_si512(high, two_bits));
                    scales[r] = _mm512_permutexvar_epi16(pick, sub_scales[r]);
                }
                for t in 0..T {
                    let q8 = _mm512_loadu_si512(ab[t].add(q8k::QS + 128 * half + 64 * c).cast());
                    for r in 0..R {
                        let products = _mm512_maddubs_epi16(levels[r], q8);
                        sumi[r][t] = _mm512_dpwssd_epi32(sumi[r][t], products, scales[r]);
                    }
                }
                for r in 0..R {
                    pin(&mut sumi[r]);
                }
            }
        }
        // The tokens' scales side by side (lanes past `T` unused).
        let d_a_tokens = _mm256_setr_ps(
            _mm256_cvtss_f32(d_a[0]),
            _mm256_cvtss_f32(d_a[1.min(T - 1)]),
            _mm256_cvtss_f32(d_a[2.min(T - 1)]),
            _mm256_cvtss_f32(d_a[3.min(T - 1)]),
            _mm256_cvtss_f32(d_a[4.min(T - 1)]),
            _mm256_cvtss_f32(d_a[5.min(T - 1)]),
            _mm256_cvtss_f32(d_a[6.min(T - 1)]),
            _mm256_cvtss_f32(d_a[7.min(T - 1)]),
        );
        for r in 0..R {
            let d_w = _mm256_set1_ps(f16_at(std::slice::from_raw_parts(wb[r], q6k::BYTES), q6k::D));
            let mut folded = [_mm256_setzero_si256(); 8];
            for t in 0..T {
                let v = sumi[r][t];
                let f = _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v));
                folded[t] = _mm256_sub_epi32(f, q6k_offsets(wb[r], ab[t]));
            }
            if chain {
                // Each pair's exact super-block sum (lane t: token t), then
                // the AVX2 kernel's step `fma(isum * d_w, d_a, chain)` for
                // all tokens at once: the same roundings, lane by lane.
                let isum = _mm256_cvtepi32_ps(sum_lanes_of_eight(&folded));
                chains[r] = _mm256_fmadd_ps(_mm256_mul_ps(isum, d_w), d_a_tokens, chains[r]);
            } else {
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(_mm256_mul_ps(d_a[t], d_w), _mm256_cvtepi32_ps(folded[t]), acc[r][t]);
                }
            }
        }
    }
    for r in 0..R {
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), chains[r]);
        for t in 0..T {
            *out.add(t * s.out_stride + r) = if chain { lanes[t] } else { hsum(acc[r][t]) };
        }
    }
}

/// Lane `t`: the sum of the eight i32 lanes of `v[t]` (exact, so in any order).
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sum_lanes_of_eight(v: &[__m256i; 8]) -> __m256i {
    // Two rounds of pairwise horizontal adds leave, in each 128-bit half,
    // four tokens' partial sums (tokens 0-3 in `ab`, 4-7 in `cd`: one half
    // from the inputs' lower lanes, one from their upper lanes); the halves
    // then add across.
    let a = _mm256_hadd_epi32(v[0], v[1]);
    let b = _mm256_hadd_epi32(v[2], v[3]);
    let c = _mm256_hadd_epi32(v[4], v[5]);
    let d = _mm256_hadd_epi32(v[6], v[7]);
    let ab = _mm256_hadd_epi32(a, b);
    let cd = _mm256_hadd_epi32(c, d);
    // ab: [t0 t1 t2 t3 (lower halves) | t0 t1 t2 t3 (upper halves)], cd likewise for t4..t7.
    let lower = _mm256_permute2x128_si256::<0x20>(ab, cd);
    let upper = _mm256_permute2x128_si256::<0x31>(ab, cd);
    _mm256_add_epi32(lower, upper)
}
