//! The seccomp filter the secure world runs under once its keys are loaded,
//! kept as data.
//!
//! As Firecracker keeps its filters, the policy is a table per target
//! architecture: each entry is one system call, an optional rule on its
//! arguments, and the reason the secure world needs it. The table is the only
//! list: [`install_seccomp`] compiles it with seccompiler, and a call that is
//! not in it, or whose arguments break its rule, fails with EPERM. The one
//! exception is `clone3`, which answers ENOSYS so that the C library falls
//! back to `clone`: clone3 passes its flags in memory, which a filter cannot
//! read, while clone's flags are an argument the table can check.
//!
//! The table for this target is [`COMMON`] followed by [`ARCH`], the
//! architecture's own entries: x86-64 has `poll`, which its C library's poll
//! uses; aarch64 has no `open`, `poll`, `fork` or `stat` at all (its C library
//! uses `openat`, `ppoll`, `clone` and `newfstatat`).
//!
//! What stays denied, among others: `open`, `openat` (no file is opened after
//! start-up), `socket`, `connect`, `bind`, `listen`, `execve`, `execveat`,
//! `ptrace`, `fork`, `vfork`, `clone` without `CLONE_THREAD`,
//! `process_vm_readv`/`writev`, `memfd_create`, `pkey_mprotect`, `tkill`,
//! executable memory, signals to and limits of other processes.
//! [`probe_forbidden_calls`] tries them from inside the filter
//! (`flexserve-secure --self-test-seccomp`).
//!
//! Left out of the earlier, plain list because nothing in the secure world
//! makes them once the filter is in force: `memfd_create` (the granule pool
//! uses `memfd_secret`, and where the kernel lacks it anonymous memory, never
//! `memfd_create`; the shared buffer's memfd is made by the normal world),
//! `lseek`, `fallocate`, `munlock`, `getrlimit` (glibc's getrlimit is
//! `prlimit64`) and `pkey_mprotect`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the secure world's seccomp table is written for x86_64 and aarch64 only");

/// The architecture the filter is compiled for (checked by the filter itself:
/// a call made with another architecture's calling convention is killed).
#[cfg(target_arch = "x86_64")]
const TARGET: TargetArch = TargetArch::x86_64;
#[cfg(target_arch = "aarch64")]
const TARGET: TargetArch = TargetArch::aarch64;

/// How much of an argument a condition compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Width {
    /// The low 32 bits: arguments the kernel takes as `int` (`pid_t`, flags).
    Int,
    /// All 64 bits: arguments the kernel takes as `unsigned long`.
    Long,
}

/// What a condition requires of an argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Check {
    /// `arg == value`.
    Eq(u64),
    /// `arg & mask == value`.
    MaskedEq { mask: u64, value: u64 },
    /// `arg` is this process's own pid, read with getpid() when the filter is built.
    OwnPid,
}

/// One condition on one argument (0 to 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cond {
    pub arg: u8,
    pub width: Width,
    pub check: Check,
}

/// An argument rule: alternatives, each a list of conditions that must all
/// hold; the call is allowed when one alternative holds.
pub type Rule = &'static [&'static [Cond]];

/// One allowed system call.
#[derive(Clone, Copy, Debug)]
pub struct Allowed {
    /// The libc constant's name (`SYS_read`); see [`Allowed::name`].
    pub constant: &'static str,
    /// The system call number on this architecture.
    pub nr: libc::c_long,
    /// `None`: any arguments.
    pub rule: Option<Rule>,
    /// Why the secure world needs it.
    pub reason: &'static str,
}

impl Allowed {
    /// The call's name (`read`).
    pub fn name(&self) -> &'static str {
        self.constant.strip_prefix("SYS_").unwrap_or(self.constant)
    }
}

/// `arg == value` for an `int` argument.
const fn is(arg: u8, value: libc::c_int) -> Cond {
    Cond { arg, width: Width::Int, check: Check::Eq(value as u64) }
}

