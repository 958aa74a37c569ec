//! Small-allocation throughput of the secure heap against the system allocator, from several threads.
//!
//! Run: `cargo run --release -p flexserve-secure-mem --example heap_speed [threads]` (default 2).
//! Prints nanoseconds per alloc+free pair; nothing is asserted.

use std::alloc::{GlobalAlloc, Layout, System};
use std::time::Instant;

use flexserve_secure_mem::{ProtectionPolicy, SecureHeap};

#[global_allocator]
static HEAP: SecureHeap = SecureHeap::new();

/// The same allocator on plain anonymous arenas, used directly (not as the global allocator): separates the
/// allocator's own cost from the cost of the memory it sits on.
static PLAIN_ARENAS: SecureHeap = SecureHeap::with_policy(ProtectionPolicy::Unprotected);

const PAIRS_PER_THREAD: usize = 1_000_000;

fn run<A: GlobalAlloc + Sync>(allocator: &A, threads: usize) -> f64 {
    let started = Instant::now();
    std::thread::scope(|scope| {
        for seed in 0..threads {
            scope.spawn(move || {
                let mut state = seed as u64 * 7919 + 1;
                // A few live blocks at once, so frees are not always of the latest allocation.
                let mut live: [(*mut u8, Layout); 8] = [(std::ptr::null_mut(), Layout::new::<u8>()); 8];
                for i in 0..PAIRS_PER_THREAD {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let size = 16 + (state >> 33) as usize % 1024;
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    let slot = i % live.len();
                    // SAFETY: non-zero sizes; each block is freed once with the layout it was allocated with.
                    unsafe {
                        if !live[slot].0.is_null() {
                            allocator.dealloc(live[slot].0, live[slot].1);
                        }
                        let ptr = allocator.alloc(layout);
                        assert!(!ptr.is_null());
                        ptr.write(1);
                        live[slot] = (ptr, layout);
                    }
                }
                for (ptr, layout) in live {
                    if !ptr.is_null() {
                        // SAFETY: allocated above with this layout and not yet freed.
                        unsafe { allocator.dealloc(ptr, layout) };
                    }
                }
            });
        }
    });
    started.elapsed().as_secs_f64() * 1e9 / (threads * PAIRS_PER_THREAD) as f64
}

fn main() {
    let threads: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    let secure = run(&HEAP, threads);
    let plain = run(&PLAIN_ARENAS, threads);
    let system = run(&System, threads);
    println!("{threads} threads, {PAIRS_PER_THREAD} alloc+free pairs each, sizes 16..1040 B");
    println!("secure heap ({}): {secure:.1} ns/pair", HEAP.stats().protection.map_or("none", |p| p.name()));
    println!("same heap, unprotected arenas: {plain:.1} ns/pair");
    println!("system malloc: {system:.1} ns/pair");
    println!("heap stats: {:?}", HEAP.stats());
}
