//! The transformer: weights of a llama-family or qwen2 model and the forward
//! pass over a batch of tokens with a KV cache.

use std::ops::ControlFlow;
use std::sync::Arc;

use flexserve_gguf::GgufFile;
use half::f16;
use rayon::prelude::*;

use crate::config::{Arch, ModelConfig, RopeScaling};
use crate::memory::{heap_scratch, Buf, HeapBlock, MemoryBlock, ScratchSource};
use crate::ops::{self, QuantizedActs};
use crate::weights::{load_vector, load_vector_opt, GgufSource, Tensor, TensorSource};
use crate::EngineError;

mod batch;

/// One transformer block's weights.
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: Tensor,
    pub wk: Tensor,
    pub wv: Tensor,
    pub bq: Option<Vec<f32>>,
    pub bk: Option<Vec<f32>>,
    pub bv: Option<Vec<f32>>,
    pub wo: Tensor,
    pub ffn_norm: Vec<f32>,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
}

impl Layer {
    pub fn load(src: &dyn TensorSource, c: &ModelConfig, i: usize) -> Result<Self, EngineError> {
        let n = |s: &str| format!("blk.{i}.{s}");
        let (e, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let bias = |s: &str, len| load_vector_opt(src, &n(s), len);
        Ok(Self {
            attn_norm: load_vector(src, &n("attn_norm.weight"), e)?,
            wq: Tensor::load(src, &n("attn_q.weight"), e, q)?,
            wk: Tensor::load(src, &n("attn_k.weight"), e, kv)?,
            wv: Tensor::load(src, &n("attn_v.weight"), e, kv)?,
            bq: bias("attn_q.bias", q)?,
            bk: bias("attn_k.bias", kv)?,
            bv: bias("attn_v.bias", kv)?,
            wo: Tensor::load(src, &n("attn_output.weight"), q, e)?,
            ffn_norm: load_vector(src, &n("ffn_norm.weight"), e)?,
            w_gate: Tensor::load(src, &n("ffn_gate.weight"), e, ff)?,
            w_up: Tensor::load(src, &n("ffn_up.weight"), e, ff)?,
            w_down: Tensor::load(src, &n("ffn_down.weight"), ff, e)?,
        })
    }
}

/// Whether loading rearranges the tensor called `name` for the grouped
/// matrix kernels (when its type and shape allow it, see
/// `flexserve_quant::Repacked::for_matrix`): the layer matrices and an untied output,
/// never the embeddings. A source that rearranges in place must pick exactly
/// these ([`Weights::load`] follows the same rule).
pub fn rearranged_by_load(name: &str) -> bool {
    const LAYER_MATRICES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];
    if name == "output.weight" {
        return true;
    }
    let Some(layer) = flexserve_gguf::layer_of(name) else { return false };
    // The names the engine loads (`blk.{layer}.attn_q.weight`, ...), nothing spelt otherwise.
    let tensor = name.strip_prefix(&format!("blk.{layer}.")).and_then(|t| t.strip_suffix(".weight"));
    tensor.is_some_and(|t| LAYER_MATRICES.contains(&t))
}

/// All weights of a model.
pub struct Weights {
    pub token_embd: Tensor,
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>,
    /// The output projection; the embedding matrix itself when tied.
    pub output: Tensor,
    /// Per-pair divisors of the rotary frequencies (llama3-style scaling).
    pub rope_freq_factors: Option<Vec<f32>>,
}

impl Weights {
    pub fn load(src: &dyn TensorSource, c: &ModelConfig) -> Result<Self, EngineError> {
        let token_embd = Tensor::load(src, "token_embd.weight", c.n_embd, c.n_vocab)?;
        let mut output = Tensor::load_opt(src, "output.weight", c.n_embd, c.n_vocab)?;
        let mut layers = (0..c.n_layer).map(|i| Layer::load(src, c, i)).collect::<Result<Vec<_>, _>>()?;
        // Matrix-product weights are rearranged for the grouped kernels where
        // their type allows (Q4_0 as llama.cpp does, Q4_1, Q8_0, Q4_K; Q6_K on AVX-512); the embedding
        // matrix, and so a tied output, is not (its rows are looked up).
        let mut matrices: Vec<&mut Tensor> = output.iter_mut().collect();
        for l in &mut layers {
            matrices.extend([&mut l.wq, &mut l.wk, &mut l.wv, &mut l.wo, &mut l.w_gate, &mut l.w_up, &mut l.w_down]);
        }
        debug_assert!(matrices.iter().all(|t| rearranged_by_load(&t.name)));
        // Side by side on the current thread pool: the copies' fresh pages
        // cost more to fault in than to fill. A source that rearranged in
        // place leaves nothing to do, and no thread pool is touched.
        matrices.retain(|t| t.pending_repack().is_some());
        if !matrices.is_empty() {
            matrices.into_par_iter().try_for_each(|t| t.repack_for_matmul())?;
        }
        let output = output.unwrap_or_else(|| token_embd.clone());
        Ok(Self {
            token_embd,
            layers,
            output_norm: load_vector(src, "output_norm.weight", c.n_embd)?,
            output,
            rope_freq_factors: load_vector_opt(src, "rope_freqs.weight", c.rope_dim / 2)?,
        })
    }
}

