//! `flexserve workflow run`: a declared multi-model workflow (TOML, see
//! `docs/workflows.md`) run step by step, sealed steps in the secure world,
//! each step's output streamed as it comes, then the workflow's answer.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use flexserve_normal::MemoryBudget;
use flexserve_workflow::Workflow;

use crate::KeyArgs;

mod prefetch;
mod retrieve;
pub mod runner;

/// The secure world a design holds across a workflow's steps, and the
/// models open in it (the runner's, which the prefetch works on too).
struct SecureSide {
    world: flexserve_normal::SecureWorld,
    opened: Vec<Option<flexserve_normal::OpenedModel>>,
}

use runner::{Design, Event, RunConfig, RunReport, Worlds};

#[derive(clap::Args)]
pub struct RunArgs {
    /// The workflow file (TOML).
    pub file: PathBuf,
    /// The user's input: `{{ input }}` in the steps' templates.
    #[arg(long)]
    pub input: String,
    /// Another file for one of the workflow's models (repeatable): NAME=PATH.
    #[arg(long = "model", value_parser = crate::serve::parse_named_model)]
    pub models: Vec<(String, PathBuf)>,
    /// Secure memory budget (default: the workflow's `secure_memory_limit`, else `auto`).
    #[arg(long, value_parser = MemoryBudget::parse)]
    pub secure_memory_limit: Option<MemoryBudget>,
    /// Cores to use (0 = every core).
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// How to run it: the paper's baselines beside FlexServe's own design.
    #[arg(long, value_enum, default_value = "flexserve")]
    pub design: Design,
    /// Print one JSON object (outputs and per-step figures) as the last line.
    #[arg(long)]
    pub json: bool,
    /// `flexserve` design: do not load the next step's sealed model while
    /// the current step runs (it then loads with its own step, pipelined).
    #[arg(long)]
    pub no_prefetch: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// The workflow file with the command line's model overrides applied.
pub fn load(file: &std::path::Path, overrides: &[(String, PathBuf)]) -> Result<Workflow> {
    let mut workflow = Workflow::from_file(file)?;
    for (name, path) in overrides {
        workflow.set_model_path(name, path.clone())?;
    }
    Ok(workflow)
}

/// The budget: the command line's, else the workflow's, else `auto`.
pub fn budget(workflow: &Workflow, given: Option<MemoryBudget>) -> MemoryBudget {
    given.or(workflow.secure_memory_limit.map(MemoryBudget::Bytes)).unwrap_or(MemoryBudget::Auto)
}

pub fn run(args: RunArgs) -> Result<()> {
    let workflow = load(&args.file, &args.models)?;
    let cfg = RunConfig {
        keys: &args.keys,
        budget: budget(&workflow, args.secure_memory_limit),
        threads: args.threads,
        design: args.design,
        worlds: Worlds::Connect,
        reserve_ahead: false,
        prefetch: !args.no_prefetch,
    };
    let mut out = std::io::stdout().lock();
    let mut on_event = |event: Event| match event {
        Event::StepStarted { step, model, sealed } => {
            let kind = if sealed { "sealed, secure world" } else { "plain" };
            eprintln!("== step {} (model {model}, {kind})", step.name);
        }
        Event::Text(t) => {
            if !args.json {
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            }
        }
        Event::StepDone(r) => {
            if !args.json {
                let _ = writeln!(out);
            }
            eprintln!(
                "   first token {:.0} ms, {} prompt tokens, {} generated ({:.1} tok/s), {} granules granted, \
                 {} layers of other models given up",
                r.ttft.as_secs_f64() * 1e3,
                r.prompt_tokens,
                r.generated_tokens,
                r.decode_tokens_per_s,
                r.granted,
                r.evicted_layers
            );
            if let Some(p) = &r.prefetch {
                let missing = p.missing_chunks.map_or("unknown".to_string(), |n| n.to_string());
                eprintln!(
                    "   prefetched model {}: {} chunks, {missing} still missing{}",
                    p.model,
                    p.chunks,
                    p.stopped.as_deref().map_or(String::new(), |why| format!(" (stopped: {why})"))
                );
            }
        }
    };
    let report = runner::run(&workflow, &args.input, &cfg, &mut on_event)
        .with_context(|| format!("workflow {:?} ({})", workflow.name, args.file.display()))?;
    let answer = report.outputs.get(workflow.output_step()).unwrap_or_default().trim().to_string();
    eprintln!(
        "== answer (step {}), workflow done in {:.0} ms",
        workflow.steps[workflow.output_step()].name,
        ms(&report)
    );
    if args.json {
        println!("{}", to_json(&workflow, args.design, &report, &answer));
    } else {
        println!("{answer}");
    }
    Ok(())
}

fn ms(report: &RunReport) -> f64 {
    report.total.as_secs_f64() * 1e3
}

fn to_json(workflow: &Workflow, design: Design, report: &RunReport, answer: &str) -> String {
    let steps: Vec<serde_json::Value> = report
        .steps
        .iter()
        .map(|s| {
            serde_json::json!({
                "name": s.name, "model": s.model, "sealed": s.sealed,
                "output": report.outputs.get(workflow.step_index(&s.name).unwrap_or(0)).unwrap_or_default(),
                "ttft_ms": s.ttft.as_secs_f64() * 1e3, "total_ms": s.total.as_secs_f64() * 1e3,
                "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                "decode_tokens_per_s": s.decode_tokens_per_s, "granted_granules": s.granted,
                "evicted_layers": s.evicted_layers,
                "prefetch": s.prefetch.as_ref().map(|p| serde_json::json!({
                    "model": p.model, "chunks": p.chunks, "missing_chunks": p.missing_chunks,
                    "stopped": p.stopped,
                })),
            })
        })
        .collect();
    serde_json::json!({
        "workflow": workflow.name, "design": design.name(), "end_to_end_ms": ms(report),
        "answer": answer, "steps": steps, "recalled_granules": report.recalled,
    })
    .to_string()
}
