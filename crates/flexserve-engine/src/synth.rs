//! Random-weight models with real shapes, written as GGUF: tiny ones serve
//! the tests, large ones the speed work. Seeded and reproducible.

use flexserve_gguf::{GgmlType, GgufWriter, Metadata, Value};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::config::Arch;
use crate::EngineError;

#[derive(Debug, Clone)]
pub struct SynthSpec {
    pub arch: Arch,
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    /// Width of an attention head; `None`: `n_embd / n_head`.
    pub head_dim: Option<usize>,
    /// Sliding-window attention (gemma3): the window, 0 for none.
    pub sliding_window: usize,
    /// Every this many layers one is global, the others local (gemma3).
    pub sliding_window_pattern: u32,
    /// Type of the attention and feed-forward matrices.
    pub weight_type: GgmlType,
    /// How types vary between tensors.
    pub mix: QuantMix,
    /// Type of the token embedding (and of the output matrix when tied).
    pub embd_type: GgmlType,
    /// Share the embedding as the output matrix.
    pub tied_output: bool,
    pub rope_base: f32,
    /// Add a `rope_freqs.weight` tensor (llama3-style frequency scaling).
    pub rope_freq_factors: bool,
    pub seed: u64,
}

impl SynthSpec {
    /// A model small enough for unit tests (dimensions are K-quant compatible).
    /// A gemma3 has heads of 128 (queries 512 wide, twice the embedding),
    /// one KV head, and a first layer attending within a window of 8, the
    /// second to every position.
    pub fn tiny(arch: Arch, weight_type: GgmlType) -> Self {
        let gemma3 = arch == Arch::Gemma3;
        Self {
            arch,
            n_layer: 2,
            n_embd: 256,
            n_head: 4,
            n_head_kv: if gemma3 { 1 } else { 2 },
            n_ff: 512,
            n_vocab: 300,
            n_ctx: 128,
            head_dim: gemma3.then_some(128),
            sliding_window: if gemma3 { 8 } else { 0 },
            sliding_window_pattern: 2,
            weight_type,
            mix: QuantMix::Uniform,
            embd_type: GgmlType::Q8_0,
            tied_output: true,
            rope_base: 10000.0,
            rope_freq_factors: false,
            seed: 1,
        }
    }
}

/// Per-tensor type choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantMix {
    /// Every matrix in `weight_type`.
    Uniform,
    /// llama.cpp's Q4_K_M: Q4_K, with Q6_K for the value and feed-forward
    /// down matrices of the first and last eighth of the layers and every
    /// third layer between, and for the output matrix.
    Q4KM,
}

impl SynthSpec {
    /// A model with real shapes: `1b` (hidden 2048, 16 layers, 32 heads, 8 KV
    /// heads, FFN 8192), `3b` (3072, 28, 24, 8, 8192), or
    /// `LAYERS,HIDDEN,HEADS,KV_HEADS,FFN`; `quant` a type name or `Q4_K_M`.
    pub fn from_shape(shape: &str, quant: &str, seed: u64) -> Result<Self, EngineError> {
        let dims: Vec<usize> = match shape {
            "1b" => vec![16, 2048, 32, 8, 8192],
            "3b" => vec![28, 3072, 24, 8, 8192],
            s => s.split(',').map(|d| d.trim().parse::<usize>()).collect::<Result<_, _>>().map_err(|_| {
                EngineError::Other(format!("shape {s:?}: expected 1b, 3b or LAYERS,HIDDEN,HEADS,KV_HEADS,FFN"))
            })?,
        };
        let [n_layer, n_embd, n_head, n_head_kv, n_ff] = dims[..] else {
            return Err(EngineError::Other(format!(
                "shape {shape:?}: expected five numbers LAYERS,HIDDEN,HEADS,KV_HEADS,FFN"
            )));
        };
        if dims.contains(&0) || n_embd % n_head != 0 || n_head % n_head_kv != 0 || (n_embd / n_head) % 2 != 0 {
            return Err(EngineError::Other(format!(
                "shape {shape:?}: heads must divide the hidden size into even head dimensions and KV heads divide heads"
            )));
        }
        let (weight_type, mix) = if quant.eq_ignore_ascii_case("q4_k_m") {
            (GgmlType::Q4_K, QuantMix::Q4KM)
        } else {
            let ty = GgmlType::from_name(quant)
                .ok_or_else(|| EngineError::Other(format!("unknown quantization type {quant:?}")))?;
            (ty, QuantMix::Uniform)
        };
        Ok(Self {
            arch: Arch::Llama,
            n_layer,
            n_embd,
            n_head,
            n_head_kv,
            n_ff,
            n_vocab: 32000,
            n_ctx: 4096,
            head_dim: None,
            sliding_window: 0,
            sliding_window_pattern: 6,
            weight_type,
            mix,
            embd_type: weight_type,
            tied_output: false,
            rope_base: 500000.0,
            rope_freq_factors: false,
            seed,
        })
    }

