//! The ciphertext feeder: reads a sealed model's header and chunks from
//! storage into the shared buffer, a batch ahead of the secure world's
//! decryption, granting the memory they need.

use std::collections::VecDeque;
use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flexserve_protocol::{BufferRange, ChunkRef, ChunkSpan, ErrorCode, Reply, Request};
use flexserve_sealed::SealedHeader;

use crate::{unexpected, NormalError, Result, SecureWorld, LOAD_BATCH_BYTES};

/// A sealed model opened in the secure world.
pub struct OpenedModel {
    pub id: u32,
    pub path: PathBuf,
    pub chunks: u32,
    pub granules_needed: u32,
    pub(crate) header: SealedHeader,
    file: File,
}

impl OpenedModel {
    /// The transformer layer chunk `index` belongs to (`None`: the other
    /// tensors, embeddings and output), from the public tensor directory.
    pub fn chunk_layer(&self, index: usize) -> Option<usize> {
        let chunk = self.header.chunks.get(index)?;
        self.header.gguf.tensors.get(chunk.tensor_index as usize)?.layer()
    }
}

/// Timings of making a model resident.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    pub chunks: usize,
    pub bytes: u64,
    /// Granting (the secure world preparing protected granules).
    pub grant: Duration,
    /// Reading ciphertext into the shared buffer.
    pub read: Duration,
    /// The secure world copying, decrypting and verifying (what of it did not
    /// overlap with reading the next batch).
    pub decrypt: Duration,
    /// Verifying the header and preparing tokenizer and template (OpenModel).
    pub open: Duration,
    pub total: Duration,
    /// When the load started: the generation request for a pipelined load
    /// (the secure world's timings count from there too).
    pub started: Option<Instant>,
    /// Each batch of ciphertext, timed from `started`.
    pub batches: Vec<BatchSpan>,
}

/// One batch of ciphertext: read into the shared buffer, sent, answered.
#[derive(Debug, Clone)]
pub struct BatchSpan {
    /// Reading it from storage.
    pub read_from: Duration,
    pub read_to: Duration,
    /// The secure world's answer (its chunks decrypted and verified).
    pub answered: Duration,
    /// The chunks it holds.
    pub chunks: Vec<u32>,
}

/// Granules a model's weights take in the secure world: one region of whole
/// granules per transformer layer (`blk.N.*`) and one for the other tensors,
/// tensors 64-byte aligned inside a region.
pub fn weight_granules(header: &flexserve_gguf::GgufHeader, granule_size: u64) -> u64 {
    let mut groups: std::collections::BTreeMap<Option<usize>, u64> = std::collections::BTreeMap::new();
    for t in &header.tensors {
        let range = header.tensor_file_range(t);
        let bytes = groups.entry(t.layer()).or_default();
        *bytes = bytes.next_multiple_of(64) + (range.end - range.start);
    }
    groups.values().map(|b| b.div_ceil(granule_size.max(1))).sum()
}

impl SecureWorld {
    /// Opens a sealed model: reads its header, has the secure world verify
    /// it, grants the memory its weights need, and loads every chunk.
    pub fn open_model(&mut self, path: &Path) -> Result<(OpenedModel, LoadReport)> {
        self.open_model_with(path, true)
    }

    /// Opens a sealed model without loading its weights: the first
    /// generation on it loads them through the secure inference pipeline
    /// (each layer computes as soon as it is verified, while the later ones
    /// load; see [`SecureWorld::generate`]). The report has only `open`.
    pub fn open_model_header(&mut self, path: &Path) -> Result<(OpenedModel, LoadReport)> {
        self.open_model_with(path, false)
    }

