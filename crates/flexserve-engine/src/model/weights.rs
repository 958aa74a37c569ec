//! The model's weights: every layer's tensors loaded from a source (rearranged
//! for the matrix kernels where they allow it), and what one token reads of them.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::config::{Arch, ModelConfig};
use crate::weights::{load_vector, load_vector_opt, Tensor, TensorSource};
use crate::EngineError;

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
    /// Gemma 3's extra RMS norms: of each query and key head (`head_dim`),
    /// and of the attention and feed-forward outputs before their residuals.
    pub attn_q_norm: Option<Vec<f32>>,
    pub attn_k_norm: Option<Vec<f32>>,
    pub post_attn_norm: Option<Vec<f32>>,
    pub post_ffn_norm: Option<Vec<f32>>,
}

/// The names of a block's matrices (`blk.N.{name}.weight`), in the order
/// [`Layer::matrices`] gives them.
const LAYER_MATRICES: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

impl Layer {
    /// The block's matrices, in the order of [`LAYER_MATRICES`].
    pub fn matrices(&self) -> [&Tensor; 7] {
        [&self.wq, &self.wk, &self.wv, &self.wo, &self.w_gate, &self.w_up, &self.w_down]
    }

    pub fn load(src: &dyn TensorSource, c: &ModelConfig, i: usize) -> Result<Self, EngineError> {
        let n = |s: &str| format!("blk.{i}.{s}");
        let (e, q, kv, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
        let bias = |s: &str, len| load_vector_opt(src, &n(s), len);
        let gemma3 = c.arch == Arch::Gemma3;
        let extra_norm = |s: &str, len| gemma3.then(|| load_vector(src, &n(s), len)).transpose();
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
            attn_q_norm: extra_norm("attn_q_norm.weight", c.head_dim)?,
            attn_k_norm: extra_norm("attn_k_norm.weight", c.head_dim)?,
            post_attn_norm: extra_norm("post_attention_norm.weight", e)?,
            post_ffn_norm: extra_norm("post_ffw_norm.weight", e)?,
        })
    }
}

/// Whether loading rearranges the tensor called `name` for the grouped
/// matrix kernels (when its type and shape allow it, see
/// `flexserve_quant::Repacked::for_matrix`): the layer matrices and an untied output,
/// never the embeddings. A source that rearranges in place must pick exactly
/// these ([`Weights::load`] follows the same rule).
pub fn rearranged_by_load(name: &str) -> bool {
    if name == "output.weight" {
        return true;
    }
    let Some(layer) = flexserve_gguf::layer_of(name) else { return false };
    // The names the engine loads (`blk.{layer}.attn_q.weight`, ...), nothing spelt otherwise.
    let tensor = name.strip_prefix(&format!("blk.{layer}.")).and_then(|t| t.strip_suffix(".weight"));
    tensor.is_some_and(|t| LAYER_MATRICES.contains(&t))
}

/// All weights of a model. The transformer blocks may arrive one by one
/// after the rest ([`Weights::load_staged`], [`Weights::set_layer`]): a
/// forward pass runs block `i` once it is present, so a model still being
/// loaded (decrypted and verified block by block) computes its first blocks
/// while the later ones load, and a block dropped to free memory
/// ([`Weights::take_layer`]) is loaded again before it is next needed.
pub struct Weights {
    pub token_embd: Tensor,
    /// Block `i`, once present.
    layers: Vec<OnceLock<Layer>>,
    pub output_norm: Vec<f32>,
    /// The output projection; the embedding matrix itself when tied.
    pub output: Tensor,
    /// Per-pair divisors of the rotary frequencies (llama3-style scaling).
    pub rope_freq_factors: Option<Vec<f32>>,
    /// The largest of the blocks' matrices, from the tensor directory: the
    /// scratch memory a batch needs is known before any block is present.
    pub(super) largest: LargestMatrices,
}

/// The largest figures among the blocks' matrices (see [`Weights::largest`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct LargestMatrices {
    /// Bytes of one quantized activation row, in the format each matrix's kernel multiplies.
    pub acts_row: usize,
    /// Output rows.
    pub rows: usize,
    /// Columns of the widest matrix whose products lay out their
    /// activations once per product (`flexserve_quant::shared_act_tile`).
    pub shared_layout_cols: usize,
}

impl LargestMatrices {
    pub(super) fn of(src: &dyn TensorSource, c: &ModelConfig) -> Result<Self, EngineError> {
        let mut largest = Self::default();
        for i in 0..c.n_layer {
            for m in LAYER_MATRICES {
                let name = format!("blk.{i}.{m}.weight");
                let info = src.info(&name).ok_or(EngineError::MissingTensor(name))?;
                let cols = *info.dims.first().unwrap_or(&1);
                let rows = info.dims.iter().skip(1).product::<u64>() as usize;
                largest.rows = largest.rows.max(rows);
                largest.acts_row = largest.acts_row.max(acts_row_bytes(info.ty, cols));
                largest.shared_layout_cols = largest.shared_layout_cols.max(shared_layout_cols(info.ty, cols));
            }
        }
        Ok(largest)
    }
}

/// `cols` where a matrix of type `ty` lays out its products' activations
/// once per product (see `ops::matmul`), else 0.
pub(super) fn shared_layout_cols(ty: flexserve_gguf::GgmlType, cols: u64) -> usize {
    if flexserve_quant::shared_act_tile(ty).is_some() {
        cols as usize
    } else {
        0
    }
}

