//! Workflow files end to end: parsing, validation messages, order,
//! rendering, and the example files shipped in `examples/workflows`.

use std::path::{Path, PathBuf};

use flexserve_workflow::{Outputs, Retrieval, StepKind, Workflow, WorkflowError, DEFAULT_PASSAGES};

const ORIGIN: &str = "flows/wf.toml";

/// A valid three-step workflow, declared out of execution order on
/// purpose: `summarize` is written before `execute`.
const THREE_STEPS: &str = r#"
name = "pes"
description = "plan, execute, summarize"
secure_memory_limit = "320M"

[models.planner]
path = "models/planner.fsm"
[models.executor]
path = "/abs/executor.gguf"

[[steps]]
name = "plan"
model = "planner"
system = "You plan. Input was {{ input }}."
prompt = "Plan: {{ input }}"
max_tokens = 64

[[steps]]
name = "summarize"
model = "planner"
prompt = "Summarize: {{ steps.execute }}"
chat = false
temperature = 0.7
top_k = 10
top_p = 0.9
min_p = 0.0
seed = 42
stop = ["\n\n"]

[[steps]]
name = "execute"
model = "executor"
prompt = "Do {{ steps.plan }} for {{ input }}"
after = ["plan"]
"#;

fn parse(text: &str) -> Result<Workflow, WorkflowError> {
    Workflow::parse(text, Path::new(ORIGIN))
}

/// Parses `text` expecting an error, and returns its message.
fn error(text: &str) -> String {
    match parse(text) {
        Ok(_) => panic!("expected an error for:\n{text}"),
        Err(e) => e.to_string(),
    }
}

/// Asserts that `message` contains every one of `parts`.
fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "{message:?} should mention {part:?}");
    }
}

/// A one-model workflow around the given `[[steps]]` tables.
fn with_steps(steps: &str) -> String {
    format!("name = \"t\"\n[models.m]\npath = \"m.gguf\"\n{steps}")
}

/// A single step with one extra line in its table.
fn one_step_with(line: &str) -> String {
    with_steps(&format!("[[steps]]\nname = \"s\"\nmodel = \"m\"\nprompt = \"{{{{ input }}}}\"\n{line}\n"))
}

#[test]
fn a_valid_three_step_workflow_parses() {
    let wf = parse(THREE_STEPS).unwrap();
    assert_eq!(wf.name, "pes");
    assert_eq!(wf.description.as_deref(), Some("plan, execute, summarize"));
    assert_eq!(wf.secure_memory_limit, Some(320 << 20));
    assert_eq!(wf.origin(), Path::new(ORIGIN));

    // Models are indexed by name.
    let names: Vec<&str> = wf.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["executor", "planner"]);
    let planner = wf.model_index("planner").unwrap();
    let executor = wf.model_index("executor").unwrap();
    assert_eq!(wf.model_index("nope"), None);

    // Relative paths resolve against the file's directory; absolute stay.
    assert_eq!(wf.models[planner].path, PathBuf::from("flows/models/planner.fsm"));
    assert_eq!(wf.models[executor].path, PathBuf::from("/abs/executor.gguf"));

    let plan = wf.step_index("plan").unwrap();
    let summarize = wf.step_index("summarize").unwrap();
    let execute = wf.step_index("execute").unwrap();
    assert_eq!((plan, summarize, execute), (0, 1, 2));
    assert_eq!(wf.step_index("nope"), None);

    // Defaults.
    let p = &wf.steps[plan];
    assert_eq!(p.model, planner);
    assert!(p.chat);
    assert_eq!(p.max_tokens, 64);
    assert_eq!(p.sampling.temperature, 0.0);
    assert_eq!((p.sampling.top_k, p.sampling.top_p, p.sampling.min_p, p.sampling.seed), (40, 0.95, 0.05, None));
    assert!(p.stop.is_empty());
    assert!(p.depends_on.is_empty());

    // Explicit settings.
    let s = &wf.steps[summarize];
    assert!(!s.chat);
    assert_eq!(s.max_tokens, 128);
    assert_eq!(s.sampling.temperature, 0.7);
    assert_eq!((s.sampling.top_k, s.sampling.top_p, s.sampling.min_p, s.sampling.seed), (10, 0.9, 0.0, Some(42)));
    assert_eq!(s.stop, ["\n\n"]);
}

