//! The command loop: every request from the normal world is decoded and
//! checked completely, answered with a reply or an error, and never crashes
//! the secure world.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use flexserve_engine::{
    EngineError, GenerateOptions, Generator, KvCache, Model, SamplingParams, ScratchPlan, Session, SessionState,
};
use flexserve_protocol::{
    ChunkRef, ChunkSpan, ErrorCode, GenerateRequest, GenerationReport, Input, ModelStatus, ProtocolError, Reply,
    Request, StatusReport, StopReason, PROTOCOL_VERSION,
};
use flexserve_sealed::{ModelKey, SealedModel, STORED_KEY_LEN};
use flexserve_tokenizer::ChatMessage;
use zeroize::Zeroize;

use crate::models::{Conversation, GrantedScratch, LoadError, RegionBlock, ResidentModel};
use crate::platform::{Channel, Compute, SecureMemory, SecureRegion};
use crate::state::Principal;

mod answer;
mod encrypted;
mod generation;
mod streams;

pub use encrypted::MAX_ENCRYPTED_SESSIONS;

/// Largest sealed header accepted (vocabularies of big models run to tens of MiB).
const MAX_HEADER_LEN: u64 = 512 << 20;
/// Most stored model keys one session may hand in.
pub const MAX_SESSION_KEYS: usize = 1024;
/// Most conversations one session keeps at once, across its models; a
/// `Generate` that would start one more is refused until one ends
/// (`EndConversation`, or unloading its model). A chat keeps one, and a peer
/// that multiplexes users (a daemon) one per user it serves at the moment;
/// each kept conversation holds its messages in the secure heap and a KV cache
/// in granted granules, so 256 leaves such a peer ample room while one session
/// cannot fill the secure world with idle conversations by counting ids up.
pub const MAX_CONVERSATIONS: usize = 256;
/// Authenticated metadata key by which a vendor lets its model be scored
/// (`flexserve seal --allow-perplexity`) whatever the policy says.
pub const ALLOW_PERPLEXITY_KEY: &str = "flexserve.allow_perplexity";

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// The normal world asked to shut down.
    Shutdown,
    /// The normal world closed the channel.
    PeerGone,
    /// The channel can no longer be trusted to carry frames (oversized frame, I/O error).
    Broken(String),
}

type Failure = (ErrorCode, String);

/// The secure heap's figures in bytes.
pub struct HeapFigures {
    pub reserved: u64,
    pub allocated: u64,
    /// Most allocated at once since the last reset.
    pub peak: u64,
}

/// How the command loop reads the secure heap (the process's global allocator).
pub struct HeapProbe {
    pub figures: fn() -> HeapFigures,
    pub reset_peak: fn(),
}

pub struct SecureWorld<M: SecureMemory, C: Channel, X: Compute> {
    memory: M,
    channel: C,
    compute: X,
    /// Keys, policy and posture, shared by every session of this secure world.
    principal: Arc<Principal>,
    /// Model keys this session handed in as stored blobs (`AddStoredKey`).
    session_keys: Vec<ModelKey>,
    /// Granules this session granted and has not had back: returned to the
    /// system when the session ends.
    granted_here: usize,
    /// The secure heap's figures, for status.
    heap: HeapProbe,
    models: BTreeMap<u32, ResidentModel<M::Region>>,
    next_model: u32,
    greeted: bool,
    /// Most granules the secure world accepts in all (the budget it was started
    /// with, at most the machine's memory): a grant beyond it is refused.
    max_granules: usize,
    /// The model whose generation (or scoring) was answered `MemoryNeeded`
    /// and is coming again once granted: a recall meanwhile leaves its layers,
    /// as it does during a generation, or the retry would find them gone.
    awaiting_memory: Option<u32>,
    /// Encrypted sessions with clients, by id.
    encrypted: std::collections::HashMap<u64, encrypted::EncryptedSession>,
    /// Generations waiting in their models' batches between decode steps, by stream id.
    streams: BTreeMap<u32, streams::Stream>,
}

