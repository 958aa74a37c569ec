//! AVX2 + FMA + F16C GEMV kernels for Q4_K and Q6_K weights against Q8_K
//! activations.
//!
//! Rows are taken four at a time. Per super-block, the work that depends only
//! on the activation is done once for all rows: its quants are loaded once
//! and shared, its group sums are paired once (the Q4_K minimum terms), and
//! `32 * a` is multiplied out once (the Q6_K level offset). The rows' f16
//! factors are converted together and multiplied by the activation scale in
//! one instruction (the same f32 products as the plain dot's). The packed
//! Q4_K scales and mins are unpacked with byte shuffles, two rows per
//! register, instead of scalar bit fiddling per row; each sub-block scale is
//! then broadcast with one shuffle.
//!
//! Q6_K: each row keeps its own i32 super-block sum with lane values equal to
//! the plain AVX2 dot's (integer addition is exact, so only the per-lane
//! products matter, not the order they are added in), and its own f32
//! accumulators updated with the same FMAs in the same block order and
//! reduced the same way. Q4_K: the rows' exact block sums go side by side
//! into one vector and take the plain dot's scalar formula lane by lane.
//! Either way results are bit-identical to the plain dot.
//!
//! Decoding streams the weights from memory; see `prefetch_next_pass` for how
//! the kernels keep the memory busy.

use super::{avx2::q6k_offsets, q4k, q6k, q8k};
use crate::shape::in_groups_of_four;
use crate::simd::avx2::{hsum, load};
use crate::types::GemvFn;
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Rows per pass.
const ROWS: usize = 4;

const Q4K: u8 = 0;
const Q6K: u8 = 1;

/// The AVX2 GEMV kernel of `ty`, if there is one.
pub(crate) fn gemv(ty: GgmlType) -> Option<GemvFn> {
    match ty {
        GgmlType::Q4_K => Some(gemv_wrapper::<Q4K>),
        GgmlType::Q6_K => Some(gemv_wrapper::<Q6K>),
        _ => None,
    }
}

fn gemv_wrapper<const F: u8>(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
    let (ty, act_ty) = (if F == Q4K { GgmlType::Q4_K } else { GgmlType::Q6_K }, GgmlType::Q8_K);
    let kernels = [rows_avx2::<F, 1>, rows_avx2::<F, 2>, rows_avx2::<F, 3>, rows_avx2::<F, ROWS>];
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA and F16C.
    unsafe { in_groups_of_four(ty, act_ty, kernels, n, w, w_row_bytes, rows, a, out) }
}

/// # Safety
/// As for `q4k_rows` / `q6k_rows`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows_avx2<const F: u8, const R: usize>(nb: usize, w: *const u8, stride: usize, a: *const u8, out: *mut f32) {
    if F == Q4K {
        q4k_rows::<R>(nb, w, stride, a, out)
    } else {
        q6k_rows::<R>(nb, w, stride, a, out)
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

/// The f16 values at `p + r * stride + at` for `r < R` (at most 4), times `factor`.
///
/// # Safety
/// F16C must be available and the `R` f16 values readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn scaled_f16s<const R: usize>(p: *const u8, stride: usize, at: usize, factor: f32) -> [f32; 4] {
    let mut bits = 0u64;
    for r in 0..R {
        bits |= f16_bits(p.add(r * stride + at)) << (16 * r);
    }
    let v = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi64_si128(bits as i64)), _mm_set1_ps(factor));
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), v);
    out
}

/// Prefetches `ROWS * BLOCK_BYTES` bytes from `next`: the slice of the next
/// pass's rows that belongs to the current block. Decoding streams weights
/// from memory, and four rows walked side by side are four short streams that
/// the hardware prefetcher follows poorly (without these hints the kernels
/// ran at half the plain dot's speed on matrices beyond the caches). The rows
/// of the next pass usually form one contiguous span of `ROWS * stride`
/// bytes, so the kernels walk it in order, an equal share per block, which
/// keeps many misses in flight in one sequential stream. Past the last row
/// the hints are dropped: prefetches never fault.
#[inline(always)]
fn prefetch_next_pass<const BLOCK_BYTES: usize>(next: *const u8) {
    for line in 0..(ROWS * BLOCK_BYTES).div_ceil(64) {
        // SAFETY: prefetching is a hint that never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line).cast()) }
    }
}

/// A `vpshufb` index that gives a zero byte (any index with bit 7 set does).
const ZERO: i8 = -128;

/// The 16-bit `vpshufb` pattern that makes an i16 of byte `j` of a 128-bit
/// lane, zero-extended.
const fn zero_extend_selector(j: usize) -> i16 {
    (0x8000 | j) as i16
}

