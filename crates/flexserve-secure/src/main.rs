//! `flexserve-secure`: the secure world process. Not meant to be run by hand.
//!
//! - Service (its own principal): `flexserve-launcher` binds the socket,
//!   sets the secure world's uid and limits, and execs
//!   `flexserve-secure --service --listen-fd 3 --state-dir DIR --peer-gid G`.
//! - Development (unprotected): the normal world starts it as its own user
//!   with a socket on `--channel-fd` and a shared buffer on `--shared-fd`.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;

use flexserve_protocol::{Deployment, SharedBuffer};
use flexserve_secure::harden;
use flexserve_secure::platform::{CpuCompute, KeyStore, SocketChannel};
use flexserve_secure::policy::{Policy, RequiredProtection};
use flexserve_secure::service::{self, Admission, ServiceParts};
use flexserve_secure::state::{self, IdentityFacts, Principal};
use flexserve_secure::world::{Exit, HeapFigures, HeapProbe, SecureWorld};
use flexserve_secure_mem::{GranulePool, PoolConfig, ProtectionPolicy, SecureHeap};

// Every heap allocation of this process (KV cache, activations, tokenizer,
// prompts, keys) lives in secret memory.
#[global_allocator]
static HEAP: SecureHeap = SecureHeap::new();

const USAGE: &str = "usage: flexserve-secure --service --listen-fd FD --state-dir DIR --peer-gid GID   (started by flexserve-launcher)
       flexserve-secure --channel-fd FD --shared-fd FD --state-dir DIR [--model-key FILE]... [--vendor-pubkey HEX]
                        [--threads N] [--granule-size BYTES] [--carve-out BYTES] [--memory-limit BYTES] [--locked-memory]
                        (development mode, unprotected)
       flexserve-secure --self-test-seccomp";

#[derive(Default)]
struct Args {
    service: bool,
    listen_fd: Option<RawFd>,
    peer_gid: Option<u32>,
    state_dir: Option<PathBuf>,
    channel_fd: Option<RawFd>,
    shared_fd: Option<RawFd>,
    model_keys: Vec<PathBuf>,
    vendor_pubkey: Option<String>,
    threads: Option<usize>,
    granule_size: Option<usize>,
    carve_out_bytes: Option<u64>,
    memory_limit: Option<u64>,
    locked_memory: bool,
    self_test_seccomp: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args::default();
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.to_str().ok_or("arguments must be UTF-8")?.to_string();
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: std::ffi::OsString| -> Result<u64, String> {
            v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| format!("{flag}: expected a number, got {v:?}"))
        };
        match flag.as_str() {
            "--service" => a.service = true,
            "--listen-fd" => a.listen_fd = Some(number(value()?)? as RawFd),
            "--peer-gid" => a.peer_gid = Some(number(value()?)? as u32),
            "--state-dir" => a.state_dir = Some(value()?.into()),
            "--channel-fd" => a.channel_fd = Some(number(value()?)? as RawFd),
            "--shared-fd" => a.shared_fd = Some(number(value()?)? as RawFd),
            "--model-key" => a.model_keys.push(value()?.into()),
            "--vendor-pubkey" => a.vendor_pubkey = Some(value()?.to_string_lossy().into_owned()),
            "--threads" => a.threads = Some(number(value()?)? as usize),
            "--granule-size" => a.granule_size = Some(number(value()?)? as usize),
            "--carve-out" => a.carve_out_bytes = Some(number(value()?)?),
            "--memory-limit" => a.memory_limit = Some(number(value()?)?),
            "--locked-memory" => a.locked_memory = true,
            "--self-test-seccomp" => a.self_test_seccomp = true,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if a.service
        && (!a.model_keys.is_empty()
            || a.vendor_pubkey.is_some()
            || a.threads.is_some()
            || a.granule_size.is_some()
            || a.carve_out_bytes.is_some()
            || a.memory_limit.is_some()
            || a.locked_memory)
    {
        return Err(format!(
            "--service takes its keys and policy from its state directory, not from arguments\n{USAGE}"
        ));
    }
    Ok(a)
}

fn main() {
    // Before anything else, so that no secret is ever in a dumpable process.
    if let Err(e) = harden::protect_process() {
        fail(&e);
    }
    let args = parse_args().unwrap_or_else(|e| fail(&e));
    if args.self_test_seccomp {
        self_test_seccomp();
    }
    let Some(state_dir) = args.state_dir.clone() else {
        fail(&format!("--state-dir is required\n{USAGE}"));
    };
    prepare_heap();
    if args.service {
        run_service(args, state_dir)
    } else {
        run_development(args, state_dir)
    }
}

