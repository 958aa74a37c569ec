//! The normal world's side of the world boundary.
//!
//! [`SecureWorld`] connects to the secure world, which runs as its own
//! principal ([`SecureWorld::connect`], a Unix socket that its launcher
//! bound; see `docs/secure-world.md`), or, in development mode, starts it as
//! this user's child ([`SecureWorld::spawn`], unprotected). It hands over a
//! shared buffer, and drives the secure world: it reads
//! sealed headers and ciphertext chunks from storage into the shared buffer
//! (the normal world does the I/O, never the decryption), grants secure
//! memory within its budget ([`MemoryBudget`], the management right of
//! Flex-Mem), recalls it, and relays generation requests. It never holds a
//! key, a plaintext weight or a token id.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod control;

use flexserve_protocol::{
    BufferRange, ChunkRef, ErrorCode, GenerateRequest, GenerationReport, ProtocolError, Reply, Request, SharedBuffer,
    StatusReport, PROTOCOL_VERSION,
};
use flexserve_sealed::SealedHeader;

/// Name of the secure world's executable.
pub const SECURE_BINARY: &str = "flexserve-secure";
/// Granule size the secure world is started with unless told otherwise. Each
/// layer is one region of whole granules, and a small model's layers are a few
/// MiB: 2 MiB granules would waste up to a third of the memory there, 256 KiB
/// granules about 5%, while the per-granule cost (a few system calls) stays
/// small next to protecting the pages themselves.
pub const DEFAULT_GRANULE_SIZE: usize = 256 << 10;

/// Shared buffer size: two halves that each hold the largest chunk (64 MiB
/// plus its tag). Pages are only allocated where written.
pub const DEFAULT_SHARED_LEN: usize = 130 << 20;
/// Ciphertext sent per LoadChunks: small enough that reading the next batch
/// overlaps decrypting this one, large enough to keep round trips rare.
pub const LOAD_BATCH_BYTES: u64 = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NormalError {
    #[error("secure world executable not found: {0} (build the workspace with `cargo build --release`, or set FLEXSERVE_SECURE_BIN)")]
    BinaryNotFound(PathBuf),
    #[error("starting the secure world {path}: {source}")]
    Spawn { path: PathBuf, source: std::io::Error },
    #[error("the secure world terminated ({0}); the request was lost, a new request starts a new secure world")]
    Died(String),
    #[error("the secure world service closed this session ({0}); the request was lost")]
    SessionClosed(String),
    #[error("no secure world service at {path}: {source} (start it as root with flexserve-launcher, see docs/secure-world.md; or run with --dev for an unprotected development secure world)")]
    NoService { path: PathBuf, source: std::io::Error },
    #[error("the secure world at {path} does not admit this user: its socket is for the members of its group (ask its administrator to add you)")]
    NotAdmitted { path: PathBuf },
    #[error("secure world: {message} [{code:?}]")]
    Secure { code: ErrorCode, message: String },
    #[error("the secure world answered {got} where {expected} was expected")]
    Unexpected { expected: &'static str, got: String },
    #[error("secure memory limit: {0}")]
    Budget(String),
    #[error("{path}: {message}")]
    Model { path: PathBuf, message: String },
    #[error("world boundary: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

type Result<T> = std::result::Result<T, NormalError>;

/// How much secure memory the normal world lets the secure world hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryBudget {
    Bytes(u64),
    /// Three quarters of the memory available when the secure world starts.
    Auto,
}

impl MemoryBudget {
    /// Parses `auto`, a number of bytes, or a number with K, M, G (binary units).
    pub fn parse(text: &str) -> std::result::Result<MemoryBudget, String> {
        let t = text.trim();
        if t.eq_ignore_ascii_case("auto") {
            return Ok(MemoryBudget::Auto);
        }
        let (digits, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit() && *c != '.') {
            Some((i, _)) => t.split_at(i),
            None => (t, ""),
        };
        let value: f64 = digits.parse().map_err(|_| format!("memory size {text:?}: expected e.g. 512M, 2G or auto"))?;
        let scale = match unit.trim().to_ascii_uppercase().trim_end_matches("IB").trim_end_matches('B') {
            "" => 1u64,
            "K" => 1 << 10,
            "M" => 1 << 20,
            "G" => 1 << 30,
            "T" => 1 << 40,
            _ => return Err(format!("memory size {text:?}: unknown unit {unit:?} (use K, M, G)")),
        };
        Ok(MemoryBudget::Bytes((value * scale as f64) as u64))
    }

    fn bytes(self) -> u64 {
        match self {
            MemoryBudget::Bytes(b) => b,
            MemoryBudget::Auto => available_memory().map_or(4 << 30, |a| a / 4 * 3),
        }
    }
}

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

/// What the secure world said about itself on connecting.
#[derive(Debug, Clone)]
pub struct WorldInfo {
    pub protection: String,
    pub pool_mode: String,
    pub granule_size: u64,
    pub pid: u32,
}

/// A sealed model opened in the secure world.
pub struct OpenedModel {
    pub id: u32,
    pub path: PathBuf,
    pub chunks: u32,
    pub granules_needed: u32,
    header: SealedHeader,
    file: File,
}

/// Timings of making a model resident.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub chunks: usize,
    pub bytes: u64,
    /// Granting (the secure world preparing protected granules).
    pub grant: Duration,
    /// Reading ciphertext into the shared buffer.
    pub read: Duration,
    /// The secure world copying, decrypting and verifying (what of it did not
    /// overlap with reading the next batch).
    pub decrypt: Duration,
    /// Verifying the header and preparing tokenizer and template (OpenModel).
    pub open: Duration,
    pub total: Duration,
}

