//! Tile kernels: every (row, token) result against the plain dot of the same
//! pair (bit for bit against the same ISA), the AVX2 tiles against the
//! portable ones, edge tiles, strides, chunking, and argument checks.

mod common;

use common::*;
use flexserve_quant::{
    detected_isa, kernels_for, shared_act_tile_for, tile_kernel, tile_kernel_for, GgmlType, Isa, Kernels, TileFn,
};
use rand::Rng;

const TILE_TYPES: [GgmlType; 10] = MATRIX_TYPES;
const ROW_COUNTS: [usize; 8] = [1, 2, 3, 4, 5, 7, 8, 13];
/// Up to two whole micro-tiles of eight tokens (the AVX-512 Q4_K shape) and an edge.
const TOK_COUNTS: [usize; 10] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 17];
/// One block, several blocks, and the real model's row length (for the
/// 256-element K-quant blocks: one, two and three super-blocks; for the float
/// types, lengths that leave a tail after the dot's 32-element steps).
fn lengths(ty: GgmlType) -> [usize; 3] {
    match ty.block_size() {
        32 => [32, 7 * 32, 576],
        1 => [7, 40, 581],
        _ => [256, 512, 768],
    }
}

/// `count` rows of `n` random values quantized with `k`, laid out `stride` bytes
/// apart starting at an odd address offset (the returned start).
fn quantized_rows(k: &Kernels, n: usize, count: usize, stride: usize, seed: u64) -> (Vec<u8>, usize) {
    let mut rng = rng(seed);
    let row = row_bytes(k.ty, n);
    assert!(stride >= row);
    let mut bytes = vec![0xA5u8; count * stride];
    for r in 0..count {
        // Per-row scale spanning a few decades and a per-row offset, so that
        // the minimum terms of Q4_1 / Q5_1 matter.
        let scale = 10f32.powf(rng.gen_range(-2.0..1.0));
        let offset = rng.gen_range(-0.5..0.5) * scale;
        let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * scale + offset).collect();
        (k.quantize)(&x, &mut bytes[r * stride..r * stride + row]);
    }
    let (buf, start) = misaligned(&bytes);
    (buf, start)
}

struct Case {
    ty: GgmlType,
    n: usize,
    w: Vec<u8>,
    w_start: usize,
    w_stride: usize,
    a: Vec<u8>,
    a_start: usize,
    a_stride: usize,
}

impl Case {
    fn new(ty: GgmlType, n: usize, rows: usize, toks: usize, pad: usize, seed: u64) -> Case {
        let wk = simd(ty);
        let ak = simd(wk.vec_dot_type);
        let (w_stride, a_stride) = (row_bytes(ty, n) + pad, row_bytes(wk.vec_dot_type, n) + 2 * pad + 1);
        let (w, w_start) = quantized_rows(&wk, n, rows, w_stride, seed);
        let (a, a_start) = quantized_rows(&ak, n, toks, a_stride, seed ^ 0x5EED);
        Case { ty, n, w, w_start, w_stride, a, a_start, a_stride }
    }

    fn w_row(&self, r: usize) -> &[u8] {
        let start = self.w_start + r * self.w_stride;
        &self.w[start..start + row_bytes(self.ty, self.n)]
    }

    fn a_row(&self, t: usize) -> &[u8] {
        let start = self.a_start + t * self.a_stride;
        &self.a[start..start + row_bytes(simd(self.ty).vec_dot_type, self.n)]
    }

    /// Runs `tile` on the first `rows x toks` pairs; each token's results
    /// are `rows + 2` apart so that writes past a row show up as non-NaN padding.
    fn run(&self, tile: TileFn, rows: usize, toks: usize) -> (Vec<f32>, usize) {
        let stride = rows + 2;
        let mut out = vec![f32::NAN; toks * stride];
        let (w, a) = (&self.w[self.w_start..], &self.a[self.a_start..]);
        tile(self.n, w, self.w_stride, rows, a, self.a_stride, toks, &mut out, stride);
        (out, stride)
    }

