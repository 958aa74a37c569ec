//! Sealed models resident in secure memory, one region per layer.
//!
//! A model's tensors are grouped by transformer layer (`blk.N.*`), plus one
//! group for the rest (embeddings, output norm and head). Each group lives in
//! one contiguous secure region, so a layer can be evicted on recall and
//! reloaded from its sealed chunks later without touching the others.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use flexserve_engine::weights::{Layout, Repacked, TensorBytes, TensorSource, WeightStorage};
use flexserve_engine::{EngineError, MemoryBlock, Model, ModelConfig, ScratchSource, SessionState};
use flexserve_gguf::{GgufHeader, TensorInfo};
use flexserve_sealed::{SealedModel, CHUNK_TAG_LEN};
use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

use crate::platform::{SecureMemory, SecureRegion};

/// Tensors start at this alignment inside a region (SIMD loads, cache lines).
const TENSOR_ALIGN: usize = 64;

/// A region shared with the engine's tensors.
struct RegionStorage<R>(R);

impl<R: SecureRegion> WeightStorage for RegionStorage<R> {
    fn bytes(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// The tensors of one layer (or of the non-layer rest) and their region.
struct Group<R> {
    /// Bytes the group's tensors need, aligned.
    bytes: usize,
    /// Chunk indices whose plaintext lands in this group.
    chunks: Vec<usize>,
    loaded: usize,
    region: Option<Arc<RegionStorage<R>>>,
}

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
    sealed: SealedModel,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
    groups: Vec<Group<R>>,
    /// Per tensor (directory order): its group and offset inside the group's region.
    placement: Vec<(usize, usize)>,
    chunk_loaded: Vec<bool>,
    /// Per tensor: the layout its bytes were rearranged into in place for the
    /// grouped kernels, if they were.
    rearranged: Vec<Option<Repacked>>,
    engine: Option<Model>,
    pub conversations: HashMap<u32, Conversation>,
    pub last_used: Instant,
    /// The most bytes one token of this model's tokenizer spells (special
    /// tokens as their text; at least 4, a UTF-8 character, which an unknown
    /// token may stand for): a prompt of `n` tokens holds at most `n` times
    /// this much text, which bounds the text a conversation keeps.
    pub longest_token: usize,
}

/// Why a chunk could not be loaded.
pub enum LoadError {
    BadArgument(String),
    NoMemory(String),
    Verification(String),
}

impl<R: SecureRegion> ResidentModel<R> {
    /// Prepares a model from its authenticated header: tokenizer, template,
    /// configuration and the placement of every tensor. Loads no weights.
    /// Whether the vendor let this model be scored: a boolean `key` set to
    /// true in its authenticated metadata.
    pub fn allows_perplexity(&self, key: &str) -> bool {
        matches!(self.sealed.header().gguf.metadata.get_bool(key), Ok(Some(true)))
    }

    pub fn new(name: String, sealed: SealedModel) -> Result<Self, String> {
        let header = &sealed.header().gguf;
        let meta = &header.metadata;
        let config = ModelConfig::from_metadata(meta).map_err(|e| format!("model {name}: {e}"))?;
        let tokenizer = Tokenizer::from_gguf(meta).map_err(|e| format!("tokenizer of {name}: {e}"))?;
        let template =
            ChatTemplate::from_gguf(meta, &tokenizer).map_err(|e| format!("chat template of {name}: {e}"))?;
        let n_groups = config.n_layer + 1;
        let mut groups: Vec<Group<R>> =
            (0..n_groups).map(|_| Group { bytes: 0, chunks: Vec::new(), loaded: 0, region: None }).collect();
        let mut placement = Vec::with_capacity(header.tensors.len());
        for t in &header.tensors {
            let g = t.layer().filter(|&l| l < config.n_layer).unwrap_or(config.n_layer);
            let size = tensor_len(header, t);
            let at = groups[g].bytes.next_multiple_of(TENSOR_ALIGN);
            groups[g].bytes = at + size;
            placement.push((g, at));
        }
        for (i, c) in sealed.header().chunks.iter().enumerate() {
            groups[placement[c.tensor_index as usize].0].chunks.push(i);
        }
        let chunk_loaded = vec![false; sealed.header().chunks.len()];
        let rearranged = vec![None; header.tensors.len()];
        let longest_token =
            (0..tokenizer.n_vocab() as u32).map(|id| tokenizer.token_piece_special(id).len()).max().unwrap_or(0).max(4);
        Ok(Self {
            name,
            sealed,
            config,
            tokenizer,
            template,
            groups,
            placement,
            chunk_loaded,
            rearranged,
            engine: None,
            conversations: HashMap::new(),
            last_used: Instant::now(),
            longest_token,
        })
    }

