//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q8_1: layouts, quantizer accuracy, dot
//! products, and agreement between the AVX2 and portable kernels.

mod common;

use common::*;
use flexserve_quant::{detected_isa, GgmlType, Isa};
use half::f16;
use rand::Rng;

const QK: usize = 32;
const WEIGHT_TYPES: [GgmlType; 5] = [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0];
const ALL_TYPES: [GgmlType; 6] =
    [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q8_1];
/// Block counts: single, small, odd, and long rows.
const BLOCK_COUNTS: [usize; 7] = [1, 2, 3, 7, 8, 33, 97];

fn h(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

fn assert_dequantizes_to(ty: GgmlType, block: &[u8], expected: &[f32]) {
    for k in [portable(ty), simd(ty)] {
        assert_eq!(dequantize(&k, block, QK), expected, "{ty}");
    }
}

// ---------------------------------------------------------------------------
// Bit layouts, pinned with hand-built blocks

#[test]
fn q4_0_layout() {
    let mut block = h(1.0).to_vec();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let expected: Vec<f32> = (0..16).map(|j| j as f32 - 8.0).chain((0..16).map(|j| 7.0 - j as f32)).collect();
    assert_dequantizes_to(GgmlType::Q4_0, &block, &expected);
}

#[test]
fn q4_1_layout() {
    let mut block = [h(0.5), h(-1.0)].concat();
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let expected: Vec<f32> =
        (0..16).map(|j| j as f32 * 0.5 - 1.0).chain((0..16).map(|j| (15 - j) as f32 * 0.5 - 1.0)).collect();
    assert_dequantizes_to(GgmlType::Q4_1, &block, &expected);
}

#[test]
fn q5_0_layout() {
    // Odd elements have the fifth bit set.
    let mut block = h(2.0).to_vec();
    block.extend(0xAAAA_AAAAu32.to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let expected: Vec<f32> = (0..32)
        .map(|e: usize| {
            let nibble = if e < 16 { e } else { 31 - e };
            let q = nibble + if e % 2 == 1 { 16 } else { 0 };
            (q as f32 - 16.0) * 2.0
        })
        .collect();
    assert_eq!(expected[0], -32.0);
    assert_eq!(expected[1], 2.0);
    assert_dequantizes_to(GgmlType::Q5_0, &block, &expected);
}

#[test]
fn q5_1_layout() {
    // Elements 0..16 have the fifth bit set, 16..32 do not.
    let mut block = [h(1.0), h(0.25)].concat();
    block.extend(0x0000_FFFFu32.to_le_bytes());
    block.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let expected: Vec<f32> =
        (0..16).map(|j| (j + 16) as f32 + 0.25).chain((0..16).map(|j| (15 - j) as f32 + 0.25)).collect();
    assert_dequantizes_to(GgmlType::Q5_1, &block, &expected);
}

#[test]
fn q8_0_and_q8_1_layout() {
    let qs: Vec<u8> = (0..32).map(|j| (j * 8 - 128) as i8 as u8).collect();
    let expected: Vec<f32> = (0..32).map(|j| (j * 8 - 128) as f32 * 0.25).collect();
    let q8_0 = [&h(0.25)[..], &qs].concat();
    assert_dequantizes_to(GgmlType::Q8_0, &q8_0, &expected);
    let q8_1 = [&h(0.25)[..], &h(123.0), &qs].concat();
    assert_dequantizes_to(GgmlType::Q8_1, &q8_1, &expected);
}

/// Values that sit exactly on the grid come back as the same bytes.
#[test]
fn grid_values_quantize_to_known_bytes() {
    let nibbles: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let cases: [(GgmlType, Vec<u8>); 4] = [
        (GgmlType::Q4_0, [&h(1.0)[..], &nibbles].concat()),
        (GgmlType::Q4_1, [&h(1.0)[..], &h(0.0), &nibbles].concat()),
        // -16 (element 0) must be present so that d = -16 / -16 = 1.
        (GgmlType::Q5_0, [&h(1.0)[..], &0xFFFF_FFFEu32.to_le_bytes(), &nibbles].concat()),
        // Element 15 (nibble 15, fifth bit set) is the maximum 31, element 0 the minimum 0.
        (GgmlType::Q5_1, [&h(1.0)[..], &h(0.0), &0x0000_8000u32.to_le_bytes(), &nibbles].concat()),
    ];
    for (ty, block) in cases {
        let values = dequantize(&portable(ty), &block, QK);
        for k in [portable(ty), simd(ty)] {
            assert_eq!(quantize(&k, &values), block, "{ty}");
        }
    }

    let mut x = [0.0f32; QK];
    for (j, v) in x.iter_mut().enumerate() {
        *v = j as f32 * 8.0 - 120.0;
    }
    x[31] = 127.0; // amax 127 gives d = 1 and 127 / amax = 1
    x[1] = 2.5; // ties round to even
    x[2] = -3.5;
    let mut expected_qs: Vec<i8> = x.iter().map(|&v| v.round_ties_even() as i8).collect();
    expected_qs[1] = 2;
    expected_qs[2] = -4;
    let qs: Vec<u8> = expected_qs.iter().map(|&q| q as u8).collect();
    let sum: i32 = expected_qs.iter().map(|&q| q as i32).sum();
    for k in [portable(GgmlType::Q8_0), simd(GgmlType::Q8_0)] {
        assert_eq!(quantize(&k, &x), [&h(1.0)[..], &qs].concat());
    }
    for k in [portable(GgmlType::Q8_1), simd(GgmlType::Q8_1)] {
        assert_eq!(quantize(&k, &x), [&h(1.0)[..], &h(sum as f32), &qs].concat());
    }
}

#[test]
fn kernel_table() {
    for ty in ALL_TYPES {
        for k in [portable(ty), simd(ty)] {
            assert_eq!(k.ty, ty);
            let expected = match ty {
                GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 => GgmlType::Q8_1,
                _ => GgmlType::Q8_0,
            };
            assert_eq!(k.vec_dot_type, expected, "{ty}");
            assert_eq!(k.dot.is_some(), ty != GgmlType::Q8_1, "{ty}");
        }
    }
}

// ---------------------------------------------------------------------------
// Quantizer accuracy

/// Largest error allowed for one block `x` of type `ty` after a round trip.
/// `F16` is the relative rounding of the stored scale and minimum.
fn error_bound(ty: GgmlType, x: &[f32]) -> f32 {
    const F16: f32 = 1.0 / 2048.0;
    let (min, max) = x.iter().fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let range = max - min;
    let bound = match ty {
        // The extreme side is exact; the other side may clip by one step.
        GgmlType::Q4_0 => amax(x) / 8.0 * (1.0 + 8.0 * F16),
        GgmlType::Q5_0 => amax(x) / 16.0 * (1.0 + 16.0 * F16),
        GgmlType::Q4_1 => range / 30.0 + range * F16 + min.abs() * F16,
        GgmlType::Q5_1 => range / 62.0 + range * F16 + min.abs() * F16,
        GgmlType::Q8_0 | GgmlType::Q8_1 => amax(x) / 127.0 * (0.5 + 127.0 * F16),
        _ => unreachable!(),
    };
    bound * 1.001 + 1e-7
}

#[test]
fn round_trip_error_is_bounded() {
    let mut rng = rng(1);
    for ty in ALL_TYPES {
        let k = portable(ty);
        for shape in SHAPES {
            let x = data(&mut rng, shape, 8 * QK, QK);
            let y = dequantize(&k, &quantize(&k, &x), x.len());
            for (xb, yb) in x.chunks(QK).zip(y.chunks(QK)) {
                let bound = error_bound(ty, xb);
                for (a, b) in xb.iter().zip(yb) {
                    assert!((a - b).abs() <= bound, "{ty} {shape:?}: {a} -> {b}, bound {bound}");
                }
            }
            if matches!(shape, Shape::Zero) {
                assert!(y.iter().all(|&v| v == 0.0), "{ty}: zeros must stay zeros");
            }
        }
    }
}

/// Constant blocks come back exactly in the 4- and 5-bit formats (here the
/// scale is a power-of-two fraction; with a minimum, the scale is zero).
#[test]
fn constant_blocks() {
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1] {
        let k = portable(ty);
        let x = vec![-1.5f32; QK];
        let y = dequantize(&k, &quantize(&k, &x), QK);
        assert!(y.iter().all(|&v| v == -1.5), "{ty}: {y:?}");
    }
}

#[test]
fn hostile_values_do_not_panic() {
    let x: Vec<f32> =
        [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e-30, 0.0].iter().cycle().take(2 * QK).copied().collect();
    for ty in ALL_TYPES {
        for k in [portable(ty), simd(ty)] {
            let bytes = quantize(&k, &x);
            let _ = dequantize(&k, &bytes, x.len());
        }
    }
}

// ---------------------------------------------------------------------------
// Dot products

/// A weight row of `ty` and the matching activation row, quantized from
/// random data, with their dequantized values.
struct DotCase {
    n: usize,
    w: Vec<u8>,
    a: Vec<u8>,
    w_values: Vec<f32>,
    a_values: Vec<f32>,
    x: Vec<f32>,
}

fn dot_case(ty: GgmlType, rng: &mut rand::rngs::StdRng, shape: Shape, blocks: usize) -> DotCase {
    let n = blocks * QK;
    let (wk, ak) = (portable(ty), portable(portable(ty).vec_dot_type));
    let w = quantize(&wk, &data(rng, shape, n, QK));
    let x = data(rng, Shape::Scaled, n, QK);
    let a = quantize(&ak, &x);
    DotCase { n, w_values: dequantize(&wk, &w, n), a_values: dequantize(&ak, &a, n), w, a, x }
}

/// The part of the error that comes from the stored f16 `s` of Q8_1 rows:
/// `sum |m_w * s_a|` times the f16 rounding, zero for other types.
fn offset_slack(ty: GgmlType, w: &[u8], a: &[u8]) -> f64 {
    if !matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
        return 0.0;
    }
    w.chunks(ty.type_size())
        .zip(a.chunks(36))
        .map(|(wb, ab)| {
            let m = f16::from_le_bytes([wb[2], wb[3]]).to_f64();
            let s = f16::from_le_bytes([ab[2], ab[3]]).to_f64();
            (m * s).abs() / 1024.0
        })
        .sum()
}