    fn open_model_with(&mut self, path: &Path, load: bool) -> Result<(OpenedModel, LoadReport)> {
        let model_err = |message: String| NormalError::Model { path: path.to_path_buf(), message };
        let file = File::open(path).map_err(|e| model_err(e.to_string()))?;
        let prefix =
            SealedHeader::read_prefix(BufReader::new(&file)).map_err(|e| model_err(format!("sealed header: {e}")))?;
        let header = SealedHeader::read(&prefix).map_err(|e| model_err(format!("sealed header: {e}")))?;
        if prefix.len() > self.shared.len() {
            return Err(model_err(format!(
                "header of {} bytes does not fit the {}-byte shared buffer",
                prefix.len(),
                self.shared.len()
            )));
        }
        self.shared.copy_in(0, &prefix).map_err(|e| model_err(e.to_string()))?;
        let name = path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let range = BufferRange { offset: 0, len: prefix.len() as u64 };
        // Grant what the weights will need (computed from the public tensor
        // directory) before the secure world even verifies the header: it
        // prepares the granules in the background meanwhile.
        let mut grant = Duration::ZERO;
        if load {
            let estimate = weight_granules(&header.gguf, self.info.granule_size);
            let status = self.status()?;
            let free = u64::from(status.free_granules());
            let tg = Instant::now();
            self.grant(estimate.saturating_sub(free))?;
            grant = tg.elapsed();
        }
        let t0 = Instant::now();
        let (id, chunks, granules_needed) = match self.call(&Request::OpenModel { name, header: range })? {
            Reply::ModelOpened { model, chunks, granules_needed } => (model, chunks, granules_needed),
            other => return Err(unexpected("ModelOpened", &other)),
        };
        let open = t0.elapsed();
        let opened = OpenedModel { id, path: path.to_path_buf(), chunks, granules_needed, header, file };
        let mut report = if load { self.load_missing(&opened, false)? } else { LoadReport::default() };
        report.open = open;
        report.grant += grant;
        Ok((opened, report))
    }

    /// Loads whatever chunks of the model are not resident (never loaded, or
    /// evicted by a recall), granting memory as needed within the budget.
    pub fn make_resident(&mut self, model: &OpenedModel) -> Result<LoadReport> {
        self.load_missing(model, true)
    }

    /// Loads the missing chunks; with `top_up`, first grants what the model
    /// needs beyond the free granules (else the caller already granted).
    pub(crate) fn load_missing(&mut self, model: &OpenedModel, top_up: bool) -> Result<LoadReport> {
        let t0 = Instant::now();
        let mut report = LoadReport { started: Some(t0), ..LoadReport::default() };
        let missing: Vec<usize> = match self.call(&Request::MissingChunks { model: model.id })? {
            Reply::Missing { chunks } => chunks.iter().flat_map(|s| s.start as usize..s.end as usize).collect(),
            other => return Err(unexpected("Missing", &other)),
        };
        if missing.is_empty() {
            return Ok(report);
        }
        // Grant what the model needs beyond the free granted granules. The
        // secure world prepares the granules while this side reads the first
        // batch of ciphertext.
        let grant = if top_up {
            let status = self.status()?;
            let free = u64::from(status.free_granules());
            let need = u64::from(model.granules_needed).saturating_sub(u64::from(status.in_use)).saturating_sub(free);
            need.min(self.budget_granules.saturating_sub(self.granted))
        } else {
            0
        };
        let tg = Instant::now();
        // Through a granter the grant is a call of its own, made before
        // reading; granted here, it is prepared while the first batch is read.
        let grant = if grant > 0 && self.grants_elsewhere() {
            self.grant(grant)?;
            report.grant += tg.elapsed();
            0
        } else {
            grant
        };
        if grant > 0 {
            self.send(&Request::Grant { granules: grant as u32 })?;
        }

        // Two halves of the shared buffer take turns: while the secure world
        // decrypts the batch in one, the next batch is read into the other.
        let half = self.shared.len() as u64 / 2;
        let mut next = 0;
        let mut turn = 0u64;
        let mut in_flight: Option<(Request, usize, Instant, BatchSpan)> = None;
        let mut grant_pending = grant > 0;
        loop {
            let tr = Instant::now();
            let batch = self.read_batch(model, &missing, &mut next, turn * half, half, &mut report)?;
            report.read += tr.elapsed();
            let read = (tr - t0, t0.elapsed());
            if grant_pending {
                grant_pending = false;
                match self.receive()? {
                    Reply::Granted { granted, .. } => self.granted = u64::from(granted),
                    Reply::Error { code, message } => return Err(NormalError::Secure { code, message }),
                    other => return Err(unexpected("Granted", &other)),
                }
                report.grant += tg.elapsed();
            }
            if let Some((request, n, since, span)) = in_flight.take() {
                self.finish_load(&request)?;
                report.decrypt += since.elapsed();
                report.chunks += n;
                report.batches.push(BatchSpan { answered: t0.elapsed(), ..span });
            }
            if batch.is_empty() {
                break;
            }
            let n = batch.len();
            let span = BatchSpan {
                read_from: read.0,
                read_to: read.1,
                answered: Duration::ZERO,
                chunks: batch.iter().map(|c| c.index).collect(),
            };
            let request = Request::LoadChunks { model: model.id, chunks: batch };
            self.send(&request)?;
            in_flight = Some((request, n, Instant::now(), span));
            turn ^= 1;
        }
        report.total = t0.elapsed();
        Ok(report)
    }

