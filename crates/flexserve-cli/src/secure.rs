//! Sealed models run in the secure world: this module starts it, hands it the
//! sealed file, and relays prompts and generated text. This process (the
//! normal world) never decrypts anything and never tokenizes a prompt of a
//! sealed model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flexserve_normal::{MemoryBudget, OpenedModel, PoolChoice, SecureWorld, SecureWorldOptions};
use flexserve_protocol::{Deployment, GenerateRequest, GenerationReport, Input, Sampling, StatusReport};

use crate::{KeyArgs, SamplingArgs};

/// How the secure world holds memory.
#[derive(Args, Clone)]
pub struct SecureArgs {
    /// Most secure memory the secure world may hold (e.g. 512M, 4G, or auto = 3/4 of available memory).
    #[arg(long, default_value = "auto", value_parser = MemoryBudget::parse)]
    pub secure_memory_limit: MemoryBudget,
    /// flexible (Flex-Mem: granted and recalled granule by granule) or carve-out (the whole limit
    /// reserved and populated at start, never returned).
    #[arg(long, default_value = "flexible", value_parser = parse_pool)]
    pub secure_pool: PoolChoice,
    /// Granule size in bytes (a multiple of 4096; 0 = the secure world's default, 256 KiB).
    #[arg(long, default_value_t = 0)]
    pub granule_size: usize,
    /// Protect secure memory by locking it instead of memfd_secret (for comparisons).
    #[arg(long)]
    pub locked_memory: bool,
    /// Memory pressure: when the system's available memory is below this (e.g. 1G), recall secure
    /// memory to restore it: free granules at once, even mid-generation; model layers between
    /// chat turns (0 = never).
    #[arg(long, default_value = "0", value_parser = parse_bytes)]
    pub memory_floor: u64,
}

pub fn parse_bytes(s: &str) -> Result<u64, String> {
    match MemoryBudget::parse(s)? {
        MemoryBudget::Bytes(b) => Ok(b),
        MemoryBudget::Auto => Err("expected a size such as 1G".into()),
    }
}

/// Says what the pressure watch (or `flexserve recall`) took back since the
/// last report; returns how many granules that was.
pub(crate) fn report_recalls(world: &mut SecureWorld) -> u64 {
    let mut released = 0;
    for r in world.take_recalls() {
        released += u64::from(r.released);
        eprintln!(
            "{}: recalled {} of {} granules{} in {:.1} ms",
            if r.by_client { "flexserve recall" } else { "memory pressure" },
            r.released,
            r.requested,
            if r.during_generation { " while generating (free granules only)" } else { "" },
            r.took.as_secs_f64() * 1e3
        );
    }
    released
}

/// The governor's pressure check while the secure world is idle.
fn relieve_pressure(world: &mut SecureWorld, secure: &SecureArgs) -> Result<()> {
    report_recalls(world);
    if secure.memory_floor > 0 {
        if let Some((released, evicted, took)) = world.relieve_pressure(secure.memory_floor)? {
            eprintln!(
                "memory pressure: recalled {released} granules ({evicted} held model layers or KV caches) in {:.1} ms",
                took.as_secs_f64() * 1e3
            );
        }
    }
    Ok(())
}

fn parse_pool(s: &str) -> Result<PoolChoice, String> {
    match s {
        "flexible" => Ok(PoolChoice::Flexible),
        "carve-out" | "static-carve-out" => Ok(PoolChoice::StaticCarveOut),
        _ => Err(format!("{s:?}: expected flexible or carve-out")),
    }
}

/// Whether this process runs a development secure world (`--dev`) instead
/// of connecting to the service; set once at start.
static DEVELOPMENT: OnceLock<bool> = OnceLock::new();

pub fn set_development(on: bool) {
    let _ = DEVELOPMENT.set(on);
}

pub(crate) fn development() -> bool {
    DEVELOPMENT.get().copied().unwrap_or(false)
}

/// Said on every run in development mode, and by `status`.
pub const DEVELOPMENT_WARNING: &str = "WARNING: development mode: the secure world runs as your own user and \
protects nothing (its keys, memory and policy are yours to read and change). Use the secure world service \
(flexserve-launcher, docs/secure-world.md) for real models and data.";