/// The bits of `bits` are all set in an `int` argument.
const fn has(arg: u8, bits: libc::c_int) -> Cond {
    Cond { arg, width: Width::Int, check: Check::MaskedEq { mask: bits as u64, value: bits as u64 } }
}

/// The bits of `bits` are all set in an `unsigned long` argument.
const fn has_long(arg: u8, bits: libc::c_int) -> Cond {
    Cond { arg, width: Width::Long, check: Check::MaskedEq { mask: bits as u64, value: bits as u64 } }
}

/// None of the bits of `bits` is set in an `unsigned long` argument.
const fn lacks_long(arg: u8, bits: libc::c_int) -> Cond {
    Cond { arg, width: Width::Long, check: Check::MaskedEq { mask: bits as u64, value: 0 } }
}

/// A `pid_t` argument names this process.
const fn own_pid(arg: u8) -> Cond {
    Cond { arg, width: Width::Int, check: Check::OwnPid }
}

/// `allow!(SYS_x, "reason")`: any arguments;
/// `allow!(SYS_x if [cond, ...] or [cond, ...], "reason")`: when one bracket's conditions all hold.
macro_rules! allow {
    ($nr:ident, $reason:literal) => {
        Allowed { constant: stringify!($nr), nr: libc::$nr, rule: None, reason: $reason }
    };
    ($nr:ident if $([$($cond:expr),+ $(,)?])or+, $reason:literal) => {
        Allowed {
            constant: stringify!($nr),
            nr: libc::$nr,
            rule: Some({
                const RULE: Rule = &[$(&[$($cond),+]),+];
                RULE
            }),
            reason: $reason,
        }
    };
}

