//! Binary encoding and framing of [`Request`] and [`Reply`].
//!
//! # Frame
//!
//! A frame is a `u32` little-endian payload length (at most [`MAX_FRAME_LEN`])
//! followed by that many payload bytes. A payload is one message: a `u8` tag,
//! then the message's fields in declaration order, nested structs inline.
//!
//! | Field type                      | Encoding                                               |
//! |---------------------------------|--------------------------------------------------------|
//! | `u16`, `u32`, `u64`             | little-endian, fixed width                             |
//! | `f32`                           | its bits (`to_bits`) as a `u32`; any pattern is kept   |
//! | `bool`                          | `u8`: 0 or 1, anything else is malformed               |
//! | `Option<T>`                     | `u8` 0 (None) or 1 followed by `T`; else malformed     |
//! | `String`                        | `u32` byte length (<= [`MAX_TEXT_LEN`]), UTF-8 bytes   |
//! | `Vec<T>`                        | `u32` count (<= [`MAX_LIST_LEN`]), then the elements   |
//! | `Vec<u8>` (sealed bytes)        | `u32` length (<= [`MAX_SEALED_LEN`]), the bytes        |
//! | `Input`, `StopReason`, `ErrorCode` | `u8` tag (tables below), then the variant's fields  |
//!
//! The encoding is canonical: a payload decodes only if re-encoding the result
//! gives the same bytes. Trailing bytes after a complete message are malformed.
//!
//! # Tags
//!
//! | Request           | Tag  | Reply         | Tag  |
//! |-------------------|------|---------------|------|
//! | `Hello`           | 0x01 | `Hello`       | 0x81 |
//! | `OpenModel`       | 0x02 | `ModelOpened` | 0x82 |
//! | `Grant`           | 0x03 | `Granted`     | 0x83 |
//! | `LoadChunks`      | 0x04 | `ChunksLoaded`| 0x84 |
//! | `MissingChunks`   | 0x05 | `Missing`     | 0x85 |
//! | `Generate`        | 0x06 | `Token`       | 0x86 |
//! | `EndConversation` | 0x07 | `Generated`   | 0x87 |
//! | `Unload`          | 0x08 | `Recalled`    | 0x88 |
//! | `Recall`          | 0x09 | `Status`      | 0x89 |
//! | `Status`          | 0x0a | `Ok`          | 0x8a |
//! | `Shutdown`        | 0x0b | `Error`       | 0x8b |
//! | `Perplexity`      | 0x0c | `Perplexity`  | 0x8c |
//! | `DevicePublicKey` | 0x0d | `MemoryNeeded`| 0x8d |
//! | `ImportKey`       | 0x0e | `DevicePublicKey` | 0x8e |
//! | `AddStoredKey`    | 0x0f | `KeyImported` | 0x8f |
//! | `Cancel`          | 0x10 | `Identity`    | 0x90 |
//! | `Identity`        | 0x11 | `EncryptedOpened` | 0x91 |
//! | `OpenEncrypted`   | 0x12 | `Sealed`      | 0x92 |
//! | `GenerateEncrypted` | 0x13 |             |      |
//! | `CloseEncrypted`  | 0x14 |               |      |
//!
//! Requests and replies use disjoint tags so that a message sent the wrong way
//! is rejected at once.
//!
//! `Deployment` (in `StatusReport`): `Service` 0, `Development` 1.
//!
//! | `Input`       | Tag | `StopReason`      | Tag | `ErrorCode`    | Tag |
//! |---------------|-----|-------------------|-----|----------------|-----|
//! | `Raw`         | 0   | `EndOfGeneration` | 0   | `Malformed`    | 0   |
//! | `ChatTurn`    | 1   | `MaxTokens`       | 1   | `OutOfOrder`   | 1   |
//! | `Messages`    | 2   |                   |     |                |     |
//! |               |     | `StopString`      | 2   | `Version`      | 2   |
//! |               |     | `ContextFull`     | 3   | `NoSuchModel`  | 3   |
//! |               |     |                   |     | `Verification` | 4   |
//! |               |     |                   |     | `NoMemory`     | 5   |
//! |               |     |                   |     | `NotResident`  | 6   |
//! |               |     |                   |     | `BadArgument`  | 7   |
//! |               |     |                   |     | `Engine`       | 8   |
//! |               |     |                   |     | `Internal`     | 9   |
//! |               |     |                   |     | `Policy`       | 10  |
//! |               |     |                   |     | `Cancelled`    | 11  |
//! |               |     |                   |     | `EncryptedSession` | 12 |
//!
//! # Decoding untrusted bytes
//!
//! Every length and count is checked against its limit and against the bytes
//! left in the frame before anything is allocated, so decoding never panics
//! and its allocations stay proportional to the frame (bounded by the limits)
//! whatever the input.

use std::fmt::Display;
use std::io::{self, Read, Write};

use crate::{
    BufferRange, ChunkRef, ChunkSpan, Deployment, ErrorCode, GenerateRequest, GenerationReport, Input, Message,
    ModelStatus, Reply, Request, Sampling, StatusReport, StopReason, MAX_FRAME_LEN, MAX_LIST_LEN, MAX_SEALED_LEN,
    MAX_TEXT_LEN,
};

/// Why a message could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// The stream failed (including end of stream inside a frame, as
    /// [`io::ErrorKind::UnexpectedEof`]). The stream is unusable.
    #[error("world channel I/O failed: {0}")]
    Io(#[from] io::Error),
    /// The peer closed the stream cleanly before a frame started.
    #[error("the peer closed the connection")]
    Closed,
    /// A frame's length field exceeds the limit. Its payload was not read, so
    /// the stream cannot be resynchronised: close it.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// The frame was read completely but its contents are wrong; `what` names
    /// the field or tag. The stream stays usable (the next frame can be read).
    #[error("malformed message: {what}")]
    Malformed { what: String },
    /// A message to send exceeds a limit (a string, a list, or the whole
    /// frame); `what` names it. Nothing was written: the stream stays usable.
    #[error("message not sent: {what}")]
    Oversized { what: String },
}