/// Secure heap prepared ahead of need: opening a model (its header,
/// tokenizer and template) allocates about 30 MiB at its peak for a
/// 50k-token vocabulary, and each fresh page of secret memory costs a fault
/// and a TLB shootdown: in a fresh process on a 2-core Xeon, parsing the
/// header and building the tokenizer took 208 ms on untouched secret memory
/// and 83 ms on this reserve. Freed heap is reused, never unmapped, so pages
/// touched once stay ready.
const HEAP_RESERVE_BYTES: usize = 32 << 20;

/// Touches [`HEAP_RESERVE_BYTES`] of secure heap (one block, written, then
/// freed) on a thread of its own, while the secure world starts up.
fn prepare_heap() {
    let _ = std::thread::Builder::new().name("heap-reserve".to_string()).spawn(|| {
        // Written byte by byte (not `vec![0; n]`, which may leave the pages untouched).
        let mut block: Vec<u8> = Vec::new();
        if block.try_reserve_exact(HEAP_RESERVE_BYTES).is_ok() {
            block.extend(std::iter::repeat_n(0u8, HEAP_RESERVE_BYTES));
        }
    });
}

/// The secure world as its own principal, started by the launcher.
fn run_service(args: Args, state_dir: PathBuf) -> ! {
    let (Some(listen_fd), Some(peer_gid)) = (args.listen_fd, args.peer_gid) else {
        fail(&format!("--service needs --listen-fd and --peer-gid\n{USAGE}"));
    };
    harden::close_inherited_fds(&[listen_fd]).unwrap_or_else(|e| fail(&e));
    state::refuse_tracer().unwrap_or_else(|e| fail(&e));
    if state::current_uid() == 0 {
        fail("the secure world does not run as root: start it with flexserve-launcher, which gives it its own uid");
    }
    let state = state::open_state(&state_dir, Deployment::Service).unwrap_or_else(|e| fail(&e));
    if state.created_device_key {
        eprintln!("flexserve-secure: generated the device key in {}", state.dir.display());
    }
    let policy = state.policy.clone();
    let pool = make_pool(&policy, None, false, &state_dir).unwrap_or_else(|e| fail(&e));
    let identity = IdentityFacts::read(&state.device).unwrap_or_else(|e| fail(&e));
    let keys = KeyStore { device: Some(state.device), model_keys: Vec::new(), vendor: policy.vendor_key };
    let posture = state::posture(Deployment::Service, pool.protection().name());
    let max_memory = memory_limit(policy.memory_limit);
    let threads = thread_count(policy.threads);
    let principal = Arc::new(Principal::new(keys, policy, posture, identity));
    service::install_stop_handlers().unwrap_or_else(|e| fail(&e));
    // SAFETY: the launcher passed this descriptor, a bound and listening
    // socket, for exactly this use; nothing else in this process owns it.
    let listener = unsafe { UnixListener::from_raw_fd(listen_fd) };
    harden::install_seccomp().unwrap_or_else(|e| fail(&e));
    for w in &principal.posture.warnings {
        eprintln!("flexserve-secure: warning: {w}");
    }
    eprintln!("flexserve-secure: serving (uid {}, {})", principal.posture.uid, pool.protection().name());
    let admission = Admission { allowed_gid: peer_gid, own_uid: principal.posture.uid };
    service::serve(listener, ServiceParts { pool, principal, heap: heap_probe(), max_memory, threads, admission });
    std::process::exit(0)
}

/// Started by the normal world as its own user: one peer, unprotected.
fn run_development(args: Args, state_dir: PathBuf) -> ! {
    let (Some(channel_fd), Some(shared_fd)) = (args.channel_fd, args.shared_fd) else {
        fail(&format!("--channel-fd and --shared-fd are required\n{USAGE}"));
    };
    harden::close_inherited_fds(&[channel_fd, shared_fd]).unwrap_or_else(|e| fail(&e));
    let state = state::open_state(&state_dir, Deployment::Development).unwrap_or_else(|e| fail(&e));
    // Development mode lets its own user configure it: arguments override the policy.
    let mut policy = state.policy.clone();
    if let Some(t) = args.threads {
        policy.threads = t;
    }
    if let Some(g) = args.granule_size {
        policy.granule_size = g;
    }
    if let Some(m) = args.memory_limit {
        policy.memory_limit = m;
    }
    let model_keys = args
        .model_keys
        .iter()
        .map(|p| flexserve_sealed::ModelKey::load(p).map_err(|e| format!("model key {}: {e}", p.display())))
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_else(|e| fail(&e));
    if let Some(v) = &args.vendor_pubkey {
        policy.vendor_key = Some(
            flexserve_sealed::VendorPublicKey::from_hex(v).unwrap_or_else(|e| fail(&format!("vendor public key: {e}"))),
        );
    }
    let _ = flexserve_secure_mem::raise_memlock_limit();
    harden::raise_fd_limit();
    let pool = make_pool(&policy, args.carve_out_bytes, args.locked_memory, &state_dir).unwrap_or_else(|e| fail(&e));
    let identity = IdentityFacts::read(&state.device).unwrap_or_else(|e| fail(&e));
    let keys = KeyStore { device: Some(state.device), model_keys, vendor: policy.vendor_key };
    let posture = state::posture(Deployment::Development, pool.protection().name());
    let max_memory = memory_limit(policy.memory_limit);
    let threads = thread_count(policy.threads);
    // SAFETY: the normal world passed these descriptors for exactly this use;
    // nothing else in this process owns them.
    let (socket, shared) = unsafe { (UnixStream::from_raw_fd(channel_fd), OwnedFd::from_raw_fd(shared_fd)) };
    let shared = SharedBuffer::from_fd(shared).unwrap_or_else(|e| fail(&format!("shared buffer: {e}")));
    let channel = SocketChannel::new(socket, shared).unwrap_or_else(|e| fail(&format!("channel: {e}")));
    harden::install_seccomp().unwrap_or_else(|e| fail(&e));
    let principal = Arc::new(Principal::new(keys, policy, posture, identity));
    let mut world = SecureWorld::new(pool, channel, CpuCompute { threads }, principal, heap_probe(), max_memory);
    let exit = world.run();
    drop(world);
    match exit {
        Exit::Shutdown | Exit::PeerGone => std::process::exit(0),
        Exit::Broken(why) => fail(&format!("channel broken: {why}")),
    }
}

