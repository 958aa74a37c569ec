//! `flexserve bench cores`: Flex-NPU under mixed load. The same daemon set-up
//! (a plain and a sealed model) runs once with the cores leased to one world
//! at a time (`--cores lease`) and once split between the worlds for good
//! (`--cores split`, the optimized strawman's static "secure NPU"). In each,
//! sealed requests (or runs of a workflow) go back to back while plain
//! requests arrive at a steady pace, and both sides' latency is reported.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::bench_serve::{percentile, prompt, request, Outcome, Target};
use crate::KeyArgs;

#[derive(clap::Args)]
pub struct CoresBenchArgs {
    /// The plain model (GGUF).
    #[arg(long)]
    pub plain: PathBuf,
    /// The sealed model.
    #[arg(long, required_unless_present = "workflow")]
    pub sealed: Option<PathBuf>,
    /// Instead of requests to the sealed model, run this workflow back to back on the daemon
    /// (`POST /v1/workflows/run`, `--sealed-requests` times): a sealed agent flow beside plain traffic.
    #[arg(long)]
    pub workflow: Option<PathBuf>,
    /// Cores in all (0 = every core): each world's under the lease, halved by the split.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Sealed requests, back to back, and the tokens each asks for.
    #[arg(long, default_value_t = 3)]
    pub sealed_requests: usize,
    #[arg(long, default_value_t = 64)]
    pub sealed_tokens: u32,
    /// Plain requests, one every `--plain-every-ms`, and the tokens each asks for.
    #[arg(long, default_value_t = 8)]
    pub plain_requests: usize,
    #[arg(long, default_value_t = 16)]
    pub plain_tokens: u32,
    #[arg(long, default_value_t = 250)]
    pub plain_every_ms: u64,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// One sharing mode's figures.
struct Figures {
    mode: &'static str,
    plain_ttft_ms: Vec<f64>,
    plain_total_ms: Vec<f64>,
    sealed_token_ms: Vec<f64>,
    sealed_total_ms: Vec<f64>,
    errors: usize,
}

pub fn run(args: CoresBenchArgs) -> Result<()> {
    if args.sealed_requests == 0 || args.plain_requests == 0 {
        bail!("--sealed-requests and --plain-requests must be at least 1");
    }
    let mut all = Vec::new();
    for mode in ["split", "lease"] {
        let figures = one_mode(&args, mode).with_context(|| format!("--cores {mode}"))?;
        all.push(figures);
    }
    let p = |v: &[f64], q: f64| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        percentile(&s, q).map_or("-".to_string(), |x| format!("{x:.0}"))
    };
    println!("| cores | plain first token p50 / p90 ms | plain request p50 / p90 ms | sealed ms per token p50 | sealed request p50 ms | errors |");
    println!("|---|---|---|---|---|---|");
    for f in &all {
        println!(
            "| {} | {} / {} | {} / {} | {} | {} | {} |",
            f.mode,
            p(&f.plain_ttft_ms, 50.0),
            p(&f.plain_ttft_ms, 90.0),
            p(&f.plain_total_ms, 50.0),
            p(&f.plain_total_ms, 90.0),
            p(&f.sealed_token_ms, 50.0),
            p(&f.sealed_total_ms, 50.0),
            f.errors
        );
    }
    if args.json {
        let modes: Vec<serde_json::Value> = all
            .iter()
            .map(|f| {
                serde_json::json!({
                    "cores": f.mode, "plain_ttft_ms": f.plain_ttft_ms, "plain_total_ms": f.plain_total_ms,
                    "sealed_token_ms": f.sealed_token_ms, "sealed_total_ms": f.sealed_total_ms, "errors": f.errors,
                })
            })
            .collect();
        println!("{}", serde_json::json!({ "modes": modes }));
    }
    Ok(())
}

/// A daemon for one mode, stopped (SIGTERM) when dropped.
struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon's graceful stop (its secure world sessions scrubbed);
        // killed outright only if `kill` cannot be run.
        let stopped = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        if !stopped.is_ok_and(|s| s.success()) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