impl ProtocolError {
    /// Whether the stream can still carry further messages after this error.
    pub fn stream_usable(&self) -> bool {
        matches!(self, ProtocolError::Malformed { .. } | ProtocolError::Oversized { .. })
    }
}

fn malformed(what: String) -> ProtocolError {
    ProtocolError::Malformed { what }
}

fn oversized(what: String) -> ProtocolError {
    ProtocolError::Oversized { what }
}

const FRAME_HEADER_LEN: usize = 4;

mod tag {
    pub const REQ_HELLO: u8 = 0x01;
    pub const REQ_OPEN_MODEL: u8 = 0x02;
    pub const REQ_GRANT: u8 = 0x03;
    pub const REQ_LOAD_CHUNKS: u8 = 0x04;
    pub const REQ_MISSING_CHUNKS: u8 = 0x05;
    pub const REQ_GENERATE: u8 = 0x06;
    pub const REQ_END_CONVERSATION: u8 = 0x07;
    pub const REQ_UNLOAD: u8 = 0x08;
    pub const REQ_RECALL: u8 = 0x09;
    pub const REQ_STATUS: u8 = 0x0a;
    pub const REQ_SHUTDOWN: u8 = 0x0b;
    pub const REQ_PERPLEXITY: u8 = 0x0c;
    pub const REQ_DEVICE_PUBLIC_KEY: u8 = 0x0d;
    pub const REQ_IMPORT_KEY: u8 = 0x0e;
    pub const REQ_ADD_STORED_KEY: u8 = 0x0f;
    pub const REQ_CANCEL: u8 = 0x10;
    pub const REQ_IDENTITY: u8 = 0x11;
    pub const REQ_OPEN_ENCRYPTED: u8 = 0x12;
    pub const REQ_GENERATE_ENCRYPTED: u8 = 0x13;
    pub const REQ_CLOSE_ENCRYPTED: u8 = 0x14;

    pub const REP_HELLO: u8 = 0x81;
    pub const REP_MODEL_OPENED: u8 = 0x82;
    pub const REP_GRANTED: u8 = 0x83;
    pub const REP_CHUNKS_LOADED: u8 = 0x84;
    pub const REP_MISSING: u8 = 0x85;
    pub const REP_TOKEN: u8 = 0x86;
    pub const REP_GENERATED: u8 = 0x87;
    pub const REP_RECALLED: u8 = 0x88;
    pub const REP_STATUS: u8 = 0x89;
    pub const REP_OK: u8 = 0x8a;
    pub const REP_ERROR: u8 = 0x8b;
    pub const REP_PERPLEXITY: u8 = 0x8c;
    pub const REP_MEMORY_NEEDED: u8 = 0x8d;
    pub const REP_DEVICE_PUBLIC_KEY: u8 = 0x8e;
    pub const REP_KEY_IMPORTED: u8 = 0x8f;
    pub const REP_IDENTITY: u8 = 0x90;
    pub const REP_ENCRYPTED_OPENED: u8 = 0x91;
    pub const REP_SEALED: u8 = 0x92;

    pub const INPUT_RAW: u8 = 0;
    pub const INPUT_CHAT_TURN: u8 = 1;
    pub const INPUT_MESSAGES: u8 = 2;
}

/// Smallest encodings of list elements, used to reject counts that cannot fit
/// in the bytes left before allocating for them.
const MIN_STRING_LEN: usize = 4;
const CHUNK_REF_LEN: usize = 4 + 8 + 8;
const CHUNK_SPAN_LEN: usize = 4 + 4;
const MIN_MODEL_STATUS_LEN: usize = 4 + MIN_STRING_LEN + 4 * 4 + 8 + 4;

const STOP_REASONS: [StopReason; 4] =
    [StopReason::EndOfGeneration, StopReason::MaxTokens, StopReason::StopString, StopReason::ContextFull];

const DEPLOYMENTS: [Deployment; 2] = [Deployment::Service, Deployment::Development];

fn deployment_tag(d: Deployment) -> u8 {
    match d {
        Deployment::Service => 0,
        Deployment::Development => 1,
    }
}

const ERROR_CODES: [ErrorCode; 13] = [
    ErrorCode::Malformed,
    ErrorCode::OutOfOrder,
    ErrorCode::Version,
    ErrorCode::NoSuchModel,
    ErrorCode::Verification,
    ErrorCode::NoMemory,
    ErrorCode::NotResident,
    ErrorCode::BadArgument,
    ErrorCode::Engine,
    ErrorCode::Internal,
    ErrorCode::Policy,
    ErrorCode::Cancelled,
    ErrorCode::EncryptedSession,
];

fn stop_reason_tag(stop: StopReason) -> u8 {
    match stop {
        StopReason::EndOfGeneration => 0,
        StopReason::MaxTokens => 1,
        StopReason::StopString => 2,
        StopReason::ContextFull => 3,
    }
}

fn error_code_tag(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Malformed => 0,
        ErrorCode::OutOfOrder => 1,
        ErrorCode::Version => 2,
        ErrorCode::NoSuchModel => 3,
        ErrorCode::Verification => 4,
        ErrorCode::NoMemory => 5,
        ErrorCode::NotResident => 6,
        ErrorCode::BadArgument => 7,
        ErrorCode::Engine => 8,
        ErrorCode::Internal => 9,
        ErrorCode::Policy => 10,
        ErrorCode::Cancelled => 11,
        ErrorCode::EncryptedSession => 12,
    }
}

impl ErrorCode {
    /// The code's number on the wire (the table above), which encrypted
    /// sessions' error records also carry.
    pub fn number(self) -> u8 {
        error_code_tag(self)
    }
}