    /// Reads the next missing chunks into `base .. base + room` of the shared
    /// buffer, up to about [`LOAD_BATCH_BYTES`] (at least one chunk).
    pub(crate) fn read_batch(
        &mut self,
        model: &OpenedModel,
        missing: &[usize],
        next: &mut usize,
        base: u64,
        room: u64,
        report: &mut LoadReport,
    ) -> Result<Vec<ChunkRef>> {
        let mut batch = Vec::new();
        let mut used = 0u64;
        while *next < missing.len() && used < LOAD_BATCH_BYTES {
            let index = missing[*next];
            let info = model.header.chunks.get(index).copied().ok_or_else(|| NormalError::Model {
                path: model.path.clone(),
                message: format!("chunk {index} is not in the header"),
            })?;
            let len = info.sealed_len() as u64;
            if used + len > room {
                if batch.is_empty() {
                    return Err(NormalError::Model {
                        path: model.path.clone(),
                        message: format!("chunk {index} ({len} bytes) does not fit half of the shared buffer"),
                    });
                }
                break;
            }
            let range = BufferRange { offset: base + used, len };
            let dst = self.shared.range_mut(range).map_err(|e| NormalError::Budget(e.to_string()))?;
            model.file.read_exact_at(dst, info.file_offset).map_err(|e| NormalError::Model {
                path: model.path.clone(),
                message: format!("reading chunk {index}: {e}"),
            })?;
            batch.push(ChunkRef { index: index as u32, at: range });
            report.bytes += len;
            used += len;
            *next += 1;
        }
        Ok(batch)
    }

    /// Waits for the answer to a LoadChunks already sent; when the secure
    /// world runs short of memory (layers are placed in whole granules, so the
    /// estimate can fall short), grants one more granule within the budget and
    /// sends the request again (chunks already loaded are skipped).
    pub(crate) fn finish_load(&mut self, request: &Request) -> Result<()> {
        let mut reply = self.receive()?;
        loop {
            match reply {
                Reply::ChunksLoaded { .. } => return Ok(()),
                Reply::Error { code: ErrorCode::NoMemory, message } => {
                    if self.grant(1)? == 0 {
                        return Err(NormalError::Budget(format!(
                            "{message}; the secure memory limit ({} granules of {} bytes) is reached",
                            self.budget_granules, self.info.granule_size
                        )));
                    }
                    self.send(request)?;
                    reply = self.receive()?;
                }
                Reply::Error { code, message } => return Err(NormalError::Secure { code, message }),
                other => return Err(unexpected("ChunksLoaded", &other)),
            }
        }
    }
}