/// The 16-bit `vpshufb` pattern that selects i16 element `j` of a 128-bit lane.
const fn i16_selector(j: usize) -> i16 {
    (((2 * j + 1) << 8) | (2 * j)) as i16
}

/// `d` of the four Q4_K blocks whose first 16 bytes are in the lanes of
/// `heads` (rows 0, 1 in `heads[0]`, rows 2, 3 in `heads[1]`) in lanes 0-3,
/// their `dmin` in lanes 4-7.
///
/// # Safety
/// AVX2 and F16C must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn block_factors(heads: [__m256i; 2]) -> __m256 {
    // Lane 0: the first dwords (`d | dmin << 16`) of rows 0 and 2, lane 1: of rows 1 and 3.
    let firsts = _mm256_unpacklo_epi32(heads[0], heads[1]);
    // Per lane: `d`, `d`, `dmin`, `dmin` of its two rows.
    let split = _mm256_shuffle_epi8(firsts, _mm256_set1_epi64x(0x0706_0302_0504_0100));
    let halves = _mm_unpacklo_epi16(_mm256_castsi256_si128(split), _mm256_extracti128_si256::<1>(split));
    _mm256_cvtph_ps(halves)
}

/// The eight 6-bit scales (bytes 0-7) and eight mins (bytes 8-15) of the
/// Q4_K block whose first 16 bytes are in each 128-bit lane of `heads`: the
/// same values as `unpack_scales_mins`, two blocks at a time.
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_scales_mins_x2(heads: __m256i) -> __m256i {
    // Packed byte i of the scales is block byte 4 + i. Bytes 0-3 of the
    // result take packed bytes 0-3 (low 6 bits), 8-11 packed bytes 4-7 (low
    // 6 bits); bytes 4-7 the low nibbles of packed bytes 8-11, 12-15 their
    // high nibbles (taken from a copy shifted right by 4).
    let shifted4 = _mm256_srli_epi16::<4>(heads);
    let low_bits = _mm256_or_si256(
        _mm256_shuffle_epi8(
            heads,
            _mm256_broadcastsi128_si256(_mm_setr_epi8(
                4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, ZERO, ZERO, ZERO, ZERO,
            )),
        ),
        _mm256_shuffle_epi8(
            shifted4,
            _mm256_broadcastsi128_si256(_mm_setr_epi8(
                ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, ZERO, 12, 13, 14, 15,
            )),
        ),
    );
    let low_bits = _mm256_and_si256(
        low_bits,
        _mm256_broadcastsi128_si256(_mm_setr_epi8(
            0x3F, 0x3F, 0x3F, 0x3F, 0x0F, 0x0F, 0x0F, 0x0F, 0x3F, 0x3F, 0x3F, 0x3F, 0x0F, 0x0F, 0x0F, 0x0F,
        )),
    );
    // Bits 4-5 of scales and mins 4-7: bits 6-7 of packed bytes 0-3 and 4-7,
    // moved down by two.
    let shifted2 = _mm256_srli_epi16::<2>(heads);
    let high_bits = _mm256_shuffle_epi8(
        shifted2,
        _mm256_broadcastsi128_si256(_mm_setr_epi8(
            ZERO, ZERO, ZERO, ZERO, 4, 5, 6, 7, ZERO, ZERO, ZERO, ZERO, 8, 9, 10, 11,
        )),
    );
    _mm256_or_si256(low_bits, _mm256_and_si256(high_bits, _mm256_set1_epi8(0x30)))
}

