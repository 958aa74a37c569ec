//! Sealed models resident in secure memory, one region per layer.
//!
//! A model's tensors are grouped by transformer layer (`blk.N.*`), plus one
//! group for the rest (embeddings, output norm and head). Each group lives in
//! one contiguous secure region (`store`), so a layer can be evicted on recall
//! and reloaded from its sealed chunks later without touching the others, and
//! the engine model is built as soon as the base group is there, taking each
//! layer as it becomes resident: a request computes its first layers while
//! the later ones load.

use std::collections::HashMap;
use std::time::Instant;

use flexserve_engine::{EngineError, MemoryBlock, Model, ModelConfig, ScratchSource, SessionState};
use flexserve_sealed::SealedModel;
use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

use crate::platform::{SecureMemory, SecureRegion};

mod store;

pub use store::{LoadError, WeightStore};

/// A conversation kept between requests: its messages and KV cache.
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    pub history: Vec<u32>,
    /// The KV cache (in a region of granules, see [`RegionBlock`]) and its fill.
    pub state: Option<SessionState>,
    /// Granules the cache's region holds.
    pub kv_granules: usize,
    pub last_used: Instant,
}

impl Default for Conversation {
    fn default() -> Self {
        Self { messages: Vec::new(), history: Vec::new(), state: None, kv_granules: 0, last_used: Instant::now() }
    }
}

impl Conversation {
    /// Drops the KV cache (its region is scrubbed and its granules freed);
    /// the messages stay, so the next turn recomputes the cache from them.
    pub fn drop_cache(&mut self) -> usize {
        self.state = None;
        std::mem::take(&mut self.kv_granules)
    }
}

/// Memory for the engine (a KV cache, activations): a region of granted
/// granules, so that it lives in Flex-Mem like the weights.
pub struct RegionBlock<R>(pub R);

impl<R: SecureRegion> MemoryBlock for RegionBlock<R> {
    fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        self.0.bytes_mut()
    }
}

/// The engine's activations in granted granules: each scratch buffer is a
/// region, taken when a session reserves its plan and returned (scrubbed,
/// to the free list) when the session ends.
pub struct GrantedScratch<M>(pub M);

impl<M: SecureMemory> ScratchSource for GrantedScratch<M> {
    fn block(&self, bytes: usize) -> Result<Box<dyn MemoryBlock>, EngineError> {
        let granule = self.0.granule_size().max(1);
        let whole = bytes.div_ceil(granule).max(1) * granule;
        let region = self.0.alloc(whole).map_err(|e| EngineError::Other(format!("activations: {e}")))?;
        Ok(Box::new(RegionBlock(region)))
    }
}

pub struct ResidentModel<R: SecureRegion> {
    pub name: String,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    pub store: WeightStore<R>,
    /// The engine model, once the base group is resident; it holds the
    /// layers that are resident and have been needed since.
    engine: Option<Model>,
    pub conversations: HashMap<u32, Conversation>,
    pub last_used: Instant,
    /// The most bytes one token of this model's tokenizer spells (special
    /// tokens as their text; at least 4, a UTF-8 character, which an unknown
    /// token may stand for): a prompt of `n` tokens holds at most `n` times
    /// this much text, which bounds the text a conversation keeps.
    pub longest_token: usize,
}

/// A model's parts borrowed apart, for a generation: it reads the engine,
/// tokenizer and template while it loads missing layers into the store.
pub struct ModelParts<'a, R: SecureRegion> {
    pub engine: &'a Model,
    pub config: &'a ModelConfig,
    pub tokenizer: &'a Tokenizer,
    pub template: Option<&'a ChatTemplate>,
    pub conversations: &'a mut HashMap<u32, Conversation>,
    pub store: &'a mut WeightStore<R>,
}

impl<R: SecureRegion> ResidentModel<R> {
    /// Whether the vendor let this model be scored: a boolean `key` set to
    /// true in its authenticated metadata.
    pub fn allows_perplexity(&self, key: &str) -> bool {
        matches!(self.store.sealed().header().gguf.metadata.get_bool(key), Ok(Some(true)))
    }

