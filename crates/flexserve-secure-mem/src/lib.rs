//! Flex-Mem, secure-world side: the memory the secure-world process keeps model weights in, and a global
//! allocator that makes the rest of its heap (KV cache, activations, tokenizer, prompts) secure memory too.
//!
//! # Protection
//!
//! On Linux, "secure memory" is one of:
//!
//! - [`Protection::SecretMemory`]: memory from `memfd_secret(2)`. The kernel removes its pages from the
//!   direct map, so they cannot be read through `/proc/PID/mem`, `process_vm_readv(2)` or `ptrace(2)`, not
//!   even by root, and never reach swap or a core dump. Removing a page from the direct map is what makes
//!   its first touch expensive (on the order of 15-20 us per 4 KiB page), which is why granules are prepared
//!   ahead of need and scrubbed for reuse rather than given back and protected again.
//! - [`Protection::LockedAnonymous`], the fallback where memfd_secret is missing or refused: anonymous
//!   memory that is `mlock`ed (no swap), `MADV_DONTDUMP` (no core dump) and `MADV_WIPEONFORK` (pool
//!   granules; a forked child sees zeros) or `MADV_DONTFORK` (heap arenas). The process's own hardening
//!   (not dumpable, no ptrace) then keeps other processes out.
//! - [`Protection::Unprotected`]: plain anonymous memory, for the unprotected baseline and cost comparisons.
//!
//! [`ProtectionPolicy`] picks one: `Auto` probes memfd_secret at creation (create, size, map, touch) and
//! falls back on any failure (ENOSYS, EINVAL, EPERM, ENOMEM from the memlock limit, ...); the other
//! policies force a choice, so tests cover every protection.
//!
//! # Why granules
//!
//! The normal world holds the *management right* over secure memory (how much the secure world may have),
//! the secure world the *access right* (what is in it). Trading memory in granules (2 MiB by default) keeps
//! both cheap: the normal world [`grant`](GranulePool::grant)s granules ahead of need, which prepares them
//! (map, fault every page, protect) off the critical path; the secure world [`alloc`](GranulePool::alloc)s
//! contiguous [`Region`]s out of any free granules, physically scattered or not; dropping a region scrubs
//! it and keeps its granules prepared for the next model or request; under memory pressure the normal world
//! [`release`](GranulePool::release)s free granules, which are zeroized and really returned to the kernel.
//! Which layers to evict so that granules become free is the caller's decision (drop regions, then release).
//!
//! [`PoolMode::StaticCarveOut`] is the strawman for comparison: the whole budget reserved and populated at
//! creation as one mapping, never grown, never returned.
//!
//! # How a region is contiguous
//!
//! Each granule is its own mapping (for secret memory, its own memfd_secret file, whose descriptor is closed
//! right after mmap: the mapping keeps the file alive, so the pool holds no descriptors and
//! `RLIMIT_NOFILE` is irrelevant). Free granules that already lie back to back are used in place; otherwise
//! the pool reserves a `PROT_NONE` range and moves each granule's mapping into it with `mremap(2)`, which
//! carries the populated pages, the locks and the advice along (no page is faulted again). This works for
//! secretmem as well; `fallocate(PUNCH_HOLE)` on secretmem does not (EOPNOTSUPP), hence one file per
//! granule so that unmapping a granule frees its pages. Every secret granule is one kernel VMA, so
//! `vm.max_map_count` (65530 by default) bounds a pool far above any model size (4096 granules = 8 GiB).
//!
//! # Secure heap
//!
//! [`SecureHeap`] is a `GlobalAlloc` built on the `talc` allocator with arenas of the same protection,
//! mapped on demand and never returned (freed blocks are reused). See its documentation.
//!
//! # Costs
//!
//! `examples/granule_costs.rs` prints per-granule grant (prepare), alloc, scrub and release costs and the
//! raw first-touch cost per page for each protection; `examples/heap_speed.rs` the heap's alloc+free cost.
//! On the development machine (2 busy cores), preparing a 2 MiB memfd_secret granule took about 15-30 ms
//! (8-15 s per GiB) against about 1.2 ms for locked or plain anonymous memory, while scrubbing a granule for
//! reuse took about 50 us and assembling a region about 15-25 us per moved granule.
//!
//! # System calls
//!
//! After initialisation the pool and the heap make only the calls in [`RUNTIME_SYSCALLS`], which a seccomp
//! filter must allow. Initialisation (pool creation, the first heap arena) probes secret memory with the
//! same calls. [`process_resident_bytes`] (a measuring aid) additionally opens and reads
//! `/proc/self/statm`.

mod error;
mod heap;
mod pool;
mod sys;

use std::fmt;
use std::io;

pub use error::MemError;
pub use heap::{HeapStats, SecureHeap, MIN_ARENA_SIZE};
pub use pool::{GrantReport, GranulePool, PoolConfig, PoolStats, Region, ReleaseReport, DEFAULT_GRANULE_SIZE};

