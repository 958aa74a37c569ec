//! K-quant kernels: bit layouts, quantization quality, dot products, and the
//! AVX2 kernels against the portable ones.

mod kquant_common;

use flexserve_quant::{kernels_for, GgmlType, Isa, Kernels};
use half::f16;
use kquant_common::*;
use rand::Rng;

const WEIGHT_TYPES: [GgmlType; 3] = [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K];

fn portable(ty: GgmlType) -> Kernels {
    kernels_for(ty, Isa::Portable).expect("K-quant kernels exist")
}

/// The lowest SIMD tier of this architecture (AVX2, NEON).
fn base_simd() -> Isa {
    if cfg!(target_arch = "aarch64") {
        Isa::Neon
    } else {
        Isa::Avx2
    }
}

fn simd(ty: GgmlType) -> Kernels {
    kernels_for(ty, base_simd()).expect("K-quant kernels exist")
}

fn row_bytes(ty: GgmlType, n: usize) -> usize {
    n / ty.block_size() * ty.type_size()
}

fn quantize(k: &Kernels, x: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; row_bytes(k.ty, x.len())];
    (k.quantize)(x, &mut out);
    out
}

fn dequantize(k: &Kernels, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    (k.dequantize)(bytes, &mut out);
    out
}

fn f16_bytes(v: f32) -> [u8; 2] {
    f16::from_f32(v).to_le_bytes()
}

// ---------------------------------------------------------------- metadata

#[test]
fn kernel_tables_describe_the_k_types() {
    for isa in [Isa::Portable, base_simd()] {
        for ty in WEIGHT_TYPES {
            let k = kernels_for(ty, isa).unwrap();
            assert_eq!(k.ty, ty);
            assert_eq!(k.vec_dot_type, GgmlType::Q8_K);
            assert!(k.dot.is_some(), "{ty} has a dot product");
        }
        let q8k = kernels_for(GgmlType::Q8_K, isa).unwrap();
        assert_eq!(q8k.vec_dot_type, GgmlType::Q8_K);
        assert!(q8k.dot.is_none(), "Q8_K is an activation format only");
    }
    assert_eq!(GgmlType::Q4_K.type_size(), 144);
    assert_eq!(GgmlType::Q5_K.type_size(), 176);
    assert_eq!(GgmlType::Q6_K.type_size(), 210);
    assert_eq!(GgmlType::Q8_K.type_size(), 292);
}

#[test]
fn checked_wrappers_reject_bad_lengths() {
    let x = vec![0.5f32; 300];
    let mut out = vec![0u8; 144];
    assert!(flexserve_quant::quantize_row(GgmlType::Q4_K, &x, &mut out).is_err());
    let x = vec![0.5f32; 256];
    let mut short = vec![0u8; 143];
    assert!(flexserve_quant::quantize_row(GgmlType::Q4_K, &x, &mut short).is_err());
    let mut y = vec![0f32; 256];
    assert!(flexserve_quant::dequantize_row(GgmlType::Q6_K, &[0u8; 211], &mut y).is_err());
    assert!(flexserve_quant::dequantize_row(GgmlType::Q6_K, &[0u8; 210], &mut y).is_ok());
}

// ------------------------------------------------------- hand-built layouts

/// Packs eight 6-bit scales and mins the way the format stores them.
fn pack_scales(scales: [u8; 8], mins: [u8; 8]) -> [u8; 12] {
    let mut p = [0u8; 12];
    for j in 0..4 {
        p[j] = scales[j] | ((scales[j + 4] >> 4) << 6);
        p[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6);
        p[j + 8] = (scales[j + 4] & 0xF) | ((mins[j + 4] & 0xF) << 4);
    }
    p
}

const SCALES: [u8; 8] = [1, 2, 3, 5, 17, 33, 50, 63];
const MINS: [u8; 8] = [0, 7, 16, 31, 32, 45, 62, 63];

