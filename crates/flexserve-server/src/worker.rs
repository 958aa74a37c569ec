//! Backends: a loaded model served on threads of its own. A plain model runs
//! in this process's engine (the normal world may hold plain weights); a
//! sealed model runs in the secure world, through one session that this
//! backend keeps for as long as the model is loaded. The HTTP side hands a
//! backend jobs through a bounded queue and reads events back; a job whose
//! reader has gone (the client disconnected) is cancelled at the next layer
//! or token.

use crate::lease::{CoreArbiter, SecureTenant};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Instant;

use flexserve_engine::StopReason;
use flexserve_normal::{NormalError, OpenedModel, SecureWorld};
use flexserve_protocol::{ErrorCode, GenerateRequest, Input, Message, Sampling, StatusReport};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::api::{ApiError, ErrorKind};
use crate::batch::PlainModel;

/// Opens a session with the secure world (the service, or a development one).
pub type SessionFactory = Arc<dyn Fn() -> Result<SecureWorld, String> + Send + Sync>;

/// What a request asks the model for.
#[derive(Debug, Clone)]
pub enum JobInput {
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<Message>),
    /// A raw prompt.
    Prompt(String),
}

/// Limits and sampling of one generation.
#[derive(Debug, Clone)]
pub struct GenParams {
    pub max_tokens: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: u32,
    pub min_p: f32,
    pub seed: u64,
    pub stop: Vec<String>,
    /// Context (0: the model's own).
    pub n_ctx: u32,
}

/// How a generation ended, with its counts and times.
#[derive(Debug, Clone)]
pub struct Finish {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub prompt_ms: f64,
    pub predicted_ms: f64,
    /// "stop" or "length".
    pub finish_reason: &'static str,
}

/// What a backend sends back for a job.
#[derive(Debug)]
pub enum Event {
    Text(String),
    Done(Finish),
    Failed(ApiError),
}

pub struct Job {
    pub input: JobInput,
    pub params: GenParams,
    pub events: async_mpsc::Sender<Event>,
    /// Counts the job if it is cancelled because its reader went away.
    pub cancelled: Arc<std::sync::atomic::AtomicU64>,
}

pub enum Command {
    Generate(Job),
    /// Embeddings of some inputs (encoder models only).
    Embed(crate::embeddings::EmbedJob),
    /// The secure world's status (sealed models only).
    Status(oneshot::Sender<Result<StatusReport, String>>),
    /// Opens an encrypted session with a client (sealed models only): the
    /// client's handshake message in; the session id and the answer out.
    OpenEncrypted {
        handshake: Vec<u8>,
        reply: oneshot::Sender<Result<(u64, Vec<u8>), ApiError>>,
    },
    /// A client's encrypted request on a session of this model.
    Encrypted(EncryptedJob),
    /// Ends an encrypted session.
    CloseEncrypted {
        session: u64,
    },
}

/// A client's encrypted request: the daemon carries it and the records of
/// the answer, and can read neither.
pub struct EncryptedJob {
    pub session: u64,
    pub message: Vec<u8>,
    /// Context (0: the model's own).
    pub n_ctx: u32,
    pub events: async_mpsc::Sender<SealedEvent>,
    pub cancelled: Arc<std::sync::atomic::AtomicU64>,
}

/// What a backend sends back for an encrypted job.
#[derive(Debug)]
pub enum SealedEvent {
    /// A record of the answer, sealed to the client.
    Record(Vec<u8>),
    /// The answer is complete (its last record was sent).
    End,
    Failed(ApiError),
}

