//! AVX2 + FMA + F16C tile kernels for Q4_K and Q6_K weights against Q8_K
//! activations.
//!
//! Per super-block, each weight row's scales are unpacked and its levels
//! decoded once, then multiplied with the activation quants of every token of
//! the micro-tile. Each (row, token) pair keeps its own i32 super-block sum
//! and f32 accumulators, built with the same integer products, the same
//! `d_a * d_w` (and `-d_a * dmin_w`) factors, the same FMAs and the same final
//! reductions as the plain AVX2 dot, so results are bit-identical to it.

use super::{check_tile, Shape, TileFn};
use crate::kquants::avx2::{f16_at, hsum_128, hsum_256, load, min_products};
use crate::kquants::{q4k, q6k, q8k, unpack_scales_mins, QK_K};
use crate::GgmlType;
use std::arch::x86_64::*;

/// Weight rows per micro-tile.
const ROWS: usize = 2;
/// Tokens per micro-tile: the 2 x 4 i32 super-block sums stay in registers
/// beside one row's decoded levels and scales.
const TOKS: usize = 4;
/// Bytes of weight rows swept by one chunk of tokens (fits in L2).
const ROW_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of activation rows in one chunk of tokens.
const TOK_CHUNK_BYTES: usize = 128 * 1024;

const Q4K: u8 = 0;
const Q6K: u8 = 1;

/// The AVX2 tile kernel of `ty`, if there is one.
pub(super) fn tile(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::Q4_K => Some(tile_wrapper::<Q4K>),
        GgmlType::Q6_K => Some(tile_wrapper::<Q6K>),
        _ => None,
    }
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
    let ty = if F == Q4K { GgmlType::Q4_K } else { GgmlType::Q6_K };
    check_tile(ty, GgmlType::Q8_K, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    if rows == 0 || toks == 0 {
        return;
    }
    let shape = Shape { nb: n / QK_K, w_stride: w_row_bytes, a_stride: a_row_bytes, out_stride };
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA and F16C; `check_tile` verified that `rows` weight rows
    // and `toks` activation rows of `nb` super-blocks each, and `rows` output
    // rows of `toks` floats, lie within the slices at the given strides, which
    // is exactly what the kernel reads and writes.
    unsafe { sweep::<F>(shape, w.as_ptr(), rows, a.as_ptr(), toks, out.as_mut_ptr()) }
}

/// Visits the whole `rows x toks` tile in cache-sized chunks of micro-tiles.
///
/// # Safety
/// As for `micro`, for all `rows` and `toks`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const F: u8>(s: Shape, w: *const u8, rows: usize, a: *const u8, toks: usize, out: *mut f32) {
    let row_chunk = (ROW_CHUNK_BYTES / s.w_stride.max(1)).max(1).div_ceil(ROWS) * ROWS;
    let tok_chunk = (TOK_CHUNK_BYTES / s.a_stride.max(1)).max(1).div_ceil(TOKS) * TOKS;
    for t_chunk in (0..toks).step_by(tok_chunk) {
        let t_chunk_end = toks.min(t_chunk + tok_chunk);
        for r_chunk in (0..rows).step_by(row_chunk) {
            let r_chunk_end = rows.min(r_chunk + row_chunk);
            for t in (t_chunk..t_chunk_end).step_by(TOKS) {
                let tt = TOKS.min(t_chunk_end - t);
                for r in (r_chunk..r_chunk_end).step_by(ROWS) {
                    let rr = ROWS.min(r_chunk_end - r);
                    let (w, a, out) = (w.add(r * s.w_stride), a.add(t * s.a_stride), out.add(r * s.out_stride + t));
                    macro_rules! dispatch {
                        ($(($r:literal, $t:literal)),*) => {
                            match (rr, tt) {
                                $(($r, $t) => micro::<F, $r, $t>(s, w, a, out),)*
                                _ => unreachable!("micro-tile of {rr} x {tt} is larger than {ROWS} x {TOKS}"),
                            }
                        };
                    }
                    dispatch!((2, 4), (2, 3), (2, 2), (2, 1), (1, 4), (1, 3), (1, 2), (1, 1));
                }
            }
        }
    }
}

/// The whole Q8_K block at `p` as a slice.
///
/// # Safety
/// `p` must point to a readable Q8_K block.
#[inline(always)]
unsafe fn q8k_block<'a>(p: *const u8) -> &'a [u8] {
    std::slice::from_raw_parts(p, q8k::BYTES)
}

