//! `flexserve bench serve`: a load generator for `flexserve serve` (or any
//! OpenAI-compatible server), reporting as llama.cpp's server benchmarks do.
//!
//! For each concurrency level C it sends N streamed chat completions, C of
//! them in flight at once, each with a prompt of its own, and measures per
//! request the time to first token (the first event carrying content), the
//! mean gap between content events, and the tokens generated (the usage
//! chunk's `completion_tokens`, else the content events). A level reports its
//! aggregate generated tokens per second (the successful requests' tokens over
//! the level's wall time) and nearest-rank percentiles of the per-request times.
//!
//! Two warm-up requests, not counted, come first: they load the model (a
//! cold load would otherwise count as the first request's time to first
//! token), check the URL, key and model, and measure how many tokens the
//! prompts' words take (from the usage the server reports).
//!
//! The client speaks plain HTTP (no TLS), ignores proxy variables and talks
//! only to the URL it is given; every request is bounded by `--timeout`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use flexserve_client::sse::{SseEvent, SseParser};
use serde_json::{json, Value};

#[derive(Args)]
pub struct ServeArgs {
    /// The server's base URL, as `flexserve serve` prints it (e.g. http://127.0.0.1:8080).
    #[arg(long)]
    url: String,
    /// The model to ask (a name the server serves).
    #[arg(long)]
    model: String,
    /// Requests in flight at once: one level per value, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    /// Requests per level (a level sends at least as many as its concurrency).
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Tokens each request asks for (max_tokens).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// About how many tokens each prompt has, chat template included.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// The server's API key, sent as `Authorization: Bearer KEY`.
    #[arg(long, env = "FLEXSERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Seconds one request may take before it counts as failed.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
    /// Print one JSON object (the last line of stdout) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Where the requests go.
pub(crate) struct Target {
    /// The base URL, as shown in messages and the report.
    pub(crate) base: String,
    /// `{base}/v1/chat/completions`.
    endpoint: String,
    pub(crate) model: String,
    pub(crate) api_key: Option<String>,
    pub(crate) timeout: Duration,
}

/// One request's measurements.
#[derive(Default)]
pub(crate) struct Outcome {
    pub(crate) error: Option<String>,
    /// Seconds from sending the request to the first content event.
    pub(crate) ttft: Option<f64>,
    /// Mean seconds between content events (two or more of them).
    pub(crate) token_gap: Option<f64>,
    pub(crate) tokens: u64,
    pub(crate) prompt_tokens: Option<u64>,
}

/// One concurrency level's report.
#[derive(Debug, Clone, PartialEq)]
pub struct Level {
    pub concurrency: usize,
    pub requests: usize,
    pub errors: usize,
    pub tokens_per_s: f64,
    pub ttft_ms: [Option<f64>; 3],
    pub token_ms: [Option<f64>; 2],
}

pub fn run(args: ServeArgs) -> Result<()> {
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        bail!("--concurrency: every level must be at least 1");
    }
    if args.requests == 0 || args.max_tokens == 0 || args.prompt_tokens == 0 || args.timeout == 0 {
        bail!("--requests, --max-tokens, --prompt-tokens and --timeout must be at least 1");
    }
    let target = Arc::new(Target::new(&args)?);
    let client = reqwest::Client::builder()
        .timeout(target.timeout)
        .connect_timeout(target.timeout.min(Duration::from_secs(10)))
        .no_proxy()
        .build()
        .context("building the HTTP client")?;
    // One thread: the client's own work stays small next to a server on the same machine.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(bench(args, target, client))
}