impl<M: SecureMemory, C: Channel, X: Compute> SecureWorld<M, C, X> {
    pub fn new(
        memory: M,
        channel: C,
        compute: X,
        principal: Arc<Principal>,
        heap: HeapProbe,
        max_memory_bytes: u64,
    ) -> Self {
        let max_granules = (max_memory_bytes / memory.granule_size().max(1) as u64) as usize;
        Self {
            memory,
            channel,
            compute,
            principal,
            session_keys: Vec::new(),
            granted_here: 0,
            heap,
            models: BTreeMap::new(),
            next_model: 1,
            greeted: false,
            max_granules,
            awaiting_memory: None,
            encrypted: std::collections::HashMap::new(),
            streams: BTreeMap::new(),
        }
    }

    /// Serves requests until the normal world shuts it down or goes away.
    pub fn run(&mut self) -> Exit {
        loop {
            let request = match self.channel.recv() {
                Ok(r) => r,
                Err(ProtocolError::Closed) => return Exit::PeerGone,
                Err(e) if e.stream_usable() => {
                    if self.reply(Reply::Error { code: ErrorCode::Malformed, message: e.to_string() }).is_err() {
                        return Exit::PeerGone;
                    }
                    continue;
                }
                Err(e) => {
                    let message = e.to_string();
                    let _ = self.reply(Reply::Error { code: ErrorCode::Malformed, message: message.clone() });
                    return Exit::Broken(message);
                }
            };
            let shutdown = matches!(request, Request::Shutdown);
            let asks_for_model = match &request {
                Request::Generate(g) | Request::StartStream { request: g, .. } => Some(g.model),
                Request::StepStreams { model } => Some(*model),
                Request::Perplexity { model, .. } => Some(*model),
                Request::GenerateEncrypted { session, .. } => self.encrypted_model(*session),
                _ => None,
            };
            // Between `MemoryNeeded` and the retry come grants, recalls, evictions,
            // pauses (a lease asked before the request was admitted) and status.
            if !matches!(
                request,
                Request::Grant { .. }
                    | Request::Recall { .. }
                    | Request::Evict { .. }
                    | Request::Pause
                    | Request::Resume
                    | Request::Status
                    | Request::MissingChunks { .. }
            ) {
                self.awaiting_memory = None;
            }
            let reply = self.handle(request).unwrap_or_else(|(code, message)| Reply::Error { code, message });
            if matches!(reply, Reply::MemoryNeeded { .. }) {
                self.awaiting_memory = asks_for_model;
            }
            // Only a Shutdown that was accepted (not one refused before Hello) ends the loop.
            let accepted = matches!(reply, Reply::Ok);
            if self.reply(reply).is_err() {
                return Exit::PeerGone;
            }
            if shutdown && accepted {
                return Exit::Shutdown;
            }
        }
    }

    fn reply(&mut self, reply: Reply) -> std::io::Result<()> {
        self.channel.send(&reply)
    }