#[test]
fn dot_matches_dequantized_values() {
    let mut rng = rng(2);
    for ty in WEIGHT_TYPES {
        for shape in SHAPES {
            for blocks in [1, 3, 16] {
                let case = dot_case(ty, &mut rng, shape, blocks);
                let (exact, magnitude) = dot_and_magnitude(&case.w_values, &case.a_values);
                let slack = offset_slack(ty, &case.w, &case.a);
                for k in [portable(ty), simd(ty)] {
                    let got = (k.dot.unwrap())(case.n, &case.w, &case.a) as f64;
                    let tol = 1e-5 * magnitude + slack + 1e-30;
                    assert!((got - exact).abs() <= tol, "{ty} {shape:?} x{blocks}: {got} vs {exact}");
                }
            }
        }
    }
}

#[test]
fn dot_approximates_the_float_dot() {
    let mut rng = rng(3);
    for ty in WEIGHT_TYPES {
        for shape in SHAPES {
            let case = dot_case(ty, &mut rng, shape, 24);
            let (reference, _) = dot_and_magnitude(&case.w_values, &case.x);
            // Activation quantization moves each x by at most half a step
            // (plus the f16 rounding of the step): bound the total by the
            // weights' magnitude times that step, block by block.
            let tol: f64 = case
                .w_values
                .chunks(QK)
                .zip(case.x.chunks(QK))
                .map(|(wb, xb)| {
                    let wsum: f64 = wb.iter().map(|v| v.abs() as f64).sum();
                    wsum * amax(xb) as f64 / 127.0 * 0.57
                })
                .sum::<f64>()
                + offset_slack(ty, &case.w, &case.a)
                + 1e-6;
            let got = (simd(ty).dot.unwrap())(case.n, &case.w, &case.a) as f64;
            assert!((got - reference).abs() <= tol, "{ty} {shape:?}: {got} vs {reference} (tol {tol})");
        }
    }
}

