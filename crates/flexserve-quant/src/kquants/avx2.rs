//! AVX2 + FMA + F16C kernels: the K-quant dot products against Q8_K and the
//! Q8_K activation quantizer.
//!
//! The dot products keep everything in integers per super-block: `maddubs`
//! multiplies the unsigned weight levels with the signed activation quants
//! into i16 pair sums, `madd` against a broadcast sub-block scale widens them
//! to i32, and only the per-block i32 sums are converted and scaled by
//! `d_w * d_a` into a float accumulator, reduced once at the end.
//!
//! Every `unsafe fn` here requires AVX2, FMA and F16C; the safe wrappers are
//! only handed out by `kernels`, which `dispatch` asks for only at the AVX2
//! and AVX-512 tiers, after the CPU was found to have them.
//! Rows are byte slices of any alignment: all loads are unaligned.

use std::arch::x86_64::*;

use super::{check_dot, check_row, q4k, q5k, q6k, q8k, unpack_scales_mins, QK_K};
use crate::simd::avx2::{f16_at, hsum, hsum_128, hsum_i32, hsum_i32_128, load};
use crate::types::{DotFn, Kernels};
use flexserve_gguf::GgmlType;

/// Replaces the portable kernels of `portable.ty` with the AVX2 ones (the
/// AVX-512 tier's too).
pub(crate) fn kernels(portable: Kernels) -> Kernels {
    let dot: DotFn = match portable.ty {
        GgmlType::Q8_K => return Kernels { quantize: quantize_q8k, ..portable },
        GgmlType::Q4_K => dot_q4k_q8k,
        GgmlType::Q5_K => dot_q5k_q8k,
        GgmlType::Q6_K => dot_q6k_q8k,
        _ => return portable,
    };
    Kernels { dot: Some(dot), ..portable }
}

fn dot_q4k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q4_K, n, w, q4k::BYTES, a);
    // SAFETY: only reachable when the CPU has AVX2, FMA and F16C (see the
    // module docs); `check_dot` ensured both rows hold `n / QK_K` whole blocks.
    unsafe { dot_q4k(n / QK_K, w, a) }
}

fn dot_q5k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q5_K, n, w, q5k::BYTES, a);
    // SAFETY: as in `dot_q4k_q8k`: CPU features verified, whole blocks checked.
    unsafe { dot_q5k(n / QK_K, w, a) }
}

fn dot_q6k_q8k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q6_K, n, w, q6k::BYTES, a);
    // SAFETY: as in `dot_q4k_q8k`: CPU features verified, whole blocks checked.
    unsafe { dot_q6k(n / QK_K, w, a) }
}

fn quantize_q8k(src: &[f32], dst: &mut [u8]) {
    check_row(GgmlType::Q8_K, src.len(), q8k::BYTES, dst.len());
    for (x, block) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(q8k::BYTES)) {
        // SAFETY: CPU features verified (module docs); `x` is 256 floats and
        // `block` one whole Q8_K block, as the function requires.
        unsafe { quantize_q8k_block(x, block) }
    }
}

/// `mins[j] * (bsums[2j] + bsums[2j + 1])` folded into four i32 lanes.
///
/// # Safety
/// AVX2 must be available and `a_block` must be a whole Q8_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn min_products(mins: &[u8; 8], a_block: &[u8]) -> __m128i {
    let bsums = load(a_block.as_ptr().add(q8k::BSUMS));
    let pair_sums = _mm_hadd_epi16(_mm256_castsi256_si128(bsums), _mm256_extracti128_si256::<1>(bsums));
    let mins16 = _mm_cvtepu8_epi16(_mm_set_epi64x(0, u64::from_le_bytes(*mins) as i64));
    _mm_madd_epi16(mins16, pair_sums)
}

/// Per block: the exact integer sums of the portable dot (`isum` over the
/// levels, `msum` over the minimum terms), then its scalar formula, so the
/// result is bit-identical to the portable dot. The tile and GEMV kernels of
/// every tier compute the same.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `w` and `a` must hold `nb` whole
/// Q4_K and Q8_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let nibble = _mm256_set1_epi8(0x0F);
    let mut sum = 0.0f32;
    for (wb, ab) in w.chunks_exact(q4k::BYTES).zip(a.chunks_exact(q8k::BYTES)).take(nb) {
        let (scales, mins) = unpack_scales_mins(&wb[q4k::SCALES..q4k::QS]);
        let msum = hsum_i32_128(min_products(&mins, ab));
        let qs = wb.as_ptr().add(q4k::QS);
        let q8 = ab.as_ptr().add(q8k::QS);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            let bits = load(qs.add(32 * c));
            let lo = _mm256_and_si256(bits, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(bits), nibble);
            let p_lo = _mm256_maddubs_epi16(lo, load(q8.add(64 * c)));
            let p_hi = _mm256_maddubs_epi16(hi, load(q8.add(64 * c + 32)));
            let p_lo = _mm256_madd_epi16(_mm256_set1_epi16(scales[2 * c] as i16), p_lo);
            let p_hi = _mm256_madd_epi16(_mm256_set1_epi16(scales[2 * c + 1] as i16), p_hi);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
        }
        let isum = hsum_i32(sumi);
        let d_a = q8k::block_scale(ab);
        sum += d_a * f16_at(wb, 0) * isum as f32 - d_a * f16_at(wb, 2) * msum as f32;
    }
    sum
}

