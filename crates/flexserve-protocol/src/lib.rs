//! The world boundary: the only way the normal world talks to the secure world.
//!
//! Control messages travel over a Unix stream socket as length-prefixed frames
//! (see `codec`); bulk data (sealed headers and chunk ciphertext) travels
//! through a shared-memory buffer (`shared`) that the normal world fills and
//! the secure world copies out of before using. The command set is small,
//! versioned and size-bounded so that the secure side can check every message
//! completely before acting on it.
//!
//! Plaintext never crosses this boundary towards the normal world except the
//! generated text itself (streamed as [`Reply::Token`]); token ids, weights,
//! keys and the KV cache stay inside.

mod codec;
mod shared;

pub use codec::{
    decode_reply, decode_request, encode_reply, encode_request, read_reply, read_request, write_reply, write_request,
    ProtocolError,
};
pub use shared::{RangeError, SharedBuffer};

/// Version of this command set; both sides must agree (see [`Request::Hello`]).
pub const PROTOCOL_VERSION: u16 = 8;
/// The format name of the secure world's identity report ([`Reply::Identity`]).
pub const IDENTITY_REPORT_FORMAT: &str = "flexserve-identity-report-1";
/// Largest frame (one message) either side accepts.
pub const MAX_FRAME_LEN: usize = 4 << 20;
/// Largest string in a message (prompts, pieces of text, names, error messages).
pub const MAX_TEXT_LEN: usize = 2 << 20;
/// Largest number of elements in a list field.
pub const MAX_LIST_LEN: usize = 1 << 16;
/// Largest byte string in a message (an encrypted session's request or record,
/// which the normal world carries without being able to read it).
pub const MAX_SEALED_LEN: usize = 3 << 20;

/// Bytes `offset .. offset + len` of the shared buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferRange {
    pub offset: u64,
    pub len: u64,
}

/// A sealed chunk (ciphertext then tag, as on file) placed in the shared buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk's index in the sealed model's chunk table.
    pub index: u32,
    pub at: BufferRange,
}

/// Chunk indices `start .. end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub start: u32,
    pub end: u32,
}

