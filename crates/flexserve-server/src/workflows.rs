//! `POST /v1/workflows/run` and `GET /v1/workflows`: the daemon runs a
//! declared multi-model workflow (`docs/workflows.md`) step by step on the
//! models it serves, each step's output streamed as it comes, then the
//! workflow's answer. Sealed steps run in their model's secure world
//! session; plain ones in this process.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive as SseKeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flexserve_engine::encoder::{join_passages, PassageIndex};
use flexserve_protocol::Message;
use flexserve_workflow::{Outputs, Retrieval, Step, StepKind, Workflow};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use crate::api::{parse, Body};
use crate::api::{ApiError, ErrorKind};
use crate::jobs::{Command, Event, Finish, GenParams, Job, JobInput};
use crate::jobs::{EmbedInput, EmbedJob, Embeddings};
use crate::registry::{Lease, ModelEntry};
use crate::worker::Kind;
use crate::AppState;

/// A workflow the daemon serves, with the served model each of its models runs on.
pub struct ServedWorkflow {
    pub workflow: Workflow,
    /// The daemon's model name for each of the workflow's models (by index).
    pub models: Vec<String>,
    /// Each retrieve step's passages with their embeddings (by step index),
    /// made when the step first runs and kept for the daemon's life.
    indexes: Vec<tokio::sync::OnceCell<PassageIndex>>,
}

impl ServedWorkflow {
    /// `workflow` served with `models[i]` running its model `i`.
    pub fn new(workflow: Workflow, models: Vec<String>) -> ServedWorkflow {
        let indexes = workflow.steps.iter().map(|_| tokio::sync::OnceCell::new()).collect();
        ServedWorkflow { workflow, models, indexes }
    }
}

/// The served workflows, by name.
pub type Workflows = BTreeMap<String, Arc<ServedWorkflow>>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunRequest {
    workflow: String,
    input: String,
    #[serde(default)]
    stream: bool,
}

/// What one step did.
struct StepDone {
    step: usize,
    finish: Finish,
    first_token_ms: Option<f64>,
    /// Its model's state as the step started ("loading": a prefetch was in flight).
    model_state: &'static str,
    /// How long the step waited for its model to load (or a prefetch to open it).
    load_wait_ms: f64,
}

/// The next step's model, loaded while a step runs: started once the
/// running step holds what it needs. A plain or retrieve step takes no
/// secure memory; a sealed one has its weights loaded, its KV cache and
/// first activations taken by its first token. The load is the registry's
/// prefetch: the next step's lease waits for the model's opening, its
/// weights load only if the budget holds them beside what is in use, and
/// the next step's request stops them (its own load streams the rest).
struct NextModelPrefetch {
    state: Arc<AppState>,
    /// Taken when the load starts.
    entry: Option<Arc<ModelEntry>>,
}

impl NextModelPrefetch {
    fn start(&mut self) {
        if let Some(entry) = self.entry.take() {
            let state = self.state.clone();
            tokio::spawn(async move { state.registry.prefetch(&entry, &state.metrics).await });
        }
    }
}

/// The served model of the first step after position `at` of the order
/// that runs on another served model than the step at `at` (two of the
/// workflow's models with the same file are one served model).
fn next_other_model(served: &ServedWorkflow, at: usize) -> Option<&str> {
    let wf = &served.workflow;
    let model_of = |s: usize| served.models[wf.steps[s].model].as_str();
    let order = wf.order();
    let current = model_of(order[at]);
    order[at + 1..].iter().map(|&s| model_of(s)).find(|&m| m != current)
}

