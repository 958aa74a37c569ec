//! Generation and scoring in the secure world: the template and tokenizer
//! run here, the KV cache and activations live in granted granules, and
//! while tokens are produced the channel is watched for a recall, a cancel
//! or a peer that went away.

use super::*;

impl<M: SecureMemory, C: Channel, X: Compute> SecureWorld<M, C, X> {
    /// Runs a generation; its text streams as `Token` replies, or with
    /// `sealer` as records sealed to an encrypted session's client.
    pub(super) fn generate(
        &mut self,
        g: GenerateRequest,
        mut sealer: Option<&mut flexserve_e2e::ServerSession>,
    ) -> Result<Reply, Failure> {
        let threads = self.compute.threads();
        let kept_conversations: usize = self.models.values().map(|m| m.conversations.len()).sum();
        let channel = &mut self.channel;
        let memory = &self.memory;
        let model = self.models.get_mut(&g.model).ok_or_else(|| no_model(g.model))?;
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
        if !model.fully_resident() {
            let missing = model.chunk_count() - model.resident_chunks();
            return Err((
                ErrorCode::NotResident,
                format!("model {}: {missing} of {} chunks are not resident", g.model, model.chunk_count()),
            ));
        }
        model.engine(threads).map_err(|e| (ErrorCode::Engine, e))?;
        let longest_token = model.longest_token;
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
                undo_turn(&mut conv, replaced, kept_messages);
                if existed {
                    conversations.insert(g.conversation, conv);
                }
                return Err(failure);
            }
        };
        let mut ids = tokenizer.encode(&text, true, true);
        text.zeroize();
        // A kept conversation keeps no more text than its prompt can use: what
        // the prompt's tokens can spell, each at most the model's longest
        // token (the answer, made of generated tokens, stays within that too).
        // A template that leaves text out (trims it, drops messages) would
        // otherwise let a conversation's messages grow without bound.
        if chat && g.conversation != 0 {
            let kept_bytes: usize = conv.messages.iter().map(|m| m.role.len() + m.content.len()).sum();
            let most = ids.len().saturating_mul(longest_token);
            if kept_bytes > most {
                ids.zeroize();
                undo_turn(&mut conv, replaced, kept_messages);
                if existed {
                    conversations.insert(g.conversation, conv);
                }
                return Err((
                    ErrorCode::BadArgument,
                    format!(
                        "conversation {} would keep {kept_bytes} bytes of messages, more than its prompt of {} \
                         tokens can use ({most} bytes: at most {longest_token}, the model's longest token, per \
                         token); the chat template leaves text out, and a conversation keeps only what its \
                         context can use",
                        g.conversation,
                        ids.len()
                    ),
                ));
            }
        }
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
                undo_turn(&mut conv, replaced, kept_messages);
                if existed {
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
                serve_recall(&mut channel);
            },
            &mut between_layers,
        );
        ids.zeroize();
        give_back(&mut self.granted_here, &self.principal, recalled.into_inner());
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
}

/// Takes a turn that did not run out of its conversation: the messages it
/// replaced come back, or those it added go.
fn undo_turn(conv: &mut Conversation, replaced: Option<Vec<ChatMessage>>, kept_messages: usize) {
    match replaced {
        Some(old) => conv.messages = old,
        None => conv.messages.truncate(kept_messages),
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
