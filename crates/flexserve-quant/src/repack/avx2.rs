//! AVX2 + FMA + F16C kernels for `Q4_0x8`, `Q4_1x8` and `Q8_0x8` weights.
//!
//! `Q4_0x8`: per group of eight rows and block, the 128 quant bytes are split into
//! eight vectors whose 32-bit lane `r` holds four consecutive levels of row
//! `r` (unsigned, 0..15). Each is multiplied with the matching four
//! activation quants broadcast to every lane (`maddubs`); the eight 16-bit
//! results are summed (at most 8 * 2 * 15 * 128 in magnitude: no overflow),
//! widened to 32 bits once, and `8 * sum(a)` is subtracted, which gives each
//! row's exact `sum((q - 8) * a)` in its lane. One conversion and one FMA per
//! eight rows follow, with the scale product `d_w * d_a` rounded first, as in
//! llama.cpp's grouped kernels. `Q4_1x8` runs the same loop on the Q8_1
//! activations without the offset, then adds `m_w * s_a` with a second FMA.

use super::sweep::{by_tokens, prefetch, sweep, with_block_sums, AHEAD_BYTES};
use super::{entry_points, layout, Product, Repacked, Q4_0, Q4_1, Q8_0, Q8_GROUP_BLOCK_BYTES, REPACK_ROWS};
use crate::legacy::{Q8_0_BYTES, QK};
use crate::simd::avx2::{load_f16, pin};
use std::arch::x86_64::*;

entry_points! {
    /// The `Q4_0x8` product (see the module docs).
    q4_0x8 => nibbles::<Q4_0>;
    /// The `Q4_1x8` product (see the module docs).
    q4_1x8 => nibbles::<Q4_1>;
    /// The `Q8_0x8` product (see `q8_products`).
    q8_0x8 => q8_products::<Q8_0>;
}

/// The products on the nibble layouts (`L`: `Q4_0` or `Q4_1`).
fn nibbles<const L: u8>(product: Product) {
    const { assert!(L == Q4_0 || L == Q4_1, "nibble layouts only") };
    let nb = product.n / QK;
    let run = |product, corrections: &[i32]| {
        sweep(product, 1, |p| {
            // Not read for Q4_1, whose `corrections` is empty.
            let c = corrections.as_ptr().wrapping_add(p.t0 * nb);
            // SAFETY: the kernel is only handed out after the CPU was found to
            // support AVX2, FMA and F16C; `check_repacked` verified that every
            // group of `nb` blocks, the pass's activation rows and their
            // outputs (eight floats per token at `out_stride`) lie within the
            // slices; for Q4_0, `corrections` holds `nb` values per token.
            unsafe { by_tokens!(p.tn => group::<_, L>(p.nb, p.w, p.a, p.a_stride, c, p.out, p.out_stride)) }
        })
    };
    // Q4_0: the levels' offset of 8 times each block's activation sum.
    // SAFETY: the kernel is only handed out after the CPU was found to
    // support AVX2.
    unsafe { with_block_sums(product, if L == Q4_1 { 0 } else { 8 }, run) }
}

