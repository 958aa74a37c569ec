//! The granule pool: secure memory granted and recalled by the normal world, used by the secure world.

use std::fmt;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::sys::{self, Purpose};
use crate::{MemError, PoolMode, Protection, ProtectionPolicy};

/// Default granule size: 2 MiB, the x86-64 and arm64 huge-page size.
pub const DEFAULT_GRANULE_SIZE: usize = 2 << 20;

/// How a [`GranulePool`] is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolConfig {
    /// Bytes per granule; a non-zero multiple of the page size. Default [`DEFAULT_GRANULE_SIZE`].
    pub granule_size: usize,
    /// Flexible (granted and recalled granule by granule) or a static carve-out.
    pub mode: PoolMode,
    /// Size of the carve-out in granules; must be non-zero in [`PoolMode::StaticCarveOut`] and zero in
    /// [`PoolMode::Flexible`].
    pub carve_out_granules: usize,
    /// Which protection to use; [`ProtectionPolicy::Auto`] prefers secret memory.
    pub protection: ProtectionPolicy,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self::flexible()
    }
}

impl PoolConfig {
    /// A flexible pool with 2 MiB granules and automatic protection; starts with a quota of zero.
    pub fn flexible() -> Self {
        Self {
            granule_size: DEFAULT_GRANULE_SIZE,
            mode: PoolMode::Flexible,
            carve_out_granules: 0,
            protection: ProtectionPolicy::Auto,
        }
    }

    /// A static carve-out of `granules` granules, reserved and populated when the pool is created.
    pub fn static_carve_out(granules: usize) -> Self {
        Self { mode: PoolMode::StaticCarveOut, carve_out_granules: granules, ..Self::flexible() }
    }

    /// Sets the granule size in bytes.
    pub fn with_granule_size(self, granule_size: usize) -> Self {
        Self { granule_size, ..self }
    }

    /// Sets the protection policy.
    pub fn with_protection(self, protection: ProtectionPolicy) -> Self {
        Self { protection, ..self }
    }
}

/// What [`GranulePool::grant`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantReport {
    /// Granules added to the quota, all prepared (mapped, every page faulted in, locked/protected).
    pub granules: usize,
    /// Wall time spent preparing them.
    pub elapsed: Duration,
}

/// What [`GranulePool::release`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseReport {
    /// Granules zeroized and returned to the operating system (quota lowered by as many).
    pub granules: usize,
    /// Wall time spent scrubbing and unmapping them.
    pub elapsed: Duration,
}

/// A snapshot of the pool's accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Protection of every granule in this pool.
    pub protection: Protection,
    /// Flexible or static carve-out.
    pub mode: PoolMode,
    /// Bytes per granule.
    pub granule_size: usize,
    /// The quota set by the normal world, in granules.
    pub granted: usize,
    /// Granules that exist: mapped, populated and protected (`free + in_use`). Always equal to `granted`,
    /// since granting prepares at once.
    pub prepared: usize,
    /// Prepared granules held by no region.
    pub free: usize,
    /// Granules held by live regions.
    pub in_use: usize,
}

/// A pool of secure-memory granules.
///
/// Cheap to clone (all clones share one pool) and usable from any thread. Management calls
/// ([`grant`](Self::grant), [`release`](Self::release)) are what the normal world asks for; access calls
/// ([`alloc`](Self::alloc) and the returned [`Region`]) are the secure world's. See the crate
/// documentation for the design.
#[derive(Clone)]
pub struct GranulePool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    granule_size: usize,
    mode: PoolMode,
    protection: Protection,
    fallback_reason: Option<String>,
    state: Mutex<PoolState>,
}

struct PoolState {
    /// Start addresses of the free granules, sorted ascending. Each is its own mapping of `granule_size`
    /// bytes (adjacent anonymous ones may have been merged by the kernel, which changes nothing here),
    /// populated, protected and all zero.
    free: Vec<usize>,
    granted: usize,
    in_use: usize,
}

