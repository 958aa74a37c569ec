//! A conversation's state: the KV cache, and the session that fills it.

use half::f16;

use super::scratch::Scratch;
use super::Model;
use crate::config::ModelConfig;
use crate::memory::{heap_scratch, HeapBlock, MemoryBlock};
use crate::EngineError;

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
    pub(super) fn k(&self, layer: usize) -> &[u16] {
        let per = self.per_buffer();
        &self.values()[2 * layer * per..(2 * layer + 1) * per]
    }

    /// Values of `layer`, all `n_ctx` positions.
    pub(super) fn v(&self, layer: usize) -> &[u16] {
        let per = self.per_buffer();
        &self.values()[(2 * layer + 1) * per..(2 * layer + 2) * per]
    }

    pub(super) fn store(&mut self, layer: usize, pos: usize, k: &[f32], v: &[f32]) {
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
    pub(super) model: &'m Model,
    pub(super) kv: KvCache,
    pub(super) n_past: usize,
    pub(super) s: Scratch,
}

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
}
