//! AVX2 + FMA + F16C GEMV kernels for the 32-element block formats, and
//! their widening to a few tokens (`few_tokens`: the rows of a batched
//! decode step, one token per sequence).
//!
//! Rows are taken four at a time. Per block, the activation quants and scale
//! are loaded once; the four weight scales are converted together and
//! multiplied by the activation scale in one instruction (the same f32
//! products `d_w * d_a` as the plain dot's); each row's integer lane sums are
//! converted and fused-multiply-added into that row's accumulator.
//!
//! The integer lane sums equal the plain dot's exactly. For Q4_0 and Q5_0,
//! whose levels are `q - 8` and `q - 16`, the kernels multiply the unsigned
//! `q` and subtract `8 * sum(a)` (`16 * sum(a)`) per lane, computed once per
//! activation block, instead of moving signs per row: the same integers with
//! fewer instructions per row.
//!
//! With several tokens, each row's block is decoded once and multiplied
//! with every token's quants; per (row, token) pair the work is the plain
//! dot's own (integer sums, conversion, one FMA with the pair's scale), so
//! the results are still bit-identical to it.

use super::format::{act_type, has_min, weight_block_bytes, weight_type, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{Q8_0_BYTES, Q8_1_BYTES};
use crate::shape::{in_groups_of_four, Shape};
use crate::simd::avx2::{hsum, load_bit_mask, load_nibbles};
use crate::types::GemvFn;
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Rows per pass.
const ROWS: usize = 4;

/// The AVX2 GEMV kernel of `ty`, if there is one.
pub(crate) fn gemv(ty: GgmlType) -> Option<GemvFn> {
    match ty {
        GgmlType::Q4_0 => Some(gemv_wrapper::<Q4_0>),
        GgmlType::Q4_1 => Some(gemv_wrapper::<Q4_1>),
        GgmlType::Q5_0 => Some(gemv_wrapper::<Q5_0>),
        GgmlType::Q5_1 => Some(gemv_wrapper::<Q5_1>),
        GgmlType::Q8_0 => Some(gemv_wrapper::<Q8_0>),
        _ => None,
    }
}

/// The offset subtracted from the unsigned level `q` (0 where levels are used as stored).
const fn level_offset(f: u8) -> i8 {
    match f {
        Q4_0 => 8,
        Q5_0 => 16,
        _ => 0,
    }
}

fn gemv_wrapper<const F: u8>(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
    let (ty, act_ty) = (weight_type(F), act_type(F));
    let kernels = [rows_avx2::<F, 1>, rows_avx2::<F, 2>, rows_avx2::<F, 3>, rows_avx2::<F, ROWS>];
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA and F16C.
    unsafe { in_groups_of_four(ty, act_ty, kernels, n, w, w_row_bytes, rows, a, out) }
}

/// The most tokens [`few_tokens`] takes; more go to the chunked tile, whose
/// reuse of each activation block across rows pays off from there.
pub(crate) const FEW_TOKENS_MAX: usize = 8;
/// The most tokens of one pass over a group of rows.
const PASS_TOKENS: usize = 4;
/// f32 per block in the activation table: token t's `d_a` at `t`, its
/// `s_a` at `FEW_TOKENS_MAX + t` (formats with a minimum).
const TABLE_STRIDE: usize = 2 * FEW_TOKENS_MAX;
/// i32 per block in the correction table: token t's eight lanes of
/// `level_offset * sum4(a)` at `8 * t`.
const CORRECTION_STRIDE: usize = 8 * FEW_TOKENS_MAX;

/// How `toks` tokens split into passes over each group of rows. Four rows
/// by four tokens hold sixteen accumulators, every vector register, so some
/// spill; one such pass still measured faster (Zen 3) than two passes of
/// two, which decode every weight block twice, or three rows by four.
const fn passes(toks: usize) -> &'static [usize] {
    match toks {
        0 => &[],
        1 => &[1],
        2 => &[2],
        3 => &[3],
        4 => &[4],
        5 => &[3, 2],
        6 => &[3, 3],
        7 => &[4, 3],
        _ => &[4, 4],
    }
}