impl PoolInner {
    fn state(&self) -> MutexGuard<'_, PoolState> {
        // The state is updated in single statements; a panic elsewhere cannot leave it half-written.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn return_free(&self, granules: impl IntoIterator<Item = usize>, was_in_use: usize) {
        let mut state = self.state();
        state.free.extend(granules);
        state.free.sort_unstable();
        state.in_use -= was_in_use;
    }
}

impl Drop for PoolInner {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        // Regions keep the pool alive, so every granule is free by now.
        for &addr in &state.free {
            // SAFETY: each free granule is a mapping of granule_size bytes owned by the pool, referenced by
            // nothing else.
            unsafe { scrub_and_unmap(addr, self.granule_size) };
        }
    }
}

/// Zeroizes a granule and returns it to the operating system.
///
/// # Safety
/// `addr..addr+len` must be a granule mapping owned by the caller and referenced by nothing else.
unsafe fn scrub_and_unmap(addr: usize, len: usize) {
    let granule = NonNull::new(addr as *mut u8).expect("granule addresses are never null");
    sys::scrub(granule, len);
    #[cfg(test)]
    test_hooks::assert_zeroed_before_unmap(granule, len);
    sys::unmap(granule, len);
}

impl GranulePool {
    /// Creates a pool, detecting (or enforcing) the protection. A static carve-out is reserved and populated
    /// here, in full.
    pub fn new(config: PoolConfig) -> Result<Self, MemError> {
        let page = sys::page_size();
        if config.granule_size == 0 || !config.granule_size.is_multiple_of(page) {
            return Err(MemError::InvalidConfig(format!(
                "granule_size {} is not a non-zero multiple of the {page}-byte page",
                config.granule_size
            )));
        }
        match config.mode {
            PoolMode::Flexible if config.carve_out_granules != 0 => {
                return Err(MemError::InvalidConfig(format!(
                    "carve_out_granules is {} but a flexible pool starts empty (grant granules instead)",
                    config.carve_out_granules
                )))
            }
            PoolMode::StaticCarveOut if config.carve_out_granules == 0 => {
                return Err(MemError::InvalidConfig("a static carve-out needs carve_out_granules > 0".into()))
            }
            _ => {}
        }
        let (protection, fallback_reason) = match config.protection {
            ProtectionPolicy::Auto => match sys::probe_secret_memory() {
                Ok(()) => (Protection::SecretMemory, None),
                Err(err) => (Protection::LockedAnonymous, Some(format!("memfd_secret unavailable: {err}"))),
            },
            ProtectionPolicy::RequireSecretMemory => {
                sys::probe_secret_memory().map_err(MemError::SecretMemoryUnavailable)?;
                (Protection::SecretMemory, None)
            }
            ProtectionPolicy::LockedAnonymous => (Protection::LockedAnonymous, None),
            ProtectionPolicy::Unprotected => (Protection::Unprotected, None),
        };

        let mut state = PoolState { free: Vec::new(), granted: 0, in_use: 0 };
        if config.mode == PoolMode::StaticCarveOut {
            let granules = config.carve_out_granules;
            let total =
                granules.checked_mul(config.granule_size).ok_or(MemError::TooLarge { what: "the carve-out" })?;
            // One mapping for the whole carve-out, like a boot-time reserved region.
            let base = sys::map_protected(protection, total, Purpose::Granule, None)
                .map_err(|source| MemError::Os { op: "reserve the static carve-out", source })?;
            state.free = (0..granules).map(|i| base.as_ptr() as usize + i * config.granule_size).collect();
            state.granted = granules;
        }
        let inner = PoolInner {
            granule_size: config.granule_size,
            mode: config.mode,
            protection,
            fallback_reason,
            state: Mutex::new(state),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The protection in force for every granule of this pool.
    pub fn protection(&self) -> Protection {
        self.inner.protection
    }

    /// Why [`ProtectionPolicy::Auto`] fell back to locked anonymous memory, if it did.
    pub fn fallback_reason(&self) -> Option<&str> {
        self.inner.fallback_reason.as_deref()
    }

    /// Flexible or static carve-out.
    pub fn mode(&self) -> PoolMode {
        self.inner.mode
    }

    /// Bytes per granule.
    pub fn granule_size(&self) -> usize {
        self.inner.granule_size
    }

    /// Granules a region of `bytes` bytes occupies.
    pub fn granules_for(&self, bytes: usize) -> usize {
        bytes.div_ceil(self.inner.granule_size)
    }

    /// Raises the quota by `granules` and prepares them now (create, map, fault every page, lock/protect),
    /// so that none of that cost falls on a later [`alloc`](Self::alloc). All or nothing: on failure the
    /// granules prepared by this call are unmapped again and the quota is unchanged.
    pub fn grant(&self, granules: usize) -> Result<GrantReport, MemError> {
        let inner = &self.inner;
        if inner.mode == PoolMode::StaticCarveOut {
            return Err(MemError::FixedCarveOut { granules: self.stats().granted });
        }
        let started = Instant::now();
        // Faulting protected pages is kernel work that scales with cores
        // (memfd_secret: about 2x on 2 cores), so granules are prepared by
        // several threads, each its share.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, granules.max(1));
        let (protection, size) = (inner.protection, inner.granule_size);
        let prepare = move |count: usize| -> (Vec<usize>, Option<std::io::Error>) {
            let mut mine = Vec::with_capacity(count);
            for _ in 0..count {
                match sys::map_protected(protection, size, Purpose::Granule, None) {
                    Ok(addr) => mine.push(addr.as_ptr() as usize),
                    Err(e) => return (mine, Some(e)),
                }
            }
            (mine, None)
        };
        let shares: Vec<usize> =
            (0..threads).map(|t| granules / threads + usize::from(t < granules % threads)).collect();
        let results: Vec<(Vec<usize>, Option<std::io::Error>)> = if threads == 1 {
            vec![prepare(granules)]
        } else {
            std::thread::scope(|scope| {
                let handles: Vec<_> = shares.iter().map(|&n| scope.spawn(move || prepare(n))).collect();
                handles
                    .into_iter()
                    .map(|h| {
                        h.join()
                            .unwrap_or_else(|_| (Vec::new(), Some(std::io::Error::other("preparing thread panicked"))))
                    })
                    .collect()
            })
        };
        let mut prepared = Vec::with_capacity(granules);
        let mut failure = None;
        for (mine, err) in results {
            prepared.extend(mine);
            failure = failure.or(err);
        }
        if let Some(source) = failure {
            for addr in prepared {
                // SAFETY: prepared by this call and not yet visible to anyone else.
                unsafe { scrub_and_unmap(addr, inner.granule_size) };
            }
            return Err(MemError::Os { op: "prepare a granule", source });
        }
        let mut state = inner.state();
        state.free.extend(prepared);
        state.free.sort_unstable();
        state.granted += granules;
        drop(state);
        Ok(GrantReport { granules, elapsed: started.elapsed() })
    }

    /// Allocates one contiguous, zero-filled region of at least `bytes` bytes from free granules.
    ///
    /// Free granules that already lie back to back are used in place; otherwise an address range is reserved
    /// and each granule's mapping is moved into it with mremap(2), which keeps its pages, protection and
    /// locks (no page is faulted again). Fails with [`MemError::InsufficientGranules`] when the quota has
    /// too few free granules: the pool never grows by itself.
    pub fn alloc(&self, bytes: usize) -> Result<Region, MemError> {
        let inner = &self.inner;
        if bytes == 0 {
            return Err(MemError::EmptyRegion);
        }
        let needed = self.granules_for(bytes);
        let capacity = needed.checked_mul(inner.granule_size).ok_or(MemError::TooLarge { what: "the region" })?;

        let mut state = inner.state();
        if state.free.len() < needed {
            return Err(MemError::InsufficientGranules {
                bytes,
                needed,
                free: state.free.len(),
                granted: state.granted,
                in_use: state.in_use,
            });
        }
        let (mut granules, in_place) = match find_run(&state.free, needed, inner.granule_size) {
            Some(start) => (state.free.drain(start..start + needed).collect::<Vec<_>>(), true),
            None => (state.free.drain(..needed).collect(), false),
        };
        state.in_use += needed;
        drop(state);

        let base = if in_place {
            granules[0]
        } else {
            match assemble(&mut granules, inner.granule_size, capacity) {
                Ok(base) => base,
                Err(err) => {
                    inner.return_free(granules, needed);
                    return Err(err);
                }
            }
        };
        let base = NonNull::new(base as *mut u8).expect("granule addresses are never null");
        Ok(Region { pool: Arc::clone(&self.inner), base, len: bytes, granules: needed })
    }

    /// Recalls up to `granules` FREE granules: zeroizes them and returns them to the operating system (the
    /// process's resident memory drops), lowering the quota by as many. Granules held by regions are never
    /// touched: to recall those, the secure side drops the regions first. A static carve-out releases
    /// nothing (the report says 0).
    pub fn release(&self, granules: usize) -> ReleaseReport {
        let inner = &self.inner;
        let started = Instant::now();
        if inner.mode == PoolMode::StaticCarveOut {
            return ReleaseReport { granules: 0, elapsed: started.elapsed() };
        }
        let mut state = inner.state();
        let count = granules.min(state.free.len());
        let split = state.free.len() - count;
        let recalled = state.free.split_off(split);
        state.granted -= count;
        drop(state);
        for addr in recalled {
            // SAFETY: the granule was taken off the free list above, so nothing else refers to it.
            unsafe { scrub_and_unmap(addr, inner.granule_size) };
        }
        ReleaseReport { granules: count, elapsed: started.elapsed() }
    }

    /// A snapshot of the pool's accounting.
    pub fn stats(&self) -> PoolStats {
        let state = self.inner.state();
        PoolStats {
            protection: self.inner.protection,
            mode: self.inner.mode,
            granule_size: self.inner.granule_size,
            granted: state.granted,
            prepared: state.free.len() + state.in_use,
            free: state.free.len(),
            in_use: state.in_use,
        }
    }
}

impl fmt::Debug for GranulePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GranulePool").field("stats", &self.stats()).finish()
    }
}

