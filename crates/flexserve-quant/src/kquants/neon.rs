//! NEON kernels for the K-quants (aarch64), bit-identical to the portable
//! ones: the Q4_K, Q5_K and Q6_K dots against Q8_K and the Q8_K quantizer.
//! Dequantization and the weight quantizers stay portable.
//!
//! The integer parts are exact sums whichever way they are added (`sdot`
//! at `Isa::NeonDot`, widening multiplies at `Isa::Neon`); the float parts
//! are the portable kernels' operations in their order: Q4_K / Q5_K one f32
//! chain per row (`sum += d_a * d * isum - d_a * dmin * msum`), Q6_K the
//! eight lanes of `q6k::lane_sums` with one fused multiply-add each per
//! super-block and the same fold.

use super::q4k::min_term;
use super::{check_dot, q4k, q5k, q6k, q8k, read_f16, unpack_scales_mins, QK_K};
use crate::simd::neon::{dot4, fold8, load_f32, load_i8, load_u8, store_i8};
use crate::types::{DotFn, Kernels};
use flexserve_gguf::GgmlType;
use std::arch::aarch64::*;

/// Replaces the portable kernels of `portable.ty` with the NEON ones: with
/// the dot-product instructions (`dotprod`, `Isa::NeonDot` only) or without
/// (`Isa::Neon`).
pub(crate) fn kernels(portable: Kernels, dotprod: bool) -> Kernels {
    let pick = |neon: DotFn, with_dot: DotFn| Some(if dotprod { with_dot } else { neon });
    match portable.ty {
        GgmlType::Q8_K => Kernels { quantize: quantize_q8k, ..portable },
        GgmlType::Q4_K => Kernels { dot: pick(dot_q4k_neon, dot_q4k_dotprod), ..portable },
        GgmlType::Q5_K => Kernels { dot: pick(dot_q5k_neon, dot_q5k_dotprod), ..portable },
        GgmlType::Q6_K => Kernels { dot: pick(dot_q6k_neon, dot_q6k_dotprod), ..portable },
        _ => portable,
    }
}

/// The exact sum over `j` of `scale_j * sum(levels * a)` of one sub-block
/// of 32 levels (`lo`: 0-15, `hi`: 16-31) against `a[..32]`, added to
/// `acc` lane-wise (the lanes are summed by the caller).
#[target_feature(enable = "neon")]
#[inline]
fn scaled_sub<const DOT: bool>(acc: int32x4_t, lo: uint8x16_t, hi: uint8x16_t, a: &[u8], scale: u8) -> int32x4_t {
    let s = dot4::<DOT>(vdupq_n_s32(0), vreinterpretq_s8_u8(lo), load_i8(&a[..16]));
    let s = dot4::<DOT>(s, vreinterpretq_s8_u8(hi), load_i8(&a[16..32]));
    vmlaq_n_s32(acc, s, scale as i32)
}

/// Q4_K (`FIFTH`: false) and Q5_K (true) against Q8_K.
#[target_feature(enable = "neon")]
fn dot_affine<const DOT: bool, const FIFTH: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (ty, bytes, scales_at, qs_at) = if FIFTH {
        (GgmlType::Q5_K, q5k::BYTES, q5k::SCALES, q5k::QS)
    } else {
        (GgmlType::Q4_K, q4k::BYTES, q4k::SCALES, q4k::QS)
    };
    check_dot(ty, n, w, bytes, a);
    let mut sum = 0.0f32;
    let low = vdupq_n_u8(0x0F);
    for (wb, ab) in w.chunks_exact(bytes).zip(a.chunks_exact(q8k::BYTES)) {
        let (scales, mins) = unpack_scales_mins(&wb[scales_at..scales_at + 12]);
        let qs = &wb[qs_at..];
        let a_qs = &ab[q8k::QS..q8k::BSUMS];
        let mut acc = vdupq_n_s32(0);
        for c in 0..4 {
            let (q0, q1) = (load_u8(&qs[32 * c..]), load_u8(&qs[32 * c + 16..]));
            let (mut lo0, mut lo1) = (vandq_u8(q0, low), vandq_u8(q1, low));
            let (mut hi0, mut hi1) = (vshrq_n_u8::<4>(q0), vshrq_n_u8::<4>(q1));
            if FIFTH {
                // Bit 2c of qh[l] is the fifth bit of the low sub-block's
                // element l, bit 2c + 1 the high one's.
                let (h0, h1) = (load_u8(&wb[q5k::QH..]), load_u8(&wb[q5k::QH + 16..]));
                let five = vdupq_n_u8(0x10);
                let (bit_lo, bit_hi) = (vdupq_n_u8(1 << (2 * c)), vdupq_n_u8(2 << (2 * c)));
                lo0 = vorrq_u8(lo0, vandq_u8(vtstq_u8(h0, bit_lo), five));
                lo1 = vorrq_u8(lo1, vandq_u8(vtstq_u8(h1, bit_lo), five));
                hi0 = vorrq_u8(hi0, vandq_u8(vtstq_u8(h0, bit_hi), five));
                hi1 = vorrq_u8(hi1, vandq_u8(vtstq_u8(h1, bit_hi), five));
            }
            acc = scaled_sub::<DOT>(acc, lo0, lo1, &a_qs[64 * c..], scales[2 * c]);
            acc = scaled_sub::<DOT>(acc, hi0, hi1, &a_qs[64 * c + 32..], scales[2 * c + 1]);
        }
        let isum = vaddvq_s32(acc);
        let msum = min_term(&mins, ab);
        let d_a = q8k::block_scale(ab);
        sum += d_a * read_f16(wb, 0) * isum as f32 - d_a * read_f16(wb, 2) * msum as f32;
    }
    sum
}

