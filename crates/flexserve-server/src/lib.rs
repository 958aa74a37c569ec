//! `flexserve serve`: the normal world's daemon, an OpenAI-compatible HTTP
//! API (axum on tokio). It holds the memory budget and the storage I/O and
//! relays text; plain models run in its own engine, sealed models in the
//! secure world, through one session per loaded sealed model. Nothing of
//! this crate links into the secure world.
//!
//! - [`api`]: request and response bodies, errors in the OpenAI format;
//! - [`registry`]: the served models, loading on first use, keep-alive;
//! - [`worker`]: backends, the threads that run a loaded model;
//! - [`handlers`]: the endpoints; [`metrics`]: `/metrics`.

pub mod api;
mod batch;
pub mod embeddings;
mod encrypted;
mod handlers;
mod jobs;
pub mod lease;
pub mod metrics;
pub mod registry;
pub mod reserve;
mod sealed;
pub mod worker;
pub mod workflows;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::api::{ApiError, ErrorKind};
use crate::registry::{BackendSettings, KeepAlive, Registry};
pub use crate::worker::{Kind, SessionFactory};

/// Where the daemon listens unless told otherwise.
pub const DEFAULT_HOST: std::net::IpAddr = std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);
pub const DEFAULT_PORT: u16 = 8080;
/// How long an idle model stays loaded unless told otherwise.
pub const DEFAULT_KEEP_ALIVE: &str = "5m";
/// Requests a plain model decodes together unless told otherwise.
pub const DEFAULT_PARALLEL: usize = 4;
/// Requests that may wait per model unless told otherwise.
pub const DEFAULT_MAX_QUEUE: usize = 64;

/// How long in-flight requests may run on after SIGTERM/SIGINT.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How often idle models are checked against their keep-alive.
const EXPIRY_CHECK: Duration = Duration::from_millis(250);

pub struct ServeConfig {
    pub host: IpAddr,
    pub port: u16,
    /// (name, path, plain or sealed).
    pub models: Vec<(String, PathBuf, Kind)>,
    pub api_key: Option<String>,
    pub insecure_no_auth: bool,
    pub keep_alive: KeepAlive,
    pub preload: bool,
    /// Engine threads of a plain model (0: one per core).
    pub threads: usize,
    /// Requests a plain model serves at once.
    pub parallel: usize,
    /// Requests that may wait per model beyond those being served.
    pub max_queue: usize,
    /// Context of every request (0: the model's own).
    pub ctx: u32,
    /// Secure memory (bytes) granted and prepared at start, ahead of need:
    /// sealed models load into it instead of protecting memory at request
    /// time (Flex-Mem's reserve; it takes effect with the secure world
    /// service, whose pool all sessions share). 0: none.
    pub secure_reserve: u64,
    /// How the cores are shared between the worlds (the secure world's
    /// threads are set by `connect`, from [`lease::CoreSharing::threads`]).
    pub cores: lease::CoreSharing,
    /// Workflows served at `/v1/workflows/run`, by name.
    pub workflows: workflows::Workflows,
    /// A workflow loads its next step's model while a step runs (false: `--no-prefetch`).
    pub workflow_prefetch: bool,
    pub connect: SessionFactory,
}

pub struct AppState {
    registry: Registry,
    metrics: metrics::Metrics,
    api_key: Option<String>,
    ctx: u32,
    /// False while models preload (`/health` answers 503).
    ready: AtomicBool,
    next_id: AtomicU64,
    /// Flex-Mem's reserve, kept by a session of its own (`--secure-reserve`).
    reserve: Option<reserve::ReserveKeeper>,
    /// Encrypted sessions: which model's secure world holds each.
    encrypted: encrypted::SessionRoutes,
    /// The cores' lease between the worlds, when they are leased.
    cores: Option<Arc<lease::CoreArbiter>>,
    workflows: workflows::Workflows,
}

