//! Reaching the secure world: connecting to the service (its own
//! principal, started by the launcher) or starting a development secure
//! world as this user's child; where things are found.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use flexserve_protocol::{Reply, SharedBuffer};

use crate::{MemoryBudget, NormalError, Result, DEFAULT_GRANULE_SIZE, DEFAULT_SHARED_LEN, SECURE_BINARY};

/// How the secure world holds its memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolChoice {
    /// Flex-Mem: granted and recalled granule by granule.
    Flexible,
    /// The strawman: the whole budget reserved and populated at start, never returned.
    StaticCarveOut,
}

/// How to start a secure world.
#[derive(Debug, Clone)]
pub struct SecureWorldOptions {
    /// The `flexserve-secure` executable (default: $FLEXSERVE_SECURE_BIN, else
    /// next to the running executable).
    pub binary: Option<PathBuf>,
    /// The development secure world's state directory (its device key and
    /// policy; default [`default_dev_state_dir`]).
    pub state_dir: Option<PathBuf>,
    pub model_keys: Vec<PathBuf>,
    /// Hex public key of the vendor whose signature models must carry.
    pub vendor_pubkey: Option<String>,
    pub threads: usize,
    pub budget: MemoryBudget,
    pub pool: PoolChoice,
    /// Granule size in bytes (0: [`DEFAULT_GRANULE_SIZE`]).
    pub granule_size: usize,
    /// Use locked anonymous memory even where memfd_secret exists.
    pub force_locked_memory: bool,
    pub shared_len: usize,
}

impl Default for SecureWorldOptions {
    fn default() -> Self {
        Self {
            binary: None,
            state_dir: None,
            model_keys: Vec::new(),
            vendor_pubkey: None,
            threads: 0,
            budget: MemoryBudget::Auto,
            pool: PoolChoice::Flexible,
            granule_size: 0,
            force_locked_memory: false,
            shared_len: DEFAULT_SHARED_LEN,
        }
    }
}

/// A started secure-world process before any message was exchanged: for
/// callers that speak the protocol themselves (tests, fuzzing, measurements).
pub struct RawSecureWorld {
    pub child: Child,
    pub socket: UnixStream,
    pub shared: SharedBuffer,
    /// The memory budget the options resolved to.
    pub budget_bytes: u64,
}