#[test]
fn q4k_layout_pins_nibbles_scales_and_mins() {
    let mut block = vec![0u8; 144];
    block[0..2].copy_from_slice(&f16_bytes(1.0));
    block[2..4].copy_from_slice(&f16_bytes(0.5));
    block[4..16].copy_from_slice(&pack_scales(SCALES, MINS));
    for c in 0..4 {
        for l in 0..32 {
            block[16 + 32 * c + l] = ((l + c) % 16) as u8 | ((((3 * l + c) % 16) as u8) << 4);
        }
    }
    let y = dequantize(&portable(GgmlType::Q4_K), &block, 256);
    for c in 0..4 {
        for l in 0..32 {
            let (lo, hi) = (2 * c, 2 * c + 1);
            let want_lo = SCALES[lo] as f32 * ((l + c) % 16) as f32 - 0.5 * MINS[lo] as f32;
            let want_hi = SCALES[hi] as f32 * ((3 * l + c) % 16) as f32 - 0.5 * MINS[hi] as f32;
            assert_eq!(y[64 * c + l], want_lo, "element {}", 64 * c + l);
            assert_eq!(y[64 * c + 32 + l], want_hi, "element {}", 64 * c + 32 + l);
        }
    }
}

#[test]
fn q4k_single_nibbles_land_on_the_documented_elements() {
    // d = 1, dmin = 0, every scale 1: element value = its level.
    let mut base = vec![0u8; 144];
    base[0..2].copy_from_slice(&f16_bytes(1.0));
    base[4..16].copy_from_slice(&pack_scales([1; 8], [0; 8]));
    let k = portable(GgmlType::Q4_K);
    for (byte, nibble_high, element) in [
        (0, false, 0),
        (0, true, 32),
        (5, false, 5),
        (31, true, 63),
        (32, false, 64),
        (77, true, 173),
        (127, true, 255),
    ] {
        let mut block = base.clone();
        block[16 + byte] = if nibble_high { 0x90 } else { 0x09 };
        let y = dequantize(&k, &block, 256);
        for (i, &v) in y.iter().enumerate() {
            assert_eq!(v, if i == element { 9.0 } else { 0.0 }, "qs[{byte}] -> element {i}");
        }
    }
}

#[test]
fn q5k_layout_pins_the_fifth_bit_plane() {
    let mut block = vec![0u8; 176];
    block[0..2].copy_from_slice(&f16_bytes(1.0));
    block[2..4].copy_from_slice(&f16_bytes(0.25));
    block[4..16].copy_from_slice(&pack_scales(SCALES, MINS));
    for l in 0..32 {
        block[16 + l] = (l as u8).wrapping_mul(37) ^ 0x5A;
    }
    for c in 0..4 {
        for l in 0..32 {
            block[48 + 32 * c + l] = ((l + 2 * c) % 16) as u8 | ((((5 * l + c) % 16) as u8) << 4);
        }
    }
    let y = dequantize(&portable(GgmlType::Q5_K), &block, 256);
    for c in 0..4 {
        for l in 0..32 {
            let qh = block[16 + l];
            let lo_level = ((l + 2 * c) % 16) as u32 + 16 * ((qh >> (2 * c)) & 1) as u32;
            let hi_level = ((5 * l + c) % 16) as u32 + 16 * ((qh >> (2 * c + 1)) & 1) as u32;
            let (lo, hi) = (2 * c, 2 * c + 1);
            let want_lo = SCALES[lo] as f32 * lo_level as f32 - 0.25 * MINS[lo] as f32;
            let want_hi = SCALES[hi] as f32 * hi_level as f32 - 0.25 * MINS[hi] as f32;
            assert_eq!(y[64 * c + l], want_lo, "element {}", 64 * c + l);
            assert_eq!(y[64 * c + 32 + l], want_hi, "element {}", 64 * c + 32 + l);
        }
    }
}

