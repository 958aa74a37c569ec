//! Tiny vocabularies built in metadata: each pre-tokenizer's splits, SentencePiece
//! merges with byte fallback, special tokens, end-of-generation detection,
//! streaming decode, chat templates and malformed metadata.

use std::collections::BTreeSet;

use flexserve_gguf::{Metadata, Value};
use flexserve_tokenizer::{ChatMessage, ChatTemplate, StreamDecoder, Tokenizer, TokenizerError};

/// The byte-level BPE alphabet: printable bytes are themselves, the rest U+0100 on.
fn byte_char(b: u8) -> char {
    let printable = |b: u8| matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(b) {
        return char::from(b);
    }
    let rank = (0..b).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(0x100 + rank).unwrap()
}

fn mapped(text: &str) -> String {
    text.bytes().map(byte_char).collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// A byte-level BPE vocabulary in which every substring of `words` is a token and
/// every split of it is a merge (shorter results first), so any piece that is a
/// substring of a word encodes as one token and the pieces show the pre-tokenizer's
/// splits. `specials` are appended as (text, token type).
fn bpe_meta(pre: &str, words: &[&str], specials: &[(&str, i32)]) -> Metadata {
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_char(b).to_string()).collect();
    let mut substrings = BTreeSet::new();
    for word in words {
        let chars: Vec<char> = mapped(word).chars().collect();
        for i in 0..chars.len() {
            for j in i + 2..=chars.len() {
                substrings.insert(chars[i..j].to_vec());
            }
        }
    }
    let mut by_len: Vec<Vec<char>> = substrings.into_iter().collect();
    by_len.sort_by_key(Vec::len);
    let mut merges = Vec::new();
    for s in &by_len {
        let text: String = s.iter().collect();
        tokens.push(text);
        for k in 1..s.len() {
            let (l, r): (String, String) = (s[..k].iter().collect(), s[k..].iter().collect());
            merges.push(format!("{l} {r}"));
        }
    }
    let mut types = vec![1; tokens.len()];
    for (text, ty) in specials {
        tokens.push(text.to_string());
        types.push(*ty);
    }
    let mut meta = Metadata::new();
    meta.insert("tokenizer.ggml.model", Value::from("gpt2"));
    meta.insert("tokenizer.ggml.pre", Value::from(pre));
    meta.insert("tokenizer.ggml.tokens", Value::string_array(tokens));
    meta.insert("tokenizer.ggml.token_type", Value::i32_array(types));
    meta.insert("tokenizer.ggml.merges", Value::string_array(merges));
    meta
}

/// The decoded piece of every token `text` encodes to.
fn pieces(tok: &Tokenizer, text: &str) -> Vec<String> {
    tok.encode(text, false, false).iter().map(|&id| String::from_utf8(tok.token_piece(id).to_vec()).unwrap()).collect()
}

