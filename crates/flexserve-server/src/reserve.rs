//! The reserve keeper: Flex-Mem's reserve of prepared secure memory, kept by
//! one long-lived session with the secure world service.
//!
//! - At start it grants the reserve (`--secure-reserve`) in one go.
//! - Every sealed model's session grants through it ([`flexserve_normal::Granter`]),
//!   so what a model used stays in the service's shared pool when its session
//!   ends: scrubbed, and reused by the next model instead of being released
//!   and protected again.
//! - While the daemon is idle it tops the free reserve back up to its target
//!   in small steps (a model that loaded took part of it), within the budget.
//!   Preparing secret memory beside a computation slows the computation
//!   (TLB shootdowns on every core), so it never grows while a request runs.
//! - `flexserve recall` reaches it on the daemon's control socket: free
//!   granules go back at once (a scrub and a release), and the reserve then
//!   stays down for [`REGROW_AFTER_RECALL`].

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use flexserve_normal::{available_memory, Granter, SecureWorld};

use crate::worker::SessionFactory;

/// How often the keeper looks at the reserve and its control socket.
const TICK: Duration = Duration::from_millis(100);
/// Most secure memory prepared in one background step: about 0.15 s of
/// `memfd_secret` preparation, so a request that arrives meanwhile shares
/// the cores with it for no longer than that.
pub const GROW_STEP_BYTES: u64 = 16 << 20;
/// After a recall the normal world wants its memory: the reserve is not
/// grown again for this long.
pub const REGROW_AFTER_RECALL: Duration = Duration::from_secs(60);
/// The reserve grows only while the system keeps at least this much memory available.
pub const GROW_HEADROOM_BYTES: u64 = 1 << 30;
/// How long the keeper waits before opening a new session after losing one.
const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// What `/status` shows of the reserve.
#[derive(Debug, Clone, Default)]
pub struct ReserveFigures {
    /// Free prepared granules the keeper keeps ready.
    pub target: u64,
    /// Prepared granules free in the secure world's pool now.
    pub free: u64,
    /// Granules granted in all (the pool's total, every session's use).
    pub granted: u64,
    pub granule_size: u64,
    /// Time the reserve took to prepare at start (None: not yet prepared).
    pub prepared_in: Option<Duration>,
    /// Granules prepared in the background since start, and grants made for models' sessions.
    pub grown: u64,
    pub granted_for_sessions: u64,
    /// Granules taken back by recalls.
    pub recalled: u64,
    /// Why the keeper holds no session now (None: it holds one).
    pub lost: Option<String>,
}

enum Ask {
    Grant { secure_pid: u32, granules: u64, reply: mpsc::Sender<Result<u64, String>> },
    Stop,
}

/// The keeper's handle: stopping it (or dropping it) ends its session, and
/// the secure world scrubs and releases what is free.
pub struct ReserveKeeper {
    asks: mpsc::Sender<Ask>,
    figures: Arc<Mutex<ReserveFigures>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// Granules to prepare in one background step: toward `target` free
/// granules, within the budget's `room`, at most `step`.
pub fn growth_step(free: u64, target: u64, room: u64, step: u64) -> u64 {
    target.saturating_sub(free).min(room).min(step)
}

impl ReserveKeeper {
    /// Starts the keeper; it prepares `target_bytes` at once, then keeps that
    /// much free while `activity` (requests and loads in progress) is zero.
    pub fn start(connect: SessionFactory, target_bytes: u64, activity: Arc<AtomicUsize>) -> ReserveKeeper {
        let (asks, inbox) = mpsc::channel();
        let figures = Arc::new(Mutex::new(ReserveFigures::default()));
        let shown = figures.clone();
        let thread = std::thread::Builder::new()
            .name("reserve".to_string())
            .spawn(move || Keeper { connect, target_bytes, activity, figures: shown, world: None }.run(&inbox))
            .ok();
        ReserveKeeper { asks, figures, thread: Mutex::new(thread) }
    }

    /// Grants through the keeper's session, for the models' sessions.
    pub fn granter(&self) -> Granter {
        let asks = Mutex::new(self.asks.clone());
        Arc::new(move |secure_pid, granules| {
            let (reply, answer) = mpsc::channel();
            let sent =
                asks.lock().unwrap_or_else(PoisonError::into_inner).send(Ask::Grant { secure_pid, granules, reply });
            sent.map_err(|_| "the reserve keeper has stopped".to_string())?;
            answer.recv().map_err(|_| "the reserve keeper has stopped".to_string())?
        })
    }

