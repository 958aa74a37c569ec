//! Runs one kernel in a loop, for instruction and cycle counts under
//! `perf stat` (wall-clock timings are unreliable on a shared machine):
//!
//! `perf stat -e cycles:u,instructions:u target/release/examples/kernel_loop tile Q4_0 [portable]`
//!
//! Kinds: `gemv` (256 rows x 2048 against one activation row), `dots` (the
//! same with the plain dot per row), `tile` (256 rows x 64 tokens), `packed`
//! (the same product on weights rearranged in groups of eight rows, for the
//! types that have such a layout). `toks=N`, `n=N` and `rows=N` change the
//! shape (2 to 8 tokens are a batched decode step's). Prints
//! the elements processed so that cycles per element can be worked out.

use flexserve_quant::{gemv_kernel_for, kernels_for, tile_kernel_for, GgmlType, Isa, Repacked};
use std::hint::black_box;

const N: usize = 2048;
const ROWS: usize = 256;
/// Tokens of a `tile` or `packed` product unless `toks=N` says otherwise.
const TOKS: usize = 64;

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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: kernel_loop gemv|dots|tile|packed TYPE [portable] [toks=N] [n=N] [rows=N] [ITERATIONS]";
    let kind = args.get(1).expect(usage).as_str();
    let name = args.get(2).expect(usage);
    let ty = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ]
    .into_iter()
    .find(|t| t.name() == name)
    .expect("a block type name such as Q4_0");
    let isa = if args.iter().any(|a| a == "portable") { Isa::Portable } else { flexserve_quant::detected_isa() };
    let iterations: usize = args.last().and_then(|a| a.parse().ok()).unwrap_or(200);
    let setting = |name: &str, default: usize| -> usize {
        args.iter().find_map(|a| a.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(default)
    };
    let (toks, n, rows) = (setting("toks", TOKS), setting("n", N), setting("rows", ROWS));
    let k = kernels_for(ty, isa).expect("supported type");
    let ak = kernels_for(k.vec_dot_type, isa).expect("activation type");
    let wrb = ty.row_size(n as u64).expect("whole blocks") as usize;
    let arb = k.vec_dot_type.row_size(n as u64).expect("whole blocks") as usize;
    let mut w = vec![0u8; wrb * rows];
    for (r, row) in w.chunks_exact_mut(wrb).enumerate() {
        (k.quantize)(&values(n, 10 + r as u32), row);
    }
    let mut a = vec![0u8; arb * toks];
    for (t, row) in a.chunks_exact_mut(arb).enumerate() {
        (ak.quantize)(&values(n, 1000 + t as u32), row);
    }
    let mut out = vec![0f32; rows * toks];
    let elements = match kind {
        "gemv" => {
            let gemv = gemv_kernel_for(ty, isa).expect("type has a gemv kernel");
            for _ in 0..iterations {
                gemv(n, black_box(&w), wrb, rows, black_box(&a), &mut out);
            }
            n * rows
        }
        "dots" => {
            let dot = k.dot.expect("weight type");
            for _ in 0..iterations {
                for (row, o) in w.chunks_exact(wrb).zip(out.iter_mut()) {
                    *o = dot(n, black_box(row), black_box(&a[..arb]));
                }
            }
            n * rows
        }
        "tile" => {
            let tile = tile_kernel_for(ty, isa).expect("type has a tile kernel");
            for _ in 0..iterations {
                tile(n, black_box(&w), wrb, rows, black_box(&a), arb, toks, &mut out, rows);
            }
            n * rows * toks
        }
        "packed" => {
            let layout = Repacked::of_type(ty).expect("type has a rearranged layout");
            let packed = layout.repack(&w, rows, n).expect("whole groups");
            let kernel = layout.kernel_for(isa);
            for _ in 0..iterations {
                kernel(n, black_box(&packed), rows, black_box(&a), arb, toks, &mut out, rows);
            }
            n * rows * toks
        }
        _ => panic!("{usage}"),
    };
    black_box(&out);
    println!("{kind} {ty} {isa:?}: {iterations} x {elements} elements");
}