/// Index of the first run of `count` address-adjacent granules in the sorted free list.
pub(crate) fn find_run(free: &[usize], count: usize, granule_size: usize) -> Option<usize> {
    let mut run_start = 0;
    for i in 0..free.len() {
        if i > run_start && free[i] != free[i - 1] + granule_size {
            run_start = i;
        }
        if i + 1 - run_start == count {
            return Some(run_start);
        }
    }
    None
}

/// Moves `granules` into one freshly reserved contiguous range of `capacity` bytes and returns its start.
/// Updates each entry to the granule's current address, also on failure (some may have moved).
fn assemble(granules: &mut [usize], granule_size: usize, capacity: usize) -> Result<usize, MemError> {
    let reservation = sys::reserve_address_space(capacity)
        .map_err(|source| MemError::Os { op: "reserve address space for a region", source })?;
    let base = reservation.as_ptr() as usize;
    for (index, granule) in granules.iter_mut().enumerate() {
        let target = base + index * granule_size;
        let from = NonNull::new(*granule as *mut u8).expect("granule addresses are never null");
        let to = NonNull::new(target as *mut u8).expect("reservations are never null");
        // SAFETY: the granule was taken off the free list by the caller, and the target slot is part of the
        // reservation made above; both are owned here.
        match unsafe { sys::move_mapping(from, to, granule_size) } {
            Ok(()) => *granule = target,
            Err(source) => {
                // SAFETY: slots from `index` on still hold only the PROT_NONE reservation, owned here.
                unsafe { sys::unmap(to, capacity - index * granule_size) };
                return Err(MemError::Os { op: "move a granule into a region", source });
            }
        }
    }
    Ok(base)
}

