//! Encoders: a text in, one vector out (embeddings for retrieval).
//!
//! An [`Encoder`] runs a BERT-family model over the whole input at once:
//! every token attends to every other (no cache, no causal mask), the
//! per-token outputs are pooled into one vector ([`Pooling`]) and that
//! vector is scaled to unit length ([`Normalization`]), as llama.cpp's
//! embedding tool does by default. The forward pass below reads top to
//! bottom; the matrix products are the decoder's kernels.

use std::sync::Arc;

use flexserve_gguf::{GgmlType, GgufFile};
use rayon::prelude::*;
use zeroize::Zeroizing;

use crate::memory::{heap_scratch, Buf};
use crate::model::worker_pool;
use crate::ops::{self, QuantizedActs};
use crate::weights::{GgufSource, TensorSource};
use crate::EngineError;

mod config;
mod retrieval;
mod weights;

pub use config::{EncoderArch, EncoderConfig, Pooling};
pub use retrieval::{join_passages, PassageIndex};
pub use weights::{EncoderLayer, EncoderWeights, Norm};

/// Queries per attention task: enough rows for the tile kernel, few enough
/// that a short input still makes several tasks.
const ATTENTION_QUERY_BLOCK: usize = 16;

/// What is done to the pooled vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Normalization {
    /// Left as pooled.
    None,
    /// Scaled to unit Euclidean length (cosine similarity becomes a dot product).
    Euclidean,
}

/// A loaded encoder with its own worker threads.
pub struct Encoder {
    pub config: EncoderConfig,
    pub weights: EncoderWeights,
    pool: rayon::ThreadPool,
}

impl Encoder {
    /// Loads an encoder from a GGUF file's metadata and tensors.
    pub fn from_gguf(file: Arc<GgufFile>, threads: usize) -> Result<Self, EngineError> {
        Self::from_source(&GgufSource::from_file(file), threads)
    }