#[test]
fn q5k_single_high_bits_land_on_the_documented_elements() {
    let mut base = vec![0u8; 176];
    base[0..2].copy_from_slice(&f16_bytes(1.0));
    base[4..16].copy_from_slice(&pack_scales([1; 8], [0; 8]));
    let k = portable(GgmlType::Q5_K);
    // qh[l] bit b sets the fifth bit of element 32 * b + l.
    for (l, bit, element) in [(0, 0, 0), (3, 1, 35), (31, 2, 95), (7, 5, 167), (31, 7, 255)] {
        let mut block = base.clone();
        block[16 + l] = 1 << bit;
        let y = dequantize(&k, &block, 256);
        for (i, &v) in y.iter().enumerate() {
            assert_eq!(v, if i == element { 16.0 } else { 0.0 }, "qh[{l}] bit {bit} -> element {i}");
        }
    }
}

/// A Q6_K block whose every level is 32 (value 0), with scales `s - 8` for
/// sub-block `s` and `d` = 0.5.
fn q6k_zero_block() -> Vec<u8> {
    let mut block = vec![0u8; 210];
    // Level 32 = high bits 0b10 with low nibble 0.
    for b in &mut block[128..192] {
        *b = 0b1010_1010;
    }
    for s in 0..16 {
        block[192 + s] = (s as i8 - 8) as u8;
    }
    block[208..210].copy_from_slice(&f16_bytes(0.5));
    block
}

#[test]
fn q6k_single_nibbles_and_bit_pairs_land_on_the_documented_elements() {
    let k = portable(GgmlType::Q6_K);
    let scale = |element: usize| 0.5 * ((element / 16) as f32 - 8.0);
    // (ql byte, high nibble?, element)
    for (byte, high, element) in [
        (0, false, 0),
        (5, false, 5),
        (5, true, 69),
        (37, false, 37),
        (37, true, 101),
        (64, false, 128),
        (127, true, 255),
        (100, false, 164),
    ] {
        let mut block = q6k_zero_block();
        block[byte] = if high { 0x30 } else { 0x03 };
        let y = dequantize(&k, &block, 256);
        for (i, &v) in y.iter().enumerate() {
            let want = if i == element { scale(i) * 3.0 } else { 0.0 };
            assert_eq!(v, want, "ql[{byte}] -> element {i}");
        }
    }
    // (qh byte, bit pair, element): pair p of qh[32h + l] belongs to element 128h + 32p + l.
    for (byte, pair, element) in [(0, 0, 0), (0, 1, 32), (9, 2, 73), (31, 3, 127), (32, 0, 128), (40, 3, 232)] {
        let mut block = q6k_zero_block();
        block[128 + byte] &= !(0b11 << (2 * pair));
        block[128 + byte] |= 0b11 << (2 * pair);
        let y = dequantize(&k, &block, 256);
        for (i, &v) in y.iter().enumerate() {
            let want = if i == element { scale(i) * 16.0 } else { 0.0 };
            assert_eq!(v, want, "qh[{byte}] pair {pair} -> element {i}");
        }
    }
}

