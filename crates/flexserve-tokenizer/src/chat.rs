//! Chat templates: the Jinja template stored in `tokenizer.chat_template`.
//!
//! Rendering follows Hugging Face's conventions: blocks trim the newline after
//! them and strip the indentation before them, Python string methods
//! (`.strip()`, `.startswith()`, ...) work, and `raise_exception(msg)` aborts
//! rendering with `msg`. The context holds `messages` (maps with `role` and
//! `content`), `add_generation_prompt`, `bos_token` and `eos_token`.

use std::collections::BTreeMap;

use flexserve_gguf::Metadata;
use minijinja::syntax::SyntaxConfig;
use minijinja::{context, Environment, Error, ErrorKind, Value};

use crate::config::keys;
use crate::{Tokenizer, TokenizerError};

const TEMPLATE_NAME: &str = "chat_template";
/// Prefix that marks errors coming from `raise_exception`.
const RAISED: &str = "raise_exception: ";

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl ChatTemplate {
    /// The model's template, with its BOS / EOS texts; `None` when the metadata has none.
    pub fn from_gguf(meta: &Metadata, tok: &Tokenizer) -> Result<Option<ChatTemplate>, TokenizerError> {
        let source = meta
            .get_str(keys::CHAT_TEMPLATE)
            .map_err(|source| TokenizerError::WrongType { key: keys::CHAT_TEMPLATE, source })?;
        let Some(source) = source else {
            return Ok(None);
        };
        let text = |id: Option<u32>| id.and_then(|id| tok.token_text(id)).unwrap_or("");
        ChatTemplate::new(source, text(tok.bos()), text(tok.eos())).map(Some)
    }

    /// Compiles `source`; fails with the syntax error and its line.
    pub fn new(source: &str, bos_token: &str, eos_token: &str) -> Result<ChatTemplate, TokenizerError> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| TokenizerError::TemplateSyntax(e.to_string()))?;
        env.set_syntax(syntax);
        // A template comes with the model file: bound its work, its depth
        // and (in `render`) its output, whatever it says.
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_recursion_limit(TEMPLATE_RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |message: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED}{message}")))
        });
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|e| TokenizerError::TemplateSyntax(describe(&e)))?;
        Ok(ChatTemplate { env, bos_token: bos_token.to_owned(), eos_token: eos_token.to_owned() })
    }

    /// Renders the conversation; `add_generation_prompt` appends the opening of
    /// the assistant's turn.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String, TokenizerError> {
        let template =
            self.env.get_template(TEMPLATE_NAME).map_err(|e| TokenizerError::TemplateRender(describe(&e)))?;
        let messages: Vec<Value> = messages
            .iter()
            .map(|m| {
                Value::from(BTreeMap::from([
                    ("role", Value::from(m.role.as_str())),
                    ("content", Value::from(m.content.as_str())),
                ]))
            })
            .collect();
        let ctx = context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        let mut out = CappedOutput { bytes: Vec::new(), cap: MAX_RENDERED_BYTES };
        match template.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.bytes)
                .map_err(|_| TokenizerError::TemplateRender("the template rendered invalid UTF-8".to_string())),
            Err(_) if out.bytes.len() >= MAX_RENDERED_BYTES => Err(TokenizerError::TemplateRender(format!(
                "the rendered prompt exceeds the limit of {MAX_RENDERED_BYTES} bytes"
            ))),
            Err(e) => Err(match raised_message(&e) {
                Some(message) => TokenizerError::TemplateException(message),
                None => TokenizerError::TemplateRender(describe(&e)),
            }),
        }
    }
}

/// Steps a template may take for one rendering (minijinja's fuel): real
/// templates take a few hundred per message.
pub const TEMPLATE_FUEL: u64 = 2_000_000;
/// Nesting of macro calls and includes a template may reach.
pub const TEMPLATE_RECURSION_LIMIT: usize = 64;
/// Largest rendered prompt: twice the largest text a request may carry.
pub const MAX_RENDERED_BYTES: usize = 8 << 20;

/// Collects rendered output, refusing to grow past `cap`.
struct CappedOutput {
    bytes: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > self.cap {
            let room = self.cap - self.bytes.len();
            self.bytes.extend_from_slice(&buf[..room]);
            return Err(std::io::Error::other("rendered prompt too large"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The message passed to `raise_exception`, if that is what failed.
fn raised_message(err: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(detail) = e.downcast_ref::<Error>().and_then(Error::detail) {
            if let Some(message) = detail.strip_prefix(RAISED) {
                return Some(message.to_owned());
            }
        }
        current = e.source();
    }
    None
}

/// The error with its location (`... (in chat_template:3)`) and causes.
fn describe(err: &Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
