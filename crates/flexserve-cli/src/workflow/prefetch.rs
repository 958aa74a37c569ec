//! The `flexserve` design's prefetch: the next step's sealed model loads
//! while the current step runs (behind a plain step's computation, or
//! behind a sealed step's decode once its own chunks are sent), first
//! layers first, within what the budget has free. The next step's
//! pipelined load then streams only the rest.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Result;
use flexserve_normal::{NormalError, PrefetchReport};

use super::SecureSide;

/// A result of the link to the secure world.
type Linked<T> = std::result::Result<T, NormalError>;

/// What the prefetch during a step did for the next step's model.
#[derive(Debug, Clone)]
pub struct Prefetched {
    /// The model's name in the workflow.
    pub model: String,
    /// Chunks loaded during the step.
    pub chunks: usize,
    /// Chunks of the model still missing when the step ended (`None`: it
    /// could not be opened, and its own step reports why).
    pub missing_chunks: Option<u32>,
    /// Why it stopped short, if it did.
    pub stopped: Option<String>,
}

/// Opens model `m` header-only (once).
pub(super) fn open(s: &mut SecureSide, m: usize, path: &Path) -> Linked<()> {
    if s.opened[m].is_none() {
        let (opened, _) = s.world.open_model_header(path)?;
        s.opened[m] = Some(opened);
    }
    Ok(())
}

/// Opens model `m` (header-only) and loads what of it fits (on the thread
/// beside a plain step), until `done`. A model the secure world refuses is left to its
/// own step, which fails on it, named.
pub(super) fn prefetch(s: &mut SecureSide, m: usize, path: &Path, done: &AtomicBool) -> Linked<PrefetchReport> {
    let opened = open(s, m, path).and_then(|()| {
        let model = s.opened[m].as_ref().expect("opened above");
        s.world.prefetch(model, || done.load(Ordering::Relaxed))
    });
    match opened {
        Err(NormalError::Secure { code, message }) => {
            Ok(PrefetchReport { stopped: Some(format!("{message} [{code:?}]")), ..PrefetchReport::default() })
        }
        other => other,
    }
}

/// The figures of a prefetch once its step ended: what it loaded and what
/// of the model is still missing (the secure world's status).
pub(super) fn finish(
    s: &mut SecureSide,
    m: usize,
    name: &str,
    prefetched: Linked<PrefetchReport>,
) -> Result<Prefetched> {
    let report = prefetched?;
    let status = s.world.status()?;
    let id = s.opened[m].as_ref().map(|o| o.id);
    let missing_chunks =
        status.models.iter().find(|st| Some(st.model) == id).map(|st| st.chunks.saturating_sub(st.resident_chunks));
    Ok(Prefetched { model: name.to_string(), chunks: report.chunks, missing_chunks, stopped: report.stopped })
}
