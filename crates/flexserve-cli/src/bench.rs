//! `flexserve bench engine`: prefill and decode speed, like llama-bench.

use std::time::Instant;

use anyhow::Result;
use flexserve_engine::{Logits, Model, Session};

pub struct EngineBench {
    pub prompt_tokens: Vec<usize>,
    pub gen_tokens: usize,
    pub repetitions: usize,
}

pub struct Series {
    pub n_tokens: usize,
    pub tokens_per_s: Vec<f64>,
}

pub struct EngineResult {
    /// The kernels' instruction-set tier (the CPU's best unless `--isa` capped it).
    pub kernels: flexserve_quant::Isa,
    pub prefill: Vec<Series>,
    pub decode: Series,
    pub peak_rss_bytes: u64,
}

/// Deterministic prompt ids spread over the vocabulary.
fn prompt(n: usize, n_vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7919 + 13) % n_vocab) as u32).collect()
}

pub fn run(model: &Model, b: &EngineBench) -> Result<EngineResult> {
    let n_vocab = model.config.n_vocab;
    const WARMUP: usize = 16;
    let longest = b.prompt_tokens.iter().copied().max().unwrap_or(0).max(WARMUP + 4).max(1 + b.gen_tokens);
    let mut session = Session::new(model, longest + 1);
    // Warm-up: fault in the weights and the cache, start the workers.
    session.eval(&prompt(WARMUP, n_vocab), Logits::Last)?;
    for t in 0..4 {
        session.eval(&[t as u32 % n_vocab as u32], Logits::Last)?;
    }
    let mut prefill = Vec::new();
    for &n in &b.prompt_tokens {
        let ids = prompt(n, n_vocab);
        let mut speeds = Vec::new();
        for _ in 0..b.repetitions {
            session.truncate(0);
            let t0 = Instant::now();
            session.eval(&ids, Logits::Last)?;
            speeds.push(n as f64 / t0.elapsed().as_secs_f64());
        }
        prefill.push(Series { n_tokens: n, tokens_per_s: speeds });
    }
    let mut speeds = Vec::new();
    for _ in 0..b.repetitions {
        session.truncate(0);
        let mut logits = session.eval(&[1 % n_vocab as u32], Logits::Last)?;
        let t0 = Instant::now();
        for _ in 0..b.gen_tokens {
            let next = flexserve_engine::sampling::argmax(&logits);
            logits = session.eval(&[next], Logits::Last)?;
        }
        speeds.push(b.gen_tokens as f64 / t0.elapsed().as_secs_f64());
    }
    Ok(EngineResult {
        kernels: flexserve_quant::active_isa(),
        prefill,
        decode: Series { n_tokens: b.gen_tokens, tokens_per_s: speeds },
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// The process's peak resident set size (VmHWM), 0 where unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

pub fn to_json(model_path: &str, threads: usize, r: &EngineResult) -> serde_json::Value {
    serde_json::json!({
        "model": model_path,
        "threads": threads,
        "prefill": r.prefill.iter().map(|s| serde_json::json!({"n_tokens": s.n_tokens, "tokens_per_s": s.tokens_per_s})).collect::<Vec<_>>(),
        "decode": {"n_tokens": r.decode.n_tokens, "tokens_per_s": r.decode.tokens_per_s},
        "peak_rss_bytes": r.peak_rss_bytes,
        "kernels": r.kernels.name(),
    })
}

pub fn print_table(r: &EngineResult) {
    println!("{:<12} {:>12} {:>12} {:>12}", "test", "median t/s", "min", "max");
    let row = |name: String, s: &Series| {
        let min = s.tokens_per_s.iter().copied().fold(f64::INFINITY, f64::min);
        let max = s.tokens_per_s.iter().copied().fold(0.0, f64::max);
        println!("{name:<12} {:>12.1} {min:>12.1} {max:>12.1}", median(&s.tokens_per_s));
    };
    for s in &r.prefill {
        row(format!("pp{}", s.n_tokens), s);
    }
    row(format!("tg{}", r.decode.n_tokens), &r.decode);
    println!("peak RSS: {:.1} MiB", r.peak_rss_bytes as f64 / (1 << 20) as f64);
    println!("kernels: {}", r.kernels.name());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_the_documented_fields_and_the_kernel_tier() {
        let r = EngineResult {
            kernels: flexserve_quant::Isa::Avx2,
            prefill: vec![Series { n_tokens: 128, tokens_per_s: vec![10.0, 12.0] }],
            decode: Series { n_tokens: 32, tokens_per_s: vec![5.0] },
            peak_rss_bytes: 1 << 20,
        };
        let j = to_json("m.gguf", 2, &r);
        assert_eq!(j["model"], "m.gguf");
        assert_eq!(j["threads"], 2);
        assert_eq!(j["prefill"][0]["n_tokens"], 128);
        assert_eq!(j["prefill"][0]["tokens_per_s"][1], 12.0);
        assert_eq!(j["decode"]["n_tokens"], 32);
        assert_eq!(j["peak_rss_bytes"], 1 << 20);
        assert_eq!(j["kernels"], "avx2");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
