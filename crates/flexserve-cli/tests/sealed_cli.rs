//! Sealed models through the command line: keys, sealing, inspecting, and
//! generating exactly the plain model's tokens.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn run(args: &[&str], home: &Path) -> Output {
    // Development mode: these tests exercise sealing and the secure world's
    // work, not its isolation (crates/flexserve-launcher/tests/principal.rs).
    Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(args)
        .env("FLEXSERVE_HOME", home)
        .env("FLEXSERVE_DEV", "1")
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "unexpected success");
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

fn generate(model: &Path, extra: &[&str], home: &Path) -> String {
    let m = model.to_str().unwrap();
    let mut args =
        vec!["generate", "--model", m, "--prompt", "def fibonacci(n):", "--max-tokens", "24", "--temperature", "0"];
    args.extend_from_slice(extra);
    ok(run(&args, home))
}

#[test]
fn sealed_model_generates_the_plain_models_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let key = home.join("model.key");
    let sealed = home.join("model.fsm");
    let (k, s) = (key.to_str().unwrap(), sealed.to_str().unwrap());
    ok(run(&["keygen", "-o", k], home));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    ok(run(&["seal", "--model", model().to_str().unwrap(), "--key", k, "-o", s, "--chunk-size", "262144"], home));

    let info = ok(run(&["inspect", s], home));
    assert!(info.contains("sealed model") && info.contains("token_embd.weight"), "{info}");

    let plain = generate(&model(), &[], home);
    assert!(!plain.is_empty());
    assert_eq!(generate(&sealed, &["--key", k], home), plain);

    // A chat of two turns: the conversation and its KV cache stay in the
    // secure world between turns, and the answers are the plain model's.
    let chat = |file: &Path, extra: &[&str], input: &str| {
        let mut args = vec!["chat", "--model", file.to_str().unwrap(), "--max-tokens", "20", "--temperature", "0"];
        args.extend_from_slice(extra);
        let mut child = Command::new(env!("CARGO_BIN_EXE_flexserve"))
            .args(&args)
            .env("FLEXSERVE_HOME", home)
            .env("FLEXSERVE_DEV", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        (ok(out), stderr)
    };
    let turns = "What is the capital of France?\nAnd of Italy?\n";
    let (plain_chat, _) = chat(&model(), &[], turns);
    assert!(!plain_chat.trim().is_empty());
    assert_eq!(chat(&sealed, &["--key", k], turns).0, plain_chat);

    // Between turns: the secure world's status and a recall; evicted layers
    // reload at the next turn and the answers do not change.
    let answers = |out: &str| -> String {
        out.lines().filter(|l| !l.starts_with(' ') && !l.starts_with("secure world")).collect()
    };
    let with_recall = "What is the capital of France?\n/status\n/recall 40\nAnd of Italy?\n";
    let (out, stderr) = chat(&sealed, &["--key", k], with_recall);
    assert!(out.contains("protection: memfd_secret") && out.contains("30/30 layers"), "{out}");
    assert!(stderr.contains("recalled 40 granules"), "{stderr}");
    assert!(stderr.contains(" cached"), "a recall of layers leaves the conversation's KV cache: {stderr}");
    assert_eq!(answers(&out), answers(&plain_chat));
    // The governor under memory pressure (a floor no machine meets): all secure
    // memory goes back after each turn, the conversation's KV cache too, and
    // comes back for the next. The second turn then evaluates the whole
    // conversation in one batch, which may round differently from the cached
    // run (tests/secure_world.rs checks it against a fresh evaluation).
    let (out, stderr) = chat(&sealed, &["--key", k, "--memory-floor", "1000T"], turns);
    assert!(stderr.contains("memory pressure: recalled"), "{stderr}");
    assert!(!stderr.contains(" cached"), "the second turn found no cache: {stderr}");
    let (first, second) = out.split_once('\n').unwrap();
    assert_eq!(first, plain_chat.lines().next().unwrap());
    assert!(!second.trim().is_empty(), "{out}");

    // Perplexity is scored in the secure world, to the plain model's figure;
    // the engine benchmark refuses a sealed model (this process never decrypts).
    let text = home.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    let ppl = |file: &Path, extra: &[&str]| {
        let mut args = vec!["perplexity", "--model", file.to_str().unwrap(), "--file", t, "--ctx", "64"];
        args.extend_from_slice(extra);
        ok(run(&args, home)).lines().last().unwrap().to_string()
    };
    let plain_ppl = ppl(&model(), &[]);
    assert!(plain_ppl.starts_with("PPL = "), "{plain_ppl}");
    // Scoring is an extraction oracle: off unless the secure world's policy allows it.
    let e = err(run(&["perplexity", "--model", s, "--file", t, "--ctx", "64", "--key", k], home));
    assert!(e.contains("scoring is off") && e.contains("Policy"), "{e}");
    std::fs::write(home.join("dev-secure-world/policy.conf"), "allow_perplexity = true\nmin_scoring_context = 64\n")
        .unwrap();
    assert_eq!(ppl(&sealed, &["--key", k]), plain_ppl);
    let e = err(run(&["perplexity", "--model", s, "--file", t, "--ctx", "32", "--key", k], home));
    assert!(e.contains("below the policy's minimum of 64"), "{e}");
    let e = err(run(&["bench", "engine", "--model", s, "--repetitions", "1"], home));
    assert!(e.contains("bench secure"), "{e}");
    // The designs side by side (one short repetition): every design answers.
    let m = model();
    let table = ok(run(
        &[
            "bench",
            "secure",
            "--model",
            s,
            "--plain",
            m.to_str().unwrap(),
            "--key",
            k,
            "--prompt-tokens",
            "16",
            "--gen-tokens",
            "4",
            "--repetitions",
            "1",
        ],
        home,
    ));
    for design in ["plain", "secure-flexible", "secure-carve-out", "secure-locked"] {
        assert!(table.lines().any(|l| l.starts_with(design)), "{design} missing from\n{table}");
    }

    // No key, a wrong key, a tampered chunk: each refused with a reason.
    let e = err(run(&["generate", "--model", s, "--prompt", "hi"], home));
    assert!(e.contains("--key"), "{e}");
    let other = home.join("other.key");
    ok(run(&["keygen", "-o", other.to_str().unwrap()], home));
    let e = err(run(&["generate", "--model", s, "--key", other.to_str().unwrap(), "--prompt", "hi"], home));
    assert!(e.contains("wrong model key"), "{e}");
    let mut bytes = std::fs::read(&sealed).unwrap();
    let n = bytes.len();
    bytes[n - 1000] ^= 0x40;
    let tampered = home.join("tampered.fsm");
    std::fs::write(&tampered, &bytes).unwrap();
    let e = err(run(&["generate", "--model", tampered.to_str().unwrap(), "--key", k, "--prompt", "hi"], home));
    assert!(e.contains("chunk") && e.contains("tensor"), "{e}");
}

