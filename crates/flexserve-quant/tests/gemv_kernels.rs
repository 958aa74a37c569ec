//! GEMV kernels: every row's result against the plain dot of the same pair
//! (bit for bit against the same ISA), the SIMD kernels against the portable
//! ones, row remainders, strides, and argument checks.

mod common;

use common::*;
use flexserve_quant::{detected_isa, gemv_kernel, gemv_kernel_for, GemvFn, GgmlType, Isa, Kernels};
use rand::Rng;

const GEMV_TYPES: [GgmlType; 10] = MATRIX_TYPES;
const ROW_COUNTS: [usize; 9] = [0, 1, 2, 3, 4, 5, 7, 8, 13];

/// Row lengths: 1, 7 and 18 blocks; for the float types (one element per
/// block), lengths that leave a tail after the kernels' steps of 8 and 16.
fn lengths(ty: GgmlType) -> [usize; 3] {
    match ty.block_size() {
        1 => [7, 40, 581],
        block => [block, 7 * block, 18 * block],
    }
}

/// `count` rows of `n` random values quantized with `k`, `stride` bytes apart,
/// starting at an odd address offset (the returned start).
fn quantized_rows(k: &Kernels, n: usize, count: usize, stride: usize, seed: u64) -> (Vec<u8>, usize) {
    let mut rng = rng(seed);
    let row = row_bytes(k.ty, n);
    let mut bytes = vec![0xA5u8; count.max(1) * stride];
    for r in 0..count {
        // Per-row scale over a few decades and an offset, so that the minimum
        // terms of Q4_1 / Q5_1 / Q4_K matter.
        let scale = 10f32.powf(rng.gen_range(-2.0..1.0));
        let offset = rng.gen_range(-0.5..0.5) * scale;
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale + offset).collect();
        (k.quantize)(&x, &mut bytes[r * stride..r * stride + row]);
    }
    misaligned(&bytes)
}

struct Case {
    ty: GgmlType,
    n: usize,
    w: Vec<u8>,
    w_start: usize,
    w_stride: usize,
    a: Vec<u8>,
    a_start: usize,
}

impl Case {
    fn new(ty: GgmlType, n: usize, rows: usize, pad: usize, seed: u64) -> Case {
        let wk = simd(ty);
        let w_stride = row_bytes(ty, n) + pad;
        let (w, w_start) = quantized_rows(&wk, n, rows, w_stride, seed);
        let a_row = row_bytes(wk.vec_dot_type, n);
        let (a, a_start) = quantized_rows(&simd(wk.vec_dot_type), n, 1, a_row, seed ^ 0x5EED);
        Case { ty, n, w, w_start, w_stride, a, a_start }
    }

    fn w_row(&self, r: usize) -> &[u8] {
        let start = self.w_start + r * self.w_stride;
        &self.w[start..start + row_bytes(self.ty, self.n)]
    }

    fn a_row(&self) -> &[u8] {
        &self.a[self.a_start..self.a_start + row_bytes(simd(self.ty).vec_dot_type, self.n)]
    }

    /// Runs `gemv` on the first `rows` rows; the output has two NaN floats of
    /// padding to show writes past the end.
    fn run(&self, gemv: GemvFn, rows: usize) -> Vec<f32> {
        let mut out = vec![f32::NAN; rows + 2];
        gemv(self.n, &self.w[self.w_start..], self.w_stride, rows, self.a_row(), &mut out);
        out
    }
}

fn gemv_for(ty: GgmlType, isa: Isa) -> GemvFn {
    gemv_kernel_for(ty, isa).expect("gemv kernel exists")
}

fn assert_matches_dot(case: &Case, gemv: GemvFn, dot: flexserve_quant::DotFn, rows: usize, what: &str) {
    let out = case.run(gemv, rows);
    for (r, got) in out[..rows].iter().enumerate() {
        let expected = dot(case.n, case.w_row(r), case.a_row());
        assert_eq!(
            got.to_bits(),
            expected.to_bits(),
            "{what} {} n={} {rows} rows, row {r}: gemv {got} vs dot {expected}",
            case.ty,
            case.n
        );
    }
    assert!(out[rows..].iter().all(|v| v.is_nan()), "{what}: wrote past {rows} rows");
}

#[test]
fn gemv_kernels_exist_for_the_formats_with_fast_paths() {
    for ty in GEMV_TYPES {
        for isa in [Isa::Portable, base_simd()] {
            assert!(gemv_kernel_for(ty, isa).is_some(), "{ty} {isa:?}");
        }
        assert!(gemv_kernel(ty).is_some(), "{ty}");
    }
    for ty in [GgmlType::Q8_1, GgmlType::Q5_K, GgmlType::Q8_K] {
        assert!(gemv_kernel(ty).is_none(), "{ty}");
    }
}

