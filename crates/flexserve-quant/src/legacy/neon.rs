//! NEON kernels for the 32-element block formats (aarch64), bit-identical
//! to the portable ones: the dots of Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 and the
//! Q8_0 / Q8_1 activation quantizers. Dequantization and the weight
//! quantizers stay portable.
//!
//! A dot keeps the portable (and x86) kernels' eight f32 lanes as two
//! vectors: per block, lane `j` is the exact integer sum of the products of
//! elements `4j..4j + 4` (`simd::neon::dot4`: `sdot` at `Isa::NeonDot`, widening
//! multiplies at `Isa::Neon`), converted to f32 and fused-multiply-added
//! with `d_w * d_a`; the minimum terms of Q4_1 / Q5_1 have their own chain
//! of fused multiply-adds, and the lanes fold as `lanes_dot` folds them.
//!
//! `kernels` is only asked (by `dispatch`) for a NEON tier that
//! `detected_isa` found, and for the dot-product variants (`dotprod`) only
//! at `Isa::NeonDot`.

use super::{
    read_f16, read_u32, write_f16, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, Q8_1_BYTES, QK,
};
use crate::simd::neon::{dot4, fifth_bits, fold8, load_f32, load_i8, load_u8, store_i8};
use crate::types::{DotFn, Kernels, QuantizeFn};
use flexserve_gguf::GgmlType;
use std::arch::aarch64::*;

/// Replaces the portable kernels of `portable.ty` with the NEON ones: with
/// the dot-product instructions (`dotprod`, `Isa::NeonDot` only) or without
/// (`Isa::Neon`).
pub(crate) fn kernels(portable: Kernels, dotprod: bool) -> Kernels {
    use GgmlType::*;
    let pick = |neon: DotFn, with_dot: DotFn| Some(if dotprod { with_dot } else { neon });
    let (quantize, dot): (QuantizeFn, Option<DotFn>) = match portable.ty {
        Q4_0 => (portable.quantize, pick(dot_q4_0_q8_0_neon, dot_q4_0_q8_0_dotprod)),
        Q4_1 => (portable.quantize, pick(dot_q4_1_q8_1_neon, dot_q4_1_q8_1_dotprod)),
        Q5_0 => (portable.quantize, pick(dot_q5_0_q8_0_neon, dot_q5_0_q8_0_dotprod)),
        Q5_1 => (portable.quantize, pick(dot_q5_1_q8_1_neon, dot_q5_1_q8_1_dotprod)),
        Q8_0 => (quantize_q8_0, pick(dot_q8_0_q8_0_neon, dot_q8_0_q8_0_dotprod)),
        Q8_1 => (quantize_q8_1, None),
        _ => return portable,
    };
    Kernels { quantize, dot, ..portable }
}

// ---------------------------------------------------------------------------
// Dot products

/// The blocks of `n / 32` elements of both rows (a caller bug, and a panic,
/// if either is shorter).
fn rows<'a>(n: usize, w: &'a [u8], w_block: usize, a: &'a [u8], a_block: usize) -> (&'a [u8], &'a [u8]) {
    let nb = n / QK;
    assert!(
        w.len() >= nb * w_block && a.len() >= nb * a_block,
        "dot of {n} elements: rows of {} and {} bytes are too short",
        w.len(),
        a.len()
    );
    (&w[..nb * w_block], &a[..nb * a_block])
}

/// The eight f32 lanes of a dot, and its chain of minimum terms.
struct Lanes {
    lo: float32x4_t,
    hi: float32x4_t,
    offsets: f32,
}

impl Lanes {
    #[target_feature(enable = "neon")]
    #[inline]
    fn new() -> Lanes {
        Lanes { lo: vdupq_n_f32(0.0), hi: vdupq_n_f32(0.0), offsets: 0.0 }
    }

    /// One block: weight levels `w_lo` (elements 0-15) and `w_hi` (16-31)
    /// against the activation bytes `a`, scaled by `scale`.
    #[target_feature(enable = "neon")]
    #[inline]
    fn block<const DOT: bool>(&mut self, w_lo: int8x16_t, w_hi: int8x16_t, a: &[u8], scale: f32) {
        let zero = vdupq_n_s32(0);
        let lo = dot4::<DOT>(zero, w_lo, load_i8(&a[..16]));
        let hi = dot4::<DOT>(zero, w_hi, load_i8(&a[16..32]));
        self.lo = vfmaq_n_f32(self.lo, vcvtq_f32_s32(lo), scale);
        self.hi = vfmaq_n_f32(self.hi, vcvtq_f32_s32(hi), scale);
    }

