//! No plaintext outside the secure world: while a sealed model generates
//! through `flexserve generate`, the memory of that normal-world process holds
//! neither plaintext tensor data nor the prompt's token ids.
//!
//! The scan reads every readable mapping of the CLI process (not of this test
//! process) through /proc/PID/mem while the process is stopped. A positive
//! control runs the same scan against `flexserve generate` on the plain model,
//! whose memory must hold both (its mmap of the GGUF file and its own token
//! ids), so the sealed run cannot pass because the scanner sees nothing.

mod common;
#[path = "common/memscan.rs"]
mod memscan;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use memscan::{is_root, scan_process, signal, wait_stopped, Matcher, Needle, Scan};

use flexserve_gguf::GgufFile;
use flexserve_tokenizer::Tokenizer;

/// A long, varied prompt (well over 30 tokens) that invites a long continuation.
const PROMPT: &str = "The following is a detailed travel diary kept by a botanist who walked from Lisbon to Krakow \
in the spring of 1891, describing rivers, markets, weather, meals and the wild orchids she pressed along the way. \
Day one: we left the harbour at dawn and";
const TENSOR_NEEDLES: usize = 64;
const NEEDLE_LEN: usize = 32;
/// Shortest run of consecutive prompt token ids searched for.
const ID_RUN: usize = 8;

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// Needle kinds.
const TENSOR: &str = "tensor";
const IDS_U32: &str = "ids u32";
const IDS_U64: &str = "ids u64";

/// Windows with few distinct bytes (zeros, padding, repeated values) could
/// occur anywhere by chance; real quantized or float data has many.
fn high_entropy(window: &[u8]) -> bool {
    let mut seen = [false; 256];
    window.iter().for_each(|&b| seen[b as usize] = true);
    seen.iter().filter(|&&s| s).count() >= 12
}

/// Tensors sampled: every type in the model (F32 norms, the Q8_0 embedding,
/// Q4_1 matrices) from layers spread over the whole depth.
const SAMPLED_TENSORS: [&str; 10] = [
    "blk.15.attn_norm.weight",
    "output_norm.weight",
    "token_embd.weight",
    "blk.0.attn_q.weight",
    "blk.0.ffn_down.weight",
    "blk.7.attn_k.weight",
    "blk.12.ffn_gate.weight",
    "blk.18.attn_v.weight",
    "blk.24.attn_output.weight",
    "blk.29.ffn_up.weight",
];

