//! Multi-model agent workflows.
//!
//! A workflow is a small declared graph of steps, written in TOML. Each
//! step names a model, a prompt template that may use the user's input and
//! earlier steps' outputs, sampling settings and a token limit:
//!
//! ```toml
//! name = "plan-execute"
//! secure_memory_limit = "160M"
//!
//! [models.planner]
//! path = "models/planner.fsm"     # relative to this file's directory
//!
//! [[steps]]
//! name = "plan"
//! model = "planner"
//! prompt = "Make a short plan for: {{ input }}"
//! max_tokens = 64
//!
//! [[steps]]
//! name = "execute"
//! model = "planner"
//! prompt = "Task: {{ input }}\nPlan: {{ steps.plan }}\nDo it."
//! ```
//!
//! This crate reads and validates such files ([`Workflow::parse`],
//! [`Workflow::from_file`]), derives which steps depend on which (every
//! `steps.NAME` a template uses, plus `after`), orders them
//! ([`Workflow::order`]), renders prompts ([`Workflow::render_prompt`])
//! and plans which models to keep in secure memory ([`Workflow::plan`]).
//! It runs no model: that is the runner's job, elsewhere.
//!
//! Layout, by job: [`definition`] (the file format and its validation),
//! `graph` (dependencies, order, cycles), `template` (references and
//! rendering), [`workflow`] (the validated workflow and its methods),
//! [`plan`] (the residency plan), [`error`].

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod definition;
pub mod error;
mod graph;
pub mod plan;
mod template;
pub mod workflow;

use std::path::Path;

pub use definition::{DEFAULT_MAX_TOKENS, DEFAULT_PASSAGES, MAX_PASSAGES, MAX_TOKENS_LIMIT};
pub use error::WorkflowError;
pub use plan::{next_use, ResidencyPlan, StepPlan};
pub use workflow::{ModelSpec, Outputs, Retrieval, Step, StepKind, StepSampling, Workflow, MAX_DOCUMENTS_BYTES};

impl Workflow {
    /// Reads and validates the workflow file at `path`. Errors name the
    /// file (and the step, model and field at fault).
    pub fn from_file(path: &Path) -> Result<Workflow, WorkflowError> {
        definition::from_file(path)
    }

    /// Parses and validates a workflow from `text`. `origin` is the file it
    /// came from: it is named in errors, and relative model paths are
    /// resolved against its directory.
    pub fn parse(text: &str, origin: &Path) -> Result<Workflow, WorkflowError> {
        definition::parse(text, origin)
    }
}
