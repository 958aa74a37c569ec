//! Other processes cannot read the secure world's memory.
//!
//! A secure world is started through flexserve-normal, a sealed model is
//! loaded and a few tokens generated, so that weights (pool granules), the
//! KV cache and activations (granules), the heap and the stack are all in use. Then three ways
//! of reading another process's memory are tried: /proc/PID/mem (open +
//! pread), process_vm_readv(2), and ptrace(2) (PTRACE_SEIZE, PTRACE_INTERRUPT,
//! PTRACE_PEEKDATA, PTRACE_DETACH), as root and as user nobody, against
//! memfd_secret mappings and against the ordinary stack. The expected
//! outcomes document the real boundary, including what root can do.
//!
//! Needs root (to become nobody, and because root is the case that matters);
//! skips with a printed reason otherwise.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use flexserve_normal::{MemoryBudget, SecureWorld, SecureWorldOptions};
use flexserve_protocol::{GenerateRequest, Input, Reply, Request, Sampling, SharedBuffer, PROTOCOL_VERSION};

const NOBODY: libc::uid_t = 65534;
/// Bytes read per attempt.
const PROBE_LEN: usize = 64;
const PAGE: u64 = 4096;
const GRANULE: usize = 256 << 10;

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

// ------------------------------------------------------------------ probes
//
// The probes run in forked children too, so they make only async-signal-safe
// system calls and never allocate.

/// Where an attempt stopped: the access check (open of /proc/PID/mem,
/// PTRACE_SEIZE) or the read itself (pread, process_vm_readv, PEEKDATA).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Stage {
    Read = 0,
    Access = 1,
    Done = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    stage: Stage,
    /// 0 when the read succeeded.
    errno: i32,
}

const READ_OK: Outcome = Outcome { stage: Stage::Done, errno: 0 };

fn denied_at(stage: Stage, errno: i32) -> Outcome {
    Outcome { stage, errno }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.stage {
            Stage::Done => write!(f, "read"),
            Stage::Access => write!(f, "{} at the access check", errno_name(self.errno)),
            Stage::Read => write!(f, "{} on reading", errno_name(self.errno)),
        }
    }
}

fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EIO => "EIO".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ESRCH => "ESRCH".into(),
        0 => "a short read".into(),
        e => format!("errno {e}"),
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// open("/proc/PID/mem") then pread at `addr`.
fn read_proc_mem(mem_path: &CString, addr: u64) -> Outcome {
    let mut buf = [0u8; PROBE_LEN];
    // SAFETY: a NUL-terminated path; the descriptor is closed below.
    let fd = unsafe { libc::open(mem_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return denied_at(Stage::Access, errno());
    }
    // SAFETY: `buf` is writable for PROBE_LEN bytes.
    let n = unsafe { libc::pread(fd, buf.as_mut_ptr().cast(), PROBE_LEN, addr as libc::off_t) };
    let e = errno();
    // SAFETY: closing the descriptor opened above.
    unsafe { libc::close(fd) };
    match n {
        n if n == PROBE_LEN as isize => READ_OK,
        n if n < 0 => denied_at(Stage::Read, e),
        _ => denied_at(Stage::Read, 0),
    }
}

/// process_vm_readv of `PROBE_LEN` bytes at `addr` (one call: the access
/// check and the read; EPERM means the former failed, EFAULT the latter).
fn read_vm(pid: libc::pid_t, addr: u64) -> Outcome {
    let mut buf = [0u8; PROBE_LEN];
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: PROBE_LEN };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: PROBE_LEN };
    // SAFETY: the local iovec points at `buf`; the remote one is only read by the kernel on the other side.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    match n {
        n if n == PROBE_LEN as isize => READ_OK,
        n if n < 0 => {
            let e = errno();
            denied_at(if e == libc::EPERM { Stage::Access } else { Stage::Read }, e)
        }
        _ => denied_at(Stage::Read, 0),
    }
}

/// PTRACE_SEIZE + PTRACE_INTERRUPT (no signal is sent), wait for the stop,
/// PTRACE_PEEKDATA one word at `addr`, PTRACE_DETACH.
fn read_ptrace(pid: libc::pid_t, addr: u64) -> Outcome {
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace requests on another process with valid arguments; the
    // tracee is always detached again before returning.
    unsafe {
        if libc::ptrace(libc::PTRACE_SEIZE, pid, null, null) != 0 {
            return denied_at(Stage::Access, errno());
        }
        let mut status = 0;
        let stopped = libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null) == 0
            && libc::waitpid(pid, &mut status, libc::__WALL) == pid;
        let outcome = if !stopped {
            denied_at(Stage::Access, errno())
        } else {
            *libc::__errno_location() = 0;
            let word = libc::ptrace(libc::PTRACE_PEEKDATA, pid, addr as *mut libc::c_void, null);
            let e = errno();
            if word == -1 && e != 0 {
                denied_at(Stage::Read, e)
            } else {
                READ_OK
            }
        };
        libc::ptrace(libc::PTRACE_DETACH, pid, null, null);
        outcome
    }
}

