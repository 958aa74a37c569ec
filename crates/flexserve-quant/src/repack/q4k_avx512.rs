//! AVX-512 (F, BW, VL, VNNI) kernel for `Q4_Kx8` weights (layout in `q4k`).
//!
//! One 512-bit vector covers two neighbouring groups (lanes 0..8 and 8..16),
//! each 32-bit lane four levels of its row. Per sub-block pair and token,
//! `vpdpbusd` takes eight such vectors of low nibbles and eight of high ones
//! with the matching activation quads broadcast, which leaves every row's
//! exact sub-block sums in its lane; one `vpmulld` per sub-block applies the
//! 6-bit scale. The min term takes one `vpdpwssd` per sub-block: the row's
//! min in both 16-bit halves of its lane against the token's two 16-element
//! sums of the sub-block, read from the activation block as they are stored. Then the portable dot's float formula, lane by lane.

use super::q4k::{GROUP_BLOCK, MINS_HI_AT, QS_AT, SCALES_AT};
use super::sweep::{dup_pattern, prefetch, sweep, Pass, AHEAD_BYTES};
use super::{Product, Q4_K};
use crate::kquants::q8k;
use crate::simd::avx512::pin;
use std::arch::x86_64::*;

/// Groups per pass: one 512-bit vector covers two groups of eight rows.
const GROUPS: usize = 2;

super::entry_points! {
    /// The `Q4_Kx8` product (see the module docs).
    q4_kx8 => products::<Q4_K>;
}

fn products<const L: u8>(product: Product) {
    sweep(product, GROUPS, |p: Pass| {
        // A lone last group reads itself twice and stores only its own lanes.
        let (second, lanes) =
            if p.groups == GROUPS { (p.w.wrapping_add(p.group_bytes), 0xFFFF) } else { (p.w, 0x00FF) };
        // SAFETY: the kernel is only handed out after the CPU was found to
        // support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; `check_repacked`
        // verified that every group of `nb` blocks, the pass's activation rows
        // and their outputs (eight floats per group and token at `out_stride`)
        // lie within the slices, and `second` is a group of the pass.
        unsafe {
            if p.grouped {
                pair::<4, true>(p.nb, p.w, second, p.a, p.a_stride, p.out, p.out_stride, lanes)
            } else {
                let (nb, w, a, stride, out, out_stride) = (p.nb, p.w, p.a, p.a_stride, p.out, p.out_stride);
                match p.tn {
                    4 => pair::<4, false>(nb, w, second, a, stride, out, out_stride, lanes),
                    3 => pair::<3, false>(nb, w, second, a, stride, out, out_stride, lanes),
                    2 => pair::<2, false>(nb, w, second, a, stride, out, out_stride, lanes),
                    _ => pair::<1, false>(nb, w, second, a, stride, out, out_stride, lanes),
                }
            }
        }
    });
}

/// Zero-extends the 16 bytes at `p0` (lanes 0..8) and at `p1` (lanes 8..16)
/// to 16-bit halves of 32-bit lanes.
///
/// # Safety
/// AVX-512 F/BW must be available; 16 bytes at `p0` and at `p1` readable.
#[inline]
#[target_feature(enable = "avx2,avx512f,avx512bw")]
unsafe fn widen_pair(p0: *const u8, p1: *const u8) -> __m512i {
    let both =
        _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(_mm_loadu_si128(p0.cast())), _mm_loadu_si128(p1.cast()));
    _mm512_cvtepu8_epi16(both)
}

