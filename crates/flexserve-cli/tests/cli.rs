//! The `flexserve` command as scripts call it, on the real model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model() -> PathBuf {
    let p = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn flexserve(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flexserve")).args(args).output().unwrap()
}

fn stdout(o: &Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout.clone()).unwrap()
}

fn reference(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(root().join("../shared/reference").join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn tokenize_prints_llama_cpp_ids_as_json() {
    let m = model();
    let r = reference("tokenizer.json");
    let case = r["cases"].as_array().unwrap().iter().find(|c| c["name"] == "chat_template").unwrap();
    let text = case["text"].as_str().unwrap();
    let out = stdout(&flexserve(&["tokenize", "--model", m.to_str().unwrap(), "--text", text]));
    let ids: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids, case["ids"]);
    assert_eq!(out.trim().lines().count(), 1);
    let out = stdout(&flexserve(&["tokenize", "--model", m.to_str().unwrap(), "--text", text, "--no-parse-special"]));
    let ids: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids, case["ids_no_parse_special"]);

    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("t.txt");
    std::fs::write(&f, text).unwrap();
    let out = stdout(&flexserve(&["tokenize", "--model", m.to_str().unwrap(), "--file", f.to_str().unwrap()]));
    assert_eq!(serde_json::from_str::<serde_json::Value>(out.trim()).unwrap(), case["ids"]);
}

#[test]
fn generate_greedy_prints_only_the_continuation() {
    let m = model();
    let r = reference("greedy.json");
    let case = &r["cases"][0];
    // The first 12 tokens of llama.cpp's continuation (the engine test covers all 32).
    let want = " Paris.\n\nThe United States has a population of approximately";
    assert!(case["continuation"].as_str().unwrap().starts_with(want));
    let out = flexserve(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        case["prompt"].as_str().unwrap(),
        "--max-tokens",
        "12",
        "--temperature",
        "0",
        "--threads",
        "2",
    ]);
    assert_eq!(stdout(&out), want);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tok/s"), "timings go to stderr: {err}");
}

#[test]
fn generate_with_seed_is_reproducible_and_stops_at_stop_string() {
    let m = model();
    let run = |seed: &str| {
        stdout(&flexserve(&[
            "generate",
            "--model",
            m.to_str().unwrap(),
            "--prompt",
            "Once upon a time",
            "--max-tokens",
            "24",
            "--temperature",
            "0.9",
            "--seed",
            seed,
        ]))
    };
    let a = run("42");
    assert!(!a.is_empty());
    assert_eq!(a, run("42"));
    let out = stdout(&flexserve(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "32",
        "--temperature",
        "0",
        "--stop",
        "United",
    ]));
    assert_eq!(out, " Paris.\n\nThe ");
}

