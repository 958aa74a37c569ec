//! The one error type of this crate.
//!
//! Every variant carries the workflow file's path so that a message read
//! on its own (in a log, on a terminal) still says which file is at fault,
//! and, where one is involved, the step or model and the field.

use std::io;
use std::path::PathBuf;

/// What went wrong reading, validating or rendering a workflow.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    /// The workflow file could not be read.
    #[error("{}: cannot read the workflow file: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: io::Error,
    },

    /// The file is not valid TOML, or does not have the workflow's shape
    /// (a missing field, a value of the wrong type, an unknown key).
    #[error("{}: {message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML parser's message, with its line and column.
        message: String,
    },

    /// The file is well-formed but breaks a rule of the workflow format.
    #[error("{}: {what}: {message}", .path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Where the problem is, e.g. `step "plan" field model`.
        what: String,
        /// What the problem is.
        message: String,
    },

    /// A retrieve step's documents file is unusable.
    #[error("{}: documents: {message}", .path.display())]
    Documents {
        /// The documents file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },

    /// The steps' dependencies form a cycle, so no order can run them.
    #[error(
        "{}: steps {} form a cycle (each step needs the one before it)",
        .path.display(),
        cycle_text(.steps)
    )]
    Cycle {
        /// The file.
        path: PathBuf,
        /// The steps of one cycle, each needed by the next; the last one
        /// is needed by the first.
        steps: Vec<String>,
    },

    /// A template (a step's prompt or system message) does not compile.
    #[error("{}: step \"{step}\" field {field}: template error: {message}", .path.display())]
    Template {
        /// The file.
        path: PathBuf,
        /// The step whose template is at fault.
        step: String,
        /// `prompt` or `system`.
        field: &'static str,
        /// The template engine's message.
        message: String,
    },

    /// A template failed while being rendered.
    #[error("{}: step \"{step}\" field {field}: cannot render: {message}", .path.display())]
    Render {
        /// The file.
        path: PathBuf,
        /// The step being rendered.
        step: String,
        /// `prompt` or `system`.
        field: &'static str,
        /// Why rendering failed.
        message: String,
    },

    /// A model name given from outside (e.g. on the command line) is not
    /// one the workflow declares.
    #[error("{}: the workflow has no model named \"{name}\" (its models: {})", .path.display(), .known.join(", "))]
    UnknownModel {
        /// The file.
        path: PathBuf,
        /// The name asked for.
        name: String,
        /// The models the workflow declares.
        known: Vec<String>,
    },

    /// A step index that is not one of the workflow's steps.
    #[error("{}: there is no step number {index} (the workflow has {count} steps)", .path.display())]
    NoSuchStep {
        /// The file.
        path: PathBuf,
        /// The index asked for.
        index: usize,
        /// How many steps there are.
        count: usize,
    },
}

/// `a -> b -> a`: the cycle closed back on its first step, so that it
/// reads as a loop.
fn cycle_text(steps: &[String]) -> String {
    let mut parts: Vec<&str> = steps.iter().map(String::as_str).collect();
    if let Some(first) = steps.first() {
        parts.push(first);
    }
    parts.join(" -> ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_message_closes_the_loop() {
        let e = WorkflowError::Cycle { path: "wf.toml".into(), steps: vec!["a".into(), "b".into()] };
        let text = e.to_string();
        assert!(text.starts_with("wf.toml: steps a -> b -> a form a cycle"), "{text}");
    }

    #[test]
    fn messages_name_file_step_and_field() {
        let e = WorkflowError::Template {
            path: "dir/wf.toml".into(),
            step: "plan".into(),
            field: "prompt",
            message: "syntax error".into(),
        };
        assert_eq!(e.to_string(), "dir/wf.toml: step \"plan\" field prompt: template error: syntax error");
        let e = WorkflowError::UnknownModel {
            path: "wf.toml".into(),
            name: "x".into(),
            known: vec!["a".into(), "b".into()],
        };
        assert!(e.to_string().contains("no model named \"x\" (its models: a, b)"));
    }
}