impl Request {
    /// The variant's name, for logs and error messages ("Request::Generate").
    pub fn name(&self) -> &'static str {
        match self {
            Request::Hello { .. } => "Request::Hello",
            Request::OpenModel { .. } => "Request::OpenModel",
            Request::Grant { .. } => "Request::Grant",
            Request::LoadChunks { .. } => "Request::LoadChunks",
            Request::MissingChunks { .. } => "Request::MissingChunks",
            Request::Generate(_) => "Request::Generate",
            Request::EndConversation { .. } => "Request::EndConversation",
            Request::Unload { .. } => "Request::Unload",
            Request::Recall { .. } => "Request::Recall",
            Request::Status => "Request::Status",
            Request::Shutdown => "Request::Shutdown",
            Request::Perplexity { .. } => "Request::Perplexity",
            Request::DevicePublicKey => "Request::DevicePublicKey",
            Request::ImportKey { .. } => "Request::ImportKey",
            Request::AddStoredKey { .. } => "Request::AddStoredKey",
            Request::Cancel => "Request::Cancel",
            Request::Identity => "Request::Identity",
            Request::OpenEncrypted { .. } => "Request::OpenEncrypted",
            Request::GenerateEncrypted { .. } => "Request::GenerateEncrypted",
            Request::CloseEncrypted { .. } => "Request::CloseEncrypted",
        }
    }
}

impl Reply {
    /// The variant's name, for logs and error messages ("Reply::Token").
    pub fn name(&self) -> &'static str {
        match self {
            Reply::Hello { .. } => "Reply::Hello",
            Reply::ModelOpened { .. } => "Reply::ModelOpened",
            Reply::Granted { .. } => "Reply::Granted",
            Reply::ChunksLoaded { .. } => "Reply::ChunksLoaded",
            Reply::Missing { .. } => "Reply::Missing",
            Reply::Token { .. } => "Reply::Token",
            Reply::Generated(_) => "Reply::Generated",
            Reply::Recalled { .. } => "Reply::Recalled",
            Reply::Status(_) => "Reply::Status",
            Reply::Ok => "Reply::Ok",
            Reply::Error { .. } => "Reply::Error",
            Reply::Perplexity { .. } => "Reply::Perplexity",
            Reply::MemoryNeeded { .. } => "Reply::MemoryNeeded",
            Reply::DevicePublicKey { .. } => "Reply::DevicePublicKey",
            Reply::KeyImported { .. } => "Reply::KeyImported",
            Reply::Identity { .. } => "Reply::Identity",
            Reply::EncryptedOpened { .. } => "Reply::EncryptedOpened",
            Reply::Sealed { .. } => "Reply::Sealed",
        }
    }
}

// ---------------------------------------------------------------------------
// Encoding

/// Appends fields to a payload, checking the limits the decoder enforces so
/// that nothing the peer would reject is ever sent.
struct Encoder {
    buf: Vec<u8>,
    /// Where the payload starts in `buf` (after a frame header, if any).
    start: usize,
}

impl Encoder {
    fn new(with_frame_header: bool) -> Self {
        let start = if with_frame_header { FRAME_HEADER_LEN } else { 0 };
        let mut buf = Vec::with_capacity(64);
        buf.resize(start, 0);
        Encoder { buf, start }
    }

