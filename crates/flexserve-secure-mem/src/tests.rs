//! Unit tests of the granule pool, with the pool's internal zero checks compiled in.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::{Mutex, MutexGuard, PoisonError};

use crate::pool::test_hooks::{ZEROED_BEFORE_UNMAP, ZEROED_ON_RETURN};
use crate::*;

const SMALL_GRANULE: usize = 64 << 10;
const MIB: usize = 1 << 20;

/// Serialises the tests: some read the process's resident memory, which concurrent tests would disturb.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Every protection this machine offers (secret memory only where memfd_secret works).
fn policies() -> Vec<ProtectionPolicy> {
    let mut policies = vec![ProtectionPolicy::LockedAnonymous, ProtectionPolicy::Unprotected];
    match secret_memory_available() {
        Ok(()) => policies.insert(0, ProtectionPolicy::RequireSecretMemory),
        Err(err) => eprintln!("memfd_secret unavailable here ({err}); secret-memory cases skipped"),
    }
    policies
}

fn flexible(policy: ProtectionPolicy, granule_size: usize) -> GranulePool {
    GranulePool::new(PoolConfig::flexible().with_protection(policy).with_granule_size(granule_size))
        .expect("pool creation")
}

fn fill_pattern(bytes: &mut [u8], seed: u8) {
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8;
    }
}

fn check_pattern(bytes: &[u8], seed: u8) {
    for (i, &b) in bytes.iter().enumerate() {
        let expected = (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8;
        assert_eq!(b, expected, "byte {i} of the region");
    }
}

/// The /proc/self/smaps entry of the mapping that contains `addr`.
fn smaps_entry(addr: usize) -> String {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("read smaps");
    let mut entry: Option<String> = None;
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|first| first.split_once('-'))
            .and_then(|(lo, hi)| Some((usize::from_str_radix(lo, 16).ok()?, usize::from_str_radix(hi, 16).ok()?)));
        match (range, entry.as_mut()) {
            // A header line starts the next mapping: the wanted entry, if collected, is complete.
            (Some(_), Some(_)) => break,
            (Some((lo, hi)), None) if lo <= addr && addr < hi => entry = Some(line.to_string()),
            (None, Some(text)) => {
                text.push('\n');
                text.push_str(line);
            }
            _ => {}
        }
    }
    entry.unwrap_or_else(|| panic!("no smaps entry for {addr:#x}"))
}

fn smaps_field_kib(entry: &str, field: &str) -> usize {
    entry
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':')?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in\n{entry}"))
}

fn vm_flags(entry: &str) -> Vec<&str> {
    entry.lines().find_map(|line| line.strip_prefix("VmFlags:")).expect("VmFlags").split_whitespace().collect()
}

#[test]
fn auto_policy_prefers_secret_memory_where_available() {
    let _serial = serial();
    let pool = GranulePool::new(PoolConfig::flexible()).unwrap();
    if secret_memory_available().is_ok() {
        assert_eq!(pool.protection(), Protection::SecretMemory);
        assert!(pool.fallback_reason().is_none());
    } else {
        assert_eq!(pool.protection(), Protection::LockedAnonymous);
        assert!(pool.fallback_reason().unwrap().contains("memfd_secret"));
    }
    assert_eq!(Protection::SecretMemory.name(), "memfd_secret");
    assert_eq!(Protection::LockedAnonymous.name(), "locked-anonymous");
    assert_eq!(PoolMode::Flexible.name(), "flexible");
    assert_eq!(PoolMode::StaticCarveOut.to_string(), "static-carve-out");
}

#[test]
fn forced_fallback_is_honoured() {
    let _serial = serial();
    let pool = flexible(ProtectionPolicy::LockedAnonymous, SMALL_GRANULE);
    assert_eq!(pool.protection(), Protection::LockedAnonymous);
    assert_eq!(pool.stats().protection, Protection::LockedAnonymous);
}