    /// Sum of |w_i * a_i| over the dequantized pair: the scale of the rounding error.
    fn magnitude(&self, r: usize, t: usize) -> f32 {
        let wk = portable(self.ty);
        let w = dequantize(&wk, self.w_row(r), self.n);
        let a = dequantize(&portable(wk.vec_dot_type), self.a_row(t), self.n);
        w.iter().zip(&a).map(|(x, y)| (x * y).abs()).sum()
    }
}

/// The plain dot of `ty` at `isa`, which the tile of that tier must equal bit for bit.
fn dot_for(ty: GgmlType, isa: Isa) -> flexserve_quant::DotFn {
    kernels_for(ty, isa).expect("kernels exist").dot.expect("weight type has a dot")
}

fn tile_for(ty: GgmlType, isa: Isa) -> TileFn {
    tile_kernel_for(ty, isa).expect("tile kernel exists")
}

/// Checks every pair of a `rows x toks` run against `dot` bit for bit, and
/// that nothing past each token's output row was written.
fn assert_matches_dot(case: &Case, tile: TileFn, dot: flexserve_quant::DotFn, rows: usize, toks: usize, what: &str) {
    let (out, stride) = case.run(tile, rows, toks);
    for r in 0..rows {
        for t in 0..toks {
            let expected = dot(case.n, case.w_row(r), case.a_row(t));
            let got = out[t * stride + r];
            assert_eq!(
                got.to_bits(),
                expected.to_bits(),
                "{what} {} n={} {rows}x{toks} pair ({r},{t}): tile {got} vs dot {expected}",
                case.ty,
                case.n
            );
        }
    }
    for t in 0..toks {
        assert!(out[t * stride + rows..(t + 1) * stride].iter().all(|v| v.is_nan()), "{what}: wrote past token {t}");
    }
}

#[test]
fn tile_kernels_exist_for_the_matrix_formats_only() {
    for ty in TILE_TYPES {
        for isa in [Isa::Portable, Isa::Avx2] {
            assert!(tile_kernel_for(ty, isa).is_some(), "{ty} {isa:?}");
        }
        assert!(tile_kernel(ty).is_some(), "{ty}");
    }
    for ty in [GgmlType::Q8_1, GgmlType::Q5_K, GgmlType::Q8_K] {
        assert!(tile_kernel(ty).is_none(), "{ty}");
    }
}

#[test]
fn simd_tiles_equal_the_simd_dot_bit_for_bit() {
    for isa in simd_tiers() {
        for (i, ty) in TILE_TYPES.into_iter().enumerate() {
            let dot = dot_for(ty, isa);
            for (j, n) in lengths(ty).into_iter().enumerate() {
                let case = Case::new(ty, n, 13, 17, 3, (i * 10 + j) as u64);
                for rows in ROW_COUNTS {
                    for toks in TOK_COUNTS {
                        assert_matches_dot(&case, tile_for(ty, isa), dot, rows, toks, isa.name());
                    }
                }
            }
        }
    }
}

