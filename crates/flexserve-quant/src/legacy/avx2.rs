//! AVX2 + FMA + F16C kernels for the 32-element block formats.
//!
//! Dot products handle one block per iteration: weights are widened to 32
//! bytes, multiplied with the activation bytes by `maddubs` (u8 x i8 -> i16
//! pairs) and `madd` (-> eight i32 sums of four neighbours), converted to f32
//! and fused-multiply-added into a single f32 accumulator with the block's
//! combined scale; the accumulator is reduced once at the end. That order
//! of operations is the one llama.cpp's AVX2 kernels use, so results agree
//! with it bit for bit, not merely within rounding.
//!
//! The functions handed out are safe wrappers: `kernels` is only called for
//! the AVX2 and AVX-512 tiers, after `detected_isa` has confirmed the CPU
//! features, and each wrapper checks the slice lengths before touching raw
//! pointers.

use super::{write_f16, Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, Q8_1_BYTES, QK};
use crate::simd::avx2::{dot_u8_i8, hsum, hsum_i32, load_bit_mask, load_f16, load_f16_pair, load_nibbles};
use crate::types::{DequantizeFn, DotFn, Kernels, QuantizeFn};
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Replaces the portable kernels of `portable.ty` with the AVX2 ones.
pub(crate) fn kernels(portable: Kernels) -> Kernels {
    use GgmlType::*;
    let (dequantize, quantize, dot): (DequantizeFn, QuantizeFn, Option<DotFn>) = match portable.ty {
        Q4_0 => (dequantize_q4_0, portable.quantize, Some(dot_q4_0_q8_0)),
        Q4_1 => (dequantize_q4_1, portable.quantize, Some(dot_q4_1_q8_1)),
        Q5_0 => (dequantize_q5_0, portable.quantize, Some(dot_q5_0_q8_0)),
        Q5_1 => (dequantize_q5_1, portable.quantize, Some(dot_q5_1_q8_1)),
        Q8_0 => (dequantize_q8_0, quantize_q8_0, Some(dot_q8_0_q8_0)),
        Q8_1 => (portable.dequantize, quantize_q8_1, None),
        _ => return portable,
    };
    Kernels { dequantize, quantize, dot, ..portable }
}

// ---------------------------------------------------------------------------
// Safe wrappers

/// Number of whole blocks that fit both in `src` (of `src_block` bytes each)
/// and in `dst` (of `dst_block` items each).
fn whole_blocks(src: usize, src_block: usize, dst: usize, dst_block: usize) -> usize {
    (src / src_block).min(dst / dst_block)
}

/// Checks that both rows hold `n / 32` blocks and returns that count.
fn dot_blocks(n: usize, w: &[u8], w_block: usize, a: &[u8], a_block: usize) -> usize {
    let nb = n / QK;
    assert!(
        w.len() >= nb * w_block && a.len() >= nb * a_block,
        "dot of {n} elements: rows of {} and {} bytes are too short",
        w.len(),
        a.len()
    );
    nb
}

macro_rules! dot_wrapper {
    ($name:ident, $inner:ident, $w_bytes:expr, $a_bytes:expr) => {
        fn $name(n: usize, w: &[u8], a: &[u8]) -> f32 {
            let nb = dot_blocks(n, w, $w_bytes, a, $a_bytes);
            // SAFETY: this wrapper is only handed out after the CPU was found to
            // support AVX2, FMA and F16C; `dot_blocks` checked that both rows
            // hold `nb` blocks, which is all the kernel reads.
            unsafe { $inner(nb, w.as_ptr(), a.as_ptr()) }
        }
    };
}

