//! Data generators shared by the K-quant tests.

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const QK_K: usize = 256;

pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A standard normal sample (Box-Muller).
pub fn normal(rng: &mut StdRng) -> f32 {
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen();
    ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
}

pub fn normal_row(rng: &mut StdRng, n: usize, sigma: f32) -> Vec<f32> {
    (0..n).map(|_| sigma * normal(rng)).collect()
}

/// Normal data with a few large outliers per super-block.
pub fn outlier_row(rng: &mut StdRng, n: usize) -> Vec<f32> {
    let mut x = normal_row(rng, n, 0.05);
    for block in x.chunks_mut(QK_K) {
        for _ in 0..3 {
            let i = rng.gen_range(0..block.len());
            block[i] = if rng.gen() { 2.5 } else { -3.0 };
        }
    }
    x
}

/// Blocks of very different kinds in one row: normal, all zero, constant
/// (positive and negative), all positive with an offset, tiny values, and
/// sub-blocks whose magnitudes differ by orders of magnitude.
pub fn mixed_row(rng: &mut StdRng, blocks: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(blocks * QK_K);
    for b in 0..blocks {
        let block: Vec<f32> = match b % 7 {
            0 => normal_row(rng, QK_K, 1.0),
            1 => vec![0.0; QK_K],
            2 => vec![0.75; QK_K],
            3 => vec![-1.25; QK_K],
            4 => (0..QK_K).map(|_| 3.0 + rng.gen_range(0.0..1.0f32)).collect(),
            5 => normal_row(rng, QK_K, 1e-3),
            _ => (0..QK_K).map(|i| normal(rng) * 10f32.powi((i / 32) as i32 % 4 - 2)).collect(),
        };
        x.extend(block);
    }
    x
}

pub fn rms(x: &[f32]) -> f32 {
    (x.iter().map(|v| (v * v) as f64).sum::<f64>() / x.len() as f64).sqrt() as f32
}

pub fn rmse(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let s: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    (s / a.len() as f64).sqrt() as f32
}

pub fn dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

pub fn abs_dot_f64(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 * *y as f64).abs()).sum()
}

/// `bytes` copied to an odd offset of a fresh buffer, so kernels see an
/// unaligned slice.
pub fn misaligned(bytes: &[u8]) -> (Vec<u8>, usize) {
    let mut buf = vec![0u8; bytes.len() + 1];
    buf[1..].copy_from_slice(bytes);
    (buf, 1)
}