/// Reaches the secure world: the service, or in development mode a secure
/// world of this user's own; then hands it the stored keys.
pub fn connect(keys: &KeyArgs, secure: &SecureArgs, threads: usize) -> Result<SecureWorld> {
    let mut world = if development() {
        eprintln!("{DEVELOPMENT_WARNING}");
        spawn(keys, secure, threads)?
    } else {
        refuse_development_options(keys, secure)?;
        let socket = flexserve_normal::service_socket();
        SecureWorld::connect(&socket, secure.secure_memory_limit)
            .with_context(|| format!("connecting to the secure world at {}", socket.display()))?
    };
    for (path, stored) in stored_keys()? {
        if let Err(e) = world.add_stored_key(stored) {
            eprintln!("warning: stored key {} is not usable here: {e}", path.display());
        }
    }
    Ok(world)
}

/// What only a development secure world takes from the normal world.
fn refuse_development_options(keys: &KeyArgs, secure: &SecureArgs) -> Result<()> {
    let refuse = |what: &str, why: &str| {
        Err(anyhow::anyhow!("{what}: {why} (or run an unprotected development secure world with --dev)"))
    };
    if keys.key.is_some() {
        return refuse(
            "--key",
            "the secure world service takes no key files from the normal world; import the key once with \
             `flexserve key import --key FILE --remove`",
        );
    }
    if keys.vendor_pubkey.is_some() {
        return refuse(
            "--vendor-pubkey",
            "the vendor key a model must be signed by is the secure world's policy (vendor_key in its policy.conf)",
        );
    }
    if secure.locked_memory {
        return refuse("--locked-memory", "the protection of secure memory is the secure world's policy");
    }
    if secure.secure_pool == PoolChoice::StaticCarveOut || secure.granule_size != 0 {
        return refuse("--secure-pool/--granule-size", "the secure world service's pool is set by its policy");
    }
    Ok(())
}

/// Where imported keys are kept (sealed under the device key): `$FLEXSERVE_HOME/keys`.
fn stored_keys_dir() -> Result<PathBuf> {
    Ok(flexserve_normal::flexserve_home()?.join("keys"))
}

/// Every stored key (`*.stored` in the keys directory), as hex.
fn stored_keys() -> Result<Vec<(PathBuf, String)>> {
    let dir = stored_keys_dir()?;
    let entries = match std::fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut keys = Vec::new();
    for entry in entries {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        if path.extension().is_some_and(|e| e == "stored") {
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            keys.push((path, text.trim().to_string()));
        }
    }
    keys.sort();
    Ok(keys)
}

/// `flexserve device-key`: the public half of the key the secure world holds.
pub fn device_key() -> Result<()> {
    let mut world = connect(&KeyArgs { key: None, vendor_pubkey: None }, &SecureArgs::plain(), 1)?;
    println!("{}", world.device_public_key()?);
    Ok(())
}

/// `flexserve identity`: the report, its signature checked against the key
/// it names, and that key compared with the pinned one (or `expect`).
pub fn identity(json: bool, expect: Option<String>) -> Result<()> {
    let mut world = connect(&KeyArgs { key: None, vendor_pubkey: None }, &SecureArgs::plain(), 1)?;
    let (report, signature) = world.identity()?;
    let pin_path = flexserve_normal::flexserve_home()?.join("secure-world.pin");
    let checked = flexserve_client::check_identity(&report, &signature, expect.as_deref(), &pin_path)?;
    if json {
        let parsed: serde_json::Value = serde_json::from_str(&report)?;
        println!(
            "{}",
            serde_json::json!({"report": parsed, "report_text": report, "signature": signature, "verified": true, "pinned": checked.pin_note})
        );
    } else {
        let r: serde_json::Value = serde_json::from_str(&report)?;
        println!("secure world identity {} ({})", checked.key, checked.pin_note);
        for field in [
            "deployment",
            "vouched_for_by",
            "uid",
            "protection",
            "executable_sha256",
            "device_key",
            "identity_x25519",
            "protocol_version",
            "boot_id",
            "counter",
            "timestamp",
        ] {
            println!("  {field}: {}", r[field].as_str().map_or_else(|| r[field].to_string(), str::to_string));
        }
        for line in r["policy"].as_array().into_iter().flatten() {
            println!("  policy: {}", line.as_str().unwrap_or_default());
        }
        for line in r["warnings"].as_array().into_iter().flatten() {
            println!("  warning: {}", line.as_str().unwrap_or_default());
        }
        println!("  signature: {signature} (verified)");
    }
    Ok(())
}