async fn bench(args: ServeArgs, target: Arc<Target>, client: reqwest::Client) -> Result<()> {
    // Warm-up, not counted: loads the model, checks URL, key and model, and
    // measures what the chat template and the instruction cost (no words)
    // and what the words cost, so that prompts come out at about
    // --prompt-tokens tokens.
    let mut measured = Vec::new();
    for (i, words) in [(0, 0), (1, args.prompt_tokens)] {
        let warm = request(&client, &target, &prompt(i, words), 2).await;
        if let Some(e) = warm.error {
            bail!("{e}");
        }
        measured.push(warm.prompt_tokens);
    }
    let words = match measured[..] {
        [Some(fixed), Some(full)] if full > fixed => {
            let per_word = (full - fixed) as f64 / args.prompt_tokens as f64;
            ((args.prompt_tokens as f64 - fixed as f64) / per_word).round().max(1.0) as usize
        }
        _ => args.prompt_tokens,
    };
    let mut levels = Vec::new();
    let mut prompt_tokens = Vec::new();
    let mut next_prompt = 2;
    for &c in &args.concurrency {
        let n = args.requests.max(c);
        eprintln!("bench serve: concurrency {c}, {n} requests");
        let prompts: Arc<Vec<String>> = Arc::new((next_prompt..next_prompt + n).map(|i| prompt(i, words)).collect());
        next_prompt += n;
        let (outcomes, wall) = run_level(&client, &target, prompts, c, args.max_tokens).await?;
        let mut errors: BTreeMap<&str, usize> = BTreeMap::new();
        for e in outcomes.iter().filter_map(|o| o.error.as_deref()) {
            *errors.entry(e).or_default() += 1;
        }
        for (e, count) in &errors {
            eprintln!("bench serve: concurrency {c}: {count} failed: {e}");
        }
        prompt_tokens.extend(outcomes.iter().filter_map(|o| o.prompt_tokens));
        levels.push(summarize(c, &outcomes, wall));
    }
    let mean_prompt =
        (!prompt_tokens.is_empty()).then(|| prompt_tokens.iter().sum::<u64>() as f64 / prompt_tokens.len() as f64);
    if args.json {
        println!("{}", to_json(&target.model, &target.base, args.max_tokens, mean_prompt, &levels));
    } else {
        print_table(&target, args.max_tokens, mean_prompt, &levels);
    }
    Ok(())
}

/// Runs `prompts.len()` requests, `concurrency` at a time; their outcomes and the wall time.
async fn run_level(
    client: &reqwest::Client,
    target: &Arc<Target>,
    prompts: Arc<Vec<String>>,
    concurrency: usize,
    max_tokens: u32,
) -> Result<(Vec<Outcome>, Duration)> {
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for _ in 0..concurrency {
        let (client, target, prompts, next) = (client.clone(), target.clone(), prompts.clone(), next.clone());
        workers.spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(p) = prompts.get(i) else { break };
                outcomes.push(request(&client, &target, p, max_tokens).await);
            }
            outcomes
        });
    }
    let mut outcomes = Vec::new();
    while let Some(done) = workers.join_next().await {
        outcomes.extend(done.context("a benchmark task failed")?);
    }
    Ok((outcomes, t0.elapsed()))
}

/// One streamed chat completion, measured.
pub(crate) async fn request(client: &reqwest::Client, target: &Target, prompt: &str, max_tokens: u32) -> Outcome {
    let mut out = Outcome::default();
    if let Err(e) = stream(client, target, prompt, max_tokens, &mut out).await {
        out.error = Some(e);
    }
    out
}

