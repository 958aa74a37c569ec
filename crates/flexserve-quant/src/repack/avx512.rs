//! AVX-512 (F, BW, VL, VNNI) kernels for `Q4_0x8`, `Q4_1x8` and `Q8_0x8` weights.
//!
//! A 512-bit vector holds two neighbouring groups: lanes 0..8 the first
//! group's eight rows, lanes 8..16 the second's, each lane four consecutive
//! quants of its row. `vpdpbusd` multiplies them, as unsigned bytes, with the
//! matching four activation quants broadcast to every lane and adds the four
//! products to the lane's 32-bit sum in one instruction, without the 16-bit
//! intermediate of the AVX2 kernels. The unsigned view is exact: Q4_0 levels
//! are the nibbles (0..15, the offset of 8 taken off afterwards as
//! `8 * sum(a)`), Q8_0 quants are flipped to `q + 128` (0..255, taken off as
//! `128 * sum(a)`), so every block sum is the exact integer dot and even
//! quants of -128 on either side need no care; Q4_1 levels are unsigned as
//! they stand. Then, as in every kernel for these layouts, one conversion and
//! one FMA with the rounded scale product per block (and for Q4_1 one FMA of
//! the minimums): results are bit-identical to the portable kernel.

use super::sweep::{by_tokens, sweep, with_block_sums, Pass};
use super::{entry_points, layout, Product, Q4_0, Q4_1, Q8_0, REPACK_ROWS};
use crate::legacy::QK;
use crate::simd::avx2::load_f16;
use crate::simd::avx512::pin;
use std::arch::x86_64::*;

/// Groups per pass: one 512-bit vector covers two groups of eight rows.
const GROUPS: usize = 2;

/// What the unsigned view adds to each weight quant, times the activation
/// sum, to be taken off each block sum.
const fn offset(l: u8) -> i32 {
    match l {
        Q4_0 => 8,
        Q4_1 => 0,
        _ => 128,
    }
}

entry_points! {
    /// The `Q4_0x8` product (see the module docs).
    q4_0x8 => products::<Q4_0>;
    /// The `Q4_1x8` product (see the module docs).
    q4_1x8 => products::<Q4_1>;
    /// The `Q8_0x8` product (see the module docs).
    q8_0x8 => products::<Q8_0>;
}

/// The products of every layout (`L`).
fn products<const L: u8>(product: Product) {
    let nb = product.n / QK;
    let run = |product, corrections: &[i32]| {
        sweep(product, GROUPS, |p: Pass| {
            // Not read for Q4_1, whose `corrections` is empty.
            let c = corrections.as_ptr().wrapping_add(p.t0 * nb);
            // A lone last group reads itself twice and stores only its own lanes.
            let (second, lanes) =
                if p.groups == GROUPS { (p.w.wrapping_add(p.group_bytes), 0xFFFF) } else { (p.w, 0x00FF) };
            // SAFETY: the kernel is only handed out after the CPU was found to
            // support AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; `check_repacked`
            // verified that every group of `nb` blocks, the pass's activation
            // rows and their outputs (eight floats per group and token at
            // `out_stride`) lie within the slices, and `second` is a group of
            // the pass; but for Q4_1, `corrections` holds `nb` values per token.
            unsafe {
                by_tokens!(p.tn => pair::<_, L>(p.nb, p.w, second, p.a, p.a_stride, c, p.out, p.out_stride, lanes))
            }
        })
    };
    // SAFETY: the kernel is only handed out after the CPU was found to
    // support AVX2 (and AVX-512).
    unsafe { with_block_sums(product, offset(L), run) }
}

/// Two groups at `w0` and `w1` against `T` activation rows at `a`; the
/// results of the lanes set in `lanes` are stored.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `nb` group
/// blocks at `w0` and at `w1`, `T` rows of `nb` Q8_0 blocks at `a`
/// (`a_stride` apart) and `T * nb` corrections must be readable, the lanes
/// of `lanes` among sixteen floats at `out + t * out_stride` writable for `t < T`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair<const T: usize, const L: u8>(
    nb: usize,
    w0: *const u8,
    w1: *const u8,
    a: *const u8,
    a_stride: usize,
    corrections: *const i32,
    out: *mut f32,
    out_stride: usize,
    lanes: __mmask16,
) {
    let layout = layout(L);
    let (block_bytes, quants_at) = (REPACK_ROWS * layout.ty().type_size(), layout.group_quants());
    let (act_bytes, act_quants) = (layout.activation_type().type_size(), layout.act_quants());
    let low = _mm512_set1_epi8(0x0F);
    let flip = _mm512_set1_epi8(i8::MIN);
    let mut acc = [_mm512_setzero_ps(); T];
    for b in 0..nb {
        let (b0, b1) = (w0.add(b * block_bytes), w1.add(b * block_bytes));
        let quads = |t: usize, k: usize| {
            let quad = a.add(t * a_stride + b * act_bytes + act_quants + 4 * k);
            _mm512_set1_epi32(quad.cast::<i32>().read_unaligned())
        };
        let mut sums = [_mm512_setzero_si512(); T];
        // Q8_0: eight vectors of four quants per lane; Q4_0 and Q4_1: four, each
        // holding levels 4m.. in its low nibbles and 16+4m.. in its high ones.
        for m in 0..if L == Q8_0 { 8 } else { 4 } {
            let at = quants_at + 32 * m;
            let raw = _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_loadu_si256(b0.add(at).cast())),
                _mm256_loadu_si256(b1.add(at).cast()),
            );
            if L == Q8_0 {
                let unsigned = _mm512_xor_si512(raw, flip);
                for (t, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_dpbusd_epi32(*sum, unsigned, quads(t, m));
                }
            } else {
                let lo = _mm512_and_si512(raw, low);
                let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), low);
                for (t, sum) in sums.iter_mut().enumerate() {
                    *sum = _mm512_dpbusd_epi32(*sum, lo, quads(t, m));
                    *sum = _mm512_dpbusd_epi32(*sum, hi, quads(t, m + 4));
                }
            }
            // One weight vector live at a time (see `pin`).
            pin(&mut sums);
        }
        let scales = _mm256_inserti128_si256::<1>(
            _mm256_castsi128_si256(_mm_loadu_si128(b0.cast())),
            _mm_loadu_si128(b1.cast()),
        );
        let d_w = _mm512_cvtph_ps(scales);
        for (t, (acc_t, sum)) in acc.iter_mut().zip(sums).enumerate() {
            let ab = a.add(t * a_stride + b * act_bytes);
            let exact =
                if L == Q4_1 { sum } else { _mm512_sub_epi32(sum, _mm512_set1_epi32(*corrections.add(t * nb + b))) };
            let scale = _mm512_mul_ps(d_w, _mm512_set1_ps(load_f16(ab)));
            *acc_t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), scale, *acc_t);
            if L == Q4_1 {
                let mins = _mm256_inserti128_si256::<1>(
                    _mm256_castsi128_si256(_mm_loadu_si128(b0.add(2 * REPACK_ROWS).cast())),
                    _mm_loadu_si128(b1.add(2 * REPACK_ROWS).cast()),
                );
                *acc_t = _mm512_fmadd_ps(_mm512_cvtph_ps(mins), _mm512_set1_ps(load_f16(ab.add(2))), *acc_t);
            }
        }
    }
    for (t, acc_t) in acc.iter().enumerate() {
        _mm512_mask_storeu_ps(out.add(t * out_stride), lanes, *acc_t);
    }
}