/// Text, then the expected pieces under gpt2, smollm, llama-bpe, qwen2 and default.
const SPLIT_CASES: &[(&str, [&[&str]; 5])] = &[
    (
        "Hello world's 12345  x\n\n!!?",
        [
            &["Hello", " world", "'s", " 12345", " ", " x", "\n", "\n", "!!?"],
            &["Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " ", " x", "\n", "\n", "!!?"],
            &["Hello", " world", "'s", " ", "123", "45", " ", " x", "\n\n", "!!?"],
            &["Hello", " world", "'s", " ", "1", "2", "3", "4", "5", " ", " x", "\n\n", "!!?"],
            &["Hello", " world", "'", "s", " ", "123", "45", " ", " x", "\n\n", "!!?"],
        ],
    ),
    (
        "it'S (ok)...\n",
        [
            &["it", "'", "S", " (", "ok", ")...", "\n"],
            &["it", "'", "S", " (", "ok", ")...", "\n"],
            &["it", "'S", " (", "ok", ")...\n"],
            &["it", "'S", " (", "ok", ")...\n"],
            &["it", "'", "S", " ", "(", "ok", ")...", "\n"],
        ],
    ),
    (
        "a+b=c 1234567",
        [
            &["a", "+", "b", "=", "c", " 1234567"],
            &["a", "+", "b", "=", "c", " ", "1", "2", "3", "4", "5", "6", "7"],
            &["a", "+b", "=c", " ", "123", "456", "7"],
            &["a", "+b", "=c", " ", "1", "2", "3", "4", "5", "6", "7"],
            &["a", "+", "b", "=", "c", " ", "123", "456", "7"],
        ],
    ),
];

#[test]
fn each_pre_tokenizer_splits_as_its_rules_say() {
    let words: Vec<&str> =
        SPLIT_CASES.iter().flat_map(|(_, expected)| expected.iter().flat_map(|p| p.iter().copied())).collect();
    for (i, pre) in ["gpt2", "smollm", "llama-bpe", "qwen2", "default"].into_iter().enumerate() {
        let tok = Tokenizer::from_gguf(&bpe_meta(pre, &words, &[])).unwrap();
        for (text, expected) in SPLIT_CASES {
            assert_eq!(pieces(&tok, text), expected[i], "{pre} on {text:?}");
            assert_eq!(tok.decode(&tok.encode(text, true, true)), *text, "{pre} round trip");
        }
    }
}

#[test]
fn bpe_special_tokens_and_flags() {
    let meta = bpe_meta("smollm", &["hi there"], &[("<|im_start|>", 3), ("<|im_end|>", 1), ("<tool>", 4)]);
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    let start = tok.token_id("<|im_start|>").unwrap();
    let end = tok.token_id("<|im_end|>").unwrap();
    let tool = tok.token_id("<tool>").unwrap();
    let hi = tok.token_id("hi").unwrap();
    let there = tok.token_id(&mapped(" there")).unwrap();

    // Parsed: the control token is one id; not parsed: its text is ordinary text.
    assert_eq!(tok.encode("<|im_start|>hi there", false, true), [start, hi, there]);
    let plain = tok.encode("<|im_start|>hi", false, false);
    assert!(!plain.contains(&start));
    assert_eq!(tok.decode(&plain), "<|im_start|>hi");
    // User-defined tokens are split out either way and show as their text.
    assert_eq!(tok.encode("hi<tool>", false, false), [hi, tool]);
    assert_eq!(tok.decode(&[hi, tool]), "hi<tool>");

    // <|im_end|> is typed normal, but its text marks it as an end token.
    assert!(tok.is_eog(end) && tok.is_control(end));
    assert_eq!(tok.eot(), Some(end));
    assert!(!tok.is_eog(start) && !tok.is_eog(hi));
    assert_eq!(tok.decode(&[start, hi, end]), "hi");
    assert_eq!(tok.token_piece_special(start), b"<|im_start|>");

    // gpt2-style models add no BOS unless the metadata says so.
    assert!(!tok.adds_bos());
    let mut meta = meta;
    meta.insert("tokenizer.ggml.bos_token_id", Value::from(start));
    meta.insert("tokenizer.ggml.eos_token_id", Value::from(end));
    meta.insert("tokenizer.ggml.add_bos_token", Value::from(true));
    meta.insert("tokenizer.ggml.add_eos_token", Value::from(true));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert_eq!(tok.encode("hi", true, false), [start, hi, end]);
    assert_eq!(tok.encode("hi", false, false), [hi]);
    assert_eq!(tok.eos(), Some(end));
}

/// A SentencePiece vocabulary: <unk> <s> </s>, optional byte tokens, then pieces.
fn spm_meta(with_bytes: bool, add_space_prefix: Option<bool>) -> Metadata {
    let mut tokens = strings(&["<unk>", "<s>", "</s>"]);
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0, 0.0, 0.0];
    if with_bytes {
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(6);
            scores.push(0.0);
        }
    }
    let pieces = [
        "▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "or", "wor", "ld", "world",
        "▁world", "<|user|>",
    ];
    for (i, piece) in pieces.iter().enumerate() {
        tokens.push(piece.to_string());
        types.push(if *piece == "<|user|>" { 4 } else { 1 });
        scores.push(-(i as f32));
    }
    let mut meta = Metadata::new();
    meta.insert("tokenizer.ggml.model", Value::from("llama"));
    meta.insert("tokenizer.ggml.tokens", Value::string_array(tokens));
    meta.insert("tokenizer.ggml.token_type", Value::i32_array(types));
    meta.insert("tokenizer.ggml.scores", Value::f32_array(scores));
    if let Some(flag) = add_space_prefix {
        meta.insert("tokenizer.ggml.add_space_prefix", Value::from(flag));
    }
    meta
}