dot_wrapper!(dot_q4_0_q8_0, dot_q4_0_q8_0_avx2, Q4_0_BYTES, Q8_0_BYTES);
dot_wrapper!(dot_q4_1_q8_1, dot_q4_1_q8_1_avx2, Q4_1_BYTES, Q8_1_BYTES);
dot_wrapper!(dot_q5_0_q8_0, dot_q5_0_q8_0_avx2, Q5_0_BYTES, Q8_0_BYTES);
dot_wrapper!(dot_q5_1_q8_1, dot_q5_1_q8_1_avx2, Q5_1_BYTES, Q8_1_BYTES);
dot_wrapper!(dot_q8_0_q8_0, dot_q8_0_q8_0_avx2, Q8_0_BYTES, Q8_0_BYTES);

macro_rules! dequantize_wrapper {
    ($name:ident, $inner:ident, $bytes:expr) => {
        fn $name(src: &[u8], dst: &mut [f32]) {
            let nb = whole_blocks(src.len(), $bytes, dst.len(), QK);
            // SAFETY: CPU features as in `dot_wrapper`; the kernel reads `nb`
            // blocks of `src` and writes `nb * 32` floats of `dst`, both in bounds.
            unsafe { $inner(nb, src.as_ptr(), dst.as_mut_ptr()) }
        }
    };
}

dequantize_wrapper!(dequantize_q4_0, dequantize_q4_0_avx2, Q4_0_BYTES);
dequantize_wrapper!(dequantize_q4_1, dequantize_q4_1_avx2, Q4_1_BYTES);
dequantize_wrapper!(dequantize_q5_0, dequantize_q5_0_avx2, Q5_0_BYTES);
dequantize_wrapper!(dequantize_q5_1, dequantize_q5_1_avx2, Q5_1_BYTES);
dequantize_wrapper!(dequantize_q8_0, dequantize_q8_0_avx2, Q8_0_BYTES);

fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    let nb = whole_blocks(dst.len(), Q8_0_BYTES, src.len(), QK);
    for i in 0..nb {
        let block = &mut dst[i * Q8_0_BYTES..(i + 1) * Q8_0_BYTES];
        // SAFETY: CPU features as in `dot_wrapper`; 32 floats are read from
        // `src[i * 32..]` and 32 bytes written to `block[2..34]`, both in bounds.
        let (d, _) = unsafe { quantize_block_8bit_avx2(src[i * QK..].as_ptr(), block[2..].as_mut_ptr()) };
        write_f16(block, 0, d);
    }
}

fn quantize_q8_1(src: &[f32], dst: &mut [u8]) {
    let nb = whole_blocks(dst.len(), Q8_1_BYTES, src.len(), QK);
    for i in 0..nb {
        let block = &mut dst[i * Q8_1_BYTES..(i + 1) * Q8_1_BYTES];
        // SAFETY: as in `quantize_q8_0`, with the quants at `block[4..36]`.
        let (d, sum) = unsafe { quantize_block_8bit_avx2(src[i * QK..].as_ptr(), block[4..].as_mut_ptr()) };
        write_f16(block, 0, d);
        write_f16(block, 2, d * sum as f32);
    }
}

// ---------------------------------------------------------------------------
// Building blocks. All are `unsafe` only because of `target_feature`; the
// ones taking pointers additionally need the pointed-to bytes readable.

/// The product of the f16 scales at `p` and `q`, in all eight lanes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load_scale(p: *const u8, q: *const u8) -> __m256 {
    let pair = load_f16_pair(p, q);
    _mm256_broadcastss_ps(_mm_mul_ss(pair, _mm_movehdup_ps(pair)))
}

/// As `dot_u8_i8` for two signed operands: the sign of `x` moves onto `y` so
/// that `maddubs` sees `|x|` as unsigned. Exact while `y` avoids -128, which
/// the activation quantizer guarantees (its values lie in -127..=127).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_i8_i8(x: __m256i, y: __m256i) -> __m256 {
    dot_u8_i8(_mm256_sign_epi8(x, x), _mm256_sign_epi8(y, x))
}