/// `flexserve key import`: the secure world seals the key under its device
/// key; only that sealed form is written (mode 0600, atomically).
pub fn import_key(key_file: &Path, name: Option<String>, remove: bool) -> Result<()> {
    let name = match name {
        Some(n) => n,
        None => key_file.file_stem().map(|s| s.to_string_lossy().into_owned()).context("the key file has no name")?,
    };
    if name.is_empty() || name.contains(['/', '\0']) || name.starts_with('.') {
        bail!("--name {name:?}: a plain file name is needed");
    }
    // Read and checked here so that a wrong file fails before the secure world is asked.
    let key = flexserve_sealed::ModelKey::load(key_file)?;
    drop(key);
    let hex = zeroize::Zeroizing::new(
        std::fs::read_to_string(key_file).with_context(|| format!("reading {}", key_file.display()))?,
    );
    let mut world = connect(&KeyArgs { key: None, vendor_pubkey: None }, &SecureArgs::plain(), 1)?;
    let stored = world.import_key(hex.trim().to_string())?;
    let dir = stored_keys_dir()?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(format!("{name}.stored"));
    write_private(&path, format!("{stored}\n").as_bytes())?;
    eprintln!(
        "the secure world holds the key; its sealed form is in {} (useless to anyone but this device's secure world)",
        path.display()
    );
    if remove {
        std::fs::remove_file(key_file).with_context(|| format!("removing {}", key_file.display()))?;
        eprintln!("removed {}", key_file.display());
    } else {
        eprintln!("you may now delete {} (or pass --remove)", key_file.display());
    }
    Ok(())
}

/// Writes a file readable by its owner alone: to a temporary name, synced, then renamed.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    flexserve_client::write_private(path, bytes).with_context(|| format!("writing {}", path.display()))
}

impl SecureArgs {
    /// The defaults, for commands that only ask the secure world something.
    fn plain() -> SecureArgs {
        SecureArgs {
            secure_memory_limit: MemoryBudget::Auto,
            secure_pool: PoolChoice::Flexible,
            granule_size: 0,
            locked_memory: false,
            memory_floor: 0,
        }
    }
}

/// Starts a development secure world holding the keys named by `keys`.
pub fn spawn(keys: &KeyArgs, secure: &SecureArgs, threads: usize) -> Result<SecureWorld> {
    let vendor_pubkey = match &keys.vendor_pubkey {
        Some(v) if Path::new(v).is_file() => Some(flexserve_sealed::VendorPublicKey::load(v)?.to_hex()),
        Some(v) => Some(flexserve_sealed::VendorPublicKey::from_hex(v)?.to_hex()),
        None => None,
    };
    let opts = SecureWorldOptions {
        model_keys: keys.key.iter().cloned().collect(),
        vendor_pubkey,
        threads,
        budget: secure.secure_memory_limit,
        pool: secure.secure_pool,
        granule_size: secure.granule_size,
        force_locked_memory: secure.locked_memory,
        ..SecureWorldOptions::default()
    };
    SecureWorld::spawn(&opts).context("starting the secure world")
}

/// Lets `flexserve recall` reach this process's memory governor.
pub(crate) fn listen_for_recalls(world: &mut SecureWorld) {
    let dir = flexserve_normal::control::runtime_dir();
    if let Err(e) = world.listen(&dir) {
        eprintln!("warning: `flexserve recall` cannot reach this session (control socket in {}: {e})", dir.display());
    }
}

