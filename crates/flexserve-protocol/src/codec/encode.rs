//! Encoding: a message to its payload or frame bytes.

use std::fmt::Display;

use super::tags::{self as tag, deployment_tag, error_code_tag, stop_reason_tag};
use super::{oversized, ProtocolError, CHUNK_REF_LEN, CHUNK_SPAN_LEN, FRAME_HEADER_LEN, LAYER_TIMING_LEN};
use crate::{
    BufferRange, ChunkSpan, GenerateRequest, GenerationReport, Input, Reply, Request, StatusReport, MAX_FRAME_LEN,
    MAX_LIST_LEN, MAX_SEALED_LEN, MAX_TEXT_LEN,
};

/// Appends fields to a payload, checking the limits the decoder enforces so
/// that nothing the peer would reject is ever sent.
pub(super) struct Encoder {
    buf: Vec<u8>,
    /// Where the payload starts in `buf` (after a frame header, if any).
    start: usize,
}

impl Encoder {
    pub(super) fn new(with_frame_header: bool) -> Self {
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

    fn report(&mut self, report: &GenerationReport) -> Result<(), ProtocolError> {
        self.u32(report.prompt_tokens);
        self.u32(report.cached_tokens);
        self.u32(report.generated_tokens);
        self.u64(report.prefill_micros);
        self.u64(report.decode_micros);
        self.list(&report.layers, &"GenerationReport.layers", |e, l, what| {
            e.reserve(LAYER_TIMING_LEN, what)?;
            e.u32(l.layer);
            for v in [l.decrypt_from, l.decrypt_to, l.decrypt_micros, l.compute_from, l.compute_to] {
                e.u64(v);
            }
            Ok(())
        })?;
        self.u8(stop_reason_tag(report.stop));
        Ok(())
    }

    /// A list of chunk spans.
    fn spans(&mut self, spans: &[ChunkSpan], what: &dyn Display) -> Result<(), ProtocolError> {
        self.list(spans, what, |e, span, what| {
            e.reserve(CHUNK_SPAN_LEN, what)?;
            e.u32(span.start);
            e.u32(span.end);
            Ok(())
        })
    }

    fn range(&mut self, range: &BufferRange) {
        self.u64(range.offset);
        self.u64(range.len);
    }

    pub(super) fn request(&mut self, request: &Request) -> Result<(), ProtocolError> {
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
            Request::Pause => self.u8(tag::REQ_PAUSE),
            Request::Resume => self.u8(tag::REQ_RESUME),
            Request::Evict { model, granules } => {
                self.u8(tag::REQ_EVICT);
                self.u32(*model);
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
            Request::StartStream { stream, request } => {
                self.u8(tag::REQ_START_STREAM);
                self.u32(*stream);
                self.generate_request(request)?;
            }
            Request::StepStreams { model } => {
                self.u8(tag::REQ_STEP_STREAMS);
                self.u32(*model);
            }
            Request::EndStream { stream } => {
                self.u8(tag::REQ_END_STREAM);
                self.u32(*stream);
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

    pub(super) fn reply(&mut self, reply: &Reply) -> Result<(), ProtocolError> {
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
                self.spans(chunks, &"Reply::Missing.chunks")?;
            }
            Reply::LoadNeeded { chunks } => {
                self.u8(tag::REP_LOAD_NEEDED);
                self.spans(chunks, &"Reply::LoadNeeded.chunks")?;
            }
            Reply::Token { text } => {
                self.u8(tag::REP_TOKEN);
                self.string(text, &"Reply::Token.text")?;
            }
            Reply::Generated(report) => {
                self.u8(tag::REP_GENERATED);
                self.report(report)?;
            }
            Reply::Stepped { streams } => {
                self.u8(tag::REP_STEPPED);
                self.list(streams, &"Reply::Stepped.streams", |e, step, what| {
                    e.u32(step.stream);
                    e.string(&step.text, &format_args!("{what}.text"))?;
                    match &step.finished {
                        None => e.u8(0),
                        Some(report) => {
                            e.u8(1);
                            e.report(report)?;
                        }
                    }
                    Ok(())
                })?;
            }
            Reply::Recalled { released, evicted, micros } => {
                self.u8(tag::REP_RECALLED);
                self.u32(*released);
                self.u32(*evicted);
                self.u64(*micros);
            }
            Reply::Paused { scrubbed } => {
                self.u8(tag::REP_PAUSED);
                self.u8(u8::from(*scrubbed));
            }
            Reply::Evicted { freed, groups, micros } => {
                self.u8(tag::REP_EVICTED);
                self.u32(*freed);
                self.u32(*groups);
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
    pub(super) fn finish(mut self, name: &str) -> Result<Vec<u8>, ProtocolError> {
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