#[test]
fn q6k_full_block_decodes_signed_levels_with_i8_scales() {
    let mut block = q6k_zero_block();
    let level = |i: usize| ((i * 7 + 3) % 64) as u8;
    for h in 0..2 {
        for l in 0..32 {
            let q = [0, 32, 64, 96].map(|o| level(128 * h + l + o));
            block[64 * h + l] = (q[0] & 0xF) | ((q[2] & 0xF) << 4);
            block[64 * h + l + 32] = (q[1] & 0xF) | ((q[3] & 0xF) << 4);
            block[128 + 32 * h + l] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
    block[192] = (-128i8) as u8;
    block[207] = 127;
    let y = dequantize(&portable(GgmlType::Q6_K), &block, 256);
    for (i, &v) in y.iter().enumerate() {
        let sc = block[192 + i / 16] as i8 as f32;
        assert_eq!(v, 0.5 * sc * (level(i) as f32 - 32.0), "element {i}");
    }
}

#[test]
fn q8k_layout_is_f32_scale_i8_quants_i16_sums() {
    let mut block = vec![0u8; 292];
    block[0..4].copy_from_slice(&0.125f32.to_le_bytes());
    for i in 0..256 {
        block[4 + i] = (i as i32 - 128) as i8 as u8;
    }
    let y = dequantize(&portable(GgmlType::Q8_K), &block, 256);
    for (i, &v) in y.iter().enumerate() {
        assert_eq!(v, 0.125 * (i as f32 - 128.0));
    }
    // The quantizer writes the group sums after the quants.
    let x: Vec<f32> = (0..256).map(|i| (i as f32 - 100.0) / 155.0).collect();
    let q = quantize(&portable(GgmlType::Q8_K), &x);
    // The extreme (+1.0, last element) maps to -127.
    assert_eq!(f32::from_le_bytes(q[0..4].try_into().unwrap()), 1.0 / -127.0f32);
    assert_eq!(q[4 + 255] as i8, -127);
    for g in 0..16 {
        let want: i32 = q[4 + 16 * g..4 + 16 * g + 16].iter().map(|&b| b as i8 as i32).sum();
        let got = i16::from_le_bytes([q[260 + 2 * g], q[261 + 2 * g]]) as i32;
        assert_eq!(got, want, "group {g}");
    }
}

// ------------------------------------------------------ quantization quality

fn relative_rmse(ty: GgmlType, x: &[f32]) -> f32 {
    let k = portable(ty);
    let q = quantize(&k, x);
    rmse(&dequantize(&k, &q, x.len()), x) / rms(x)
}

#[test]
fn round_trip_error_is_bounded_and_ordered_by_bits() {
    let mut r = rng(1);
    let x = normal_row(&mut r, 16 * QK_K, 1.0);
    let e4 = relative_rmse(GgmlType::Q4_K, &x);
    let e5 = relative_rmse(GgmlType::Q5_K, &x);
    let e6 = relative_rmse(GgmlType::Q6_K, &x);
    let e8 = relative_rmse(GgmlType::Q8_K, &x);
    // Uniform steps over a 32-value block of normal data (range about 4
    // sigma) give about 0.077 at 4 bits; the fitted scales do a little better.
    assert!(e4 < 0.078, "Q4_K relative RMSE {e4}");
    assert!(e5 < 0.040, "Q5_K relative RMSE {e5}");
    assert!(e6 < 0.020, "Q6_K relative RMSE {e6}");
    assert!(e8 < 0.008, "Q8_K relative RMSE {e8}");
    assert!(e8 < e6 && e6 < e5 && e5 < e4, "{e8} {e6} {e5} {e4}");
}

#[test]
fn round_trip_handles_outliers_and_offsets() {
    let mut r = rng(2);
    let outliers = outlier_row(&mut r, 8 * QK_K);
    let offset: Vec<f32> = (0..8 * QK_K).map(|_| 2.0 + r.gen_range(0.0..1.0f32)).collect();
    for (ty, outlier_bound, offset_bound) in
        [(GgmlType::Q4_K, 0.09, 0.023), (GgmlType::Q5_K, 0.056, 0.012), (GgmlType::Q6_K, 0.037, 0.011)]
    {
        let e = relative_rmse(ty, &outliers);
        assert!(e < outlier_bound, "{ty} outliers: relative RMSE {e}");
        // All-positive data far from zero: the min offset keeps the levels
        // for the value range.
        let e = relative_rmse(ty, &offset);
        assert!(e < offset_bound, "{ty} offset data: relative RMSE {e}");
    }
}

#[test]
fn zero_and_constant_blocks_round_trip() {
    let mut r = rng(3);
    let x = mixed_row(&mut r, 14);
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q8_K] {
        let k = portable(ty);
        let y = dequantize(&k, &quantize(&k, &x), x.len());
        assert!(y.iter().all(|v| v.is_finite()), "{ty} produced non-finite values");
        for (b, (xb, yb)) in x.chunks(QK_K).zip(y.chunks(QK_K)).enumerate() {
            match b % 7 {
                1 => assert!(yb.iter().all(|&v| v == 0.0), "{ty} zero block {b}"),
                2 | 3 => {
                    let err = rmse(xb, yb) / xb[0].abs();
                    assert!(err < 2e-3, "{ty} constant block {b}: relative RMSE {err}");
                }
                _ => {
                    let err = rmse(xb, yb) / rms(xb);
                    assert!(err < 0.085, "{ty} block {b}: relative RMSE {err}");
                }
            }
        }
    }
}

#[test]
fn quantization_is_deterministic() {
    let mut r = rng(4);
    let x = normal_row(&mut r, 4 * QK_K, 0.3);
    for ty in [GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::Q8_K] {
        let k = portable(ty);
        assert_eq!(quantize(&k, &x), quantize(&k, &x), "{ty}");
    }
}

// ------------------------------------------------------------ dot products

/// `dot(w, Q8_K(x))` against f32 arithmetic on the dequantized weights: equal
/// to rounding when the activations are dequantized too, and within the Q8_K
/// rounding bound against the original activations.
#[test]
fn dot_matches_dequantized_f32_dot() {
    let mut r = rng(5);
    for (case, blocks) in [1usize, 2, 3, 7, 16].into_iter().enumerate() {
        let n = blocks * QK_K;
        let weights = if case % 2 == 0 { normal_row(&mut r, n, 0.1) } else { mixed_row(&mut r, blocks) };
        let x = if case % 2 == 0 { outlier_row(&mut r, n) } else { normal_row(&mut r, n, 1.0) };
        let q8 = portable(GgmlType::Q8_K);
        let xq = quantize(&q8, &x);
        let x_deq = dequantize(&q8, &xq, n);
        for ty in WEIGHT_TYPES {
            for k in [portable(ty), simd(ty)] {
                let wq = quantize(&k, &weights);
                let w = dequantize(&k, &wq, n);
                let got = (k.dot.unwrap())(n, &wq, &xq) as f64;

                let exact = dot_f64(&w, &x_deq);
                let scale = abs_dot_f64(&w, &x_deq);
                assert!((got - exact).abs() <= 1e-5 * scale + 1e-7, "{ty} n={n}: {got} vs {exact}");

                // Each activation moved by at most half its block's step.
                let bound: f64 = w
                    .chunks(QK_K)
                    .zip(x.chunks(QK_K))
                    .map(|(wb, xb)| {
                        let amax = xb.iter().fold(0.0f32, |m, v| m.max(v.abs())) as f64;
                        wb.iter().map(|v| v.abs() as f64).sum::<f64>() * amax / 254.0
                    })
                    .sum();
                let reference = dot_f64(&w, &x);
                assert!(
                    (got - reference).abs() <= 1.001 * bound + 1e-5 * scale + 1e-7,
                    "{ty} n={n}: {got} vs f32 {reference} (bound {bound})"
                );
            }
        }
    }
}

// ------------------------------------------------------- AVX2 vs portable

/// Random bytes as weight blocks, with finite f16 factors of sensible size:
/// every bit pattern of the levels and scales must decode and dot the same
/// way on both paths.
fn random_weight_blocks(r: &mut rand::rngs::StdRng, ty: GgmlType, blocks: usize) -> Vec<u8> {
    let size = ty.type_size();
    let mut bytes: Vec<u8> = (0..blocks * size).map(|_| r.gen()).collect();
    for block in bytes.chunks_mut(size) {
        let d = f16_bytes(r.gen_range(-0.01..0.01f32));
        let dmin = f16_bytes(r.gen_range(-0.01..0.01f32));
        match ty {
            GgmlType::Q6_K => block[208..210].copy_from_slice(&d),
            _ => {
                block[0..2].copy_from_slice(&d);
                block[2..4].copy_from_slice(&dmin);
            }
        }
    }
    bytes
}

/// Random Q8_K blocks with consistent group sums, including -128 quants.
fn random_q8k_blocks(r: &mut rand::rngs::StdRng, blocks: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; blocks * 292];
    for block in bytes.chunks_mut(292) {
        block[0..4].copy_from_slice(&r.gen_range(0.001..0.05f32).to_le_bytes());
        for b in &mut block[4..260] {
            *b = r.gen();
        }
        block[4] = 0x80;
        for g in 0..16 {
            let s: i16 = block[4 + 16 * g..20 + 16 * g].iter().map(|&b| b as i8 as i16).sum();
            block[260 + 2 * g..262 + 2 * g].copy_from_slice(&s.to_le_bytes());
        }
    }
    bytes
}

