//! Rearranged (`Q4_0x8`, `Q4_1x8`, `Q8_0x8`) weights: the kernels against a
//! straightforward scalar model of the grouped arithmetic computed from the
//! original rows (bit for bit), every SIMD tier the CPU runs against portable
//! (bit for bit), closeness to the plain dot, which matrices are rearranged,
//! and argument checks.

mod common;

use common::*;
use flexserve_quant::{kernels_for, usable_isas, GgmlType, Isa, QuantError, Repacked, RepackedMatmulFn};
use half::f16;
use rand::Rng;

const LAYOUTS: [Repacked; 3] = [Repacked::Q4_0x8, Repacked::Q4_1x8, Repacked::Q8_0x8];

/// Bytes of one activation block of the layout (Q8_0, or Q8_1 for `Q4_1x8`).
fn act_block(layout: Repacked) -> usize {
    layout.activation_type().type_size()
}

/// `rows` rows of `n` random values quantized to the layout's type, each
/// row with its own scale.
fn weights(layout: Repacked, n: usize, rows: usize, seed: u64) -> Vec<u8> {
    let k = portable(layout.ty());
    let mut rng = rng(seed);
    let mut out = Vec::new();
    for _ in 0..rows {
        let scale = 10f32.powf(rng.gen_range(-2.0..1.0));
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect();
        out.extend(quantize(&k, &x));
    }
    out
}

/// `n_tok` activation rows of `n` values (Q8_0, or Q8_1 for `Q4_1x8`):
/// quantized activations, or raw random quants with random scales (and sums)
/// when `raw`. Raw quants reach -128 for the nibble layouts, whose weights
/// are unsigned; for `Q8_0x8` they stay in -127..=127, the quantizer's range,
/// which the sign move of the signed product (as in the plain Q8_0 dot) relies on.
fn activations(layout: Repacked, n: usize, n_tok: usize, seed: u64, raw: bool) -> Vec<u8> {
    let k = portable(layout.activation_type());
    let mut rng = rng(seed);
    let lowest = if layout == Repacked::Q8_0x8 { -127 } else { i8::MIN };
    let mut out = Vec::new();
    for _ in 0..n_tok {
        if raw {
            for _ in 0..n / 32 {
                out.extend(f16::from_f32(rng.gen_range(-0.1f32..0.1)).to_le_bytes());
                if layout == Repacked::Q4_1x8 {
                    out.extend(f16::from_f32(rng.gen_range(-3.0f32..3.0)).to_le_bytes());
                }
                out.extend((0..32).map(|_| rng.gen_range(lowest..=i8::MAX) as u8));
            }
        } else {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
            out.extend(quantize(&k, &x));
        }
    }
    out
}

fn f16_at(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The weight levels of one original block.
fn levels(layout: Repacked, block: &[u8]) -> Vec<i32> {
    match layout {
        Repacked::Q4_0x8 => {
            let q = &block[2..18];
            q.iter().map(|&b| (b & 0x0F) as i32 - 8).chain(q.iter().map(|&b| (b >> 4) as i32 - 8)).collect()
        }
        Repacked::Q4_1x8 => {
            let q = &block[4..20];
            q.iter().map(|&b| (b & 0x0F) as i32).chain(q.iter().map(|&b| (b >> 4) as i32)).collect()
        }
        Repacked::Q8_0x8 => block[2..34].iter().map(|&b| b as i8 as i32).collect(),
        other => unreachable!("{other:?} has tests of its own (kquant_repack.rs)"),
    }
}

/// The grouped arithmetic from the original row and activation row: per
/// block, the exact integer dot, the f32 scale product, one FMA (and for
/// Q4_1 a second one, of the minimum and the activation sum).
fn model_dot(layout: Repacked, n: usize, w_row: &[u8], a_row: &[u8]) -> f32 {
    let (w_bytes, a_bytes) = (layout.ty().type_size(), act_block(layout));
    let mut acc = 0f32;
    for b in 0..n / 32 {
        let wb = &w_row[b * w_bytes..(b + 1) * w_bytes];
        let ab = &a_row[b * a_bytes..(b + 1) * a_bytes];
        let quants = &ab[a_bytes - 32..];
        let isum: i32 = levels(layout, wb).iter().zip(quants).map(|(&w, &a)| w * a as i8 as i32).sum();
        acc = (isum as f32).mul_add(f16_at(wb, 0) * f16_at(ab, 0), acc);
        if layout == Repacked::Q4_1x8 {
            acc = f16_at(wb, 2).mul_add(f16_at(ab, 2), acc);
        }
    }
    acc
}

#[allow(clippy::too_many_arguments)]
fn run(
    layout: Repacked,
    kernel: RepackedMatmulFn,
    n: usize,
    packed: &[u8],
    rows: usize,
    a: &[u8],
    n_tok: usize,
    stride: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; n_tok.max(1) * stride];
    kernel(n, packed, rows, a, n / 32 * act_block(layout), n_tok, &mut out, stride);
    out
}

