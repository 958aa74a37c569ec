//! `flexserve`: the command line of the normal world.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flexserve_engine::generate::{GenerateOptions, Generator};
use flexserve_engine::perplexity::perplexity;
use flexserve_engine::{Model, SamplingParams, Session};
use flexserve_gguf::{GgufFile, Value};
use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

#[derive(Parser)]
#[command(name = "flexserve", version, about = "FlexServe: fast and secure LLM serving")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show a model's metadata and tensor table.
    Inspect {
        /// GGUF model file.
        model: PathBuf,
        /// Print every element of long arrays (vocabularies) instead of a summary.
        #[arg(long)]
        full: bool,
    },
    /// Print the token ids of a text as a JSON array.
    Tokenize {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        text: Option<String>,
        #[arg(long)]
        file: Option<PathBuf>,
        /// Treat special-token text such as <|im_start|> as plain text.
        #[arg(long)]
        no_parse_special: bool,
    },
    /// Continue a raw prompt (no chat template); prints only the generated text.
    Generate {
        #[command(flatten)]
        run: RunArgs,
        #[arg(long, conflicts_with = "prompt_file", required_unless_present = "prompt_file")]
        prompt: Option<String>,
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Chat with the model's chat template: one user turn per line of stdin.
    Chat {
        #[command(flatten)]
        run: RunArgs,
        /// Answer this single user turn and exit.
        #[arg(long)]
        prompt: Option<String>,
        /// System prompt (otherwise the template's default).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Perplexity of a text file, scored as llama.cpp does (chunks of --ctx tokens, second halves).
    Perplexity {
        #[arg(long)]
        model: PathBuf,
        #[arg(long)]
        file: PathBuf,
        #[arg(long, default_value_t = 512)]
        ctx: usize,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
    },
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    model: PathBuf,
    /// Maximum number of tokens to generate.
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Context length (0 = the model's own).
    #[arg(long, default_value_t = 0)]
    ctx: usize,
}

#[derive(Args)]
struct SamplingArgs {
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    #[arg(long, default_value_t = 40)]
    top_k: usize,
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    #[arg(long, default_value_t = 0.05)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repeat_penalty: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn options(&self, max_tokens: usize) -> GenerateOptions {
        GenerateOptions {
            max_tokens,
            sampling: SamplingParams {
                temperature: self.temperature,
                top_k: self.top_k,
                top_p: self.top_p,
                min_p: self.min_p,
                repeat_penalty: self.repeat_penalty,
                seed: self.seed,
                ..SamplingParams::default()
            },
            stop: self.stop.clone(),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, full } => inspect(&model, full),
        Command::Tokenize { model, text, file, no_parse_special } => {
            let text = read_text(text, file)?;
            let gguf = open(&model)?;
            let tok = Tokenizer::from_gguf(&gguf.header.metadata).with_context(|| format!("{}", model.display()))?;
            let ids = tok.encode(&text, true, !no_parse_special);
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Command::Generate { run, prompt, prompt_file, sampling } => {
            let prompt = read_text(prompt, prompt_file)?;
            let loaded = Loaded::open(&run.model, run.threads)?;
            let ids = loaded.tokenizer.encode(&prompt, true, true);
            let session = Session::new(&loaded.model, run.ctx);
            let mut generator = Generator::new(session, &loaded.tokenizer);
            let mut out = std::io::stdout().lock();
            let stats = generator.generate(&ids, &sampling.options(run.max_tokens), |t| {
                let _ = out.write_all(t.as_bytes());
                let _ = out.flush();
            })?;
            // Scripts get exactly the generated text; a terminal gets a final newline.
            if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                writeln!(out)?;
            }
            report(&stats);
            Ok(())
        }
        Command::Chat { run, prompt, system, sampling } => chat(run, prompt, system, sampling),
        Command::Perplexity { model, file, ctx, threads } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let loaded = Loaded::open(&model, threads)?;
            let tokens = loaded.tokenizer.encode(&text, true, false);
            // Models that start every text with BOS see it at the start of every chunk.
            let bos = if loaded.tokenizer.adds_bos() { loaded.tokenizer.bos() } else { None };
            eprintln!("perplexity: {} tokens, {} chunks of {ctx}", tokens.len(), tokens.len() / ctx.max(1));
            let t0 = Instant::now();
            let r = perplexity(&loaded.model, &tokens, ctx, bos, |i, n, ppl| {
                eprintln!("[{i}/{n}] {ppl:.4}");
            })?;
            eprintln!("perplexity: {:.1} s", t0.elapsed().as_secs_f64());
            println!("Final estimate: PPL = {:.4} +/- {:.5}", r.ppl, r.ppl_err);
            println!("PPL = {:.4}", r.ppl);
            Ok(())
        }
    }
}

/// A model file opened with its tokenizer and weights.
struct Loaded {
    tokenizer: Tokenizer,
    template: Option<ChatTemplate>,
    model: Model,
}