/// System calls the pool and the heap make after initialisation: names and this target's numbers
/// (memfd_secret is 447 on x86-64 and arm64).
///
/// - `memfd_secret`, `ftruncate`, `mmap`, `close`, `madvise`: preparing a granule or mapping a heap arena
///   (`madvise` with `MADV_DONTFORK`, `MADV_DONTDUMP`, `MADV_WIPEONFORK`);
/// - `mlock` (granules), `mlock2` with `MLOCK_ONFAULT` (heap arenas): locked-anonymous protection only;
/// - `mremap`: assembling a region from scattered granules; `munmap`: releasing granules, dropping
///   an assembly reservation's leftovers, a failed mapping;
/// - `futex`: the pool's and the heap's mutexes under contention;
/// - `sysconf(_SC_PAGESIZE)` reads the auxiliary vector, no system call; `Instant::now` uses the vDSO's
///   `clock_gettime` (allow `clock_gettime` too in case the vDSO falls back to the system call).
pub const RUNTIME_SYSCALLS: &[(&str, libc::c_long)] = &[
    ("memfd_secret", libc::SYS_memfd_secret),
    ("ftruncate", libc::SYS_ftruncate),
    ("mmap", libc::SYS_mmap),
    ("munmap", libc::SYS_munmap),
    ("mremap", libc::SYS_mremap),
    ("madvise", libc::SYS_madvise),
    ("mlock", libc::SYS_mlock),
    ("mlock2", libc::SYS_mlock2),
    ("close", libc::SYS_close),
    ("futex", libc::SYS_futex),
    ("clock_gettime", libc::SYS_clock_gettime),
];

/// The protection of secure memory actually in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protection {
    /// memfd_secret(2): pages removed from the kernel's direct map.
    SecretMemory,
    /// Anonymous memory, mlocked, excluded from core dumps and from forked children.
    LockedAnonymous,
    /// Plain anonymous memory: the unprotected baseline.
    Unprotected,
}

impl Protection {
    /// "memfd_secret", "locked-anonymous" or "unprotected".
    pub fn name(self) -> &'static str {
        match self {
            Protection::SecretMemory => "memfd_secret",
            Protection::LockedAnonymous => "locked-anonymous",
            Protection::Unprotected => "unprotected",
        }
    }
}

impl fmt::Display for Protection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which protection to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ProtectionPolicy {
    /// Secret memory if memfd_secret works here, else locked anonymous memory.
    #[default]
    Auto,
    /// Secret memory or an error ([`MemError::SecretMemoryUnavailable`]).
    RequireSecretMemory,
    /// Locked anonymous memory even where secret memory is available (tests, comparisons).
    LockedAnonymous,
    /// Plain anonymous memory (the unprotected baseline).
    Unprotected,
}

/// How a pool's size is managed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PoolMode {
    /// Granted and recalled granule by granule.
    Flexible,
    /// Reserved and populated in full at creation, never grown or returned (the strawman).
    StaticCarveOut,
}

impl PoolMode {
    /// "flexible" or "static-carve-out".
    pub fn name(self) -> &'static str {
        match self {
            PoolMode::Flexible => "flexible",
            PoolMode::StaticCarveOut => "static-carve-out",
        }
    }
}

impl fmt::Display for PoolMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether memfd_secret(2) works in this process (creates, sizes, maps and touches one page).
pub fn secret_memory_available() -> Result<(), io::Error> {
    sys::probe_secret_memory()
}

/// Raises the soft `RLIMIT_MEMLOCK` to the hard limit (to unlimited where the process may) and returns the
/// new soft limit in bytes (`libc::RLIM_INFINITY` for unlimited).
///
/// Both protections count against this limit: secretmem mappings are locked by the kernel and checked against
/// it at mmap time, locked-anonymous memory is mlocked. Root (CAP_IPC_LOCK) is exempt; an unprivileged
/// secure process should call this at start-up, before the seccomp filter.
pub fn raise_memlock_limit() -> Result<libc::rlim_t, io::Error> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let unlimited = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    let to_hard = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
    for wanted in [unlimited, to_hard] {
        // SAFETY: setrlimit reads the struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &wanted) } == 0 {
            return Ok(wanted.rlim_cur);
        }
    }
    Err(io::Error::last_os_error())
}

/// The process's resident memory in bytes, from `/proc/self/statm` (includes secret-memory pages).
pub fn process_resident_bytes() -> Result<u64, io::Error> {
    let statm = std::fs::read_to_string("/proc/self/statm")?;
    let resident_pages: u64 =
        statm.split_whitespace().nth(1).and_then(|field| field.parse().ok()).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, format!("unexpected /proc/self/statm: {statm:?}"))
        })?;
    Ok(resident_pages * sys::page_size() as u64)
}

#[cfg(test)]
mod tests;
