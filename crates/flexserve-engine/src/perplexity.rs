//! Perplexity as llama.cpp measures it: the text is cut into consecutive
//! chunks of `n_ctx` tokens, each evaluated from an empty cache, and each
//! chunk's second half is scored (every token there has at least n_ctx/2
//! tokens of context).

use crate::model::{Logits, Model, Session};
use crate::EngineError;

#[derive(Debug, Clone)]
pub struct PerplexityResult {
    pub ppl: f64,
    /// Standard error of the perplexity estimate.
    pub ppl_err: f64,
    pub n_chunks: usize,
    /// Estimate after each chunk.
    pub running: Vec<f64>,
}

/// Scores `tokens` in chunks of `n_ctx`. `bos`: the model's BOS token when it
/// adds one, which then replaces each chunk's first token.
pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult, EngineError> {
    perplexity_in(&mut Session::new(model, n_ctx), tokens, n_ctx, bos, on_chunk)
}

/// [`perplexity`] in a session the caller provides (whose cache holds at
/// least `n_ctx` positions; its contents are overwritten).
pub fn perplexity_in(
    session: &mut Session<'_>,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult, EngineError> {
    if session.n_ctx() < n_ctx {
        return Err(EngineError::ContextFull { n_ctx: session.n_ctx(), needed: n_ctx });
    }
    if n_ctx < 4 {
        return Err(EngineError::Other(format!("context of {n_ctx} tokens is too small to score")));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(EngineError::Other(format!(
            "the text has {} tokens; at least {n_ctx} (one chunk) are needed",
            tokens.len()
        )));
    }
    let first = n_ctx / 2;
    let n_vocab = session.model().config.n_vocab;
    let mut nll_sum = 0f64;
    let mut nll2_sum = 0f64;
    let mut count = 0usize;
    let mut running = Vec::with_capacity(n_chunks);
    for chunk in 0..n_chunks {
        let mut input = tokens[chunk * n_ctx..(chunk + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            input[0] = b;
        }
        session.truncate(0);
        let logits = session.eval(&input, Logits::From(first))?;
        // logits row r belongs to position first + r and predicts the next token.
        for (r, row) in logits.chunks_exact(n_vocab).take(n_ctx - 1 - first).enumerate() {
            let target = input[first + r + 1] as usize;
            let nll = -log_softmax_at(row, target);
            nll_sum += nll;
            nll2_sum += nll * nll;
            count += 1;
        }
        let ppl = (nll_sum / count as f64).exp();
        running.push(ppl);
        on_chunk(chunk + 1, n_chunks, ppl);
    }
    let mean = nll_sum / count as f64;
    let var = (nll2_sum / count as f64 - mean * mean).max(0.0);
    let ppl = mean.exp();
    let ppl_err = ppl * (var / (count as f64 - 1.0).max(1.0)).sqrt();
    Ok(PerplexityResult { ppl, ppl_err, n_chunks, running })
}

fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
    row[i] as f64 - max - sum.ln()
}
