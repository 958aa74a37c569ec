//! The 32-element block formats: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1.
//!
//! Layouts (little-endian, `f16` = IEEE half):
//! - Q4_0 (18 B): `d:f16, qs[16]`; element `j < 16` is the low nibble of
//!   `qs[j]`, element `j + 16` its high nibble; value `(q - 8) * d`.
//! - Q4_1 (20 B): `d:f16, m:f16, qs[16]`; value `q * d + m`.
//! - Q5_0 (22 B): `d:f16, qh:u32, qs[16]`; bit `j` of `qh` is the fifth bit
//!   of element `j`; value `(q - 16) * d`.
//! - Q5_1 (24 B): `d:f16, m:f16, qh:u32, qs[16]`; value `q * d + m`.
//! - Q8_0 (34 B): `d:f16, qs[32]:i8`; value `q * d`.
//! - Q8_1 (36 B): `d:f16, s:f16, qs[32]:i8` with `s = d * sum(qs)`; only an
//!   activation format (the partner of Q4_1/Q5_1 in dot products).
//!
//! The weight quantizers are the reference ones GGUF writers use. The Q8_0 /
//! Q8_1 activation quantizers use the arithmetic of llama.cpp's x86 SIMD
//! path (`id = 127 / amax`, round half to even), so that activations — and
//! with them the integer parts of every dot product — come out bit-identical
//! to the engine this project is checked against.
//!
//! Kernels receive rows as byte slices of any alignment; every multi-byte
//! field is read byte-wise.

/// Calls `$kernel::<F, A, B>(args)` for sizes `a` and `b` of 1 to 4 each:
/// the sixteen shapes of a micro-kernel, listed once for the x86 kernel
/// families below (the GEMV's few-token form and both tiles).
#[cfg(target_arch = "x86_64")]
macro_rules! by_size_4x4 {
    ($a:expr, $b:expr, $kernel:ident::<$f:ident>($($arg:expr),*)) => {{
        let (a, b): (usize, usize) = ($a, $b);
        match (a, b) {
            (4, 4) => $kernel::<$f, 4, 4>($($arg),*),
            (4, 3) => $kernel::<$f, 4, 3>($($arg),*),
            (4, 2) => $kernel::<$f, 4, 2>($($arg),*),
            (4, 1) => $kernel::<$f, 4, 1>($($arg),*),
            (3, 4) => $kernel::<$f, 3, 4>($($arg),*),
            (3, 3) => $kernel::<$f, 3, 3>($($arg),*),
            (3, 2) => $kernel::<$f, 3, 2>($($arg),*),
            (3, 1) => $kernel::<$f, 3, 1>($($arg),*),
            (2, 4) => $kernel::<$f, 2, 4>($($arg),*),
            (2, 3) => $kernel::<$f, 2, 3>($($arg),*),
            (2, 2) => $kernel::<$f, 2, 2>($($arg),*),
            (2, 1) => $kernel::<$f, 2, 1>($($arg),*),
            (1, 4) => $kernel::<$f, 1, 4>($($arg),*),
            (1, 3) => $kernel::<$f, 1, 3>($($arg),*),
            (1, 2) => $kernel::<$f, 1, 2>($($arg),*),
            (1, 1) => $kernel::<$f, 1, 1>($($arg),*),
            _ => unreachable!("a micro-kernel of {a} x {b} is larger than 4 x 4"),
        }
    }};
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
mod format;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gemv_avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tile_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tile_avx512;

use crate::types::{DequantizeFn, DotFn, Kernels, QuantizeFn};
use flexserve_gguf::GgmlType;
use half::f16;

/// Elements per block.
pub(crate) const QK: usize = 32;

pub(crate) const Q4_0_BYTES: usize = 18;
pub(crate) const Q4_1_BYTES: usize = 20;
pub(crate) const Q5_0_BYTES: usize = 22;
pub(crate) const Q5_1_BYTES: usize = 24;
pub(crate) const Q8_0_BYTES: usize = 34;
pub(crate) const Q8_1_BYTES: usize = 36;

/// The portable kernels of `ty`, if it is one of these formats; each SIMD
/// tier replaces some of them (`avx2::kernels`, `neon::kernels`).
pub(crate) fn portable_kernels(ty: GgmlType) -> Option<Kernels> {
    use GgmlType::*;
    let (vec_dot_type, dequantize, quantize, dot): (GgmlType, DequantizeFn, QuantizeFn, Option<DotFn>) = match ty {
        Q4_0 => (Q8_0, dequantize_q4_0 as _, quantize_q4_0 as _, Some(dot_q4_0_q8_0 as _)),
        Q4_1 => (Q8_1, dequantize_q4_1 as _, quantize_q4_1 as _, Some(dot_q4_1_q8_1 as _)),
        Q5_0 => (Q8_0, dequantize_q5_0 as _, quantize_q5_0 as _, Some(dot_q5_0_q8_0 as _)),
        Q5_1 => (Q8_1, dequantize_q5_1 as _, quantize_q5_1 as _, Some(dot_q5_1_q8_1 as _)),
        Q8_0 => (Q8_0, dequantize_q8_0 as _, quantize_q8_0 as _, Some(dot_q8_0_q8_0 as _)),
        Q8_1 => (Q8_1, dequantize_q8_1 as _, quantize_q8_1 as _, None),
        _ => return None,
    };
    Some(Kernels { ty, vec_dot_type, dequantize, quantize, dot })
}

// ---------------------------------------------------------------------------
// Field access

#[inline(always)]
pub(crate) fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

#[inline(always)]
pub(crate) fn write_f16(bytes: &mut [u8], at: usize, value: f32) {
    bytes[at..at + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
}

#[inline(always)]
fn read_u32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The 32 unsigned 4-bit values of a `qs[16]` field, in element order.
#[inline(always)]
fn unpack_nibbles(qs: &[u8]) -> [u8; QK] {
    let mut q = [0u8; QK];
    for j in 0..QK / 2 {
        q[j] = qs[j] & 0x0F;
        q[j + QK / 2] = qs[j] >> 4;
    }
    q
}

/// The 32 unsigned 5-bit values of a `qh:u32` + `qs[16]` pair, in element order.
#[inline(always)]
fn unpack_5bit(qh: u32, qs: &[u8]) -> [u8; QK] {
    let mut q = unpack_nibbles(qs);
    for (j, v) in q.iter_mut().enumerate() {
        *v |= (((qh >> j) & 1) as u8) << 4;
    }
    q
}

#[inline(always)]
fn as_i8(qs: &[u8]) -> &[i8] {
    bytemuck::cast_slice(qs)
}

// ---------------------------------------------------------------------------
// Dequantization

fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q4_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(block, 0);
        for (o, q) in out.iter_mut().zip(unpack_nibbles(&block[2..18])) {
            *o = (q as i32 - 8) as f32 * d;
        }
    }
}

fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q4_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (read_f16(block, 0), read_f16(block, 2));
        for (o, q) in out.iter_mut().zip(unpack_nibbles(&block[4..20])) {
            *o = q as f32 * d + m;
        }
    }
}

fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q5_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(block, 0);
        let q = unpack_5bit(read_u32(block, 2), &block[6..22]);
        for (o, q) in out.iter_mut().zip(q) {
            *o = (q as i32 - 16) as f32 * d;
        }
    }
}

fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q5_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let (d, m) = (read_f16(block, 0), read_f16(block, 2));
        let q = unpack_5bit(read_u32(block, 4), &block[8..24]);
        for (o, q) in out.iter_mut().zip(q) {
            *o = q as f32 * d + m;
        }
    }
}

fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q8_0_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(block, 0);
        for (o, &q) in out.iter_mut().zip(as_i8(&block[2..34])) {
            *o = q as f32 * d;
        }
    }
}

fn dequantize_q8_1(src: &[u8], dst: &mut [f32]) {
    for (block, out) in src.chunks_exact(Q8_1_BYTES).zip(dst.chunks_exact_mut(QK)) {
        let d = read_f16(block, 0);
        for (o, &q) in out.iter_mut().zip(as_i8(&block[4..36])) {
            *o = q as f32 * d;
        }
    }
}

// ---------------------------------------------------------------------------
// Quantization

/// The element of largest magnitude, with its sign (the first one on ties).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

#[inline(always)]
fn inverse_or_zero(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Truncates toward zero (saturating; NaN gives 0) and caps at `max`.
#[inline(always)]
fn trunc_capped(v: f32, max: i32) -> u8 {
    (v as i32).clamp(0, max) as u8
}

fn pack_nibbles(q: &[u8; QK], qs: &mut [u8]) {
    for j in 0..QK / 2 {
        qs[j] = q[j] | (q[j + QK / 2] << 4);
    }
}

/// Writes the low nibbles into `qs` and returns the fifth bits as `qh`.
fn pack_5bit(q: &[u8; QK], qs: &mut [u8]) -> u32 {
    let low: [u8; QK] = q.map(|v| v & 0x0F);
    pack_nibbles(&low, qs);
    q.iter().enumerate().fold(0u32, |qh, (j, &v)| qh | (((v >> 4) & 1) as u32) << j)
}

fn quantize_q4_0(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q4_0_BYTES)) {
        let d = signed_absmax(x) / -8.0;
        let id = inverse_or_zero(d);
        write_f16(block, 0, d);
        let q: [u8; QK] = std::array::from_fn(|j| trunc_capped(x[j] * id + 8.5, 15));
        pack_nibbles(&q, &mut block[2..18]);
    }
}

