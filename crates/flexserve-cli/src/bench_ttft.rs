//! `flexserve bench ttft`: time to first token of one model under the
//! paper's designs side by side, from a stated state, alternating designs
//! within each repetition.
//!
//! Designs (every secure one in a development secure world with a flexible
//! pool; a carve-out is a grant of the whole workload made at request time
//! and kept, which is what a static carve-out costs):
//! - `plain`: the unprotected engine on the GGUF file;
//! - `strawman`: carve-out at request time, read and decrypt everything, then compute;
//! - `opt-strawman`: the same carve-out, then the pipeline (reading,
//!   decrypting and computing layer by layer overlap);
//! - `flexserve`: Flex-Mem (granules granted as needed, from a reserve
//!   prepared ahead where the scenario has the secure world up), the pipeline.
//!
//! Scenarios: `cold` (nothing running: the secure world's start is in the
//! time; the page cache is not dropped), `model-cold` (the secure world up
//! and idle, the model not resident, its file in the page cache), `warm`
//! (the model resident).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flexserve_engine::{GenerateOptions, Generator, Model, SamplingParams, Session};
use flexserve_gguf::GgufFile;
use flexserve_normal::{LoadReport, MemoryBudget, OpenedModel, PoolChoice, SecureWorld};
use flexserve_protocol::{GenerateRequest, GenerationReport, Input};
use flexserve_tokenizer::Tokenizer;

use crate::bench::median;
use crate::secure::SecureArgs;
use crate::KeyArgs;

mod timeline;

use timeline::{Lane, Timeline};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Design {
    Plain,
    Strawman,
    OptStrawman,
    Flexserve,
}

impl Design {
    fn name(self) -> &'static str {
        match self {
            Design::Plain => "plain",
            Design::Strawman => "strawman",
            Design::OptStrawman => "opt-strawman",
            Design::Flexserve => "flexserve",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    Cold,
    ModelCold,
    Warm,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Cold => "cold",
            Scenario::ModelCold => "model-cold",
            Scenario::Warm => "warm",
        }
    }
}

#[derive(clap::Args)]
pub struct TtftArgs {
    /// The sealed model (.fsm).
    #[arg(long)]
    model: PathBuf,
    /// The same model, plain (the `plain` design).
    #[arg(long)]
    plain: PathBuf,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "plain,strawman,opt-strawman,flexserve")]
    designs: Vec<Design>,
    #[arg(long, value_enum, default_value = "model-cold")]
    scenario: Scenario,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 16)]
    gen_tokens: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    #[arg(long, default_value_t = 3)]
    repetitions: usize,
    /// Secure memory budget of every secure world.
    #[arg(long, default_value = "2G", value_parser = MemoryBudget::parse)]
    secure_memory_limit: MemoryBudget,
    /// Print one JSON object as the last line.
    #[arg(long)]
    json: bool,
    /// Write one SVG timeline per design (of its last repetition) into this folder.
    #[arg(long)]
    timeline: Option<PathBuf>,
    #[command(flatten)]
    keys: KeyArgs,
}

/// Where one run's time went, in milliseconds (stages summed over the
/// model; they may overlap, so they can add up to more than the TTFT).
/// `start` is the secure world's start (cold) and opening the model
/// (verifying its header, building its tokenizer); the plain engine's
/// opening is in `read`, with mapping its file and building its model.
#[derive(Debug, Clone, Copy, Default)]
struct Breakdown {
    start: f64,
    protect: f64,
    read: f64,
    decrypt: f64,
    compute: f64,
}

impl Breakdown {
    fn stages(&self) -> [f64; 5] {
        [self.start, self.protect, self.read, self.decrypt, self.compute]
    }
}

struct Sample {
    ttft_ms: f64,
    decode_tps: f64,
    breakdown: Breakdown,
    timeline: Timeline,
    text: String,
}

struct Bench<'a> {
    args: &'a TtftArgs,
    threads: usize,
    prompt: String,
    /// Granules a secure generation of this prompt takes (weights, KV
    /// cache, activations): the carve-out's size and the reserve's.
    workload: u64,
}

