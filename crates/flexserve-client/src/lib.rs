//! The user's side of an encrypted session (docs/encrypted-sessions.md).
//!
//! [`identity`] checks the secure world's signed identity report and pins its
//! key; [`remote`] opens sessions to that secure world through a daemon and
//! carries encrypted chats; [`proxy`] serves a plain OpenAI-compatible
//! endpoint on the user's own machine that forwards every request through an
//! encrypted session, so any OpenAI client works unchanged.

#![forbid(unsafe_code)]

pub mod identity;
pub mod proxy;
pub mod remote;
pub mod sse;

pub use identity::{check_identity, write_private, CheckedIdentity};
pub use remote::{Remote, Session};

/// What went wrong on the client's side, each failure named.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached, or the connection broke.
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: reqwest::Error,
    },
    /// The daemon answered with an HTTP error (its OpenAI-style message).
    #[error("{what}: the server answered {status}: {message}")]
    Server { what: String, status: u16, code: Option<String>, message: String },
    /// The identity report does not verify, or its key is not the pinned or expected one.
    #[error("{0}")]
    Identity(String),
    /// An encrypted message failed (tampered, replayed, reordered, dropped, malformed).
    #[error("encrypted session: {0}")]
    Session(#[from] flexserve_e2e::E2eError),
    /// The answer's stream ended before its `done` or `error` record.
    #[error("the answer was truncated: the stream ended after {records} records without a done or error record")]
    Truncated { records: usize },
    /// The secure world answered the request with an error record.
    #[error("the secure world refused the request ({code}): {message}")]
    Refused { code: u16, message: String },
    /// A reply that does not follow the protocol (bad base64, missing field).
    #[error("{0}")]
    Protocol(String),
}

pub type Result<T> = std::result::Result<T, ClientError>;