#[test]
fn avx2_dot_agrees_with_portable() {
    let mut r = rng(6);
    for blocks in [1usize, 2, 3, 7, 16] {
        let n = blocks * QK_K;
        let q8 = portable(GgmlType::Q8_K);
        let quantized_x = quantize(&q8, &mixed_row(&mut r, blocks));
        for ty in WEIGHT_TYPES {
            let (p, s) = (portable(ty), simd(ty));
            let quantized_w = quantize(&p, &normal_row(&mut r, n, 0.02));
            let cases = [
                (quantized_w, quantized_x.clone()),
                (random_weight_blocks(&mut r, ty, blocks), random_q8k_blocks(&mut r, blocks)),
            ];
            for (w, a) in cases {
                let scale = abs_dot_f64(&dequantize(&p, &w, n), &dequantize(&q8, &a, n));
                let want = (p.dot.unwrap())(n, &w, &a) as f64;
                let (w_odd, wo) = misaligned(&w);
                let (a_odd, ao) = misaligned(&a);
                let got = (s.dot.unwrap())(n, &w_odd[wo..], &a_odd[ao..]) as f64;
                assert!((got - want).abs() <= 1e-5 * scale + 1e-9, "{ty} blocks={blocks}: {got} vs {want}");
            }
        }
    }
}

