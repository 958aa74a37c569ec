//! The forward pass: a batch of tokens through every layer, its keys and
//! values into the session's cache, and logits out.

use half::f16;
use rayon::prelude::*;

use super::scratch::Scratch;
use super::{KvCache, Layer, Logits, Model, Session};
use crate::config::{FfnActivation, ModelConfig, RopeScaling};
use crate::memory::Buf;
use crate::ops;
use crate::EngineError;

/// Batches of at least this many tokens take the f32 attention path, as
/// llama.cpp switches to its tiled f32 kernel at this size.
pub(super) const F32_ATTENTION_MIN_BATCH: usize = 64;

/// Queries per task of the f32 attention: enough rows for the tile kernel,
/// small enough that a 128-token prompt still makes eight tasks.
const ATTENTION_QUERY_BLOCK: usize = 16;

/// Called before each layer of a forward pass with the layer's index (see
/// [`Session::eval_with`]).
pub type LayerHook<'a> = dyn FnMut(usize) -> Result<(), EngineError> + Send + 'a;

/// Largest batch evaluated at once; longer inputs are split.
pub(super) const MAX_BATCH: usize = 512;

impl<'m> Session<'m> {
    /// Runs `tokens` through the model after the cached positions and returns
    /// logits (`n_vocab` per requested position, in order).
    pub fn eval(&mut self, tokens: &[u32], logits: Logits) -> Result<Vec<f32>, EngineError> {
        self.eval_with(tokens, logits, &mut |_| Ok(()))
    }

    /// [`Session::eval`], calling `before_layer(i)` before layer `i` of every
    /// batch (on a worker thread): a long prefill can serve other work, such
    /// as a memory recall, at bounded intervals, and a model whose later
    /// layers are still loading gets layer `i` set there
    /// ([`super::Weights::set_layer`]) before it runs. An error from the hook
    /// ([`EngineError::Cancelled`] to stop) ends the evaluation there (the
    /// positions of the unfinished batch are not kept).
    pub fn eval_with(
        &mut self,
        tokens: &[u32],
        logits: Logits,
        before_layer: &mut LayerHook<'_>,
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
            let l = model.pool.install(|| self.eval_batch(batch, want, &mut *before_layer))?;
            out.extend_from_slice(&l);
        }
        Ok(out)
    }

    fn eval_batch(
        &mut self,
        tokens: &[u32],
        logits_from: Option<usize>,
        before_layer: &mut LayerHook<'_>,
    ) -> Result<Vec<f32>, EngineError> {
        let m = self.model;
        let c = &m.config;
        let n = tokens.len();
        let pos0 = self.n_past;
        let s = &mut self.s;
        let kvd = c.kv_dim();
        s.begin(m, tokens, |t| pos0 + t)?;
        for li in 0..c.n_layer {
            before_layer(li)?;
            let layer = m.weights.layer(li)?;
            s.attention_inputs(c, li, layer)?;
            for t in 0..n {
                self.kv.store(li, pos0 + t, &s.k[t * kvd..(t + 1) * kvd], &s.v[t * kvd..(t + 1) * kvd]);
            }
            if n >= F32_ATTENTION_MIN_BATCH {
                attention_f32(c, &self.kv, li, pos0, &s.q, &mut s.att, &mut s.kv32)?;
            } else {
                attention(c, &self.kv, li, pos0, &s.q, &mut s.att);
            }
            if li + 1 < c.n_layer {
                s.finish_layer(c, layer)?;
                continue;
            }
            // The last layer's feed-forward block only for the rows whose
            // logits are wanted (none: the cache is complete without it), as
            // llama.cpp computes it: its products then see those rows as
            // their batch, which decides their arithmetic (see `ops::matmul`).
            s.finish_attention(c, layer)?;
            if let Some(from) = logits_from {
                s.keep_rows(c, from)?;
                s.feed_forward(c, layer)?;
            }
        }
        self.n_past += n;
        match logits_from {
            Some(_) => s.logits(m, 0),
            None => Ok(Vec::new()),
        }
    }
}

