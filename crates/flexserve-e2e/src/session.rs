//! The Noise NK handshake and the transport: requests cut into Noise
//! messages, one record per message, each direction's n-th message under
//! nonce n (explicit nonces over snow's `StatelessTransportState`).

use std::sync::OnceLock;

use snow::{Builder, HandshakeState, StatelessTransportState};
use zeroize::Zeroizing;

use crate::codec::{self, MAX_NOISE_PAYLOAD};
use crate::types::{ChatRequest, Record};
use crate::{E2eError, HANDSHAKE_LEN, MAX_NOISE_MESSAGE, MAX_REQUEST_PLAINTEXT, NOISE_PARAMS, PROLOGUE, TAG_LEN};

fn handshake_error(what: &str, e: snow::Error) -> E2eError {
    E2eError::Handshake(format!("{what} ({e})"))
}

fn builder() -> Result<Builder<'static>, E2eError> {
    let params = NOISE_PARAMS.parse().map_err(|e| handshake_error("the Noise parameters", e))?;
    Builder::new(params).prologue(PROLOGUE).map_err(|e| handshake_error("the prologue", e))
}

fn transport(state: HandshakeState) -> Result<StatelessTransportState, E2eError> {
    if !state.is_handshake_finished() {
        return Err(E2eError::Handshake("the handshake did not finish".into()));
    }
    state.into_stateless_transport_mode().map_err(|e| handshake_error("entering transport mode", e))
}

/// The nonces `first..first + count` if all of them are usable (2^64 - 1 is reserved).
fn nonces(first: u64, count: usize) -> Result<u64, E2eError> {
    u64::try_from(count).ok().and_then(|c| first.checked_add(c)).ok_or(E2eError::Exhausted)
}

/// The client's side of the handshake between its two messages.
#[derive(Debug)]
pub struct ClientHandshake {
    state: HandshakeState,
}

impl ClientHandshake {
    /// Starts a session with the secure world whose identity X25519 key
    /// (taken from its verified identity report) is given; returns message 1.
    pub fn start(server_x25519_public: &[u8; 32]) -> Result<(ClientHandshake, Vec<u8>), E2eError> {
        let mut state = builder()?
            .remote_public_key(server_x25519_public)
            .and_then(Builder::build_initiator)
            .map_err(|e| handshake_error("building the initiator", e))?;
        let mut message = vec![0u8; HANDSHAKE_LEN];
        let n = state.write_message(&[], &mut message).map_err(|e| handshake_error("writing message 1", e))?;
        if n != HANDSHAKE_LEN {
            return Err(E2eError::Handshake(format!("message 1 came out {n} bytes, not {HANDSHAKE_LEN}")));
        }
        Ok((ClientHandshake { state }, message))
    }

    /// Reads the secure world's message 2 and enters the session.
    pub fn finish(mut self, message2: &[u8]) -> Result<ClientSession, E2eError> {
        if message2.len() != HANDSHAKE_LEN {
            return Err(E2eError::Handshake(format!("message 2 is {} bytes, not {HANDSHAKE_LEN}", message2.len())));
        }
        let mut payload = [0u8; HANDSHAKE_LEN];
        let n = self.state.read_message(message2, &mut payload).map_err(|e| {
            handshake_error("message 2 does not authenticate: it was tampered with or does not answer message 1", e)
        })?;
        if n != 0 {
            return Err(E2eError::Handshake(format!("message 2 carries a {n}-byte payload; it must be empty")));
        }
        Ok(ClientSession { transport: transport(self.state)?, send: 0, recv: 0, broken: None, answer_pending: false })
    }
}

/// The client's side of a session: seals requests, opens records.
#[derive(Debug)]
pub struct ClientSession {
    transport: StatelessTransportState,
    /// The nonce of the next message sent, and of the next one received.
    send: u64,
    recv: u64,
    /// Why the session ended, once a record failed to open.
    broken: Option<String>,
    /// A request was sealed whose answer has not ended yet (no `done` or
    /// `error` record opened). Another request must wait: records are
    /// numbered per session, not per request, so a daemon that withheld one
    /// answer could otherwise hand it over as the answer to the next.
    answer_pending: bool,
}

