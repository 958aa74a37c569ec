//! Chat templates come from model files: compiling and rendering any template
//! may fail, but must not panic or hang. The input is NUL-separated: the
//! template source, then role, content, role, content, ...; the length's
//! parity picks `add_generation_prompt`.
#![no_main]

use flexserve_tokenizer::{ChatMessage, ChatTemplate};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|&b| b == 0).map(String::from_utf8_lossy);
    let source = parts.next().unwrap_or_default();
    let Ok(template) = ChatTemplate::new(&source, "<s>", "</s>") else {
        return;
    };
    let rest: Vec<_> = parts.collect();
    let messages: Vec<ChatMessage> = rest
        .chunks(2)
        .take(8)
        .map(|pair| ChatMessage::new(pair[0].as_ref(), pair.get(1).map(|c| c.as_ref()).unwrap_or("")))
        .collect();
    let _ = template.render(&messages, data.len() % 2 == 1);
});