fn quantize_q4_1(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q4_1_BYTES)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 15.0;
        let id = inverse_or_zero(d);
        write_f16(block, 0, d);
        write_f16(block, 2, min);
        let q: [u8; QK] = std::array::from_fn(|j| trunc_capped((x[j] - min) * id + 0.5, 15));
        pack_nibbles(&q, &mut block[4..20]);
    }
}

fn quantize_q5_0(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q5_0_BYTES)) {
        let d = signed_absmax(x) / -16.0;
        let id = inverse_or_zero(d);
        write_f16(block, 0, d);
        let q: [u8; QK] = std::array::from_fn(|j| trunc_capped(x[j] * id + 16.5, 31));
        let qh = pack_5bit(&q, &mut block[6..22]);
        block[2..6].copy_from_slice(&qh.to_le_bytes());
    }
}

fn quantize_q5_1(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q5_1_BYTES)) {
        let (min, max) = min_max(x);
        let d = (max - min) / 31.0;
        let id = inverse_or_zero(d);
        write_f16(block, 0, d);
        write_f16(block, 2, min);
        let q: [u8; QK] = std::array::from_fn(|j| trunc_capped((x[j] - min) * id + 0.5, 31));
        let qh = pack_5bit(&q, &mut block[8..24]);
        block[4..8].copy_from_slice(&qh.to_le_bytes());
    }
}

/// Rounds to the nearest integer, ties to even, for `|v| < 2^22` (larger
/// values and NaN pass through). Adding and removing 1.5 * 2^23 leaves no
/// fraction bits, so the FPU's own rounding does the work; unlike
/// `round_ties_even` this needs no SSE4.1 and compiles to two adds.
#[inline(always)]
fn round_half_even(v: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0;
    if v.abs() < 4_194_304.0 {
        (v + SHIFT) - SHIFT
    } else {
        v
    }
}

/// Scale, inverse scale and 8-bit values of one activation block:
/// `d = amax / 127`, `q = round_half_even(x * (127 / amax))`.
#[inline(always)]
fn quantize_block_8bit(x: &[f32], qs: &mut [u8]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (q, &v) in qs.iter_mut().zip(x) {
        let r = round_half_even(v * id) as i8;
        sum += r as i32;
        *q = r as u8;
    }
    (d, sum)
}

fn quantize_q8_0(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_0_BYTES)) {
        let (d, _) = quantize_block_8bit(x, &mut block[2..34]);
        write_f16(block, 0, d);
    }
}

fn quantize_q8_1(src: &[f32], dst: &mut [u8]) {
    for (x, block) in src.chunks_exact(QK).zip(dst.chunks_exact_mut(Q8_1_BYTES)) {
        let (d, sum) = quantize_block_8bit(x, &mut block[4..36]);
        write_f16(block, 0, d);
        write_f16(block, 2, d * sum as f32);
    }
}

// ---------------------------------------------------------------------------
// Dot products. Each takes `n / 32` blocks from both rows; rows shorter than
// that are a caller bug and panic on the slice bounds.

/// Lanes of the x86 dot products: lane `j` holds the products of elements
/// `4j..4j + 4` of every block.
const LANES: usize = 8;

/// Per lane, the integer sum of the four products `w[k] * a[k]` it holds.
/// Products fit in 16 bits (|w| <= 128, |a| <= 127) and each pair's sum in
/// 32: the loops compile to SSE2's multiply-and-add of pairs.
#[inline(always)]
fn lane_sums(w: &[i8; QK], a: &[u8]) -> [i32; LANES] {
    let a: &[u8; QK] = a.try_into().expect("32 activation bytes");
    let mut pairs = [0i32; QK / 2];
    for (k, p) in pairs.iter_mut().enumerate() {
        *p = w[2 * k] as i16 as i32 * a[2 * k] as i8 as i16 as i32
            + w[2 * k + 1] as i16 as i32 * a[2 * k + 1] as i8 as i16 as i32;
    }
    let mut lanes = [0i32; LANES];
    for (j, l) in lanes.iter_mut().enumerate() {
        *l = pairs[2 * j] + pairs[2 * j + 1];
    }
    lanes
}

