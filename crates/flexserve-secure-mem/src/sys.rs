//! The operating-system layer: every system call of the crate lives here.
//!
//! Nothing in this module allocates on the Rust heap: the secure heap's arena source calls into it from
//! inside the global allocator, where an allocation would recurse. Errors are therefore plain
//! `std::io::Error`s built from errno values (those never allocate).

use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{compiler_fence, Ordering};

use crate::Protection;

/// Result of a system call that returns -1 and sets errno on failure.
fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The size of a virtual memory page.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size <= 0 {
        4096
    } else {
        size as usize
    }
}

/// An owned file descriptor closed on drop (std's `OwnedFd` would do too; this one is explicit about
/// ignoring close errors, which cannot be acted upon here).
struct Fd(libc::c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this value and closed exactly once.
        unsafe { libc::close(self.0) };
    }
}

/// Creates an anonymous secret-memory file of `len` bytes (memfd_secret(2) then ftruncate(2)).
fn secret_memory_file(len: usize) -> io::Result<Fd> {
    // SAFETY: memfd_secret takes one flags argument and returns a new descriptor or -1.
    let raw = unsafe { libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_long) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = Fd(raw as libc::c_int);
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: ftruncate on a descriptor we own.
    check(unsafe { libc::ftruncate(fd.0, len) })?;
    Ok(fd)
}

/// mmap(2) wrapper. `hint` asks for a fixed address without replacing anything already mapped there
/// (MAP_FIXED_NOREPLACE); the caller compares the returned address with the hint.
fn map(
    len: usize,
    prot: libc::c_int,
    flags: libc::c_int,
    fd: libc::c_int,
    hint: Option<NonNull<u8>>,
) -> io::Result<NonNull<u8>> {
    let (addr, flags) = match hint {
        Some(hint) => (hint.as_ptr().cast::<libc::c_void>(), flags | libc::MAP_FIXED_NOREPLACE),
        None => (ptr::null_mut(), flags),
    };
    // SAFETY: a fresh mapping never aliases memory Rust knows about: without a hint the kernel picks a free
    // range, and MAP_FIXED_NOREPLACE fails instead of replacing an existing mapping.
    let ptr = unsafe { libc::mmap(addr, len, prot, flags, fd, 0) };
    if ptr == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    NonNull::new(ptr.cast::<u8>()).ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))
}

/// madvise(2) wrapper.
///
/// # Safety
/// `addr..addr+len` must be a mapping owned by the caller.
unsafe fn advise(addr: NonNull<u8>, len: usize, advice: libc::c_int) -> io::Result<()> {
    check(libc::madvise(addr.as_ptr().cast(), len, advice))
}

/// Unmaps `addr..addr+len`.
///
/// # Safety
/// The range must be a mapping owned by the caller and no reference into it may outlive this call.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) {
    // munmap only fails for invalid arguments, which would be a bug in this crate; nothing to recover.
    let ret = libc::munmap(addr.as_ptr().cast(), len);
    debug_assert_eq!(ret, 0, "munmap failed: {}", io::Error::last_os_error());
}

/// Writes one byte to every page so that the kernel allocates (and, for secret memory, removes from its
/// direct map) all of them now rather than at first use.
///
/// # Safety
/// `addr..addr+len` must be writable memory owned by the caller.
pub(crate) unsafe fn touch_pages(addr: NonNull<u8>, len: usize, page: usize) {
    let mut offset = 0;
    while offset < len {
        // A volatile write, so that the store (and hence the page fault) is really issued.
        ptr::write_volatile(addr.as_ptr().add(offset), 0);
        offset += page;
    }
}

/// Overwrites `addr..addr+len` with zeros in a way the compiler may not elide.
///
/// # Safety
/// `addr..addr+len` must be writable memory owned by the caller.
pub(crate) unsafe fn scrub(addr: NonNull<u8>, len: usize) {
    ptr::write_bytes(addr.as_ptr(), 0, len);
    // The memory is about to be reused or unmapped: make the stores observable so they are not
    // treated as dead and removed.
    std::hint::black_box(addr.as_ptr());
    compiler_fence(Ordering::SeqCst);
}

/// What a mapping is for; it decides which advice it gets.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Pool memory: populated now, locked, and wiped (anonymous) or not inherited (secret) on fork.
    Granule,
    /// Heap arena: populated on first touch, and never inherited by a forked child (a child touching the
    /// heap faults instead of reading it).
    HeapArena,
}

