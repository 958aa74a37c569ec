//! The workflow file format (TOML) and its validation.
//!
//! Parsing happens in two stages: serde reads the file into `Raw*`
//! structs that mirror it (rejecting unknown keys and wrong types, with
//! the TOML parser's line and column), then `build` checks the rules
//! that serde can't express and resolves names to indices.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::error::WorkflowError;
use crate::graph::execution_order;
use crate::template::{self, Reference};
use crate::workflow::{ModelSpec, Retrieval, Step, StepKind, StepSampling, StepTemplates, Workflow};

/// The most tokens a step may ask for: enough for any step of a small
/// agent flow, small enough that a typo (an extra zero or three) is caught.
pub const MAX_TOKENS_LIMIT: u32 = 32768;

/// `max_tokens` when a step doesn't say.
pub const DEFAULT_MAX_TOKENS: u32 = 128;

/// Passages a retrieve step outputs when it doesn't say.
pub const DEFAULT_PASSAGES: usize = 2;

/// The most passages a retrieve step may output: they go into a later
/// step's prompt, which has a context to fit in.
pub const MAX_PASSAGES: usize = 16;

/// The top level of a workflow file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkflow {
    name: String,
    description: Option<String>,
    secure_memory_limit: Option<RawSize>,
    output: Option<String>,
    // Missing tables become empty ones, so the rule they break is
    // reported by validation in workflow terms ("no steps") rather than
    // as a bare "missing field".
    #[serde(default)]
    models: BTreeMap<String, RawModel>,
    #[serde(default)]
    steps: Vec<RawStep>,
}

/// One `[models.NAME]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    path: String,
}

/// One `[[steps]]` table. Optional settings stay `Option` here so that
/// defaults are applied, and bounds checked, in one place ([`build_step`]).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    model: String,
    prompt: String,
    system: Option<String>,
    chat: Option<bool>,
    max_tokens: Option<u32>,
    temperature: Option<f64>,
    top_k: Option<u32>,
    top_p: Option<f64>,
    min_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Vec<String>>,
    after: Option<Vec<String>>,
    retrieve: Option<RawRetrieve>,
}

/// A step's `retrieve = { ... }` table: the step embeds its rendered prompt
/// (the query) and outputs the passages nearest to it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetrieve {
    documents: String,
    prefix: Option<String>,
    passages: Option<usize>,
}

/// `secure_memory_limit` as written: a string such as "320M", or a plain
/// TOML integer of bytes.
#[derive(Debug)]
enum RawSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"320M\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v).map(RawSize::Bytes).map_err(|_| E::custom("size out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// Step names are template variable names (`steps.NAME`), so they must be
/// identifiers: `[A-Za-z_][A-Za-z0-9_]*`.
fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Model names appear on command lines (`NAME=PATH` overrides), so they
/// are kept to `[A-Za-z0-9_-]+`.
fn is_model_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Reads a workflow file.
pub(crate) fn from_file(path: &Path) -> Result<Workflow, WorkflowError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| WorkflowError::Read { path: path.to_path_buf(), source })?;
    parse(&text, path)
}

/// Parses and validates a workflow; `origin` is the file it came from.
pub(crate) fn parse(text: &str, origin: &Path) -> Result<Workflow, WorkflowError> {
    let raw: RawWorkflow = toml::from_str(text).map_err(|e| WorkflowError::Parse {
        path: origin.to_path_buf(),
        message: e.to_string().trim_end().to_string(),
    })?;
    build(raw, origin)
}

/// Builds [`WorkflowError::Invalid`] for this file.
struct Checker<'a> {
    path: &'a Path,
}

impl Checker<'_> {
    fn invalid(&self, what: impl Into<String>, message: impl Into<String>) -> WorkflowError {
        WorkflowError::Invalid { path: self.path.to_path_buf(), what: what.into(), message: message.into() }
    }
}

/// `step "plan" field model`: how messages point at a step's field.
fn at(step: &str, field: &str) -> String {
    format!("step \"{step}\" field {field}")
}