/// The weight levels of a 4-bit block, less `offset`.
#[inline(always)]
fn levels4(qs: &[u8], offset: i8) -> [i8; QK] {
    let q = unpack_nibbles(qs);
    std::array::from_fn(|k| q[k] as i8 - offset)
}

/// The weight levels of a 5-bit block (`qh` the fifth bits), less `offset`.
#[inline(always)]
fn levels5(qs: &[u8], qh: u32, offset: i8) -> [i8; QK] {
    let q = unpack_5bit(qh, qs);
    std::array::from_fn(|k| q[k] as i8 - offset)
}

/// The float arithmetic of the x86 dot products (llama.cpp's, and the AVX2
/// kernels'), lane by lane: per block `acc[j] = fma(d_w * d_a, lane_j,
/// acc[j])`, the minimum terms `m_w * s_a` (Q4_1, Q5_1) in a chain of fused
/// multiply-adds of their own, then the lanes folded 4 onto 0, 2 onto 0,
/// 1 onto 0, plus the minimum terms. The order of these roundings is the
/// result's last bits, which the next activation quantization can turn into
/// a different quant: every tier keeps this one.
#[inline(always)]
fn lanes_dot<const HW: bool>(blocks: impl Iterator<Item = ([i32; LANES], f32, Option<(f32, f32)>)>) -> f32 {
    let mut acc = [0f32; LANES];
    let mut offsets = 0f32;
    for (lanes, scale, min) in blocks {
        crate::fma::fma_f32_lanes::<HW>(scale, &lanes.map(|l| l as f32), &mut acc);
        if let Some((m, s)) = min {
            offsets = if HW { m.mul_add(s, offsets) } else { crate::fma::fma_f32(m, s, offsets) };
        }
    }
    let t: [f32; 4] = std::array::from_fn(|j| acc[j + 4] + acc[j]);
    ((t[0] + t[2]) + (t[1] + t[3])) + offsets
}

crate::fma::with_fma! {
    fn dot_q4_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 = dot_q4_0_q8_0_lanes;
}

#[inline(always)]
fn dot_q4_0_q8_0_lanes<const HW: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / QK;
    let blocks = w[..nb * Q4_0_BYTES].chunks_exact(Q4_0_BYTES).zip(a[..nb * Q8_0_BYTES].chunks_exact(Q8_0_BYTES));
    lanes_dot::<HW>(
        blocks
            .map(|(wb, ab)| (lane_sums(&levels4(&wb[2..18], 8), &ab[2..34]), read_f16(wb, 0) * read_f16(ab, 0), None)),
    )
}

crate::fma::with_fma! {
    fn dot_q4_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 = dot_q4_1_q8_1_lanes;
}

#[inline(always)]
fn dot_q4_1_q8_1_lanes<const HW: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / QK;
    let blocks = w[..nb * Q4_1_BYTES].chunks_exact(Q4_1_BYTES).zip(a[..nb * Q8_1_BYTES].chunks_exact(Q8_1_BYTES));
    lanes_dot::<HW>(blocks.map(|(wb, ab)| {
        let min = (read_f16(wb, 2), read_f16(ab, 2));
        (lane_sums(&levels4(&wb[4..20], 0), &ab[4..36]), read_f16(wb, 0) * read_f16(ab, 0), Some(min))
    }))
}

crate::fma::with_fma! {
    fn dot_q5_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 = dot_q5_0_q8_0_lanes;
}

#[inline(always)]
fn dot_q5_0_q8_0_lanes<const HW: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / QK;
    let blocks = w[..nb * Q5_0_BYTES].chunks_exact(Q5_0_BYTES).zip(a[..nb * Q8_0_BYTES].chunks_exact(Q8_0_BYTES));
    lanes_dot::<HW>(blocks.map(|(wb, ab)| {
        (lane_sums(&levels5(&wb[6..22], read_u32(wb, 2), 16), &ab[2..34]), read_f16(wb, 0) * read_f16(ab, 0), None)
    }))
}

crate::fma::with_fma! {
    fn dot_q5_1_q8_1(n: usize, w: &[u8], a: &[u8]) -> f32 = dot_q5_1_q8_1_lanes;
}