pub async fn list(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .workflows
        .iter()
        .map(|(name, w)| {
            let steps: Vec<Value> = w
                .workflow
                .order()
                .iter()
                .map(|&s| {
                    let step = &w.workflow.steps[s];
                    let kind = match step.kind {
                        StepKind::Generate => "generate",
                        StepKind::Retrieve(_) => "retrieve",
                    };
                    json!({"name": step.name, "model": w.models[step.model], "kind": kind})
                })
                .collect();
            json!({"id": name, "object": "workflow", "description": w.workflow.description, "steps": steps})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn run(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        let req: RunRequest = parse(&body)?;
        let served = state.workflows.get(&req.workflow).cloned().ok_or_else(|| {
            let known: Vec<&str> = state.workflows.keys().map(String::as_str).collect();
            ApiError::new(
                ErrorKind::NotFound,
                format!("workflow {:?} is not served here (workflows: {})", req.workflow, known.join(", ")),
            )
        })?;
        if req.stream {
            Ok(stream(state.clone(), served, req.input))
        } else {
            whole(&state, &served, &req.input).await
        }
    }
    .await;
    result.unwrap_or_else(|e: ApiError| e.into_response())
}

async fn whole(state: &Arc<AppState>, served: &ServedWorkflow, input: &str) -> Result<Response, ApiError> {
    let started = Instant::now();
    let (outputs, done) = run_steps(state, served, input, &mut |_| true).await?;
    let wf = &served.workflow;
    let steps: Vec<Value> = done.iter().map(|d| step_json(served, &outputs, d)).collect();
    Ok(Json(json!({
        "object": "workflow.run", "workflow": wf.name,
        "answer": outputs.get(wf.output_step()).unwrap_or_default(),
        "steps": steps, "total_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
    .into_response())
}

fn step_json(served: &ServedWorkflow, outputs: &Outputs, d: &StepDone) -> Value {
    let step = &served.workflow.steps[d.step];
    json!({
        "name": step.name, "model": served.models[step.model],
        "output": outputs.get(d.step).unwrap_or_default(),
        "finish_reason": d.finish.finish_reason, "first_token_ms": d.first_token_ms,
        "model_state": d.model_state, "load_wait_ms": d.load_wait_ms,
        "usage": {"prompt_tokens": d.finish.prompt_tokens, "completion_tokens": d.finish.completion_tokens},
    })
}

/// Server-sent events: `{"type": "step", ...}` as a step starts, `{"type":
/// "text", "step", "text"}` for each piece, `{"type": "step_done", ...}`, then
/// `{"type": "answer", "text"}` and `[DONE]`; a failing step sends
/// `{"type": "error", "step", "error"}` and `[DONE]`.
fn stream(state: Arc<AppState>, served: Arc<ServedWorkflow>, input: String) -> Response {
    // Unbounded: each step's pieces are bounded by its max_tokens, and a
    // piece is never dropped for a slow reader.
    let (out, sse) = mpsc::unbounded_channel::<SseEvent>();
    tokio::spawn(async move {
        let send = |value: Value| out.send(SseEvent::default().data(value.to_string())).is_ok();
        // A closed stream (the client went away) stops the run.
        let mut on_event = |value: Value| send(value);
        let last = match run_steps(&state, &served, &input, &mut on_event).await {
            Ok((outputs, _)) => {
                let answer = outputs.get(served.workflow.output_step()).unwrap_or_default();
                json!({"type": "answer", "text": answer})
            }
            Err(e) => json!({"type": "error", "error": e.body()["error"]}),
        };
        if send(last) {
            let _ = out.send(SseEvent::default().data("[DONE]"));
        }
    });
    let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(sse).map(Ok::<_, Infallible>);
    Sse::new(stream).keep_alive(SseKeepAlive::default()).into_response()
}

/// Runs the steps in order on the served models; `on_event` gets each
/// step's start, pieces and end (false: the client went away, stop).
async fn run_steps(
    state: &Arc<AppState>,
    served: &ServedWorkflow,
    input: &str,
    on_event: &mut (dyn FnMut(Value) -> bool + Send),
) -> Result<(Outputs, Vec<StepDone>), ApiError> {
    let wf = &served.workflow;
    let mut outputs = Outputs::new(wf.steps.len());
    let mut done = Vec::new();
    let order = wf.order();
    for (at, &s) in order.iter().enumerate() {
        let step = &wf.steps[s];
        let model = &served.models[step.model];
        let named = |e: ApiError| ApiError::new(e.kind, format!("step {:?} (model {model}): {}", step.name, e.message));
        let render_failed =
            |e: flexserve_workflow::WorkflowError| ApiError::new(ErrorKind::InvalidRequest, e.to_string());
        let prompt = wf.render_prompt(s, input, &outputs).map_err(render_failed).map_err(named)?;
        let system = wf.render_system(s, input, &outputs).map_err(render_failed).map_err(named)?;
        let entry = state.registry.entry(model).map_err(named)?;
        let model_state = entry.state().name();
        if !on_event(json!({"type": "step", "step": step.name, "model": model, "model_state": model_state})) {
            return Err(ApiError::new(ErrorKind::InvalidRequest, "the client went away"));
        }
        let next = match next_other_model(served, at) {
            Some(m) if state.registry.settings.workflow_prefetch => Some(state.registry.entry(m).map_err(named)?),
            _ => None,
        };
        let mut prefetch = NextModelPrefetch { state: state.clone(), entry: next };
        let waited = Instant::now();
        let lease = state.registry.lease(&entry, None, &state.metrics).await.map_err(named)?;
        let load_wait_ms = waited.elapsed().as_secs_f64() * 1e3;
        let sealed_generation = entry.kind == Kind::Sealed && matches!(step.kind, StepKind::Generate);
        if !sealed_generation {
            prefetch.start();
        }
        let started = Instant::now();
        let (text, finish, first_token_ms) = match &step.kind {
            StepKind::Generate => generate_step(state, &lease, step, prompt, system, &mut prefetch, &mut *on_event)
                .await
                .map_err(named)?,
            StepKind::Retrieve(retrieval) => {
                let index =
                    served.indexes[s].get_or_try_init(|| passage_index(&lease, retrieval)).await.map_err(named)?;
                let query = embed(&lease, vec![EmbedInput::Text(prompt)]).await.map_err(named)?;
                let found = join_passages(&index.search(&query.vectors[0], retrieval.passages));
                let first_token_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                if !on_event(json!({"type": "text", "step": step.name, "text": found})) {
                    return Err(ApiError::new(ErrorKind::InvalidRequest, "the client went away"));
                }
                let finish = Finish {
                    prompt_tokens: query.prompt_tokens,
                    completion_tokens: 0,
                    prompt_ms: started.elapsed().as_secs_f64() * 1e3,
                    predicted_ms: 0.0,
                    finish_reason: "stop",
                };
                (found, finish, first_token_ms)
            }
        };
        drop(lease);
        on_event(json!({
            "type": "step_done", "step": step.name, "finish_reason": finish.finish_reason,
            "usage": {"prompt_tokens": finish.prompt_tokens, "completion_tokens": finish.completion_tokens},
        }));
        outputs.set(s, text);
        done.push(StepDone { step: s, finish, first_token_ms, model_state, load_wait_ms });
    }
    Ok((outputs, done))
}

/// A generation step on its model's backend: its text, how it ended, and
/// when its first piece came (ms from its start). `prefetch` starts with
/// the first piece at the latest.
async fn generate_step(
    state: &Arc<AppState>,
    lease: &Lease,
    step: &Step,
    prompt: String,
    system: Option<String>,
    prefetch: &mut NextModelPrefetch,
    on_event: &mut (dyn FnMut(Value) -> bool + Send),
) -> Result<(String, Finish, Option<f64>), ApiError> {
    let job_input = if step.chat {
        let mut messages: Vec<Message> = Vec::new();
        if let Some(system) = system {
            messages.push(Message { role: "system".to_string(), content: system });
        }
        messages.push(Message { role: "user".to_string(), content: prompt });
        JobInput::Chat(messages)
    } else {
        JobInput::Prompt(prompt)
    };
    let sampling = &step.sampling;
    let params = GenParams {
        max_tokens: step.max_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        min_p: sampling.min_p,
        seed: sampling.seed.unwrap_or(0),
        stop: step.stop.clone(),
        n_ctx: state.ctx,
    };
    let (tx, mut rx) = mpsc::channel(64);
    let started = Instant::now();
    let cancelled = state.metrics.cancelled.clone();
    lease.backend.submit(Command::Generate(Job { input: job_input, params, events: tx, cancelled }))?;
    let mut text = String::new();
    let mut first_token_ms = None;
    let finish = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => {
                if first_token_ms.is_none() {
                    first_token_ms = Some(started.elapsed().as_secs_f64() * 1e3);
                    prefetch.start();
                }
                if !on_event(json!({"type": "text", "step": step.name, "text": t})) {
                    // Dropping the receiver cancels the generation.
                    return Err(ApiError::new(ErrorKind::InvalidRequest, "the client went away"));
                }
                text.push_str(&t);
            }
            Some(Event::Done(f)) => break f,
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::new(ErrorKind::Internal, "the model stopped without an answer")),
        }
    };
    Ok((text, finish, first_token_ms))
}

/// Embeddings of `inputs` from the leased (encoder) backend.
async fn embed(lease: &Lease, inputs: Vec<EmbedInput>) -> Result<Embeddings, ApiError> {
    let (reply, answer) = tokio::sync::oneshot::channel();
    lease.backend.submit(Command::Embed(EmbedJob { inputs, reply }))?;
    answer.await.map_err(|_| ApiError::new(ErrorKind::Internal, "the model stopped without an answer"))?
}

/// A retrieve step's passages, each embedded with the step's prefix.
async fn passage_index(lease: &Lease, retrieval: &Retrieval) -> Result<PassageIndex, ApiError> {
    let documents = retrieval.clone();
    let passages = tokio::task::spawn_blocking(move || documents.read_passages())
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("reading the documents: {e}")))?
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    let inputs = passages.iter().map(|p| EmbedInput::Text(format!("{}{p}", retrieval.prefix))).collect();
    let embedded = embed(lease, inputs).await?;
    PassageIndex::new(passages, embedded.vectors)
        .ok_or_else(|| ApiError::new(ErrorKind::Internal, "the encoder did not embed every passage"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_next_model_is_that_of_the_next_step_on_another_served_model() {
        let text = r#"
name = "w"
[models.a]
path = "a.fsm"
[models.b]
path = "b.gguf"
[models.c]
path = "a2.fsm"
[[steps]]
name = "one"
model = "a"
prompt = "{{ input }}"
[[steps]]
name = "two"
model = "a"
prompt = "{{ steps.one }}"
[[steps]]
name = "three"
model = "c"
prompt = "{{ steps.two }}"
[[steps]]
name = "four"
model = "b"
prompt = "{{ steps.three }}"
"#;
        let workflow = Workflow::parse(text, std::path::Path::new("w.toml")).unwrap();
        // Models a and c are one served model (the same file).
        let served = ServedWorkflow::new(workflow, vec!["m1".into(), "m2".into(), "m1".into()]);
        assert_eq!(served.workflow.order(), [0, 1, 2, 3]);
        assert_eq!(next_other_model(&served, 0), Some("m2"));
        assert_eq!(next_other_model(&served, 2), Some("m2"));
        assert_eq!(next_other_model(&served, 3), None);
    }
}