/// A running secure world and the normal world's view of it.
pub struct SecureWorld {
    /// The development secure world this process started; `None` when
    /// connected to the service.
    child: Option<Child>,
    reader: BufReader<UnixStream>,
    writer: BufWriter<UnixStream>,
    shared: SharedBuffer,
    info: WorldInfo,
    budget_granules: u64,
    granted: u64,
    /// Memory pressure watch during generations: the floor of available
    /// memory, and when it was last checked.
    pressure: Option<(u64, Instant)>,
    recalls: Vec<Recall>,
    /// Where `flexserve recall` reaches this governor, once listening.
    control: Option<control::ControlSocket>,
}

/// A recall the governor made, and what it got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recall {
    pub requested: u32,
    pub released: u32,
    /// Of those, granules that held model layers or KV caches.
    pub evicted: u32,
    pub took: Duration,
    /// Made while a generation was running (only free granules come back then).
    pub during_generation: bool,
    /// Asked for through the control socket (`flexserve recall`), not by the pressure watch.
    pub by_client: bool,
}

/// A recall sent while a generation runs, waiting for its answer.
struct InFlightRecall {
    requested: u32,
    sent: Instant,
    /// The `flexserve recall` client that asked for it, if one did.
    asker: Option<control::PendingRecall>,
}