/// One address of one process to read.
struct Target {
    pid: libc::pid_t,
    mem_path: CString,
    addr: u64,
}

impl Target {
    fn new(pid: u32, addr: u64) -> Target {
        Target { pid: pid as libc::pid_t, mem_path: CString::new(format!("/proc/{pid}/mem")).unwrap(), addr }
    }
}

/// The three methods' outcomes: /proc/PID/mem, process_vm_readv, ptrace.
type Outcomes = [Outcome; 3];

fn probe(t: &Target) -> Outcomes {
    [read_proc_mem(&t.mem_path, t.addr), read_vm(t.pid, t.addr), read_ptrace(t.pid, t.addr)]
}

/// Runs the probes in a forked child that first becomes user nobody (and
/// group nobody, without supplementary groups, hence without any capability).
fn probe_as_nobody(targets: &[&Target]) -> Vec<Outcomes> {
    let mut fds = [0; 2];
    // SAFETY: pipe writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0, "pipe2");
    // SAFETY: both descriptors are fresh and owned here.
    let (read_end, write_end) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Everything the child needs exists before the fork: it must not allocate.
    let mut results = vec![0i32; targets.len() * 6];
    // SAFETY: the child only makes async-signal-safe calls on memory that
    // exists before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: in the child: identity changes, the probes, one write, _exit.
        unsafe {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                libc::_exit(3);
            }
            for (i, t) in targets.iter().enumerate() {
                for (j, o) in probe(t).iter().enumerate() {
                    results[i * 6 + j * 2] = o.stage as i32;
                    results[i * 6 + j * 2 + 1] = o.errno;
                }
            }
            let bytes = results.len() * 4;
            let ok = libc::write(write_end.as_raw_fd(), results.as_ptr().cast(), bytes) == bytes as isize;
            libc::_exit(if ok { 0 } else { 4 });
        }
    }
    drop(write_end);
    let mut raw = Vec::new();
    std::fs::File::from(read_end).read_to_end(&mut raw).unwrap();
    let mut status = 0;
    // SAFETY: reaping the child forked above.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the probing child failed (status {status:#x}; exit 3: could not become nobody)"
    );
    assert_eq!(raw.len(), results.len() * 4, "short report from the probing child");
    let values: Vec<i32> = raw.chunks_exact(4).map(|c| i32::from_ne_bytes(c.try_into().unwrap())).collect();
    let stage = |v: i32| match v {
        0 => Stage::Read,
        1 => Stage::Access,
        _ => Stage::Done,
    };
    values.chunks_exact(6).map(|c| [0, 1, 2].map(|j| Outcome { stage: stage(c[j * 2]), errno: c[j * 2 + 1] })).collect()
}

// ------------------------------------------------------------------ /proc

struct Mapping {
    start: u64,
    end: u64,
    name: String,
}

fn mappings(pid: u32) -> Vec<Mapping> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    maps.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let name = fields.nth(4).map(str::to_owned).unwrap_or_default();
            let rest: Vec<&str> = fields.collect();
            let name = if rest.is_empty() { name } else { format!("{name} {}", rest.join(" ")) };
            Some(Mapping { start: u64::from_str_radix(start, 16).ok()?, end: u64::from_str_radix(end, 16).ok()?, name })
        })
        .collect()
}

/// memfd_secret mappings appear as "/secretmem (deleted)" in /proc/PID/maps.
fn is_secret(m: &Mapping) -> bool {
    m.name.starts_with("/secretmem")
}

fn stack_probe_address(pid: u32) -> u64 {
    let stack = mappings(pid).into_iter().find(|m| m.name == "[stack]").expect("a [stack] mapping");
    // The top page always holds the arguments and environment.
    stack.end - PAGE
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let prefix = format!("{field}:");
    let line = status.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("no {field} in {status}"));
    line[prefix.len()..].trim().to_owned()
}

// ------------------------------------------------------------------ worlds