/// The calls every architecture allows.
pub const COMMON: &[Allowed] = &[
    // The channel (a Unix stream socket) and stderr.
    allow!(SYS_recvfrom, "requests from the channel socket: recv(2), also what std's Read for UnixStream uses"),
    allow!(SYS_sendto, "replies on the channel socket: std's Write for UnixStream is send(2, MSG_NOSIGNAL)"),
    allow!(SYS_read, "read(2) of a descriptor already held (the channel); opens nothing"),
    allow!(SYS_write, "error messages to stderr; write(2) of a descriptor already held"),
    allow!(SYS_readv, "vectored reads of a descriptor already held (std's read_vectored)"),
    allow!(SYS_writev, "vectored writes of a descriptor already held (std's write_vectored, BufWriter)"),
    allow!(SYS_close, "closes descriptors: each memfd_secret file once mapped, cloned channel ends"),
    // Service mode: connections on a listening Unix socket created before the
    // filter, the peer's credentials checked, a shared buffer received.
    allow!(SYS_accept4, "service mode: accepts a connection on the listening socket made before the filter"),
    allow!(
        SYS_getsockopt if [is(1, libc::SOL_SOCKET), is(2, libc::SO_PEERCRED)]
            or [is(1, libc::SOL_SOCKET), is(2, libc::SO_PEERGROUPS)],
        "service mode: the peer's pid/uid/gid (SO_PEERCRED) and groups (SO_PEERGROUPS) for admission; \
         no other socket option"
    ),
    allow!(SYS_recvmsg, "service mode: receives the shared-buffer memfd over SCM_RIGHTS"),
    allow!(SYS_shutdown, "service mode: ends a connection cleanly"),
    allow!(
        SYS_fcntl if [is(1, libc::F_GET_SEALS)] or [is(1, libc::F_DUPFD_CLOEXEC)],
        "SharedBuffer::from_fd checks a received memfd's seals (F_GET_SEALS); SocketChannel::new clones \
         the stream (UnixStream::try_clone = F_DUPFD_CLOEXEC); no other command"
    ),
    // Metadata of descriptors.
    allow!(SYS_fstat, "metadata of a descriptor (a received shared buffer's size and type)"),
    allow!(
        SYS_newfstatat if [has(3, libc::AT_EMPTY_PATH)],
        "fstat of a descriptor: glibc's fstat is newfstatat(fd, \"\", AT_EMPTY_PATH). Only with \
         AT_EMPTY_PATH, but seccomp cannot read the path string itself: a non-empty path with that flag is \
         still looked up, so at worst a path's metadata (never its contents) can be read"
    ),
    allow!(
        SYS_statx if [has(2, libc::AT_EMPTY_PATH)],
        "std's File::metadata: statx(fd, \"\", AT_EMPTY_PATH). Only with AT_EMPTY_PATH, but seccomp cannot \
         read the path string itself: a non-empty path with that flag is still looked up, so at worst a \
         path's metadata (never its contents) can be read"
    ),
    // Secure memory: granules, heap arenas, the shared buffer, thread stacks.
    allow!(SYS_memfd_secret, "one secret-memory file per granule and per heap arena (Flex-Mem)"),
    allow!(SYS_ftruncate, "sizes each new memfd_secret file"),
    allow!(
        SYS_mmap if [lacks_long(2, libc::PROT_EXEC)],
        "maps granules, heap arenas, the shared buffer, thread stacks; never executable memory"
    ),
    allow!(SYS_munmap, "releases granules and heap arenas; thread stacks"),
    allow!(SYS_mremap, "assembles a region from scattered granules (MREMAP_FIXED)"),
    allow!(
        SYS_mprotect if [lacks_long(2, libc::PROT_EXEC)],
        "guard pages of thread and signal stacks (PROT_NONE), glibc's malloc arenas; never executable"
    ),
    allow!(SYS_madvise, "MADV_DONTFORK/DONTDUMP/WIPEONFORK on secure memory; glibc frees thread stacks"),
    allow!(SYS_mlock, "locks granules in the locked-anonymous fallback"),
    allow!(SYS_mlock2, "locks heap arenas on fault (MLOCK_ONFAULT) in the locked-anonymous fallback"),
    allow!(SYS_brk, "glibc's own internal allocations (the Rust heap is SecureHeap, not malloc)"),
    // Worker threads and their synchronisation.
    allow!(
        SYS_clone if [has_long(0, libc::CLONE_THREAD)],
        "worker threads (rayon, granule preparation); CLONE_THREAD required, so never a new process"
    ),
    allow!(SYS_futex, "mutexes, condition variables, thread joins"),
    allow!(SYS_sched_yield, "spinning workers back off (rayon/crossbeam)"),
    allow!(SYS_sched_getaffinity, "std's available_parallelism (granule preparation threads)"),
    allow!(SYS_set_robust_list, "glibc registers each new thread's robust futex list"),
    allow!(SYS_rseq, "glibc registers each new thread's restartable sequences area"),
    allow!(SYS_rt_sigprocmask, "glibc blocks signals around thread creation and exit"),
    allow!(SYS_rt_sigaction, "signal handlers: Rust's stack-overflow handler, glibc's abort"),
    allow!(SYS_rt_sigreturn, "return from a signal handler"),
    allow!(SYS_sigaltstack, "each Rust thread's alternate signal stack (stack-overflow reports)"),
    allow!(
        SYS_prlimit64 if [is(0, 0)] or [own_pid(0)],
        "glibc's getrlimit/setrlimit (RLIMIT_STACK for the main thread's stack bounds); only this \
         process: pid 0 or its own pid"
    ),
    allow!(SYS_gettid, "the calling thread's id (std and glibc: thread ids, raise/abort)"),
    allow!(SYS_getpid, "glibc's raise/abort and pthread_kill name this process"),
    allow!(
        SYS_tgkill if [own_pid(0)],
        "raise/abort and pthread_kill signal a thread of this process; the thread group must be its own pid"
    ),
    allow!(SYS_clock_gettime, "timings (Instant::now) when the vDSO falls back to the system call"),
    allow!(SYS_clock_nanosleep, "thread::sleep (glibc's nanosleep)"),
    allow!(SYS_nanosleep, "thread::sleep with C libraries that use the old call"),
    allow!(SYS_restart_syscall, "the kernel resumes a sleep or wait interrupted by a signal"),
    allow!(SYS_getrandom, "HashMap seeds and sampling seeds"),
    allow!(SYS_exit, "a worker thread ends"),
    allow!(SYS_exit_group, "the process ends"),
    // The filter itself.
    allow!(
        SYS_prctl if [is(0, libc::PR_SET_NAME)] or [is(0, libc::PR_SET_NO_NEW_PRIVS)],
        "thread names (PR_SET_NAME) and the one-way no-new-privileges flag seccompiler sets again before \
         the clone3 filter; never PR_SET_DUMPABLE"
    ),
    allow!(
        SYS_seccomp if [is(0, libc::SECCOMP_SET_MODE_FILTER as libc::c_int)],
        "installs the second (clone3) filter; filters can only be added, never removed or loosened"
    ),
];

