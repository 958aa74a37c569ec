//! K-quant block formats: super-blocks of 256 elements split into sub-blocks
//! that each carry a small integer scale (and, for Q4_K/Q5_K, a minimum),
//! themselves quantized against one or two f16 super-block factors.
//!
//! Byte layouts (little-endian, bit-exact with GGUF files):
//!
//! - **Q8_K** (292 bytes, activations only): `d: f32`, `qs: [i8; 256]`,
//!   `bsums: [i16; 16]` where `bsums[g]` is the sum of `qs[16g..16g + 16]`.
//!   Value `i` is `d * qs[i]`.
//! - **Q4_K** (144 bytes): `d: f16`, `dmin: f16`, `scales: [u8; 12]` (eight
//!   6-bit scales and eight 6-bit mins, see [`unpack_scales_mins`]),
//!   `qs: [u8; 128]`. The 256 elements form four 64-element chunks; chunk `c`
//!   reads bytes `qs[32c..32c + 32]`, whose low nibbles are sub-block `2c` and
//!   high nibbles sub-block `2c + 1`. Value = `d * scale_j * q - dmin * min_j`.
//! - **Q5_K** (176 bytes): `d`, `dmin`, `scales` as Q4_K, `qh: [u8; 32]`,
//!   `qs: [u8; 128]` as Q4_K. The fifth bit of element `l` of sub-block `j`
//!   is bit `j` of `qh[l]`.
//! - **Q6_K** (210 bytes): `ql: [u8; 128]`, `qh: [u8; 64]`, `scales: [i8; 16]`,
//!   `d: f16`. Each 128-element half `h` uses `ql[64h..]`, `qh[32h..]` and
//!   `scales[8h..]`; for `l < 32` the four 6-bit values of byte column `l` are
//!   elements `l`, `l + 32`, `l + 64`, `l + 96` (low nibble of `ql[l]`, low
//!   nibble of `ql[l + 32]`, high nibble of `ql[l]`, high nibble of
//!   `ql[l + 32]`, with bit pairs 0-1, 2-3, 4-5, 6-7 of `qh[l]` on top).
//!   Value = `d * scales[element / 16] * (q - 32)`.
//!
//! Weights of the K types are dotted with activations quantized to Q8_K.

use half::f16;

use crate::types::{DequantizeFn, DotFn, Kernels, QuantizeFn};
use flexserve_gguf::GgmlType;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod gemv_avx2;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
pub(crate) mod q4k;
mod q5k;
pub(crate) mod q6k;
pub(crate) mod q8k;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tile_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod tile_avx512;
#[cfg(target_arch = "x86_64")]
mod tile_blocks;

/// Elements per super-block.
pub(crate) const QK_K: usize = 256;
/// Bytes of the packed 6-bit scales and mins of Q4_K and Q5_K.
const K_SCALE_SIZE: usize = 12;

/// The portable kernels of `ty`, if it is a K-quant; each SIMD tier
/// replaces some of them (`avx2::kernels`, `neon::kernels`).
pub(crate) fn portable_kernels(ty: GgmlType) -> Option<Kernels> {
    let weight = |dequantize: DequantizeFn, quantize: QuantizeFn, dot: DotFn| Kernels {
        ty,
        vec_dot_type: GgmlType::Q8_K,
        dequantize,
        quantize,
        dot: Some(dot),
    };
    match ty {
        GgmlType::Q8_K => Some(Kernels {
            ty,
            vec_dot_type: GgmlType::Q8_K,
            dequantize: q8k::dequantize,
            quantize: q8k::quantize,
            dot: None,
        }),
        GgmlType::Q4_K => Some(weight(q4k::dequantize, q4k::quantize, q4k::dot)),
        GgmlType::Q5_K => Some(weight(q5k::dequantize, q5k::quantize, q5k::dot)),
        GgmlType::Q6_K => Some(weight(q6k::dequantize, q6k::quantize, q6k::dot)),
        _ => None,
    }
}