/// One contiguous virtual range of secure memory made of whole granules.
///
/// Zero-filled when allocated. Dropping it scrubs every byte and returns the granules to the pool's free
/// list, still prepared and protected.
pub struct Region {
    pool: Arc<PoolInner>,
    base: NonNull<u8>,
    len: usize,
    granules: usize,
}

// SAFETY: a Region exclusively owns its memory (like a Box<[u8]>); shared access only hands out &[u8].
unsafe impl Send for Region {}
// SAFETY: as above; &Region gives read-only access.
unsafe impl Sync for Region {}

impl Region {
    /// The bytes asked for.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: base..base+len lies within the region's mapped, readable granules, owned by self.
        unsafe { std::slice::from_raw_parts(self.base.as_ptr(), self.len) }
    }

    /// The bytes asked for, writable.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.base.as_ptr(), self.len) }
    }

    /// Start of the region.
    pub fn as_ptr(&self) -> *const u8 {
        self.base.as_ptr()
    }

    /// Start of the region, for writing (the whole capacity is writable through it while `&mut self` is held).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Bytes asked for at allocation.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: regions are at least one byte long.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Granules making up the region.
    pub fn granules(&self) -> usize {
        self.granules
    }

    /// Bytes actually mapped: `granules() * granule_size`.
    pub fn capacity(&self) -> usize {
        self.granules * self.pool.granule_size
    }

    /// Protection of the region's memory.
    pub fn protection(&self) -> Protection {
        self.pool.protection
    }
}

