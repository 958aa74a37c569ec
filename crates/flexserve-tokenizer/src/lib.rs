//! Tokenizers built from GGUF metadata, and chat templates.
//!
//! Two tokenizer models are supported, selected by `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE. Text is split into words by the rules named in
//!   `tokenizer.ggml.pre` (see [`PreTokenizerKind`]), each word's bytes are mapped
//!   to visible characters, and the merges of `tokenizer.ggml.merges` are applied
//!   in rank order.
//! - `llama`: SentencePiece-style BPE. Spaces become `▁`, a leading `▁` is added
//!   when `tokenizer.ggml.add_space_prefix` (default on), adjacent pieces are merged
//!   by highest `tokenizer.ggml.scores`, and characters with no token fall back to
//!   `<0xXX>` byte tokens, then to the unknown token.
//!
//! Control and user-defined tokens written in the text are split out first
//! (leftmost, then longest) when special-token parsing is on; user-defined tokens
//! always are. Splitting costs a bounded number of steps per input byte (see
//! [`MAX_SPECIAL_TOKEN_BYTES`]); merging is a heap over each word's symbols.
//!
//! Decoding shows control and unknown tokens as nothing. When the model adds a
//! space prefix, the leading space of the decoded text (after a leading BOS) is
//! removed, so SentencePiece text round-trips. Unlike some decoders, no
//! "clean-up" of spaces before punctuation is done: `decode` is exactly the
//! concatenation of the streamed pieces.

mod chat;
mod config;
mod error;
mod merge;
mod pretokenize;
mod special;
mod stream;
mod tokenizer;
mod unicode;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{keys, ModelKind, TokenType, TokenizerConfig};
pub use error::TokenizerError;
pub use pretokenize::PreTokenizerKind;
pub use special::MAX_SPECIAL_TOKEN_BYTES;
pub use stream::StreamDecoder;
pub use tokenizer::Tokenizer;

#[cfg(test)]
mod thread_safety {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        assert_send_sync::<super::Tokenizer>();
        assert_send_sync::<super::ChatTemplate>();
    }
}