/// Panics with a clear message unless `bytes` holds exactly the blocks of
/// `elements` values (a caller bug: the checked entry points in `lib.rs`
/// validate untrusted lengths before reaching the kernels).
fn check_row(ty: GgmlType, elements: usize, block_bytes: usize, bytes: usize) {
    let blocks = elements / QK_K;
    assert!(
        blocks * QK_K == elements && bytes == blocks * block_bytes,
        "{ty} row of {elements} elements needs {} bytes in whole blocks of {QK_K}, got {bytes}",
        blocks * block_bytes
    );
}

/// Panics unless a dot product of `n` elements has whole blocks on both sides.
fn check_dot(ty: GgmlType, n: usize, w: &[u8], w_block: usize, a: &[u8]) {
    check_row(ty, n, w_block, w.len());
    check_row(GgmlType::Q8_K, n, q8k::BYTES, a.len());
}

/// Rounds to the nearest integer, ties to even (the rounding the block
/// formats were designed with).
#[inline]
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

#[inline]
fn read_f16(bytes: &[u8], at: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([bytes[at], bytes[at + 1]])).to_f32()
}

#[inline]
fn write_f16(bytes: &mut [u8], at: usize, value: f32) {
    bytes[at..at + 2].copy_from_slice(&f16::from_f32(value).to_le_bytes());
}

/// Decodes the eight 6-bit sub-block scales and eight 6-bit mins of a Q4_K /
/// Q5_K block. Bytes 0-3 hold the low six bits of scales 0-3, bytes 4-7 those
/// of mins 0-3; bytes 8-11 hold the low four bits of scale 4+k (low nibble)
/// and min 4+k (high nibble), whose top two bits sit in bits 6-7 of bytes k
/// (scale) and 4+k (min).
#[inline]
pub(crate) fn unpack_scales_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    // Four bytes at a time: the masks keep each byte's own bits after shifts.
    let word = |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (w0, w1, w2) = (word(0), word(4), word(8));
    let scales_lo = w0 & 0x3F3F_3F3F;
    let mins_lo = w1 & 0x3F3F_3F3F;
    let scales_hi = (w2 & 0x0F0F_0F0F) | (((w0 >> 6) & 0x0303_0303) << 4);
    let mins_hi = ((w2 >> 4) & 0x0F0F_0F0F) | (((w1 >> 6) & 0x0303_0303) << 4);
    let join = |lo: u32, hi: u32| (lo as u64 | (hi as u64) << 32).to_le_bytes();
    (join(scales_lo, scales_hi), join(mins_lo, mins_hi))
}

/// Inverse of [`unpack_scales_mins`]; inputs must be below 64.
pub(crate) fn pack_scales_mins(scales: &[u8; 8], mins: &[u8; 8]) -> [u8; K_SCALE_SIZE] {
    let mut packed = [0u8; K_SCALE_SIZE];
    for j in 0..4 {
        let (sc_hi, m_hi) = (scales[j + 4], mins[j + 4]);
        packed[j] = scales[j] | ((sc_hi >> 4) << 6);
        packed[j + 4] = mins[j] | ((m_hi >> 4) << 6);
        packed[j + 8] = (sc_hi & 0xF) | ((m_hi & 0xF) << 4);
    }
    packed
}

/// Search parameters for [`fit_scale_min`].
struct ScaleMinSearch {
    /// Largest level (15 for 4 bits, 31 for 5 bits).
    nmax: i32,
    /// Offset of the first candidate level count from `nmax`.
    rmin: f32,
    /// Step between candidates.
    rdelta: f32,
    /// Number of steps after the first candidate.
    nstep: i32,
}

