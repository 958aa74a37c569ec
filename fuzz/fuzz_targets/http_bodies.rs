//! The OpenAI-compatible HTTP API parses request bodies from any client:
//! deserializing (and turning message contents into text) must not panic.
#![no_main]

use flexserve_server::api::{ChatRequest, CompletionRequest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(chat) = serde_json::from_slice::<ChatRequest>(data) {
        for message in chat.messages {
            let _ = message.content.into_text();
        }
        if let Some(stop) = chat.params.stop {
            let _ = stop.into_vec();
        }
    }
    let _ = serde_json::from_slice::<CompletionRequest>(data);
});