#[test]
fn dependencies_come_from_templates_and_after() {
    let wf = parse(THREE_STEPS).unwrap();
    // summarize references execute; execute references plan (and names
    // it in `after` too, which must not duplicate it).
    assert_eq!(wf.steps[1].depends_on, [2]);
    assert_eq!(wf.steps[2].depends_on, [0]);

    // `after` alone adds a dependency; system templates count too.
    let text = with_steps(
        r#"
[[steps]]
name = "a"
model = "m"
prompt = "{{ input }}"
after = ["c"]
[[steps]]
name = "b"
model = "m"
prompt = "{{ input }}"
system = "Context: {{ steps.a }}"
[[steps]]
name = "c"
model = "m"
prompt = "{{ input }}"
"#,
    );
    let wf = parse(&text).unwrap();
    assert_eq!(wf.steps[0].depends_on, [2]);
    assert_eq!(wf.steps[1].depends_on, [0]);
    assert_eq!(wf.order(), [2, 0, 1]);
}

#[test]
fn order_is_topological_and_stable() {
    let wf = parse(THREE_STEPS).unwrap();
    assert_eq!(wf.order(), [0, 2, 1]);
    // The default output is the last step in execution order.
    assert_eq!(wf.output_step(), 1);
    for _ in 0..5 {
        assert_eq!(parse(THREE_STEPS).unwrap().order(), [0, 2, 1]);
    }

    // Independent steps keep declaration order.
    let text = with_steps(
        r#"
[[steps]]
name = "x"
model = "m"
prompt = "{{ input }}"
[[steps]]
name = "y"
model = "m"
prompt = "{{ input }}"
[[steps]]
name = "z"
model = "m"
prompt = "{{ steps.y }} {{ steps.x }}"
"#,
    );
    assert_eq!(parse(&text).unwrap().order(), [0, 1, 2]);
}

#[test]
fn output_names_a_step() {
    let text = THREE_STEPS.replace("secure_memory_limit", "output = \"execute\"\nsecure_memory_limit");
    assert_eq!(parse(&text).unwrap().output_step(), 2);
    let text = THREE_STEPS.replace("secure_memory_limit", "output = \"nope\"\nsecure_memory_limit");
    assert_mentions(&error(&text), &[ORIGIN, "field output", "\"nope\"", "plan, summarize, execute"]);
}

#[test]
fn from_file_reads_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wf.toml");
    std::fs::write(&path, THREE_STEPS).unwrap();
    let wf = Workflow::from_file(&path).unwrap();
    assert_eq!(wf.models[1].path, dir.path().join("models/planner.fsm"));

    std::fs::write(&path, "name = ").unwrap();
    let e = Workflow::from_file(&path).unwrap_err();
    assert!(matches!(e, WorkflowError::Parse { .. }), "{e:?}");
    assert_mentions(&e.to_string(), &[&path.display().to_string(), "line 1"]);

    let missing = dir.path().join("missing.toml");
    let e = Workflow::from_file(&missing).unwrap_err();
    assert!(matches!(e, WorkflowError::Read { .. }), "{e:?}");
    assert_mentions(&e.to_string(), &["missing.toml"]);
}

