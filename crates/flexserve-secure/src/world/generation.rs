//! Generation and scoring in the secure world: the template and tokenizer
//! run here, the KV cache and activations live in granted granules, and
//! while tokens are produced the channel is watched for a recall, a cancel
//! or a peer that went away.

use std::collections::HashMap;

use flexserve_tokenizer::ChatTemplate;

use flexserve_protocol::LayerTiming;

use super::*;
use crate::models::{take_layer, ModelParts, WeightStore};

pub(super) mod memory;
mod serving;

use memory::{kv_and_scratch_granules, kv_session, memory_short, KvShortfall};

use serving::{serve_during_generation, serve_while_loading, DuringGeneration, Stores, Timeline};

use super::answer::{stop_reason, Answer};
use super::streams::first_token;

/// What a generation evaluated.
enum Evaluated<'t> {
    /// The prompt and every token: the answer was sent.
    Whole(flexserve_engine::GenerationStats),
    /// The prompt alone, for this stream.
    Prompt(Box<flexserve_engine::Prefilled<'t>>, u32),
}

impl Evaluated<'_> {
    fn prefill_secs(&self) -> f64 {
        match self {
            Evaluated::Whole(stats) => stats.prefill_secs,
            Evaluated::Prompt(pre, _) => pre.prefill_secs,
        }
    }
}

