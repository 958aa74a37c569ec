//! Flex-NPU on this platform: the CPU cores are leased to one world at a
//! time (`--cores lease`, the default). Plain models take the lease for each
//! step of their batch; a sealed generation takes it for its whole run and
//! hands it over at its next layer or token whenever plain work waits: the secure
//! world pauses, scrubs its workers' scratch, and resumes once the lease is
//! back. Each world gets every core while it holds them. Tickets are served
//! in arrival order, so neither world starves the other.
//!
//! The static alternative (`--cores split`) gives each world half the cores
//! for good, as the optimized strawman's "secure NPU" does.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Instant;

use flexserve_normal::CoreLease;

/// How the daemon shares the cores between the worlds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CoreSharing {
    /// Leased to one world at a time, every core to the holder.
    #[default]
    Lease,
    /// Half the cores to each world, for good.
    Split,
}

impl CoreSharing {
    /// Engine threads of (the secure world, plain models) out of `cores`
    /// (0: every core): every core to each under the lease, half each split.
    pub fn threads(self, cores: usize) -> (usize, usize) {
        match self {
            CoreSharing::Lease => (cores, cores),
            CoreSharing::Split => {
                let all = if cores == 0 { std::thread::available_parallelism().map_or(2, |n| n.get()) } else { cores };
                ((all - all / 2).max(1), (all / 2).max(1))
            }
        }
    }

    pub fn parse(text: &str) -> Result<CoreSharing, String> {
        match text {
            "lease" => Ok(CoreSharing::Lease),
            "split" => Ok(CoreSharing::Split),
            other => Err(format!("cores {other:?}: expected lease or split")),
        }
    }
}

/// Which world holds (or waits for) the cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    Secure,
    Normal,
}

impl Owner {
    pub fn name(self) -> &'static str {
        match self {
            Owner::Secure => "secure",
            Owner::Normal => "normal",
        }
    }
}

/// Most past turns kept for `/status`.
const TURNS_KEPT: usize = 512;

/// One holder's time with the cores, in ms since the arbiter was made.
#[derive(Debug, Clone, Copy)]
pub struct Turn {
    pub owner: Owner,
    pub from_ms: f64,
    pub to_ms: f64,
}

#[derive(Default)]
struct State {
    /// The ticket holding the cores, with its owner and since when.
    holder: Option<(u64, Owner, f64)>,
    /// Tickets waiting, in arrival order.
    queue: VecDeque<(u64, Owner)>,
    next_ticket: u64,
    /// The last owner, to count changes of owner.
    last_owner: Option<Owner>,
    turns: VecDeque<Turn>,
    secure_turns: u64,
    normal_turns: u64,
    changes_of_owner: u64,
    /// Generations paused mid-run for waiting plain work, and how many of
    /// those pauses found a worker's scratch not zero after scrubbing.
    secure_pauses: u64,
    unscrubbed_pauses: u64,
}

/// The cores' lease.
pub struct CoreArbiter {
    state: Mutex<State>,
    freed: Condvar,
    epoch: Instant,
}

/// Holds the cores until dropped.
pub struct CoreGuard {
    arbiter: Arc<CoreArbiter>,
    ticket: u64,
}

impl Drop for CoreGuard {
    fn drop(&mut self) {
        self.arbiter.release(self.ticket);
    }
}

/// What `/status` shows of the lease.
#[derive(Debug, Clone)]
pub struct LeaseFigures {
    pub secure_turns: u64,
    pub normal_turns: u64,
    pub changes_of_owner: u64,
    pub secure_pauses: u64,
    pub unscrubbed_pauses: u64,
    pub turns: Vec<Turn>,
}