impl Scratch {
    /// Sizes the buffers for `tokens` and embeds them; row `t` is at
    /// position `position(t)` (its rotary angles, used by every layer).
    pub(super) fn begin(
        &mut self,
        m: &Model,
        tokens: &[u32],
        position: impl Fn(usize) -> usize,
    ) -> Result<(), EngineError> {
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
        // A sequence's tokens, unless the caller says otherwise (batched decode).
        self.acts.independent_rows = false;
        let embd = ops::kernels(w.token_embd.ty)?;
        for (t, &tok) in tokens.iter().enumerate() {
            let x = &mut self.x[t * e..(t + 1) * e];
            (embd.dequantize)(w.token_embd.row(tok as usize), x);
            if c.embd_scale != 1.0 {
                x.iter_mut().for_each(|v| *v *= c.embd_scale);
            }
        }
        let pos_scale = match c.rope_scaling {
            RopeScaling::None => 1.0,
            RopeScaling::Linear { factor } => 1.0 / factor,
        };
        self.angles.resize_with(n, Vec::new);
        for (t, a) in self.angles.iter_mut().enumerate() {
            ops::rope_angles(position(t), c.rope_dim, c.rope_base, pos_scale, w.rope_freq_factors.as_deref(), a);
        }
        // Local (sliding-window) layers rotate with a base of their own, unscaled.
        let local = (0..c.n_layer).any(|l| c.is_local(l));
        self.angles_local.resize_with(if local { n } else { 0 }, Vec::new);
        for (t, a) in self.angles_local.iter_mut().enumerate() {
            ops::rope_angles(position(t), c.rope_dim, c.rope_base_local, 1.0, w.rope_freq_factors.as_deref(), a);
        }
        Ok(())
    }

