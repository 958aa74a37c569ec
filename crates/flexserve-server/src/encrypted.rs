//! Encrypted sessions over HTTP (docs/encrypted-sessions.md): the daemon
//! routes a client's sealed messages to the secure world that holds the
//! session and streams the sealed records back. It can read none of them;
//! it sees which model, the session id, sizes and timing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive as SseKeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

use crate::api::{parse, Body};
use crate::api::{ApiError, ErrorKind};
use crate::jobs::{Command, EncryptedJob, SealedEvent};
use crate::AppState;

/// Most sessions the daemon routes at once; past it the least recently used
/// is forgotten (its client gets 404 and opens a new one). The secure world
/// keeps at most `MAX_ENCRYPTED_SESSIONS` per model besides.
pub const MAX_ROUTED_SESSIONS: usize = 4096;

/// Records a job may have queued before the client reads them.
const RECORD_BUFFER: usize = 64;

/// Which model's secure world holds each session, by its HTTP id.
#[derive(Default)]
pub struct SessionRoutes {
    routes: Mutex<HashMap<String, Route>>,
}

struct Route {
    model: String,
    session: u64,
    last_used: std::time::Instant,
}

impl SessionRoutes {
    fn insert(&self, id: String, model: String, session: u64) {
        let mut routes = self.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if routes.len() >= MAX_ROUTED_SESSIONS {
            let oldest = routes.iter().min_by_key(|(_, r)| r.last_used).map(|(id, _)| id.clone());
            if let Some(id) = oldest {
                routes.remove(&id);
            }
        }
        routes.insert(id, Route { model, session, last_used: std::time::Instant::now() });
    }

    fn get(&self, id: &str) -> Result<(String, u64), ApiError> {
        let mut routes = self.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let route = routes.get_mut(id).ok_or_else(|| not_found(id))?;
        route.last_used = std::time::Instant::now();
        Ok((route.model.clone(), route.session))
    }

    fn remove(&self, id: &str) -> Option<(String, u64)> {
        let mut routes = self.routes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        routes.remove(id).map(|r| (r.model, r.session))
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(ErrorKind::NotFound, format!("no encrypted session {id:?}: open one (POST /v1/secure/sessions)"))
        .with_code("session_not_found")
}

fn decode(field: &'static str, text: &str) -> Result<Vec<u8>, ApiError> {
    BASE64.decode(text.trim()).map_err(|e| ApiError::bad_request(format!("{field} is not base64: {e}"), Some(field)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenRequest {
    model: String,
    handshake: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MessageRequest {
    message: String,
}

/// `POST /v1/secure/sessions`: the client's handshake to the secure world
/// that serves the model, and its answer.
pub async fn open(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        let request: OpenRequest = parse(&body)?;
        let handshake = decode("handshake", &request.handshake)?;
        let entry = state.registry.entry(&request.model)?;
        let lease = state.registry.lease(&entry, None, &state.metrics).await?;
        let (reply, answer) = oneshot::channel();
        lease.backend.submit(Command::OpenEncrypted { handshake, reply })?;
        let (session, handshake) =
            answer.await.map_err(|_| ApiError::new(ErrorKind::Unavailable, "the model's backend stopped"))??;
        let id = format!("{session:016x}");
        state.encrypted.insert(id.clone(), request.model.clone(), session);
        Ok::<_, ApiError>(
            Json(json!({"session": id, "model": request.model, "handshake": BASE64.encode(handshake)})).into_response(),
        )
    }
    .await;
    result.unwrap_or_else(|e| failed(&state, e))
}

/// `POST /v1/secure/sessions/{id}/chat`: the client's sealed request in,
/// the sealed records of the answer out as server-sent events.
pub async fn chat(State(state): State<Arc<AppState>>, Path(id): Path<String>, Body(body): Body) -> Response {
    let result = async {
        let request: MessageRequest = parse(&body)?;
        let message = decode("message", &request.message)?;
        let (model, session) = state.encrypted.get(&id)?;
        state.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let entry = state.registry.entry(&model)?;
        let lease = state.registry.lease(&entry, None, &state.metrics).await?;
        let (events, mut rx) = mpsc::channel(RECORD_BUFFER);
        let cancelled = state.metrics.cancelled.clone();
        let job = EncryptedJob { session, message, n_ctx: state.ctx, events, cancelled };
        lease.backend.submit(Command::Encrypted(job))?;
        // An error before the first record is an HTTP error; after it, an `error` event.
        let first = rx.recv().await;
        if let Some(SealedEvent::Failed(e)) = &first {
            if e.code == Some("encrypted_session_ended") {
                state.encrypted.remove(&id);
            }
            return Err(e.clone());
        }
        let (out, sse) = mpsc::channel::<SseEvent>(RECORD_BUFFER);
        let state2 = state.clone();
        tokio::spawn(async move {
            let _lease = lease;
            let mut next = first;
            while let Some(event) = next {
                let sse_event = match event {
                    SealedEvent::Record(record) => SseEvent::default().data(BASE64.encode(record)),
                    SealedEvent::End => break,
                    SealedEvent::Failed(e) => {
                        state2.metrics.errors.fetch_add(1, Ordering::Relaxed);
                        SseEvent::default().event("error").data(e.body().to_string())
                    }
                };
                // The client went away: dropping `rx` tells the backend to cancel.
                if out.send(sse_event).await.is_err() {
                    return;
                }
                next = rx.recv().await;
            }
        });
        let stream = ReceiverStream::new(sse).map(Ok::<_, std::convert::Infallible>);
        Ok::<_, ApiError>(Sse::new(stream).keep_alive(SseKeepAlive::default()).into_response())
    }
    .await;
    result.unwrap_or_else(|e| failed(&state, e))
}

/// `DELETE /v1/secure/sessions/{id}`: ends the session in the secure world.
pub async fn close(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    let Some((model, session)) = state.encrypted.remove(&id) else {
        return failed(&state, not_found(&id));
    };
    // A model no longer loaded took its sessions with it.
    if let Ok(entry) = state.registry.entry(&model) {
        if let Some(backend) = entry.loaded_backend().await {
            let _ = backend.submit(Command::CloseEncrypted { session });
        }
    }
    Json(json!({"session": id, "deleted": true})).into_response()
}

fn failed(state: &AppState, e: ApiError) -> Response {
    state.metrics.errors.fetch_add(1, Ordering::Relaxed);
    e.into_response()
}