/// Starts a secure world and makes the sealed model at `path` resident in it.
pub fn open(path: &Path, keys: &KeyArgs, secure: &SecureArgs, threads: usize) -> Result<(SecureWorld, OpenedModel)> {
    let t0 = Instant::now();
    // The header is public: say what key is missing before starting anything.
    let prefix = std::fs::File::open(path)
        .map_err(anyhow::Error::from)
        .and_then(|f| Ok(flexserve_sealed::SealedHeader::read_prefix(std::io::BufReader::new(f))?))
        .with_context(|| format!("sealed model {}", path.display()))?;
    let header =
        flexserve_sealed::SealedHeader::read(&prefix).with_context(|| format!("sealed model {}", path.display()))?;
    if header.wrapped_to_device().is_none() && keys.key.is_none() && stored_keys()?.is_empty() {
        anyhow::bail!(
            "{} is sealed with a model key, and the secure world holds none: import it once with \
             `flexserve key import --key KEYFILE` (or seal the model to this device with `seal --to`)",
            path.display()
        );
    }
    let mut world = connect(keys, secure, threads)?;
    if secure.memory_floor > 0 {
        world.set_memory_floor(Some(secure.memory_floor));
    }
    let started = t0.elapsed();
    // The weights load with the first request, through the pipeline: each
    // layer computes as soon as it is verified while the later ones load.
    let (model, load) =
        world.open_model_header(path).with_context(|| format!("opening {} in the secure world", path.display()))?;
    let info = world.info().clone();
    eprintln!(
        "opened {} in the secure world (pid {}, {}, {} pool) in {:.0} ms: start {:.0} ms, header {:.0} ms; \
         its {} chunks load with the first request",
        path.display(),
        info.pid,
        info.protection,
        info.pool_mode,
        t0.elapsed().as_secs_f64() * 1e3,
        started.as_secs_f64() * 1e3,
        load.open.as_secs_f64() * 1e3,
        model.chunks,
    );
    Ok((world, model))
}

pub fn sampling(s: &SamplingArgs) -> Sampling {
    Sampling {
        temperature: s.temperature,
        top_k: s.top_k as u32,
        top_p: s.top_p,
        min_p: s.min_p,
        repeat_penalty: s.repeat_penalty,
        seed: s.seed,
        ..sampling_defaults()
    }
}

pub fn greedy() -> Sampling {
    Sampling { temperature: 0.0, ..sampling_defaults() }
}

fn sampling_defaults() -> Sampling {
    let d = flexserve_engine::SamplingParams::default();
    Sampling {
        temperature: d.temperature,
        top_k: d.top_k as u32,
        top_p: d.top_p,
        min_p: d.min_p,
        repeat_penalty: d.repeat_penalty,
        repeat_last_n: d.repeat_last_n as u32,
        seed: d.seed,
    }
}

pub fn report(r: &GenerationReport) {
    let prefill = r.prefill_micros as f64 / 1e6;
    let decode = r.decode_micros as f64 / 1e6;
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.1} tok/s){} | decode: {} tokens, {:.1} tok/s | stop: {:?} (secure world)",
        r.prompt_tokens,
        prefill * 1e3,
        r.prompt_tokens as f64 / prefill.max(1e-9),
        if r.cached_tokens > 0 { format!(", {} cached", r.cached_tokens) } else { String::new() },
        r.generated_tokens,
        r.generated_tokens.saturating_sub(1) as f64 / decode.max(1e-9),
        r.stop
    );
}

/// A generation request with the command line's settings.
fn request(
    model: &OpenedModel,
    conversation: u32,
    input: Input,
    run: &crate::RunArgs,
    s: &SamplingArgs,
) -> GenerateRequest {
    GenerateRequest {
        model: model.id,
        conversation,
        input,
        max_tokens: run.max_tokens as u32,
        n_ctx: run.ctx as u32,
        sampling: sampling(s),
        stop: s.stop.clone(),
    }
}

/// Runs a request, printing the text as it streams.
fn stream(
    world: &mut SecureWorld,
    model: &OpenedModel,
    request: GenerateRequest,
    out: &mut impl Write,
) -> Result<GenerationReport> {
    Ok(world.generate(model, request, |t| {
        let _ = out.write_all(t.as_bytes());
        let _ = out.flush();
    })?)
}

/// `generate` on a sealed model.
pub fn generate(path: &Path, prompt: String, run: &crate::RunArgs, sampling_args: &SamplingArgs) -> Result<()> {
    let (mut world, model) = open(path, &run.keys, &run.secure, run.threads)?;
    listen_for_recalls(&mut world);
    let mut out = std::io::stdout().lock();
    let r = stream(&mut world, &model, request(&model, 0, Input::Raw { text: prompt }, run, sampling_args), &mut out)?;
    if std::io::IsTerminal::is_terminal(&std::io::stdout()) {
        writeln!(out)?;
    }
    report(&r);
    world.serve_control()?;
    report_recalls(&mut world);
    world.shutdown()?;
    Ok(())
}

