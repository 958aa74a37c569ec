//! What the secure world serves while a generation loads or runs (chunks
//! of the pipelined load, recalls, Cancel, Flex-NPU's Pause and Resume), and
//! the timeline of when each layer was decrypted and computed.

use super::*;

/// Serves one request during a pipelined load, before the generation's
/// engine runs: chunks, a recall, a cancel. Waits for it.
pub(super) fn serve_while_loading<M: SecureMemory, C: Channel>(
    channel: &mut C,
    memory: &M,
    stores: Stores<'_, '_, M::Region>,
    timeline: &mut Timeline,
    keep: usize,
) -> Result<usize, Failure> {
    let mut paused = false;
    let mut released = 0;
    let Stores { model, store, mut others } = stores;
    loop {
        let stores = Stores { model, store: &mut *store, others: others.as_deref_mut() };
        match serve_during_generation(channel, memory, stores, timeline, true, keep) {
            DuringGeneration::Nothing => {}
            DuringGeneration::PeerGone => return Err(peer_gone_failure()),
            DuringGeneration::Cancel => {
                channel.send(&Reply::Ok).map_err(|_| peer_gone_failure())?;
                return Err((ErrorCode::Cancelled, "the generation was cancelled".to_string()));
            }
            DuringGeneration::LoadFailed(failure) => return Err(failure),
            DuringGeneration::Answer { reply, released: n } => {
                channel.send(&reply).map_err(|_| peer_gone_failure())?;
                released += n;
            }
            // No engine runs yet: no worker holds anything of this request.
            DuringGeneration::Pause => {
                channel.send(&Reply::Paused { scrubbed: true }).map_err(|_| peer_gone_failure())?;
                paused = true;
            }
            DuringGeneration::Resume => paused = false,
        }
        if !paused {
            return Ok(released);
        }
    }
}

/// Where a generation's prefill time went, per group of weights (the
/// layers, then the base group), as the report gives it.
pub(super) struct Timeline {
    start: Instant,
    pub(super) layers: Vec<LayerTiming>,
    /// When the first layer started computing.
    prefill_from: Option<Instant>,
}

impl Timeline {
    pub(super) fn new(start: Instant, n_layer: usize) -> Self {
        let layers = (0..=n_layer).map(|l| LayerTiming { layer: l as u32, ..LayerTiming::default() }).collect();
        Self { start, layers, prefill_from: None }
    }

    /// Microseconds since the request, at least 1 (0 means "never").
    pub(super) fn micros(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.start).as_micros() as u64).max(1)
    }

    /// A batch of chunks of `groups` was decrypted and verified (on the
    /// workers, side by side) from `from` to `to`: its time is shared out
    /// among its groups.
    pub(super) fn decrypted(&mut self, groups: &std::collections::BTreeSet<usize>, from: Instant, to: Instant) {
        let (a, b) = (self.micros(from), self.micros(to));
        let share = (b - a) / groups.len().max(1) as u64;
        for &g in groups {
            if let Some(l) = self.layers.get_mut(g) {
                if l.decrypt_from == 0 {
                    l.decrypt_from = a;
                }
                l.decrypt_to = b;
                l.decrypt_micros += share;
            }
        }
    }

    /// Layer `layer` starts computing (a prompt longer than one batch runs
    /// every layer once per batch: the first start counts).
    pub(super) fn computing(&mut self, layer: usize, at: Instant) {
        self.prefill_from.get_or_insert(at);
        let t = self.micros(at);
        if let Some(l) = self.layers.get_mut(layer).filter(|l| l.compute_from == 0) {
            l.compute_from = t;
        }
    }

    /// Layer `layer` is done (the last batch's end counts).
    pub(super) fn computed(&mut self, layer: usize, at: Instant) {
        let t = self.micros(at);
        if let Some(l) = self.layers.get_mut(layer) {
            l.compute_to = t;
        }
    }

    /// The prefill took `took` from its first layer: the last layer's
    /// computation (with the logits) ends there.
    pub(super) fn prefill_ended(&mut self, took: std::time::Duration) {
        let n_layer = self.layers.len() - 1;
        if let (Some(from), Some(last)) = (self.prefill_from, n_layer.checked_sub(1)) {
            self.computed(last, from + took);
        }
    }
}

/// The stores of the models open beside the generating one, by id.
pub(super) type OtherStores<'m, R> = std::collections::BTreeMap<u32, &'m mut WeightStore<R>>;

/// Where chunks sent during a generation go: the generating model's own
/// (its pipelined load), or another open model's (the normal world
/// prefetching the model a later step needs).
pub(super) struct Stores<'s, 'm, R> {
    /// The generating model.
    pub(super) model: u32,
    pub(super) store: &'s mut WeightStore<R>,
    /// The other models; `None` while the generation's own base group
    /// loads: its KV cache and activations are not taken yet, and another
    /// model's chunks must not take their granules.
    pub(super) others: Option<&'s mut OtherStores<'m, R>>,
}

