//! Turning logits into the next token: greedy or stochastic sampling with the
//! usual filters, applied in llama.cpp's default order (penalties, top-k,
//! top-p, min-p, temperature) so that the same settings behave alike.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Sampling settings. `temperature <= 0` means greedy (argmax).
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1.0 = off).
    pub top_p: f32,
    /// Drop tokens less likely than min_p times the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive (multiply negative) logits of recently seen tokens (1.0 = off).
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { temperature: 0.8, top_k: 40, top_p: 0.95, min_p: 0.05, repeat_penalty: 1.0, repeat_last_n: 64, seed: 0 }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }
}

/// A sampler with its own random state and the history the penalty needs.
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    recent: Vec<u32>,
    candidates: Vec<(u32, f32)>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Self { params, rng, recent: Vec::new(), candidates: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Records tokens (prompt or generated) for the repetition penalty.
    pub fn observe(&mut self, tokens: &[u32]) {
        self.recent.extend_from_slice(tokens);
        let keep = self.params.repeat_last_n;
        if self.recent.len() > keep {
            self.recent.drain(..self.recent.len() - keep);
        }
    }

    /// Picks the next token from `logits` and records it.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let id = self.pick(logits);
        self.observe(&[id]);
        id
    }

    fn pick(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        let penalize = p.repeat_penalty != 1.0 && !self.recent.is_empty();
        if p.temperature <= 0.0 && !penalize {
            return argmax(logits);
        }
        let cands = &mut self.candidates;
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        if penalize {
            let mut seen: Vec<u32> = self.recent.clone();
            seen.sort_unstable();
            seen.dedup();
            for id in seen {
                if let Some(c) = cands.get_mut(id as usize) {
                    c.1 = if c.1 > 0.0 { c.1 / p.repeat_penalty } else { c.1 * p.repeat_penalty };
                }
            }
        }
        if p.temperature <= 0.0 {
            return cands.iter().fold((0u32, f32::NEG_INFINITY), |b, &c| if c.1 > b.1 { c } else { b }).0;
        }
        // Sort descending by logit; ties keep the lower id first (stable sort).
        let k = if p.top_k > 0 { p.top_k.min(cands.len()) } else { cands.len() };
        if k < cands.len() {
            cands.select_nth_unstable_by(k - 1, |a, b| b.1.total_cmp(&a.1));
            cands.truncate(k);
        }
        cands.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Probabilities at temperature 1 for the top-p / min-p filters.
        let probs = softmax_of(cands);
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut keep = cands.len();
            for (i, pr) in probs.iter().enumerate() {
                acc += pr;
                if acc >= p.top_p {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if p.min_p > 0.0 {
            let max_p = probs[0];
            let keep = probs.iter().take(cands.len()).take_while(|&&pr| pr >= p.min_p * max_p).count();
            cands.truncate(keep.max(1));
        }
        for c in cands.iter_mut() {
            c.1 /= p.temperature;
        }
        let probs = softmax_of(cands);
        let r: f32 = self.rng.gen::<f32>();
        let mut acc = 0.0;
        for (c, pr) in cands.iter().zip(&probs) {
            acc += pr;
            if r < acc {
                return c.0;
            }
        }
        cands.last().map(|c| c.0).unwrap_or(0)
    }
}

/// Index of the largest value (the first one on ties).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn softmax_of(cands: &[(u32, f32)]) -> Vec<f32> {
    let max = cands.iter().map(|c| c.1).fold(f32::NEG_INFINITY, f32::max);
    let mut out: Vec<f32> = cands.iter().map(|c| (c.1 - max).exp()).collect();
    let sum: f32 = out.iter().sum();
    for v in &mut out {
        *v /= sum;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_argmax_and_first_on_ties() {
        let mut s = Sampler::new(SamplingParams::greedy());
        assert_eq!(s.sample(&[0.1, 3.0, -1.0, 3.0]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_different_seed_differs() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 11) as f32 * 0.3).collect();
        let params =
            SamplingParams { temperature: 1.5, top_k: 0, top_p: 1.0, min_p: 0.0, seed: 7, ..Default::default() };
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(params.clone()), run(params.clone()));
        assert_ne!(run(params.clone()), run(SamplingParams { seed: 8, ..params }));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5, 2.0, 1.9, -3.0];
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 1, ..Default::default() });
        for _ in 0..20 {
            assert_eq!(s.sample(&logits), 1);
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        // token 0 holds ~88% of the mass; top_p 0.5 leaves only it.
        let logits = [5.0, 3.0, 0.0, 0.0];
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.5, min_p: 0.0, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits) == 0));
        // min_p 0.2: token 1 (p1/p0 = e^-2 = 0.135) is dropped too.
        let mut s =
            Sampler::new(SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.2, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn sampling_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = 0.25, 0.75
        let mut s = Sampler::new(SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: 3,
            ..Default::default()
        });
        let ones = (0..4000).filter(|_| s.sample(&logits) == 1).count();
        assert!((2800..3200).contains(&ones), "{ones}");
    }

    #[test]
    fn repeat_penalty_demotes_seen_tokens() {
        let logits = [2.0, 1.9];
        let mut s = Sampler::new(SamplingParams { temperature: 0.0, repeat_penalty: 1.5, ..Default::default() });
        s.observe(&[0]);
        assert_eq!(s.sample(&logits), 1);
    }
}