/// Answers a command a plain model cannot serve.
pub(crate) fn refuse_on_plain(command: Command) {
    let not_sealed = || {
        ApiError::bad_request(
            "encrypted sessions are answered by the secure world: this model is a plain one, served in the normal \
             world",
            Some("model"),
        )
        .with_code("model_not_sealed")
    };
    match command {
        Command::Status(reply) => {
            let _ = reply.send(Err("a plain model runs in the normal world".to_string()));
        }
        Command::OpenEncrypted { reply, .. } => {
            let _ = reply.send(Err(not_sealed()));
        }
        Command::Encrypted(job) => {
            let _ = job.events.blocking_send(SealedEvent::Failed(not_sealed()));
        }
        Command::Embed(job) => {
            let _ = job.reply.send(Err(crate::embeddings::not_an_encoder()));
        }
        Command::Generate(_) | Command::CloseEncrypted { .. } => {}
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Sealed,
}

/// A loaded model and the threads that serve it.
pub struct Backend {
    pub kind: Kind,
    commands: Option<mpsc::SyncSender<Command>>,
    /// Cleared when a worker stops because its secure world went away.
    alive: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Loads a plain model and starts the thread that serves it: for a
    /// generative model, up to `slots` requests decoded together, one batched
    /// step at a time; for an encoder, embeddings one input after another.
    pub fn start_plain(
        path: &Path,
        threads: usize,
        slots: usize,
        max_queue: usize,
        cores: Option<Arc<CoreArbiter>>,
    ) -> Result<Backend, String> {
        let (tx, rx) = mpsc::sync_channel::<Command>(max_queue);
        let alive = Arc::new(AtomicBool::new(true));
        let worker = std::thread::Builder::new().name("plain".to_string());
        // Opened once: its header says which engine serves it.
        let file = flexserve_gguf::GgufFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let handle = if crate::embeddings::is_encoder(&file) {
            let encoder = crate::embeddings::EncoderModel::open(path, file, threads, cores)?;
            worker.spawn(move || encoder.serve(&rx))
        } else {
            let plain = PlainModel::open(path, file, threads, cores)?;
            worker.spawn(move || plain.serve(&rx, slots.max(1)))
        }
        .map_err(|e| format!("starting a worker: {e}"))?;
        Ok(Backend { kind: Kind::Plain, commands: Some(tx), alive, threads: vec![handle] })
    }

    /// Opens a session with the secure world, opens the sealed model there
    /// (making it resident now with `resident`, else its weights stream
    /// through the pipeline with the first request), and starts the worker
    /// that drives the session.
    pub fn start_sealed(
        path: &Path,
        connect: &SessionFactory,
        max_queue: usize,
        resident: bool,
        cores: Option<Arc<CoreArbiter>>,
    ) -> Result<Backend, String> {
        let mut world = connect()?;
        let tenant = cores.map(SecureTenant::new);
        if let Some(t) = &tenant {
            world.set_core_lease(t.clone());
        }
        let opened = if resident { world.open_model(path) } else { world.open_model_header(path) };
        let (model, _report) = opened.map_err(|e| format!("opening {} in the secure world: {e}", path.display()))?;
        let (tx, rx) = mpsc::sync_channel::<Command>(max_queue);
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let mut sealed = SealedModel { world, model, path: path.to_path_buf(), tenant };
        let handle = std::thread::Builder::new()
            .name("sealed".to_string())
            .spawn(move || {
                while let Ok(command) = rx.recv() {
                    let healthy = match command {
                        Command::Generate(job) => sealed.run(job),
                        Command::Status(reply) => {
                            let status = sealed.world.status();
                            let healthy = !matches!(status, Err(ref e) if session_lost(e));
                            let _ = reply.send(status.map_err(|e| e.to_string()));
                            healthy
                        }
                        Command::OpenEncrypted { handshake, reply } => {
                            let opened = sealed.world.open_encrypted(&sealed.model, handshake);
                            let healthy = !matches!(opened, Err(ref e) if session_lost(e));
                            let _ = reply.send(opened.map_err(encrypted_error));
                            healthy
                        }
                        Command::Encrypted(job) => sealed.run_encrypted(job),
                        Command::Embed(job) => {
                            // Sealed models in the secure world are generative ones for now.
                            let _ = job.reply.send(Err(crate::embeddings::not_an_encoder()));
                            true
                        }
                        Command::CloseEncrypted { session } => {
                            !matches!(sealed.world.close_encrypted(session), Err(ref e) if session_lost(e))
                        }
                    };
                    if !healthy {
                        // The session is gone: fail what is queued; the next request opens a new one.
                        flag.store(false, Ordering::SeqCst);
                        while let Ok(command) = rx.try_recv() {
                            match command {
                                Command::Generate(job) => {
                                    let _ = job.events.blocking_send(Event::Failed(secure_world_gone()));
                                }
                                Command::Encrypted(job) => {
                                    let _ = job.events.blocking_send(SealedEvent::Failed(secure_world_gone()));
                                }
                                Command::OpenEncrypted { reply, .. } => {
                                    let _ = reply.send(Err(secure_world_gone()));
                                }
                                Command::Embed(job) => {
                                    let _ = job.reply.send(Err(secure_world_gone()));
                                }
                                Command::Status(_) | Command::CloseEncrypted { .. } => {}
                            }
                        }
                        return;
                    }
                }
            })
            .map_err(|e| format!("starting a worker: {e}"))?;
        Ok(Backend { kind: Kind::Sealed, commands: Some(tx), alive, threads: vec![handle] })
    }

    /// Queues a command; a full queue is an overload (503).
    pub fn submit(&self, command: Command) -> Result<(), ApiError> {
        let Some(commands) = &self.commands else { return Err(secure_world_gone()) };
        commands.try_send(command).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => ApiError::new(
                ErrorKind::Overloaded,
                "the server is busy: every slot is taken and the queue is full; try again shortly",
            ),
            mpsc::TrySendError::Disconnected(_) => secure_world_gone(),
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    /// Unloading: the queue closes, the workers finish what they hold and
    /// stop; a sealed model's session ends, and the secure world scrubs it.
    fn drop(&mut self) {
        self.commands.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn secure_world_gone() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "the secure world went away during this request; the next request reconnects and reopens the model",
    )
    .with_code("secure_world_unavailable")
}

/// Whether an error means the session with the secure world is over.
fn session_lost(e: &NormalError) -> bool {
    matches!(e, NormalError::Died(_) | NormalError::SessionClosed(_) | NormalError::Protocol(_) | NormalError::Io(_))
}

pub(crate) fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
    }
}

