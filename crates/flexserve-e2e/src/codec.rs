//! The plaintext layouts of requests and records (docs/encrypted-sessions.md):
//! little-endian integers, strings as a `u32` byte length then UTF-8, a body
//! length `L` in front, zero padding behind up to the padding bucket.
//!
//! Decoding never panics and never allocates more than its input: every read
//! is bounded by the bytes left, counts are checked against the bytes they
//! need, and the padded length must be exactly the one `L` implies.

use zeroize::Zeroizing;

use crate::types::{ChatMessage, ChatRequest, Done, Record, Sampling, StopReason};
use crate::{E2eError, MAX_NOISE_MESSAGE, MAX_REQUEST_PLAINTEXT, RECORD_PADDING, REQUEST_PADDING, TAG_LEN};

/// The request layout version this crate speaks.
pub const REQUEST_VERSION: u8 = 1;
/// Record kinds (the body's first byte).
pub const KIND_TEXT: u8 = 1;
pub const KIND_DONE: u8 = 2;
pub const KIND_ERROR: u8 = 3;
/// The largest plaintext of one Noise transport message.
pub const MAX_NOISE_PAYLOAD: usize = MAX_NOISE_MESSAGE - TAG_LEN;
/// The largest padded record plaintext: the largest multiple of
/// `RECORD_PADDING` that fits one Noise transport message.
pub const MAX_RECORD_PLAINTEXT: usize = MAX_NOISE_PAYLOAD / RECORD_PADDING * RECORD_PADDING;
/// The longest text a single text record carries.
pub const MAX_RECORD_TEXT: usize = MAX_RECORD_PLAINTEXT - 4 - 1 - 4;
/// The longest error message a record carries (a longer one is cut).
pub const MAX_RECORD_ERROR_MESSAGE: usize = MAX_RECORD_PLAINTEXT - 4 - 1 - 2 - 4;

/// The fixed-size fields of a request body after the version byte and model:
/// max_tokens, temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed.
const SAMPLING_BYTES: usize = 4 + 4 + 4 + 4 + 4 + 4 + 4 + 8;

fn round_up(n: usize, bucket: usize) -> usize {
    n.div_ceil(bucket).saturating_mul(bucket)
}

/// The body length of a request, saturating (a saturated length is refused as too large).
fn request_body_len(r: &ChatRequest) -> usize {
    let strings =
        |items: &mut dyn Iterator<Item = usize>| items.fold(0usize, |a, n| a.saturating_add(4).saturating_add(n));
    let stop = strings(&mut r.stop.iter().map(String::len));
    let messages = strings(&mut r.messages.iter().flat_map(|m| [m.role.len(), m.content.len()]));
    [1, 4, r.model.len(), SAMPLING_BYTES, 4, stop, 4, messages].into_iter().fold(0usize, usize::saturating_add)
}

/// A writer of a padded plaintext: reserves the body length, then pads.
struct Writer {
    buf: Zeroizing<Vec<u8>>,
}

