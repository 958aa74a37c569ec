//! A generation's memory in granted granules: what its KV cache and
//! activations take, whether the free granules hold it, and the session
//! built in them.

use super::*;

/// Granules a request's KV cache (none if `state` already holds `positions`
/// positions) and activations (`plan`) take, in whole granules.
pub(super) fn kv_and_scratch_granules(
    granule: usize,
    config: &flexserve_engine::ModelConfig,
    state: Option<&SessionState>,
    positions: usize,
    plan: &ScratchPlan,
) -> Result<usize, Failure> {
    let keep = state.is_some_and(|s| s.n_ctx() >= positions);
    // Whole granules: the slack of the last one holds more positions.
    let kv = if keep {
        0
    } else {
        let bytes = positions
            .checked_mul(KvCache::bytes_per_position(config))
            .ok_or_else(|| (ErrorCode::BadArgument, format!("a KV cache of {positions} positions is too large")))?;
        bytes.div_ceil(granule)
    };
    Ok(kv + plan.buffers.iter().map(|b| b.div_ceil(granule)).sum::<usize>())
}

/// `MemoryNeeded` if the free granted granules cannot hold `needed` more.
pub(in crate::world) fn memory_short<M: SecureMemory>(memory: &M, needed: usize) -> Result<Option<Reply>, Failure> {
    let s = memory.stats();
    let missing = needed.saturating_sub(s.granted.saturating_sub(s.in_use));
    if missing == 0 {
        return Ok(None);
    }
    match u32::try_from(missing) {
        Ok(granules) => Ok(Some(Reply::MemoryNeeded { granules })),
        Err(_) => Err((ErrorCode::BadArgument, format!("{missing} granules are more than any grant"))),
    }
}

/// Memory for a request that the free granules cannot hold: the state given
/// back untouched, and the reply to send (what to grant, or why not).
pub(super) struct KvShortfall {
    pub(super) state: Option<SessionState>,
    pub(super) reply: Result<Reply, Failure>,
}

/// A session on `engine` whose KV cache and activations live in granted
/// granules: the cache holds at least `positions` positions (at most
/// `limit`), `state` as it is when it has the room, else moved into (or
/// started in) a new region; the activations take the regions of `plan`.
/// Everything is checked against the free granules before anything is
/// taken. Returns the session and, when a new cache region was taken, its
/// granules.
pub(super) fn kv_session<'m, M: SecureMemory>(
    memory: &M,
    engine: &'m Model,
    state: Option<SessionState>,
    positions: usize,
    limit: usize,
    plan: &ScratchPlan,
) -> Result<(Session<'m>, Option<usize>), Box<KvShortfall>> {
    let shortfall = |state, reply| Box::new(KvShortfall { state, reply });
    let granule = memory.granule_size().max(1);
    let keep = state.as_ref().is_some_and(|s| s.n_ctx() >= positions);
    let needed = match kv_and_scratch_granules(granule, &engine.config, state.as_ref(), positions, plan) {
        Ok(n) => n,
        Err(failure) => return Err(shortfall(state, Err(failure))),
    };
    match memory_short(memory, needed) {
        Ok(None) => {}
        Ok(Some(reply)) => return Err(shortfall(state, Ok(reply))),
        Err(failure) => return Err(shortfall(state, Err(failure))),
    }
    // Checked above: the product does not overflow.
    let kv_granules =
        if keep { 0 } else { (positions * KvCache::bytes_per_position(&engine.config)).div_ceil(granule) };
    let mut taken = None;
    let session = match state {
        Some(state) if keep => Session::resume(engine, state),
        state => {
            let region = match memory.alloc(kv_granules * granule) {
                Ok(region) => region,
                Err(e) => {
                    let message = format!("KV cache of {positions} positions: {e}");
                    return Err(shortfall(state, Err((ErrorCode::NoMemory, message))));
                }
            };
            taken = Some(region.granules());
            let block = Box::new(RegionBlock(region));
            match state {
                Some(old) => old.moved_to(limit, block).and_then(|s| Session::resume(engine, s)),
                None => KvCache::in_memory(&engine.config, limit, block).and_then(|kv| Session::with_cache(engine, kv)),
            }
        }
    };
    let mut session = session.map_err(|e| shortfall(None, Err(engine_failure(e))))?;
    session.set_scratch_source(Arc::new(GrantedScratch(memory.clone())));
    // On failure the session (and the cache just moved into it) is lost, as
    // for any engine error; the conversation's messages remain.
    session.reserve_scratch(plan).map_err(|e| shortfall(None, Err((ErrorCode::NoMemory, e.to_string()))))?;
    Ok((session, taken))
}