#[test]
fn kernels_match_the_scalar_model_bit_for_bit() {
    let mut seed = 1;
    for layout in LAYOUTS {
        let row_bytes = |n: usize| n / 32 * layout.ty().type_size();
        for n in [32, 7 * 32, 576] {
            for rows in [8, 16, 40] {
                for n_tok in [1, 2, 3, 4, 5, 9] {
                    for raw in [false, true] {
                        seed += 1;
                        let w = weights(layout, n, rows, seed);
                        let a = activations(layout, n, n_tok, seed + 1000, raw);
                        let packed = layout.repack(&w, rows, n).unwrap();
                        assert_eq!(packed.len(), w.len());
                        let stride = rows + 3;
                        let a_bytes = n / 32 * act_block(layout);
                        for isa in usable_isas() {
                            let got = run(layout, layout.kernel_for(isa), n, &packed, rows, &a, n_tok, stride);
                            for t in 0..n_tok {
                                for r in 0..rows {
                                    let w_row = &w[r * row_bytes(n)..][..row_bytes(n)];
                                    let want = model_dot(layout, n, w_row, &a[t * a_bytes..][..a_bytes]);
                                    let g = got[t * stride + r];
                                    assert_eq!(
                                        g.to_bits(),
                                        want.to_bits(),
                                        "{layout:?} {isa:?} n {n} rows {rows} token {t} row {r}: {g} vs {want}"
                                    );
                                }
                                // Outputs beyond `rows` in each stride are left alone.
                                assert!(got[t * stride + rows..(t + 1) * stride].iter().all(|v| v.is_nan()));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn simd_matches_portable_on_random_bytes() {
    // Arbitrary quant bytes and scales (not from a quantizer), many shapes;
    // Q8_0 weights reach -128.
    let mut rng = rng(77);
    for layout in LAYOUTS {
        let block_bytes = layout.ty().type_size();
        for case in 0..40 {
            let n = 32 * rng.gen_range(1..20);
            let rows = 8 * rng.gen_range(1..5);
            let n_tok = rng.gen_range(1..11);
            let mut w = vec![0u8; rows * n / 32 * block_bytes];
            rng.fill(&mut w[..]);
            for blk in w.chunks_exact_mut(block_bytes) {
                blk[..2].copy_from_slice(&f16::from_f32(rng.gen_range(-0.05f32..0.05)).to_le_bytes());
            }
            let a = activations(layout, n, n_tok, case, true);
            let packed = layout.repack(&w, rows, n).unwrap();
            let bits = |isa| {
                run(layout, layout.kernel_for(isa), n, &packed, rows, &a, n_tok, rows)
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<u32>>()
            };
            let want = bits(Isa::Portable);
            for isa in usable_isas() {
                assert_eq!(bits(isa), want, "{layout:?} {isa:?} case {case}: n {n} rows {rows} tokens {n_tok}");
            }
        }
    }
}

#[test]
fn results_are_close_to_the_plain_dot() {
    let (n, rows, n_tok) = (256, 16, 3);
    for layout in LAYOUTS {
        let w = weights(layout, n, rows, 5);
        let a = activations(layout, n, n_tok, 6, false);
        let packed = layout.repack(&w, rows, n).unwrap();
        let dot = kernels_for(layout.ty(), Isa::Portable).unwrap().dot.unwrap();
        let got = run(layout, layout.kernel(), n, &packed, rows, &a, n_tok, rows);
        let (row_bytes, a_bytes) = (n / 32 * layout.ty().type_size(), n / 32 * act_block(layout));
        for t in 0..n_tok {
            for r in 0..rows {
                let want = dot(n, &w[r * row_bytes..][..row_bytes], &a[t * a_bytes..][..a_bytes]);
                let g = got[t * rows + r];
                assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "{layout:?} token {t} row {r}: {g} vs {want}");
            }
        }
    }
}

#[test]
fn layouts_are_chosen_by_type_and_shape() {
    assert_eq!(Repacked::for_matrix(GgmlType::Q4_0, 16, 64), Some(Repacked::Q4_0x8));
    // llama.cpp multiplies Q4_1 and Q8_0 row by row, with its plain dot's
    // rounding: so does the engine (the layouts stay for their kernels' tests).
    assert_eq!(Repacked::for_matrix(GgmlType::Q8_0, 16, 64), None);
    assert_eq!(Repacked::for_matrix(GgmlType::Q4_1, 16, 64), None);
    assert_eq!(Repacked::Q4_1x8.activation_type(), GgmlType::Q8_1);
    assert_eq!(Repacked::for_matrix(GgmlType::Q4_0, 12, 64), None);
    assert_eq!(Repacked::for_matrix(GgmlType::Q8_0, 0, 64), None);
    assert_eq!(Repacked::for_matrix(GgmlType::Q8_0, 16, 48), None);
    // Q4_K and Q6_K: see kquant_repack.rs.
    for ty in [GgmlType::Q5_0, GgmlType::Q5_K, GgmlType::Q2_K, GgmlType::F16] {
        assert_eq!(Repacked::for_matrix(ty, 16, 256), None, "{ty}");
    }
}

#[test]
fn repack_rejects_bad_shapes() {
    for layout in LAYOUTS {
        let w = weights(layout, 64, 8, 9);
        assert!(matches!(layout.repack(&w[..w.len() - 1], 8, 64), Err(QuantError::BadLength { .. })));
        assert!(matches!(layout.repack(&w, 8, 48), Err(QuantError::NotBlockMultiple { .. })));
        let w12 = weights(layout, 64, 12, 9);
        let err = layout.repack(&w12, 12, 64).unwrap_err();
        assert!(matches!(err, QuantError::RowsNotGroupMultiple { rows: 12, group: 8, .. }), "{err}");
    }
}

#[test]
fn short_activations_panic_clearly() {
    for layout in LAYOUTS {
        let w = weights(layout, 64, 8, 3);
        let packed = layout.repack(&w, 8, 64).unwrap();
        let a = activations(layout, 64, 1, 4, false);
        let caught = std::panic::catch_unwind(|| {
            let mut out = vec![0f32; 16];
            (layout.kernel())(64, &packed, 8, &a, a.len(), 2, &mut out, 8);
        });
        let message = caught.expect_err("two tokens from one activation row must panic");
        let text = message.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(text.contains("activation rows need more than"), "{layout:?}: {text}");
    }
}

/// Parts of a shared output, filled on threads of their own, give exactly
/// the whole product, every layout (the K-quant ones included) and width.
#[test]
fn column_parts_fill_the_whole_product() {
    let layouts = [LAYOUTS.as_slice(), &[Repacked::Q4_Kx8, Repacked::Q6_Kx8]].concat();
    for (i, layout) in layouts.into_iter().enumerate() {
        let (n, rows, n_tok) = (256, 40, 3);
        let k = portable(layout.ty());
        let mut rng = rng(70 + i as u64);
        let w: Vec<u8> = (0..rows).flat_map(|_| quantize(&k, &data(&mut rng, Shape::Uniform, n, 32))).collect();
        let act = portable(layout.activation_type());
        let a: Vec<u8> = (0..n_tok).flat_map(|_| quantize(&act, &data(&mut rng, Shape::Uniform, n, 32))).collect();
        let a_row = row_bytes(layout.activation_type(), n);
        let packed = layout.repack(&w, rows, n).unwrap();
        let w_row = row_bytes(layout.ty(), n);
        let stride = rows + 5;
        let mut whole = vec![f32::NAN; n_tok * stride];
        layout.kernel()(n, &packed, rows, &a, a_row, n_tok, &mut whole, stride);
        for width in [8, 16, 24, 40, 64] {
            let mut parted = vec![f32::NAN; n_tok * stride];
            std::thread::scope(|s| {
                for part in flexserve_quant::ColumnParts::new(&mut parted, n_tok, stride, rows, width) {
                    let w_part = &packed[part.first() * w_row..];
                    s.spawn(|| layout.matmul_part(n, w_part, &a, a_row, n_tok, true, part));
                }
            });
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&parted), bits(&whole), "{layout:?} in parts of {width} columns");
        }
    }
}

#[test]
fn column_parts_reject_bad_shapes() {
    let panics = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
    assert!(panics(&|| {
        let mut out = vec![0f32; 15];
        let _ = flexserve_quant::ColumnParts::new(&mut out, 2, 8, 8, 8);
    }));
    assert!(panics(&|| {
        let mut out = vec![0f32; 16];
        let _ = flexserve_quant::ColumnParts::new(&mut out, 2, 8, 8, 0);
    }));
    // A part made for two tokens cannot take one.
    let layout = Repacked::Q4_0x8;
    let packed = layout.repack(&weights(layout, 64, 8, 5), 8, 64).unwrap();
    let a = activations(layout, 64, 2, 6, false);
    assert!(panics(&|| {
        let mut out = vec![0f32; 16];
        for part in flexserve_quant::ColumnParts::new(&mut out, 2, 8, 8, 8) {
            layout.matmul_part(64, &packed, &a, a.len() / 2, 1, true, part);
        }
    }));
}
