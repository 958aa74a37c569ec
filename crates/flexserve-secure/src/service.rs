//! The secure world as a long-lived service: it accepts peers on a Unix
//! socket that the launcher bound, admits only those its group allows
//! (checked with `SO_PEERCRED` and `SO_PEERGROUPS`, never with anything the
//! peer says), and serves each in a session of its own, on a thread of its
//! own, sharing its keys, policy and Flex-Mem pool.
//!
//! A peer's first message is one byte carrying its shared buffer (a sealed
//! memfd) as `SCM_RIGHTS`; then the world-boundary protocol runs as with a
//! socket pair. When a peer goes away its session ends: a running
//! generation stops at the next layer or token, and the session's models,
//! conversations and KV caches are scrubbed. On SIGTERM or SIGINT the
//! service closes every session, scrubs and releases all its memory, then exits.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use flexserve_protocol::{ErrorCode, Reply, SharedBuffer};
use flexserve_secure_mem::GranulePool;

use crate::platform::{CpuCompute, SocketChannel};
use crate::state::Principal;
use crate::world::{HeapProbe, SecureWorld};

/// Most sessions served at once; a peer beyond it is refused.
pub const MAX_SESSIONS: usize = 64;
/// Most sessions one peer uid holds at once; its next connection is refused.
/// A peer needs one session per sealed model it keeps loaded (a daemon: one
/// per loaded model plus one for its reserve) and one per CLI command it runs:
/// 16 covers a daemon with a dozen sealed models and a few commands beside it,
/// while one uid can take only a quarter of [`MAX_SESSIONS`], so that a runaway
/// or hostile peer leaves sessions for the others.
pub const MAX_SESSIONS_PER_PEER: usize = 16;
/// How long a new peer has to hand over its shared buffer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the accept loop looks at the stop flag.
const STOP_CHECK: Duration = Duration::from_millis(200);

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Who may connect: the peer's uid is the service's own or root, or the
/// peer is in `allowed_gid` (primary or supplementary group).
#[derive(Debug, Clone, Copy)]
pub struct Admission {
    pub allowed_gid: u32,
    pub own_uid: u32,
}