/// Runs the daemon until SIGTERM or SIGINT. Prints `listening on http://ADDR`
/// on stdout once it accepts connections.
pub fn run(config: ServeConfig) -> Result<(), String> {
    if !config.host.is_loopback() && config.api_key.is_none() && !config.insecure_no_auth {
        return Err(format!(
            "refusing to serve {} without an API key: pass --api-key (or --api-key-file), or --insecure-no-auth",
            config.host
        ));
    }
    if config.models.is_empty() {
        return Err("no models to serve: pass --model NAME=PATH or --models-dir DIR".to_string());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(serve(config))
}

async fn serve(config: ServeConfig) -> Result<(), String> {
    let settings = BackendSettings {
        threads: config.threads,
        parallel: config.parallel.max(1),
        max_queue: config.max_queue,
        connect: config.connect.clone(),
        resident_at_load: config.preload,
        cores: (config.cores == lease::CoreSharing::Lease).then(lease::CoreArbiter::new),
        workflow_prefetch: config.workflow_prefetch,
    };
    let mut registry = Registry::new(config.models.clone(), settings, config.keep_alive);
    let keeper = (config.secure_reserve > 0).then(|| {
        reserve::ReserveKeeper::start(config.connect.clone(), config.secure_reserve, registry.activity.clone())
    });
    if let Some(keeper) = &keeper {
        // Models' sessions grant through the keeper, so that what they used
        // stays prepared in the shared pool when they end.
        let (inner, granter) = (config.connect.clone(), keeper.granter());
        registry.settings.connect = Arc::new(move || {
            let mut world = inner()?;
            world.set_granter(granter.clone());
            Ok(world)
        });
    }
    let cores = registry.settings.cores.clone();
    let state = Arc::new(AppState {
        registry,
        metrics: metrics::Metrics::default(),
        api_key: config.api_key.clone(),
        ctx: config.ctx,
        ready: AtomicBool::new(!config.preload && config.secure_reserve == 0),
        next_id: AtomicU64::new(1),
        reserve: keeper,
        encrypted: encrypted::SessionRoutes::default(),
        cores,
        workflows: config.workflows.clone(),
    });
    let addr = SocketAddr::new(config.host, config.port);
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| format!("binding {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    println!("listening on http://{local}");
    for (name, path, kind) in &config.models {
        eprintln!(
            "flexserve serve: model {name} = {} ({})",
            path.display(),
            if *kind == Kind::Sealed { "sealed" } else { "plain" }
        );
    }
    if config.preload || config.secure_reserve > 0 {
        let s = state.clone();
        let preload = config.preload;
        tokio::spawn(async move {
            // `/health` says ready once the reserve is prepared (or could not be).
            while s.reserve.as_ref().is_some_and(|k| !k.settled()) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if preload {
                for entry in s.registry.models.values() {
                    if let Err(e) = s.registry.lease(entry, None, &s.metrics).await {
                        eprintln!("flexserve serve: preloading {}: {e}", entry.name);
                    }
                }
            }
            s.ready.store(true, Ordering::SeqCst);
        });
    }
    let expiry = state.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(EXPIRY_CHECK).await;
            expiry.registry.expire().await;
        }
    });
    let app = router(state.clone());
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        eprintln!("flexserve serve: stopping (in-flight requests get {} s)", SHUTDOWN_GRACE.as_secs());
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(shutdown);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(async move {
        let r = server.await;
        let _ = done_tx.send(());
        r
    });
    // Graceful shutdown waits for open streams: bound it.
    let _ = done_rx.await;
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, serving).await;
    // Unloading ends the secure world sessions (each scrubbed by the secure world).
    state.registry.unload_all().await;
    // The reserve's session ends last: the secure world scrubs and releases what it granted.
    if let Some(keeper) = state.reserve.as_ref() {
        // Blocking: the secure world scrubs and releases before this returns.
        tokio::task::block_in_place(|| keeper.stop());
    }
    eprintln!("flexserve serve: stopped");
    Ok(())
}

impl AppState {
    /// The reserve's figures for /status.
    fn reserve_figures(&self) -> Option<reserve::ReserveFigures> {
        self.reserve.as_ref().map(reserve::ReserveKeeper::figures)
    }
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(handlers::chat_completions))
        .route("/v1/completions", post(handlers::completions))
        .route("/v1/embeddings", post(embeddings::embeddings))
        .route("/v1/models", get(handlers::list_models))
        .route("/v1/workflows", get(workflows::list))
        .route("/v1/workflows/run", post(workflows::run))
        .route("/models/load", post(handlers::load_model))
        .route("/models/unload", post(handlers::unload_model))
        .route("/status", get(handlers::status))
        .route("/v1/secure/identity", get(handlers::secure_identity))
        .route("/v1/secure/sessions", post(encrypted::open))
        .route("/v1/secure/sessions/{id}/chat", post(encrypted::chat))
        .route("/v1/secure/sessions/{id}", axum::routing::delete(encrypted::close))
        .route("/metrics", get(handlers::metrics))
        .route("/health", get(handlers::health))
        .layer(axum::middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(DefaultBodyLimit::max(api::MAX_BODY_BYTES))
        .fallback(|| async { ApiError::new(ErrorKind::NotFound, "no such endpoint") })
        .with_state(state)
}

/// Bearer authentication on every endpoint but `/health`.
async fn authenticate(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let Some(key) = &state.api_key else { return next.run(request).await };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if equal_in_constant_time(g.as_bytes(), key.as_bytes()) => next.run(request).await,
        Some(_) => {
            ApiError::new(ErrorKind::Authentication, "invalid API key").with_code("invalid_api_key").into_response()
        }
        None => ApiError::new(ErrorKind::Authentication, "missing API key: send Authorization: Bearer KEY")
            .with_code("invalid_api_key")
            .into_response(),
    }
}

fn equal_in_constant_time(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