/// Fits `x[i] ≈ scale * levels[i] - min` with `levels` in `0..=nmax` and
/// `min >= 0`, minimising the `weights`-weighted squared error. Starts from
/// the plain min/max mapping, then tries a grid of slightly different level
/// counts, solving the weighted least-squares scale and offset for each
/// rounding, and keeps the best. Returns `(scale, min)`.
fn fit_scale_min(x: &[f32], weights: &[f32], levels: &mut [u8], search: &ScaleMinSearch) -> (f32, f32) {
    let nmax = search.nmax;
    let mut lo = x[0];
    let mut hi = x[0];
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &w) in x.iter().zip(weights).skip(1) {
        lo = lo.min(v);
        hi = hi.max(v);
        sum_w += w;
        sum_x += w * v;
    }
    // The offset only ever lowers values: a block of positives keeps min 0.
    if lo > 0.0 {
        lo = 0.0;
    }
    if hi == lo {
        levels.fill(0);
        return (0.0, -lo);
    }
    let quantize = |iscale: f32, lo: f32, v: f32| nearest_int(iscale * (v - lo)).clamp(0, nmax) as u8;

    let mut iscale = nmax as f32 / (hi - lo);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0;
    for ((l, &v), &w) in levels.iter_mut().zip(x).zip(weights) {
        *l = quantize(iscale, lo, v);
        let diff = scale * *l as f32 + lo - v;
        best_error += w * (diff * diff);
    }
    let mut trial = [0u8; 32];
    let trial = &mut trial[..x.len()];
    for step in 0..=search.nstep {
        iscale = (search.rmin + search.rdelta * step as f32 + nmax as f32) / (hi - lo);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for ((l, &v), &w) in trial.iter_mut().zip(x).zip(weights) {
            *l = quantize(iscale, lo, v);
            let lf = *l as f32;
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * v;
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut error = 0.0;
            for ((&l, &v), &w) in trial.iter().zip(x).zip(weights) {
                let diff = this_scale * l as f32 + this_min - v;
                error += w * (diff * diff);
            }
            if error < best_error {
                levels.copy_from_slice(trial);
                best_error = error;
                scale = this_scale;
                lo = this_min;
            }
        }
    }
    (scale, -lo)
}

