//! A sealed model's weights as they become resident: one secure region per
//! group of tensors (the embeddings and output, then each transformer
//! layer), each filled by decrypting and verifying its chunks in place and
//! then rearranged in place for the matrix kernels. A group is handed to the
//! engine only once every one of its chunks is verified, so nothing
//! unverified is ever computed on.

use std::ops::Range;
use std::sync::Arc;

use flexserve_engine::model::{Layer, Weights};
use flexserve_engine::weights::{Layout, Repacked, TensorBytes, TensorSource, WeightStorage};
use flexserve_engine::{EngineError, ModelConfig};
use flexserve_gguf::{GgufHeader, TensorInfo};
use flexserve_protocol::{BufferRange, ChunkRef};
use flexserve_sealed::{SealedModel, CHUNK_TAG_LEN};

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

/// One chunk of a batch to load: its place in the batch, where its
/// plaintext goes and where its ciphertext is in the shared buffer.
#[derive(Clone, Copy)]
struct Job {
    position: usize,
    index: usize,
    group: usize,
    /// Offset in the group's region.
    at: usize,
    len: usize,
    at_shared: BufferRange,
}

/// A chunk's place in its region, and its tag once copied (or why not).
struct Piece<'a> {
    job: &'a Job,
    body: &'a mut [u8],
    tag: Result<[u8; CHUNK_TAG_LEN], String>,
}

/// Copies a range of the shared buffer out (the channel's `copy_out`).
pub type CopyOut<'a> = dyn Fn(BufferRange, &mut [u8]) -> Result<(), String> + 'a;

/// Why a chunk could not be loaded.
pub enum LoadError {
    BadArgument(String),
    NoMemory(String),
    Verification(String),
}

/// The weights of one sealed model: groups `0 .. n_layer` are the
/// transformer layers, group `n_layer` the rest (embeddings, output norm
/// and head), which the forward pass needs first.
pub struct WeightStore<R> {
    name: String,
    sealed: SealedModel,
    n_layer: usize,
    groups: Vec<Group<R>>,
    /// Per tensor (directory order): its group and offset inside the group's region.
    placement: Vec<(usize, usize)>,
    chunk_loaded: Vec<bool>,
    /// Per tensor: the layout its bytes were rearranged into in place for the
    /// grouped kernels, if they were.
    rearranged: Vec<Option<Repacked>>,
}

