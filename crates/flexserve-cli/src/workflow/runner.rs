//! Runs a workflow's steps in order under one of the paper's designs: sealed
//! steps in the secure world, plain ones in this process's engine.
//!
//! - `flexserve`: one secure world for the whole workflow, its memory granted
//!   granule by granule within the budget; each sealed model opens header-only
//!   and its weights stream through the pipeline with its first step; the
//!   residency plan keeps a model that a later step uses, unloads one that no
//!   later step uses (its granules stay granted for the next model), and when
//!   a step needs more than the budget has left, gives up layers of the model
//!   needed furthest ahead (last layers first); while a step runs, the next
//!   step's sealed model streams in (`prefetch`). Every step gets every core:
//!   steps run one at a time, so the cores go to whichever world runs one.
//! - `opt-strawman`: one secure world whose carve-out (the whole budget) is
//!   made when the workflow starts; the pipeline; each model unloaded after
//!   its step; cores split for good, half to the secure world, half to the
//!   normal world's plain steps.
//! - `strawman`: each sealed step protects memory for its model when it
//!   starts (a carve-out made at request time), reads and decrypts all of
//!   it, then computes; after the step the model is unloaded and the
//!   carve-out released.
//!
//! In every design the secure world is started before the clock starts (a
//! secure world that is up and idle).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use flexserve_engine::encoder::PassageIndex;
use flexserve_engine::{GenerateOptions, Generator, SamplingParams, Session};
use flexserve_normal::{MemoryBudget, OpenedModel, PoolChoice, SecureWorld};
use flexserve_protocol::{GenerateRequest, Input, Message, Sampling, StatusReport};
use flexserve_tokenizer::ChatMessage;
use flexserve_workflow::{ModelSpec, Outputs, Step, StepKind, StepPlan, Workflow};

pub use super::prefetch::Prefetched;

use super::retrieve::Retriever;
use super::SecureSide;

use crate::plain::Loaded;
use crate::secure::SecureArgs;
use crate::KeyArgs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Design {
    Strawman,
    OptStrawman,
    Flexserve,
}

impl Design {
    pub fn name(self) -> &'static str {
        match self {
            Design::Strawman => "strawman",
            Design::OptStrawman => "opt-strawman",
            Design::Flexserve => "flexserve",
        }
    }
}

/// How the secure world is reached.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Worlds {
    /// `secure::connect`: the service, or a development world in `--dev`.
    Connect,
    /// A development secure world of the runner's own for each one it needs
    /// (the benchmark: every design from the same state).
    Spawn,
}

pub struct RunConfig<'a> {
    pub keys: &'a KeyArgs,
    pub budget: MemoryBudget,
    /// Cores to use in all (0: every core).
    pub threads: usize,
    pub design: Design,
    pub worlds: Worlds,
    /// `flexserve` only: grant the whole budget before the clock starts (the
    /// reserve a secure world that has been up and idle holds).
    pub reserve_ahead: bool,
    /// `flexserve` only: load the next step's sealed model while the current
    /// step runs (off: it loads with its own step, pipelined).
    pub prefetch: bool,
}

/// What one step did.
#[derive(Debug, Clone)]
pub struct StepReport {
    pub name: String,
    pub model: String,
    pub sealed: bool,
    /// When the step started, since the workflow's clock did.
    pub started: Duration,
    /// Time spent protecting memory the step was granted.
    pub protect: Duration,
    /// From the step's start (opening its model included) to its first token.
    pub ttft: Duration,
    pub total: Duration,
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub decode_tokens_per_s: f64,
    /// Granules granted (protected) for the step.
    pub granted: u64,
    /// Layers other models gave up for it.
    pub evicted_layers: u64,
    /// The next step's sealed model, loaded while this step ran (`flexserve` design).
    pub prefetch: Option<Prefetched>,
}

pub struct RunReport {
    pub steps: Vec<StepReport>,
    pub outputs: Outputs,
    pub total: Duration,
    /// Granules the normal world took back during the run (`flexserve recall`, memory pressure).
    pub recalled: u64,
    /// Time spent protecting a carve-out when the workflow started (`opt-strawman`).
    pub carve_out: Duration,
}