/// Stores 32 signed bytes as f32 `q * d` (`plus_m` added after the product).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn store_scaled(q: __m256i, d: f32, plus_m: Option<f32>, out: *mut f32) {
    let d = _mm256_set1_ps(d);
    let halves = [_mm256_castsi256_si128(q), _mm256_extracti128_si256::<1>(q)];
    for (h, half) in halves.into_iter().enumerate() {
        let parts = [half, _mm_srli_si128::<8>(half)];
        for (p, part) in parts.into_iter().enumerate() {
            let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(part)), d);
            if let Some(m) = plus_m {
                // A separate add (not an FMA) keeps this bit-identical to `q * d + m`.
                v = _mm256_add_ps(v, _mm256_set1_ps(m));
            }
            _mm256_storeu_ps(out.add(h * 16 + p * 8), v);
        }
    }
}

// ---------------------------------------------------------------------------
// Dot products: `nb` blocks at `w` and `a`.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_0_q8_0_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (wb, ab) = (w.add(i * Q4_0_BYTES), a.add(i * Q8_0_BYTES));
        let scale = load_scale(wb, ab);
        let qw = _mm256_sub_epi8(load_nibbles(wb.add(2)), _mm256_set1_epi8(8));
        let qa = _mm256_loadu_si256(ab.add(2).cast());
        acc = _mm256_fmadd_ps(scale, dot_i8_i8(qw, qa), acc);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q4_1_q8_1_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Lane 0 accumulates the minimum terms m_w * s_a (one FMA per block).
    let mut offsets = _mm_setzero_ps();
    for i in 0..nb {
        let (wb, ab) = (w.add(i * Q4_1_BYTES), a.add(i * Q8_1_BYTES));
        let m_s = load_f16_pair(wb.add(2), ab.add(2));
        offsets = _mm_fmadd_ss(m_s, _mm_movehdup_ps(m_s), offsets);
        let scale = load_scale(wb, ab);
        let qw = load_nibbles(wb.add(4));
        let qa = _mm256_loadu_si256(ab.add(4).cast());
        acc = _mm256_fmadd_ps(scale, dot_u8_i8(qw, qa), acc);
    }
    hsum(acc) + _mm_cvtss_f32(offsets)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_0_q8_0_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (wb, ab) = (w.add(i * Q5_0_BYTES), a.add(i * Q8_0_BYTES));
        let scale = load_scale(wb, ab);
        // q - 16 as a signed byte: the nibble where the fifth bit is set,
        // the nibble with 0xF0 on top (nibble - 16) where it is not.
        let high = _mm256_andnot_si256(load_bit_mask(wb.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        let qw = _mm256_or_si256(load_nibbles(wb.add(6)), high);
        let qa = _mm256_loadu_si256(ab.add(2).cast());
        acc = _mm256_fmadd_ps(scale, dot_i8_i8(qw, qa), acc);
    }
    hsum(acc)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q5_1_q8_1_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    // Lane 0 accumulates the minimum terms m_w * s_a (one FMA per block).
    let mut offsets = _mm_setzero_ps();
    for i in 0..nb {
        let (wb, ab) = (w.add(i * Q5_1_BYTES), a.add(i * Q8_1_BYTES));
        let m_s = load_f16_pair(wb.add(2), ab.add(2));
        offsets = _mm_fmadd_ss(m_s, _mm_movehdup_ps(m_s), offsets);
        let scale = load_scale(wb, ab);
        let high = _mm256_and_si256(load_bit_mask(wb.add(4)), _mm256_set1_epi8(0x10));
        let qw = _mm256_or_si256(load_nibbles(wb.add(8)), high);
        let qa = _mm256_loadu_si256(ab.add(4).cast());
        acc = _mm256_fmadd_ps(scale, dot_u8_i8(qw, qa), acc);
    }
    hsum(acc) + _mm_cvtss_f32(offsets)
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dot_q8_0_q8_0_avx2(nb: usize, w: *const u8, a: *const u8) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for i in 0..nb {
        let (wb, ab) = (w.add(i * Q8_0_BYTES), a.add(i * Q8_0_BYTES));
        let scale = load_scale(wb, ab);
        let qw = _mm256_loadu_si256(wb.add(2).cast());
        let qa = _mm256_loadu_si256(ab.add(2).cast());
        acc = _mm256_fmadd_ps(scale, dot_i8_i8(qw, qa), acc);
    }
    hsum(acc)
}

