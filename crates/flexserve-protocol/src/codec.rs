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
//! | `CloseEncrypted`  | 0x14 | `LoadNeeded`  | 0x93 |
//! | `Evict`           | 0x15 | `Evicted`     | 0x94 |
//! | `Pause`           | 0x16 | `Paused`      | 0x95 |
//! | `Resume`          | 0x17 | `Stepped`     | 0x96 |
//! | `StartStream`     | 0x18 |               |      |
//! | `StepStreams`     | 0x19 |               |      |
//! | `EndStream`       | 0x1a |               |      |
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

use std::io::{self, Read, Write};

use crate::{Reply, Request, MAX_FRAME_LEN};

mod decode;
mod encode;
mod tags;

use decode::Decoder;
use encode::Encoder;

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

/// Smallest encodings of list elements, used to reject counts that cannot fit
/// in the bytes left before allocating for them.
const MIN_STRING_LEN: usize = 4;
const CHUNK_REF_LEN: usize = 4 + 8 + 8;
const CHUNK_SPAN_LEN: usize = 4 + 4;
/// A `LayerTiming`: the layer and five times.
const LAYER_TIMING_LEN: usize = 4 + 5 * 8;
/// A stream id, an empty text and no report.
const MIN_STREAM_STEP_LEN: usize = 4 + MIN_STRING_LEN + 1;
const MIN_MODEL_STATUS_LEN: usize = 4 + MIN_STRING_LEN + 4 * 4 + 8 + 4;

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
