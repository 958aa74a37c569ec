//! The inference engine: llama-family and qwen2 transformers over weights
//! taken from any buffer, with tokenization, chat templates, sampling and
//! perplexity evaluation.

pub mod config;
pub mod encoder;
pub mod generate;
pub mod memory;
pub mod model;
pub mod ops;
pub mod perplexity;
pub mod sampling;
pub mod synth;
pub mod weights;

pub use config::{Arch, ModelConfig};
pub use encoder::{Encoder, EncoderConfig, Normalization, Pooling};
pub use generate::{
    reusable_prefix, GenerateOptions, GenerationStats, Generator, Next, ParkedTokens, Prefilled, StopReason,
    TokenStream,
};
pub use memory::{MemoryBlock, ScratchSource};
pub use model::{KvCache, Logits, Model, ScratchPlan, Session, SessionState, TokenCost};
pub use sampling::{Sampler, SamplingParams};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model metadata: {0}")]
    Metadata(String),
    #[error(transparent)]
    Gguf(#[from] flexserve_gguf::GgufError),
    #[error(transparent)]
    Tokenizer(#[from] flexserve_tokenizer::TokenizerError),
    #[error("architecture {0:?} is not supported (supported: llama, qwen2; encoders: nomic-bert)")]
    UnsupportedArch(String),
    #[error("tensor {0} is missing from the model")]
    MissingTensor(String),
    #[error("weights: {0}")]
    Weights(String),
    #[error("context is full: {needed} positions needed, the context holds {n_ctx} (raise it with --ctx)")]
    ContextFull { n_ctx: usize, needed: usize },
    #[error("token id {id} is outside the vocabulary of {n_vocab}")]
    BadToken { id: u32, n_vocab: usize },
    #[error("nothing to evaluate: the input has no tokens")]
    EmptyInput,
    #[error("thread pool: {0}")]
    Threads(String),
    /// The caller's hook asked to stop (its peer went away).
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    Other(String),
}
