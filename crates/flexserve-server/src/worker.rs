//! Backends: a loaded model served on threads of its own. A plain model runs
//! in this process's engine (the normal world may hold plain weights); a
//! sealed model runs in the secure world, through one session that this
//! backend keeps for as long as the model is loaded. The HTTP side hands a
//! backend jobs through a bounded queue and reads events back; a job whose
//! reader has gone (the client disconnected) is cancelled at the next layer
//! or token.

use crate::lease::{CoreArbiter, SecureTenant};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use flexserve_normal::SecureWorld;

use crate::api::{ApiError, ErrorKind};
use crate::batch::PlainModel;
use crate::jobs::{secure_world_gone, Command, Event, SealedEvent};
use crate::sealed::SealedModel;

/// Opens a session with the secure world (the service, or a development one).
pub type SessionFactory = Arc<dyn Fn() -> Result<SecureWorld, String> + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Sealed,
}

/// A loaded model and the threads that serve it.
pub struct Backend {
    pub kind: Kind,
    commands: Option<mpsc::SyncSender<Command>>,
    /// Cleared when a worker stops because its secure world went away.
    alive: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Backend {
    /// Loads a plain model and starts the thread that serves it: for a
    /// generative model, up to `slots` requests decoded together, one batched
    /// step at a time; for an encoder, embeddings one input after another.
    pub fn start_plain(
        path: &Path,
        threads: usize,
        slots: usize,
        max_queue: usize,
        cores: Option<Arc<CoreArbiter>>,
    ) -> Result<Backend, String> {
        let (tx, rx) = mpsc::sync_channel::<Command>(max_queue);
        let alive = Arc::new(AtomicBool::new(true));
        let worker = std::thread::Builder::new().name("plain".to_string());
        // Opened once: its header says which engine serves it.
        let file = flexserve_gguf::GgufFile::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let handle = if crate::embeddings::is_encoder(&file) {
            let encoder = crate::embeddings::EncoderModel::open(path, file, threads, cores)?;
            worker.spawn(move || encoder.serve(&rx))
        } else {
            let plain = PlainModel::open(path, file, threads, cores)?;
            worker.spawn(move || plain.serve(&rx, slots.max(1)))
        }
        .map_err(|e| format!("starting a worker: {e}"))?;
        Ok(Backend { kind: Kind::Plain, commands: Some(tx), alive, threads: vec![handle] })
    }

    /// Opens a session with the secure world, opens the sealed model there
    /// (making it resident now with `resident`, else its weights stream
    /// through the pipeline with the first request), and starts the worker
    /// that drives the session: up to `slots` generations decoded together
    /// in the secure world, one batched step at a time.
    pub fn start_sealed(
        path: &Path,
        connect: &SessionFactory,
        slots: usize,
        max_queue: usize,
        resident: bool,
        cores: Option<Arc<CoreArbiter>>,
    ) -> Result<Backend, String> {
        let mut world = connect()?;
        let tenant = cores.map(SecureTenant::new);
        if let Some(t) = &tenant {
            world.set_core_lease(t.clone());
        }
        let opened = if resident { world.open_model(path) } else { world.open_model_header(path) };
        let (model, _report) = opened.map_err(|e| format!("opening {} in the secure world: {e}", path.display()))?;
        let (tx, rx) = mpsc::sync_channel::<Command>(max_queue);
        let alive = Arc::new(AtomicBool::new(true));
        let flag = alive.clone();
        let sealed = SealedModel { world, model, path: path.to_path_buf(), tenant, alive: alive.clone() };
        let handle = std::thread::Builder::new()
            .name("sealed".to_string())
            .spawn(move || {
                if !sealed.serve(&rx, slots.max(1)) {
                    // The session is gone: fail what is queued; the next request opens a new one.
                    flag.store(false, Ordering::SeqCst);
                    fail_queued(&rx);
                }
            })
            .map_err(|e| format!("starting a worker: {e}"))?;
        Ok(Backend { kind: Kind::Sealed, commands: Some(tx), alive, threads: vec![handle] })
    }

    /// Queues a command; a full queue is an overload (503).
    pub fn submit(&self, command: Command) -> Result<(), ApiError> {
        let Some(commands) = &self.commands else { return Err(secure_world_gone()) };
        commands.try_send(command).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => ApiError::new(
                ErrorKind::Overloaded,
                "the server is busy: every slot is taken and the queue is full; try again shortly",
            ),
            mpsc::TrySendError::Disconnected(_) => secure_world_gone(),
        })
    }

    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }
}

impl Drop for Backend {
    /// Unloading: the queue closes, the workers finish what they hold and
    /// stop; a sealed model's session ends, and the secure world scrubs it.
    fn drop(&mut self) {
        self.commands.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Fails every command still queued for a session that is gone.
fn fail_queued(rx: &mpsc::Receiver<Command>) {
    while let Ok(command) = rx.try_recv() {
        match command {
            Command::Generate(job) => {
                let _ = job.events.blocking_send(Event::Failed(secure_world_gone()));
            }
            Command::Encrypted(job) => {
                let _ = job.events.blocking_send(SealedEvent::Failed(secure_world_gone()));
            }
            Command::OpenEncrypted { reply, .. } => {
                let _ = reply.send(Err(secure_world_gone()));
            }
            Command::Embed(job) => {
                let _ = job.reply.send(Err(secure_world_gone()));
            }
            Command::PrefetchWeights { reply, .. } => {
                let _ = reply.send(crate::jobs::WeightsPrefetch::Failed(secure_world_gone().message));
            }
            Command::Status(_) | Command::CloseEncrypted { .. } => {}
        }
    }
}
