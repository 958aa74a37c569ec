//! AVX2 + FMA + F16C GEMV kernels for the 32-element block formats.
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

use super::format::{act_type, has_min, weight_block_bytes, weight_type, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0};
use super::{Q8_0_BYTES, Q8_1_BYTES};
use crate::shape::in_groups_of_four;
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
    let next_pass = w.wrapping_add(ROWS.wrapping_mul(stride));
    let per_block = ROWS.wrapping_mul(stride) / nb.max(1);
    for b in 0..nb {
        let share = next_pass.wrapping_add(b.wrapping_mul(per_block));
        for line in 0..(ROWS * w_bytes).div_ceil(64) {
            _mm_prefetch::<_MM_HINT_T0>(share.wrapping_add(64 * line).cast());
        }
        let ab = a.add(b * a_bytes);
        let qa = _mm256_loadu_si256(ab.add(a_quants).cast());
        let mut d_bits = 0u64;
        let mut m_bits = 0u64;
        for r in 0..R {
            let wb = w.add(r * stride + b * w_bytes);
            d_bits |= f16_bits(wb) << (16 * r);
            if has_min(F) {
                m_bits |= f16_bits(wb.add(2)) << (16 * r);
            }
        }
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
                    let q = match F {
                        Q4_0 => load_nibbles(wb.add(2)),
                        Q4_1 => load_nibbles(wb.add(4)),
                        Q5_0 => _mm256_or_si256(
                            load_nibbles(wb.add(6)),
                            _mm256_and_si256(load_bit_mask(wb.add(2)), _mm256_set1_epi8(0x10)),
                        ),
                        _ => _mm256_or_si256(
                            load_nibbles(wb.add(8)),
                            _mm256_and_si256(load_bit_mask(wb.add(4)), _mm256_set1_epi8(0x10)),
                        ),
                    };
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
