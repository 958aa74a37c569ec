//! The real model's tokenizer (SmolLM2, byte-level BPE) encodes any text,
//! special tokens parsed, without panicking. The model is the one
//! `scripts/fetch-model.sh` fetches.
#![no_main]

use std::sync::OnceLock;

use flexserve_gguf::GgufFile;
use flexserve_tokenizer::Tokenizer;
use libfuzzer_sys::fuzz_target;

const MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");

fn tokenizer() -> &'static Tokenizer {
    static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
    TOKENIZER.get_or_init(|| {
        let file = GgufFile::open(MODEL).unwrap_or_else(|e| panic!("{MODEL}: {e} (run scripts/fetch-model.sh)"));
        Tokenizer::from_gguf(&file.header.metadata).expect("the real model's tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let tok = tokenizer();
    let _ = tok.encode(&text, true, true);
});
