//! A plain OpenAI-compatible endpoint on the user's own machine: every chat
//! request it takes is sealed to the secure world and sent through the
//! daemon in an encrypted session; the answer is decrypted here. Any OpenAI
//! client pointed at it works unchanged, and the daemon reads nothing.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use flexserve_e2e::{ChatMessage, ChatRequest, Done, StopReason};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{mpsc, Mutex};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::remote::{Remote, Session};
use crate::ClientError;

/// Idle sessions kept per model for the next request (a request takes one
/// or opens a new one; concurrent requests each have their own).
const IDLE_SESSIONS_PER_MODEL: usize = 8;

/// The proxy's state: the checked remote and idle sessions by model.
pub struct Proxy {
    remote: Remote,
    idle: Mutex<HashMap<String, Vec<Session>>>,
    next_id: AtomicU64,
}

impl Proxy {
    pub fn new(remote: Remote) -> Arc<Proxy> {
        Arc::new(Proxy { remote, idle: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1) })
    }

    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/chat/completions", post(chat_completions))
            .route("/v1/models", get(models))
            .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
            .with_state(self.clone())
    }

    async fn session(&self, model: &str) -> Result<Session, ClientError> {
        if let Some(s) = self.idle.lock().await.get_mut(model).and_then(Vec::pop) {
            return Ok(s);
        }
        self.remote.open_session(model).await
    }

    async fn give_back(&self, session: Session) {
        let mut idle = self.idle.lock().await;
        let list = idle.entry(session.model.clone()).or_default();
        if list.len() < IDLE_SESSIONS_PER_MODEL {
            list.push(session);
        } else {
            drop(idle);
            self.remote.close_session(session).await;
        }
    }

    /// Runs one chat through a session, retrying once on a fresh session if
    /// the kept one had ended on the server's side (the model unloaded, the
    /// secure world restarted) before anything was sent.
    async fn chat(&self, request: &ChatRequest, mut on_text: impl FnMut(&str)) -> Result<Done, ClientError> {
        let mut session = self.session(&request.model).await?;
        let mut result = self.remote.chat(&mut session, request, &mut on_text).await;
        if let Err(ClientError::Server { code: Some(code), .. }) = &result {
            if code == "session_not_found" || code == "encrypted_session_ended" {
                session = self.remote.open_session(&request.model).await?;
                result = self.remote.chat(&mut session, request, &mut on_text).await;
            }
        }
        if result.is_ok() {
            self.give_back(session).await;
        }
        result
    }
}

/// The fields of an OpenAI chat request this endpoint honours.
#[derive(Deserialize)]
struct ChatBody {
    model: String,
    messages: Vec<MessageBody>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<u32>,
    #[serde(default)]
    min_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    #[serde(default)]
    stream: bool,
}

#[derive(Deserialize)]
struct MessageBody {
    role: String,
    content: Value,
}

/// Message content: a string, or an array of parts whose text parts are joined.
fn content_text(content: &Value) -> Result<String, String> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match (p["type"].as_str(), p["text"].as_str()) {
                (Some("text"), Some(t)) => Ok(t.to_string()),
                _ => Err(format!("only text content parts are supported, got {p}")),
            })
            .collect(),
        other => Err(format!("message content must be a string or an array of parts, got {other}")),
    }
}

fn stop_strings(stop: &Option<Value>) -> Result<Vec<String>, String> {
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(|| format!("stop: {v} is not a string")))
            .collect(),
        Some(other) => Err(format!("stop must be a string or an array of strings, got {other}")),
    }
}

fn to_request(body: ChatBody) -> Result<(ChatRequest, bool), String> {
    let messages = body
        .messages
        .iter()
        .map(|m| Ok(ChatMessage::new(m.role.clone(), content_text(&m.content)?)))
        .collect::<Result<Vec<_>, String>>()?;
    let mut request = ChatRequest::new(body.model.clone(), messages);
    request.max_tokens = body.max_completion_tokens.or(body.max_tokens).unwrap_or(0);
    let s = &mut request.sampling;
    s.temperature = body.temperature.unwrap_or(s.temperature);
    s.top_p = body.top_p.unwrap_or(s.top_p);
    s.top_k = body.top_k.unwrap_or(s.top_k);
    s.min_p = body.min_p.unwrap_or(s.min_p);
    s.seed = body.seed.unwrap_or(s.seed);
    request.stop = stop_strings(&body.stop)?;
    request.validate().map_err(|e| e.to_string())?;
    Ok((request, body.stream))
}

fn error(status: StatusCode, message: impl Into<String>, code: Option<&str>) -> Response {
    let kind = if status.is_client_error() { "invalid_request_error" } else { "server_error" };
    let body = json!({"error": {"message": message.into(), "type": kind, "param": null, "code": code}});
    (status, Json(body)).into_response()
}