/// What one decoded token costs in weights: the bytes it reads and the
/// matrix parameters it multiplies ([`Weights::per_token`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenCost {
    /// Bytes of weights one decoded token reads: every layer matrix and the
    /// output matrix whole (as stored, rearranged or not: the same size), the
    /// f32 vectors (norms, biases, rotary frequency factors), and one row of
    /// the token embedding (a lookup), unless the embedding is the output
    /// matrix too and so counted whole already. The KV cache is not counted.
    pub weight_bytes: u64,
    /// Parameters of the matrices multiplied per token: `rows * cols` of every
    /// layer matrix and of the output matrix (the embedding lookup is no product).
    pub matrix_params: u64,
}

impl TokenCost {
    /// Weights streamed per second at `tokens_per_s` decoded tokens a second,
    /// in GB/s (10^9 bytes).
    pub fn gb_per_s(&self, tokens_per_s: f64) -> f64 {
        self.weight_bytes as f64 * tokens_per_s / 1e9
    }

    /// Arithmetic rate at `tokens_per_s` tokens a second, in GOP/s (10^9
    /// operations): a multiply and an add per matrix parameter and token,
    /// `2 * matrix_params * tokens / seconds`. Attention's own work (query-key
    /// products and the weighted sum of values, which grow with the context) is
    /// left out, as is customary for such figures, as are norms and activations.
    pub fn gop_per_s(&self, tokens_per_s: f64) -> f64 {
        2.0 * self.matrix_params as f64 * tokens_per_s / 1e9
    }
}

impl Weights {
    /// What one decoded token reads of these weights and multiplies (see
    /// [`TokenCost`]): at the memory-bandwidth limit, decode speed is the
    /// machine's read bandwidth over `weight_bytes`.
    pub fn per_token(&self) -> TokenCost {
        let mut matrices: Vec<&Tensor> = vec![&self.output];
        let mut vectors: Vec<&[f32]> = vec![&self.output_norm];
        vectors.extend(self.rope_freq_factors.as_deref());
        for l in &self.layers {
            matrices.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
            vectors.extend([&l.attn_norm[..], &l.ffn_norm[..]]);
            vectors.extend([&l.bq, &l.bk, &l.bv].into_iter().flatten().map(|b| &b[..]));
        }
        // Tied: the output is the embedding table itself (a clone of the same bytes).
        let tied = std::ptr::eq(self.output.bytes(), self.token_embd.bytes());
        let lookup = if tied { 0 } else { self.token_embd.row_bytes };
        let matrix_bytes: usize = matrices.iter().map(|t| t.bytes().len()).sum();
        let vector_bytes: usize = vectors.iter().map(|v| std::mem::size_of_val(*v)).sum();
        TokenCost {
            weight_bytes: (matrix_bytes + vector_bytes + lookup) as u64,
            matrix_params: matrices.iter().map(|t| (t.rows * t.cols) as u64).sum(),
        }
    }
}

/// A loaded model ready to run, with its own worker threads.
pub struct Model {
    pub config: ModelConfig,
    pub weights: Weights,
    pool: rayon::ThreadPool,
}

/// The engine's worker threads (`threads == 0`: one per core).
fn worker_pool(threads: usize) -> Result<rayon::ThreadPool, EngineError> {
    let threads = if threads == 0 { default_threads() } else { threads };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("flexserve-worker-{i}"))
        .build()
        .map_err(|e| EngineError::Threads(e.to_string()))
}

impl Model {
    pub fn new(config: ModelConfig, weights: Weights, threads: usize) -> Result<Self, EngineError> {
        Self::with_pool(config, weights, worker_pool(threads)?)
    }

    fn with_pool(config: ModelConfig, weights: Weights, pool: rayon::ThreadPool) -> Result<Self, EngineError> {
        // Check every weight type has kernels before the first token.
        let mut all: Vec<&Tensor> = vec![&weights.output];
        for l in &weights.layers {
            all.extend([&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]);
        }
        for t in all {
            ops::dot_kernel(t)?;
        }
        ops::kernels(weights.token_embd.ty)?;
        Ok(Self { config, weights, pool })
    }

    /// Loads a model from a GGUF file's metadata and tensors.
    pub fn from_gguf(file: Arc<GgufFile>, threads: usize) -> Result<Self, EngineError> {
        Self::from_source(&GgufSource::from_file(file), threads)
    }

    /// Loads a model from any GGUF image (a mapped file or decrypted bytes).
    pub fn from_source(src: &GgufSource, threads: usize) -> Result<Self, EngineError> {
        let config = ModelConfig::from_metadata(&src.header().metadata)?;
        let pool = worker_pool(threads)?;
        let weights = pool.install(|| Weights::load(src, &config))?;
        Self::with_pool(config, weights, pool)
    }

