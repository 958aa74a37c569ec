//! The link to a running secure world: one session, its requests and
//! replies, and what a broken link means.

use std::io::{BufReader, BufWriter, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use flexserve_protocol::{ProtocolError, Reply, Request, SharedBuffer, StatusReport, PROTOCOL_VERSION};

use crate::{
    connect_service, control, peer_pid, spawn_process, unexpected, MemoryBudget, NormalError, Recall, Result,
    SecureWorldOptions,
};

/// What the secure world said about itself on connecting.
#[derive(Debug, Clone)]
pub struct WorldInfo {
    pub protection: String,
    pub pool_mode: String,
    pub granule_size: u64,
    pub pid: u32,
}

/// A running secure world and the normal world's view of it.
pub struct SecureWorld {
    /// The development secure world this process started; `None` when
    /// connected to the service.
    pub(crate) child: Option<Child>,
    pub(crate) reader: BufReader<UnixStream>,
    pub(crate) writer: BufWriter<UnixStream>,
    pub(crate) shared: SharedBuffer,
    pub(crate) info: WorldInfo,
    pub(crate) budget_granules: u64,
    pub(crate) granted: u64,
    /// Memory pressure watch during generations: the floor of available
    /// memory, and when it was last checked.
    pub(crate) pressure: Option<(u64, Instant)>,
    pub(crate) recalls: Vec<Recall>,
    /// Where `flexserve recall` reaches this governor, once listening.
    pub(crate) control: Option<control::ControlSocket>,
    /// What the last generation's pipelined load read and how long it took.
    pub(crate) pipelined: Option<crate::LoadReport>,
    /// Grants on this session's behalf through another session (see [`Granter`]).
    pub(crate) granter: Option<Granter>,
    /// Models whose layers may be evicted, in this order, when a request
    /// needs more memory than the budget has left (see [`SecureWorld::set_eviction_order`]).
    pub(crate) eviction_order: Vec<u32>,
    /// The cores' lease, when they are shared with the normal world's work (Flex-NPU).
    pub(crate) lease: Option<std::sync::Arc<dyn CoreLease>>,
}

/// Flex-NPU on this platform: the compute cores are leased to one world at
/// a time. A session given a lease (see [`SecureWorld::set_core_lease`])
/// asks it (every millisecond) whether the other world waits; if so the secure
/// world pauses (its workers' scratch scrubbed), the lease is handed over,
/// and the generation resumes once it is back.
pub trait CoreLease: Send + Sync {
    /// Whether work of the other world waits for the cores.
    fn contended(&self) -> bool;
    /// Hands the cores to the waiting work (the secure world has paused;
    /// `scrubbed`: every worker's scratch read zero after it scrubbed them)
    /// and returns once they are this session's again.
    fn hand_over(&self, scrubbed: bool);
}

/// Grants `granules` of secure memory through another session of the secure
/// world whose pid is given, and says how many it granted; an error when it
/// cannot (no session with that secure world, or that session is lost).
///
/// Granules a session grants itself go back to the system when it ends;
/// granules granted through a long-lived session (a daemon's reserve keeper)
/// stay in the secure world's shared pool when the session that used them
/// ends, scrubbed, and the next model loads into them without protecting
/// memory again.
pub type Granter = std::sync::Arc<dyn Fn(u32, u64) -> std::result::Result<u64, String> + Send + Sync>;

impl Drop for SecureWorld {
    fn drop(&mut self) {
        // Closing the channel ends the session (and a development secure world: reap it).
        let _ = self.writer.get_ref().shutdown(std::net::Shutdown::Both);
        let Some(child) = self.child.as_mut() else { return };
        if let Ok(None) = child.try_wait() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl SecureWorld {
    /// Starts a development secure world (this user's child, unprotected) and greets it.
    pub fn spawn(opts: &SecureWorldOptions) -> Result<SecureWorld> {
        let raw = spawn_process(opts)?;
        let pid = raw.child.id();
        Self::greet(Some(raw.child), raw.socket, raw.shared, raw.budget_bytes, pid)
    }

    /// Opens a session with the secure world service listening at `socket`;
    /// this side grants at most `budget` of secure memory.
    pub fn connect(socket: &Path, budget: MemoryBudget) -> Result<SecureWorld> {
        let raw = connect_service(socket)?;
        let pid = peer_pid(&raw.socket).unwrap_or(0);
        Self::greet(None, raw.socket, raw.shared, budget.bytes(), pid)
    }

    pub(crate) fn greet(
        child: Option<Child>,
        socket: UnixStream,
        shared: SharedBuffer,
        budget_bytes: u64,
        pid: u32,
    ) -> Result<SecureWorld> {
        let mut world = SecureWorld {
            child,
            reader: BufReader::new(socket.try_clone()?),
            writer: BufWriter::new(socket),
            shared,
            info: WorldInfo { protection: String::new(), pool_mode: String::new(), granule_size: 0, pid },
            budget_granules: 0,
            granted: 0,
            pressure: None,
            recalls: Vec::new(),
            control: None,
            pipelined: None,
            granter: None,
            eviction_order: Vec::new(),
            lease: None,
        };
        let hello = world.send(&Request::Hello { version: PROTOCOL_VERSION });
        // A service that does not serve this peer (a bound reached) answers
        // one error frame and closes, possibly before the greeting is
        // written: read what it said rather than report the broken pipe.
        let reply = match hello.and_then(|()| world.receive()) {
            Err(e @ NormalError::SessionClosed(_)) => match flexserve_protocol::read_reply(&mut world.reader) {
                Ok(Reply::Error { code, message }) => return Err(NormalError::Secure { code, message }),
                _ => return Err(e),
            },
            Err(e) => return Err(e),
            Ok(Reply::Error { code, message }) => return Err(NormalError::Secure { code, message }),
            Ok(reply) => reply,
        };
        match reply {
            Reply::Hello { protection, pool_mode, granule_size, .. } => {
                world.info = WorldInfo { protection, pool_mode, granule_size, pid };
            }
            other => return Err(unexpected("Hello", &other)),
        }
        world.budget_granules = budget_bytes / world.info.granule_size.max(1);
        Ok(world)
    }

    /// Whether this session runs on a development secure world (unprotected).
    pub fn is_development(&self) -> bool {
        self.child.is_some()
    }

    /// The device's public key (hex), which the secure world generated and keeps.
    pub fn device_public_key(&mut self) -> Result<String> {
        match self.call(&Request::DevicePublicKey)? {
            Reply::DevicePublicKey { key } => Ok(key),
            other => Err(unexpected("DevicePublicKey", &other)),
        }
    }

    /// Has the secure world seal a raw model key (64 hex digits) under its
    /// device key; returns the stored form (hex) to keep instead of the key.
    pub fn import_key(&mut self, key_hex: String) -> Result<String> {
        match self.call(&Request::ImportKey { key: key_hex })? {
            Reply::KeyImported { stored } => Ok(stored),
            other => Err(unexpected("KeyImported", &other)),
        }
    }

    /// The secure world's identity report (JSON) and its signature (hex).
    pub fn identity(&mut self) -> Result<(String, String)> {
        match self.call(&Request::Identity)? {
            Reply::Identity { report, signature } => Ok((report, signature)),
            other => Err(unexpected("Identity", &other)),
        }
    }

    /// Hands a stored key (from [`SecureWorld::import_key`]) to this session.
    pub fn add_stored_key(&mut self, stored_hex: String) -> Result<()> {
        match self.call(&Request::AddStoredKey { stored: stored_hex })? {
            Reply::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    pub fn info(&self) -> &WorldInfo {
        &self.info
    }

    /// Granules the normal world has granted so far.
    pub fn granted(&self) -> u64 {
        self.granted
    }

    pub fn budget_granules(&self) -> u64 {
        self.budget_granules
    }

    /// Sends one request and reads one reply; an error reply becomes [`NormalError::Secure`].
    pub fn call(&mut self, request: &Request) -> Result<Reply> {
        self.send(request)?;
        match self.receive()? {
            Reply::Error { code, message } => Err(NormalError::Secure { code, message }),
            r => Ok(r),
        }
    }

    pub(crate) fn send(&mut self, request: &Request) -> Result<()> {
        let sent = flexserve_protocol::write_request(&mut self.writer, request)
            .and_then(|_| self.writer.flush().map_err(ProtocolError::Io));
        sent.map_err(|e| self.explain(e))
    }

    pub(crate) fn receive(&mut self) -> Result<Reply> {
        flexserve_protocol::read_reply(&mut self.reader).map_err(|e| self.explain(e))
    }

    /// A broken channel usually means the secure world died: say how.
    pub(crate) fn explain(&mut self, e: ProtocolError) -> NormalError {
        if matches!(e, ProtocolError::Closed | ProtocolError::Io(_)) {
            let Some(child) = self.child.as_mut() else {
                return NormalError::SessionClosed(e.to_string());
            };
            // Give a dying process a moment to be reaped.
            for _ in 0..50 {
                if let Ok(Some(status)) = child.try_wait() {
                    let how = match (status.code(), status.signal()) {
                        (_, Some(sig)) => format!("killed by signal {sig}"),
                        (Some(code), _) => format!("exit code {code}"),
                        _ => status.to_string(),
                    };
                    return NormalError::Died(how);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            return NormalError::Died(format!("channel closed: {e}"));
        }
        NormalError::Protocol(e)
    }

    /// Shares the cores with the normal world's work through `lease`: a
    /// generation pauses at its next layer or token when the other world waits.
    pub fn set_core_lease(&mut self, lease: std::sync::Arc<dyn CoreLease>) {
        self.lease = Some(lease);
    }

    /// Has this session's grants made through `granter` from now on, falling
    /// back to granting itself whenever the granter cannot.
    pub fn set_granter(&mut self, granter: Granter) {
        self.granter = Some(granter);
    }

    /// Whether grants go through a granter (see [`SecureWorld::set_granter`]).
    pub(crate) fn grants_elsewhere(&self) -> bool {
        self.granter.is_some()
    }

    /// Grants up to `granules` more (within the budget); returns how many were granted.
    pub fn grant(&mut self, granules: u64) -> Result<u64> {
        if let Some(granter) = &self.granter {
            // The granter holds the budget of all the sessions it serves: its
            // answer stands. When it cannot answer, this session grants itself.
            if let Ok(n) = granter(self.info.pid, granules) {
                self.granted += n;
                return Ok(n);
            }
        }
        let room = self.budget_granules.saturating_sub(self.granted);
        let n = granules.min(room);
        if n == 0 {
            return Ok(0);
        }
        match self.call(&Request::Grant { granules: n as u32 })? {
            Reply::Granted { granted, .. } => {
                self.granted = u64::from(granted);
                Ok(n)
            }
            other => Err(unexpected("Granted", &other)),
        }
    }

    /// Takes back `granules` granules; returns (released, of which evicted model memory, time).
    pub fn recall(&mut self, granules: u32) -> Result<(u32, u32, Duration)> {
        match self.call(&Request::Recall { granules })? {
            Reply::Recalled { released, evicted, micros } => {
                self.granted = self.granted.saturating_sub(u64::from(released));
                Ok((released, evicted, Duration::from_micros(micros)))
            }
            other => Err(unexpected("Recalled", &other)),
        }
    }

    /// Has the secure world scrub layers of `model` (its last layers first)
    /// until `granules` granules are free; they stay granted, for the next
    /// load. Returns (granules freed, layer groups scrubbed, time).
    pub fn evict(&mut self, model: u32, granules: u32) -> Result<(u32, u32, Duration)> {
        match self.call(&Request::Evict { model, granules })? {
            Reply::Evicted { freed, groups, micros } => Ok((freed, groups, Duration::from_micros(micros))),
            other => Err(unexpected("Evicted", &other)),
        }
    }

    /// Closes a model: its memory is scrubbed back into the free pool (still granted).
    pub fn unload(&mut self, model: &crate::OpenedModel) -> Result<()> {
        match self.call(&Request::Unload { model: model.id })? {
            Reply::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    /// The models whose layers may be given up, first to last, when a request
    /// needs more memory than the budget has left: a scheduler that knows
    /// what runs next puts the model needed furthest ahead first. Empty (the
    /// default): such a request fails with a budget error.
    pub fn set_eviction_order(&mut self, models: Vec<u32>) {
        self.eviction_order = models;
    }

    pub fn status(&mut self) -> Result<StatusReport> {
        match self.call(&Request::Status)? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected("Status", &other)),
        }
    }

    /// Whether a reply can be read without waiting more than `timeout`.
    pub(crate) fn reply_ready(&self, timeout: Duration) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let mut fd = libc::pollfd { fd: self.reader.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd we own for at most `timeout`.
        let ready = unsafe { libc::poll(&mut fd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        // Errors and hang-ups count as ready: the read that follows reports them.
        ready != 0
    }

    /// Asks the secure world to stop and waits for it.
    pub fn shutdown(mut self) -> Result<()> {
        let result = self.call(&Request::Shutdown).map(|_| ());
        if let Some(child) = self.child.as_mut() {
            let _ = child.wait();
        }
        result
    }

    pub fn pid(&self) -> u32 {
        self.info.pid
    }
}