#[test]
fn structural_errors_name_the_file_step_and_field() {
    // Duplicate step names.
    let text = with_steps(
        "[[steps]]\nname = \"a\"\nmodel = \"m\"\nprompt = \"x\"\n[[steps]]\nname = \"a\"\nmodel = \"m\"\nprompt = \"y\"\n",
    );
    assert_mentions(&error(&text), &[ORIGIN, "step \"a\" field name", "same name"]);

    // A step naming an undeclared model.
    let text = one_step_with("").replace("model = \"m\"\nprompt", "model = \"ghost\"\nprompt");
    assert_mentions(&error(&text), &[ORIGIN, "step \"s\" field model", "\"ghost\"", "declared models: m"]);

    // `after` naming an unknown step, or the step itself.
    assert_mentions(&error(&one_step_with("after = [\"ghost\"]")), &[ORIGIN, "step \"s\" field after", "\"ghost\""]);
    assert_mentions(&error(&one_step_with("after = [\"s\"]")), &["step \"s\" field after", "itself"]);

    // An empty model path.
    let text = one_step_with("").replace("path = \"m.gguf\"", "path = \"\"");
    assert_mentions(&error(&text), &[ORIGIN, "model \"m\" field path", "empty"]);

    // No steps, or no steps table at all.
    assert_mentions(&error("name = \"t\"\nsteps = []\n"), &[ORIGIN, "field steps", "no steps"]);
    assert_mentions(&error("name = \"t\"\n"), &[ORIGIN, "field steps", "no steps"]);

    // A model used by no step.
    let text = one_step_with("").replace("[[steps]]", "[models.spare]\npath = \"x\"\n[[steps]]");
    assert_mentions(&error(&text), &[ORIGIN, "model \"spare\"", "used by no step"]);

    // Names: the workflow's, a step's, a model's.
    assert_mentions(&error(&one_step_with("").replace("name = \"t\"", "name = \" \"")), &[ORIGIN, "field name"]);
    let text = one_step_with("").replace("name = \"s\"", "name = \"my-step\"");
    assert_mentions(&error(&text), &[ORIGIN, "step \"my-step\" field name", "[A-Za-z_][A-Za-z0-9_]*"]);
    let text = one_step_with("").replace("[models.m]", "[models.\"a=b\"]").replace("model = \"m\"", "model = \"a=b\"");
    assert_mentions(&error(&text), &[ORIGIN, "model \"a=b\""]);

    // Empty prompt, system, stop string.
    let text = one_step_with("").replace("prompt = \"{{ input }}\"", "prompt = \"  \"");
    assert_mentions(&error(&text), &["step \"s\" field prompt", "empty"]);
    assert_mentions(&error(&one_step_with("system = \"\"")), &["step \"s\" field system", "empty"]);
    assert_mentions(&error(&one_step_with("stop = [\"\"]")), &["step \"s\" field stop", "empty"]);
}

#[test]
fn template_reference_errors_name_step_field_and_variable() {
    let cases = [
        ("prompt = \"{{ steps.ghost }}\"", "step \"s\" field prompt", "steps.ghost"),
        ("prompt = \"{{ steps }}\"", "step \"s\" field prompt", "`steps`"),
        ("prompt = \"{{ user }}\"", "step \"s\" field prompt", "`user`"),
        ("prompt = \"{{ steps.s }}\"", "step \"s\" field prompt", "steps.s"),
        ("prompt = \"{{ input.x }}\"", "step \"s\" field prompt", "input.x"),
    ];
    for (prompt, what, variable) in cases {
        let text = one_step_with("").replace("prompt = \"{{ input }}\"", prompt);
        assert_mentions(&error(&text), &[ORIGIN, what, variable]);
    }
    let message = error(&one_step_with("system = \"{{ steps.nobody }}\""));
    assert_mentions(&message, &[ORIGIN, "step \"s\" field system", "steps.nobody"]);
}

#[test]
fn template_syntax_errors_are_reported_at_parse_time() {
    let text = one_step_with("system = \"{% if input %}unclosed\"");
    let e = parse(&text).unwrap_err();
    assert!(matches!(&e, WorkflowError::Template { step, field: "system", .. } if step == "s"), "{e:?}");
    assert_mentions(&e.to_string(), &[ORIGIN, "step \"s\" field system", "syntax error"]);

    let text = one_step_with("").replace("prompt = \"{{ input }}\"", "prompt = \"{{ input \"");
    assert_mentions(&error(&text), &[ORIGIN, "step \"s\" field prompt", "syntax error"]);
}

#[test]
fn cycles_are_named_in_order() {
    let text = with_steps(
        r#"
[[steps]]
name = "a"
model = "m"
prompt = "{{ steps.b }}"
[[steps]]
name = "b"
model = "m"
prompt = "{{ input }}"
after = ["a"]
"#,
    );
    let e = parse(&text).unwrap_err();
    assert!(matches!(&e, WorkflowError::Cycle { steps, .. } if steps == &["a", "b"]), "{e:?}");
    assert_mentions(&e.to_string(), &[ORIGIN, "steps a -> b -> a form a cycle"]);

    // A longer cycle, with a free step before it and a stuck one after.
    let text = with_steps(
        r#"
[[steps]]
name = "free"
model = "m"
prompt = "{{ input }}"
[[steps]]
name = "x"
model = "m"
prompt = "{{ steps.z }} {{ steps.free }}"
[[steps]]
name = "y"
model = "m"
prompt = "{{ steps.x }}"
[[steps]]
name = "z"
model = "m"
prompt = "{{ steps.y }}"
[[steps]]
name = "stuck"
model = "m"
prompt = "{{ steps.z }}"
"#,
    );
    assert_mentions(&error(&text), &["steps x -> y -> z -> x form a cycle"]);
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let top = THREE_STEPS.replace("secure_memory_limit", "colour = \"red\"\nsecure_memory_limit");
    assert_mentions(&error(&top), &[ORIGIN, "colour"]);
    let model = THREE_STEPS.replace("path = \"/abs/executor.gguf\"", "path = \"/abs/e.gguf\"\nsha = \"x\"");
    assert_mentions(&error(&model), &[ORIGIN, "sha"]);
    assert_mentions(&error(&one_step_with("max_token = 5")), &[ORIGIN, "max_token"]);
}

