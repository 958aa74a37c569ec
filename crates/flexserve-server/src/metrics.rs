//! Counters and histograms for `GET /metrics` (Prometheus text format).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Upper bounds (seconds) of the time-to-first-token buckets.
const TTFT_BUCKETS: [f64; 9] = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
/// Upper bounds (seconds) of the per-token latency buckets.
const TOKEN_BUCKETS: [f64; 8] = [0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0];

/// A histogram with fixed buckets (counts per bucket, total sum in microseconds).
pub struct Histogram<const N: usize> {
    bounds: [f64; N],
    counts: [AtomicU64; N],
    /// Observations above the last bound.
    over: AtomicU64,
    sum_micros: AtomicU64,
}

impl<const N: usize> Histogram<N> {
    fn new(bounds: [f64; N]) -> Self {
        Histogram {
            bounds,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, seconds: f64) {
        match self.bounds.iter().position(|&b| seconds <= b) {
            Some(i) => self.counts[i].fetch_add(1, Ordering::Relaxed),
            None => self.over.fetch_add(1, Ordering::Relaxed),
        };
        self.sum_micros.fetch_add((seconds * 1e6) as u64, Ordering::Relaxed);
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        cumulative += self.over.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum {}", self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6);
        let _ = writeln!(out, "{name}_count {cumulative}");
    }
}

pub struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub secure_world_restarts: AtomicU64,
    /// Models loaded ahead of the request that comes next.
    pub prefetches: AtomicU64,
    /// Chunks of sealed models' weights loaded ahead of their requests.
    pub prefetched_chunks: AtomicU64,
    /// Sealed models loaded ahead of need header-only, the budget having no room for their weights.
    pub prefetches_header_only: AtomicU64,
    /// Generations stopped because their client went away.
    pub cancelled: std::sync::Arc<AtomicU64>,
    pub ttft: Histogram<9>,
    pub token_latency: Histogram<8>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            secure_world_restarts: AtomicU64::new(0),
            prefetches: AtomicU64::new(0),
            prefetched_chunks: AtomicU64::new(0),
            prefetches_header_only: AtomicU64::new(0),
            cancelled: std::sync::Arc::new(AtomicU64::new(0)),
            ttft: Histogram::new(TTFT_BUCKETS),
            token_latency: Histogram::new(TOKEN_BUCKETS),
        }
    }
}

/// Gauges read at scrape time.
pub struct Gauges {
    pub models_loaded: u64,
    pub secure_granted_bytes: u64,
    pub secure_in_use_bytes: u64,
}

impl Metrics {
    pub fn render(&self, gauges: &Gauges) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, v: &AtomicU64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Ordering::Relaxed));
        };
        counter(&mut out, "flexserve_requests_total", "Completion requests received.", &self.requests);
        counter(&mut out, "flexserve_request_errors_total", "Completion requests that failed.", &self.errors);
        counter(&mut out, "flexserve_prompt_tokens_total", "Prompt tokens evaluated.", &self.prompt_tokens);
        counter(&mut out, "flexserve_generated_tokens_total", "Tokens generated.", &self.generated_tokens);
        counter(
            &mut out,
            "flexserve_secure_world_restarts_total",
            "Sessions with the secure world opened again after one was lost.",
            &self.secure_world_restarts,
        );
        counter(
            &mut out,
            "flexserve_prefetches_total",
            "Models loaded ahead of the request that comes next (next_model, a workflow's next step).",
            &self.prefetches,
        );
        counter(
            &mut out,
            "flexserve_prefetched_chunks_total",
            "Chunks of sealed models' weights loaded ahead of their requests.",
            &self.prefetched_chunks,
        );
        counter(
            &mut out,
            "flexserve_prefetches_header_only_total",
            "Sealed models loaded ahead of need without their weights: the secure memory budget had no room.",
            &self.prefetches_header_only,
        );
        counter(
            &mut out,
            "flexserve_cancelled_total",
            "Generations stopped because their client went away.",
            &self.cancelled,
        );
        self.ttft.render("flexserve_time_to_first_token_seconds", "Time from request to first token.", &mut out);
        self.token_latency.render("flexserve_token_latency_seconds", "Time between streamed tokens.", &mut out);
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge(&mut out, "flexserve_models_loaded", "Models loaded now.", gauges.models_loaded);
        gauge(
            &mut out,
            "flexserve_secure_memory_granted_bytes",
            "Secure memory granted to the secure world (its whole pool).",
            gauges.secure_granted_bytes,
        );
        gauge(
            &mut out,
            "flexserve_secure_memory_in_use_bytes",
            "Secure memory in use in the secure world (weights, KV caches, activations).",
            gauges.secure_in_use_bytes,
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_cumulative() {
        let m = Metrics::default();
        m.ttft.observe(0.07);
        m.ttft.observe(0.3);
        m.ttft.observe(100.0);
        let text = m.render(&Gauges { models_loaded: 1, secure_granted_bytes: 0, secure_in_use_bytes: 0 });
        assert!(text.contains("flexserve_time_to_first_token_seconds_bucket{le=\"0.1\"} 1"), "{text}");
        assert!(text.contains("flexserve_time_to_first_token_seconds_bucket{le=\"0.5\"} 2"), "{text}");
        assert!(text.contains("flexserve_time_to_first_token_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(text.contains("flexserve_time_to_first_token_seconds_count 3"), "{text}");
        assert!(text.contains("flexserve_models_loaded 1"), "{text}");
    }
}
