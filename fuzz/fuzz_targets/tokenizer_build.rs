//! A tokenizer built from hostile `tokenizer.ggml.*` metadata either loads or
//! is refused with an error; once loaded, it encodes, decodes and streams any
//! text without panicking. The vocabulary, types, scores, merges, special ids
//! and flags all come from the fuzzer.
#![no_main]

use flexserve_gguf::{Metadata, Value};
use flexserve_tokenizer::{keys, StreamDecoder, Tokenizer};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;

#[derive(Arbitrary, Debug)]
struct Vocabulary {
    /// Index into MODEL_NAMES (wrapping).
    model: u8,
    /// Index into PRE_NAMES; past its end, a name no split rules have.
    pre: u8,
    tokens: Vec<String>,
    types: Option<Vec<i32>>,
    scores: Option<Vec<f32>>,
    merges: Vec<String>,
    special_ids: [Option<u32>; 9],
    flags: [Option<bool>; 3],
    text: String,
}

const MODEL_NAMES: &[&str] = &["llama", "gpt2", "bert"];
const PRE_NAMES: &[&str] = &["default", "gpt2", "smollm", "llama-bpe", "qwen2", "qwen35", "falcon", "mpt", "command-r"];
const ID_KEYS: [&str; 9] = [
    keys::BOS_ID,
    keys::EOS_ID,
    keys::EOT_ID,
    keys::EOM_ID,
    keys::UNK_ID,
    keys::PAD_ID,
    keys::FIM_PAD_ID,
    keys::FIM_REP_ID,
    keys::FIM_SEP_ID,
];
const FLAG_KEYS: [&str; 3] = [keys::ADD_BOS, keys::ADD_EOS, keys::ADD_SPACE_PREFIX];

fn metadata(v: &Vocabulary) -> Metadata {
    let mut meta = Metadata::new();
    meta.insert(keys::MODEL, Value::from(MODEL_NAMES[usize::from(v.model) % MODEL_NAMES.len()]));
    meta.insert(keys::PRE, Value::from(PRE_NAMES.get(usize::from(v.pre)).copied().unwrap_or("no-such-rules")));
    meta.insert(keys::TOKENS, Value::string_array(v.tokens.clone()));
    if let Some(types) = &v.types {
        meta.insert(keys::TOKEN_TYPE, Value::i32_array(types.clone()));
    }
    if let Some(scores) = &v.scores {
        meta.insert(keys::SCORES, Value::f32_array(scores.clone()));
    }
    meta.insert(keys::MERGES, Value::string_array(v.merges.clone()));
    for (key, id) in ID_KEYS.iter().zip(v.special_ids) {
        if let Some(id) = id {
            meta.insert(*key, Value::from(id));
        }
    }
    for (key, flag) in FLAG_KEYS.iter().zip(v.flags) {
        if let Some(flag) = flag {
            meta.insert(*key, Value::from(flag));
        }
    }
    meta
}

fuzz_target!(|v: Vocabulary| {
    let Ok(tok) = Tokenizer::from_gguf(&metadata(&v)) else {
        return;
    };
    for (add_special, parse_special) in [(true, true), (false, false)] {
        let ids = tok.encode(&v.text, add_special, parse_special);
        assert!(ids.iter().all(|&id| (id as usize) < tok.n_vocab()), "an id outside the vocabulary");
        let _ = tok.decode(&ids);
        let mut stream = StreamDecoder::new(&tok);
        for &id in &ids {
            let _ = stream.push(id);
        }
        let _ = stream.finish();
    }
});
