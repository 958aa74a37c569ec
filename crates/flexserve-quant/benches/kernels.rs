//! Micro-benchmarks of every kernel, per type and ISA, so that a regression
//! in one of them shows up on its own: `cargo bench -p flexserve-quant`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use flexserve_quant::{gemv_kernel_for, kernels_for, tile_kernel_for, GgmlType, Isa, Repacked};
use std::hint::black_box;

const TYPES: [GgmlType; 11] = [
    GgmlType::F32,
    GgmlType::F16,
    GgmlType::BF16,
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q4_K,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
];

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

fn isas() -> Vec<Isa> {
    flexserve_quant::usable_isas()
}

/// One row of 4096 elements: weight row against a quantized activation row.
fn dot(c: &mut Criterion) {
    const N: usize = 4096;
    let mut g = c.benchmark_group("dot");
    g.throughput(Throughput::Elements(N as u64));
    for ty in TYPES {
        for isa in isas() {
            let k = kernels_for(ty, isa).unwrap();
            let a = kernels_for(k.vec_dot_type, isa).unwrap();
            let mut w = vec![0u8; ty.row_size(N as u64).unwrap() as usize];
            let mut x = vec![0u8; k.vec_dot_type.row_size(N as u64).unwrap() as usize];
            (k.quantize)(&values(N, 1), &mut w);
            (a.quantize)(&values(N, 2), &mut x);
            let dot = k.dot.unwrap();
            g.bench_function(BenchmarkId::new(ty.name(), format!("{isa:?}")), |b| {
                b.iter(|| dot(N, black_box(&w), black_box(&x)))
            });
        }
    }
    g.finish();
}

/// Activation quantization and weight dequantization of one 4096-element row.
fn convert(c: &mut Criterion) {
    const N: usize = 4096;
    let src = values(N, 3);
    let mut g = c.benchmark_group("convert");
    g.throughput(Throughput::Elements(N as u64));
    for ty in TYPES.iter().copied().chain([GgmlType::Q8_1, GgmlType::Q8_K]) {
        for isa in isas() {
            let k = kernels_for(ty, isa).unwrap();
            let mut q = vec![0u8; ty.row_size(N as u64).unwrap() as usize];
            let mut out = vec![0f32; N];
            g.bench_function(BenchmarkId::new(format!("quantize/{}", ty.name()), format!("{isa:?}")), |b| {
                b.iter(|| (k.quantize)(black_box(&src), &mut q))
            });
            (k.quantize)(&src, &mut q);
            g.bench_function(BenchmarkId::new(format!("dequantize/{}", ty.name()), format!("{isa:?}")), |b| {
                b.iter(|| (k.dequantize)(black_box(&q), &mut out))
            });
        }
    }
    g.finish();
}

/// A 64-row x 64-token tile over rows of 2048 elements (prefill).
fn tile(c: &mut Criterion) {
    const N: usize = 2048;
    const ROWS: usize = 64;
    const TOKS: usize = 64;
    let mut g = c.benchmark_group("tile");
    g.throughput(Throughput::Elements((N * ROWS * TOKS) as u64));
    for ty in TYPES {
        for isa in isas() {
            let Some(tile) = tile_kernel_for(ty, isa) else { continue };
            let k = kernels_for(ty, isa).unwrap();
            let a = kernels_for(k.vec_dot_type, isa).unwrap();
            let wrb = ty.row_size(N as u64).unwrap() as usize;
            let arb = k.vec_dot_type.row_size(N as u64).unwrap() as usize;
            let mut w = vec![0u8; wrb * ROWS];
            let mut x = vec![0u8; arb * TOKS];
            for (r, row) in w.chunks_exact_mut(wrb).enumerate() {
                (k.quantize)(&values(N, 10 + r as u32), row);
            }
            for (t, row) in x.chunks_exact_mut(arb).enumerate() {
                (a.quantize)(&values(N, 1000 + t as u32), row);
            }
            let mut out = vec![0f32; ROWS * TOKS];
            g.bench_function(BenchmarkId::new(ty.name(), format!("{isa:?}")), |b| {
                b.iter(|| tile(N, black_box(&w), wrb, ROWS, black_box(&x), arb, TOKS, &mut out, ROWS))
            });
        }
    }
    g.finish();
}

/// The same 64 x 64 product on weights rearranged in groups of eight rows
/// (the layouts the engine gives Q4_0, Q4_1, Q8_0, Q4_K and Q6_K matrices), for 64
/// tokens (prefill) and one (decode).
fn packed(c: &mut Criterion) {
    const N: usize = 2048;
    const ROWS: usize = 64;
    let mut g = c.benchmark_group("packed");
    for layout in [Repacked::Q4_0x8, Repacked::Q4_1x8, Repacked::Q8_0x8, Repacked::Q4_Kx8, Repacked::Q6_Kx8] {
        let (ty, act) = (layout.ty(), layout.activation_type());
        let k = kernels_for(ty, Isa::Portable).unwrap();
        let a = kernels_for(act, Isa::Portable).unwrap();
        let (wrb, arb) = (ty.row_size(N as u64).unwrap() as usize, act.row_size(N as u64).unwrap() as usize);
        let mut w = vec![0u8; wrb * ROWS];
        for (r, row) in w.chunks_exact_mut(wrb).enumerate() {
            (k.quantize)(&values(N, 10 + r as u32), row);
        }
        let w = layout.repack(&w, ROWS, N).unwrap();
        for toks in [64, 1] {
            let mut x = vec![0u8; arb * toks];
            for (t, row) in x.chunks_exact_mut(arb).enumerate() {
                (a.quantize)(&values(N, 1000 + t as u32), row);
            }
            let mut out = vec![0f32; ROWS * toks];
            g.throughput(Throughput::Elements((N * ROWS * toks) as u64));
            for isa in isas() {
                let kernel = layout.kernel_for(isa);
                g.bench_function(BenchmarkId::new(format!("{layout:?} x{toks}"), format!("{isa:?}")), |b| {
                    b.iter(|| kernel(N, black_box(&w), ROWS, black_box(&x), arb, toks, &mut out, ROWS))
                });
            }
        }
    }
    g.finish();
}

