//! `flexserve bench workflow`: one workflow end to end under the paper's
//! designs side by side (alternating within each repetition), every run from
//! the same state: a development secure world of its own, up and idle, the
//! models' files in the page cache, no model resident. FlexServe's world
//! holds the reserve such an idle world has prepared; the strawmen protect
//! their carve-outs when the work comes (see `workflow::runner`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use flexserve_normal::MemoryBudget;

use crate::bench::median;
use crate::timeline_svg::Chart;
use crate::workflow::runner::{self, Design, RunConfig, RunReport, Worlds};
use crate::KeyArgs;

#[derive(clap::Args)]
pub struct WorkflowBenchArgs {
    /// The workflow file (TOML).
    pub file: PathBuf,
    /// The user's input.
    #[arg(long, default_value = "How do I make a cup of tea?")]
    pub input: String,
    /// Another file for one of the workflow's models (repeatable): NAME=PATH.
    #[arg(long = "model", value_parser = crate::serve::parse_named_model)]
    pub models: Vec<(String, PathBuf)>,
    #[arg(long, value_enum, value_delimiter = ',', default_value = "strawman,opt-strawman,flexserve")]
    pub designs: Vec<Design>,
    /// Secure memory budget (default: the workflow's `secure_memory_limit`, else `auto`).
    #[arg(long, value_parser = MemoryBudget::parse)]
    pub secure_memory_limit: Option<MemoryBudget>,
    /// Cores to use (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    #[arg(long, default_value_t = 3)]
    pub repetitions: usize,
    /// Print one JSON object as the last line.
    #[arg(long)]
    pub json: bool,
    /// Write one SVG timeline per design (its last repetition) into this directory.
    #[arg(long)]
    pub timeline: Option<PathBuf>,
    /// `flexserve` design: do not load the next step's sealed model while
    /// the current step runs (it then loads with its own step, pipelined).
    #[arg(long)]
    pub no_prefetch: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
}

pub fn run(args: WorkflowBenchArgs) -> Result<()> {
    if args.designs.is_empty() || args.repetitions == 0 {
        bail!("nothing to measure: give --designs and --repetitions of at least 1");
    }
    let workflow = crate::workflow::load(&args.file, &args.models)?;
    let budget = crate::workflow::budget(&workflow, args.secure_memory_limit);
    let config = |design| RunConfig {
        keys: &args.keys,
        budget,
        threads: args.threads,
        design,
        worlds: Worlds::Spawn,
        reserve_ahead: true,
        prefetch: !args.no_prefetch,
    };
    eprintln!(
        "bench workflow {:?}: {} steps, {} models, budget {}, designs {}",
        workflow.name,
        workflow.steps.len(),
        workflow.models.len(),
        match budget {
            MemoryBudget::Bytes(b) => format!("{} MiB", b >> 20),
            MemoryBudget::Auto => "auto".to_string(),
        },
        args.designs.iter().map(|d| d.name()).collect::<Vec<_>>().join(",")
    );
    // A warm-up run of the first design (page cache, first-touch costs), not counted.
    runner::run(&workflow, &args.input, &config(args.designs[0]), &mut |_| {})?;
    let mut runs: Vec<Vec<RunReport>> = args.designs.iter().map(|_| Vec::new()).collect();
    for rep in 0..args.repetitions {
        for (d, &design) in args.designs.iter().enumerate() {
            let report = runner::run(&workflow, &args.input, &config(design), &mut |_| {})?;
            eprintln!("  repetition {}: {} {:.0} ms", rep + 1, design.name(), report.total.as_secs_f64() * 1e3);
            runs[d].push(report);
        }
    }
    // Greedy steps give the same outputs under every design.
    let reference = &runs[0][0].outputs;
    let same = runs.iter().flatten().all(|r| r.outputs == *reference);
    print_table(&args, &runs);
    eprintln!("outputs identical under every design and repetition: {}", if same { "yes" } else { "NO" });
    if let Some(dir) = &args.timeline {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        for (design, runs) in args.designs.iter().zip(&runs) {
            let last = runs.last().expect("at least one repetition");
            let path = dir.join(format!("workflow-{}-{}.svg", workflow.name, design.name()));
            let title = format!("{} ({}): {:.0} ms end to end", workflow.name, design.name(), ms(last.total));
            timeline(last).write_svg(&path, &title)?;
            eprintln!("wrote {}", path.display());
        }
    }
    if args.json {
        println!("{}", to_json(&workflow.name, &args.designs, &runs));
    }
    Ok(())
}

