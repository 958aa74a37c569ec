//! A session's activations: the buffers the forward pass works in, and
//! their sizes for a batch. The plan and the reservation list the buffers in
//! the fields' order.

use std::sync::Arc;

use super::flash_attention::{KV_TILE, TILED_MIN_BATCH};
use super::weights::{acts_row_bytes, shared_layout_cols, LargestMatrices};
use super::{Model, Session};
use crate::config::ModelConfig;
use crate::memory::{Buf, ScratchSource};
use crate::ops::QuantizedActs;
use crate::weights::TensorSource;
use crate::EngineError;

/// Largest batch evaluated at once (the most rows the buffers are sized
/// for); the forward pass splits longer inputs.
pub(super) const MAX_BATCH: usize = 512;

/// A session's activations: buffers sized for the current batch, in blocks
/// from the session's [`ScratchSource`].
pub(super) struct Scratch {
    pub(super) x: Buf<f32>,
    pub(super) h: Buf<f32>,
    pub(super) q: Buf<f32>,
    pub(super) k: Buf<f32>,
    pub(super) v: Buf<f32>,
    pub(super) att: Buf<f32>,
    pub(super) gate: Buf<f32>,
    pub(super) up: Buf<f32>,
    pub(super) acts: QuantizedActs,
    pub(super) mm: Buf<f32>,
    pub(super) angles: Vec<Vec<(f32, f32)>>,
    /// The rotary angles of local (sliding-window) layers, where their base differs.
    pub(super) angles_local: Vec<Vec<(f32, f32)>>,
    pub(super) kv32: (Buf<f32>, Buf<f32>),
}

impl Scratch {
    pub(super) fn new(source: Arc<dyn ScratchSource>) -> Self {
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
            angles_local: Vec::new(),
            kv32: (buf(), buf()),
        }
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

    /// [`Model::scratch_plan`] from a model's tensor directory alone, before
    /// any of its weights are loaded.
    pub fn for_source(
        src: &dyn TensorSource,
        c: &ModelConfig,
        batch: usize,
        n_pos: usize,
        logit_rows: usize,
    ) -> Result<Self, EngineError> {
        let output = src
            .info("output.weight")
            .or_else(|| src.info("token_embd.weight"))
            .ok_or_else(|| EngineError::MissingTensor("token_embd.weight".to_string()))?;
        let cols = *output.dims.first().unwrap_or(&1);
        let rows = output.dims.iter().skip(1).product::<u64>() as usize;
        let output = MatrixShape {
            acts_row: acts_row_bytes(output.ty, cols),
            rows,
            shared_layout_cols: shared_layout_cols(output.ty, cols),
        };
        Ok(plan(c, output, LargestMatrices::of(src, c)?, batch, n_pos, logit_rows))
    }
}

/// What the scratch plan needs to know of the output matrix.
struct MatrixShape {
    acts_row: usize,
    rows: usize,
    shared_layout_cols: usize,
}

impl Model {
    /// What a session's scratch buffers take for batches of up to `batch` tokens
    /// (at most the engine's largest batch) over up to `n_pos` positions,
    /// with logits for up to `logit_rows` positions of a batch.
    pub fn scratch_plan(&self, batch: usize, n_pos: usize, logit_rows: usize) -> ScratchPlan {
        let out = &self.weights.output;
        let output = MatrixShape {
            acts_row: acts_row_bytes(out.ty, out.cols as u64),
            rows: out.rows,
            shared_layout_cols: shared_layout_cols(out.ty, out.cols as u64),
        };
        plan(&self.config, output, self.weights.largest, batch, n_pos, logit_rows)
    }
}

fn plan(
    c: &ModelConfig,
    output: MatrixShape,
    largest: LargestMatrices,
    batch: usize,
    n_pos: usize,
    logit_rows: usize,
) -> ScratchPlan {
    let n = batch.clamp(1, MAX_BATCH);
    let f = std::mem::size_of::<f32>();
    let (e, qd, kvd, ff) = (c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff);
    // Quantized activations: the largest of the rows each matrix reads
    // (the blocks' from the tensor directory: some may not be present yet).
    let acts = n * output.acts_row.max(largest.acts_row);
    let mut staging = if logit_rows > 1 { output.rows * logit_rows.min(n) } else { 0 };
    if n > 1 {
        staging = staging.max(largest.rows * n);
        // Beside the tasks' parts, activations laid out once per product.
        let output_cols = if logit_rows > 1 { output.shared_layout_cols } else { 0 };
        staging += flexserve_quant::shared_act_layout_max(largest.shared_layout_cols.max(output_cols), n);
    }
    // Keys and values in f32 for the tiled attention, in whole tiles.
    let kv32 = if n >= TILED_MIN_BATCH { n_pos.max(n).next_multiple_of(KV_TILE) * kvd * f } else { 0 };
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

impl<'m> Session<'m> {
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
}
