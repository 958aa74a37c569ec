//! The shared buffer: creation, copies, a second mapping through a duplicated
//! descriptor, and rejection of bad ranges and bad descriptors.

use std::io::{Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use flexserve_protocol::{BufferRange, RangeError, SharedBuffer};

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

fn fd_flags(fd: i32) -> i32 {
    // SAFETY: F_GETFD on an open descriptor only reads its flags.
    unsafe { libc::fcntl(fd, libc::F_GETFD) }
}

#[test]
fn create_copy_in_and_out() {
    let mut buf = SharedBuffer::create(1 << 20).unwrap();
    assert_eq!(buf.len(), 1 << 20);
    assert!(!buf.is_empty());
    let mut zeros = vec![1u8; 4096];
    buf.copy_out(0, &mut zeros).unwrap();
    assert!(zeros.iter().all(|&b| b == 0), "a new buffer is zero-filled");

    let data = pattern(10_000);
    buf.copy_in(12_345, &data).unwrap();
    let mut back = vec![0u8; data.len()];
    buf.copy_out(12_345, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(buf.copy_out_vec(BufferRange { offset: 12_345, len: 10_000 }).unwrap(), data);
    assert_eq!(buf.range(BufferRange { offset: 12_345, len: 10_000 }).unwrap(), &data[..]);

    buf.range_mut(BufferRange { offset: 0, len: 3 }).unwrap().copy_from_slice(b"abc");
    assert_eq!(&buf.as_mut_slice()[..3], b"abc");
    // Empty copies at the very end are fine.
    buf.copy_in((1 << 20) as u64, &[]).unwrap();
    buf.copy_out((1 << 20) as u64, &mut []).unwrap();
}

#[test]
fn out_of_range_accesses_are_rejected() {
    let mut buf = SharedBuffer::create(4096).unwrap();
    let err = buf.copy_in(4000, &[0; 97]).unwrap_err();
    assert_eq!(err, RangeError { offset: 4000, len: 97, buffer_len: 4096 });
    assert_eq!(
        err.to_string(),
        "shared buffer range at offset 4000 of 97 bytes does not fit in the buffer's 4096 bytes"
    );
    assert!(buf.copy_out(4097, &mut []).is_err());
    assert!(buf.copy_out(u64::MAX, &mut [0; 1]).is_err());
    assert!(buf.copy_out_vec(BufferRange { offset: 1, len: u64::MAX }).is_err());
    assert!(buf.copy_out_vec(BufferRange { offset: 0, len: 1 << 50 }).is_err());
    assert!(buf.range(BufferRange { offset: u64::MAX, len: u64::MAX }).is_err());
    assert!(buf.range_mut(BufferRange { offset: 4096, len: 1 }).is_err());
    // Nothing was written by the failed copy.
    let mut tail = [1u8; 96];
    buf.copy_out(4000, &mut tail).unwrap();
    assert!(tail.iter().all(|&b| b == 0));
}

#[test]
fn a_duplicated_descriptor_maps_the_same_memory() {
    let mut normal = SharedBuffer::create(64 * 1024).unwrap();
    assert_ne!(fd_flags(normal.fd()) & libc::FD_CLOEXEC, 0, "the buffer's own descriptor is close-on-exec");
    let inheritable = normal.inheritable_fd().unwrap();
    assert_ne!(inheritable.as_raw_fd(), normal.fd());
    assert_eq!(fd_flags(inheritable.as_raw_fd()) & libc::FD_CLOEXEC, 0, "the duplicate survives exec");

    let secure = SharedBuffer::from_fd(inheritable).unwrap();
    assert_eq!(secure.len(), normal.len());
    let data = pattern(5000);
    normal.copy_in(100, &data).unwrap();
    assert_eq!(secure.copy_out_vec(BufferRange { offset: 100, len: 5000 }).unwrap(), data);
    // Both mappings are live: writes after the second mapping was made are seen too.
    normal.as_mut_slice()[0] = 0xab;
    let mut first = [0u8; 1];
    secure.copy_out(0, &mut first).unwrap();
    assert_eq!(first, [0xab]);
    drop(normal);
    // The secure side's mapping outlives the normal side's value.
    assert_eq!(secure.copy_out_vec(BufferRange { offset: 100, len: 5000 }).unwrap(), data);
}

#[test]
fn the_size_is_sealed() {
    let buf = SharedBuffer::create(8192).unwrap();
    // SAFETY: ftruncate on an open descriptor; it must fail because of the seals.
    let shrink = unsafe { libc::ftruncate(buf.fd(), 10) };
    assert_eq!(shrink, -1);
    // SAFETY: as above.
    let grow = unsafe { libc::ftruncate(buf.fd(), 1 << 20) };
    assert_eq!(grow, -1);
}

#[test]
fn bad_sizes_and_descriptors_are_rejected() {
    assert!(SharedBuffer::create(0).is_err());
    assert!(SharedBuffer::create((1usize << 40) + 1).is_err());

    // A regular file that cannot be sealed.
    let mut file = tempfile_in_tmp();
    file.write_all(&[0; 4096]).unwrap();
    file.seek(SeekFrom::Start(0)).unwrap();
    let err = SharedBuffer::from_fd(OwnedFd::from(file)).unwrap_err();
    // (EINVAL from F_GET_SEALS on most file systems; tmpfs files report only F_SEAL_SEAL.)
    let message = err.to_string();
    assert!(message.contains("not a sealable memfd") || message.contains("not sealed against shrinking"), "{message}");

    // A memfd that is not sealed against shrinking.
    let unsealed = raw_memfd(4096, 0);
    let err = SharedBuffer::from_fd(unsealed).unwrap_err();
    assert!(err.to_string().contains("not sealed against shrinking"), "{err}");

    // An empty (sealed) memfd.
    let empty = raw_memfd(0, libc::F_SEAL_SHRINK);
    let err = SharedBuffer::from_fd(empty).unwrap_err();
    assert!(err.to_string().contains("size 0"), "{err}");

    // Not a regular file at all.
    let mut fds = [0; 2];
    // SAFETY: pipe writes two fresh descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both descriptors are fresh and owned by nothing else.
    let (read_end, _write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let err = SharedBuffer::from_fd(read_end).unwrap_err();
    assert!(err.to_string().contains("not a regular file"), "{err}");
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!("flexserve-protocol-test-{}", std::process::id()));
    let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file
}

fn raw_memfd(len: i64, seals: i32) -> OwnedFd {
    // SAFETY: valid NUL-terminated name and flags.
    let raw = unsafe { libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    assert!(raw >= 0);
    // SAFETY: a fresh descriptor owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain syscalls on a descriptor we own.
    unsafe {
        assert_eq!(libc::ftruncate(fd.as_raw_fd(), len), 0);
        if seals != 0 {
            assert_eq!(libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals), 0);
        }
    }
    fd
}
