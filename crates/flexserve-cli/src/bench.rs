//! `flexserve bench engine`: prefill and decode speed, like llama-bench, and
//! what they come to in weights streamed (decode, GB/s, and as a share of the
//! machine's read bandwidth, which a short probe measures) and in arithmetic
//! (prefill, GOP/s).

use std::time::{Duration, Instant};

use anyhow::Result;
use flexserve_engine::{Logits, Model, Session, TokenCost};

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
    /// Peak RSS of the benchmark itself, taken before the bandwidth probe
    /// (whose buffer would otherwise count).
    pub peak_rss_bytes: u64,
    /// What one decoded token reads and multiplies.
    pub per_token: TokenCost,
    /// The machine's read bandwidth in GB/s (10^9 bytes), measured with the
    /// benchmark's thread count ([`read_bandwidth`]).
    pub read_gb_per_s: f64,
}

impl EngineResult {
    /// Weights streamed per second at each decode repetition's speed, GB/s.
    pub fn decode_gb_per_s(&self) -> Vec<f64> {
        self.decode.tokens_per_s.iter().map(|&t| self.per_token.gb_per_s(t)).collect()
    }

    /// Each decode repetition's GB/s as a share of the read bandwidth (above 1
    /// where the weights are served from caches rather than memory).
    pub fn bandwidth_share(&self) -> Vec<f64> {
        self.decode_gb_per_s().iter().map(|&g| share(g, self.read_gb_per_s)).collect()
    }

    /// Matrix arithmetic per second at each repetition's speed, GOP/s.
    pub fn gop_per_s(&self, s: &Series) -> Vec<f64> {
        s.tokens_per_s.iter().map(|&t| self.per_token.gop_per_s(t)).collect()
    }
}

fn share(gb_per_s: f64, read_gb_per_s: f64) -> f64 {
    if read_gb_per_s > 0.0 {
        gb_per_s / read_gb_per_s
    } else {
        0.0
    }
}

/// Bytes the read-bandwidth probe streams: 512 MiB, so that it measures
/// memory and not a cache. That is many times the last-level cache of desktop
/// and most server CPUs (tens of MiB); the largest server parts share up to
/// about 500 MiB among all their cores, of which the few cores a benchmark
/// runs on get a slice. Filling it once and reading it three times still takes
/// well under a second at a few GB/s, and the buffer is freed right after.
pub const PROBE_BYTES: usize = 512 << 20;
/// Timed passes over the probe's buffer; the fastest counts.
const PROBE_PASSES: usize = 3;

