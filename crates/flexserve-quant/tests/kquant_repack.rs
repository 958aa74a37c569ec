//! The K-quant layouts `Q4_Kx8` and `Q6_Kx8`: every tier's product on
//! rearranged weights equals, bit for bit, llama.cpp's rearranged Q4_K
//! product (`Q4_Kx8`) and the one-lane-per-row Q6_K formula (`Q6_Kx8`, no
//! longer chosen for models), both written out below from the original rows,
//! including extreme levels, scales, mins and activations; bad shapes are
//! refused.

mod kquant_common;

use flexserve_quant::{kernels_for, usable_isas, GgmlType, Isa, QuantError, Repacked};
use half::f16;
use kquant_common::*;
use rand::Rng;

const LAYOUTS: [Repacked; 2] = [Repacked::Q4_Kx8, Repacked::Q6_Kx8];
const Q8K_BYTES: usize = 292;

/// Random rows of the layout's type: random levels, scales (and mins), and
/// f16 factors of a sane size; every fifth block takes the extremes (all
/// levels at their top, Q4_K scales and mins 63, Q6_K scales -1 = 0xFF, and
/// every third of those blocks Q6_K scales of -128).
fn weights(layout: Repacked, n: usize, rows: usize, seed: u64) -> Vec<u8> {
    let mut rng = rng(seed);
    let block_bytes = layout.ty().type_size();
    let mut w = vec![0u8; rows * n / QK_K * block_bytes];
    for (i, block) in w.chunks_exact_mut(block_bytes).enumerate() {
        rng.fill(&mut block[..]);
        if i % 5 == 4 {
            block.fill(0xFF);
        }
        let factor = |rng: &mut rand::rngs::StdRng| f16::from_f32(rng.gen_range(-0.02f32..0.02)).to_le_bytes();
        match layout {
            Repacked::Q4_Kx8 => {
                block[0..2].copy_from_slice(&factor(&mut rng));
                block[2..4].copy_from_slice(&factor(&mut rng));
            }
            _ => {
                if i % 15 == 14 {
                    block[192..208].fill(0x80);
                }
                block[208..210].copy_from_slice(&factor(&mut rng));
            }
        }
    }
    w
}

/// `n_tok` rows of Q8_K activations; with `extreme`, every quant is -128 in
/// some blocks (the sums then reach their largest magnitude).
fn activations(n: usize, n_tok: usize, seed: u64, extreme: bool) -> Vec<u8> {
    let mut rng = rng(seed);
    let q8k = kernels_for(GgmlType::Q8_K, Isa::Portable).unwrap();
    let mut a = vec![0u8; n_tok * n / QK_K * Q8K_BYTES];
    for row in a.chunks_exact_mut(n / QK_K * Q8K_BYTES) {
        (q8k.quantize)(&outlier_row(&mut rng, n), row);
        if extreme {
            for block in row.chunks_exact_mut(Q8K_BYTES).step_by(2) {
                block[4..260].fill(0x80);
                for g in 0..16 {
                    block[260 + 2 * g..262 + 2 * g].copy_from_slice(&(-128i16 * 16).to_le_bytes());
                }
            }
        }
    }
    a
}

/// llama.cpp's rearranged Q4_K product of one row, from the original Q4_K
/// blocks: per super-block the exact sums `isum = sum_j scale_j * sum(q * a)`
/// and `msum = sum_j min_j * (bsum_2j + bsum_2j+1)`, then
/// `acc = fma(isum, d * d_a, acc)`, `acc_min = fma(msum, dmin * d_a, acc_min)`,
/// and `acc - acc_min` at the end (`ggml_gemv_q4_K_8x8_q8_K`); with
/// `in_group` (a token of a group of four, `ggml_gemm_q4_K_8x8_q8_K`) the two
/// updates come once per sub-block pair, with that pair's sums.
fn llama_cpp_q4k_x8(n: usize, w: &[u8], a: &[u8], in_group: bool) -> f32 {
    let (mut acc, mut acc_min) = (0f32, 0f32);
    for (wb, ab) in w.chunks_exact(144).zip(a.chunks_exact(Q8K_BYTES)).take(n / QK_K) {
        let f16_at = |at: usize| f16::from_le_bytes([wb[at], wb[at + 1]]).to_f32();
        let (d, dmin) = (f16_at(0), f16_at(2));
        let q = &wb[4..16];
        let scale_min = |j: usize| -> (i32, i32) {
            if j < 4 {
                ((q[j] & 63) as i32, (q[j + 4] & 63) as i32)
            } else {
                (((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)) as i32, ((q[j + 4] >> 4) | ((q[j] >> 6) << 4)) as i32)
            }
        };
        let d_a = f32::from_le_bytes(ab[0..4].try_into().unwrap());
        let a_q = |i: usize| ab[4 + i] as i8 as i32;
        let bsum = |g: usize| i16::from_le_bytes([ab[260 + 2 * g], ab[261 + 2 * g]]) as i32;
        let mut pairs = [(0i32, 0i32); 4];
        for (c, (isum, msum)) in pairs.iter_mut().enumerate() {
            let qs = &wb[16 + 32 * c..16 + 32 * c + 32];
            let lo: i32 = (0..32).map(|l| (qs[l] & 0xF) as i32 * a_q(64 * c + l)).sum();
            let hi: i32 = (0..32).map(|l| (qs[l] >> 4) as i32 * a_q(64 * c + 32 + l)).sum();
            *isum = scale_min(2 * c).0 * lo + scale_min(2 * c + 1).0 * hi;
            *msum = (2 * c..2 * c + 2).map(|j| scale_min(j).1 * (bsum(2 * j) + bsum(2 * j + 1))).sum();
        }
        let mut update = |isum: i32, msum: i32| {
            acc = (isum as f32).mul_add(d * d_a, acc);
            acc_min = (msum as f32).mul_add(dmin * d_a, acc_min);
        };
        if in_group {
            pairs.iter().for_each(|&(isum, msum)| update(isum, msum));
        } else {
            update(pairs.iter().map(|p| p.0).sum(), pairs.iter().map(|p| p.1).sum());
        }
    }
    acc - acc_min
}