/// The x86-64 table's own entries.
#[cfg(target_arch = "x86_64")]
pub const ARCH: &[Allowed] = &[allow!(
    SYS_poll,
    "waits with a timeout for a descriptor to be readable (service mode: a connection, a \
     peer's handshake); glibc's poll on x86-64"
)];

/// The aarch64 table's own entries (aarch64 has no `poll`).
#[cfg(target_arch = "aarch64")]
pub const ARCH: &[Allowed] = &[allow!(
    SYS_ppoll,
    "waits with a timeout for a descriptor to be readable (service mode: a connection, a \
     peer's handshake); glibc's poll on aarch64"
)];

/// This target's table: [`COMMON`] then [`ARCH`].
pub fn table() -> impl Iterator<Item = &'static Allowed> {
    COMMON.iter().chain(ARCH)
}

fn condition(cond: &Cond, pid: u32) -> Result<SeccompCondition, String> {
    let len = match cond.width {
        Width::Int => SeccompCmpArgLen::Dword,
        Width::Long => SeccompCmpArgLen::Qword,
    };
    let (op, value) = match cond.check {
        Check::Eq(value) => (SeccompCmpOp::Eq, value),
        Check::MaskedEq { mask, value } => (SeccompCmpOp::MaskedEq(mask), value),
        Check::OwnPid => (SeccompCmpOp::Eq, u64::from(pid)),
    };
    SeccompCondition::new(cond.arg, len, op, value).map_err(|e| format!("seccomp condition {cond:?}: {e}"))
}

/// The two BPF programs, in the order they are installed: the table (EPERM
/// for everything else), then the one that makes clone3 answer ENOSYS.
/// `pid` is the process's own pid, for [`Check::OwnPid`].
pub fn compile(pid: u32) -> Result<[BpfProgram; 2], String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for entry in table() {
        let mut alternatives = Vec::new();
        for conds in entry.rule.unwrap_or(&[]) {
            let conds = conds.iter().map(|c| condition(c, pid)).collect::<Result<Vec<_>, _>>()?;
            alternatives.push(SeccompRule::new(conds).map_err(|e| format!("seccomp rule of {}: {e}", entry.name()))?);
        }
        if rules.insert(entry.nr, alternatives).is_some() {
            return Err(format!("seccomp table: {} appears twice", entry.name()));
        }
    }
    let bpf = |filter: SeccompFilter| -> Result<BpfProgram, String> {
        filter.try_into().map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))
    };
    let allowlist = SeccompFilter::new(rules, SeccompAction::Errno(libc::EPERM as u32), SeccompAction::Allow, TARGET)
        .map_err(|e| format!("seccomp filter: {e}"))?;
    // Filters run newest first, and an equally strict verdict of an older
    // filter does not override a newer one's: clone3 gets ENOSYS, not EPERM.
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TARGET,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    Ok([bpf(allowlist)?, bpf(clone3)?])
}

