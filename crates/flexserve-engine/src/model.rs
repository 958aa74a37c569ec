//! The transformer: weights of a llama-family, qwen2 or gemma3 model and the forward
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
mod flash_attention;
#[cfg(test)]
mod flash_attention_tests;
mod forward;
mod scratch;
mod session;
#[cfg(test)]
mod sliding_window_tests;
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
pub(crate) fn worker_pool(threads: usize) -> Result<rayon::ThreadPool, EngineError> {
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

    /// Scrubs the scratch each worker thread keeps between calls (kernel
    /// buffers, attention queries and scores: all derived from a prompt), as
    /// a world does before its cores go to the other (Flex-NPU's change of
    /// owner). Returns whether every worker's scratch reads zero afterwards.
    pub fn scrub_worker_scratch(&self) -> bool {
        let clean = self.pool.broadcast(|_| {
            flash_attention::scrub_thread_scratch();
            flash_attention::thread_scratch_is_zero()
        });
        clean.into_iter().all(|zero| zero)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Arch;
    use crate::synth::{synth_model, SynthSpec};
    use flexserve_gguf::GgmlType;

    #[test]
    fn worker_scratch_holds_the_prompts_traces_until_scrubbed() {
        let mut image = Vec::new();
        synth_model(&SynthSpec::tiny(Arch::Llama, GgmlType::Q4_0), None).unwrap().write_to(&mut image).unwrap();
        let model = Model::from_source(&GgufSource::from_bytes(image).unwrap(), 2).unwrap();
        let mut session = Session::new(&model, 64);
        session.eval(&[1, 5, 9, 12, 40, 41, 42, 43], Logits::Last).unwrap();
        session.eval(&[7], Logits::Last).unwrap();
        let traces = model.pool.broadcast(|_| !flash_attention::thread_scratch_is_zero());
        assert!(traces.iter().any(|&t| t), "no worker kept scratch: the test proves nothing");
        assert!(model.scrub_worker_scratch());
        assert!(model.pool.broadcast(|_| flash_attention::thread_scratch_is_zero()).into_iter().all(|z| z));
        // Scrubbed scratch serves the next call as before.
        let again = Session::new(&model, 64).eval(&[1, 5, 9, 12, 40, 41, 42, 43], Logits::Last).unwrap();
        let mut first = Session::new(&model, 64);
        assert_eq!(again, first.eval(&[1, 5, 9, 12, 40, 41, 42, 43], Logits::Last).unwrap());
    }
}