impl Writer {
    fn with_body(body_len: usize, padded: usize) -> Writer {
        let mut buf = Zeroizing::new(Vec::with_capacity(padded));
        // The callers bound body_len far below u32::MAX.
        buf.extend_from_slice(&u32::try_from(body_len).unwrap_or(u32::MAX).to_le_bytes());
        Writer { buf }
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
        self.buf.extend_from_slice(&v.to_le_bytes());
    }
    fn count(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    fn str(&mut self, s: &str) {
        self.count(s.len());
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn finish(mut self, padded: usize) -> Zeroizing<Vec<u8>> {
        debug_assert!(self.buf.len() <= padded);
        self.buf.resize(padded, 0);
        self.buf
    }
}

/// The padded plaintext of a request. Refuses one over `MAX_REQUEST_PLAINTEXT`.
pub fn encode_request(r: &ChatRequest) -> Result<Zeroizing<Vec<u8>>, E2eError> {
    let body = request_body_len(r);
    let padded = round_up(body.saturating_add(4), REQUEST_PADDING);
    if padded > MAX_REQUEST_PLAINTEXT {
        return Err(E2eError::TooLarge {
            what: "a request",
            len: body.saturating_add(4),
            limit: "MAX_REQUEST_PLAINTEXT",
            max: MAX_REQUEST_PLAINTEXT,
        });
    }
    let mut w = Writer::with_body(body, padded);
    w.u8(REQUEST_VERSION);
    w.str(&r.model);
    w.u32(r.max_tokens);
    let s = &r.sampling;
    w.f32(s.temperature);
    w.u32(s.top_k);
    w.f32(s.top_p);
    w.f32(s.min_p);
    w.f32(s.repeat_penalty);
    w.u32(s.repeat_last_n);
    w.u64(s.seed);
    w.count(r.stop.len());
    for stop in &r.stop {
        w.str(stop);
    }
    w.count(r.messages.len());
    for m in &r.messages {
        w.str(&m.role);
        w.str(&m.content);
    }
    debug_assert_eq!(w.buf.len(), 4 + body);
    Ok(w.finish(padded))
}

/// The padded plaintext of a record (one Noise transport message). A text
/// over `MAX_RECORD_TEXT` is refused; an error message over
/// `MAX_RECORD_ERROR_MESSAGE` is cut at a character boundary.
pub fn encode_record(record: &Record) -> Result<Zeroizing<Vec<u8>>, E2eError> {
    let body = match record {
        Record::Text(text) if text.len() > MAX_RECORD_TEXT => {
            return Err(E2eError::TooLarge {
                what: "a text record",
                len: text.len(),
                limit: "MAX_RECORD_TEXT, one Noise message",
                max: MAX_RECORD_TEXT,
            })
        }
        Record::Text(text) => 1 + 4 + text.len(),
        Record::Done(_) => 1 + 1 + 4 + 4 + 8 + 8,
        Record::Error { message, .. } => 1 + 2 + 4 + cut(message, MAX_RECORD_ERROR_MESSAGE).len(),
    };
    let padded = round_up(body + 4, RECORD_PADDING);
    let mut w = Writer::with_body(body, padded);
    match record {
        Record::Text(text) => {
            w.u8(KIND_TEXT);
            w.str(text);
        }
        Record::Done(d) => {
            w.u8(KIND_DONE);
            w.u8(d.stop.code());
            w.u32(d.prompt_tokens);
            w.u32(d.generated_tokens);
            w.u64(d.prefill_micros);
            w.u64(d.decode_micros);
        }
        Record::Error { code, message } => {
            w.u8(KIND_ERROR);
            w.u16(*code);
            w.str(cut(message, MAX_RECORD_ERROR_MESSAGE));
        }
    }
    debug_assert_eq!(w.buf.len(), 4 + body);
    Ok(w.finish(padded))
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The body of a padded plaintext: checks the length field, that the padded
/// length is exactly the one it implies, and that the padding is zero.
fn unframe<'a>(plain: &'a [u8], bucket: usize, what: &'static str) -> Result<&'a [u8], E2eError> {
    let truncated = |reason| E2eError::Truncated { what, len: plain.len(), reason };
    let Some((len, rest)) = plain.split_first_chunk::<4>() else {
        return Err(truncated("it is shorter than its body length field"));
    };
    let body_len = u32::from_le_bytes(*len) as usize;
    if body_len > rest.len() {
        return Err(truncated("it ends before the body length it gives"));
    }
    if round_up(body_len + 4, bucket) != plain.len() {
        return Err(truncated("its padded length is not the one its body length gives"));
    }
    let (body, padding) = rest.split_at(body_len);
    if padding.iter().any(|&b| b != 0) {
        return Err(E2eError::Malformed { field: "padding", reason: "a padding byte is not zero".into() });
    }
    Ok(body)
}

/// A bounded reader over a body.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], E2eError> {
        if n > self.buf.len() {
            return Err(E2eError::Malformed {
                field,
                reason: format!("needs {n} bytes, the body has {} left", self.buf.len()),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], E2eError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, E2eError> {
        Ok(self.array::<1>(field)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, E2eError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, E2eError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, E2eError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }
    fn f32(&mut self, field: &'static str) -> Result<f32, E2eError> {
        Ok(f32::from_le_bytes(self.array(field)?))
    }
    fn string(&mut self, field: &'static str) -> Result<String, E2eError> {
        let len = self.u32(field)? as usize;
        let bytes = self.take(len, field)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(E2eError::Malformed { field, reason: format!("not UTF-8 at byte {}", e.valid_up_to()) }),
        }
    }
    /// A count of items each at least `item_bytes` long: refused when the body
    /// cannot hold that many (so that no allocation outgrows the message).
    fn count(&mut self, item_bytes: usize, field: &'static str) -> Result<usize, E2eError> {
        let n = self.u32(field)? as usize;
        if n.saturating_mul(item_bytes) > self.buf.len() {
            return Err(E2eError::Malformed {
                field,
                reason: format!("{n} items cannot fit in the {} bytes left", self.buf.len()),
            });
        }
        Ok(n)
    }
    fn end(&self, what: &'static str) -> Result<(), E2eError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(E2eError::Malformed { field: what, reason: format!("{} bytes follow its last field", self.buf.len()) })
        }
    }
}

/// A request from its padded plaintext.
pub fn decode_request(plain: &[u8]) -> Result<ChatRequest, E2eError> {
    if plain.len() > MAX_REQUEST_PLAINTEXT {
        return Err(E2eError::TooLarge {
            what: "a request",
            len: plain.len(),
            limit: "MAX_REQUEST_PLAINTEXT",
            max: MAX_REQUEST_PLAINTEXT,
        });
    }
    let mut r = Reader { buf: unframe(plain, REQUEST_PADDING, "a request's plaintext")? };
    let version = r.u8("request.version")?;
    if version != REQUEST_VERSION {
        return Err(E2eError::UnknownVersion(version));
    }
    let model = r.string("request.model")?;
    let max_tokens = r.u32("request.max_tokens")?;
    let sampling = Sampling {
        temperature: r.f32("request.temperature")?,
        top_k: r.u32("request.top_k")?,
        top_p: r.f32("request.top_p")?,
        min_p: r.f32("request.min_p")?,
        repeat_penalty: r.f32("request.repeat_penalty")?,
        repeat_last_n: r.u32("request.repeat_last_n")?,
        seed: r.u64("request.seed")?,
    };
    // From here on the request zeroizes what it holds if a later field fails.
    let mut request = ChatRequest { model, max_tokens, sampling, stop: Vec::new(), messages: Vec::new() };
    let stops = r.count(4, "request.stop")?;
    request.stop.reserve_exact(stops);
    for _ in 0..stops {
        request.stop.push(r.string("request.stop")?);
    }
    let messages = r.count(8, "request.messages")?;
    request.messages.reserve_exact(messages);
    for _ in 0..messages {
        let role = r.string("request.messages.role")?;
        let message = ChatMessage { role, content: String::new() };
        request.messages.push(message);
        let content = r.string("request.messages.content")?;
        if let Some(last) = request.messages.last_mut() {
            last.content = content;
        }
    }
    r.end("request")?;
    Ok(request)
}

/// A record from its padded plaintext.
pub fn decode_record(plain: &[u8]) -> Result<Record, E2eError> {
    let mut r = Reader { buf: unframe(plain, RECORD_PADDING, "a record's plaintext")? };
    let record = match r.u8("record.kind")? {
        KIND_TEXT => Record::Text(r.string("record.text")?),
        KIND_DONE => {
            let code = r.u8("done.stop_reason")?;
            let stop = StopReason::from_code(code).ok_or_else(|| E2eError::Malformed {
                field: "done.stop_reason",
                reason: format!("unknown stop reason {code} (known: 0 to 3)"),
            })?;
            Record::Done(Done {
                stop,
                prompt_tokens: r.u32("done.prompt_tokens")?,
                generated_tokens: r.u32("done.generated_tokens")?,
                prefill_micros: r.u64("done.prefill_micros")?,
                decode_micros: r.u64("done.decode_micros")?,
            })
        }
        KIND_ERROR => {
            let code = r.u16("error.code")?;
            Record::Error { code, message: r.string("error.message")? }
        }
        kind => return Err(E2eError::UnknownKind(kind)),
    };
    r.end("record")?;
    Ok(record)
}

#[cfg(test)]
pub(crate) mod tests;
