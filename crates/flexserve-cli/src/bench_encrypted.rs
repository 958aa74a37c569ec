//! `flexserve bench encrypted`: what an encrypted session costs. The same
//! daemon and sealed model answer the same prompts twice, once as a plain
//! streamed request (the daemon reads it) and once through an encrypted
//! session (it cannot), alternating which goes first; the report gives the
//! median time to first token and decode speed of each, and their ratios.
//!
//! Both are measured on this side of the connection: from sending the
//! request to the first piece of text (for the encrypted one: decrypted), and
//! decode speed as the pieces after the first over the time they took.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use flexserve_e2e::{ChatMessage, ChatRequest};
use serde_json::json;

use crate::bench_serve::{percentile, prompt, request, Outcome, Target};

#[derive(Args)]
pub struct EncryptedArgs {
    /// The daemon's base URL, as `flexserve serve` prints it.
    #[arg(long)]
    url: String,
    /// A sealed model the daemon serves.
    #[arg(long)]
    model: String,
    /// Prompts, each answered once plainly and once encrypted.
    #[arg(long, default_value_t = 8)]
    requests: usize,
    /// Tokens each answer has at most (max_tokens).
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// About how many words of story material each prompt carries.
    #[arg(long, default_value_t = 64)]
    prompt_words: usize,
    /// The daemon's API key.
    #[arg(long, env = "FLEXSERVE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The secure world's identity key (Ed25519, hex) instead of the pinned one.
    #[arg(long)]
    expect: Option<String>,
    /// Print one JSON object (the last line of stdout) instead of a table.
    #[arg(long)]
    json: bool,
}

/// Median time to first token (ms) and decode speed (tokens/s) of one mode.
struct Summary {
    ttft_ms: Option<f64>,
    decode_tok_s: Option<f64>,
}

fn summarize(outcomes: &[Outcome]) -> Summary {
    let mut ttft: Vec<f64> = outcomes.iter().filter_map(|o| o.ttft).map(|s| s * 1e3).collect();
    let mut speed: Vec<f64> = outcomes.iter().filter_map(|o| o.token_gap).map(|g| 1.0 / g).collect();
    ttft.sort_by(f64::total_cmp);
    speed.sort_by(f64::total_cmp);
    Summary { ttft_ms: percentile(&ttft, 50.0), decode_tok_s: percentile(&speed, 50.0) }
}

pub fn run(args: EncryptedArgs) -> Result<()> {
    if args.requests == 0 || args.max_tokens < 2 {
        bail!("--requests must be at least 1 and --max-tokens at least 2");
    }
    let target = Target::parse(&args.url, &args.model, args.api_key.clone(), Duration::from_secs(300))?;
    let client = reqwest::Client::builder().no_proxy().timeout(target.timeout).build().context("the HTTP client")?;
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting tokio")?;
    runtime.block_on(async {
        let remote = flexserve_client::Remote::connect(
            &target.base,
            target.api_key.clone(),
            args.expect.as_deref(),
            &crate::client::pin_path(&target.base)?,
        )
        .await?;
        let mut session = remote.open_session(&args.model).await?;
        // Warm-up, not counted: the model loads, both paths run once.
        check(request(&client, &target, &prompt(0, 4), 2).await)?;
        encrypted(&remote, &mut session, &args.model, &prompt(1, 4), 2).await?;
        let (mut plain, mut sealed) = (Vec::new(), Vec::new());
        for i in 0..args.requests {
            let text = prompt(i + 2, args.prompt_words);
            eprintln!("bench encrypted: prompt {}/{}", i + 1, args.requests);
            // Alternate which goes first, so that neither always meets a warmer cache.
            if i % 2 == 0 {
                plain.push(check(request(&client, &target, &text, args.max_tokens).await)?);
                sealed.push(encrypted(&remote, &mut session, &args.model, &text, args.max_tokens).await?);
            } else {
                sealed.push(encrypted(&remote, &mut session, &args.model, &text, args.max_tokens).await?);
                plain.push(check(request(&client, &target, &text, args.max_tokens).await)?);
            }
        }
        remote.close_session(session).await;
        report(&args, &target, &summarize(&plain), &summarize(&sealed));
        Ok(())
    })
}

fn check(outcome: Outcome) -> Result<Outcome> {
    match outcome.error {
        Some(e) => bail!("plain request: {e}"),
        None => Ok(outcome),
    }
}

/// One encrypted chat, measured as [`request`] measures a plain one.
async fn encrypted(
    remote: &flexserve_client::Remote,
    session: &mut flexserve_client::Session,
    model: &str,
    text: &str,
    max_tokens: u32,
) -> Result<Outcome> {
    let mut chat = ChatRequest::new(model, vec![ChatMessage::new("user", text)]);
    chat.max_tokens = max_tokens;
    chat.sampling.temperature = 0.0;
    let started = Instant::now();
    let (mut first, mut last, mut pieces) = (None::<Instant>, None::<Instant>, 0u64);
    let done = remote
        .chat(session, &chat, |piece| {
            if !piece.is_empty() {
                let now = Instant::now();
                first.get_or_insert(now);
                last = Some(now);
                pieces += 1;
            }
        })
        .await?;
    let mut outcome = Outcome {
        tokens: u64::from(done.generated_tokens),
        prompt_tokens: Some(u64::from(done.prompt_tokens)),
        ..Default::default()
    };
    if let (Some(first), Some(last)) = (first, last) {
        outcome.ttft = Some((first - started).as_secs_f64());
        if pieces >= 2 {
            outcome.token_gap = Some((last - first).as_secs_f64() / (pieces - 1) as f64);
        }
    }
    Ok(outcome)
}

fn report(args: &EncryptedArgs, target: &Target, plain: &Summary, sealed: &Summary) {
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ttft_ratio = ratio(sealed.ttft_ms, plain.ttft_ms);
    let decode_ratio = ratio(sealed.decode_tok_s, plain.decode_tok_s);
    let r = |x: Option<f64>| x.map(|x| (x * 1e3).round() / 1e3);
    if args.json {
        println!(
            "{}",
            json!({
                "model": target.model, "url": target.base, "requests": args.requests, "max_tokens": args.max_tokens,
                "plain": {"ttft_ms_p50": r(plain.ttft_ms), "decode_tok_s_p50": r(plain.decode_tok_s)},
                "encrypted": {"ttft_ms_p50": r(sealed.ttft_ms), "decode_tok_s_p50": r(sealed.decode_tok_s)},
                "ttft_ratio": r(ttft_ratio), "decode_ratio": r(decode_ratio),
            })
        );
        return;
    }
    let f = |x: Option<f64>, unit: &str| x.map_or_else(|| "?".to_string(), |x| format!("{x:.1} {unit}"));
    let x = |x: Option<f64>| x.map_or_else(|| "?".to_string(), |x| format!("{x:.3}x"));
    println!(
        "bench encrypted: {} model {}, {} prompts, max_tokens {} (medians)",
        target.base, target.model, args.requests, args.max_tokens
    );
    println!("{:>10} {:>14} {:>16}", "", "TTFT", "decode");
    println!("{:>10} {:>14} {:>16}", "plain", f(plain.ttft_ms, "ms"), f(plain.decode_tok_s, "tok/s"));
    println!("{:>10} {:>14} {:>16}", "encrypted", f(sealed.ttft_ms, "ms"), f(sealed.decode_tok_s, "tok/s"));
    println!("{:>10} {:>14} {:>16}", "ratio", x(ttft_ratio), x(decode_ratio));
}
