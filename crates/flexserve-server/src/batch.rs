//! Plain models, continuously batched: one thread holds up to `slots`
//! requests; a new request is prefilled on its own and joins the batch at
//! the next step, a finished or abandoned one leaves it, and every step
//! evaluates one token of each request in one pass over the weights
//! ([`Session::decode_batch`]), so that several streams cost little more
//! than one.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use flexserve_engine::generate::GenerateOptions;
use flexserve_engine::weights::GgufSource;
use flexserve_engine::{EngineError, Logits, Model, Next, SamplingParams, Session, TokenStream};
use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};
use tokio::sync::mpsc as async_mpsc;

use crate::api::{ApiError, ErrorKind};
use crate::jobs::{context_exceeded, finish_reason, refuse_on_plain, Command, Event, Finish, Job, JobInput};
use crate::lease::{CoreArbiter, Owner};

/// A plain model in this process.
pub(crate) struct PlainModel {
    path: PathBuf,
    model: Model,
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    /// The cores' lease (`--cores lease`): each step takes it.
    cores: Option<Arc<CoreArbiter>>,
}

/// A request in the batch.
struct Active<'m> {
    session: Session<'m>,
    tokens: TokenStream<'m>,
    /// Logits to sample the next token from.
    logits: Vec<f32>,
    events: async_mpsc::Sender<Event>,
    cancelled: Arc<AtomicU64>,
    prompt_tokens: u32,
    prompt_ms: f64,
    decode_started: Option<Instant>,
}

impl PlainModel {
    /// `file` is `path`, opened.
    pub(crate) fn open(
        path: &Path,
        file: flexserve_gguf::GgufFile,
        threads: usize,
        cores: Option<Arc<CoreArbiter>>,
    ) -> Result<PlainModel, String> {
        let source = GgufSource::from_file(Arc::new(file));
        let meta = &source.header().metadata;
        let tokenizer = Tokenizer::from_gguf(meta).map_err(|e| format!("tokenizer of {}: {e}", path.display()))?;
        let template = ChatTemplate::from_gguf(meta, &tokenizer)
            .map_err(|e| format!("chat template of {}: {e}", path.display()))?;
        let model = Model::from_source(&source, threads).map_err(|e| format!("loading {}: {e}", path.display()))?;
        Ok(PlainModel { path: path.to_path_buf(), model, tokenizer, template, cores })
    }

    /// Runs `work` (a prefill or a batch step) holding the cores when they
    /// are leased; when the secure world waits for them next, nothing of this
    /// world's prompts stays in the workers' scratch.
    fn on_cores<T>(&self, work: impl FnOnce() -> T) -> T {
        let Some(arbiter) = &self.cores else { return work() };
        let _turn = arbiter.acquire(Owner::Normal);
        let out = work();
        if arbiter.contended_by_other_than(Owner::Normal) {
            self.model.scrub_worker_scratch();
        }
        out
    }

    /// Serves commands until the queue closes and the batch is empty.
    pub(crate) fn serve(&self, rx: &mpsc::Receiver<Command>, slots: usize) {
        let mut batch: Vec<Active> = Vec::new();
        loop {
            // Admit: wait while idle, else take what is queued, up to the slots.
            while batch.len() < slots {
                let next = if batch.is_empty() {
                    rx.recv().map_err(|_| mpsc::TryRecvError::Disconnected)
                } else {
                    rx.try_recv()
                };
                match next {
                    Ok(Command::Generate(job)) => {
                        if let Some(active) = self.start(job) {
                            batch.push(active);
                        }
                    }
                    Ok(other) => refuse_on_plain(other),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) if batch.is_empty() => return,
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
            }
            batch = self.step(batch);
        }
    }