    fn payload_len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Fails before growing the payload past the frame limit.
    fn reserve(&mut self, extra: usize, what: &dyn Display) -> Result<(), ProtocolError> {
        let len = self.payload_len().saturating_add(extra);
        if len > MAX_FRAME_LEN {
            return Err(oversized(format!(
                "{what}: the message would exceed the frame limit of {MAX_FRAME_LEN} bytes"
            )));
        }
        Ok(())
    }

    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }

    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn f32(&mut self, v: f32) {
        self.u32(v.to_bits());
    }

    fn string(&mut self, s: &str, what: &dyn Display) -> Result<(), ProtocolError> {
        if s.len() > MAX_TEXT_LEN {
            return Err(oversized(format!("{what}: {} bytes exceed the limit of {MAX_TEXT_LEN}", s.len())));
        }
        self.reserve(4 + s.len(), what)?;
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }

    fn bytes(&mut self, b: &[u8], what: &dyn Display) -> Result<(), ProtocolError> {
        if b.len() > MAX_SEALED_LEN {
            return Err(oversized(format!("{what}: {} bytes exceed the limit of {MAX_SEALED_LEN}", b.len())));
        }
        self.reserve(4 + b.len(), what)?;
        self.u32(b.len() as u32);
        self.buf.extend_from_slice(b);
        Ok(())
    }

    fn option_string(&mut self, s: Option<&str>, what: &dyn Display) -> Result<(), ProtocolError> {
        match s {
            None => self.u8(0),
            Some(s) => {
                self.u8(1);
                self.string(s, what)?;
            }
        }
        Ok(())
    }

    fn list<T>(
        &mut self,
        items: &[T],
        what: &dyn Display,
        mut element: impl FnMut(&mut Self, &T, &dyn Display) -> Result<(), ProtocolError>,
    ) -> Result<(), ProtocolError> {
        if items.len() > MAX_LIST_LEN {
            return Err(oversized(format!("{what}: {} elements exceed the limit of {MAX_LIST_LEN}", items.len())));
        }
        self.u32(items.len() as u32);
        for (i, item) in items.iter().enumerate() {
            element(self, item, &format_args!("{what}[{i}]"))?;
        }
        self.reserve(0, what)
    }

    fn range(&mut self, range: &BufferRange) {
        self.u64(range.offset);
        self.u64(range.len);
    }

    fn request(&mut self, request: &Request) -> Result<(), ProtocolError> {
        match request {
            Request::Hello { version } => {
                self.u8(tag::REQ_HELLO);
                self.u16(*version);
            }
            Request::OpenModel { name, header } => {
                self.u8(tag::REQ_OPEN_MODEL);
                self.string(name, &"Request::OpenModel.name")?;
                self.range(header);
            }
            Request::Grant { granules } => {
                self.u8(tag::REQ_GRANT);
                self.u32(*granules);
            }
            Request::LoadChunks { model, chunks } => {
                self.u8(tag::REQ_LOAD_CHUNKS);
                self.u32(*model);
                self.list(chunks, &"Request::LoadChunks.chunks", |e, chunk, what| {
                    e.reserve(CHUNK_REF_LEN, what)?;
                    e.u32(chunk.index);
                    e.range(&chunk.at);
                    Ok(())
                })?;
            }
            Request::MissingChunks { model } => {
                self.u8(tag::REQ_MISSING_CHUNKS);
                self.u32(*model);
            }
            Request::Generate(generate) => {
                self.u8(tag::REQ_GENERATE);
                self.generate_request(generate)?;
            }
            Request::EndConversation { model, conversation } => {
                self.u8(tag::REQ_END_CONVERSATION);
                self.u32(*model);
                self.u32(*conversation);
            }
            Request::Unload { model } => {
                self.u8(tag::REQ_UNLOAD);
                self.u32(*model);
            }
            Request::Recall { granules } => {
                self.u8(tag::REQ_RECALL);
                self.u32(*granules);
            }
            Request::Status => self.u8(tag::REQ_STATUS),
            Request::Shutdown => self.u8(tag::REQ_SHUTDOWN),
            Request::Perplexity { model, text, n_ctx } => {
                self.u8(tag::REQ_PERPLEXITY);
                self.u32(*model);
                self.string(text, &"Request::Perplexity.text")?;
                self.u32(*n_ctx);
            }
            Request::DevicePublicKey => self.u8(tag::REQ_DEVICE_PUBLIC_KEY),
            Request::ImportKey { key } => {
                self.u8(tag::REQ_IMPORT_KEY);
                self.string(key, &"Request::ImportKey.key")?;
            }
            Request::AddStoredKey { stored } => {
                self.u8(tag::REQ_ADD_STORED_KEY);
                self.string(stored, &"Request::AddStoredKey.stored")?;
            }
            Request::Cancel => self.u8(tag::REQ_CANCEL),
            Request::Identity => self.u8(tag::REQ_IDENTITY),
            Request::OpenEncrypted { model, handshake } => {
                self.u8(tag::REQ_OPEN_ENCRYPTED);
                self.u32(*model);
                self.bytes(handshake, &"Request::OpenEncrypted.handshake")?;
            }
            Request::GenerateEncrypted { session, n_ctx, message } => {
                self.u8(tag::REQ_GENERATE_ENCRYPTED);
                self.u64(*session);
                self.u32(*n_ctx);
                self.bytes(message, &"Request::GenerateEncrypted.message")?;
            }
            Request::CloseEncrypted { session } => {
                self.u8(tag::REQ_CLOSE_ENCRYPTED);
                self.u64(*session);
            }
        }
        Ok(())
    }

    fn generate_request(&mut self, g: &GenerateRequest) -> Result<(), ProtocolError> {
        self.u32(g.model);
        self.u32(g.conversation);
        match &g.input {
            Input::Raw { text } => {
                self.u8(tag::INPUT_RAW);
                self.string(text, &"GenerateRequest.input.text")?;
            }
            Input::ChatTurn { system, user } => {
                self.u8(tag::INPUT_CHAT_TURN);
                self.option_string(system.as_deref(), &"GenerateRequest.input.system")?;
                self.string(user, &"GenerateRequest.input.user")?;
            }
            Input::Messages { messages } => {
                self.u8(tag::INPUT_MESSAGES);
                self.list(messages, &"GenerateRequest.input.messages", |e, m, what| {
                    e.string(&m.role, &format_args!("{what}.role"))?;
                    e.string(&m.content, &format_args!("{what}.content"))
                })?;
            }
        }
        self.u32(g.max_tokens);
        self.u32(g.n_ctx);
        let s = &g.sampling;
        self.f32(s.temperature);
        self.u32(s.top_k);
        self.f32(s.top_p);
        self.f32(s.min_p);
        self.f32(s.repeat_penalty);
        self.u32(s.repeat_last_n);
        self.u64(s.seed);
        self.list(&g.stop, &"GenerateRequest.stop", |e, stop, what| e.string(stop, what))
    }

    fn reply(&mut self, reply: &Reply) -> Result<(), ProtocolError> {
        match reply {
            Reply::Hello { version, protection, pool_mode, granule_size } => {
                self.u8(tag::REP_HELLO);
                self.u16(*version);
                self.string(protection, &"Reply::Hello.protection")?;
                self.string(pool_mode, &"Reply::Hello.pool_mode")?;
                self.u64(*granule_size);
            }
            Reply::ModelOpened { model, chunks, granules_needed } => {
                self.u8(tag::REP_MODEL_OPENED);
                self.u32(*model);
                self.u32(*chunks);
                self.u32(*granules_needed);
            }
            Reply::Granted { granted, prepared, micros } => {
                self.u8(tag::REP_GRANTED);
                self.u32(*granted);
                self.u32(*prepared);
                self.u64(*micros);
            }
            Reply::ChunksLoaded { loaded } => {
                self.u8(tag::REP_CHUNKS_LOADED);
                self.u32(*loaded);
            }
            Reply::Missing { chunks } => {
                self.u8(tag::REP_MISSING);
                self.list(chunks, &"Reply::Missing.chunks", |e, span, what| {
                    e.reserve(CHUNK_SPAN_LEN, what)?;
                    e.u32(span.start);
                    e.u32(span.end);
                    Ok(())
                })?;
            }
            Reply::Token { text } => {
                self.u8(tag::REP_TOKEN);
                self.string(text, &"Reply::Token.text")?;
            }
            Reply::Generated(report) => {
                self.u8(tag::REP_GENERATED);
                self.u32(report.prompt_tokens);
                self.u32(report.cached_tokens);
                self.u32(report.generated_tokens);
                self.u64(report.prefill_micros);
                self.u64(report.decode_micros);
                self.u8(stop_reason_tag(report.stop));
            }
            Reply::Recalled { released, evicted, micros } => {
                self.u8(tag::REP_RECALLED);
                self.u32(*released);
                self.u32(*evicted);
                self.u64(*micros);
            }
            Reply::Status(status) => {
                self.u8(tag::REP_STATUS);
                self.status_report(status)?;
            }
            Reply::Ok => self.u8(tag::REP_OK),
            Reply::Error { code, message } => {
                self.u8(tag::REP_ERROR);
                self.u8(error_code_tag(*code));
                self.string(message, &"Reply::Error.message")?;
            }
            Reply::Perplexity { tokens, chunks, ppl, ppl_err } => {
                self.u8(tag::REP_PERPLEXITY);
                self.u32(*tokens);
                self.u32(*chunks);
                // f64 as its bits, like f32: exact both ways.
                self.u64(ppl.to_bits());
                self.u64(ppl_err.to_bits());
            }
            Reply::MemoryNeeded { granules } => {
                self.u8(tag::REP_MEMORY_NEEDED);
                self.u32(*granules);
            }
            Reply::DevicePublicKey { key } => {
                self.u8(tag::REP_DEVICE_PUBLIC_KEY);
                self.string(key, &"Reply::DevicePublicKey.key")?;
            }
            Reply::KeyImported { stored } => {
                self.u8(tag::REP_KEY_IMPORTED);
                self.string(stored, &"Reply::KeyImported.stored")?;
            }
            Reply::Identity { report, signature } => {
                self.u8(tag::REP_IDENTITY);
                self.string(report, &"Reply::Identity.report")?;
                self.string(signature, &"Reply::Identity.signature")?;
            }
            Reply::EncryptedOpened { session, handshake } => {
                self.u8(tag::REP_ENCRYPTED_OPENED);
                self.u64(*session);
                self.bytes(handshake, &"Reply::EncryptedOpened.handshake")?;
            }
            Reply::Sealed { record } => {
                self.u8(tag::REP_SEALED);
                self.bytes(record, &"Reply::Sealed.record")?;
            }
        }
        Ok(())
    }

    fn status_report(&mut self, s: &StatusReport) -> Result<(), ProtocolError> {
        self.u8(deployment_tag(s.deployment));
        self.u32(s.secure_uid);
        self.string(&s.ptrace_scope, &"StatusReport.ptrace_scope")?;
        self.string(&s.lockdown, &"StatusReport.lockdown")?;
        self.list(&s.policy, &"StatusReport.policy", |e, line, what| e.string(line, what))?;
        self.list(&s.warnings, &"StatusReport.warnings", |e, line, what| e.string(line, what))?;
        self.string(&s.protection, &"StatusReport.protection")?;
        self.string(&s.pool_mode, &"StatusReport.pool_mode")?;
        self.u64(s.granule_size);
        self.u32(s.granted);
        self.u32(s.prepared);
        self.u32(s.in_use);
        self.u64(s.heap_bytes);
        self.u64(s.heap_allocated);
        self.u64(s.heap_peak);
        self.list(&s.models, &"StatusReport.models", |e, m, what| {
            e.u32(m.model);
            e.string(&m.name, &format_args!("{what}.name"))?;
            e.u32(m.layers);
            e.u32(m.resident_layers);
            e.u32(m.chunks);
            e.u32(m.resident_chunks);
            e.u64(m.weight_bytes);
            e.u32(m.kv_granules);
            Ok(())
        })
    }

    /// Checks the final size, fills in the frame header if there is one, and
    /// returns the bytes.
    fn finish(mut self, name: &str) -> Result<Vec<u8>, ProtocolError> {
        let len = self.payload_len();
        if len > MAX_FRAME_LEN {
            return Err(oversized(format!("{name}: {len} bytes exceed the frame limit of {MAX_FRAME_LEN}")));
        }
        if self.start == FRAME_HEADER_LEN {
            self.buf[..FRAME_HEADER_LEN].copy_from_slice(&(len as u32).to_le_bytes());
        }
        Ok(self.buf)
    }
}

