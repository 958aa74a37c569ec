//! What a request and its answer carry. The user's words are zeroized when
//! these values are dropped, and `Debug` prints their lengths, not their text.

use std::fmt;

use zeroize::Zeroize;

use crate::{E2eError, DEFAULT_MAX_TOKENS};

pub use flexserve_protocol::{Sampling, StopReason, MAX_STOP_BYTES, MAX_STOP_STRINGS};

/// The most tokens a request may ask for (as the daemon's own API allows).
pub const MAX_MAX_TOKENS: u32 = flexserve_protocol::MAX_GENERATED_TOKENS;

/// Overwrites the sampling settings (numbers the client chose, so zeroized too).
fn zeroize_sampling(s: &mut Sampling) {
    s.temperature.zeroize();
    s.top_k.zeroize();
    s.top_p.zeroize();
    s.min_p.zeroize();
    s.repeat_penalty.zeroize();
    s.repeat_last_n.zeroize();
    s.seed.zeroize();
}

/// One turn of a conversation; its text is zeroized on drop.
#[derive(Clone, PartialEq)]
pub struct ChatMessage {
    /// "system", "user", "assistant" or "developer".
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

impl Drop for ChatMessage {
    fn drop(&mut self) {
        self.role.zeroize();
        self.content.zeroize();
    }
}

impl fmt::Debug for ChatMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatMessage")
            .field("role", &self.role)
            .field("content", &format_args!("<{} bytes>", self.content.len()))
            .finish()
    }
}

/// A chat request as the client encrypts it; zeroized on drop.
#[derive(Clone, PartialEq)]
pub struct ChatRequest {
    /// The model the session was opened for (the secure world checks it).
    pub model: String,
    /// 0: `DEFAULT_MAX_TOKENS`.
    pub max_tokens: u32,
    pub sampling: Sampling,
    pub stop: Vec<String>,
    pub messages: Vec<ChatMessage>,
}

impl ChatRequest {
    /// A request with the default sampling, no stop strings and max_tokens 0 (the default).
    pub fn new(model: impl Into<String>, messages: Vec<ChatMessage>) -> Self {
        ChatRequest { model: model.into(), max_tokens: 0, sampling: Sampling::default(), stop: Vec::new(), messages }
    }

    /// The number of tokens to generate at most (`max_tokens`, 0 meaning the default).
    pub fn effective_max_tokens(&self) -> u32 {
        if self.max_tokens == 0 {
            DEFAULT_MAX_TOKENS
        } else {
            self.max_tokens
        }
    }

    /// Checks the fields' ranges as the daemon's HTTP API checks them, naming
    /// the first field out of range. The secure world calls this on a request
    /// it opened (the daemon cannot: it never sees these fields).
    pub fn validate(&self) -> Result<(), E2eError> {
        let bad = |field: &'static str, reason: String| Err(E2eError::Invalid { field, reason });
        if self.model.is_empty() {
            return bad("model", "the model name is empty".into());
        }
        if self.max_tokens > MAX_MAX_TOKENS {
            return bad("max_tokens", format!("at most {MAX_MAX_TOKENS}, got {}", self.max_tokens));
        }
        let s = &self.sampling;
        if !s.temperature.is_finite() || !(0.0..=100.0).contains(&s.temperature) {
            return bad("temperature", format!("must be between 0 and 100, got {}", s.temperature));
        }
        if !s.top_p.is_finite() || !(0.0..=1.0).contains(&s.top_p) || s.top_p == 0.0 {
            return bad("top_p", format!("must be in (0, 1], got {}", s.top_p));
        }
        if !s.min_p.is_finite() || !(0.0..=1.0).contains(&s.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", s.min_p));
        }
        if !s.repeat_penalty.is_finite() || s.repeat_penalty <= 0.0 {
            return bad("repeat_penalty", format!("must be finite and above 0, got {}", s.repeat_penalty));
        }
        if self.stop.len() > MAX_STOP_STRINGS || self.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            return bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes"));
        }
        if self.messages.is_empty() {
            return bad("messages", "there are no messages".into());
        }
        if let Some(m) =
            self.messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer"))
        {
            return bad("messages.role", format!("unknown role {:?}", m.role));
        }
        Ok(())
    }
}

impl Drop for ChatRequest {
    fn drop(&mut self) {
        self.model.zeroize();
        self.max_tokens.zeroize();
        zeroize_sampling(&mut self.sampling);
        self.stop.zeroize();
        // The messages zeroize themselves when the vector drops them.
    }
}

impl fmt::Debug for ChatRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatRequest")
            .field("model", &self.model)
            .field("max_tokens", &self.max_tokens)
            .field("sampling", &self.sampling)
            .field("stop", &format_args!("<{} strings>", self.stop.len()))
            .field("messages", &self.messages)
            .finish()
    }
}

/// The end of an answer, with its figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Done {
    pub stop: StopReason,
    pub prompt_tokens: u32,
    pub generated_tokens: u32,
    pub prefill_micros: u64,
    pub decode_micros: u64,
}

/// One piece of an answer, secure world to client; its text is zeroized on drop.
#[derive(Clone, PartialEq)]
pub enum Record {
    /// The next piece of the answer (whole UTF-8).
    Text(String),
    /// The answer ended.
    Done(Done),
    /// The answer failed; `code` numbers as the world protocol's `ErrorCode`
    /// (0 malformed, 1 out of order, 2 version, 3 no such model, 4 verification,
    /// 5 no memory, 6 not resident, 7 bad argument, 8 engine, 9 internal,
    /// 10 policy, 11 cancelled, 12 encrypted session).
    Error { code: u16, message: String },
}

impl Record {
    /// True for the records that end an answer (`Done` and `Error`).
    pub fn is_final(&self) -> bool {
        !matches!(self, Record::Text(_))
    }
}

impl Drop for Record {
    fn drop(&mut self) {
        match self {
            Record::Text(text) => text.zeroize(),
            Record::Error { message, .. } => message.zeroize(),
            Record::Done(_) => {}
        }
    }
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Record::Text(text) => write!(f, "Text(<{} bytes>)", text.len()),
            Record::Done(done) => f.debug_tuple("Done").field(done).finish(),
            Record::Error { code, message } => {
                f.debug_struct("Error").field("code", code).field("message", message).finish()
            }
        }
    }
}