fn one_mode(args: &CoresBenchArgs, mode: &'static str) -> Result<Figures> {
    let mut command = Command::new(std::env::current_exe().context("finding this executable")?);
    command
        .args(["serve", "--port", "0", "--cores", mode, "--threads", &args.threads.to_string()])
        .arg("--model")
        .arg(format!("plain={}", args.plain.display()));
    if let Some(sealed) = &args.sealed {
        command.arg("--model").arg(format!("sealed={}", sealed.display()));
    }
    let workflow = match &args.workflow {
        Some(file) => {
            command.arg("--workflow").arg(file);
            Some(flexserve_workflow::Workflow::from_file(file)?.name)
        }
        None => None,
    };
    if let Some(key) = &args.keys.key {
        command.arg("--key").arg(key);
    }
    if crate::secure::development() {
        command.arg("--dev");
    }
    let mut child = command.stdout(Stdio::piped()).stderr(Stdio::null()).spawn().context("starting flexserve serve")?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("the daemon's stdout")?).read_line(&mut line)?;
    let daemon = Daemon(child);
    let url = line.trim().strip_prefix("listening on ").context("the daemon did not say where it listens")?;
    let timeout = Duration::from_secs(300);
    let plain = Arc::new(Target::parse(url, "plain", None, timeout)?);
    let sealed = Arc::new(Target::parse(url, "sealed", None, timeout)?);
    let client = reqwest::Client::builder().timeout(timeout).no_proxy().build()?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let figures = runtime.block_on(async {
        // Warm-up, not counted: the models loaded.
        if let Some(e) = request(&client, &plain, &prompt(0, 8), 4).await.error {
            bail!("warm-up of the plain model: {e}");
        }
        match &workflow {
            Some(name) => run_workflow(&client, &sealed.base, name, 0).await.map_err(anyhow::Error::msg)?,
            None => {
                if let Some(e) = request(&client, &sealed, &prompt(0, 8), 4).await.error {
                    bail!("warm-up of the sealed model: {e}");
                }
            }
        }
        let sealed_run = {
            let (client, sealed, n, tokens) =
                (client.clone(), sealed.clone(), args.sealed_requests, args.sealed_tokens);
            let workflow = workflow.clone();
            tokio::spawn(async move {
                let mut out = Vec::new();
                for i in 0..n {
                    let t0 = Instant::now();
                    let o = match &workflow {
                        Some(name) => match run_workflow(&client, &sealed.base, name, 100 + i).await {
                            Ok(()) => Outcome::default(),
                            Err(e) => Outcome { error: Some(e), ..Outcome::default() },
                        },
                        None => request(&client, &sealed, &prompt(100 + i, 32), tokens).await,
                    };
                    out.push((o, t0.elapsed()));
                }
                out
            })
        };
        let mut plains = Vec::new();
        for i in 0..args.plain_requests {
            tokio::time::sleep(Duration::from_millis(args.plain_every_ms)).await;
            let (client, plain, tokens) = (client.clone(), plain.clone(), args.plain_tokens);
            plains.push(tokio::spawn(async move {
                let t0 = Instant::now();
                let o = request(&client, &plain, &prompt(200 + i, 16), tokens).await;
                (o, t0.elapsed())
            }));
        }
        let mut f = Figures {
            mode,
            plain_ttft_ms: Vec::new(),
            plain_total_ms: Vec::new(),
            sealed_token_ms: Vec::new(),
            sealed_total_ms: Vec::new(),
            errors: 0,
        };
        let mut note = |o: &Outcome, took: Duration, ttft: &mut Vec<f64>, total: &mut Vec<f64>| {
            if o.error.is_some() {
                f.errors += 1;
                return;
            }
            ttft.extend(o.ttft.map(|s| s * 1e3));
            total.push(took.as_secs_f64() * 1e3);
        };
        let (mut ttft, mut total) = (Vec::new(), Vec::new());
        for p in plains {
            let (o, took) = p.await?;
            note(&o, took, &mut ttft, &mut total);
        }
        let (mut gaps, mut sealed_total, mut unused) = (Vec::new(), Vec::new(), Vec::new());
        for (o, took) in sealed_run.await? {
            gaps.extend(o.token_gap.map(|s| s * 1e3));
            note(&o, took, &mut unused, &mut sealed_total);
        }
        f.plain_ttft_ms = ttft;
        f.plain_total_ms = total;
        f.sealed_token_ms = gaps;
        f.sealed_total_ms = sealed_total;
        Ok(f)
    })?;
    drop(daemon);
    Ok(figures)
}

/// One run of workflow `name` on the daemon at `base`, on an input of its own.
async fn run_workflow(client: &reqwest::Client, base: &str, name: &str, i: usize) -> Result<(), String> {
    let body = serde_json::json!({"workflow": name, "input": prompt(i, 8)});
    let url = format!("{}/v1/workflows/run", base.trim_end_matches('/'));
    let resp = client.post(&url).json(&body).send().await.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: HTTP {status}: {}", resp.text().await.unwrap_or_default()));
    }
    Ok(())
}