#[test]
fn spm_merges_by_score_with_byte_fallback() {
    let tok = Tokenizer::from_gguf(&spm_meta(true, None)).unwrap();
    let id = |t: &str| tok.token_id(t).unwrap();
    let (bos, unk) = (tok.bos().unwrap(), id("<unk>"));
    assert_eq!((bos, tok.eos(), unk), (1, Some(2), 0));
    assert!(tok.adds_bos());

    // BOS by default, a space prefix, spaces as ▁.
    let ids = tok.encode("hello world", true, false);
    assert_eq!(ids, [bos, id("▁hello"), id("▁world")]);
    assert_eq!(tok.decode(&ids), "hello world");
    assert_eq!(tok.encode("hello world", false, false), [id("▁hello"), id("▁world")]);

    // é has no piece: its UTF-8 bytes become byte tokens and decode back.
    let ids = tok.encode("hé", false, false);
    assert_eq!(ids, [id("▁"), id("h"), id("<0xC3>"), id("<0xA9>")]);
    assert_eq!(tok.decode(&ids), "hé");
    assert_eq!(tok.token_piece(id("<0xC3>")), [0xC3]);

    // User-defined tokens split out; the text after a special token gets a space prefix.
    let ids = tok.encode("<|user|>hello", false, false);
    assert_eq!(ids, [id("<|user|>"), id("▁hello")]);
    // Control text is only a token when parsing specials.
    assert_eq!(tok.encode("</s>", false, true), [2]);
    assert_ne!(tok.encode("</s>", false, false), [2]);
}

#[test]
fn spm_without_space_prefix_or_byte_tokens() {
    let tok = Tokenizer::from_gguf(&spm_meta(false, Some(false))).unwrap();
    let id = |t: &str| tok.token_id(t).unwrap();
    assert_eq!(tok.encode("hello", true, false), [1, id("hello")]);
    assert_eq!(tok.decode(&[1, id("hello"), id("▁world")]), "hello world");
    // No byte tokens: an unknown character becomes <unk>, shown as nothing.
    assert_eq!(tok.encode("hzo", false, false), [id("h"), 0, id("o")]);
    assert_eq!(tok.decode(&[id("h"), 0, id("o")]), "ho");
}

#[test]
fn stream_decoder_holds_back_split_characters() {
    let tok = Tokenizer::from_gguf(&spm_meta(true, None)).unwrap();
    let id = |t: &str| tok.token_id(t).unwrap();
    let mut stream = StreamDecoder::new(&tok);
    assert_eq!(stream.push(1), "");
    assert_eq!(stream.push(id("▁hello")), "hello");
    // "€" is E2 82 AC: nothing comes out until its last byte arrives.
    assert_eq!(stream.push(id("▁")), " ");
    assert_eq!(stream.push(id("<0xE2>")), "");
    assert_eq!(stream.push(id("<0x82>")), "");
    assert_eq!(stream.push(id("<0xAC>")), "€");
    // A byte that can never start a character is replaced right away.
    assert_eq!(stream.push(id("<0xFF>")), "\u{FFFD}");
    // An unfinished character at the end is flushed as a replacement.
    assert_eq!(stream.push(id("<0xC3>")), "");
    assert_eq!(stream.finish(), "\u{FFFD}");
    assert_eq!(stream.finish(), "");
}

