//! What can go wrong in an encrypted session, each failure named.

/// An encrypted session's failure. The messages name what is wrong and never
/// quote the plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum E2eError {
    /// The Noise handshake failed (a wrong server key, a message of the wrong
    /// length, a tampered handshake message).
    #[error("the encrypted-session handshake failed: {0}")]
    Handshake(String),

    /// A transport message that does not authenticate under the nonce its
    /// receiver expects.
    #[error(
        "{what} does not decrypt at the expected nonce {nonce}: it was tampered with, replayed, reordered or \
         dropped (the session is ended; open a new one)"
    )]
    Decrypt { what: &'static str, nonce: u64 },

    /// A message or plaintext whose length cannot be the padded length the
    /// protocol produces, or whose plaintext ends before its body length says.
    #[error("{what} of {len} bytes is truncated or extended: {reason}")]
    Truncated { what: &'static str, len: usize, reason: &'static str },

    /// A plaintext that decrypted but does not follow the layout.
    #[error("malformed {field}: {reason}")]
    Malformed { field: &'static str, reason: String },

    /// A request whose plaintext is over `MAX_REQUEST_PLAINTEXT`, or a record
    /// over one Noise message.
    #[error("{what} of {len} bytes is over {limit} ({max} bytes)")]
    TooLarge { what: &'static str, len: usize, limit: &'static str, max: usize },

    /// A request of a layout version this side does not know.
    #[error("unknown request version {0} (this side speaks version 1)")]
    UnknownVersion(u8),

    /// A record of a kind this side does not know.
    #[error("unknown record kind {0} (known: 1 text, 2 done, 3 error)")]
    UnknownKind(u8),

    /// A request field that decodes but is out of range.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },

    /// An earlier failure ended the session.
    #[error("the encrypted session is broken by an earlier failure: {0}; open a new session")]
    Broken(String),

    /// `accept` was given a request opened at another receive nonce.
    #[error("the opened request was read at nonce {opened_at}, but the session now expects nonce {expected}")]
    StaleRequest { opened_at: u64, expected: u64 },

    /// Noise refused to seal a message (it should not: sizes and nonces are checked first).
    #[error("sealing a message failed: {0}")]
    Seal(String),

    /// The session's nonces are used up (2^64 - 1 messages).
    #[error("the session's nonces are exhausted; open a new session")]
    Exhausted,
}