/// 64 rows of 2048 elements against one activation row (decode): the GEMV
/// kernel, and the plain dot looped over the rows for comparison.
fn gemv(c: &mut Criterion) {
    const N: usize = 2048;
    const ROWS: usize = 64;
    let mut g = c.benchmark_group("gemv");
    g.throughput(Throughput::Elements((N * ROWS) as u64));
    for ty in TYPES {
        for isa in isas() {
            let Some(gemv) = gemv_kernel_for(ty, isa) else { continue };
            let k = kernels_for(ty, isa).unwrap();
            let a = kernels_for(k.vec_dot_type, isa).unwrap();
            let wrb = ty.row_size(N as u64).unwrap() as usize;
            let mut w = vec![0u8; wrb * ROWS];
            let mut x = vec![0u8; k.vec_dot_type.row_size(N as u64).unwrap() as usize];
            for (r, row) in w.chunks_exact_mut(wrb).enumerate() {
                (k.quantize)(&values(N, 10 + r as u32), row);
            }
            (a.quantize)(&values(N, 2), &mut x);
            let mut out = vec![0f32; ROWS];
            g.bench_function(BenchmarkId::new(ty.name(), format!("{isa:?}")), |b| {
                b.iter(|| gemv(N, black_box(&w), wrb, ROWS, black_box(&x), &mut out))
            });
            let dot = k.dot.unwrap();
            g.bench_function(BenchmarkId::new(ty.name(), format!("{isa:?} dot loop")), |b| {
                b.iter(|| {
                    for (row, o) in w.chunks_exact(wrb).zip(out.iter_mut()) {
                        *o = dot(N, black_box(row), black_box(&x));
                    }
                })
            });
        }
    }
    g.finish();
}

/// Decode over a matrix far larger than the caches (256 MiB of weights,
/// rows of 2048): the GEMV on the rows as stored against the product on the
/// rearranged layout, one token each, in GB/s of weights streamed. This is
/// what one-token decode costs per matrix, where the 64-row benchmarks above
/// run from the caches. The matrix repeats one block of 64 quantized rows,
/// which keeps the setup short and reads the same bytes as distinct rows.
fn stream(c: &mut Criterion) {
    const N: usize = 2048;
    const BLOCK_ROWS: usize = 64;
    const MATRIX_BYTES: usize = 256 << 20;
    let mut g = c.benchmark_group("stream");
    g.sample_size(10);
    let tiers: Vec<Isa> = match isas().into_iter().filter(|&isa| isa > Isa::Portable).collect::<Vec<_>>() {
        simd if simd.is_empty() => vec![Isa::Portable],
        simd => simd,
    };
    for layout in [Repacked::Q4_0x8, Repacked::Q4_1x8, Repacked::Q8_0x8, Repacked::Q4_Kx8, Repacked::Q6_Kx8] {
        let (ty, act) = (layout.ty(), layout.activation_type());
        let k = kernels_for(ty, Isa::Portable).unwrap();
        let wrb = ty.row_size(N as u64).unwrap() as usize;
        let mut block = vec![0u8; wrb * BLOCK_ROWS];
        for (r, row) in block.chunks_exact_mut(wrb).enumerate() {
            (k.quantize)(&values(N, 10 + r as u32), row);
        }
        let rows = MATRIX_BYTES.div_ceil(wrb * BLOCK_ROWS) * BLOCK_ROWS;
        let copies = rows / BLOCK_ROWS;
        let plain = block.repeat(copies);
        let packed = layout.repack(&block, BLOCK_ROWS, N).unwrap().repeat(copies);
        g.throughput(Throughput::BytesDecimal(plain.len() as u64));
        // The rows as stored and the rearranged layout take the same activations.
        assert_eq!(k.vec_dot_type, act);
        let arb = act.row_size(N as u64).unwrap() as usize;
        let mut x = vec![0u8; arb];
        (kernels_for(act, Isa::Portable).unwrap().quantize)(&values(N, 2), &mut x);
        let mut out = vec![0f32; rows];
        for isa in tiers.iter().copied() {
            let gemv = gemv_kernel_for(ty, isa).unwrap();
            g.bench_function(BenchmarkId::new(format!("{} gemv", ty.name()), format!("{isa:?}")), |b| {
                b.iter(|| gemv(N, black_box(&plain), wrb, rows, black_box(&x), &mut out))
            });
            let kernel = layout.kernel_for(isa);
            g.bench_function(BenchmarkId::new(format!("{layout:?} x1"), format!("{isa:?}")), |b| {
                b.iter(|| kernel(N, black_box(&packed), rows, black_box(&x), arb, 1, &mut out, rows))
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(std::time::Duration::from_millis(300)).measurement_time(std::time::Duration::from_secs(1));
    targets = dot, convert, gemv, tile, packed, stream
}
criterion_main!(benches);