#[inline(always)]
fn dot_q5_1_q8_1_lanes<const HW: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / QK;
    let blocks = w[..nb * Q5_1_BYTES].chunks_exact(Q5_1_BYTES).zip(a[..nb * Q8_1_BYTES].chunks_exact(Q8_1_BYTES));
    lanes_dot::<HW>(blocks.map(|(wb, ab)| {
        let min = (read_f16(wb, 2), read_f16(ab, 2));
        (lane_sums(&levels5(&wb[8..24], read_u32(wb, 4), 0), &ab[4..36]), read_f16(wb, 0) * read_f16(ab, 0), Some(min))
    }))
}

crate::fma::with_fma! {
    fn dot_q8_0_q8_0(n: usize, w: &[u8], a: &[u8]) -> f32 = dot_q8_0_q8_0_lanes;
}

#[inline(always)]
fn dot_q8_0_q8_0_lanes<const HW: bool>(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let nb = n / QK;
    let blocks = w[..nb * Q8_0_BYTES].chunks_exact(Q8_0_BYTES).zip(a[..nb * Q8_0_BYTES].chunks_exact(Q8_0_BYTES));
    lanes_dot::<HW>(blocks.map(|(wb, ab)| {
        let q: [i8; QK] = std::array::from_fn(|k| wb[2 + k] as i8);
        (lane_sums(&q, &ab[2..34]), read_f16(wb, 0) * read_f16(ab, 0), None)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_dots_fma_emulation_equals_the_instruction() {
        // The portable dots run with the FMA instruction where the CPU has
        // it (`with_fma`); without, on its emulation: the same bits.
        let mut x = 0x9E37_79B9u32;
        let mut byte = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        };
        for blocks in [1usize, 3, 16] {
            let n = blocks * QK;
            let mut w: Vec<u8> = (0..blocks * Q8_0_BYTES).map(|_| byte()).collect();
            let mut a: Vec<u8> = (0..blocks * Q8_1_BYTES).map(|_| byte()).collect();
            // Sane scales (and minimums): no infinities or NaNs.
            for b in w.chunks_exact_mut(Q4_1_BYTES) {
                write_f16(b, 0, (b[0] as f32 - 128.0) / 4096.0);
                write_f16(b, 2, (b[2] as f32 - 128.0) / 512.0);
            }
            for b in a.chunks_exact_mut(Q8_1_BYTES) {
                write_f16(b, 0, b[0] as f32 / 8192.0);
                write_f16(b, 2, (b[2] as f32 - 128.0) / 64.0);
            }
            let pairs: [(DotFn, DotFn); 2] = [
                (dot_q4_1_q8_1_lanes::<true>, dot_q4_1_q8_1_lanes::<false>),
                (dot_q4_0_q8_0_lanes::<true>, dot_q4_0_q8_0_lanes::<false>),
            ];
            for (fused, emulated) in pairs {
                if !std::arch::is_x86_feature_detected!("fma") {
                    eprintln!("no FMA on this CPU: nothing to compare");
                    return;
                }
                assert_eq!(fused(n, &w, &a).to_bits(), emulated(n, &w, &a).to_bits(), "{blocks} blocks");
            }
        }
    }

    #[test]
    fn nibble_order_is_low_half_then_high_half() {
        let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
        let q = unpack_nibbles(&qs);
        assert_eq!(&q[..16], &(0..16u8).collect::<Vec<_>>()[..]);
        assert_eq!(&q[16..], &(0..16u8).rev().collect::<Vec<_>>()[..]);
        let mut packed = [0u8; 16];
        pack_nibbles(&q, &mut packed);
        assert_eq!(&packed[..], &qs[..]);
    }

    #[test]
    fn fifth_bits_round_trip() {
        let q: [u8; QK] = std::array::from_fn(|j| (j as u8 * 7) % 32);
        let mut qs = [0u8; 16];
        let qh = pack_5bit(&q, &mut qs);
        assert_eq!(unpack_5bit(qh, &qs), q);
    }

    #[test]
    fn activation_rounding_is_half_to_even() {
        // amax = 127 makes id exactly 1, so x * id is x itself.
        let mut x = [0.0f32; QK];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 3.5;
        x[4] = 0.49999997;
        let mut qs = [0u8; QK];
        let (d, sum) = quantize_block_8bit(&x, &mut qs);
        assert_eq!(d, 1.0);
        assert_eq!(&as_i8(&qs)[..5], &[127, 2, -2, 4, 0]);
        assert_eq!(sum, 127 + 2 - 2 + 4);
    }

    #[test]
    fn only_legacy_types_are_served() {
        assert!(portable_kernels(GgmlType::Q4_K).is_none());
        assert!(portable_kernels(GgmlType::F16).is_none());
        assert!(portable_kernels(GgmlType::Q8_1).unwrap().dot.is_none());
    }
}
