//! Prefetch: loading the chunks of a model that a later request will use
//! while the link is otherwise idle (a workflow's plain step computing in
//! the normal world), first layers first, within the memory the budget
//! allows and without giving up anything already resident. Whatever does
//! not fit is left to the model's own request, whose pipelined load
//! streams only what is still missing.

use std::time::{Duration, Instant};

use flexserve_protocol::{ErrorCode, Reply, Request};

use crate::{unexpected, OpenedModel, Recall, Result, SecureWorld};

/// What a prefetch loaded, and why it stopped short if it did.
#[derive(Debug, Clone, Default)]
pub struct PrefetchReport {
    /// Chunks loaded (decrypted and verified in the secure world).
    pub chunks: usize,
    /// Ciphertext read for them.
    pub bytes: u64,
    /// Granules granted for them.
    pub granted: u64,
    pub total: Duration,
    /// Why chunks were left missing: the budget is spent, a recall came, the
    /// secure world refused one (its own request will fail on it, named).
    pub stopped: Option<String>,
}

impl SecureWorld {
    /// Loads the chunks of `model` that are missing, in the order its
    /// forward pass needs them, granting within the budget. Never evicts:
    /// when a chunk finds no free granule and the budget has none left, it
    /// stops there. A `flexserve recall` or memory pressure noticed between
    /// batches is served at once (in full) and ends the prefetch; so does
    /// `done` turning true (the work it hid behind is over: the model's own
    /// request streams the rest behind its computation).
    pub fn prefetch(&mut self, model: &OpenedModel, done: impl Fn() -> bool) -> Result<PrefetchReport> {
        let t0 = Instant::now();
        let mut report = PrefetchReport::default();
        let missing: Vec<usize> = match self.call(&Request::MissingChunks { model: model.id })? {
            Reply::Missing { chunks } => chunks.iter().flat_map(|s| s.start as usize..s.end as usize).collect(),
            other => return Err(unexpected("Missing", &other)),
        };
        if missing.is_empty() {
            return Ok(report);
        }
        // The regions of the groups with a chunk missing, beyond the free granules.
        let status = self.status()?;
        let free = u64::from(status.free_granules());
        let want = model.missing_granules(&missing, self.info.granule_size).saturating_sub(free);
        report.granted = self.grant(want)?;
        let half = self.shared.len() as u64 / 2;
        let (mut next, mut turn) = (0, 0u64);
        let mut load = crate::LoadReport::default();
        let mut in_flight: Option<Request> = None;
        loop {
            let batch = self.read_batch(model, &missing, &mut next, turn * half, half, &mut load)?;
            if let Some(request) = in_flight.take() {
                let sent = match &request {
                    Request::LoadChunks { chunks, .. } => chunks.len(),
                    _ => 0,
                };
                match self.prefetch_answer(&request, &mut report)? {
                    None => report.chunks += sent,
                    Some(why) => {
                        report.stopped = Some(why);
                        break;
                    }
                }
            }
            if batch.is_empty() {
                break;
            }
            if let Some(why) = self.serve_recall_due()? {
                report.stopped = Some(why);
                break;
            }
            if done() {
                let left = missing.len() - next + batch.len();
                report.stopped = Some(format!("the step ended first ({left} chunks left to its own load)"));
                break;
            }
            report.bytes += batch.iter().map(|c| c.at.len).sum::<u64>();
            let request = Request::LoadChunks { model: model.id, chunks: batch };
            self.send(&request)?;
            in_flight = Some(request);
            turn ^= 1;
        }
        report.total = t0.elapsed();
        Ok(report)
    }

    /// The answer to a prefetch batch: `None` when all of it loaded, else why
    /// the prefetch stops. A chunk that finds no free granule gets one more
    /// granted while the budget allows (the batch is sent again: what loaded
    /// is skipped).
    fn prefetch_answer(&mut self, request: &Request, report: &mut PrefetchReport) -> Result<Option<String>> {
        loop {
            match self.receive()? {
                Reply::ChunksLoaded { .. } => return Ok(None),
                Reply::Error { code: ErrorCode::NoMemory, message } => {
                    if self.grant(1)? == 0 {
                        return Ok(Some(format!("the secure memory limit is reached ({message})")));
                    }
                    report.granted += 1;
                    self.send(request)?;
                }
                Reply::Error { code, message } => return Ok(Some(format!("{message} [{code:?}]"))),
                other => return Err(unexpected("ChunksLoaded", &other)),
            }
        }
    }

    /// Serves a recall that is due (memory pressure, or a `flexserve recall`
    /// waiting) between two prefetch batches; what stops the prefetch then.
    fn serve_recall_due(&mut self) -> Result<Option<String>> {
        if let Some(requested) = self.pressure_due() {
            let t0 = Instant::now();
            let (released, evicted, _) = self.recall(requested)?;
            let took = t0.elapsed();
            self.recalls.push(Recall {
                requested,
                released,
                evicted,
                took,
                during_generation: false,
                by_client: false,
            });
            return Ok(Some(format!("memory pressure: {released} granules recalled")));
        }
        match self.control_pending() {
            Some(asker) => {
                let (released, _) = self.serve_recall(asker)?;
                Ok(Some(format!("a recall: {released} granules given back")))
            }
            None => Ok(None),
        }
    }
}