/// Encodes a request's payload (the frame without its length prefix).
pub fn encode_request(request: &Request) -> Result<Vec<u8>, ProtocolError> {
    let mut e = Encoder::new(false);
    e.request(request)?;
    e.finish(request.name())
}

/// Encodes a reply's payload (the frame without its length prefix).
pub fn encode_reply(reply: &Reply) -> Result<Vec<u8>, ProtocolError> {
    let mut e = Encoder::new(false);
    e.reply(reply)?;
    e.finish(reply.name())
}

/// Writes one request as a frame (in a single `write_all`) and flushes.
pub fn write_request(w: &mut impl Write, request: &Request) -> Result<(), ProtocolError> {
    let mut e = Encoder::new(true);
    e.request(request)?;
    let frame = e.finish(request.name())?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Writes one reply as a frame (in a single `write_all`) and flushes.
pub fn write_reply(w: &mut impl Write, reply: &Reply) -> Result<(), ProtocolError> {
    let mut e = Encoder::new(true);
    e.reply(reply)?;
    let frame = e.finish(reply.name())?;
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Decoding

/// Reads fields from the front of an untrusted payload.
struct Decoder<'a> {
    rest: &'a [u8],
}

impl<'a> Decoder<'a> {
    fn take(&mut self, n: usize, what: &dyn Display) -> Result<&'a [u8], ProtocolError> {
        if n > self.rest.len() {
            return Err(malformed(format!("{what}: truncated (needs {n} bytes, {} left)", self.rest.len())));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &dyn Display) -> Result<[u8; N], ProtocolError> {
        let mut bytes = [0u8; N];
        bytes.copy_from_slice(self.take(N, what)?);
        Ok(bytes)
    }

    fn u8(&mut self, what: &dyn Display) -> Result<u8, ProtocolError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &dyn Display) -> Result<u16, ProtocolError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &dyn Display) -> Result<u32, ProtocolError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Display) -> Result<u64, ProtocolError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn f32(&mut self, what: &dyn Display) -> Result<f32, ProtocolError> {
        Ok(f32::from_bits(self.u32(what)?))
    }

    fn string(&mut self, what: &dyn Display) -> Result<String, ProtocolError> {
        let len = self.u32(&format_args!("{what} length"))? as usize;
        if len > MAX_TEXT_LEN {
            return Err(malformed(format!("{what}: length {len} exceeds the limit of {MAX_TEXT_LEN} bytes")));
        }
        if len > self.rest.len() {
            return Err(malformed(format!("{what}: length {len} exceeds the {} bytes left", self.rest.len())));
        }
        let bytes = self.take(len, what)?;
        match std::str::from_utf8(bytes) {
            Ok(text) => Ok(text.to_owned()),
            Err(e) => Err(malformed(format!("{what}: invalid UTF-8 at byte {}", e.valid_up_to()))),
        }
    }

    fn bytes(&mut self, what: &dyn Display) -> Result<Vec<u8>, ProtocolError> {
        let len = self.u32(&format_args!("{what} length"))? as usize;
        if len > MAX_SEALED_LEN {
            return Err(malformed(format!("{what}: length {len} exceeds the limit of {MAX_SEALED_LEN} bytes")));
        }
        if len > self.rest.len() {
            return Err(malformed(format!("{what}: length {len} exceeds the {} bytes left", self.rest.len())));
        }
        Ok(self.take(len, what)?.to_vec())
    }

    fn option_string(&mut self, what: &dyn Display) -> Result<Option<String>, ProtocolError> {
        match self.u8(&format_args!("{what} presence"))? {
            0 => Ok(None),
            1 => Ok(Some(self.string(what)?)),
            other => Err(malformed(format!("{what}: invalid Option flag {other:#04x}"))),
        }
    }

    /// A list whose elements each encode to at least `min_element_len` bytes.
    fn list<T>(
        &mut self,
        what: &dyn Display,
        min_element_len: usize,
        mut element: impl FnMut(&mut Self, &dyn Display) -> Result<T, ProtocolError>,
    ) -> Result<Vec<T>, ProtocolError> {
        let count = self.u32(&format_args!("{what} count"))? as usize;
        if count > MAX_LIST_LEN {
            return Err(malformed(format!("{what}: {count} elements exceed the limit of {MAX_LIST_LEN}")));
        }
        if count.saturating_mul(min_element_len) > self.rest.len() {
            return Err(malformed(format!(
                "{what}: {count} elements cannot fit in the {} bytes left",
                self.rest.len()
            )));
        }
        let mut items = Vec::with_capacity(count);
        for i in 0..count {
            items.push(element(self, &format_args!("{what}[{i}]"))?);
        }
        Ok(items)
    }

    fn range(&mut self, what: &dyn Display) -> Result<BufferRange, ProtocolError> {
        let offset = self.u64(&format_args!("{what}.offset"))?;
        let len = self.u64(&format_args!("{what}.len"))?;
        Ok(BufferRange { offset, len })
    }

    fn request(&mut self) -> Result<Request, ProtocolError> {
        let request = match self.u8(&"Request tag")? {
            tag::REQ_HELLO => Request::Hello { version: self.u16(&"Request::Hello.version")? },
            tag::REQ_OPEN_MODEL => Request::OpenModel {
                name: self.string(&"Request::OpenModel.name")?,
                header: self.range(&"Request::OpenModel.header")?,
            },
            tag::REQ_GRANT => Request::Grant { granules: self.u32(&"Request::Grant.granules")? },
            tag::REQ_LOAD_CHUNKS => Request::LoadChunks {
                model: self.u32(&"Request::LoadChunks.model")?,
                chunks: self.list(&"Request::LoadChunks.chunks", CHUNK_REF_LEN, |d, what| {
                    Ok(ChunkRef {
                        index: d.u32(&format_args!("{what}.index"))?,
                        at: d.range(&format_args!("{what}.at"))?,
                    })
                })?,
            },
            tag::REQ_MISSING_CHUNKS => Request::MissingChunks { model: self.u32(&"Request::MissingChunks.model")? },
            tag::REQ_GENERATE => Request::Generate(self.generate_request()?),
            tag::REQ_END_CONVERSATION => Request::EndConversation {
                model: self.u32(&"Request::EndConversation.model")?,
                conversation: self.u32(&"Request::EndConversation.conversation")?,
            },
            tag::REQ_UNLOAD => Request::Unload { model: self.u32(&"Request::Unload.model")? },
            tag::REQ_RECALL => Request::Recall { granules: self.u32(&"Request::Recall.granules")? },
            tag::REQ_STATUS => Request::Status,
            tag::REQ_SHUTDOWN => Request::Shutdown,
            tag::REQ_PERPLEXITY => Request::Perplexity {
                model: self.u32(&"Request::Perplexity.model")?,
                text: self.string(&"Request::Perplexity.text")?,
                n_ctx: self.u32(&"Request::Perplexity.n_ctx")?,
            },
            tag::REQ_DEVICE_PUBLIC_KEY => Request::DevicePublicKey,
            tag::REQ_IMPORT_KEY => Request::ImportKey { key: self.string(&"Request::ImportKey.key")? },
            tag::REQ_ADD_STORED_KEY => Request::AddStoredKey { stored: self.string(&"Request::AddStoredKey.stored")? },
            tag::REQ_CANCEL => Request::Cancel,
            tag::REQ_IDENTITY => Request::Identity,
            tag::REQ_OPEN_ENCRYPTED => Request::OpenEncrypted {
                model: self.u32(&"Request::OpenEncrypted.model")?,
                handshake: self.bytes(&"Request::OpenEncrypted.handshake")?,
            },
            tag::REQ_GENERATE_ENCRYPTED => Request::GenerateEncrypted {
                session: self.u64(&"Request::GenerateEncrypted.session")?,
                n_ctx: self.u32(&"Request::GenerateEncrypted.n_ctx")?,
                message: self.bytes(&"Request::GenerateEncrypted.message")?,
            },
            tag::REQ_CLOSE_ENCRYPTED => {
                Request::CloseEncrypted { session: self.u64(&"Request::CloseEncrypted.session")? }
            }
            other => return Err(malformed(format!("unknown Request tag {other:#04x}"))),
        };
        Ok(request)
    }

    fn generate_request(&mut self) -> Result<GenerateRequest, ProtocolError> {
        let model = self.u32(&"GenerateRequest.model")?;
        let conversation = self.u32(&"GenerateRequest.conversation")?;
        let input = match self.u8(&"GenerateRequest.input tag")? {
            tag::INPUT_RAW => Input::Raw { text: self.string(&"GenerateRequest.input.text")? },
            tag::INPUT_CHAT_TURN => Input::ChatTurn {
                system: self.option_string(&"GenerateRequest.input.system")?,
                user: self.string(&"GenerateRequest.input.user")?,
            },
            tag::INPUT_MESSAGES => Input::Messages {
                messages: self.list(&"GenerateRequest.input.messages", 2 * MIN_STRING_LEN, |d, what| {
                    Ok(Message {
                        role: d.string(&format_args!("{what}.role"))?,
                        content: d.string(&format_args!("{what}.content"))?,
                    })
                })?,
            },
            other => return Err(malformed(format!("unknown GenerateRequest.input tag {other:#04x}"))),
        };
        let max_tokens = self.u32(&"GenerateRequest.max_tokens")?;
        let n_ctx = self.u32(&"GenerateRequest.n_ctx")?;
        let sampling = Sampling {
            temperature: self.f32(&"GenerateRequest.sampling.temperature")?,
            top_k: self.u32(&"GenerateRequest.sampling.top_k")?,
            top_p: self.f32(&"GenerateRequest.sampling.top_p")?,
            min_p: self.f32(&"GenerateRequest.sampling.min_p")?,
            repeat_penalty: self.f32(&"GenerateRequest.sampling.repeat_penalty")?,
            repeat_last_n: self.u32(&"GenerateRequest.sampling.repeat_last_n")?,
            seed: self.u64(&"GenerateRequest.sampling.seed")?,
        };
        let stop = self.list(&"GenerateRequest.stop", MIN_STRING_LEN, |d, what| d.string(what))?;
        Ok(GenerateRequest { model, conversation, input, max_tokens, n_ctx, sampling, stop })
    }

    fn reply(&mut self) -> Result<Reply, ProtocolError> {
        let reply = match self.u8(&"Reply tag")? {
            tag::REP_HELLO => Reply::Hello {
                version: self.u16(&"Reply::Hello.version")?,
                protection: self.string(&"Reply::Hello.protection")?,
                pool_mode: self.string(&"Reply::Hello.pool_mode")?,
                granule_size: self.u64(&"Reply::Hello.granule_size")?,
            },
            tag::REP_MODEL_OPENED => Reply::ModelOpened {
                model: self.u32(&"Reply::ModelOpened.model")?,
                chunks: self.u32(&"Reply::ModelOpened.chunks")?,
                granules_needed: self.u32(&"Reply::ModelOpened.granules_needed")?,
            },
            tag::REP_GRANTED => Reply::Granted {
                granted: self.u32(&"Reply::Granted.granted")?,
                prepared: self.u32(&"Reply::Granted.prepared")?,
                micros: self.u64(&"Reply::Granted.micros")?,
            },
            tag::REP_CHUNKS_LOADED => Reply::ChunksLoaded { loaded: self.u32(&"Reply::ChunksLoaded.loaded")? },
            tag::REP_MISSING => Reply::Missing {
                chunks: self.list(&"Reply::Missing.chunks", CHUNK_SPAN_LEN, |d, what| {
                    Ok(ChunkSpan {
                        start: d.u32(&format_args!("{what}.start"))?,
                        end: d.u32(&format_args!("{what}.end"))?,
                    })
                })?,
            },
            tag::REP_TOKEN => Reply::Token { text: self.string(&"Reply::Token.text")? },
            tag::REP_GENERATED => Reply::Generated(GenerationReport {
                prompt_tokens: self.u32(&"GenerationReport.prompt_tokens")?,
                cached_tokens: self.u32(&"GenerationReport.cached_tokens")?,
                generated_tokens: self.u32(&"GenerationReport.generated_tokens")?,
                prefill_micros: self.u64(&"GenerationReport.prefill_micros")?,
                decode_micros: self.u64(&"GenerationReport.decode_micros")?,
                stop: {
                    let t = self.u8(&"GenerationReport.stop tag")?;
                    *STOP_REASONS
                        .get(t as usize)
                        .ok_or_else(|| malformed(format!("unknown GenerationReport.stop tag {t:#04x}")))?
                },
            }),
            tag::REP_RECALLED => Reply::Recalled {
                released: self.u32(&"Reply::Recalled.released")?,
                evicted: self.u32(&"Reply::Recalled.evicted")?,
                micros: self.u64(&"Reply::Recalled.micros")?,
            },
            tag::REP_STATUS => Reply::Status(self.status_report()?),
            tag::REP_OK => Reply::Ok,
            tag::REP_ERROR => {
                let t = self.u8(&"Reply::Error.code tag")?;
                let code = *ERROR_CODES
                    .get(t as usize)
                    .ok_or_else(|| malformed(format!("unknown Reply::Error.code tag {t:#04x}")))?;
                Reply::Error { code, message: self.string(&"Reply::Error.message")? }
            }
            tag::REP_PERPLEXITY => Reply::Perplexity {
                tokens: self.u32(&"Reply::Perplexity.tokens")?,
                chunks: self.u32(&"Reply::Perplexity.chunks")?,
                ppl: f64::from_bits(self.u64(&"Reply::Perplexity.ppl")?),
                ppl_err: f64::from_bits(self.u64(&"Reply::Perplexity.ppl_err")?),
            },
            tag::REP_MEMORY_NEEDED => Reply::MemoryNeeded { granules: self.u32(&"Reply::MemoryNeeded.granules")? },
            tag::REP_DEVICE_PUBLIC_KEY => Reply::DevicePublicKey { key: self.string(&"Reply::DevicePublicKey.key")? },
            tag::REP_KEY_IMPORTED => Reply::KeyImported { stored: self.string(&"Reply::KeyImported.stored")? },
            tag::REP_IDENTITY => Reply::Identity {
                report: self.string(&"Reply::Identity.report")?,
                signature: self.string(&"Reply::Identity.signature")?,
            },
            tag::REP_ENCRYPTED_OPENED => Reply::EncryptedOpened {
                session: self.u64(&"Reply::EncryptedOpened.session")?,
                handshake: self.bytes(&"Reply::EncryptedOpened.handshake")?,
            },
            tag::REP_SEALED => Reply::Sealed { record: self.bytes(&"Reply::Sealed.record")? },
            other => return Err(malformed(format!("unknown Reply tag {other:#04x}"))),
        };
        Ok(reply)
    }

    fn status_report(&mut self) -> Result<StatusReport, ProtocolError> {
        Ok(StatusReport {
            deployment: {
                let t = self.u8(&"StatusReport.deployment tag")?;
                *DEPLOYMENTS
                    .get(t as usize)
                    .ok_or_else(|| malformed(format!("unknown StatusReport.deployment tag {t:#04x}")))?
            },
            secure_uid: self.u32(&"StatusReport.secure_uid")?,
            ptrace_scope: self.string(&"StatusReport.ptrace_scope")?,
            lockdown: self.string(&"StatusReport.lockdown")?,
            policy: self.list(&"StatusReport.policy", MIN_STRING_LEN, |d, what| d.string(what))?,
            warnings: self.list(&"StatusReport.warnings", MIN_STRING_LEN, |d, what| d.string(what))?,
            protection: self.string(&"StatusReport.protection")?,
            pool_mode: self.string(&"StatusReport.pool_mode")?,
            granule_size: self.u64(&"StatusReport.granule_size")?,
            granted: self.u32(&"StatusReport.granted")?,
            prepared: self.u32(&"StatusReport.prepared")?,
            in_use: self.u32(&"StatusReport.in_use")?,
            heap_bytes: self.u64(&"StatusReport.heap_bytes")?,
            heap_allocated: self.u64(&"StatusReport.heap_allocated")?,
            heap_peak: self.u64(&"StatusReport.heap_peak")?,
            models: self.list(&"StatusReport.models", MIN_MODEL_STATUS_LEN, |d, what| {
                Ok(ModelStatus {
                    model: d.u32(&format_args!("{what}.model"))?,
                    name: d.string(&format_args!("{what}.name"))?,
                    layers: d.u32(&format_args!("{what}.layers"))?,
                    resident_layers: d.u32(&format_args!("{what}.resident_layers"))?,
                    chunks: d.u32(&format_args!("{what}.chunks"))?,
                    resident_chunks: d.u32(&format_args!("{what}.resident_chunks"))?,
                    weight_bytes: d.u64(&format_args!("{what}.weight_bytes"))?,
                    kv_granules: d.u32(&format_args!("{what}.kv_granules"))?,
                })
            })?,
        })
    }

    fn finish(&self, name: &str) -> Result<(), ProtocolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!("trailing {} bytes after {name}", self.rest.len())))
        }
    }
}

