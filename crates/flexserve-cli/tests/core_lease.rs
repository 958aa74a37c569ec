//! Flex-NPU through the daemon (`--cores lease`, the default): plain requests
//! that arrive while a sealed generation runs get the cores between its
//! tokens. The secure world pauses with its workers' scratch scrubbed, the
//! turns of the two worlds never overlap, and both answers are the tokens
//! each gives alone.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use common::{ok, plain_and_sealed, Daemon};

fn post(url: &str, body: &str) -> String {
    let o = Command::new("curl")
        .args(["-sS", "--max-time", "120", "-H", "Content-Type: application/json", "--data-binary", body])
        .arg(format!("{url}/v1/completions"))
        .output()
        .unwrap();
    ok(o)
}

fn text(answer: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
    v["choices"][0]["text"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string()
}

#[test]
fn plain_work_gets_the_cores_between_sealed_tokens_and_the_worlds_never_overlap() {
    let home = tempfile::tempdir().unwrap();
    let (sealed, key) = common::seal(home.path());
    let daemon =
        Daemon::spawn(home, |c| c.arg("--key").arg(&key).args(plain_and_sealed(&sealed)).args(["--threads", "2"]));
    let url = daemon.url.clone();
    let sealed_body = r#"{"model":"sealed","prompt":"Once upon a time","max_tokens":64,"temperature":0}"#;
    let plain_body = r#"{"model":"plain","prompt":"The capital of France is","max_tokens":12,"temperature":0}"#;
    // Each alone first: the reference answers (and both models loaded).
    let sealed_alone = text(&post(&url, sealed_body));
    let plain_alone = text(&post(&url, plain_body));

    // The sealed generation streams; once its first token is out, plain requests arrive.
    let streamed = sealed_body.replace("\"temperature\":0}", "\"temperature\":0,\"stream\":true}");
    let mut sealed_run = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "120", "-H", "Content-Type: application/json", "--data-binary", &streamed])
        .arg(format!("{url}/v1/completions"))
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut events = BufReader::new(sealed_run.stdout.take().unwrap());
    let mut sealed_text = String::new();
    let mut read_event = |out: &mut String| -> bool {
        let mut line = String::new();
        if events.read_line(&mut line).unwrap() == 0 {
            return false;
        }
        if let Some(data) = line.trim().strip_prefix("data: ") {
            if data != "[DONE]" {
                let v: serde_json::Value = serde_json::from_str(data).unwrap();
                out.push_str(v["choices"][0]["text"].as_str().unwrap_or(""));
            }
        }
        true
    };
    while sealed_text.is_empty() {
        assert!(read_event(&mut sealed_text), "the sealed stream ended before its first token");
    }
    let plains: Vec<_> = (0..3)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || text(&post(&url, plain_body)))
        })
        .collect();
    for p in plains {
        assert_eq!(p.join().unwrap(), plain_alone, "a plain answer changed under the lease");
    }
    while read_event(&mut sealed_text) {}
    assert!(sealed_run.wait().unwrap().success());
    assert_eq!(sealed_text, sealed_alone, "the sealed answer changed under the lease");

    let status: serde_json::Value =
        serde_json::from_str(&ok(Command::new("curl").args(["-sS"]).arg(format!("{url}/status")).output().unwrap()))
            .unwrap();
    let cores = &status["cores"];
    assert_eq!(cores["sharing"], "lease", "{cores}");
    // The generation paused for the plain work, scrubbed every time.
    assert!(cores["secure_pauses"].as_u64().unwrap() > 0, "{cores}");
    assert_eq!(cores["unscrubbed_pauses"], 0, "{cores}");
    // One holder at a time, and the plain turns fell between secure ones.
    let turns = cores["turns"].as_array().unwrap();
    for w in turns.windows(2) {
        assert!(w[0]["to_ms"].as_f64().unwrap() <= w[1]["from_ms"].as_f64().unwrap(), "{} then {}", w[0], w[1]);
    }
    let owners: Vec<&str> = turns.iter().map(|t| t["owner"].as_str().unwrap()).collect();
    let interleaved = owners.windows(3).any(|w| w == ["secure", "normal", "secure"]);
    assert!(interleaved, "no plain turn between two secure ones: {owners:?}");
}
