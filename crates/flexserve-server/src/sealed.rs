//! Sealed models: each loaded one has a session with the secure world, and a
//! thread here that drives it. Its generations are continuously batched in
//! the secure world: a new request is admitted (its prompt evaluated there,
//! its first token sent) between two decode steps, every step decodes one
//! token of each stream in one pass over the weights, a finished stream
//! leaves, and one whose client went away is ended at once. Under the
//! cores' lease the batch holds the cores while it has streams and hands
//! them to waiting plain work between steps (the secure world scrubbing its
//! workers first). Other commands (status, encrypted sessions) are served
//! between steps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use flexserve_normal::{NormalError, OpenedModel, SecureWorld};
use flexserve_protocol::{ErrorCode, GenerateRequest, GenerationReport, Input, Sampling, StreamStep};
use tokio::sync::mpsc as async_mpsc;

use crate::api::{ApiError, ErrorKind};
use crate::jobs::{
    encrypted_error, secure_world_gone, session_lost, Command, EncryptedJob, Event, Finish, GenParams, Job, JobInput,
    SealedEvent, WeightsPrefetch,
};
use crate::lease::SecureTenant;

/// A sealed model resident in the secure world, and the session that holds it.
pub(crate) struct SealedModel {
    pub(crate) world: SecureWorld,
    pub(crate) model: OpenedModel,
    pub(crate) path: PathBuf,
    /// The session's share of the cores' lease (`--cores lease`).
    pub(crate) tenant: Option<Arc<SecureTenant>>,
    /// The backend's liveness, cleared as soon as the session is lost:
    /// before the batch's clients hear of it, so that their next request
    /// finds the backend dead and opens a new session.
    pub(crate) alive: Arc<std::sync::atomic::AtomicBool>,
}

/// A generation in the secure world's batch, as its client sees it.
struct Live {
    events: async_mpsc::Sender<Event>,
    cancelled: Arc<AtomicU64>,
}

/// The batch: live generations by stream id, and whether it holds the cores.
#[derive(Default)]
struct Batch {
    live: BTreeMap<u32, Live>,
    last_id: u32,
    holds_cores: bool,
}

