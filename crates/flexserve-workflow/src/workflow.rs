//! A validated workflow and what can be asked of it: its order, its
//! output step, its prompts and its residency plan.
//!
//! Values of [`Workflow`] come from [`Workflow::parse`] or
//! [`Workflow::from_file`] (see `definition.rs`), which check every rule;
//! the methods here rely on that but still never index blindly, so a
//! workflow whose public fields were edited afterwards yields errors or
//! shorter plans, not panics.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::WorkflowError;
use crate::plan::{residency_plan, ResidencyPlan};
use crate::template;

/// A workflow: models, and steps that run them on prompts built from the
/// user's input and earlier steps' outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    /// The workflow's name.
    pub name: String,
    /// What it is for, if the file says.
    pub description: Option<String>,
    /// The secure memory budget (bytes) its benchmark runs under, if the
    /// file gives one.
    pub secure_memory_limit: Option<u64>,
    /// The models, sorted by name (so indices don't depend on how a TOML
    /// library orders a table).
    pub models: Vec<ModelSpec>,
    /// The steps, in declaration order.
    pub steps: Vec<Step>,
    /// The file it came from: for messages.
    pub(crate) origin: PathBuf,
    /// A topological order of the steps (indices).
    pub(crate) order: Vec<usize>,
    /// The step whose output is the workflow's answer.
    pub(crate) output: usize,
    /// The template sources of each step, by step index.
    pub(crate) templates: Vec<StepTemplates>,
}

/// A model the workflow uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Its name (the key under `[models]`).
    pub name: String,
    /// Where its file is. A relative path in the workflow file is resolved
    /// against the workflow file's directory.
    pub path: PathBuf,
}

/// One step: a model run on a rendered prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Its name, unique within the workflow (`steps.NAME` in templates).
    pub name: String,
    /// What the step does with its model.
    pub kind: StepKind,
    /// The model it runs (an index into [`Workflow::models`]).
    pub model: usize,
    /// `true`: the prompt goes through the model's chat template as a user
    /// message (after the system message, if any). `false`: raw completion.
    pub chat: bool,
    /// The most tokens to generate.
    pub max_tokens: u32,
    /// How to sample.
    pub sampling: StepSampling,
    /// Strings that end generation when produced.
    pub stop: Vec<String>,
    /// The steps that must run first (indices; sorted, no duplicates):
    /// those its templates reference, and those its `after` names.
    pub depends_on: Vec<usize>,
}

/// What a step does with its model and rendered prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    /// Generates text from the prompt (the generation settings apply).
    Generate,
    /// Embeds the prompt as a query with an encoder model and outputs the
    /// passages of a document file nearest to it (the generation settings
    /// are unused).
    Retrieve(Retrieval),
}

/// A retrieve step's documents and how many passages it outputs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retrieval {
    /// A text file of passages separated by blank lines. A relative path in
    /// the workflow file is resolved against the workflow file's directory.
    pub documents: PathBuf,
    /// Prepended to every passage when it is embedded (an encoder's task
    /// prefix, such as nomic-embed's `search_document: `); not in the output.
    pub prefix: String,
    /// Passages output, the nearest first.
    pub passages: usize,
}

/// Passages in a documents file larger than this are refused: they are all
/// embedded when the step first runs.
pub const MAX_DOCUMENTS_BYTES: u64 = 4 << 20;

impl Retrieval {
    /// The passages of the documents file: runs of non-blank lines, trimmed,
    /// in file order. Errors name the file.
    pub fn read_passages(&self) -> Result<Vec<String>, WorkflowError> {
        let read = |source| WorkflowError::Read { path: self.documents.clone(), source };
        let size = std::fs::metadata(&self.documents).map_err(read)?.len();
        if size > MAX_DOCUMENTS_BYTES {
            return Err(WorkflowError::Documents {
                path: self.documents.clone(),
                message: format!("{size} bytes is over the {MAX_DOCUMENTS_BYTES}-byte bound of a documents file"),
            });
        }
        let text = std::fs::read_to_string(&self.documents).map_err(read)?;
        let mut passages = Vec::new();
        let mut current: Vec<&str> = Vec::new();
        for line in text.lines().chain(std::iter::once("")) {
            if line.trim().is_empty() {
                if !current.is_empty() {
                    passages.push(current.join("\n"));
                    current.clear();
                }
            } else {
                current.push(line.trim());
            }
        }
        if passages.is_empty() {
            return Err(WorkflowError::Documents {
                path: self.documents.clone(),
                message: "the file holds no passages (passages are separated by blank lines)".into(),
            });
        }
        Ok(passages)
    }
}

/// Sampling settings of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepSampling {
    /// 0 is greedy (the default, so that workflows are reproducible).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens (0: no limit).
    pub top_k: u32,
    /// Keep the most likely tokens whose probabilities sum to `top_p`.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` times the most likely (0: off).
    pub min_p: f32,
    /// The random seed, if the file fixes one.
    pub seed: Option<u64>,
}

impl Default for StepSampling {
    fn default() -> Self {
        StepSampling { temperature: 0.0, top_k: 40, top_p: 0.95, min_p: 0.05, seed: None }
    }
}

/// The template sources of one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepTemplates {
    pub(crate) prompt: String,
    pub(crate) system: Option<String>,
}

/// Outputs of the steps run so far, by step index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outputs {
    texts: Vec<Option<String>>,
}