/// `chat` on a sealed model: the conversation (messages, KV cache) stays in
/// the secure world. Lines `/status` and `/recall N` talk to the secure world
/// instead of the model.
pub fn chat(
    path: &Path,
    prompt: Option<String>,
    system: Option<String>,
    run: &crate::RunArgs,
    sampling_args: &SamplingArgs,
) -> Result<()> {
    let (mut world, model) = open(path, &run.keys, &run.secure, run.threads)?;
    const CONVERSATION: u32 = 1;
    let mut system = system;
    let mut turn = |world: &mut SecureWorld, user: String| -> Result<()> {
        let input = Input::ChatTurn { system: system.take(), user };
        let mut out = std::io::stdout().lock();
        let r = stream(world, &model, request(&model, CONVERSATION, input, run, sampling_args), &mut out)?;
        writeln!(out)?;
        report(&r);
        Ok(())
    };
    if let Some(p) = prompt {
        turn(&mut world, p)?;
        world.shutdown()?;
        return Ok(());
    }
    listen_for_recalls(&mut world);
    let interactive = crate::plain::is_terminal_stdin();
    let turns = turn_reader();
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        // While the user types, the governor serves `flexserve recall` in full.
        let line = loop {
            match turns.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(line) => break line?,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if world.serve_control()? > 0 {
                        report_recalls(&mut world);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
            }
        };
        let Some(line) = line else { break };
        if line == "/status" {
            print_status(&world.status()?, world.pid());
            continue;
        }
        if let Some(n) = line.strip_prefix("/recall ") {
            let n: u32 = n.trim().parse().with_context(|| format!("/recall {n}: expected a number of granules"))?;
            let (released, evicted, took) = world.recall(n)?;
            eprintln!(
                "recalled {released} granules ({evicted} held model layers or KV caches) in {:.1} ms",
                took.as_secs_f64() * 1e3
            );
            continue;
        }
        turn(&mut world, line)?;
        // Between turns the model is idle: the time to give memory back under
        // pressure (evicted layers reload at the next turn).
        relieve_pressure(&mut world, &run.secure)?;
    }
    world.shutdown()?;
    Ok(())
}

/// Reads user turns on a thread, so that the main thread can serve the
/// governor's requests while it waits for one.
fn turn_reader() -> std::sync::mpsc::Receiver<Result<Option<String>>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        let line = crate::plain::read_turn(false);
        let last = !matches!(line, Ok(Some(_)));
        if tx.send(line).is_err() || last {
            return;
        }
    });
    rx
}

/// `recall`: asks running sessions' governors to take secure memory back.
pub fn recall(amount: flexserve_normal::control::RecallAmount, pid: Option<u32>, timeout_s: u64) -> Result<()> {
    use flexserve_normal::control;
    let dir = control::runtime_dir();
    let sockets = match control::list_sockets(&dir) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let sockets: Vec<_> = sockets.into_iter().filter(|(p, _)| pid.is_none_or(|want| *p == want)).collect();
    if sockets.is_empty() {
        match pid {
            Some(p) => anyhow::bail!("no FlexServe session of pid {p} is listening in {}", dir.display()),
            None => anyhow::bail!("no FlexServe session with a secure world is running (looked in {})", dir.display()),
        }
    }
    let mut failures = 0;
    for (pid, socket) in sockets {
        match control::request_recall(&socket, amount, std::time::Duration::from_secs(timeout_s)) {
            Ok(a) => println!(
                "session {pid} (secure world {}): released {} granules ({:.1} MiB), {} of them held model layers \
                 or KV caches, in {:.1} ms",
                a.secure_pid,
                a.released,
                a.released as f64 * a.granule_size as f64 / (1 << 20) as f64,
                a.evicted,
                a.micros as f64 / 1e3
            ),
            Err(e) => {
                failures += 1;
                eprintln!("session {pid}: {e}");
            }
        }
    }
    if failures > 0 {
        anyhow::bail!("{failures} session(s) did not answer");
    }
    Ok(())
}

/// `status`: starts a secure world (loading a model if given) and shows its state.
pub fn status(model: Option<PathBuf>, keys: &KeyArgs, secure: &SecureArgs, json: bool) -> Result<()> {
    let (mut world, _model) = match &model {
        Some(path) => {
            let (w, m) = open(path, keys, secure, 0)?;
            (w, Some(m))
        }
        None => (connect(keys, secure, 0)?, None),
    };
    let s = world.status()?;
    let pid = world.pid();
    if json {
        println!("{}", status_json(&s, pid, world.budget_granules()));
    } else {
        print_status(&s, pid);
    }
    world.shutdown()?;
    Ok(())
}