    #[inline]
    fn min_term(&mut self, m: f32, s: f32) {
        self.offsets = m.mul_add(s, self.offsets);
    }

    #[target_feature(enable = "neon")]
    #[inline]
    fn sum(self) -> f32 {
        fold8(self.lo, self.hi) + self.offsets
    }
}

/// The 32 nibbles of `qs[16]` as levels: low nibbles (elements 0-15), high
/// nibbles (16-31).
#[target_feature(enable = "neon")]
#[inline]
fn nibbles(qs: &[u8]) -> (uint8x16_t, uint8x16_t) {
    let q = load_u8(qs);
    (vandq_u8(q, vdupq_n_u8(0x0F)), vshrq_n_u8::<4>(q))
}

/// The 32 5-bit levels of `qs[16]` and `qh`.
#[target_feature(enable = "neon")]
#[inline]
fn levels5(qs: &[u8], qh: u32) -> (uint8x16_t, uint8x16_t) {
    let (lo, hi) = nibbles(qs);
    (vorrq_u8(lo, fifth_bits(qh as u16)), vorrq_u8(hi, fifth_bits((qh >> 16) as u16)))
}

/// Levels less `offset`, as signed bytes.
#[target_feature(enable = "neon")]
#[inline]
fn signed(q: uint8x16_t, offset: u8) -> int8x16_t {
    vreinterpretq_s8_u8(vsubq_u8(q, vdupq_n_u8(offset)))
}

#[target_feature(enable = "neon")]
fn dot_q4_0_q8_0<const DOT: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = rows(n, w, Q4_0_BYTES, a, Q8_0_BYTES);
    let mut lanes = Lanes::new();
    for (wb, ab) in w.chunks_exact(Q4_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let (lo, hi) = nibbles(&wb[2..18]);
        lanes.block::<DOT>(signed(lo, 8), signed(hi, 8), &ab[2..34], read_f16(wb, 0) * read_f16(ab, 0));
    }
    lanes.sum()
}

#[target_feature(enable = "neon")]
fn dot_q4_1_q8_1<const DOT: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = rows(n, w, Q4_1_BYTES, a, Q8_1_BYTES);
    let mut lanes = Lanes::new();
    for (wb, ab) in w.chunks_exact(Q4_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
        let (lo, hi) = nibbles(&wb[4..20]);
        lanes.block::<DOT>(signed(lo, 0), signed(hi, 0), &ab[4..36], read_f16(wb, 0) * read_f16(ab, 0));
        lanes.min_term(read_f16(wb, 2), read_f16(ab, 2));
    }
    lanes.sum()
}

#[target_feature(enable = "neon")]
fn dot_q5_0_q8_0<const DOT: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = rows(n, w, Q5_0_BYTES, a, Q8_0_BYTES);
    let mut lanes = Lanes::new();
    for (wb, ab) in w.chunks_exact(Q5_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        let (lo, hi) = levels5(&wb[6..22], read_u32(wb, 2));
        lanes.block::<DOT>(signed(lo, 16), signed(hi, 16), &ab[2..34], read_f16(wb, 0) * read_f16(ab, 0));
    }
    lanes.sum()
}

#[target_feature(enable = "neon")]
fn dot_q5_1_q8_1<const DOT: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = rows(n, w, Q5_1_BYTES, a, Q8_1_BYTES);
    let mut lanes = Lanes::new();
    for (wb, ab) in w.chunks_exact(Q5_1_BYTES).zip(a.chunks_exact(Q8_1_BYTES)) {
        let (lo, hi) = levels5(&wb[8..24], read_u32(wb, 4));
        lanes.block::<DOT>(signed(lo, 0), signed(hi, 0), &ab[4..36], read_f16(wb, 0) * read_f16(ab, 0));
        lanes.min_term(read_f16(wb, 2), read_f16(ab, 2));
    }
    lanes.sum()
}