/// Every row of `shape` against `toks` (at most [`FEW_TOKENS_MAX`])
/// activation rows: the rows of a batched decode step, one token per
/// sequence. The tokens' scales (and, for Q4_0 and Q5_0, their level
/// corrections) are converted once for all rows; each group of rows is then
/// decoded once per pass and multiplied with every token of the pass. Per
/// (row, token) pair the arithmetic is the plain dot's, so each result is
/// the dot's bit for bit.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` weight rows and `toks`
/// activation rows of `shape.nb` blocks must be readable at the strides,
/// and `toks` output rows of `rows` floats writable.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn few_tokens<const F: u8>(
    shape: Shape,
    w: *const u8,
    rows: usize,
    a: *const u8,
    toks: usize,
    out: *mut f32,
) {
    debug_assert!(toks <= FEW_TOKENS_MAX);
    let Shape { nb, w_stride, a_stride, out_stride } = shape;
    let corrections = if level_offset(F) != 0 { nb * CORRECTION_STRIDE } else { 0 };
    let (table_len, products_len) = (nb * TABLE_STRIDE, nb * PRODUCTS_STRIDE);
    // Every element read is written first: no fill needed.
    crate::scratch::with_f32_unfilled(table_len + products_len, |buf| {
        let (table, products) = buf.split_at_mut(table_len);
        let products = products.as_mut_ptr();
        crate::scratch::with_i32(corrections, 0, |correction| {
            fill_tables::<F>(nb, a, a_stride, toks, table, correction);
            for r in (0..rows).step_by(ROWS) {
                let rr = (rows - r).min(ROWS);
                let mut t = 0;
                for &tt in passes(toks) {
                    let (w, a, out) = (w.add(r * w_stride), a.add(t * a_stride), out.add(t * out_stride + r));
                    let tables =
                        Tables { scales: table.as_ptr().add(t), correction: correction.as_ptr().wrapping_add(8 * t) };
                    const { assert!(ROWS == 4 && PASS_TOKENS == 4, "by_size_4x4 lists the 4 x 4 sizes") };
                    by_size_4x4!(
                        rr,
                        tt,
                        tokens_avx2::<F>(nb, w, w_stride, a, a_stride, tables, products, out, out_stride)
                    );
                    t += tt;
                }
            }
        })
    })
}

/// The activation tables of a pass (see [`TABLE_STRIDE`],
/// [`CORRECTION_STRIDE`]), from its first token on.
#[derive(Clone, Copy)]
struct Tables {
    scales: *const f32,
    correction: *const i32,
}

/// Converts every token's block scales (`d_a`, and `s_a` for the formats
/// with a minimum) into `table` and, for the formats with a level offset,
/// its lanes' corrections into `correction`.
///
/// # Safety
/// As for `few_tokens`; `table` and `correction` have the lengths it gives them.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fill_tables<const F: u8>(
    nb: usize,
    a: *const u8,
    a_stride: usize,
    toks: usize,
    table: &mut [f32],
    correction: &mut [i32],
) {
    let a_bytes = if has_min(F) { Q8_1_BYTES } else { Q8_0_BYTES };
    let a_quants = if has_min(F) { 4 } else { 2 };
    let ones = _mm256_set1_epi16(1);
    for t in 0..toks {
        for b in 0..nb {
            let ab = a.add(t * a_stride + b * a_bytes);
            let at = b * TABLE_STRIDE + t;
            table[at] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(f16_bits(ab) as i32)));
            if has_min(F) {
                table[at + FEW_TOKENS_MAX] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(f16_bits(ab.add(2)) as i32)));
            }
            if level_offset(F) != 0 {
                let qa = _mm256_loadu_si256(ab.add(a_quants).cast());
                let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(level_offset(F)), qa), ones);
                let at = b * CORRECTION_STRIDE + 8 * t;
                _mm256_storeu_si256(correction[at..at + 8].as_mut_ptr().cast(), sums);
            }
        }
    }
}

/// The weight levels of the block at `wb` as unsigned bytes: Q8_0's
/// magnitudes `|q|` (its signs move onto the activations), the others'
/// stored levels `q` (their offset, where they have one, is taken off the
/// sums after).
///
/// # Safety
/// AVX2 must be available and the block at `wb` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unsigned_levels<const F: u8>(wb: *const u8) -> __m256i {
    match F {
        Q8_0 => {
            let qw = _mm256_loadu_si256(wb.add(2).cast());
            _mm256_sign_epi8(qw, qw)
        }
        Q4_0 => load_nibbles(wb.add(2)),
        Q4_1 => load_nibbles(wb.add(4)),
        Q5_0 => {
            _mm256_or_si256(load_nibbles(wb.add(6)), _mm256_and_si256(load_bit_mask(wb.add(2)), _mm256_set1_epi8(0x10)))
        }
        _ => {
            _mm256_or_si256(load_nibbles(wb.add(8)), _mm256_and_si256(load_bit_mask(wb.add(4)), _mm256_set1_epi8(0x10)))
        }
    }
}

/// f32 per block in a call's product table: for token t, the `d_w * d_a`
/// products of its rows at `t * ROWS + r`.
const PRODUCTS_STRIDE: usize = ROWS * PASS_TOKENS;