    /// What a session's scratch buffers take for batches of up to `batch` tokens
    /// (at most the engine's largest batch) over up to `n_pos` positions,
    /// with logits for up to `logit_rows` positions of a batch.
    pub fn scratch_plan(&self, batch: usize, n_pos: usize, logit_rows: usize) -> ScratchPlan {
        let c = &self.config;
        let w = &self.weights;
        let n = batch.clamp(1, MAX_BATCH);
        let f = std::mem::size_of::<f32>();
        let (e, qd, kvd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        // Quantized activations: the largest of the rows each matrix reads.
        let acts_row = |t: &Tensor| -> usize {
            let ty = flexserve_quant::kernels(t.ty).map(|k| k.vec_dot_type).unwrap_or(t.ty);
            ty.row_size(t.cols as u64).unwrap_or(0) as usize
        };
        let mut acts = n * acts_row(&w.output);
        let mut staging = if logit_rows > 1 { w.output.rows * logit_rows.min(n) } else { 0 };
        for l in &w.layers {
            for t in [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down] {
                acts = acts.max(n * acts_row(t));
                if n > 1 {
                    staging = staging.max(t.rows * n);
                }
            }
        }
        let kv32 = if n >= F32_ATTENTION_MIN_BATCH { n_pos.max(n) * kvd * f } else { 0 };
        ScratchPlan {
            buffers: [
                n * e * f,
                n * e * f,
                n * qd * f,
                n * kvd * f,
                n * kvd * f,
                n * qd * f,
                n * ff * f,
                n * ff * f,
                acts,
                staging * f,
                kv32,
                kv32,
            ],
        }
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

/// Number of CPU cores available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Keys and values of every past position, per layer, stored as f16: layer
/// `l`'s keys, then its values, each `n_ctx * kv_dim` values, in one block of
/// memory.
pub struct KvCache {
    n_ctx: usize,
    kv_dim: usize,
    n_layer: usize,
    mem: Box<dyn MemoryBlock>,
}

impl KvCache {
    pub fn new(c: &ModelConfig, n_ctx: usize) -> Self {
        let values = 2 * c.n_layer * n_ctx * c.kv_dim();
        Self { n_ctx, kv_dim: c.kv_dim(), n_layer: c.n_layer, mem: Box::new(HeapBlock::new(values * 2)) }
    }

    /// Bytes one position takes across all layers (keys and values, f16).
    pub fn bytes_per_position(c: &ModelConfig) -> usize {
        2 * c.n_layer * c.kv_dim() * std::mem::size_of::<u16>()
    }

    /// A cache in memory the caller provides, holding as many positions as
    /// fit (at most `max_ctx`).
    pub fn in_memory(c: &ModelConfig, max_ctx: usize, mem: Box<dyn MemoryBlock>) -> Result<Self, EngineError> {
        Self::in_memory_shaped(c.n_layer, c.kv_dim(), max_ctx, mem)
    }

    fn in_memory_shaped(
        n_layer: usize,
        kv_dim: usize,
        max_ctx: usize,
        mem: Box<dyn MemoryBlock>,
    ) -> Result<Self, EngineError> {
        let bytes = mem.bytes();
        if bytes.as_ptr().align_offset(std::mem::align_of::<u16>()) != 0 {
            return Err(EngineError::Other("KV cache memory is not aligned for f16 values".into()));
        }
        let per_position = (2 * n_layer * kv_dim * std::mem::size_of::<u16>()).max(1);
        let n_ctx = (bytes.len() / per_position).min(max_ctx);
        if n_ctx == 0 {
            return Err(EngineError::Other(format!(
                "KV cache memory of {} bytes holds no position ({per_position} bytes each)",
                bytes.len()
            )));
        }
        Ok(Self { n_ctx, kv_dim, n_layer, mem })
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    fn per_buffer(&self) -> usize {
        self.n_ctx * self.kv_dim
    }

    fn values(&self) -> &[u16] {
        let bytes = self.mem.bytes();
        bytemuck::cast_slice(&bytes[..bytes.len() & !1])
    }

    fn values_mut(&mut self) -> &mut [u16] {
        let bytes = self.mem.bytes_mut();
        let even = bytes.len() & !1;
        bytemuck::cast_slice_mut(&mut bytes[..even])
    }

    /// Keys of `layer`, all `n_ctx` positions.
    fn k(&self, layer: usize) -> &[u16] {
        let per = self.per_buffer();
        &self.values()[2 * layer * per..(2 * layer + 1) * per]
    }

    /// Values of `layer`, all `n_ctx` positions.
    fn v(&self, layer: usize) -> &[u16] {
        let per = self.per_buffer();
        &self.values()[(2 * layer + 1) * per..(2 * layer + 2) * per]
    }

    fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
        let per = self.per_buffer();
        let at = pos * self.kv_dim;
        let values = self.values_mut();
        for (buffer, src) in [(2 * layer, k), (2 * layer + 1, v)] {
            let dst = &mut values[buffer * per + at..buffer * per + at + src.len()];
            for (d, s) in dst.iter_mut().zip(src) {
                *d = f16::from_f32(*s).to_bits();
            }
        }
    }

    /// The first `keep` positions moved into a cache in `mem` (which may
    /// hold more or fewer positions than this one, but at least `keep`).
    pub fn moved_to(self, keep: usize, max_ctx: usize, mem: Box<dyn MemoryBlock>) -> Result<KvCache, EngineError> {
        let mut to = KvCache::in_memory_shaped(self.n_layer, self.kv_dim, max_ctx, mem)?;
        if keep > self.n_ctx || keep > to.n_ctx {
            return Err(EngineError::Other(format!(
                "cannot move {keep} cached positions from a cache of {} into one of {}",
                self.n_ctx, to.n_ctx
            )));
        }
        let (from_per, to_per, n) = (self.per_buffer(), to.per_buffer(), keep * self.kv_dim);
        let src = self.values();
        let dst = to.values_mut();
        for buffer in 0..2 * self.n_layer {
            dst[buffer * to_per..buffer * to_per + n].copy_from_slice(&src[buffer * from_per..buffer * from_per + n]);
        }
        Ok(to)
    }
}

/// Which positions of a batch need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last token's (generation).
    Last,
    /// Every token's from this index of the batch on (perplexity).
    From(usize),
}

/// A session's KV cache and fill level, detached from the model.
pub struct SessionState {
    kv: KvCache,
    n_past: usize,
}

impl SessionState {
    /// Positions filled.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    /// Positions the cache holds.
    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// The same state with its cache moved into `mem` (to grow it, or to
    /// move it between memories), holding at most `max_ctx` positions.
    pub fn moved_to(self, max_ctx: usize, mem: Box<dyn MemoryBlock>) -> Result<SessionState, EngineError> {
        let n_past = self.n_past;
        Ok(SessionState { kv: self.kv.moved_to(n_past, max_ctx, mem)?, n_past })
    }
}

/// One conversation's state on a model: the KV cache and its fill level.
pub struct Session<'m> {
    model: &'m Model,
    kv: KvCache,
    n_past: usize,
    s: Scratch,
}

/// A session's activations: buffers sized for the current batch, in blocks
/// from the session's [`ScratchSource`].
struct Scratch {
    x: Buf<f32>,
    h: Buf<f32>,
    q: Buf<f32>,
    k: Buf<f32>,
    v: Buf<f32>,
    att: Buf<f32>,
    gate: Buf<f32>,
    up: Buf<f32>,
    acts: QuantizedActs,
    mm: Buf<f32>,
    angles: Vec<Vec<(f32, f32)>>,
    kv32: (Buf<f32>, Buf<f32>),
}

impl Scratch {
    fn new(source: Arc<dyn ScratchSource>) -> Self {
        let buf = || Buf::new(source.clone());
        Scratch {
            x: buf(),
            h: buf(),
            q: buf(),
            k: buf(),
            v: buf(),
            att: buf(),
            gate: buf(),
            up: buf(),
            acts: QuantizedActs::new(source.clone()),
            mm: buf(),
            angles: Vec::new(),
            kv32: (buf(), buf()),
        }
    }

