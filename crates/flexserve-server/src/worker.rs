//! Backends: a loaded model served on threads of its own. A plain model runs
//! in this process's engine (the normal world may hold plain weights); a
//! sealed model runs in the secure world, through one session that this
//! backend keeps for as long as the model is loaded. The HTTP side hands a
//! backend jobs through a bounded queue and reads events back; a job whose
//! reader has gone (the client disconnected) is cancelled at the next layer
//! or token.

use crate::lease::{CoreArbiter, SecureTenant};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use flexserve_engine::StopReason;
use flexserve_normal::{NormalError, SecureWorld};
use flexserve_protocol::{ErrorCode, Message, StatusReport};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::api::{ApiError, ErrorKind};
use crate::batch::PlainModel;
use crate::sealed::SealedModel;

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
    /// that drives the session: up to `slots` generations decoded together
    /// in the secure world, one batched step at a time.
    pub fn start_sealed(
        path: &Path,
        connect: &SessionFactory,
        slots: usize,
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
        let sealed = SealedModel { world, model, path: path.to_path_buf(), tenant };
        let handle = std::thread::Builder::new()
            .name("sealed".to_string())
            .spawn(move || {
                if !sealed.serve(&rx, slots.max(1)) {
                    // The session is gone: fail what is queued; the next request opens a new one.
                    flag.store(false, Ordering::SeqCst);
                    fail_queued(&rx);
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

/// Fails every command still queued for a session that is gone.
fn fail_queued(rx: &mpsc::Receiver<Command>) {
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
}

pub(crate) fn secure_world_gone() -> ApiError {
    ApiError::new(
        ErrorKind::Unavailable,
        "the secure world went away during this request; the next request reconnects and reopens the model",
    )
    .with_code("secure_world_unavailable")
}

/// Whether an error means the session with the secure world is over.
pub(crate) fn session_lost(e: &NormalError) -> bool {
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
pub(crate) fn encrypted_error(e: NormalError) -> ApiError {
    match e {
        NormalError::Secure { code: ErrorCode::EncryptedSession, message } => {
            ApiError::bad_request(message, None).with_code("encrypted_session_ended")
        }
        NormalError::Secure { code: ErrorCode::BadArgument, message } => ApiError::bad_request(message, None),
        e if session_lost(&e) => secure_world_gone(),
        e => ApiError::new(ErrorKind::Internal, e.to_string()),
    }
}