/// Q6_K against Q8_K in the eight lanes of `q6k::lane_sums`.
#[target_feature(enable = "neon")]
fn dot_q6k<const DOT: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    check_dot(GgmlType::Q6_K, n, w, q6k::BYTES, a);
    let (mut acc_lo, mut acc_hi) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
    let (low, two) = (vdupq_n_u8(0x0F), vdupq_n_u8(0x30));
    for (wb, ab) in w.chunks_exact(q6k::BYTES).zip(a.chunks_exact(q8k::BYTES)) {
        let a_qs = &ab[q8k::QS..q8k::BSUMS];
        let scale = |s: usize| wb[q6k::SCALES + s] as i8 as i32;
        let (mut lo, mut hi) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for half in 0..2 {
            let ql = &wb[64 * half..64 * half + 64];
            let qh = &wb[q6k::QH + 32 * half..q6k::QH + 32 * half + 32];
            // Per 16-byte column group g (elements l = 16g..16g + 16 of
            // each 32-element chunk): the unsigned levels of the four chunks.
            for g in 0..2 {
                let (a_lo, a_hi, h) = (load_u8(&ql[16 * g..]), load_u8(&ql[32 + 16 * g..]), load_u8(&qh[16 * g..]));
                let levels = [
                    vorrq_u8(vandq_u8(a_lo, low), vandq_u8(vshlq_n_u8::<4>(h), two)),
                    vorrq_u8(vandq_u8(a_hi, low), vandq_u8(vshlq_n_u8::<2>(h), two)),
                    vorrq_u8(vshrq_n_u8::<4>(a_lo), vandq_u8(h, two)),
                    vorrq_u8(vshrq_n_u8::<4>(a_hi), vandq_u8(vshrq_n_u8::<2>(h), two)),
                ];
                for (k, q) in levels.into_iter().enumerate() {
                    // Chunk 4 * half + k; its group g is 16-element sub-block
                    // 2 * chunk + g, which goes to lanes 4g..4g + 4.
                    let chunk = 4 * half + k;
                    let s = dot4::<DOT>(vdupq_n_s32(0), vreinterpretq_s8_u8(q), load_i8(&a_qs[32 * chunk + 16 * g..]));
                    let scaled = vmulq_n_s32(s, scale(2 * chunk + g));
                    if g == 0 {
                        lo = vaddq_s32(lo, scaled);
                    } else {
                        hi = vaddq_s32(hi, scaled);
                    }
                }
            }
        }
        let offsets: [i32; 8] = std::array::from_fn(|l| {
            32 * (q8k::group_sum(ab, 2 * l) * scale(2 * l) + q8k::group_sum(ab, 2 * l + 1) * scale(2 * l + 1))
        });
        // SAFETY: `offsets` is 8 readable i32s; `vld1q_s32` needs an i32's
        // alignment, which the array has.
        let (off_lo, off_hi) = unsafe { (vld1q_s32(offsets.as_ptr()), vld1q_s32(offsets[4..].as_ptr())) };
        let d = q8k::block_scale(ab) * read_f16(wb, q6k::D);
        acc_lo = vfmaq_n_f32(acc_lo, vcvtq_f32_s32(vsubq_s32(lo, off_lo)), d);
        acc_hi = vfmaq_n_f32(acc_hi, vcvtq_f32_s32(vsubq_s32(hi, off_hi)), d);
    }
    fold8(acc_lo, acc_hi)
}