impl SealedModel {
    /// Serves commands until the queue closes (the model unloads: true) or
    /// the session with the secure world is lost (false).
    pub(crate) fn serve(mut self, rx: &mpsc::Receiver<Command>, slots: usize) -> bool {
        let mut batch = Batch::default();
        loop {
            let mut healthy = true;
            // Admit: wait while idle, else take what is queued, up to the slots.
            while healthy && batch.live.len() < slots {
                let next = if batch.live.is_empty() {
                    rx.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
                } else {
                    rx.try_recv()
                };
                healthy = match next {
                    Ok(Command::Generate(job)) => self.start(job, &mut batch),
                    Ok(other) => self.serve_command(other, batch.holds_cores),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) if batch.live.is_empty() => {
                        self.release_cores(&mut batch);
                        return true;
                    }
                    Err(mpsc::TryRecvError::Disconnected) => break,
                };
            }
            if healthy && !batch.live.is_empty() {
                healthy = self.step(&mut batch) && self.yield_cores(&batch);
            }
            if !healthy {
                break;
            }
            if batch.live.is_empty() {
                self.release_cores(&mut batch);
            }
        }
        // The session is lost: so are the generations in its batch, and the
        // lease goes without a scrub to ask for.
        self.alive.store(false, Ordering::SeqCst);
        for (_, l) in std::mem::take(&mut batch.live) {
            let _ = l.events.blocking_send(Event::Failed(secure_world_gone()));
        }
        if let (Some(t), true) = (&self.tenant, batch.holds_cores) {
            t.end();
        }
        false
    }

    /// Admits a generation into the batch: its prompt is evaluated in the
    /// secure world (through the pipeline while the model loads) and its
    /// first token sent. False when the session is lost.
    fn start(&mut self, job: Job, batch: &mut Batch) -> bool {
        if let (Some(t), false) = (&self.tenant, batch.holds_cores) {
            t.begin();
            batch.holds_cores = true;
        }
        let id = loop {
            batch.last_id = batch.last_id.wrapping_add(1);
            if !batch.live.contains_key(&batch.last_id) {
                break batch.last_id;
            }
        };
        let request = generate_request(self.model.id, job.input, &job.params);
        let events = job.events.clone();
        let started = Instant::now();
        match self.world.start_stream(&self.model, id, request, || events.is_closed()) {
            Ok(first) => {
                batch.live.insert(id, Live { events: job.events, cancelled: job.cancelled });
                deliver(&mut batch.live, first);
                true
            }
            Err(e) => self.failed(e, &job.events, &job.cancelled, started),
        }
    }

    /// One decode step of the batch, after ending the streams whose clients
    /// left. False when the session is lost.
    fn step(&mut self, batch: &mut Batch) -> bool {
        let gone: Vec<u32> = batch.live.iter().filter(|(_, l)| l.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            if let Some(l) = batch.live.remove(&id) {
                l.cancelled.fetch_add(1, Ordering::Relaxed);
            }
            if let Err(e) = self.world.end_stream(id) {
                if session_lost(&e) {
                    return false;
                }
            }
        }
        if batch.live.is_empty() {
            return true;
        }
        let started = Instant::now();
        match self.world.step_streams(&self.model) {
            Ok(steps) => {
                for step in steps {
                    deliver(&mut batch.live, step);
                }
                true
            }
            Err(e) => {
                // The step's streams ended with it (the secure world dropped them).
                let (error, healthy) = self.explain(e, started);
                for (_, l) in std::mem::take(&mut batch.live) {
                    let _ = l.events.blocking_send(Event::Failed(error.clone()));
                }
                healthy
            }
        }
    }

    /// Between steps: plain work waiting for the cores gets them (the secure
    /// world scrubs its workers' scratch first). False when the session is lost.
    fn yield_cores(&mut self, batch: &Batch) -> bool {
        if !batch.holds_cores {
            return true;
        }
        !matches!(self.world.yield_cores_if_contended(), Err(ref e) if session_lost(e))
    }

    /// The batch is empty: the cores go back, nothing of it left in the
    /// secure world's workers.
    fn release_cores(&mut self, batch: &mut Batch) {
        if !batch.holds_cores {
            return;
        }
        let _ = self.world.scrub_cores();
        if let Some(t) = &self.tenant {
            t.end();
        }
        batch.holds_cores = false;
    }

    /// Serves a command other than a generation; false when the session is lost.
    fn serve_command(&mut self, command: Command, holds_cores: bool) -> bool {
        match command {
            Command::Generate(_) => unreachable!("generations join the batch"),
            Command::Status(reply) => {
                let status = self.world.status();
                let healthy = !matches!(status, Err(ref e) if session_lost(e));
                let _ = reply.send(status.map_err(|e| e.to_string()));
                healthy
            }
            Command::OpenEncrypted { handshake, reply } => {
                let opened = self.world.open_encrypted(&self.model, handshake);
                let healthy = !matches!(opened, Err(ref e) if session_lost(e));
                let _ = reply.send(opened.map_err(encrypted_error));
                healthy
            }
            Command::Encrypted(job) => self.run_encrypted(job, holds_cores),
            Command::Embed(job) => {
                // Sealed models in the secure world are generative ones for now.
                let _ = job.reply.send(Err(crate::jobs::not_an_encoder()));
                true
            }
            Command::CloseEncrypted { session } => {
                !matches!(self.world.close_encrypted(session), Err(ref e) if session_lost(e))
            }
            Command::PrefetchWeights { spare_bytes, stop, reply } => {
                let loaded = weights_fit(&mut self.world, &self.model, spare_bytes).and_then(|fits| {
                    if !fits {
                        return Ok(WeightsPrefetch::NoRoom);
                    }
                    let report = self.world.prefetch(&self.model, stop)?;
                    Ok(WeightsPrefetch::Loaded { chunks: report.chunks, stopped: report.stopped })
                });
                let healthy = !matches!(loaded, Err(ref e) if session_lost(e));
                let _ = reply.send(loaded.unwrap_or_else(|e| WeightsPrefetch::Failed(e.to_string())));
                healthy
            }
        }
    }

    /// Carries one encrypted request and its sealed answer (whole, between
    /// two steps of the batch); false when the session with the secure world is lost.
    fn run_encrypted(&mut self, job: EncryptedJob, holds_cores: bool) -> bool {
        let tenant = if holds_cores { None } else { self.tenant.clone() };
        if let Some(t) = &tenant {
            t.begin();
        }
        let events = &job.events;
        let result = self.world.generate_encrypted(
            &self.model,
            job.session,
            job.n_ctx,
            job.message,
            |record| {
                let _ = events.blocking_send(SealedEvent::Record(record));
            },
            || events.is_closed(),
        );
        if let Some(t) = &tenant {
            t.end();
        }
        let (event, healthy) = match result {
            Ok(()) => (SealedEvent::End, true),
            Err(NormalError::Secure { code: ErrorCode::Cancelled, .. }) => {
                job.cancelled.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Err(e) => {
                let healthy = !session_lost(&e);
                (SealedEvent::Failed(encrypted_error(e)), healthy)
            }
        };
        let _ = events.blocking_send(event);
        healthy
    }

    /// Tells a generation's client why it failed (or counts it cancelled);
    /// false when the session with the secure world is lost.
    fn failed(
        &self,
        e: NormalError,
        events: &async_mpsc::Sender<Event>,
        cancelled: &AtomicU64,
        started: Instant,
    ) -> bool {
        if let NormalError::Secure { code: ErrorCode::Cancelled, .. } = e {
            cancelled.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        let (error, healthy) = self.explain(e, started);
        let _ = events.blocking_send(Event::Failed(error));
        healthy
    }

    /// The HTTP error for a failed generation (a request begun at
    /// `started`), and whether the session with the secure world goes on.
    fn explain(&self, e: NormalError, started: Instant) -> (ApiError, bool) {
        match e {
            NormalError::Secure { code: ErrorCode::BadArgument, message } => {
                (ApiError::bad_request(message, None), true)
            }
            e if session_lost(&e) => {
                eprintln!(
                    "flexserve serve: the secure world session for {} ended after {:.1} s: {e}",
                    self.path.display(),
                    started.elapsed().as_secs_f64()
                );
                (secure_world_gone(), false)
            }
            e => (ApiError::new(ErrorKind::Internal, e.to_string()), true),
        }
    }
}

/// Hands a step's text to its stream's client, and the finish when it ended.
fn deliver(live: &mut BTreeMap<u32, Live>, step: StreamStep) {
    let Some(l) = live.get(&step.stream) else { return };
    if !step.text.is_empty() {
        let _ = l.events.blocking_send(Event::Text(step.text));
    }
    if let Some(report) = step.finished {
        if let Some(l) = live.remove(&step.stream) {
            let _ = l.events.blocking_send(Event::Done(finish(&report)));
        }
    }
}

fn finish(report: &GenerationReport) -> Finish {
    Finish {
        prompt_tokens: report.prompt_tokens + report.cached_tokens,
        completion_tokens: report.generated_tokens,
        prompt_ms: report.prefill_micros as f64 / 1e3,
        predicted_ms: report.decode_micros as f64 / 1e3,
        finish_reason: match report.stop {
            flexserve_protocol::StopReason::MaxTokens | flexserve_protocol::StopReason::ContextFull => "length",
            _ => "stop",
        },
    }
}

/// The secure world's request for a job: a one-off generation.
fn generate_request(model: u32, input: JobInput, p: &GenParams) -> GenerateRequest {
    GenerateRequest {
        model,
        conversation: 0,
        input: match input {
            JobInput::Chat(messages) => Input::Messages { messages },
            JobInput::Prompt(text) => Input::Raw { text },
        },
        max_tokens: p.max_tokens,
        n_ctx: p.n_ctx,
        sampling: Sampling {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            min_p: p.min_p,
            seed: p.seed,
            ..Sampling::default()
        },
        stop: p.stop.clone(),
    }
}

/// Whether the secure memory free or still grantable holds `model`'s weights
/// with `spare_bytes` left over. The pool's figures are the service's whole
/// pool (every session's use), so memory another model's running request
/// holds or may still grant is counted as taken.
fn weights_fit(world: &mut SecureWorld, model: &OpenedModel, spare_bytes: u64) -> Result<bool, NormalError> {
    let status = world.status()?;
    let free = u64::from(status.free_granules());
    let grantable = world.budget_granules().saturating_sub(u64::from(status.granted));
    let spare = spare_bytes.div_ceil(world.info().granule_size.max(1));
    Ok(u64::from(model.granules_needed) + spare <= free + grantable)
}
