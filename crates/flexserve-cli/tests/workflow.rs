//! `flexserve workflow run` on the real model, sealed and plain: the shipped
//! examples give the same outputs under every design and as separate
//! requests; a workflow over its budget gives up layers of the model needed
//! furthest ahead and reloads them; a recall in the middle is served and the
//! workflow completes; a failing step stops the workflow, named.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{flexserve, model, ok, seal};

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/workflows").join(name)
}

/// `workflow run --json` and its JSON (the last line of stdout).
fn run_json(home: &Path, args: &[&str]) -> serde_json::Value {
    let out = ok(flexserve(home).args(["workflow", "run", "--json"]).args(args).output().unwrap());
    serde_json::from_str(out.lines().last().unwrap()).unwrap()
}

fn outputs(report: &serde_json::Value) -> Vec<String> {
    report["steps"].as_array().unwrap().iter().map(|s| s["output"].as_str().unwrap().to_string()).collect()
}

/// `--model NAME=PATH` for the example's sealed models (the file sealed
/// here) and its plain ones (the real model).
fn overrides(sealed: &Path, sealed_names: &[&str], plain_names: &[&str]) -> Vec<String> {
    let sealed = sealed_names.iter().map(|n| format!("--model={n}={}", sealed.display()));
    sealed.chain(plain_names.iter().map(|n| format!("--model={n}={}", model().display()))).collect()
}

#[test]
fn the_examples_give_the_same_outputs_under_every_design_and_as_separate_requests() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (sealed, key) = seal(home);
    let input = "How do I make a cup of tea?";
    let cases = [
        ("plan-execute-summarize.toml", ["planner", "summarizer"].as_slice(), ["executor"]),
        ("classify-answer.toml", ["answerer"].as_slice(), ["classifier"]),
    ];
    for (file, sealed_models, plain_models) in cases {
        let models = overrides(&sealed, sealed_models, &plain_models);
        let path = example(file);
        let mut reference: Option<Vec<String>> = None;
        for design in ["flexserve", "opt-strawman", "strawman"] {
            let mut args = vec![path.to_str().unwrap(), "--input", input, "--key", key.to_str().unwrap()];
            args.extend(["--design", design, "--threads", "2"]);
            args.extend(models.iter().map(String::as_str));
            let report = run_json(home, &args);
            assert_eq!(report["design"], design);
            let got = outputs(&report);
            assert!(got.iter().all(|o| !o.trim().is_empty()), "{file} {design}: an empty output: {got:?}");
            match &reference {
                None => reference = Some(got),
                Some(r) => assert_eq!(&got, r, "{file}: {design} differs from flexserve"),
            }
        }
        // The first step as a request of its own gives the same text.
        let first = &reference.unwrap()[0];
        let alone = if file.starts_with("plan") {
            ok(flexserve(home)
                .args(["chat", "--model"])
                .arg(&sealed)
                .args(["--key", key.to_str().unwrap(), "--temperature", "0", "--max-tokens", "48"])
                .args(["--system", "You are a careful planner. Answer with a numbered list of at most three steps."])
                .args(["--prompt", &format!("Make a short plan for this task: {input}")])
                .output()
                .unwrap())
        } else {
            ok(flexserve(home)
                .args(["chat", "--model"])
                .arg(model())
                .args(["--temperature", "0", "--max-tokens", "8"])
                .args([
                    "--prompt",
                    &format!("What is the topic of this question? Answer with one word only.\nQuestion: {input}"),
                ])
                .output()
                .unwrap())
        };
        assert_eq!(alone.trim(), first.trim(), "{file}: the first step alone");
    }
}

/// Two models that do not both fit: `first` and `third` run model `a`, `second` model `b`.
const OVER_BUDGET: &str = r#"
name = "a-b-a"
secure_memory_limit = "160M"
[models.a]
path = "m.fsm"
[models.b]
path = "m.fsm"
[[steps]]
name = "first"
model = "a"
chat = false
prompt = "The capital of France is"
max_tokens = 8
[[steps]]
name = "second"
model = "b"
chat = false
prompt = "{{ steps.first }} and the capital of Italy is"
max_tokens = 8
[[steps]]
name = "third"
model = "a"
chat = false
prompt = "{{ steps.second }} and the capital of Spain is"
max_tokens = 8
"#;

