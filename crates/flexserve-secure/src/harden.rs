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
//!   read, answers ENOSYS so the C library falls back to clone).

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

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

/// System calls the secure world needs after start-up, and nothing else.
fn allowed_syscalls() -> Vec<i64> {
    vec![
        // The channel (socket and shared buffer) and stderr.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_close,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_lseek,
        libc::SYS_poll,
        libc::SYS_ppoll,
        // Secure memory: granules, the heap, thread stacks.
        libc::SYS_memfd_secret,
        libc::SYS_memfd_create,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mlock,
        libc::SYS_mlock2,
        libc::SYS_munlock,
        libc::SYS_brk,
        // Worker threads and their synchronisation.
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_getrlimit,
        libc::SYS_prlimit64,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_tgkill,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_restart_syscall,
        libc::SYS_getrandom,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ]
}

fn compile(filter: SeccompFilter) -> Result<BpfProgram, String> {
    filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))
}

/// Installs the filter on every thread of the process. After this, opening a
/// file, executing a program, creating a socket or tracing a process fails
/// with EPERM.
pub fn install_seccomp() -> Result<(), String> {
    let arch = TargetArch::x86_64;
    let cond = |arg, op, val| SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, val).map_err(|e| e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = allowed_syscalls().into_iter().map(|s| (s, vec![])).collect();
    let thread = libc::CLONE_THREAD as u64;
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![cond(0, SeccompCmpOp::MaskedEq(thread), thread)?]).map_err(|e| e.to_string())?],
    );
    // Thread names, and the one-way no-new-privileges flag that installing the
    // second filter sets again; never turning dumpable again.
    let prctl_op = |op: i32| -> Result<SeccompRule, String> {
        SeccompRule::new(vec![cond(0, SeccompCmpOp::Eq, op as u64)?]).map_err(|e| e.to_string())
    };
    rules.insert(libc::SYS_prctl, vec![prctl_op(libc::PR_SET_NAME)?, prctl_op(libc::PR_SET_NO_NEW_PRIVS)?]);
    // Filters can only be added, never removed or loosened.
    rules.insert(libc::SYS_seccomp, vec![]);
    let allowlist = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, arch)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    // A second filter makes clone3 answer ENOSYS (filters run newest first and
    // an equally strict verdict of an older filter does not override it).
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    for program in [compile(allowlist)?, compile(clone3)?] {
        seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("installing seccomp filter: {e}"))?;
    }
    Ok(())
}

/// What the filter does to forbidden calls, tried from inside: (call, errno).
/// Used by `flexserve-secure --self-test-seccomp` and its test.
pub fn probe_forbidden_calls() -> Vec<(&'static str, i32)> {
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let mut out = Vec::new();
    // SAFETY: each call gets valid constant arguments; results are only inspected.
    unsafe {
        let path = c"/etc/hostname";
        let r = libc::open(path.as_ptr(), libc::O_RDONLY);
        out.push(("open", if r < 0 { errno() } else { 0 }));
        let r = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        out.push(("socket", if r < 0 { errno() } else { 0 }));
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null()];
        let r = libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr());
        out.push(("execve", if r < 0 { errno() } else { 0 }));
        let r = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
        out.push(("ptrace", if r < 0 { errno() } else { 0 }));
        let r = libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        out.push(("prctl(PR_SET_DUMPABLE)", if r < 0 { errno() } else { 0 }));
        let r = libc::syscall(libc::SYS_fork);
        if r == 0 {
            // The child of a fork the filter failed to stop.
            libc::_exit(0);
        }
        out.push(("fork", if r < 0 { errno() } else { 0 }));
    }
    out
}
