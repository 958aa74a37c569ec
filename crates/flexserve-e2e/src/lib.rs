//! Encrypted sessions between a client and the secure world
//! (docs/encrypted-sessions.md): a Noise NK handshake to the secure world's
//! identity X25519 key, then requests and records the daemon carries but
//! cannot read.
//!
//! The client (initiator) uses [`ClientHandshake`] and [`ClientSession`]; the
//! secure world (responder) uses [`respond`] and [`ServerSession`]. This crate
//! is part of the secure world's trusted computing base: it has no unsafe code
//! and depends on `snow` (with only the primitives it uses), `zeroize` and
//! `thiserror`.

#![forbid(unsafe_code)]

pub mod codec;
mod error;
mod session;
mod types;

pub use error::E2eError;
pub use session::{respond, ClientHandshake, ClientSession, OpenedRequest, ServerSession};
pub use types::{
    ChatMessage, ChatRequest, Done, Record, Sampling, StopReason, MAX_MAX_TOKENS, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};

/// The Noise protocol of every session.
pub const NOISE_PARAMS: &str = "Noise_NK_25519_ChaChaPoly_SHA256";
/// The prologue both sides mix into the handshake.
pub const PROLOGUE: &[u8] = b"flexserve-e2e-v1";
/// The length of each handshake message (an ephemeral key and an empty payload's tag).
pub const HANDSHAKE_LEN: usize = 48;
/// The length of a ChaChaPoly tag.
pub const TAG_LEN: usize = 16;
/// The largest Noise transport message, tag included.
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// The most plaintext a request may hold, padding included; a larger one is
/// refused. As much as a plain prompt may hold (the world protocol's
/// `MAX_TEXT_LEN`), and its ciphertext fits the protocol's `MAX_SEALED_LEN`.
pub const MAX_REQUEST_PLAINTEXT: usize = 2 << 20;
/// A request's plaintext is padded to a multiple of this.
pub const REQUEST_PADDING: usize = 256;
/// A record's plaintext is padded to a multiple of this.
pub const RECORD_PADDING: usize = 64;
/// The tokens generated when a request's max_tokens is 0 (as the daemon's HTTP API).
pub const DEFAULT_MAX_TOKENS: u32 = 256;