#[test]
fn numeric_fields_are_bounded() {
    let cases = [
        ("max_tokens = 0", "field max_tokens"),
        ("max_tokens = 32769", "field max_tokens"),
        ("temperature = -0.1", "field temperature"),
        ("temperature = nan", "field temperature"),
        ("temperature = inf", "field temperature"),
        ("temperature = 1e300", "field temperature"),
        ("top_p = 0.0", "field top_p"),
        ("top_p = 1.5", "field top_p"),
        ("top_p = nan", "field top_p"),
        ("min_p = -1.0", "field min_p"),
        ("min_p = 2.0", "field min_p"),
        ("min_p = -nan", "field min_p"),
    ];
    for (line, field) in cases {
        assert_mentions(&error(&one_step_with(line)), &[ORIGIN, "step \"s\"", field]);
    }
    // Type errors come from the TOML reader, with the line.
    assert_mentions(&error(&one_step_with("max_tokens = -5")), &[ORIGIN, "max_tokens", "line"]);
    assert_mentions(&error(&one_step_with("seed = -1")), &[ORIGIN, "seed", "line"]);

    // The edges are allowed; an integer temperature reads as a float.
    let wf = parse(&one_step_with("max_tokens = 32768\ntemperature = 2\ntop_p = 1.0\nmin_p = 1.0\ntop_k = 0")).unwrap();
    assert_eq!(wf.steps[0].max_tokens, 32768);
    assert_eq!(wf.steps[0].sampling.temperature, 2.0);
    assert_eq!(parse(&one_step_with("max_tokens = 1")).unwrap().steps[0].max_tokens, 1);
}

#[test]
fn secure_memory_limit_accepts_sizes() {
    let limit = |value: &str| {
        let text = one_step_with("").replace("name = \"t\"", &format!("name = \"t\"\nsecure_memory_limit = {value}"));
        parse(&text).map(|wf| wf.secure_memory_limit)
    };
    assert_eq!(limit("\"320M\"").unwrap(), Some(320 << 20));
    assert_eq!(limit("\"1G\"").unwrap(), Some(1 << 30));
    assert_eq!(limit("\"4096\"").unwrap(), Some(4096));
    assert_eq!(limit("4096").unwrap(), Some(4096));
    assert_eq!(parse(&one_step_with("")).unwrap().secure_memory_limit, None);
    for bad in ["\"320X\"", "\"lots\"", "\"0\"", "0", "-5"] {
        let message = limit(bad).unwrap_err().to_string();
        assert_mentions(&message, &[ORIGIN, "field secure_memory_limit"]);
    }
    assert_mentions(&limit("\"320X\"").unwrap_err().to_string(), &["unit"]);
    assert_mentions(&limit("true").unwrap_err().to_string(), &[ORIGIN, "secure_memory_limit"]);
}

#[test]
fn rendering_substitutes_input_and_outputs() {
    let wf = parse(THREE_STEPS).unwrap();
    let mut outputs = Outputs::new(wf.steps.len());
    assert_eq!(wf.render_prompt(0, "bake bread", &outputs).unwrap(), "Plan: bake bread");
    assert_eq!(
        wf.render_system(0, "bake bread", &outputs).unwrap().as_deref(),
        Some("You plan. Input was bake bread.")
    );
    assert_eq!(wf.render_system(2, "bake bread", &outputs).unwrap(), None);

    outputs.set(0, "1. knead 2. bake");
    assert_eq!(wf.render_prompt(2, "bake bread", &outputs).unwrap(), "Do 1. knead 2. bake for bake bread");
    outputs.set(2, "done: {{ input }}");
    // Outputs are text, never templates.
    assert_eq!(wf.render_prompt(1, "x", &outputs).unwrap(), "Summarize: done: {{ input }}");
}