impl<R: SecureRegion> WeightStore<R> {
    pub fn new(name: &str, sealed: SealedModel, n_layer: usize) -> Self {
        let header = &sealed.header().gguf;
        let mut groups: Vec<Group<R>> =
            (0..=n_layer).map(|_| Group { bytes: 0, chunks: Vec::new(), loaded: 0, region: None }).collect();
        let mut placement = Vec::with_capacity(header.tensors.len());
        for t in &header.tensors {
            let g = t.layer().filter(|&l| l < n_layer).unwrap_or(n_layer);
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
        Self { name: name.to_string(), sealed, n_layer, groups, placement, chunk_loaded, rearranged }
    }

    pub fn sealed(&self) -> &SealedModel {
        &self.sealed
    }

    /// The group of the embeddings, output norm and head.
    pub fn base_group(&self) -> usize {
        self.n_layer
    }

    pub fn chunk_count(&self) -> usize {
        self.chunk_loaded.len()
    }

    pub fn resident_chunks(&self) -> usize {
        self.chunk_loaded.iter().filter(|&&l| l).count()
    }

    pub fn complete(&self, group: usize) -> bool {
        self.groups.get(group).is_some_and(|g| g.loaded == g.chunks.len())
    }

    pub fn fully_resident(&self) -> bool {
        self.groups.iter().all(|g| g.loaded == g.chunks.len())
    }

    /// Transformer layers whose every chunk is resident.
    pub fn resident_layers(&self) -> usize {
        (0..self.n_layer).filter(|&g| self.complete(g)).count()
    }

    pub fn weight_bytes(&self) -> u64 {
        self.groups.iter().map(|g| g.bytes as u64).sum()
    }

    /// Granules the weights take when every group is resident.
    pub fn granules_needed(&self, granule_size: usize) -> usize {
        self.groups.iter().filter(|g| g.bytes > 0).map(|g| g.bytes.div_ceil(granule_size)).sum()
    }

    /// Granules the groups that hold no region yet will take.
    pub fn granules_missing(&self, granule_size: usize) -> usize {
        let missing = self.groups.iter().filter(|g| g.bytes > 0 && g.region.is_none());
        missing.map(|g| g.bytes.div_ceil(granule_size.max(1))).sum()
    }

    /// Groups in the order a forward pass needs them: the base group, then
    /// the layers from the first.
    fn execution_order(&self) -> impl Iterator<Item = usize> {
        std::iter::once(self.n_layer).chain(0..self.n_layer)
    }

    /// The chunks not resident, in runs, in the order a forward pass needs
    /// them (see [`WeightStore::execution_order`]), so that a request can
    /// compute the first layers while the later ones load.
    pub fn missing_chunks(&self) -> Vec<Range<usize>> {
        let mut spans: Vec<Range<usize>> = Vec::new();
        for g in self.execution_order() {
            for &i in &self.groups[g].chunks {
                if self.chunk_loaded[i] {
                    continue;
                }
                match spans.last_mut() {
                    Some(s) if s.end == i => s.end = i + 1,
                    _ => spans.push(i..i + 1),
                }
            }
        }
        spans
    }

    /// The group chunk `index` belongs to.
    pub fn group_of_chunk(&self, index: usize) -> Option<usize> {
        let chunk = self.sealed.header().chunks.get(index)?;
        self.placement.get(chunk.tensor_index as usize).map(|&(g, _)| g)
    }

    /// Takes from the free granules a region for every group that holds none,
    /// so that a load under way cannot run short (a recall meanwhile takes
    /// only what is free). On failure the regions taken stay, empty, with
    /// their groups (evictable as any other).
    pub fn claim_regions<M: SecureMemory<Region = R>>(&mut self, pool: &M) -> Result<(), LoadError> {
        for (g, group) in self.groups.iter_mut().enumerate() {
            if group.region.is_some() || group.bytes == 0 {
                continue;
            }
            let region = pool.alloc(group.bytes).map_err(|e| {
                LoadError::NoMemory(format!("{} of model {}: {e}", group_name(g, self.n_layer), self.name))
            })?;
            group.region = Some(Arc::new(RegionStorage(region)));
        }
        Ok(())
    }

    /// Places each chunk of a batch (its ciphertext and tag copied out of the
    /// shared buffer by `copy`, given the chunk's sealed range) into its
    /// group's region and decrypts and verifies it there; on the current
    /// thread pool's workers when called on one (the engine's, between
    /// layers), else one after the other. Returns how many chunks of the
    /// batch, in order, are loaded, or the first failure with that count. A
    /// chunk that fails verification leaves its group evicted (scrubbed): no
    /// half-verified group stays.
    pub fn load_chunks<M: SecureMemory<Region = R>>(
        &mut self,
        pool: &M,
        chunks: &[ChunkRef],
        copy: &CopyOut<'_>,
    ) -> Result<usize, (usize, LoadError)> {
        // Check the chunks and give their groups regions, up to the first
        // refused: those before it load, as the count says.
        let mut todo: Vec<Job> = Vec::with_capacity(chunks.len());
        let mut seen = std::collections::HashSet::with_capacity(chunks.len());
        let mut refused = None;
        for (n, c) in chunks.iter().enumerate() {
            match self.job(pool, n, c) {
                Ok(Some(job)) if seen.insert(job.index) => todo.push(job),
                Ok(_) => {}
                Err(e) => {
                    refused = Some((n, e));
                    break;
                }
            }
        }
        // Disjoint pieces of the regions, one per chunk.
        let mut pieces: Vec<Piece> = Vec::with_capacity(todo.len());
        todo.sort_by_key(|j| (j.group, j.at));
        let mut jobs = todo.iter().peekable();
        for (g, group) in self.groups.iter_mut().enumerate() {
            let Some(region) = group.region.as_mut().and_then(Arc::get_mut) else { continue };
            let mut rest: &mut [u8] = region.0.bytes_mut();
            let mut offset = 0;
            while let Some(job) = jobs.next_if(|j| j.group == g) {
                let (_, tail) = std::mem::take(&mut rest).split_at_mut(job.at - offset);
                let (body, tail) = tail.split_at_mut(job.len);
                pieces.push(Piece { job, body, tag: Ok([0; CHUNK_TAG_LEN]) });
                rest = tail;
                offset = job.at + job.len;
            }
        }
        // The ciphertexts into place (copies, one after the other), then
        // decryption and verification side by side.
        for piece in pieces.iter_mut() {
            let (offset, len) = (piece.job.at_shared.offset, piece.body.len() as u64);
            let tag_range = BufferRange { offset: offset + len, len: CHUNK_TAG_LEN as u64 };
            let mut tag = [0u8; CHUNK_TAG_LEN];
            let copied = copy(BufferRange { offset, len }, piece.body).and_then(|()| copy(tag_range, &mut tag));
            piece.tag = copied.map(|()| tag);
        }
        let sealed = &self.sealed;
        let open = |piece: Piece| {
            let result = match piece.tag {
                Ok(tag) => sealed
                    .open_chunk_detached(piece.job.index, piece.body, tag)
                    .map_err(|e| LoadError::Verification(e.to_string())),
                Err(e) => Err(LoadError::BadArgument(e)),
            };
            (*piece.job, result)
        };
        let results: Vec<(Job, Result<(), LoadError>)> = if rayon::current_thread_index().is_some() {
            use rayon::prelude::*;
            pieces.into_par_iter().map(open).collect()
        } else {
            pieces.into_iter().map(open).collect()
        };
        self.finish(chunks, results, refused)
    }

    /// What loading chunk `c` takes: `None` if it is loaded already.
    fn job<M: SecureMemory<Region = R>>(
        &mut self,
        pool: &M,
        position: usize,
        c: &ChunkRef,
    ) -> Result<Option<Job>, LoadError> {
        let index = c.index as usize;
        let count = self.chunk_loaded.len();
        let chunk = *self
            .sealed
            .header()
            .chunks
            .get(index)
            .ok_or_else(|| LoadError::BadArgument(format!("chunk {index} does not exist (model has {count})")))?;
        if c.at.len != chunk.sealed_len() as u64 {
            return Err(LoadError::BadArgument(format!(
                "chunk {index} is {} bytes sealed, {} given",
                chunk.sealed_len(),
                c.at.len
            )));
        }
        if c.at.offset.checked_add(c.at.len).is_none() {
            return Err(LoadError::BadArgument(format!("chunk {index}: its range overflows")));
        }
        if self.chunk_loaded[index] {
            return Ok(None);
        }
        let (group, tensor_at) = self.placement[chunk.tensor_index as usize];
        if self.groups[group].region.is_none() {
            let bytes = self.groups[group].bytes;
            let region = pool.alloc(bytes).map_err(|e| LoadError::NoMemory(format!("{}: {e}", self.what(index))))?;
            self.groups[group].region = Some(Arc::new(RegionStorage(region)));
        }
        // No tensor borrows a group's region before every chunk of it is
        // verified (the engine takes a group only once it is complete).
        if self.groups[group].region.as_mut().and_then(Arc::get_mut).is_none() {
            let what = self.what(index);
            return Err(LoadError::BadArgument(format!("{what}: its region is in use by the running model")));
        }
        let at = tensor_at + chunk.tensor_offset as usize;
        Ok(Some(Job { position, index, group, at, len: chunk.len as usize, at_shared: c.at }))
    }

    /// Marks what loaded; on a failure (the first of the batch in its
    /// order), evicts the failed chunk's group and says which chunk it was.
    fn finish(
        &mut self,
        chunks: &[ChunkRef],
        results: Vec<(Job, Result<(), LoadError>)>,
        refused: Option<(usize, LoadError)>,
    ) -> Result<usize, (usize, LoadError)> {
        let mut failed: Option<(usize, LoadError)> = refused;
        for (job, result) in results {
            match result {
                Ok(()) => {
                    self.chunk_loaded[job.index] = true;
                    self.groups[job.group].loaded += 1;
                }
                Err(e) if failed.as_ref().is_none_or(|(p, _)| job.position < *p) => failed = Some((job.position, e)),
                Err(_) => {}
            }
        }
        match failed {
            None => Ok(chunks.len()),
            Some((position, e)) => {
                let index = chunks[position].index as usize;
                let what = self.what(index);
                let e = match e {
                    LoadError::Verification(m) => {
                        if let Some(g) = self.group_of_chunk(index) {
                            self.evict(g);
                        }
                        LoadError::Verification(format!("{what}: {m}"))
                    }
                    LoadError::BadArgument(m) if !m.starts_with("chunk ") => {
                        LoadError::BadArgument(format!("{what}: {m}"))
                    }
                    other => other,
                };
                Err((position, e))
            }
        }
    }

    /// "chunk N (layer L of model M)", for messages.
    fn what(&self, index: usize) -> String {
        match self.group_of_chunk(index) {
            Some(g) => format!("chunk {index} ({} of model {})", group_name(g, self.n_layer), self.name),
            None => format!("chunk {index} of model {}", self.name),
        }
    }

    /// Rearranges, in their region, the matrices of a complete group that the
    /// engine would otherwise copy into a rearranged buffer at load (same
    /// size), so that the weights stay in secure memory once, inside the
    /// granted granules.
    fn rearrange_in_place(&mut self, group: usize) -> Result<(), String> {
        let header = &self.sealed.header().gguf;
        for (i, t) in header.tensors.iter().enumerate() {
            if self.placement[i].0 != group || self.rearranged[i].is_some() {
                continue;
            }
            let cols = *t.dims.first().unwrap_or(&1) as usize;
            let rows = t.dims.iter().skip(1).product::<u64>() as usize;
            let packing = match Repacked::for_matrix(t.ty, rows, cols) {
                Some(p) if flexserve_engine::model::rearranged_by_load(&t.name) => p,
                _ => continue,
            };
            let at = self.placement[i].1;
            let len = tensor_len(header, t);
            let region = self.groups[group]
                .region
                .as_mut()
                .and_then(Arc::get_mut)
                .ok_or_else(|| format!("tensor {}: its region is not resident or is in use", t.name))?;
            let bytes = &mut region.0.bytes_mut()[at..at + len];
            // Group by group (each is a matrix of its own in either layout), so
            // that the plaintext copy on the heap is one group, not the whole
            // matrix: an output matrix over a large vocabulary takes tens of MiB.
            // On the current thread pool's workers where called on one.
            let rearrange = |rows_group: &mut [u8]| -> Result<(), String> {
                let mut packed = packing
                    .repack(rows_group, flexserve_quant::REPACK_ROWS, cols)
                    .map_err(|e| format!("{}: {e}", t.name))?;
                rows_group.copy_from_slice(&packed);
                flexserve_engine::weights::wipe(&mut packed);
                Ok(())
            };
            let step = len / rows * flexserve_quant::REPACK_ROWS;
            if rayon::current_thread_index().is_some() {
                use rayon::prelude::*;
                bytes.par_chunks_exact_mut(step).try_for_each(rearrange)?;
            } else {
                bytes.chunks_exact_mut(step).try_for_each(rearrange)?;
            }
            self.rearranged[i] = Some(packing);
        }
        Ok(())
    }

    /// The engine's weights without the layers, on the complete base group.
    pub fn base_weights(&mut self, config: &ModelConfig) -> Result<Weights, String> {
        let g = self.n_layer;
        if !self.complete(g) {
            return Err(format!("model {}: its {} are not resident", self.name, group_name(g, self.n_layer)));
        }
        self.rearrange_in_place(g).map_err(|e| format!("model {}: {e}", self.name))?;
        Weights::load_staged(&self.source(), config).map_err(|e| format!("model {}: {e}", self.name))
    }

    /// Layer `i`'s weights, on its complete group.
    pub fn layer(&mut self, config: &ModelConfig, i: usize) -> Result<Layer, String> {
        if !self.complete(i) {
            return Err(format!("model {}: layer {i} is not resident", self.name));
        }
        self.rearrange_in_place(i).map_err(|e| format!("model {}: {e}", self.name))?;
        Layer::load(&self.source(), config, i).map_err(|e| format!("model {}: {e}", self.name))
    }

    /// The engine's view of the tensors (their directory always; their bytes
    /// where resident).
    pub fn source(&self) -> ResidentSource<'_, R> {
        ResidentSource { store: self }
    }