pub fn run(args: TtftArgs) -> Result<()> {
    if args.repetitions == 0 || args.prompt_tokens == 0 || args.gen_tokens < 2 {
        anyhow::bail!("--repetitions and --prompt-tokens must be at least 1, --gen-tokens at least 2");
    }
    if args.designs.is_empty() {
        anyhow::bail!("--designs names none");
    }
    eprintln!("{}", crate::secure::DEVELOPMENT_WARNING);
    let threads = if args.threads == 0 { flexserve_engine::model::default_threads() } else { args.threads };
    let prompt = crate::bench_secure::prompt_text(&args.plain, args.prompt_tokens)?;
    let mut bench = Bench { args: &args, threads, prompt, workload: 0 };
    bench.workload = bench.measure_workload()?;
    eprintln!(
        "bench ttft: scenario {}, workload {} granules of {} KiB (the carve-out's and the reserve's size)",
        args.scenario.name(),
        bench.workload,
        flexserve_normal::DEFAULT_GRANULE_SIZE >> 10
    );
    let mut samples: Vec<Vec<Sample>> = args.designs.iter().map(|_| Vec::new()).collect();
    // Repetition 0 warms caches up and is not counted.
    for rep in 0..=args.repetitions {
        for (d, &design) in args.designs.iter().enumerate() {
            let s = bench.once(design).with_context(|| format!("design {}", design.name()))?;
            if rep == 0 {
                eprintln!(
                    "warm-up {}: {:.0} ms to first token, {:?}...",
                    design.name(),
                    s.ttft_ms,
                    s.text.chars().take(30).collect::<String>()
                );
            } else {
                samples[d].push(s);
            }
        }
    }
    // Every design must have answered the same text (greedy).
    let reference = &samples[0][0].text;
    for (d, runs) in samples.iter().enumerate() {
        if let Some(other) = runs.iter().find(|s| &s.text != reference) {
            anyhow::bail!(
                "design {} answered {:?}, design {} {:?}: the designs must give the same tokens",
                args.designs[d].name(),
                other.text,
                args.designs[0].name(),
                reference
            );
        }
    }
    print_table(&args, &samples);
    if let Some(dir) = &args.timeline {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (d, runs) in samples.iter().enumerate() {
            let last = runs.last().expect("at least one repetition");
            let path = timeline_path(dir, args.scenario.name(), args.designs[d].name());
            let title = format!(
                "{} ({}, {} prompt tokens): first token at {:.0} ms",
                args.designs[d].name(),
                args.scenario.name(),
                args.prompt_tokens,
                last.ttft_ms
            );
            last.timeline.write_svg(&path, &title, last.ttft_ms)?;
            eprintln!("wrote {}", path.display());
        }
    }
    if args.json {
        println!("{}", to_json(&args, &samples));
    }
    Ok(())
}

fn print_table(args: &TtftArgs, samples: &[Vec<Sample>]) {
    let base = samples[0].iter().map(|s| s.ttft_ms).collect::<Vec<_>>();
    let base = median(&base);
    println!(
        "{} ({}), {} prompt tokens, {} generated, median of {}; ratio = design / {}",
        args.model.display(),
        args.scenario.name(),
        args.prompt_tokens,
        args.gen_tokens,
        args.repetitions,
        args.designs[0].name()
    );
    println!(
        "{:<13} {:>9} {:>7} {:>9} | {:>7} {:>8} {:>7} {:>8} {:>8} {:>10}",
        "design", "TTFT ms", "ratio", "decode/s", "start", "protect", "read", "decrypt", "compute", "overlapped"
    );
    for (d, runs) in samples.iter().enumerate() {
        let ttft = median(&runs.iter().map(|s| s.ttft_ms).collect::<Vec<_>>());
        let tps = median(&runs.iter().map(|s| s.decode_tps).collect::<Vec<_>>());
        let b = median_breakdown(runs);
        // What the stages add up to beyond the time they took: their overlap.
        let overlapped = (b.stages().iter().sum::<f64>() - ttft).max(0.0);
        println!(
            "{:<13} {:>9.1} {:>7.2} {:>9.1} | {:>7.1} {:>8.1} {:>7.1} {:>8.1} {:>8.1} {:>10.1}",
            args.designs[d].name(),
            ttft,
            ttft / base,
            tps,
            b.start,
            b.protect,
            b.read,
            b.decrypt,
            b.compute,
            overlapped
        );
    }
}

fn median_breakdown(runs: &[Sample]) -> Breakdown {
    let m = |f: fn(&Breakdown) -> f64| median(&runs.iter().map(|s| f(&s.breakdown)).collect::<Vec<_>>());
    Breakdown {
        start: m(|b| b.start),
        protect: m(|b| b.protect),
        read: m(|b| b.read),
        decrypt: m(|b| b.decrypt),
        compute: m(|b| b.compute),
    }
}