/// The HTTP status and body for a failure of the remote side.
fn remote_error(e: &ClientError) -> Response {
    match e {
        ClientError::Server { status, code, message, .. } => {
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY);
            error(status, message.clone(), code.as_deref())
        }
        ClientError::Refused { message, .. } => error(StatusCode::BAD_REQUEST, message.clone(), Some("refused")),
        other => error(StatusCode::BAD_GATEWAY, other.to_string(), Some("encrypted_session_failed")),
    }
}

fn finish_reason(done: &Done) -> &'static str {
    match done.stop {
        StopReason::MaxTokens | StopReason::ContextFull => "length",
        StopReason::EndOfGeneration | StopReason::StopString => "stop",
    }
}

fn usage(done: &Done) -> Value {
    json!({
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.generated_tokens,
        "total_tokens": done.prompt_tokens + done.generated_tokens,
    })
}

fn now_seconds() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

async fn chat_completions(State(proxy): State<Arc<Proxy>>, body: axum::body::Bytes) -> Response {
    let parsed = serde_json::from_slice::<ChatBody>(&body).map_err(|e| format!("invalid request body: {e}"));
    let (request, stream) = match parsed.and_then(to_request) {
        Ok(r) => r,
        Err(message) => return error(StatusCode::BAD_REQUEST, message, None),
    };
    let id = format!("chatcmpl-{}", proxy.next_id.fetch_add(1, Ordering::Relaxed));
    let created = now_seconds();
    let model = request.model.clone();
    if !stream {
        let mut text = String::new();
        return match proxy.chat(&request, |piece| text.push_str(piece)).await {
            Ok(done) => Json(json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": finish_reason(&done)}],
                "usage": usage(&done),
            }))
            .into_response(),
            Err(e) => remote_error(&e),
        };
    }
    let (out, events) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(async move {
        let chunk = |delta: Value, finish: Option<&str>| {
            let body = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                              "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
            SseEvent::default().data(body.to_string())
        };
        let mut first = true;
        let sink = out.clone();
        let result = proxy
            .chat(&request, |piece| {
                let delta =
                    if first { json!({"role": "assistant", "content": piece}) } else { json!({"content": piece}) };
                first = false;
                // A client that went away stops reading; the rest is dropped.
                let _ = sink.try_send(chunk(delta, None));
            })
            .await;
        let last = match result {
            Ok(done) => chunk(json!({}), Some(finish_reason(&done))),
            Err(e) => {
                let body = json!({"error": {"message": e.to_string(), "type": "server_error", "code": null}});
                SseEvent::default().data(body.to_string())
            }
        };
        let _ = out.send(last).await;
        let _ = out.send(SseEvent::default().data("[DONE]")).await;
    });
    Sse::new(ReceiverStream::new(events).map(Ok::<_, Infallible>)).into_response()
}

async fn models(State(proxy): State<Arc<Proxy>>) -> Response {
    match proxy.remote.get("/v1/models", "listing the models").await {
        Ok(v) => Json(v).into_response(),
        Err(e) => remote_error(&e),
    }
}

/// Where the proxy listens and whom it talks to.
pub struct ProxyConfig {
    /// The daemon (`http://host:port`).
    pub server: String,
    pub api_key: Option<String>,
    /// The identity key to expect instead of the pinned one.
    pub expect: Option<String>,
    /// Where the identity key is pinned on first use.
    pub pin_path: std::path::PathBuf,
    /// A loopback address: the endpoint carries plaintext.
    pub listen: std::net::SocketAddr,
}

/// Checks the secure world's identity, then serves the local endpoint until
/// SIGINT or SIGTERM. `listening` is told the checked identity and the
/// address bound (port 0 picks a free one).
pub fn serve(
    config: ProxyConfig,
    listening: impl FnOnce(&crate::CheckedIdentity, std::net::SocketAddr),
) -> Result<(), String> {
    if !config.listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {}: the client's endpoint carries plaintext prompts and answers, so it \
             listens on this machine only (a loopback address such as 127.0.0.1)",
            config.listen.ip()
        ));
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the runtime: {e}"))?;
    runtime.block_on(async move {
        let remote = Remote::connect(&config.server, config.api_key, config.expect.as_deref(), &config.pin_path)
            .await
            .map_err(|e| format!("{}: {e}", config.server))?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|e| format!("binding {}: {e}", config.listen))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        listening(&remote.identity, local);
        let app = Proxy::new(remote).router();
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
            }
        };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await.map_err(|e| e.to_string())
    })
}
