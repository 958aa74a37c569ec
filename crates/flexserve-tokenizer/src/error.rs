//! Errors building a tokenizer or rendering a chat template.

use flexserve_gguf::GgufError;

/// What is wrong, naming the metadata key (or template) at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A required key is absent.
    #[error("metadata key {key} is missing ({what})")]
    MissingKey { key: &'static str, what: &'static str },

    /// A key holds a value of the wrong type.
    #[error("metadata key {key} has the wrong type: {source}")]
    WrongType {
        key: &'static str,
        #[source]
        source: GgufError,
    },

    /// `tokenizer.ggml.model` names a tokenizer this crate does not implement.
    #[error("metadata key tokenizer.ggml.model is {0:?}; supported: \"gpt2\" (byte-level BPE), \"llama\" (SentencePiece BPE), \"bert\" (WordPiece)")]
    UnknownModel(String),

    /// `tokenizer.ggml.pre` names split rules this crate does not implement.
    #[error("metadata key tokenizer.ggml.pre is {found:?}; supported: {supported}")]
    UnknownPreTokenizer { found: String, supported: &'static str },

    /// A per-token array whose length differs from the vocabulary's.
    #[error("metadata key {key} has {found} entries but tokenizer.ggml.tokens has {expected}")]
    LengthMismatch { key: &'static str, expected: usize, found: usize },

    /// `tokenizer.ggml.tokens` is present but empty.
    #[error("metadata key tokenizer.ggml.tokens is empty")]
    EmptyVocab,

    /// A vocabulary larger than token ids can address.
    #[error("metadata key tokenizer.ggml.tokens has {0} entries, more than u32 token ids can address")]
    VocabTooLarge(usize),

    /// The same string appears twice in the vocabulary.
    #[error("metadata key tokenizer.ggml.tokens holds {text:?} twice (ids {first} and {second})")]
    DuplicateToken { text: String, first: u32, second: u32 },

    /// A `tokenizer.ggml.token_type` value outside 0..=6.
    #[error("metadata key tokenizer.ggml.token_type[{index}] is {value}, not a token type (0..=6)")]
    BadTokenType { index: usize, value: i32 },

    /// A `tokenizer.ggml.merges` entry that is not two parts separated by a space.
    #[error("metadata key tokenizer.ggml.merges[{index}] is {entry:?}; expected \"<left> <right>\"")]
    BadMerge { index: usize, entry: String },

    /// A special-token id beyond the vocabulary.
    #[error("metadata key {key} is {id}, but the vocabulary has only {n_vocab} tokens")]
    IdOutOfRange { key: &'static str, id: u32, n_vocab: usize },

    /// A flag asks for a special token the model does not define.
    #[error("{flag} asks for a token but {key} is not set")]
    MissingSpecialToken { flag: &'static str, key: &'static str },

    /// A special token longer than the bound on special tokens' texts.
    #[error("metadata key tokenizer.ggml.tokens[{id}] is a special token of {len} bytes; special tokens are at most {max} bytes (MAX_SPECIAL_TOKEN_BYTES)")]
    SpecialTokenTooLong { id: u32, len: usize, max: usize },

    /// A WordPiece token longer than the bound on what a word is matched against.
    #[error("metadata key tokenizer.ggml.tokens[{id}] is {len} bytes; WordPiece tokens are at most {max} bytes (MAX_WORDPIECE_TOKEN_BYTES)")]
    WordPieceTokenTooLong { id: u32, len: usize, max: usize },

    /// The chat template does not parse.
    #[error("chat template does not compile: {0}")]
    TemplateSyntax(String),

    /// The chat template called `raise_exception(message)`.
    #[error("chat template raised an exception: {0}")]
    TemplateException(String),

    /// Rendering failed for another reason (undefined function, bad operation, ...).
    #[error("chat template rendering failed: {0}")]
    TemplateRender(String),
}