pub(crate) fn context_exceeded(needed: usize, n_ctx: usize) -> ApiError {
    ApiError::bad_request(
        format!("the prompt needs {needed} positions and more to answer; the context holds {n_ctx}"),
        Some("messages"),
    )
    .with_code("context_length_exceeded")
}

/// The HTTP error for a failed encrypted-session command.
fn encrypted_error(e: NormalError) -> ApiError {
    match e {
        NormalError::Secure { code: ErrorCode::EncryptedSession, message } => {
            ApiError::bad_request(message, None).with_code("encrypted_session_ended")
        }
        NormalError::Secure { code: ErrorCode::BadArgument, message } => ApiError::bad_request(message, None),
        e if session_lost(&e) => secure_world_gone(),
        e => ApiError::new(ErrorKind::Internal, e.to_string()),
    }
}

/// A sealed model resident in the secure world, and the session that holds it.
struct SealedModel {
    world: SecureWorld,
    model: OpenedModel,
    path: PathBuf,
    /// The session's share of the cores' lease (`--cores lease`).
    tenant: Option<Arc<crate::lease::SecureTenant>>,
}

impl SealedModel {
    /// Runs `work` (one generation) holding the cores when they are leased.
    fn on_cores<T>(&mut self, work: impl FnOnce(&mut SealedModel) -> T) -> T {
        let tenant = self.tenant.clone();
        if let Some(t) = &tenant {
            t.begin();
        }
        let out = work(self);
        if let Some(t) = &tenant {
            t.end();
        }
        out
    }
}

impl SealedModel {
    /// Carries one encrypted request and its sealed answer; false when the
    /// session with the secure world is lost.
    fn run_encrypted(&mut self, job: EncryptedJob) -> bool {
        let events = &job.events;
        let (session, n_ctx, message) = (job.session, job.n_ctx, job.message);
        let result = self.on_cores(|s| {
            s.world.generate_encrypted(
                &s.model,
                session,
                n_ctx,
                message,
                |record| {
                    let _ = events.blocking_send(SealedEvent::Record(record));
                },
                || events.is_closed(),
            )
        });
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

    /// Runs one job; false when the session with the secure world is lost.
    fn run(&mut self, job: Job) -> bool {
        let p = &job.params;
        let request = GenerateRequest {
            model: self.model.id,
            conversation: 0,
            input: match job.input {
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
        };
        let events = &job.events;
        let started = Instant::now();
        let result = self.on_cores(|s| {
            s.world.generate_until(
                &s.model,
                request,
                |piece| {
                    let _ = events.blocking_send(Event::Text(piece.to_string()));
                },
                || events.is_closed(),
            )
        });
        let (event, healthy) = match result {
            Ok(report) => (
                Event::Done(Finish {
                    prompt_tokens: report.prompt_tokens + report.cached_tokens,
                    completion_tokens: report.generated_tokens,
                    prompt_ms: report.prefill_micros as f64 / 1e3,
                    predicted_ms: report.decode_micros as f64 / 1e3,
                    finish_reason: match report.stop {
                        flexserve_protocol::StopReason::MaxTokens | flexserve_protocol::StopReason::ContextFull => {
                            "length"
                        }
                        _ => "stop",
                    },
                }),
                true,
            ),
            Err(NormalError::Secure { code: ErrorCode::Cancelled, .. }) => {
                job.cancelled.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Err(NormalError::Secure { code: ErrorCode::BadArgument, message }) => {
                (Event::Failed(ApiError::bad_request(message, None)), true)
            }
            Err(e) if session_lost(&e) => {
                eprintln!(
                    "flexserve serve: the secure world session for {} ended after {:.1} s: {e}",
                    self.path.display(),
                    started.elapsed().as_secs_f64()
                );
                (Event::Failed(secure_world_gone()), false)
            }
            Err(e) => (Event::Failed(ApiError::new(ErrorKind::Internal, e.to_string())), true),
        };
        let _ = events.blocking_send(event);
        healthy
    }
}