    pub fn chunk_count(&self) -> usize {
        self.chunk_loaded.len()
    }

    pub fn layer_count(&self) -> usize {
        self.config.n_layer
    }

    /// Granules the weights take when every group is resident.
    pub fn granules_needed(&self, granule_size: usize) -> usize {
        self.groups.iter().filter(|g| g.bytes > 0).map(|g| g.bytes.div_ceil(granule_size)).sum()
    }

    pub fn weight_bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.bytes as u64).sum()
    }

    pub fn resident_chunks(&self) -> usize {
        self.chunk_loaded.iter().filter(|&&l| l).count()
    }

    /// Transformer layers whose every chunk is resident.
    pub fn resident_layers(&self) -> usize {
        self.groups[..self.config.n_layer].iter().filter(|g| g.loaded == g.chunks.len()).count()
    }

    pub fn missing_chunks(&self) -> Vec<std::ops::Range<usize>> {
        let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
        for (i, &loaded) in self.chunk_loaded.iter().enumerate() {
            if loaded {
                continue;
            }
            match spans.last_mut() {
                Some(s) if s.end == i => s.end = i + 1,
                _ => spans.push(i..i + 1),
            }
        }
        spans
    }

    pub fn fully_resident(&self) -> bool {
        self.groups.iter().all(|g| g.loaded == g.chunks.len())
    }

    /// Places chunk `index` (its ciphertext and tag copied out of the shared
    /// buffer by `copy`) into its group's region and decrypts it there.
    pub fn load_chunk<M: SecureMemory<Region = R>>(
        &mut self,
        pool: &M,
        index: usize,
        sealed_len: usize,
        copy: impl FnOnce(&mut [u8], &mut [u8; CHUNK_TAG_LEN]) -> Result<(), String>,
    ) -> Result<(), LoadError> {
        let count = self.chunk_loaded.len();
        let chunk = *self
            .sealed
            .header()
            .chunks
            .get(index)
            .ok_or_else(|| LoadError::BadArgument(format!("chunk {index} does not exist (model has {count})")))?;
        if sealed_len != chunk.sealed_len() {
            return Err(LoadError::BadArgument(format!(
                "chunk {index} is {} bytes sealed, {sealed_len} given",
                chunk.sealed_len()
            )));
        }
        if self.chunk_loaded[index] {
            return Ok(());
        }
        let (g, tensor_at) = self.placement[chunk.tensor_index as usize];
        let group = &mut self.groups[g];
        if group.region.is_none() {
            let region = pool.alloc(group.bytes).map_err(|e| {
                LoadError::NoMemory(format!("{} of model {}: {e}", group_name(g, self.config.n_layer), self.name))
            })?;
            group.region = Some(Arc::new(RegionStorage(region)));
        }
        // No tensor borrows the region while a chunk is missing (the engine is
        // only built on a fully resident model), so it is not shared.
        let region = group.region.as_mut().and_then(Arc::get_mut).ok_or_else(|| {
            LoadError::BadArgument(format!("chunk {index}: its region is in use by the running model"))
        })?;
        let at = tensor_at + chunk.tensor_offset as usize;
        let body = &mut region.0.bytes_mut()[at..at + chunk.len as usize];
        let mut tag = [0u8; CHUNK_TAG_LEN];
        copy(body, &mut tag).map_err(LoadError::BadArgument)?;
        self.sealed.open_chunk_detached(index, body, tag).map_err(|e| LoadError::Verification(e.to_string()))?;
        self.chunk_loaded[index] = true;
        group.loaded += 1;
        Ok(())
    }

    /// The engine model on the resident weights, built on first use.
    pub fn engine(&mut self, threads: usize) -> Result<&Model, String> {
        if self.engine.is_none() {
            if !self.fully_resident() {
                let missing = self.chunk_loaded.len() - self.resident_chunks();
                return Err(format!("model {}: {missing} chunks are not resident", self.name));
            }
            self.rearrange_in_place().map_err(|e| format!("model {}: {e}", self.name))?;
            let source = ResidentSource { model: self };
            let weights = flexserve_engine::model::Weights::load(&source, &self.config)
                .map_err(|e| format!("model {}: {e}", self.name))?;
            let model =
                Model::new(self.config.clone(), weights, threads).map_err(|e| format!("model {}: {e}", self.name))?;
            self.engine = Some(model);
        }
        self.last_used = Instant::now();
        Ok(self.engine.as_ref().expect("just built"))
    }

    /// Rearranges, in their regions, the matrices the engine would otherwise
    /// copy into a rearranged buffer at load (same size), so that the weights
    /// stay in secure memory once, inside the granted granules.
    fn rearrange_in_place(&mut self) -> Result<(), String> {
        let header = &self.sealed.header().gguf;
        for (i, t) in header.tensors.iter().enumerate() {
            let cols = *t.dims.first().unwrap_or(&1) as usize;
            let rows = t.dims.iter().skip(1).product::<u64>() as usize;
            let packing = match Repacked::for_matrix(t.ty, rows, cols) {
                Some(p) if self.rearranged[i].is_none() && flexserve_engine::model::rearranged_by_load(&t.name) => p,
                _ => continue,
            };
            let (g, at) = self.placement[i];
            let len = tensor_len(header, t);
            let region = self.groups[g]
                .region
                .as_mut()
                .and_then(Arc::get_mut)
                .ok_or_else(|| format!("tensor {}: its region is not resident or is in use", t.name))?;
            let bytes = &mut region.0.bytes_mut()[at..at + len];
            // Group by group (each is a matrix of its own in either layout), so
            // that the plaintext copy on the heap is one group, not the whole
            // matrix: an output matrix over a large vocabulary takes tens of MiB.
            for group in bytes.chunks_exact_mut(len / rows * flexserve_quant::REPACK_ROWS) {
                let mut packed = packing
                    .repack(group, flexserve_quant::REPACK_ROWS, cols)
                    .map_err(|e| format!("{}: {e}", t.name))?;
                group.copy_from_slice(&packed);
                flexserve_engine::weights::wipe(&mut packed);
            }
            self.rearranged[i] = Some(packing);
        }
        Ok(())
    }

    /// The engine (if built), the tokenizer and the template, borrowed apart
    /// from the conversations.
    pub fn parts(&mut self) -> (Option<&Model>, &Tokenizer, Option<&ChatTemplate>, &mut HashMap<u32, Conversation>) {
        (self.engine.as_ref(), &self.tokenizer, self.template.as_ref(), &mut self.conversations)
    }

    /// Granules held by the KV caches of this model's conversations.
    pub fn kv_granules(&self) -> usize {
        self.conversations.values().map(|c| c.kv_granules).sum()
    }

    /// Groups that hold memory, as eviction candidates: (group index, granules).
    /// Later layers first: the next forward pass needs them last.
    pub fn eviction_candidates(&self) -> Vec<(usize, usize)> {
        let mut v: Vec<(usize, usize)> = self
            .groups
            .iter()
            .enumerate()
            .filter_map(|(i, g)| g.region.as_ref().map(|r| (i, r.0.granules())))
            .collect();
        // Layers from the last to the first, the non-layer group (embeddings) last.
        let n = self.config.n_layer;
        v.sort_by_key(|&(i, _)| if i == n { usize::MAX } else { n - 1 - i });
        v
    }

    /// Evicts a group: the engine model goes first (it borrows every region),
    /// then the region is scrubbed and its granules return to the free list.
    pub fn evict(&mut self, group: usize) -> usize {
        self.engine = None;
        let g = &mut self.groups[group];
        let granules = g.region.take().map_or(0, |r| r.0.granules());
        for &c in &g.chunks {
            self.chunk_loaded[c] = false;
        }
        for (i, &(tg, _)) in self.placement.iter().enumerate() {
            if tg == group {
                self.rearranged[i] = None;
            }
        }
        g.loaded = 0;
        granules
    }
}