#[test]
fn regions_are_contiguous_and_writable_across_granule_boundaries() {
    let _serial = serial();
    for policy in policies() {
        let pool = flexible(policy, SMALL_GRANULE);
        pool.grant(6).unwrap();
        // Take six single-granule regions and free every other one, so no two free granules are adjacent
        // and a three-granule region must be assembled from scattered granules.
        let mut singles: Vec<Option<Region>> = (0..6).map(|_| Some(pool.alloc(1).unwrap())).collect();
        let scattered: Vec<usize> = [0, 2, 4].iter().map(|&i| singles[i].take().unwrap().as_ptr() as usize).collect();
        let mut region = pool.alloc(3 * SMALL_GRANULE - 100).unwrap();
        assert_eq!(region.granules(), 3);
        assert_eq!(region.len(), 3 * SMALL_GRANULE - 100);
        assert_eq!(region.capacity(), 3 * SMALL_GRANULE);
        assert!(!scattered.contains(&(region.as_ptr() as usize)), "assembled into a fresh range");
        assert!(region.as_slice().iter().all(|&b| b == 0), "new regions are zero-filled");
        fill_pattern(region.as_mut_slice(), 7);
        check_pattern(region.as_slice(), 7);
        // A write straddling each granule boundary lands where a contiguous buffer would put it.
        for boundary in [SMALL_GRANULE, 2 * SMALL_GRANULE] {
            region.as_mut_slice()[boundary - 4..boundary + 4].copy_from_slice(b"ABCDEFGH");
            assert_eq!(&region.as_slice()[boundary - 4..boundary + 4], b"ABCDEFGH");
        }
        let stats = pool.stats();
        assert_eq!((stats.granted, stats.prepared, stats.free, stats.in_use), (6, 6, 0, 6), "{policy:?}");
        drop(singles);
        drop(region);
        assert_eq!(pool.stats().free, 6);
    }
}

#[test]
fn free_granules_are_reused_without_new_preparation() {
    let _serial = serial();
    for policy in policies() {
        let pool = flexible(policy, SMALL_GRANULE);
        let report = pool.grant(4).unwrap();
        assert_eq!(report.granules, 4);
        let mut first = pool.alloc(4 * SMALL_GRANULE).unwrap();
        let base = first.as_ptr();
        fill_pattern(first.as_mut_slice(), 3);
        let returned_before = ZEROED_ON_RETURN.load(Ordering::SeqCst);
        drop(first);
        assert!(ZEROED_ON_RETURN.load(Ordering::SeqCst) > returned_before, "scrub verified on return");
        let rss_before = process_resident_bytes().unwrap();

        let second = pool.alloc(4 * SMALL_GRANULE).unwrap();
        assert_eq!(second.as_ptr(), base, "the same granules, still in place, are reused");
        assert!(second.as_slice().iter().all(|&b| b == 0), "the previous contents were scrubbed");
        let stats = pool.stats();
        assert_eq!((stats.granted, stats.prepared, stats.free, stats.in_use), (4, 4, 0, 4), "{policy:?}");
        // Reuse faults nothing in: resident memory does not grow by the region's size.
        let rss_after = process_resident_bytes().unwrap();
        assert!(rss_after < rss_before + (4 * SMALL_GRANULE) as u64 / 2, "{rss_before} -> {rss_after}");
    }
}

#[test]
fn release_returns_memory_and_zeroizes_first() {
    let _serial = serial();
    for policy in policies() {
        let pool = flexible(policy, DEFAULT_GRANULE_SIZE);
        let granules = 32 * MIB / DEFAULT_GRANULE_SIZE;
        pool.grant(granules).unwrap();
        {
            let mut region = pool.alloc(32 * MIB).unwrap();
            region.as_mut_slice().fill(0xA5);
        }
        let zeroed_before = ZEROED_BEFORE_UNMAP.load(Ordering::SeqCst);
        let rss_before = process_resident_bytes().unwrap();
        let report = pool.release(granules);
        let rss_after = process_resident_bytes().unwrap();

        assert_eq!(report.granules, granules);
        assert_eq!(ZEROED_BEFORE_UNMAP.load(Ordering::SeqCst) - zeroed_before, granules, "zero check ran");
        let dropped = rss_before.saturating_sub(rss_after);
        assert!(dropped >= 30 * MIB as u64, "{policy:?}: resident memory dropped by {dropped} bytes only");
        let stats = pool.stats();
        assert_eq!((stats.granted, stats.prepared, stats.free, stats.in_use), (0, 0, 0, 0));
    }
}