    /// Loads an encoder from any GGUF image (a mapped file or decrypted bytes).
    pub fn from_source(src: &GgufSource, threads: usize) -> Result<Self, EngineError> {
        let mut config = EncoderConfig::from_metadata(&src.header().metadata)?;
        let pool = worker_pool(threads)?;
        let weights = pool.install(|| EncoderWeights::load(src as &dyn TensorSource, &mut config))?;
        Ok(Self { config, weights, pool })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Scrubs the kernels' per-thread scratch on every worker (it holds
    /// traces of the last input) before the cores go to the other world.
    /// Returns whether every worker's scratch reads zero afterwards.
    pub fn scrub_worker_scratch(&self) -> bool {
        let clean = self.pool.broadcast(|_| {
            flexserve_quant::scrub_thread_scratch();
            flexserve_quant::thread_scratch_is_zero()
        });
        clean.into_iter().all(|zero| zero)
    }

    /// The embedding of one input (token ids with the model's special tokens
    /// already added): `n_embd` values.
    pub fn embed(&self, tokens: &[u32], normalization: Normalization) -> Result<Vec<f32>, EngineError> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(EngineError::EmptyInput);
        }
        if tokens.len() > c.n_ctx_train {
            return Err(EngineError::ContextFull { n_ctx: c.n_ctx_train, needed: tokens.len() });
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= c.n_vocab) {
            return Err(EngineError::BadToken { id: bad, n_vocab: c.n_vocab });
        }
        let hidden = self.pool.install(|| self.forward(tokens))?;
        let mut pooled = pool_rows(&hidden, c.n_embd, c.pooling);
        if normalization == Normalization::Euclidean {
            normalize_euclidean(&mut pooled);
        }
        Ok(pooled)
    }

    /// Every token's output after the last block (`n_embd` per token).
    fn forward(&self, tokens: &[u32]) -> Result<Zeroizing<Vec<f32>>, EngineError> {
        let (c, w) = (&self.config, &self.weights);
        let (n, e, ff) = (tokens.len(), c.n_embd, c.n_ff);
        // Everything below derives from the user's text: wiped when dropped.
        let mut x = Zeroizing::new(vec![0f32; n * e]);
        let mut h = Zeroizing::new(vec![0f32; n * e]);
        let mut qkv = Zeroizing::new(vec![0f32; n * 3 * e]);
        let mut att = Zeroizing::new(vec![0f32; n * e]);
        let mut values_t = Zeroizing::new(vec![0f32; n * e]);
        let mut gate = Zeroizing::new(vec![0f32; n * ff]);
        let mut up = Zeroizing::new(vec![0f32; n * ff]);
        let mut acts = QuantizedActs::default();
        let mut mm: Buf<f32> = Buf::new(heap_scratch());

        // Token embeddings, plus the type-0 ("sentence A") embedding, normed.
        let embd = w.token_embd.kernels()?.row;
        for (row, &tok) in x.chunks_exact_mut(e).zip(tokens) {
            (embd.dequantize)(w.token_embd.row(tok as usize), row);
            if let Some(type0) = &w.token_type0 {
                ops::add_into(row, type0);
            }
        }
        h.copy_from_slice(&x);
        ops::layer_norm(&h, &w.embd_norm.weight, &w.embd_norm.bias, c.norm_eps, &mut x);

        let mut angles = Vec::with_capacity(n);
        for t in 0..n {
            let mut a = Vec::new();
            ops::rope_angles(t, c.head_dim, c.rope_base, 1.0, None, &mut a);
            angles.push(a);
        }

        for layer in &w.layers {
            // Attention over the whole input, both ways.
            ops::quantize_for(&mut acts, &x, e, &layer.wqkv)?;
            ops::matmul(&layer.wqkv, &acts, &mut qkv, &mut mm)?;
            for (row, a) in qkv.chunks_exact_mut(3 * e).zip(&angles) {
                // Queries and keys rotate; values do not.
                for head in row[..2 * e].chunks_exact_mut(c.head_dim) {
                    ops::rope_head(head, a, true);
                }
            }
            bidirectional_attention(c, &qkv, &mut values_t, &mut att)?;
            ops::quantize_for(&mut acts, &att, e, &layer.wo)?;
            ops::matmul(&layer.wo, &acts, &mut h, &mut mm)?;
            // Post-norm: x = norm(x + attention).
            ops::add_into(&mut h, &x);
            ops::layer_norm(&h, &layer.attn_out_norm.weight, &layer.attn_out_norm.bias, c.norm_eps, &mut x);

            // SwiGLU feed-forward, then x = norm(x + ffn).
            ops::quantize_for(&mut acts, &x, e, &layer.w_gate)?;
            ops::matmul(&layer.w_gate, &acts, &mut gate, &mut mm)?;
            ops::reuse_for(&mut acts, &x, e, &layer.w_up)?;
            ops::matmul(&layer.w_up, &acts, &mut up, &mut mm)?;
            let silu_mul = flexserve_quant::activations().silu_mul;
            gate.par_chunks_mut(ff).zip(up.par_chunks(ff)).for_each(|(g, u)| silu_mul(g, u));
            ops::quantize_for(&mut acts, &gate, ff, &layer.w_down)?;
            ops::matmul(&layer.w_down, &acts, &mut h, &mut mm)?;
            ops::add_into(&mut h, &x);
            ops::layer_norm(&h, &layer.out_norm.weight, &layer.out_norm.bias, c.norm_eps, &mut x);
        }
        acts.data.fill(0);
        mm.fill(0.0);
        Ok(x)
    }
}

