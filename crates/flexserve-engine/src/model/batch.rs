//! One decode step for several sessions of one model (continuous batching):
//! each session gets one token at its own position, and every weight matrix
//! streams once for all of them instead of once per session. Attention runs
//! per session, on its own cache. The kernels give each row the value the
//! plain dot gives it, so a session's tokens are the same batched or alone.

use super::*;

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
    let w = &model.weights;
    let n = tokens.len();
    let (e, qd, kvd, hd) = (c.n_embd, c.q_dim(), c.kv_dim(), c.head_dim);
    s.x.resize(n * e, 0.0)?;
    s.h.resize(n * e, 0.0)?;
    s.q.resize(n * qd, 0.0)?;
    s.k.resize(n * kvd, 0.0)?;
    s.v.resize(n * kvd, 0.0)?;
    s.att.resize(n * qd, 0.0)?;
    s.gate.resize(n * c.n_ff, 0.0)?;
    s.up.resize(n * c.n_ff, 0.0)?;

    let embd = ops::kernels(w.token_embd.ty)?;
    for (t, &tok) in tokens.iter().enumerate() {
        (embd.dequantize)(w.token_embd.row(tok as usize), &mut s.x[t * e..(t + 1) * e]);
    }
    let pos_scale = match c.rope_scaling {
        RopeScaling::None => 1.0,
        RopeScaling::Linear { factor } => 1.0 / factor,
    };
    s.angles.resize_with(n, Vec::new);
    for (t, a) in s.angles.iter_mut().enumerate() {
        ops::rope_angles(sessions[t].n_past, c.rope_dim, c.rope_base, pos_scale, w.rope_freq_factors.as_deref(), a);
    }
    let neox = c.arch == Arch::Qwen2;

    for (li, layer) in w.layers.iter().enumerate() {
        ops::rms_norm(&s.x, &layer.attn_norm, c.rms_eps, &mut s.h);
        quantize_for(&mut s.acts, &s.h, e, &layer.wq)?;
        ops::matmul(&layer.wq, &s.acts, &mut s.q, &mut s.mm)?;
        reuse_for(&mut s.acts, &s.h, e, &layer.wk)?;
        ops::matmul(&layer.wk, &s.acts, &mut s.k, &mut s.mm)?;
        reuse_for(&mut s.acts, &s.h, e, &layer.wv)?;
        ops::matmul(&layer.wv, &s.acts, &mut s.v, &mut s.mm)?;
        add_bias(&mut s.q, layer.bq.as_deref());
        add_bias(&mut s.k, layer.bk.as_deref());
        add_bias(&mut s.v, layer.bv.as_deref());

        // Each row at its own position, into its own cache, attending to its own past.
        for (t, session) in sessions.iter_mut().enumerate() {
            let a = &s.angles[t];
            for head in s.q[t * qd..(t + 1) * qd].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..c.rope_dim], a, neox);
            }
            for head in s.k[t * kvd..(t + 1) * kvd].chunks_exact_mut(hd) {
                ops::rope_head(&mut head[..c.rope_dim], a, neox);
            }
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
            attend_head(c, kc, vc, head, last, &q[i * hd..(i + 1) * hd], o);
        });

        quantize_for(&mut s.acts, &s.att, qd, &layer.wo)?;
        ops::matmul(&layer.wo, &s.acts, &mut s.h, &mut s.mm)?;
        add_into(&mut s.x, &s.h);

        ops::rms_norm(&s.x, &layer.ffn_norm, c.rms_eps, &mut s.h);
        quantize_for(&mut s.acts, &s.h, e, &layer.w_gate)?;
        ops::matmul(&layer.w_gate, &s.acts, &mut s.gate, &mut s.mm)?;
        reuse_for(&mut s.acts, &s.h, e, &layer.w_up)?;
        ops::matmul(&layer.w_up, &s.acts, &mut s.up, &mut s.mm)?;
        let silu_mul = flexserve_quant::activations().silu_mul;
        s.gate.par_chunks_mut(c.n_ff).zip(s.up.par_chunks(c.n_ff)).for_each(|(g, u)| silu_mul(g, u));
        quantize_for(&mut s.acts, &s.gate, c.n_ff, &layer.w_down)?;
        ops::matmul(&layer.w_down, &s.acts, &mut s.h, &mut s.mm)?;
        add_into(&mut s.x, &s.h);
    }

    let mut normed = vec![0f32; n * e];
    ops::rms_norm(&s.x, &w.output_norm, c.rms_eps, &mut normed);
    quantize_for(&mut s.acts, &normed, e, &w.output)?;
    let mut logits = vec![0f32; n * c.n_vocab];
    ops::matmul(&w.output, &s.acts, &mut logits, &mut s.mm)?;
    Ok(logits.chunks_exact(c.n_vocab).map(<[f32]>::to_vec).collect())
}
