//! The secure heap forced onto its fallback (locked anonymous memory) as the global allocator.

use flexserve_secure_mem::{Protection, ProtectionPolicy, SecureHeap};

mod common;

#[global_allocator]
static HEAP: SecureHeap = SecureHeap::with_policy(ProtectionPolicy::LockedAnonymous);

#[test]
fn fallback_heap_runs_the_workload_locked_and_undumpable() {
    assert_eq!(HEAP.stats().protection, Some(Protection::LockedAnonymous));
    let before = HEAP.stats();
    let checked = common::mixed_workload(4, 300);
    assert!(checked > 4 * 75, "checked only {checked} buffers");
    let after = HEAP.stats();
    assert!(after.reserved_bytes > before.reserved_bytes, "{before:?} -> {after:?}");

    // The arena holding a fresh allocation is locked, excluded from dumps and not inherited by children.
    let probe = vec![1u8; 4096];
    let addr = probe.as_ptr() as usize;
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
    let mut lines = smaps.lines();
    let mut flags = None;
    while let Some(line) = lines.next() {
        let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
        if let Some((lo, hi)) =
            range.and_then(|(lo, hi)| Some((usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?)))
        {
            if lo <= addr && addr < hi {
                flags = lines.by_ref().find_map(|l| l.strip_prefix("VmFlags:")).map(str::to_string);
                break;
            }
        }
    }
    let flags = flags.expect("arena in smaps");
    for flag in ["dd", "dc"] {
        assert!(flags.split_whitespace().any(|f| f == flag), "missing {flag} in {flags}");
    }
    // mlock2(MLOCK_ONFAULT) shows as "lf" (lock on fault) plus "lo".
    assert!(flags.split_whitespace().any(|f| f == "lo"), "not locked: {flags}");
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