/// Commands from the normal world.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    /// First message of a connection.
    Hello {
        version: u16,
    },
    /// Open a sealed model: its header region (file bytes `0 .. T + 32 [+ G]`)
    /// lies in the shared buffer. `name` is for status displays only.
    OpenModel {
        name: String,
        header: BufferRange,
    },
    /// Management right: the normal world raises the secure memory quota by
    /// this many granules (the secure world prepares them at once).
    Grant {
        granules: u32,
    },
    /// Sealed chunks of an open model, placed in the shared buffer. While
    /// another model generates, they load into `model`'s own regions (the
    /// normal world prefetching the model a later step needs), answered
    /// `ChunksLoaded` with how many loaded in order (fewer when one found
    /// no free granted granule or failed verification, none while the
    /// generation's own first layers load); the generation goes on either way.
    LoadChunks {
        model: u32,
        chunks: Vec<ChunkRef>,
    },
    /// Which chunks of the model are not resident (never loaded, or evicted).
    MissingChunks {
        model: u32,
    },
    /// Generate text; answered by zero or more [`Reply::Token`] then
    /// [`Reply::Generated`] or [`Reply::Error`], or at once by
    /// [`Reply::MemoryNeeded`] when the KV cache does not fit the free granules.
    Generate(GenerateRequest),
    /// Forget a conversation's history and KV cache.
    EndConversation {
        model: u32,
        conversation: u32,
    },
    /// Close a model, scrubbing its memory (granules return to the free pool).
    Unload {
        model: u32,
    },
    /// Management right: take back this many granules; the secure world
    /// picks which, scrubs and releases them, and says how many it gave.
    Recall {
        granules: u32,
    },
    /// Scrub layers of one model (its last layers first, its base last)
    /// until `granules` granules have come free; they stay granted, in the
    /// free pool, for the next model to load into. The normal world's
    /// scheduler picks the model (the one needed furthest ahead); answered
    /// by [`Reply::Evicted`].
    Evict {
        model: u32,
        granules: u32,
    },
    /// Flex-NPU: the normal world takes the cores back. A running generation
    /// stops at its next layer or token, scrubs the scratch its worker
    /// threads keep, answers [`Reply::Paused`] and waits for
    /// [`Request::Resume`] (serving recalls and Cancel meanwhile). Between
    /// requests nothing runs: the scratch is scrubbed and `Paused` answered.
    Pause,
    /// The cores come back to a paused generation, which goes on (its tokens
    /// are the answer); between requests, answered `Ok`.
    Resume,
    Status,
    Shutdown,
    /// Perplexity of a text (scored in chunks of `n_ctx` tokens, second
    /// halves), answered by [`Reply::Perplexity`] (or [`Reply::MemoryNeeded`]
    /// for its KV cache): how well a sealed model predicts it, without the
    /// normal world decrypting anything.
    Perplexity {
        model: u32,
        text: String,
        n_ctx: u32,
    },
    /// The public half of the device key, which the secure world generated
    /// and keeps: what a vendor seals models to.
    DevicePublicKey,
    /// A raw model key (64 hex digits), sealed by the secure world under its
    /// device key; the reply's blob is what the normal world stores instead.
    ImportKey {
        key: String,
    },
    /// A blob from [`Reply::KeyImported`] (hex), opened and held for this session.
    AddStoredKey {
        stored: String,
    },
    /// Stop the running generation at its next layer or token: it then ends
    /// with `Error{Cancelled}`. Answered `Ok` at once (also when nothing runs).
    Cancel,
    /// The secure world's identity report, signed by its identity key.
    Identity,
    /// Opens an encrypted session with a client for `model`: `handshake` is
    /// the client's first Noise message (see `docs/encrypted-sessions.md`),
    /// answered by [`Reply::EncryptedOpened`].
    OpenEncrypted {
        model: u32,
        handshake: Vec<u8>,
    },
    /// A client's encrypted request on an open session: answered by
    /// [`Reply::Sealed`] records (the answer, encrypted to the client) then
    /// `Ok`; or [`Reply::MemoryNeeded`] (grant, then send the same bytes
    /// again); or an error (`EncryptedSession` ends the session).
    GenerateEncrypted {
        session: u64,
        /// Context length (0: the model's own).
        n_ctx: u32,
        message: Vec<u8>,
    },
    /// Ends an encrypted session (`Ok` also when there is none).
    CloseEncrypted {
        session: u64,
    },
    /// Continuous batching: admits a one-off generation (conversation 0)
    /// into the batch of its model under the id `stream` (the peer's choice,
    /// unused among its streams). Answered as `Generate` is while its prompt
    /// is evaluated (`MemoryNeeded` then the same request again, `LoadNeeded`
    /// and chunks for a model not resident, `Paused`, `Recalled`; `Cancel`
    /// stops it), then [`Reply::Stepped`] with its first token: the stream
    /// waits in the batch (unless it ended there), and its next tokens come
    /// from [`Request::StepStreams`]. At most [`MAX_STREAMS`] at once.
    StartStream {
        stream: u32,
        request: GenerateRequest,
    },
    /// One decode step for every stream of `model`, all of them evaluated in
    /// one pass over the weights: answered by [`Reply::Stepped`], or by
    /// `MemoryNeeded` (the step's activations do not fit the free granules;
    /// grant, then step again). A stream that ends leaves the batch.
    StepStreams {
        model: u32,
    },
    /// Ends a stream before its end (its client left); its KV cache is
    /// scrubbed. `Ok`, also when there is no such stream.
    EndStream {
        stream: u32,
    },
}

/// Most generations one session keeps in its batches at once
/// ([`Request::StartStream`]).
pub const MAX_STREAMS: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    pub model: u32,
    /// 0: a one-off request. Otherwise the secure world keeps this
    /// conversation's messages and KV cache for the next request with the same id.
    pub conversation: u32,
    pub input: Input,
    pub max_tokens: u32,
    /// Context length (0: the secure world's default for the model).
    pub n_ctx: u32,
    pub sampling: Sampling,
    /// Generation ends when the text contains one of these.
    pub stop: Vec<String>,
}

/// What to generate from. Templates and tokenization run in the secure world.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Continue this text as is (no chat template).
    Raw { text: String },
    /// The next user turn of a chat (rendered with the model's template).
    ChatTurn { system: Option<String>, user: String },
    /// A whole conversation, rendered with the model's chat template in the
    /// secure world (an OpenAI-style request carries every turn).
    Messages { messages: Vec<Message> },
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// "system", "user" or "assistant".
    pub role: String,
    pub content: String,
}

