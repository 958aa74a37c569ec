//! `POST /v1/workflows/run` on the daemon (curl as the client): a workflow
//! over a plain and a sealed model gives the same outputs as `flexserve
//! workflow run`, whole or streamed step by step; unknown workflows are named.

mod common;

use std::process::Command;

use common::{flexserve, model, ok, Daemon};

const INPUT: &str = "How do I make a cup of tea?";

fn workflow_file(sealed: &std::path::Path) -> String {
    format!(
        r#"
name = "two-step"
[models.classifier]
path = "{plain}"
[models.answerer]
path = "{sealed}"
[[steps]]
name = "classify"
model = "classifier"
prompt = "What is the topic of this question? Answer with one word only.\nQuestion: {{{{ input }}}}"
max_tokens = 8
[[steps]]
name = "answer"
model = "answerer"
system = "You are a helpful assistant."
prompt = "Topic: {{{{ steps.classify | trim }}}}\nQuestion: {{{{ input }}}}"
max_tokens = 24
"#,
        plain = model().display(),
        sealed = sealed.display()
    )
}

/// `flexserve workflow run --json` of `file` on `input`: its report and each step's output.
fn cli_run(
    home: &std::path::Path,
    key: &std::path::Path,
    file: &std::path::Path,
    input: &str,
) -> (serde_json::Value, Vec<String>) {
    let out = ok(flexserve(home)
        .args(["workflow", "run", "--json", "--input", input, "--key"])
        .arg(key)
        .arg(file)
        .output()
        .unwrap());
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let outputs =
        report["steps"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap().to_string()).collect();
    (report, outputs)
}