impl Outputs {
    /// No outputs yet, for a workflow of `n_steps` steps.
    pub fn new(n_steps: usize) -> Self {
        Outputs { texts: vec![None; n_steps] }
    }

    /// Records (or replaces) the output of `step`.
    pub fn set(&mut self, step: usize, text: impl Into<String>) {
        // Grow rather than panic on an index past the end.
        if step >= self.texts.len() {
            self.texts.resize(step + 1, None);
        }
        self.texts[step] = Some(text.into());
    }

    /// The output of `step`, if it has one.
    pub fn get(&self, step: usize) -> Option<&str> {
        self.texts.get(step).and_then(|t| t.as_deref())
    }
}

/// The template fields of a step, as named in the file and in messages.
#[derive(Debug, Clone, Copy)]
enum Field {
    Prompt,
    System,
}

impl Field {
    fn name(self) -> &'static str {
        match self {
            Field::Prompt => "prompt",
            Field::System => "system",
        }
    }
}

impl Workflow {
    /// The file the workflow was read from (as given to `parse` or
    /// `from_file`).
    pub fn origin(&self) -> &Path {
        &self.origin
    }

    /// The execution order: step indices, dependencies first; among steps
    /// that are ready together, the one declared first.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// The step whose output is the workflow's answer: the one `output`
    /// names, else the last in execution order.
    pub fn output_step(&self) -> usize {
        self.output
    }

    /// The index of the step called `name`.
    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }

    /// The index of the model called `name`.
    pub fn model_index(&self, name: &str) -> Option<usize> {
        self.models.iter().position(|m| m.name == name)
    }

    /// Points model `name` at another file (e.g. a command-line override).
    /// The path is used as given, not resolved against the workflow file.
    pub fn set_model_path(&mut self, name: &str, path: PathBuf) -> Result<(), WorkflowError> {
        if path.as_os_str().is_empty() {
            return Err(WorkflowError::Invalid {
                path: self.origin.clone(),
                what: format!("model \"{name}\" field path"),
                message: "the path is empty".to_string(),
            });
        }
        match self.models.iter_mut().find(|m| m.name == name) {
            Some(model) => {
                model.path = path;
                Ok(())
            }
            None => Err(WorkflowError::UnknownModel {
                path: self.origin.clone(),
                name: name.to_string(),
                known: self.models.iter().map(|m| m.name.clone()).collect(),
            }),
        }
    }

    /// Renders the prompt of `step`, given the user's input and the
    /// outputs so far. Every step it depends on must have an output.
    pub fn render_prompt(&self, step: usize, input: &str, outputs: &Outputs) -> Result<String, WorkflowError> {
        let source = self.templates_of(step)?.prompt.as_str();
        self.render(step, Field::Prompt, source, input, outputs)
    }

    /// Renders the system message of `step`, if it has one.
    pub fn render_system(&self, step: usize, input: &str, outputs: &Outputs) -> Result<Option<String>, WorkflowError> {
        match &self.templates_of(step)?.system {
            Some(source) => self.render(step, Field::System, source, input, outputs).map(Some),
            None => Ok(None),
        }
    }

    /// The residency plan for running the steps in [`Workflow::order`].
    pub fn plan(&self) -> ResidencyPlan {
        let step_models: Vec<usize> = self.steps.iter().map(|s| s.model).collect();
        residency_plan(&self.order, &step_models)
    }

    fn templates_of(&self, step: usize) -> Result<&StepTemplates, WorkflowError> {
        self.templates.get(step).filter(|_| step < self.steps.len()).ok_or_else(|| WorkflowError::NoSuchStep {
            path: self.origin.clone(),
            index: step,
            count: self.steps.len(),
        })
    }

    fn render(
        &self,
        step: usize,
        field: Field,
        source: &str,
        input: &str,
        outputs: &Outputs,
    ) -> Result<String, WorkflowError> {
        let this = self.steps.get(step).map(|s| s.name.as_str()).unwrap_or_default();
        let error = |message: String| WorkflowError::Render {
            path: self.origin.clone(),
            step: this.to_string(),
            field: field.name(),
            message,
        };
        // Only the step's dependencies are visible to it: a template can
        // only reference those (checked at parse time), and checking them
        // all here names the missing one even if the template would only
        // reach it on some inputs.
        let mut visible: BTreeMap<&str, &str> = BTreeMap::new();
        for &dep in self.steps.get(step).map(|s| s.depends_on.as_slice()).unwrap_or_default() {
            let name = self.steps.get(dep).map(|s| s.name.as_str()).unwrap_or_default();
            match outputs.get(dep) {
                Some(text) => {
                    visible.insert(name, text);
                }
                None => return Err(error(format!("it depends on step \"{name}\", which has no output yet"))),
            }
        }
        let label = format!("{this}.{}", field.name());
        template::render(&label, source, input, &visible).map_err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_grow_instead_of_panicking() {
        let mut outputs = Outputs::new(1);
        outputs.set(3, "late");
        assert_eq!(outputs.get(3), Some("late"));
        assert_eq!(outputs.get(0), None);
        assert_eq!(outputs.get(99), None);
        outputs.set(0, String::from("a"));
        outputs.set(0, "b");
        assert_eq!(outputs.get(0), Some("b"));
    }

    #[test]
    fn default_sampling_is_greedy() {
        let s = StepSampling::default();
        assert_eq!(s.temperature, 0.0);
        assert_eq!((s.top_k, s.top_p, s.min_p, s.seed), (40, 0.95, 0.05, None));
    }
}
