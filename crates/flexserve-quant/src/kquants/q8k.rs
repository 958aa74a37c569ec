//! Q8_K: the activation format the K-quant weights are dotted with.

use super::{check_row, QK_K};
use flexserve_gguf::GgmlType;

pub(crate) const BYTES: usize = 4 + QK_K + 2 * (QK_K / 16);
/// Offset of the quants inside a block.
pub(crate) const QS: usize = 4;
/// Offset of the 16-element group sums inside a block.
pub(crate) const BSUMS: usize = QS + QK_K;

pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    check_row(GgmlType::Q8_K, dst.len(), BYTES, src.len());
    for (block, out) in src.chunks_exact(BYTES).zip(dst.chunks_exact_mut(QK_K)) {
        let d = block_scale(block);
        for (o, &q) in out.iter_mut().zip(&block[QS..BSUMS]) {
            *o = d * q as i8 as f32;
        }
    }
}

pub(super) fn quantize(src: &[f32], dst: &mut [u8]) {
    check_row(GgmlType::Q8_K, src.len(), BYTES, dst.len());
    for (x, block) in src.chunks_exact(QK_K).zip(dst.chunks_exact_mut(BYTES)) {
        quantize_block(x, block);
    }
}

#[inline]
pub(crate) fn block_scale(block: &[u8]) -> f32 {
    f32::from_le_bytes([block[0], block[1], block[2], block[3]])
}

/// Sum of the 16 quants of group `g` (0..16), as stored in the block.
#[inline]
pub(crate) fn group_sum(block: &[u8], g: usize) -> i32 {
    let at = BSUMS + 2 * g;
    i16::from_le_bytes([block[at], block[at + 1]]) as i32
}

/// The value of largest magnitude with its sign (the first one on ties).
/// NaNs are skipped.
pub(crate) fn signed_absmax(x: &[f32]) -> f32 {
    let mut amax = 0.0f32;
    let mut max = 0.0f32;
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// The quant of `v` under inverse scale `iscale`. Clamped to the i8 range;
/// a NaN product (e.g. from an infinite input) gives 127, as the SIMD path's
/// `min` does.
#[inline]
#[allow(clippy::manual_clamp)] // `clamp` would keep a NaN, which must become 127 here
pub(crate) fn quant(iscale: f32, v: f32) -> i8 {
    (iscale * v).round_ties_even().min(127.0).max(-128.0) as i8
}

fn quantize_block(x: &[f32], block: &mut [u8]) {
    let max = signed_absmax(x);
    if max == 0.0 {
        block.fill(0);
        return;
    }
    // The extreme maps to -127 so that the opposite sign still fits in 127.
    let iscale = -127.0 / max;
    for (q, &v) in block[QS..BSUMS].iter_mut().zip(x) {
        *q = quant(iscale, v) as u8;
    }
    for g in 0..QK_K / 16 {
        let group = &block[QS + 16 * g..QS + 16 * g + 16];
        let sum: i16 = group.iter().map(|&q| q as i8 as i16).sum();
        block[BSUMS + 2 * g..BSUMS + 2 * g + 2].copy_from_slice(&sum.to_le_bytes());
    }
    block[..4].copy_from_slice(&(1.0 / iscale).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extreme_maps_to_minus_127_and_sums_match() {
        let mut x = [0.0f32; QK_K];
        for (i, v) in x.iter_mut().enumerate() {
            *v = (i as f32 - 100.0) * 0.01;
        }
        x[200] = 5.0;
        let mut block = [0u8; BYTES];
        quantize(&x, &mut block);
        assert_eq!(block[QS + 200] as i8, -127);
        let d = block_scale(&block);
        assert!((d - (-5.0 / 127.0)).abs() < 1e-7);
        for g in 0..16 {
            let expect: i32 = block[QS + 16 * g..QS + 16 * g + 16].iter().map(|&q| q as i8 as i32).sum();
            assert_eq!(group_sum(&block, g), expect);
        }
        let mut back = [0f32; QK_K];
        dequantize(&block, &mut back);
        for (a, b) in back.iter().zip(&x) {
            assert!((a - b).abs() <= 5.0 / 127.0 / 2.0 + 1e-6);
        }
    }

    #[test]
    fn zero_block_is_all_zero_bytes() {
        let mut block = [0xAAu8; BYTES];
        quantize(&[0.0; QK_K], &mut block);
        assert!(block.iter().all(|&b| b == 0));
    }
}