/// # Safety
/// AVX2, FMA and F16C must be available; `w` and `a` must hold `nb` whole
/// Q5_K and Q8_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let nibble = _mm256_set1_epi8(0x0F);
    let fifth_bit = _mm256_set1_epi8(0x10);
    let mut acc = _mm256_setzero_ps();
    let mut acc_min = _mm_setzero_ps();
    for (wb, ab) in w.chunks_exact(q5k::BYTES).zip(a.chunks_exact(q8k::BYTES)).take(nb) {
        let d_a = q8k::block_scale(ab);
        let d = d_a * f16_at(wb, 0);
        let neg_dmin = -d_a * f16_at(wb, 2);
        let (scales, mins) = unpack_scales_mins(&wb[q5k::SCALES..q5k::QH]);
        let mins_i32 = _mm_cvtepi32_ps(min_products(&mins, ab));
        acc_min = _mm_fmadd_ps(_mm_set1_ps(neg_dmin), mins_i32, acc_min);

        let qh = load(wb.as_ptr().add(q5k::QH));
        let qs = wb.as_ptr().add(q5k::QS);
        let q8 = ab.as_ptr().add(q8k::QS);
        let mut sumi = _mm256_setzero_si256();
        for c in 0..4 {
            // Sub-block 2c takes its fifth bit from bit 2c of qh, 2c + 1 from the next.
            let bit_lo = _mm256_set1_epi8((1u8 << (2 * c)) as i8);
            let bit_hi = _mm256_set1_epi8((2u8 << (2 * c)) as i8);
            let high_lo = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_lo), bit_lo);
            let high_hi = _mm256_cmpeq_epi8(_mm256_and_si256(qh, bit_hi), bit_hi);
            let bits = load(qs.add(32 * c));
            let lo = _mm256_or_si256(_mm256_and_si256(bits, nibble), _mm256_and_si256(high_lo, fifth_bit));
            let hi = _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16::<4>(bits), nibble),
                _mm256_and_si256(high_hi, fifth_bit),
            );
            let p_lo = _mm256_maddubs_epi16(lo, load(q8.add(64 * c)));
            let p_hi = _mm256_maddubs_epi16(hi, load(q8.add(64 * c + 32)));
            let p_lo = _mm256_madd_epi16(_mm256_set1_epi16(scales[2 * c] as i16), p_lo);
            let p_hi = _mm256_madd_epi16(_mm256_set1_epi16(scales[2 * c + 1] as i16), p_hi);
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p_lo, p_hi));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc) + hsum_128(acc_min)
}

/// # Safety
/// AVX2, FMA and F16C must be available; `w` and `a` must hold `nb` whole
/// Q6_K and Q8_K blocks.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q6k(nb: usize, w: &[u8], a: &[u8]) -> f32 {
    let nibble = _mm256_set1_epi8(0x0F);
    let two_bits = _mm256_set1_epi8(0x30);
    // Byte pattern selecting scale s for the low 16 lanes and s + 1 for the high 16.
    let scale_pair = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    let mut acc = _mm256_setzero_ps();
    for (wb, ab) in w.chunks_exact(q6k::BYTES).zip(a.chunks_exact(q8k::BYTES)).take(nb) {
        let d = q8k::block_scale(ab) * f16_at(wb, q6k::D);
        let scales = _mm_loadu_si128(wb.as_ptr().add(q6k::SCALES).cast());
        let mut sumi = _mm256_setzero_si256();
        for half in 0..2 {
            let ql = wb.as_ptr().add(64 * half);
            let q8 = ab.as_ptr().add(q8k::QS + 128 * half);
            let low1 = load(ql);
            let low2 = load(ql.add(32));
            let high = load(wb.as_ptr().add(q6k::QH + 32 * half));
            // Bring each 2-bit pair of `high` to bits 4-5 of its byte.
            let levels = [
                _mm256_or_si256(
                    _mm256_and_si256(low1, nibble),
                    _mm256_and_si256(_mm256_slli_epi16::<4>(high), two_bits),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(low2, nibble),
                    _mm256_and_si256(_mm256_slli_epi16::<2>(high), two_bits),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(low1), nibble),
                    _mm256_and_si256(high, two_bits),
                ),
                _mm256_or_si256(
                    _mm256_and_si256(_mm256_srli_epi16::<4>(low2), nibble),
                    _mm256_and_si256(_mm256_srli_epi16::<2>(high), two_bits),
                ),
            ];
            for (k, &q) in levels.iter().enumerate() {
                let a8 = load(q8.add(32 * k));
                // Unsigned levels: the offset comes off below, as llama.cpp takes it.
                let p = _mm256_maddubs_epi16(q, a8);
                let s = (8 * half + 2 * k) as i8;
                let sc = _mm256_cvtepi8_epi16(_mm_shuffle_epi8(scales, _mm_add_epi8(scale_pair, _mm_set1_epi8(s))));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(sc, p));
            }
        }
        sumi = _mm256_sub_epi32(sumi, q6k_offsets(wb.as_ptr(), ab.as_ptr()));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    hsum(acc)
}