    /// The type of matrix `name` (`attn_q`, `ffn_down`, `output`, ...) in `layer`.
    pub fn matrix_type(&self, name: &str, layer: usize) -> GgmlType {
        let n = self.n_layer;
        match self.mix {
            QuantMix::Uniform
                if name == "output" && self.weight_type != GgmlType::Q8_0 && self.weight_type.block_size() > 1 =>
            {
                GgmlType::Q6_K
            }
            QuantMix::Uniform => self.weight_type,
            QuantMix::Q4KM => {
                let more_bits = layer < n / 8 || layer >= 7 * n / 8 || (layer - n / 8) % 3 == 2;
                match name {
                    "output" => GgmlType::Q6_K,
                    "attn_v" | "ffn_down" if more_bits => GgmlType::Q6_K,
                    _ => GgmlType::Q4_K,
                }
            }
        }
    }
}

/// Builds the GGUF of a random model. `tokenizer` metadata (keys
/// `tokenizer.*`) is copied in when given; its vocabulary size then wins.
pub fn synth_model(spec: &SynthSpec, tokenizer: Option<&Metadata>) -> Result<GgufWriter, EngineError> {
    let mut w = GgufWriter::new();
    let a = spec.arch.name();
    let mut n_vocab = spec.n_vocab;
    if let Some(tok) = tokenizer {
        for (k, v) in tok.iter().filter(|(k, _)| k.starts_with("tokenizer.")) {
            w.set(k, v.clone());
        }
        if let Some(t) = tok.get_str_array("tokenizer.ggml.tokens")? {
            n_vocab = t.len();
        }
    }
    let head_dim = spec.head_dim.unwrap_or(spec.n_embd / spec.n_head);
    let gemma3 = spec.arch == Arch::Gemma3;
    w.set("general.architecture", Value::from(a));
    w.set("general.name", Value::from(format!("synthetic {a} {}", spec.weight_type)));
    w.set(format!("{a}.block_count"), Value::U32(spec.n_layer as u32));
    w.set(format!("{a}.context_length"), Value::U32(spec.n_ctx as u32));
    w.set(format!("{a}.embedding_length"), Value::U32(spec.n_embd as u32));
    w.set(format!("{a}.feed_forward_length"), Value::U32(spec.n_ff as u32));
    w.set(format!("{a}.attention.head_count"), Value::U32(spec.n_head as u32));
    w.set(format!("{a}.attention.head_count_kv"), Value::U32(spec.n_head_kv as u32));
    w.set(format!("{a}.attention.layer_norm_rms_epsilon"), Value::F32(if gemma3 { 1e-6 } else { 1e-5 }));
    if spec.head_dim.is_some() {
        w.set(format!("{a}.attention.key_length"), Value::U32(head_dim as u32));
        w.set(format!("{a}.attention.value_length"), Value::U32(head_dim as u32));
    }
    if spec.sliding_window > 0 {
        w.set(format!("{a}.attention.sliding_window"), Value::U32(spec.sliding_window as u32));
        w.set(format!("{a}.attention.sliding_window_pattern"), Value::U32(spec.sliding_window_pattern));
    }
    w.set(format!("{a}.rope.freq_base"), Value::F32(spec.rope_base));
    w.set(format!("{a}.rope.dimension_count"), Value::U32(head_dim as u32));
    w.set(format!("{a}.vocab_size"), Value::U32(n_vocab as u32));

    let mut rng = StdRng::seed_from_u64(spec.seed);
    let (e, q, kv, ff) = (spec.n_embd, spec.n_head * head_dim, spec.n_head_kv * head_dim, spec.n_ff);
    let mut matrix = |w: &mut GgufWriter, name: &str, ty: GgmlType, cols: usize, rows: usize, scale: f32| {
        // Norm weights sit near 1, everything else near 0.
        let offset = if name.contains("norm") { 1.0 } else { 0.0 };
        // One seed per tensor from the model's generator, rows filled in parallel
        // from per-row generators: reproducible whatever the thread count.
        let tensor_seed: u64 = rng.gen();
        let mut data = vec![0f32; cols * rows];
        data.par_chunks_mut(cols).enumerate().for_each(|(r, row)| {
            let mut g = StdRng::seed_from_u64(tensor_seed ^ (r as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            for v in row.iter_mut() {
                *v = offset + gaussian(&mut g) * scale;
            }
        });
        let bytes = quantize_parallel(ty, &data, cols).map_err(|err| EngineError::Weights(format!("{name}: {err}")))?;
        w.add_tensor(name, ty, &[cols as u64, rows as u64], bytes)?;
        Ok::<(), EngineError>(())
    };
    let std_in = |n: usize| 1.0 / (n as f32).sqrt();
    matrix(&mut w, "token_embd.weight", spec.embd_type, e, n_vocab, 1.0)?;
    for i in 0..spec.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        matrix(&mut w, &n("attn_norm.weight"), GgmlType::F32, e, 1, 0.1)?;
        matrix(&mut w, &n("attn_q.weight"), spec.matrix_type("attn_q", i), e, q, std_in(e))?;
        matrix(&mut w, &n("attn_k.weight"), spec.matrix_type("attn_k", i), e, kv, std_in(e))?;
        matrix(&mut w, &n("attn_v.weight"), spec.matrix_type("attn_v", i), e, kv, std_in(e))?;
        if gemma3 {
            matrix(&mut w, &n("attn_q_norm.weight"), GgmlType::F32, head_dim, 1, 0.1)?;
            matrix(&mut w, &n("attn_k_norm.weight"), GgmlType::F32, head_dim, 1, 0.1)?;
        }
        if spec.arch == Arch::Qwen2 {
            matrix(&mut w, &n("attn_q.bias"), GgmlType::F32, q, 1, 0.1)?;
            matrix(&mut w, &n("attn_k.bias"), GgmlType::F32, kv, 1, 0.1)?;
            matrix(&mut w, &n("attn_v.bias"), GgmlType::F32, kv, 1, 0.1)?;
        }
        matrix(&mut w, &n("attn_output.weight"), spec.matrix_type("attn_output", i), q, e, std_in(q))?;
        if gemma3 {
            matrix(&mut w, &n("post_attention_norm.weight"), GgmlType::F32, e, 1, 0.1)?;
        }
        matrix(&mut w, &n("ffn_norm.weight"), GgmlType::F32, e, 1, 0.1)?;
        matrix(&mut w, &n("ffn_gate.weight"), spec.matrix_type("ffn_gate", i), e, ff, std_in(e))?;
        matrix(&mut w, &n("ffn_up.weight"), spec.matrix_type("ffn_up", i), e, ff, std_in(e))?;
        matrix(&mut w, &n("ffn_down.weight"), spec.matrix_type("ffn_down", i), ff, e, std_in(ff))?;
        if gemma3 {
            matrix(&mut w, &n("post_ffw_norm.weight"), GgmlType::F32, e, 1, 0.1)?;
        }
    }
    matrix(&mut w, "output_norm.weight", GgmlType::F32, e, 1, 0.1)?;
    if spec.rope_freq_factors {
        // Long wavelengths slowed down, short ones kept, as llama3 scaling does.
        let factors: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 + 7.0 * i as f32 / (head_dim / 2) as f32).collect();
        w.add_tensor(
            "rope_freqs.weight",
            GgmlType::F32,
            &[factors.len() as u64],
            bytemuck::cast_slice(&factors).to_vec(),
        )?;
    }
    if !spec.tied_output {
        matrix(&mut w, "output.weight", spec.matrix_type("output", spec.n_layer), e, n_vocab, std_in(e))?;
    }
    Ok(w)
}

