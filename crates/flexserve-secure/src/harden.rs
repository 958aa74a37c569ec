//! What the secure process does to itself before it holds a secret, and the
//! seccomp filter it runs under once its keys are loaded.
//!
//! - not dumpable: other processes of the same user cannot ptrace it or open
//!   its /proc/PID/mem, and /proc/PID/fd is root's;
//! - no core dumps (RLIMIT_CORE 0);
//! - inherited descriptors closed except the channel, the shared buffer and
//!   stderr (stdin and stdout point at /dev/null);
//! - a seccomp filter: no open, no exec, no sockets, no ptrace; threads only
//!   (clone must carry CLONE_THREAD; clone3, whose flags a filter cannot
//!   read, answers ENOSYS so the C library falls back to clone). The filter
//!   is a table per architecture in [`crate::seccomp`]; [`install_seccomp`]
//!   and [`probe_forbidden_calls`] are re-exported here.

use std::os::fd::RawFd;

pub use crate::seccomp::{install_seccomp, probe_forbidden_calls};

/// Makes the process non-dumpable and disables core dumps. First thing at start.
pub fn protect_process() -> Result<(), String> {
    // SAFETY: prctl with integer arguments only changes this process's flags.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_DUMPABLE): {}", std::io::Error::last_os_error()));
    }
    let zero = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_CORE, &zero) } != 0 {
        return Err(format!("setrlimit(RLIMIT_CORE): {}", std::io::Error::last_os_error()));
    }
    // Required before an unprivileged process may install a seccomp filter,
    // and keeps exec (were it allowed) from gaining privileges.
    // SAFETY: as above.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(format!("prctl(PR_SET_NO_NEW_PRIVS): {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Closes every descriptor above 2 except `keep`, and points stdin and
/// stdout at /dev/null (stderr stays for error messages, which never carry secrets).
pub fn close_inherited_fds(keep: &[RawFd]) -> Result<(), String> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    let mut from: u32 = 3;
    for &k in keep.iter().chain(std::iter::once(&RawFd::MAX)) {
        let k = k as u32;
        if k > from {
            // SAFETY: close_range only closes descriptors of this process; none
            // in the range is owned by live Rust objects at this point of start-up.
            if unsafe { libc::syscall(libc::SYS_close_range, from, k - 1, 0) } != 0 {
                return Err(format!("close_range: {}", std::io::Error::last_os_error()));
            }
        }
        from = k.saturating_add(1);
    }
    let null = std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(|e| e.to_string())?;
    for target in [0, 1] {
        // SAFETY: dup2 onto stdin/stdout; `null` stays open until after the calls.
        if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), target) } < 0 {
            return Err(format!("dup2: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Raises the soft descriptor limit to the hard one (each granule of secret
/// memory is a descriptor).
pub fn raise_fd_limit() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit/setrlimit read and write the struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