/// What the runner tells its caller as it goes.
pub enum Event<'a> {
    StepStarted { step: &'a Step, model: &'a str, sealed: bool },
    Text(&'a str),
    StepDone(&'a StepReport),
}

pub fn run(workflow: &Workflow, input: &str, cfg: &RunConfig, on_event: &mut dyn FnMut(Event)) -> Result<RunReport> {
    let sealed: Vec<bool> = workflow
        .models
        .iter()
        .map(|m| crate::is_sealed(&m.path).with_context(|| format!("model {:?}", m.name)))
        .collect::<Result<_>>()?;
    let cores =
        if cfg.threads == 0 { std::thread::available_parallelism().map_or(1, |n| n.get()) } else { cfg.threads };
    // The static split of the optimized strawman: half the cores each.
    let (secure_threads, plain_threads) = match cfg.design {
        Design::OptStrawman => ((cores / 2).max(1), (cores - cores / 2).max(1)),
        _ => (cores, cores),
    };
    let mut side = match sealed.iter().any(|&s| s) {
        true => Some(SecureSide {
            world: start_world(cfg, secure_threads)?,
            opened: workflow.models.iter().map(|_| None).collect(),
        }),
        false => None,
    };
    if let (Some(s), true) = (side.as_mut(), cfg.reserve_ahead && cfg.design == Design::Flexserve) {
        // The reserve a secure world that has been up and idle holds.
        let budget = s.world.budget_granules();
        s.world.grant(budget).context("preparing the reserve")?;
    }
    let t0 = Instant::now();
    let mut carve_out = Duration::ZERO;
    if let (Some(s), Design::OptStrawman) = (side.as_mut(), cfg.design) {
        // The carve-out: the whole budget, protected when the workflow starts.
        let budget = s.world.budget_granules();
        s.world.grant(budget).context("making the carve-out")?;
        carve_out = t0.elapsed();
    }
    let plan = workflow.plan();
    let mut plains: Vec<Option<Loaded>> = workflow.models.iter().map(|_| None).collect();
    let mut encoders: Vec<Option<Retriever>> = workflow.models.iter().map(|_| None).collect();
    // A retrieve step's passages, embedded when it first runs.
    let mut indexes: Vec<Option<PassageIndex>> = workflow.steps.iter().map(|_| None).collect();
    let mut outputs = Outputs::new(workflow.steps.len());
    let mut reports = Vec::new();
    let mut recalled = 0;
    for sp in &plan.steps {
        let step = &workflow.steps[sp.step];
        let spec = &workflow.models[sp.model];
        let context = || format!("step {:?} (model {:?}, {})", step.name, spec.name, spec.path.display());
        let prompt = workflow.render_prompt(sp.step, input, &outputs).with_context(context)?;
        let system = workflow.render_system(sp.step, input, &outputs).with_context(context)?;
        on_event(Event::StepStarted { step, model: &spec.name, sealed: sealed[sp.model] });
        let started = Instant::now();
        let mut text = String::new();
        let mut first: Option<Instant> = None;
        let mut on_text = |t: &str| {
            first.get_or_insert_with(Instant::now);
            text.push_str(t);
            on_event(Event::Text(t));
        };
        let mut report = StepReport {
            name: step.name.clone(),
            model: spec.name.clone(),
            sealed: sealed[sp.model],
            started: started - t0,
            protect: Duration::ZERO,
            ttft: Duration::ZERO,
            total: Duration::ZERO,
            prompt_tokens: 0,
            generated_tokens: 0,
            decode_tokens_per_s: 0.0,
            granted: 0,
            evicted_layers: 0,
            prefetch: None,
        };
        let retrieve = matches!(step.kind, StepKind::Retrieve(_));
        // The model to load while this step runs: the next step's, if sealed.
        let next = match (&side, cfg.design) {
            (Some(_), Design::Flexserve) if cfg.prefetch => sp.prefetch.filter(|&m| sealed[m]),
            _ => None,
        };
        if sealed[sp.model] && !retrieve {
            let s = side.as_mut().expect("a secure world for the sealed steps");
            let next = next.map(|m| (m, &workflow.models[m]));
            run_sealed(s, &SealedStep { cfg, sp, step, spec, next }, prompt, system, &mut report, &mut on_text)
                .with_context(context)?;
        } else {
            // The secure link is idle while this step computes here: the
            // next step's model streams into the secure world meanwhile.
            let done = std::sync::atomic::AtomicBool::new(false);
            let (computed, prefetched) = std::thread::scope(|scope| {
                let prefetching = match (next, side.as_mut()) {
                    (Some(m), Some(s)) => {
                        let (path, done) = (&workflow.models[m].path, &done);
                        Some(scope.spawn(move || super::prefetch::prefetch(s, m, path, done)))
                    }
                    _ => None,
                };
                let computed = (|| -> Result<()> {
                    if let StepKind::Retrieve(retrieval) = &step.kind {
                        if encoders[sp.model].is_none() {
                            encoders[sp.model] =
                                Some(Retriever::open(&spec.path, plain_threads).with_context(context)?);
                        }
                        let retriever = encoders[sp.model].as_ref().expect("opened above");
                        if indexes[sp.step].is_none() {
                            let (index, tokens) = retriever.index(retrieval).with_context(context)?;
                            indexes[sp.step] = Some(index);
                            report.prompt_tokens += tokens;
                        }
                        let index = indexes[sp.step].as_ref().expect("built above");
                        let (found, tokens) = retriever.retrieve(index, retrieval, &prompt).with_context(context)?;
                        report.prompt_tokens += tokens;
                        on_text(&found);
                        if cfg.design != Design::Flexserve || sp.unload_after.contains(&sp.model) {
                            encoders[sp.model] = None;
                        }
                    } else {
                        if plains[sp.model].is_none() {
                            plains[sp.model] = Some(Loaded::open(&spec.path, plain_threads).with_context(context)?);
                        }
                        let loaded = plains[sp.model].as_ref().expect("opened above");
                        let stats =
                            plain_step(loaded, step, &prompt, system.as_deref(), &mut on_text).with_context(context)?;
                        report.prompt_tokens = stats.prompt_tokens;
                        report.generated_tokens = stats.generated_tokens;
                        report.decode_tokens_per_s = stats.decode_tokens_per_s();
                        let last_use = cfg.design != Design::Flexserve || sp.unload_after.contains(&sp.model);
                        if last_use {
                            plains[sp.model] = None;
                        }
                    }
                    Ok(())
                })();
                // What is still missing streams behind the next step's own computation.
                done.store(true, std::sync::atomic::Ordering::Relaxed);
                (computed, prefetching.map(|h| h.join().expect("the prefetch thread does not panic")))
            });
            computed.with_context(context)?;
            if let (Some(prefetched), Some(s), Some(m)) = (prefetched, side.as_mut(), next) {
                let what = || format!("prefetching model {:?} during {}", workflow.models[m].name, context());
                report.prefetch =
                    Some(super::prefetch::finish(s, m, &workflow.models[m].name, prefetched).with_context(what)?);
            }
        }
        report.total = started.elapsed();
        report.ttft = first.map_or(report.total, |f| f - started);
        if let Some(s) = side.as_mut() {
            s.world.serve_control().with_context(context)?;
            recalled += crate::secure::report_recalls(&mut s.world);
        }
        on_event(Event::StepDone(&report));
        outputs.set(sp.step, text);
        reports.push(report);
    }
    let total = t0.elapsed();
    if let Some(s) = side {
        s.world.shutdown().context("shutting the secure world down")?;
    }
    Ok(RunReport { steps: reports, outputs, total, recalled, carve_out })
}

/// What a sealed step runs on.
struct SealedStep<'a> {
    cfg: &'a RunConfig<'a>,
    sp: &'a StepPlan,
    step: &'a Step,
    spec: &'a ModelSpec,
    /// The next step's sealed model, loaded behind this step's decode.
    next: Option<(usize, &'a ModelSpec)>,
}

/// A sealed step in the secure world: its model opened (header-only but for
/// the strawman), the eviction order named, the generation relayed (the next
/// step's model streaming in once this one's own chunks are sent), then the
/// models no later step uses unloaded.
fn run_sealed(
    s: &mut SecureSide,
    at: &SealedStep,
    prompt: String,
    system: Option<String>,
    report: &mut StepReport,
    on_text: &mut dyn FnMut(&str),
) -> Result<()> {
    let (cfg, sp) = (at.cfg, at.sp);
    let before = s.world.status()?;
    if s.opened[sp.model].is_none() {
        let opened = if cfg.design == Design::Strawman {
            s.world.open_model(&at.spec.path)
        } else {
            s.world.open_model_header(&at.spec.path)
        };
        let (opened, load) = opened?;
        report.protect += load.grant;
        s.opened[sp.model] = Some(opened);
    }
    let next = at.next.filter(|&(m, _)| m != sp.model);
    if let Some((m, spec)) = next {
        super::prefetch::open(s, m, &spec.path)?;
    }
    // Models needed later, the one needed furthest ahead first.
    let order = sp.eviction_order.iter().filter_map(|&m| s.opened[m].as_ref().map(|o| o.id)).collect();
    s.world.set_eviction_order(order);
    let model = s.opened[sp.model].as_ref().expect("opened above");
    let request = sealed_request(model, at.step, prompt, system);
    let prefetch = next.and_then(|(m, _)| s.opened[m].as_ref());
    let (r, prefetched) = s.world.generate_prefetching(model, request, on_text, prefetch)?;
    let after = s.world.status()?;
    report.protect += s.world.take_pipelined_load().map_or(Duration::ZERO, |l| l.grant);
    report.prompt_tokens = r.prompt_tokens as usize;
    report.generated_tokens = r.generated_tokens as usize;
    report.decode_tokens_per_s =
        f64::from(r.generated_tokens.saturating_sub(1)) / (r.decode_micros as f64 / 1e6).max(1e-9);
    report.granted = u64::from(after.granted.saturating_sub(before.granted));
    report.evicted_layers = layers_given_up(&before, &after, model.id);
    if let (Some((m, spec)), Some(prefetched)) = (next, prefetched) {
        report.prefetch = Some(super::prefetch::finish(s, m, &spec.name, Ok(prefetched))?);
    }
    let unload: Vec<usize> = match cfg.design {
        Design::Flexserve => sp.unload_after.clone(),
        // The strawmen know nothing of what comes next.
        Design::OptStrawman | Design::Strawman => vec![sp.model],
    };
    for m in unload {
        if let Some(opened) = s.opened[m].take() {
            s.world.unload(&opened)?;
        }
    }
    if cfg.design == Design::Strawman {
        // The step's carve-out goes back with it.
        s.world.recall(u32::MAX)?;
    }
    Ok(())
}

fn start_world(cfg: &RunConfig, threads: usize) -> Result<SecureWorld> {
    let secure = SecureArgs {
        secure_memory_limit: cfg.budget,
        secure_pool: PoolChoice::Flexible,
        granule_size: 0,
        locked_memory: false,
        memory_floor: 0,
    };
    match cfg.worlds {
        Worlds::Connect => {
            let mut world = crate::secure::connect(cfg.keys, &secure, threads)?;
            // `flexserve recall` reaches it between tokens and between steps.
            crate::secure::listen_for_recalls(&mut world);
            Ok(world)
        }
        Worlds::Spawn => crate::secure::spawn(cfg.keys, &secure, threads),
    }
}

/// Layers other models gave up during a step (from the status before and after).
fn layers_given_up(before: &StatusReport, after: &StatusReport, model: u32) -> u64 {
    before
        .models
        .iter()
        .filter(|b| b.model != model)
        .map(|b| {
            let now = after.models.iter().find(|a| a.model == b.model).map_or(0, |a| a.resident_layers);
            u64::from(b.resident_layers.saturating_sub(now))
        })
        .sum()
}

fn sampling(step: &Step) -> Sampling {
    let s = &step.sampling;
    Sampling {
        temperature: s.temperature,
        top_k: s.top_k,
        top_p: s.top_p,
        min_p: s.min_p,
        seed: s.seed.unwrap_or(0),
        ..Sampling::default()
    }
}

fn sealed_request(model: &OpenedModel, step: &Step, prompt: String, system: Option<String>) -> GenerateRequest {
    let input = if step.chat {
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(Message { role: "system".to_string(), content: system });
        }
        messages.push(Message { role: "user".to_string(), content: prompt });
        Input::Messages { messages }
    } else {
        Input::Raw { text: prompt }
    };
    GenerateRequest {
        model: model.id,
        conversation: 0,
        input,
        max_tokens: step.max_tokens,
        n_ctx: 0,
        sampling: sampling(step),
        stop: step.stop.clone(),
    }
}

