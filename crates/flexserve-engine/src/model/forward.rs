//! The forward pass: a batch of tokens through every layer, its keys and
//! values into the session's cache, and logits out.

use rayon::prelude::*;

use super::flash_attention::{attend_head, attention_tiled, decode_head, TILED_MIN_BATCH};
use super::scratch::{Scratch, MAX_BATCH};
use super::{KvCache, Layer, Logits, Model, Session};
use crate::config::{FfnActivation, ModelConfig, RopeScaling};
use crate::memory::Buf;
use crate::ops;
use crate::EngineError;

/// Called before each layer of a forward pass with the layer's index (see
/// [`Session::eval_with`]).
pub type LayerHook<'a> = dyn FnMut(usize) -> Result<(), EngineError> + Send + 'a;

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
            attention(c, &self.kv, li, pos0, &s.q, &mut s.att, &mut s.kv32, m.pool.current_num_threads())?;
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
        let embd = w.token_embd.kernels()?.row;
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

/// Causal grouped-query attention of the batch's queries over the cache,
/// as llama.cpp's CPU flash attention (its default) computes it on
/// `threads` threads (see [`super::flash_attention`]): matching its rounding
/// keeps greedy decoding on the same tokens where two candidates are nearly tied.
#[allow(clippy::too_many_arguments)]
fn attention(
    c: &ModelConfig,
    kv: &KvCache,
    layer: usize,
    pos0: usize,
    q: &[f32],
    out: &mut [f32],
    kv32: &mut (Buf<f32>, Buf<f32>),
    threads: usize,
) -> Result<(), EngineError> {
    let n = out.len() / c.q_dim();
    if n >= TILED_MIN_BATCH {
        return attention_tiled(c, kv, layer, pos0, q, out, kv32);
    }
    let (kc, vc) = (kv.k(layer), kv.v(layer));
    let n_head = c.n_head;
    out.par_chunks_mut(c.head_dim).enumerate().for_each(|(i, o)| {
        let pos = pos0 + i / n_head;
        let seen = c.first_visible(layer, pos)..=pos;
        let q = &q[i * c.head_dim..(i + 1) * c.head_dim];
        if n == 1 {
            decode_head(c, kc, vc, i % n_head, seen, q, o, threads);
        } else {
            attend_head(c, kc, vc, i % n_head, seen, q, o);
        }
    });
    Ok(())
}