/// llama.cpp's x86 Q6_K dot, written out: eight lanes, lane `l` holding per
/// super-block the scaled products of the unsigned levels at bytes
/// `4l..4l + 4` of every 32-element chunk, less `32 * (bsum_2l * scale_2l +
/// bsum_2l+1 * scale_2l+1)`; `acc_l = fma(d_a * d, lane_l, acc_l)`; lanes
/// folded 4 onto 0, 2 onto 0, 1 onto 0.
fn llama_cpp_q6k_dot(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = [0f32; 8];
    for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(292)).take(n / QK_K) {
        let scale = |s: usize| wb[192 + s] as i8 as i32;
        let mut lanes = [0i32; 8];
        for e in 0..QK_K {
            let (half, l) = (e / 128, e % 128);
            let (ql, qh) = (wb[64 * half + l % 64], wb[128 + 32 * half + l % 32]);
            let low = if l < 64 { ql & 0xF } else { ql >> 4 };
            let q = (low | ((qh >> (2 * (l / 32))) & 3) << 4) as i32;
            lanes[e % 32 / 4] += scale(e / 16) * q * ab[4 + e] as i8 as i32;
        }
        let bsum = |g: usize| i16::from_le_bytes([ab[260 + 2 * g], ab[261 + 2 * g]]) as i32;
        let d = f32::from_le_bytes(ab[0..4].try_into().unwrap()) * f16::from_le_bytes([wb[208], wb[209]]).to_f32();
        for (l, acc_l) in acc.iter_mut().enumerate() {
            let lane = lanes[l] - 32 * (bsum(2 * l) * scale(2 * l) + bsum(2 * l + 1) * scale(2 * l + 1));
            *acc_l = d.mul_add(lane as f32, *acc_l);
        }
    }
    let t: Vec<f32> = (0..4).map(|j| acc[j + 4] + acc[j]).collect();
    (t[0] + t[2]) + (t[1] + t[3])
}

