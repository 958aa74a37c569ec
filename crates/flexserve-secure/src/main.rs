//! `flexserve-secure`: the secure world process. Started by the normal world
//! with a socket on `--channel-fd` and a shared buffer on `--shared-fd`; not
//! meant to be run by hand.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use flexserve_protocol::SharedBuffer;
use flexserve_secure::harden;
use flexserve_secure::platform::{CpuCompute, KeyStore, SocketChannel};
use flexserve_secure::world::{Exit, HeapFigures, HeapProbe, SecureWorld};
use flexserve_secure_mem::{GranulePool, PoolConfig, ProtectionPolicy, SecureHeap};

// Every heap allocation of this process (KV cache, activations, tokenizer,
// prompts, keys) lives in secret memory.
#[global_allocator]
static HEAP: SecureHeap = SecureHeap::new();

/// Granule size unless told otherwise (the normal world always says; see
/// `flexserve_normal::DEFAULT_GRANULE_SIZE` for the choice).
const DEFAULT_GRANULE_SIZE: usize = 256 << 10;

const USAGE: &str = "usage: flexserve-secure --channel-fd FD --shared-fd FD [--device-key FILE] \
[--model-key FILE]... [--vendor-pubkey HEX] [--threads N] [--granule-size BYTES] [--carve-out BYTES] \
[--memory-limit BYTES] [--locked-memory]\n       flexserve-secure --self-test-seccomp";

#[derive(Default)]
struct Args {
    channel_fd: Option<RawFd>,
    shared_fd: Option<RawFd>,
    device_key: Option<PathBuf>,
    model_keys: Vec<PathBuf>,
    vendor_pubkey: Option<String>,
    threads: usize,
    granule_size: usize,
    carve_out_bytes: Option<u64>,
    memory_limit: Option<u64>,
    locked_memory: bool,
    self_test_seccomp: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args { granule_size: DEFAULT_GRANULE_SIZE, ..Args::default() };
    let mut it = std::env::args_os().skip(1);
    while let Some(flag) = it.next() {
        let flag = flag.to_str().ok_or("arguments must be UTF-8")?.to_string();
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |v: std::ffi::OsString| -> Result<u64, String> {
            v.to_str().and_then(|s| s.parse().ok()).ok_or_else(|| format!("{flag}: expected a number, got {v:?}"))
        };
        match flag.as_str() {
            "--channel-fd" => a.channel_fd = Some(number(value()?)? as RawFd),
            "--shared-fd" => a.shared_fd = Some(number(value()?)? as RawFd),
            "--device-key" => a.device_key = Some(value()?.into()),
            "--model-key" => a.model_keys.push(value()?.into()),
            "--vendor-pubkey" => a.vendor_pubkey = Some(value()?.to_string_lossy().into_owned()),
            "--threads" => a.threads = number(value()?)? as usize,
            "--granule-size" => a.granule_size = number(value()?)? as usize,
            "--carve-out" => a.carve_out_bytes = Some(number(value()?)?),
            "--memory-limit" => a.memory_limit = Some(number(value()?)?),
            "--locked-memory" => a.locked_memory = true,
            "--self-test-seccomp" => a.self_test_seccomp = true,
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
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
    let (Some(channel_fd), Some(shared_fd)) = (args.channel_fd, args.shared_fd) else {
        fail(&format!("--channel-fd and --shared-fd are required\n{USAGE}"));
    };
    if let Err(e) = harden::close_inherited_fds(&[channel_fd, shared_fd]) {
        fail(&e);
    }
    harden::raise_fd_limit();
    let keys = KeyStore::load(args.device_key.as_deref(), &args.model_keys, args.vendor_pubkey.as_deref())
        .unwrap_or_else(|e| fail(&e));
    let protection = if args.locked_memory { ProtectionPolicy::LockedAnonymous } else { ProtectionPolicy::Auto };
    let granule = args.granule_size;
    if granule == 0 || !granule.is_multiple_of(4096) {
        fail(&format!("--granule-size {granule}: must be a positive multiple of 4096"));
    }
    let config = match args.carve_out_bytes {
        Some(bytes) => PoolConfig::static_carve_out((bytes as usize).div_ceil(granule)),
        None => PoolConfig::flexible(),
    }
    .with_granule_size(granule)
    .with_protection(protection);
    let pool = GranulePool::new(config).unwrap_or_else(|e| fail(&format!("secure memory: {e}")));
    // SAFETY: the normal world passed these descriptors for exactly this use;
    // nothing else in this process owns them.
    let (socket, shared) = unsafe { (UnixStream::from_raw_fd(channel_fd), OwnedFd::from_raw_fd(shared_fd)) };
    let shared = SharedBuffer::from_fd(shared).unwrap_or_else(|e| fail(&format!("shared buffer: {e}")));
    let channel = SocketChannel::new(socket, shared).unwrap_or_else(|e| fail(&format!("channel: {e}")));
    // Grants beyond the budget the normal world started us with, or beyond
    // the machine's memory, are refused rather than attempted.
    let physical = physical_memory();
    let max_memory = args.memory_limit.map_or(physical, |l| l.min(physical));
    let threads = if args.threads == 0 { flexserve_engine::model::default_threads() } else { args.threads };
    if let Err(e) = harden::install_seccomp() {
        fail(&e);
    }
    let mut world = SecureWorld::new(pool, channel, CpuCompute { threads }, keys, heap_probe(), max_memory);
    match world.run() {
        Exit::Shutdown | Exit::PeerGone => std::process::exit(0),
        Exit::Broken(why) => fail(&format!("channel broken: {why}")),
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
