//! What the HTTP side and the backends say to each other: the jobs a
//! backend is handed through its queue, the events it sends back, and the
//! errors a job's outcome maps to. Every backend (plain batch, sealed
//! batch, encoder) and every endpoint imports these; they import neither.

use std::sync::Arc;

use flexserve_engine::StopReason;
use flexserve_normal::NormalError;
use flexserve_protocol::{ErrorCode, Message, StatusReport};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::api::{ApiError, ErrorKind};

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
    Embed(EmbedJob),
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
    /// Loads a sealed model's missing weights ahead of its first request,
    /// if the budget holds them with `spare_bytes` left over; stops between
    /// two batches once `stop` says a request wants the model (its
    /// pipelined load streams the rest).
    PrefetchWeights {
        spare_bytes: u64,
        stop: Box<dyn Fn() -> bool + Send>,
        reply: oneshot::Sender<WeightsPrefetch>,
    },
}

/// What a [`Command::PrefetchWeights`] did.
#[derive(Debug)]
pub enum WeightsPrefetch {
    /// Chunks loaded; why it stopped short, if it did.
    Loaded {
        chunks: usize,
        stopped: Option<String>,
    },
    /// Nothing loaded: the budget has no room for the weights beside what is in use.
    NoRoom,
    Failed(String),
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
            let _ = job.reply.send(Err(not_an_encoder()));
        }
        Command::PrefetchWeights { reply, .. } => {
            let _ = reply.send(WeightsPrefetch::Failed("a plain model runs in the normal world".to_string()));
        }
        Command::Generate(_) | Command::CloseEncrypted { .. } => {}
    }
}

/// One input to embed.
#[derive(Debug, Clone)]
pub enum EmbedInput {
    Text(String),
    /// Token ids, used as given (the caller added any special tokens).
    Tokens(Vec<u32>),
}

/// What an encoder answers: one vector per input, in order.
#[derive(Debug)]
pub struct Embeddings {
    pub vectors: Vec<Vec<f32>>,
    pub prompt_tokens: u32,
}

pub struct EmbedJob {
    pub inputs: Vec<EmbedInput>,
    pub reply: oneshot::Sender<Result<Embeddings, ApiError>>,
}

/// The answer to an embeddings request sent to a model that does not make them.
pub(crate) fn not_an_encoder() -> ApiError {
    ApiError::bad_request(
        "this model generates text and makes no embeddings; embeddings come from encoder models (nomic-bert)",
        Some("model"),
    )
    .with_code("model_not_embedding")
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