/// Attention of every query over every key (no mask), per head, in f32 on
/// the tile kernel: scores of a block of queries against all keys, a softmax
/// per query, then the probabilities against the values, which are first
/// transposed into `values_t` (one row of positions per head dimension) so
/// that both products are dot products of rows. `qkv` holds each token's
/// query, key and value (`3 * n_embd`); `out` gets `n_embd` per token.
fn bidirectional_attention(
    c: &EncoderConfig,
    qkv: &[f32],
    values_t: &mut [f32],
    out: &mut [f32],
) -> Result<(), EngineError> {
    let (e, hd) = (c.n_embd, c.head_dim);
    let n = qkv.len() / (3 * e);
    // Head `h`'s values: dimension `d` of position `j` at `(h * hd + d) * n + j`.
    values_t.par_chunks_mut(n * hd).enumerate().for_each(|(h, block)| {
        for j in 0..n {
            let v = &qkv[j * 3 * e + 2 * e + h * hd..][..hd];
            for (d, &value) in v.iter().enumerate() {
                block[d * n + j] = value;
            }
        }
    });
    let values_t = &*values_t;
    let f32_bytes = std::mem::size_of::<f32>();
    let row_bytes = 3 * e * f32_bytes;
    let scale = 1.0 / (hd as f32).sqrt();
    let tile = flexserve_quant::tile_kernel(GgmlType::F32)
        .ok_or_else(|| EngineError::Other("no f32 tile kernel for attention".into()))?;
    let softmax_scaled = flexserve_quant::activations().softmax_scaled;
    out.par_chunks_mut(ATTENTION_QUERY_BLOCK * e).enumerate().for_each(|(b, o)| {
        let t0 = b * ATTENTION_QUERY_BLOCK;
        let n_q = o.len() / e;
        let mut scores = Zeroizing::new(vec![0f32; n_q * n]);
        for h in 0..c.n_head {
            let queries: &[u8] = bytemuck::cast_slice(&qkv[t0 * 3 * e + h * hd..]);
            let keys: &[u8] = bytemuck::cast_slice(&qkv[e + h * hd..]);
            // Keys as the tile's rows and queries as its tokens: one row of scores per query.
            tile(hd, keys, row_bytes, n, queries, row_bytes, n_q, &mut scores, n);
            for row in scores.chunks_exact_mut(n) {
                softmax_scaled(row, scale);
            }
            let probs: &[u8] = bytemuck::cast_slice(&scores[..]);
            let values: &[u8] = bytemuck::cast_slice(&values_t[h * hd * n..][..hd * n]);
            tile(n, values, n * f32_bytes, hd, probs, n * f32_bytes, n_q, &mut o[h * hd..], e);
        }
    });
    Ok(())
}

/// One vector from the rows of `hidden` (`n_embd` values each).
fn pool_rows(hidden: &[f32], n_embd: usize, pooling: Pooling) -> Vec<f32> {
    let rows = hidden.len() / n_embd;
    match pooling {
        Pooling::Cls => hidden[..n_embd].to_vec(),
        Pooling::Last => hidden[(rows - 1) * n_embd..].to_vec(),
        Pooling::Mean => {
            // Summed in f64: a long input's mean would lose digits in f32.
            let mut sum = vec![0f64; n_embd];
            for row in hidden.chunks_exact(n_embd) {
                for (s, &v) in sum.iter_mut().zip(row) {
                    *s += v as f64;
                }
            }
            sum.iter().map(|&s| (s / rows as f64) as f32).collect()
        }
    }
}

/// An input text's token ids for an encoder: the model's own special tokens
/// added ([CLS] ... [SEP]), and special-token text in the input read as those
/// tokens, as llama.cpp's embedding tool and server read it.
pub fn encoder_tokens(tokenizer: &flexserve_tokenizer::Tokenizer, text: &str) -> Vec<u32> {
    tokenizer.encode(text, true, true)
}

/// Scales `v` to unit Euclidean length (a zero vector stays zero).
pub fn normalize_euclidean(v: &mut [f32]) {
    let norm = v.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>().sqrt();
    if norm > 0.0 {
        let inv = (1.0 / norm) as f32;
        for x in v.iter_mut() {
            *x *= inv;
        }
    }
}

/// Cosine similarity of two vectors of equal length.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na: f64 = a.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    (dot / (na * nb)) as f32
}

#[cfg(test)]
mod tests;
