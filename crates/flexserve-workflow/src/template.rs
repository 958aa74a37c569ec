//! Prompt templates: checking what they reference, and rendering them.
//!
//! A template may use `input` (the user's text) and `steps.NAME` (the
//! output of step NAME). Templates are plain text (no autoescaping) and
//! strict: a value that is not there is an error, never an empty string,
//! so a step can't silently run on a prompt with a hole in it.
//!
//! The user's input and the steps' outputs are passed as values, never
//! spliced into template source, so model output can't inject template
//! syntax into a later step.

use std::collections::BTreeMap;
use std::collections::BTreeSet;

use minijinja::{AutoEscape, Environment, UndefinedBehavior, Value};

/// The variable holding the user's input.
pub(crate) const INPUT: &str = "input";
/// The variable holding earlier steps' outputs, by step name.
pub(crate) const STEPS: &str = "steps";

/// Functions minijinja provides as globals with the `builtins` feature.
/// The reference check sees them as variables; they are not data, so they
/// are allowed (`{% for i in range(3) %}` is a fair thing to write).
const BUILTIN_FUNCTIONS: &[&str] = &["range", "dict", "namespace"];

/// What a template refers to, or why one of its references is not allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Reference {
    /// `steps.NAME`: the output of step NAME.
    Step(String),
    /// A variable that is neither `input` nor `steps.NAME`, with why.
    Bad { variable: String, why: String },
}

/// An environment configured the way every workflow template is rendered.
/// It holds no templates: each one is compiled on its own, so a template
/// can't reach another by name (through `include` or `import`) behind the
/// reference check's back.
fn environment<'source>() -> Environment<'source> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env
}

/// Compiles `source` and lists what it references, sorted (so messages
/// are deterministic). `name` labels the template in minijinja's messages
/// (e.g. `plan.prompt`). Errors are minijinja's syntax error message.
pub(crate) fn references(name: &str, source: &str) -> Result<Vec<Reference>, String> {
    let env = environment();
    let template = env.template_from_named_str(name, source).map_err(|e| e.to_string())?;
    // Nested names ("steps.plan", not just "steps") are what tie a
    // reference to one step.
    let variables: BTreeSet<String> = template.undeclared_variables(true).into_iter().collect();
    Ok(variables.into_iter().filter_map(classify).collect())
}

/// Sorts one undeclared variable into a step reference, an allowed name
/// (`None`), or a bad one.
fn classify(variable: String) -> Option<Reference> {
    let mut parts = variable.split('.');
    let head = parts.next().unwrap_or_default();
    let rest: Vec<&str> = parts.collect();
    let bad = |why: &str| Some(Reference::Bad { variable: variable.clone(), why: why.to_string() });
    match (head, rest.as_slice()) {
        (INPUT, []) => None,
        (INPUT, _) => bad("`input` is plain text and has no attributes"),
        (STEPS, [step]) => Some(Reference::Step((*step).to_string())),
        (STEPS, []) => bad("`steps` must be used with a step name, as in `steps.plan`"),
        (STEPS, _) => bad("a step's output is plain text and has no attributes"),
        (name, []) if BUILTIN_FUNCTIONS.contains(&name) => None,
        _ => bad("templates may only use `input` and `steps.NAME`"),
    }
}

/// Renders `source` (labelled `name` in messages) with `input` and the
/// given step outputs (step name to output text).
pub(crate) fn render(name: &str, source: &str, input: &str, steps: &BTreeMap<&str, &str>) -> Result<String, String> {
    let env = environment();
    let template = env.template_from_named_str(name, source).map_err(|e| e.to_string())?;
    let steps: BTreeMap<String, Value> =
        steps.iter().map(|(name, text)| ((*name).to_string(), Value::from(*text))).collect();
    let mut context: BTreeMap<String, Value> = BTreeMap::new();
    context.insert(INPUT.to_string(), Value::from(input));
    context.insert(STEPS.to_string(), Value::from(steps));
    template.render(Value::from(context)).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(name: &str) -> Reference {
        Reference::Step(name.to_string())
    }

    #[test]
    fn finds_step_references_sorted_and_once() {
        let refs = references("t", "{{ steps.b }} {{ input }} {{ steps.a | upper }} {{ steps.b }}").unwrap();
        assert_eq!(refs, vec![step("a"), step("b")]);
    }

    #[test]
    fn references_inside_blocks_count() {
        let refs = references("t", "{% if input %}{{ steps.x }}{% endif %}{% for i in range(2) %}{{ i }}{% endfor %}");
        assert_eq!(refs.unwrap(), vec![step("x")]);
    }

    #[test]
    fn bad_references_are_flagged() {
        let refs = references("t", "{{ steps }}").unwrap();
        assert!(matches!(&refs[..], [Reference::Bad { variable, .. }] if variable == "steps"));
        let refs = references("t", "{{ user }}").unwrap();
        assert!(matches!(&refs[..], [Reference::Bad { variable, .. }] if variable == "user"));
        let refs = references("t", "{{ steps.a.b }}").unwrap();
        assert!(matches!(&refs[..], [Reference::Bad { variable, .. }] if variable == "steps.a.b"));
        let refs = references("t", "{{ input.x }}").unwrap();
        assert!(matches!(&refs[..], [Reference::Bad { variable, .. }] if variable == "input.x"));
        // Subscripts hide the name; the bare `steps` is what shows.
        let refs = references("t", "{{ steps['a'] }}").unwrap();
        assert!(matches!(&refs[..], [Reference::Bad { variable, .. }] if variable == "steps"));
    }

    #[test]
    fn locals_are_not_references() {
        let refs = references("t", "{% set x = input %}{{ x }}{% for w in [1] %}{{ w }}{{ loop.index }}{% endfor %}");
        assert_eq!(refs.unwrap(), vec![]);
    }

    #[test]
    fn syntax_errors_carry_minijinja_message() {
        let e = references("plan.prompt", "{{ input ").unwrap_err();
        assert!(e.contains("syntax error"), "{e}");
        assert!(e.contains("plan.prompt"), "{e}");
    }

    #[test]
    fn renders_plain_text_without_escaping() {
        let steps = BTreeMap::from([("a", "<b>&\"x\"</b>")]);
        let text = render("t", "{{ input }}|{{ steps.a }}", "1 < 2", &steps).unwrap();
        assert_eq!(text, "1 < 2|<b>&\"x\"</b>");
    }

    #[test]
    fn values_are_not_reinterpreted_as_templates() {
        let steps = BTreeMap::from([("a", "{{ input }}")]);
        assert_eq!(render("t", "{{ steps.a }}", "secret", &steps).unwrap(), "{{ input }}");
    }

    #[test]
    fn missing_values_are_errors() {
        let e = render("t", "[{{ steps.a }}]", "", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("undefined"), "{e}");
        let e = render("t", "{% if steps.a %}x{% endif %}", "", &BTreeMap::new()).unwrap_err();
        assert!(e.contains("undefined"), "{e}");
    }
}