    /// Layer `li`'s queries, keys and values of every row, rotated to the rows' positions.
    pub(super) fn attention_inputs(&mut self, c: &ModelConfig, li: usize, layer: &Layer) -> Result<(), EngineError> {
        let (e, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
        ops::rms_norm(&self.x, &layer.attn_norm, c.rms_eps, &mut self.h);
        ops::quantize_for(&mut self.acts, &self.h, e, &layer.wq)?;
        ops::matmul(&layer.wq, &self.acts, &mut self.q, &mut self.mm)?;
        ops::reuse_for(&mut self.acts, &self.h, e, &layer.wk)?;
        ops::matmul(&layer.wk, &self.acts, &mut self.k, &mut self.mm)?;
        ops::reuse_for(&mut self.acts, &self.h, e, &layer.wv)?;
        ops::matmul(&layer.wv, &self.acts, &mut self.v, &mut self.mm)?;
        add_bias(&mut self.q, layer.bq.as_deref());
        add_bias(&mut self.k, layer.bk.as_deref());
        add_bias(&mut self.v, layer.bv.as_deref());
        // Each query and key head normalized on its own (gemma3).
        if let Some(norm) = &layer.attn_q_norm {
            ops::rms_norm_in_place(&mut self.q, norm, c.rms_eps);
        }
        if let Some(norm) = &layer.attn_k_norm {
            ops::rms_norm_in_place(&mut self.k, norm, c.rms_eps);
        }
        let neox = c.arch.rope_neox();
        let angles = if c.is_local(li) { &self.angles_local } else { &self.angles };
        for (t, a) in angles.iter().enumerate() {
            for head in self.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..c.rope_dim], a, neox);
            }
            for head in self.k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..c.rope_dim], a, neox);
            }
        }
        if let Some(scale) = c.query_scale {
            self.q.iter_mut().for_each(|v| *v *= scale);
        }
        Ok(())
    }

    /// The rest of a layer once `att` holds its attention: output
    /// projection, (norm,) residual, feed-forward, (norm,) residual.
    pub(super) fn finish_layer(&mut self, c: &ModelConfig, layer: &Layer) -> Result<(), EngineError> {
        self.finish_attention(c, layer)?;
        self.feed_forward(c, layer)
    }

    /// The attention's output projection, (norm,) and residual.
    pub(super) fn finish_attention(&mut self, c: &ModelConfig, layer: &Layer) -> Result<(), EngineError> {
        ops::quantize_for(&mut self.acts, &self.att, c.q_dim(), &layer.wo)?;
        ops::matmul(&layer.wo, &self.acts, &mut self.h, &mut self.mm)?;
        if let Some(norm) = &layer.post_attn_norm {
            ops::rms_norm_in_place(&mut self.h, norm, c.rms_eps);
        }
        ops::add_into(&mut self.x, &self.h);
        Ok(())
    }

    /// Keeps the rows from `from` on (of the residual stream `x`), moved to
    /// the front, and sizes the feed-forward buffers for them.
    pub(super) fn keep_rows(&mut self, c: &ModelConfig, from: usize) -> Result<(), EngineError> {
        let e = c.n_embd;
        let rows = self.x.len() / e - from;
        self.x.copy_within(from * e.., 0);
        self.x.resize(rows * e, 0.0)?;
        self.h.resize(rows * e, 0.0)?;
        self.gate.resize(rows * c.n_ff, 0.0)?;
        self.up.resize(rows * c.n_ff, 0.0)
    }

    /// The feed-forward block, (norm,) and residual.
    pub(super) fn feed_forward(&mut self, c: &ModelConfig, layer: &Layer) -> Result<(), EngineError> {
        let e = c.n_embd;
        ops::rms_norm(&self.x, &layer.ffn_norm, c.rms_eps, &mut self.h);
        ops::quantize_for(&mut self.acts, &self.h, e, &layer.w_gate)?;
        ops::matmul(&layer.w_gate, &self.acts, &mut self.gate, &mut self.mm)?;
        ops::reuse_for(&mut self.acts, &self.h, e, &layer.w_up)?;
        ops::matmul(&layer.w_up, &self.acts, &mut self.up, &mut self.mm)?;
        let act_mul = match c.ffn_activation {
            FfnActivation::Silu => flexserve_quant::activations().silu_mul,
            FfnActivation::Gelu => ops::gelu_mul,
        };
        self.gate.par_chunks_mut(c.n_ff).zip(self.up.par_chunks(c.n_ff)).for_each(|(g, u)| act_mul(g, u));
        ops::quantize_for(&mut self.acts, &self.gate, c.n_ff, &layer.w_down)?;
        ops::matmul(&layer.w_down, &self.acts, &mut self.h, &mut self.mm)?;
        if let Some(norm) = &layer.post_ffn_norm {
            ops::rms_norm_in_place(&mut self.h, norm, c.rms_eps);
        }
        ops::add_into(&mut self.x, &self.h);
        Ok(())
    }

    /// Next-token logits of the rows from `from` on.
    pub(super) fn logits(&mut self, m: &Model, from: usize) -> Result<Vec<f32>, EngineError> {
        let (c, w) = (&m.config, &m.weights);
        let e = c.n_embd;
        let rows = self.x.len() / e - from;
        let mut normed = vec![0f32; rows * e];
        ops::rms_norm(&self.x[from * e..], &w.output_norm, c.rms_eps, &mut normed);
        ops::quantize_for(&mut self.acts, &normed, e, &w.output)?;
        let mut logits = vec![0f32; rows * c.n_vocab];
        ops::matmul(&w.output, &self.acts, &mut logits, &mut self.mm)?;
        if let Some(cap) = c.final_logit_softcap {
            ops::softcap(&mut logits, cap);
        }
        Ok(logits)
    }
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
        let pos = pos0 + i / n_head;
        let seen = c.first_visible(layer, pos)..=pos;
        attend_head(c, kc, vc, i % n_head, seen, &q[i * c.head_dim..(i + 1) * c.head_dim], o);
    });
}

