//! The shared bulk-data buffer: a sealed memfd mapped by both worlds.
//!
//! The normal world creates it ([`SharedBuffer::create`]), hands a duplicate
//! of its descriptor to the secure process across `exec`
//! ([`SharedBuffer::inheritable_fd`]), writes sealed headers and chunks into
//! it and names them in requests by [`BufferRange`]. The secure world maps
//! the same memory ([`SharedBuffer::from_fd`]).
//!
//! # Hostile, racy contents
//!
//! For the secure world everything in this buffer is attacker-controlled and
//! may change at any moment, even while being read: the normal world keeps a
//! writable mapping. The secure side therefore
//!
//! - checks every [`BufferRange`] from a request against the buffer
//!   ([`SharedBuffer::check`]; all accessors do, overflow-safe), and
//! - copies bytes out into its own memory ([`SharedBuffer::copy_out`],
//!   [`SharedBuffer::copy_out_vec`]) **before** verifying or parsing them, and
//!   then works only on the copy. Verifying in place and using the data later
//!   would let the normal world swap it in between.
//!
//! The copies go through raw pointers (`ptr::copy_nonoverlapping`) so that no
//! Rust reference into the racy memory exists while another process may write
//! it. A concurrent write can still make a copy torn (a mix of old and new
//! bytes); every `u8` pattern is a valid value, and the AEAD verification that
//! follows rejects such a mix. This is the usual stance for memory shared with
//! an untrusted writer outside the program (as a kernel copying from user
//! memory); Rust has no atomic memcpy to express it more precisely yet.
//!
//! The slice accessors ([`SharedBuffer::range`], [`SharedBuffer::range_mut`],
//! [`SharedBuffer::as_mut_slice`]) are for the normal world, the only writer:
//! the secure world never writes this buffer, so the normal world's own view
//! is stable. The secure world must not use them.
//!
//! # Sealing
//!
//! The memfd is sealed against shrinking and growing before it is shared, and
//! [`SharedBuffer::from_fd`] insists on the shrink seal: otherwise the normal
//! world could truncate the file under the secure world's mapping and make its
//! next access fault (`SIGBUS`).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use crate::BufferRange;

/// Largest buffer either side accepts (1 TiB): anything bigger is nonsense.
const MAX_BUFFER_LEN: u64 = 1 << 40;

const MEMFD_NAME: &CStr = c"flexserve-shared";

/// A range that does not lie inside the shared buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("shared buffer range at offset {offset} of {len} bytes does not fit in the buffer's {buffer_len} bytes")]
pub struct RangeError {
    pub offset: u64,
    pub len: u64,
    pub buffer_len: usize,
}

impl BufferRange {
    /// One past the last byte, or `None` if `offset + len` overflows.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }
}

/// A fixed-size memfd mapped shared and read/write (see the module docs for
/// the rules on reading it in the secure world).
pub struct SharedBuffer {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and lives until drop; the raw
// pointer is only used by methods whose receivers (`&self` for reads, `&mut
// self` for writes) rule out data races between threads of this process.
unsafe impl Send for SharedBuffer {}
// SAFETY: as above; `&self` methods only read.
unsafe impl Sync for SharedBuffer {}

impl std::fmt::Debug for SharedBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedBuffer").field("fd", &self.fd.as_raw_fd()).field("len", &self.len).finish()
    }
}

fn invalid_input(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, message)
}

fn check_len(len: u64) -> io::Result<usize> {
    if len == 0 || len > MAX_BUFFER_LEN {
        return Err(invalid_input(format!("shared buffer size {len} is not in 1 ..= {MAX_BUFFER_LEN} bytes")));
    }
    usize::try_from(len).map_err(|_| invalid_input(format!("shared buffer size {len} does not fit in memory")))
}