// ---------------------------------------------------------------------------
// AVX2 against portable

#[test]
fn simd_quantize_and_dequantize_are_bit_identical() {
    let mut rng = rng(4);
    for ty in ALL_TYPES {
        let (p, s) = (portable(ty), simd(ty));
        for shape in SHAPES {
            for blocks in BLOCK_COUNTS {
                let x = data(&mut rng, shape, blocks * QK, QK);
                let bytes = quantize(&p, &x);
                assert_eq!(quantize(&s, &x), bytes, "{ty} {shape:?} x{blocks}");
                let (buf, at) = misaligned(&bytes);
                let expected: Vec<u32> = dequantize(&p, &bytes, x.len()).iter().map(|v| v.to_bits()).collect();
                let got: Vec<u32> =
                    dequantize(&s, &buf[at..at + bytes.len()], x.len()).iter().map(|v| v.to_bits()).collect();
                assert_eq!(got, expected, "{ty} {shape:?} x{blocks}");
            }
        }
    }
}

/// Raw blocks with every byte random except a sane scale (and minimum), so
/// that all bit patterns of the quants — including -128 in Q8_0 — occur.
fn random_blocks(ty: GgmlType, rng: &mut rand::rngs::StdRng, blocks: usize) -> Vec<u8> {
    let size = ty.type_size();
    let mut out = vec![0u8; blocks * size];
    rng.fill(&mut out[..]);
    for block in out.chunks_mut(size) {
        block[..2].copy_from_slice(&h(rng.gen_range(-0.1f32..0.1)));
        if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
            block[2..4].copy_from_slice(&h(rng.gen_range(-1.0f32..1.0)));
        }
    }
    out
}