#[test]
fn model_sealed_to_a_device_opens_only_there() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let pubkey = ok(run(&["device-key"], home)).trim().to_string();
    assert_eq!(pubkey.len(), 64);
    assert_eq!(ok(run(&["device-key"], home)).trim(), pubkey, "the device key persists");
    let sealed = home.join("d.fsm");
    let s = sealed.to_str().unwrap();
    ok(run(&["seal", "--model", model().to_str().unwrap(), "--to", &pubkey, "-o", s], home));
    assert_eq!(generate(&sealed, &[], home), generate(&model(), &[], home));

    let elsewhere = tempfile::tempdir().unwrap();
    ok(run(&["device-key"], elsewhere.path()));
    let e = err(run(&["generate", "--model", s, "--prompt", "hi"], elsewhere.path()));
    assert!(e.to_lowercase().contains("device"), "{e}");
}

#[test]
fn vendor_signature_is_required_when_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (vkey, key) = (home.join("vendor.key"), home.join("model.key"));
    let vendor_pub = ok(run(&["vendor-keygen", "-o", vkey.to_str().unwrap()], home)).trim().to_string();
    ok(run(&["keygen", "-o", key.to_str().unwrap()], home));
    let (signed, unsigned) = (home.join("signed.fsm"), home.join("unsigned.fsm"));
    let m = model();
    let (m, k) = (m.to_str().unwrap(), key.to_str().unwrap());
    ok(run(
        &["seal", "--model", m, "--key", k, "-o", signed.to_str().unwrap(), "--sign", vkey.to_str().unwrap()],
        home,
    ));
    ok(run(&["seal", "--model", m, "--key", k, "-o", unsigned.to_str().unwrap()], home));
    assert!(ok(run(&["inspect", signed.to_str().unwrap()], home)).contains(&vendor_pub));

    let gen = |file: &Path, vendor: &str| {
        run(
            &[
                "generate",
                "--model",
                file.to_str().unwrap(),
                "--key",
                k,
                "--vendor-pubkey",
                vendor,
                "--prompt",
                "Hi",
                "--max-tokens",
                "2",
            ],
            home,
        )
    };
    ok(gen(&signed, &vendor_pub));
    let e = err(gen(&unsigned, &vendor_pub));
    assert!(e.to_lowercase().contains("sign"), "{e}");
    let other = ok(run(&["vendor-keygen", "-o", home.join("other.key").to_str().unwrap()], home)).trim().to_string();
    let e = err(gen(&signed, &other));
    assert!(e.to_lowercase().contains("vendor") || e.to_lowercase().contains("sign"), "{e}");
}
