//! An encoder's weights, loaded from any tensor source.

use super::config::EncoderConfig;
use crate::weights::{load_vector, Tensor, TensorSource};
use crate::EngineError;

/// A layer norm's scale and shift.
pub struct Norm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

impl Norm {
    fn load(src: &dyn TensorSource, prefix: &str, n: usize) -> Result<Self, EngineError> {
        Ok(Self {
            weight: load_vector(src, &format!("{prefix}.weight"), n)?,
            bias: load_vector(src, &format!("{prefix}.bias"), n)?,
        })
    }
}

/// One post-norm block.
pub struct EncoderLayer {
    /// Queries, keys and values stacked: `3 * n_embd` output rows.
    pub wqkv: Tensor,
    pub wo: Tensor,
    /// After attention plus the block's input.
    pub attn_out_norm: Norm,
    pub w_gate: Tensor,
    pub w_up: Tensor,
    pub w_down: Tensor,
    /// After the feed-forward plus its input.
    pub out_norm: Norm,
}

impl EncoderLayer {
    fn load(src: &dyn TensorSource, c: &EncoderConfig, i: usize) -> Result<Self, EngineError> {
        let n = |s: &str| format!("blk.{i}.{s}");
        let (e, ff) = (c.n_embd, c.n_ff);
        let mut layer = Self {
            wqkv: Tensor::load(src, &n("attn_qkv.weight"), e, 3 * e)?,
            wo: Tensor::load(src, &n("attn_output.weight"), e, e)?,
            attn_out_norm: Norm::load(src, &n("attn_output_norm"), e)?,
            w_gate: Tensor::load(src, &n("ffn_gate.weight"), e, ff)?,
            w_up: Tensor::load(src, &n("ffn_up.weight"), e, ff)?,
            w_down: Tensor::load(src, &n("ffn_down.weight"), ff, e)?,
            out_norm: Norm::load(src, &n("layer_output_norm"), e)?,
        };
        for m in [&mut layer.wqkv, &mut layer.wo, &mut layer.w_gate, &mut layer.w_up, &mut layer.w_down] {
            crate::ops::dot_kernel(m)?;
            m.repack_for_matmul()?;
        }
        Ok(layer)
    }
}

pub struct EncoderWeights {
    pub token_embd: Tensor,
    /// The token-type ("segment") embedding of type 0, added to every token:
    /// inputs are single sentences.
    pub token_type0: Option<Vec<f32>>,
    pub embd_norm: Norm,
    pub layers: Vec<EncoderLayer>,
}

impl EncoderWeights {
    /// Loads every tensor; fixes `c.n_vocab` from the embedding matrix when
    /// the metadata names no vocabulary.
    pub fn load(src: &dyn TensorSource, c: &mut EncoderConfig) -> Result<Self, EngineError> {
        let e = c.n_embd;
        let info =
            src.info("token_embd.weight").ok_or_else(|| EngineError::MissingTensor("token_embd.weight".into()))?;
        let rows = info.dims.iter().skip(1).product::<u64>() as usize;
        if c.n_vocab == 0 {
            c.n_vocab = rows;
        }
        let token_embd = Tensor::load(src, "token_embd.weight", e, c.n_vocab)?;
        token_embd.kernels()?;
        let token_type0 = match src.info("token_types.weight") {
            Some(info) => {
                let types = info.dims.get(1).copied().unwrap_or(1) as usize;
                let all = Tensor::load(src, "token_types.weight", e, types)?.to_f32()?;
                Some(all[..e].to_vec())
            }
            None => None,
        };
        let layers = (0..c.n_layer).map(|i| EncoderLayer::load(src, c, i)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self { token_embd, token_type0, embd_norm: Norm::load(src, "token_embd_norm", e)?, layers })
    }
}
