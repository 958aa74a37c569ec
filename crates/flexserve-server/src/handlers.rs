//! The HTTP endpoints: completions (streamed as server-sent events or not),
//! models, load and unload, health, status and metrics.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive as SseKeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use flexserve_protocol::Message;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::api::{self, ApiError, ChatRequest, CompletionRequest, ErrorKind, ModelRequest, Params, Timings, Usage};
use crate::api::{parse, Body};
use crate::jobs::{Command, Event, Finish, GenParams, Job, JobInput};
use crate::registry::{Lease, LoadState};
use crate::worker::Kind;
use crate::AppState;

/// Events a job may have queued before the client reads them.
const EVENT_BUFFER: usize = 64;

fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Checks the sampling parameters and fills in defaults.
fn gen_params(p: &Params, ctx: u32) -> Result<GenParams, ApiError> {
    let bad = |param: &'static str, what: String| Err(ApiError::bad_request(what, Some(param)));
    let defaults = flexserve_protocol::Sampling::default();
    const MAX_TOKENS: u32 = flexserve_protocol::MAX_GENERATED_TOKENS;
    let max_tokens = p.max_completion_tokens.or(p.max_tokens).unwrap_or(api::DEFAULT_MAX_TOKENS);
    if max_tokens == 0 || max_tokens > MAX_TOKENS {
        return bad("max_tokens", format!("max_tokens must be between 1 and {MAX_TOKENS}, got {max_tokens}"));
    }
    let temperature = p.temperature.unwrap_or(defaults.temperature);
    if !temperature.is_finite() || !(0.0..=100.0).contains(&temperature) {
        return bad("temperature", format!("temperature must be between 0 and 100, got {temperature}"));
    }
    let top_p = p.top_p.unwrap_or(defaults.top_p);
    if !top_p.is_finite() || !(0.0..=1.0).contains(&top_p) || top_p == 0.0 {
        return bad("top_p", format!("top_p must be in (0, 1], got {top_p}"));
    }
    let min_p = p.min_p.unwrap_or(defaults.min_p);
    if !min_p.is_finite() || !(0.0..=1.0).contains(&min_p) {
        return bad("min_p", format!("min_p must be in [0, 1], got {min_p}"));
    }
    let stop = p.stop.clone().map(api::Stop::into_vec).unwrap_or_default();
    use flexserve_protocol::{MAX_STOP_BYTES, MAX_STOP_STRINGS};
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return bad("stop", format!("at most {MAX_STOP_STRINGS} stop strings of at most {MAX_STOP_BYTES} bytes"));
    }
    Ok(GenParams {
        max_tokens,
        temperature,
        top_p,
        top_k: p.top_k.unwrap_or(defaults.top_k),
        min_p,
        seed: p.seed.unwrap_or(defaults.seed),
        stop,
        n_ctx: ctx,
    })
}

/// Which endpoint a completion came through (they differ in their bodies).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Chat,
    Completion,
}

pub async fn chat_completions(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        let req: ChatRequest = parse(&body)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_request("messages must not be empty", Some("messages")));
        }
        let mut messages = Vec::with_capacity(req.messages.len());
        for m in req.messages {
            if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
                return Err(ApiError::bad_request(format!("unknown message role {:?}", m.role), Some("messages")));
            }
            let role = if m.role == "developer" { "system".to_string() } else { m.role };
            messages.push(Message { role, content: m.content.into_text()? });
        }
        complete(&state, Endpoint::Chat, &req.model, JobInput::Chat(messages), &req.params).await
    }
    .await;
    result.unwrap_or_else(|e| failed(&state, e))
}

pub async fn completions(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        let req: CompletionRequest = parse(&body)?;
        complete(&state, Endpoint::Completion, &req.model, JobInput::Prompt(req.prompt), &req.params).await
    }
    .await;
    result.unwrap_or_else(|e| failed(&state, e))
}

fn failed(state: &AppState, e: ApiError) -> Response {
    state.metrics.errors.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}

