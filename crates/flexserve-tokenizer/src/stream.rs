//! Incremental detokenization for streaming output.

use crate::tokenizer::DecodeState;
use crate::Tokenizer;

/// Turns generated token ids into text as they arrive, emitting only whole UTF-8
/// characters: bytes of a character split across tokens wait for the rest.
/// Bytes that can never form a character come out as U+FFFD.
pub struct StreamDecoder<'a> {
    state: DecodeState<'a>,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder { state: DecodeState::new(tok), pending: Vec::new() }
    }

    /// Adds one token; returns the text that is now complete (maybe empty).
    pub fn push(&mut self, id: u32) -> String {
        let piece = self.state.piece(id);
        self.pending.extend_from_slice(piece);
        let mut out = String::new();
        let mut start = 0;
        loop {
            match std::str::from_utf8(&self.pending[start..]) {
                Ok(text) => {
                    out.push_str(text);
                    start = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = start + e.valid_up_to();
                    // The prefix up to `valid` is UTF-8, so the lossy conversion copies it as is.
                    out.push_str(&String::from_utf8_lossy(&self.pending[start..valid]));
                    match e.error_len() {
                        // Invalid bytes: replace and go on.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            start = valid + bad;
                        }
                        // An incomplete character at the end: keep it for later.
                        None => {
                            start = valid;
                            break;
                        }
                    }
                }
            }
        }
        self.pending.drain(..start);
        out
    }

    /// Ends the stream; an unfinished character comes out as U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }

    /// The decoder's state without the borrow of the tokenizer, to keep
    /// between calls (a stream of a batch parked between decode steps).
    pub fn park(self) -> ParkedDecoder {
        let (strip_space, first) = self.state.flags();
        ParkedDecoder { strip_space, first, pending: self.pending }
    }
}

/// A [`StreamDecoder`]'s state, parked: [`ParkedDecoder::resume`] goes on
/// exactly where [`StreamDecoder::park`] stopped.
pub struct ParkedDecoder {
    strip_space: bool,
    first: bool,
    pending: Vec<u8>,
}

impl ParkedDecoder {
    /// The decoder again, on the tokenizer it was made with.
    pub fn resume(self, tok: &Tokenizer) -> StreamDecoder<'_> {
        StreamDecoder { state: DecodeState::with_flags(tok, self.strip_space, self.first), pending: self.pending }
    }

    /// Bytes of a character not yet complete (user text: callers that must
    /// not leave it behind wipe it).
    pub fn pending_mut(&mut self) -> &mut Vec<u8> {
        &mut self.pending
    }
}