    fn handle(&mut self, request: Request) -> Result<Reply, Failure> {
        if !self.greeted {
            return match request {
                Request::Hello { version } if version == PROTOCOL_VERSION => {
                    self.greeted = true;
                    Ok(Reply::Hello {
                        version: PROTOCOL_VERSION,
                        protection: self.memory.protection().to_string(),
                        pool_mode: self.memory.mode().to_string(),
                        granule_size: self.memory.granule_size() as u64,
                    })
                }
                Request::Hello { version } => Err((
                    ErrorCode::Version,
                    format!(
                        "protocol version {version} is not supported (this secure world speaks {PROTOCOL_VERSION})"
                    ),
                )),
                other => Err((ErrorCode::OutOfOrder, format!("{} before Hello", request_name(&other)))),
            };
        }
        match request {
            Request::Hello { .. } => Err((ErrorCode::OutOfOrder, "Hello sent twice".to_string())),
            Request::OpenModel { name, header } => self.open_model(name, header),
            Request::Grant { granules } => {
                let granted = self.memory.stats().granted;
                let most = self.max_granules.saturating_sub(granted);
                if granules as usize > most {
                    return Err((
                        ErrorCode::NoMemory,
                        format!(
                            "a grant of {granules} granules exceeds this secure world's limit of {} granules \
                             ({granted} already granted)",
                            self.max_granules
                        ),
                    ));
                }
                // Prepared now, in parallel threads: on a machine with idle
                // cores this could run behind the next request, but here the
                // page faults compete with it for the same two cores.
                let t0 = Instant::now();
                let prepared = self.memory.grant(granules as usize).map_err(|e| (ErrorCode::NoMemory, e))?;
                self.granted_here += granules as usize;
                self.principal.grants.fetch_add(granules as usize, Ordering::Relaxed);
                let granted = self.memory.stats().granted as u32;
                Ok(Reply::Granted { granted, prepared: prepared as u32, micros: t0.elapsed().as_micros() as u64 })
            }
            Request::LoadChunks { model, chunks } => self.load_chunks(model, &chunks),
            Request::MissingChunks { model } => {
                let m = self.model(model)?;
                let chunks = m
                    .store
                    .missing_chunks()
                    .into_iter()
                    .map(|r| ChunkSpan { start: r.start as u32, end: r.end as u32 });
                Ok(Reply::Missing { chunks: chunks.collect() })
            }
            Request::Generate(g) => {
                (self.heap.reset_peak)();
                let reply = self.generate(g, answer::Answer::Tokens);
                // The secure step is over and its cores may go to the normal
                // world: nothing of it stays in the workers' scratch.
                self.scrub_workers();
                reply
            }
            Request::OpenEncrypted { model, handshake } => self.open_encrypted(model, &handshake),
            Request::GenerateEncrypted { session, n_ctx, message } => {
                (self.heap.reset_peak)();
                let reply = self.generate_encrypted(session, n_ctx, &message);
                self.scrub_workers();
                reply
            }
            Request::CloseEncrypted { session } => Ok(self.close_encrypted(session)),
            Request::StartStream { stream, request } => {
                (self.heap.reset_peak)();
                let reply = self.start_stream(stream, request);
                // As after a generation: the prompt's activations leave the workers' scratch.
                self.scrub_workers();
                reply
            }
            // Steps follow one another: the normal world sends `Pause` (which
            // scrubs) before the cores change owner, not after every token.
            Request::StepStreams { model } => self.step_streams(model),
            Request::EndStream { stream } => Ok(self.end_stream(stream)),
            Request::Perplexity { model, text, n_ctx } => {
                (self.heap.reset_peak)();
                let reply = self.perplexity(model, text, n_ctx as usize);
                self.scrub_workers();
                reply
            }
            Request::EndConversation { model, conversation } => {
                let m = self.models.get_mut(&model).ok_or_else(|| no_model(model))?;
                m.conversations.remove(&conversation).map(|_| Reply::Ok).ok_or_else(|| {
                    (ErrorCode::NoSuchModel, format!("model {model} has no conversation {conversation}"))
                })
            }
            Request::Unload { model } => {
                // Dropping the model scrubs its regions back into the free pool;
                // its encrypted sessions and its batch's streams end with it.
                self.encrypted.retain(|_, s| s.model() != model);
                self.streams.retain(|_, s| s.model != model);
                self.models.remove(&model).map(|_| Reply::Ok).ok_or_else(|| no_model(model))
            }
            Request::Recall { granules } => Ok(self.recall(granules as usize)),
            Request::Evict { model, granules } => self.evict(model, granules as usize),
            // Nothing runs between requests: nothing to stop.
            Request::Cancel => Ok(Reply::Ok),
            // Nothing computes between requests; the workers' scratch was
            // scrubbed when the last request ended, and is again now.
            Request::Pause => Ok(Reply::Paused { scrubbed: self.scrub_workers() }),
            Request::Resume => Ok(Reply::Ok),
            Request::Identity => {
                let (report, signature) = crate::identity::report(&self.principal, self.memory.protection());
                Ok(Reply::Identity { report, signature })
            }
            Request::DevicePublicKey => match &self.principal.keys.device {
                Some(device) => Ok(Reply::DevicePublicKey { key: device.public_key().to_hex() }),
                None => Err((ErrorCode::Verification, "this secure world holds no device key".to_string())),
            },
            Request::ImportKey { mut key } => {
                let parsed = decode_hex::<32>(&key).map(|bytes| ModelKey::from_bytes(&bytes[..]));
                key.zeroize();
                let model_key = match parsed {
                    Some(Ok(k)) => k,
                    _ => return Err((ErrorCode::BadArgument, "ImportKey: expected 64 hex digits".to_string())),
                };
                let device = self.principal.keys.device.as_ref().ok_or_else(|| {
                    (ErrorCode::Verification, "this secure world holds no device key to seal under".to_string())
                })?;
                let blob = device.seal_stored_key(&model_key).map_err(|e| (ErrorCode::Internal, e.to_string()))?;
                Ok(Reply::KeyImported { stored: encode_hex(&blob) })
            }
            Request::AddStoredKey { stored } => {
                if self.session_keys.len() >= MAX_SESSION_KEYS {
                    return Err((ErrorCode::BadArgument, format!("a session holds at most {MAX_SESSION_KEYS} keys")));
                }
                let blob = decode_hex::<STORED_KEY_LEN>(&stored).ok_or_else(|| {
                    (ErrorCode::BadArgument, format!("AddStoredKey: expected {} hex digits", 2 * STORED_KEY_LEN))
                })?;
                let device =
                    self.principal.keys.device.as_ref().ok_or_else(|| {
                        (ErrorCode::Verification, "this secure world holds no device key".to_string())
                    })?;
                let key = device.open_stored_key(&blob[..]).map_err(|e| (ErrorCode::Verification, e.to_string()))?;
                self.session_keys.push(key);
                Ok(Reply::Ok)
            }
            Request::Status => Ok(Reply::Status(self.status())),
            Request::Shutdown => {
                self.streams.clear();
                self.models.clear();
                Ok(Reply::Ok)
            }
        }
    }