fn to_json(args: &TtftArgs, samples: &[Vec<Sample>]) -> String {
    let designs: Vec<serde_json::Value> = samples
        .iter()
        .enumerate()
        .map(|(d, runs)| {
            let b = median_breakdown(runs);
            serde_json::json!({
                "design": args.designs[d].name(),
                "ttft_ms": runs.iter().map(|s| s.ttft_ms).collect::<Vec<_>>(),
                "decode_tokens_per_s": runs.iter().map(|s| s.decode_tps).collect::<Vec<_>>(),
                "breakdown_ms": {
                    "start": b.start, "protect": b.protect, "read": b.read, "decrypt": b.decrypt, "compute": b.compute
                },
            })
        })
        .collect();
    serde_json::json!({
        "model": args.model.display().to_string(),
        "scenario": args.scenario.name(),
        "prompt_tokens": args.prompt_tokens,
        "designs": designs,
    })
    .to_string()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl Bench<'_> {
    fn secure_args(&self) -> SecureArgs {
        SecureArgs {
            secure_memory_limit: self.args.secure_memory_limit,
            secure_pool: PoolChoice::Flexible,
            granule_size: 0,
            locked_memory: false,
            memory_floor: 0,
        }
    }

    fn spawn(&self) -> Result<SecureWorld> {
        crate::secure::spawn(&self.args.keys, &self.secure_args(), self.threads)
    }

    fn request(&self, model: &OpenedModel) -> GenerateRequest {
        GenerateRequest {
            model: model.id,
            conversation: 0,
            input: Input::Raw { text: self.prompt.clone() },
            max_tokens: self.args.gen_tokens as u32,
            n_ctx: (self.args.prompt_tokens + self.args.gen_tokens + 16) as u32,
            sampling: crate::secure::greedy(),
            stop: vec![],
        }
    }

    /// Granules one secure generation of the prompt takes: what a fresh
    /// secure world is granted for it.
    fn measure_workload(&self) -> Result<u64> {
        let mut world = self.spawn()?;
        let (model, _) = world.open_model_header(&self.args.model)?;
        world.generate(&model, self.request(&model), |_| {})?;
        let granted = world.granted();
        world.shutdown()?;
        Ok(granted)
    }

    fn once(&self, design: Design) -> Result<Sample> {
        match design {
            Design::Plain => self.plain_once(),
            _ => self.secure_once(design),
        }
    }

    fn plain_once(&self) -> Result<Sample> {
        let warm = self.args.scenario == Scenario::Warm;
        let loaded = |t0: Instant| -> Result<(Model, Tokenizer, Duration)> {
            let file = Arc::new(GgufFile::open(&self.args.plain)?);
            let tok = Tokenizer::from_gguf(&file.header.metadata)?;
            let model = Model::from_gguf(file, self.threads)?;
            Ok((model, tok, t0.elapsed()))
        };
        let before = if warm { Some(loaded(Instant::now())?) } else { None };
        let t0 = Instant::now();
        let (model, tok, load) = match before {
            Some((m, t, _)) => (m, t, Duration::ZERO),
            None => loaded(t0)?,
        };
        let ids = tok.encode(&self.prompt, true, true);
        let mut g = Generator::new(Session::new(&model, ids.len() + self.args.gen_tokens + 8), &tok);
        let opts =
            GenerateOptions { max_tokens: self.args.gen_tokens, sampling: SamplingParams::greedy(), stop: vec![] };
        let mut first = None;
        let mut text = String::new();
        // When each layer of the prefill starts (the hook runs before each).
        let mut starts: Vec<Instant> = Vec::new();
        let mut prefill_done = false;
        let stats = g.generate_with(
            &ids,
            &opts,
            |t| {
                first.get_or_insert_with(Instant::now);
                text.push_str(t);
            },
            &mut |layer| {
                if layer == starts.len() && !prefill_done {
                    starts.push(Instant::now());
                } else if layer == 0 {
                    prefill_done = true;
                }
                Ok(())
            },
        )?;
        let first = first.unwrap_or_else(Instant::now);
        let mut timeline = Timeline::default();
        timeline.bar(Lane::Read, None, 0.0, ms(load));
        let prefill_end = starts.first().map(|&s| s + Duration::from_secs_f64(stats.prefill_secs));
        for (l, &s) in starts.iter().enumerate() {
            let end = starts.get(l + 1).copied().or(prefill_end).unwrap_or(s);
            timeline.bar(Lane::Compute, Some(l), ms(s - t0), ms(end - t0));
        }
        Ok(Sample {
            ttft_ms: ms(first - t0),
            decode_tps: stats.decode_tokens_per_s(),
            breakdown: Breakdown { read: ms(load), compute: stats.prefill_secs * 1e3, ..Breakdown::default() },
            timeline,
            text,
        })
    }

    fn secure_once(&self, design: Design) -> Result<Sample> {
        let scenario = self.args.scenario;
        let mut b = Breakdown::default();
        let mut timeline = Timeline::default();
        // The state before the clock starts.
        let (mut world, resident, t0) = match scenario {
            Scenario::Cold => {
                let t0 = Instant::now();
                let world = self.spawn()?;
                b.start = ms(t0.elapsed());
                timeline.bar(Lane::Start, None, 0.0, b.start);
                (world, None, t0)
            }
            Scenario::ModelCold => {
                let mut world = self.spawn()?;
                if design == Design::Flexserve {
                    // The reserve, prepared while the secure world was idle.
                    world.grant(self.workload)?;
                }
                (world, None, Instant::now())
            }
            Scenario::Warm => {
                let mut world = self.spawn()?;
                let (model, _) = world.open_model(&self.args.model)?;
                world.generate(&model, self.request(&model), |_| {})?;
                (world, Some(model), Instant::now())
            }
        };
        let at = |t: Instant| ms(t.saturating_duration_since(t0));
        let model = match resident {
            Some(model) => model,
            None => {
                if design != Design::Flexserve {
                    // The carve-out, made at request time for the whole workload.
                    let tg = Instant::now();
                    world.grant(self.workload.saturating_sub(world.granted()))?;
                    b.protect += ms(tg.elapsed());
                    timeline.bar(Lane::Protect, None, at(tg), at(Instant::now()));
                }
                let to = Instant::now();
                let (model, load) = if design == Design::Strawman {
                    world.open_model(&self.args.model)?
                } else {
                    world.open_model_header(&self.args.model)?
                };
                // Verifying the header and building the tokenizer: part of starting.
                b.start += ms(load.open);
                timeline.bar(Lane::Start, None, at(to), at(to) + ms(load.open));
                if design == Design::Strawman {
                    b.read += ms(load.read);
                    b.decrypt += ms(load.decrypt);
                    loaded_bars(&mut timeline, &model, &load, t0, false);
                }
                model
            }
        };
        let mut first = None;
        let mut text = String::new();
        let t_gen = Instant::now();
        let report = world.generate(&model, self.request(&model), |t| {
            first.get_or_insert_with(Instant::now);
            text.push_str(t);
        })?;
        let first = first.unwrap_or_else(Instant::now);
        // A pipelined load: its reads and the grant it asked for.
        let since = match world.take_pipelined_load() {
            Some(load) => {
                b.read += ms(load.read);
                b.protect += ms(load.grant);
                let since = load.started.unwrap_or(t_gen);
                if !load.grant.is_zero() {
                    timeline.bar(Lane::Protect, None, at(since) - ms(load.grant), at(since));
                }
                loaded_bars(&mut timeline, &model, &load, t0, true);
                since
            }
            None => t_gen,
        };
        secure_bars(&mut timeline, &mut b, &report, at(since));
        world.shutdown()?;
        let decode = report.decode_micros as f64 / 1e6;
        Ok(Sample {
            ttft_ms: at(first),
            decode_tps: report.generated_tokens.saturating_sub(1) as f64 / decode.max(1e-9),
            breakdown: b,
            timeline,
            text,
        })
    }
}