    /// Groups that hold memory, as eviction candidates: (group, granules).
    /// Later layers first (the next forward pass needs them last, and loads
    /// them behind the computation of the first), the base group last.
    pub fn eviction_candidates(&self) -> Vec<(usize, usize)> {
        let held = |g: usize| self.groups[g].region.as_ref().map(|r| (g, r.0.granules()));
        let mut order: Vec<usize> = self.execution_order().collect();
        order.reverse();
        order.into_iter().filter_map(held).collect()
    }

    /// Drops a group's region (scrubbed, its granules back to the free list
    /// once no tensor holds it: the caller drops the engine's hold first) and
    /// marks its chunks missing. Returns the region's granules.
    pub fn evict(&mut self, group: usize) -> usize {
        let g = &mut self.groups[group];
        let granules = g.region.take().map_or(0, |r| r.0.granules());
        for &c in &g.chunks {
            self.chunk_loaded[c] = false;
        }
        g.loaded = 0;
        for (i, &(tg, _)) in self.placement.iter().enumerate() {
            if tg == group {
                self.rearranged[i] = None;
            }
        }
        granules
    }
}

/// The engine's view of a model's tensors.
pub struct ResidentSource<'a, R: SecureRegion> {
    store: &'a WeightStore<R>,
}

impl<R: SecureRegion> ResidentSource<'_, R> {
    fn index(&self, info: &TensorInfo) -> Option<usize> {
        self.store.sealed.header().gguf.tensors.iter().position(|t| t.name == info.name)
    }
}

impl<R: SecureRegion> TensorSource for ResidentSource<'_, R> {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.store.sealed.header().gguf.tensor(name)
    }

    fn bytes(&self, info: &TensorInfo) -> Result<TensorBytes, EngineError> {
        let header = &self.store.sealed.header().gguf;
        let index = self.index(info).ok_or_else(|| EngineError::MissingTensor(info.name.clone()))?;
        let (g, at) = self.store.placement[index];
        let region = match &self.store.groups[g] {
            group if group.loaded == group.chunks.len() => group.region.clone(),
            _ => None,
        };
        let region = region.ok_or_else(|| EngineError::Weights(format!("tensor {} is not resident", info.name)))?;
        let storage: Arc<dyn WeightStorage> = region;
        TensorBytes::new(storage, at..at + tensor_len(header, info))
    }

    fn layout(&self, info: &TensorInfo) -> Layout {
        match self.index(info) {
            Some(i) => self.store.rearranged[i].map_or(Layout::Rows, Layout::Packed),
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