const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[test]
fn chat_templates() {
    let template = ChatTemplate::new(SMOLLM2_TEMPLATE, "<|im_start|>", "<|im_end|>").unwrap();
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi!")];
    assert_eq!(
        template.render(&messages, true).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(!template.render(&messages, false).unwrap().ends_with("assistant\n"));

    // Python string methods, the BOS text, and trimmed block whitespace.
    let template = ChatTemplate::new(
        "{{ bos_token }}{% for m in messages %}\n    {% if m.role.startswith('us') %}{{ m.content.strip().upper() }}?{% endif %}\n{% endfor %}",
        "<s>",
        "</s>",
    )
    .unwrap();
    let rendered = template.render(&[ChatMessage::new("user", "  hey ")], false).unwrap();
    assert_eq!(rendered, "<s>HEY?");

    let strict = ChatTemplate::new(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}ok",
        "",
        "",
    )
    .unwrap();
    assert_eq!(strict.render(&[ChatMessage::new("user", "x")], false).unwrap(), "ok");
    match strict.render(&[ChatMessage::new("assistant", "x")], false) {
        Err(TokenizerError::TemplateException(message)) => {
            assert_eq!(message, "Conversation must start with a user message")
        }
        other => panic!("expected the raised exception, got {other:?}"),
    }

    let err = ChatTemplate::new("{% for m in messages %}{{ m.content }", "", "").err().unwrap();
    assert!(matches!(err, TokenizerError::TemplateSyntax(_)), "{err:?}");
    assert!(err.to_string().contains("syntax error"), "{err}");
}

#[test]
fn chat_template_absent_from_metadata_is_none() {
    let meta = spm_meta(true, None);
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert!(ChatTemplate::from_gguf(&meta, &tok).unwrap().is_none());
    let mut meta = meta;
    meta.insert("tokenizer.chat_template", Value::from("{{ bos_token }}|{{ eos_token }}"));
    let template = ChatTemplate::from_gguf(&meta, &tok).unwrap().unwrap();
    assert_eq!(template.render(&[], false).unwrap(), "<s>|</s>");
}