/// The `Q6_Kx8` kernels' formula on one row: per super-block the exact sum
/// `isum = sum_s scale_s * sum((q - 32) * a)` over the 16-element sub-blocks,
/// then `acc += (d_a * d) * isum`.
fn one_lane_q6k(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0f32;
    for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(Q8K_BYTES)).take(n / QK_K) {
        let mut isum = 0i32;
        for e in 0..QK_K {
            let (half, l) = (e / 128, e % 128);
            let (ql, qh) = (wb[64 * half + l % 64], wb[128 + 32 * half + l % 32]);
            let low = if l < 64 { ql & 0xF } else { ql >> 4 };
            let q = (low | ((qh >> (2 * (l / 32))) & 3) << 4) as i32 - 32;
            isum += wb[192 + e / 16] as i8 as i32 * q * ab[4 + e] as i8 as i32;
        }
        let d_a = f32::from_le_bytes(ab[0..4].try_into().unwrap());
        acc += d_a * f16::from_le_bytes([wb[208], wb[209]]).to_f32() * isum as f32;
    }
    acc
}

#[test]
fn every_tier_equals_the_reference_bit_for_bit() {
    for layout in LAYOUTS {
        check_layout(layout);
    }
}

fn check_layout(layout: Repacked) {
    // The kernels take a batch as one sequence's tokens: the first
    // `n_tok - n_tok % 4` in llama.cpp's groups of four.
    let dot = |n: usize, w: &[u8], a: &[u8], t: usize, n_tok: usize| match layout {
        Repacked::Q4_Kx8 => llama_cpp_q4k_x8(n, w, a, t < n_tok - n_tok % 4),
        _ => one_lane_q6k(n, w, a),
    };
    let block_bytes = layout.ty().type_size();
    let mut seed = 10;
    for n in [256, 768] {
        for rows in [8, 16, 24] {
            for n_tok in [1, 2, 3, 4, 5, 9] {
                for extreme in [false, true] {
                    seed += 2;
                    let (w, a) = (weights(layout, n, rows, seed), activations(n, n_tok, seed + 1, extreme));
                    let packed = layout.repack(&w, rows, n).unwrap();
                    assert_eq!(packed.len(), w.len());
                    let (w_row, a_row) = (n / QK_K * block_bytes, n / QK_K * Q8K_BYTES);
                    let stride = rows + 5;
                    for isa in usable_isas() {
                        let mut out = vec![f32::NAN; n_tok * stride];
                        (layout.kernel_for(isa))(n, &packed, rows, &a, a_row, n_tok, &mut out, stride);
                        for t in 0..n_tok {
                            for r in 0..rows {
                                let want = dot(n, &w[r * w_row..][..w_row], &a[t * a_row..][..a_row], t, n_tok);
                                let got = out[t * stride + r];
                                assert_eq!(
                                    got.to_bits(),
                                    want.to_bits(),
                                    "{layout:?} {isa:?} n={n} rows={rows} n_tok={n_tok} extreme={extreme} row {r} token {t}: \
                                     {got} != {want}"
                                );
                            }
                            assert!(
                                out[t * stride + rows..(t + 1) * stride].iter().all(|v| v.is_nan()),
                                "{isa:?}: wrote past the rows"
                            );
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn shapes_and_types() {
    for (ty, layout) in [(GgmlType::Q4_K, Repacked::Q4_Kx8), (GgmlType::Q6_K, Repacked::Q6_Kx8)] {
        assert_eq!(Repacked::of_type(ty), Some(layout));
        // Q6_K matrices stay row by row, as llama.cpp keeps them (see `for_matrix`).
        let chosen = layout == Repacked::Q4_Kx8;
        assert_eq!(Repacked::for_matrix(ty, 16, 512), chosen.then_some(layout));
        assert_eq!(Repacked::for_matrix(ty, 12, 512), None);
        assert_eq!(Repacked::for_matrix(ty, 16, 32 * 9), None);
        assert_eq!(layout.ty(), ty);
        assert_eq!(layout.activation_type(), GgmlType::Q8_K);
        let w = weights(layout, 256, 8, 1);
        assert!(matches!(layout.repack(&w, 8, 128), Err(QuantError::NotBlockMultiple { block: 256, .. })));
        assert!(matches!(layout.repack(&w, 4, 256), Err(QuantError::RowsNotGroupMultiple { .. })));
        assert!(matches!(
            layout.repack(&w[1..], 8, 256),
            Err(QuantError::BadLength { expected, got, .. }) if expected == w.len() && got == w.len() - 1
        ));
    }
}