/// The machine's read bandwidth in GB/s (10^9 bytes a second): a buffer of
/// [`PROBE_BYTES`], written once untimed (so that its pages exist and are not
/// the kernel's shared zero page), split into `threads` contiguous parts, each
/// read by a thread of its own with the active tier's read kernel
/// (`flexserve_quant::read_kernel`); best of [`PROBE_PASSES`] passes, each
/// timed from the threads' start to the last one's end.
pub fn read_bandwidth(threads: usize) -> f64 {
    let threads = threads.max(1);
    let part = PROBE_BYTES.div_ceil(threads);
    let mut buf = vec![0u8; PROBE_BYTES];
    std::thread::scope(|s| {
        for (i, p) in buf.chunks_mut(part).enumerate() {
            s.spawn(move || p.fill(0x5A ^ i as u8));
        }
    });
    let read = flexserve_quant::read_kernel();
    let mut best = Duration::MAX;
    for _ in 0..PROBE_PASSES {
        let t0 = Instant::now();
        let sum = std::thread::scope(|s| {
            let parts: Vec<_> = buf.chunks(part).map(|p| s.spawn(move || read(std::hint::black_box(p)))).collect();
            parts.into_iter().map(|h| h.join().expect("probe thread")).fold(0u64, u64::wrapping_add)
        });
        best = best.min(t0.elapsed());
        std::hint::black_box(sum);
    }
    PROBE_BYTES as f64 / best.as_secs_f64().max(1e-9) / 1e9
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
    let peak_rss_bytes = peak_rss_bytes();
    Ok(EngineResult {
        kernels: flexserve_quant::active_isa(),
        prefill,
        decode: Series { n_tokens: b.gen_tokens, tokens_per_s: speeds },
        peak_rss_bytes,
        per_token: model.weights.per_token(),
        read_gb_per_s: read_bandwidth(model.threads()),
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

/// The JSON report. Per-repetition arrays, as `tokens_per_s`: `gop_per_s` of
/// each prefill length, `gb_per_s` and `bandwidth_share` of decode.
pub fn to_json(model_path: &str, threads: usize, r: &EngineResult) -> serde_json::Value {
    serde_json::json!({
        "model": model_path,
        "threads": threads,
        "prefill": r.prefill.iter().map(|s| serde_json::json!({
            "n_tokens": s.n_tokens,
            "tokens_per_s": s.tokens_per_s,
            "gop_per_s": r.gop_per_s(s),
        })).collect::<Vec<_>>(),
        "decode": {
            "n_tokens": r.decode.n_tokens,
            "tokens_per_s": r.decode.tokens_per_s,
            "gb_per_s": r.decode_gb_per_s(),
            "bandwidth_share": r.bandwidth_share(),
        },
        "peak_rss_bytes": r.peak_rss_bytes,
        "kernels": r.kernels.name(),
        "weight_bytes_per_token": r.per_token.weight_bytes,
        "matrix_params_per_token": r.per_token.matrix_params,
        "read_bandwidth_gb_per_s": r.read_gb_per_s,
    })
}

pub fn print_table(r: &EngineResult) {
    println!(
        "{:<12} {:>12} {:>12} {:>12} {:>10} {:>10} {:>8}",
        "test", "median t/s", "min", "max", "GOP/s", "GB/s", "of read"
    );
    let row = |name: String, s: &Series, decode: bool| {
        let min = s.tokens_per_s.iter().copied().fold(f64::INFINITY, f64::min);
        let max = s.tokens_per_s.iter().copied().fold(0.0, f64::max);
        let tps = median(&s.tokens_per_s);
        let gop = r.per_token.gop_per_s(tps);
        let (gb, of_read) = if decode {
            let gb = r.per_token.gb_per_s(tps);
            (format!("{gb:.2}"), format!("{:.0}%", 100.0 * share(gb, r.read_gb_per_s)))
        } else {
            ("-".to_string(), "-".to_string())
        };
        println!("{name:<12} {tps:>12.1} {min:>12.1} {max:>12.1} {gop:>10.1} {gb:>10} {of_read:>8}");
    };
    for s in &r.prefill {
        row(format!("pp{}", s.n_tokens), s, false);
    }
    row(format!("tg{}", r.decode.n_tokens), &r.decode, true);
    println!(
        "per token: {:.1} MiB of weights, {:.1} M matrix parameters (GOP/s = 2 x parameters x t/s, attention left out)",
        r.per_token.weight_bytes as f64 / (1 << 20) as f64,
        r.per_token.matrix_params as f64 / 1e6
    );
    println!(
        "read bandwidth: {:.2} GB/s (probe: {} MiB, best of {PROBE_PASSES} passes, the benchmark's threads)",
        r.read_gb_per_s,
        PROBE_BYTES >> 20
    );
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
            decode: Series { n_tokens: 32, tokens_per_s: vec![5.0, 4.0] },
            peak_rss_bytes: 1 << 20,
            // 200 MB and 100 M parameters per token; 4 GB/s to read.
            per_token: TokenCost { weight_bytes: 200_000_000, matrix_params: 100_000_000 },
            read_gb_per_s: 4.0,
        };
        let j = to_json("m.gguf", 2, &r);
        assert_eq!(j["model"], "m.gguf");
        assert_eq!(j["threads"], 2);
        assert_eq!(j["prefill"][0]["n_tokens"], 128);
        assert_eq!(j["prefill"][0]["tokens_per_s"][1], 12.0);
        assert_eq!(j["decode"]["n_tokens"], 32);
        assert_eq!(j["decode"]["tokens_per_s"][0], 5.0);
        assert_eq!(j["peak_rss_bytes"], 1 << 20);
        assert_eq!(j["kernels"], "avx2");
        let close = |v: &serde_json::Value, want: f64| {
            let got = v.as_f64().unwrap_or_else(|| panic!("{v} is not a number"));
            assert!((got - want).abs() < 1e-9, "{got} != {want}");
        };
        // Prefill: 2 x 100 M parameters x 10 and 12 t/s.
        close(&j["prefill"][0]["gop_per_s"][0], 2.0);
        close(&j["prefill"][0]["gop_per_s"][1], 2.4);
        // Decode: 200 MB x 5 and 4 t/s, over 4 GB/s.
        close(&j["decode"]["gb_per_s"][0], 1.0);
        close(&j["decode"]["gb_per_s"][1], 0.8);
        close(&j["decode"]["bandwidth_share"][0], 0.25);
        close(&j["decode"]["bandwidth_share"][1], 0.2);
        close(&j["read_bandwidth_gb_per_s"], 4.0);
        assert_eq!(j["weight_bytes_per_token"], 200_000_000);
        assert_eq!(j["matrix_params_per_token"], 100_000_000);
    }

    #[test]
    fn the_read_probe_gives_a_plausible_bandwidth() {
        let gb = read_bandwidth(2);
        assert!(gb.is_finite() && gb > 0.1 && gb < 10_000.0, "{gb} GB/s");
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
