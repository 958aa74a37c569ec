//! The secure heap: a global allocator whose every arena is secure memory.

use std::alloc::{GlobalAlloc, Layout};
use std::ptr::{self, NonNull};
use std::sync::{Mutex, MutexGuard, PoisonError};

use talc::base::binning::Binning;
use talc::base::Talc;
use talc::source::Source;
use talc::DefaultBinning;

use crate::sys::{self, Purpose};
use crate::{Protection, ProtectionPolicy};

/// Smallest arena the heap maps at once.
pub const MIN_ARENA_SIZE: usize = 8 << 20;
/// Arenas are sized in multiples of this.
const ARENA_ROUNDING: usize = 2 << 20;
/// Room for the allocator's per-heap tags and alignment slack on top of a request.
const ARENA_SLACK: usize = 4096;
/// Reallocations copying more than this release the lock during the copy.
const UNLOCKED_COPY_THRESHOLD: usize = 16 << 10;

/// A global allocator whose memory is all secure: memfd_secret arenas where the kernel offers them, else
/// locked (mlock on fault), no-dump, not-inherited-by-fork anonymous memory.
///
/// Install it in the secure binary:
///
/// ```no_run
/// #[global_allocator]
/// static HEAP: flexserve_secure_mem::SecureHeap = flexserve_secure_mem::SecureHeap::new();
///
/// fn main() {
///     let prompt = String::from("kept in secure memory");
///     println!("{prompt}: {:?}", HEAP.stats());
/// }
/// ```
///
/// The free-list logic is `talc`'s; this type supplies its arenas. Arenas are mapped on demand (at least
/// [`MIN_ARENA_SIZE`], or the request rounded up to 2 MiB), adjacent to the previous one when the address
/// space allows so that the heap stays one piece, and never unmapped: freed blocks, large ones included,
/// are reused. The protection is chosen at the first arena and never changes; if an arena cannot be mapped
/// with it, the allocation returns null and Rust aborts with an out-of-memory message. Nothing here
/// allocates or calls the system allocator. One lock guards the heap; reallocations of large blocks copy
/// outside it.
///
/// Child processes: arenas are MADV_DONTFORK, so a forked child that touches the heap faults instead of
/// seeing secrets. The secure process must not fork (spawning with posix_spawn/vfork-style clones is fine).
pub struct SecureHeap {
    talc: Mutex<Talc<ArenaSource, DefaultBinning>>,
}

/// Accounting of a [`SecureHeap`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeapStats {
    /// Bytes of arenas mapped so far (address space reserved for the heap; pages become resident on use).
    pub reserved_bytes: usize,
    /// Arenas mapped so far (including ones that extended the previous arena in place).
    pub arenas: usize,
    /// Protection of the arenas; `None` until the first allocation.
    pub protection: Option<Protection>,
    /// Bytes allocated now.
    pub allocated_bytes: usize,
    /// Most bytes allocated at once since the heap started or since the last
    /// [`SecureHeap::reset_peak`].
    pub peak_allocated_bytes: usize,
}

impl SecureHeap {
    /// A heap using secret memory when available, else locked anonymous memory.
    pub const fn new() -> Self {
        Self::with_policy(ProtectionPolicy::Auto)
    }

    /// A heap with an explicit protection policy. With [`ProtectionPolicy::RequireSecretMemory`] on a kernel
    /// without memfd_secret the very first allocation fails and the process aborts.
    pub const fn with_policy(policy: ProtectionPolicy) -> Self {
        Self { talc: Mutex::new(Talc::new(ArenaSource::new(policy))) }
    }

    /// Reserved bytes, arena count and the protection in force.
    pub fn stats(&self) -> HeapStats {
        let talc = self.lock();
        let counters = talc.counters();
        HeapStats {
            reserved_bytes: talc.source.reserved_bytes,
            arenas: talc.source.arenas,
            protection: talc.source.protection,
            allocated_bytes: counters.allocated_bytes,
            peak_allocated_bytes: talc.source.peak_allocated.max(counters.allocated_bytes),
        }
    }

    /// Starts measuring the peak again from what is allocated now (so that
    /// the peak of one piece of work can be read after it).
    pub fn reset_peak(&self) {
        let mut talc = self.lock();
        talc.source.peak_allocated = talc.counters().allocated_bytes;
    }

    fn lock(&self) -> MutexGuard<'_, Talc<ArenaSource, DefaultBinning>> {
        // talc does not panic while holding the lock; if anything ever did, its state is still consistent
        // enough to go on rather than abort every later allocation.
        self.talc.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for SecureHeap {
    fn default() -> Self {
        Self::new()
    }
}

// SAFETY: allocations come from talc, which hands out disjoint blocks of at least the requested size and
// alignment from arenas owned by this heap; all access to talc goes through one mutex.
unsafe impl GlobalAlloc for SecureHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let mut talc = self.lock();
        // GlobalAlloc callers never pass a zero size.
        let block = talc.allocate(layout).map_or(ptr::null_mut(), NonNull::as_ptr);
        note_peak(&mut talc);
        block
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.lock().deallocate(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, old_layout: Layout, new_size: usize) -> *mut u8 {
        let mut talc = self.lock();
        if talc.try_realloc_in_place(ptr, old_layout, new_size) {
            note_peak(&mut talc);
            return ptr;
        }
        // Growing in place failed (shrinking always succeeds), so new_size > old size.
        let new_layout = Layout::from_size_align_unchecked(new_size, old_layout.align());
        let Some(new_ptr) = talc.allocate(new_layout) else {
            return ptr::null_mut();
        };
        note_peak(&mut talc);
        let new_ptr = new_ptr.as_ptr();
        if old_layout.size() > UNLOCKED_COPY_THRESHOLD {
            // Both blocks are owned by the caller for now; let other threads allocate during a long copy.
            drop(talc);
            ptr::copy_nonoverlapping(ptr, new_ptr, old_layout.size());
            talc = self.lock();
        } else {
            ptr::copy_nonoverlapping(ptr, new_ptr, old_layout.size());
        }
        talc.deallocate(ptr, old_layout);
        new_ptr
    }
}