/// `R` rows at `w` (`stride` bytes apart) against `T` tokens at `a`
/// (`a_stride` apart) whose scales and corrections `tables` holds; the
/// result of row `r` and token `t` goes to `out[t * out_stride + r]`.
///
/// Two passes over the blocks: the scales first (each pair's `d_w * d_a`
/// into `products`, the minimum terms' FMA chains), then the quants, whose
/// loop then keeps only its `R x T` accumulators across blocks.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `R` weight rows and `T`
/// activation rows of `nb` blocks must be readable, the tables filled for
/// them, `products` `nb * PRODUCTS_STRIDE` floats long, and the `R x T`
/// outputs writable.
#[inline]
#[allow(clippy::needless_range_loop)] // (row, token) indices read clearest here
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tokens_avx2<const F: u8, const R: usize, const T: usize>(
    nb: usize,
    w: *const u8,
    stride: usize,
    a: *const u8,
    a_stride: usize,
    tables: Tables,
    products: *mut f32,
    out: *mut f32,
    out_stride: usize,
) {
    let (w_bytes, a_bytes) = (weight_block_bytes(F), if has_min(F) { Q8_1_BYTES } else { Q8_0_BYTES });
    let a_quants = if has_min(F) { 4 } else { 2 };
    // Lane r of `mins[t]`: the minimum terms m_w * s_a of row r and token t,
    // one FMA chain per pair as in the plain dot.
    let mut mins = [_mm_setzero_ps(); T];
    for b in 0..nb {
        let (d_bits, m_bits) = scale_bits::<F, R>(w, stride, b);
        let d_w = _mm_cvtph_ps(_mm_cvtsi64_si128(d_bits as i64));
        let scales = tables.scales.add(b * TABLE_STRIDE);
        for t in 0..T {
            let d_a = _mm_broadcast_ss(&*scales.add(t));
            _mm_storeu_ps(products.add(b * PRODUCTS_STRIDE + t * ROWS), _mm_mul_ps(d_w, d_a));
        }
        if has_min(F) {
            let m_w = _mm_cvtph_ps(_mm_cvtsi64_si128(m_bits as i64));
            for t in 0..T {
                mins[t] = _mm_fmadd_ps(m_w, _mm_broadcast_ss(&*scales.add(FEW_TOKENS_MAX + t)), mins[t]);
            }
        }
    }

    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..nb {
        // The next group's rows, fetched a share per block (see `rows_avx2`).
        prefetch_next_pass_share(w, stride, nb, b, w_bytes);
        let block_products = products.add(b * PRODUCTS_STRIDE);
        for r in 0..R {
            let wb = w.add(r * stride + b * w_bytes);
            let unsigned = unsigned_levels::<F>(wb);
            let qw = if F == Q8_0 { _mm256_loadu_si256(wb.add(2).cast()) } else { unsigned };
            for t in 0..T {
                let qa = _mm256_loadu_si256(a.add(t * a_stride + b * a_bytes + a_quants).cast());
                let signed = if F == Q8_0 { _mm256_sign_epi8(qa, qw) } else { qa };
                let mut sums = _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), ones);
                if level_offset(F) != 0 {
                    let correction = tables.correction.add(b * CORRECTION_STRIDE + 8 * t);
                    sums = _mm256_sub_epi32(sums, _mm256_loadu_si256(correction.cast()));
                }
                let scale = _mm256_broadcast_ss(&*block_products.add(t * ROWS + r));
                acc[r][t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r][t]);
            }
        }
    }
    for t in 0..T {
        let mut m = [0f32; ROWS];
        _mm_storeu_ps(m.as_mut_ptr(), mins[t]);
        for r in 0..R {
            let mut v = hsum(acc[r][t]);
            if has_min(F) {
                v += m[r];
            }
            *out.add(t * out_stride + r) = v;
        }
    }
}

/// The f16 at `p` (any alignment) as raw bits.
///
/// # Safety
/// Two bytes at `p` must be readable.
#[inline(always)]
unsafe fn f16_bits(p: *const u8) -> u64 {
    u16::from_le_bytes(p.cast::<[u8; 2]>().read_unaligned()) as u64
}

/// Lane `r` of `v` in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn lane(v: __m128, r: usize) -> __m256 {
    _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set1_epi32(r as i32))
}