/// Starts the secure-world process with a socket on its descriptor 3 and the
/// shared buffer on 4.
pub fn spawn_process(opts: &SecureWorldOptions) -> Result<RawSecureWorld> {
    let binary = secure_binary(opts.binary.as_deref())?;
    let shared = SharedBuffer::create(opts.shared_len.max(1 << 20))?;
    let (ours, theirs) = UnixStream::pair()?;
    let socket_fd: OwnedFd = theirs.into();
    let shared_fd = shared.inheritable_fd()?;
    let mut cmd = Command::new(&binary);
    cmd.args(["--channel-fd", "3", "--shared-fd", "4"]);
    let state_dir = match &opts.state_dir {
        Some(d) => d.clone(),
        None => default_dev_state_dir()?,
    };
    cmd.arg("--state-dir").arg(state_dir);
    for k in &opts.model_keys {
        cmd.arg("--model-key").arg(k);
    }
    if let Some(v) = &opts.vendor_pubkey {
        cmd.args(["--vendor-pubkey", v]);
    }
    if opts.threads > 0 {
        cmd.args(["--threads", &opts.threads.to_string()]);
    }
    let granule = if opts.granule_size > 0 { opts.granule_size } else { DEFAULT_GRANULE_SIZE };
    cmd.args(["--granule-size", &granule.to_string()]);
    if opts.force_locked_memory {
        cmd.arg("--locked-memory");
    }
    let budget_bytes = opts.budget.bytes();
    cmd.args(["--memory-limit", &budget_bytes.to_string()]);
    if opts.pool == PoolChoice::StaticCarveOut {
        cmd.args(["--carve-out", &budget_bytes.to_string()]);
    }
    let (sock_raw, shared_raw) = (socket_fd.as_raw_fd(), shared_fd.as_raw_fd());
    // SAFETY: the closure runs in the child between fork and exec and only
    // calls the async-signal-safe fcntl and dup2 on descriptors it owns.
    unsafe {
        cmd.pre_exec(move || {
            // Move both out of the way first so that dup2 onto 3 and 4 cannot clobber either.
            let s = libc::fcntl(sock_raw, libc::F_DUPFD, 10);
            let m = libc::fcntl(shared_raw, libc::F_DUPFD, 10);
            if s < 0 || m < 0 || libc::dup2(s, 3) < 0 || libc::dup2(m, 4) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::inherit());
    let child = cmd.spawn().map_err(|source| NormalError::Spawn { path: binary.clone(), source })?;
    Ok(RawSecureWorld { child, socket: ours, shared, budget_bytes })
}

/// A session with the secure world service before any message was
/// exchanged: for callers that speak the protocol themselves (tests).
pub struct RawSession {
    pub socket: UnixStream,
    pub shared: SharedBuffer,
}

/// Connects to the service and hands it a new shared buffer (one byte
/// carrying the memfd as `SCM_RIGHTS`, the first thing the service reads).
pub fn connect_service(path: &Path) -> Result<RawSession> {
    let socket = UnixStream::connect(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::PermissionDenied => NormalError::NotAdmitted { path: path.to_path_buf() },
        _ => NormalError::NoService { path: path.to_path_buf(), source },
    })?;
    let shared = SharedBuffer::create(DEFAULT_SHARED_LEN)?;
    if let Err(e) = send_descriptor(&socket, shared.as_fd().as_raw_fd()) {
        // A peer the service does not admit gets one error frame, then the connection closes.
        let mut reader = &socket;
        return Err(match flexserve_protocol::read_reply(&mut reader) {
            Ok(Reply::Error { code, message }) => NormalError::Secure { code, message },
            _ => NormalError::Io(e),
        });
    }
    Ok(RawSession { socket, shared })
}

/// Sends one byte carrying `fd`.
pub fn send_descriptor(socket: &UnixStream, fd: RawFd) -> std::io::Result<()> {
    let byte = [0u8; 1];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: byte.as_ptr() as *mut libc::c_void, iov_len: 1 };
    // SAFETY: a zeroed msghdr is valid; it points at our iovec and a control
    // buffer big enough for one descriptor, filled through the CMSG macros.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut RawFd, fd);
        libc::sendmsg(socket.as_raw_fd(), &msg, 0)
    };
    if sent != 1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The pid of the process at the other end of a Unix socket.
pub fn peer_pid(socket: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    (r == 0 && cred.pid > 0).then_some(cred.pid as u32)
}

/// Where the service listens unless told otherwise.
pub const DEFAULT_SERVICE_SOCKET: &str = "/run/flexserve/secure.sock";

/// The service socket: `$FLEXSERVE_SECURE_SOCKET`, else [`DEFAULT_SERVICE_SOCKET`].
pub fn service_socket() -> PathBuf {
    std::env::var_os("FLEXSERVE_SECURE_SOCKET").map_or_else(|| PathBuf::from(DEFAULT_SERVICE_SOCKET), PathBuf::from)
}

/// This user's FlexServe directory: `$FLEXSERVE_HOME`, else `~/.flexserve`.
pub fn flexserve_home() -> Result<PathBuf> {
    match std::env::var_os("FLEXSERVE_HOME") {
        Some(h) => Ok(PathBuf::from(h)),
        None => match std::env::var_os("HOME") {
            Some(h) => Ok(PathBuf::from(h).join(".flexserve")),
            None => Err(NormalError::Io(std::io::Error::other("neither FLEXSERVE_HOME nor HOME is set"))),
        },
    }
}

/// The development secure world's state directory, in this user's FlexServe directory.
pub fn default_dev_state_dir() -> Result<PathBuf> {
    Ok(flexserve_home()?.join("dev-secure-world"))
}

/// Finds the secure world's executable.
pub fn secure_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    let candidate = match explicit {
        Some(p) => p.to_path_buf(),
        None => match std::env::var_os("FLEXSERVE_SECURE_BIN") {
            Some(p) => PathBuf::from(p),
            None => {
                let exe = std::env::current_exe()?;
                let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
                // Test executables live one level down, in deps/.
                let beside = dir.join(SECURE_BINARY);
                if beside.is_file() || dir.file_name().is_none_or(|n| n != "deps") {
                    beside
                } else {
                    dir.parent().map_or(beside.clone(), |p| p.join(SECURE_BINARY))
                }
            }
        },
    };
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(NormalError::BinaryNotFound(candidate))
    }
}