// ---------------------------------------------------------------------------
// Dequantization: `nb` blocks at `src` into `nb * 32` floats at `dst`.

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_q4_0_avx2(nb: usize, src: *const u8, dst: *mut f32) {
    for i in 0..nb {
        let b = src.add(i * Q4_0_BYTES);
        let q = _mm256_sub_epi8(load_nibbles(b.add(2)), _mm256_set1_epi8(8));
        store_scaled(q, load_f16(b), None, dst.add(i * QK));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_q4_1_avx2(nb: usize, src: *const u8, dst: *mut f32) {
    for i in 0..nb {
        let b = src.add(i * Q4_1_BYTES);
        store_scaled(load_nibbles(b.add(4)), load_f16(b), Some(load_f16(b.add(2))), dst.add(i * QK));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_q5_0_avx2(nb: usize, src: *const u8, dst: *mut f32) {
    for i in 0..nb {
        let b = src.add(i * Q5_0_BYTES);
        let high = _mm256_andnot_si256(load_bit_mask(b.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
        let q = _mm256_or_si256(load_nibbles(b.add(6)), high);
        store_scaled(q, load_f16(b), None, dst.add(i * QK));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_q5_1_avx2(nb: usize, src: *const u8, dst: *mut f32) {
    for i in 0..nb {
        let b = src.add(i * Q5_1_BYTES);
        let high = _mm256_and_si256(load_bit_mask(b.add(4)), _mm256_set1_epi8(0x10));
        let q = _mm256_or_si256(load_nibbles(b.add(8)), high);
        store_scaled(q, load_f16(b), Some(load_f16(b.add(2))), dst.add(i * QK));
    }
}

#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn dequantize_q8_0_avx2(nb: usize, src: *const u8, dst: *mut f32) {
    for i in 0..nb {
        let b = src.add(i * Q8_0_BYTES);
        let q = _mm256_loadu_si256(b.add(2).cast());
        store_scaled(q, load_f16(b), None, dst.add(i * QK));
    }
}

// ---------------------------------------------------------------------------
// Activation quantization

/// Quantizes the 32 floats at `x` into 32 signed bytes at `qs`, returning the
/// scale `d = amax / 127` and the sum of the quants. Same arithmetic as the
/// portable `quantize_block_8bit`: `round_half_even(x * (127 / amax))`.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_block_8bit_avx2(x: *const f32, qs: *mut u8) -> (f32, i32) {
    let v = [_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)), _mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(x.add(24))];
    let sign_bit = _mm256_set1_ps(-0.0);
    let mut amax8 = _mm256_setzero_ps();
    for &vk in &v {
        amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign_bit, vk));
    }
    let mut m = _mm_max_ps(_mm256_extractf128_ps::<1>(amax8), _mm256_castps256_ps128(amax8));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    let amax = _mm_cvtss_f32(m);

    let d = amax / 127.0;
    let id = _mm256_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
    let mut q = [_mm256_setzero_si256(); 4];
    for (qk, &vk) in q.iter_mut().zip(&v) {
        let scaled = _mm256_mul_ps(vk, id);
        *qk = _mm256_cvtps_epi32(_mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(scaled));
    }
    let sum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])));

    // Packing works within 128-bit lanes, leaving 4-byte groups in the order
    // 0 2 4 6 1 3 5 7; the permutation puts them back.
    let words = [_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])];
    let bytes = _mm256_packs_epi16(words[0], words[1]);
    let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(qs.cast(), ordered);
    (d, sum)
}
