//! F32, F16 and BF16: encodings, conversion accuracy, dot products, and
//! agreement between the SIMD (AVX2, and AVX-512 where the CPU has it) and
//! portable kernels.

mod common;

use common::*;
use flexserve_quant::GgmlType;

const TYPES: [GgmlType; 3] = [GgmlType::F32, GgmlType::F16, GgmlType::BF16];
/// Lengths around the 8-, 16- and 32-element steps of the SIMD loops.
const LENGTHS: [usize; 15] = [1, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 100, 257, 1000];

/// Relative rounding of a conversion to `ty`.
fn unit_roundoff(ty: GgmlType) -> f32 {
    match ty {
        GgmlType::F32 => 0.0,
        GgmlType::F16 => 1.0 / 2048.0,
        GgmlType::BF16 => 1.0 / 256.0,
        _ => unreachable!(),
    }
}

#[test]
fn known_encodings() {
    let cases: [(GgmlType, &[u8], &[f32]); 3] = [
        (GgmlType::F32, &[0, 0, 0x80, 0x3F, 0, 0, 0, 0xC0], &[1.0, -2.0]),
        (GgmlType::F16, &[0x00, 0x3C, 0x00, 0xC0, 0xFF, 0x7B, 0x00, 0x35], &[1.0, -2.0, 65504.0, 0.3125]),
        (GgmlType::BF16, &[0x80, 0x3F, 0x00, 0xC0, 0xA0, 0x3E], &[1.0, -2.0, 0.3125]),
    ];
    for (ty, bytes, values) in cases {
        for k in every_tier(ty) {
            assert_eq!(dequantize(&k, bytes, values.len()), values, "{ty}");
            assert_eq!(quantize(&k, values), bytes, "{ty}");
        }
    }
}

#[test]
fn kernel_table() {
    for ty in TYPES {
        for k in every_tier(ty) {
            assert_eq!((k.ty, k.vec_dot_type), (ty, ty));
            assert!(k.dot.is_some());
        }
    }
}

#[test]
fn round_trip_error_is_relative() {
    let mut rng = rng(11);
    for ty in TYPES {
        let k = portable(ty);
        for shape in SHAPES {
            let x = data(&mut rng, shape, 300, 32);
            let y = dequantize(&k, &quantize(&k, &x), x.len());
            for (a, b) in x.iter().zip(&y) {
                // Values here stay in the normal range of every type.
                assert!((a - b).abs() <= a.abs() * unit_roundoff(ty), "{ty} {shape:?}: {a} -> {b}");
            }
        }
    }
}

#[test]
fn dot_matches_converted_values() {
    let mut rng = rng(12);
    for ty in TYPES {
        for n in LENGTHS {
            let (w, x) = (data(&mut rng, Shape::Scaled, n, 32), data(&mut rng, Shape::Uniform, n, 32));
            let k = portable(ty);
            let (wq, aq) = (quantize(&k, &w), quantize(&k, &x));
            let (exact, magnitude) = dot_and_magnitude(&dequantize(&k, &wq, n), &dequantize(&k, &aq, n));
            let (float_dot, _) = dot_and_magnitude(&w, &x);
            for k in every_tier(ty) {
                let got = (k.dot.unwrap())(n, &wq, &aq) as f64;
                assert!((got - exact).abs() <= 1e-6 * magnitude, "{ty} n={n}: {got} vs {exact}");
                let conversion = 2.5 * unit_roundoff(ty) as f64 * magnitude;
                assert!((got - float_dot).abs() <= conversion + 1e-6 * magnitude, "{ty} n={n}");
            }
        }
    }
}

#[test]
fn simd_kernels_match_portable() {
    let mut rng = rng(13);
    for (ty, (isa, s)) in TYPES.into_iter().flat_map(|ty| simd_by_tier(ty).into_iter().map(move |k| (ty, k))) {
        let p = portable(ty);
        for n in LENGTHS {
            for shape in SHAPES {
                let x = data(&mut rng, shape, n, 32);
                let bytes = quantize(&p, &x);
                assert_eq!(quantize(&s, &x), bytes, "{ty} {isa:?} {shape:?} n={n}");

                let (buf, at) = misaligned(&bytes);
                let row = &buf[at..at + bytes.len()];
                let bits = |v: Vec<f32>| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(dequantize(&s, row, n)), bits(dequantize(&p, &bytes, n)), "{ty} {isa:?} n={n}");

                let a = quantize(&p, &data(&mut rng, Shape::Scaled, n, 32));
                let (_, magnitude) = dot_and_magnitude(&dequantize(&p, &bytes, n), &dequantize(&p, &a, n));
                let expected = (p.dot.unwrap())(n, &bytes, &a) as f64;
                let got = (s.dot.unwrap())(n, row, &a) as f64;
                assert!(
                    (got - expected).abs() <= 1e-5 * magnitude + 1e-30,
                    "{ty} {isa:?} {shape:?} n={n}: {got} vs {expected}"
                );
            }
        }
    }
}

#[test]
fn special_values_convert_like_ieee() {
    let x = [f32::INFINITY, f32::NEG_INFINITY, 1e10, -0.0, 1e-10];
    for k in every_tier(GgmlType::F16) {
        let y = dequantize(&k, &quantize(&k, &x), x.len());
        assert_eq!(y[..3], [f32::INFINITY, f32::NEG_INFINITY, f32::INFINITY]);
        assert_eq!((y[3], y[3].is_sign_negative()), (0.0, true));
        assert_eq!(y[4], 0.0);
        let nan = dequantize(&k, &quantize(&k, &[f32::NAN]), 1);
        assert!(nan[0].is_nan());
    }
    for k in every_tier(GgmlType::BF16) {
        let y = dequantize(&k, &quantize(&k, &x), x.len());
        assert_eq!(y[..2], [f32::INFINITY, f32::NEG_INFINITY]);
        assert!((y[2] - 1e10).abs() <= 1e10 / 256.0);
        assert!(dequantize(&k, &quantize(&k, &[f32::NAN]), 1)[0].is_nan());
    }
}
