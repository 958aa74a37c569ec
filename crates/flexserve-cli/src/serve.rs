//! `flexserve serve`: the models and settings (command line over config
//! file over defaults), how to reach the secure world, then the daemon.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Deserialize;

use crate::plain::is_sealed;
use crate::{secure, KeyArgs};

#[derive(Args)]
pub struct ServeArgs {
    /// A TOML config file (models and settings); options given here override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Address to listen on (a non-loopback one needs --api-key or --insecure-no-auth) [default: 127.0.0.1].
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port (0: any free port; the address is printed on stdout) [default: 8080].
    #[arg(long)]
    port: Option<u16>,
    /// A model to serve, as NAME=PATH (a GGUF or a sealed .fsm); repeatable.
    #[arg(long = "model", value_parser = parse_named_model)]
    models: Vec<(String, PathBuf)>,
    /// Serve every .gguf and .fsm file in this folder, named after the file without its extension.
    #[arg(long)]
    models_dir: Option<PathBuf>,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health.
    #[arg(long, env = "FLEXSERVE_API_KEY", hide_env_values = true, conflicts_with = "api_key_file")]
    api_key: Option<String>,
    /// Read the API key from this file (keeps it out of the process list).
    #[arg(long)]
    api_key_file: Option<PathBuf>,
    /// Allow a non-loopback address without an API key.
    #[arg(long)]
    insecure_no_auth: bool,
    /// How long an idle model stays loaded (e.g. 300, 5m, 1h; 0 unloads after each request, -1 never) [default: 5m].
    #[arg(long, allow_hyphen_values = true)]
    keep_alive: Option<String>,
    /// Load every model at start (/health answers 503 until they are loaded).
    #[arg(long)]
    preload: bool,
    /// Engine threads of a plain model (0 = one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Requests a model decodes together, one batched step at a time (continuous batching; a
    /// sealed model's batch runs inside the secure world) [default: 4].
    #[arg(long)]
    parallel: Option<usize>,
    /// Requests that may wait per model beyond those being served (then 503) [default: 64].
    #[arg(long)]
    max_queue: Option<usize>,
    /// Context of every request (0 = the model's own).
    #[arg(long)]
    ctx: Option<u32>,
    /// Secure memory kept prepared ahead of need (e.g. 256M): granted at start, topped up while the
    /// daemon is idle, and what unloaded sealed models used is kept (scrubbed) for the next instead
    /// of released; `flexserve recall` takes it back. Needs the secure world service (a development
    /// secure world, --dev, shares no memory between sessions).
    #[arg(long, value_parser = secure::parse_bytes)]
    secure_reserve: Option<u64>,
    /// How the cores are shared between the worlds (Flex-NPU): `lease` (default) gives every core
    /// to one world at a time, a sealed generation pausing at its next layer or token (its workers' scratch
    /// scrubbed) while plain work waits; `split` gives each world half the cores for good.
    #[arg(long, value_parser = flexserve_server::lease::CoreSharing::parse)]
    cores: Option<flexserve_server::lease::CoreSharing>,
    /// A workflow to serve at POST /v1/workflows/run (repeatable; docs/workflows.md). Its models
    /// run on the served models with the same files, or are served as WORKFLOW.MODEL.
    #[arg(long = "workflow")]
    workflows: Vec<PathBuf>,
    /// Load a workflow step's model only when the step starts, not while the step before it runs
    /// (for comparison; as `flexserve workflow run --no-prefetch`).
    #[arg(long)]
    no_prefetch: bool,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    secure: secure::SecureArgs,
}

/// `NAME=PATH`, as `--model` takes it (also a workflow's model override).
pub(crate) fn parse_named_model(s: &str) -> std::result::Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, path)) if !name.is_empty() && !path.is_empty() => Ok((name.to_string(), PathBuf::from(path))),
        _ => Err(format!("{s:?}: expected NAME=PATH")),
    }
}

/// `keep_alive` in the config file: seconds or a duration string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum KeepAliveSetting {
    Seconds(i64),
    Text(String),
}

