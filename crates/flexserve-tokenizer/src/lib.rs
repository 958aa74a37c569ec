//! Tokenizers built from GGUF metadata, and chat templates.
//!
//! Three tokenizer models are supported, selected by `tokenizer.ggml.model`:
//!
//! - `gpt2`: byte-level BPE. Text is split into words by the rules named in
//!   `tokenizer.ggml.pre` (see [`PreTokenizerKind`]), each word's bytes are mapped
//!   to visible characters, and the merges of `tokenizer.ggml.merges` are applied
//!   in rank order.
//! - `llama`: SentencePiece-style BPE. Spaces become `▁`, a leading `▁` is added
//!   when `tokenizer.ggml.add_space_prefix` (default on), adjacent pieces are merged
//!   by highest `tokenizer.ggml.scores`, and characters with no token fall back to
//!   `<0xXX>` byte tokens, then to the unknown token.
//! - `bert`: WordPiece. Text is normalized (lower-cased and accents stripped,
//!   as `tokenizer.ggml.normalizer.*` say, both by default) and cut into words
//!   at whitespace, punctuation and CJK ideographs; each word, marked with a
//!   leading `▁`, becomes the longest vocabulary tokens from the left, or the
//!   unknown token when some part of it has none. `[CLS]` (the BOS token) and
//!   `[SEP]` (`tokenizer.ggml.seperator_token_id`) enclose the sequence.
//!
//! Control and user-defined tokens written in the text are split out first
//! (leftmost, then longest) when special-token parsing is on; user-defined tokens
//! always are. Splitting costs a bounded number of steps per input byte (see
//! [`MAX_SPECIAL_TOKEN_BYTES`]); merging is a heap over each word's symbols.
//!
//! Decoding shows control and unknown tokens as nothing; SentencePiece and
//! WordPiece pieces show `▁` as a space. When the model adds a
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
mod wordpiece;

pub use chat::{ChatMessage, ChatTemplate};
pub use config::{keys, ModelKind, TokenType, TokenizerConfig};
pub use error::TokenizerError;
pub use pretokenize::PreTokenizerKind;
pub use special::MAX_SPECIAL_TOKEN_BYTES;
pub use stream::{ParkedDecoder, StreamDecoder};
pub use tokenizer::Tokenizer;
pub use wordpiece::MAX_WORDPIECE_TOKEN_BYTES;

#[cfg(test)]
mod thread_safety {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn shared_types_are_send_and_sync() {
        assert_send_sync::<super::Tokenizer>();
        assert_send_sync::<super::ChatTemplate>();
    }
}
