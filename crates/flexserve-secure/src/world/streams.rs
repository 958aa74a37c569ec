//! Continuous batching in the secure world: generations admitted with
//! `StartStream` wait here between requests, each with its KV cache (in its
//! region of granted granules), its token stream and the logits to sample
//! from next; `StepStreams` decodes every stream of a model in one pass over
//! its weights (`Session::decode_batch`), so several clients of a sealed
//! model cost little more than one. The normal world drives the steps: it
//! admits a new request between two of them and ends a stream whose client
//! left, and everything else it may ask (grants, recalls, status, a pause
//! for the cores) is served between steps as between any two requests.

use flexserve_engine::{Next, ParkedTokens, Prefilled, Session, TokenStream};
use flexserve_protocol::{LayerTiming, StreamStep, MAX_STREAMS};

use super::answer::{stop_reason, Answer};
use super::generation::memory::memory_short;
use super::*;
use crate::models::ModelParts;

/// A generation waiting in its model's batch.
pub(super) struct Stream {
    pub(super) model: u32,
    /// The KV cache and its fill (taken while a step runs).
    state: Option<SessionState>,
    /// Sampling and text state (taken while a step runs).
    tokens: Option<ParkedTokens>,
    /// The token sampled last, which the next step evaluates.
    next: u32,
    prompt_tokens: u32,
    cached_tokens: u32,
    prefill_micros: u64,
    /// The prompt's layer timeline (decrypting and computing), for its report.
    layers: Vec<LayerTiming>,
    /// When its first token was sampled: the decode clock starts there.
    decode_started: Instant,
}

/// Samples a stream's next token from `logits`: its text, and the token to
/// evaluate next or how it ended.
fn sample(tokens: &mut TokenStream<'_>, logits: &[f32], room: bool) -> (String, Next) {
    let mut text = String::new();
    let next = tokens.step(logits, room, &mut |piece| text.push_str(piece));
    (text, next)
}

impl Stream {
    /// The report of a stream that ended with `generated` tokens.
    fn report(&mut self, generated: usize, stop: flexserve_engine::StopReason) -> GenerationReport {
        GenerationReport {
            prompt_tokens: self.prompt_tokens,
            cached_tokens: self.cached_tokens,
            generated_tokens: generated as u32,
            prefill_micros: self.prefill_micros,
            decode_micros: self.decode_started.elapsed().as_micros() as u64,
            layers: std::mem::take(&mut self.layers),
            stop: stop_reason(stop),
        }
    }
}

/// A prompt just evaluated: its first token is sampled now (so that it
/// reaches the client without waiting for a step), and the stream waits in
/// the batch unless it ended at once. Returns the reply.
pub(super) fn first_token(
    streams: &mut BTreeMap<u32, Stream>,
    id: u32,
    model: u32,
    state: SessionState,
    pre: Prefilled<'_>,
    layers: Vec<LayerTiming>,
) -> Reply {
    let Prefilled { mut tokens, mut logits, prompt_tokens, cached_tokens, prefill_secs } = pre;
    let room = state.n_past() < state.n_ctx();
    let (text, next) = sample(&mut tokens, &logits, room);
    logits.zeroize();
    let generated = tokens.generated().len();
    let mut stream = Stream {
        model,
        state: Some(state),
        tokens: Some(tokens.park()),
        next: 0,
        prompt_tokens: prompt_tokens as u32,
        cached_tokens: cached_tokens as u32,
        prefill_micros: (prefill_secs * 1e6) as u64,
        layers,
        decode_started: Instant::now(),
    };
    let finished = match next {
        Next::Evaluate(token) => {
            stream.next = token;
            None
        }
        Next::Done(stop) => Some(stream.report(generated, stop)),
    };
    if finished.is_none() {
        streams.insert(id, stream);
    }
    Reply::Stepped { streams: vec![StreamStep { stream: id, text, finished }] }
}

impl Drop for Stream {
    /// What the stream generated is user data: wiped (its KV cache's region
    /// is scrubbed as it is freed).
    fn drop(&mut self) {
        if let Some(tokens) = &mut self.tokens {
            tokens.wipe();
        }
    }
}