/// The read bars (and, for a load that is not pipelined, the decrypt bars:
/// each batch from when it was read, or the one before was answered, to its
/// answer) of a load, one per layer, from its batches.
fn loaded_bars(timeline: &mut Timeline, model: &OpenedModel, load: &LoadReport, t0: Instant, pipelined: bool) {
    let base = load.started.map_or(0.0, |s| ms(s.saturating_duration_since(t0)));
    let mut previous_answer = 0.0;
    for batch in &load.batches {
        let layers: std::collections::BTreeSet<Option<usize>> =
            batch.chunks.iter().map(|&c| model.chunk_layer(c as usize)).collect();
        let (read_from, read_to, answered) = (ms(batch.read_from), ms(batch.read_to), ms(batch.answered));
        for &layer in &layers {
            timeline.extend(Lane::Read, layer, base + read_from, base + read_to);
            if !pipelined {
                timeline.extend(Lane::Decrypt, layer, base + read_to.max(previous_answer), base + answered);
            }
        }
        previous_answer = answered;
    }
}

/// The secure world's own timings of the generation (decrypting and
/// computing each layer), `base` ms after the clock started.
fn secure_bars(timeline: &mut Timeline, b: &mut Breakdown, report: &GenerationReport, base: f64) {
    let n_layer = report.layers.len().saturating_sub(1);
    for l in &report.layers {
        let layer = (l.layer as usize != n_layer).then_some(l.layer as usize);
        if l.decrypt_to > 0 {
            b.decrypt += l.decrypt_micros as f64 / 1e3;
            timeline.bar(Lane::Decrypt, layer, base + l.decrypt_from as f64 / 1e3, base + l.decrypt_to as f64 / 1e3);
        }
        if l.compute_to > l.compute_from && l.compute_from > 0 {
            let (from, to) = (l.compute_from as f64 / 1e3, l.compute_to as f64 / 1e3);
            b.compute += to - from;
            timeline.bar(Lane::Compute, layer, base + from, base + to);
        }
    }
}

/// Where `flexserve bench ttft` writes a design's timeline.
pub fn timeline_path(dir: &Path, scenario: &str, design: &str) -> PathBuf {
    dir.join(format!("ttft-{scenario}-{design}.svg"))
}