/// Most tokens a request may ask for (the HTTP API and encrypted requests alike).
pub const MAX_GENERATED_TOKENS: u32 = 1 << 20;
/// Most stop strings a request may carry.
pub const MAX_STOP_STRINGS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 1024;

/// The sampling settings of a request; [`Sampling::default`] holds the
/// defaults of the daemon's HTTP API and of encrypted requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    pub top_k: u32,
    pub top_p: f32,
    pub min_p: f32,
    pub repeat_penalty: f32,
    pub repeat_last_n: u32,
    pub seed: u64,
}

/// Answers from the secure world.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Hello {
        version: u16,
        /// Memory protection in force ("memfd_secret" or "locked-anonymous").
        protection: String,
        /// "flexible" or "static-carve-out".
        pool_mode: String,
        granule_size: u64,
    },
    ModelOpened {
        model: u32,
        chunks: u32,
        /// Granules the model's weights occupy when fully resident.
        granules_needed: u32,
    },
    Granted {
        /// Quota after this grant, in granules.
        granted: u32,
        /// Granules prepared (mapped, faulted, protected) by this grant.
        prepared: u32,
        micros: u64,
    },
    ChunksLoaded {
        loaded: u32,
    },
    Missing {
        chunks: Vec<ChunkSpan>,
    },
    /// A generation on a model that is not fully resident is admitted (its
    /// memory is there) and waits for these chunks, in this order (the order
    /// the forward pass needs them): the normal world streams them as
    /// `LoadChunks` while the first layers already compute. Each `LoadChunks`
    /// sent meanwhile is answered `ChunksLoaded` (fewer than sent if the
    /// generation stopped at one, whose reason its own final `Error` gives);
    /// those the generation did not take are served after its end as usual.
    LoadNeeded {
        chunks: Vec<ChunkSpan>,
    },
    /// A piece of generated text (complete UTF-8).
    Token {
        text: String,
    },
    Generated(GenerationReport),
    Recalled {
        /// Granules released to the operating system.
        released: u32,
        /// Of those, granules that held model layers or KV caches (evicted).
        evicted: u32,
        micros: u64,
    },
    /// The secure world's compute has stopped for [`Request::Pause`].
    Paused {
        /// Whether every worker thread's scratch read zero after scrubbing.
        scrubbed: bool,
    },
    /// What an [`Request::Evict`] freed.
    Evicted {
        /// Granules that came free (at least those asked for, unless the model had no more).
        freed: u32,
        /// Layer groups scrubbed (the base group counts as one).
        groups: u32,
        micros: u64,
    },
    Status(StatusReport),
    Ok,
    Error {
        code: ErrorCode,
        message: String,
    },
    Perplexity {
        tokens: u32,
        chunks: u32,
        ppl: f64,
        /// Standard error of the estimate.
        ppl_err: f64,
    },
    /// The request needs this many more granules granted (for a KV cache)
    /// before it can run; nothing was done. The normal world grants them
    /// (within its budget) and sends the request again.
    MemoryNeeded {
        granules: u32,
    },
    DevicePublicKey {
        key: String,
    },
    KeyImported {
        stored: String,
    },
    /// A JSON document and the hex Ed25519 signature of exactly its bytes.
    Identity {
        report: String,
        signature: String,
    },
    /// An encrypted session is open: `handshake` is the secure world's Noise
    /// message for the client.
    EncryptedOpened {
        session: u64,
        handshake: Vec<u8>,
    },
    /// One record of an encrypted answer, for the client alone.
    Sealed {
        record: Vec<u8>,
    },
    /// What a [`Request::StepStreams`] gave each stream of the model, in
    /// stream id order (or a [`Request::StartStream`] its stream).
    Stepped {
        streams: Vec<StreamStep>,
    },
}

/// One stream's share of a decode step.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamStep {
    pub stream: u32,
    /// Text that became certain at this step (maybe empty).
    pub text: String,
    /// The stream's report, when it ended at this step (it left the batch).
    pub finished: Option<GenerationReport>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    EndOfGeneration,
    MaxTokens,
    StopString,
    ContextFull,
}