    /// Sizes the buffers for `tokens` and embeds them; row `t` is at
    /// position `position(t)` (its rotary angles, used by every layer).
    fn begin(&mut self, m: &Model, tokens: &[u32], position: impl Fn(usize) -> usize) -> Result<(), EngineError> {
        let (c, w) = (&m.config, &m.weights);
        let n = tokens.len();
        let (e, qd, kvd) = (c.n_embd, c.q_dim(), c.kv_dim());
        self.x.resize(n * e, 0.0)?;
        self.h.resize(n * e, 0.0)?;
        self.q.resize(n * qd, 0.0)?;
        self.k.resize(n * kvd, 0.0)?;
        self.v.resize(n * kvd, 0.0)?;
        self.att.resize(n * qd, 0.0)?;
        self.gate.resize(n * c.n_ff, 0.0)?;
        self.up.resize(n * c.n_ff, 0.0)?;
        let embd = ops::kernels(w.token_embd.ty)?;
        for (t, &tok) in tokens.iter().enumerate() {
            (embd.dequantize)(w.token_embd.row(tok as usize), &mut self.x[t * e..(t + 1) * e]);
        }
        let pos_scale = match c.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        self.angles.resize_with(n, Vec::new);
        for (t, a) in self.angles.iter_mut().enumerate() {
            ops::rope_angles(position(t), c.rope_dim, c.rope_base, pos_scale, w.rope_freq_factors.as_deref(), a);
        }
        Ok(())
    }

    /// A layer's queries, keys and values of every row, rotated to the rows' positions.
    fn attention_inputs(&mut self, c: &ModelConfig, layer: &Layer) -> Result<(), EngineError> {
        let (e, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
        ops::rms_norm(&self.x, &layer.attn_norm, c.rms_eps, &mut self.h);
        quantize_for(&mut self.acts, &self.h, e, &layer.wq)?;
        ops::matmul(&layer.wq, &self.acts, &mut self.q, &mut self.mm)?;
        reuse_for(&mut self.acts, &self.h, e, &layer.wk)?;
        ops::matmul(&layer.wk, &self.acts, &mut self.k, &mut self.mm)?;
        reuse_for(&mut self.acts, &self.h, e, &layer.wv)?;
        ops::matmul(&layer.wv, &self.acts, &mut self.v, &mut self.mm)?;
        add_bias(&mut self.q, layer.bq.as_deref());
        add_bias(&mut self.k, layer.bk.as_deref());
        add_bias(&mut self.v, layer.bv.as_deref());
        let neox = c.arch == Arch::Qwen2;
        for (t, a) in self.angles.iter().enumerate() {
            for head in self.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..c.rope_dim], a, neox);
            }
            for head in self.k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..c.rope_dim], a, neox);
            }
        }
        Ok(())
    }

    /// The rest of a layer once `att` holds its attention: output
    /// projection, residual, feed-forward, residual.
    fn finish_layer(&mut self, c: &ModelConfig, layer: &Layer) -> Result<(), EngineError> {
        let (e, qd) = (c.n_embd, c.q_dim());
        quantize_for(&mut self.acts, &self.att, qd, &layer.wo)?;
        ops::matmul(&layer.wo, &self.acts, &mut self.h, &mut self.mm)?;
        add_into(&mut self.x, &self.h);
        ops::rms_norm(&self.x, &layer.ffn_norm, c.rms_eps, &mut self.h);
        quantize_for(&mut self.acts, &self.h, e, &layer.w_gate)?;
        ops::matmul(&layer.w_gate, &self.acts, &mut self.gate, &mut self.mm)?;
        reuse_for(&mut self.acts, &self.h, e, &layer.w_up)?;
        ops::matmul(&layer.w_up, &self.acts, &mut self.up, &mut self.mm)?;
        let silu_mul = flexserve_quant::activations().silu_mul;
        self.gate.par_chunks_mut(c.n_ff).zip(self.up.par_chunks(c.n_ff)).for_each(|(g, u)| silu_mul(g, u));
        quantize_for(&mut self.acts, &self.gate, c.n_ff, &layer.w_down)?;
        ops::matmul(&layer.w_down, &self.acts, &mut self.h, &mut self.mm)?;
        add_into(&mut self.x, &self.h);
        Ok(())
    }

    /// Next-token logits of the rows from `from` on.
    fn logits(&mut self, m: &Model, from: usize) -> Result<Vec<f32>, EngineError> {
        let (c, w) = (&m.config, &m.weights);
        let e = c.n_embd;
        let rows = self.x.len() / e - from;
        let mut normed = vec![0f32; rows * e];
        ops::rms_norm(&self.x[from * e..], &w.output_norm, c.rms_eps, &mut normed);
        quantize_for(&mut self.acts, &normed, e, &w.output)?;
        let mut logits = vec![0f32; rows * c.n_vocab];
        ops::matmul(&w.output, &self.acts, &mut logits, &mut self.mm)?;
        Ok(logits)
    }
}