#[test]
fn rendering_is_strict_about_missing_outputs() {
    let wf = parse(THREE_STEPS).unwrap();
    let outputs = Outputs::new(wf.steps.len());
    let e = wf.render_prompt(2, "bake bread", &outputs).unwrap_err();
    assert!(matches!(&e, WorkflowError::Render { step, field: "prompt", .. } if step == "execute"), "{e:?}");
    assert_mentions(&e.to_string(), &[ORIGIN, "step \"execute\"", "field prompt", "step \"plan\"", "no output"]);

    // A dependency through `after` alone must also have run.
    let text = with_steps(
        "[[steps]]\nname = \"a\"\nmodel = \"m\"\nprompt = \"x\"\n\
         [[steps]]\nname = \"b\"\nmodel = \"m\"\nprompt = \"{{ input }}\"\nafter = [\"a\"]\n",
    );
    let wf = parse(&text).unwrap();
    assert_mentions(&wf.render_prompt(1, "q", &Outputs::new(2)).unwrap_err().to_string(), &["step \"a\""]);

    // Out-of-range step numbers are errors, not panics.
    let e = wf.render_prompt(9, "q", &Outputs::new(2)).unwrap_err();
    assert!(matches!(e, WorkflowError::NoSuchStep { index: 9, count: 2, .. }), "{e:?}");
    assert!(wf.render_system(9, "q", &Outputs::new(2)).is_err());
}

#[test]
fn model_paths_can_be_overridden() {
    let mut wf = parse(THREE_STEPS).unwrap();
    wf.set_model_path("executor", PathBuf::from("other.gguf")).unwrap();
    assert_eq!(wf.models[wf.model_index("executor").unwrap()].path, PathBuf::from("other.gguf"));

    let e = wf.set_model_path("ghost", PathBuf::from("x")).unwrap_err();
    assert!(matches!(e, WorkflowError::UnknownModel { .. }), "{e:?}");
    assert_mentions(&e.to_string(), &[ORIGIN, "\"ghost\"", "executor, planner"]);
    assert!(wf.set_model_path("planner", PathBuf::new()).is_err());
}

#[test]
fn plan_follows_the_order() {
    let wf = parse(THREE_STEPS).unwrap();
    let plan = wf.plan();
    let steps: Vec<usize> = plan.steps.iter().map(|p| p.step).collect();
    assert_eq!(steps, wf.order());
    let planner = wf.model_index("planner").unwrap();
    let executor = wf.model_index("executor").unwrap();
    // plan (planner), execute (executor), summarize (planner).
    assert_eq!(plan.steps[0].prefetch, Some(executor));
    assert!(plan.steps[0].unload_after.is_empty());
    assert_eq!(plan.steps[0].eviction_order, [executor]);
    assert_eq!(plan.steps[1].unload_after, [executor]);
    assert_eq!(plan.steps[1].eviction_order, [planner]);
    assert_eq!(plan.steps[2].unload_after, [planner]);
    assert_eq!(plan.steps[2].prefetch, None);
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/workflows").join(name)
}