/// The engine's view of a resident model's tensors.
struct ResidentSource<'a, R: SecureRegion> {
    model: &'a ResidentModel<R>,
}

impl<R: SecureRegion> TensorSource for ResidentSource<'_, R> {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.model.sealed.header().gguf.tensor(name)
    }

    fn bytes(&self, info: &TensorInfo) -> Result<TensorBytes, EngineError> {
        let header = &self.model.sealed.header().gguf;
        let index = header
            .tensors
            .iter()
            .position(|t| t.name == info.name)
            .ok_or_else(|| EngineError::MissingTensor(info.name.clone()))?;
        let (g, at) = self.model.placement[index];
        let region = self.model.groups[g]
            .region
            .clone()
            .ok_or_else(|| EngineError::Weights(format!("tensor {} is not resident", info.name)))?;
        let storage: Arc<dyn WeightStorage> = region;
        TensorBytes::new(storage, at..at + tensor_len(header, info))
    }

    fn layout(&self, info: &TensorInfo) -> Layout {
        let index = self.model.sealed.header().gguf.tensors.iter().position(|t| t.name == info.name);
        match index {
            Some(i) => self.model.rearranged[i].map_or(Layout::Rows, Layout::Packed),
            None => Layout::Rows,
        }
    }
}

fn tensor_len(header: &GgufHeader, t: &TensorInfo) -> usize {
    let r = header.tensor_file_range(t);
    (r.end - r.start) as usize
}

fn group_name(g: usize, n_layer: usize) -> String {
    if g == n_layer {
        "embeddings and output".to_string()
    } else {
        format!("layer {g}")
    }
}