async fn complete(
    state: &Arc<AppState>,
    endpoint: Endpoint,
    model: &str,
    input: JobInput,
    p: &Params,
) -> Result<Response, ApiError> {
    state.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let params = gen_params(p, state.ctx)?;
    let keep_alive = p.keep_alive.as_ref().map(api::keep_alive).transpose()?;
    let entry = state.registry.entry(model)?;
    // Named now, so that an unknown one fails the request before it runs.
    let next = p.next_model.as_deref().map(|n| state.registry.entry(n)).transpose()?;
    let lease = state.registry.lease(&entry, keep_alive, &state.metrics).await?;
    let (tx, rx) = mpsc::channel(EVENT_BUFFER);
    let started = Instant::now();
    let cancelled = state.metrics.cancelled.clone();
    lease.backend.submit(Command::Generate(Job { input, params, events: tx, cancelled }))?;
    let reply =
        Reply { state: state.clone(), endpoint, model: model.to_string(), created: now_seconds(), started, next };
    if p.stream {
        let include_usage = p.stream_options.as_ref().is_some_and(|o| o.include_usage);
        Ok(reply.stream(rx, lease, include_usage))
    } else {
        reply.whole(rx, lease).await
    }
}

/// The answer to one completion request.
struct Reply {
    state: Arc<AppState>,
    endpoint: Endpoint,
    model: String,
    created: u64,
    started: Instant,
    /// The model the client said it asks next: loaded once this answer is done.
    next: Option<Arc<crate::registry::ModelEntry>>,
}

impl Reply {
    fn id(&self) -> String {
        let n = self.state.next_id.fetch_add(1, Ordering::Relaxed);
        match self.endpoint {
            Endpoint::Chat => format!("chatcmpl-{n}"),
            Endpoint::Completion => format!("cmpl-{n}"),
        }
    }

    fn record(&self, finish: &Finish) {
        let m = &self.state.metrics;
        m.prompt_tokens.fetch_add(u64::from(finish.prompt_tokens), Ordering::Relaxed);
        m.generated_tokens.fetch_add(u64::from(finish.completion_tokens), Ordering::Relaxed);
        // The answer is done: the next model loads now, not beside its generation.
        if let Some(next) = self.next.clone() {
            let state = self.state.clone();
            tokio::spawn(async move { state.registry.prefetch(&next, &state.metrics).await });
        }
    }

    async fn whole(self, mut rx: mpsc::Receiver<Event>, lease: Lease) -> Result<Response, ApiError> {
        let mut text = String::new();
        let mut first = None;
        let finish = loop {
            match rx.recv().await {
                Some(Event::Text(t)) => {
                    first.get_or_insert_with(Instant::now);
                    text.push_str(&t);
                }
                Some(Event::Done(f)) => break f,
                Some(Event::Failed(e)) => return Err(e),
                None => return Err(ApiError::new(ErrorKind::Internal, "the model stopped without an answer")),
            }
        };
        drop(lease);
        if let Some(t) = first {
            self.state.metrics.ttft.observe((t - self.started).as_secs_f64());
        }
        self.record(&finish);
        let choice = match self.endpoint {
            Endpoint::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish.finish_reason,
            }),
            Endpoint::Completion => json!({
                "index": 0, "text": text, "logprobs": null, "finish_reason": finish.finish_reason,
            }),
        };
        let object = if self.endpoint == Endpoint::Chat { "chat.completion" } else { "text_completion" };
        Ok(Json(json!({
            "id": self.id(),
            "object": object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage(&finish),
            "timings": timings(&finish),
        }))
        .into_response())
    }

    fn chunk(&self, id: &str, choices: Value) -> SseEvent {
        let object = if self.endpoint == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        let body =
            json!({"id": id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        SseEvent::default().data(body.to_string())
    }

    fn delta(&self, id: &str, text: &str, finish: Option<&'static str>, first: bool) -> SseEvent {
        let choice = match self.endpoint {
            Endpoint::Chat if first => {
                json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish})
            }
            Endpoint::Chat if finish.is_some() => json!({"index": 0, "delta": {}, "finish_reason": finish}),
            Endpoint::Chat => json!({"index": 0, "delta": {"content": text}, "finish_reason": finish}),
            Endpoint::Completion => json!({"index": 0, "text": text, "logprobs": null, "finish_reason": finish}),
        };
        self.chunk(id, json!([choice]))
    }

    /// Server-sent events in the OpenAI chunk format, ending with `[DONE]`.
    /// The client going away drops the stream and so the receiver: the
    /// backend sees it and cancels the generation.
    fn stream(self, mut rx: mpsc::Receiver<Event>, lease: Lease, include_usage: bool) -> Response {
        let (out, sse) = mpsc::channel::<SseEvent>(EVENT_BUFFER);
        tokio::spawn(async move {
            let _lease = lease;
            let id = self.id();
            let mut first = true;
            let mut last_token: Option<Instant> = None;
            while let Some(event) = rx.recv().await {
                let events: Vec<SseEvent> = match event {
                    Event::Text(t) => {
                        let now = Instant::now();
                        match last_token {
                            None => self.state.metrics.ttft.observe((now - self.started).as_secs_f64()),
                            Some(prev) => self.state.metrics.token_latency.observe((now - prev).as_secs_f64()),
                        }
                        last_token = Some(now);
                        let e = self.delta(&id, &t, None, first);
                        first = false;
                        vec![e]
                    }
                    Event::Done(f) => {
                        self.record(&f);
                        let mut events = vec![self.delta(&id, "", Some(f.finish_reason), first)];
                        if include_usage {
                            let body = json!({
                                "id": id, "object": "chat.completion.chunk", "created": self.created,
                                "model": self.model, "choices": [], "usage": usage(&f), "timings": timings(&f),
                            });
                            events.push(SseEvent::default().data(body.to_string()));
                        }
                        events.push(SseEvent::default().data("[DONE]"));
                        events
                    }
                    Event::Failed(e) => {
                        self.state.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        vec![SseEvent::default().data(e.body().to_string()), SseEvent::default().data("[DONE]")]
                    }
                };
                for e in events {
                    // The client went away: dropping `rx` here tells the backend to cancel.
                    if out.send(e).await.is_err() {
                        return;
                    }
                }
            }
        });
        let stream = ReceiverStream::new(sse).map(Ok::<_, Infallible>);
        Sse::new(stream).keep_alive(SseKeepAlive::default()).into_response()
    }
}