/// The config file (`--config`). Relative paths are relative to the file.
///
/// ```toml
/// host = "127.0.0.1"
/// port = 8080
/// keep_alive = "10m"
/// parallel = 4
/// api_key_file = "api.key"
///
/// [models]
/// smol = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
/// smol-sealed = "models/SmolLM2-135M-Instruct.Q4_1.fsm"
/// ```
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    host: Option<IpAddr>,
    port: Option<u16>,
    #[serde(default)]
    models: BTreeMap<String, PathBuf>,
    models_dir: Option<PathBuf>,
    api_key_file: Option<PathBuf>,
    insecure_no_auth: Option<bool>,
    keep_alive: Option<KeepAliveSetting>,
    preload: Option<bool>,
    threads: Option<usize>,
    parallel: Option<usize>,
    max_queue: Option<usize>,
    ctx: Option<u32>,
    /// e.g. "256M".
    secure_reserve: Option<String>,
    /// "lease" or "split".
    cores: Option<String>,
    /// Workflow files.
    #[serde(default)]
    workflows: Vec<PathBuf>,
    /// false: as --no-prefetch.
    prefetch: Option<bool>,
}

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

impl ConfigFile {
    fn read(path: &Path) -> Result<ConfigFile> {
        let len = std::fs::metadata(path).with_context(|| format!("reading {}", path.display()))?.len();
        if len > MAX_CONFIG_BYTES {
            bail!("{}: {len} bytes, larger than a config file can be ({MAX_CONFIG_BYTES})", path.display());
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let mut config: ConfigFile =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        config.models.values_mut().for_each(resolve);
        config.models_dir.as_mut().map(resolve);
        config.api_key_file.as_mut().map(resolve);
        config.workflows.iter_mut().for_each(resolve);
        Ok(config)
    }
}

/// Every `.gguf` and `.fsm` file in `dir`, named after the file.
fn models_in(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry.with_context(|| format!("reading {}", dir.display()))?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        if matches!(ext, "gguf" | "fsm") {
            let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            found.push((name, path));
        }
    }
    found.sort();
    Ok(found)
}

/// The workflows to serve, each of its models on the served model with the
/// same file, or added to `models` as WORKFLOW.MODEL.
fn served_workflows<'a>(
    files: impl Iterator<Item = &'a PathBuf>,
    models: &mut Vec<(String, PathBuf, flexserve_server::Kind)>,
) -> Result<flexserve_server::workflows::Workflows> {
    let mut served = flexserve_server::workflows::Workflows::new();
    for file in files {
        let workflow = flexserve_workflow::Workflow::from_file(file)?;
        if served.contains_key(&workflow.name) {
            bail!("workflow name {:?} is given twice ({})", workflow.name, file.display());
        }
        let mut names = Vec::new();
        for spec in &workflow.models {
            let same_file = |p: &PathBuf| match (p.canonicalize(), spec.path.canonicalize()) {
                (Ok(a), Ok(b)) => a == b,
                _ => false,
            };
            let name = match models.iter().find(|(_, p, _)| same_file(p)) {
                Some((name, _, _)) => name.clone(),
                None => {
                    let name = format!("{}.{}", workflow.name, spec.name);
                    if models.iter().any(|(n, _, _)| *n == name) {
                        bail!("model name {name:?} (workflow {}) is given twice", workflow.name);
                    }
                    let sealed = is_sealed(&spec.path)
                        .with_context(|| format!("workflow {} model {}", workflow.name, spec.name))?;
                    let kind = if sealed { flexserve_server::Kind::Sealed } else { flexserve_server::Kind::Plain };
                    models.push((name.clone(), spec.path.clone(), kind));
                    name
                }
            };
            names.push(name);
        }
        served
            .insert(workflow.name.clone(), Arc::new(flexserve_server::workflows::ServedWorkflow::new(workflow, names)));
    }
    Ok(served)
}

