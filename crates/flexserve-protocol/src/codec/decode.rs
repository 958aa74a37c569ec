//! Decoding: an untrusted payload to a message, checking every field.

use std::fmt::Display;

use super::tags::{self as tag, DEPLOYMENTS, ERROR_CODES, STOP_REASONS};
use super::{
    malformed, ProtocolError, CHUNK_REF_LEN, CHUNK_SPAN_LEN, LAYER_TIMING_LEN, MIN_MODEL_STATUS_LEN,
    MIN_STREAM_STEP_LEN, MIN_STRING_LEN,
};
use crate::{
    BufferRange, ChunkRef, ChunkSpan, GenerateRequest, GenerationReport, Input, LayerTiming, Message, ModelStatus,
    Reply, Request, Sampling, StatusReport, StreamStep, MAX_LIST_LEN, MAX_SEALED_LEN, MAX_TEXT_LEN,
};

/// Reads fields from the front of an untrusted payload.
pub(super) struct Decoder<'a> {
    pub(super) rest: &'a [u8],
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

    /// A boolean: 0 or 1, anything else malformed (the encoding stays canonical).
    fn flag(&mut self, what: &dyn Display) -> Result<bool, ProtocolError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(malformed(format!("{what}: invalid flag {other:#04x}"))),
        }
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

    fn report(&mut self) -> Result<GenerationReport, ProtocolError> {
        Ok(GenerationReport {
            prompt_tokens: self.u32(&"GenerationReport.prompt_tokens")?,
            cached_tokens: self.u32(&"GenerationReport.cached_tokens")?,
            generated_tokens: self.u32(&"GenerationReport.generated_tokens")?,
            prefill_micros: self.u64(&"GenerationReport.prefill_micros")?,
            decode_micros: self.u64(&"GenerationReport.decode_micros")?,
            layers: self.list(&"GenerationReport.layers", LAYER_TIMING_LEN, |d, what| {
                Ok(LayerTiming {
                    layer: d.u32(&format_args!("{what}.layer"))?,
                    decrypt_from: d.u64(&format_args!("{what}.decrypt_from"))?,
                    decrypt_to: d.u64(&format_args!("{what}.decrypt_to"))?,
                    decrypt_micros: d.u64(&format_args!("{what}.decrypt_micros"))?,
                    compute_from: d.u64(&format_args!("{what}.compute_from"))?,
                    compute_to: d.u64(&format_args!("{what}.compute_to"))?,
                })
            })?,
            stop: {
                let t = self.u8(&"GenerationReport.stop tag")?;
                *STOP_REASONS
                    .get(t as usize)
                    .ok_or_else(|| malformed(format!("unknown GenerationReport.stop tag {t:#04x}")))?
            },
        })
    }

    /// A list of chunk spans.
    fn spans(&mut self, what: &dyn Display) -> Result<Vec<ChunkSpan>, ProtocolError> {
        self.list(what, CHUNK_SPAN_LEN, |d, what| {
            Ok(ChunkSpan { start: d.u32(&format_args!("{what}.start"))?, end: d.u32(&format_args!("{what}.end"))? })
        })
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

    pub(super) fn request(&mut self) -> Result<Request, ProtocolError> {
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
            tag::REQ_PAUSE => Request::Pause,
            tag::REQ_RESUME => Request::Resume,
            tag::REQ_START_STREAM => Request::StartStream {
                stream: self.u32(&"Request::StartStream.stream")?,
                request: self.generate_request()?,
            },
            tag::REQ_STEP_STREAMS => Request::StepStreams { model: self.u32(&"Request::StepStreams.model")? },
            tag::REQ_END_STREAM => Request::EndStream { stream: self.u32(&"Request::EndStream.stream")? },
            tag::REQ_EVICT => Request::Evict {
                model: self.u32(&"Request::Evict.model")?,
                granules: self.u32(&"Request::Evict.granules")?,
            },
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

    pub(super) fn reply(&mut self) -> Result<Reply, ProtocolError> {
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
            tag::REP_MISSING => Reply::Missing { chunks: self.spans(&"Reply::Missing.chunks")? },
            tag::REP_LOAD_NEEDED => Reply::LoadNeeded { chunks: self.spans(&"Reply::LoadNeeded.chunks")? },
            tag::REP_TOKEN => Reply::Token { text: self.string(&"Reply::Token.text")? },
            tag::REP_GENERATED => Reply::Generated(self.report()?),
            tag::REP_STEPPED => Reply::Stepped {
                streams: self.list(&"Reply::Stepped.streams", MIN_STREAM_STEP_LEN, |d, what| {
                    Ok(StreamStep {
                        stream: d.u32(&format_args!("{what}.stream"))?,
                        text: d.string(&format_args!("{what}.text"))?,
                        finished: match d.u8(&format_args!("{what}.finished presence"))? {
                            0 => None,
                            1 => Some(d.report()?),
                            other => {
                                return Err(malformed(format!("{what}.finished: invalid Option flag {other:#04x}")))
                            }
                        },
                    })
                })?,
            },
            tag::REP_PAUSED => Reply::Paused { scrubbed: self.flag(&"Reply::Paused.scrubbed")? },
            tag::REP_EVICTED => Reply::Evicted {
                freed: self.u32(&"Reply::Evicted.freed")?,
                groups: self.u32(&"Reply::Evicted.groups")?,
                micros: self.u64(&"Reply::Evicted.micros")?,
            },
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

    pub(super) fn finish(&self, name: &str) -> Result<(), ProtocolError> {
        if self.rest.is_empty() {
            Ok(())
        } else {
            Err(malformed(format!("trailing {} bytes after {name}", self.rest.len())))
        }
    }
}