fn print_status(s: &StatusReport, pid: u32) {
    let mib = |granules: u32| granules as f64 * s.granule_size as f64 / (1 << 20) as f64;
    println!("secure world pid {pid}, uid {}", s.secure_uid);
    println!("  deployment: {}", s.deployment.describe());
    println!("  protection: {}", s.protection);
    println!("  ptrace_scope: {}, kernel lockdown: {}", s.ptrace_scope, s.lockdown);
    println!("  policy: {}", s.policy.join("; "));
    for w in &s.warnings {
        println!("  warning: {w}");
    }
    println!("  pool: {} ({} KiB granules)", s.pool_mode, s.granule_size >> 10);
    // The reserve: granules prepared (protected, zeroed) that nothing uses:
    // a request takes them at once; a recall takes them back first.
    let reserve = s.free_granules();
    println!(
        "  granules: {} granted ({:.1} MiB), {} prepared, {} in use ({:.1} MiB); reserve {} ({:.1} MiB)",
        s.granted,
        mib(s.granted),
        s.prepared,
        s.in_use,
        mib(s.in_use),
        reserve,
        mib(reserve)
    );
    let heap_mib = |b: u64| b as f64 / (1 << 20) as f64;
    println!(
        "  secure heap: {:.1} MiB reserved, {:.1} MiB allocated, at most {:.1} MiB during the last request",
        heap_mib(s.heap_bytes),
        heap_mib(s.heap_allocated),
        heap_mib(s.heap_peak)
    );
    if s.models.is_empty() {
        println!("  models: none");
    }
    for m in &s.models {
        println!(
            "  model {} {}: {}/{} layers, {}/{} chunks resident, {:.1} MiB of weights, KV caches in {} granules \
             ({:.1} MiB)",
            m.model,
            m.name,
            m.resident_layers,
            m.layers,
            m.resident_chunks,
            m.chunks,
            m.weight_bytes as f64 / (1 << 20) as f64,
            m.kv_granules,
            mib(m.kv_granules)
        );
    }
}

fn status_json(s: &StatusReport, pid: u32, budget_granules: u64) -> String {
    let models: Vec<serde_json::Value> = s
        .models
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.model, "name": m.name, "layers": m.layers, "resident_layers": m.resident_layers,
                "chunks": m.chunks, "resident_chunks": m.resident_chunks, "weight_bytes": m.weight_bytes,
                "kv_granules": m.kv_granules,
            })
        })
        .collect();
    serde_json::json!({
        "pid": pid, "deployment": match s.deployment { Deployment::Service => "service", Deployment::Development => "development" },
        "unprotected": s.deployment == Deployment::Development, "secure_uid": s.secure_uid,
        "ptrace_scope": s.ptrace_scope, "lockdown": s.lockdown, "policy": s.policy, "warnings": s.warnings,
        "protection": s.protection, "pool_mode": s.pool_mode, "granule_size": s.granule_size,
        "granted": s.granted, "prepared": s.prepared, "in_use": s.in_use,
        "reserve": s.free_granules(), "budget_granules": budget_granules,
        "heap_bytes": s.heap_bytes, "heap_allocated": s.heap_allocated, "heap_peak": s.heap_peak, "models": models,
    })
    .to_string()
}

/// `perplexity` on a sealed model: scored in the secure world, only the figure comes out.
pub fn perplexity(
    path: &Path,
    text: String,
    ctx: usize,
    threads: usize,
    keys: &KeyArgs,
    secure: &SecureArgs,
) -> Result<()> {
    let (mut world, model) = open(path, keys, secure, threads)?;
    let t0 = Instant::now();
    let (tokens, chunks, ppl, err) = world.perplexity(&model, text, ctx as u32)?;
    eprintln!(
        "perplexity: {tokens} tokens, {chunks} chunks of {ctx}, {:.1} s (secure world)",
        t0.elapsed().as_secs_f64()
    );
    println!("Final estimate: PPL = {ppl:.4} +/- {err:.5}");
    println!("PPL = {ppl:.4}");
    world.shutdown()?;
    Ok(())
}
