//! One decode step for several sessions of one model (continuous batching):
//! each session gets one token at its own position, and every weight matrix
//! streams once for all of them instead of once per session. Attention runs
//! per session, on its own cache. The kernels give each row the value the
//! plain dot gives it, so a session's tokens are the same batched or alone.

use rayon::prelude::*;

use super::flash_attention::decode_head;
use super::scratch::Scratch;
use super::{Model, Session};
use crate::memory::heap_scratch;
use crate::EngineError;

impl<'m> Session<'m> {
    /// Evaluates `tokens[i]` in `sessions[i]` (one token each, all sessions
    /// on the same model) and returns each session's next-token logits.
    /// The first session's scratch holds the batch's activations.
    pub fn decode_batch(sessions: &mut [&mut Session<'m>], tokens: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        let n = tokens.len();
        if n == 0 || sessions.len() != n {
            return Err(EngineError::Other(format!("decode_batch: {} sessions for {n} tokens", sessions.len())));
        }
        let model = sessions[0].model;
        if sessions.iter().any(|s| !std::ptr::eq(s.model, model)) {
            return Err(EngineError::Other("decode_batch: the sessions belong to different models".to_string()));
        }
        for s in sessions.iter() {
            if s.n_past + 1 > s.kv.n_ctx() {
                return Err(EngineError::ContextFull { n_ctx: s.kv.n_ctx(), needed: s.n_past + 1 });
            }
        }
        let n_vocab = model.config.n_vocab;
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(EngineError::BadToken { id: bad, n_vocab });
        }
        // The batch's activations use the first session's scratch, lent for the step.
        let mut scratch = std::mem::replace(&mut sessions[0].s, Scratch::new(heap_scratch()));
        let result = model.pool.install(|| decode_step(model, sessions, tokens, &mut scratch));
        sessions[0].s = scratch;
        if result.is_ok() {
            for s in sessions.iter_mut() {
                s.n_past += 1;
            }
        }
        result
    }
}

fn decode_step(
    model: &Model,
    sessions: &mut [&mut Session<'_>],
    tokens: &[u32],
    s: &mut Scratch,
) -> Result<Vec<Vec<f32>>, EngineError> {
    let c = &model.config;
    let (kvd, hd) = (c.kv_dim(), c.head_dim);
    // Each row as its session decodes it alone (llama.cpp's split keys past 256 positions).
    let threads = model.pool.current_num_threads();
    s.begin(model, tokens, |t| sessions[t].n_past)?;
    // One token per session: each row's products as it gets them alone.
    s.acts.independent_rows = true;
    for li in 0..c.n_layer {
        let layer = model.weights.layer(li)?;
        s.attention_inputs(c, li, layer)?;
        // Each row into its own cache, at its own position.
        for (t, session) in sessions.iter_mut().enumerate() {
            session.kv.store(li, session.n_past, &s.k[t * kvd..(t + 1) * kvd], &s.v[t * kvd..(t + 1) * kvd]);
        }
        // Every head of every session in one parallel pass (a pass per
        // session would pay the fork and join once per session and layer).
        let caches: Vec<(&[u16], &[u16], usize)> =
            sessions.iter().map(|x| (x.kv.k(li), x.kv.v(li), x.n_past)).collect();
        let q = &s.q;
        s.att.par_chunks_mut(hd).enumerate().for_each(|(i, o)| {
            let (t, head) = (i / c.n_head, i % c.n_head);
            let (kc, vc, last) = caches[t];
            let seen = c.first_visible(li, last)..=last;
            decode_head(c, kc, vc, head, seen, &q[i * hd..(i + 1) * hd], o, threads);
        });
        s.finish_layer(c, layer)?;
    }
    let logits = s.logits(model, 0)?;
    Ok(logits.chunks_exact(c.n_vocab).map(<[f32]>::to_vec).collect())
}
