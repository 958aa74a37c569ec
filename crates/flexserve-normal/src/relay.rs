//! Relaying generation and scoring: requests in, text out, memory granted
//! when the secure world asks for it, recalls and cancellation served while
//! tokens stream.

use std::collections::VecDeque;
use std::time::Instant;

use flexserve_protocol::{ErrorCode, GenerateRequest, GenerationReport, Reply, Request, StreamStep};

use crate::governor::PRESSURE_CHECK_INTERVAL;
use crate::{control, unexpected, NormalError, OpenedModel, Result, SecureWorld};

/// How often a generation under a core lease looks for work of the other
/// world waiting (a Pause then takes effect at the secure world's next token).
const LEASE_POLL: std::time::Duration = std::time::Duration::from_millis(1);

/// A piece of a generation's stream: plain text, or a record sealed to an
/// encrypted session's client.
pub(crate) enum Streamed<'a> {
    Text(&'a str),
    Sealed(Vec<u8>),
}

/// How a relayed generation ended.
pub(crate) enum Relayed {
    /// A plain generation's report.
    Generated(GenerationReport),
    /// An encrypted generation's `Ok` (its records were relayed).
    Ended,
    /// A stream's prompt evaluated: its first token (and its report if it ended there).
    Stepped(Vec<StreamStep>),
}

impl Relayed {
    /// The error for an end that was not the one `expected`.
    pub(crate) fn unexpected(self, expected: &'static str) -> NormalError {
        let reply = match self {
            Relayed::Generated(report) => Reply::Generated(report),
            Relayed::Ended => Reply::Ok,
            Relayed::Stepped(streams) => Reply::Stepped { streams },
        };
        unexpected(expected, &reply)
    }
}

/// A recall sent while a generation runs, waiting for its answer.
pub(crate) struct InFlightRecall {
    pub(crate) requested: u32,
    pub(crate) sent: Instant,
    /// The `flexserve recall` client that asked for it, if one did.
    pub(crate) asker: Option<control::PendingRecall>,
}

impl SecureWorld {
    /// Generates, streaming each piece of text to `on_text`. If the model is
    /// not resident (opened with [`SecureWorld::open_model_header`], or
    /// recalled since), the secure world asks for its missing chunks and
    /// they stream while its first layers compute.
    pub fn generate(
        &mut self,
        model: &OpenedModel,
        request: GenerateRequest,
        on_text: impl FnMut(&str),
    ) -> Result<GenerationReport> {
        self.generate_until(model, request, on_text, || false)
    }