#[test]
fn release_never_touches_granules_in_use() {
    let _serial = serial();
    let pool = flexible(ProtectionPolicy::LockedAnonymous, SMALL_GRANULE);
    pool.grant(3).unwrap();
    let mut region = pool.alloc(2 * SMALL_GRANULE).unwrap();
    region.as_mut_slice().fill(9);
    let report = pool.release(10);
    assert_eq!(report.granules, 1, "only the one free granule is released");
    assert!(region.as_slice().iter().all(|&b| b == 9));
    let stats = pool.stats();
    assert_eq!((stats.granted, stats.free, stats.in_use), (2, 0, 2));
    drop(region);
    assert_eq!(pool.release(10).granules, 2);
}

#[test]
fn alloc_beyond_quota_fails_clearly() {
    let _serial = serial();
    let pool = flexible(ProtectionPolicy::LockedAnonymous, SMALL_GRANULE);
    let err = pool.alloc(1).unwrap_err();
    assert!(matches!(err, MemError::InsufficientGranules { needed: 1, free: 0, granted: 0, .. }), "{err}");
    pool.grant(2).unwrap();
    let _held = pool.alloc(SMALL_GRANULE).unwrap();
    let err = pool.alloc(2 * SMALL_GRANULE + 1).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, MemError::InsufficientGranules { needed: 3, free: 1, granted: 2, in_use: 1, .. }));
    assert!(message.contains("needs 3 granules but only 1 are free"), "{message}");
    assert!(message.contains("grant 2 more"), "{message}");
    let stats = pool.stats();
    assert_eq!((stats.granted, stats.free, stats.in_use), (2, 1, 1), "a failed alloc changes nothing");
    assert!(matches!(pool.alloc(0), Err(MemError::EmptyRegion)));
}

#[test]
fn static_carve_out_is_reserved_up_front_and_never_returned() {
    let _serial = serial();
    for policy in policies() {
        let config = PoolConfig::static_carve_out(4).with_granule_size(SMALL_GRANULE).with_protection(policy);
        let pool = GranulePool::new(config).unwrap();
        let stats = pool.stats();
        assert_eq!(stats.mode, PoolMode::StaticCarveOut);
        assert_eq!((stats.granted, stats.prepared, stats.free, stats.in_use), (4, 4, 4, 0));
        assert!(matches!(pool.grant(1), Err(MemError::FixedCarveOut { granules: 4 })));

        let mut region = pool.alloc(4 * SMALL_GRANULE).unwrap();
        fill_pattern(region.as_mut_slice(), 1);
        check_pattern(region.as_slice(), 1);
        assert_eq!(pool.release(4).granules, 0, "a carve-out releases nothing");
        drop(region);
        assert_eq!(pool.release(4).granules, 0, "not even when free");
        assert_eq!(pool.stats().granted, 4);
        assert!(pool.alloc(5 * SMALL_GRANULE).is_err());
    }
}

#[test]
fn invalid_configurations_are_rejected_with_reasons() {
    let _serial = serial();
    let err = GranulePool::new(PoolConfig::flexible().with_granule_size(1000)).unwrap_err();
    assert!(err.to_string().contains("granule_size 1000"), "{err}");
    let err = GranulePool::new(PoolConfig::flexible().with_granule_size(0)).unwrap_err();
    assert!(matches!(err, MemError::InvalidConfig(_)));
    let err = GranulePool::new(PoolConfig { carve_out_granules: 3, ..PoolConfig::flexible() }).unwrap_err();
    assert!(err.to_string().contains("carve_out_granules"), "{err}");
    let err = GranulePool::new(PoolConfig::static_carve_out(0)).unwrap_err();
    assert!(err.to_string().contains("carve_out_granules > 0"), "{err}");
}

#[test]
fn secret_memory_is_unreadable_through_proc_self_mem() {
    let _serial = serial();
    if let Err(err) = secret_memory_available() {
        eprintln!("memfd_secret unavailable ({err}); nothing to prove");
        return;
    }
    let pool = flexible(ProtectionPolicy::RequireSecretMemory, SMALL_GRANULE);
    pool.grant(2).unwrap();
    let mut region = pool.alloc(2 * SMALL_GRANULE).unwrap();
    region.as_mut_slice().fill(0x5A);
    let ordinary = vec![0x5Au8; 4096];

    let mem = File::open("/proc/self/mem").unwrap();
    let mut buf = [0u8; 64];
    let read = mem.read_exact_at(&mut buf, ordinary.as_ptr() as u64);
    assert!(read.is_ok() && buf.iter().all(|&b| b == 0x5A), "ordinary memory reads fine: {read:?}");
    for offset in [0, SMALL_GRANULE + 8] {
        let err = mem.read_exact_at(&mut buf, region.as_ptr() as u64 + offset as u64).unwrap_err();
        let errno = err.raw_os_error();
        assert!(errno == Some(libc::EIO) || errno == Some(libc::EFAULT), "secret memory read gave {err}");
    }
    // The kernel marks the mapping locked and excluded from core dumps.
    let flags = smaps_entry(region.as_ptr() as usize);
    assert!(flags.contains("secretmem"), "{flags}");
    let vm_flags = vm_flags(&flags);
    assert!(vm_flags.contains(&"lo") && vm_flags.contains(&"dd"), "{vm_flags:?}");
}