/// Bytes of each scratch buffer a batch needs (see [`Model::scratch_plan`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScratchPlan {
    /// Per buffer: x, h, q, k, v, att, gate, up, quantized activations,
    /// matmul staging, f32 keys, f32 values.
    pub buffers: [usize; 12],
}

impl ScratchPlan {
    pub fn total(&self) -> usize {
        self.buffers.iter().sum()
    }
}

/// Batches of at least this many tokens take the f32 attention path, as
/// llama.cpp switches to its tiled f32 kernel at this size.
const F32_ATTENTION_MIN_BATCH: usize = 64;

/// Queries per task of the f32 attention: enough rows for the tile kernel,
/// small enough that a 128-token prompt still makes eight tasks.
const ATTENTION_QUERY_BLOCK: usize = 16;

/// Largest batch evaluated at once; longer inputs are split.
const MAX_BATCH: usize = 512;

impl<'m> Session<'m> {
    /// A session with room for `n_ctx` positions (0 = the model's training context).
    pub fn new(model: &'m Model, n_ctx: usize) -> Self {
        let n_ctx = if n_ctx == 0 { model.config.n_ctx_train } else { n_ctx };
        Self { model, kv: KvCache::new(&model.config, n_ctx), n_past: 0, s: Scratch::new(heap_scratch()) }
    }

    /// A session whose KV cache lives in memory the caller provides.
    pub fn with_cache(model: &'m Model, kv: KvCache) -> Result<Self, EngineError> {
        Self::resume(model, SessionState { kv, n_past: 0 })
    }

    /// Resumes a session from a state saved by [`Session::into_state`] (a
    /// conversation kept between requests), checking that it fits this model.
    pub fn resume(model: &'m Model, state: SessionState) -> Result<Self, EngineError> {
        let c = &model.config;
        let kv = state.kv;
        if kv.kv_dim != c.kv_dim() || kv.n_layer != c.n_layer || state.n_past > kv.n_ctx {
            return Err(EngineError::Weights(format!(
                "saved session (kv dim {}, {} layers) does not fit the model (kv dim {}, {} layers)",
                kv.kv_dim,
                kv.n_layer,
                c.kv_dim(),
                c.n_layer
            )));
        }
        Ok(Self { model, kv, n_past: state.n_past, s: Scratch::new(heap_scratch()) })
    }

    /// Takes the activations' memory from `source` from now on (buffers
    /// already taken are dropped).
    pub fn set_scratch_source(&mut self, source: Arc<dyn ScratchSource>) {
        self.s = Scratch::new(source);
    }

    /// Takes every scratch buffer's memory for `plan` at once, so that no
    /// block is taken (or outgrown) while the batches run.
    pub fn reserve_scratch(&mut self, plan: &ScratchPlan) -> Result<(), EngineError> {
        let s = &mut self.s;
        let [x, h, q, k, v, att, gate, up, acts, mm, k32, v32] = plan.buffers;
        let f = std::mem::size_of::<f32>();
        for (buf, bytes) in [
            (&mut s.x, x),
            (&mut s.h, h),
            (&mut s.q, q),
            (&mut s.k, k),
            (&mut s.v, v),
            (&mut s.att, att),
            (&mut s.gate, gate),
            (&mut s.up, up),
            (&mut s.mm, mm),
            (&mut s.kv32.0, k32),
            (&mut s.kv32.1, v32),
        ] {
            buf.reserve(bytes / f)?;
        }
        s.acts.data.reserve(acts)
    }

    /// The session's cache and fill level, without the borrow of the model.
    pub fn into_state(self) -> SessionState {
        SessionState { kv: self.kv, n_past: self.n_past }
    }

    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Positions already in the cache.
    pub fn n_past(&self) -> usize {
        self.n_past
    }