#[test]
fn over_budget_the_model_needed_later_gives_up_its_last_layers_and_reloads_them() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (_, key) = seal(home);
    let file = home.join("a-b-a.toml");
    std::fs::write(&file, OVER_BUDGET).unwrap();
    let run = |design: &str| {
        run_json(home, &[file.to_str().unwrap(), "--input", "-", "--key", key.to_str().unwrap(), "--design", design])
    };
    let flex = run("flexserve");
    let steps = flex["steps"].as_array().unwrap();
    // `a` is needed again: kept, and only as many of its layers as `b` needed given up.
    assert!(steps[1]["evicted_layers"].as_u64().unwrap() > 0, "{flex}");
    assert!(steps[1]["evicted_layers"].as_u64().unwrap() < 30, "{flex}");
    // `b` is not needed again: unloaded, and `a` reloads into its granules.
    assert_eq!(steps[2]["granted_granules"], 0, "{flex}");
    assert_eq!(outputs(&flex), outputs(&run("opt-strawman")));
}

#[test]
fn a_recall_between_steps_is_served_and_the_workflow_completes() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (sealed, key) = seal(home);
    let runtime = home.join("run");
    let mut args: Vec<String> = vec![example("plan-execute-summarize.toml").display().to_string()];
    args.extend(["--input".into(), "How do I make a cup of tea?".into(), "--key".into(), key.display().to_string()]);
    args.extend(overrides(&sealed, &["planner", "summarizer"], &["executor"]));
    let reference = run_json(home, &args.iter().map(String::as_str).collect::<Vec<_>>());

    let mut child = flexserve(home)
        .args(["workflow", "run", "--json"])
        .args(&args)
        .env("FLEXSERVE_RUNTIME_DIR", &runtime)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Once the first (sealed) step is done, its model is unloaded: its
    // granules are free, and a recall takes them back.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    loop {
        let mut line = String::new();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "the workflow ended early: {log}");
        log.push_str(&line);
        if line.starts_with("== step execute") {
            break;
        }
    }
    let recall = Command::new(env!("CARGO_BIN_EXE_flexserve"))
        .args(["recall", "--memory", "1G", "--pid", &child.id().to_string()])
        .env("FLEXSERVE_RUNTIME_DIR", &runtime)
        .output()
        .unwrap();
    let said = ok(recall);
    let rest: String = stderr.lines().map(|l| l.unwrap() + "\n").collect();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{log}{rest}");
    let report: serde_json::Value =
        serde_json::from_str(String::from_utf8(out.stdout).unwrap().lines().last().unwrap()).unwrap();
    let released: u64 =
        said.split("released ").nth(1).and_then(|s| s.split_whitespace().next()).unwrap().parse().unwrap();
    assert!(released > 0, "{said}");
    assert_eq!(report["recalled_granules"], released, "{said} {report}");
    assert_eq!(outputs(&report), outputs(&reference));
}

