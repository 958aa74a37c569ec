//! The transformer: weights of a llama-family or qwen2 model and the forward
//! pass over a batch of tokens with a KV cache.
//!
//! [`Model`] (here) ties the weights (`weights`) to its worker threads; a
//! [`Session`] (`session`) holds one conversation's KV cache, and
//! [`Session::eval`] runs the forward pass (`forward`) in the session's
//! scratch memory (`scratch`). `batch` decodes several sessions at once.

use std::sync::Arc;

use flexserve_gguf::GgufFile;

use crate::config::ModelConfig;
use crate::weights::GgufSource;
use crate::EngineError;

mod batch;
mod forward;
mod scratch;
mod session;
mod weights;

pub use forward::LayerHook;
pub use scratch::ScratchPlan;
pub use session::{KvCache, Logits, Session, SessionState};
pub use weights::{rearranged_by_load, Layer, TokenCost, Weights};

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
        // Every weight type has kernels (checked as the weights were set),
        // and the weights are this configuration's.
        if weights.n_layer() != config.n_layer {
            return Err(EngineError::Weights(format!(
                "{} layers of weights for a model of {}",
                weights.n_layer(),
                config.n_layer
            )));
        }
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

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }
}

/// Number of CPU cores available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