/// A plain step: the same prompt the secure world would build (the model's
/// chat template, or the raw text), generated by this process's engine.
fn plain_step(
    loaded: &Loaded,
    step: &Step,
    prompt: &str,
    system: Option<&str>,
    on_text: &mut dyn FnMut(&str),
) -> Result<flexserve_engine::GenerationStats> {
    let text = if step.chat {
        let template = loaded.template.as_ref().context("the model has no chat template (tokenizer.chat_template)")?;
        let mut messages = Vec::new();
        if let Some(system) = system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", prompt));
        template.render(&messages, true)?
    } else {
        prompt.to_string()
    };
    let ids = loaded.tokenizer.encode(&text, true, true);
    let s = &step.sampling;
    let opts = GenerateOptions {
        max_tokens: step.max_tokens as usize,
        sampling: SamplingParams {
            temperature: s.temperature,
            top_k: s.top_k as usize,
            top_p: s.top_p,
            min_p: s.min_p,
            seed: s.seed.unwrap_or(0),
            ..SamplingParams::default()
        },
        stop: step.stop.clone(),
    };
    let n_ctx = (ids.len() + step.max_tokens as usize).min(loaded.model.config.n_ctx_train).max(1);
    let session = Session::new(&loaded.model, n_ctx);
    let mut generator = Generator::new(session, &loaded.tokenizer);
    Ok(generator.generate(&ids, &opts, |t| on_text(t))?)
}