/// Chunks streamed to a generation that asked for them (`LoadNeeded`):
/// read into the two halves of the shared buffer in turn, the next batch as
/// soon as the secure world has answered for a half, so that reading runs
/// ahead of decryption, which runs alongside the first layers' compute.
pub(crate) struct ChunkStream {
    order: Vec<usize>,
    next: usize,
    /// Batches sent and not yet answered, oldest first: (half, chunks, span).
    in_flight: VecDeque<(u64, usize, BatchSpan)>,
    /// No more batches are sent (the secure world stopped taking them).
    stopped: bool,
    /// When the generation that asked for the chunks was sent.
    since: Instant,
    report: LoadReport,
}

impl ChunkStream {
    /// Whether a batch sent is still to be answered.
    pub(crate) fn waiting(&self) -> bool {
        !self.in_flight.is_empty()
    }

    /// No more batches are sent.
    pub(crate) fn stop(&mut self) {
        self.stopped = true;
    }
}

impl SecureWorld {
    /// Starts streaming the chunks in `spans` (in that order): both halves
    /// of the shared buffer are filled and sent. The stream is there even if
    /// reading a batch failed (the one sent before is still to be answered).
    pub(crate) fn start_chunk_stream(
        &mut self,
        model: &OpenedModel,
        spans: &[ChunkSpan],
        since: Instant,
        granted_in: Duration,
    ) -> (ChunkStream, Result<()>) {
        let order = spans.iter().flat_map(|s| s.start as usize..s.end as usize).collect();
        let mut stream = ChunkStream {
            order,
            next: 0,
            in_flight: VecDeque::new(),
            stopped: false,
            since,
            report: LoadReport { grant: granted_in, started: Some(since), ..LoadReport::default() },
        };
        let sent = (0..2).try_for_each(|half| self.send_batch(model, &mut stream, half));
        (stream, sent)
    }

    /// The secure world answered the oldest batch (`loaded` of its chunks,
    /// `None` for an error): its half takes the next batch, unless the
    /// answer fell short, after which nothing more is sent.
    pub(crate) fn stream_answered(
        &mut self,
        model: &OpenedModel,
        stream: &mut ChunkStream,
        loaded: Option<u32>,
    ) -> Result<()> {
        let Some((half, sent, span)) = stream.in_flight.pop_front() else { return Ok(()) };
        stream.report.chunks += loaded.unwrap_or(0) as usize;
        stream.report.batches.push(BatchSpan { answered: stream.since.elapsed(), ..span });
        if loaded != Some(sent as u32) {
            stream.stopped = true;
        }
        if stream.next == stream.order.len() && stream.in_flight.is_empty() {
            stream.report.total = stream.since.elapsed();
            self.pipelined = Some(stream.report.clone());
        }
        self.send_batch(model, stream, half)
    }

    fn send_batch(&mut self, model: &OpenedModel, stream: &mut ChunkStream, half: u64) -> Result<()> {
        if stream.stopped || stream.next == stream.order.len() {
            return Ok(());
        }
        let room = self.shared.len() as u64 / 2;
        let tr = Instant::now();
        let order = std::mem::take(&mut stream.order);
        let batch = self.read_batch(model, &order, &mut stream.next, half * room, room, &mut stream.report);
        stream.order = order;
        let batch = batch?;
        stream.report.read += tr.elapsed();
        let span = BatchSpan {
            read_from: tr.saturating_duration_since(stream.since),
            read_to: stream.since.elapsed(),
            answered: Duration::ZERO,
            chunks: batch.iter().map(|c| c.index).collect(),
        };
        let n = batch.len();
        self.send(&Request::LoadChunks { model: model.id, chunks: batch })?;
        stream.in_flight.push_back((half, n, span));
        Ok(())
    }

    /// What the last pipelined load (chunks streamed to a generation) read
    /// and how long it took from the request for chunks to the last answer.
    pub fn take_pipelined_load(&mut self) -> Option<LoadReport> {
        self.pipelined.take()
    }
}