impl<M: SecureMemory, C: Channel, X: Compute> SecureWorld<M, C, X> {
    /// Admits a one-off generation into its model's batch (its prompt is
    /// evaluated now, through the pipeline if the model is not resident).
    pub(super) fn start_stream(&mut self, stream: u32, g: GenerateRequest) -> Result<Reply, Failure> {
        if g.conversation != 0 {
            return Err((
                ErrorCode::BadArgument,
                format!(
                    "stream {stream}: a stream is a one-off generation (conversation 0), not conversation {}",
                    g.conversation
                ),
            ));
        }
        if self.streams.contains_key(&stream) {
            return Err((ErrorCode::BadArgument, format!("stream {stream} is already in a batch")));
        }
        if self.streams.len() >= MAX_STREAMS {
            return Err((
                ErrorCode::BadArgument,
                format!(
                    "stream {stream} would be one more than the {MAX_STREAMS} a session batches at once (MAX_STREAMS)"
                ),
            ));
        }
        self.generate(g, Answer::Stream(stream))
    }

    /// Evaluates the last sampled token of every stream of `id` together
    /// and samples each one's next; those that end leave with their reports.
    pub(super) fn step_streams(&mut self, id: u32) -> Result<Reply, Failure> {
        let threads = self.compute.threads();
        let memory = &self.memory;
        let model = self.models.get_mut(&id).ok_or_else(|| no_model(id))?;
        let batch: Vec<u32> = self.streams.iter().filter(|(_, s)| s.model == id).map(|(&k, _)| k).collect();
        if batch.is_empty() {
            return Ok(Reply::Stepped { streams: Vec::new() });
        }
        // The step's activations, in granted granules, before anything changes.
        let positions = batch.iter().filter_map(|k| self.streams[k].state.as_ref()).map(|s| s.n_ctx()).max();
        let ModelParts { engine, tokenizer, .. } = model.parts(threads).map_err(|e| (ErrorCode::Engine, e))?;
        let plan = engine.scratch_plan(batch.len(), positions.unwrap_or(1), batch.len());
        let granule = memory.granule_size().max(1);
        if let Some(reply) = memory_short(memory, plan.buffers.iter().map(|b| b.div_ceil(granule)).sum())? {
            return Ok(reply);
        }
        let mut sessions = Vec::with_capacity(batch.len());
        let mut next = Vec::with_capacity(batch.len());
        for k in &batch {
            let s = self.streams.get_mut(k).expect("listed above");
            let resumed = match s.state.take() {
                Some(state) => Session::resume(engine, state),
                None => Err(EngineError::Other(format!("stream {k} lost its cache in an earlier step"))),
            };
            match resumed {
                Ok(session) => sessions.push(session),
                Err(e) => return Err(self.fail_step(&batch, engine_failure(e))),
            }
            next.push(s.next);
        }
        sessions[0].set_scratch_source(Arc::new(GrantedScratch(memory.clone())));
        let evaluated = match sessions[0].reserve_scratch(&plan) {
            Ok(()) => {
                let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
                Session::decode_batch(&mut refs, &next)
            }
            Err(e) => Err(e),
        };
        for (k, session) in batch.iter().zip(sessions) {
            self.streams.get_mut(k).expect("listed above").state = Some(session.into_state());
        }
        let logits = match evaluated {
            Ok(logits) => logits,
            Err(e) => return Err(self.fail_step(&batch, engine_failure(e))),
        };
        let mut steps = Vec::with_capacity(batch.len());
        for (k, mut logits) in batch.into_iter().zip(logits) {
            let s = self.streams.get_mut(&k).expect("listed above");
            let room = s.state.as_ref().is_some_and(|state| state.n_past() < state.n_ctx());
            let Some(parked) = s.tokens.take() else {
                return Err((ErrorCode::Internal, format!("stream {k} lost its token stream")));
            };
            let mut tokens = parked.resume(tokenizer);
            let (text, sampled) = sample(&mut tokens, &logits, room);
            logits.zeroize();
            let generated = tokens.generated().len();
            s.tokens = Some(tokens.park());
            let finished = match sampled {
                Next::Evaluate(token) => {
                    s.next = token;
                    None
                }
                Next::Done(stop) => {
                    let report = s.report(generated, stop);
                    self.streams.remove(&k);
                    Some(report)
                }
            };
            steps.push(StreamStep { stream: k, text, finished });
        }
        Ok(Reply::Stepped { streams: steps })
    }

    /// A step that could not evaluate its streams ends them: none can go on.
    fn fail_step(&mut self, going: &[u32], failure: Failure) -> Failure {
        for k in going {
            self.streams.remove(k);
        }
        failure
    }

    /// Ends a stream early; `Ok` also when it already ended.
    pub(super) fn end_stream(&mut self, stream: u32) -> Reply {
        self.streams.remove(&stream);
        Reply::Ok
    }

    /// Whether a model has streams in its batch: its layers are in use.
    pub(super) fn has_streams(&self, model: u32) -> bool {
        self.streams.values().any(|s| s.model == model)
    }
}