/// One group of eight rows at `w` against `T` activation rows at `a`
/// (layout `L`: `Q4_0x8` with Q8_0 activations or `Q4_1x8` with Q8_1).
///
/// # Safety
/// AVX2, FMA and F16C must be available; `nb` group blocks at `w`, `T` rows
/// of `nb` activation blocks at `a` (`a_stride` apart) and, for `Q4_0`, `T * nb`
/// corrections must be readable, eight floats at `out + t * out_stride` writable for `t < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group<const T: usize, const L: u8>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    corrections: *const i32,
    out: *mut f32,
    out_stride: usize,
) {
    let layout = layout(L);
    let (block_bytes, quants_at) = (REPACK_ROWS * layout.ty().type_size(), layout.group_quants());
    let (act_bytes, act_quants) = (layout.activation_type().type_size(), layout.act_quants());
    let low = _mm256_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let blk = w.add(b * block_bytes);
        prefetch(blk.wrapping_add(AHEAD_BYTES), block_bytes);
        // Per quant vector m, lane r holds levels 4m..4m+3 of row r in its low
        // nibbles and 16+4m..16+4m+3 in its high ones; one weight vector is
        // live at a time while every token's 16-bit sums take it in.
        let mut s16 = [_mm256_setzero_si256(); T];
        for m in 0..4 {
            let raw = _mm256_loadu_si256(blk.add(quants_at + 32 * m).cast());
            let (lo, hi) = (_mm256_and_si256(raw, low), _mm256_and_si256(_mm256_srli_epi16::<4>(raw), low));
            for (t, s16_t) in s16.iter_mut().enumerate() {
                let qa = a.add(t * a_stride + b * act_bytes + act_quants);
                let quad = |k: usize| _mm256_set1_epi32(qa.add(4 * k).cast::<i32>().read_unaligned());
                let both = _mm256_add_epi16(_mm256_maddubs_epi16(lo, quad(m)), _mm256_maddubs_epi16(hi, quad(m + 4)));
                *s16_t = _mm256_add_epi16(*s16_t, both);
            }
            pin(&mut s16);
        }
        let d_w = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
        for (t, (acc_t, s16)) in acc.iter_mut().zip(s16).enumerate() {
            let ab = a.add(t * a_stride + b * act_bytes);
            let mut sums = _mm256_madd_epi16(s16, ones);
            if L == Q4_0 {
                sums = _mm256_sub_epi32(sums, _mm256_set1_epi32(*corrections.add(t * nb + b)));
            }
            let scale = _mm256_mul_ps(d_w, _mm256_set1_ps(load_f16(ab)));
            *acc_t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, *acc_t);
            if L == Q4_1 {
                let m_w = _mm256_cvtph_ps(_mm_loadu_si128(blk.add(2 * REPACK_ROWS).cast()));
                *acc_t = _mm256_fmadd_ps(m_w, _mm256_set1_ps(load_f16(ab.add(2))), *acc_t);
            }
        }
    }
    for (t, acc_t) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(t * out_stride), *acc_t);
    }
}

/// The `Q8_0x8` product. Per group, block and token, the eight 32-byte
/// vectors of quants (lane `r`: four quants of row `r`) are multiplied with
/// the matching four activation quants broadcast to every lane, the sign of
/// the weight moved onto the activation so that `maddubs` sees `|w|`; each
/// product is widened to 32 bits and summed, giving every row's exact block
/// sum in its lane. One conversion and one FMA per eight rows follow.
fn q8_products<const L: u8>(product: Product) {
    const { assert!(L == Q8_0, "the Q8_0x8 layout only") };
    sweep(product, 1, |p| {
        // SAFETY: the kernel is only handed out after the CPU was found to
        // support AVX2, FMA and F16C; `check_repacked` verified that every group of
        // `nb` blocks, the pass's activation rows and their outputs (eight
        // floats per token at `out_stride`) lie within the slices.
        unsafe { by_tokens!(p.tn => group_q8::<_>(p.nb, p.w, p.a, p.a_stride, p.out, p.out_stride)) }
    });
}

/// One `Q8_0x8` group of eight rows at `w` against `T` activation rows at `a`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `nb` group blocks at `w` and `T`
/// rows of `nb` Q8_0 blocks at `a` (`a_stride` apart) must be readable, eight
/// floats at `out + t * out_stride` writable for `t < T`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn group_q8<const T: usize>(
    nb: usize,
    w: *const u8,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let ones = _mm256_set1_epi16(1);
    let quants_at = Repacked::Q8_0x8.group_quants();
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..nb {
        let blk = w.add(b * Q8_GROUP_BLOCK_BYTES);
        prefetch(blk.wrapping_add(AHEAD_BYTES), Q8_GROUP_BLOCK_BYTES);
        let mut sums = [_mm256_setzero_si256(); T];
        for k in 0..8 {
            let wk = _mm256_loadu_si256(blk.add(quants_at + 32 * k).cast());
            let magnitudes = _mm256_abs_epi8(wk);
            for (t, sum) in sums.iter_mut().enumerate() {
                let quad = a.add(t * a_stride + b * Q8_0_BYTES + 2 + 4 * k);
                let quad = _mm256_set1_epi32(quad.cast::<i32>().read_unaligned());
                let pairs = _mm256_maddubs_epi16(magnitudes, _mm256_sign_epi8(quad, wk));
                *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(pairs, ones));
            }
            // One weight vector live at a time (see `pin`).
            pin(&mut sums);
        }
        let d_w = _mm256_cvtph_ps(_mm_loadu_si128(blk.cast()));
        for (t, (acc_t, sum)) in acc.iter_mut().zip(sums).enumerate() {
            let scale = _mm256_mul_ps(d_w, _mm256_set1_ps(load_f16(a.add(t * a_stride + b * Q8_0_BYTES))));
            *acc_t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), scale, *acc_t);
        }
    }
    for (t, acc_t) in acc.iter().enumerate() {
        _mm256_storeu_ps(out.add(t * out_stride), *acc_t);
    }
}
