//! An encoder's hyper-parameters read from GGUF metadata.

use flexserve_gguf::Metadata;

use crate::config::{architecture, required_size};
use crate::EngineError;

/// The encoder architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncoderArch {
    /// nomic-bert (nomic-embed-text): BERT's post-norm blocks with one fused
    /// QKV matrix, rotary positions (pairs half a head apart) instead of
    /// position embeddings, and a SwiGLU feed-forward; no biases in the
    /// matrices.
    NomicBert,
}

impl EncoderArch {
    pub fn name(self) -> &'static str {
        match self {
            EncoderArch::NomicBert => "nomic-bert",
        }
    }

    /// The architecture named in `general.architecture`, if it is an encoder the engine runs.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "nomic-bert" => Some(EncoderArch::NomicBert),
            _ => None,
        }
    }
}

/// How the per-token outputs become one vector (`{arch}.pooling_type`,
/// numbered as GGUF numbers them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// The mean over the input's tokens (1).
    Mean,
    /// The first token's output ([CLS], 2).
    Cls,
    /// The last token's output (3).
    Last,
}

impl Pooling {
    fn from_gguf(value: u64) -> Option<Self> {
        match value {
            1 => Some(Pooling::Mean),
            2 => Some(Pooling::Cls),
            3 => Some(Pooling::Last),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Pooling::Mean => "mean",
            Pooling::Cls => "cls",
            Pooling::Last => "last",
        }
    }
}

#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub arch: EncoderArch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// The longest input the model was trained for, in tokens.
    pub n_ctx_train: usize,
    pub norm_eps: f32,
    pub rope_base: f32,
    pub pooling: Pooling,
}

impl EncoderConfig {
    pub fn from_metadata(meta: &Metadata) -> Result<Self, EngineError> {
        let arch_name = architecture(meta)?;
        let arch =
            EncoderArch::from_name(arch_name).ok_or_else(|| EngineError::UnsupportedArch(arch_name.to_string()))?;
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| required_size(meta, &key(k));
        if meta.get_bool(&key("attention.causal"))? == Some(true) {
            return Err(EngineError::Metadata(format!(
                "{} is true: a {arch_name} model must attend both ways",
                key("attention.causal")
            )));
        }
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        if n_embd % n_head != 0 || (n_embd / n_head) % 2 != 0 {
            return Err(EngineError::Metadata(format!(
                "embedding length {n_embd} does not split into {n_head} heads of even size"
            )));
        }
        let pooling = match meta.get_u64(&key("pooling_type"))? {
            None => Pooling::Mean,
            Some(v) => Pooling::from_gguf(v).ok_or_else(|| {
                EngineError::Metadata(format!("{} = {v} is not supported (1 mean, 2 cls, 3 last)", key("pooling_type")))
            })?,
        };
        let norm_eps = meta.get_f32(&key("attention.layer_norm_epsilon"))?.unwrap_or(1e-12);
        if !(norm_eps.is_finite() && norm_eps >= 0.0) {
            return Err(EngineError::Metadata(format!(
                "{} = {norm_eps} is not valid",
                key("attention.layer_norm_epsilon")
            )));
        }
        let n_vocab = meta.get_str_array("tokenizer.ggml.tokens")?.map(|t| t.len()).unwrap_or(0);
        Ok(Self {
            arch,
            n_layer: req("block_count")?,
            n_embd,
            n_head,
            head_dim: n_embd / n_head,
            n_ff: req("feed_forward_length")?,
            n_vocab,
            n_ctx_train: req("context_length")?,
            norm_eps,
            rope_base: meta.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
            pooling,
        })
    }
}