impl ClientSession {
    /// The request as one message (Noise transport messages concatenated).
    pub fn seal_request(&mut self, request: &ChatRequest) -> Result<Vec<u8>, E2eError> {
        if let Some(why) = &self.broken {
            return Err(E2eError::Broken(why.clone()));
        }
        if self.answer_pending {
            return Err(E2eError::Broken(
                "the previous request's answer was not read to its end (done or error record)".to_string(),
            ));
        }
        let plain = codec::encode_request(request)?;
        let pieces = plain.len().div_ceil(MAX_NOISE_PAYLOAD);
        let next = nonces(self.send, pieces)?;
        let mut message = vec![0u8; plain.len() + pieces * TAG_LEN];
        for ((i, piece), out) in plain.chunks(MAX_NOISE_PAYLOAD).enumerate().zip(message.chunks_mut(MAX_NOISE_MESSAGE))
        {
            let nonce = self.send + i as u64;
            self.transport.write_message(nonce, piece, out).map_err(|e| E2eError::Seal(e.to_string()))?;
        }
        self.send = next;
        self.answer_pending = true;
        Ok(message)
    }

    /// Opens the next record. Any failure ends the session: every later call fails.
    pub fn open_record(&mut self, message: &[u8]) -> Result<Record, E2eError> {
        if let Some(why) = &self.broken {
            return Err(E2eError::Broken(why.clone()));
        }
        let opened = self.open_record_at(message);
        match &opened {
            Err(e) => self.broken = Some(e.to_string()),
            Ok(record) if record.is_final() => self.answer_pending = false,
            Ok(_) => {}
        }
        opened
    }

    fn open_record_at(&mut self, message: &[u8]) -> Result<Record, E2eError> {
        if message.len() > MAX_NOISE_MESSAGE {
            return Err(E2eError::TooLarge {
                what: "a record message",
                len: message.len(),
                limit: "MAX_NOISE_MESSAGE",
                max: MAX_NOISE_MESSAGE,
            });
        }
        if message.len() < TAG_LEN + crate::RECORD_PADDING
            || !(message.len() - TAG_LEN).is_multiple_of(crate::RECORD_PADDING)
        {
            return Err(E2eError::Truncated {
                what: "a record message",
                len: message.len(),
                reason: "its length is not a padded record's plus the 16-byte tag",
            });
        }
        let next = nonces(self.recv, 1)?;
        let mut plain = Zeroizing::new(vec![0u8; message.len() - TAG_LEN]);
        self.transport
            .read_message(self.recv, message, &mut plain)
            .map_err(|_| E2eError::Decrypt { what: "a record", nonce: self.recv })?;
        self.recv = next;
        codec::decode_record(&plain)
    }

    /// Why the session ended, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }
}

/// The secure world's answer to message 1: the session and message 2.
/// `server_x25519_secret` is the identity X25519 private key.
pub fn respond(server_x25519_secret: &[u8; 32], message1: &[u8]) -> Result<(ServerSession, Vec<u8>), E2eError> {
    if message1.len() != HANDSHAKE_LEN {
        return Err(E2eError::Handshake(format!("message 1 is {} bytes, not {HANDSHAKE_LEN}", message1.len())));
    }
    let mut state = builder()?
        .local_private_key(server_x25519_secret)
        .and_then(Builder::build_responder)
        .map_err(|e| handshake_error("building the responder", e))?;
    let mut payload = [0u8; HANDSHAKE_LEN];
    let n = state.read_message(message1, &mut payload).map_err(|e| {
        handshake_error(
            "message 1 does not authenticate under this secure world's key: the client was given another server \
             key, or the message was tampered with",
            e,
        )
    })?;
    if n != 0 {
        return Err(E2eError::Handshake(format!("message 1 carries a {n}-byte payload; it must be empty")));
    }
    let mut message2 = vec![0u8; HANDSHAKE_LEN];
    let n = state.write_message(&[], &mut message2).map_err(|e| handshake_error("writing message 2", e))?;
    if n != HANDSHAKE_LEN {
        return Err(E2eError::Handshake(format!("message 2 came out {n} bytes, not {HANDSHAKE_LEN}")));
    }
    let session = ServerSession { transport: transport(state)?, send: 0, recv: 0, broken: OnceLock::new() };
    Ok((session, message2))
}