#[target_feature(enable = "neon")]
fn dot_q8_0_q8_0<const DOT: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = rows(n, w, Q8_0_BYTES, a, Q8_0_BYTES);
    let mut lanes = Lanes::new();
    for (wb, ab) in w.chunks_exact(Q8_0_BYTES).zip(a.chunks_exact(Q8_0_BYTES)) {
        lanes.block::<DOT>(load_i8(&wb[2..18]), load_i8(&wb[18..34]), &ab[2..34], read_f16(wb, 0) * read_f16(ab, 0));
    }
    lanes.sum()
}

/// Safe entry points of a dot at both tiers: `$neon` (widening multiplies)
/// and `$dotprod` (the dot-product instruction, `Isa::NeonDot` only).
macro_rules! dot_wrappers {
    ($($neon:ident, $dotprod:ident => $generic:ident;)*) => {
        $(
            fn $neon(n: usize, w: &[u8], a: &[u8]) -> f32 {
                // SAFETY: NEON is part of every aarch64 CPU this runs on (the
                // target's baseline, and `detected_isa` confirmed it).
                unsafe { $generic::<false>(n, w, a) }
            }

            fn $dotprod(n: usize, w: &[u8], a: &[u8]) -> f32 {
                #[target_feature(enable = "neon,dotprod")]
                fn with_dotprod(n: usize, w: &[u8], a: &[u8]) -> f32 {
                    $generic::<true>(n, w, a)
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
    dot_q4_0_q8_0_neon, dot_q4_0_q8_0_dotprod => dot_q4_0_q8_0;
    dot_q4_1_q8_1_neon, dot_q4_1_q8_1_dotprod => dot_q4_1_q8_1;
    dot_q5_0_q8_0_neon, dot_q5_0_q8_0_dotprod => dot_q5_0_q8_0;
    dot_q5_1_q8_1_neon, dot_q5_1_q8_1_dotprod => dot_q5_1_q8_1;
    dot_q8_0_q8_0_neon, dot_q8_0_q8_0_dotprod => dot_q8_0_q8_0;
);

// ---------------------------------------------------------------------------
// Activation quantizers

/// `quantize_block_8bit` of `legacy.rs` on one block: `d = amax / 127`,
/// quants `round_half_even(x * (127 / amax))` (saturating, NaN to 0, as
/// `as i8` does), and their sum.
#[target_feature(enable = "neon")]
#[inline]
fn quantize_block_8bit(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let v: [float32x4_t; 8] = std::array::from_fn(|i| load_f32(&x[4 * i..]));
    // `maxnm` skips NaNs as `f32::max` does; the fold starts from 0.
    let m = v.iter().fold(vdupq_n_f32(0.0), |m, &v| vmaxnmq_f32(m, vabsq_f32(v)));
    let amax = vmaxnmvq_f32(m);
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    // Round to nearest, ties to even, saturating (NaN to 0), then narrow
    // with saturation: `round_half_even(v * id) as i8`.
    let q: [int32x4_t; 8] = std::array::from_fn(|i| vcvtnq_s32_f32(vmulq_n_f32(v[i], id)));
    let mut sum = 0i32;
    for (half, out) in q.chunks_exact(4).zip(qs.chunks_exact_mut(16)) {
        let q16 = vcombine_s16(vqmovn_s32(half[0]), vqmovn_s32(half[1]));
        let q16b = vcombine_s16(vqmovn_s32(half[2]), vqmovn_s32(half[3]));
        let q8 = vcombine_s8(vqmovn_s16(q16), vqmovn_s16(q16b));
        sum += vaddlvq_s8(q8) as i32;
        store_i8(out, q8);
    }
    (d, sum)
}

fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        // SAFETY: NEON is part of every aarch64 CPU this runs on (the target's
        // baseline; `detected_isa` confirmed it).
        let (d, _) = unsafe { quantize_block_8bit(x, &mut block[2..34]) };
        write_f16(block, 0, d);
    }
}

fn quantize_q8_1(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_1_BYTES)) {
        // SAFETY: as in `quantize_q8_0`.
        let (d, sum) = unsafe { quantize_block_8bit(x, &mut block[4..36]) };
        write_f16(block, 0, d);
        write_f16(block, 2, d * sum as f32);
    }
}
