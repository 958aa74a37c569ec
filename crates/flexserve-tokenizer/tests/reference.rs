//! The real model's tokenizer against llama.cpp's recorded token ids
//! (../shared/reference/tokenizer.json and greedy.json).

use std::path::{Path, PathBuf};

use flexserve_gguf::GgufFile;
use flexserve_tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer};
use serde_json::Value as Json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model's metadata, or None (with a note) when the model is not fetched.
fn load() -> Option<flexserve_gguf::Metadata> {
    let path = root().join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("note: {} is missing (run scripts/fetch-model.sh); skipping", path.display());
        return None;
    }
    Some(GgufFile::open(&path).unwrap().header.metadata)
}

fn reference(name: &str) -> Json {
    let p = root().join("../shared/reference").join(name);
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_cases_match_llama_cpp() {
    let Some(meta) = load() else { return };
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let cases = reference("tokenizer.json");
    let cases = cases["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        assert_eq!(tok.encode(text, true, true), expected, "case {name}: ids");
        assert_eq!(
            tok.encode(text, true, false),
            ids(&case["ids_no_parse_special"]),
            "case {name}: ids_no_parse_special"
        );
        // Text without special tokens comes back exactly.
        if !tok.encode(text, false, true).iter().any(|&id| tok.is_control(id)) {
            assert_eq!(tok.decode(&expected), text, "case {name}: decode");
            let mut stream = StreamDecoder::new(&tok);
            let mut streamed: String = expected.iter().map(|&id| stream.push(id)).collect();
            streamed.push_str(&stream.finish());
            assert_eq!(streamed, text, "case {name}: streamed decode");
        }
    }
}

#[test]
fn greedy_prompts_match_llama_cpp() {
    let Some(meta) = load() else { return };
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let greedy = reference("greedy.json");
    for case in greedy["cases"].as_array().unwrap() {
        let prompt = case["prompt"].as_str().unwrap();
        assert_eq!(tok.encode(prompt, true, true), ids(&case["prompt_ids"]), "{prompt:?}");
        let continuation = ids(&case["continuation_ids"]);
        let shown: Vec<u32> = continuation.iter().copied().filter(|&id| !tok.is_eog(id)).collect();
        assert_eq!(tok.decode(&shown), case["continuation"].as_str().unwrap());
    }
}

#[test]
fn special_tokens_of_the_real_model() {
    let Some(meta) = load() else { return };
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert_eq!(tok.n_vocab(), 49152);
    assert_eq!(tok.bos(), Some(1));
    assert_eq!(tok.eos(), Some(2));
    assert_eq!(tok.token_text(2), Some("<|im_end|>"));
    assert_eq!(tok.token_id("<|im_start|>"), Some(1));
    assert_eq!(tok.eot(), Some(2));
    assert!(tok.is_eog(2) && tok.is_eog(0));
    assert!(!tok.is_eog(1) && !tok.is_eog(504));
    assert!(!tok.adds_bos());
    assert_eq!(tok.token_piece(2), b"");
    assert_eq!(tok.token_piece_special(2), b"<|im_end|>");
    assert_eq!(tok.token_piece(38699), b" Hello");
}

#[test]
fn smollm2_chat_template_renders_a_conversation() {
    let Some(meta) = load() else { return };
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let template = ChatTemplate::from_gguf(&meta, &tok).unwrap().unwrap();
    let messages = [ChatMessage::new("system", "You are terse."), ChatMessage::new("user", "What is 2+2?")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<|im_start|>system\nYou are terse.<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    // Without a system message the template supplies its default one.
    let rendered = template.render(&messages[1..], false).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    );
    // The rendered prompt tokenizes with its markers as single tokens.
    let ids = tok.encode(&rendered, true, true);
    assert_eq!(ids[0], 1);
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 2);
}
