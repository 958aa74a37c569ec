//! NEON helpers shared by the aarch64 kernels (`legacy/neon.rs`,
//! `kquants/neon.rs`); they import nothing from the rest of the crate.
//!
//! Every helper is a safe `#[target_feature(enable = "neon")]` function:
//! NEON is part of every aarch64 Linux CPU (and of the target's baseline),
//! and the kernels call them from functions with the same feature. Loads and
//! stores take slices and check their length, so that the raw-pointer
//! intrinsics behind them never leave the slice.

use std::arch::aarch64::*;

/// The 16 bytes at the start of `s` (any alignment).
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn load_u8(s: &[u8]) -> uint8x16_t {
    let s: &[u8; 16] = s[..16].try_into().expect("16 bytes");
    // SAFETY: `s` is 16 readable bytes; `vld1q_u8` needs no alignment.
    unsafe { vld1q_u8(s.as_ptr()) }
}

/// The 16 bytes at the start of `s` as signed bytes.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn load_i8(s: &[u8]) -> int8x16_t {
    vreinterpretq_s8_u8(load_u8(s))
}

/// The 4 floats at the start of `s`.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn load_f32(s: &[f32]) -> float32x4_t {
    let s: &[f32; 4] = s[..4].try_into().expect("4 floats");
    // SAFETY: `s` is 4 readable floats; `vld1q_f32` needs the alignment of
    // an f32, which a `&[f32]` has.
    unsafe { vld1q_f32(s.as_ptr()) }
}

/// Writes `v` to the first 16 bytes of `s`.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn store_i8(s: &mut [u8], v: int8x16_t) {
    let s: &mut [u8; 16] = (&mut s[..16]).try_into().expect("16 bytes");
    // SAFETY: `s` is 16 writable bytes; `vst1q_s8` needs no alignment.
    unsafe { vst1q_s8(s.as_mut_ptr().cast(), v) }
}

/// `acc` plus, in lane `j`, the exact sum of the four products
/// `a[4j + k] * b[4j + k]`, with the dot-product instruction (`DOT`) or by
/// widening multiplies; the sums are exact integers either way.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn dot4<const DOT: bool>(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    if DOT {
        // SAFETY: kernels are instantiated with `DOT` only inside functions
        // enabled for `dotprod`, which are handed out only where the CPU has
        // it (`Isa::NeonDot`, from `detected_isa`).
        return unsafe { sdot(acc, a, b) };
    }
    let lo = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    let hi = vmull_high_s8(a, b);
    vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)))
}

/// `sdot acc.4s, a.16b, b.16b` (its intrinsic is not stable in Rust yet).
#[target_feature(enable = "neon,dotprod")]
#[inline]
fn sdot(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
    // SAFETY: the instruction reads and writes only these registers; this
    // function's callers have checked that the CPU has it.
    unsafe {
        std::arch::asm!(
            "sdot {acc:v}.4s, {a:v}.16b, {b:v}.16b",
            acc = inout(vreg) acc,
            a = in(vreg) a,
            b = in(vreg) b,
            options(pure, nomem, nostack, preserves_flags)
        );
    }
    acc
}

/// The fold of the x86 dot products' eight lanes (`lo` = lanes 0-3, `hi` =
/// 4-7): `((l0 + l4) + (l2 + l6)) + ((l1 + l5) + (l3 + l7))`.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn fold8(lo: float32x4_t, hi: float32x4_t) -> f32 {
    let t = vaddq_f32(hi, lo);
    let u = vadd_f32(vget_low_f32(t), vget_high_f32(t));
    vget_lane_f32::<0>(u) + vget_lane_f32::<1>(u)
}

/// Sixteen bytes, each `0x10` where bit `j` of `bits` is set (`j` the
/// byte's index), else 0: the fifth bits of sixteen 5-bit levels.
#[target_feature(enable = "neon")]
#[inline]
pub(crate) fn fifth_bits(bits: u16) -> uint8x16_t {
    const SPREAD: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1];
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let bytes = vreinterpretq_u8_u16(vdupq_n_u16(bits));
    let spread = vqtbl1q_u8(bytes, load_u8(&SPREAD));
    vandq_u8(vtstq_u8(spread, load_u8(&BIT)), vdupq_n_u8(0x10))
}