impl CoreArbiter {
    pub fn new() -> Arc<CoreArbiter> {
        Arc::new(CoreArbiter { state: Mutex::new(State::default()), freed: Condvar::new(), epoch: Instant::now() })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> f64 {
        self.epoch.elapsed().as_secs_f64() * 1e3
    }

    /// Waits for the cores (after every ticket taken before this one) and holds them.
    pub fn acquire(self: &Arc<Self>, owner: Owner) -> CoreGuard {
        let mut s = self.lock();
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.queue.push_back((ticket, owner));
        while s.holder.is_some() || s.queue.front().map(|&(t, _)| t) != Some(ticket) {
            s = self.freed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.queue.pop_front();
        s.holder = Some((ticket, owner, self.now_ms()));
        if s.last_owner.is_some_and(|o| o != owner) {
            s.changes_of_owner += 1;
        }
        s.last_owner = Some(owner);
        match owner {
            Owner::Secure => s.secure_turns += 1,
            Owner::Normal => s.normal_turns += 1,
        }
        CoreGuard { arbiter: self.clone(), ticket }
    }

    fn release(&self, ticket: u64) {
        let mut s = self.lock();
        if let Some((held, owner, from_ms)) = s.holder {
            if held == ticket {
                s.holder = None;
                let to_ms = self.now_ms();
                if s.turns.len() == TURNS_KEPT {
                    s.turns.pop_front();
                }
                s.turns.push_back(Turn { owner, from_ms, to_ms });
            }
        }
        drop(s);
        self.freed.notify_all();
    }

    /// Whether work of another world than `owner` waits for the cores.
    pub fn contended_by_other_than(&self, owner: Owner) -> bool {
        self.lock().queue.iter().any(|&(_, o)| o != owner)
    }

    pub fn figures(&self) -> LeaseFigures {
        let s = self.lock();
        LeaseFigures {
            secure_turns: s.secure_turns,
            normal_turns: s.normal_turns,
            changes_of_owner: s.changes_of_owner,
            secure_pauses: s.secure_pauses,
            unscrubbed_pauses: s.unscrubbed_pauses,
            turns: s.turns.iter().copied().collect(),
        }
    }
}

/// A sealed model's session as a tenant of the lease: it holds the cores
/// while it generates and hands them over at its next layer or token when plain work waits.
pub struct SecureTenant {
    arbiter: Arc<CoreArbiter>,
    guard: Mutex<Option<CoreGuard>>,
}

impl SecureTenant {
    pub fn new(arbiter: Arc<CoreArbiter>) -> Arc<SecureTenant> {
        Arc::new(SecureTenant { arbiter, guard: Mutex::new(None) })
    }

    /// Takes the cores for a generation (waiting for them).
    pub fn begin(&self) {
        let guard = self.arbiter.acquire(Owner::Secure);
        *self.guard.lock().unwrap_or_else(PoisonError::into_inner) = Some(guard);
    }

    /// Gives the cores back after a generation (the secure world scrubbed
    /// its workers when the generation ended).
    pub fn end(&self) {
        let guard = self.guard.lock().unwrap_or_else(PoisonError::into_inner).take();
        drop(guard);
    }
}

impl CoreLease for SecureTenant {
    fn contended(&self) -> bool {
        self.arbiter.contended_by_other_than(Owner::Secure)
    }

    fn hand_over(&self, scrubbed: bool) {
        {
            let mut s = self.arbiter.lock();
            s.secure_pauses += 1;
            s.unscrubbed_pauses += u64::from(!scrubbed);
        }
        // Back of the queue: the waiting work runs its turn first.
        self.end();
        self.begin();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn a_split_gives_each_world_half_and_a_lease_all() {
        assert_eq!(CoreSharing::Split.threads(2), (1, 1));
        assert_eq!(CoreSharing::Split.threads(5), (3, 2));
        assert_eq!(CoreSharing::Split.threads(1), (1, 1));
        assert_eq!(CoreSharing::Lease.threads(4), (4, 4));
        assert_eq!(CoreSharing::parse("split"), Ok(CoreSharing::Split));
        assert!(CoreSharing::parse("half").unwrap_err().contains("half"));
    }

    #[test]
    fn one_holder_at_a_time_in_arrival_order() {
        let arbiter = CoreArbiter::new();
        let inside = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..4)
            .map(|i| {
                let (a, inside, most) = (arbiter.clone(), inside.clone(), most.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        let _g = a.acquire(if i % 2 == 0 { Owner::Secure } else { Owner::Normal });
                        let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(now, Ordering::SeqCst);
                        std::thread::yield_now();
                        inside.fetch_sub(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 1, "two holders at once");
        let f = arbiter.figures();
        assert_eq!(f.secure_turns + f.normal_turns, 200);
        // Turns never overlap.
        for w in f.turns.windows(2) {
            assert!(w[0].to_ms <= w[1].from_ms, "{:?} overlaps {:?}", w[0], w[1]);
        }
    }

    #[test]
    fn a_secure_tenant_hands_over_to_waiting_plain_work_and_gets_the_cores_back() {
        let arbiter = CoreArbiter::new();
        let tenant = SecureTenant::new(arbiter.clone());
        tenant.begin();
        assert!(!tenant.contended());
        let a = arbiter.clone();
        let plain = std::thread::spawn(move || {
            let _g = a.acquire(Owner::Normal);
        });
        while !tenant.contended() {
            std::thread::yield_now();
        }
        // The plain step runs while the tenant hands over, then the tenant holds again.
        tenant.hand_over(true);
        plain.join().unwrap();
        assert!(!tenant.contended());
        tenant.end();
        let f = arbiter.figures();
        let owners: Vec<Owner> = f.turns.iter().map(|t| t.owner).collect();
        assert_eq!(owners, [Owner::Secure, Owner::Normal, Owner::Secure]);
        assert_eq!(f.changes_of_owner, 2);
        assert_eq!((f.secure_pauses, f.unscrubbed_pauses), (1, 0));
    }
}
