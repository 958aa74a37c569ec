//! The `flexserve` design's prefetch on the real model, sealed and plain:
//! the next step's sealed model is resident when a plain step ends (loaded
//! behind its computation) and when a sealed step ends (loaded behind its
//! decode, into the reserve), and the outputs are those without prefetch.

mod common;

use std::path::Path;

use common::{flexserve, model, ok, seal};

/// A plain step, then two sealed models in turn; long enough steps that
/// the next model loads entirely behind each.
const PLAIN_A_B: &str = r#"
name = "plain-a-b"
secure_memory_limit = "400M"
[models.p]
path = "plain.gguf"
[models.a]
path = "m.fsm"
[models.b]
path = "m.fsm"
[[steps]]
name = "draft"
model = "p"
chat = false
prompt = "Once upon a time, in a small village,"
max_tokens = 128
[[steps]]
name = "refine"
model = "a"
chat = false
prompt = "{{ steps.draft }} The next morning,"
max_tokens = 48
[[steps]]
name = "final"
model = "b"
chat = false
prompt = "{{ steps.refine }} In the end,"
max_tokens = 16
"#;

/// The workflow file, next to the sealed model and the plain one.
fn workflow(home: &Path) -> String {
    std::fs::copy(model(), home.join("plain.gguf")).unwrap();
    let file = home.join("plain-a-b.toml");
    std::fs::write(&file, PLAIN_A_B).unwrap();
    file.display().to_string()
}

/// `workflow run --json`'s object (the last line of stdout).
fn run_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = ok(flexserve(home).args(["workflow", "run", "--json", "--threads", "2"]).args(args).output().unwrap());
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn outputs(report: &serde_json::Value) -> Vec<String> {
    report["steps"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap().to_string()).collect()
}

#[test]
fn after_a_plain_step_the_next_sealed_model_is_resident_and_the_outputs_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (_, key) = seal(home);
    let file = workflow(home);
    let args = [file.as_str(), "--input", "-", "--key", key.to_str().unwrap()];
    let with = run_json(home, &args);
    let steps = with["steps"].as_array().unwrap();
    // When `draft` ended, before `refine` started: all of a's chunks resident.
    let draft = &steps[0]["prefetch"];
    assert_eq!(draft["model"], "a", "{with}");
    assert_eq!(draft["missing_chunks"], 0, "{with}");
    assert!(draft["chunks"].as_u64().unwrap() > 0, "{with}");
    // No pipelined load was left for `refine`: none of its granules was for weights.
    assert!(steps[1]["granted_granules"].as_u64().unwrap() < 100, "{with}");
    // Nothing is granted during a sealed step for the next model: without a
    // reserve, b loads with its own step.
    assert!(steps[1]["prefetch"]["missing_chunks"].as_u64().unwrap() > 0, "{with}");
    assert!(steps[2]["prefetch"].is_null(), "{with}");

    let mut without_args = args.to_vec();
    without_args.push("--no-prefetch");
    let without = run_json(home, &without_args);
    assert!(without["steps"].as_array().unwrap().iter().all(|s| s["prefetch"].is_null()), "{without}");
    assert_eq!(outputs(&with), outputs(&without));
    assert!(outputs(&with).iter().all(|o| !o.trim().is_empty()), "{with}");
}

#[test]
fn after_a_sealed_step_the_next_sealed_model_is_resident_from_the_reserve_and_the_outputs_are_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (_, key) = seal(home);
    let file = workflow(home);
    // FlexServe's world holds the whole budget granted (the reserve); the
    // optimized strawman prefetches nothing.
    let o = flexserve(home)
        .args(["bench", "workflow", &file, "--key", key.to_str().unwrap(), "--designs", "flexserve,opt-strawman"])
        .args(["--repetitions", "1", "--threads", "2", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = ok(o);
    assert!(err.contains("outputs identical under every design and repetition: yes"), "{err}");
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    let designs = report["designs"].as_array().unwrap();
    let flex = designs[0]["steps"].as_array().unwrap();
    assert_eq!(designs[0]["design"], "flexserve");
    // When `refine` (model a) ended, b was resident: loaded behind its decode.
    for (step, prefetched) in [(0, "a"), (1, "b")] {
        assert_eq!(flex[step]["prefetch_missing_chunks"], 0, "{prefetched}: {report}");
        assert!(flex[step]["prefetched_chunks"][0].as_f64().unwrap() > 0.0, "{report}");
    }
    assert!(flex[2]["prefetch_missing_chunks"].is_null(), "{report}");
    let strawman = designs[1]["steps"].as_array().unwrap();
    assert!(strawman.iter().all(|s| s["prefetch_missing_chunks"].is_null()), "{report}");
}