/// The f16 scales `d` (and minimums `m`, for the formats with one) of
/// block `b` of `R` rows at `w`, `stride` apart: row `r`'s in bits
/// `16 * r ..`, for one conversion of all of them.
///
/// # Safety
/// Block `b` of each of the `R` rows must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scale_bits<const F: u8, const R: usize>(w: *const u8, stride: usize, b: usize) -> (u64, u64) {
    let (mut d_bits, mut m_bits) = (0u64, 0u64);
    for r in 0..R {
        let wb = w.add(r * stride + b * weight_block_bytes(F));
        d_bits |= f16_bits(wb) << (16 * r);
        if has_min(F) {
            m_bits |= f16_bits(wb.add(2)) << (16 * r);
        }
    }
    (d_bits, m_bits)
}

/// Block `b`'s share of the next pass's rows (the `ROWS` rows after those
/// at `w`, `stride` apart, `nb` blocks of `w_bytes` each), as prefetch
/// hints (see `rows_avx2`). Only hint addresses are computed: wrapping
/// arithmetic, and prefetches never fault.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn prefetch_next_pass_share(w: *const u8, stride: usize, nb: usize, b: usize, w_bytes: usize) {
    let next_pass = w.wrapping_add(ROWS.wrapping_mul(stride));
    let per_block = ROWS.wrapping_mul(stride) / nb.max(1);
    let share = next_pass.wrapping_add(b.wrapping_mul(per_block));
    for line in 0..(ROWS * w_bytes).div_ceil(64) {
        _mm_prefetch::<_MM_HINT_T0>(share.wrapping_add(64 * line).cast());
    }
}

/// `R` (at most 4) rows at `w`, `stride` bytes apart, against the activation row at `a`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `R` weight rows and one activation
/// row of `nb` blocks must be readable, `R` floats at `out` writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<const F: u8, const R: usize>(nb: usize, w: *const u8, stride: usize, a: *const u8, out: *mut f32) {
    let (w_bytes, a_bytes) = (weight_block_bytes(F), if has_min(F) { Q8_1_BYTES } else { Q8_0_BYTES });
    let a_quants = if has_min(F) { 4 } else { 2 };
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); R];
    // Lane r: the minimum terms m_w * s_a of row r, one FMA chain as in the plain dot.
    let mut offsets = _mm_setzero_ps();
    // Decoding streams weights from memory, and four rows walked side by
    // side are four short streams that the hardware prefetcher follows
    // poorly. The next pass's rows usually form one contiguous span of
    // `ROWS * stride` bytes: each block fetches its equal share of it, in
    // order, so that many misses are in flight in one sequential stream.
    // Only hint addresses are computed here (wrapping arithmetic keeps an
    // absurd single-row stride from overflowing); past the last row the
    // hints are dropped, and prefetches never fault.
    for b in 0..nb {
        prefetch_next_pass_share(w, stride, nb, b, w_bytes);
        let ab = a.add(b * a_bytes);
        let qa = _mm256_loadu_si256(ab.add(a_quants).cast());
        let (d_bits, m_bits) = scale_bits::<F, R>(w, stride, b);
        let d_a = _mm_cvtph_ps(_mm_cvtsi32_si128(f16_bits(ab) as i32));
        let scales = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi64_si128(d_bits as i64)), _mm_broadcastss_ps(d_a));
        if has_min(F) {
            let s_a = _mm_cvtph_ps(_mm_cvtsi32_si128(f16_bits(ab.add(2)) as i32));
            let m_w = _mm_cvtph_ps(_mm_cvtsi64_si128(m_bits as i64));
            offsets = _mm_fmadd_ps(m_w, _mm_broadcastss_ps(s_a), offsets);
        }
        // level_offset * (sum of each lane's four activation quants).
        let correction = if level_offset(F) != 0 {
            _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(level_offset(F)), qa), ones)
        } else {
            _mm256_setzero_si256()
        };
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wb = w.add(r * stride + b * w_bytes);
            let sums = match F {
                Q8_0 => {
                    let qw = _mm256_loadu_si256(wb.add(2).cast());
                    let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qa, qw));
                    _mm256_madd_epi16(pairs, ones)
                }
                _ => {
                    let q = unsigned_levels::<F>(wb);
                    let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(q, qa), ones);
                    if level_offset(F) != 0 {
                        _mm256_sub_epi32(sums, correction)
                    } else {
                        sums
                    }
                }
            };
            *acc_r = _mm256_fmadd_ps(lane(scales, r), _mm256_cvtepi32_ps(sums), *acc_r);
        }
    }
    let mut mins = [0f32; 4];
    _mm_storeu_ps(mins.as_mut_ptr(), offsets);
    for (r, acc_r) in acc.iter().enumerate() {
        let mut v = hsum(*acc_r);
        if has_min(F) {
            v += mins[r];
        }
        *out.add(r) = v;
    }
}