/// Bytes of one activation row of `cols` values as a matrix of type `ty` multiplies it.
pub(super) fn acts_row_bytes(ty: flexserve_gguf::GgmlType, cols: u64) -> usize {
    let act = flexserve_quant::kernels(ty).map(|k| k.vec_dot_type).unwrap_or(ty);
    act.row_size(cols).unwrap_or(0) as usize
}

impl Weights {
    /// Every tensor of the model, the blocks included.
    pub fn load(src: &dyn TensorSource, c: &ModelConfig) -> Result<Self, EngineError> {
        let mut w = Self::without_layers(src, c)?;
        let mut layers = (0..c.n_layer).map(|i| Layer::load(src, c, i)).collect::<Result<Vec<_>, _>>()?;
        // Matrix-product weights are rearranged for the grouped kernels where
        // their type allows (Q4_0 as llama.cpp does, Q4_1, Q8_0, Q4_K; Q6_K on AVX-512); the embedding
        // matrix, and so a tied output, is not (its rows are looked up).
        let mut matrices: Vec<&mut Tensor> = w.untied_output_mut().into_iter().collect();
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
        for (i, layer) in layers.into_iter().enumerate() {
            w.set_layer(i, layer)?;
        }
        Ok(w)
    }

    /// Everything but the transformer blocks, which come later one by one
    /// ([`Weights::set_layer`]). A source that rearranged an untied output
    /// matrix in place leaves nothing to do; otherwise it is rearranged here.
    pub fn load_staged(src: &dyn TensorSource, c: &ModelConfig) -> Result<Self, EngineError> {
        let mut w = Self::without_layers(src, c)?;
        if let Some(output) = w.untied_output_mut().filter(|t| t.pending_repack().is_some()) {
            output.repack_for_matmul()?;
        }
        Ok(w)
    }

    /// Everything but the blocks, as the source has it (nothing rearranged);
    /// the kernels of the embedding and output matrices are checked.
    fn without_layers(src: &dyn TensorSource, c: &ModelConfig) -> Result<Self, EngineError> {
        let token_embd = Tensor::load(src, "token_embd.weight", c.n_embd, c.n_vocab)?;
        let output = Tensor::load_opt(src, "output.weight", c.n_embd, c.n_vocab)?;
        let w = Self {
            output: output.unwrap_or_else(|| token_embd.clone()),
            token_embd,
            layers: (0..c.n_layer).map(|_| OnceLock::new()).collect(),
            output_norm: load_vector(src, "output_norm.weight", c.n_embd)?,
            rope_freq_factors: load_vector_opt(src, "rope_freqs.weight", c.rope_dim / 2)?,
            largest: LargestMatrices::of(src, c)?,
        };
        crate::ops::dot_kernel(&w.output)?;
        w.token_embd.kernels()?;
        Ok(w)
    }

    /// The output matrix when it is not the embedding matrix itself.
    fn untied_output_mut(&mut self) -> Option<&mut Tensor> {
        let tied = std::ptr::eq(self.output.bytes(), self.token_embd.bytes());
        (!tied).then_some(&mut self.output)
    }

    /// Transformer blocks the model has (present or not).
    pub fn n_layer(&self) -> usize {
        self.layers.len()
    }

    /// Block `i`, or an error naming it if it is not present.
    pub fn layer(&self, i: usize) -> Result<&Layer, EngineError> {
        self.layers
            .get(i)
            .and_then(OnceLock::get)
            .ok_or_else(|| EngineError::Weights(format!("layer {i} is not resident")))
    }

    pub fn has_layer(&self, i: usize) -> bool {
        self.layers.get(i).is_some_and(|l| l.get().is_some())
    }

    /// The blocks present, in order.
    pub fn layers(&self) -> impl Iterator<Item = &Layer> {
        self.layers.iter().filter_map(OnceLock::get)
    }

    /// Makes block `i` present (once its weights are in place and verified).
    /// Its matrices' kernels are checked first: a block the engine cannot
    /// run is refused here, not in the middle of a forward pass.
    pub fn set_layer(&self, i: usize, layer: Layer) -> Result<(), EngineError> {
        let slot = self.layers.get(i).ok_or_else(|| EngineError::Weights(format!("layer {i} does not exist")))?;
        for t in layer.matrices() {
            crate::ops::dot_kernel(t)?;
        }
        slot.set(layer).map_err(|_| EngineError::Weights(format!("layer {i} is already present")))
    }

    /// Drops block `i` (its memory can then go), until it is set again.
    pub fn take_layer(&mut self, i: usize) -> Option<Layer> {
        self.layers.get_mut(i).and_then(OnceLock::take)
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
    /// machine's read bandwidth over `weight_bytes`. Blocks not present are
    /// not counted.
    pub fn per_token(&self) -> TokenCost {
        let mut matrices: Vec<&Tensor> = vec![&self.output];
        let mut vectors: Vec<&[f32]> = vec![&self.output_norm];
        vectors.extend(self.rope_freq_factors.as_deref());
        for l in self.layers() {
            matrices.extend(l.matrices());
            vectors.extend([&l.attn_norm[..], &l.ffn_norm[..]]);
            vectors.extend([&l.bq, &l.bk, &l.bv].into_iter().flatten().map(|b| &b[..]));
            let extra_norms = [&l.attn_q_norm, &l.attn_k_norm, &l.post_attn_norm, &l.post_ffn_norm];
            vectors.extend(extra_norms.into_iter().flatten().map(|v| &v[..]));
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

#[cfg(test)]
mod tests {
    use super::{rearranged_by_load, TokenCost};
    use crate::config::Arch;
    use crate::model::Model;
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
