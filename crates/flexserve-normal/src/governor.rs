//! The memory governor: the pressure watch and `flexserve recall` (the
//! normal world's management right over secure memory).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{available_memory, control, pressure_recall_granules, Result, SecureWorld};

/// A recall the governor made, and what it got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recall {
    pub requested: u32,
    pub released: u32,
    /// Of those, granules that held model layers or KV caches.
    pub evicted: u32,
    pub took: Duration,
    /// Made while a generation was running (only free granules come back then).
    pub during_generation: bool,
    /// Asked for through the control socket (`flexserve recall`), not by the pressure watch.
    pub by_client: bool,
}

/// How often available memory is checked while a generation runs.
pub(crate) const PRESSURE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

impl SecureWorld {
    /// Watch memory pressure while generations run: when available memory is
    /// below `floor` bytes (checked every 50 ms, between tokens), recall what
    /// restores it. The secure world answers between two tokens with the
    /// granules it can give at once (the free ones); see [`SecureWorld::take_recalls`].
    pub fn set_memory_floor(&mut self, floor: Option<u64>) {
        self.pressure = floor.map(|f| (f, Instant::now() - PRESSURE_CHECK_INTERVAL));
    }

    /// Recalls made by the pressure watch or asked through the control socket since the last call.
    pub fn take_recalls(&mut self) -> Vec<Recall> {
        std::mem::take(&mut self.recalls)
    }

    /// The governor's answer to memory pressure: when the system's available
    /// memory is below `floor` bytes, recall enough granules to restore it
    /// (as far as the secure world holds any). Returns what was recalled.
    pub fn relieve_pressure(&mut self, floor: u64) -> Result<Option<(u32, u32, Duration)>> {
        let Some(available) = available_memory() else { return Ok(None) };
        let n = pressure_recall_granules(available, floor, self.info.granule_size, self.granted);
        if n == 0 {
            return Ok(None);
        }
        self.recall(n).map(Some)
    }

    /// Listens for `flexserve recall` on a control socket in `dir` (see
    /// [`control`]); requests are served between tokens of a generation and
    /// by [`SecureWorld::serve_control`] when idle. Returns the socket's path.
    pub fn listen(&mut self, dir: &Path) -> std::io::Result<PathBuf> {
        let socket = control::ControlSocket::bind(dir)?;
        let path = socket.path().to_path_buf();
        self.control = Some(socket);
        Ok(path)
    }

    pub(crate) fn control_pending(&self) -> Option<control::PendingRecall> {
        self.control.as_ref()?.next_pending()
    }

    pub(crate) fn answer(&self, released: u32, evicted: u32, micros: u64) -> control::RecallAnswer {
        control::RecallAnswer {
            released,
            evicted,
            micros,
            granule_size: self.info.granule_size,
            secure_pid: self.pid(),
        }
    }

    /// Serves the `flexserve recall` requests waiting (in full: free
    /// granules, then layers, then idle KV caches); returns how many.
    pub fn serve_control(&mut self) -> Result<usize> {
        let mut served = 0;
        while let Some(asker) = self.control_pending() {
            self.serve_recall(asker)?;
            served += 1;
        }
        Ok(served)
    }

    /// Serves one `flexserve recall` request in full and answers its client:
    /// (released, of which evicted).
    pub(crate) fn serve_recall(&mut self, asker: control::PendingRecall) -> Result<(u32, u32)> {
        let n = asker.amount.granules(self.info.granule_size);
        let t0 = Instant::now();
        match self.recall(n) {
            Ok((released, evicted, took)) => {
                let took_all = t0.elapsed();
                self.recalls.push(Recall {
                    requested: n,
                    released,
                    evicted,
                    took: took_all,
                    during_generation: false,
                    by_client: true,
                });
                asker.answer(Ok(self.answer(released, evicted, took.as_micros() as u64)));
                Ok((released, evicted))
            }
            Err(e) => {
                asker.answer(Err(e.to_string()));
                Err(e)
            }
        }
    }

    /// Granules to recall now, if the pressure watch is on and due.
    pub(crate) fn pressure_due(&mut self) -> Option<u32> {
        let (floor, last) = self.pressure?;
        if last.elapsed() < PRESSURE_CHECK_INTERVAL {
            return None;
        }
        self.pressure = Some((floor, Instant::now()));
        let n = pressure_recall_granules(available_memory()?, floor, self.info.granule_size, self.granted);
        (n > 0).then_some(n)
    }

    pub(crate) fn note_recall(
        &mut self,
        requested: u32,
        released: u32,
        evicted: u32,
        took: Duration,
        during: bool,
        client: bool,
    ) {
        self.granted = self.granted.saturating_sub(u64::from(released));
        self.recalls.push(Recall { requested, released, evicted, took, during_generation: during, by_client: client });
    }
}
