//! AVX2 + FMA + F16C kernel for `Q4_0x8` weights.
//!
//! Per group of eight rows and block, the 128 quant bytes are split into
//! eight vectors whose 32-bit lane `r` holds four consecutive levels of row
//! `r` (unsigned, 0..15). Each is multiplied with the matching four
//! activation quants broadcast to every lane (`maddubs`); the eight 16-bit
//! results are summed (at most 8 * 2 * 15 * 128 in magnitude: no overflow),
//! widened to 32 bits once, and `8 * sum(a)` is subtracted, which gives each
//! row's exact `sum((q - 8) * a)` in its lane. One conversion and one FMA per
//! eight rows follow, with the scale product `d_w * d_a` rounded first, as in
//! llama.cpp's grouped kernels.

use super::{check_q4_0x8, GROUP_BLOCK_BYTES, GROUP_QUANTS, REPACK_ROWS};
use crate::legacy::avx2::load_f16;
use crate::legacy::{Q8_0_BYTES, QK};
use std::arch::x86_64::*;

/// Activation rows per pass: each group block's unpacked weights serve this many.
const TOKENS: usize = 4;

#[allow(clippy::too_many_arguments)]
pub(super) fn q4_0x8(
    n: usize,
    w: &[u8],
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    n_tok: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_q4_0x8(n, w, rows, a, a_row_bytes, n_tok, out, out_stride);
    if rows == 0 || n_tok == 0 {
        return;
    }
    let nb = n / QK;
    let group_bytes = nb * GROUP_BLOCK_BYTES;
    // 8 * (sum of the block's activation quants), per pass token and block.
    let mut corrections = vec![0i32; TOKENS * nb];
    for t0 in (0..n_tok).step_by(TOKENS) {
        let tn = (n_tok - t0).min(TOKENS);
        for t in 0..tn {
            let row = &a[(t0 + t) * a_row_bytes..];
            for (b, c) in corrections[t * nb..(t + 1) * nb].iter_mut().enumerate() {
                let qa = &row[b * Q8_0_BYTES + 2..(b + 1) * Q8_0_BYTES];
                *c = 8 * qa.iter().map(|&v| v as i8 as i32).sum::<i32>();
            }
        }
        let a_pass = a[t0 * a_row_bytes..].as_ptr();
        for g in 0..rows / REPACK_ROWS {
            let wg = w[g * group_bytes..].as_ptr();
            let o = out[t0 * out_stride + g * REPACK_ROWS..].as_mut_ptr();
            let c = corrections.as_ptr();
            // SAFETY: the kernel is only handed out after the CPU was found to
            // support AVX2, FMA and F16C; `check_q4_0x8` verified that every
            // group of `nb` blocks, the `tn` activation rows of this pass and
            // their outputs (eight floats per token at `out_stride`) lie within
            // the slices; `corrections` holds `tn * nb` values.
            unsafe {
                match tn {
                    4 => group::<4>(nb, wg, a_pass, a_row_bytes, c, o, out_stride),
                    3 => group::<3>(nb, wg, a_pass, a_row_bytes, c, o, out_stride),
                    2 => group::<2>(nb, wg, a_pass, a_row_bytes, c, o, out_stride),
                    _ => group::<1>(nb, wg, a_pass, a_row_bytes, c, o, out_stride),
                }
            }
        }
    }
}

/// One group of eight rows at `w` against `T` activation rows at `a`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `nb` group blocks at `w`, `T` rows
/// of `nb` Q8_0 blocks at `a` (`a_stride` apart) and `T * nb` corrections
/// must be readable, eight floats at `out + t * out_stride` writable for `t < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    corrections: *const i32,
    out: *mut f32,
    out_stride: usize,
) {
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let blk = w.add(b * GROUP_BLOCK_BYTES);
        let d_w = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
        // q[k], lane r: levels 4k..4k+3 of row r.
        let mut q = [_mm256_setzero_si256(); 8];
        for m in 0..4 {
            let raw = _mm256_loadu_si256(blk.add(GROUP_QUANTS + 32 * m).cast());
            q[m] = _mm256_and_si256(raw, low);
            q[m + 4] = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low);
        }
        for (t, acc_t) in acc.iter_mut().enumerate() {
            let ab = a.add(t * a_stride + b * Q8_0_BYTES);
            let qa = ab.add(2);
            let quad = |k: usize| _mm256_set1_epi32(qa.add(4 * k).cast::<i32>().read_unaligned());
            let mut s16 = _mm256_maddubs_epi16(q[0], quad(0));
            for (k, qk) in q.iter().enumerate().skip(1) {
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(*qk, quad(k)));
            }
            let sums = _mm256_sub_epi32(_mm256_madd_epi16(s16, ones), _mm256_set1_epi32(*corrections.add(t * nb + b)));
            let scale = _mm256_mul_ps(d_w, _mm256_set1_ps(load_f16(ab)));
            *acc_t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, *acc_t);
        }
    }
    for (t, acc_t) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(t * out_stride), *acc_t);
    }
}