#[test]
fn locked_anonymous_memory_is_locked_undumpable_and_wiped_on_fork() {
    let _serial = serial();
    let pool = flexible(ProtectionPolicy::LockedAnonymous, DEFAULT_GRANULE_SIZE);
    pool.grant(1).unwrap();
    let region = pool.alloc(DEFAULT_GRANULE_SIZE).unwrap();
    let entry = smaps_entry(region.as_ptr() as usize);
    let flags = vm_flags(&entry);
    assert!(flags.contains(&"lo") && flags.contains(&"dd") && flags.contains(&"wf"), "{flags:?}");
    assert!(smaps_field_kib(&entry, "Locked") >= DEFAULT_GRANULE_SIZE / 1024, "{entry}");
    assert!(smaps_field_kib(&entry, "Rss") >= DEFAULT_GRANULE_SIZE / 1024, "populated at grant: {entry}");
}

#[test]
fn granted_granules_are_populated_before_use() {
    let _serial = serial();
    for policy in policies() {
        let pool = flexible(policy, DEFAULT_GRANULE_SIZE);
        let before = process_resident_bytes().unwrap();
        pool.grant(4).unwrap();
        let after = process_resident_bytes().unwrap();
        assert!(after >= before + 4 * DEFAULT_GRANULE_SIZE as u64 - MIB as u64, "{policy:?}: {before} -> {after}");
    }
}

#[test]
fn the_pool_is_shared_across_threads() {
    let _serial = serial();
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<GranulePool>();
    assert_send_sync::<Region>();

    let pool = flexible(ProtectionPolicy::LockedAnonymous, SMALL_GRANULE);
    pool.grant(8).unwrap();
    std::thread::scope(|scope| {
        for seed in 0..4u8 {
            let pool = pool.clone();
            scope.spawn(move || {
                for round in 0..50u8 {
                    let mut region = pool.alloc(2 * SMALL_GRANULE).unwrap();
                    assert!(region.as_slice().iter().all(|&b| b == 0));
                    fill_pattern(region.as_mut_slice(), seed ^ round);
                    check_pattern(region.as_slice(), seed ^ round);
                }
            });
        }
    });
    let stats = pool.stats();
    assert_eq!((stats.granted, stats.free, stats.in_use), (8, 8, 0));
}

#[test]
fn runtime_syscalls_are_listed() {
    let names: Vec<&str> = RUNTIME_SYSCALLS.iter().map(|(name, _)| *name).collect();
    for needed in ["memfd_secret", "mmap", "munmap", "mremap", "madvise", "mlock", "close", "ftruncate"] {
        assert!(names.contains(&needed), "{needed} missing");
    }
    assert!(RUNTIME_SYSCALLS.contains(&("memfd_secret", 447)) || cfg!(not(target_arch = "x86_64")));
}

#[test]
fn memlock_limit_can_be_raised() {
    let limit = raise_memlock_limit().unwrap();
    assert!(limit >= 64 << 10, "memlock limit {limit}");
}

#[test]
fn find_run_finds_the_first_adjacent_run() {
    let g = SMALL_GRANULE;
    let free = [g, 3 * g, 4 * g, 5 * g, 7 * g, 8 * g];
    assert_eq!(crate::pool::find_run(&free, 1, g), Some(0));
    assert_eq!(crate::pool::find_run(&free, 2, g), Some(1));
    assert_eq!(crate::pool::find_run(&free, 3, g), Some(1));
    assert_eq!(crate::pool::find_run(&free, 4, g), None);
    assert_eq!(crate::pool::find_run(&[], 1, g), None);
}