thread_local! {
    // Per worker thread, kept between calls: one allocation per task would
    // churn the heap for every layer of every token. The query in f16 (for
    // `attend_head`) and the scores (for `attention_f32`).
    static QUERY_F16: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    static SCORES: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Zeroes the calling thread's attention scratch (queries, scores: derived
/// from the prompt) over its whole capacity, and its kernels' scratch.
pub(crate) fn scrub_thread_scratch() {
    QUERY_F16.with_borrow_mut(|q| {
        q.resize(q.capacity(), 0);
        zeroize::Zeroize::zeroize(q.as_mut_slice());
    });
    SCORES.with_borrow_mut(|s| {
        s.resize(s.capacity(), 0.0);
        zeroize::Zeroize::zeroize(s.as_mut_slice());
    });
    flexserve_quant::scrub_thread_scratch();
}

/// Whether the calling thread's scratch is scrubbed (see [`scrub_thread_scratch`]).
pub(crate) fn thread_scratch_is_zero() -> bool {
    let q = QUERY_F16.with_borrow(|q| q.len() == q.capacity() && q.iter().all(|&b| b == 0));
    let s = SCORES.with_borrow(|s| s.len() == s.capacity() && s.iter().all(|&v| v == 0.0));
    q && s && flexserve_quant::thread_scratch_is_zero()
}

/// One head's attention output `o` for the query `q`, over the positions
/// `seen` (up to the query's own, from the start of its window) of one
/// layer's cache (`kc`, `vc`): online softmax, f16 accumulation, as
/// llama.cpp's CPU flash attention does.
pub(super) fn attend_head(
    c: &ModelConfig,
    kc: &[u16],
    vc: &[u16],
    head: usize,
    seen: std::ops::RangeInclusive<usize>,
    q: &[f32],
    o: &mut [f32],
) {
    let hd = c.head_dim;
    let kvd = c.kv_dim();
    let kvh = head / (c.n_head / c.n_head_kv);
    let scale = c.kq_scale;
    let to_f16 = ops::kernels(flexserve_gguf::GgmlType::F16).expect("F16 kernels are always present").quantize;
    let acc = flexserve_quant::f16_acc();
    QUERY_F16.with_borrow_mut(|q16| {
        q16.resize(hd * 2, 0);
        // Queries meet f16 keys in f16, as the cache stores them.
        to_f16(q, q16);
        let mut max = f32::NEG_INFINITY;
        let mut sum = 0f32;
        o.fill(0.0);
        for j in seen {
            let at = j * kvd + kvh * hd;
            let krow: &[u8] = bytemuck::cast_slice(&kc[at..at + hd]);
            let s = (acc.dot)(hd, krow, q16) * scale;
            let (rescale, weight) = if s > max {
                // New maximum: rescale what was accumulated so far.
                let rescale = (max - s).exp();
                max = s;
                (acc.scale)(o, rescale);
                (rescale, 1.0)
            } else {
                (1.0, (s - max).exp())
            };
            (acc.mad)(o, bytemuck::cast_slice(&vc[at..at + hd]), weight);
            // One rounding, as llama.cpp's `S = S*ms + vs` compiles (fused).
            sum = sum.mul_add(rescale, weight);
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
    let scale = c.kq_scale;
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
    // One task per block of queries (all heads): its output rows are contiguous.
    out.par_chunks_mut(ATTENTION_QUERY_BLOCK * qd).enumerate().for_each(|(b, o)| {
        SCORES.with_borrow_mut(|scores| {
            let t0 = b * ATTENTION_QUERY_BLOCK;
            let n_q = o.len() / qd;
            // The block's queries see positions `lo..hi`: from its first
            // query's first (the start of its window; 0 without one) to its
            // last query's own. Each query's row keeps only its own range.
            let (lo, hi) = (c.first_visible(layer, pos0 + t0), pos0 + t0 + n_q);
            let n_keys = hi - lo;
            scores.resize(n_q * n_keys, 0.0);
            for h in 0..n_head {
                let kvh = h / group;
                let queries: &[u8] = bytemuck::cast_slice(&q[t0 * qd + h * hd..]);
                let keys: &[u8] = bytemuck::cast_slice(&k32[(kvh * n_pos + lo) * hd..][..n_keys * hd]);
                let s = &mut scores[..n_q * n_keys];
                // Keys as the tile's rows and queries as its tokens: one row of scores per query.
                tile(hd, keys, hd * f32_bytes, n_keys, queries, qd * f32_bytes, n_q, s, n_keys);
                for (i, row) in s.chunks_exact_mut(n_keys).enumerate() {
                    let pos = pos0 + t0 + i;
                    let (from, to) = (c.first_visible(layer, pos) - lo, pos + 1 - lo);
                    row[..from].fill(0.0);
                    softmax_scaled(&mut row[from..to], scale);
                    row[to..].fill(0.0);
                }
                let probs: &[u8] = bytemuck::cast_slice(s);
                // Value rows (one per dimension) from position `lo` on.
                let values_t: &[u8] = bytemuck::cast_slice(&vt32[kvh * hd * n_pos + lo..][..hd * n_pos - lo]);
                tile(n_keys, values_t, n_pos * f32_bytes, hd, probs, n_keys * f32_bytes, n_q, &mut o[h * hd..], qd);
            }
        })
    });
    Ok(())
}