fn error_of(meta: &Metadata) -> String {
    match Tokenizer::from_gguf(meta) {
        Ok(_) => panic!("malformed metadata was accepted"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_metadata_is_rejected_naming_the_key() {
    let base = || bpe_meta("gpt2", &["ab"], &[]);

    let mut meta = base();
    meta.remove("tokenizer.ggml.tokens");
    assert!(error_of(&meta).contains("tokenizer.ggml.tokens is missing"));

    let mut meta = base();
    meta.insert("tokenizer.ggml.tokens", Value::from(7u32));
    assert!(error_of(&meta).contains("tokenizer.ggml.tokens has the wrong type"));

    let mut meta = base();
    meta.insert("tokenizer.ggml.token_type", Value::i32_array(vec![1; 3]));
    let err = error_of(&meta);
    assert!(err.contains("tokenizer.ggml.token_type has 3 entries"), "{err}");

    let mut meta = base();
    meta.insert("tokenizer.ggml.merges", Value::string_array(strings(&["a b", "ab"])));
    let err = error_of(&meta);
    assert!(err.contains("tokenizer.ggml.merges[1]") && err.contains("\"ab\""), "{err}");

    let mut meta = base();
    meta.remove("tokenizer.ggml.merges");
    assert!(error_of(&meta).contains("tokenizer.ggml.merges is missing"));

    let mut meta = base();
    meta.insert("tokenizer.ggml.eos_token_id", Value::from(100_000u32));
    let err = error_of(&meta);
    assert!(err.contains("tokenizer.ggml.eos_token_id is 100000"), "{err}");

    let mut meta = base();
    meta.insert("tokenizer.ggml.add_bos_token", Value::from(true));
    assert!(error_of(&meta).contains("tokenizer.ggml.bos_token_id is not set"));

    let mut meta = base();
    meta.insert("tokenizer.ggml.pre", Value::from("mystery"));
    assert!(error_of(&meta).contains("tokenizer.ggml.pre is \"mystery\""));

    let mut meta = base();
    meta.insert("tokenizer.ggml.model", Value::from("t5"));
    assert!(error_of(&meta).contains("tokenizer.ggml.model is \"t5\""));

    let mut meta = base();
    meta.insert("tokenizer.ggml.token_type", Value::i32_array(vec![9; 259]));
    assert!(error_of(&meta).contains("tokenizer.ggml.token_type[0] is 9"));

    let mut meta = spm_meta(true, None);
    meta.insert("tokenizer.ggml.scores", Value::f32_array(vec![0.0]));
    assert!(error_of(&meta).contains("tokenizer.ggml.scores has 1 entries"));

    let mut meta = base();
    meta.insert("tokenizer.ggml.tokens", Value::string_array(strings(&["a", "a"])));
    meta.remove("tokenizer.ggml.token_type");
    assert!(error_of(&meta).contains("holds \"a\" twice"));
}

/// A chat template comes with the model file: however it loops or grows,
/// rendering ends with an error naming the bound (fuel, output size, depth).
#[test]
fn hostile_templates_are_bounded() {
    use flexserve_tokenizer::{ChatMessage, ChatTemplate};
    let messages = [ChatMessage::new("user", "hi")];
    for (source, said) in [
        ("{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", "fuel"),
        ("{% set s = \"x\" * 1000000 %}{% for a in range(100000) %}{{ s }}{% endfor %}", "exceeds the limit"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ] {
        let t = ChatTemplate::new(source, "<s>", "</s>").unwrap();
        let started = std::time::Instant::now();
        let e = t.render(&messages, true).unwrap_err().to_string();
        assert!(e.to_lowercase().contains(said), "{source}: {e}");
        eprintln!("{said}: refused after {:.2} s", started.elapsed().as_secs_f64());
    }
}

/// A special token longer than the bound is refused at load, naming the
/// bound; one exactly at the bound loads and is split out of text.
#[test]
fn special_tokens_longer_than_the_bound_are_refused() {
    use flexserve_tokenizer::MAX_SPECIAL_TOKEN_BYTES;
    let at_bound = format!("<{}>", "x".repeat(MAX_SPECIAL_TOKEN_BYTES - 2));
    let over = format!("<{}>", "y".repeat(MAX_SPECIAL_TOKEN_BYTES - 1));
    let e = error_of(&bpe_meta("gpt2", &["hello"], &[(&over, 4)]));
    assert!(e.contains("MAX_SPECIAL_TOKEN_BYTES") && e.contains(&MAX_SPECIAL_TOKEN_BYTES.to_string()), "{e}");
    let tok = Tokenizer::from_gguf(&bpe_meta("gpt2", &["hello"], &[(&at_bound, 4)])).unwrap();
    let ids = tok.encode(&format!("hello{at_bound}hello"), false, false);
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert_eq!(tok.token_text(ids[1]), Some(at_bound.as_str()));
}

/// Special tokens overlapping in the text: the one that starts first wins,
/// then the longest of those starting there.
#[test]
fn overlapping_special_tokens_split_leftmost_then_longest() {
    let tok = Tokenizer::from_gguf(&bpe_meta("gpt2", &["ab"], &[("<ab", 4), ("b>>", 4), ("<a", 4)])).unwrap();
    let texts: Vec<_> =
        tok.encode("<ab>>", false, false).iter().map(|&id| tok.token_text(id).unwrap().to_string()).collect();
    // "b>>" is longer but starts later; the ">>" left over is ordinary text.
    assert_eq!(texts, ["<ab", ">", ">"], "{texts:?}");
}