/// `R` (at most 4) Q4_K rows at `w`, `stride` bytes apart, against the Q8_K
/// row at `a`.
///
/// Per block and row the plain dot computes the exact integer sums `isum`
/// (levels times activations, scaled per sub-block) and `msum` (mins times
/// the sub-blocks' activation sums), then `sum += (d_a * d) * isum - (d_a *
/// dmin) * msum`; so does this, four rows to a vector for the float part.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `R` weight rows and one activation
/// row of `nb` blocks must be readable, `R` floats at `out` writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q4k_rows<const R: usize>(nb: usize, w: *const u8, stride: usize, a: *const u8, out: *mut f32) {
    let nibble = _mm256_set1_epi8(0x0F);
    // One lane per row: the portable dot's running sum.
    let mut acc = _mm_setzero_ps();
    // Where the next pass starts, and its share of each block (see
    // `prefetch_next_pass`). Only hint addresses: wrapping arithmetic keeps
    // an absurd stride (valid for a single row) from overflowing.
    let next_pass = w.wrapping_add(ROWS.wrapping_mul(stride));
    let per_block = ROWS.wrapping_mul(stride) / nb.max(1);
    for b in 0..nb {
        let ab = a.add(b * q8k::BYTES);
        let wb: [*const u8; R] = std::array::from_fn(|r| w.add(r * stride + b * q4k::BYTES));
        prefetch_next_pass::<{ q4k::BYTES }>(next_pass.wrapping_add(b.wrapping_mul(per_block)));
        let d_a = ab.cast::<f32>().read_unaligned();
        // The first 16 bytes (`d`, `dmin`, packed scales and mins) of the
        // blocks of rows 2p and 2p + 1 in the lanes of `heads[p]`; a missing
        // last row repeats the one before, and its results are never used.
        let mut heads = [_mm256_setzero_si256(); 2];
        for (p, head) in heads.iter_mut().enumerate().take(R.div_ceil(2)) {
            let (x, y) = (wb[2 * p], wb[(2 * p + 1).min(R - 1)]);
            *head = _mm256_loadu2_m128i(y.cast(), x.cast());
        }
        if R <= 2 {
            heads[1] = heads[0];
        }
        // Lanes 0-3: `d_a * d` of rows 0-3; lanes 4-7: `-d_a * dmin`.
        let factors = _mm256_mul_ps(block_factors(heads), _mm256_setr_ps(d_a, d_a, d_a, d_a, -d_a, -d_a, -d_a, -d_a));

        // Sums of the activation quants of each 32-element sub-block, in both lanes.
        let bsums = load(ab.add(q8k::BSUMS));
        let pair_sums = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256::<1>(bsums));
        let pair_sums = _mm256_broadcastsi128_si256(pair_sums);

        // Each row's eight scale bytes in the low half of both lanes; per
        // pair of rows the minimum products, row 2p in the low lane.
        let mut scales = [_mm256_setzero_si256(); R];
        let mut min_products = [_mm256_setzero_si256(); 2];
        for p in 0..R.div_ceil(2) {
            let unpacked = unpack_scales_mins_x2(heads[p]);
            scales[2 * p] = _mm256_permute4x64_epi64::<0b00_00_00_00>(unpacked);
            if 2 * p + 1 < R {
                scales[2 * p + 1] = _mm256_permute4x64_epi64::<0b10_10_10_10>(unpacked);
            }
            let mins_as_i16 =
                _mm_setr_epi8(8, ZERO, 9, ZERO, 10, ZERO, 11, ZERO, 12, ZERO, 13, ZERO, 14, ZERO, 15, ZERO);
            let pair_mins = _mm256_shuffle_epi8(unpacked, _mm256_broadcastsi128_si256(mins_as_i16));
            min_products[p] = _mm256_madd_epi16(pair_mins, pair_sums);
        }

        let q8 = ab.add(q8k::QS);
        let act: [__m256i; 8] = std::array::from_fn(|j| load(q8.add(32 * j)));
        let mut sumi = [_mm256_setzero_si256(); 4];
        for (r, sumi_r) in sumi.iter_mut().enumerate().take(R) {
            for c in 0..4 {
                let bits = load(wb[r].add(q4k::QS + 32 * c));
                let lo = _mm256_and_si256(bits, nibble);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), nibble);
                let s_lo = _mm256_shuffle_epi8(scales[r], _mm256_set1_epi16(zero_extend_selector(2 * c)));
                let s_hi = _mm256_shuffle_epi8(scales[r], _mm256_set1_epi16(zero_extend_selector(2 * c + 1)));
                let p_lo = _mm256_madd_epi16(s_lo, _mm256_maddubs_epi16(lo, act[2 * c]));
                let p_hi = _mm256_madd_epi16(s_hi, _mm256_maddubs_epi16(hi, act[2 * c + 1]));
                *sumi_r = _mm256_add_epi32(*sumi_r, _mm256_add_epi32(p_lo, p_hi));
            }
        }
        // The rows' exact block sums side by side, then the portable dot's
        // `sum += (d_a * d) * isum - (d_a * dmin) * msum` for four rows at once.
        let isums = _mm256_hadd_epi32(_mm256_hadd_epi32(sumi[0], sumi[1]), _mm256_hadd_epi32(sumi[2], sumi[3]));
        let isums = _mm_add_epi32(_mm256_castsi256_si128(isums), _mm256_extracti128_si256::<1>(isums));
        // Lanes 0-3 of the low half: rows 0 and 2 (pairs of partial sums); of the high half: rows 1 and 3.
        let msums = _mm256_hadd_epi32(min_products[0], min_products[1]);
        let msums = _mm256_hadd_epi32(msums, msums);
        let msums = _mm_unpacklo_epi32(_mm256_castsi256_si128(msums), _mm256_extracti128_si256::<1>(msums));
        let level_terms = _mm_mul_ps(_mm256_castps256_ps128(factors), _mm_cvtepi32_ps(isums));
        let min_terms = _mm_mul_ps(_mm256_extractf128_ps::<1>(factors), _mm_cvtepi32_ps(msums));
        acc = _mm_add_ps(acc, _mm_add_ps(level_terms, min_terms));
    }
    let mut sums = [0f32; 4];
    _mm_storeu_ps(sums.as_mut_ptr(), acc);
    for (r, &sum) in sums.iter().enumerate().take(R) {
        *out.add(r) = sum;
    }
}

