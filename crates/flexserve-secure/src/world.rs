//! The command loop: every request from the normal world is decoded and
//! checked completely, answered with a reply or an error, and never crashes
//! the secure world.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
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
use flexserve_sealed::{ModelKey, SealedModel, CHUNK_TAG_LEN, STORED_KEY_LEN};
use flexserve_tokenizer::ChatMessage;
use zeroize::Zeroize;

use crate::models::{Conversation, GrantedScratch, LoadError, RegionBlock, ResidentModel};
use crate::platform::{Channel, Compute, SecureMemory, SecureRegion};
use crate::state::Principal;

/// Largest sealed header accepted (vocabularies of big models run to tens of MiB).
const MAX_HEADER_LEN: u64 = 512 << 20;
/// Most stored model keys one session may hand in.
pub const MAX_SESSION_KEYS: usize = 1024;
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
                Request::Generate(g) => Some(g.model),
                Request::Perplexity { model, .. } => Some(*model),
                _ => None,
            };
            // Between `MemoryNeeded` and the retry come grants, recalls and status.
            if !matches!(
                request,
                Request::Grant { .. } | Request::Recall { .. } | Request::Status | Request::MissingChunks { .. }
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
                let granted = self.memory.stats().granted as u32;
                Ok(Reply::Granted { granted, prepared: prepared as u32, micros: t0.elapsed().as_micros() as u64 })
            }
            Request::LoadChunks { model, chunks } => self.load_chunks(model, &chunks),
            Request::MissingChunks { model } => {
                let m = self.model(model)?;
                let chunks =
                    m.missing_chunks().into_iter().map(|r| ChunkSpan { start: r.start as u32, end: r.end as u32 });
                Ok(Reply::Missing { chunks: chunks.collect() })
            }
            Request::Generate(g) => {
                (self.heap.reset_peak)();
                self.generate(g)
            }
            Request::Perplexity { model, text, n_ctx } => {
                (self.heap.reset_peak)();
                self.perplexity(model, text, n_ctx as usize)
            }
            Request::EndConversation { model, conversation } => {
                let m = self.models.get_mut(&model).ok_or_else(|| no_model(model))?;
                m.conversations.remove(&conversation).map(|_| Reply::Ok).ok_or_else(|| {
                    (ErrorCode::NoSuchModel, format!("model {model} has no conversation {conversation}"))
                })
            }
            Request::Unload { model } => {
                // Dropping the model scrubs its regions back into the free pool.
                self.models.remove(&model).map(|_| Reply::Ok).ok_or_else(|| no_model(model))
            }
            Request::Recall { granules } => Ok(self.recall(granules as usize)),
            // Nothing runs between requests: nothing to stop.
            Request::Cancel => Ok(Reply::Ok),
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
            chunks: model.chunk_count() as u32,
            granules_needed: model.granules_needed(granule) as u32,
        };
        self.models.insert(id, model);
        Ok(reply)
    }

    fn load_chunks(&mut self, id: u32, chunks: &[ChunkRef]) -> Result<Reply, Failure> {
        let memory = &self.memory;
        let channel = &self.channel;
        let model = self.models.get_mut(&id).ok_or_else(|| no_model(id))?;
        for (n, c) in chunks.iter().enumerate() {
            let at = c.at;
            let copy = |body: &mut [u8], tag: &mut [u8; CHUNK_TAG_LEN]| {
                let body_len = body.len() as u64;
                channel.copy_out(flexserve_protocol::BufferRange { offset: at.offset, len: body_len }, body)?;
                let tag_at = at.offset.checked_add(body_len).ok_or("chunk range overflows")?;
                channel.copy_out(flexserve_protocol::BufferRange { offset: tag_at, len: CHUNK_TAG_LEN as u64 }, tag)
            };
            model.load_chunk(memory, c.index as usize, at.len as usize, copy).map_err(|e| {
                let (code, msg) = match e {
                    LoadError::BadArgument(m) => (ErrorCode::BadArgument, m),
                    LoadError::NoMemory(m) => (ErrorCode::NoMemory, m),
                    LoadError::Verification(m) => (ErrorCode::Verification, m),
                };
                (code, format!("{msg} ({n} of {} chunks of this request loaded)", chunks.len()))
            })?;
        }
        Ok(Reply::ChunksLoaded { loaded: chunks.len() as u32 })
    }

    fn generate(&mut self, g: GenerateRequest) -> Result<Reply, Failure> {
        let threads = self.compute.threads();
        let channel = &mut self.channel;
        let memory = &self.memory;
        let model = self.models.get_mut(&g.model).ok_or_else(|| no_model(g.model))?;
        if !model.fully_resident() {
            let missing = model.chunk_count() - model.resident_chunks();
            return Err((
                ErrorCode::NotResident,
                format!("model {}: {missing} of {} chunks are not resident", g.model, model.chunk_count()),
            ));
        }
        model.engine(threads).map_err(|e| (ErrorCode::Engine, e))?;
        let (engine, tokenizer, template, conversations) = model.parts();
        let engine = engine.expect("built above");
        let mut conv = if g.conversation == 0 {
            Conversation::default()
        } else {
            conversations.remove(&g.conversation).unwrap_or_default()
        };
        conv.last_used = Instant::now();
        let chat = matches!(g.input, Input::ChatTurn { .. } | Input::Messages { .. });
        // Messages of this turn join the conversation only if the turn runs.
        let kept_messages = conv.messages.len();
        let mut replaced: Option<Vec<ChatMessage>> = None;
        let rendered = match g.input {
            Input::Raw { text } => Ok(text),
            Input::ChatTurn { system, user } => match template {
                None => Err((ErrorCode::Engine, format!("model {} has no chat template", g.model))),
                Some(template) => {
                    if conv.messages.is_empty() {
                        if let Some(s) = system {
                            conv.messages.push(ChatMessage::new("system", s));
                        }
                    }
                    conv.messages.push(ChatMessage::new("user", user));
                    template.render(&conv.messages, true).map_err(|e| (ErrorCode::Engine, e.to_string()))
                }
            },
            // The whole conversation, as an OpenAI-style request carries it.
            Input::Messages { messages } => match template {
                None => Err((ErrorCode::Engine, format!("model {} has no chat template", g.model))),
                Some(_) if messages.is_empty() => Err((ErrorCode::BadArgument, "no messages".to_string())),
                Some(template) => {
                    let turns = messages.into_iter().map(|m| ChatMessage::new(m.role, m.content)).collect();
                    replaced = Some(std::mem::replace(&mut conv.messages, turns));
                    template.render(&conv.messages, true).map_err(|e| (ErrorCode::Engine, e.to_string()))
                }
            },
        };
        let mut text = match rendered {
            Ok(text) => text,
            Err(failure) => {
                match replaced.take() {
                    Some(old) => conv.messages = old,
                    None => conv.messages.truncate(kept_messages),
                }
                if g.conversation != 0 {
                    conversations.insert(g.conversation, conv);
                }
                return Err(failure);
            }
        };
        let mut ids = tokenizer.encode(&text, true, true);
        text.zeroize();
        // The cache holds the prompt and what may be generated, within the context.
        let limit = if g.n_ctx == 0 { engine.config.n_ctx_train } else { g.n_ctx as usize };
        let room = g.max_tokens as usize;
        let positions = ids.len().saturating_add(room).min(limit).max(1);
        // A prompt the context cannot hold fails as the engine would, before any memory is asked for.
        let overflow = (ids.len() > limit).then_some(EngineError::ContextFull { n_ctx: limit, needed: ids.len() });
        // Activations for the tokens to evaluate: those after the prefix the cache already holds.
        let cached = if conv.state.is_some() { flexserve_engine::reusable_prefix(&conv.history, &ids) } else { 0 };
        let batch = ids.len() - cached;
        let plan = engine.scratch_plan(batch, positions, 1);
        let prepared = match overflow {
            Some(e) => Err(Box::new(KvShortfall { state: conv.state.take(), reply: Err(engine_failure(e)) })),
            None => kv_session(memory, engine, conv.state.take(), positions, limit, &plan),
        };
        let session = match prepared {
            Ok((session, granules)) => {
                if let Some(granules) = granules {
                    conv.kv_granules = granules;
                }
                session
            }
            Err(shortfall) => {
                let KvShortfall { state, reply } = *shortfall;
                ids.zeroize();
                conv.state = state;
                conv.messages.truncate(kept_messages);
                if g.conversation != 0 {
                    conversations.insert(g.conversation, conv);
                }
                return reply;
            }
        };
        let mut generator = Generator::resume(session, tokenizer, std::mem::take(&mut conv.history));
        let s = g.sampling;
        let opts = GenerateOptions {
            max_tokens: g.max_tokens as usize,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k as usize,
                top_p: s.top_p,
                min_p: s.min_p,
                repeat_penalty: s.repeat_penalty,
                repeat_last_n: s.repeat_last_n as usize,
                seed: s.seed,
            },
            stop: g.stop,
        };
        let mut answer = String::new();
        // The channel is shared by the token stream and the prefill's layer
        // hook (which runs on a worker thread).
        let channel = std::sync::Mutex::new(channel);
        let peer_gone = std::sync::atomic::AtomicBool::new(false);
        let cancelled = std::sync::atomic::AtomicBool::new(false);
        let recalled = std::sync::atomic::AtomicUsize::new(0);
        // A recall does not wait for the generation to end: between layers
        // of the prefill and between tokens the free granules go back at once
        // (the layers in use stay; the normal world can ask again once the
        // generation is over). A peer that went away stops the generation
        // there: nobody is left to read it.
        let serve_recall = |channel: &mut C| {
            if peer_gone.load(Ordering::Relaxed) {
                return;
            }
            match serve_during_generation(channel, memory) {
                DuringGeneration::Nothing => {}
                DuringGeneration::PeerGone => peer_gone.store(true, Ordering::Relaxed),
                DuringGeneration::Cancel => {
                    cancelled.store(true, Ordering::Relaxed);
                    if channel.send(&Reply::Ok).is_err() {
                        peer_gone.store(true, Ordering::Relaxed);
                    }
                }
                DuringGeneration::Answer { reply, released } => {
                    recalled.fetch_add(released, Ordering::Relaxed);
                    if channel.send(&reply).is_err() {
                        peer_gone.store(true, Ordering::Relaxed);
                    }
                }
            }
        };
        let go_on = || {
            if peer_gone.load(Ordering::Relaxed) || cancelled.load(Ordering::Relaxed) {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        };
        let lock = || channel.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut between_layers = || {
            serve_recall(&mut lock());
            go_on()
        };
        let result = generator.generate_with(
            &ids,
            &opts,
            |piece| {
                answer.push_str(piece);
                let mut channel = lock();
                if !peer_gone.load(Ordering::Relaxed)
                    && channel.send(&Reply::Token { text: piece.to_string() }).is_err()
                {
                    peer_gone.store(true, Ordering::Relaxed);
                }
                serve_recall(&mut channel);
            },
            &mut between_layers,
        );
        ids.zeroize();
        self.granted_here = self.granted_here.saturating_sub(recalled.into_inner());
        let (session, history) = generator.into_parts();
        conv.state = Some(session.into_state());
        conv.history = history;
        let stats = match result {
            Ok(s) => s,
            Err(EngineError::Cancelled) => {
                answer.zeroize();
                return Err((ErrorCode::Cancelled, "the generation was cancelled".to_string()));
            }
            Err(e) => {
                answer.zeroize();
                return Err((ErrorCode::Engine, e.to_string()));
            }
        };
        if chat {
            conv.messages.push(ChatMessage::new("assistant", answer.trim()));
        }
        answer.zeroize();
        if g.conversation != 0 {
            conversations.insert(g.conversation, conv);
        }
        Ok(Reply::Generated(GenerationReport {
            prompt_tokens: stats.prompt_tokens as u32,
            cached_tokens: stats.cached_tokens as u32,
            generated_tokens: stats.generated_tokens as u32,
            prefill_micros: (stats.prefill_secs * 1e6) as u64,
            decode_micros: (stats.decode_secs * 1e6) as u64,
            stop: match stats.stop {
                flexserve_engine::StopReason::EndOfGeneration => StopReason::EndOfGeneration,
                flexserve_engine::StopReason::MaxTokens => StopReason::MaxTokens,
                flexserve_engine::StopReason::StopString => StopReason::StopString,
                flexserve_engine::StopReason::ContextFull => StopReason::ContextFull,
            },
        }))
    }

    /// Scores a text as llama.cpp's perplexity tool does; only the figure
    /// leaves the secure world.
    fn perplexity(&mut self, id: u32, mut text: String, n_ctx: usize) -> Result<Reply, Failure> {
        let threads = self.compute.threads();
        let model = self.models.get_mut(&id).ok_or_else(|| no_model(id))?;
        let policy = &self.principal.policy;
        if !policy.allow_perplexity && !model.allows_perplexity(ALLOW_PERPLEXITY_KEY) {
            text.zeroize();
            return Err((
                ErrorCode::Policy,
                format!(
                    "scoring is off: per-token probabilities are an extraction oracle; the secure world's \
                     policy (allow_perplexity) or the model's sealed header ({ALLOW_PERPLEXITY_KEY}) must allow it"
                ),
            ));
        }
        if (n_ctx as u64) < u64::from(policy.min_scoring_context) {
            text.zeroize();
            return Err((
                ErrorCode::Policy,
                format!("a scoring context of {n_ctx} is below the policy's minimum of {}", policy.min_scoring_context),
            ));
        }
        if !model.fully_resident() {
            return Err((ErrorCode::NotResident, format!("model {id} has chunks that are not resident")));
        }
        // Scoring writes logits for half of every chunk: bound the chunk by
        // the model's own context so a request cannot ask for gigabytes.
        let n_ctx_train = model.config.n_ctx_train;
        if n_ctx > n_ctx_train {
            return Err((
                ErrorCode::BadArgument,
                format!("perplexity context {n_ctx} exceeds the model's context of {n_ctx_train}"),
            ));
        }
        model.engine(threads).map_err(|e| (ErrorCode::Engine, e))?;
        let (engine, tokenizer, _, _) = model.parts();
        let engine = engine.expect("built above");
        // Every chunk is one batch (the engine splits longer ones) with logits for its scored half.
        let plan = engine.scratch_plan(n_ctx, n_ctx, n_ctx);
        let mut session = match kv_session(&self.memory, engine, None, n_ctx.max(1), n_ctx.max(1), &plan) {
            Ok((session, _)) => session,
            Err(shortfall) => return shortfall.reply,
        };
        let mut tokens = tokenizer.encode(&text, true, false);
        text.zeroize();
        // Models that start every text with BOS see it at the start of every chunk.
        let bos = if tokenizer.adds_bos() { tokenizer.bos() } else { None };
        let result = flexserve_engine::perplexity::perplexity_in(&mut session, &tokens, n_ctx, bos, |_, _, _| {});
        let count = tokens.len() as u32;
        tokens.zeroize();
        let r = result.map_err(|e| (ErrorCode::Engine, e.to_string()))?;
        Ok(Reply::Perplexity { tokens: count, chunks: r.n_chunks as u32, ppl: r.ppl, ppl_err: r.ppl_err })
    }

    /// Gives back `wanted` granules: free ones first, then layers of the least
    /// recently used models, later layers before earlier ones, then the KV
    /// caches of idle conversations.
    fn recall(&mut self, wanted: usize) -> Reply {
        let reply = self.recall_in_full(wanted);
        if let Reply::Recalled { released, .. } = reply {
            self.granted_here = self.granted_here.saturating_sub(released as usize);
        }
        reply
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
                .filter(|&(&id, _)| self.awaiting_memory != Some(id))
                .filter_map(|(&id, m)| m.eviction_candidates().first().map(|&(g, _)| (m.last_used, id, g)))
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
                    resident_layers: m.resident_layers() as u32,
                    chunks: m.chunk_count() as u32,
                    resident_chunks: m.resident_chunks() as u32,
                    weight_bytes: m.weight_bytes(),
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
        self.models.clear();
        self.session_keys.clear();
        self.memory.release(self.granted_here);
    }
}

