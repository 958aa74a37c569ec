//! `flexserve bench secure`: time to first token and decode speed of the
//! plain engine next to the secure world, alternating in one run.
//!
//! Every repetition starts from nothing, as a request to a cold server would:
//! - plain: map the GGUF, build the model, prefill, first token;
//! - secure (flexible): start the secure world, verify the header, grant and
//!   prepare granules, read and decrypt every chunk into them, prefill, first token;
//! - secure (static carve-out): the same with a region sized for the run
//!   (weights, KV cache, activations: what the flexible design was granted)
//!   reserved and populated when the secure world starts (the strawman's
//!   memory), so there is nothing to grant;
//! - secure (locked memory): flexible, protected by locking instead of memfd_secret.
//!
//! Every secure design here loads the whole model before computing (the
//! memory protections compared on equal terms); `bench ttft` compares the
//! paper's designs, the pipelined ones among them.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use flexserve_engine::{GenerateOptions, Generator, Model, SamplingParams, Session};
use flexserve_gguf::GgufFile;
use flexserve_normal::{MemoryBudget, PoolChoice};
use flexserve_protocol::{GenerateRequest, Input};
use flexserve_tokenizer::Tokenizer;

use crate::bench::median;
use crate::secure::SecureArgs;
use crate::KeyArgs;

pub struct SecureBench<'a> {
    pub sealed: &'a Path,
    pub plain: &'a Path,
    pub keys: &'a KeyArgs,
    pub prompt_tokens: usize,
    pub gen_tokens: usize,
    pub threads: usize,
    pub repetitions: usize,
    /// Secure memory budget (and carve-out size).
    pub budget: MemoryBudget,
}

#[derive(Default, Clone)]
struct Run {
    ttft: Vec<f64>,
    load: Vec<f64>,
    prefill: Vec<f64>,
    decode_tps: Vec<f64>,
}

const DESIGNS: [&str; 4] = ["plain", "secure-flexible", "secure-carve-out", "secure-locked"];

pub fn run(b: &SecureBench) -> Result<()> {
    // Each design needs a pool of its own kind, so each run starts a secure
    // world of its own: development mode, whatever --dev says.
    eprintln!("{}", crate::secure::DEVELOPMENT_WARNING);
    eprintln!("bench secure: every design runs in a development secure world of its own (its pool, its start)");
    let prompt = prompt_text(b.plain, b.prompt_tokens)?;
    let mut runs = vec![Run::default(); DESIGNS.len()];
    // Granules the flexible design was granted for the run (weights, KV cache,
    // activations): the carve-out that follows it is sized to hold the same.
    let workload = std::cell::Cell::new(None);
    for rep in 0..=b.repetitions {
        for (d, name) in DESIGNS.iter().enumerate() {
            let (ttft, load, prefill, tps, text) = match *name {
                "plain" => plain_once(b, &prompt)?,
                _ => secure_once(b, &prompt, name, &workload)?,
            };
            if rep == 0 {
                eprintln!(
                    "warm-up {name}: {:.0} ms to first token, {:?}...",
                    ttft * 1e3,
                    text.chars().take(30).collect::<String>()
                );
                continue;
            }
            let r = &mut runs[d];
            r.ttft.push(ttft);
            r.load.push(load);
            r.prefill.push(prefill);
            r.decode_tps.push(tps);
        }
    }
    let base_ttft = median(&runs[0].ttft);
    let base_tps = median(&runs[0].decode_tps);
    println!(
        "{} prompt tokens, {} generated, {} threads, median of {} (ratio = design / plain)",
        b.prompt_tokens, b.gen_tokens, b.threads, b.repetitions
    );
    println!(
        "{:<18} {:>10} {:>10} {:>10} {:>10} {:>12} {:>10}",
        "design", "TTFT ms", "load ms", "prefill ms", "TTFT x", "decode tok/s", "decode x"
    );
    for (d, name) in DESIGNS.iter().enumerate() {
        let r = &runs[d];
        println!(
            "{:<18} {:>10.1} {:>10.1} {:>10.1} {:>10.2} {:>12.1} {:>10.3}",
            name,
            median(&r.ttft) * 1e3,
            median(&r.load) * 1e3,
            median(&r.prefill) * 1e3,
            median(&r.ttft) / base_ttft,
            median(&r.decode_tps),
            median(&r.decode_tps) / base_tps
        );
    }
    Ok(())
}

