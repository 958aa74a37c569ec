//! The secure heap installed as this test binary's global allocator (automatic protection).

use std::fs::File;
use std::os::unix::fs::FileExt;

use flexserve_secure_mem::{secret_memory_available, Protection, SecureHeap, MIN_ARENA_SIZE};

mod common;

#[global_allocator]
static HEAP: SecureHeap = SecureHeap::new();

#[test]
fn the_heap_serves_everything_and_grows() {
    let before = HEAP.stats();
    // The test harness itself has been allocating from the secure heap since before main.
    assert!(before.arenas >= 1 && before.reserved_bytes >= MIN_ARENA_SIZE, "{before:?}");
    let expected =
        if secret_memory_available().is_ok() { Protection::SecretMemory } else { Protection::LockedAnonymous };
    assert_eq!(before.protection, Some(expected));

    let checked = common::mixed_workload(6, 400);
    assert!(checked > 6 * 100, "checked only {checked} buffers");

    let after = HEAP.stats();
    assert!(after.reserved_bytes > before.reserved_bytes + (16 << 20), "{before:?} -> {after:?}");
    assert_eq!(after.protection, before.protection);
}

#[test]
fn heap_memory_is_unreadable_through_proc_self_mem_when_secret() {
    let secret = vec![0x42u8; 1 << 20];
    let mem = File::open("/proc/self/mem").unwrap();
    let mut buf = [0u8; 32];
    let read = mem.read_exact_at(&mut buf, secret.as_ptr() as u64 + 4096);
    match HEAP.stats().protection {
        Some(Protection::SecretMemory) => {
            let errno = read.unwrap_err().raw_os_error();
            assert!(errno == Some(libc::EIO) || errno == Some(libc::EFAULT), "errno {errno:?}");
        }
        other => {
            eprintln!(
                "heap protection is {other:?}; /proc/self/mem can read it (the process's own hardening guards it)"
            );
            read.unwrap();
            assert_eq!(buf, [0x42; 32]);
        }
    }
}

#[test]
fn large_alignments_are_honoured() {
    for align in [64usize, 4096, 1 << 16, 2 << 20] {
        let layout = std::alloc::Layout::from_size_align(3 * align + 5, align).unwrap();
        // SAFETY: the layout has a non-zero size; the block is freed with the same layout.
        unsafe {
            let ptr = std::alloc::alloc(layout);
            assert!(!ptr.is_null());
            assert_eq!(ptr as usize % align, 0);
            ptr.write_bytes(0xEE, layout.size());
            std::alloc::dealloc(ptr, layout);
        }
    }
}

#[test]
fn exhaustion_is_reported_not_hidden() {
    // 128 TiB cannot be mapped (beyond the user address space): the allocator must say so with a null
    // pointer, which try_reserve turns into an error (a plain Vec would abort with an OOM message).
    let mut huge: Vec<u8> = Vec::new();
    assert!(huge.try_reserve_exact(1 << 47).is_err());
    // The heap still works afterwards.
    let small = vec![3u8; 1 << 20];
    assert!(small.iter().all(|&b| b == 3));
}

#[test]
fn the_peak_counts_what_was_allocated_at_once_and_outlives_the_block() {
    // Other tests of this binary allocate in parallel: bounds, not equalities.
    HEAP.reset_peak();
    let block = vec![1u8; 5 << 20];
    let live = HEAP.stats();
    assert!(live.allocated_bytes >= 5 << 20 && live.peak_allocated_bytes >= live.allocated_bytes, "{live:?}");
    drop(block);
    assert!(HEAP.stats().peak_allocated_bytes >= 5 << 20, "the peak outlives the block");
}