impl<M: SecureMemory, C: Channel, X: Compute> SecureWorld<M, C, X> {
    /// Runs a generation; its text streams as `Token` replies, or with
    /// `sealer` as records sealed to an encrypted session's client. On a
    /// model that is not fully resident it claims the memory of the missing
    /// layers, asks the normal world for their chunks (`LoadNeeded`) and
    /// computes each layer of the prompt as soon as that layer is verified.
    pub(super) fn generate(&mut self, g: GenerateRequest, answer: Answer<'_>) -> Result<Reply, Failure> {
        let started = Instant::now();
        let threads = self.compute.threads();
        let kept_conversations: usize = self.models.values().map(|m| m.conversations.len()).sum();
        let (mut sealer, park) = match answer {
            Answer::Tokens => (None, None),
            Answer::Sealed(session) => (Some(session), None),
            Answer::Stream(stream) => (None, Some(stream)),
        };
        let streams = &mut self.streams;
        let channel = &mut self.channel;
        let memory = &self.memory;
        // The generating model, and apart from it the stores of the others: a
        // `LoadChunks` for one of them during the generation loads into it.
        let (mut model, mut others) = (None, serving::OtherStores::new());
        for (&id, m) in self.models.iter_mut() {
            if id == g.model {
                model = Some(m);
            } else {
                others.insert(id, &mut m.store);
            }
        }
        let model = model.ok_or_else(|| no_model(g.model))?;
        let mut timeline = Timeline::new(started, model.config.n_layer);
        // A turn of a conversation kept from before, or (id 0) none at all.
        // A new conversation's failed first turn leaves nothing behind.
        let existed = g.conversation != 0 && model.conversations.contains_key(&g.conversation);
        if g.conversation != 0 && !existed && kept_conversations >= MAX_CONVERSATIONS {
            return Err((
                ErrorCode::BadArgument,
                format!(
                    "conversation {} would be one more than the {MAX_CONVERSATIONS} conversations a session keeps \
                     at once (MAX_CONVERSATIONS): end one (EndConversation) first",
                    g.conversation
                ),
            ));
        }
        let mut turn = Turn {
            id: g.conversation,
            existed,
            conv: if g.conversation == 0 {
                Conversation::default()
            } else {
                model.conversations.remove(&g.conversation).unwrap_or_default()
            },
            kept_messages: 0,
            replaced: None,
        };
        turn.conv.last_used = Instant::now();
        turn.kept_messages = turn.conv.messages.len();
        let chat = matches!(g.input, Input::ChatTurn { .. } | Input::Messages { .. });
        let rendered = render(&mut turn, g.input, model.template.as_ref(), g.model);
        let mut text = match rendered {
            Ok(text) => text,
            Err(failure) => return Err(turn.undo(&mut model.conversations, failure)),
        };
        // The prompt's token ids, wiped however this request ends.
        let ids = zeroize::Zeroizing::new(model.tokenizer.encode(&text, true, true));
        text.zeroize();
        // A kept conversation keeps no more text than its prompt can use: what
        // the prompt's tokens can spell, each at most the model's longest
        // token (the answer, made of generated tokens, stays within that too).
        // A template that leaves text out (trims it, drops messages) would
        // otherwise let a conversation's messages grow without bound.
        if chat && g.conversation != 0 {
            let kept_bytes: usize = turn.conv.messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            let most = ids.len().saturating_mul(model.longest_token);
            if kept_bytes > most {
                let failure = (
                    ErrorCode::BadArgument,
                    format!(
                        "conversation {} would keep {kept_bytes} bytes of messages, more than its prompt of {} \
                         tokens can use ({most} bytes: at most {}, the model's longest token, per \
                         token); the chat template leaves text out, and a conversation keeps only what its \
                         context can use",
                        g.conversation,
                        ids.len(),
                        model.longest_token
                    ),
                );
                return Err(turn.undo(&mut model.conversations, failure));
            }
        }
        // The cache holds the prompt and what may be generated, within the context.
        let limit = if g.n_ctx == 0 { model.config.n_ctx_train } else { g.n_ctx as usize };
        let room = g.max_tokens as usize;
        let positions = ids.len().saturating_add(room).min(limit).max(1);
        // A prompt the context cannot hold fails as the engine would, before any memory is asked for.
        if ids.len() > limit {
            let e = EngineError::ContextFull { n_ctx: limit, needed: ids.len() };
            return Err(turn.undo(&mut model.conversations, engine_failure(e)));
        }
        // Activations for the tokens to evaluate: those after the prefix the cache already holds.
        let cached =
            if turn.conv.state.is_some() { flexserve_engine::reusable_prefix(&turn.conv.history, &ids) } else { 0 };
        let batch = ids.len() - cached;
        let plan = match ScratchPlan::for_source(&model.store.source(), &model.config, batch, positions, 1) {
            Ok(plan) => plan,
            Err(e) => {
                return Err(turn.undo(&mut model.conversations, engine_failure(e)));
            }
        };
        // A model not fully resident: its missing layers' memory is claimed
        // now, with the KV cache's and the activations' (or the normal world
        // is told what to grant), and its chunks are asked for in the order
        // the forward pass needs them. The base group (embeddings, output)
        // loads first; the layers load while the first ones compute.
        if !model.store.fully_resident() {
            let granule = memory.granule_size().max(1);
            let kept = turn.conv.state.as_ref();
            let reserve = kv_and_scratch_granules(granule, &model.config, kept, positions, &plan);
            let needed = reserve.as_ref().map(|&n| n + model.store.granules_missing(granule)).map_err(Clone::clone);
            let short = needed.and_then(|n| memory_short(memory, n));
            let claimed = match short {
                Ok(Some(reply)) => Err(Ok(reply)),
                Ok(None) => model.store.claim_regions(memory).map_err(|e| Err(load_failure(e))),
                Err(failure) => Err(Err(failure)),
            };
            if let Err(reply) = claimed {
                return turn.undo(&mut model.conversations, reply);
            }
            let spans = model.store.missing_chunks();
            let chunks = spans.into_iter().map(|r| ChunkSpan { start: r.start as u32, end: r.end as u32 }).collect();
            if channel.send(&Reply::LoadNeeded { chunks }).is_err() {
                return Err(turn.undo(&mut model.conversations, peer_gone_failure()));
            }
            let base = model.store.base_group();
            while !model.store.complete(base) {
                // The KV cache and activations are taken once the base group
                // is there: until then a recall leaves their granules.
                let keep = reserve.as_ref().map_or(0, |&n| n);
                let stores = Stores { model: g.model, store: &mut model.store, others: None };
                match serve_while_loading(channel, memory, stores, &mut timeline, keep) {
                    Ok(released) => give_back(&mut self.granted_here, &self.principal, released),
                    Err(failure) => {
                        return Err(turn.undo(&mut model.conversations, failure));
                    }
                }
            }
        }
        let parts = match model.parts(threads) {
            Ok(parts) => parts,
            Err(e) => {
                return Err(turn.undo(&mut model.conversations, (ErrorCode::Engine, e)));
            }
        };
        let ModelParts { engine, config, tokenizer, conversations, store, .. } = parts;
        let session = match kv_session(memory, engine, turn.conv.state.take(), positions, limit, &plan) {
            Ok((session, granules)) => {
                if let Some(granules) = granules {
                    turn.conv.kv_granules = granules;
                }
                session
            }
            Err(shortfall) => {
                let KvShortfall { state, reply } = *shortfall;
                turn.conv.state = state;
                return turn.undo(conversations, reply);
            }
        };
        let mut generator = Generator::resume(session, tokenizer, std::mem::take(&mut turn.conv.history));
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
        // The channel and the store are shared by the token stream and the
        // prefill's layer hook (which runs on a worker thread).
        let channel = std::sync::Mutex::new(channel);
        let store = std::sync::Mutex::new(store);
        let others = std::sync::Mutex::new(others);
        let timeline = std::sync::Mutex::new(timeline);
        let lock_timeline = || timeline.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let peer_gone = std::sync::atomic::AtomicBool::new(false);
        let cancelled = std::sync::atomic::AtomicBool::new(false);
        let recalled = std::sync::atomic::AtomicUsize::new(0);
        let failure: std::sync::Mutex<Option<Failure>> = std::sync::Mutex::new(None);
        let lock = || channel.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lock_store = || store.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let lock_others = || others.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A recall does not wait for the generation to end: between layers
        // of the prefill and between tokens the free granules go back at once
        // (the layers in use stay; the normal world can ask again once the
        // generation is over). A peer that went away stops the generation
        // there: nobody is left to read it. Chunks sent for a pipelined load
        // are decrypted and verified here too.
        let serve = |channel: &mut C, wait: bool| {
            let mut paused = false;
            let mut wait = wait;
            loop {
                if peer_gone.load(Ordering::Relaxed) {
                    return;
                }
                let (mut store, mut others) = (lock_store(), lock_others());
                let stores = Stores { model: g.model, store: &mut store, others: Some(&mut others) };
                match serve_during_generation(channel, memory, stores, &mut lock_timeline(), wait, 0) {
                    DuringGeneration::Nothing => {}
                    DuringGeneration::PeerGone => peer_gone.store(true, Ordering::Relaxed),
                    DuringGeneration::Cancel => {
                        cancelled.store(true, Ordering::Relaxed);
                        if channel.send(&Reply::Ok).is_err() {
                            peer_gone.store(true, Ordering::Relaxed);
                        }
                        return;
                    }
                    DuringGeneration::LoadFailed(f) => {
                        *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(f);
                    }
                    DuringGeneration::Answer { reply, released } => {
                        recalled.fetch_add(released, Ordering::Relaxed);
                        if channel.send(&reply).is_err() {
                            peer_gone.store(true, Ordering::Relaxed);
                        }
                    }
                    // The cores go to the normal world: nothing of this
                    // generation stays in the workers' scratch, and nothing
                    // computes until they come back.
                    DuringGeneration::Pause if !paused => {
                        let scrubbed = engine.scrub_worker_scratch();
                        if channel.send(&Reply::Paused { scrubbed }).is_err() {
                            peer_gone.store(true, Ordering::Relaxed);
                        }
                        // A cancelled generation ends instead: the normal
                        // world, having cancelled, sends no Resume.
                        paused = !cancelled.load(Ordering::Relaxed);
                    }
                    DuringGeneration::Pause => {
                        if channel.send(&Reply::Paused { scrubbed: true }).is_err() {
                            peer_gone.store(true, Ordering::Relaxed);
                        }
                    }
                    DuringGeneration::Resume => paused = false,
                }
                if !paused {
                    return;
                }
                wait = true;
            }
        };
        let stopped = || {
            peer_gone.load(Ordering::Relaxed)
                || cancelled.load(Ordering::Relaxed)
                || failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some()
        };
        let mut before_layer = |layer: usize| -> Result<(), EngineError> {
            if layer > 0 {
                lock_timeline().computed(layer - 1, Instant::now());
            }
            serve(&mut lock(), false);
            // A layer still loading: take its chunks as they come, then hand
            // it to the engine once every one is verified.
            while !stopped() && !engine.weights.has_layer(layer) {
                if lock_store().complete(layer) {
                    if let Err(e) = take_layer(&mut lock_store(), engine, config, layer) {
                        *failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
                            Some((ErrorCode::Engine, e));
                    }
                } else {
                    serve(&mut lock(), true);
                }
            }
            if stopped() {
                Err(EngineError::Cancelled)
            } else {
                lock_timeline().computing(layer, Instant::now());
                Ok(())
            }
        };
        let on_text = |piece: &str| {
            answer.push_str(piece);
            let mut channel = lock();
            let reply = match sealer.as_deref_mut() {
                None => Some(Reply::Token { text: piece.to_string() }),
                // A session that can seal no more (its counter ran out) ends the answer.
                Some(session) => session
                    .seal_record(&flexserve_e2e::Record::Text(piece.to_string()))
                    .ok()
                    .map(|record| Reply::Sealed { record }),
            };
            match reply {
                Some(reply) if !peer_gone.load(Ordering::Relaxed) => {
                    if channel.send(&reply).is_err() {
                        peer_gone.store(true, Ordering::Relaxed);
                    }
                }
                Some(_) => {}
                None => peer_gone.store(true, Ordering::Relaxed),
            }
            serve(&mut channel, false);
        };
        // A stream stops after its prompt: its tokens come from the batch's steps.
        let result = match park {
            None => generator.generate_with(&ids[..], &opts, on_text, &mut before_layer).map(Evaluated::Whole),
            Some(stream) => generator
                .prefill_with(&ids[..], &opts, &mut before_layer)
                .map(|pre| Evaluated::Prompt(Box::new(pre), stream)),
        };
        let mut timeline = timeline.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Ok(evaluated) = &result {
            timeline.prefill_ended(std::time::Duration::from_secs_f64(evaluated.prefill_secs()));
        }
        give_back(&mut self.granted_here, &self.principal, recalled.into_inner());
        let (session, history) = generator.into_parts();
        let mut conv = turn.conv;
        conv.history = history;
        if let Some(failure) = failure.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner) {
            answer.zeroize();
            return Err(failure);
        }
        let result = match result {
            // A stream's cache waits in its batch, with its first token sampled.
            Ok(Evaluated::Prompt(pre, stream)) => {
                return Ok(first_token(streams, stream, g.model, session.into_state(), *pre, timeline.layers))
            }
            Ok(Evaluated::Whole(stats)) => Ok(stats),
            Err(e) => Err(e),
        };
        conv.state = Some(session.into_state());
        let stats = match result {
            Ok(stats) => stats,
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
            layers: timeline.layers,
            stop: stop_reason(stats.stop),
        }))
    }

    /// Scores a text as llama.cpp's perplexity tool does; only the figure
    /// leaves the secure world.
    pub(super) fn perplexity(&mut self, id: u32, mut text: String, n_ctx: usize) -> Result<Reply, Failure> {
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
        if !model.store.fully_resident() {
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
        let ModelParts { engine, tokenizer, .. } = model.parts(threads).map_err(|e| (ErrorCode::Engine, e))?;
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
}

/// The conversation a generation works on, and what it takes to put it
/// back as it was if the turn does not run.
struct Turn {
    id: u32,
    existed: bool,
    conv: Conversation,
    /// Messages the conversation had before this turn.
    kept_messages: usize,
    /// The messages a whole-conversation request replaced.
    replaced: Option<Vec<ChatMessage>>,
}

impl Turn {
    /// The turn did not run: the messages it replaced come back, or those it
    /// added go, and a conversation kept from before is kept again. Returns `then`.
    fn undo<T>(mut self, conversations: &mut HashMap<u32, Conversation>, then: T) -> T {
        match self.replaced {
            Some(old) => self.conv.messages = old,
            None => self.conv.messages.truncate(self.kept_messages),
        }
        if self.existed {
            conversations.insert(self.id, self.conv);
        }
        then
    }
}

/// The text of a turn's prompt: raw text, one chat turn added to the
/// conversation, or a whole conversation that replaces it (through the
/// model's chat template).
fn render(turn: &mut Turn, input: Input, template: Option<&ChatTemplate>, model: u32) -> Result<String, Failure> {
    let conv = &mut turn.conv;
    match input {
        Input::Raw { text } => Ok(text),
        Input::ChatTurn { system, user } => match template {
            None => Err((ErrorCode::Engine, format!("model {model} has no chat template"))),
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
            None => Err((ErrorCode::Engine, format!("model {model} has no chat template"))),
            Some(_) if messages.is_empty() => Err((ErrorCode::BadArgument, "no messages".to_string())),
            Some(template) => {
                let turns = messages.into_iter().map(|m| ChatMessage::new(m.role, m.content)).collect();
                turn.replaced = Some(std::mem::replace(&mut conv.messages, turns));
                template.render(&conv.messages, true).map_err(|e| (ErrorCode::Engine, e.to_string()))
            }
        },
    }
}

pub(super) fn load_failure(e: LoadError) -> Failure {
    match e {
        LoadError::BadArgument(m) => (ErrorCode::BadArgument, m),
        LoadError::NoMemory(m) => (ErrorCode::NoMemory, m),
        LoadError::Verification(m) => (ErrorCode::Verification, m),
    }
}

fn peer_gone_failure() -> Failure {
    (ErrorCode::Cancelled, "the normal world went away".to_string())
}