/// Two groups at `w0` and `w1` against `T` activation rows at `a`; the
/// results of the lanes set in `lanes` are stored. `PAIRS`: with the float
/// update per sub-block pair (llama.cpp's four-token arithmetic, see `q4k`),
/// else per super-block.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `nb` group
/// blocks at `w0` and at `w1`, `T` rows of `nb` Q8_K blocks at `a`
/// (`a_stride` apart) must be readable, the lanes of
/// `lanes` among sixteen floats at `out + t * out_stride` writable for `t < T`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair<const T: usize, const PAIRS: bool>(
    nb: usize,
    w0: *const u8,
    w1: *const u8,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
    lanes: __mmask16,
) {
    let low = _mm512_set1_epi8(0x0F);
    let six_bits = _mm512_set1_epi32(0x3F);
    let two_bits = _mm512_set1_epi16(0x03);
    let [dup_lo, dup_hi] = [0, 1].map(|half| _mm512_broadcast_i32x4(dup_pattern(half)));
    // The level terms and the min terms in accumulators of their own, as
    // llama.cpp's rearranged Q4_K product keeps them (see `q4k`).
    let mut acc = [_mm512_setzero_ps(); T];
    let mut acc_min = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let (b0, b1) = (w0.add(b * GROUP_BLOCK), w1.add(b * GROUP_BLOCK));
        prefetch(b0.wrapping_add(AHEAD_BYTES), GROUP_BLOCK);
        prefetch(b1.wrapping_add(AHEAD_BYTES), GROUP_BLOCK);
        let act = |t: usize| a.add(t * a_stride + b * q8k::BYTES);
        let qa = |t: usize, at: usize| {
            let quad = act(t).add(q8k::QS + at);
            _mm512_set1_epi32(quad.cast::<i32>().read_unaligned())
        };
        // Per sub-block pair: the float update may take them one by one.
        let mut isums = [[_mm512_setzero_si512(); T]; 4];
        let mut msums = [[_mm512_setzero_si512(); T]; 4];
        for c in 0..4 {
            let (isum, msum) = (&mut isums[c], &mut msums[c]);
            let mut lo_sum = [_mm512_setzero_si512(); T];
            let mut hi_sum = [_mm512_setzero_si512(); T];
            for m in 0..8 {
                let at = QS_AT + 256 * c + 32 * m;
                let raw = _mm512_inserti64x4::<1>(
                    _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(at).cast())),
                    _mm256_loadu_si256(b1.add(at).cast()),
                );
                let lo = _mm512_and_si512(raw, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                for t in 0..T {
                    lo_sum[t] = _mm512_dpbusd_epi32(lo_sum[t], lo, qa(t, 64 * c + 4 * m));
                    hi_sum[t] = _mm512_dpbusd_epi32(hi_sum[t], hi, qa(t, 64 * c + 32 + 4 * m));
                }
                pin(&mut lo_sum);
                pin(&mut hi_sum);
            }
            // Entries 16c..16c+16: lane r holds sub-block 2c's scale byte in
            // its low half and sub-block 2c+1's in its high half.
            let entries = widen_pair(b0.add(SCALES_AT + 16 * c), b1.add(SCALES_AT + 16 * c));
            let scale_lo = _mm512_and_si512(entries, six_bits);
            let scale_hi = _mm512_and_si512(_mm512_srli_epi32::<16>(entries), six_bits);
            // The mins' high four bits: low nibbles for entries below 32, high ones above.
            let (n0, n1) = (b0.add(MINS_HI_AT + 16 * (c % 2)), b1.add(MINS_HI_AT + 16 * (c % 2)));
            let nibbles = widen_pair(n0, n1);
            let high = if c < 2 {
                _mm512_and_si512(nibbles, _mm512_set1_epi16(0x0F))
            } else {
                _mm512_srli_epi16::<4>(nibbles)
            };
            let mins = _mm512_or_si512(
                _mm512_and_si512(_mm512_srli_epi16::<6>(entries), two_bits),
                _mm512_slli_epi16::<2>(high),
            );
            // Each sub-block's min in both halves of a row's lane.
            let (min_lo, min_hi) = (_mm512_shuffle_epi8(mins, dup_lo), _mm512_shuffle_epi8(mins, dup_hi));
            for t in 0..T {
                let scaled =
                    _mm512_add_epi32(_mm512_mullo_epi32(lo_sum[t], scale_lo), _mm512_mullo_epi32(hi_sum[t], scale_hi));
                isum[t] = _mm512_add_epi32(isum[t], scaled);
                // The token's 16-element sums of sub-blocks 2c and 2c+1, as stored.
                let sums = |j: usize| _mm512_set1_epi32(act(t).add(q8k::BSUMS + 4 * j).cast::<i32>().read_unaligned());
                msum[t] = _mm512_dpwssd_epi32(msum[t], min_lo, sums(2 * c));
                msum[t] = _mm512_dpwssd_epi32(msum[t], min_hi, sums(2 * c + 1));
            }
        }
        let halves = |at: usize| {
            _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
                _mm256_castsi128_si256(_mm_loadu_si128(b0.add(at).cast())),
                _mm_loadu_si128(b1.add(at).cast()),
            ))
        };
        let (d, dmin) = (halves(0), halves(super::q4k::DMIN_AT));
        for t in 0..T {
            let d_a = _mm512_set1_ps(act(t).cast::<f32>().read_unaligned());
            let (level_factor, min_factor) = (_mm512_mul_ps(d, d_a), _mm512_mul_ps(dmin, d_a));
            let mut update = |isum: __m512i, msum: __m512i| {
                acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), level_factor, acc[t]);
                acc_min[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), min_factor, acc_min[t]);
            };
            if PAIRS {
                for c in 0..4 {
                    update(isums[c][t], msums[c][t]);
                }
            } else {
                let total = |v: &[[__m512i; T]; 4]| {
                    _mm512_add_epi32(_mm512_add_epi32(v[0][t], v[1][t]), _mm512_add_epi32(v[2][t], v[3][t]))
                };
                update(total(&isums), total(&msums));
            }
        }
    }
    for t in 0..T {
        _mm512_mask_storeu_ps(out.add(t * out_stride), lanes, _mm512_sub_ps(acc[t], acc_min[t]));
    }
}
