//! Encrypted sessions (docs/encrypted-sessions.md): a client's requests
//! arrive encrypted to this secure world's identity key, and every piece of
//! the answer leaves encrypted to the client. The normal world carries the
//! bytes and learns only their sizes and timing.

use std::time::Instant;

use flexserve_e2e::{Done, Record, ServerSession};
use flexserve_protocol::{GenerateRequest, Input, Message};

use super::*;

/// Most encrypted sessions one world session keeps open at once: opening one
/// more ends the least recently used. Each holds only its transport keys and
/// counters (under 200 bytes), so the bound is about idle sessions of
/// clients that never close theirs, not memory.
pub const MAX_ENCRYPTED_SESSIONS: usize = 256;

/// An encrypted session with one client, bound to the model it was opened for.
pub(super) struct EncryptedSession {
    model: u32,
    transport: ServerSession,
    last_used: Instant,
}

impl EncryptedSession {
    pub(super) fn model(&self) -> u32 {
        self.model
    }
}

/// The session refused a message (or is gone): it is ended, and says why
/// (once: the session's own errors may already say so).
fn ended(session: u64, why: impl std::fmt::Display) -> Failure {
    let why = why.to_string();
    let tail = if why.contains("the session is ended") { "" } else { "; the session is ended" };
    (ErrorCode::EncryptedSession, format!("encrypted session {session:016x}: {why}{tail}"))
}

impl<M: SecureMemory, C: Channel, X: Compute> SecureWorld<M, C, X> {
    /// Answers a client's first handshake message for `model`.
    pub(super) fn open_encrypted(&mut self, model: u32, handshake: &[u8]) -> Result<Reply, Failure> {
        self.model(model)?;
        let secret = self.principal.identity.keys.agreement_secret();
        let (transport, answer) = flexserve_e2e::respond(&secret, handshake)
            .map_err(|e| (ErrorCode::EncryptedSession, format!("handshake refused: {e}")))?;
        if self.encrypted.len() >= MAX_ENCRYPTED_SESSIONS {
            let oldest = self.encrypted.iter().min_by_key(|(_, s)| s.last_used).map(|(&id, _)| id);
            if let Some(id) = oldest {
                self.encrypted.remove(&id);
            }
        }
        let session = loop {
            let mut id = [0u8; 8];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
                .map_err(|_| (ErrorCode::Internal, "the random source failed".to_string()))?;
            let id = u64::from_le_bytes(id);
            if id != 0 && !self.encrypted.contains_key(&id) {
                break id;
            }
        };
        self.encrypted.insert(session, EncryptedSession { model, transport, last_used: Instant::now() });
        Ok(Reply::EncryptedOpened { session, handshake: answer })
    }

    /// The model an encrypted session answers with, if it is open.
    pub(super) fn encrypted_model(&self, session: u64) -> Option<u32> {
        self.encrypted.get(&session).map(|s| s.model)
    }

    /// Runs a client's encrypted request: the answer streams as sealed
    /// records, the last a `done` or an `error`, then `Ok`. A request that
    /// first needs memory is answered `MemoryNeeded` without being consumed,
    /// so the same bytes can come again once granted.
    pub(super) fn generate_encrypted(&mut self, session: u64, n_ctx: u32, message: &[u8]) -> Result<Reply, Failure> {
        let mut entry = self
            .encrypted
            .remove(&session)
            .ok_or_else(|| ended(session, "no such session (closed, evicted, or never opened)"))?;
        // A message that does not open ends the session (not put back).
        let opened = entry.transport.open_request(message).map_err(|e| ended(session, e))?;
        let request = &opened.request;
        // The daemon never sees these fields, so only here can they be checked.
        if let Err(e) = request.validate() {
            entry.transport.accept(&opened).map_err(|e| ended(session, e))?;
            let record = Record::Error { code: u16::from(ErrorCode::BadArgument.number()), message: e.to_string() };
            let sealed = entry.transport.seal_record(&record).map_err(|e| ended(session, e))?;
            self.encrypted.insert(session, entry);
            self.channel.send(&Reply::Sealed { record: sealed }).map_err(|e| (ErrorCode::Internal, e.to_string()))?;
            return Ok(Reply::Ok);
        }
        let g = GenerateRequest {
            model: entry.model,
            conversation: 0,
            input: Input::Messages {
                messages: request
                    .messages
                    .iter()
                    .map(|m| Message { role: m.role.clone(), content: m.content.clone() })
                    .collect(),
            },
            max_tokens: request.effective_max_tokens(),
            n_ctx,
            sampling: request.sampling,
            stop: request.stop.clone(),
        };
        let result = self.generate(g, super::answer::Answer::Sealed(&mut entry.transport));
        if let Ok(Reply::MemoryNeeded { .. }) = result {
            self.encrypted.insert(session, entry);
            return result;
        }
        if let Err(e) = entry.transport.accept(&opened) {
            return Err(ended(session, e));
        }
        let record = match result {
            Ok(Reply::Generated(r)) => Record::Done(Done {
                stop: r.stop,
                prompt_tokens: r.prompt_tokens + r.cached_tokens,
                generated_tokens: r.generated_tokens,
                prefill_micros: r.prefill_micros,
                decode_micros: r.decode_micros,
            }),
            Ok(other) => Record::Error {
                code: u16::from(ErrorCode::Internal.number()),
                message: format!("unexpected {}", other.name()),
            },
            Err((code, message)) => Record::Error { code: u16::from(code.number()), message },
        };
        let sealed = entry.transport.seal_record(&record).map_err(|e| ended(session, e))?;
        entry.last_used = Instant::now();
        self.encrypted.insert(session, entry);
        self.channel.send(&Reply::Sealed { record: sealed }).map_err(|e| (ErrorCode::Internal, e.to_string()))?;
        Ok(Reply::Ok)
    }

    pub(super) fn close_encrypted(&mut self, session: u64) -> Reply {
        self.encrypted.remove(&session);
        Reply::Ok
    }
}