pub fn run(args: ServeArgs) -> Result<()> {
    let file = match &args.config {
        Some(path) => ConfigFile::read(path)?,
        None => ConfigFile::default(),
    };
    // Models: the config file's, then its folder's, then the command line's.
    let mut named: Vec<(String, PathBuf)> = file.models.clone().into_iter().collect();
    for dir in [file.models_dir.as_ref(), args.models_dir.as_ref()].into_iter().flatten() {
        named.extend(models_in(dir)?);
    }
    named.extend(args.models.iter().cloned());
    let mut models = Vec::new();
    for (name, path) in named {
        if models.iter().any(|(n, _, _): &(String, PathBuf, flexserve_server::Kind)| *n == name) {
            bail!("model name {name:?} is given twice");
        }
        let kind = if is_sealed(&path)? { flexserve_server::Kind::Sealed } else { flexserve_server::Kind::Plain };
        models.push((name, path, kind));
    }
    let workflows = served_workflows(file.workflows.iter().chain(&args.workflows), &mut models)?;
    let api_key = match (&args.api_key, args.api_key_file.as_ref().or(file.api_key_file.as_ref())) {
        (Some(k), _) => Some(k.clone()),
        (None, Some(f)) => {
            let key = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
            Some(key.trim().to_string())
        }
        (None, None) => None,
    };
    if api_key.as_deref() == Some("") {
        bail!("the API key is empty");
    }
    let keep_alive_text = match (&args.keep_alive, &file.keep_alive) {
        (Some(k), _) => k.clone(),
        (None, Some(KeepAliveSetting::Seconds(s))) => s.to_string(),
        (None, Some(KeepAliveSetting::Text(t))) => t.clone(),
        (None, None) => flexserve_server::DEFAULT_KEEP_ALIVE.to_string(),
    };
    let keep_alive = match flexserve_server::api::parse_duration(&keep_alive_text) {
        Some(s) if s < 0.0 => None,
        Some(s) => Some(std::time::Duration::from_secs_f64(s)),
        None => bail!("keep-alive {keep_alive_text:?}: expected e.g. 300, 5m, 1h, 0 or -1"),
    };
    let threads = args.threads.or(file.threads).unwrap_or(0);
    let secure_reserve = match (args.secure_reserve, &file.secure_reserve) {
        (Some(b), _) => b,
        (None, Some(text)) => secure::parse_bytes(text).map_err(|e| anyhow::anyhow!("secure_reserve: {e}"))?,
        (None, None) => 0,
    };
    let cores = match (args.cores, &file.cores) {
        (Some(c), _) => c,
        (None, Some(text)) => flexserve_server::lease::CoreSharing::parse(text).map_err(|e| anyhow::anyhow!(e))?,
        (None, None) => flexserve_server::lease::CoreSharing::default(),
    };
    let (secure_threads, plain_threads) = cores.threads(threads);
    let (keys, secure_args) = (args.keys.clone(), args.secure.clone());
    let connect: flexserve_server::SessionFactory =
        Arc::new(move || secure::connect(&keys, &secure_args, secure_threads).map_err(|e| format!("{e:#}")));
    flexserve_server::run(flexserve_server::ServeConfig {
        host: args.host.or(file.host).unwrap_or(flexserve_server::DEFAULT_HOST),
        port: args.port.or(file.port).unwrap_or(flexserve_server::DEFAULT_PORT),
        models,
        api_key,
        insecure_no_auth: args.insecure_no_auth || file.insecure_no_auth.unwrap_or(false),
        keep_alive,
        preload: args.preload || file.preload.unwrap_or(false),
        threads: plain_threads,
        parallel: args.parallel.or(file.parallel).unwrap_or(flexserve_server::DEFAULT_PARALLEL),
        max_queue: args.max_queue.or(file.max_queue).unwrap_or(flexserve_server::DEFAULT_MAX_QUEUE),
        ctx: args.ctx.or(file.ctx).unwrap_or(0),
        secure_reserve,
        cores,
        workflows,
        workflow_prefetch: !args.no_prefetch && file.prefetch.unwrap_or(true),
        connect,
    })
    .map_err(|e| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_resolve_paths_and_refuse_unknown_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serve.toml");
        std::fs::write(&path, "port = 0\nkeep_alive = 30\n[models]\nsmol = \"m.gguf\"\nabs = \"/x/y.fsm\"\n").unwrap();
        let c = ConfigFile::read(&path).unwrap();
        assert_eq!(c.port, Some(0));
        assert_eq!(c.models["smol"], dir.path().join("m.gguf"));
        assert_eq!(c.models["abs"], PathBuf::from("/x/y.fsm"));
        assert!(matches!(c.keep_alive, Some(KeepAliveSetting::Seconds(30))));
        std::fs::write(&path, "prot = 1\n").unwrap();
        let e = format!("{:#}", ConfigFile::read(&path).unwrap_err());
        assert!(e.contains("serve.toml") && e.contains("prot"), "{e}");
    }
}