#[test]
fn simd_gemv_equals_the_simd_dot_bit_for_bit() {
    for (i, ty) in GEMV_TYPES.into_iter().enumerate() {
        for (isa, k) in simd_by_tier(ty) {
            let dot = k.dot.expect("weight type has a dot");
            for (j, n) in lengths(ty).into_iter().enumerate() {
                for pad in [0, 3] {
                    let case = Case::new(ty, n, 13, pad, (i * 10 + j) as u64);
                    for rows in ROW_COUNTS {
                        assert_matches_dot(&case, gemv_for(ty, isa), dot, rows, isa.name());
                    }
                }
            }
        }
    }
}

#[test]
fn portable_gemv_equals_the_portable_dot_bit_for_bit() {
    for (i, ty) in GEMV_TYPES.into_iter().enumerate() {
        let dot = portable(ty).dot.expect("weight type has a dot");
        let case = Case::new(ty, 2 * ty.block_size(), 13, 1, 100 + i as u64);
        for rows in [0, 1, 4, 13] {
            assert_matches_dot(&case, gemv_for(ty, Isa::Portable), dot, rows, "portable");
        }
    }
}

#[test]
fn simd_gemv_agrees_with_portable_gemv() {
    if detected_isa() < Isa::Avx2 {
        eprintln!("no AVX2 on this CPU: both kernels are the portable one");
    }
    for (i, ty) in GEMV_TYPES.into_iter().enumerate() {
        for (n, isa) in lengths(ty).into_iter().flat_map(|n| simd_tiers().into_iter().map(move |isa| (n, isa))) {
            let case = Case::new(ty, n, 13, 1, 200 + i as u64);
            let simd_out = case.run(gemv_for(ty, isa), 13);
            let portable_out = case.run(gemv_for(ty, Isa::Portable), 13);
            for r in 0..13 {
                let wk = portable(ty);
                let w = dequantize(&wk, case.w_row(r), n);
                let a = dequantize(&portable(wk.vec_dot_type), case.a_row(), n);
                let magnitude: f32 = w.iter().zip(&a).map(|(x, y)| (x * y).abs()).sum();
                let (x, y) = (simd_out[r], portable_out[r]);
                let tol = 1e-5 * magnitude + f32::MIN_POSITIVE;
                assert!((x - y).abs() <= tol, "{ty} n={n} row {r}: {isa:?} {x} vs portable {y}, tol {tol}");
            }
        }
    }
}

#[test]
fn short_slices_are_rejected() {
    for isa in [Isa::Portable, base_simd()] {
        let gemv = gemv_for(GgmlType::Q4_0, isa);
        let case = Case::new(GgmlType::Q4_0, 64, 4, 0, 500);
        let w = &case.w[case.w_start..];
        let run = |n: usize, w_len: usize, rows: usize, a_len: usize, out_len: usize| {
            std::panic::catch_unwind(|| {
                let mut out = vec![0f32; out_len];
                gemv(n, &w[..w_len], case.w_stride, rows, &case.a_row()[..a_len], &mut out);
            })
            .is_err()
        };
        let (w_len, a_len) = (4 * case.w_stride, case.a_row().len());
        assert!(!run(64, w_len, 4, a_len, 4), "{isa:?}: a valid call panicked");
        assert!(run(48, w_len, 4, a_len, 4), "{isa:?}: a partial block was accepted");
        assert!(run(64, w_len - 1, 4, a_len, 4), "{isa:?}: short weights were accepted");
        assert!(run(64, w_len, 4, a_len - 1, 4), "{isa:?}: short activations were accepted");
        assert!(run(64, w_len, 4, a_len, 3), "{isa:?}: a short output was accepted");
    }
}

#[test]
fn padded_rows_need_no_padding_after_the_last_row() {
    for isa in [Isa::Portable, base_simd()] {
        for ty in GEMV_TYPES {
            let dot = simd(ty).dot.expect("weight type has a dot");
            let n = 2 * ty.block_size();
            let case = Case::new(ty, n, 8, 5, 600);
            for rows in [3, 4, 8] {
                let end = case.w_start + (rows - 1) * case.w_stride + row_bytes(ty, n);
                let mut out = vec![f32::NAN; rows];
                gemv_for(ty, isa)(n, &case.w[case.w_start..end], case.w_stride, rows, case.a_row(), &mut out);
                for (r, got) in out.iter().enumerate() {
                    let expected = if isa == base_simd() { dot } else { portable(ty).dot.expect("dot") };
                    let expected = expected(n, case.w_row(r), case.a_row());
                    assert_eq!(got.to_bits(), expected.to_bits(), "{ty} {isa:?} {rows} rows, row {r}");
                }
            }
        }
    }
}