/// Checks the rules serde could not, and resolves names to indices.
fn build(raw: RawWorkflow, origin: &Path) -> Result<Workflow, WorkflowError> {
    let check = Checker { path: origin };
    if raw.name.trim().is_empty() {
        return Err(check.invalid("field name", "the workflow's name is empty"));
    }
    let secure_memory_limit = match raw.secure_memory_limit {
        None => None,
        Some(RawSize::Text(text)) => {
            match flexserve_normal::parse_size(&text).map_err(|m| check.invalid("field secure_memory_limit", m))? {
                0 => return Err(check.invalid("field secure_memory_limit", "the limit must be more than 0 bytes")),
                n => Some(n),
            }
        }
        Some(RawSize::Bytes(n)) => match u64::try_from(n) {
            Ok(n) if n > 0 => Some(n),
            _ => return Err(check.invalid("field secure_memory_limit", "the limit must be more than 0 bytes")),
        },
    };

    // Relative model paths are relative to the workflow file, so a
    // workflow works wherever it is run from.
    let base = origin.parent().unwrap_or_else(|| Path::new(""));
    let mut models = Vec::with_capacity(raw.models.len());
    for (name, model) in raw.models {
        if !is_model_name(&name) {
            return Err(check.invalid(format!("model \"{name}\""), "model names may only use A-Z, a-z, 0-9, _ and -"));
        }
        if model.path.trim().is_empty() {
            return Err(check.invalid(format!("model \"{name}\" field path"), "the path is empty"));
        }
        models.push(ModelSpec { name, path: base.join(model.path) });
    }
    // The same rule for a retrieve step's documents.
    let base = base.to_path_buf();
    let model_index: HashMap<&str, usize> = models.iter().enumerate().map(|(i, m)| (m.name.as_str(), i)).collect();

    if raw.steps.is_empty() {
        return Err(check.invalid("field steps", "the workflow has no steps (add a [[steps]] table)"));
    }
    // Names first: templates and `after` may refer to any step, earlier
    // or later in the file.
    let mut step_index: HashMap<&str, usize> = HashMap::new();
    for (i, step) in raw.steps.iter().enumerate() {
        if !is_identifier(&step.name) {
            // An empty name can't point at its step; its position can.
            let what =
                if step.name.is_empty() { format!("step #{} field name", i + 1) } else { at(&step.name, "name") };
            let message = "step names must match [A-Za-z_][A-Za-z0-9_]*, since templates use them as `steps.NAME`";
            return Err(check.invalid(what, message));
        }
        if step_index.insert(step.name.as_str(), i).is_some() {
            return Err(check.invalid(at(&step.name, "name"), "another step has the same name"));
        }
    }

    let mut steps = Vec::with_capacity(raw.steps.len());
    let mut templates = Vec::with_capacity(raw.steps.len());
    for (i, step) in raw.steps.iter().enumerate() {
        let (built, sources) = build_step(&check, step, i, &model_index, &step_index, &models, &base)?;
        steps.push(built);
        templates.push(sources);
    }

    let used: BTreeSet<usize> = steps.iter().map(|s| s.model).collect();
    if let Some(unused) = models.iter().enumerate().find(|(i, _)| !used.contains(i)) {
        return Err(check.invalid(format!("model \"{}\"", unused.1.name), "declared but used by no step"));
    }

    let depends_on: Vec<Vec<usize>> = steps.iter().map(|s| s.depends_on.clone()).collect();
    let order = execution_order(&depends_on).map_err(|cycle| WorkflowError::Cycle {
        path: origin.to_path_buf(),
        steps: cycle.iter().filter_map(|&s| steps.get(s)).map(|s| s.name.clone()).collect(),
    })?;

    let output = match &raw.output {
        Some(name) => *step_index.get(name.as_str()).ok_or_else(|| {
            check.invalid("field output", format!("there is no step named \"{name}\" (steps: {})", names(&steps)))
        })?,
        // `steps` is non-empty, so the order is too; 0 is never used.
        None => order.last().copied().unwrap_or(0),
    };

    Ok(Workflow {
        name: raw.name,
        description: raw.description,
        secure_memory_limit,
        models,
        steps,
        origin: origin.to_path_buf(),
        order,
        output,
        templates,
    })
}