    fn model(&self, id: u32) -> Result<&ResidentModel<M::Region>, Failure> {
        self.models.get(&id).ok_or_else(|| no_model(id))
    }

    fn open_model(&mut self, name: String, range: flexserve_protocol::BufferRange) -> Result<Reply, Failure> {
        if range.len > MAX_HEADER_LEN.min(self.channel.shared_len()) {
            return Err((ErrorCode::BadArgument, format!("header of {} bytes is too large", range.len)));
        }
        let mut bytes = vec![0u8; range.len as usize];
        self.channel.copy_out(range, &mut bytes).map_err(|e| (ErrorCode::BadArgument, e))?;
        let keys = &self.principal.keys;
        if keys.device.is_none() && keys.model_keys.is_empty() && self.session_keys.is_empty() {
            return Err((ErrorCode::Verification, format!("model {name}: this secure world holds no key")));
        }
        let vendor = keys.vendor.as_ref();
        let mut opened = SealedModel::open_with_keys(&bytes, keys.device.as_ref(), &keys.model_keys, vendor);
        // Keys this session handed in: tried when the world's own do not fit.
        if matches!(opened, Err(flexserve_sealed::SealError::WrongKey)) && !self.session_keys.is_empty() {
            opened = SealedModel::open_with_keys(&bytes, None, &self.session_keys, vendor);
        }
        let sealed = opened.map_err(|e| {
            let code = if vendor.is_some() && matches!(e, flexserve_sealed::SealError::Signature { .. }) {
                ErrorCode::Policy
            } else {
                ErrorCode::Verification
            };
            (code, format!("model {name}: {e}"))
        })?;
        let granule = self.memory.granule_size();
        let model = ResidentModel::new(name, sealed).map_err(|e| (ErrorCode::BadArgument, e))?;
        let id = self.next_model;
        self.next_model += 1;
        let reply = Reply::ModelOpened {
            model: id,
            chunks: model.store.chunk_count() as u32,
            granules_needed: model.store.granules_needed(granule) as u32,
        };
        self.models.insert(id, model);
        Ok(reply)
    }