fn check_payload_len(payload: &[u8]) -> Result<(), ProtocolError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(ProtocolError::TooLarge { len: payload.len(), max: MAX_FRAME_LEN });
    }
    Ok(())
}

/// Decodes a request's payload (a frame without its length prefix).
pub fn decode_request(payload: &[u8]) -> Result<Request, ProtocolError> {
    check_payload_len(payload)?;
    let mut d = Decoder { rest: payload };
    let request = d.request()?;
    d.finish(request.name())?;
    Ok(request)
}

/// Decodes a reply's payload (a frame without its length prefix).
pub fn decode_reply(payload: &[u8]) -> Result<Reply, ProtocolError> {
    check_payload_len(payload)?;
    let mut d = Decoder { rest: payload };
    let reply = d.reply()?;
    d.finish(reply.name())?;
    Ok(reply)
}

/// Reads one frame's payload: `Closed` on a clean end of stream before the
/// frame, `TooLarge` (without reading on) if its length field is over the limit.
fn read_frame(r: &mut impl Read) -> Result<Vec<u8>, ProtocolError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let mut got = 0;
    while got < FRAME_HEADER_LEN {
        match r.read(&mut header[got..]) {
            Ok(0) if got == 0 => return Err(ProtocolError::Closed),
            Ok(0) => {
                return Err(ProtocolError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("stream ended after {got} of the {FRAME_HEADER_LEN} bytes of a frame length"),
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ProtocolError::Io(e)),
        }
    }
    let len = u32::from_le_bytes(header) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ProtocolError::TooLarge { len, max: MAX_FRAME_LEN });
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(io::ErrorKind::UnexpectedEof, format!("stream ended inside a frame of {len} bytes"))
        } else {
            e
        }
    })?;
    Ok(payload)
}

/// Reads and decodes one request frame.
pub fn read_request(r: &mut impl Read) -> Result<Request, ProtocolError> {
    decode_request(&read_frame(r)?)
}

/// Reads and decodes one reply frame.
pub fn read_reply(r: &mut impl Read) -> Result<Reply, ProtocolError> {
    decode_reply(&read_frame(r)?)
}