/// Safe entry points of a dot at both tiers: `$neon` (widening multiplies)
/// and `$dotprod` (the dot-product instruction, `Isa::NeonDot` only).
macro_rules! dot_wrappers {
    ($($neon:ident, $dotprod:ident => $generic:ident::<$($param:literal),*>;)*) => {
        $(
            fn $neon(n: usize, w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: NEON is part of every aarch64 CPU this runs on (the
                // target's baseline, and `detected_isa` confirmed it).
                unsafe { $generic::<false $(, $param)*>(n, w, a) }
            }

            fn $dotprod(n: usize, w: &[u8], a: &[u8]) -> f32 {
                #[target_feature(enable = "neon,dotprod")]
                fn with_dotprod(n: usize, w: &[u8], a: &[u8]) -> f32 {
                    $generic::<true $(, $param)*>(n, w, a)
                }
                // SAFETY: handed out by `kernels` only with `dotprod`, which
                // `dispatch` asks for only at `Isa::NeonDot`, a tier that
                // `detected_isa` reports only for a CPU with `dotprod`.
                unsafe { with_dotprod(n, w, a) }
            }
        )*
    };
}

dot_wrappers!(
    dot_q4k_neon, dot_q4k_dotprod => dot_affine::<false>;
    dot_q5k_neon, dot_q5k_dotprod => dot_affine::<true>;
    dot_q6k_neon, dot_q6k_dotprod => dot_q6k::<>;
);

/// `q8k::quantize` with NEON: the first value of largest magnitude maps to
/// -127; quants `round_ties_even(iscale * x)` capped to -128..=127 (a NaN
/// product to 127, as `minnm` and `f32::min` give), and the 16-element sums.
fn quantize_q8k(src: &[f32], dst: &mut [u8]) {
    super::check_row(GgmlType::Q8_K, src.len(), q8k::BYTES, dst.len());
    for (x, block) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(q8k::BYTES)) {
        // SAFETY: NEON is part of every aarch64 CPU this runs on (the
        // target's baseline, and `detected_isa` confirmed it).
        unsafe { quantize_q8k_block(x, block) }
    }
}

#[target_feature(enable = "neon")]
fn quantize_q8k_block(x: &[f32], block: &mut [u8]) {
    // `maxnm` skips NaNs, as the portable search does.
    let mut m = vdupq_n_f32(0.0);
    for i in (0..QK_K).step_by(4) {
        m = vmaxnmq_f32(m, vabsq_f32(load_f32(&x[i..])));
    }
    let amax = vmaxnmvq_f32(m);
    // The first value of that magnitude, with its sign (`signed_absmax`).
    let max = if amax > 0.0 { x.iter().copied().find(|v| v.abs() == amax).unwrap_or(0.0) } else { 0.0 };
    if max == 0.0 {
        block.fill(0);
        return;
    }
    let iscale = -127.0 / max;
    let (hi, lo) = (vdupq_n_f32(127.0), vdupq_n_f32(-128.0));
    let quant = |i: usize| {
        let r = vrndnq_f32(vmulq_n_f32(load_f32(&x[i..]), iscale));
        vcvtq_s32_f32(vmaxnmq_f32(vminnmq_f32(r, hi), lo))
    };
    for g in 0..QK_K / 16 {
        let at = 16 * g;
        let q16a = vcombine_s16(vqmovn_s32(quant(at)), vqmovn_s32(quant(at + 4)));
        let q16b = vcombine_s16(vqmovn_s32(quant(at + 8)), vqmovn_s32(quant(at + 12)));
        let q8 = vcombine_s8(vqmovn_s16(q16a), vqmovn_s16(q16b));
        store_i8(&mut block[q8k::QS + at..], q8);
        let sum = vaddlvq_s8(q8);
        block[q8k::BSUMS + 2 * g..q8k::BSUMS + 2 * g + 2].copy_from_slice(&sum.to_le_bytes());
    }
    block[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}