async fn stream(
    client: &reqwest::Client,
    target: &Target,
    prompt: &str,
    max_tokens: u32,
    out: &mut Outcome,
) -> std::result::Result<(), String> {
    let body = json!({
        "model": target.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut req = client.post(&target.endpoint).json(&body);
    if let Some(key) = &target.api_key {
        req = req.bearer_auth(key);
    }
    let started = Instant::now();
    let mut resp = req.send().await.map_err(|e| target.http_error(&e))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        let hint =
            if status == reqwest::StatusCode::UNAUTHORIZED { " (give the server's key with --api-key)" } else { "" };
        return Err(format!("{}: HTTP {status}: {}{hint}", target.endpoint, error_message(&text)));
    }
    let mut parser = SseParser::default();
    let mut events: Vec<SseEvent> = Vec::new();
    let (mut first, mut last, mut chunks) = (None::<Instant>, None::<Instant>, 0u64);
    let mut usage_tokens = None;
    let mut done = false;
    loop {
        let bytes = resp.chunk().await.map_err(|e| target.http_error(&e))?;
        let now = Instant::now();
        match &bytes {
            Some(b) => parser.push(b, &mut events)?,
            None => parser.finish(&mut events),
        }
        for SseEvent { data, .. } in events.drain(..) {
            if done {
                continue;
            }
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let v: Value =
                serde_json::from_str(&data).map_err(|e| format!("an event that is not JSON ({e}): {data}"))?;
            if let Some(e) = v.get("error") {
                return Err(format!("{}: error event: {}", target.endpoint, error_text(e)));
            }
            let choice = &v["choices"][0];
            let content = choice["delta"]["content"].as_str().or_else(|| choice["text"].as_str()).unwrap_or("");
            if !content.is_empty() {
                first.get_or_insert(now);
                last = Some(now);
                chunks += 1;
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage_tokens = Some(n);
                out.prompt_tokens = v["usage"]["prompt_tokens"].as_u64();
            }
        }
        if bytes.is_none() {
            break;
        }
    }
    if !done {
        return Err(format!("{}: the stream ended without [DONE]", target.endpoint));
    }
    out.tokens = usage_tokens.unwrap_or(chunks);
    if let (Some(first), Some(last)) = (first, last) {
        out.ttft = Some((first - started).as_secs_f64());
        if chunks >= 2 {
            out.token_gap = Some((last - first).as_secs_f64() / (chunks - 1) as f64);
        }
    }
    Ok(())
}

impl Target {
    fn new(args: &ServeArgs) -> Result<Self> {
        Target::parse(&args.url, &args.model, args.api_key.clone(), Duration::from_secs(args.timeout))
    }

    /// A target from its base URL (with or without `/v1`), checked.
    pub(crate) fn parse(url: &str, model: &str, api_key: Option<String>, timeout: Duration) -> Result<Self> {
        let given = url.trim();
        const EXPECTED: &str = "expected an http:// URL such as http://127.0.0.1:8080";
        let mut url = reqwest::Url::parse(given).with_context(|| format!("--url {given:?}: {EXPECTED}"))?;
        if url.scheme() == "https" {
            bail!("--url {given}: https is not supported (this client speaks plain HTTP); {EXPECTED}");
        }
        if url.scheme() != "http" || url.host_str().is_none_or(str::is_empty) {
            bail!("--url {given}: {EXPECTED}");
        }
        // Accept the base URL with or without the API's /v1.
        let path = url.path().trim_end_matches('/');
        let path = path.strip_suffix("/v1").unwrap_or(path).to_string();
        url.set_path(&path);
        url.set_query(None);
        url.set_fragment(None);
        let base = url.as_str().trim_end_matches('/').to_string();
        Ok(Target {
            endpoint: format!("{base}/v1/chat/completions"),
            base,
            model: model.to_string(),
            api_key: api_key.filter(|k| !k.is_empty()),
            timeout,
        })
    }

    /// A transport error, naming the URL and the cause.
    fn http_error(&self, e: &reqwest::Error) -> String {
        if e.is_timeout() {
            return format!("{}: no complete answer within {} s (--timeout)", self.endpoint, self.timeout.as_secs());
        }
        let mut causes = Vec::new();
        let mut source: Option<&dyn std::error::Error> = Some(e);
        while let Some(s) = source {
            causes.push(s.to_string());
            source = s.source();
        }
        let root = causes.last().cloned().unwrap_or_default();
        if e.is_connect() {
            format!("cannot connect to {}: {root}", self.base)
        } else {
            // reqwest's own message already names the URL.
            let mut text = String::new();
            for c in causes {
                if !text.contains(&c) {
                    if !text.is_empty() {
                        text.push_str(": ");
                    }
                    text.push_str(&c);
                }
            }
            text
        }
    }
}

/// The message of an OpenAI-format error body, else the body itself (shortened).
fn error_message(body: &str) -> String {
    match serde_json::from_str::<Value>(body) {
        Ok(v) if v.get("error").is_some() => error_text(&v["error"]),
        _ => {
            let body = body.trim();
            let cut: String = body.chars().take(200).collect();
            if cut.len() < body.len() {
                format!("{cut}...")
            } else if cut.is_empty() {
                "(empty body)".to_string()
            } else {
                cut
            }
        }
    }
}

fn error_text(e: &Value) -> String {
    e["message"].as_str().or_else(|| e.as_str()).map_or_else(|| e.to_string(), str::to_string)
}

const WORDS: [&str; 64] = [
    "river",
    "mountain",
    "lantern",
    "garden",
    "window",
    "harbor",
    "forest",
    "winter",
    "summer",
    "letter",
    "market",
    "bridge",
    "candle",
    "meadow",
    "castle",
    "island",
    "thunder",
    "silver",
    "orange",
    "pocket",
    "ladder",
    "mirror",
    "basket",
    "engine",
    "violin",
    "pencil",
    "blanket",
    "rocket",
    "tunnel",
    "desert",
    "valley",
    "cottage",
    "anchor",
    "feather",
    "compass",
    "pepper",
    "marble",
    "saddle",
    "kettle",
    "ribbon",
    "sparrow",
    "planet",
    "copper",
    "orchard",
    "harvest",
    "journey",
    "lighthouse",
    "village",
    "morning",
    "evening",
    "shadow",
    "whisper",
    "stone",
    "captain",
    "painter",
    "teacher",
    "doctor",
    "farmer",
    "sailor",
    "baker",
    "dragon",
    "wizard",
    "knight",
    "clock",
];

/// Request `i`'s prompt: an instruction and `words` words from the list, in an order of its own.
pub(crate) fn prompt(i: usize, words: usize) -> String {
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    let mut text = format!("Request {i}. Write a short story that uses these words:");
    for _ in 0..words {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        text.push(' ');
        text.push_str(WORDS[(state % WORDS.len() as u64) as usize]);
    }
    text.push('.');
    text
}

/// Nearest-rank percentile `p` (0 < p <= 100) of sorted samples; `None` for no samples.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn summarize(concurrency: usize, outcomes: &[Outcome], wall: Duration) -> Level {
    let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.error.is_none()).collect();
    let tokens: u64 = ok.iter().map(|o| o.tokens).sum();
    let sorted_ms = |f: fn(&Outcome) -> Option<f64>| {
        let mut v: Vec<f64> = ok.iter().filter_map(|o| f(o)).map(|s| s * 1e3).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let ttft = sorted_ms(|o| o.ttft);
    let gap = sorted_ms(|o| o.token_gap);
    let secs = wall.as_secs_f64();
    Level {
        concurrency,
        requests: outcomes.len(),
        errors: outcomes.len() - ok.len(),
        tokens_per_s: if secs > 0.0 { tokens as f64 / secs } else { 0.0 },
        ttft_ms: [percentile(&ttft, 50.0), percentile(&ttft, 90.0), percentile(&ttft, 99.0)],
        token_ms: [percentile(&gap, 50.0), percentile(&gap, 99.0)],
    }
}

