//! Backends: a loaded model served on threads of its own. A plain model runs
//! in this process's engine (the normal world may hold plain weights); a
//! sealed model runs in the secure world, through one session that this
//! backend keeps for as long as the model is loaded. The HTTP side hands a
//! backend jobs through a bounded queue and reads events back; a job whose
//! reader has gone (the client disconnected) is cancelled at the next layer
//! or token.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use flexserve_engine::generate::{GenerateOptions, Generator};
use flexserve_engine::weights::GgufSource;
use flexserve_engine::{EngineError, Model, SamplingParams, Session, StopReason};
use flexserve_normal::{NormalError, OpenedModel, SecureWorld};
use flexserve_protocol::{ErrorCode, GenerateRequest, Input, Message, Sampling, StatusReport};
use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::api::{ApiError, ErrorKind};

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
    /// The secure world's status (sealed models only).
    Status(oneshot::Sender<Result<StatusReport, String>>),
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
    /// Loads a plain model and starts `parallel` workers that share it.
    pub fn start_plain(path: &Path, threads: usize, parallel: usize, max_queue: usize) -> Result<Backend, String> {
        let plain = Arc::new(PlainModel::open(path, threads)?);
        let (tx, rx) = mpsc::sync_channel::<Command>(max_queue);
        let rx = Arc::new(Mutex::new(rx));
        let alive = Arc::new(AtomicBool::new(true));
        let mut handles = Vec::new();
        for i in 0..parallel.max(1) {
            let (plain, rx) = (plain.clone(), rx.clone());
            let name = format!("plain-{i}");
            let handle = std::thread::Builder::new()
                .name(name)
                .spawn(move || loop {
                    // One worker takes the next job; the others wait for the lock.
                    let next = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).recv();
                    match next {
                        Ok(Command::Generate(job)) => plain.run(job),
                        Ok(Command::Status(reply)) => {
                            let _ = reply.send(Err("a plain model runs in the normal world".to_string()));
                        }
                        Err(_) => return,
                    }
                })
                .map_err(|e| format!("starting a worker: {e}"))?;
            handles.push(handle);
        }
        Ok(Backend { kind: Kind::Plain, commands: Some(tx), alive, threads: handles })
    }

    /// Opens a session with the secure world, makes the sealed model
    /// resident there, and starts the worker that drives the session.
    pub fn start_sealed(path: &Path, connect: &SessionFactory, max_queue: usize) -> Result<Backend, String> {
        let mut world = connect()?;
        let (model, _report) =
            world.open_model(path).map_err(|e| format!("opening {} in the secure world: {e}", path.display()))?;
        let (tx, rx) = mpsc::sync_channel::<Command>(max_queue);
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let mut sealed = SealedModel { world, model, path: path.to_path_buf() };
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
                    };
                    if !healthy {
                        // The session is gone: fail what is queued; the next request opens a new one.
                        flag.store(false, Ordering::SeqCst);
                        while let Ok(command) = rx.try_recv() {
                            if let Command::Generate(job) = command {
                                let _ = job.events.blocking_send(Event::Failed(secure_world_gone()));
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

fn finish_reason(stop: StopReason) -> &'static str {
    match stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
    }
}

/// A plain model in this process.
struct PlainModel {
    path: PathBuf,
    model: Model,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
}

impl PlainModel {
    fn open(path: &Path, threads: usize) -> Result<PlainModel, String> {
        let file = flexserve_gguf::GgufFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let source = GgufSource::from_file(Arc::new(file));
        let meta = &source.header().metadata;
        let tokenizer = Tokenizer::from_gguf(meta).map_err(|e| format!("tokenizer of {}: {e}", path.display()))?;
        let template = ChatTemplate::from_gguf(meta, &tokenizer)
            .map_err(|e| format!("chat template of {}: {e}", path.display()))?;
        let model = Model::from_source(&source, threads).map_err(|e| format!("loading {}: {e}", path.display()))?;
        Ok(PlainModel { path: path.to_path_buf(), model, tokenizer, template })
    }

    fn run(&self, job: Job) {
        let events = job.events.clone();
        let job_cancelled = job.cancelled.clone();
        let outcome = self.generate(job);
        let _ = events.blocking_send(match outcome {
            Ok(Some(finish)) => Event::Done(finish),
            Ok(None) => {
                job_cancelled.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) => Event::Failed(e),
        });
    }

    /// `Ok(None)`: the client went away and the generation was cancelled.
    fn generate(&self, job: Job) -> Result<Option<Finish>, ApiError> {
        let text = match job.input {
            JobInput::Prompt(p) => p,
            JobInput::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ApiError::bad_request(
                        format!("{} has no chat template: use /v1/completions", self.path.display()),
                        Some("messages"),
                    )
                })?;
                let turns: Vec<ChatMessage> =
                    messages.into_iter().map(|m| ChatMessage::new(m.role, m.content)).collect();
                template.render(&turns, true).map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?
            }
        };
        let ids = self.tokenizer.encode(&text, true, true);
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        let p = &job.params;
        let limit = if p.n_ctx == 0 { self.model.config.n_ctx_train } else { p.n_ctx as usize };
        if ids.len() >= limit {
            return Err(context_exceeded(ids.len(), limit));
        }
        // The cache holds the prompt and what may be generated, within the context.
        let positions = (ids.len() + p.max_tokens as usize).min(limit);
        let session = Session::new(&self.model, positions);
        let mut generator = Generator::new(session, &self.tokenizer);
        let opts = GenerateOptions {
            max_tokens: p.max_tokens as usize,
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: p.seed,
                ..SamplingParams::default()
            },
            stop: p.stop.clone(),
        };
        let events = &job.events;
        let gone = AtomicBool::new(false);
        let result = generator.generate_with(
            &ids,
            &opts,
            |piece| {
                if events.blocking_send(Event::Text(piece.to_string())).is_err() {
                    gone.store(true, Ordering::Relaxed);
                }
            },
            &mut || {
                if gone.load(Ordering::Relaxed) || events.is_closed() {
                    ControlFlow::Break(())
                } else {
                    ControlFlow::Continue(())
                }
            },
        );
        match result {
            Ok(stats) => Ok(Some(Finish {
                prompt_tokens: (stats.prompt_tokens + stats.cached_tokens) as u32,
                completion_tokens: stats.generated_tokens as u32,
                prompt_ms: stats.prefill_secs * 1e3,
                predicted_ms: stats.decode_secs * 1e3,
                finish_reason: finish_reason(stats.stop),
            })),
            Err(EngineError::Cancelled) => Ok(None),
            Err(EngineError::ContextFull { n_ctx, needed }) => Err(context_exceeded(needed, n_ctx)),
            Err(e) => Err(ApiError::new(ErrorKind::Internal, e.to_string())),
        }
    }
}

fn context_exceeded(needed: usize, n_ctx: usize) -> ApiError {
    ApiError::bad_request(
        format!("the prompt needs {needed} positions and more to answer; the context holds {n_ctx}"),
        Some("messages"),
    )
    .with_code("context_length_exceeded")
}

/// A sealed model resident in the secure world, and the session that holds it.
struct SealedModel {
    world: SecureWorld,
    model: OpenedModel,
    path: PathBuf,
}

impl SealedModel {
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
                repeat_penalty: 1.0,
                repeat_last_n: 64,
                seed: p.seed,
            },
            stop: p.stop.clone(),
        };
        let events = &job.events;
        let started = Instant::now();
        let result = self.world.generate_until(
            &self.model,
            request,
            |piece| {
                let _ = events.blocking_send(Event::Text(piece.to_string()));
            },
            || events.is_closed(),
        );
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