impl Deref for Region {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl DerefMut for Region {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl AsRef<[u8]> for Region {
    fn as_ref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl AsMut<[u8]> for Region {
    fn as_mut(&mut self) -> &mut [u8] {
        self.as_mut_slice()
    }
}

impl fmt::Debug for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Region")
            .field("base", &self.base)
            .field("len", &self.len)
            .field("granules", &self.granules)
            .field("protection", &self.pool.protection)
            .finish()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        let capacity = self.capacity();
        // SAFETY: the region owns base..base+capacity and is going away.
        unsafe { sys::scrub(self.base, capacity) };
        #[cfg(test)]
        test_hooks::assert_zeroed_on_return(self.base, capacity);
        let base = self.base.as_ptr() as usize;
        let granule_size = self.pool.granule_size;
        self.pool.return_free((0..self.granules).map(|i| base + i * granule_size), self.granules);
    }
}

#[cfg(test)]
pub(crate) mod test_hooks {
    //! Checks compiled into the pool for its unit tests only.

    use std::ptr::NonNull;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Granules verified to be all zero right before munmap.
    pub(crate) static ZEROED_BEFORE_UNMAP: AtomicUsize = AtomicUsize::new(0);
    /// Regions verified to be all zero right before their granules went back on the free list.
    pub(crate) static ZEROED_ON_RETURN: AtomicUsize = AtomicUsize::new(0);

    fn all_zero(addr: NonNull<u8>, len: usize) -> bool {
        // SAFETY: callers pass a mapped, readable range they own.
        let bytes = unsafe { std::slice::from_raw_parts(addr.as_ptr(), len) };
        bytes.iter().all(|&b| b == 0)
    }

    pub(crate) fn assert_zeroed_before_unmap(addr: NonNull<u8>, len: usize) {
        assert!(all_zero(addr, len), "granule at {addr:p} holds non-zero bytes right before munmap");
        ZEROED_BEFORE_UNMAP.fetch_add(1, Ordering::SeqCst);
    }

    pub(crate) fn assert_zeroed_on_return(addr: NonNull<u8>, len: usize) {
        assert!(all_zero(addr, len), "region at {addr:p} holds non-zero bytes when returned to the pool");
        ZEROED_ON_RETURN.fetch_add(1, Ordering::SeqCst);
    }
}