#[test]
fn shared_layout_tiles_equal_the_dot_bit_for_bit() {
    // The two-step kernels (activations laid out once, then row ranges
    // against the layout, as the tasks of one product run them) give every
    // pair exactly the dot's result, whichever range a row falls in.
    let mut seen = 0;
    for isa in simd_tiers() {
        for (i, ty) in TILE_TYPES.into_iter().enumerate() {
            let Some(shared) = shared_act_tile_for(ty, isa) else { continue };
            seen += 1;
            let dot = dot_for(ty, isa);
            for (j, n) in lengths(ty).into_iter().enumerate() {
                let case = Case::new(ty, n, 13, 17, 3, (500 + i * 10 + j) as u64);
                for toks in TOK_COUNTS {
                    let mut layout = vec![f32::NAN; (shared.layout_len)(n, toks)];
                    (shared.lay_out)(n, &case.a[case.a_start..], case.a_stride, toks, &mut layout);
                    let stride = 13 + 2;
                    let mut out = vec![f32::NAN; toks * stride];
                    // Rows 0..5 and 5..13 as two tasks, each into its own columns.
                    for (first, count) in [(0, 5), (5, 8)] {
                        let w = &case.w[case.w_start + first * case.w_stride..];
                        (shared.tile)(n, w, case.w_stride, count, &layout, toks, &mut out[first..], stride);
                    }
                    for t in 0..toks {
                        for r in 0..13 {
                            let expected = dot(n, case.w_row(r), case.a_row(t));
                            let got = out[t * stride + r];
                            assert_eq!(
                                got.to_bits(),
                                expected.to_bits(),
                                "{ty} {isa:?} n={n} pair ({r},{t}) of {toks}"
                            );
                        }
                        assert!(
                            out[t * stride + 13..(t + 1) * stride].iter().all(|v| v.is_nan()),
                            "wrote past token {t}"
                        );
                    }
                }
            }
        }
    }
    if detected_isa() == Isa::Avx512 {
        assert_eq!(seen, 5, "the AVX-512 tier lays out the 32-element formats' activations");
    }
}

#[test]
fn a_short_layout_is_rejected() {
    let Some(shared) = shared_act_tile_for(GgmlType::Q8_0, detected_isa()) else {
        eprintln!("no two-step kernel on this CPU: nothing to check");
        return;
    };
    let case = Case::new(GgmlType::Q8_0, 64, 4, 8, 0, 600);
    let layout = vec![0f32; (shared.layout_len)(64, 8) - 1];
    let mut out = vec![0f32; 4 * 8];
    let run = std::panic::catch_unwind(move || {
        (shared.tile)(64, &case.w[case.w_start..], case.w_stride, 4, &layout, 8, &mut out, 4)
    });
    let panic = run.expect_err("a layout one word short must be refused");
    let message = panic.downcast_ref::<String>().map(String::as_str).unwrap_or_default();
    assert!(message.contains("laid-out activations"), "{message}");
}

#[test]
fn portable_tiles_equal_the_portable_dot_bit_for_bit() {
    for (i, ty) in TILE_TYPES.into_iter().enumerate() {
        let dot = portable(ty).dot.expect("weight type has a dot");
        let case = Case::new(ty, 2 * ty.block_size(), 13, 9, 0, 100 + i as u64);
        for rows in [1, 4, 13] {
            for toks in [1, 3, 9] {
                assert_matches_dot(&case, tile_for(ty, Isa::Portable), dot, rows, toks, "portable");
            }
        }
    }
}