impl Loaded {
    fn open(path: &Path, threads: usize) -> Result<Self> {
        let t0 = Instant::now();
        let gguf = Arc::new(open(path)?);
        let meta = &gguf.header.metadata;
        let tokenizer = Tokenizer::from_gguf(meta).with_context(|| format!("tokenizer of {}", path.display()))?;
        let template = ChatTemplate::from_gguf(meta, &tokenizer)
            .with_context(|| format!("chat template of {}", path.display()))?;
        let model = Model::from_gguf(gguf.clone(), threads).with_context(|| format!("loading {}", path.display()))?;
        eprintln!(
            "loaded {} ({}, {} layers, {} threads) in {:.0} ms",
            path.display(),
            model.config.arch.name(),
            model.config.n_layer,
            model.threads(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Self { tokenizer, template, model })
    }
}

fn open(path: &Path) -> Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("opening model {}", path.display()))
}

fn read_text(text: Option<String>, file: Option<PathBuf>) -> Result<String> {
    match (text, file) {
        (Some(t), _) => Ok(t),
        (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display())),
        (None, None) => bail!("give the text inline or as a file"),
    }
}

fn report(stats: &flexserve_engine::GenerationStats) {
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.1} tok/s){} | decode: {} tokens, {:.1} tok/s | stop: {:?}",
        stats.prompt_tokens,
        stats.prefill_secs * 1e3,
        stats.prefill_tokens_per_s(),
        if stats.cached_tokens > 0 { format!(", {} cached", stats.cached_tokens) } else { String::new() },
        stats.generated_tokens,
        stats.decode_tokens_per_s(),
        stats.stop
    );
}

fn chat(run: RunArgs, prompt: Option<String>, system: Option<String>, sampling: SamplingArgs) -> Result<()> {
    let loaded = Loaded::open(&run.model, run.threads)?;
    let template = loaded
        .template
        .as_ref()
        .with_context(|| format!("{} has no chat template (tokenizer.chat_template)", run.model.display()))?;
    let session = Session::new(&loaded.model, run.ctx);
    let mut generator = Generator::new(session, &loaded.tokenizer);
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage { role: "system".into(), content: s });
    }
    let opts = sampling.options(run.max_tokens);
    let interactive = prompt.is_none() && is_terminal_stdin();
    let mut turn = |messages: &mut Vec<ChatMessage>, user: String| -> Result<()> {
        messages.push(ChatMessage { role: "user".into(), content: user });
        let text = template.render(messages, true)?;
        let ids = loaded.tokenizer.encode(&text, true, true);
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        let stats = generator.generate(&ids, &opts, |t| {
            reply.push_str(t);
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        report(&stats);
        messages.push(ChatMessage { role: "assistant".into(), content: reply.trim().to_string() });
        Ok(())
    };
    if let Some(p) = prompt {
        return turn(&mut messages, p);
    }
    let stdin = std::io::stdin();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']).to_string();
        if line.is_empty() {
            continue;
        }
        turn(&mut messages, line)?;
    }
    Ok(())
}

fn is_terminal_stdin() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

fn inspect(path: &Path, full: bool) -> Result<()> {
    let gguf = open(path)?;
    let h = &gguf.header;
    println!("file: {}", path.display());
    println!(
        "GGUF version {}, {} metadata entries, {} tensors, alignment {}, data at byte {}",
        h.version,
        h.metadata.len(),
        h.tensors.len(),
        h.alignment,
        h.data_offset
    );
    println!("\nmetadata:");
    for (k, v) in h.metadata.iter() {
        println!("  {k} = {}", show_value(v, full));
    }
    println!("\ntensors:");
    println!("  {:<40} {:<6} {:<20} {:>12} {:>12}", "name", "type", "shape", "offset", "bytes");
    let mut total = 0u64;
    for t in &h.tensors {
        let shape = format!("{:?}", t.dims);
        println!("  {:<40} {:<6} {:<20} {:>12} {:>12}", t.name, t.ty.name(), shape, t.offset, t.byte_size());
        total += t.byte_size();
    }
    println!("\n{} tensors, {:.1} MiB of tensor data", h.tensors.len(), total as f64 / (1 << 20) as f64);
    Ok(())
}

fn show_value(v: &Value, full: bool) -> String {
    match v {
        Value::String(s) => {
            if s.len() > 200 && !full {
                format!("{:?}... ({} bytes)", &s[..s.floor_char_boundary_compat(200)], s.len())
            } else {
                format!("{s:?}")
            }
        }
        Value::Array(a) => {
            let n = a.values.len();
            let shown = if full { n } else { n.min(8) };
            let items: Vec<String> = a.values[..shown].iter().map(|x| show_value(x, full)).collect();
            if shown < n {
                format!("[{}, ... ({n} {:?} values)]", items.join(", "), a.elem_type)
            } else {
                format!("[{}]", items.join(", "))
            }
        }
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for String {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}