    /// Samples a token for every request; those that go on are evaluated
    /// together. Returns the requests still running.
    fn step<'m>(&'m self, batch: Vec<Active<'m>>) -> Vec<Active<'m>> {
        let mut going: Vec<(Active<'m>, u32)> = Vec::with_capacity(batch.len());
        for mut a in batch {
            if a.events.is_closed() {
                a.cancelled.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let room = a.session.n_past() < a.session.n_ctx();
            let events = a.events.clone();
            let next = a.tokens.step(&a.logits, room, &mut |text| {
                let _ = events.blocking_send(Event::Text(text.to_string()));
            });
            let started = *a.decode_started.get_or_insert_with(Instant::now);
            match next {
                Next::Evaluate(id) => going.push((a, id)),
                Next::Done(stop) => {
                    let finish = Finish {
                        prompt_tokens: a.prompt_tokens,
                        completion_tokens: a.tokens.generated().len() as u32,
                        prompt_ms: a.prompt_ms,
                        predicted_ms: started.elapsed().as_secs_f64() * 1e3,
                        finish_reason: finish_reason(stop),
                    };
                    let _ = a.events.blocking_send(Event::Done(finish));
                }
            }
        }
        if going.is_empty() {
            return Vec::new();
        }
        let ids: Vec<u32> = going.iter().map(|(_, id)| *id).collect();
        let result = {
            let mut sessions: Vec<&mut Session<'m>> = going.iter_mut().map(|(a, _)| &mut a.session).collect();
            self.on_cores(|| Session::decode_batch(&mut sessions, &ids))
        };
        match result {
            Ok(logits) => going
                .into_iter()
                .zip(logits)
                .map(|((mut a, _), l)| {
                    a.logits = l;
                    a
                })
                .collect(),
            Err(e) => {
                for (a, _) in going {
                    let _ = a.events.blocking_send(Event::Failed(ApiError::new(ErrorKind::Internal, e.to_string())));
                }
                Vec::new()
            }
        }
    }

    /// Prefills a new request on its own; `None` when it failed (its error
    /// already sent) or its client already left.
    fn start(&self, job: Job) -> Option<Active<'_>> {
        let events = job.events.clone();
        let cancelled = job.cancelled.clone();
        match self.prefill(job) {
            Ok(Some(active)) => Some(active),
            Ok(None) => {
                cancelled.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(e) => {
                let _ = events.blocking_send(Event::Failed(e));
                None
            }
        }
    }

    fn prefill(&self, job: Job) -> Result<Option<Active<'_>>, ApiError> {
        let text = match job.input {
            JobInput::Prompt(p) => p,
            JobInput::Chat(messages) => {
                let template = self.template.as_ref().ok_or_else(|| {
                    ApiError::bad_request(
                        format!("{} has no chat template: use /v1/completions", self.path.display()),
                        Some("messages"),
                    )
                })?;
                let turns: Vec<ChatMessage> =
                    messages.into_iter().map(|m| ChatMessage::new(m.role, m.content)).collect();
                template.render(&turns, true).map_err(|e| ApiError::bad_request(e.to_string(), Some("messages")))?
            }
        };
        let ids = self.tokenizer.encode(&text, true, true);
        if ids.is_empty() {
            return Err(ApiError::bad_request("the prompt is empty", Some("prompt")));
        }
        let p = &job.params;
        let limit = if p.n_ctx == 0 { self.model.config.n_ctx_train } else { p.n_ctx as usize };
        if ids.len() >= limit {
            return Err(context_exceeded(ids.len(), limit));
        }
        // The cache holds the prompt and what may be generated, within the context.
        let mut session = Session::new(&self.model, (ids.len() + p.max_tokens as usize).min(limit));
        let opts = GenerateOptions {
            max_tokens: p.max_tokens as usize,
            sampling: SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k as usize,
                top_p: p.top_p,
                min_p: p.min_p,
                seed: p.seed,
                ..SamplingParams::default()
            },
            stop: p.stop.clone(),
        };
        let tokens = TokenStream::new(&self.tokenizer, &opts, &ids);
        let events = job.events;
        let t0 = Instant::now();
        let logits = self.on_cores(|| {
            session.eval_with(&ids, Logits::Last, &mut |_| {
                if events.is_closed() {
                    Err(EngineError::Cancelled)
                } else {
                    Ok(())
                }
            })
        });
        let logits = match logits {
            Ok(l) => l,
            Err(EngineError::Cancelled) => return Ok(None),
            Err(EngineError::ContextFull { n_ctx, needed }) => return Err(context_exceeded(needed, n_ctx)),
            Err(e) => return Err(ApiError::new(ErrorKind::Internal, e.to_string())),
        };
        Ok(Some(Active {
            session,
            tokens,
            logits,
            events,
            cancelled: job.cancelled,
            prompt_tokens: ids.len() as u32,
            prompt_ms: t0.elapsed().as_secs_f64() * 1e3,
            decode_started: None,
        }))
    }
}