/// How often available memory is checked while a generation runs.
const PRESSURE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

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

    fn greet(
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
        };
        match world.call(&Request::Hello { version: PROTOCOL_VERSION })? {
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

    fn send(&mut self, request: &Request) -> Result<()> {
        let sent = flexserve_protocol::write_request(&mut self.writer, request)
            .and_then(|_| self.writer.flush().map_err(ProtocolError::Io));
        sent.map_err(|e| self.explain(e))
    }

    fn receive(&mut self) -> Result<Reply> {
        flexserve_protocol::read_reply(&mut self.reader).map_err(|e| self.explain(e))
    }

    /// A broken channel usually means the secure world died: say how.
    fn explain(&mut self, e: ProtocolError) -> NormalError {
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

    /// Grants up to `granules` more (within the budget); returns how many were granted.
    pub fn grant(&mut self, granules: u64) -> Result<u64> {
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

    /// The governor's answer to memory pressure: when the system's available
    /// memory is below `floor` bytes, recall enough granules to restore it
    /// (as far as the secure world holds any). Returns what was recalled.
    /// Watch memory pressure while generations run: when available memory is
    /// below `floor` bytes (checked every 50 ms, between tokens), recall what
    /// restores it. The secure world answers between two tokens with the
    /// granules it can give at once (the free ones); see [`SecureWorld::take_recalls`].
    pub fn set_memory_floor(&mut self, floor: Option<u64>) {
        self.pressure = floor.map(|f| (f, Instant::now() - PRESSURE_CHECK_INTERVAL));
    }

    /// Recalls made by the pressure watch or asked through the control socket since the last call.
    pub fn take_recalls(&mut self) -> Vec<Recall> {
        std::mem::take(&mut self.recalls)
    }

    pub fn relieve_pressure(&mut self, floor: u64) -> Result<Option<(u32, u32, Duration)>> {
        let Some(available) = available_memory() else { return Ok(None) };
        let n = pressure_recall_granules(available, floor, self.info.granule_size, self.granted);
        if n == 0 {
            return Ok(None);
        }
        self.recall(n).map(Some)
    }

    pub fn status(&mut self) -> Result<StatusReport> {
        match self.call(&Request::Status)? {
            Reply::Status(s) => Ok(s),
            other => Err(unexpected("Status", &other)),
        }
    }

    /// Opens a sealed model: reads its header, has the secure world verify
    /// it, grants the memory its weights need, and loads every chunk.
    pub fn open_model(&mut self, path: &Path) -> Result<(OpenedModel, LoadReport)> {
        let model_err = |message: String| NormalError::Model { path: path.to_path_buf(), message };
        let file = File::open(path).map_err(|e| model_err(e.to_string()))?;
        let prefix =
            SealedHeader::read_prefix(BufReader::new(&file)).map_err(|e| model_err(format!("sealed header: {e}")))?;
        let header = SealedHeader::read(&prefix).map_err(|e| model_err(format!("sealed header: {e}")))?;
        if prefix.len() > self.shared.len() {
            return Err(model_err(format!(
                "header of {} bytes does not fit the {}-byte shared buffer",
                prefix.len(),
                self.shared.len()
            )));
        }
        self.shared.copy_in(0, &prefix).map_err(|e| model_err(e.to_string()))?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let range = BufferRange { offset: 0, len: prefix.len() as u64 };
        // Grant what the weights will need (computed from the public tensor
        // directory) before the secure world even verifies the header: it
        // prepares the granules in the background meanwhile.
        let estimate = weight_granules(&header.gguf, self.info.granule_size);
        let status = self.status()?;
        let free = u64::from(status.prepared.saturating_sub(status.in_use));
        let tg = Instant::now();
        self.grant(estimate.saturating_sub(free))?;
        let grant = tg.elapsed();
        let t0 = Instant::now();
        let (id, chunks, granules_needed) = match self.call(&Request::OpenModel { name, header: range })? {
            Reply::ModelOpened { model, chunks, granules_needed } => (model, chunks, granules_needed),
            other => return Err(unexpected("ModelOpened", &other)),
        };
        let open = t0.elapsed();
        let opened = OpenedModel { id, path: path.to_path_buf(), chunks, granules_needed, header, file };
        let mut report = self.load_missing(&opened, false)?;
        report.open = open;
        report.grant += grant;
        Ok((opened, report))
    }

    /// Loads whatever chunks of the model are not resident (never loaded, or
    /// evicted by a recall), granting memory as needed within the budget.
    pub fn make_resident(&mut self, model: &OpenedModel) -> Result<LoadReport> {
        self.load_missing(model, true)
    }

    /// Loads the missing chunks; with `top_up`, first grants what the model
    /// needs beyond the free granules (else the caller already granted).
    fn load_missing(&mut self, model: &OpenedModel, top_up: bool) -> Result<LoadReport> {
        let t0 = Instant::now();
        let mut report = LoadReport::default();
        let missing: Vec<usize> = match self.call(&Request::MissingChunks { model: model.id })? {
            Reply::Missing { chunks } => chunks.iter().flat_map(|s| s.start as usize..s.end as usize).collect(),
            other => return Err(unexpected("Missing", &other)),
        };
        if missing.is_empty() {
            return Ok(report);
        }
        // Grant what the model needs beyond the free granted granules. The
        // secure world prepares the granules while this side reads the first
        // batch of ciphertext.
        let grant = if top_up {
            let status = self.status()?;
            let free = u64::from(status.prepared.saturating_sub(status.in_use));
            let need = u64::from(model.granules_needed).saturating_sub(u64::from(status.in_use)).saturating_sub(free);
            need.min(self.budget_granules.saturating_sub(self.granted))
        } else {
            0
        };
        let tg = Instant::now();
        if grant > 0 {
            self.send(&Request::Grant { granules: grant as u32 })?;
        }

        // Two halves of the shared buffer take turns: while the secure world
        // decrypts the batch in one, the next batch is read into the other.
        let half = self.shared.len() as u64 / 2;
        let mut next = 0;
        let mut turn = 0u64;
        let mut in_flight: Option<(Request, usize, Instant)> = None;
        let mut grant_pending = grant > 0;
        loop {
            let tr = Instant::now();
            let batch = self.read_batch(model, &missing, &mut next, turn * half, half, &mut report)?;
            report.read += tr.elapsed();
            if grant_pending {
                grant_pending = false;
                match self.receive()? {
                    Reply::Granted { granted, .. } => self.granted = u64::from(granted),
                    Reply::Error { code, message } => return Err(NormalError::Secure { code, message }),
                    other => return Err(unexpected("Granted", &other)),
                }
                report.grant += tg.elapsed();
            }
            if let Some((request, n, since)) = in_flight.take() {
                self.finish_load(&request)?;
                report.decrypt += since.elapsed();
                report.chunks += n;
            }
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            let request = Request::LoadChunks { model: model.id, chunks: batch };
            self.send(&request)?;
            in_flight = Some((request, n, Instant::now()));
            turn ^= 1;
        }
        report.total = t0.elapsed();
        Ok(report)
    }

    /// Reads the next missing chunks into `base .. base + room` of the shared
    /// buffer, up to about [`LOAD_BATCH_BYTES`] (at least one chunk).
    fn read_batch(
        &mut self,
        model: &OpenedModel,
        missing: &[usize],
        next: &mut usize,
        base: u64,
        room: u64,
        report: &mut LoadReport,
    ) -> Result<Vec<ChunkRef>> {
        let mut batch = Vec::new();
        let mut used = 0u64;
        while *next < missing.len() && used < LOAD_BATCH_BYTES {
            let index = missing[*next];
            let info = model.header.chunks.get(index).copied().ok_or_else(|| NormalError::Model {
                path: model.path.clone(),
                message: format!("chunk {index} is not in the header"),
            })?;
            let len = info.sealed_len() as u64;
            if used + len > room {
                if batch.is_empty() {
                    return Err(NormalError::Model {
                        path: model.path.clone(),
                        message: format!("chunk {index} ({len} bytes) does not fit half of the shared buffer"),
                    });
                }
                break;
            }
            let range = BufferRange { offset: base + used, len };
            let dst = self.shared.range_mut(range).map_err(|e| NormalError::Budget(e.to_string()))?;
            model.file.read_exact_at(dst, info.file_offset).map_err(|e| NormalError::Model {
                path: model.path.clone(),
                message: format!("reading chunk {index}: {e}"),
            })?;
            batch.push(ChunkRef { index: index as u32, at: range });
            report.bytes += len;
            used += len;
            *next += 1;
        }
        Ok(batch)
    }

    /// Waits for the answer to a LoadChunks already sent; when the secure
    /// world runs short of memory (layers are placed in whole granules, so the
    /// estimate can fall short), grants one more granule within the budget and
    /// sends the request again (chunks already loaded are skipped).
    fn finish_load(&mut self, request: &Request) -> Result<()> {
        let mut reply = self.receive()?;
        loop {
            match reply {
                Reply::ChunksLoaded { .. } => return Ok(()),
                Reply::Error { code: ErrorCode::NoMemory, message } => {
                    if self.grant(1)? == 0 {
                        return Err(NormalError::Budget(format!(
                            "{message}; the secure memory limit ({} granules of {} bytes) is reached",
                            self.budget_granules, self.info.granule_size
                        )));
                    }
                    self.send(request)?;
                    reply = self.receive()?;
                }
                Reply::Error { code, message } => return Err(NormalError::Secure { code, message }),
                other => return Err(unexpected("ChunksLoaded", &other)),
            }
        }
    }

    /// Generates, streaming each piece of text to `on_text`. If the model's
    /// memory was recalled since, its missing chunks are loaded first.
    pub fn generate(
        &mut self,
        model: &OpenedModel,
        request: GenerateRequest,
        on_text: impl FnMut(&str),
    ) -> Result<GenerationReport> {
        self.generate_until(model, request, on_text, || false)
    }

    /// [`SecureWorld::generate`] that stops once `cancelled` says so (checked
    /// between tokens and every 50 ms of a prefill): the secure world is sent
    /// `Cancel`, stops at its next layer or token, and the result is
    /// `Secure{Cancelled}`.
    pub fn generate_until(
        &mut self,
        model: &OpenedModel,
        request: GenerateRequest,
        mut on_text: impl FnMut(&str),
        cancelled: impl Fn() -> bool,
    ) -> Result<GenerationReport> {
        self.make_resident(model)?;
        let request = Request::Generate(request);
        self.send(&request)?;
        // Recalls sent during the generation, oldest first.
        let mut in_flight: VecDeque<InFlightRecall> = VecDeque::new();
        let mut result = None;
        // A Cancel sent, and whether its Ok came back (it must, before the next request).
        let (mut cancel_sent, mut cancel_acked) = (false, false);
        loop {
            // A long prefill sends nothing for a while: the watch goes on meanwhile.
            while in_flight.is_empty() && result.is_none() && !self.reply_ready(PRESSURE_CHECK_INTERVAL) {
                self.send_due_recall(&mut in_flight)?;
                if !cancel_sent && cancelled() {
                    self.send(&Request::Cancel)?;
                    cancel_sent = true;
                }
            }
            if !cancel_sent && result.is_none() && cancelled() {
                self.send(&Request::Cancel)?;
                cancel_sent = true;
            }
            match self.receive()? {
                Reply::Ok if cancel_sent && !cancel_acked => cancel_acked = true,
                // Cancelled before it started: do not ask again.
                Reply::MemoryNeeded { .. } if result.is_none() && cancelled() => {
                    result = Some(Err(NormalError::Secure {
                        code: ErrorCode::Cancelled,
                        message: "cancelled before the generation started".to_string(),
                    }))
                }
                // Before any token: the KV cache needs more granules; grant, ask again.
                Reply::MemoryNeeded { granules } if result.is_none() => {
                    // A recall sent meanwhile is answered next, as a request of its own.
                    while let Some(recall) = in_flight.pop_front() {
                        match self.receive()? {
                            Reply::Recalled { released, evicted, micros } => {
                                self.recall_answered(recall, released, evicted, micros, false)
                            }
                            other => return Err(unexpected("Recalled", &other)),
                        }
                    }
                    self.grant_for_kv_cache(granules)?;
                    // A recall answered meanwhile may have evicted layers.
                    self.make_resident(model)?;
                    self.send(&request)?;
                }
                Reply::Token { text } => {
                    on_text(&text);
                    if in_flight.is_empty() {
                        self.send_due_recall(&mut in_flight)?;
                    }
                }
                Reply::Recalled { released, evicted, micros } => {
                    let Some(recall) = in_flight.pop_front() else {
                        return Err(unexpected("Token or Generated", &Reply::Recalled { released, evicted, micros }));
                    };
                    self.recall_answered(recall, released, evicted, micros, result.is_none());
                }
                Reply::Generated(report) => result = Some(Ok(report)),
                Reply::Error { code, message } => result = Some(Err(NormalError::Secure { code, message })),
                other => return Err(unexpected("Token or Generated", &other)),
            }
            // A recall or a cancel sent as the generation ended is answered after it.
            if in_flight.is_empty() && (!cancel_sent || cancel_acked) {
                if let Some(r) = result {
                    return r;
                }
            }
        }
    }

    /// Sends the recall that is due (memory pressure first, then a
    /// `flexserve recall`), if any, and notes it as in flight.
    fn send_due_recall(&mut self, in_flight: &mut VecDeque<InFlightRecall>) -> Result<()> {
        let (requested, asker) = match self.pressure_due() {
            Some(n) => (n, None),
            None => match self.control_pending() {
                Some(p) => (p.amount.granules(self.info.granule_size), Some(p)),
                None => return Ok(()),
            },
        };
        self.send(&Request::Recall { granules: requested })?;
        in_flight.push_back(InFlightRecall { requested, sent: Instant::now(), asker });
        Ok(())
    }

    /// Notes what a recall sent during a generation got back, and tells the
    /// client that asked for it, if one did.
    fn recall_answered(&mut self, recall: InFlightRecall, released: u32, evicted: u32, micros: u64, during: bool) {
        let took = recall.sent.elapsed();
        self.note_recall(recall.requested, released, evicted, took, during, recall.asker.is_some());
        if let Some(asker) = recall.asker {
            asker.answer(Ok(self.answer(released, evicted, micros)));
        }
    }

    /// Listens for `flexserve recall` on a control socket in `dir` (see
    /// [`control`]); requests are served between tokens of a generation and
    /// by [`SecureWorld::serve_control`] when idle. Returns the socket's path.
    pub fn listen(&mut self, dir: &Path) -> std::io::Result<PathBuf> {
        let socket = control::ControlSocket::bind(dir)?;
        let path = socket.path().to_path_buf();
        self.control = Some(socket);
        Ok(path)
    }

    fn control_pending(&self) -> Option<control::PendingRecall> {
        self.control.as_ref()?.next_pending()
    }

    fn answer(&self, released: u32, evicted: u32, micros: u64) -> control::RecallAnswer {
        control::RecallAnswer {
            released,
            evicted,
            micros,
            granule_size: self.info.granule_size,
            secure_pid: self.pid(),
        }
    }

    /// Serves the `flexserve recall` requests waiting (in full: free
    /// granules, then layers, then idle KV caches); returns how many.
    pub fn serve_control(&mut self) -> Result<usize> {
        let mut served = 0;
        while let Some(asker) = self.control_pending() {
            let n = asker.amount.granules(self.info.granule_size);
            let t0 = Instant::now();
            match self.recall(n) {
                Ok((released, evicted, took)) => {
                    let took_all = t0.elapsed();
                    self.recalls.push(Recall {
                        requested: n,
                        released,
                        evicted,
                        took: took_all,
                        during_generation: false,
                        by_client: true,
                    });
                    asker.answer(Ok(self.answer(released, evicted, took.as_micros() as u64)));
                }
                Err(e) => {
                    asker.answer(Err(e.to_string()));
                    return Err(e);
                }
            }
            served += 1;
        }
        Ok(served)
    }

    /// Whether a reply can be read without waiting more than `timeout`.
    fn reply_ready(&self, timeout: Duration) -> bool {
        if !self.reader.buffer().is_empty() {
            return true;
        }
        let mut fd = libc::pollfd { fd: self.reader.get_ref().as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: poll reads and writes the one pollfd we own for at most `timeout`.
        let ready = unsafe { libc::poll(&mut fd, 1, timeout.as_millis().min(i32::MAX as u128) as i32) };
        // Errors and hang-ups count as ready: the read that follows reports them.
        ready != 0
    }

    /// Granules to recall now, if the pressure watch is on and due.
    fn pressure_due(&mut self) -> Option<u32> {
        let (floor, last) = self.pressure?;
        if last.elapsed() < PRESSURE_CHECK_INTERVAL {
            return None;
        }
        self.pressure = Some((floor, Instant::now()));
        let n = pressure_recall_granules(available_memory()?, floor, self.info.granule_size, self.granted);
        (n > 0).then_some(n)
    }

    fn note_recall(&mut self, requested: u32, released: u32, evicted: u32, took: Duration, during: bool, client: bool) {
        self.granted = self.granted.saturating_sub(u64::from(released));
        self.recalls.push(Recall { requested, released, evicted, took, during_generation: during, by_client: client });
    }

    /// Perplexity of `text` under the model, scored in the secure world:
    /// (tokens, chunks, perplexity, its standard error).
    pub fn perplexity(&mut self, model: &OpenedModel, text: String, n_ctx: u32) -> Result<(u32, u32, f64, f64)> {
        self.make_resident(model)?;
        let request = Request::Perplexity { model: model.id, text, n_ctx };
        loop {
            match self.call(&request)? {
                Reply::Perplexity { tokens, chunks, ppl, ppl_err } => return Ok((tokens, chunks, ppl, ppl_err)),
                Reply::MemoryNeeded { granules } => self.grant_for_kv_cache(granules)?,
                other => return Err(unexpected("Perplexity", &other)),
            }
        }
    }

    /// Grants what a KV cache needs, all of it or a budget error.
    fn grant_for_kv_cache(&mut self, granules: u32) -> Result<()> {
        let granted = self.grant(u64::from(granules))?;
        if granted < u64::from(granules) {
            return Err(NormalError::Budget(format!(
                "the KV cache needs {granules} more granules of {} bytes; the secure memory limit ({} granules) \
                 is reached",
                self.info.granule_size, self.budget_granules
            )));
        }
        Ok(())
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

fn unexpected(expected: &'static str, got: &Reply) -> NormalError {
    let got: String = format!("{got:?}").chars().take(200).collect();
    NormalError::Unexpected { expected, got }
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

/// Granules a model's weights take in the secure world: one region of whole
/// granules per transformer layer (`blk.N.*`) and one for the other tensors,
/// tensors 64-byte aligned inside a region.
pub fn weight_granules(header: &flexserve_gguf::GgufHeader, granule_size: u64) -> u64 {
    let mut groups: std::collections::BTreeMap<Option<usize>, u64> = std::collections::BTreeMap::new();
    for t in &header.tensors {
        let range = header.tensor_file_range(t);
        let bytes = groups.entry(t.layer()).or_default();
        *bytes = bytes.next_multiple_of(64) + (range.end - range.start);
    }
    groups.values().map(|b| b.div_ceil(granule_size.max(1))).sum()
}

/// Granules to recall so that `available` bytes rise back to `floor`, at
/// most the `granted` ones.
pub fn pressure_recall_granules(available: u64, floor: u64, granule_size: u64, granted: u64) -> u32 {
    if available >= floor || granule_size == 0 {
        return 0;
    }
    (floor - available).div_ceil(granule_size).min(granted).min(u64::from(u32::MAX)) as u32
}

/// MemAvailable from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Resident memory of a process, in bytes (VmRSS).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_recalls_what_the_floor_needs_and_no_more_than_granted() {
        let g = 256 << 10;
        assert_eq!(pressure_recall_granules(2 << 30, 1 << 30, g, 100), 0);
        assert_eq!(pressure_recall_granules((1 << 30) - 1, 1 << 30, g, 100), 1);
        assert_eq!(pressure_recall_granules((1 << 30) - 3 * g, 1 << 30, g, 100), 3);
        assert_eq!(pressure_recall_granules(0, 1 << 30, g, 100), 100);
        assert_eq!(pressure_recall_granules(0, 1 << 30, 0, 100), 0);
    }

    #[test]
    fn budgets_parse() {
        assert_eq!(MemoryBudget::parse("auto"), Ok(MemoryBudget::Auto));
        assert_eq!(MemoryBudget::parse("512M"), Ok(MemoryBudget::Bytes(512 << 20)));
        assert_eq!(MemoryBudget::parse("2GiB"), Ok(MemoryBudget::Bytes(2 << 30)));
        assert_eq!(MemoryBudget::parse("4096"), Ok(MemoryBudget::Bytes(4096)));
        assert!(MemoryBudget::parse("lots").unwrap_err().contains("lots"));
        assert!(MemoryBudget::parse("3Q").unwrap_err().contains("unit"));
    }
}