/// A nomic-bert encoder with random weights (see [`crate::encoder`]): the
/// tensors and metadata of the real one, small. `n_head` must divide
/// `n_embd` into heads of even size.
#[derive(Debug, Clone)]
pub struct EncoderSynthSpec {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    pub n_ff: usize,
    pub n_vocab: usize,
    pub n_ctx: usize,
    /// Type of the block matrices and the token embedding.
    pub weight_type: GgmlType,
    /// GGUF's pooling number (1 mean, 2 cls, 3 last).
    pub pooling_type: u32,
    pub seed: u64,
}

impl EncoderSynthSpec {
    pub fn tiny(weight_type: GgmlType) -> Self {
        Self {
            n_layer: 2,
            n_embd: 128,
            n_head: 4,
            n_ff: 256,
            n_vocab: 200,
            n_ctx: 64,
            weight_type,
            pooling_type: 1,
            seed: 7,
        }
    }
}

pub fn synth_encoder(spec: &EncoderSynthSpec) -> Result<GgufWriter, EngineError> {
    let mut w = GgufWriter::new();
    let a = "nomic-bert";
    w.set("general.architecture", Value::from(a));
    w.set("general.name", Value::from(format!("synthetic {a} {}", spec.weight_type)));
    w.set(format!("{a}.block_count"), Value::U32(spec.n_layer as u32));
    w.set(format!("{a}.context_length"), Value::U32(spec.n_ctx as u32));
    w.set(format!("{a}.embedding_length"), Value::U32(spec.n_embd as u32));
    w.set(format!("{a}.feed_forward_length"), Value::U32(spec.n_ff as u32));
    w.set(format!("{a}.attention.head_count"), Value::U32(spec.n_head as u32));
    w.set(format!("{a}.attention.layer_norm_epsilon"), Value::F32(1e-12));
    w.set(format!("{a}.attention.causal"), Value::Bool(false));
    w.set(format!("{a}.pooling_type"), Value::U32(spec.pooling_type));
    w.set(format!("{a}.rope.freq_base"), Value::F32(1000.0));
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let (e, ff) = (spec.n_embd, spec.n_ff);
    let mut matrix =
        |w: &mut GgufWriter, name: &str, ty: GgmlType, cols: usize, rows: usize, offset: f32, scale: f32| {
            let data: Vec<f32> = (0..cols * rows).map(|_| offset + gaussian(&mut rng) * scale).collect();
            let bytes =
                quantize_parallel(ty, &data, cols).map_err(|err| EngineError::Weights(format!("{name}: {err}")))?;
            w.add_tensor(name, ty, &[cols as u64, rows as u64], bytes)?;
            Ok::<(), EngineError>(())
        };
    let std_in = |n: usize| 1.0 / (n as f32).sqrt();
    let ty = spec.weight_type;
    matrix(&mut w, "token_embd.weight", ty, e, spec.n_vocab, 0.0, 1.0)?;
    matrix(&mut w, "token_types.weight", GgmlType::F32, e, 2, 0.0, 0.1)?;
    matrix(&mut w, "token_embd_norm.weight", GgmlType::F32, e, 1, 1.0, 0.1)?;
    matrix(&mut w, "token_embd_norm.bias", GgmlType::F32, e, 1, 0.0, 0.1)?;
    for i in 0..spec.n_layer {
        let n = |s: &str| format!("blk.{i}.{s}");
        matrix(&mut w, &n("attn_qkv.weight"), ty, e, 3 * e, 0.0, std_in(e))?;
        matrix(&mut w, &n("attn_output.weight"), ty, e, e, 0.0, std_in(e))?;
        matrix(&mut w, &n("attn_output_norm.weight"), GgmlType::F32, e, 1, 1.0, 0.1)?;
        matrix(&mut w, &n("attn_output_norm.bias"), GgmlType::F32, e, 1, 0.0, 0.1)?;
        matrix(&mut w, &n("ffn_up.weight"), ty, e, ff, 0.0, std_in(e))?;
        matrix(&mut w, &n("ffn_gate.weight"), ty, e, ff, 0.0, std_in(e))?;
        matrix(&mut w, &n("ffn_down.weight"), ty, ff, e, 0.0, std_in(ff))?;
        matrix(&mut w, &n("layer_output_norm.weight"), GgmlType::F32, e, 1, 1.0, 0.1)?;
        matrix(&mut w, &n("layer_output_norm.bias"), GgmlType::F32, e, 1, 0.0, 0.1)?;
    }
    Ok(w)
}

fn quantize_parallel(ty: GgmlType, data: &[f32], cols: usize) -> Result<Vec<u8>, flexserve_quant::QuantError> {
    let k = flexserve_quant::kernels(ty)?;
    let row_bytes = ty.row_size(cols as u64).ok_or(flexserve_quant::QuantError::NotBlockMultiple {
        ty,
        n: cols,
        block: ty.block_size(),
    })? as usize;
    let mut out = vec![0u8; data.len() / cols * row_bytes];
    out.par_chunks_mut(row_bytes).zip(data.par_chunks(cols)).for_each(|(d, s)| (k.quantize)(s, d));
    Ok(out)
}

/// A standard normal sample (Box-Muller).
fn gaussian(rng: &mut StdRng) -> f32 {
    let u1: f32 = rng.gen_range(f32::EPSILON..1.0);
    let u2: f32 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}