/// A prompt text of about `n` tokens (cut by the model's own tokenizer).
pub(crate) fn prompt_text(plain: &Path, n: usize) -> Result<String> {
    let file = GgufFile::open(plain).with_context(|| format!("{}", plain.display()))?;
    let tok = Tokenizer::from_gguf(&file.header.metadata)?;
    let base = "The history of computing is a story of people who wanted machines to remember, to count and \
                to reason. Early mechanical calculators gave way to electronic computers, and those to the \
                small devices that everyone now carries. ";
    let mut text = String::new();
    while tok.encode(&text, false, false).len() < n {
        text.push_str(base);
    }
    let ids = tok.encode(&text, false, false);
    Ok(tok.decode(&ids[..n.min(ids.len())]))
}

type Sample = (f64, f64, f64, f64, String);

fn plain_once(b: &SecureBench, prompt: &str) -> Result<Sample> {
    let t0 = Instant::now();
    let file = Arc::new(GgufFile::open(b.plain)?);
    let tok = Tokenizer::from_gguf(&file.header.metadata)?;
    let model = Model::from_gguf(file, b.threads)?;
    let load = t0.elapsed().as_secs_f64();
    let ids = tok.encode(prompt, true, true);
    let mut g = Generator::new(Session::new(&model, ids.len() + b.gen_tokens + 8), &tok);
    let opts = GenerateOptions { max_tokens: b.gen_tokens, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut first = None;
    let mut text = String::new();
    let stats = g.generate(&ids, &opts, |t| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        text.push_str(t);
    })?;
    let ttft = first.unwrap_or_else(|| t0.elapsed().as_secs_f64());
    Ok((ttft, load, stats.prefill_secs, stats.decode_tokens_per_s(), text))
}

fn secure_once(b: &SecureBench, prompt: &str, design: &str, workload: &std::cell::Cell<Option<u64>>) -> Result<Sample> {
    // The strawman's carve-out is sized for the workload: the granules the
    // flexible design was granted for the same run (weights from the public
    // header, then the KV cache and activations), reserved and populated at start.
    let carve_out = design == "secure-carve-out";
    let g = flexserve_normal::DEFAULT_GRANULE_SIZE as u64;
    let budget = if carve_out {
        let granules = workload.get().context("the flexible design runs before the carve-out")?;
        MemoryBudget::Bytes(granules * g)
    } else {
        b.budget
    };
    let secure = SecureArgs {
        secure_memory_limit: budget,
        secure_pool: if carve_out { PoolChoice::StaticCarveOut } else { PoolChoice::Flexible },
        granule_size: 0,
        locked_memory: design == "secure-locked",
        memory_floor: 0,
    };
    let t0 = Instant::now();
    let mut world = crate::secure::spawn(b.keys, &secure, b.threads)?;
    let (model, _) = world.open_model(b.sealed)?;
    let load = t0.elapsed().as_secs_f64();
    let request = GenerateRequest {
        model: model.id,
        conversation: 0,
        input: Input::Raw { text: prompt.to_string() },
        max_tokens: b.gen_tokens as u32,
        n_ctx: (b.prompt_tokens + b.gen_tokens + 16) as u32,
        sampling: crate::secure::greedy(),
        stop: vec![],
    };
    let mut first = None;
    let mut text = String::new();
    let r = world.generate(&model, request, |t| {
        first.get_or_insert_with(|| t0.elapsed().as_secs_f64());
        text.push_str(t);
    })?;
    let ttft = first.unwrap_or_else(|| t0.elapsed().as_secs_f64());
    if design == "secure-flexible" {
        workload.set(Some(world.granted()));
    }
    world.shutdown()?;
    let decode = r.decode_micros as f64 / 1e6;
    let tps = r.generated_tokens.saturating_sub(1) as f64 / decode.max(1e-9);
    Ok((ttft, load, r.prefill_micros as f64 / 1e6, tps, text))
}