#[test]
fn simd_tiles_agree_with_portable_tiles() {
    if detected_isa() < Isa::Avx2 {
        eprintln!("no AVX2 on this CPU: both tiles are the portable one");
    }
    for isa in simd_tiers() {
        for (i, ty) in TILE_TYPES.into_iter().enumerate() {
            for (j, n) in lengths(ty).into_iter().enumerate() {
                let case = Case::new(ty, n, 13, 9, 1, 200 + (i * 10 + j) as u64);
                let (simd_out, stride) = case.run(tile_for(ty, isa), 13, 9);
                let (portable_out, _) = case.run(tile_for(ty, Isa::Portable), 13, 9);
                for r in 0..13 {
                    for t in 0..9 {
                        let (x, y) = (simd_out[t * stride + r], portable_out[t * stride + r]);
                        let tol = 1e-5 * case.magnitude(r, t) + f32::MIN_POSITIVE;
                        assert!(
                            (x - y).abs() <= tol,
                            "{ty} n={n} pair ({r},{t}): {isa:?} {x} vs portable {y}, tol {tol}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn chunked_sweeps_cover_every_pair() {
    // Large row strides make the kernel split rows and tokens into many
    // cache chunks, with partial micro-tiles at every chunk edge.
    for isa in simd_tiers() {
        for (i, ty) in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q4_K].into_iter().enumerate() {
            let case = Case::new(ty, ty.block_size(), 13, 19, 30_000, 300 + i as u64);
            assert_matches_dot(&case, tile_for(ty, isa), dot_for(ty, isa), 13, 19, "chunked");
        }
    }
    // Rows of 1024 blocks: the AVX-512 tile of the 32-element formats, which
    // chunks by its unpacked layout, takes four rows and eight tokens per
    // chunk, so 13 rows and 19 tokens make four row chunks and three token
    // chunks, each last one short (and odd).
    for isa in simd_tiers() {
        for (i, ty) in [GgmlType::Q4_1, GgmlType::Q8_0, GgmlType::Q5_0].into_iter().enumerate() {
            let case = Case::new(ty, 1024 * ty.block_size(), 13, 19, 0, 310 + i as u64);
            assert_matches_dot(&case, tile_for(ty, isa), dot_for(ty, isa), 13, 19, "chunked long rows");
        }
    }
    // Float rows of 64-128 KiB: the float tile takes tokens three at a time
    // per chunk, so 11 tokens make four chunks, the last one short.
    for isa in simd_tiers() {
        for (i, ty) in [GgmlType::F32, GgmlType::F16, GgmlType::BF16].into_iter().enumerate() {
            let case = Case::new(ty, 32_768, 13, 11, 0, 320 + i as u64);
            assert_matches_dot(&case, tile_for(ty, isa), dot_for(ty, isa), 13, 11, "chunked floats");
        }
    }
}

#[test]
fn widened_float_tiles_equal_the_dot() {
    // 16-bit rows whose length is a multiple of the lanes, over several token
    // groups, are widened to f32 a block of rows and a chunk of tokens at a
    // time: blocks of 16 rows with a short last one, partial token groups.
    for isa in simd_tiers() {
        for (i, ty) in [GgmlType::F16, GgmlType::BF16].into_iter().enumerate() {
            for (j, n) in [64, 768].into_iter().enumerate() {
                let case = Case::new(ty, n, 40, 41, 5, 400 + (i * 10 + j) as u64);
                for (rows, toks) in [(40, 41), (16, 9), (13, 5), (33, 17)] {
                    assert_matches_dot(&case, tile_for(ty, isa), dot_for(ty, isa), rows, toks, "widened");
                }
            }
        }
    }
}

#[test]
fn long_rows_match_the_dot() {
    // Rows of many super-blocks: a micro-tile's activation rows outgrow L1
    // and every pair's accumulators run over many blocks.
    for isa in simd_tiers() {
        for (i, ty) in [GgmlType::Q4_K, GgmlType::Q6_K].into_iter().enumerate() {
            let case = Case::new(ty, 15 * ty.block_size(), 5, 19, 2, 350 + i as u64);
            for (rows, toks) in [(5, 19), (4, 16), (1, 3)] {
                assert_matches_dot(&case, tile_for(ty, isa), dot_for(ty, isa), rows, toks, "long rows");
            }
        }
    }
}

#[test]
fn empty_tiles_write_nothing() {
    for ty in TILE_TYPES {
        let case = Case::new(ty, ty.block_size(), 1, 1, 0, 400);
        for isa in [Isa::Portable, Isa::Avx2] {
            let mut out = [f32::NAN; 4];
            let tile = tile_for(ty, isa);
            tile(
                ty.block_size(),
                &case.w[case.w_start..],
                case.w_stride,
                0,
                &case.a[case.a_start..],
                case.a_stride,
                3,
                &mut out,
                3,
            );
            tile(
                ty.block_size(),
                &case.w[case.w_start..],
                case.w_stride,
                2,
                &case.a[case.a_start..],
                case.a_stride,
                0,
                &mut out,
                0,
            );
            assert!(out.iter().all(|v| v.is_nan()), "{ty} {isa:?}");
        }
    }
}

#[test]
#[should_panic(expected = "weight bytes")]
fn short_weights_are_rejected() {
    let case = Case::new(GgmlType::Q4_1, 64, 2, 1, 0, 500);
    let mut out = [0.0f32; 3];
    // Three rows asked for, two given.
    tile_for(GgmlType::Q4_1, Isa::Avx2)(64, &case.w, case.w_stride, 3, &case.a, case.a_stride, 1, &mut out, 3);
}

#[test]
#[should_panic(expected = "output floats")]
fn short_output_is_rejected() {
    let case = Case::new(GgmlType::Q8_0, 32, 2, 2, 0, 501);
    let mut out = [0.0f32; 3];
    tile_for(GgmlType::Q8_0, Isa::Avx2)(32, &case.w, case.w_stride, 2, &case.a, case.a_stride, 2, &mut out, 2);
}

#[test]
#[should_panic(expected = "not a multiple of the block size")]
fn partial_blocks_are_rejected() {
    let case = Case::new(GgmlType::Q4_0, 32, 1, 1, 0, 502);
    let mut out = [0.0f32; 1];
    tile_for(GgmlType::Q4_0, Isa::Portable)(33, &case.w, case.w_stride, 1, &case.a, case.a_stride, 1, &mut out, 1);
}

/// Throughput of the tile kernel against the per-pair dot loop on the shape of
/// a 600-token prefill's FFN down matrix (576 rows of 1536, Q4_1, 512 tokens)
/// and on K-quant shapes of small models.
/// Informational only: `cargo test --release -p flexserve-quant --test
/// tile_kernels -- --ignored --nocapture`.
#[test]
#[ignore]
fn tile_throughput() {
    use std::time::Instant;
    for (ty, rows, n) in [
        (GgmlType::Q4_1, 576, 1536),
        (GgmlType::Q4_1, 1536, 576),
        (GgmlType::Q8_0, 576, 1536),
        (GgmlType::Q4_K, 512, 1536),
        (GgmlType::Q6_K, 512, 1536),
        // A 1B model's FFN down matrix: activation rows too long for several to stay in L1.
        (GgmlType::Q4_K, 256, 5632),
        (GgmlType::Q6_K, 256, 5632),
        (GgmlType::F16, 1024, 1024),
        (GgmlType::F16, 1024, 4096),
    ] {
        let toks = 512;
        let wk = simd(ty);
        let (w_stride, a_stride) = (row_bytes(ty, n), row_bytes(wk.vec_dot_type, n));
        let (w, w_start) = quantized_rows(&wk, n, rows, w_stride, 1);
        let w = w[w_start..w_start + rows * w_stride].to_vec();
        let (a, a_start) = quantized_rows(&simd(wk.vec_dot_type), n, toks, a_stride, 2);
        let a = a[a_start..a_start + toks * a_stride].to_vec();
        let flops = 2.0 * (rows * n * toks) as f64;
        let dot = wk.dot.expect("dot");
        let tile = tile_kernel(ty).expect("tile");
        let mut out_dot = vec![0.0f32; rows * toks];
        let mut out_tile = vec![0.0f32; rows * toks];
        // Best of several alternating runs: the machine is shared, so the
        // minimum is the least disturbed measurement.
        let (mut dot_best, mut tile_best) = (f64::MAX, f64::MAX);
        for _ in 0..7 {
            let start = Instant::now();
            for r in 0..rows {
                let w_row = &w[r * w_stride..(r + 1) * w_stride];
                for t in 0..toks {
                    out_dot[t * rows + r] = dot(n, w_row, &a[t * a_stride..(t + 1) * a_stride]);
                }
            }
            dot_best = dot_best.min(start.elapsed().as_secs_f64());
            let start = Instant::now();
            tile(n, &w, w_stride, rows, &a, a_stride, toks, &mut out_tile, rows);
            tile_best = tile_best.min(start.elapsed().as_secs_f64());
            assert_eq!(out_dot, out_tile);
        }
        eprintln!(
            "{ty} {rows}x{n} x {toks} tokens: dot loop {:.1} GFLOP/s ({:.1} ms), tile {:.1} GFLOP/s ({:.1} ms), speedup {:.2}x",
            flops / dot_best / 1e9,
            dot_best * 1e3,
            flops / tile_best / 1e9,
            tile_best * 1e3,
            dot_best / tile_best
        );
    }
}