/// Raises the recorded peak to what is allocated now (under the heap's lock).
fn note_peak<B: Binning>(talc: &mut Talc<ArenaSource, B>) {
    let now = talc.counters().allocated_bytes;
    if now > talc.source.peak_allocated {
        talc.source.peak_allocated = now;
    }
}

/// Where talc gets memory from: secure arenas mapped on demand. Holds no heap data, only bookkeeping.
#[derive(Debug)]
struct ArenaSource {
    policy: ProtectionPolicy,
    protection: Option<Protection>,
    reserved_bytes: usize,
    /// Most bytes allocated at once since the last reset (kept here, under the heap's lock).
    peak_allocated: usize,
    arenas: usize,
    /// The heap the next arena tries to extend: talc's end of it, and the end of its mapping.
    last_heap: Option<LastHeap>,
}

#[derive(Debug, Clone, Copy)]
struct LastHeap {
    heap_end: NonNull<u8>,
    mapping_end: NonNull<u8>,
}

// SAFETY: the pointers only describe arenas owned by the heap; they are used under the heap's lock.
unsafe impl Send for ArenaSource {}

impl ArenaSource {
    const fn new(policy: ProtectionPolicy) -> Self {
        Self { policy, protection: None, reserved_bytes: 0, peak_allocated: 0, arenas: 0, last_heap: None }
    }

    /// The protection in force, chosen on first use.
    fn protection(&mut self) -> Result<Protection, ()> {
        if let Some(protection) = self.protection {
            return Ok(protection);
        }
        let chosen = match self.policy {
            ProtectionPolicy::Auto => match sys::probe_secret_memory() {
                Ok(()) => Protection::SecretMemory,
                Err(_) => Protection::LockedAnonymous,
            },
            ProtectionPolicy::RequireSecretMemory => {
                sys::probe_secret_memory().map_err(|_| ())?;
                Protection::SecretMemory
            }
            ProtectionPolicy::LockedAnonymous => Protection::LockedAnonymous,
            ProtectionPolicy::Unprotected => Protection::Unprotected,
        };
        self.protection = Some(chosen);
        Ok(chosen)
    }
}

fn round_up(value: usize, multiple: usize) -> Option<usize> {
    value.checked_add(multiple - 1).map(|v| v / multiple * multiple)
}

// SAFETY: acquire only maps fresh memory and hands it to the talc it is given; it neither allocates nor
// touches the SecureHeap's lock (it runs under it).
unsafe impl Source for ArenaSource {
    fn acquire<B: Binning>(talc: &mut Talc<Self, B>, layout: Layout) -> Result<(), ()> {
        let mut needed = layout.size().checked_add(layout.align()).and_then(|n| n.checked_add(ARENA_SLACK)).ok_or(())?;
        if !talc.is_metadata_established() {
            needed = needed.checked_add(talc::min_first_heap_size::<B>()).ok_or(())?;
        }
        let arena_len = round_up(needed, ARENA_ROUNDING).ok_or(())?.max(MIN_ARENA_SIZE);
        let protection = talc.source.protection()?;

        // First try to grow the last heap in place, so free space at its end joins the new arena.
        if let Some(last) = talc.source.last_heap {
            if let Ok(arena) = sys::map_protected(protection, arena_len, Purpose::HeapArena, Some(last.mapping_end)) {
                if arena == last.mapping_end {
                    let mapping_end = arena.as_ptr().wrapping_add(arena_len);
                    // SAFETY: last.heap_end is the end of a heap talc manages, and arena..mapping_end is a fresh
                    // mapping directly above that heap's mapping, owned by the heap from now on.
                    let heap_end = unsafe { talc.extend(last.heap_end, mapping_end) };
                    talc.source.record_arena(arena_len, heap_end, mapping_end);
                    return Ok(());
                }
                // An old kernel treated the hint as advisory and placed the arena elsewhere: claim it below.
                return claim_arena(talc, arena, arena_len);
            }
        }
        let arena = sys::map_protected(protection, arena_len, Purpose::HeapArena, None).map_err(|_| ())?;
        claim_arena(talc, arena, arena_len)
    }
}

impl ArenaSource {
    fn record_arena(&mut self, len: usize, heap_end: NonNull<u8>, mapping_end: *mut u8) {
        self.reserved_bytes += len;
        self.arenas += 1;
        self.last_heap = NonNull::new(mapping_end).map(|mapping_end| LastHeap { heap_end, mapping_end });
    }
}

/// Hands a fresh arena to talc as a new heap.
fn claim_arena<B: Binning>(talc: &mut Talc<ArenaSource, B>, arena: NonNull<u8>, len: usize) -> Result<(), ()> {
    // SAFETY: arena..arena+len is a fresh mapping that from now on belongs to the heap alone.
    match unsafe { talc.claim(arena.as_ptr(), len) } {
        Some(heap_end) => {
            talc.source.record_arena(len, heap_end, arena.as_ptr().wrapping_add(len));
            Ok(())
        }
        None => {
            // SAFETY: talc did not take the arena, so it is still unused and ours to unmap.
            unsafe { sys::unmap(arena, len) };
            Err(())
        }
    }
}