/// Installs the filter on every thread of the process. From then on every
/// call the table does not allow fails with EPERM (clone3 with ENOSYS).
pub fn install_seccomp() -> Result<(), String> {
    // Built completely (this allocates) before the first filter is in force.
    let programs = compile(std::process::id())?;
    for program in &programs {
        seccompiler::apply_filter_all_threads(program).map_err(|e| format!("installing seccomp filter: {e}"))?;
    }
    Ok(())
}

/// The errno of a call that returned `ret` (0 when it succeeded). Read right
/// after the call, before anything else can change errno.
fn outcome(ret: libc::c_long) -> i32 {
    if ret < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

/// A raw system call with six arguments (the kernel ignores those a call does not take).
///
/// # Safety
/// The arguments must be valid for the call `nr`: pointers point at memory of
/// the right size, and a call that succeeds must leave the process sound.
unsafe fn call(nr: libc::c_long, a: [libc::c_long; 6]) -> libc::c_long {
    libc::syscall(nr, a[0], a[1], a[2], a[3], a[4], a[5])
}

/// What the filter does to forbidden calls, tried from inside: (call, errno),
/// errno 0 meaning the call was allowed. Each probe is built so that, were
/// the filter to let it through, the kernel would answer something other than
/// EPERM (success, EBADF, ESRCH, EINVAL...), and so that a probe that does
/// get through does no harm (descriptors are closed, mappings unmapped, a
/// forked child exits at once). Used by `flexserve-secure --self-test-seccomp`
/// and its test.
pub fn probe_forbidden_calls() -> Vec<(&'static str, i32)> {
    let mut out = Vec::with_capacity(32);
    let path = c"/etc/hostname";
    let path_arg = path.as_ptr() as libc::c_long;
    let at_cwd = libc::AT_FDCWD as libc::c_long;
    // A buffer large enough for a `struct stat` or a `struct statx`.
    let mut stat_buf = [0u64; 64];
    let stat_arg = stat_buf.as_mut_ptr() as libc::c_long;
    let pid = libc::c_long::from(std::process::id() as libc::pid_t);
    let page = 4096usize;

    // SAFETY (for every call below): each gets valid arguments (constant
    // strings, buffers owned here and large enough, descriptor -1 where one is
    // not needed); whatever a call that succeeds returns is released right away
    // (descriptors closed, pages unmapped, a child process exits), and results
    // are only inspected.
    unsafe {
        let tid = call(libc::SYS_gettid, [0; 6]);
        let close_if_fd = |r: libc::c_long| {
            if r >= 0 {
                libc::close(r as libc::c_int);
            }
        };

        // Files.
        #[cfg(target_arch = "x86_64")]
        {
            let r = call(libc::SYS_open, [path_arg, libc::O_RDONLY as libc::c_long, 0, 0, 0, 0]);
            out.push(("open", outcome(r)));
            close_if_fd(r);
        }
        let r = call(libc::SYS_openat, [at_cwd, path_arg, libc::O_RDONLY as libc::c_long, 0, 0, 0]);
        out.push(("openat", outcome(r)));
        close_if_fd(r);
        let r = call(libc::SYS_statx, [at_cwd, path_arg, 0, libc::STATX_BASIC_STATS as libc::c_long, stat_arg, 0]);
        out.push(("statx(path)", outcome(r)));
        let r = call(libc::SYS_newfstatat, [at_cwd, path_arg, stat_arg, 0, 0, 0]);
        out.push(("newfstatat(path)", outcome(r)));
        let r = call(
            libc::SYS_memfd_create,
            [c"probe".as_ptr() as libc::c_long, libc::MFD_CLOEXEC as libc::c_long, 0, 0, 0, 0],
        );
        out.push(("memfd_create", outcome(r)));
        close_if_fd(r);

        // Sockets: none may be made, and none of a made one's calls works
        // (descriptor -1: a call the filter let through would say EBADF).
        let r = call(libc::SYS_socket, [libc::AF_INET as libc::c_long, libc::SOCK_STREAM as libc::c_long, 0, 0, 0, 0]);
        out.push(("socket", outcome(r)));
        close_if_fd(r);
        let r = call(libc::SYS_connect, [-1, 0, 0, 0, 0, 0]);
        out.push(("connect", outcome(r)));
        let r = call(libc::SYS_bind, [-1, 0, 0, 0, 0, 0]);
        out.push(("bind", outcome(r)));
        let r = call(libc::SYS_listen, [-1, 0, 0, 0, 0, 0]);
        out.push(("listen", outcome(r)));

        // Programs and processes.
        let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
        let envp: [*const libc::c_char; 1] = [std::ptr::null()];
        let r = libc::execve(c"/bin/true".as_ptr(), argv.as_ptr(), envp.as_ptr());
        out.push(("execve", outcome(r as libc::c_long)));
        // Descriptor -1 and an empty path: EBADF were it let through.
        let r = call(
            libc::SYS_execveat,
            [
                -1,
                c"".as_ptr() as libc::c_long,
                argv.as_ptr() as libc::c_long,
                envp.as_ptr() as libc::c_long,
                libc::AT_EMPTY_PATH as libc::c_long,
                0,
            ],
        );
        out.push(("execveat", outcome(r)));
        let r = libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
        out.push(("ptrace", outcome(r)));
        let r = libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
        out.push(("prctl(PR_SET_DUMPABLE)", outcome(r as libc::c_long)));
        #[cfg(target_arch = "x86_64")]
        {
            let r = call(libc::SYS_fork, [0; 6]);
            if r == 0 {
                // The child of a fork the filter failed to stop.
                libc::_exit(0);
            }
            out.push(("fork", outcome(r)));
        }
        // fork as aarch64 (and glibc's fork everywhere) makes it: clone without CLONE_THREAD.
        let r = call(libc::SYS_clone, [libc::SIGCHLD as libc::c_long, 0, 0, 0, 0, 0]);
        if r == 0 {
            libc::_exit(0);
        }
        out.push(("clone(fork)", outcome(r)));
        // No arguments: EINVAL were it let through.
        let r = call(libc::SYS_clone3, [0; 6]);
        out.push(("clone3", outcome(r)));
        // Reading and writing this very process's memory: a success were it let through.
        let mut word = [0u8; 8];
        let iov = libc::iovec { iov_base: word.as_mut_ptr().cast(), iov_len: word.len() };
        let iov_arg = &iov as *const libc::iovec as libc::c_long;
        let r = call(libc::SYS_process_vm_readv, [pid, iov_arg, 1, iov_arg, 1, 0]);
        out.push(("process_vm_readv", outcome(r)));
        let r = call(libc::SYS_process_vm_writev, [pid, iov_arg, 1, iov_arg, 1, 0]);
        out.push(("process_vm_writev", outcome(r)));

        // Signals and limits of other processes. tgkill names thread group 1
        // with this thread's id: ESRCH were it let through, whoever runs it.
        let r = call(libc::SYS_tgkill, [1, tid, 0, 0, 0, 0]);
        out.push(("tgkill(pid 1)", outcome(r)));
        let r = call(libc::SYS_tkill, [tid, 0, 0, 0, 0, 0]);
        out.push(("tkill", outcome(r)));
        // Read-only (no new limit). Pid 1 answers EPERM by itself to a user
        // other than root; a pid that cannot exist answers ESRCH.
        let mut old = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        let old_arg = &mut old as *mut libc::rlimit as libc::c_long;
        let r = call(libc::SYS_prlimit64, [1, libc::RLIMIT_NOFILE as libc::c_long, 0, old_arg, 0, 0]);
        out.push(("prlimit64(pid 1)", outcome(r)));
        let r = call(
            libc::SYS_prlimit64,
            [libc::c_long::from(libc::pid_t::MAX), libc::RLIMIT_NOFILE as libc::c_long, 0, old_arg, 0, 0],
        );
        out.push(("prlimit64(no such pid)", outcome(r)));

        // Socket options other than the peer's credentials, and descriptor
        // commands other than reading seals and duplicating (on stderr, which
        // is open: without the filter both would succeed).
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        let r = call(
            libc::SYS_getsockopt,
            [
                2,
                libc::SOL_SOCKET as libc::c_long,
                libc::SO_TYPE as libc::c_long,
                (&mut value as *mut libc::c_int) as libc::c_long,
                (&mut len as *mut libc::socklen_t) as libc::c_long,
                0,
            ],
        );
        out.push(("getsockopt(SO_TYPE)", outcome(r)));
        let r = call(libc::SYS_fcntl, [2, libc::F_GETFL as libc::c_long, 0, 0, 0, 0]);
        out.push(("fcntl(F_GETFL)", outcome(r)));

        // Executable memory.
        let exec = libc::PROT_READ | libc::PROT_EXEC;
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        let p = libc::mmap(std::ptr::null_mut(), page, exec, anon, -1, 0);
        out.push(("mmap(PROT_EXEC)", if p == libc::MAP_FAILED { outcome(-1) } else { 0 }));
        if p != libc::MAP_FAILED {
            libc::munmap(p, page);
        }
        let p = libc::mmap(std::ptr::null_mut(), page, libc::PROT_READ | libc::PROT_WRITE, anon, -1, 0);
        if p == libc::MAP_FAILED {
            // Without a page to change, report why (it is not the EPERM expected).
            let e = outcome(-1);
            out.push(("mprotect(PROT_EXEC)", e));
            out.push(("pkey_mprotect", e));
        } else {
            let r = libc::mprotect(p, page, exec);
            out.push(("mprotect(PROT_EXEC)", outcome(r as libc::c_long)));
            // Key -1 (the default key): a plain mprotect were it let through.
            let r = call(
                libc::SYS_pkey_mprotect,
                [p as libc::c_long, page as libc::c_long, exec as libc::c_long, -1, 0, 0],
            );
            out.push(("pkey_mprotect", outcome(r)));
            libc::munmap(p, page);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn every_entry_has_a_reason_and_no_call_appears_twice() {
        let mut seen = BTreeSet::new();
        for entry in table() {
            assert!(!entry.reason.trim().is_empty(), "{} has no reason", entry.name());
            assert!(!entry.reason.contains('\n'), "{}: the reason is one line", entry.name());
            assert!(seen.insert(entry.nr), "{} appears twice", entry.name());
            assert!(entry.constant.starts_with("SYS_"), "{}", entry.constant);
            for alternative in entry.rule.unwrap_or(&[]) {
                assert!(!alternative.is_empty(), "{}: an empty alternative would allow anything", entry.name());
                for cond in alternative.iter() {
                    assert!(cond.arg < 6, "{}: argument {}", entry.name(), cond.arg);
                }
            }
        }
    }

    #[test]
    fn forbidden_calls_are_not_in_the_table() {
        let common = [
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_process_vm_readv,
            libc::SYS_process_vm_writev,
            libc::SYS_memfd_create,
            libc::SYS_pkey_mprotect,
            libc::SYS_tkill,
            libc::SYS_clone3,
        ];
        #[cfg(target_arch = "x86_64")]
        let arch = [libc::SYS_open, libc::SYS_fork, libc::SYS_vfork];
        #[cfg(target_arch = "aarch64")]
        let arch: [libc::c_long; 0] = [];
        let forbidden: Vec<libc::c_long> = common.into_iter().chain(arch).collect();
        for entry in table() {
            assert!(!forbidden.contains(&entry.nr), "{} must stay denied", entry.name());
        }
    }

    #[test]
    fn the_table_compiles_for_this_architecture() {
        let [allowlist, clone3] = compile(std::process::id()).unwrap();
        assert!(!allowlist.is_empty() && !clone3.is_empty());
    }
}
