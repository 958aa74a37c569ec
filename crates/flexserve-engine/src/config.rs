//! Model hyper-parameters read from GGUF metadata.

use flexserve_gguf::Metadata;

use crate::EngineError;

/// The architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3.x, SmolLM2, TinyLlama, Mistral: no QKV biases, rotary pairs adjacent.
    Llama,
    /// Qwen2: QKV biases, rotary pairs half a head apart ("neox" layout).
    Qwen2,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// How positions map onto rotary angles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    None,
    /// Positions divided by `factor`.
    Linear {
        factor: f32,
    },
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    /// Context length the model was trained for.
    pub n_ctx_train: usize,
    pub rms_eps: f32,
    pub rope_base: f32,
    /// Number of leading dimensions of each head that are rotated.
    pub rope_dim: usize,
    pub rope_scaling: RopeScaling,
}

/// The model's `general.architecture`.
pub(crate) fn architecture(meta: &Metadata) -> Result<&str, EngineError> {
    meta.get_str("general.architecture")?.ok_or_else(|| EngineError::Metadata("missing general.architecture".into()))
}

/// A size the model must state (`key`), positive and below 2^24.
pub(crate) fn required_size(meta: &Metadata, key: &str) -> Result<usize, EngineError> {
    let v = meta.get_u64(key)?.ok_or_else(|| EngineError::Metadata(format!("missing {key}")))?;
    usize::try_from(v)
        .ok()
        .filter(|&v| v > 0 && v < (1 << 24))
        .ok_or_else(|| EngineError::Metadata(format!("{key} = {v} is out of range")))
}

impl ModelConfig {
    pub fn from_metadata(meta: &Metadata) -> Result<Self, EngineError> {
        let arch_name = architecture(meta)?;
        let arch = match arch_name {
            "llama" => Arch::Llama,
            "qwen2" => Arch::Qwen2,
            other => return Err(EngineError::UnsupportedArch(other.to_string())),
        };
        let key = |k: &str| format!("{arch_name}.{k}");
        let req = |k: &str| required_size(meta, &key(k));
        let n_embd = req("embedding_length")?;
        let n_head = req("attention.head_count")?;
        let n_head_kv = match meta.get_u64(&key("attention.head_count_kv"))? {
            Some(v) => v as usize,
            None => n_head,
        };
        if n_head_kv == 0 || n_head % n_head_kv != 0 {
            return Err(EngineError::Metadata(format!(
                "{} = {n_head_kv} does not divide the head count {n_head}",
                key("attention.head_count_kv")
            )));
        }
        let head_dim = match meta.get_u64(&key("attention.key_length"))? {
            Some(v) => v as usize,
            None => {
                if n_embd % n_head != 0 {
                    return Err(EngineError::Metadata(format!(
                        "embedding length {n_embd} is not a multiple of the head count {n_head}"
                    )));
                }
                n_embd / n_head
            }
        };
        if head_dim == 0 || head_dim % 2 != 0 || head_dim > 1024 {
            return Err(EngineError::Metadata(format!("head dimension {head_dim} is not supported")));
        }
        let rope_dim = match meta.get_u64(&key("rope.dimension_count"))? {
            Some(v) => v as usize,
            None => head_dim,
        };
        if rope_dim > head_dim || rope_dim % 2 != 0 {
            return Err(EngineError::Metadata(format!(
                "{} = {rope_dim} must be even and at most the head dimension {head_dim}",
                key("rope.dimension_count")
            )));
        }
        let rope_scaling = match meta.get_str(&key("rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let factor = meta.get_f32(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                if factor.is_nan() || factor <= 0.0 {
                    return Err(EngineError::Metadata(format!("{} must be positive", key("rope.scaling.factor"))));
                }
                RopeScaling::Linear { factor }
            }
            Some(other) => return Err(EngineError::Metadata(format!("rope scaling type {other:?} is not supported"))),
        };
        let n_vocab = match meta.get_u64(&key("vocab_size"))? {
            Some(v) => v as usize,
            None => meta.get_str_array("tokenizer.ggml.tokens")?.map(|t| t.len()).unwrap_or(0),
        };
        let default_eps = 1e-5;
        Ok(Self {
            arch,
            n_layer: req("block_count")?,
            n_embd,
            n_head,
            n_head_kv,
            head_dim,
            n_ff: req("feed_forward_length")?,
            n_vocab,
            n_ctx_train: req("context_length")?,
            rms_eps: meta.get_f32(&key("attention.layer_norm_rms_epsilon"))?.unwrap_or(default_eps),
            rope_base: meta.get_f32(&key("rope.freq_base"))?.unwrap_or(10000.0),
            rope_dim,
            rope_scaling,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }
}