/// `TENSOR_NEEDLES` windows of `NEEDLE_LEN` bytes from [`SAMPLED_TENSORS`],
/// at deterministic pseudo-random offsets. A tensor with too few
/// high-entropy windows (a norm close to all ones) leaves its share to the next.
fn tensor_needles(gguf: &GgufFile) -> Vec<Needle> {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut needles = Vec::new();
    let mut shares = Vec::new();
    for (i, name) in SAMPLED_TENSORS.iter().enumerate() {
        let tensor = gguf.header.tensor(name).unwrap_or_else(|| panic!("the model has no tensor {name}"));
        let data = gguf.tensor_data(name).expect("tensor data in range");
        let want = (TENSOR_NEEDLES - needles.len()).div_ceil(SAMPLED_TENSORS.len() - i);
        let mut taken = 0;
        for _ in 0..want * 64 {
            if taken == want {
                break;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let at = (state as usize) % (data.len() - NEEDLE_LEN);
            let window = &data[at..at + NEEDLE_LEN];
            if high_entropy(window) {
                needles.push(Needle {
                    bytes: window.to_vec(),
                    what: format!("{name} ({}) bytes {at}..{}", tensor.ty.name(), at + NEEDLE_LEN),
                    kind: TENSOR,
                });
                taken += 1;
            }
        }
        shares.push(format!("{name} {}: {taken}", tensor.ty.name()));
    }
    eprintln!("tensor needles: {}", shares.join(", "));
    assert_eq!(needles.len(), TENSOR_NEEDLES, "too few high-entropy windows in the sampled tensors");
    needles
}

/// Every run of `ID_RUN` consecutive prompt token ids, as little-endian u32
/// and as u64 (usize) arrays.
fn id_needles(ids: &[u32]) -> Vec<Needle> {
    let mut needles = Vec::new();
    for (start, run) in ids.windows(ID_RUN).enumerate() {
        let as_u32: Vec<u8> = run.iter().flat_map(|id| id.to_le_bytes()).collect();
        let as_u64: Vec<u8> = run.iter().flat_map(|&id| u64::from(id).to_le_bytes()).collect();
        let what = |width| format!("prompt token ids {start}..{} as {width}", start + ID_RUN);
        needles.push(Needle { bytes: as_u32, what: what("u32"), kind: IDS_U32 });
        needles.push(Needle { bytes: as_u64, what: what("u64"), kind: IDS_U64 });
    }
    needles
}

/// A running `flexserve generate` and its output so far.
struct Generation {
    child: Child,
    first_output: mpsc::Receiver<Vec<u8>>,
    stderr: std::thread::JoinHandle<String>,
}

fn start_generation(model: &Path, key: Option<&Path>, home: &Path) -> Generation {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flexserve"));
    cmd.args(["generate", "--model"]).arg(model);
    if let Some(k) = key {
        cmd.arg("--key").arg(k);
    }
    cmd.args(["--prompt", PROMPT, "--max-tokens", "200", "--temperature", "0", "--threads", "2"]);
    cmd.env("FLEXSERVE_HOME", home)
        .env("FLEXSERVE_DEV", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("starting flexserve");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let (tx, first_output) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        // Only the first piece matters; keep draining so the child never blocks on a full pipe.
        let mut sent = false;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            if !sent {
                let _ = tx.send(buf[..n].to_vec());
                sent = true;
            }
        }
    });
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    Generation { child, first_output, stderr }
}

enum Outcome {
    Scanned(Scan),
    /// The process ended before generating anything: its stderr.
    NoOutput(String),
    /// /proc/PID/mem could not be opened.
    Unreadable(std::io::Error),
}

/// Starts a generation, waits for its first output bytes, stops the process,
/// scans its memory, then ends it.
fn scan_during_generation(model: &Path, key: Option<&Path>, home: &Path, matcher: &Matcher) -> Outcome {
    let mut generation = start_generation(model, key, home);
    let pid = generation.child.id();
    let first = generation.first_output.recv_timeout(Duration::from_secs(120));
    if first.is_err() {
        let _ = generation.child.kill();
        let _ = generation.child.wait();
        return Outcome::NoOutput(generation.stderr.join().unwrap_or_default());
    }
    signal(pid, libc::SIGSTOP);
    wait_stopped(pid);
    let scan = scan_process(pid, matcher);
    signal(pid, libc::SIGCONT);
    // The scan is what matters; ending the CLI closes the channel, which ends its secure world.
    let _ = generation.child.kill();
    let _ = generation.child.wait();
    match scan {
        Ok(scan) => Outcome::Scanned(scan),
        Err(e) => Outcome::Unreadable(e),
    }
}

/// The real model sealed with a fresh key in `home`: (key file, sealed file).
fn seal_real_model(home: &Path) -> (PathBuf, PathBuf) {
    let key_path = home.join("model.key");
    let sealed = home.join("model.fsm");
    let key = flexserve_sealed::ModelKey::generate();
    key.save(&key_path).unwrap();
    flexserve_sealed::seal_file(&model(), &sealed, &key, &flexserve_sealed::SealOptions::default(), &mut |_, _| {})
        .unwrap();
    (key_path, sealed)
}