#[test]
fn a_failing_step_stops_the_workflow_and_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (sealed, key) = seal(home);
    // A chunk in the middle of the planner's file is damaged.
    let tampered = home.join("tampered.fsm");
    let mut bytes = std::fs::read(&sealed).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&tampered, bytes).unwrap();
    let o = flexserve(home)
        .args(["workflow", "run"])
        .arg(example("plan-execute-summarize.toml"))
        .args(["--input", "tea", "--key", key.to_str().unwrap()])
        .arg(format!("--model=planner={}", tampered.display()))
        .arg(format!("--model=summarizer={}", sealed.display()))
        .arg(format!("--model=executor={}", model().display()))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("step \"plan\"") && err.contains("chunk"), "{err}");
    assert!(!err.contains("== step execute"), "the workflow went on: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // A template naming a step that does not exist: refused before anything runs.
    let bad = home.join("bad.toml");
    std::fs::write(
        &bad,
        "name = \"bad\"\n[models.m]\npath = \"m.fsm\"\n[[steps]]\nname = \"only\"\nmodel = \"m\"\nprompt = \"{{ steps.ghost }}\"\n",
    )
    .unwrap();
    let o = flexserve(home).args(["workflow", "run"]).arg(&bad).args(["--input", "x"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("\"only\"") && err.contains("ghost") && err.contains("bad.toml"), "{err}");
    assert!(!err.contains("== step"), "{err}");
}

#[test]
fn bench_workflow_runs_every_design_with_the_documented_json_and_timelines() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (_, key) = seal(home);
    let file = home.join("a-b-a.toml");
    std::fs::write(&file, OVER_BUDGET).unwrap();
    let timelines = home.join("timelines");
    let o = flexserve(home)
        .args(["bench", "workflow"])
        .arg(&file)
        .args(["--key", key.to_str().unwrap(), "--repetitions", "1", "--threads", "2", "--json", "--timeline"])
        .arg(&timelines)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    let out = ok(o);
    assert!(err.contains("outputs identical under every design and repetition: yes"), "{err}");
    let report: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(report["workflow"], "a-b-a");
    let designs = report["designs"].as_array().unwrap();
    let names: Vec<&str> = designs.iter().map(|d| d["design"].as_str().unwrap()).collect();
    assert_eq!(names, ["strawman", "opt-strawman", "flexserve"]);
    for d in designs {
        assert_eq!(d["end_to_end_ms"].as_array().unwrap().len(), 1, "{d}");
        let steps = d["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 3, "{d}");
        for s in steps {
            assert!(s["name"].is_string() && s["model"].is_string(), "{s}");
            assert_eq!(s["ttft_ms"].as_array().unwrap().len(), 1, "{s}");
            assert_eq!(s["decode_tokens_per_s"].as_array().unwrap().len(), 1, "{s}");
        }
        let svg =
            std::fs::read_to_string(timelines.join(format!("workflow-a-b-a-{}.svg", d["design"].as_str().unwrap())))
                .unwrap();
        assert!(svg.matches("<rect").count() >= 6 && svg.contains("step second"), "{svg}");
    }
}

#[test]
fn a_retrieve_step_finds_the_passage_that_answers_and_every_design_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path();
    let (sealed, key) = seal(home);
    let path = example("retrieve-answer.toml");
    let answerer = format!("--model=answerer={}", sealed.display());
    let cases = [
        ("Can the normal world take secure memory back?", "Flex-Mem grants secure memory"),
        ("How long should tea leaves steep?", "To make tea"),
        ("When was the Eiffel Tower built?", "The Eiffel Tower"),
    ];
    for (i, (input, passage)) in cases.into_iter().enumerate() {
        // Every design on the first question; the default one on the others.
        let designs: &[&str] = if i == 0 { &["flexserve", "opt-strawman", "strawman"] } else { &["flexserve"] };
        let mut reference: Option<Vec<String>> = None;
        for design in designs {
            let args = [
                path.to_str().unwrap(),
                "--input",
                input,
                "--key",
                key.to_str().unwrap(),
                "--design",
                design,
                &answerer,
            ];
            let report = run_json(home, &args);
            let got = outputs(&report);
            let found = got[0].split("\n\n").collect::<Vec<_>>();
            assert_eq!(found.len(), 2, "{design}: two passages expected: {got:?}");
            assert!(found[0].starts_with(passage), "{input:?} ({design}): nearest passage {:?}", found[0]);
            assert!(!got[1].trim().is_empty(), "{design}: empty answer");
            assert_eq!(report["steps"][0]["generated_tokens"], 0, "{report}");
            match &reference {
                None => reference = Some(got),
                Some(r) => assert_eq!(&got, r, "{design} differs from flexserve"),
            }
        }
    }
}