/// What a look at the channel during a generation found.
enum DuringGeneration {
    Nothing,
    /// The peer closed the channel (or it broke): stop generating.
    PeerGone,
    /// The peer asked to stop this generation.
    Cancel,
    /// A request to answer now, and the granules it gave back.
    Answer {
        reply: Box<Reply>,
        released: usize,
    },
}

/// Serves a request that arrived while a generation runs: a recall gives
/// back free granules at once; anything else waits for the generation's end
/// and is refused now.
fn serve_during_generation<M: SecureMemory, C: Channel>(channel: &mut C, memory: &M) -> DuringGeneration {
    let answer = |reply| DuringGeneration::Answer { reply: Box::new(reply), released: 0 };
    match channel.poll_request() {
        None => DuringGeneration::Nothing,
        Some(Ok(Request::Recall { granules })) => {
            let t0 = Instant::now();
            let released = memory.release(granules as usize);
            let micros = t0.elapsed().as_micros() as u64;
            DuringGeneration::Answer {
                reply: Box::new(Reply::Recalled { released: released as u32, evicted: 0, micros }),
                released,
            }
        }
        Some(Ok(Request::Cancel)) => DuringGeneration::Cancel,
        Some(Ok(other)) => answer(Reply::Error {
            code: ErrorCode::OutOfOrder,
            message: format!("{} while a generation runs (only Recall is served then)", request_name(&other)),
        }),
        Some(Err(e)) if e.stream_usable() => {
            answer(Reply::Error { code: ErrorCode::Malformed, message: e.to_string() })
        }
        Some(Err(_)) => DuringGeneration::PeerGone,
    }
}