/// Sub-blocks whose largest magnitude is below this are treated as zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Fits `x[i] ≈ scale * (levels[i] - nmax)` with `levels` in `0..2 * nmax`
/// (a symmetric signed code), weighting each error by `x[i]^2`. The value of
/// largest magnitude anchors the scale; nearby scales are tried and the one
/// with the best weighted least-squares fit kept. Returns the scale (negative
/// when the anchor is positive, so the anchor maps to level 0 = `-nmax`).
fn fit_symmetric_scale(x: &[f32], nmax: i32, levels: &mut [u8]) -> f32 {
    let mut max = 0.0f32;
    let mut amax = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        levels.fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
        for &v in x {
            let l = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * l;
            suml2 += w * l * l;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (l, &v) in levels.iter_mut().zip(x) {
        *l = (level(iscale, v) + nmax) as u8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for step in (-9..=9).filter(|&s| s != 0) {
        iscale = -(nmax as f32 + 0.1 * step as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (l, &v) in levels.iter_mut().zip(x) {
                *l = (level(iscale, v) + nmax) as u8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Shared Q4_K / Q5_K quantization of one super-block: per-32 scale and min
/// search, 6-bit quantization of both against the super-block factors, then
/// the final levels recomputed with the scales as they will be decoded.
struct AffineBlock {
    d: f32,
    dmin: f32,
    scales: [u8; K_SCALE_SIZE],
    levels: [u8; QK_K],
}

fn quantize_affine_block(x: &[f32], search: &ScaleMinSearch) -> AffineBlock {
    let mut levels = [0u8; QK_K];
    let mut sub_scales = [0f32; 8];
    let mut sub_mins = [0f32; 8];
    let mut weights = [0f32; 32];
    for (j, (xs, ls)) in x.chunks_exact(32).zip(levels.chunks_exact_mut(32)).enumerate() {
        let sum_x2: f32 = xs.iter().map(|v| v * v).sum();
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        (sub_scales[j], sub_mins[j]) = fit_scale_min(xs, &weights, ls, search);
    }
    let max_scale = sub_scales.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let max_min = sub_mins.iter().fold(0.0f32, |m, &s| if s > m { s } else { m });
    let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let six_bits = |v: f32| nearest_int(v).clamp(0, 63) as u8;
    let q_scales = sub_scales.map(|s| six_bits(inv_scale * s));
    let q_mins = sub_mins.map(|m| six_bits(inv_min * m));

    let d = f16::from_f32(max_scale / 63.0).to_f32();
    let dmin = f16::from_f32(max_min / 63.0).to_f32();
    for (j, (xs, ls)) in x.chunks_exact(32).zip(levels.chunks_exact_mut(32)).enumerate() {
        let scale = d * q_scales[j] as f32;
        if scale == 0.0 {
            continue;
        }
        let offset = dmin * q_mins[j] as f32;
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = nearest_int((v + offset) / scale).clamp(0, search.nmax) as u8;
        }
    }
    AffineBlock { d, dmin, scales: pack_scales_mins(&q_scales, &q_mins), levels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_packing_round_trips_all_six_bit_values() {
        for base in 0..64u8 {
            let scales: [u8; 8] = std::array::from_fn(|j| ((base as usize + 7 * j) % 64) as u8);
            let mins: [u8; 8] = std::array::from_fn(|j| ((base as usize * 3 + 11 * j) % 64) as u8);
            let packed = pack_scales_mins(&scales, &mins);
            assert_eq!(unpack_scales_mins(&packed), (scales, mins));
        }
    }

    #[test]
    fn unpack_reads_the_documented_bits() {
        // Scale 5 = low nibble of byte 9 plus bits 6-7 of byte 1 as bits 4-5;
        // min 6 = high nibble of byte 10 plus bits 6-7 of byte 6.
        let mut packed = [0u8; 12];
        packed[9] = 0x0A;
        packed[1] = 0b1100_0000;
        packed[10] = 0x50;
        packed[6] = 0b0100_0000;
        let (scales, mins) = unpack_scales_mins(&packed);
        assert_eq!(scales[5], 0x3A);
        assert_eq!(mins[6], 0x15);
        assert_eq!(scales[1], 0);
        assert_eq!(mins[2], 0);
    }

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(3.5), 4);
        assert_eq!(nearest_int(-2.5), -2);
        assert_eq!(nearest_int(-0.4), 0);
    }

    #[test]
    fn scale_min_fit_beats_plain_min_max_mapping() {
        let x: Vec<f32> = (0..32).map(|i| ((i * 37 % 23) as f32 - 7.3) * 0.11).collect();
        let weights = vec![1.0f32; 32];
        let mut levels = [0u8; 32];
        let search = ScaleMinSearch { nmax: 15, rmin: -1.0, rdelta: 0.1, nstep: 20 };
        let (scale, min) = fit_scale_min(&x, &weights, &mut levels, &search);
        assert!(scale > 0.0 && min >= 0.0);
        let err =
            |s: f32, m: f32, ls: &[u8]| -> f32 { x.iter().zip(ls).map(|(v, &l)| (s * l as f32 - m - v).powi(2)).sum() };
        let lo = x.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let plain_scale = (hi - lo) / 15.0;
        let plain: Vec<u8> = x.iter().map(|v| ((v - lo) / plain_scale).round() as u8).collect();
        assert!(levels.iter().all(|&l| l <= 15));
        assert!(err(scale, min, &levels) <= err(plain_scale, -lo, &plain) + 1e-6);
    }

    #[test]
    fn symmetric_fit_anchors_the_largest_value() {
        let mut x = [0.01f32; 16];
        x[3] = 2.0;
        x[7] = -1.0;
        let mut levels = [0u8; 16];
        let scale = fit_symmetric_scale(&x, 32, &mut levels);
        assert!(scale < 0.0);
        assert_eq!(levels[3], 0, "the positive anchor maps to the most negative code");
        let decoded = scale * (levels[3] as f32 - 32.0);
        assert!((decoded - 2.0).abs() < 0.05, "{decoded}");
        assert_eq!(fit_symmetric_scale(&[0.0; 16], 32, &mut levels), 0.0);
        assert!(levels.iter().all(|&l| l == 0));
    }
}