#[test]
fn example_workflows_parse() {
    let wf = Workflow::from_file(&example("plan-execute-summarize.toml")).unwrap();
    assert_eq!(wf.name, "plan-execute-summarize");
    assert_eq!(wf.secure_memory_limit, Some(160 << 20));
    let order: Vec<&str> = wf.order().iter().map(|&s| wf.steps[s].name.as_str()).collect();
    assert_eq!(order, ["plan", "execute", "summarize"]);
    assert_eq!(wf.steps[wf.output_step()].name, "summarize");
    let max_tokens: Vec<u32> = wf.steps.iter().map(|s| s.max_tokens).collect();
    assert_eq!(max_tokens, [48, 64, 48]);
    assert_eq!(wf.steps[1].depends_on, [0]);
    assert_eq!(wf.steps[2].depends_on, [1]);
    for model in &wf.models {
        assert!(model.path.starts_with(example("")), "{model:?}");
    }
    let mut outputs = Outputs::new(3);
    outputs.set(0, "1. think");
    assert!(wf.render_prompt(1, "a haiku", &outputs).unwrap().contains("1. think"));

    let wf = Workflow::from_file(&example("retrieve-answer.toml")).unwrap();
    let StepKind::Retrieve(r) = &wf.steps[0].kind else { panic!("{:?}", wf.steps[0].kind) };
    assert_eq!(r.read_passages().unwrap().len(), 10);
    assert_eq!(wf.steps[1].depends_on, [0]);

    let wf = Workflow::from_file(&example("classify-answer.toml")).unwrap();
    let order: Vec<&str> = wf.order().iter().map(|&s| wf.steps[s].name.as_str()).collect();
    assert_eq!(order, ["classify", "answer"]);
    assert_eq!(wf.steps[0].max_tokens, 8);
    assert_eq!(wf.secure_memory_limit, Some(160 << 20));
    let mut outputs = Outputs::new(2);
    outputs.set(0, " Physics\n");
    let prompt = wf.render_prompt(1, "Why is the sky blue?", &outputs).unwrap();
    assert!(prompt.contains("Topic: Physics\nQuestion: Why is the sky blue?"), "{prompt:?}");

    // The real-model agent: the planner (a base model: raw completions)
    // plans and reviews, so the plan keeps it for the review.
    let wf = Workflow::from_file(&example("code-agent.toml")).unwrap();
    assert_eq!(wf.secure_memory_limit, Some(1100 << 20));
    let order: Vec<&str> = wf.order().iter().map(|&s| wf.steps[s].name.as_str()).collect();
    assert_eq!(order, ["plan", "code", "review", "explain"]);
    assert_eq!(wf.steps[wf.output_step()].name, "explain");
    let chat: Vec<bool> = wf.steps.iter().map(|s| s.chat).collect();
    assert_eq!(chat, [false, true, false, true]);
    let plan = wf.plan();
    let planner = plan.steps[0].model;
    assert_eq!(plan.steps[2].model, planner);
    assert!(!plan.steps[0].unload_after.contains(&planner) && !plan.steps[1].unload_after.contains(&planner));
    // While the coder runs, the planner (needed next) is the last to give memory up.
    assert_eq!(plan.steps[1].eviction_order.last(), Some(&planner));
}

#[test]
fn a_retrieve_step_takes_documents_and_no_generation_settings() {
    let wf =
        parse(&one_step_with(r#"retrieve = { documents = "kb/docs.txt", prefix = "search_document: " }"#)).unwrap();
    let StepKind::Retrieve(r) = &wf.steps[0].kind else { panic!("{:?}", wf.steps[0].kind) };
    assert_eq!(r.documents, Path::new("flows/kb/docs.txt"));
    assert_eq!((r.prefix.as_str(), r.passages), ("search_document: ", DEFAULT_PASSAGES));
    assert_eq!(parse(&one_step_with("")).unwrap().steps[0].kind, StepKind::Generate);

    for field in ["max_tokens = 8", "temperature = 0.5", "system = \"x\"", "chat = false", "stop = [\"x\"]"] {
        let text = one_step_with(&format!("{field}\nretrieve = {{ documents = \"d.txt\" }}"));
        let name = field.split(' ').next().unwrap();
        assert_mentions(&error(&text), &[ORIGIN, "step \"s\" field", name, "a retrieve step generates nothing"]);
    }
    let e = error(&one_step_with(r#"retrieve = { documents = "d.txt", passages = 17 }"#));
    assert_mentions(&e, &["step \"s\" field retrieve.passages", "17 is not in 1..=16"]);
    let e = error(&one_step_with(r#"retrieve = { documents = " " }"#));
    assert_mentions(&e, &["step \"s\" field retrieve.documents", "the path is empty"]);
    let e = error(&one_step_with(r#"retrieve = { documents = "d.txt", top = 2 }"#));
    assert_mentions(&e, &[ORIGIN, "top"]);
}

#[test]
fn passages_are_runs_of_lines_between_blank_lines() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs.txt");
    let retrieval = |path: &Path| Retrieval { documents: path.to_path_buf(), prefix: String::new(), passages: 2 };
    std::fs::write(&docs, "\n\nfirst line\n  second line  \n\n \n\t\nthird\n\nlast").unwrap();
    assert_eq!(retrieval(&docs).read_passages().unwrap(), ["first line\nsecond line", "third", "last"]);
    std::fs::write(&docs, " \n\n").unwrap();
    let e = retrieval(&docs).read_passages().unwrap_err().to_string();
    assert_mentions(&e, &["docs.txt", "no passages"]);
    let e = retrieval(&dir.path().join("missing.txt")).read_passages().unwrap_err().to_string();
    assert_mentions(&e, &["missing.txt", "cannot read"]);
}