/// Memory for a request that the free granules cannot hold: the state given
/// back untouched, and the reply to send (what to grant, or why not).
struct KvShortfall {
    state: Option<SessionState>,
    reply: Result<Reply, Failure>,
}

/// A session on `engine` whose KV cache and activations live in granted
/// granules: the cache holds at least `positions` positions (at most
/// `limit`), `state` as it is when it has the room, else moved into (or
/// started in) a new region; the activations take the regions of `plan`.
/// Everything is checked against the free granules before anything is
/// taken. Returns the session and, when a new cache region was taken, its
/// granules.
fn kv_session<'m, M: SecureMemory>(
    memory: &M,
    engine: &'m Model,
    state: Option<SessionState>,
    positions: usize,
    limit: usize,
    plan: &ScratchPlan,
) -> Result<(Session<'m>, Option<usize>), Box<KvShortfall>> {
    let shortfall = |state, reply| Box::new(KvShortfall { state, reply });
    let granule = memory.granule_size().max(1);
    let too_large = || Err((ErrorCode::BadArgument, format!("a KV cache of {positions} positions is too large")));
    let keep = state.as_ref().is_some_and(|s| s.n_ctx() >= positions);
    // Whole granules: the slack of the last one holds more positions.
    let kv_granules = if keep {
        0
    } else {
        match positions.checked_mul(KvCache::bytes_per_position(&engine.config)) {
            Some(bytes) => bytes.div_ceil(granule),
            None => return Err(shortfall(state, too_large())),
        }
    };
    let scratch_granules: usize = plan.buffers.iter().map(|b| b.div_ceil(granule)).sum();
    let s = memory.stats();
    let missing = (kv_granules + scratch_granules).saturating_sub(s.granted.saturating_sub(s.in_use));
    if missing > 0 {
        let reply = match u32::try_from(missing) {
            Ok(granules) => Ok(Reply::MemoryNeeded { granules }),
            Err(_) => too_large(),
        };
        return Err(shortfall(state, reply));
    }
    let mut taken = None;
    let session = match state {
        Some(state) if keep => Session::resume(engine, state),
        state => {
            let region = match memory.alloc(kv_granules * granule) {
                Ok(region) => region,
                Err(e) => {
                    let message = format!("KV cache of {positions} positions: {e}");
                    return Err(shortfall(state, Err((ErrorCode::NoMemory, message))));
                }
            };
            taken = Some(region.granules());
            let block = Box::new(RegionBlock(region));
            match state {
                Some(old) => old.moved_to(limit, block).and_then(|s| Session::resume(engine, s)),
                None => KvCache::in_memory(&engine.config, limit, block).and_then(|kv| Session::with_cache(engine, kv)),
            }
        }
    };
    let mut session = session.map_err(|e| shortfall(None, Err(engine_failure(e))))?;
    session.set_scratch_source(Arc::new(GrantedScratch(memory.clone())));
    // On failure the session (and the cache just moved into it) is lost, as
    // for any engine error; the conversation's messages remain.
    session.reserve_scratch(plan).map_err(|e| shortfall(None, Err((ErrorCode::NoMemory, e.to_string()))))?;
    Ok((session, taken))
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
