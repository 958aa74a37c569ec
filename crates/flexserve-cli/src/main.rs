//! `flexserve`: the command line of the normal world.

mod bench;
mod bench_cores;
mod bench_encrypted;
mod bench_secure;
mod bench_serve;
mod bench_ttft;
mod bench_workflow;
mod client;
mod embed;
mod plain;
mod secure;
mod serve;
mod timeline_svg;
mod workflow;

use plain::{chat, inspect, is_sealed, report, Loaded, ModelFile};

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use flexserve_engine::generate::{GenerateOptions, Generator};
use flexserve_engine::perplexity::perplexity;
use flexserve_engine::{SamplingParams, Session};
use flexserve_gguf::GgufFile;
use flexserve_tokenizer::Tokenizer;

#[derive(Parser)]
#[command(name = "flexserve", version, about = "FlexServe: fast and secure LLM serving")]
struct Cli {
    /// Development mode: run an unprotected secure world as your own user (no launcher, no root).
    /// Everything it holds is readable by you and by anything running as you.
    #[arg(long, global = true, env = "FLEXSERVE_DEV", value_parser = clap::builder::BoolishValueParser::new())]
    dev: bool,
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
        /// Answer this single user turn and exit (visible to other users in the process list:
        /// prefer --prompt-file or standard input).
        #[arg(long, conflicts_with = "prompt_file")]
        prompt: Option<String>,
        /// Answer the user turn in this file (`-`: standard input) and exit.
        #[arg(long)]
        prompt_file: Option<PathBuf>,
        /// System prompt (otherwise the template's default).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Embeddings of texts from an encoder model (nomic-bert): one JSON array per input, one per line.
    Embed(embed::EmbedArgs),
    /// Write a random-weight model with real shapes (for speed work), tokenizer copied from a real model.
    Synth {
        /// 1b, 3b, or LAYERS,HIDDEN,HEADS,KV_HEADS,FFN.
        #[arg(long)]
        shape: String,
        /// Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, Q4_K_M, F16, BF16 or F32.
        #[arg(long)]
        quant: String,
        /// A GGUF model whose tokenizer the new model gets (so that llama.cpp loads it too).
        #[arg(long)]
        tokenizer_from: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Multi-model workflows: declared steps over sealed and plain models (docs/workflows.md).
    Workflow {
        #[command(subcommand)]
        what: WorkflowCommand,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Create a model key (32 random bytes, hex) in a new file readable only by its owner.
    Keygen {
        /// Where to write the key.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Print this device's public key, which its secure world generated and keeps (seal models to it with `seal --to`).
    DeviceKey,
    /// Serve models over an OpenAI-compatible HTTP API (plain models here, sealed ones in the secure world).
    Serve(serve::ServeArgs),
    /// A local OpenAI-compatible endpoint whose chats go to a daemon's secure world in encrypted
    /// sessions: the daemon carries them and cannot read them.
    Client(client::ClientArgs),
    /// The secure world's identity report, its signature checked and its identity key pinned
    /// (the first time, in $FLEXSERVE_HOME/secure-world.pin; a different key later is refused).
    Identity {
        /// Print one JSON object: the report, its signature, and what was checked.
        #[arg(long)]
        json: bool,
        /// The identity key (Ed25519, hex) to expect, given out of band, instead of the pinned one.
        #[arg(long)]
        expect: Option<String>,
    },
    /// Model keys held for the secure world.
    Key {
        #[command(subcommand)]
        what: KeyCommand,
    },
    /// Encrypt and authenticate a GGUF model's tensor data chunk by chunk (a sealed model, .fsm).
    Seal {
        /// The plain GGUF model.
        #[arg(long)]
        model: PathBuf,
        /// Model key file (from `flexserve keygen`).
        #[arg(long, conflicts_with = "to", required_unless_present = "to")]
        key: Option<PathBuf>,
        /// Seal for one device: its public key (hex, as `flexserve device-key` prints it) or a file holding it.
        #[arg(long)]
        to: Option<String>,
        /// Where to write the sealed model.
        #[arg(short, long)]
        output: PathBuf,
        /// Bytes of plaintext per chunk (4 KiB .. 64 MiB).
        #[arg(long, default_value_t = flexserve_sealed::DEFAULT_CHUNK_SIZE)]
        chunk_size: usize,
        /// With --to: also write the generated model key here (the vendor's copy).
        #[arg(long, requires = "to")]
        key_out: Option<PathBuf>,
        /// Sign the header with this vendor signing key (from `flexserve vendor-keygen`).
        #[arg(long)]
        sign: Option<PathBuf>,
    },
    /// Create a vendor signing key (Ed25519) and print its public key.
    VendorKeygen {
        /// Where to write the signing key (mode 0600).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Start a secure world (loading a sealed model if given) and show its protection, memory and models.
    Status {
        /// A sealed model (.fsm) to load first.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        secure: secure::SecureArgs,
    },
    /// Take secure memory back from running sessions (the normal world's management right): each
    /// secure world gives free granules first, then model layers, then idle KV caches.
    Recall {
        /// Granules to take back.
        #[arg(long, required_unless_present = "memory", conflicts_with = "memory")]
        granules: Option<u32>,
        /// Memory to take back (e.g. 64M, 1G).
        #[arg(long, value_parser = secure::parse_bytes)]
        memory: Option<u64>,
        /// Only the session of this process (default: every running session).
        #[arg(long)]
        pid: Option<u32>,
        /// Seconds to wait for each session's answer.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
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
        #[command(flatten)]
        keys: KeyArgs,
        #[command(flatten)]
        secure: secure::SecureArgs,
    },
}

#[derive(Subcommand)]
enum KeyCommand {
    /// Hand a raw model key to the secure world once: it seals the key under its device key, and only
    /// that sealed form is kept (in $FLEXSERVE_HOME/keys), never the key itself.
    Import {
        /// The model key file (from `flexserve keygen`).
        #[arg(long)]
        key: PathBuf,
        /// Name to keep it under [default: the key file's name without extension].
        #[arg(long)]
        name: Option<String>,
        /// Delete the key file once the secure world holds the key.
        #[arg(long)]
        remove: bool,
    },
}

#[derive(Subcommand)]
enum WorkflowCommand {
    /// Run a workflow file on an input: each step's output as it comes, then the answer.
    Run(workflow::RunArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Prefill and decode tokens per second (median and spread over repetitions, after a warm-up).
    Engine {
        #[arg(long)]
        model: PathBuf,
        /// Prompt lengths to prefill, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "16,128,512")]
        prompt_tokens: Vec<usize>,
        /// Tokens to decode.
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        repetitions: usize,
        /// Kernel tier to use (default: the best this CPU has); a lower tier compares tiers on one CPU.
        #[arg(long, value_enum)]
        isa: Option<IsaArg>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Time to first token and decode speed: the plain engine next to the secure world
    /// (flexible Flex-Mem, static carve-out, locked memory), alternating, as ratios.
    Secure {
        /// The sealed model (.fsm).
        #[arg(long)]
        model: PathBuf,
        /// The same model, plain (the baseline).
        #[arg(long)]
        plain: PathBuf,
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 32)]
        gen_tokens: usize,
        /// Worker threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long, default_value_t = 5)]
        repetitions: usize,
        /// Secure memory budget of the flexible designs (the carve-out is sized for the model).
        #[arg(long, default_value = "512M", value_parser = flexserve_normal::MemoryBudget::parse)]
        secure_memory_limit: flexserve_normal::MemoryBudget,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Time to first token of one model under the paper's designs side by side (plain, strawman,
    /// opt-strawman, flexserve) from a stated state (cold, model-cold, warm), with where the time
    /// went and, with --timeline, one SVG timeline per design.
    Ttft(bench_ttft::TtftArgs),
    /// A multi-model workflow end to end under the paper's designs side by side (strawman,
    /// opt-strawman, flexserve), under a secure memory budget: per-step first token and decode.
    Workflow(bench_workflow::WorkflowBenchArgs),
    /// Flex-NPU under mixed load: sealed requests back to back while plain ones arrive, with the
    /// cores leased to one world at a time and split between them for good, side by side.
    Cores(bench_cores::CoresBenchArgs),
    /// Load an OpenAI-compatible server (`flexserve serve`) with streamed chat completions at each
    /// concurrency level: generated tokens/s, time to first token and per-token latency percentiles.
    Serve(bench_serve::ServeArgs),
    /// What an encrypted session costs: the same prompts through a daemon plainly and through
    /// an encrypted session, alternating; medians of time to first token and decode speed, as ratios.
    Encrypted(bench_encrypted::EncryptedArgs),
}

/// `--isa`: a kernel tier by its report name.
#[derive(Clone, Copy, clap::ValueEnum)]
enum IsaArg {
    Portable,
    Avx2,
    Avx512,
    Neon,
    NeonDot,
}

impl IsaArg {
    fn isa(self) -> flexserve_quant::Isa {
        match self {
            IsaArg::Portable => flexserve_quant::Isa::Portable,
            IsaArg::Avx2 => flexserve_quant::Isa::Avx2,
            IsaArg::Avx512 => flexserve_quant::Isa::Avx512,
            IsaArg::Neon => flexserve_quant::Isa::Neon,
            IsaArg::NeonDot => flexserve_quant::Isa::NeonDot,
        }
    }
}

/// How to open a sealed model. Models sealed to this device (`seal --to`) and keys imported with
/// `flexserve key import` need neither option.
#[derive(Args, Clone)]
pub(crate) struct KeyArgs {
    /// Development mode only: a model key file for a model sealed with a key (the secure world
    /// service takes no key files; import the key once with `flexserve key import`).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Development mode only: accept a sealed model only if this vendor signed it (public key in hex,
    /// or a file holding it); the service's policy says which vendor keys it requires.
    #[arg(long)]
    vendor_pubkey: Option<String>,
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
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    secure: secure::SecureArgs,
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
    secure::set_development(cli.dev);
    if let Err(e) = run(cli) {
        // A reader that went away (`| head`) is not an error.
        if e.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe) {
            return;
        }
        eprintln!("error: {}", describe(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, each said once: many errors already include
/// their cause in their own message, and printing the chain would repeat it.
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if !text.contains(&part) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&part);
        }
    }
    text
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, full } => inspect(&model, full),
        Command::Tokenize { model, text, file, no_parse_special } => {
            let text = read_text(text, file)?;
            // The vocabulary is public metadata, also in a sealed model.
            let file = ModelFile::open(&model)?;
            let tok = Tokenizer::from_gguf(file.metadata()).with_context(|| format!("{}", model.display()))?;
            let ids = tok.encode(&text, true, !no_parse_special);
            println!("{}", serde_json::to_string(&ids)?);
            Ok(())
        }
        Command::Embed(args) => embed::run(args),
        Command::Generate { run, prompt, prompt_file, sampling } => {
            let prompt = read_text(prompt, prompt_file)?;
            if is_sealed(&run.model)? {
                return secure::generate(&run.model, prompt, &run, &sampling);
            }
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
        Command::Chat { run, prompt, prompt_file, system, sampling } => {
            let prompt = match (prompt, prompt_file) {
                (Some(p), _) => Some(p),
                (None, Some(f)) => Some(read_text(None, Some(f))?),
                (None, None) => None,
            };
            if is_sealed(&run.model)? {
                return secure::chat(&run.model, prompt, system, &run, &sampling);
            }
            chat(run, prompt, system, sampling)
        }
        Command::Status { model, json, keys, secure } => secure::status(model, &keys, &secure, json),
        Command::Recall { granules, memory, pid, timeout } => {
            use flexserve_normal::control::RecallAmount;
            let amount = match (granules, memory) {
                (Some(n), _) => RecallAmount::Granules(n),
                (None, Some(b)) => RecallAmount::Bytes(b),
                (None, None) => anyhow::bail!("say how much to recall: --granules N or --memory SIZE"),
            };
            secure::recall(amount, pid, timeout)
        }
        Command::Synth { shape, quant, tokenizer_from, seed, output } => {
            let spec = flexserve_engine::synth::SynthSpec::from_shape(&shape, &quant, seed)?;
            let tok = ModelFile::open(&tokenizer_from)?;
            let t0 = Instant::now();
            let writer = flexserve_engine::synth::synth_model(&spec, Some(tok.metadata()))?;
            writer.write_file(&output).with_context(|| format!("writing {}", output.display()))?;
            let size = std::fs::metadata(&output).map(|m| m.len()).unwrap_or(0);
            eprintln!(
                "wrote {} ({} layers, hidden {}, {}, {:.1} MiB) in {:.1} s",
                output.display(),
                spec.n_layer,
                spec.n_embd,
                quant.to_uppercase(),
                size as f64 / (1 << 20) as f64,
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Bench {
            what: BenchCommand::Engine { model, prompt_tokens, gen_tokens, threads, repetitions, isa, json },
        } => {
            if repetitions == 0 || prompt_tokens.contains(&0) {
                bail!("--repetitions and every --prompt-tokens length must be at least 1");
            }
            if let Some(isa) = isa.map(IsaArg::isa) {
                // Before the model loads: its matrices pick their kernels then.
                let best = flexserve_quant::detected_isa();
                // Tiers of another architecture (avx2 on aarch64, neon on
                // x86-64) are not usable either.
                if isa.usable() != isa {
                    bail!("--isa {}: this CPU's best kernel tier is {}", isa.name(), best.name());
                }
                flexserve_quant::limit_isa(isa);
            }
            if is_sealed(&model)? {
                bail!(
                    "{}: bench engine measures the engine on a plain model (the normal world never decrypts a \
                     sealed one); `bench secure` measures sealed models in the secure world",
                    model.display()
                );
            }
            let loaded = Loaded::open(&model, threads)?;
            let spec = bench::EngineBench { prompt_tokens, gen_tokens, repetitions };
            let r = bench::run(&loaded.model, &spec)?;
            if json {
                println!("{}", bench::to_json(&model.display().to_string(), loaded.model.threads(), &r));
            } else {
                bench::print_table(&r);
            }
            Ok(())
        }
        Command::Bench {
            what:
                BenchCommand::Secure {
                    model,
                    plain,
                    prompt_tokens,
                    gen_tokens,
                    threads,
                    repetitions,
                    secure_memory_limit,
                    keys,
                },
        } => {
            if repetitions == 0 || prompt_tokens == 0 || gen_tokens < 2 {
                bail!("--repetitions and --prompt-tokens must be at least 1, --gen-tokens at least 2");
            }
            let threads = if threads == 0 { flexserve_engine::model::default_threads() } else { threads };
            bench_secure::run(&bench_secure::SecureBench {
                sealed: &model,
                plain: &plain,
                keys: &keys,
                prompt_tokens,
                gen_tokens,
                threads,
                repetitions,
                budget: secure_memory_limit,
            })
        }
        Command::Workflow { what: WorkflowCommand::Run(args) } => workflow::run(args),
        Command::Bench { what: BenchCommand::Serve(args) } => bench_serve::run(args),
        Command::Bench { what: BenchCommand::Workflow(args) } => bench_workflow::run(args),
        Command::Bench { what: BenchCommand::Cores(args) } => bench_cores::run(args),
        Command::Bench { what: BenchCommand::Ttft(args) } => bench_ttft::run(args),
        Command::Bench { what: BenchCommand::Encrypted(args) } => bench_encrypted::run(args),
        Command::Keygen { output } => {
            flexserve_sealed::ModelKey::generate().save(&output)?;
            eprintln!("wrote a new model key to {} (mode 0600)", output.display());
            Ok(())
        }
        Command::DeviceKey => secure::device_key(),
        Command::Identity { json, expect } => secure::identity(json, expect),
        Command::Serve(args) => serve::run(args),
        Command::Client(args) => client::run(args),
        Command::Key { what: KeyCommand::Import { key, name, remove } } => secure::import_key(&key, name, remove),
        Command::Seal { model, key, to, output, chunk_size, key_out, sign } => {
            seal(model, key, to, output, chunk_size, key_out, sign)
        }
        Command::VendorKeygen { output } => {
            let k = flexserve_sealed::VendorSigningKey::generate();
            k.save(&output)?;
            eprintln!("wrote a new vendor signing key to {} (mode 0600); its public key:", output.display());
            println!("{}", k.public_key().to_hex());
            Ok(())
        }
        Command::Perplexity { model, file, ctx, threads, keys, secure } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            if is_sealed(&model)? {
                return secure::perplexity(&model, text, ctx, threads, &keys, &secure);
            }
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

/// The key that opens a sealed model: unwrapped with this device's key when
/// the model was sealed to a device, else read from --key.
fn seal(
    model: PathBuf,
    key: Option<PathBuf>,
    to: Option<String>,
    output: PathBuf,
    chunk_size: usize,
    key_out: Option<PathBuf>,
    sign: Option<PathBuf>,
) -> Result<()> {
    let (model_key, to_device) = match (key, to) {
        (Some(k), _) => (flexserve_sealed::ModelKey::load(&k)?, None),
        (None, Some(to)) => {
            let pubkey = if Path::new(&to).is_file() {
                flexserve_sealed::DevicePublicKey::load(&to)?
            } else {
                flexserve_sealed::DevicePublicKey::from_hex(&to)?
            };
            let k = flexserve_sealed::ModelKey::generate();
            if let Some(out) = &key_out {
                k.save(out)?;
            }
            (k, Some(pubkey))
        }
        (None, None) => bail!("give --key KEY or --to DEVICE_PUBKEY"),
    };
    let opts = flexserve_sealed::SealOptions { chunk_size, to_device };
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
            .expect("valid progress template")
            .progress_chars("=> "),
    );
    bar.set_message("sealing");
    let t0 = Instant::now();
    let signer = sign.map(flexserve_sealed::VendorSigningKey::load).transpose()?;
    let report =
        flexserve_sealed::seal_file_signed(&model, &output, &model_key, &opts, signer.as_ref(), &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })?;
    bar.finish_and_clear();
    eprintln!(
        "sealed {} -> {}: {} tensors in {} chunks of up to {} bytes, {:.1} MiB in {:.2} s",
        model.display(),
        output.display(),
        report.tensors,
        report.chunks,
        report.chunk_size,
        report.sealed_bytes as f64 / (1 << 20) as f64,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

pub(crate) fn open(path: &Path) -> Result<GgufFile> {
    GgufFile::open(path).with_context(|| format!("opening model {}", path.display()))
}

fn read_text(text: Option<String>, file: Option<PathBuf>) -> Result<String> {
    match (text, file) {
        (Some(t), _) => Ok(t),
        (None, Some(f)) if f.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("reading standard input")?;
            Ok(text)
        }
        (None, Some(f)) => std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display())),
        (None, None) => bail!("give the text inline or as a file"),
    }
}