/// What a look at the channel during a generation found.
pub(super) enum DuringGeneration {
    Nothing,
    /// The peer closed the channel (or it broke): stop generating.
    PeerGone,
    /// The peer asked to stop this generation.
    Cancel,
    /// The normal world takes the cores back until it sends Resume (Flex-NPU).
    Pause,
    /// The cores come back.
    Resume,
    /// A chunk sent for the pipelined load could not be loaded (answered
    /// already with the count loaded before it): the generation fails so.
    LoadFailed(Failure),
    /// A request to answer now, and the granules it gave back.
    Answer {
        reply: Box<Reply>,
        released: usize,
    },
}

/// Serves a request that arrived while a generation runs (waiting for one
/// with `wait`): a recall gives back free granules at once; chunks for the
/// model's missing layers are decrypted and verified into their regions, and
/// so are chunks of another open model (into that model's regions, see
/// [`load_for_another`]); anything else waits for the generation's end and
/// is refused now.
pub(super) fn serve_during_generation<M: SecureMemory, C: Channel>(
    channel: &mut C,
    memory: &M,
    stores: Stores<'_, '_, M::Region>,
    timeline: &mut Timeline,
    wait: bool,
    keep: usize,
) -> DuringGeneration {
    let Stores { model: generating, store, others } = stores;
    let answer = |reply| DuringGeneration::Answer { reply: Box::new(reply), released: 0 };
    let request = if wait { Some(channel.recv()) } else { channel.poll_request() };
    match request {
        None => DuringGeneration::Nothing,
        Some(Ok(Request::Recall { granules })) => {
            let t0 = Instant::now();
            let s = memory.stats();
            let spare = s.granted.saturating_sub(s.in_use).saturating_sub(keep);
            let released = memory.release((granules as usize).min(spare));
            let micros = t0.elapsed().as_micros() as u64;
            DuringGeneration::Answer {
                reply: Box::new(Reply::Recalled { released: released as u32, evicted: 0, micros }),
                released,
            }
        }
        Some(Ok(Request::LoadChunks { model, chunks })) if model != generating => {
            load_for_another(channel, memory, others, generating, model, &chunks)
        }
        Some(Ok(Request::LoadChunks { chunks, .. })) => {
            let t0 = Instant::now();
            let copy = |range: flexserve_protocol::BufferRange, out: &mut [u8]| channel.copy_out(range, out);
            let (loaded, failed) = match store.load_chunks(memory, &chunks, &copy) {
                Ok(n) => (n as u32, None),
                Err((n, e)) => (n as u32, Some(load_failure(e))),
            };
            let groups: std::collections::BTreeSet<usize> =
                chunks.iter().filter_map(|c| store.group_of_chunk(c.index as usize)).collect();
            timeline.decrypted(&groups, t0, Instant::now());
            if channel.send(&Reply::ChunksLoaded { loaded }).is_err() {
                return DuringGeneration::PeerGone;
            }
            match failed {
                Some(failure) => DuringGeneration::LoadFailed(failure),
                None => DuringGeneration::Nothing,
            }
        }
        Some(Ok(Request::Cancel)) => DuringGeneration::Cancel,
        Some(Ok(Request::Pause)) => DuringGeneration::Pause,
        Some(Ok(Request::Resume)) => DuringGeneration::Resume,
        Some(Ok(other)) => answer(Reply::Error {
            code: ErrorCode::OutOfOrder,
            message: format!(
                "{} while a generation runs (only Recall, Cancel, Pause, Resume and the chunks it asked for are \
                 served then)",
                request_name(&other)
            ),
        }),
        Some(Err(ProtocolError::Closed)) => DuringGeneration::PeerGone,
        Some(Err(e)) if e.stream_usable() => {
            answer(Reply::Error { code: ErrorCode::Malformed, message: e.to_string() })
        }
        Some(Err(_)) => DuringGeneration::PeerGone,
    }
}

/// Chunks of model `model` sent while model `generating` generates (the
/// normal world prefetching the next step's model): decrypted and verified
/// into `model`'s own regions, never the generating model's. Answered
/// `ChunksLoaded` with how many loaded, in order; fewer than sent when one
/// could not be placed (no free granted granule), failed verification (its
/// group is scrubbed, as for any load), or arrived while the generation's
/// own base group loads (none then). The generation goes on whatever
/// happens to them: the model's own request reloads what is missing and
/// reports any failure then. An id that names no open model is refused,
/// named.
fn load_for_another<M: SecureMemory, C: Channel>(
    channel: &mut C,
    memory: &M,
    others: Option<&mut OtherStores<'_, M::Region>>,
    generating: u32,
    model: u32,
    chunks: &[flexserve_protocol::ChunkRef],
) -> DuringGeneration {
    let loaded = match others {
        None => 0,
        Some(others) => {
            let Some(store) = others.get_mut(&model) else {
                let message = format!(
                    "LoadChunks for model {model} while model {generating} generates: no open model has id {model}"
                );
                let reply = Reply::Error { code: ErrorCode::NoSuchModel, message };
                return DuringGeneration::Answer { reply: Box::new(reply), released: 0 };
            };
            let copy = |range: flexserve_protocol::BufferRange, out: &mut [u8]| channel.copy_out(range, out);
            match store.load_chunks(memory, chunks, &copy) {
                Ok(n) | Err((n, _)) => n as u32,
            }
        }
    };
    match channel.send(&Reply::ChunksLoaded { loaded }) {
        Ok(()) => DuringGeneration::Nothing,
        Err(_) => DuringGeneration::PeerGone,
    }
}