/// Q6_K: every tier's dot is llama.cpp's, bit for bit (the tile and GEMV
/// kernels are tested against the dot of their tier).
#[test]
fn q6k_dots_of_every_tier_equal_llama_cpp_s() {
    let mut r = rng(9);
    let ty = GgmlType::Q6_K;
    for blocks in [1usize, 2, 3, 7, 16] {
        let n = blocks * QK_K;
        let q8 = portable(GgmlType::Q8_K);
        let cases = [
            (quantize(&portable(ty), &normal_row(&mut r, n, 0.02)), quantize(&q8, &mixed_row(&mut r, blocks))),
            (random_weight_blocks(&mut r, ty, blocks), random_q8k_blocks(&mut r, blocks)),
        ];
        for (w, a) in cases {
            let want = llama_cpp_q6k_dot(n, &w, &a);
            for isa in flexserve_quant::usable_isas() {
                let got = (kernels_for(ty, isa).unwrap().dot.unwrap())(n, &w, &a);
                assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} blocks={blocks}: {got} vs {want}");
            }
        }
    }
}

/// llama.cpp's tiled Q6_K product (eight tokens or more of a sequence),
/// written out: per super-block the exact sum of `scale * (q - 32) * a`, then
/// `acc = fma(isum * d_w, d_a, acc)`.
fn llama_cpp_q6k_chain(n: usize, w: &[u8], a: &[u8]) -> f32 {
    let mut acc = 0f32;
    for (wb, ab) in w.chunks_exact(210).zip(a.chunks_exact(292)).take(n / QK_K) {
        let mut isum = 0i32;
        for e in 0..QK_K {
            let (half, l) = (e / 128, e % 128);
            let (ql, qh) = (wb[64 * half + l % 64], wb[128 + 32 * half + l % 32]);
            let low = if l < 64 { ql & 0xF } else { ql >> 4 };
            let q = (low | ((qh >> (2 * (l / 32))) & 3) << 4) as i32 - 32;
            isum += wb[192 + e / 16] as i8 as i32 * q * ab[4 + e] as i8 as i32;
        }
        let (d_w, d_a) =
            (f16::from_le_bytes([wb[208], wb[209]]).to_f32(), f32::from_le_bytes(ab[0..4].try_into().unwrap()));
        acc = (isum as f32 * d_w).mul_add(d_a, acc);
    }
    acc
}

/// A sequence's Q6_K products: llama.cpp's dot below eight tokens, its
/// tiled chain from eight on, at every tier, bit for bit.
#[test]
fn q6k_sequence_tiles_follow_llama_cpp_s_batch_size_rule() {
    let mut r = rng(10);
    let ty = GgmlType::Q6_K;
    let (blocks, rows) = (3usize, 5usize);
    let n = blocks * QK_K;
    let w: Vec<u8> = (0..rows).flat_map(|_| random_weight_blocks(&mut r, ty, blocks)).collect();
    for toks in [7usize, 8, 9, 17] {
        let a: Vec<u8> = (0..toks).flat_map(|_| random_q8k_blocks(&mut r, blocks)).collect();
        let (w_row, a_row) = (w.len() / rows, a.len() / toks);
        for isa in flexserve_quant::usable_isas() {
            let tile = flexserve_quant::sequence_tile_kernel_for(ty, toks, isa).unwrap();
            let mut out = vec![0f32; toks * rows];
            tile(n, &w, w_row, rows, &a, a_row, toks, &mut out, rows);
            for t in 0..toks {
                for row in 0..rows {
                    let (wr, ar) = (&w[row * w_row..][..w_row], &a[t * a_row..][..a_row]);
                    let want = if toks >= 8 { llama_cpp_q6k_chain(n, wr, ar) } else { llama_cpp_q6k_dot(n, wr, ar) };
                    let got = out[t * rows + row];
                    assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} {toks} tokens, row {row} token {t}");
                }
            }
        }
    }
}

