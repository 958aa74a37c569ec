//! The models the daemon serves: each loads on first use (or at start),
//! stays loaded while it is used, and unloads after its keep-alive.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::api::{ApiError, ErrorKind};
use crate::jobs::{Command, WeightsPrefetch};
use crate::metrics::Metrics;
use crate::worker::{Backend, Kind, SessionFactory};

/// Secure memory a load ahead of need leaves free for the request running
/// beside it: a decode step's activations are taken afresh each step.
pub const PREFETCH_SPARE_BYTES: u64 = 32 << 20;

/// How a model is loaded, for `/v1/models`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadState {
    Unloaded = 0,
    Loading = 1,
    Loaded = 2,
}

impl LoadState {
    pub fn name(self) -> &'static str {
        match self {
            LoadState::Unloaded => "unloaded",
            LoadState::Loading => "loading",
            LoadState::Loaded => "loaded",
        }
    }

    fn from_u8(v: u8) -> LoadState {
        match v {
            1 => LoadState::Loading,
            2 => LoadState::Loaded,
            _ => LoadState::Unloaded,
        }
    }
}

/// How long a model stays loaded once idle (`None`: for ever).
pub type KeepAlive = Option<Duration>;

pub struct ModelEntry {
    pub name: String,
    pub path: PathBuf,
    pub kind: Kind,
    state: AtomicU8,
    /// The backend while loaded; the async lock makes concurrent first
    /// requests wait for one load.
    backend: tokio::sync::Mutex<Option<Arc<Backend>>>,
    /// Last use and the keep-alive that follows it.
    usage: Mutex<(Instant, KeepAlive)>,
    /// Requests holding the backend now.
    pub in_flight: AtomicUsize,
}

impl ModelEntry {
    /// The backend, if the model is loaded now (never loads it).
    pub async fn loaded_backend(&self) -> Option<Arc<Backend>> {
        self.backend.lock().await.clone()
    }

    pub fn state(&self) -> LoadState {
        LoadState::from_u8(self.state.load(Ordering::SeqCst))
    }

    fn set_state(&self, s: LoadState) {
        self.state.store(s as u8, Ordering::SeqCst);
    }