fn names(steps: &[Step]) -> String {
    steps.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", ")
}

/// The step names, in declaration order, for messages.
fn declared_steps(step_index: &HashMap<&str, usize>) -> String {
    let mut by_index: Vec<(usize, &str)> = step_index.iter().map(|(&name, &i)| (i, name)).collect();
    by_index.sort_unstable();
    by_index.into_iter().map(|(_, name)| name).collect::<Vec<_>>().join(", ")
}

/// Validates one step and resolves its model and dependencies.
fn build_step(
    check: &Checker<'_>,
    step: &RawStep,
    index: usize,
    model_index: &HashMap<&str, usize>,
    step_index: &HashMap<&str, usize>,
    models: &[ModelSpec],
    base: &Path,
) -> Result<(Step, StepTemplates), WorkflowError> {
    let name = step.name.as_str();
    let model = *model_index.get(step.model.as_str()).ok_or_else(|| {
        let known = models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ");
        let known = if known.is_empty() { "none".to_string() } else { known };
        check.invalid(at(name, "model"), format!("model \"{}\" is not declared (declared models: {known})", step.model))
    })?;

    let max_tokens = step.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    if !(1..=MAX_TOKENS_LIMIT).contains(&max_tokens) {
        return Err(check.invalid(at(name, "max_tokens"), format!("{max_tokens} is not in 1..={MAX_TOKENS_LIMIT}")));
    }
    let defaults = StepSampling::default();
    let float = |field, value, default, ok: fn(f32) -> bool, range| {
        float_setting(check, name, field, value, default, ok, range)
    };
    let temperature = float("temperature", step.temperature, defaults.temperature, |t| t >= 0.0, "0 or more")?;
    let top_p = float("top_p", step.top_p, defaults.top_p, |p| p > 0.0 && p <= 1.0, "more than 0 and at most 1")?;
    let min_p = float("min_p", step.min_p, defaults.min_p, |p| (0.0..=1.0).contains(&p), "in 0..=1")?;
    let sampling =
        StepSampling { temperature, top_k: step.top_k.unwrap_or(defaults.top_k), top_p, min_p, seed: step.seed };

    let stop = step.stop.clone().unwrap_or_default();
    if stop.iter().any(String::is_empty) {
        return Err(check.invalid(at(name, "stop"), "a stop string is empty (it would end every generation at once)"));
    }

    if step.prompt.trim().is_empty() {
        return Err(check.invalid(at(name, "prompt"), "the prompt is empty"));
    }
    if step.system.as_deref().is_some_and(|s| s.trim().is_empty()) {
        return Err(check.invalid(at(name, "system"), "the system message is empty (leave the field out instead)"));
    }

    let mut depends_on = Vec::new();
    let fields = [("prompt", Some(step.prompt.as_str())), ("system", step.system.as_deref())];
    for (field, source) in fields {
        let Some(source) = source else { continue };
        depends_on.extend(template_dependencies(check, name, field, source, step_index)?);
    }
    for other in step.after.iter().flatten() {
        let dep = *step_index
            .get(other.as_str())
            .ok_or_else(|| check.invalid(at(name, "after"), format!("there is no step named \"{other}\"")))?;
        if dep == index {
            return Err(check.invalid(at(name, "after"), "a step can't run after itself"));
        }
        depends_on.push(dep);
    }
    depends_on.sort_unstable();
    depends_on.dedup();

    let kind = match &step.retrieve {
        None => StepKind::Generate,
        Some(r) => StepKind::Retrieve(build_retrieval(check, step, r, base)?),
    };
    let built = Step {
        name: step.name.clone(),
        kind,
        model,
        chat: step.chat.unwrap_or(true),
        max_tokens,
        sampling,
        stop,
        depends_on,
    };
    Ok((built, StepTemplates { prompt: step.prompt.clone(), system: step.system.clone() }))
}