/// The result of a libc call that returns -1 and sets errno on failure.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl SharedBuffer {
    /// Normal world: creates a zero-filled, sealed (fixed size) memfd of `len`
    /// bytes and maps it.
    pub fn create(len: usize) -> io::Result<Self> {
        let len_checked = check_len(len as u64)?;
        // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
        let raw = cvt(unsafe { libc::memfd_create(MEMFD_NAME.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) })?;
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size = libc::off_t::try_from(len_checked)
            .map_err(|_| invalid_input(format!("shared buffer size {len} does not fit in off_t")))?;
        // SAFETY: plain syscall on a descriptor we own.
        cvt(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })?;
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        // SAFETY: plain syscall on a descriptor we own.
        cvt(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) })?;
        Self::map(fd, len_checked)
    }

    /// Secure world: maps a buffer received as a descriptor. Its size comes
    /// from `fstat`; it must be a regular file of 1 byte to 1 TiB sealed
    /// against shrinking (as [`SharedBuffer::create`] makes it).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Self> {
        // SAFETY: an all-zero `stat` is a valid value of this plain C struct.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: the descriptor is open and `stat` is a valid out-pointer.
        cvt(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) })?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(invalid_input("shared buffer descriptor is not a regular file (memfd)".to_owned()));
        }
        let size = u64::try_from(stat.st_size)
            .map_err(|_| invalid_input(format!("shared buffer has a negative size {}", stat.st_size)))?;
        let len = check_len(size)?;
        // SAFETY: plain syscall on a descriptor we own.
        let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
        if seals == -1 {
            let err = io::Error::last_os_error();
            return Err(io::Error::new(err.kind(), format!("shared buffer descriptor is not a sealable memfd: {err}")));
        }
        if seals & libc::F_SEAL_SHRINK == 0 {
            return Err(invalid_input("shared buffer memfd is not sealed against shrinking".to_owned()));
        }
        Self::map(fd, len)
    }

    fn map(fd: OwnedFd, len: usize) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of `len` bytes of a file at least that
        // long (sealed against shrinking); it aliases no Rust object.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(SharedBuffer { fd, ptr, len })
    }

    /// The buffer's descriptor (close-on-exec; see [`Self::inheritable_fd`]).
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// A duplicate of the descriptor without close-on-exec, for a child
    /// process to inherit. Drop it in the parent once the child is started.
    pub fn inheritable_fd(&self) -> io::Result<OwnedFd> {
        // SAFETY: F_DUPFD (unlike F_DUPFD_CLOEXEC) returns a new descriptor
        // without FD_CLOEXEC, which we then own.
        let raw = cvt(unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_DUPFD, 0) })?;
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(raw) })
    }

    /// Size in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Checks that `range` lies inside the buffer and returns it as indices.
    pub fn check(&self, range: BufferRange) -> Result<std::ops::Range<usize>, RangeError> {
        let error = RangeError { offset: range.offset, len: range.len, buffer_len: self.len };
        match range.end() {
            Some(end) if end <= self.len as u64 => Ok(range.offset as usize..end as usize),
            _ => Err(error),
        }
    }

    fn check_at(&self, offset: u64, len: usize) -> Result<std::ops::Range<usize>, RangeError> {
        self.check(BufferRange { offset, len: len as u64 })
    }

    /// Copies `dst.len()` bytes starting at `offset` out of the buffer. The
    /// secure world's way to read: see the module docs.
    pub fn copy_out(&self, offset: u64, dst: &mut [u8]) -> Result<(), RangeError> {
        let at = self.check_at(offset, dst.len())?;
        // SAFETY: `at` lies inside the mapping (checked); `dst` is a distinct
        // Rust allocation, so they do not overlap. No reference into the
        // mapping is created (see the module docs on concurrent writers).
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at.start), dst.as_mut_ptr(), at.len()) };
        Ok(())
    }

    /// Checks `range`, then copies it out into a new vector (allocated only
    /// after the check, so a hostile length cannot cause a huge allocation).
    pub fn copy_out_vec(&self, range: BufferRange) -> Result<Vec<u8>, RangeError> {
        let at = self.check(range)?;
        let mut out = vec![0u8; at.len()];
        self.copy_out(range.offset, &mut out)?;
        Ok(out)
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn copy_in(&mut self, offset: u64, src: &[u8]) -> Result<(), RangeError> {
        let at = self.check_at(offset, src.len())?;
        // SAFETY: `at` lies inside the mapping (checked); `src` is a distinct
        // Rust allocation, so they do not overlap; `&mut self` excludes other
        // accesses through this value.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(at.start), at.len()) };
        Ok(())
    }

    /// Normal world only: the bytes of `range` as a slice (see the module docs).
    pub fn range(&self, range: BufferRange) -> Result<&[u8], RangeError> {
        let at = self.check(range)?;
        // SAFETY: `at` lies inside the mapping, which lives as long as `self`;
        // the secure world never writes the buffer, and writers in this process
        // need `&mut self`.
        Ok(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(at.start), at.len()) })
    }

    /// Normal world only: the bytes of `range` as a mutable slice, e.g. to read
    /// file data straight into the buffer.
    pub fn range_mut(&mut self, range: BufferRange) -> Result<&mut [u8], RangeError> {
        let at = self.check(range)?;
        // SAFETY: as in `range`; `&mut self` makes this the only reference.
        Ok(unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(at.start), at.len()) })
    }

    /// Normal world only: the whole buffer as a mutable slice.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the mapping is `len` bytes and lives as long as `self`;
        // `&mut self` makes this the only reference in this process.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsFd for SharedBuffer {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` describe the mapping made in `map`, and no
        // reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_checks_are_overflow_safe() {
        let buf = SharedBuffer::create(100).unwrap();
        assert_eq!(buf.check(BufferRange { offset: 0, len: 100 }), Ok(0..100));
        assert_eq!(buf.check(BufferRange { offset: 100, len: 0 }), Ok(100..100));
        assert!(buf.check(BufferRange { offset: 101, len: 0 }).is_err());
        assert!(buf.check(BufferRange { offset: 1, len: 100 }).is_err());
        let err = buf.check(BufferRange { offset: u64::MAX, len: 2 }).unwrap_err();
        assert_eq!(err, RangeError { offset: u64::MAX, len: 2, buffer_len: 100 });
        assert!(buf.check(BufferRange { offset: 2, len: u64::MAX }).is_err());
    }
}