    /// Loading ended well; a model unloaded meanwhile stays unloaded.
    fn finish_loading(&self) {
        let (loading, loaded) = (LoadState::Loading as u8, LoadState::Loaded as u8);
        let _ = self.state.compare_exchange(loading, loaded, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// Settings every backend is started with.
pub struct BackendSettings {
    pub threads: usize,
    pub parallel: usize,
    pub max_queue: usize,
    pub connect: SessionFactory,
    /// Make sealed models resident when they load (`--preload`), rather than
    /// streaming their weights through the pipeline with the first request.
    pub resident_at_load: bool,
    /// The cores' lease between the worlds (`--cores lease`); `None`: split.
    pub cores: Option<Arc<crate::lease::CoreArbiter>>,
    /// A served workflow loads its next step's model while a step runs
    /// (`flexserve serve --no-prefetch` turns it off).
    pub workflow_prefetch: bool,
}

pub struct Registry {
    pub models: BTreeMap<String, Arc<ModelEntry>>,
    pub settings: BackendSettings,
    pub default_keep_alive: KeepAlive,
    /// Requests being served and models being loaded, over all models: the
    /// daemon is idle when it is zero (the reserve grows only then).
    pub activity: Arc<AtomicUsize>,
}

/// Counts one piece of work in [`Registry::activity`] until dropped.
struct Busy(Arc<AtomicUsize>);

impl Busy {
    fn begin(activity: &Arc<AtomicUsize>) -> Busy {
        activity.fetch_add(1, Ordering::SeqCst);
        Busy(activity.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A backend in use by one request: counted in flight until dropped.
pub struct Lease {
    pub backend: Arc<Backend>,
    entry: Arc<ModelEntry>,
    _busy: Busy,
}

impl Drop for Lease {
    fn drop(&mut self) {
        // The keep-alive counts from the end of the last request.
        self.entry.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0 = Instant::now();
        self.entry.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Registry {
    pub fn new(models: Vec<(String, PathBuf, Kind)>, settings: BackendSettings, keep_alive: KeepAlive) -> Registry {
        let models = models
            .into_iter()
            .map(|(name, path, kind)| {
                let entry = ModelEntry {
                    name: name.clone(),
                    path,
                    kind,
                    state: AtomicU8::new(LoadState::Unloaded as u8),
                    backend: tokio::sync::Mutex::new(None),
                    usage: Mutex::new((Instant::now(), keep_alive)),
                    in_flight: AtomicUsize::new(0),
                };
                (name, Arc::new(entry))
            })
            .collect();
        Registry { models, settings, default_keep_alive: keep_alive, activity: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn entry(&self, name: &str) -> Result<Arc<ModelEntry>, ApiError> {
        self.models.get(name).cloned().ok_or_else(|| {
            let known: Vec<&str> = self.models.keys().map(String::as_str).collect();
            ApiError::new(
                ErrorKind::NotFound,
                format!("model {name:?} is not served here (models: {})", known.join(", ")),
            )
            .with_code("model_not_found")
        })
    }

    /// The model's backend, loading it first if needed (or again, if its
    /// secure world session was lost). `keep_alive` replaces the model's
    /// keep-alive from this request on.
    pub async fn lease(
        &self,
        entry: &Arc<ModelEntry>,
        keep_alive: Option<KeepAlive>,
        metrics: &Metrics,
    ) -> Result<Lease, ApiError> {
        let busy = Busy::begin(&self.activity);
        let mut slot = entry.backend.lock().await;
        if let Some(b) = slot.as_ref() {
            if !b.is_alive() {
                metrics.secure_world_restarts.fetch_add(1, Ordering::Relaxed);
                let dead = slot.take();
                drop_in_background(dead);
            }
        }
        let backend = match slot.as_ref() {
            Some(b) => b.clone(),
            None => {
                entry.set_state(LoadState::Loading);
                let loaded = self.load(entry).await;
                entry.set_state(if loaded.is_ok() { LoadState::Loaded } else { LoadState::Unloaded });
                let b = Arc::new(loaded?);
                *slot = Some(b.clone());
                b
            }
        };
        entry.in_flight.fetch_add(1, Ordering::SeqCst);
        {
            let mut usage = entry.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            usage.0 = Instant::now();
            if let Some(k) = keep_alive {
                usage.1 = k;
            }
        }
        Ok(Lease { backend, entry: entry.clone(), _busy: busy })
    }

    /// Loads a model that is not loaded ahead of the request that comes next
    /// (a client's `next_model`, a workflow's next step); a loaded (or
    /// loading) model is left as it is. A sealed model opens as a request
    /// would open it, holding the model's lock: a request meanwhile waits
    /// for this load and uses it. Its weights then load, first layers first,
    /// if the secure memory budget holds them beside what is in use with
    /// [`PREFETCH_SPARE_BYTES`] to spare, until a request for the model
    /// comes: that request's pipelined load streams the rest. Nothing loaded
    /// is unloaded or evicted for it, and a failure only means the request
    /// loads the model itself.
    pub async fn prefetch(&self, entry: &Arc<ModelEntry>, metrics: &Metrics) {
        let unloaded_after_use =
            entry.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner).1 == Some(Duration::ZERO);
        if unloaded_after_use {
            return;
        }
        let Ok(mut slot) = entry.backend.try_lock() else { return };
        if slot.is_some() {
            return;
        }
        entry.set_state(LoadState::Loading);
        let _busy = Busy::begin(&self.activity);
        let backend = match self.load_as(entry, false).await {
            Ok(b) => Arc::new(b),
            Err(e) => {
                entry.set_state(LoadState::Unloaded);
                eprintln!("flexserve serve: prefetching {}: {}", entry.name, e.message);
                return;
            }
        };
        entry.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner).0 = Instant::now();
        *slot = Some(backend.clone());
        drop(slot);
        if backend.kind == Kind::Plain {
            entry.finish_loading();
            metrics.prefetches.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (reply, answer) = tokio::sync::oneshot::channel();
        let wanted = entry.clone();
        let stop = Box::new(move || wanted.in_flight.load(Ordering::SeqCst) > 0);
        let submitted = backend.submit(Command::PrefetchWeights { spare_bytes: PREFETCH_SPARE_BYTES, stop, reply });
        let outcome = match submitted {
            Ok(()) => answer.await.unwrap_or_else(|_| WeightsPrefetch::Failed("the session ended".to_string())),
            Err(e) => WeightsPrefetch::Failed(e.message),
        };
        entry.finish_loading();
        match outcome {
            WeightsPrefetch::Loaded { chunks, stopped } => {
                metrics.prefetches.fetch_add(1, Ordering::Relaxed);
                metrics.prefetched_chunks.fetch_add(chunks as u64, Ordering::Relaxed);
                eprintln!(
                    "flexserve serve: prefetched {} ({chunks} chunks of its weights{})",
                    entry.name,
                    stopped.map(|why| format!("; stopped: {why}")).unwrap_or_default()
                );
            }
            WeightsPrefetch::NoRoom => {
                metrics.prefetches_header_only.fetch_add(1, Ordering::Relaxed);
                eprintln!(
                    "flexserve serve: prefetched {} header-only: the secure memory budget has no room for its \
                     weights beside what is in use",
                    entry.name
                );
            }
            WeightsPrefetch::Failed(why) => {
                eprintln!("flexserve serve: prefetching the weights of {}: {why}", entry.name);
            }
        }
    }

    async fn load(&self, entry: &Arc<ModelEntry>) -> Result<Backend, ApiError> {
        self.load_as(entry, self.settings.resident_at_load).await
    }

    /// Loads a model; `resident`: a sealed model's weights too, now.
    async fn load_as(&self, entry: &Arc<ModelEntry>, resident: bool) -> Result<Backend, ApiError> {
        let (path, kind) = (entry.path.clone(), entry.kind);
        let s = &self.settings;
        let (threads, parallel, max_queue, connect) = (s.threads, s.parallel, s.max_queue, s.connect.clone());
        let cores = s.cores.clone();
        let t0 = Instant::now();
        let loaded = tokio::task::spawn_blocking(move || match kind {
            Kind::Plain => Backend::start_plain(&path, threads, parallel, max_queue, cores),
            Kind::Sealed => Backend::start_sealed(&path, &connect, parallel, max_queue, resident, cores),
        })
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, format!("loading: {e}")))?;
        match loaded {
            Ok(b) => {
                eprintln!("flexserve serve: loaded {} in {:.0} ms", entry.name, t0.elapsed().as_secs_f64() * 1e3);
                Ok(b)
            }
            Err(message) => {
                let kind = if entry.kind == Kind::Sealed { ErrorKind::Unavailable } else { ErrorKind::Internal };
                Err(ApiError::new(kind, format!("loading model {:?}: {message}", entry.name)))
            }
        }
    }

    /// Unloads a model now (requests holding it finish first).
    pub async fn unload(&self, entry: &Arc<ModelEntry>) -> bool {
        let taken = entry.backend.lock().await.take();
        let was_loaded = taken.is_some();
        entry.set_state(LoadState::Unloaded);
        drop_in_background(taken);
        was_loaded
    }

    /// Unloads every model and waits until each backend's threads and
    /// secure world session have ended (at shutdown).
    pub async fn unload_all(&self) {
        let mut taken = Vec::new();
        for entry in self.models.values() {
            taken.extend(entry.backend.lock().await.take());
            entry.set_state(LoadState::Unloaded);
        }
        let _ = tokio::task::spawn_blocking(move || drop(taken)).await;
    }

    /// Unloads the models idle for longer than their keep-alive.
    pub async fn expire(&self) {
        for entry in self.models.values() {
            if entry.state() != LoadState::Loaded || entry.in_flight.load(Ordering::SeqCst) > 0 {
                continue;
            }
            let (last, keep) = *entry.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let Some(keep) = keep else { continue };
            if last.elapsed() >= keep {
                let Ok(mut slot) = entry.backend.try_lock() else { continue };
                if entry.in_flight.load(Ordering::SeqCst) == 0 {
                    let taken = slot.take();
                    entry.set_state(LoadState::Unloaded);
                    if taken.is_some() {
                        eprintln!("flexserve serve: unloaded {} (idle for its keep-alive)", entry.name);
                    }
                    drop_in_background(taken);
                }
            }
        }
    }

    /// Backends loaded now.
    pub async fn loaded(&self) -> Vec<(Arc<ModelEntry>, Arc<Backend>)> {
        let mut out = Vec::new();
        for entry in self.models.values() {
            if let Some(b) = entry.backend.lock().await.as_ref() {
                out.push((entry.clone(), b.clone()));
            }
        }
        out
    }
}

/// Dropping a backend joins its threads (and ends its secure world
/// session): not on the async runtime's threads.
fn drop_in_background(backend: Option<Arc<Backend>>) {
    if let Some(b) = backend {
        std::thread::spawn(move || drop(b));
    }
}