    pub fn n_ctx(&self) -> usize {
        self.kv.n_ctx()
    }

    /// Forgets positions from `n` on (the cache keeps the first `n`).
    pub fn truncate(&mut self, n: usize) {
        self.n_past = self.n_past.min(n);
    }

    /// Runs `tokens` through the model after the cached positions and returns
    /// logits (`n_vocab` per requested position, in order).
    pub fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, EngineError> {
        self.eval_with(tokens, logits, &mut || ControlFlow::Continue(()))
    }

    /// [`Session::eval`], calling `between_layers` after every layer of every
    /// batch (on a worker thread): a long prefill can serve other work, such
    /// as a memory recall, at bounded intervals. When it answers `Break`
    /// the evaluation stops there with [`EngineError::Cancelled`] (the
    /// positions of the unfinished batch are not kept).
    pub fn eval_with(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        between_layers: &mut (dyn FnMut() -> ControlFlow<()> + Send),
    ) -> Result<Vec<f32>, EngineError> {
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        let needed = self.n_past + tokens.len();
        if needed > self.kv.n_ctx() {
            return Err(EngineError::ContextFull { n_ctx: self.kv.n_ctx(), needed });
        }
        let n_vocab = self.model.config.n_vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EngineError::BadToken { id: bad, n_vocab });
        }
        let mut out = Vec::new();
        let model = self.model;
        for (b, batch) in tokens.chunks(MAX_BATCH).enumerate() {
            let start = b * MAX_BATCH;
            let want = match logits {
                Logits::Last if start + batch.len() == tokens.len() => Some(batch.len() - 1),
                Logits::Last => None,
                Logits::From(f) if f < start + batch.len() => Some(f.saturating_sub(start)),
                Logits::From(_) => None,
            };
            let l = model.pool.install(|| self.eval_batch(batch, want, &mut *between_layers))?;
            out.extend_from_slice(&l);
        }
        Ok(out)
    }

    fn eval_batch(
        &mut self,
        tokens: &[u32],
        logits_from: Option<usize>,
        between_layers: &mut (dyn FnMut() -> ControlFlow<()> + Send),
    ) -> Result<Vec<f32>, EngineError> {
        let m = self.model;
        let c = &m.config;
        let n = tokens.len();
        let pos0 = self.n_past;
        let s = &mut self.s;
        let kvd = c.kv_dim();
        s.begin(m, tokens, |t| pos0 + t)?;
        for (li, layer) in m.weights.layers.iter().enumerate() {
            s.attention_inputs(c, layer)?;
            for t in 0..n {
                self.kv.store(li, pos0 + t, &s.k[t * kvd..(t + 1) * kvd], &s.v[t * kvd..(t + 1) * kvd]);
            }
            if n >= F32_ATTENTION_MIN_BATCH {
                attention_f32(c, &self.kv, li, pos0, &s.q, &mut s.att, &mut s.kv32)?;
            } else {
                attention(c, &self.kv, li, pos0, &s.q, &mut s.att);
            }
            s.finish_layer(c, layer)?;
            if between_layers().is_break() {
                return Err(EngineError::Cancelled);
            }
        }
        self.n_past += n;
        match logits_from {
            Some(from) => s.logits(m, from),
            None => Ok(Vec::new()),
        }
    }
}

/// Quantizes `x` (rows of `cols`) into the activation format of `w`.
fn quantize_for(acts: &mut QuantizedActs, x: &[f32], cols: usize, w: &Tensor) -> Result<(), EngineError> {
    let (_, ty) = ops::dot_kernel(w)?;
    acts.quantize(x, cols, ty)
}

/// For a weight that reads the same `x` as the previous one (k/v after q, up
/// after gate): quantizes again only if its activation format differs.
fn reuse_for(acts: &mut QuantizedActs, x: &[f32], cols: usize, w: &Tensor) -> Result<(), EngineError> {
    let (_, ty) = ops::dot_kernel(w)?;
    if acts.ty != ty {
        acts.quantize(x, cols, ty)?;
    }
    Ok(())
}

