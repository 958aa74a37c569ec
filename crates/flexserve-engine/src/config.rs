//! Model hyper-parameters read from GGUF metadata.

use flexserve_gguf::{Metadata, Value};

use crate::EngineError;

/// The architectures the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Llama 2/3.x, SmolLM2, TinyLlama, Mistral: no QKV biases, rotary pairs adjacent.
    Llama,
    /// Qwen2: QKV biases, rotary pairs half a head apart ("neox" layout).
    Qwen2,
    /// Gemma 3: embeddings scaled by sqrt(n_embd), per-head RMS norms of
    /// queries and keys, norms after attention and feed-forward too, GELU-gated
    /// feed-forward, sliding-window attention on most layers ("neox" rotary).
    Gemma3,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Whether rotary pairs are half a head apart ("neox") rather than adjacent.
    pub fn rope_neox(self) -> bool {
        matches!(self, Arch::Qwen2 | Arch::Gemma3)
    }
}

/// The activation of the gated feed-forward block: `act(gate) * up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FfnActivation {
    Silu,
    /// GELU, tanh approximation.
    Gelu,
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
    /// Sliding-window attention: on the layers `local_layers` marks, the
    /// query at position `p` sees only positions `p - window + 1 ..= p`.
    pub sliding_window: Option<usize>,
    /// Per layer: whether it attends within the sliding window (local)
    /// rather than to every past position (global). All false without a window.
    pub local_layers: Vec<bool>,
    /// Rotary base of the local layers (no position scaling there).
    pub rope_base_local: f32,
    /// The token embeddings are multiplied by this (gemma3: sqrt(n_embd)).
    pub embd_scale: f32,
    /// Queries are multiplied by this before attention (gemma3), after rotation.
    pub query_scale: Option<f32>,
    /// Attention scores (query . key) are multiplied by this.
    pub kq_scale: f32,
    /// Logits become `cap * tanh(logits / cap)` (gemma3's final soft-capping).
    pub final_logit_softcap: Option<f32>,
    pub ffn_activation: FfnActivation,
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
            "gemma3" => Arch::Gemma3,
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
        let default_eps = if arch == Arch::Gemma3 { 1e-6 } else { 1e-5 };
        let n_layer = req("block_count")?;
        let mut config = Self {
            arch,
            n_layer,
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
            sliding_window: None,
            local_layers: vec![false; n_layer],
            rope_base_local: 10000.0,
            embd_scale: 1.0,
            query_scale: None,
            kq_scale: 1.0 / (head_dim as f32).sqrt(),
            final_logit_softcap: None,
            ffn_activation: FfnActivation::Silu,
        };
        if arch == Arch::Gemma3 {
            config.gemma3(meta)?;
        }
        Ok(config)
    }

    /// Gemma 3's own hyper-parameters, as llama.cpp reads them.
    fn gemma3(&mut self, meta: &Metadata) -> Result<(), EngineError> {
        let key = |k: &str| format!("gemma3.{k}");
        self.embd_scale = (self.n_embd as f32).sqrt();
        // The scale goes onto the queries, the scores are taken as they are.
        // The 27B model (62 layers) scales by the embedding width per head.
        let scale_dim = if self.n_layer == 62 { self.n_embd / self.n_head } else { self.head_dim };
        self.query_scale = Some(1.0 / (scale_dim as f32).sqrt());
        self.kq_scale = 1.0;
        self.ffn_activation = FfnActivation::Gelu;
        if let Some(cap) = meta.get_f32(&key("final_logit_softcapping"))? {
            if cap.is_nan() || cap < 0.0 {
                return Err(EngineError::Metadata(format!(
                    "{} = {cap} must not be negative",
                    key("final_logit_softcapping")
                )));
            }
            self.final_logit_softcap = (cap > 0.0).then_some(cap);
        }
        let window_key = key("attention.sliding_window");
        let window = match meta.get_u64(&window_key)? {
            None | Some(0) => return Ok(()),
            Some(w) => usize::try_from(w)
                .ok()
                .filter(|&w| w < (1 << 24))
                .ok_or_else(|| EngineError::Metadata(format!("{window_key} = {w} is out of range")))?,
        };
        self.sliding_window = Some(window);
        self.local_layers = local_layers(meta, &key("attention.sliding_window_pattern"), self.n_layer)?;
        if let Some(base) = meta.get_f32(&key("rope.freq_base_swa"))? {
            if base.is_nan() || base <= 0.0 {
                return Err(EngineError::Metadata(format!("{} = {base} must be positive", key("rope.freq_base_swa"))));
            }
            self.rope_base_local = base;
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Whether `layer` attends within the sliding window only.
    pub fn is_local(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.local_layers[layer]
    }

    /// The first position the query at `pos` sees in `layer`: the start of
    /// its sliding window on a local layer, 0 on a global one.
    pub fn first_visible(&self, layer: usize, pos: usize) -> usize {
        match self.sliding_window {
            Some(window) if self.local_layers[layer] => (pos + 1).saturating_sub(window),
            _ => 0,
        }
    }
}

/// Which layers attend within the sliding window, from `key`: an array with
/// a bool per layer, or a period `n` (every `n`th layer global, the others
/// local; 0: all local). Without the key, a period of 6 (Gemma 3's).
fn local_layers(meta: &Metadata, key: &str, n_layer: usize) -> Result<Vec<bool>, EngineError> {
    let bad = |what: String| EngineError::Metadata(format!("{key}: {what}"));
    if let Some(Value::Array(array)) = meta.get(key) {
        let flags: Option<Vec<bool>> =
            array.values.iter().map(|v| v.as_bool().or(v.as_u64().map(|n| n != 0))).collect();
        let flags = flags.ok_or_else(|| bad(format!("expected bools, found an array of {}", array.elem_type)))?;
        if flags.len() != n_layer {
            return Err(bad(format!("{} entries for {n_layer} layers", flags.len())));
        }
        return Ok(flags);
    }
    let period = meta.get_u32(key)?.unwrap_or(6) as usize;
    Ok((0..n_layer).map(|l| period == 0 || l % period < period - 1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexserve_gguf::{Array, ValueType};

    /// Gemma-3-270M's hyper-parameters, as its GGUF states them.
    fn gemma3_270m() -> Metadata {
        let mut m = Metadata::new();
        m.insert("general.architecture", Value::from("gemma3"));
        for (k, v) in [
            ("context_length", 32768),
            ("embedding_length", 640),
            ("block_count", 18),
            ("feed_forward_length", 2048),
            ("attention.head_count", 4),
            ("attention.head_count_kv", 1),
            ("attention.key_length", 256),
            ("attention.value_length", 256),
            ("attention.sliding_window", 512),
        ] {
            m.insert(format!("gemma3.{k}"), Value::U32(v));
        }
        m.insert("gemma3.rope.freq_base", Value::F32(1e6));
        m.insert("gemma3.attention.layer_norm_rms_epsilon", Value::F32(1e-6));
        m
    }

    fn error(m: &Metadata) -> String {
        ModelConfig::from_metadata(m).unwrap_err().to_string()
    }

    #[test]
    fn gemma3_270m_hyper_parameters() {
        let c = ModelConfig::from_metadata(&gemma3_270m()).unwrap();
        assert_eq!(c.arch, Arch::Gemma3);
        assert!(c.arch.rope_neox());
        assert_eq!((c.head_dim, c.q_dim(), c.kv_dim(), c.n_embd), (256, 1024, 256, 640));
        assert_eq!(c.sliding_window, Some(512));
        // Every sixth layer global (5, 11, 17), the others local.
        let global: Vec<usize> = (0..18).filter(|&l| !c.is_local(l)).collect();
        assert_eq!(global, [5, 11, 17]);
        assert_eq!((c.rope_base, c.rope_base_local), (1e6, 10000.0));
        assert_eq!(c.embd_scale, 640f32.sqrt());
        assert_eq!((c.query_scale, c.kq_scale), (Some(1.0 / 16.0), 1.0));
        assert_eq!(c.ffn_activation, FfnActivation::Gelu);
        assert_eq!(c.final_logit_softcap, None);
        // A window of 512 positions ending at the query's own, on local layers only.
        assert_eq!((c.first_visible(0, 511), c.first_visible(0, 512), c.first_visible(0, 1000)), (0, 1, 489));
        assert_eq!(c.first_visible(5, 1000), 0);
    }

    #[test]
    fn llama_and_qwen2_keep_their_attention() {
        let mut m = gemma3_270m();
        m.insert("general.architecture", Value::from("qwen2"));
        for (k, v) in gemma3_270m().iter() {
            if let Some(k) = k.strip_prefix("gemma3.") {
                m.insert(format!("qwen2.{k}"), v.clone());
            }
        }
        let c = ModelConfig::from_metadata(&m).unwrap();
        // No window (the key is gemma3's alone), scores scaled, SiLU.
        assert_eq!((c.sliding_window, c.first_visible(0, 1000), c.is_local(0)), (None, 0, false));
        assert_eq!((c.embd_scale, c.query_scale, c.kq_scale), (1.0, None, 1.0 / 16.0));
        assert_eq!(c.ffn_activation, FfnActivation::Silu);
    }

    #[test]
    fn gemma3_window_pattern_and_bases_from_metadata() {
        let mut m = gemma3_270m();
        m.insert("gemma3.attention.sliding_window_pattern", Value::U32(3));
        m.insert("gemma3.rope.freq_base_swa", Value::F32(5000.0));
        m.insert("gemma3.final_logit_softcapping", Value::F32(30.0));
        let c = ModelConfig::from_metadata(&m).unwrap();
        assert_eq!((0..6).map(|l| c.is_local(l)).collect::<Vec<_>>(), [true, true, false, true, true, false]);
        assert_eq!((c.rope_base_local, c.final_logit_softcap), (5000.0, Some(30.0)));
        // A flag per layer.
        let flags = (0..18).map(|l| Value::Bool(l % 2 == 0)).collect();
        m.insert("gemma3.attention.sliding_window_pattern", Value::Array(Array::new(ValueType::Bool, flags).unwrap()));
        let c = ModelConfig::from_metadata(&m).unwrap();
        assert_eq!((0..4).map(|l| c.is_local(l)).collect::<Vec<_>>(), [true, false, true, false]);
        // No window: every layer global, whatever the pattern says.
        m.remove("gemma3.attention.sliding_window");
        let c = ModelConfig::from_metadata(&m).unwrap();
        assert!((0..18).all(|l| !c.is_local(l) && c.first_visible(l, 4000) == 0));
    }

    #[test]
    fn gemma3_metadata_errors_name_their_key() {
        let with = |key: &str, v: Value| {
            let mut m = gemma3_270m();
            m.insert(format!("gemma3.{key}"), v);
            error(&m)
        };
        let flags = |n: usize| Value::Array(Array::new(ValueType::Bool, vec![Value::Bool(true); n]).unwrap());
        let e = with("attention.sliding_window_pattern", flags(17));
        assert!(e.contains("gemma3.attention.sliding_window_pattern") && e.contains("17 entries for 18 layers"), "{e}");
        let strings = Value::Array(Array::new(ValueType::String, vec![Value::from("x"); 18]).unwrap());
        let e = with("attention.sliding_window_pattern", strings);
        assert!(e.contains("gemma3.attention.sliding_window_pattern") && e.contains("bools"), "{e}");
        let e = with("attention.sliding_window_pattern", Value::from("six"));
        assert!(e.contains("gemma3.attention.sliding_window_pattern"), "{e}");
        let e = with("rope.freq_base_swa", Value::F32(-1.0));
        assert!(e.contains("gemma3.rope.freq_base_swa") && e.contains("positive"), "{e}");
        let e = with("final_logit_softcapping", Value::F32(-30.0));
        assert!(e.contains("gemma3.final_logit_softcapping"), "{e}");
        let e = with("attention.sliding_window", Value::U64(1 << 40));
        assert!(e.contains("gemma3.attention.sliding_window") && e.contains("out of range"), "{e}");
        let e = with("attention.key_length", Value::U32(255));
        assert!(e.contains("head dimension 255"), "{e}");
    }
}