/// A request opened at the session's receive nonce, not yet accepted.
#[derive(Debug)]
pub struct OpenedRequest {
    pub request: ChatRequest,
    /// The receive nonce it was opened at, and the one after its last piece.
    opened_at: u64,
    next: u64,
}

impl OpenedRequest {
    /// The number of Noise messages the request came in.
    pub fn pieces(&self) -> u64 {
        self.next - self.opened_at
    }
}

/// The secure world's side of a session: opens requests, seals records.
#[derive(Debug)]
pub struct ServerSession {
    transport: StatelessTransportState,
    send: u64,
    recv: u64,
    /// Why the receiving side ended, once a request failed to open. Records
    /// can still be sealed, so that the client can be told why.
    broken: OnceLock<String>,
}

impl ServerSession {
    /// Decrypts a request at the session's current receive nonce WITHOUT
    /// advancing it, so that the daemon may send the same bytes again when the
    /// secure world first asked it for memory. Any failure ends the receiving
    /// side: every later request is refused (`seal_record` still works).
    pub fn open_request(&self, message: &[u8]) -> Result<OpenedRequest, E2eError> {
        if let Some(why) = self.broken.get() {
            return Err(E2eError::Broken(why.clone()));
        }
        let opened = self.open_request_at(message);
        if let Err(e) = &opened {
            let _ = self.broken.set(e.to_string());
        }
        opened
    }

    fn open_request_at(&self, message: &[u8]) -> Result<OpenedRequest, E2eError> {
        let truncated = |reason| E2eError::Truncated { what: "a request message", len: message.len(), reason };
        let pieces = message.len().div_ceil(MAX_NOISE_MESSAGE);
        let last = message.len() - (pieces.max(1) - 1) * MAX_NOISE_MESSAGE;
        if pieces == 0 || last < TAG_LEN {
            return Err(truncated("its last piece is shorter than a Noise tag"));
        }
        let plain_len = message.len() - pieces * TAG_LEN;
        if plain_len > MAX_REQUEST_PLAINTEXT {
            return Err(E2eError::TooLarge {
                what: "a request",
                len: plain_len,
                limit: "MAX_REQUEST_PLAINTEXT",
                max: MAX_REQUEST_PLAINTEXT,
            });
        }
        if plain_len == 0 || !plain_len.is_multiple_of(crate::REQUEST_PADDING) {
            return Err(truncated("its length is not a padded request's plus a 16-byte tag per 65535-byte piece"));
        }
        let next = nonces(self.recv, pieces)?;
        let mut plain = Zeroizing::new(vec![0u8; plain_len]);
        for ((i, piece), out) in message.chunks(MAX_NOISE_MESSAGE).enumerate().zip(plain.chunks_mut(MAX_NOISE_PAYLOAD))
        {
            let nonce = self.recv + i as u64;
            self.transport
                .read_message(nonce, piece, out)
                .map_err(|_| E2eError::Decrypt { what: "a request", nonce })?;
        }
        let request = codec::decode_request(&plain)?;
        Ok(OpenedRequest { request, opened_at: self.recv, next })
    }

    /// Advances the receive nonce past an opened request (call once the
    /// request is accepted). Refuses a request opened at another nonce.
    pub fn accept(&mut self, opened: &OpenedRequest) -> Result<(), E2eError> {
        if let Some(why) = self.broken.get() {
            return Err(E2eError::Broken(why.clone()));
        }
        if opened.opened_at != self.recv {
            return Err(E2eError::StaleRequest { opened_at: opened.opened_at, expected: self.recv });
        }
        self.recv = opened.next;
        Ok(())
    }

    /// The record as one Noise transport message.
    pub fn seal_record(&mut self, record: &Record) -> Result<Vec<u8>, E2eError> {
        let plain = codec::encode_record(record)?;
        let next = nonces(self.send, 1)?;
        let mut message = vec![0u8; plain.len() + TAG_LEN];
        self.transport.write_message(self.send, &plain, &mut message).map_err(|e| E2eError::Seal(e.to_string()))?;
        self.send = next;
        Ok(message)
    }

    /// Why the receiving side ended, if it did.
    pub fn broken(&self) -> Option<&str> {
        self.broken.get().map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