    /// [`SecureWorld::generate`] that stops once `cancelled` says so (checked
    /// between tokens and every 50 ms of a prefill): the secure world is sent
    /// `Cancel`, stops at its next layer or token, and the result is
    /// `Secure{Cancelled}`.
    pub fn generate_until(
        &mut self,
        model: &OpenedModel,
        request: GenerateRequest,
        mut on_text: impl FnMut(&str),
        cancelled: impl Fn() -> bool,
    ) -> Result<GenerationReport> {
        let streamed = |piece: Streamed<'_>| {
            if let Streamed::Text(text) = piece {
                on_text(text)
            }
        };
        match self.relay(model, Request::Generate(request), streamed, cancelled, None)? {
            Relayed::Generated(report) => Ok(report),
            other => Err(other.unexpected("Generated")),
        }
    }

    /// [`SecureWorld::generate`] with the chunks of `prefetch` (another open
    /// model, the one a later request uses) streaming into the secure world
    /// behind the decode: once this generation's own chunks are all loaded,
    /// one batch at a time, which the secure world decrypts into
    /// `prefetch`'s regions between two tokens. They take only granules
    /// granted and free (the reserve, or what an unloaded model left): a
    /// grant for them would protect memory on this generation's path that
    /// the next model could otherwise take from this one once it is
    /// unloaded. A batch taken only in part stops the prefetch, and the
    /// model's own request loads the rest. Returns what the prefetch loaded.
    pub fn generate_prefetching(
        &mut self,
        model: &OpenedModel,
        request: GenerateRequest,
        mut on_text: impl FnMut(&str),
        prefetch: Option<&OpenedModel>,
    ) -> Result<(GenerationReport, Option<crate::PrefetchReport>)> {
        let Some(prefetch) = prefetch.filter(|p| p.id != model.id) else {
            return self.generate(model, request, on_text).map(|r| (r, None));
        };
        let mut behind = self.behind(prefetch)?;
        let streamed = |piece: Streamed<'_>| {
            if let Streamed::Text(text) = piece {
                on_text(text)
            }
        };
        match self.relay(model, Request::Generate(request), streamed, || false, Some(&mut behind))? {
            Relayed::Generated(report) => Ok((report, Some(behind.report()))),
            other => Err(other.unexpected("Generated")),
        }
    }

    /// Opens an encrypted session for a client on `model`: the client's
    /// first handshake message in, the secure world's session id and answer out.
    pub fn open_encrypted(&mut self, model: &OpenedModel, handshake: Vec<u8>) -> Result<(u64, Vec<u8>)> {
        match self.call(&Request::OpenEncrypted { model: model.id, handshake })? {
            Reply::EncryptedOpened { session, handshake } => Ok((session, handshake)),
            other => Err(unexpected("EncryptedOpened", &other)),
        }
    }

    /// Carries a client's encrypted request to its session and each sealed
    /// record of the answer back to `on_record`, granting memory and serving
    /// recalls and cancellation as [`SecureWorld::generate_until`] does. The
    /// normal world reads none of it.
    pub fn generate_encrypted(
        &mut self,
        model: &OpenedModel,
        session: u64,
        n_ctx: u32,
        message: Vec<u8>,
        mut on_record: impl FnMut(Vec<u8>),
        cancelled: impl Fn() -> bool,
    ) -> Result<()> {
        let streamed = |piece: Streamed<'_>| {
            if let Streamed::Sealed(record) = piece {
                on_record(record)
            }
        };
        let request = Request::GenerateEncrypted { session, n_ctx, message };
        match self.relay(model, request, streamed, cancelled, None)? {
            Relayed::Ended => Ok(()),
            other => Err(other.unexpected("Sealed or Ok")),
        }
    }

    /// Ends an encrypted session.
    pub fn close_encrypted(&mut self, session: u64) -> Result<()> {
        match self.call(&Request::CloseEncrypted { session })? {
            Reply::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    /// Sends a generation (plain or encrypted, or a stream's prompt) and
    /// relays what streams back until its end: the report of a plain one,
    /// `Ended` for an encrypted one (which ends with `Ok`), the first token
    /// of a stream.
    pub(crate) fn relay(
        &mut self,
        model: &OpenedModel,
        request: Request,
        mut on_piece: impl FnMut(Streamed<'_>),
        cancelled: impl Fn() -> bool,
        mut behind: Option<&mut crate::prefetch::Behind<'_>>,
    ) -> Result<Relayed> {
        let ends_with_ok = matches!(request, Request::GenerateEncrypted { .. });
        let starts_stream = matches!(request, Request::StartStream { .. });
        let mut sent_at = Instant::now();
        self.send(&request)?;
        // Chunks the generation asked for, streaming.
        let mut stream: Option<crate::feeder::ChunkStream> = None;
        // Granting the memory the generation asked for (protecting it).
        let mut granting = std::time::Duration::ZERO;
        // Recalls sent during the generation, oldest first.
        let mut in_flight: VecDeque<InFlightRecall> = VecDeque::new();
        let mut result = None;
        // A Cancel sent, and whether its Ok came back (it must, before the next request).
        let (mut cancel_sent, mut cancel_acked) = (false, false);
        // Reading the model failed mid-stream: the error the generation ends with.
        let mut read_failed: Option<NormalError> = None;
        // A Pause sent for the core lease, not yet answered.
        let mut pause_sent = false;
        // Under a core lease, work of the other world that starts waiting is
        // noticed within LEASE_POLL, not at the next token only.
        let wait = if self.lease.is_some() { LEASE_POLL } else { PRESSURE_CHECK_INTERVAL };
        loop {
            // A long prefill sends nothing for a while: the watch goes on meanwhile.
            while in_flight.is_empty() && result.is_none() && !self.reply_ready(wait) {
                self.send_due_recall(&mut in_flight)?;
                if !cancel_sent && cancelled() {
                    self.send(&Request::Cancel)?;
                    cancel_sent = true;
                }
                if !cancel_sent {
                    pause_sent |= self.pause_if_contended(pause_sent, &stream)?;
                }
            }
            if !cancel_sent && result.is_none() && cancelled() {
                self.send(&Request::Cancel)?;
                cancel_sent = true;
            }
            match self.receive()? {
                Reply::Ok if cancel_sent && !cancel_acked => cancel_acked = true,
                Reply::Ok if ends_with_ok && result.is_none() => result = Some(Ok(Relayed::Ended)),
                Reply::Stepped { streams } if starts_stream && result.is_none() => {
                    result = Some(Ok(Relayed::Stepped(streams)))
                }
                // Cancelled before it started: do not ask again.
                Reply::MemoryNeeded { .. } if result.is_none() && cancelled() => {
                    result = Some(Err(NormalError::Secure {
                        code: ErrorCode::Cancelled,
                        message: "cancelled before the generation started".to_string(),
                    }))
                }
                // Before any token: the KV cache needs more granules; grant, ask again.
                Reply::MemoryNeeded { granules } if result.is_none() => {
                    // A recall or a Pause sent meanwhile (the generation had not
                    // started) is answered next, as a request of its own, in the
                    // order sent: nothing runs, so a pause needs no resume.
                    while !in_flight.is_empty() || pause_sent {
                        match self.receive()? {
                            Reply::Recalled { released, evicted, micros } if !in_flight.is_empty() => {
                                let recall = in_flight.pop_front().expect("not empty");
                                self.recall_answered(recall, released, evicted, micros, false)
                            }
                            Reply::Paused { .. } if pause_sent => pause_sent = false,
                            other => return Err(unexpected("Recalled or Paused", &other)),
                        }
                    }
                    let tg = Instant::now();
                    self.grant_for_kv_cache(granules)?;
                    granting += tg.elapsed();
                    sent_at = Instant::now();
                    self.send(&request)?;
                }
                Reply::LoadNeeded { chunks } if result.is_none() && stream.is_none() => {
                    let (s, sent) = self.start_chunk_stream(model, &chunks, sent_at, granting);
                    let s = stream.insert(s);
                    if let Err(e) = sent {
                        read_failed = Some(self.abandon_load(e, s, &mut cancel_sent)?);
                    }
                }
                // During the generation each batch is answered with the
                // chunks it loaded; batches it did not take are served after
                // its end, as ordinary loads (an error then is theirs).
                Reply::ChunksLoaded { loaded } if stream.as_ref().is_some_and(|s| s.waiting()) => {
                    let s = stream.as_mut().expect("waiting");
                    // Once the generation is over, nothing more is sent.
                    if result.is_some() {
                        s.stop();
                    }
                    if let Err(e) = self.stream_answered(model, s, Some(loaded)) {
                        let cancel = &mut cancel_sent;
                        read_failed = read_failed.or(Some(self.abandon_load(e, s, cancel)?));
                    }
                    // Between two batches, as between two tokens: a recall
                    // due is sent now (the load answers more often than the
                    // 50 ms of silence the watch above waits for).
                    if result.is_none() && in_flight.is_empty() {
                        self.send_due_recall(&mut in_flight)?;
                    }
                }
                Reply::Error { .. } if result.is_some() && stream.as_ref().is_some_and(|s| s.waiting()) => {
                    let s = stream.as_mut().expect("waiting");
                    s.stop();
                    self.stream_answered(model, s, None)?;
                }
                // The prefetch's batch (sent only once this generation's own
                // chunks were all answered, so its answer comes after theirs).
                Reply::ChunksLoaded { loaded } if behind.as_ref().is_some_and(|b| b.waiting()) => {
                    let b = behind.as_deref_mut().expect("waiting");
                    self.behind_answered(b, Ok(loaded));
                    if result.is_none() && !cancel_sent && !pause_sent {
                        self.send_behind(b)?;
                    }
                }
                // Sent as the generation ended, it was served as a load of its own.
                Reply::Error { code, message } if result.is_some() && behind.as_ref().is_some_and(|b| b.waiting()) => {
                    let b = behind.as_deref_mut().expect("waiting");
                    self.behind_answered(b, Err(format!("{message} [{code:?}]")));
                }
                Reply::Token { text } => {
                    on_piece(Streamed::Text(&text));
                    if in_flight.is_empty() {
                        self.send_due_recall(&mut in_flight)?;
                    }
                    pause_sent |= self.pause_if_contended(pause_sent, &stream)?;
                    // Decoding: this generation's own chunks are all loaded.
                    let own_loading = stream.as_ref().is_some_and(|s| s.waiting());
                    if let Some(b) = behind.as_deref_mut().filter(|_| !own_loading && !cancel_sent && !pause_sent) {
                        self.send_behind(b)?;
                    }
                }
                Reply::Sealed { record } if ends_with_ok => {
                    on_piece(Streamed::Sealed(record));
                    if in_flight.is_empty() {
                        self.send_due_recall(&mut in_flight)?;
                    }
                    pause_sent |= self.pause_if_contended(pause_sent, &stream)?;
                }
                Reply::Paused { scrubbed } if pause_sent => {
                    pause_sent = false;
                    // Paused mid-generation: the cores go to the waiting work
                    // and come back. A generation that ended first, or that a
                    // Cancel ends (which also ends a pause), has nothing to resume.
                    if result.is_none() && !cancel_sent {
                        if let Some(lease) = self.lease.clone() {
                            lease.hand_over(scrubbed);
                        }
                        self.send(&Request::Resume)?;
                    }
                }
                Reply::Recalled { released, evicted, micros } => {
                    let Some(recall) = in_flight.pop_front() else {
                        return Err(unexpected("Token or Generated", &Reply::Recalled { released, evicted, micros }));
                    };
                    self.recall_answered(recall, released, evicted, micros, result.is_none());
                }
                Reply::Generated(report) if !ends_with_ok && !starts_stream => {
                    result = Some(Ok(Relayed::Generated(report)))
                }
                Reply::Error { code, message } => result = Some(Err(NormalError::Secure { code, message })),
                other => return Err(unexpected("Token or Generated", &other)),
            }
            if result.is_some() {
                if let Some(b) = behind.as_deref_mut() {
                    b.halt();
                }
            }
            // A recall, a cancel or chunks sent as the generation ended are answered after it.
            let loading = stream.as_ref().is_some_and(|s| s.waiting()) || behind.as_ref().is_some_and(|b| b.waiting());
            if in_flight.is_empty() && (!cancel_sent || cancel_acked) && !loading && !pause_sent {
                if let Some(r) = result {
                    return match read_failed {
                        Some(e) => Err(e),
                        None => r,
                    };
                }
            }
        }
    }

    /// Between two tokens: when the core lease is contended (and no chunks
    /// are on their way, which the secure world would decrypt on the cores),
    /// asks the secure world to pause. Whether a Pause was sent.
    fn pause_if_contended(&mut self, pause_sent: bool, stream: &Option<crate::feeder::ChunkStream>) -> Result<bool> {
        let loading = stream.as_ref().is_some_and(|s| s.waiting());
        if pause_sent || loading || !self.lease.as_ref().is_some_and(|l| l.contended()) {
            return Ok(false);
        }
        self.send(&Request::Pause)?;
        Ok(true)
    }

    /// Reading a batch of the model failed (its file changed or went away):
    /// no more batches are sent and the generation waiting for them is
    /// cancelled, so that the session is left ready for the next request;
    /// the error is what the generation ends with. Any other failure (the
    /// channel) is returned as it is.
    fn abandon_load(
        &mut self,
        e: NormalError,
        stream: &mut crate::feeder::ChunkStream,
        cancel_sent: &mut bool,
    ) -> Result<NormalError> {
        if !matches!(e, NormalError::Model { .. }) {
            return Err(e);
        }
        stream.stop();
        if !*cancel_sent {
            self.send(&Request::Cancel)?;
            *cancel_sent = true;
        }
        Ok(e)
    }

    /// Sends the recall that is due (memory pressure first, then a
    /// `flexserve recall`), if any, and notes it as in flight.
    pub(crate) fn send_due_recall(&mut self, in_flight: &mut VecDeque<InFlightRecall>) -> Result<()> {
        let (requested, asker) = match self.pressure_due() {
            Some(n) => (n, None),
            None => match self.control_pending() {
                Some(p) => (p.amount.granules(self.info.granule_size), Some(p)),
                None => return Ok(()),
            },
        };
        self.send(&Request::Recall { granules: requested })?;
        in_flight.push_back(InFlightRecall { requested, sent: Instant::now(), asker });
        Ok(())
    }

    /// Notes what a recall sent during a generation got back, and tells the
    /// client that asked for it, if one did.
    pub(crate) fn recall_answered(
        &mut self,
        recall: InFlightRecall,
        released: u32,
        evicted: u32,
        micros: u64,
        during: bool,
    ) {
        let took = recall.sent.elapsed();
        self.note_recall(recall.requested, released, evicted, took, during, recall.asker.is_some());
        if let Some(asker) = recall.asker {
            asker.answer(Ok(self.answer(released, evicted, micros)));
        }
    }

    /// Perplexity of `text` under the model, scored in the secure world:
    /// (tokens, chunks, perplexity, its standard error).
    pub fn perplexity(&mut self, model: &OpenedModel, text: String, n_ctx: u32) -> Result<(u32, u32, f64, f64)> {
        self.make_resident(model)?;
        let request = Request::Perplexity { model: model.id, text, n_ctx };
        loop {
            match self.call(&request)? {
                Reply::Perplexity { tokens, chunks, ppl, ppl_err } => return Ok((tokens, chunks, ppl, ppl_err)),
                Reply::MemoryNeeded { granules } => self.grant_for_kv_cache(granules)?,
                other => return Err(unexpected("Perplexity", &other)),
            }
        }
    }

    /// Grants what a generation needs (its KV cache, activations and the
    /// layers it has yet to load), all of it or a budget error.
    pub(crate) fn grant_for_kv_cache(&mut self, granules: u32) -> Result<()> {
        let mut short = u64::from(granules).saturating_sub(self.grant(u64::from(granules))?);
        // The budget is spent: give up layers of the models the scheduler
        // named, in its order; their granules stay granted and serve this request.
        for model in self.eviction_order.clone() {
            if short == 0 {
                break;
            }
            let (freed, _, _) = self.evict(model, short as u32)?;
            short = short.saturating_sub(u64::from(freed));
        }
        if short > 0 {
            return Err(NormalError::Budget(format!(
                "the request needs {granules} more granules of {} bytes (weights not resident, KV cache, \
                 activations); the secure memory limit ({} granules) is reached",
                self.info.granule_size, self.budget_granules
            )));
        }
        Ok(())
    }
}