fn add_bias(x: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in x.chunks_exact_mut(b.len()) {
            for (v, bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Causal grouped-query attention of the batch's queries over the cache.
///
/// One pass per query with an online softmax, and the weighted sum of values
/// kept at f16 precision after every step: this is how llama.cpp's CPU flash
/// attention (its default) computes, and matching its rounding keeps greedy
/// decoding on the same tokens where two candidates are nearly tied.
fn attention(c: &ModelConfig, kv: &KvCache, layer: usize, pos0: usize, q: &[f32], out: &mut [f32]) {
    let (kc, vc) = (kv.k(layer), kv.v(layer));
    let n_head = c.n_head;
    out.par_chunks_mut(c.head_dim).enumerate().for_each(|(i, o)| {
        let t = i / n_head;
        attend_head(c, kc, vc, i % n_head, pos0 + t, &q[i * c.head_dim..(i + 1) * c.head_dim], o);
    });
}

/// One head's attention output `o` for the query `q` at position `last`,
/// over positions `0..=last` of one layer's cache (`kc`, `vc`): online
/// softmax, f16 accumulation, as llama.cpp's CPU flash attention does.
fn attend_head(c: &ModelConfig, kc: &[u16], vc: &[u16], head: usize, last: usize, q: &[f32], o: &mut [f32]) {
    let hd = c.head_dim;
    let kvd = c.kv_dim();
    let kvh = head / (c.n_head / c.n_head_kv);
    let scale = 1.0 / (hd as f32).sqrt();
    let to_f16 = ops::kernels(flexserve_gguf::GgmlType::F16).expect("F16 kernels are always present").quantize;
    let acc = flexserve_quant::f16_acc();
    thread_local! {
        // The query in f16 per worker thread, kept between calls (as `SCORES`
        // in `attention_f32`): one allocation per task would churn the heap
        // for every layer of every token.
        static QUERY_F16: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    QUERY_F16.with_borrow_mut(|q16| {
        q16.resize(hd * 2, 0);
        // Queries meet f16 keys in f16, as the cache stores them.
        to_f16(q, q16);
        let mut max = f32::NEG_INFINITY;
        let mut sum = 0f32;
        o.fill(0.0);
        for j in 0..=last {
            let at = j * kvd + kvh * hd;
            let krow: &[u8] = bytemuck::cast_slice(&kc[at..at + hd]);
            let s = (acc.dot)(hd, krow, q16) * scale;
            let weight = if s > max {
                // New maximum: rescale what was accumulated so far.
                let rescale = (max - s).exp();
                max = s;
                (acc.scale)(o, rescale);
                sum *= rescale;
                1.0
            } else {
                (s - max).exp()
            };
            (acc.mad)(o, bytemuck::cast_slice(&vc[at..at + hd]), weight);
            sum += weight;
        }
        let inv = 1.0 / sum;
        for v in o.iter_mut() {
            *v *= inv;
        }
    })
}

/// Causal grouped-query attention in f32 for large batches (prompt
/// processing), as two matrix products per head and block of queries.
///
/// Keys and values are widened from the f16 cache once per layer into one
/// block per KV head: keys position-major, values transposed (one row of
/// positions per dimension), so that both products are dot products of rows
/// and run on the f32 tile kernel: the block's scores against every key up
/// to its last query's position, then each query's exact softmax over its
/// own positions (later ones zeroed), then the probabilities against the
/// value rows, written straight into the output.
fn attention_f32(
    c: &ModelConfig,
    kv: &KvCache,
    layer: usize,
    pos0: usize,
    q: &[f32],
    out: &mut [f32],
    kv32: &mut (Buf<f32>, Buf<f32>),
) -> Result<(), EngineError> {
    use half::slice::HalfFloatSliceExt;
    let hd = c.head_dim;
    let n_head = c.n_head;
    let group = n_head / c.n_head_kv;
    let (qd, kvd) = (c.q_dim(), c.kv_dim());
    let n_pos = pos0 + out.len() / qd;
    let scale = 1.0 / (hd as f32).sqrt();
    let (k32, vt32) = kv32;
    k32.resize(n_pos * kvd, 0.0)?;
    vt32.resize(n_pos * kvd, 0.0)?;
    // Keys of KV head `h`: row `j` at `(h * n_pos + j) * hd`.
    let keys: &[f16] = bytemuck::cast_slice(&kv.k(layer)[..n_pos * kvd]);
    k32.par_chunks_mut(n_pos * hd).enumerate().for_each(|(h, block)| {
        for (j, row) in block.chunks_exact_mut(hd).enumerate() {
            keys[j * kvd + h * hd..j * kvd + (h + 1) * hd].convert_to_f32_slice(row);
        }
    });
    // Values of KV head `h`, transposed: dimension `d` of position `j` at `(h * hd + d) * n_pos + j`.
    let values: &[f16] = bytemuck::cast_slice(&kv.v(layer)[..n_pos * kvd]);
    vt32.par_chunks_mut(n_pos * hd).enumerate().for_each(|(h, block)| {
        for j in 0..n_pos {
            for (d, v) in values[j * kvd + h * hd..j * kvd + (h + 1) * hd].iter().enumerate() {
                block[d * n_pos + j] = v.to_f32();
            }
        }
    });
    let (k32, vt32) = (&*k32, &*vt32);
    let f32_bytes = std::mem::size_of::<f32>();
    let tile = flexserve_quant::tile_kernel(flexserve_gguf::GgmlType::F32).expect("F32 has a tile kernel");
    let softmax_scaled = flexserve_quant::activations().softmax_scaled;
    thread_local! {
        // Scores per worker thread, kept between calls: allocating them per
        // task would churn the heap for every block of every layer.
        static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // One task per block of queries (all heads): its output rows are contiguous.
    out.par_chunks_mut(ATTENTION_QUERY_BLOCK * qd).enumerate().for_each(|(b, o)| {
        SCORES.with_borrow_mut(|scores| {
            let t0 = b * ATTENTION_QUERY_BLOCK;
            let n_q = o.len() / qd;
            // The block's last query sees this many positions; earlier ones fewer.
            let n_keys = pos0 + t0 + n_q;
            scores.resize(n_q * n_keys, 0.0);
            for h in 0..n_head {
                let kvh = h / group;
                let queries: &[u8] = bytemuck::cast_slice(&q[t0 * qd + h * hd..]);
                let keys: &[u8] = bytemuck::cast_slice(&k32[kvh * n_pos * hd..][..n_keys * hd]);
                let s = &mut scores[..n_q * n_keys];
                // Keys as the tile's rows and queries as its tokens: one row of scores per query.
                tile(hd, keys, hd * f32_bytes, n_keys, queries, qd * f32_bytes, n_q, s, n_keys);
                for (i, row) in s.chunks_exact_mut(n_keys).enumerate() {
                    let seen = pos0 + t0 + i + 1;
                    softmax_scaled(&mut row[..seen], scale);
                    row[seen..].fill(0.0);
                }
                let probs: &[u8] = bytemuck::cast_slice(s);
                let values_t: &[u8] = bytemuck::cast_slice(&vt32[kvh * hd * n_pos..][..hd * n_pos]);
                tile(n_keys, values_t, n_pos * f32_bytes, hd, probs, n_keys * f32_bytes, n_q, &mut o[h * hd..], qd);
            }
        })
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{rearranged_by_load, Model, TokenCost};
    use crate::config::Arch;
    use crate::synth::{synth_model, SynthSpec};
    use crate::weights::GgufSource;
    use flexserve_gguf::GgmlType;

    fn load(spec: &SynthSpec) -> Model {
        let mut image = Vec::new();
        synth_model(spec, None).unwrap().write_to(&mut image).unwrap();
        Model::from_source(&GgufSource::from_bytes(image).unwrap(), 1).unwrap()
    }

    /// Bytes of `rows` rows of `cols` elements in blocks of `block` elements
    /// taking `block_bytes` bytes each.
    fn matrix(rows: u64, cols: u64, block: u64, block_bytes: u64) -> u64 {
        rows * cols / block * block_bytes
    }

    #[test]
    fn per_token_cost_of_a_tied_model_counts_the_embedding_once() {
        // Tiny llama: 2 layers, hidden 256, 4 heads of 64 (2 KV heads: 128),
        // FFN 512, 300 tokens; Q4_0 layer matrices (18 bytes per 32), Q8_0
        // embedding (34 bytes per 32) that is also the output matrix.
        let spec = SynthSpec::tiny(Arch::Llama, GgmlType::Q4_0);
        let model = load(&spec);
        let (layers, e, q, kv, ff, vocab) = (2u64, 256u64, 256u64, 128u64, 512u64, 300u64);
        let q4 = |rows, cols| matrix(rows, cols, 32, 18);
        // wq, wk, wv, wo, gate, up, down, each as rows x cols.
        let layer_params = q * e + kv * e + kv * e + e * q + ff * e + ff * e + e * ff;
        let layer_bytes = q4(q, e) + q4(kv, e) + q4(kv, e) + q4(e, q) + q4(ff, e) + q4(ff, e) + q4(e, ff);
        let norms = (2 * layers + 1) * e * 4;
        let output = matrix(vocab, e, 32, 34);
        let want = TokenCost {
            weight_bytes: layers * layer_bytes + norms + output,
            matrix_params: layers * layer_params + vocab * e,
        };
        assert_eq!(model.weights.per_token(), want);
        assert_eq!(want.weight_bytes, 2 * 331_776 + 5_120 + 81_600);
        assert_eq!(want.matrix_params, 2 * 589_824 + 76_800);
        // 1 GB/s at this many tokens a second; 2 ops per parameter.
        let tps = 1e9 / want.weight_bytes as f64;
        assert!((want.gb_per_s(tps) - 1.0).abs() < 1e-12);
        assert!((want.gop_per_s(100.0) - 2.0 * want.matrix_params as f64 * 100.0 / 1e9).abs() < 1e-12);
    }

    #[test]
    fn per_token_cost_of_an_untied_model_reads_one_embedding_row() {
        // Tiny qwen2 (biases on q, k, v), output matrix of its own (Q6_K: 210
        // bytes per 256), rotary frequency factors (32 per head of 64).
        let mut spec = SynthSpec::tiny(Arch::Qwen2, GgmlType::Q4_0);
        spec.tied_output = false;
        spec.rope_freq_factors = true;
        let model = load(&spec);
        let (layers, e, q, kv, ff, vocab) = (2u64, 256u64, 256u64, 128u64, 512u64, 300u64);
        let q4 = |rows, cols| matrix(rows, cols, 32, 18);
        let layer_params = q * e + kv * e + kv * e + e * q + ff * e + ff * e + e * ff;
        let layer_bytes = q4(q, e) + q4(kv, e) + q4(kv, e) + q4(e, q) + q4(ff, e) + q4(ff, e) + q4(e, ff);
        let vectors = ((2 * layers + 1) * e + layers * (q + 2 * kv) + 32) * 4;
        let output = matrix(vocab, e, 256, 210);
        let embedding_row = matrix(1, e, 32, 34);
        let want = TokenCost {
            weight_bytes: layers * layer_bytes + vectors + output + embedding_row,
            matrix_params: layers * layer_params + vocab * e,
        };
        assert_eq!(model.weights.per_token(), want);
    }

    #[test]
    fn the_matrices_rearranged_at_load() {
        for yes in ["blk.0.attn_q.weight", "blk.17.ffn_down.weight", "blk.3.attn_output.weight", "output.weight"] {
            assert!(rearranged_by_load(yes), "{yes}");
        }
        for no in ["token_embd.weight", "blk.0.attn_norm.weight", "blk.0.attn_q.bias", "blk.x.attn_q.weight", "blk."] {
            assert!(!rearranged_by_load(no), "{no}");
        }
    }
}
