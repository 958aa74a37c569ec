//! Rearranged (`Q4_0x8`) weights: the kernels against a straightforward
//! scalar model of llama.cpp's grouped arithmetic computed from the original
//! rows (bit for bit), AVX2 against portable (bit for bit), closeness to the
//! plain dot, and argument checks.

mod common;

use common::*;
use flexserve_quant::{
    detected_isa, kernels_for, q4_0x8_kernel_for, repack_q4_0x8, repackable, GgmlType, Isa, QuantError,
    RepackedMatmulFn,
};
use half::f16;
use rand::Rng;

const Q4_0_BYTES: usize = 18;
const Q8_0_BYTES: usize = 34;

/// `rows` Q4_0 rows of `n` random values, each row with its own scale.
fn weights(n: usize, rows: usize, seed: u64) -> Vec<u8> {
    let k = portable(GgmlType::Q4_0);
    let mut rng = rng(seed);
    let mut out = Vec::new();
    for _ in 0..rows {
        let scale = 10f32.powf(rng.gen_range(-2.0..1.0));
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale).collect();
        out.extend(quantize(&k, &x));
    }
    out
}

/// `n_tok` Q8_0 rows of `n` values: quantized activations, or raw random
/// quants (down to -128) with random scales when `raw`.
fn activations(n: usize, n_tok: usize, seed: u64, raw: bool) -> Vec<u8> {
    let k = portable(GgmlType::Q8_0);
    let mut rng = rng(seed);
    let mut out = Vec::new();
    for _ in 0..n_tok {
        if raw {
            for _ in 0..n / 32 {
                out.extend(f16::from_f32(rng.gen_range(-0.1f32..0.1)).to_le_bytes());
                out.extend((0..32).map(|_| rng.gen::<u8>()));
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

/// llama.cpp's grouped arithmetic from the original row and activation row:
/// per block, the exact integer dot, the f32 scale product, one FMA.
fn model_dot(n: usize, w_row: &[u8], a_row: &[u8]) -> f32 {
    let mut acc = 0f32;
    for b in 0..n / 32 {
        let wb = &w_row[b * Q4_0_BYTES..(b + 1) * Q4_0_BYTES];
        let ab = &a_row[b * Q8_0_BYTES..(b + 1) * Q8_0_BYTES];
        let mut isum = 0i32;
        for j in 0..16 {
            let (lo, hi) = ((wb[2 + j] & 0x0F) as i32 - 8, (wb[2 + j] >> 4) as i32 - 8);
            isum += lo * ab[2 + j] as i8 as i32 + hi * ab[2 + 16 + j] as i8 as i32;
        }
        acc = (isum as f32).mul_add(f16_at(wb, 0) * f16_at(ab, 0), acc);
    }
    acc
}

fn run(
    kernel: RepackedMatmulFn,
    n: usize,
    packed: &[u8],
    rows: usize,
    a: &[u8],
    n_tok: usize,
    stride: usize,
) -> Vec<f32> {
    let mut out = vec![f32::NAN; n_tok.max(1) * stride];
    kernel(n, packed, rows, a, n / 32 * Q8_0_BYTES, n_tok, &mut out, stride);
    out
}

fn isas() -> Vec<Isa> {
    let mut v = vec![Isa::Portable];
    if detected_isa() == Isa::Avx2 {
        v.push(Isa::Avx2);
    }
    v
}

#[test]
fn kernels_match_the_scalar_model_bit_for_bit() {
    let mut seed = 1;
    for n in [32, 7 * 32, 576] {
        for rows in [8, 16, 40] {
            for n_tok in [1, 2, 3, 4, 5, 9] {
                for raw in [false, true] {
                    seed += 1;
                    let w = weights(n, rows, seed);
                    let a = activations(n, n_tok, seed + 1000, raw);
                    let packed = repack_q4_0x8(&w, rows, n).unwrap();
                    assert_eq!(packed.len(), w.len());
                    let stride = rows + 3;
                    let row_bytes = n / 32 * Q4_0_BYTES;
                    let a_bytes = n / 32 * Q8_0_BYTES;
                    for isa in isas() {
                        let got = run(q4_0x8_kernel_for(isa), n, &packed, rows, &a, n_tok, stride);
                        for t in 0..n_tok {
                            for r in 0..rows {
                                let want = model_dot(n, &w[r * row_bytes..][..row_bytes], &a[t * a_bytes..][..a_bytes]);
                                let g = got[t * stride + r];
                                assert_eq!(
                                    g.to_bits(),
                                    want.to_bits(),
                                    "{isa:?} n {n} rows {rows} token {t} row {r}: {g} vs {want}"
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

#[test]
fn avx2_matches_portable_on_random_bytes() {
    // Arbitrary quant bytes and scales (not from a quantizer), many shapes.
    let mut rng = rng(77);
    for case in 0..40 {
        let n = 32 * rng.gen_range(1..20);
        let rows = 8 * rng.gen_range(1..5);
        let n_tok = rng.gen_range(1..11);
        let mut w = vec![0u8; rows * n / 32 * Q4_0_BYTES];
        rng.fill(&mut w[..]);
        for blk in w.chunks_exact_mut(Q4_0_BYTES) {
            blk[..2].copy_from_slice(&f16::from_f32(rng.gen_range(-0.05f32..0.05)).to_le_bytes());
        }
        let a = activations(n, n_tok, case, true);
        let packed = repack_q4_0x8(&w, rows, n).unwrap();
        let p = run(q4_0x8_kernel_for(Isa::Portable), n, &packed, rows, &a, n_tok, rows);
        let s = run(q4_0x8_kernel_for(detected_isa()), n, &packed, rows, &a, n_tok, rows);
        let (pb, sb): (Vec<u32>, Vec<u32>) =
            (p.iter().map(|v| v.to_bits()).collect(), s.iter().map(|v| v.to_bits()).collect());
        assert_eq!(pb, sb, "case {case}: n {n} rows {rows} tokens {n_tok}");
    }
}

#[test]
fn results_are_close_to_the_plain_dot() {
    let (n, rows, n_tok) = (256, 16, 3);
    let w = weights(n, rows, 5);
    let a = activations(n, n_tok, 6, false);
    let packed = repack_q4_0x8(&w, rows, n).unwrap();
    let dot = kernels_for(GgmlType::Q4_0, Isa::Portable).unwrap().dot.unwrap();
    let got = run(q4_0x8_kernel_for(detected_isa()), n, &packed, rows, &a, n_tok, rows);
    let (row_bytes, a_bytes) = (n / 32 * Q4_0_BYTES, n / 32 * Q8_0_BYTES);
    for t in 0..n_tok {
        for r in 0..rows {
            let want = dot(n, &w[r * row_bytes..][..row_bytes], &a[t * a_bytes..][..a_bytes]);
            let g = got[t * rows + r];
            assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "token {t} row {r}: {g} vs {want}");
        }
    }
}

#[test]
fn repack_rejects_bad_shapes() {
    let w = weights(64, 8, 9);
    assert!(matches!(repack_q4_0x8(&w[..w.len() - 1], 8, 64), Err(QuantError::BadLength { .. })));
    assert!(matches!(repack_q4_0x8(&w, 8, 48), Err(QuantError::NotBlockMultiple { .. })));
    let w12 = weights(64, 12, 9);
    let err = repack_q4_0x8(&w12, 12, 64).unwrap_err();
    assert!(matches!(err, QuantError::RowsNotGroupMultiple { rows: 12, group: 8, .. }), "{err}");
    assert!(repackable(GgmlType::Q4_0, 16, 64));
    assert!(!repackable(GgmlType::Q4_0, 12, 64));
    assert!(!repackable(GgmlType::Q4_0, 0, 64));
    assert!(!repackable(GgmlType::Q4_1, 16, 64));
    assert!(!repackable(GgmlType::Q8_0, 16, 64));
}

#[test]
#[should_panic(expected = "activation rows need more than")]
fn short_activations_panic_clearly() {
    let w = weights(64, 8, 3);
    let packed = repack_q4_0x8(&w, 8, 64).unwrap();
    let a = activations(64, 1, 4, false);
    let mut out = vec![0f32; 16];
    (q4_0x8_kernel_for(detected_isa()))(64, &packed, 8, &a, a.len(), 2, &mut out, 8);
}