fn usage(f: &Finish) -> Usage {
    Usage {
        prompt_tokens: f.prompt_tokens,
        completion_tokens: f.completion_tokens,
        total_tokens: f.prompt_tokens + f.completion_tokens,
    }
}

fn timings(f: &Finish) -> Timings {
    let per_second = |n: u32, ms: f64| if ms > 0.0 { f64::from(n) * 1e3 / ms } else { 0.0 };
    Timings {
        prompt_n: f.prompt_tokens,
        prompt_ms: f.prompt_ms,
        prompt_per_second: per_second(f.prompt_tokens, f.prompt_ms),
        predicted_n: f.completion_tokens,
        predicted_ms: f.predicted_ms,
        predicted_per_second: per_second(f.completion_tokens.saturating_sub(1), f.predicted_ms),
    }
}

pub async fn list_models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let data: Vec<Value> = state
        .registry
        .models
        .values()
        .map(|e| {
            json!({
                "id": e.name, "object": "model", "created": 0, "owned_by": "flexserve",
                "state": e.state().name(), "sealed": e.kind == Kind::Sealed,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

pub async fn load_model(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        let req: ModelRequest = parse(&body)?;
        let entry = state.registry.entry(&req.model)?;
        drop(state.registry.lease(&entry, None, &state.metrics).await?);
        Ok::<_, ApiError>(Json(json!({"model": entry.name, "state": LoadState::Loaded.name()})).into_response())
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn unload_model(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        let req: ModelRequest = parse(&body)?;
        let entry = state.registry.entry(&req.model)?;
        let was_loaded = state.registry.unload(&entry).await;
        Ok::<_, ApiError>(
            Json(json!({"model": entry.name, "state": "unloaded", "was_loaded": was_loaded})).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(IntoResponse::into_response)
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    if state.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, Json(json!({"status": "ok"}))).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading models"}))).into_response()
    }
}

/// The secure world's status as each loaded sealed model's session sees it.
async fn secure_statuses(state: &AppState) -> Vec<(String, Result<flexserve_protocol::StatusReport, String>)> {
    let mut out = Vec::new();
    for (entry, backend) in state.registry.loaded().await {
        if backend.kind != Kind::Sealed {
            continue;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let status = match backend.submit(Command::Status(tx)) {
            Ok(()) => rx.await.unwrap_or_else(|_| Err("the session ended".to_string())),
            Err(e) => Err(e.message),
        };
        out.push((entry.name.clone(), status));
    }
    out
}

pub async fn status(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .registry
        .models
        .values()
        .map(|e| {
            json!({
                "name": e.name, "path": e.path.display().to_string(), "sealed": e.kind == Kind::Sealed,
                "state": e.state().name(), "in_flight": e.in_flight.load(Ordering::SeqCst),
            })
        })
        .collect();
    let secure: Vec<Value> = secure_statuses(&state)
        .await
        .into_iter()
        .map(|(name, s)| match s {
            Ok(s) => json!({
                "model": name, "deployment": format!("{:?}", s.deployment).to_lowercase(),
                "unprotected": s.deployment == flexserve_protocol::Deployment::Development,
                "secure_uid": s.secure_uid, "protection": s.protection, "pool_mode": s.pool_mode,
                "granule_size": s.granule_size, "granted": s.granted, "prepared": s.prepared, "in_use": s.in_use,
                "policy": s.policy, "warnings": s.warnings,
                "models": s.models.iter().map(|m| json!({
                    "name": m.name, "layers": m.layers, "resident_layers": m.resident_layers,
                    "kv_granules": m.kv_granules,
                })).collect::<Vec<_>>(),
            }),
            Err(e) => json!({"model": name, "error": e}),
        })
        .collect();
    let reserve = state.reserve_figures().map(|r| {
        json!({
            "granules": r.target, "free": r.free, "granted": r.granted, "granule_size": r.granule_size,
            "prepared_ms": r.prepared_in.map(|d| d.as_secs_f64() * 1e3),
            "grown_in_background": r.grown, "granted_for_models": r.granted_for_sessions,
            "recalled": r.recalled, "lost": r.lost,
        })
    });
    let cores = match &state.cores {
        None => json!({"sharing": "split"}),
        Some(arbiter) => {
            let f = arbiter.figures();
            let turns: Vec<Value> = f
                .turns
                .iter()
                .map(|t| json!({"owner": t.owner.name(), "from_ms": t.from_ms, "to_ms": t.to_ms}))
                .collect();
            json!({
                "sharing": "lease", "secure_turns": f.secure_turns, "normal_turns": f.normal_turns,
                "changes_of_owner": f.changes_of_owner, "secure_pauses": f.secure_pauses,
                "unscrubbed_pauses": f.unscrubbed_pauses, "turns": turns,
            })
        }
    };
    Json(json!({"models": models, "secure_world": secure, "secure_reserve": reserve, "cores": cores}))
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let loaded = state.registry.models.values().filter(|e| e.state() == LoadState::Loaded).count() as u64;
    let (mut granted, mut in_use) = (0u64, 0u64);
    for (_, s) in secure_statuses(&state).await {
        if let Ok(s) = s {
            // Every session sees the same pool: its figures, not a sum.
            granted = granted.max(u64::from(s.granted) * s.granule_size);
            in_use = in_use.max(u64::from(s.in_use) * s.granule_size);
        }
    }
    let gauges =
        crate::metrics::Gauges { models_loaded: loaded, secure_granted_bytes: granted, secure_in_use_bytes: in_use };
    ([("content-type", "text/plain; version=0.0.4")], state.metrics.render(&gauges)).into_response()
}

/// The secure world's identity report, as it signed it: the report's exact
/// text (verify the signature over these bytes) and the signature.
pub async fn secure_identity(State(state): State<Arc<AppState>>) -> Response {
    let connect = state.registry.settings.connect.clone();
    let fetched = tokio::task::spawn_blocking(move || -> Result<(String, String), String> {
        let mut world = connect()?;
        world.identity().map_err(|e| e.to_string())
    })
    .await;
    match fetched {
        Ok(Ok((report, signature))) => Json(json!({"report": report, "signature": signature})).into_response(),
        Ok(Err(e)) => ApiError::new(ErrorKind::Unavailable, format!("the secure world's identity: {e}"))
            .with_code("secure_world_unavailable")
            .into_response(),
        Err(e) => ApiError::new(ErrorKind::Internal, e.to_string()).into_response(),
    }
}