/// One micro-tile of `R` weight rows (at `w`, `s.w_stride` apart) by `T`
/// tokens (at `a`, `s.a_stride` apart), written to `out` (`s.out_stride` apart).
///
/// # Safety
/// AVX2, FMA and F16C must be available; the `R` weight rows and `T`
/// activation rows of `s.nb` super-blocks must be readable and the `R x T`
/// outputs writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro<const F: u8, const R: usize, const T: usize>(s: Shape, w: *const u8, a: *const u8, out: *mut f32) {
    let w_bytes = if F == Q4K { q4k::BYTES } else { q6k::BYTES };
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    let mut acc_min = [[_mm_setzero_ps(); T]; R];
    for b in 0..s.nb {
        let mut ab = [a; T];
        let mut d_a = [0.0f32; T];
        for t in 0..T {
            ab[t] = a.add(t * s.a_stride + b * q8k::BYTES);
            d_a[t] = q8k::block_scale(q8k_block(ab[t]));
        }
        let mut wb = [w; R];
        for (r, wb_r) in wb.iter_mut().enumerate() {
            *wb_r = w.add(r * s.w_stride + b * w_bytes);
        }
        let (sumi, d_w) =
            if F == Q4K { q4k_sums::<R, T>(&wb, &ab, &d_a, &mut acc_min) } else { q6k_sums::<R, T>(&wb, &ab) };
        for r in 0..R {
            for t in 0..T {
                let d = _mm256_set1_ps(d_a[t] * d_w[r]);
                acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sumi[r][t]), acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            let mut v = hsum_256(acc[r][t]);
            if F == Q4K {
                v += hsum_128(acc_min[r][t]);
            }
            *out.add(r * s.out_stride + t) = v;
        }
    }
}

/// The i32 super-block sums of one Q4_K block per pair, and each row's `d`;
/// adds the pairs' minimum terms to `acc_min`.
///
/// # Safety
/// As for `micro`, for the blocks at `wb` and `ab`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_sums<const R: usize, const T: usize>(
    wb: &[*const u8; R],
    ab: &[*const u8; T],
    d_a: &[f32; T],
    acc_min: &mut [[__m128; T]; R],
) -> ([[__m256i; T]; R], [f32; R]) {
    let nibble = _mm256_set1_epi8(0x0F);
    let mut d_w = [0.0f32; R];
    let mut scales = [[0u8; 8]; R];
    for r in 0..R {
        let block = std::slice::from_raw_parts(wb[r], q4k::BYTES);
        d_w[r] = f16_at(block, 0);
        let dmin = f16_at(block, 2);
        let (sc, mins) = unpack_scales_mins(&block[q4k::SCALES..q4k::QS]);
        scales[r] = sc;
        for t in 0..T {
            let neg_dmin = -d_a[t] * dmin;
            let mins_i32 = _mm_cvtepi32_ps(min_products(&mins, q8k_block(ab[t])));
            acc_min[r][t] = _mm_fmadd_ps(_mm_set1_ps(neg_dmin), mins_i32, acc_min[r][t]);
        }
    }
    let mut sumi = [[_mm256_setzero_si256(); T]; R];
    for c in 0..4 {
        for r in 0..R {
            let bits = load(wb[r].add(q4k::QS + 32 * c));
            let lo = _mm256_and_si256(bits, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), nibble);
            let s_lo = _mm256_set1_epi16(scales[r][2 * c] as i16);
            let s_hi = _mm256_set1_epi16(scales[r][2 * c + 1] as i16);
            for t in 0..T {
                let q8 = ab[t].add(q8k::QS + 64 * c);
                let p_lo = _mm256_madd_epi16(s_lo, _mm256_maddubs_epi16(lo, load(q8)));
                let p_hi = _mm256_madd_epi16(s_hi, _mm256_maddubs_epi16(hi, load(q8.add(32))));
                sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_add_epi32(p_lo, p_hi));
            }
        }
    }
    (sumi, d_w)
}

/// The i32 super-block sums of one Q6_K block per pair, and each row's `d`.
///
/// # Safety
/// As for `micro`, for the blocks at `wb` and `ab`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_sums<const R: usize, const T: usize>(
    wb: &[*const u8; R],
    ab: &[*const u8; T],
) -> ([[__m256i; T]; R], [f32; R]) {
    let nibble = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(0x30);
    let offset = _mm256_set1_epi8(32);
    // Byte pattern selecting scale s for the low 16 lanes and s + 1 for the high 16.
    let scale_pair = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut d_w = [0.0f32; R];
    let mut scales = [_mm_setzero_si128(); R];
    for r in 0..R {
        d_w[r] = f16_at(std::slice::from_raw_parts(wb[r], q6k::BYTES), q6k::D);
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
                let sc =
                    _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales[r], _mm_add_epi8(scale_pair, _mm_set1_epi8(step))));
                for t in 0..T {
                    let a8 = load(ab[t].add(q8k::QS + 128 * half + 32 * k));
                    // (q - 32) * a as q * a - 32 * a: both products fit i16 pair sums.
                    let p = _mm256_sub_epi16(_mm256_maddubs_epi16(q, a8), _mm256_maddubs_epi16(offset, a8));
                    sumi[r][t] = _mm256_add_epi32(sumi[r][t], _mm256_madd_epi16(sc, p));
                }
            }
        }
    }
    (sumi, d_w)
}