/// A retrieve step's settings; its generation settings must be absent.
fn build_retrieval(
    check: &Checker<'_>,
    step: &RawStep,
    raw: &RawRetrieve,
    base: &Path,
) -> Result<Retrieval, WorkflowError> {
    let name = step.name.as_str();
    let generation_only = [
        ("system", step.system.is_some()),
        ("chat", step.chat.is_some()),
        ("max_tokens", step.max_tokens.is_some()),
        ("temperature", step.temperature.is_some()),
        ("top_k", step.top_k.is_some()),
        ("top_p", step.top_p.is_some()),
        ("min_p", step.min_p.is_some()),
        ("seed", step.seed.is_some()),
        ("stop", step.stop.is_some()),
    ];
    if let Some((field, _)) = generation_only.iter().find(|(_, given)| *given) {
        return Err(check.invalid(at(name, field), "a retrieve step generates nothing: leave the field out"));
    }
    if raw.documents.trim().is_empty() {
        return Err(check.invalid(at(name, "retrieve.documents"), "the path is empty"));
    }
    let passages = raw.passages.unwrap_or(DEFAULT_PASSAGES);
    if !(1..=MAX_PASSAGES).contains(&passages) {
        return Err(check.invalid(at(name, "retrieve.passages"), format!("{passages} is not in 1..={MAX_PASSAGES}")));
    }
    Ok(Retrieval { documents: base.join(&raw.documents), prefix: raw.prefix.clone().unwrap_or_default(), passages })
}

/// A float setting: the default if absent; otherwise it must be finite
/// (as an `f32`, which is what samplers use) and pass `ok`, which `range`
/// describes for the message.
fn float_setting(
    check: &Checker<'_>,
    step: &str,
    field: &str,
    value: Option<f64>,
    default: f32,
    ok: fn(f32) -> bool,
    range: &str,
) -> Result<f32, WorkflowError> {
    let Some(value) = value else { return Ok(default) };
    // Narrowing is intended: an f64 beyond f32's range becomes infinite,
    // and is rejected just below.
    let narrowed = value as f32;
    if !narrowed.is_finite() {
        return Err(check.invalid(at(step, field), format!("{value} is not a finite number")));
    }
    if !ok(narrowed) {
        return Err(check.invalid(at(step, field), format!("{value} is out of range: it must be {range}")));
    }
    Ok(narrowed)
}

/// The steps a template references (indices), after checking that every
/// variable it uses is allowed and every step it names exists.
fn template_dependencies(
    check: &Checker<'_>,
    step: &str,
    field: &'static str,
    source: &str,
    step_index: &HashMap<&str, usize>,
) -> Result<Vec<usize>, WorkflowError> {
    let label = format!("{step}.{field}");
    let references = template::references(&label, source).map_err(|message| WorkflowError::Template {
        path: check.path.to_path_buf(),
        step: step.to_string(),
        field,
        message,
    })?;
    let mut deps = Vec::new();
    for reference in references {
        match reference {
            Reference::Bad { variable, why } => {
                return Err(check.invalid(at(step, field), format!("variable `{variable}` is not allowed: {why}")));
            }
            Reference::Step(other) if other == step => {
                return Err(check.invalid(
                    at(step, field),
                    format!("variable `steps.{other}` refers to the step's own output, which does not exist yet"),
                ));
            }
            Reference::Step(other) => match step_index.get(other.as_str()) {
                Some(&dep) => deps.push(dep),
                None => {
                    return Err(check.invalid(
                        at(step, field),
                        format!(
                            "variable `steps.{other}` names a step that does not exist (steps: {})",
                            declared_steps(step_index)
                        ),
                    ));
                }
            },
        }
    }
    Ok(deps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_identifier("plan"));
        assert!(is_identifier("_x9"));
        assert!(!is_identifier("9x"));
        assert!(!is_identifier("my-step"));
        assert!(!is_identifier(""));
        assert!(!is_identifier("é"));
        assert!(is_model_name("small-1"));
        assert!(!is_model_name("a=b"));
    }
}
