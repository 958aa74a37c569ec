//! Continuous batching of a sealed model's generations in the secure world,
//! driven from here: a generation joins its model's batch with
//! [`SecureWorld::start_stream`] (its prompt evaluated, through the pipeline
//! if the model is not resident), every [`SecureWorld::step_streams`]
//! decodes one token of each stream in one pass over the weights, and
//! [`SecureWorld::end_stream`] drops one whose client left. Between two
//! steps the session is free for anything else (a new stream, a recall, a
//! pause for the cores).

use flexserve_protocol::{GenerateRequest, Reply, Request, StreamStep};

use crate::relay::{InFlightRecall, Relayed, Streamed};
use crate::{unexpected, OpenedModel, Result, SecureWorld};

impl SecureWorld {
    /// Admits `request` (a one-off generation, conversation 0) into the batch
    /// of `model` as `stream`, granting what its KV cache and prompt need and
    /// streaming the model's chunks if it is not resident; `cancelled` stops
    /// the prompt's evaluation (`Secure{Cancelled}`). Returns its first
    /// token (with its report if it ended there); the rest come from the steps.
    pub fn start_stream(
        &mut self,
        model: &OpenedModel,
        stream: u32,
        request: GenerateRequest,
        cancelled: impl Fn() -> bool,
    ) -> Result<StreamStep> {
        match self.relay(model, Request::StartStream { stream, request }, |_: Streamed<'_>| {}, cancelled, None)? {
            Relayed::Stepped(mut steps) if steps.len() == 1 && steps[0].stream == stream => {
                Ok(steps.pop().expect("one step"))
            }
            other => Err(other.unexpected("Stepped with the stream's first token")),
        }
    }

    /// One decode step of every stream of `model`: what each produced, and
    /// the reports of those that ended (and left the batch). Memory the
    /// step's activations need is granted first; a recall or `flexserve
    /// recall` that is due is served before the step.
    pub fn step_streams(&mut self, model: &OpenedModel) -> Result<Vec<StreamStep>> {
        let mut due = std::collections::VecDeque::<InFlightRecall>::new();
        self.send_due_recall(&mut due)?;
        if let Some(recall) = due.pop_front() {
            match self.receive()? {
                Reply::Recalled { released, evicted, micros } => {
                    self.recall_answered(recall, released, evicted, micros, true)
                }
                other => return Err(unexpected("Recalled", &other)),
            }
        }
        loop {
            match self.call(&Request::StepStreams { model: model.id })? {
                Reply::Stepped { streams } => return Ok(streams),
                Reply::MemoryNeeded { granules } => self.grant_for_kv_cache(granules)?,
                other => return Err(unexpected("Stepped", &other)),
            }
        }
    }

    /// Drops a stream from its batch (its client left); nothing if it ended already.
    pub fn end_stream(&mut self, stream: u32) -> Result<()> {
        match self.call(&Request::EndStream { stream })? {
            Reply::Ok => Ok(()),
            other => Err(unexpected("Ok", &other)),
        }
    }

    /// Between steps, when work of the normal world waits for the cores:
    /// the secure world scrubs its workers' scratch (`Pause` between
    /// requests) and the lease is handed over, then taken back. Whether it
    /// was contended.
    pub fn yield_cores_if_contended(&mut self) -> Result<bool> {
        let Some(lease) = self.lease.clone() else { return Ok(false) };
        if !lease.contended() {
            return Ok(false);
        }
        match self.call(&Request::Pause)? {
            Reply::Paused { scrubbed } => {
                lease.hand_over(scrubbed);
                Ok(true)
            }
            other => Err(unexpected("Paused", &other)),
        }
    }

    /// Between requests: the secure world scrubs its workers' scratch (a
    /// `Pause` with nothing running), before the cores go to the other
    /// world. Whether every worker's scratch read zero afterwards.
    pub fn scrub_cores(&mut self) -> Result<bool> {
        match self.call(&Request::Pause)? {
            Reply::Paused { scrubbed } => Ok(scrubbed),
            other => Err(unexpected("Paused", &other)),
        }
    }
}