/// Maps `len` bytes of memory with the given protection.
///
/// Granules get every page faulted in here (for locked anonymous memory mlock(2) does it); heap arenas are
/// faulted lazily, page by page, as the allocator hands them out.
pub(crate) fn map_protected(
    protection: Protection,
    len: usize,
    purpose: Purpose,
    hint: Option<NonNull<u8>>,
) -> io::Result<NonNull<u8>> {
    let read_write = libc::PROT_READ | libc::PROT_WRITE;
    let addr = match protection {
        Protection::SecretMemory => {
            let file = secret_memory_file(len)?;
            // The mapping keeps the secret-memory file alive; the descriptor is closed on return so the pool
            // holds no descriptors at all. secretmem mappings are locked and excluded from core dumps by
            // the kernel itself (mlock(2) on them even fails), and only MAP_SHARED is allowed.
            map(len, read_write, libc::MAP_SHARED, file.0, hint)?
        }
        Protection::LockedAnonymous | Protection::Unprotected => {
            map(len, read_write, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, hint)?
        }
    };
    // SAFETY: addr..addr+len is the mapping just created and owned here.
    let advised = unsafe { finish_mapping(protection, addr, len, purpose) };
    if let Err(err) = advised {
        // SAFETY: the mapping was created above and nothing refers to it yet.
        unsafe { unmap(addr, len) };
        return Err(err);
    }
    Ok(addr)
}

/// Locks, advises and (for granules) populates a fresh mapping.
///
/// # Safety
/// `addr..addr+len` must be a fresh mapping owned by the caller.
unsafe fn finish_mapping(protection: Protection, addr: NonNull<u8>, len: usize, purpose: Purpose) -> io::Result<()> {
    match (protection, purpose) {
        (Protection::SecretMemory, Purpose::Granule) => {
            advise(addr, len, libc::MADV_DONTFORK)?;
            touch_pages(addr, len, page_size());
        }
        (Protection::SecretMemory, Purpose::HeapArena) => advise(addr, len, libc::MADV_DONTFORK)?,
        (Protection::LockedAnonymous, Purpose::Granule) => {
            advise(addr, len, libc::MADV_DONTDUMP)?;
            advise(addr, len, libc::MADV_WIPEONFORK)?;
            // mlock(2) faults in every page and keeps them out of swap.
            check(libc::mlock(addr.as_ptr().cast(), len))?;
        }
        (Protection::LockedAnonymous, Purpose::HeapArena) => {
            advise(addr, len, libc::MADV_DONTDUMP)?;
            advise(addr, len, libc::MADV_DONTFORK)?;
            // Lock pages as they are first touched, so a large arena costs nothing until used.
            check(libc::mlock2(addr.as_ptr().cast(), len, libc::MLOCK_ONFAULT))?;
        }
        (Protection::Unprotected, Purpose::Granule) => touch_pages(addr, len, page_size()),
        (Protection::Unprotected, Purpose::HeapArena) => {}
    }
    Ok(())
}

/// Reserves `len` bytes of address space with no access and no backing memory.
pub(crate) fn reserve_address_space(len: usize) -> io::Result<NonNull<u8>> {
    map(len, libc::PROT_NONE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE, -1, None)
}

/// Moves the mapping `from..from+len` (with its populated pages, locks and advice) to `to`, replacing
/// whatever is mapped at `to..to+len`. Page tables move with it: nothing is faulted again.
///
/// # Safety
/// Both ranges must be owned by the caller; `to..to+len` is replaced and `from..from+len` becomes unmapped.
pub(crate) unsafe fn move_mapping(from: NonNull<u8>, to: NonNull<u8>, len: usize) -> io::Result<()> {
    let moved = libc::mremap(
        from.as_ptr().cast(),
        len,
        len,
        libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
        to.as_ptr().cast::<libc::c_void>(),
    );
    if moved == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Checks that memfd_secret(2) works end to end here: create, size, map, fault one page, unmap.
pub(crate) fn probe_secret_memory() -> io::Result<()> {
    let page = page_size();
    let addr = map_protected(Protection::SecretMemory, page, Purpose::HeapArena, None)?;
    // SAFETY: addr..addr+page is the mapping just created; it is unmapped right after the touch.
    unsafe {
        touch_pages(addr, page, page);
        unmap(addr, page);
    }
    Ok(())
}
