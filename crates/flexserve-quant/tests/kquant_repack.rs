//! The K-quant layouts `Q4_Kx8` and `Q6_Kx8`: every tier's product on
//! rearranged weights equals the portable dot on the original rows, bit for
//! bit, including extreme levels, scales, mins and activations; bad shapes
//! are refused.

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

#[test]
fn every_tier_equals_the_portable_dot_bit_for_bit() {
    for layout in LAYOUTS {
        check_layout(layout);
    }
}

fn check_layout(layout: Repacked) {
    let dot = kernels_for(layout.ty(), Isa::Portable).unwrap().dot.unwrap();
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
                                let want = dot(n, &w[r * w_row..][..w_row], &a[t * a_row..][..a_row]);
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
        // Q6_K matrices are rearranged at the AVX-512 tier only (see `for_matrix`).
        let chosen = layout == Repacked::Q4_Kx8 || flexserve_quant::active_isa() >= Isa::Avx512;
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