/// Needles for the real model's weights and for [`PROMPT`]'s token ids.
fn prompt_and_weights_matcher() -> Matcher {
    let gguf = GgufFile::open(model()).unwrap();
    let tokenizer = Tokenizer::from_gguf(&gguf.header.metadata).unwrap();
    let ids = tokenizer.encode(PROMPT, true, true);
    assert!(ids.len() >= 30, "the prompt should be at least 30 tokens, it is {}", ids.len());
    let mut needles = tensor_needles(&gguf);
    assert_eq!(needles.len(), TENSOR_NEEDLES);
    needles.extend(id_needles(&ids));
    Matcher::new(needles)
}

fn secure_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("FLEXSERVE_SECURE_BIN") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_BIN_EXE_flexserve")).with_file_name("flexserve-secure")
}

#[test]
fn no_plaintext_weights_or_token_ids_in_the_normal_world() {
    let secure = secure_binary();
    assert!(
        secure.is_file(),
        "{} does not exist: the CLI runs sealed models in it. Build it in the same target directory, e.g. \
         `cargo test --workspace` or `cargo build -p flexserve-secure` before `cargo test -p flexserve-cli`",
        secure.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (key_path, sealed) = seal_real_model(home);

    let matcher = prompt_and_weights_matcher();

    // Positive control: the plain model runs in the CLI process itself.
    let plain = match scan_during_generation(&model(), None, home, &matcher) {
        Outcome::Scanned(scan) => scan,
        Outcome::NoOutput(stderr) => panic!("flexserve generate on the plain model produced no output:\n{stderr}"),
        Outcome::Unreadable(e) if !is_root() => {
            eprintln!("skipping: cannot read another process's memory as a non-root user here ({e})");
            return;
        }
        Outcome::Unreadable(e) => panic!("reading the plain CLI's memory: {e}"),
    };
    let (tensor_hits, tensors, _) = matcher.hits(&plain.found, TENSOR);
    let (u32_hits, u32_runs, _) = matcher.hits(&plain.found, IDS_U32);
    eprintln!(
        "plain model (control): {} mappings, {:.1} MiB read, {:.1} MiB unreadable; tensor needles {tensor_hits}/{tensors}, \
         u32 id runs {u32_hits}/{u32_runs}",
        plain.mappings,
        plain.bytes_read as f64 / (1 << 20) as f64,
        plain.bytes_unreadable as f64 / (1 << 20) as f64
    );
    assert_eq!(
        tensor_hits, tensors,
        "control: the plain CLI maps the GGUF file, so every tensor needle must be found in its memory; \
         the scanner is broken"
    );
    assert!(
        u32_hits > 0,
        "control: the plain CLI tokenizes the prompt itself, so its token ids (u32) must be in its memory; \
         the scanner is broken"
    );

    // The sealed model: the CLI is the normal world, the secure world is its child.
    let sealed_scan = match scan_during_generation(&sealed, Some(&key_path), home, &matcher) {
        Outcome::Scanned(scan) => scan,
        Outcome::NoOutput(stderr) if !is_root() => {
            eprintln!("skipping: the secure world did not run as a non-root user here:\n{stderr}");
            return;
        }
        Outcome::NoOutput(stderr) => panic!("flexserve generate on the sealed model produced no output:\n{stderr}"),
        Outcome::Unreadable(e) => panic!("reading the sealed CLI's memory: {e}"),
    };
    let (tensor_hits, _, tensor_leaks) = matcher.hits(&sealed_scan.found, TENSOR);
    let (u32_hits, _, u32_leaks) = matcher.hits(&sealed_scan.found, IDS_U32);
    let (u64_hits, _, u64_leaks) = matcher.hits(&sealed_scan.found, IDS_U64);
    eprintln!(
        "sealed model: {} mappings, {:.1} MiB read, {:.1} MiB unreadable; tensor needles {tensor_hits}, \
         u32 id runs {u32_hits}, u64 id runs {u64_hits}",
        sealed_scan.mappings,
        sealed_scan.bytes_read as f64 / (1 << 20) as f64,
        sealed_scan.bytes_unreadable as f64 / (1 << 20) as f64
    );
    assert!(
        sealed_scan.has_secure_child(),
        "the sealed model must run in a flexserve-secure child of the CLI; children: {:?}",
        sealed_scan.children
    );
    // Ciphertext reaches the secure world through the shared buffer, which this process maps: the scan covers it.
    assert!(
        sealed_scan.bytes_read >= flexserve_normal::DEFAULT_SHARED_LEN as u64,
        "the scan of the sealed CLI read only {} bytes, less than its shared buffer",
        sealed_scan.bytes_read
    );
    assert!(tensor_leaks.is_empty(), "plaintext tensor data in the normal-world process: {tensor_leaks:#?}");
    assert!(u32_leaks.is_empty(), "prompt token ids (u32) in the normal-world process: {u32_leaks:#?}");
    assert!(u64_leaks.is_empty(), "prompt token ids (u64) in the normal-world process: {u64_leaks:#?}");
}

/// The daemon is the normal world too: while it relays a sealed model's
/// answer, its memory holds no plaintext weight and none of the prompt's
/// token ids (the prompt text passes through it; see docs/secure-world.md).
#[test]
fn no_plaintext_weights_or_token_ids_in_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (key_path, sealed) = seal_real_model(home);
    let matcher = prompt_and_weights_matcher();
    let mut daemon = Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(["serve", "--port", "0", "--threads", "2", "--key"])
        .arg(&key_path)
        .arg("--model")
        .arg(format!("sealed={}", sealed.display()))
        .env("FLEXSERVE_HOME", home)
        .env("FLEXSERVE_DEV", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = common::listening_url(&mut daemon);
    // A raw completion, so that the secure world tokenizes exactly PROMPT.
    let body =
        serde_json::json!({"model": "sealed", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": true});
    let mut curl = Command::new("curl")
        .args(["-sS", "-N", "-H", "Content-Type: application/json", "--data-binary", &body.to_string()])
        .arg(format!("{url}/v1/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 256];
    curl.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    let pid = daemon.id();
    signal(pid, libc::SIGSTOP);
    wait_stopped(pid);
    let scan = scan_process(pid, &matcher);
    signal(pid, libc::SIGCONT);
    let _ = curl.kill();
    let _ = curl.wait();
    let _ = daemon.kill();
    let _ = daemon.wait();
    let scan = match scan {
        Ok(scan) => scan,
        Err(e) if !is_root() => {
            eprintln!("skipping: cannot read another process's memory as a non-root user here ({e})");
            return;
        }
        Err(e) => panic!("reading the daemon's memory: {e}"),
    };
    let (tensor_hits, _, tensor_leaks) = matcher.hits(&scan.found, TENSOR);
    let (u32_hits, _, u32_leaks) = matcher.hits(&scan.found, IDS_U32);
    let (u64_hits, _, u64_leaks) = matcher.hits(&scan.found, IDS_U64);
    eprintln!(
        "daemon: {} mappings, {:.1} MiB read; tensor needles {tensor_hits}, u32 id runs {u32_hits}, u64 id runs {u64_hits}",
        scan.mappings,
        scan.bytes_read as f64 / (1 << 20) as f64
    );
    assert!(
        scan.has_secure_child(),
        "the sealed model must run in a flexserve-secure child of the daemon; children: {:?}",
        scan.children
    );
    assert!(scan.bytes_read >= flexserve_normal::DEFAULT_SHARED_LEN as u64, "the scan missed the shared buffer");
    assert!(tensor_leaks.is_empty(), "plaintext tensor data in the daemon: {tensor_leaks:#?}");
    assert!(u32_leaks.is_empty(), "prompt token ids (u32) in the daemon: {u32_leaks:#?}");
    assert!(u64_leaks.is_empty(), "prompt token ids (u64) in the daemon: {u64_leaks:#?}");
}