/// Lanes of a workflow's timeline.
static LANES: [(&str, &str); 3] = [("protect", "#b5651d"), ("load + prefill", "#6a1b9a"), ("decode", "#1565c0")];

/// A run drawn step by step: protecting memory, loading and prefilling
/// (the step's start to its first token), decoding.
fn timeline(run: &RunReport) -> Chart {
    let mut chart = Chart::new(&LANES);
    if !run.carve_out.is_zero() {
        chart.bar(0, "carve-out", false, 0.0, ms(run.carve_out));
    }
    for (i, s) in run.steps.iter().enumerate() {
        let (start, light) = (ms(s.started), i % 2 == 1);
        let label = format!("step {} (model {}{})", s.name, s.model, if s.sealed { ", sealed" } else { "" });
        if !s.protect.is_zero() {
            chart.bar(0, format!("{label}: protect"), light, start, start + ms(s.protect));
        }
        chart.bar(1, label.clone(), light, start, start + ms(s.ttft));
        chart.bar(2, label, light, start + ms(s.ttft), start + ms(s.total));
    }
    chart
}

fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn end_to_end(runs: &[RunReport]) -> f64 {
    median(&runs.iter().map(|r| ms(r.total)).collect::<Vec<_>>())
}

fn print_table(args: &WorkflowBenchArgs, runs: &[Vec<RunReport>]) {
    let flexserve = args.designs.iter().position(|&d| d == Design::Flexserve).map(|i| end_to_end(&runs[i]));
    println!("| design | end to end ms | / flexserve | first token per step ms | granted granules | layers given up |");
    println!("|---|---|---|---|---|---|");
    for (d, design) in args.designs.iter().enumerate() {
        let e2e = end_to_end(&runs[d]);
        let n_steps = runs[d][0].steps.len();
        let step_ttft: Vec<String> = (0..n_steps)
            .map(|s| {
                let t = median(&runs[d].iter().map(|r| ms(r.steps[s].ttft)).collect::<Vec<_>>());
                format!("{} {t:.0}", runs[d][0].steps[s].name)
            })
            .collect();
        let granted: u64 = runs[d][0].steps.iter().map(|s| s.granted).sum();
        let evicted: u64 = runs[d][0].steps.iter().map(|s| s.evicted_layers).sum();
        println!(
            "| {} | {e2e:.0} | {} | {} | {granted} | {evicted} |",
            design.name(),
            flexserve.map_or("-".to_string(), |f| format!("{:.2}", e2e / f.max(1e-9))),
            step_ttft.join(", ")
        );
    }
}

fn to_json(name: &str, designs: &[Design], runs: &[Vec<RunReport>]) -> String {
    let designs: Vec<serde_json::Value> = designs
        .iter()
        .zip(runs)
        .map(|(design, runs)| {
            let steps: Vec<serde_json::Value> = (0..runs[0].steps.len())
                .map(|s| {
                    let each = |f: &dyn Fn(&runner::StepReport) -> f64| {
                        runs.iter().map(|r| f(&r.steps[s])).collect::<Vec<_>>()
                    };
                    serde_json::json!({
                        "name": runs[0].steps[s].name, "model": runs[0].steps[s].model,
                        "sealed": runs[0].steps[s].sealed,
                        "ttft_ms": each(&|r| ms(r.ttft)),
                        "decode_tokens_per_s": each(&|r| r.decode_tokens_per_s),
                        "granted_granules": runs[0].steps[s].granted,
                        "evicted_layers": runs[0].steps[s].evicted_layers,
                        "prefetched_chunks": each(&|r| r.prefetch.as_ref().map_or(0.0, |p| p.chunks as f64)),
                        "prefetch_missing_chunks": runs[0].steps[s].prefetch.as_ref().and_then(|p| p.missing_chunks),
                    })
                })
                .collect();
            serde_json::json!({
                "design": design.name(),
                "end_to_end_ms": runs.iter().map(|r| ms(r.total)).collect::<Vec<_>>(),
                "steps": steps,
            })
        })
        .collect();
    serde_json::json!({"workflow": name, "designs": designs}).to_string()
}