    /// Prepares a model from its authenticated header: tokenizer, template,
    /// configuration and the placement of every tensor. Loads no weights.
    pub fn new(name: String, sealed: SealedModel) -> Result<Self, String> {
        let meta = &sealed.header().gguf.metadata;
        let config = ModelConfig::from_metadata(meta).map_err(|e| format!("model {name}: {e}"))?;
        let tokenizer = Tokenizer::from_gguf(meta).map_err(|e| format!("tokenizer of {name}: {e}"))?;
        let template =
            ChatTemplate::from_gguf(meta, &tokenizer).map_err(|e| format!("chat template of {name}: {e}"))?;
        let longest_token =
            (0..tokenizer.n_vocab() as u32).map(|id| tokenizer.token_piece_special(id).len()).max().unwrap_or(0).max(4);
        let store = WeightStore::new(&name, sealed, config.n_layer);
        Ok(Self {
            name,
            config,
            tokenizer,
            template,
            store,
            engine: None,
            conversations: HashMap::new(),
            last_used: Instant::now(),
            longest_token,
        })
    }

    pub fn layer_count(&self) -> usize {
        self.config.n_layer
    }

    /// The engine model with every layer, on a fully resident model.
    pub fn engine(&mut self, threads: usize) -> Result<&Model, String> {
        if !self.store.fully_resident() {
            let missing = self.store.chunk_count() - self.store.resident_chunks();
            return Err(format!("model {}: {missing} chunks are not resident", self.name));
        }
        let parts = self.parts(threads)?;
        for i in 0..parts.config.n_layer {
            take_layer(parts.store, parts.engine, parts.config, i)?;
        }
        Ok(self.engine.as_ref().expect("built above"))
    }

    /// The parts of the model for a generation; the engine model is built on
    /// the base group if it is not yet (which must be resident).
    pub fn parts(&mut self, threads: usize) -> Result<ModelParts<'_, R>, String> {
        if self.engine.is_none() {
            let weights = self.store.base_weights(&self.config)?;
            let model =
                Model::new(self.config.clone(), weights, threads).map_err(|e| format!("model {}: {e}", self.name))?;
            self.engine = Some(model);
        }
        self.last_used = Instant::now();
        Ok(ModelParts {
            engine: self.engine.as_ref().expect("built above"),
            config: &self.config,
            tokenizer: &self.tokenizer,
            template: self.template.as_ref(),
            conversations: &mut self.conversations,
            store: &mut self.store,
        })
    }

    /// Granules held by the KV caches of this model's conversations.
    /// The engine, if it has been built (a model opened header-only has none
    /// before its first request).
    pub fn engine_if_built(&self) -> Option<&Model> {
        self.engine.as_ref()
    }

    pub fn kv_granules(&self) -> usize {
        self.conversations.values().map(|c| c.kv_granules).sum()
    }

    /// Evicts a group: the engine lets go of it first (of the one layer, or
    /// of everything for the base group), then its region is scrubbed and
    /// its granules return to the free list.
    pub fn evict(&mut self, group: usize) -> usize {
        if group == self.store.base_group() {
            self.engine = None;
        } else if let Some(engine) = self.engine.as_mut() {
            engine.weights.take_layer(group);
        }
        self.store.evict(group)
    }
}

/// Gives the engine layer `i` if it does not have it and its group is
/// complete (rearranged in place on the way); an error if the group is not.
pub fn take_layer<R: SecureRegion>(
    store: &mut WeightStore<R>,
    engine: &Model,
    config: &ModelConfig,
    i: usize,
) -> Result<(), String> {
    if engine.weights.has_layer(i) {
        return Ok(());
    }
    let layer = store.layer(config, i)?;
    engine.weights.set_layer(i, layer).map_err(|e| e.to_string())
}