    fn load_chunks(&mut self, id: u32, chunks: &[ChunkRef]) -> Result<Reply, Failure> {
        let memory = &self.memory;
        let channel = &self.channel;
        let model = self.models.get_mut(&id).ok_or_else(|| no_model(id))?;
        let copy = |range: flexserve_protocol::BufferRange, out: &mut [u8]| channel.copy_out(range, out);
        model.store.load_chunks(memory, chunks, &copy).map_err(|(n, e)| {
            let (code, msg) = generation::load_failure(e);
            (code, format!("{msg} ({n} of {} chunks of this request loaded)", chunks.len()))
        })?;
        Ok(Reply::ChunksLoaded { loaded: chunks.len() as u32 })
    }

    /// Gives back `wanted` granules: free ones first, then layers of the least
    /// recently used models, later layers before earlier ones, then the KV
    /// caches of idle conversations.
    fn recall(&mut self, wanted: usize) -> Reply {
        let reply = self.recall_in_full(wanted);
        if let Reply::Recalled { released, .. } = reply {
            give_back(&mut self.granted_here, &self.principal, released as usize);
        }
        reply
    }

    /// Scrubs the scratch every model's worker threads keep (Flex-NPU's
    /// change of owner); whether all of it reads zero afterwards.
    fn scrub_workers(&self) -> bool {
        // Every engine scrubs, whatever an earlier one found.
        let mut clean = true;
        for engine in self.models.values().filter_map(|m| m.engine_if_built()) {
            clean &= engine.scrub_worker_scratch();
        }
        clean
    }

    /// Scrubs groups of `model`, last layers first, until `wanted` granules
    /// have come free; they stay granted, free for the next load.
    fn evict(&mut self, model: u32, wanted: usize) -> Result<Reply, Failure> {
        if self.awaiting_memory == Some(model) {
            return Err((
                ErrorCode::BadArgument,
                format!("model {model} is the one waiting for memory: evicting it would undo what it waits for"),
            ));
        }
        if self.has_streams(model) {
            return Err((
                ErrorCode::BadArgument,
                format!("model {model} has generations in its batch: its layers are in use until they end"),
            ));
        }
        let t0 = Instant::now();
        let m = self.models.get_mut(&model).ok_or_else(|| no_model(model))?;
        let (mut freed, mut groups) = (0, 0);
        for (group, _) in m.store.eviction_candidates() {
            if freed >= wanted {
                break;
            }
            freed += m.evict(group);
            groups += 1;
        }
        Ok(Reply::Evicted { freed: freed as u32, groups, micros: t0.elapsed().as_micros() as u64 })
    }

    fn recall_in_full(&mut self, wanted: usize) -> Reply {
        let t0 = Instant::now();
        let mut released = self.memory.release(wanted);
        let mut evicted = 0;
        // A static carve-out never returns memory: evicting would free nothing.
        let flexible = self.memory.mode() != "static-carve-out";
        while released < wanted && flexible {
            let victim = self
                .models
                .iter()
                .filter(|&(&id, _)| self.awaiting_memory != Some(id) && !self.has_streams(id))
                .filter_map(|(&id, m)| m.store.eviction_candidates().first().map(|&(g, _)| (m.last_used, id, g)))
                .min();
            let Some((_, id, group)) = victim else { break };
            let model = self.models.get_mut(&id).expect("victim exists");
            evicted += model.evict(group);
            released += self.memory.release(wanted - released);
        }
        // Last, the KV caches of idle conversations, least recently used
        // first. The next turn recomputes one from the conversation's
        // messages, but in one batch rather than token by token, which can
        // round differently; evicted layers reload bit for bit.
        while released < wanted && flexible {
            let victim = self
                .models
                .iter_mut()
                .flat_map(|(_, m)| m.conversations.values_mut())
                .filter(|c| c.kv_granules > 0)
                .min_by_key(|c| c.last_used);
            let Some(conversation) = victim else { break };
            evicted += conversation.drop_cache();
            released += self.memory.release(wanted - released);
        }
        Reply::Recalled { released: released as u32, evicted: evicted as u32, micros: t0.elapsed().as_micros() as u64 }
    }