fn to_json(model: &str, url: &str, max_tokens: u32, prompt_tokens: Option<f64>, levels: &[Level]) -> Value {
    let r = |x: Option<f64>| x.map(|x| (x * 1e3).round() / 1e3);
    let runs: Vec<Value> = levels
        .iter()
        .map(|l| {
            json!({
                "concurrency": l.concurrency,
                "requests": l.requests,
                "errors": l.errors,
                "tokens_per_s": r(Some(l.tokens_per_s)),
                "ttft_ms_p50": r(l.ttft_ms[0]),
                "ttft_ms_p90": r(l.ttft_ms[1]),
                "ttft_ms_p99": r(l.ttft_ms[2]),
                "token_ms_p50": r(l.token_ms[0]),
                "token_ms_p99": r(l.token_ms[1]),
            })
        })
        .collect();
    json!({
        "model": model,
        "url": url,
        "max_tokens": max_tokens,
        "prompt_tokens": r(prompt_tokens),
        "runs": runs,
    })
}

fn print_table(target: &Target, max_tokens: u32, prompt_tokens: Option<f64>, levels: &[Level]) {
    let prompt = prompt_tokens.map_or_else(|| "?".to_string(), |p| format!("{p:.0}"));
    println!(
        "bench serve: {} model {}, max_tokens {max_tokens}, prompts of {prompt} tokens (mean, chat template included)",
        target.base, target.model
    );
    println!(
        "{:>11} {:>8} {:>6} {:>10} {:>11} {:>11} {:>11} {:>12} {:>12}",
        "concurrency",
        "requests",
        "errors",
        "tokens/s",
        "ttft p50 ms",
        "ttft p90 ms",
        "ttft p99 ms",
        "token p50 ms",
        "token p99 ms"
    );
    let ms = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"));
    for l in levels {
        println!(
            "{:>11} {:>8} {:>6} {:>10.1} {:>11} {:>11} {:>11} {:>12} {:>12}",
            l.concurrency,
            l.requests,
            l.errors,
            l.tokens_per_s,
            ms(l.ttft_ms[0]),
            ms(l.ttft_ms[1]),
            ms(l.ttft_ms[2]),
            ms(l.token_ms[0]),
            ms(l.token_ms[1])
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[7.0], 1.0), Some(7.0));
        assert_eq!(percentile(&[7.0], 100.0), Some(7.0));
        let v: Vec<f64> = (1..=10).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(5.0));
        assert_eq!(percentile(&v, 90.0), Some(9.0));
        assert_eq!(percentile(&v, 99.0), Some(10.0));
        assert_eq!(percentile(&v, 100.0), Some(10.0));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        let v = [15.0, 20.0, 35.0, 40.0, 50.0];
        assert_eq!(percentile(&v, 30.0), Some(20.0));
        assert_eq!(percentile(&v, 40.0), Some(20.0));
        assert_eq!(percentile(&v, 50.0), Some(35.0));
    }

    #[test]
    fn prompts_differ_and_grow_with_the_word_count() {
        assert_ne!(prompt(1, 20), prompt(2, 20));
        assert_eq!(prompt(3, 20), prompt(3, 20));
        assert_eq!(prompt(3, 40).split(' ').count(), prompt(3, 20).split(' ').count() + 20);
    }

    fn args(url: &str) -> ServeArgs {
        ServeArgs {
            url: url.to_string(),
            model: "m".into(),
            concurrency: vec![1],
            requests: 1,
            max_tokens: 1,
            prompt_tokens: 1,
            api_key: None,
            timeout: 1,
            json: false,
        }
    }

    #[test]
    fn urls_are_checked_and_take_the_api_path() {
        for (given, endpoint) in [
            ("http://127.0.0.1:8080", "http://127.0.0.1:8080/v1/chat/completions"),
            ("http://127.0.0.1:8080/", "http://127.0.0.1:8080/v1/chat/completions"),
            ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/chat/completions"),
            ("http://localhost:9/api/v1", "http://localhost:9/api/v1/chat/completions"),
        ] {
            assert_eq!(Target::new(&args(given)).unwrap().endpoint, endpoint, "{given}");
        }
        for (given, said) in [
            ("127.0.0.1:8080", "expected an http:// URL"),
            ("localhost:8080", "expected an http:// URL"),
            ("nonsense", "expected an http:// URL"),
            ("https://127.0.0.1:1", "https is not supported"),
        ] {
            let e = format!("{:#}", Target::new(&args(given)).err().unwrap());
            assert!(e.contains(said) && e.contains(given), "{given}: {e}");
        }
    }

    #[test]
    fn a_level_sums_tokens_over_its_wall_time_and_leaves_failures_out() {
        let ok = |ttft: f64, gap: Option<f64>, tokens: u64| Outcome {
            ttft: Some(ttft),
            token_gap: gap,
            tokens,
            ..Outcome::default()
        };
        let failed = Outcome { error: Some("x".into()), tokens: 100, ttft: Some(9.0), ..Outcome::default() };
        let l = summarize(2, &[ok(0.1, Some(0.01), 8), ok(0.3, None, 1), failed], Duration::from_secs(2));
        assert_eq!((l.concurrency, l.requests, l.errors), (2, 3, 1));
        assert_eq!(l.tokens_per_s, 4.5);
        assert_eq!(l.ttft_ms, [Some(100.0), Some(300.0), Some(300.0)]);
        assert_eq!(l.token_ms, [Some(10.0), Some(10.0)]);
        let j = to_json("m", "http://u", 8, None, &[l]);
        assert_eq!(j["runs"][0]["errors"], 1);
        assert_eq!(j["runs"][0]["ttft_ms_p50"], 100.0);
        assert_eq!(j["model"], "m");
        assert_eq!(j["url"], "http://u");
    }
}