#[test]
fn chat_reads_turns_from_stdin_and_keeps_the_cache() {
    let m = model();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(["chat", "--model", m.to_str().unwrap(), "--max-tokens", "24", "--temperature", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"What is the capital of France?\nAnd of Germany?\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let text = stdout(&out);
    assert!(!text.trim().is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    let turns: Vec<&str> = err.lines().filter(|l| l.starts_with("prefill:")).collect();
    assert_eq!(turns.len(), 2, "{err}");
    assert!(turns[1].contains("cached"), "second turn reuses the first's cache: {err}");
}

#[test]
fn chat_single_prompt_answers_once() {
    let m = model();
    let out = stdout(&flexserve(&[
        "chat",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "Say hello.",
        "--max-tokens",
        "16",
        "--temperature",
        "0",
    ]));
    assert!(!out.trim().is_empty());
}

#[test]
fn perplexity_prints_ppl_last() {
    let m = model();
    // A few chunks of real text keep this quick; the engine test scores the whole reference file.
    let text = std::fs::read_to_string("/usr/share/common-licenses/GPL-3").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("text.txt");
    std::fs::write(&f, &text[..3000]).unwrap();
    let out = stdout(&flexserve(&[
        "perplexity",
        "--model",
        m.to_str().unwrap(),
        "--file",
        f.to_str().unwrap(),
        "--ctx",
        "128",
    ]));
    let last = out.trim().lines().last().unwrap();
    let ppl: f64 = last.strip_prefix("PPL = ").unwrap().parse().unwrap();
    assert!(ppl > 1.0 && ppl < 100.0, "{last}");

    let o = flexserve(&["perplexity", "--model", m.to_str().unwrap(), "--file", f.to_str().unwrap(), "--ctx", "4096"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("at least 4096"));
}

#[test]
fn inspect_shows_metadata_and_tensors() {
    let m = model();
    let out = stdout(&flexserve(&["inspect", m.to_str().unwrap()]));
    assert!(out.contains("general.architecture = \"llama\""), "{out}");
    assert!(out.contains("token_embd.weight") && out.contains("Q8_0") && out.contains("272 tensors"));
}

#[test]
fn bad_input_gets_a_clear_error() {
    let o = flexserve(&["inspect", "/nonexistent/model.gguf"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/model.gguf"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00 definitely not a model").unwrap();
    let o = flexserve(&["generate", "--model", bad.to_str().unwrap(), "--prompt", "hi"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.gguf") && !err.contains("panicked"), "{err}");

    let m = model();
    let o = flexserve(&[
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--prompt",
        "one two three four five six",
        "--ctx",
        "4",
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("context is full"));
}

#[test]
fn synth_writes_a_runnable_model_and_bench_reports_json() {
    let m = model();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("tiny.gguf");
    let o = flexserve(&[
        "synth",
        "--shape",
        "2,256,4,2,512",
        "--quant",
        "Q4_K_M",
        "--tokenizer-from",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    stdout(&o);
    let info = stdout(&flexserve(&["inspect", out.to_str().unwrap()]));
    // The mix: Q6_K for the output and (layer 0 of 2) the value/down matrices, Q4_K elsewhere.
    assert!(info.contains("output.weight") && info.contains("Q6_K") && info.contains("Q4_K"), "{info}");
    assert!(info.contains("tokenizer.ggml.tokens"));

    let json = stdout(&flexserve(&[
        "bench",
        "engine",
        "--model",
        out.to_str().unwrap(),
        "--prompt-tokens",
        "8,16",
        "--gen-tokens",
        "4",
        "--repetitions",
        "2",
        "--threads",
        "2",
        "--json",
    ]));
    let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
    assert_eq!(v["threads"], 2);
    assert_eq!(v["prefill"].as_array().unwrap().len(), 2);
    assert_eq!(v["prefill"][1]["n_tokens"], 16);
    assert_eq!(v["prefill"][0]["tokens_per_s"].as_array().unwrap().len(), 2);
    assert_eq!(v["decode"]["n_tokens"], 4);
    assert!(v["decode"]["tokens_per_s"][0].as_f64().unwrap() > 0.0);
    assert!(v["peak_rss_bytes"].as_u64().unwrap() > 0);

    // `--isa` caps the kernel tier, and a tier the CPU lacks is refused by name.
    let tier = |isa: &str| {
        flexserve(&[
            "bench",
            "engine",
            "--model",
            out.to_str().unwrap(),
            "--prompt-tokens",
            "8",
            "--gen-tokens",
            "2",
            "--repetitions",
            "1",
            "--isa",
            isa,
            "--json",
        ])
    };
    let v: serde_json::Value = serde_json::from_str(stdout(&tier("portable")).trim()).unwrap();
    assert_eq!(v["kernels"], "portable");
    let o = tier("avx512");
    if o.status.success() {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["kernels"], "avx512");
    } else {
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("--isa avx512: this CPU's best kernel tier is"), "{e}");
    }

    let o = flexserve(&[
        "synth",
        "--shape",
        "2,250,4,2,512",
        "--quant",
        "Q4_0",
        "--tokenizer-from",
        m.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success(), "250 columns are not whole Q4_0 blocks");
}

#[test]
fn without_the_service_the_secure_world_is_refused_or_loudly_unprotected() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let run = |dev: bool| {
        let mut c = Command::new(env!("CARGO_BIN_EXE_flexserve"));
        c.args(["status", "--json"]).env("FLEXSERVE_HOME", dir.path()).env("FLEXSERVE_SECURE_SOCKET", &socket);
        if dev {
            c.env("FLEXSERVE_DEV", "1");
        } else {
            c.env_remove("FLEXSERVE_DEV");
        }
        c.output().unwrap()
    };
    let o = run(false);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("no secure world service at") && e.contains("none.sock") && e.contains("--dev"), "{e}");

    let o = run(true);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("WARNING: development mode"), "{e}");
    let s: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(s["deployment"], "development");
    assert_eq!(s["unprotected"], true);
    assert!(
        s["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().starts_with("development mode")),
        "{s}"
    );
    // The device key was born in the development secure world's state directory, owner-only.
    let state = dir.path().join("dev-secure-world");
    let mode = std::fs::metadata(&state).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions())).unwrap();
    assert_eq!(mode & 0o777, 0o700);
    assert!(state.join("device.key").exists());
}

#[test]
fn errors_state_their_cause_once() {
    let dir = tempfile::tempdir().unwrap();
    let readme = root().join("README.md");
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &std::fs::read(model()).unwrap()[..1000]).unwrap();
    for (file, cause) in [(readme.as_path(), "not a GGUF file"), (truncated.as_path(), "tensor count")] {
        let o = flexserve(&["generate", "--model", file.to_str().unwrap(), "--prompt", "hi"]);
        assert!(!o.status.success());
        let e = String::from_utf8_lossy(&o.stderr);
        assert_eq!(e.matches(cause).count(), 1, "{e}");
        assert!(e.contains(file.file_name().unwrap().to_str().unwrap()), "{e}");
    }
}