#[test]
fn simd_dot_matches_portable_bit_for_bit() {
    let mut rng = rng(5);
    for ty in WEIGHT_TYPES {
        let (p, s) = (portable(ty), simd(ty));
        let ak = portable(p.vec_dot_type);
        for blocks in BLOCK_COUNTS {
            let n = blocks * QK;
            for round in 0..=SHAPES.len() {
                let w = match round.checked_sub(1) {
                    None => random_blocks(ty, &mut rng, blocks),
                    Some(shape) => quantize(&p, &data(&mut rng, SHAPES[shape], n, QK)),
                };
                let a = quantize(&ak, &data(&mut rng, Shape::Scaled, n, QK));
                // Bit for bit: both keep the lanes and rounding order of
                // llama.cpp's x86 dot.
                let expected = (p.dot.unwrap())(n, &w, &a);
                let (wbuf, wat) = misaligned(&w);
                let (abuf, aat) = misaligned(&a);
                let got = (s.dot.unwrap())(n, &wbuf[wat..wat + w.len()], &abuf[aat..aat + a.len()]);
                assert_eq!(got.to_bits(), expected.to_bits(), "{ty} x{blocks} round {round}: {got} vs {expected}");
            }
        }
    }
}

#[test]
fn reports_which_isa_ran() {
    // Not an assertion about the machine: documents in the test log whether
    // the comparisons above exercised SIMD or compared portable to itself.
    let isa = detected_isa();
    let tiers = flexserve_quant::usable_isas();
    eprintln!("kernels compared on tiers {tiers:?}");
    assert_eq!((tiers.first(), tiers.last()), (Some(&Isa::Portable), Some(&isa)));
}
