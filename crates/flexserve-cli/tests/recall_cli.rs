//! `flexserve recall` reaching a running chat session's governor through its
//! control socket, while the chat waits for the user.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn flexserve(args: &[&str], home: &Path, runtime: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(args)
        .env("FLEXSERVE_HOME", home)
        .env("FLEXSERVE_DEV", "1")
        .env("FLEXSERVE_RUNTIME_DIR", runtime)
        .output()
        .unwrap()
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn recall_reaches_a_waiting_chat_which_reloads_for_the_next_turn() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let runtime = home.join("run");
    let (key, sealed) = (home.join("m.key"), home.join("m.fsm"));
    let (k, s) = (key.to_str().unwrap(), sealed.to_str().unwrap());
    ok(flexserve(&["keygen", "-o", k], home, &runtime));
    ok(flexserve(&["seal", "--model", model().to_str().unwrap(), "--key", k, "-o", s], home, &runtime));

    // Nothing runs yet: a clear error.
    let none = flexserve(&["recall", "--granules", "1"], home, &runtime);
    assert!(!none.status.success());
    let e = String::from_utf8_lossy(&none.stderr);
    assert!(e.contains("no FlexServe session"), "{e}");

    let mut chat = Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(["chat", "--model", s, "--key", k, "--max-tokens", "12", "--temperature", "0"])
        .env("FLEXSERVE_HOME", home)
        .env("FLEXSERVE_DEV", "1")
        .env("FLEXSERVE_RUNTIME_DIR", &runtime)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = chat.id();
    let mut stdin = chat.stdin.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = chat.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                return;
            }
        }
    });
    stdin.write_all(b"What is the capital of France?\n").unwrap();
    stdin.flush().unwrap();
    let first = lines.recv_timeout(Duration::from_secs(120)).expect("the first answer");
    assert!(!first.trim().is_empty());

    // The chat now waits for its next turn: a recall of more than the secure
    // world holds takes everything back (free granules, the conversation's KV
    // cache, every layer).
    let out = ok(flexserve(&["recall", "--memory", "1G", "--pid", &pid.to_string()], home, &runtime));
    assert!(out.contains(&format!("session {pid}")) && out.contains("released"), "{out}");
    let released: u32 = out.split("released ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
    assert!(released > 100, "{out}");

    stdin.write_all(b"/status\nAnd of Italy?\n").unwrap();
    drop(stdin);
    let output = chat.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let rest: Vec<String> = lines.iter().collect();
    let rest = rest.join("\n");
    assert!(rest.contains("0/30 layers") && rest.contains("KV caches in 0 granules"), "{rest}");
    assert!(stderr.contains("flexserve recall: recalled"), "{stderr}");
    // The next turn reloaded the layers and answered.
    let answer = rest.lines().filter(|l| !l.starts_with(' ') && !l.starts_with("secure world")).collect::<String>();
    assert!(!answer.trim().is_empty(), "{rest}");
    assert!(!runtime.join(format!("{pid}.sock")).exists(), "the control socket goes with the session");
}