/// The Flex-Mem pool the policy asks for (a carve-out or locked memory only in development mode).
fn make_pool(
    policy: &Policy,
    carve_out_bytes: Option<u64>,
    locked_memory: bool,
    state_dir: &std::path::Path,
) -> Result<GranulePool, String> {
    let granule = policy.granule_size;
    if granule == 0 || !granule.is_multiple_of(4096) {
        return Err(format!("granule size {granule}: must be a positive multiple of 4096"));
    }
    let protection = match (locked_memory, policy.protection) {
        (true, _) => ProtectionPolicy::LockedAnonymous,
        (false, RequiredProtection::SecretMemory) => ProtectionPolicy::RequireSecretMemory,
        (false, RequiredProtection::Any) => ProtectionPolicy::Auto,
    };
    let config = match carve_out_bytes {
        Some(bytes) => PoolConfig::static_carve_out((bytes as usize).div_ceil(granule)),
        None => PoolConfig::flexible(),
    }
    .with_granule_size(granule)
    .with_protection(protection);
    GranulePool::new(config).map_err(|e| {
        let hint = if protection == ProtectionPolicy::RequireSecretMemory {
            format!(
                " (the policy requires memfd_secret; set `protection = any` in {} to accept locked memory)",
                state_dir.join(flexserve_secure::policy::POLICY_FILE).display()
            )
        } else {
            String::new()
        };
        format!("secure memory: {e}{hint}")
    })
}

/// Grants beyond the policy's limit, or beyond the machine's memory, are refused.
fn memory_limit(policy_limit: u64) -> u64 {
    let physical = physical_memory();
    if policy_limit == 0 {
        physical
    } else {
        policy_limit.min(physical)
    }
}

fn thread_count(policy_threads: usize) -> usize {
    if policy_threads == 0 {
        flexserve_engine::model::default_threads()
    } else {
        policy_threads
    }
}

/// Bytes of physical memory (read before the seccomp filter).
fn physical_memory() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages > 0 && size > 0 {
        pages as u64 * size as u64
    } else {
        u64::MAX
    }
}

fn heap_probe() -> HeapProbe {
    HeapProbe { figures: heap_figures, reset_peak: || HEAP.reset_peak() }
}

fn heap_figures() -> HeapFigures {
    let s = HEAP.stats();
    HeapFigures {
        reserved: s.reserved_bytes as u64,
        allocated: s.allocated_bytes as u64,
        peak: s.peak_allocated_bytes as u64,
    }
}

fn fail(message: &str) -> ! {
    eprintln!("flexserve-secure: {message}");
    std::process::exit(2)
}

/// Installs the filter, tries what it forbids, and prints each outcome.
fn self_test_seccomp() -> ! {
    if let Err(e) = harden::install_seccomp() {
        fail(&e);
    }
    // A worker thread must still start (clone with CLONE_THREAD after clone3 says ENOSYS).
    let thread_ok = std::thread::spawn(|| 7).join().map(|v| v == 7).unwrap_or(false);
    let mut lines = vec![format!("thread {}", if thread_ok { "ok" } else { "failed" })];
    for (call, errno) in harden::probe_forbidden_calls() {
        lines.push(format!("{call} {}", if errno == 0 { "allowed".to_string() } else { format!("errno {errno}") }));
    }
    eprintln!("{}", lines.join("\n"));
    std::process::exit(0)
}