    pub fn figures(&self) -> ReserveFigures {
        self.figures.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Whether the reserve has been prepared (or could not be).
    pub fn settled(&self) -> bool {
        let f = self.figures();
        f.prepared_in.is_some() || f.lost.is_some()
    }

    /// Ends the keeper's session and waits for it: what is free in the pool
    /// is scrubbed and released.
    pub fn stop(&self) {
        let _ = self.asks.send(Ask::Stop);
        let thread = self.thread.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(t) = thread {
            let _ = t.join();
        }
    }
}

impl Drop for ReserveKeeper {
    fn drop(&mut self) {
        self.stop();
    }
}

struct Keeper {
    connect: SessionFactory,
    target_bytes: u64,
    activity: Arc<AtomicUsize>,
    figures: Arc<Mutex<ReserveFigures>>,
    world: Option<SecureWorld>,
}

impl Keeper {
    fn run(mut self, inbox: &mpsc::Receiver<Ask>) {
        let mut last_recall: Option<Instant> = None;
        let mut next_connect = Instant::now();
        loop {
            if self.world.is_none() && Instant::now() >= next_connect {
                if let Err(e) = self.open() {
                    eprintln!("flexserve serve: no secure reserve: {e}");
                    self.note(|f| f.lost = Some(e));
                    next_connect = Instant::now() + RECONNECT_AFTER;
                }
            }
            match inbox.recv_timeout(TICK) {
                Ok(Ask::Grant { secure_pid, granules, reply }) => {
                    let _ = reply.send(self.grant_for_session(secure_pid, granules));
                }
                Ok(Ask::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return,
                Err(mpsc::RecvTimeoutError::Timeout) => {}
            }
            if let Some(world) = self.world.as_mut() {
                let served = world.serve_control();
                let recalled: u64 = world.take_recalls().iter().map(|r| u64::from(r.released)).sum();
                if recalled > 0 {
                    last_recall = Some(Instant::now());
                    self.note(|f| f.recalled += recalled);
                }
                if let Err(e) = served {
                    self.lose(e.to_string(), &mut next_connect);
                    continue;
                }
            }
            let idle = self.activity.load(Ordering::SeqCst) == 0;
            let held_back = last_recall.is_some_and(|t| t.elapsed() < REGROW_AFTER_RECALL);
            let headroom = available_memory().is_none_or(|a| a > GROW_HEADROOM_BYTES + GROW_STEP_BYTES);
            if let Err(e) = self.refresh(idle && !held_back && headroom) {
                self.lose(e, &mut next_connect);
            }
        }
    }

    /// Opens the session and prepares the whole reserve.
    fn open(&mut self) -> Result<(), String> {
        let t0 = Instant::now();
        let mut world = (self.connect)()?;
        if world.is_development() {
            // Each development session is a secure world of its own: memory
            // prepared in this one could serve no model.
            return Err("a development secure world shares no memory between sessions; \
                        the reserve needs the secure world service"
                .to_string());
        }
        let granule = world.info().granule_size.max(1);
        let target = self.target_bytes.div_ceil(granule);
        let status = world.status().map_err(|e| e.to_string())?;
        let free = u64::from(status.free_granules());
        let wanted = target.saturating_sub(free);
        world.grant(wanted).map_err(|e| format!("granting {wanted} granules: {e}"))?;
        let dir = flexserve_normal::control::runtime_dir();
        if let Err(e) = world.listen(&dir) {
            eprintln!("flexserve serve: `flexserve recall` cannot reach the reserve ({}): {e}", dir.display());
        }
        let took = t0.elapsed();
        eprintln!(
            "flexserve serve: secure reserve of {target} granules prepared in {:.0} ms",
            took.as_secs_f64() * 1e3
        );
        self.note(|f| {
            f.target = target;
            f.granule_size = granule;
            f.prepared_in.get_or_insert(took);
            f.lost = None;
        });
        self.world = Some(world);
        Ok(())
    }

    fn grant_for_session(&mut self, secure_pid: u32, granules: u64) -> Result<u64, String> {
        let world = self.world.as_mut().ok_or("the reserve keeper holds no session")?;
        if world.pid() != secure_pid {
            return Err(format!("the reserve keeper's secure world is pid {}, not {secure_pid}", world.pid()));
        }
        let n = world.grant(granules).map_err(|e| e.to_string())?;
        self.note(|f| f.granted_for_sessions += n);
        Ok(n)
    }

    /// Reads the pool's figures and, with `may_grow`, prepares one step toward the target.
    fn refresh(&mut self, may_grow: bool) -> Result<(), String> {
        let Some(world) = self.world.as_mut() else { return Ok(()) };
        let status = world.status().map_err(|e| e.to_string())?;
        let mut free = u64::from(status.free_granules());
        let mut granted = u64::from(status.granted);
        let target = self.figures.lock().unwrap_or_else(PoisonError::into_inner).target;
        let step = growth_step(
            free,
            target,
            world.budget_granules().saturating_sub(granted),
            GROW_STEP_BYTES / world.info().granule_size.max(1),
        );
        let mut grown = 0;
        if may_grow && step > 0 {
            grown = world.grant(step).map_err(|e| e.to_string())?;
            free += grown;
            granted += grown;
        }
        self.note(|f| {
            f.free = free;
            f.granted = granted;
            f.grown += grown;
        });
        Ok(())
    }

    fn lose(&mut self, why: String, next_connect: &mut Instant) {
        eprintln!("flexserve serve: the secure reserve's session was lost ({why}); reopening it");
        self.world = None;
        *next_connect = Instant::now() + RECONNECT_AFTER;
        self.note(|f| f.lost = Some(why));
    }

    fn note(&self, change: impl FnOnce(&mut ReserveFigures)) {
        change(&mut self.figures.lock().unwrap_or_else(PoisonError::into_inner));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_grows_toward_its_target_in_steps_within_the_budget() {
        // Below target: one step at most.
        assert_eq!(growth_step(0, 640, 10_000, 64), 64);
        // The last step is what is missing.
        assert_eq!(growth_step(600, 640, 10_000, 64), 40);
        // At or above target (a model's session ended and its granules came back free): nothing.
        assert_eq!(growth_step(640, 640, 10_000, 64), 0);
        assert_eq!(growth_step(900, 640, 10_000, 64), 0);
        // The budget bounds it.
        assert_eq!(growth_step(0, 640, 10, 64), 10);
        assert_eq!(growth_step(0, 640, 0, 64), 0);
    }
}