fn start_world(dir: &Path) -> (SecureWorld, flexserve_normal::OpenedModel) {
    let key_path = dir.join("model.key");
    let sealed = dir.join("model.fsm");
    let key = flexserve_sealed::ModelKey::generate();
    key.save(&key_path).unwrap();
    flexserve_sealed::seal_file(&model(), &sealed, &key, &flexserve_sealed::SealOptions::default(), &mut |_, _| {})
        .unwrap();
    let opts = SecureWorldOptions {
        binary: Some(env!("CARGO_BIN_EXE_flexserve-secure").into()),
        model_keys: vec![key_path],
        threads: 2,
        budget: MemoryBudget::Auto,
        // Granules are told from heap arenas (MIN_ARENA_SIZE, 8 MiB, or more) by their size.
        granule_size: GRANULE,
        ..SecureWorldOptions::default()
    };
    let mut world = SecureWorld::spawn(&opts).expect("starting the secure world");
    let (model, _) = world.open_model(&sealed).expect("opening the sealed model");
    let request = GenerateRequest {
        model: model.id,
        conversation: 0,
        input: Input::Raw { text: "The secret of a good bread is".into() },
        max_tokens: 8,
        n_ctx: 256,
        sampling: Sampling {
            temperature: 0.0,
            top_k: 40,
            top_p: 1.0,
            min_p: 0.0,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 1,
        },
        stop: Vec::new(),
    };
    let mut text = String::new();
    let report = world.generate(&model, request, |t| text.push_str(t)).expect("generating");
    assert!(report.generated_tokens > 0 && !text.is_empty(), "nothing generated: {report:?}");
    (world, model)
}

fn assert_outcome(got: Outcome, want: Outcome, what: &str, why: &str) {
    assert_eq!(got, want, "{what}: got {got}, expected {want} because {why}");
}