impl Default for Sampling {
    /// Temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, no repeat penalty
    /// (1.0 over the last 64 tokens), seed 0.
    fn default() -> Self {
        Sampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationReport {
    pub prompt_tokens: u32,
    pub cached_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_micros: u64,
    pub decode_micros: u64,
    /// Where the prefill's time went, per group of weights (the layers in
    /// order, then the base group: embeddings and output).
    pub layers: Vec<LayerTiming>,
    pub stop: StopReason,
}

/// One group of a model's weights during a generation, in microseconds
/// since the secure world took the request; `0 .. 0` where nothing happened
/// (a resident layer is not decrypted; the base group is not a layer of the
/// forward pass). The normal world can time all of it from outside anyway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerTiming {
    /// The transformer layer, or the layer count for the base group.
    pub layer: u32,
    /// From the first of its chunks decrypted and verified to the last.
    pub decrypt_from: u64,
    pub decrypt_to: u64,
    /// The time spent decrypting and verifying its chunks.
    pub decrypt_micros: u64,
    /// Its computation in the prefill (the last layer's ends with the logits).
    pub compute_from: u64,
    pub compute_to: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StatusReport {
    pub deployment: Deployment,
    /// The uid the secure world runs as.
    pub secure_uid: u32,
    /// Yama's `ptrace_scope` ("0".."3"), or "absent".
    pub ptrace_scope: String,
    /// Kernel lockdown ("none", "integrity", "confidentiality"), or "absent".
    pub lockdown: String,
    /// The policy in force, one `key = value` line each.
    pub policy: Vec<String>,
    /// What weakens the protection on this machine, each in a sentence.
    pub warnings: Vec<String>,
    pub protection: String,
    pub pool_mode: String,
    pub granule_size: u64,
    /// Quota granted by the normal world.
    pub granted: u32,
    /// Granules mapped and protected (in use plus free).
    pub prepared: u32,
    pub in_use: u32,
    /// Bytes of the secure heap (tokenizer, prompts, messages).
    pub heap_bytes: u64,
    /// Bytes allocated from the secure heap now.
    pub heap_allocated: u64,
    /// Most bytes allocated from the secure heap at once since the last
    /// `Generate` or `Perplexity` began (what a request needs beside its
    /// granules).
    pub heap_peak: u64,
    pub models: Vec<ModelStatus>,
}

impl StatusReport {
    /// Granules prepared and free: what a load takes without a grant (the reserve).
    pub fn free_granules(&self) -> u32 {
        self.prepared.saturating_sub(self.in_use)
    }
}

/// How the secure world was started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deployment {
    /// Its own principal: started by the privileged launcher under its own
    /// uid, serving peers over a Unix socket.
    Service,
    /// Started by the normal world as its own user: nothing protects it from
    /// that user. For development on machines without root.
    Development,
}

impl Deployment {
    pub fn describe(self) -> &'static str {
        match self {
            Deployment::Service => "service (own uid, started by the launcher)",
            Deployment::Development => "DEVELOPMENT MODE: UNPROTECTED (runs as the normal world's own user)",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelStatus {
    pub model: u32,
    pub name: String,
    pub layers: u32,
    pub resident_layers: u32,
    pub chunks: u32,
    pub resident_chunks: u32,
    pub weight_bytes: u64,
    /// Granules holding the KV caches of this model's conversations.
    pub kv_granules: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// The message could not be decoded.
    Malformed,
    /// The message is valid but not expected now (e.g. before Hello).
    OutOfOrder,
    /// The peer speaks another protocol version.
    Version,
    /// No open model (or conversation) with that id.
    NoSuchModel,
    /// A header or chunk failed verification (wrong key, tampered data).
    Verification,
    /// Not enough granted secure memory.
    NoMemory,
    /// The model has chunks that are not resident; load them first.
    NotResident,
    /// A range outside the shared buffer, a chunk of the wrong size, ...
    BadArgument,
    /// The engine failed (context full, bad input).
    Engine,
    Internal,
    /// The secure world's policy forbids it (scoring, an unsigned model, a peer outside its group).
    Policy,
    /// The generation was stopped by a `Cancel`.
    Cancelled,
    /// An encrypted session does not exist, or refused a message that did not
    /// decrypt as the next one (tampered, replayed, reordered or dropped); the
    /// session is ended.
    EncryptedSession,
}