/// The offset of the Q6_K levels as llama.cpp takes it off each lane of a
/// super-block's sums (see `q6k::lane_sums`): lane `l` holds `32 * (bsum_2l *
/// scale_2l + bsum_2l+1 * scale_2l+1)`.
///
/// # Safety
/// AVX2 must be available; `wb` must point at a whole Q6_K block and `ab` at
/// a whole Q8_K block.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn q6k_offsets(wb: *const u8, ab: *const u8) -> __m256i {
    let bsums = _mm256_loadu_si256(ab.add(q8k::BSUMS).cast());
    let scales = _mm256_cvtepi8_epi16(_mm_loadu_si128(wb.add(q6k::SCALES).cast()));
    _mm256_slli_epi32::<5>(_mm256_madd_epi16(bsums, scales))
}

/// Same arithmetic as the portable quantizer (one scalar `iscale`, IEEE
/// multiply, round half to even, clamp), so the bytes are identical.
///
/// # Safety
/// AVX2 must be available; `x` must hold 256 floats and `block` one whole
/// Q8_K block.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8k_block(x: &[f32], block: &mut [u8]) {
    debug_assert!(x.len() == QK_K && block.len() == q8k::BYTES);
    let xp = x.as_ptr();
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let mut vmax = _mm256_setzero_ps();
    for k in 0..QK_K / 8 {
        // With a NaN first operand `max_ps` returns the second: NaNs are skipped.
        vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(xp.add(8 * k)), abs_mask), vmax);
    }
    let m = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps::<1>(vmax));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    if amax == 0.0 {
        block.fill(0);
        return;
    }
    // The first element of that magnitude gives the sign, as in the portable scan.
    let target = _mm256_set1_ps(amax);
    let mut max = amax;
    for k in 0..QK_K / 8 {
        let v = _mm256_and_ps(_mm256_loadu_ps(xp.add(8 * k)), abs_mask);
        let hits = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_EQ_OQ>(v, target));
        if hits != 0 {
            max = x[8 * k + hits.trailing_zeros() as usize];
            break;
        }
    }

    let iscale = -127.0 / max;
    let viscale = _mm256_set1_ps(iscale);
    let upper = _mm256_set1_ps(127.0);
    let lower = _mm256_set1_ps(-128.0);
    let lane_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    let quant = |at: usize| quantize_8(xp.add(at), viscale, upper, lower);
    let qs = block.as_mut_ptr().add(q8k::QS);
    let mut group_sums = [0i16; QK_K / 16];
    for g in 0..QK_K / 32 {
        let (i0, i1, i2, i3) = (quant(32 * g), quant(32 * g + 8), quant(32 * g + 16), quant(32 * g + 24));
        let bytes = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        _mm256_storeu_si256(qs.add(32 * g).cast(), _mm256_permutevar8x32_epi32(bytes, lane_order));

        let h = _mm256_hadd_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
        let h = _mm256_hadd_epi32(h, h);
        let t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
        group_sums[2 * g] = _mm_cvtsi128_si32(t) as i16;
        group_sums[2 * g + 1] = _mm_extract_epi32::<1>(t) as i16;
    }
    for (g, s) in group_sums.iter().enumerate() {
        block[q8k::BSUMS + 2 * g..q8k::BSUMS + 2 * g + 2].copy_from_slice(&s.to_le_bytes());
    }
    block[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

/// Eight quants: `clamp(round_half_even(x * iscale), lower, upper)` as i32.
///
/// # Safety
/// AVX2 must be available and `x` must point to 8 readable floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_8(x: *const f32, iscale: __m256, upper: __m256, lower: __m256) -> __m256i {
    let v = _mm256_mul_ps(_mm256_loadu_ps(x), iscale);
    let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(v);
    // `min_ps` with a NaN first operand yields 127, like the portable `min`.
    _mm256_cvtps_epi32(_mm256_max_ps(_mm256_min_ps(r, upper), lower))
}