#[test]
fn other_processes_cannot_read_the_secure_worlds_memory() {
    if !is_root() {
        eprintln!("skipping: needs root (to probe as root and to become user nobody)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut world, _model) = start_world(dir.path());
    let pid = world.pid();
    let status = world.status().unwrap();

    // Hardening visible from outside.
    assert_eq!(status_field(pid, "Seccomp"), "2", "the secure world must run under a seccomp filter (mode 2)");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1", "the secure world must set no_new_privs");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let core = limits.lines().find(|l| l.starts_with("Max core file size")).expect("core limit line");
    let core: Vec<&str> = core["Max core file size".len()..].split_whitespace().collect();
    assert_eq!(&core[..2], ["0", "0"], "core dumps must be off (soft and hard RLIMIT_CORE 0): {core:?}");

    // The mappings: pool granules (each its own memfd_secret file, granule-sized) hold the weights and
    // KV caches and activations; larger secret mappings are heap arenas (tokenizer, prompt).
    let granule = world.info().granule_size;
    assert_eq!(granule, GRANULE as u64, "the secure world must use the granule size it was given");
    let maps = mappings(pid);
    let secret: Vec<&Mapping> = maps.iter().filter(|m| is_secret(m)).collect();
    let weights: Vec<&Mapping> = secret.iter().copied().filter(|m| m.end - m.start == granule).collect();
    let heap: Vec<&Mapping> = secret.iter().copied().filter(|m| m.end - m.start != granule).collect();
    let weight_bytes: u64 = status.models.iter().map(|m| m.weight_bytes).sum();
    eprintln!(
        "secure world pid {pid}: protection {}, {} secret mappings ({} granules of {granule} bytes, {} heap), \
         weights {weight_bytes} bytes in {} granules, heap {} bytes",
        world.info().protection,
        secret.len(),
        weights.len(),
        heap.len(),
        status.in_use,
        status.heap_bytes
    );
    let memfd_secret = world.info().protection == "memfd_secret";
    if memfd_secret {
        assert!(
            weights.len() as u64 >= u64::from(status.in_use) && u64::from(status.in_use) * granule >= weight_bytes,
            "the weights ({weight_bytes} bytes, {} granules in use) must lie in granule-sized /secretmem mappings; \
             found {}",
            status.in_use,
            weights.len()
        );
        assert!(!heap.is_empty(), "the secure heap must be /secretmem mappings too");
    } else {
        eprintln!(
            "note: memfd_secret is not in force here ({}); only the stack and the non-dumpable checks run",
            world.info().protection
        );
    }

    let stack = Target::new(pid, stack_probe_address(pid));
    let secret_targets: Vec<(String, Target)> = weights
        .iter()
        .map(|m| ("weights granule", m))
        .chain(heap.iter().map(|m| ("heap arena", m)))
        .filter(|_| memfd_secret)
        .map(|(kind, m)| (format!("{kind} {:#x}-{:#x}", m.start, m.end), Target::new(pid, m.start)))
        .collect();

    // (i) root. Root holds CAP_SYS_PTRACE, which the non-dumpable flag does
    // not stop: ordinary memory is readable by all three methods.
    let root_stack = probe(&stack);
    eprintln!(
        "root, [stack]: /proc/PID/mem {}, process_vm_readv {}, ptrace {}",
        root_stack[0], root_stack[1], root_stack[2]
    );
    let why_root = "root (CAP_SYS_PTRACE) passes the ptrace access check even on a non-dumpable process";
    for (method, got) in
        ["root /proc/PID/mem [stack]", "root process_vm_readv [stack]", "root ptrace [stack]"].iter().zip(root_stack)
    {
        assert_outcome(got, READ_OK, method, why_root);
    }
    // memfd_secret pages are not in the kernel's direct map, so the kernel
    // cannot reach them on another process's behalf: the access check
    // passes, the read fails.
    let why_secret = "memfd_secret pages are not in the kernel's direct map (GUP refuses secretmem VMAs)";
    for (what, target) in &secret_targets {
        let [mem, vm, ptrace] = probe(target);
        assert_outcome(mem, denied_at(Stage::Read, libc::EIO), &format!("root /proc/PID/mem {what}"), why_secret);
        assert_outcome(vm, denied_at(Stage::Read, libc::EFAULT), &format!("root process_vm_readv {what}"), why_secret);
        assert_outcome(ptrace, denied_at(Stage::Read, libc::EIO), &format!("root PTRACE_PEEKDATA {what}"), why_secret);
    }
    if !secret_targets.is_empty() {
        eprintln!(
            "root, each of {} /secretmem mappings: /proc/PID/mem {}, process_vm_readv {}, ptrace {}",
            secret_targets.len(),
            denied_at(Stage::Read, libc::EIO),
            denied_at(Stage::Read, libc::EFAULT),
            denied_at(Stage::Read, libc::EIO)
        );
    }

    // (ii) user nobody: the secure world runs as root, so the access check
    // fails before any read (a different uid without CAP_SYS_PTRACE; the
    // non-dumpable flag would stop a same-uid reader too, see the next test).
    let mut nobody_targets = vec![("[stack]".to_owned(), &stack)];
    // Two weight granules and a heap arena.
    let some_secret = secret_targets.iter().take(2).chain(secret_targets.last());
    nobody_targets.extend(some_secret.map(|(what, t)| (what.clone(), t)));
    let only: Vec<&Target> = nobody_targets.iter().map(|(_, t)| *t).collect();
    let why_nobody = "another uid without CAP_SYS_PTRACE fails ptrace_may_access (and the process is not dumpable)";
    for ((what, _), [mem, vm, ptrace]) in nobody_targets.iter().zip(probe_as_nobody(&only)) {
        eprintln!("nobody, {what}: /proc/PID/mem {mem}, process_vm_readv {vm}, ptrace {ptrace}");
        assert_outcome(
            mem,
            denied_at(Stage::Access, libc::EACCES),
            &format!("nobody /proc/PID/mem {what}"),
            why_nobody,
        );
        assert_outcome(
            vm,
            denied_at(Stage::Access, libc::EPERM),
            &format!("nobody process_vm_readv {what}"),
            why_nobody,
        );
        assert_outcome(
            ptrace,
            denied_at(Stage::Access, libc::EPERM),
            &format!("nobody PTRACE_SEIZE {what}"),
            why_nobody,
        );
    }

    // The world is still healthy after being traced and probed.
    assert!(world.status().is_ok(), "the secure world must survive the probes");
    world.shutdown().unwrap();
}

/// Starts the secure-world binary as user nobody, connected to a socket and
/// a shared buffer as flexserve-normal does (which has no option to change
/// the user), and greets it.
fn spawn_as_nobody() -> Result<(Child, UnixStream), String> {
    let shared = SharedBuffer::create(1 << 20).map_err(|e| e.to_string())?;
    let (mut ours, theirs) = UnixStream::pair().map_err(|e| e.to_string())?;
    let theirs: OwnedFd = theirs.into();
    let shared_fd = shared.inheritable_fd().map_err(|e| e.to_string())?;
    let (sock_raw, shared_raw) = (theirs.as_raw_fd(), shared_fd.as_raw_fd());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flexserve-secure"));
    cmd.args(["--channel-fd", "3", "--shared-fd", "4", "--threads", "1"]);
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls.
    unsafe {
        cmd.pre_exec(move || {
            let s = libc::fcntl(sock_raw, libc::F_DUPFD, 10);
            let m = libc::fcntl(shared_raw, libc::F_DUPFD, 10);
            if s < 0 || m < 0 || libc::dup2(s, 3) < 0 || libc::dup2(m, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.stdin(Stdio::null()).stdout(Stdio::null()).spawn().map_err(|e| e.to_string())?;
    drop((theirs, shared_fd));
    flexserve_protocol::write_request(&mut ours, &Request::Hello { version: PROTOCOL_VERSION })
        .map_err(|e| e.to_string())?;
    match flexserve_protocol::read_reply(&mut ours) {
        Ok(Reply::Hello { .. }) => Ok((child, ours)),
        other => Err(format!("the secure world as nobody answered {other:?}")),
    }
}

fn spawn_sleeper_as_nobody() -> Child {
    let mut cmd = Command::new("sleep");
    cmd.arg("30");
    // SAFETY: between fork and exec the closure makes only async-signal-safe calls.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0 || libc::setgid(NOBODY) != 0 || libc::setuid(NOBODY) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).spawn().expect("starting sleep as nobody")
}

/// The same user as the secure world: only the non-dumpable flag
/// (PR_SET_DUMPABLE 0) stands between them, and it is enough. A control
/// process of the same user that is dumpable is readable by all three methods.
#[test]
fn the_same_user_cannot_read_the_secure_world_because_it_is_not_dumpable() {
    if !is_root() {
        eprintln!("skipping: needs root (to run processes as user nobody)");
        return;
    }
    let (mut world, mut channel) = match spawn_as_nobody() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("skipping: the secure world did not start as user nobody here: {e}");
            return;
        }
    };
    let mut sleeper = spawn_sleeper_as_nobody();
    let (world_pid, sleeper_pid) = (world.id(), sleeper.id());
    // Let the sleeper finish exec (its [stack] is the new program's).
    std::thread::sleep(std::time::Duration::from_millis(100));
    let uid = |pid| status_field(pid, "Uid").split_whitespace().next().unwrap().to_owned();
    assert_eq!(uid(world_pid), "65534");
    assert_eq!(uid(sleeper_pid), "65534");
    let targets = [
        Target::new(world_pid, stack_probe_address(world_pid)),
        Target::new(sleeper_pid, stack_probe_address(sleeper_pid)),
    ];
    let results = probe_as_nobody(&[&targets[0], &targets[1]]);
    let [mem, vm, ptrace] = results[0];
    eprintln!("nobody -> secure world of nobody, [stack]: /proc/PID/mem {mem}, process_vm_readv {vm}, ptrace {ptrace}");
    let [c_mem, c_vm, c_ptrace] = results[1];
    eprintln!("nobody -> sleep of nobody, [stack]: /proc/PID/mem {c_mem}, process_vm_readv {c_vm}, ptrace {c_ptrace}");

    // Yama (ptrace_scope >= 1) would also stop a same-uid reader of a non-descendant: then the control says nothing.
    let yama = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").map(|s| s.trim().to_owned());
    if matches!(&yama, Ok(scope) if scope != "0") {
        eprintln!("note: Yama ptrace_scope is {yama:?}: the same-uid control is not asserted");
    } else {
        let why_control = "a dumpable process of the same user passes ptrace_may_access (no Yama restriction here)";
        assert_outcome(c_mem, READ_OK, "control /proc/PID/mem", why_control);
        assert_outcome(c_vm, READ_OK, "control process_vm_readv", why_control);
        assert_outcome(c_ptrace, READ_OK, "control ptrace", why_control);
    }
    let why = "the secure world is not dumpable (PR_SET_DUMPABLE 0): the same uid then needs CAP_SYS_PTRACE";
    assert_outcome(mem, denied_at(Stage::Access, libc::EACCES), "same-uid /proc/PID/mem", why);
    assert_outcome(vm, denied_at(Stage::Access, libc::EPERM), "same-uid process_vm_readv", why);
    assert_outcome(ptrace, denied_at(Stage::Access, libc::EPERM), "same-uid PTRACE_SEIZE", why);

    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = flexserve_protocol::write_request(&mut channel, &Request::Shutdown);
    drop(channel);
    let _ = world.wait();
}