/// `R` (at most 4) Q6_K rows at `w`, `stride` bytes apart, against the Q8_K
/// row at `a`.
///
/// Per block and row the plain dot computes, for each of the eight 32-element
/// level groups, `scale * pairs(q * a)` (unsigned levels) widened by `madd`
/// (the low 16 lanes with one sub-block scale, the high 16 with the next),
/// sums them into `sumi`, takes the levels' offset off each lane as llama.cpp
/// does (`q6k_offsets`) and adds `(d_a * d) * sumi` to its accumulator; so
/// does this.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `R` weight rows and one activation
/// row of `nb` blocks must be readable, `R` floats at `out` writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn q6k_rows<const R: usize>(nb: usize, w: *const u8, stride: usize, a: *const u8, out: *mut f32) {
    let nibble = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(0x30);
    let mut acc = [_mm256_setzero_ps(); R];
    // Where the next pass starts, and its share of each block (see
    // `prefetch_next_pass`). Only hint addresses: wrapping arithmetic keeps
    // an absurd stride (valid for a single row) from overflowing.
    let next_pass = w.wrapping_add(ROWS.wrapping_mul(stride));
    let per_block = ROWS.wrapping_mul(stride) / nb.max(1);
    for b in 0..nb {
        let ab = a.add(b * q8k::BYTES);
        let wb: [*const u8; R] = std::array::from_fn(|r| w.add(r * stride + b * q6k::BYTES));
        prefetch_next_pass::<{ q6k::BYTES }>(next_pass.wrapping_add(b.wrapping_mul(per_block)));
        let d_a = ab.cast::<f32>().read_unaligned();
        let d = scaled_f16s::<R>(wb[0], stride, q6k::D, d_a);
        let mut sumi = [_mm256_setzero_si256(); R];
        for half in 0..2 {
            let q8 = ab.add(q8k::QS + 128 * half);
            let a8: [__m256i; 4] = std::array::from_fn(|k| load(q8.add(32 * k)));
            for (r, sumi_r) in sumi.iter_mut().enumerate() {
                let ql = wb[r].add(64 * half);
                let (low1, low2, high) = (load(ql), load(ql.add(32)), load(wb[r].add(q6k::QH + 32 * half)));
                // The eight scales of this half as i16, in both 128-bit lanes.
                let scale_bytes = wb[r].add(q6k::SCALES + 8 * half).cast::<u64>().read_unaligned();
                let scales = _mm256_cvtepi8_epi16(_mm_set1_epi64x(scale_bytes as i64));
                // Level groups 0-3: the low nibbles of `ql[..32]`, of
                // `ql[32..]`, then their high nibbles, with bit pairs 0-3 of `qh` on top.
                let groups = [
                    (_mm256_and_si256(low1, nibble), _mm256_slli_epi16::<4>(high)),
                    (_mm256_and_si256(low2, nibble), _mm256_slli_epi16::<2>(high)),
                    (_mm256_and_si256(_mm256_srli_epi16::<4>(low1), nibble), high),
                    (_mm256_and_si256(_mm256_srli_epi16::<4>(low2), nibble), _mm256_srli_epi16::<2>(high)),
                ];
                for (k, (low, high)) in groups.into_iter().enumerate() {
                    let q = _mm256_or_si256(low, _mm256_and_si256(high, two_bits));
                    let p = _mm256_maddubs_epi16(q, a8[k]);
                    // Scale 2k of the half for the low 16 lanes, 2k + 1 for the high 16.
                    let pattern =
                        _mm256_set_m128i(_mm_set1_epi16(i16_selector(2 * k + 1)), _mm_set1_epi16(i16_selector(2 * k)));
                    *sumi_r = _mm256_add_epi32(*sumi_r, _mm256_madd_epi16(_mm256_shuffle_epi8(scales, pattern), p));
                }
            }
        }
        for r in 0..R {
            let sumi_r = _mm256_sub_epi32(sumi[r], q6k_offsets(wb[r], ab));
            acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d[r]), _mm256_cvtepi32_ps(sumi_r), acc[r]);
        }
    }
    for (r, acc_r) in acc.iter().enumerate() {
        *out.add(r) = hsum(*acc_r);
    }
}
