//! Plain floating-point rows: F32, F16 and BF16 (little-endian, one element
//! per "block").
//!
//! Quantizing is conversion (round to nearest even for F16 and BF16). A dot
//! product takes activations in the weight's own type: the products are
//! formed in f32. The portable kernels accumulate F16/BF16 products in f64;
//! the AVX2 ones use one 8-lane f32 FMA accumulator and the AVX-512 ones one
//! 16-lane accumulator, the order their tier's tile and GEMV kernels follow
//! per pair (see `float/avx2.rs` and `float/avx512.rs`); each SIMD dot is the
//! 1 x 1 micro-tile of its tier's tile kernel (`float/matmul.rs`).

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod matmul;

use crate::types::{DequantizeFn, DotFn, Kernels, QuantizeFn};
use flexserve_gguf::GgmlType;
use half::{bf16, f16, slice::HalfFloatSliceExt};

/// The AVX2 tier's kernels of `portable.ty` in place of the portable ones:
/// its dot (the AVX2 tile's 1 x 1 micro-tile) and F16 / BF16 conversions.
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx2_kernels(portable: Kernels) -> Kernels {
    use avx2::{BF16, F16, F32};
    let (dequantize, quantize, dot): (DequantizeFn, QuantizeFn, DotFn) = match portable.ty {
        GgmlType::F32 => (portable.dequantize, portable.quantize, matmul::avx2::dot::<F32>),
        GgmlType::F16 => (avx2::dequantize_f16, avx2::quantize_f16, matmul::avx2::dot::<F16>),
        GgmlType::BF16 => (avx2::dequantize_bf16, portable.quantize, matmul::avx2::dot::<BF16>),
        _ => return portable,
    };
    Kernels { dequantize, quantize, dot: Some(dot), ..portable }
}

/// The AVX-512 tier's kernels of `portable.ty`: its dot (the AVX-512 tile's
/// 1 x 1 micro-tile) and the AVX2 conversions (an element converts to the
/// same value at any width, and the matmuls convert inside their own loops).
#[cfg(target_arch = "x86_64")]
pub(crate) fn avx512_kernels(portable: Kernels) -> Kernels {
    use avx2::{BF16, F16, F32};
    let avx2 = avx2_kernels(portable);
    let dot: DotFn = match portable.ty {
        GgmlType::F32 => matmul::avx512::dot::<F32>,
        GgmlType::F16 => matmul::avx512::dot::<F16>,
        GgmlType::BF16 => matmul::avx512::dot::<BF16>,
        _ => return avx2,
    };
    Kernels { dot: Some(dot), ..avx2 }
}

/// The portable kernels of `ty`, if it is one of these formats.
pub(crate) fn portable_kernels(ty: GgmlType) -> Option<Kernels> {
    let (dequantize, quantize, dot): (DequantizeFn, QuantizeFn, DotFn) = match ty {
        GgmlType::F32 => (dequantize_f32, quantize_f32, dot_f32),
        GgmlType::F16 => (dequantize_f16, quantize_f16, dot_f16),
        GgmlType::BF16 => (dequantize_bf16, quantize_bf16, dot_bf16),
        _ => return None,
    };
    Some(Kernels { ty, vec_dot_type: ty, dequantize, quantize, dot: Some(dot) })
}

#[inline(always)]
fn bf16_bits(b: &[u8]) -> f32 {
    bf16::from_le_bytes([b[0], b[1]]).to_f32()
}

#[inline(always)]
fn f32_bits(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(4).zip(dst) {
        *d = f32_bits(s);
    }
}

/// Elements converted per batch; batches let `half` use its vector conversions.
const BATCH: usize = 64;

/// Converts the little-endian f16 values in `bytes` (at most `BATCH`, two
/// bytes each) into `out`, which must hold exactly that many.
fn decode_f16_batch(bytes: &[u8], out: &mut [f32]) {
    let mut halves = [f16::ZERO; BATCH];
    let halves = &mut halves[..out.len()];
    for (h, b) in halves.iter_mut().zip(bytes.chunks_exact(2)) {
        *h = f16::from_le_bytes([b[0], b[1]]);
    }
    halves.convert_to_f32_slice(out);
}

fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks(2 * BATCH).zip(dst.chunks_mut(BATCH)) {
        let len = d.len().min(s.len() / 2);
        decode_f16_batch(s, &mut d[..len]);
    }
}

fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (s, d) in src.chunks_exact(2).zip(dst) {
        *d = bf16_bits(s);
    }
}

fn quantize_f32(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(4)) {
        d.copy_from_slice(&s.to_le_bytes());
    }
}

fn quantize_f16(src: &[f32], dst: &mut [u8]) {
    let mut halves = [f16::ZERO; BATCH];
    for (s, d) in src.chunks(BATCH).zip(dst.chunks_mut(2 * BATCH)) {
        let len = s.len().min(d.len() / 2);
        halves[..len].convert_from_f32_slice(&s[..len]);
        for (h, out) in halves[..len].iter().zip(d.chunks_exact_mut(2)) {
            out.copy_from_slice(&h.to_le_bytes());
        }
    }
}

fn quantize_bf16(src: &[f32], dst: &mut [u8]) {
    for (s, d) in src.iter().zip(dst.chunks_exact_mut(2)) {
        d.copy_from_slice(&bf16::from_f32(*s).to_le_bytes());
    }
}

/// Dot products take `n` elements from both rows; shorter rows are a caller
/// bug and panic on the slice bounds.
fn dot_f32(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = (&w[..n * 4], &a[..n * 4]);
    // Eight independent partial sums let the compiler vectorise the loop.
    let mut lanes = [0.0f32; 8];
    let (w_main, a_main) = (w.chunks_exact(32), a.chunks_exact(32));
    let (w_tail, a_tail) = (w_main.remainder(), a_main.remainder());
    for (wc, ac) in w_main.zip(a_main) {
        for (l, lane) in lanes.iter_mut().enumerate() {
            *lane += f32_bits(&wc[4 * l..]) * f32_bits(&ac[4 * l..]);
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for (ws, as_) in w_tail.chunks_exact(4).zip(a_tail.chunks_exact(4)) {
        sum += f32_bits(ws) * f32_bits(as_);
    }
    sum
}

fn dot_f16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = (&w[..n * 2], &a[..n * 2]);
    let mut sum = 0.0f64;
    let (mut w_batch, mut a_batch) = ([0.0f32; BATCH], [0.0f32; BATCH]);
    for (wc, ac) in w.chunks(2 * BATCH).zip(a.chunks(2 * BATCH)) {
        let len = wc.len() / 2;
        decode_f16_batch(wc, &mut w_batch[..len]);
        decode_f16_batch(ac, &mut a_batch[..len]);
        for (x, y) in w_batch[..len].iter().zip(&a_batch[..len]) {
            sum += (x * y) as f64;
        }
    }
    sum as f32
}

fn dot_bf16(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let (w, a) = (&w[..n * 2], &a[..n * 2]);
    let mut sum = 0.0f64;
    for (ws, as_) in w.chunks_exact(2).zip(a.chunks_exact(2)) {
        sum += (bf16_bits(ws) * bf16_bits(as_)) as f64;
    }
    sum as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_round_to_nearest_even() {
        // 1 + 2^-11 lies halfway between two f16 values: ties go to the even one (1.0).
        let mut out = [0u8; 4];
        quantize_f16(&[1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11)], &mut out);
        assert_eq!(out, [0x00, 0x3C, 0x02, 0x3C]);
        // 1 + 2^-8 lies halfway between two bf16 values.
        quantize_bf16(&[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)], &mut out);
        assert_eq!(out, [0x80, 0x3F, 0x82, 0x3F]);
    }

    #[test]
    fn only_float_types_are_served() {
        assert!(portable_kernels(GgmlType::Q4_0).is_none());
        for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
            assert_eq!(portable_kernels(ty).unwrap().vec_dot_type, ty);
            #[cfg(target_arch = "x86_64")]
            assert_eq!(avx2_kernels(portable_kernels(ty).unwrap()).vec_dot_type, ty);
        }
    }
}