/// A peer's credentials as the kernel recorded them when it connected.
#[derive(Debug, Clone)]
pub struct PeerCredentials {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Admission {
    pub fn admits(&self, peer: &PeerCredentials) -> bool {
        peer.uid == self.own_uid
            || peer.uid == 0
            || peer.gid == self.allowed_gid
            || peer.groups.contains(&self.allowed_gid)
    }
}

/// Whether one more session for a peer of uid `uid` fits beside the live
/// sessions, whose peers' uids are `live`: `None`, or the refusal, naming the
/// bound it would pass ([`MAX_SESSIONS`] in all, [`MAX_SESSIONS_PER_PEER`] per uid).
pub fn session_bound(live: impl IntoIterator<Item = u32>, uid: u32) -> Option<String> {
    let (mut total, mut of_peer) = (0, 0);
    for live_uid in live {
        total += 1;
        of_peer += usize::from(live_uid == uid);
    }
    if total >= MAX_SESSIONS {
        return Some(format!("the secure world serves at most {MAX_SESSIONS} sessions at once (MAX_SESSIONS)"));
    }
    if of_peer >= MAX_SESSIONS_PER_PEER {
        return Some(format!(
            "uid {uid} already holds {of_peer} sessions: the secure world serves at most \
             {MAX_SESSIONS_PER_PEER} sessions per peer uid at once (MAX_SESSIONS_PER_PEER); end one first"
        ));
    }
    None
}

/// What the service needs beyond its listening socket.
pub struct ServiceParts {
    pub pool: GranulePool,
    pub principal: Arc<Principal>,
    pub heap: HeapProbe,
    pub max_memory: u64,
    pub threads: usize,
    pub admission: Admission,
}

struct Session {
    thread: JoinHandle<()>,
    /// The peer's uid, for [`MAX_SESSIONS_PER_PEER`].
    uid: u32,
    /// A second handle on the session's socket, to close it on shutdown.
    socket: UnixStream,
}

/// Installs the stop handlers (before the seccomp filter, which allows rt_sigaction anyway).
pub fn install_stop_handlers() -> Result<(), String> {
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: a zeroed sigaction with a handler that only stores to an
        // atomic (async-signal-safe); no SA_RESTART, so blocking calls return EINTR.
        let ok = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_stop_signal as *const () as usize;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut()) == 0
        };
        if !ok {
            return Err(format!("sigaction({signal}): {}", io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Serves peers until SIGTERM or SIGINT; returns once everything is scrubbed.
pub fn serve(listener: UnixListener, parts: ServiceParts) {
    let mut sessions: Vec<Session> = Vec::new();
    while !STOP.load(Ordering::SeqCst) {
        sessions.retain(|s| !s.thread.is_finished());
        if !readable(listener.as_raw_fd(), STOP_CHECK) {
            continue;
        }
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => continue,
            Err(e) => {
                eprintln!("flexserve-secure: accept: {e}");
                continue;
            }
        };
        let peer = match peer_credentials(&stream) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("flexserve-secure: peer credentials: {e}");
                continue;
            }
        };
        if !parts.admission.admits(&peer) {
            refuse(
                stream,
                ErrorCode::Policy,
                format!(
                    "uid {} (gid {}) is not admitted: this secure world serves members of group {}",
                    peer.uid, peer.gid, parts.admission.allowed_gid
                ),
            );
            continue;
        }
        // Finished sessions were dropped above: only live ones count.
        if let Some(why) = session_bound(sessions.iter().map(|s| s.uid), peer.uid) {
            refuse(stream, ErrorCode::NoMemory, why);
            continue;
        }
        let Ok(closer) = stream.try_clone() else { continue };
        let pool = parts.pool.clone();
        let principal = parts.principal.clone();
        let heap = HeapProbe { figures: parts.heap.figures, reset_peak: parts.heap.reset_peak };
        let (max_memory, threads) = (parts.max_memory, parts.threads);
        let spawned = std::thread::Builder::new().name(format!("session-{}", peer.pid)).spawn(move || {
            let shared = match receive_shared_buffer(&stream) {
                Ok(s) => s,
                Err(e) => return refuse(stream, ErrorCode::BadArgument, format!("handshake: {e}")),
            };
            let channel = match SocketChannel::new(stream, shared) {
                Ok(c) => c,
                Err(e) => return eprintln!("flexserve-secure: session of pid {}: {e}", peer.pid),
            };
            let mut world = SecureWorld::new(pool, channel, CpuCompute { threads }, principal, heap, max_memory);
            world.run();
            // Dropping the world scrubs the session's memory.
        });
        match spawned {
            Ok(thread) => sessions.push(Session { thread, uid: peer.uid, socket: closer }),
            Err(e) => eprintln!("flexserve-secure: starting a session: {e}"),
        }
    }
    // Closing every session's socket ends its loop (and stops a generation
    // at its next layer or token); each session scrubs what it held.
    for s in &sessions {
        let _ = s.socket.shutdown(std::net::Shutdown::Both);
    }
    for s in sessions {
        let _ = s.thread.join();
    }
    let released = parts.pool.release(usize::MAX);
    eprintln!("flexserve-secure: stopped; scrubbed and released {} granules", released.granules);
}

/// Whether `fd` becomes readable within `timeout` (false on a signal).
fn readable(fd: RawFd, timeout: Duration) -> bool {
    let mut p = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: poll reads and writes the one pollfd we own, for at most `timeout`.
    let n = unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) };
    n > 0
}