/// Q4_K: every tier's dot computes the exact integer block sums and then the
/// portable formula, so results are equal bit for bit (the tile and GEMV
/// kernels are tested against the dot of their tier).
#[test]
fn q4k_dots_of_every_tier_equal_the_portable_dot() {
    let mut r = rng(8);
    let ty = GgmlType::Q4_K;
    let p = portable(ty);
    for blocks in [1usize, 2, 3, 7, 16] {
        let n = blocks * QK_K;
        let q8 = portable(GgmlType::Q8_K);
        let cases = [
            (quantize(&p, &normal_row(&mut r, n, 0.02)), quantize(&q8, &mixed_row(&mut r, blocks))),
            (random_weight_blocks(&mut r, ty, blocks), random_q8k_blocks(&mut r, blocks)),
        ];
        for (w, a) in cases {
            let want = (p.dot.unwrap())(n, &w, &a);
            for isa in flexserve_quant::usable_isas() {
                let got = (kernels_for(ty, isa).unwrap().dot.unwrap())(n, &w, &a);
                assert_eq!(got.to_bits(), want.to_bits(), "{isa:?} blocks={blocks}: {got} vs {want}");
            }
        }
    }
}

#[test]
fn avx2_quantize_and_dequantize_are_bit_identical() {
    let mut r = rng(7);
    for blocks in [1usize, 2, 3, 7, 16] {
        let n = blocks * QK_K;
        let mut rows = vec![normal_row(&mut r, n, 1.0), outlier_row(&mut r, n), mixed_row(&mut r, blocks)];
        // An extreme of exactly 127 makes the Q8_K inverse scale -1, so the
        // halves are exact rounding ties; the extreme appears with both signs.
        let mut ties: Vec<f32> = (0..n).map(|i| ((i % 253) as f32 - 126.0) + 0.5 * (i % 2) as f32).collect();
        ties[0] = 127.0;
        ties[1] = -127.0;
        rows.push(ties);
        let mut specials = normal_row(&mut r, n, 1.0);
        specials[3] = f32::NAN;
        specials[n - 1] = 1e-40;
        rows.push(specials);
        for x in &rows {
            for ty in [GgmlType::Q8_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K] {
                let (p, s) = (portable(ty), simd(ty));
                let qp = quantize(&p, x);
                assert_eq!(qp, quantize(&s, x), "{ty} quantize, blocks={blocks}");
                let (q_odd, o) = misaligned(&qp);
                let dp = dequantize(&p, &qp, n);
                let ds = dequantize(&s, &q_odd[o..], n);
                assert!(dp.iter().zip(&ds).all(|(a, b)| a.to_bits() == b.to_bits()), "{ty} dequantize");
            }
        }
    }
}

#[test]
fn q8k_quantize_handles_non_finite_input_alike() {
    let mut x = vec![0.25f32; QK_K];
    x[10] = f32::INFINITY;
    x[20] = f32::NAN;
    let (p, s) = (portable(GgmlType::Q8_K), simd(GgmlType::Q8_K));
    assert_eq!(quantize(&p, &x), quantize(&s, &x));
    let tiny = vec![1e-42f32; QK_K];
    assert_eq!(quantize(&p, &tiny), quantize(&s, &tiny));
}

#[test]
fn weight_quantizers_survive_non_finite_input() {
    let mut r = rng(8);
    let mut x = normal_row(&mut r, 2 * QK_K, 1.0);
    x[5] = f32::NAN;
    x[300] = f32::INFINITY;
    x[301] = f32::NEG_INFINITY;
    for ty in WEIGHT_TYPES {
        let k = portable(ty);
        let q = quantize(&k, &x);
        assert_eq!(q.len(), 2 * ty.type_size());
        let _ = dequantize(&k, &q, x.len());
    }
}