impl OpenedModel {
    /// Granules the regions of the groups (layers, and the rest) holding
    /// any of `chunks` take, from the public tensor directory.
    pub(crate) fn missing_granules(&self, chunks: &[usize], granule_size: u64) -> u64 {
        let header = &self.header;
        let groups: std::collections::BTreeSet<Option<usize>> =
            chunks.iter().filter_map(|&i| header.chunks.get(i)).filter_map(|c| self.tensor_layer(c)).collect();
        let mut bytes: std::collections::BTreeMap<Option<usize>, u64> = std::collections::BTreeMap::new();
        for t in header.gguf.tensors.iter().filter(|t| groups.contains(&t.layer())) {
            let range = header.gguf.tensor_file_range(t);
            let b = bytes.entry(t.layer()).or_default();
            *b = b.next_multiple_of(64) + (range.end - range.start);
        }
        bytes.values().map(|b| b.div_ceil(granule_size.max(1))).sum()
    }

    /// The layer of a chunk's tensor (`Some(None)`: the base group), `None`
    /// if the directory does not have its tensor.
    fn tensor_layer(&self, chunk: &flexserve_sealed::ChunkInfo) -> Option<Option<usize>> {
        self.header.gguf.tensors.get(chunk.tensor_index as usize).map(|t| t.layer())
    }
}

/// A prefetch behind a generation of another model: one batch in flight at
/// a time, sent once the generation decodes (its own chunks are all loaded
/// then, its KV cache and activations taken), so that the secure world
/// decrypts it between two tokens. It uses the granules granted and free;
/// it grants none (see [`SecureWorld::generate_prefetching`]).
pub(crate) struct Behind<'m> {
    model: &'m OpenedModel,
    order: Vec<usize>,
    next: usize,
    /// Chunks of the batch sent and not yet answered.
    in_flight: Option<usize>,
    /// The half of the shared buffer the next batch goes to.
    turn: u64,
    stopped: bool,
    started: Instant,
    report: PrefetchReport,
}

impl<'m> Behind<'m> {
    /// Whether a batch waits for its answer.
    pub(crate) fn waiting(&self) -> bool {
        self.in_flight.is_some()
    }

    /// No more batches are sent, for this reason.
    pub(crate) fn stop(&mut self, why: &str) {
        self.report.stopped.get_or_insert_with(|| why.to_string());
        self.stopped = true;
    }

    /// No more batches are sent: the generation is over.
    pub(crate) fn halt(&mut self) {
        self.stopped = true;
    }

    pub(crate) fn report(mut self) -> PrefetchReport {
        self.report.total = self.started.elapsed();
        let left = self.order.len() - self.next;
        if left > 0 && self.report.stopped.is_none() {
            self.report.stopped = Some(format!("the generation ended first ({left} chunks left to its own load)"));
        }
        self.report
    }
}

impl SecureWorld {
    /// The prefetch of `model` behind a generation: its missing chunks, in
    /// the order its forward pass needs them.
    pub(crate) fn behind<'m>(&mut self, model: &'m OpenedModel) -> Result<Behind<'m>> {
        let order = match self.call(&Request::MissingChunks { model: model.id })? {
            Reply::Missing { chunks } => chunks.iter().flat_map(|s| s.start as usize..s.end as usize).collect(),
            other => return Err(unexpected("Missing", &other)),
        };
        Ok(Behind {
            model,
            order,
            next: 0,
            in_flight: None,
            turn: 0,
            stopped: false,
            started: Instant::now(),
            report: PrefetchReport::default(),
        })
    }

    /// Sends the next batch of the prefetch, if none is in flight and any is left.
    pub(crate) fn send_behind(&mut self, behind: &mut Behind<'_>) -> Result<()> {
        if behind.stopped || behind.in_flight.is_some() || behind.next == behind.order.len() {
            return Ok(());
        }
        let half = self.shared.len() as u64 / 2;
        let mut load = crate::LoadReport::default();
        let order = std::mem::take(&mut behind.order);
        let batch = self.read_batch(behind.model, &order, &mut behind.next, behind.turn * half, half, &mut load);
        behind.order = order;
        let batch = match batch {
            Ok(batch) => batch,
            // The file changed or went away: the model's own step reports it.
            Err(e) => {
                behind.stop(&e.to_string());
                return Ok(());
            }
        };
        behind.report.bytes += load.bytes;
        behind.in_flight = Some(batch.len());
        behind.turn ^= 1;
        self.send(&Request::LoadChunks { model: behind.model.id, chunks: batch })
    }

    /// The secure world answered the batch in flight: `loaded` of its chunks
    /// (`None`: refused, after the generation's end). One that fell short
    /// stops the prefetch.
    pub(crate) fn behind_answered(&mut self, behind: &mut Behind<'_>, loaded: std::result::Result<u32, String>) {
        let sent = behind.in_flight.take().unwrap_or(0);
        match loaded {
            Ok(n) => {
                behind.report.chunks += n as usize;
                if n as usize != sent {
                    behind.stop(&format!(
                        "the secure world took {n} of a batch of {sent} chunks (no free granted granule, or a \
                         chunk refused)"
                    ));
                }
            }
            Err(message) => behind.stop(&message),
        }
    }
}
