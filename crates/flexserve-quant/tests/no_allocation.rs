//! The matmul kernels allocate nothing once a thread has run them on a
//! shape: a kernel call is one task of one matmul, run for every layer of
//! every token, so its scratch must come from buffers kept between calls.
//! An allocator that counts this thread's allocations checks every tile,
//! GEMV and rearranged kernel of every tier the CPU runs.

mod common;

use common::*;
use flexserve_quant::{gemv_kernel_for, kernels_for, shared_act_tile_for, tile_kernel_for, usable_isas, Repacked};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

// SAFETY: every call is passed on to the system allocator unchanged; the
// counter is a thread-local `Cell` with a const initialiser, which does not
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|c| c.set(c.get() + 1));
        // SAFETY: forwarded with the caller's arguments.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations this thread makes while running `f`.
fn allocations(mut f: impl FnMut()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

/// `count` rows of `n` random values in the format of `ty`.
fn rows_of(ty: flexserve_quant::GgmlType, n: usize, count: usize, seed: u64) -> Vec<u8> {
    let k = portable(ty);
    let mut rng = rng(seed);
    (0..count).flat_map(|_| quantize(&k, &data(&mut rng, Shape::Uniform, n, 32))).collect()
}

#[test]
fn kernels_allocate_nothing_after_the_first_call() {
    // 16 rows (two groups of eight) of 512 elements against 7 tokens, then 1.
    let (n, rows) = (512, 16);
    for isa in usable_isas() {
        for ty in MATRIX_TYPES {
            let k = kernels_for(ty, isa).expect("kernels exist");
            let act_ty = k.vec_dot_type;
            let w = rows_of(ty, n, rows, 1);
            let a = rows_of(act_ty, n, 7, 2);
            let (w_row, a_row) = (row_bytes(ty, n), row_bytes(act_ty, n));
            let mut out = vec![0f32; 7 * rows];

            let tile = tile_kernel_for(ty, isa).expect("matrix types have a tile kernel");
            let mut run_tile = || tile(n, &w, w_row, rows, &a, a_row, 7, &mut out, rows);
            run_tile();
            assert_eq!(allocations(&mut run_tile), 0, "{ty} tile at {isa:?}");

            if let Some(shared) = shared_act_tile_for(ty, isa) {
                // The layout is the caller's; the row ranges' scratch is the kernel's.
                let mut layout = vec![0f32; (shared.layout_len)(n, 7)];
                (shared.lay_out)(n, &a, a_row, 7, &mut layout);
                let mut run_shared = || (shared.tile)(n, &w, w_row, rows, &layout, 7, &mut out, rows);
                run_shared();
                assert_eq!(allocations(&mut run_shared), 0, "{ty} two-step tile at {isa:?}");
            }

            let gemv = gemv_kernel_for(ty, isa).expect("matrix types have a GEMV kernel");
            let mut run_gemv = || gemv(n, &w, w_row, rows, &a, &mut out);
            run_gemv();
            assert_eq!(allocations(&mut run_gemv), 0, "{ty} GEMV at {isa:?}");

            let Some(layout) = Repacked::of_type(ty) else { continue };
            let packed = layout.repack(&w, rows, n).expect("whole groups of eight rows");
            let a = rows_of(layout.activation_type(), n, 7, 3);
            let a_row = row_bytes(layout.activation_type(), n);
            let kernel = layout.kernel_for(isa);
            for toks in [7, 1] {
                let mut run = || kernel(n, &packed, rows, &a, a_row, toks, &mut out, rows);
                run();
                assert_eq!(allocations(&mut run), 0, "{layout:?} x{toks} at {isa:?}");
            }
        }
    }
}