    fn status(&self) -> StatusReport {
        let s = self.memory.stats();
        let heap = (self.heap.figures)();
        let posture = &self.principal.posture;
        StatusReport {
            deployment: posture.deployment,
            secure_uid: posture.uid,
            ptrace_scope: posture.ptrace_scope.clone(),
            lockdown: posture.lockdown.clone(),
            policy: self.principal.policy.describe(),
            warnings: posture.warnings.clone(),
            protection: self.memory.protection().to_string(),
            pool_mode: self.memory.mode().to_string(),
            granule_size: self.memory.granule_size() as u64,
            granted: s.granted as u32,
            prepared: s.prepared as u32,
            in_use: s.in_use as u32,
            heap_bytes: heap.reserved,
            heap_allocated: heap.allocated,
            heap_peak: heap.peak,
            models: self
                .models
                .iter()
                .map(|(&id, m)| ModelStatus {
                    model: id,
                    name: m.name.clone(),
                    layers: m.layer_count() as u32,
                    resident_layers: m.store.resident_layers() as u32,
                    chunks: m.store.chunk_count() as u32,
                    resident_chunks: m.store.resident_chunks() as u32,
                    weight_bytes: m.store.weight_bytes(),
                    kv_granules: m.kv_granules() as u32,
                })
                .collect(),
        }
    }
}

impl<M: SecureMemory, C: Channel, X: Compute> Drop for SecureWorld<M, C, X> {
    /// The session is over: its models and conversations are scrubbed back
    /// into the free pool, then what it granted goes back to the system.
    fn drop(&mut self) {
        self.streams.clear();
        self.models.clear();
        self.session_keys.clear();
        let all = self.granted_here;
        give_back(&mut self.granted_here, &self.principal, all);
        let owned = self.principal.grants.load(Ordering::Relaxed);
        let unowned = self.memory.stats().granted.saturating_sub(owned);
        self.memory.release(unowned);
    }
}

/// Notes `granules` of a session's grants (`granted_here`) as returned.
fn give_back(granted_here: &mut usize, principal: &Principal, granules: usize) {
    let n = granules.min(*granted_here);
    *granted_here -= n;
    let _ = principal.grants.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| Some(g.saturating_sub(n)));
}

/// `N` bytes from exactly `2 * N` hex digits, wiped when dropped.
fn decode_hex<const N: usize>(text: &str) -> Option<zeroize::Zeroizing<[u8; N]>> {
    let mut out = zeroize::Zeroizing::new([0u8; N]);
    flexserve_sealed::decode_hex(text.trim().as_bytes(), &mut out[..]).ok()?;
    Some(out)
}

fn encode_hex(bytes: &[u8]) -> String {
    String::from_utf8_lossy(&flexserve_sealed::encode_hex(bytes)).into_owned()
}

fn engine_failure(e: EngineError) -> Failure {
    match e {
        // The request's fault, not the engine's: the prompt does not fit.
        EngineError::ContextFull { .. } | EngineError::EmptyInput => (ErrorCode::BadArgument, e.to_string()),
        e => (ErrorCode::Engine, e.to_string()),
    }
}

fn no_model(id: u32) -> Failure {
    (ErrorCode::NoSuchModel, format!("no open model {id}"))
}

/// The request's name without the type prefix, for messages.
fn request_name(r: &Request) -> &'static str {
    r.name().trim_start_matches("Request::")
}