/// Answers a peer that is not served with one error frame, then closes.
fn refuse(mut stream: UnixStream, code: ErrorCode, message: String) {
    let _ = flexserve_protocol::write_reply(&mut stream, &Reply::Error { code, message });
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

/// The peer's pid, uid, gid and supplementary groups, from the kernel.
pub fn peer_credentials(stream: &UnixStream) -> io::Result<PeerCredentials> {
    let fd = stream.as_raw_fd();
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`.
    let r = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERCRED, (&mut cred as *mut libc::ucred).cast(), &mut len)
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut groups = vec![0u32; 256];
    let mut len = (groups.len() * 4) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `groups`.
    let r =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_PEERGROUPS, groups.as_mut_ptr().cast(), &mut len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        // A peer in more groups than fit is judged by its primary group alone.
        if e.raw_os_error() != Some(libc::ERANGE) {
            return Err(e);
        }
        len = 0;
    }
    groups.truncate(len as usize / 4);
    Ok(PeerCredentials { pid: cred.pid, uid: cred.uid, gid: cred.gid, groups })
}

/// Receives the peer's shared buffer: one byte with one descriptor attached.
pub fn receive_shared_buffer(stream: &UnixStream) -> Result<SharedBuffer, String> {
    let fd = stream.as_raw_fd();
    if !readable(fd, HANDSHAKE_TIMEOUT) {
        return Err(format!("no shared buffer within {} s", HANDSHAKE_TIMEOUT.as_secs()));
    }
    let mut byte = [0u8; 1];
    // Room for one descriptor's control message (CMSG_SPACE(4) is 16 or 24 bytes).
    let mut control = [0u64; 8];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // SAFETY: a zeroed msghdr is valid; we point it at our iovec and control buffer.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: recvmsg writes into the buffers msg points at, within their stated sizes.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error().to_string());
    }
    let mut received: Vec<OwnedFd> = Vec::new();
    // SAFETY: CMSG_FIRSTHDR/NXTHDR walk the control buffer the kernel filled,
    // bounded by msg_controllen; each SCM_RIGHTS payload holds whole descriptors.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(cmsg) as *const RawFd;
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                for i in 0..count {
                    received.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err("more descriptors than one were sent".to_string());
    }
    if n != 1 || received.len() != 1 {
        return Err(format!("expected one byte carrying one descriptor, got {n} bytes and {}", received.len()));
    }
    SharedBuffer::from_fd(received.remove(0)).map_err(|e| format!("shared buffer: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_goes_by_the_kernels_credentials() {
        let a = Admission { allowed_gid: 995, own_uid: 999 };
        let peer = |uid, gid, groups: &[u32]| PeerCredentials { pid: 1, uid, gid, groups: groups.to_vec() };
        assert!(a.admits(&peer(999, 999, &[])), "its own uid");
        assert!(a.admits(&peer(0, 0, &[])), "root");
        assert!(a.admits(&peer(1001, 995, &[])), "primary group");
        assert!(a.admits(&peer(1001, 1001, &[1001, 995])), "supplementary group");
        assert!(!a.admits(&peer(1002, 1002, &[1002, 27])), "anyone else");
    }

    #[test]
    fn sessions_are_bounded_per_peer_uid_and_in_all() {
        // A peer may hold MAX_SESSIONS_PER_PEER sessions, not one more; others are not held back.
        let full: Vec<u32> = vec![1001; MAX_SESSIONS_PER_PEER];
        assert_eq!(session_bound(full[1..].iter().copied(), 1001), None);
        let why = session_bound(full.iter().copied(), 1001).expect("one more than the bound");
        assert!(why.contains("MAX_SESSIONS_PER_PEER") && why.contains(&MAX_SESSIONS_PER_PEER.to_string()), "{why}");
        assert_eq!(session_bound(full.iter().copied(), 1002), None, "another uid");
        assert_eq!(session_bound(full.iter().copied().chain([1002, 0]), 0), None, "root counts as its own uid");
        // Finished sessions are dropped from the live list: one fewer, and the peer is served again.
        assert_eq!(session_bound(full.iter().copied().skip(1), 1001), None);
        // In all: MAX_SESSIONS, whoever holds them.
        let many: Vec<u32> = (0..MAX_SESSIONS as u32).map(|i| 2000 + i).collect();
        let why = session_bound(many.iter().copied(), 3000).expect("one more than the total");
        assert!(why.contains("(MAX_SESSIONS)") && why.contains(&MAX_SESSIONS.to_string()), "{why}");
        assert_eq!(session_bound(many[1..].iter().copied(), 3000), None);
    }
}
