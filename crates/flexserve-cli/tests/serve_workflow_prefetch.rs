//! Prefetch in the daemon's workflows (`POST /v1/workflows/run`): while a
//! step runs, the daemon loads the next step's sealed model, weights and
//! all, so that the step finds it loaded; a step whose model is still being
//! prefetched uses that load instead of starting another; a budget with no
//! room for the weights leaves them to stream with the step; the outputs are
//! those without prefetch (`--no-prefetch`).

mod common;

use std::path::Path;
use std::process::Command;

use common::{model, ok, seal, Daemon};

/// A plain step, then a sealed one; `draft_tokens` sets how long the plain
/// step runs beside the sealed model's prefetch.
fn workflow_file(sealed: &Path, draft_tokens: u32) -> String {
    format!(
        r#"
name = "draft-refine"
[models.drafter]
path = "{plain}"
[models.refiner]
path = "{sealed}"
[[steps]]
name = "draft"
model = "drafter"
chat = false
prompt = "Once upon a time, in a small village,"
max_tokens = {draft_tokens}
[[steps]]
name = "refine"
model = "refiner"
chat = false
prompt = "{{{{ steps.draft }}}} The next morning,"
max_tokens = 12
"#,
        plain = model().display(),
        sealed = sealed.display()
    )
}

fn curl(url: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "120", "-w", "\n%{http_code}"]);
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = ok(c.arg(format!("{url}{path}")).output().unwrap());
    let (body, code) = out.trim_end().rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

/// What one workflow run through a fresh daemon showed.
struct Run {
    /// The `/v1/workflows/run` answer.
    report: serde_json::Value,
    outputs: Vec<String>,
    metrics: String,
    log: String,
}

impl Run {
    fn step(&self, i: usize) -> &serde_json::Value {
        &self.report["steps"][i]
    }

    /// A counter's value in `/metrics`.
    fn counter(&self, name: &str) -> u64 {
        let line = self.metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| {
            panic!("{name} is not in /metrics:\n{}", self.metrics);
        });
        line[name.len() + 1..].trim().parse().unwrap()
    }

    /// How many times the daemon loaded `model`.
    fn loads_of(&self, model: &str) -> usize {
        self.log.lines().filter(|l| l.starts_with(&format!("flexserve serve: loaded {model} in "))).count()
    }
}

/// Serves `workflow` from a daemon of its own with `extra` options, and runs it once.
fn run_once(key: &Path, workflow: &Path, extra: &[&str]) -> Run {
    let home = tempfile::tempdir().unwrap();
    let daemon = Daemon::spawn(home, |c| c.arg("--key").arg(key).arg("--workflow").arg(workflow).args(extra));
    let body = r#"{"workflow":"draft-refine","input":"unused"}"#;
    let (code, whole) = curl(&daemon.url, "/v1/workflows/run", Some(body));
    assert_eq!(code, 200, "{whole}\n{}", daemon.log());
    let report: serde_json::Value = serde_json::from_str(&whole).unwrap();
    let outputs =
        report["steps"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap().to_string()).collect();
    let (code, metrics) = curl(&daemon.url, "/metrics", None);
    assert_eq!(code, 200, "{metrics}");
    Run { report, outputs, metrics, log: daemon.log() }
}

/// The sealed model and its key in a folder of their own, and the workflow file there.
fn files(draft_tokens: u32) -> (tempfile::TempDir, std::path::PathBuf, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (sealed, key) = seal(dir.path());
    let file = dir.path().join("draft-refine.toml");
    std::fs::write(&file, workflow_file(&sealed, draft_tokens)).unwrap();
    (dir, key, file)
}

const SEALED: &str = "draft-refine.refiner";

#[test]
fn the_next_sealed_model_is_loaded_while_the_step_before_it_runs() {
    let (_dir, key, file) = files(64);
    let with = run_once(&key, &file, &[]);
    let without = run_once(&key, &file, &["--no-prefetch"]);
    assert_eq!(with.outputs, without.outputs, "prefetch changed the outputs");
    assert_eq!(with.step(1)["usage"]["completion_tokens"], 12, "{}", with.report);

    // With prefetch the sealed model, weights and all, was loaded behind the
    // plain step: its step found it loaded and loaded nothing more.
    assert_eq!(with.step(1)["model_state"], "loaded", "{}\n{}", with.report, with.log);
    assert_eq!(with.counter("flexserve_prefetches_total"), 1, "{}", with.log);
    assert_eq!(with.counter("flexserve_prefetches_header_only_total"), 0);
    let chunks = with.counter("flexserve_prefetched_chunks_total");
    assert!(with.log.contains(&format!("prefetched {SEALED} ({chunks} chunks of its weights)\n")), "{}", with.log);
    assert!(chunks >= 100, "{chunks} chunks prefetched\n{}", with.log);
    assert_eq!(with.step(1)["load_wait_ms"].as_f64().map(|ms| ms < 50.0), Some(true), "{}", with.report);
    assert_eq!(with.loads_of(SEALED), 1, "{}", with.log);
    // Without, it loads when its step starts.
    assert_eq!(without.step(1)["model_state"], "unloaded", "{}", without.report);
    assert_eq!(without.counter("flexserve_prefetches_total"), 0, "{}", without.log);
    assert_eq!(without.loads_of(SEALED), 1, "{}", without.log);
    // The first step's model is loaded by its own step either way.
    assert_eq!(with.step(0)["model_state"], "unloaded");
}

/// A one-token plain step ends long before the sealed model's prefetch: the
/// sealed step's lease waits for the model's opening (no second load, no
/// failure), and its request stops the weights' prefetch, streaming the rest.
#[test]
fn a_step_whose_model_is_being_prefetched_waits_for_that_load() {
    let (_dir, key, file) = files(1);
    let with = run_once(&key, &file, &[]);
    let without = run_once(&key, &file, &["--no-prefetch"]);
    assert_eq!(with.outputs, without.outputs, "prefetch changed the outputs");
    assert_eq!(with.step(1)["model_state"], "loading", "{}\n{}", with.report, with.log);
    assert_eq!(with.counter("flexserve_prefetches_total"), 1, "{}", with.log);
    assert_eq!(with.loads_of(SEALED), 1, "the step loaded its model a second time:\n{}", with.log);
}

/// A secure memory budget that holds the sealed model's weights but not
/// with the prefetch's spare beside them: the prefetch opens the model
/// header-only and its weights stream with its step, which still runs.
#[test]
fn a_budget_without_room_for_the_weights_leaves_them_to_stream_with_the_step() {
    let (_dir, key, file) = files(8);
    let limit = ["--secure-memory-limit", "112M"];
    let tight = run_once(&key, &file, &limit);
    let without = run_once(&key, &file, &["--no-prefetch", limit[0], limit[1]]);
    assert_eq!(tight.outputs, without.outputs, "prefetch changed the outputs");
    assert_eq!(tight.counter("flexserve_prefetches_total"), 0, "{}", tight.log);
    assert_eq!(tight.counter("flexserve_prefetched_chunks_total"), 0, "{}", tight.log);
    assert_eq!(tight.counter("flexserve_prefetches_header_only_total"), 1, "{}", tight.log);
    assert!(tight.log.contains("prefetched draft-refine.refiner header-only"), "{}", tight.log);
    assert_eq!(tight.loads_of(SEALED), 1, "{}", tight.log);
}