fn curl(url: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-N", "--max-time", "120", "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = ok(c.arg(format!("{url}{path}")).output().unwrap());
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

#[test]
fn a_workflow_runs_through_the_daemon_whole_and_streamed() {
    let home = tempfile::tempdir().unwrap();
    let (sealed, key) = common::seal(home.path());
    let file = home.path().join("two-step.toml");
    std::fs::write(&file, workflow_file(&sealed)).unwrap();
    // The reference: the same workflow run by the command line.
    let (reference, outputs) = cli_run(home.path(), &key, &file, INPUT);

    let daemon = Daemon::spawn(home, |c| c.arg("--key").arg(&key).arg("--workflow").arg(&file));
    let url = daemon.url.clone();
    // Its models are served as WORKFLOW.MODEL.
    let (code, listed) = curl(&url, "/v1/workflows", None);
    assert_eq!(code, 200, "{listed}");
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed["data"][0]["id"], "two-step");
    assert_eq!(listed["data"][0]["steps"][1]["model"], "two-step.answerer", "{listed}");

    let body = format!(r#"{{"workflow":"two-step","input":"{INPUT}"}}"#);
    let (code, whole) = curl(&url, "/v1/workflows/run", Some(&body));
    assert_eq!(code, 200, "{whole}");
    let whole: serde_json::Value = serde_json::from_str(&whole).unwrap();
    let got: Vec<&str> = whole["steps"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap()).collect();
    assert_eq!(got, outputs, "{whole}");
    assert_eq!(whole["answer"].as_str().unwrap().trim(), reference["answer"], "{whole}");

    // Streamed: each step announced, its pieces, its end; then the answer and [DONE].
    let body = format!(r#"{{"workflow":"two-step","input":"{INPUT}","stream":true}}"#);
    let (code, streamed) = curl(&url, "/v1/workflows/run", Some(&body));
    assert_eq!(code, 200, "{streamed}");
    let events: Vec<&str> = streamed.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{streamed}");
    let mut texts = vec![String::new(); 2];
    let mut kinds = Vec::new();
    for e in &events[..events.len() - 1] {
        let v: serde_json::Value = serde_json::from_str(e).unwrap();
        let kind = v["type"].as_str().unwrap().to_string();
        if kind == "text" {
            let i = usize::from(v["step"] == "answer");
            texts[i].push_str(v["text"].as_str().unwrap());
        } else {
            kinds.push(kind);
        }
    }
    assert_eq!(kinds, ["step", "step_done", "step", "step_done", "answer"], "{streamed}");
    assert_eq!(texts, outputs);

    let (code, missing) = curl(&url, "/v1/workflows/run", Some(r#"{"workflow":"nope","input":"x"}"#));
    assert_eq!(code, 404, "{missing}");
    assert!(missing.contains("nope") && missing.contains("two-step"), "{missing}");
}

/// `next_model`: a client that drives its own agent loop names the model it
/// asks next, and the daemon loads it (a sealed one with its weights) once
/// the current answer is done.
#[test]
fn a_next_model_hint_loads_that_model_with_its_weights_after_the_answer() {
    let home = tempfile::tempdir().unwrap();
    let (sealed, key) = common::seal(home.path());
    let daemon = Daemon::spawn(home, |c| c.arg("--key").arg(&key).args(common::plain_and_sealed(&sealed)));
    let url = daemon.url.clone();
    let state = |name: &str| -> String {
        let (_, models) = curl(&url, "/v1/models", None);
        let models: serde_json::Value = serde_json::from_str(&models).unwrap();
        let m = models["data"].as_array().unwrap().iter().find(|m| m["id"] == name).unwrap().clone();
        m["state"].as_str().unwrap_or_else(|| panic!("{m}")).to_string()
    };
    assert_eq!(state("sealed"), "unloaded");
    let (code, bad) =
        curl(&url, "/v1/completions", Some(r#"{"model":"plain","prompt":"Hi","max_tokens":2,"next_model":"nope"}"#));
    assert_eq!(code, 404, "{bad}");
    assert!(bad.contains("nope"), "{bad}");
    assert_eq!(state("sealed"), "unloaded", "a refused request prefetched");

    let (code, answer) = curl(
        &url,
        "/v1/completions",
        Some(
            r#"{"model":"plain","prompt":"The capital of France is","max_tokens":4,"temperature":0,"next_model":"sealed"}"#,
        ),
    );
    assert_eq!(code, 200, "{answer}");
    let t0 = std::time::Instant::now();
    while state("sealed") != "loaded" {
        assert!(t0.elapsed() < std::time::Duration::from_secs(60), "the hinted model was not loaded");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // Loaded with its weights: its secure world already holds them before any request to it.
    let (_, status) = curl(&url, "/status", None);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let secure = status["secure_world"].as_array().unwrap().iter().find(|s| s["model"] == "sealed").unwrap().clone();
    assert!(secure["in_use"].as_u64().unwrap() > 300, "{secure}");
    let opened = &secure["models"][0];
    assert_eq!(opened["resident_layers"], opened["layers"], "{secure}");
    assert_eq!(opened["layers"], 30, "{secure}");
}

/// A workflow with a retrieve step through the daemon: the encoder is served
/// plain beside the sealed answerer; the passages are embedded on the first
/// run and kept; the outputs are the command line's.
#[test]
fn a_retrieve_workflow_runs_through_the_daemon() {
    let home = tempfile::tempdir().unwrap();
    let (sealed, key) = common::seal(home.path());
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let encoder = root.join(".cache/models/nomic-embed-text-v1.5.f16.gguf");
    assert!(encoder.exists(), "{} is missing: run scripts/fetch-model.sh nomic-embed", encoder.display());
    let documents = root.join("examples/workflows/knowledge/flexserve.txt");
    let file = home.path().join("rag.toml");
    std::fs::write(
        &file,
        format!(
            r#"
name = "rag"
[models.embedder]
path = "{encoder}"
[models.answerer]
path = "{sealed}"
[[steps]]
name = "retrieve"
model = "embedder"
prompt = "search_query: {{{{ input }}}}"
retrieve = {{ documents = "{documents}", prefix = "search_document: ", passages = 1 }}
[[steps]]
name = "answer"
model = "answerer"
prompt = "Context: {{{{ steps.retrieve }}}}\nQuestion: {{{{ input }}}}"
max_tokens = 24
"#,
            encoder = encoder.display(),
            sealed = sealed.display(),
            documents = documents.display()
        ),
    )
    .unwrap();
    let input = "How are the cores shared between the worlds?";
    let (_, outputs) = cli_run(home.path(), &key, &file, input);
    assert!(outputs[0].starts_with("Flex-NPU leases the CPU cores"), "{outputs:?}");

    let daemon = Daemon::spawn(home, |c| c.arg("--key").arg(&key).arg("--workflow").arg(&file));
    let body = format!(r#"{{"workflow":"rag","input":"{input}"}}"#);
    for run in 0..2 {
        let (code, whole) = curl(&daemon.url, "/v1/workflows/run", Some(&body));
        assert_eq!(code, 200, "run {run}: {whole}\n{}", daemon.log());
        let whole: serde_json::Value = serde_json::from_str(&whole).unwrap();
        let got: Vec<&str> = whole["steps"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap()).collect();
        assert_eq!(got, outputs, "run {run}: {whole}");
        assert_eq!(whole["steps"][0]["usage"]["completion_tokens"], 0);
    }
    // The encoder answers embeddings as a served model too.
    let (code, listed) = curl(&daemon.url, "/v1/models", None);
    assert_eq!(code, 200);
    assert!(listed.contains("rag.embedder"), "{listed}");
}
