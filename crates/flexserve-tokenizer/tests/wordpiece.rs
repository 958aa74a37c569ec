//! WordPiece (`bert`) tokenizers: a small vocabulary laid out as BERT's, built
//! in metadata (the ids llama.cpp assumes, [CLS] / [SEP] and their flags,
//! special tokens in text, decoding, refused metadata); and the real
//! nomic-embed-text-v1.5 vocabulary against llama.cpp's ids, when the model is
//! fetched.

use std::path::{Path, PathBuf};

use flexserve_gguf::{GgufFile, Metadata, Value};
use flexserve_tokenizer::{Tokenizer, TokenizerError, MAX_WORDPIECE_TOKEN_BYTES};

const PAD: u32 = 0;
const UNK: u32 = 100;
const CLS: u32 = 101;
const SEP: u32 = 102;
const MASK: u32 = 103;
const WORDS: &[&str] = &["▁hello", "▁world", "▁!", "▁un", "known", "▁[", "▁]", "▁cl", "s"];

/// Id of a word piece of [`WORDS`].
fn word(piece: &str) -> u32 {
    104 + WORDS.iter().position(|w| *w == piece).unwrap() as u32
}

/// BERT's layout: [PAD] at 0, [unusedN] fillers, [UNK] [CLS] [SEP] [MASK] at
/// 100..=103 (control tokens), then `WORDS`. No special-token keys: the ids
/// are the conventional ones.
fn bert_meta() -> Metadata {
    let mut tokens: Vec<String> = (0..104).map(|i| format!("[unused{i}]")).collect();
    let mut types = vec![1; 104];
    for (id, text) in [(PAD, "[PAD]"), (UNK, "[UNK]"), (CLS, "[CLS]"), (SEP, "[SEP]"), (MASK, "[MASK]")] {
        tokens[id as usize] = text.to_owned();
        types[id as usize] = 3;
    }
    for w in WORDS {
        tokens.push(w.to_string());
        types.push(1);
    }
    let mut meta = Metadata::new();
    meta.insert("tokenizer.ggml.model", Value::from("bert"));
    // Split rules are not WordPiece's to choose; any name is accepted.
    meta.insert("tokenizer.ggml.pre", Value::from("bert-bge"));
    meta.insert("tokenizer.ggml.tokens", Value::string_array(tokens));
    meta.insert("tokenizer.ggml.token_type", Value::i32_array(types));
    meta
}

#[test]
fn conventional_ids_and_cls_sep_framing() {
    let tok = Tokenizer::from_gguf(&bert_meta()).unwrap();
    assert_eq!(
        (tok.bos(), tok.sep(), tok.unk(), tok.pad(), tok.eos()),
        (Some(CLS), Some(SEP), Some(UNK), Some(PAD), None)
    );
    assert!(tok.adds_bos() && tok.adds_sep() && !tok.adds_eos());
    let body = [word("▁hello"), word("▁world"), word("▁!")];
    assert_eq!(tok.encode("Hello WORLD!", false, false), body);
    let framed = tok.encode("Hello WORLD!", true, false);
    assert_eq!(framed, [&[CLS][..], &body, &[SEP]].concat());
    assert_eq!(tok.encode("", true, false), [CLS, SEP]);
    assert_eq!(tok.encode("unknown zzz", false, false), [word("▁un"), word("known"), UNK]);
}

#[test]
fn special_tokens_in_text_are_split_out_only_when_parsed() {
    let tok = Tokenizer::from_gguf(&bert_meta()).unwrap();
    assert_eq!(tok.encode("[CLS] hello [SEP]", false, true), [CLS, word("▁hello"), SEP]);
    assert_eq!(tok.encode("hello[MASK]", false, true), [word("▁hello"), MASK]);
    // Unparsed, "[CLS]" is text: brackets alone, the rest lower-cased.
    assert_eq!(tok.encode("[CLS]", false, false), [word("▁["), word("▁cl"), word("s"), word("▁]")]);
}

#[test]
fn decoding_shows_word_marks_as_spaces_and_hides_cls_sep() {
    let tok = Tokenizer::from_gguf(&bert_meta()).unwrap();
    let ids = tok.encode("Hello, unknown world!", true, false);
    // "," has no token here: the unknown token, which shows as nothing.
    assert_eq!(tok.decode(&ids), " hello unknown world !");
    assert_eq!(tok.token_piece(word("known")), b"known");
    assert_eq!(tok.token_piece(word("▁hello")), b" hello");
    assert_eq!(tok.token_piece_special(CLS), b"[CLS]");
}

#[test]
fn keys_override_the_conventions() {
    let mut meta = bert_meta();
    meta.insert("tokenizer.ggml.bos_token_id", Value::from(word("▁[")));
    meta.insert("tokenizer.ggml.seperator_token_id", Value::from(word("▁]")));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert_eq!(tok.encode("hello", true, false), [word("▁["), word("▁hello"), word("▁]")]);

    // Without a separator key, the end-of-sequence token separates.
    let mut meta = bert_meta();
    meta.insert("tokenizer.ggml.eos_token_id", Value::from(MASK));
    assert_eq!(Tokenizer::from_gguf(&meta).unwrap().encode("hello", true, false), [CLS, word("▁hello"), MASK]);

    let mut meta = bert_meta();
    meta.insert("tokenizer.ggml.add_bos_token", Value::from(false));
    meta.insert("tokenizer.ggml.add_sep_token", Value::from(false));
    assert_eq!(Tokenizer::from_gguf(&meta).unwrap().encode("hello", true, false), [word("▁hello")]);

    // Lower-casing off: "Hello" has no token; accents are kept unless asked.
    let mut meta = bert_meta();
    meta.insert("tokenizer.ggml.normalizer.lowercase", Value::from(false));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert_eq!(tok.encode("Hello hello héllo", false, false), [UNK, word("▁hello"), UNK]);
    meta.insert("tokenizer.ggml.normalizer.strip_accents", Value::from(true));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert_eq!(tok.encode("héllo", false, false), [word("▁hello")]);
}

#[test]
fn refused_metadata_says_why() {
    // A vocabulary too small for the conventional ids has no [CLS] / [SEP] to add...
    let mut meta = Metadata::new();
    meta.insert("tokenizer.ggml.model", Value::from("bert"));
    meta.insert("tokenizer.ggml.tokens", Value::string_array(vec!["[UNK]".into(), "▁a".into()]));
    let tok = Tokenizer::from_gguf(&meta).unwrap();
    assert!(!tok.adds_bos() && !tok.adds_sep());
    assert_eq!(tok.encode("a b", true, false), [1], "no unknown token either");
    // ...unless a flag asks for them.
    meta.insert("tokenizer.ggml.add_sep_token", Value::from(true));
    let err = Tokenizer::from_gguf(&meta).err().unwrap();
    assert!(matches!(err, TokenizerError::MissingSpecialToken { .. }), "{err}");
    assert!(err.to_string().contains("tokenizer.ggml.seperator_token_id"), "{err}");

    let mut meta = bert_meta();
    let mut tokens: Vec<String> = (0..110).map(|i| format!("t{i}")).collect();
    tokens[107] = "x".repeat(MAX_WORDPIECE_TOKEN_BYTES + 1);
    meta.insert("tokenizer.ggml.tokens", Value::string_array(tokens));
    meta.remove("tokenizer.ggml.token_type");
    let err = Tokenizer::from_gguf(&meta).err().unwrap();
    assert!(matches!(err, TokenizerError::WordPieceTokenTooLong { id: 107, .. }), "{err}");

    let mut meta = bert_meta();
    meta.insert("tokenizer.ggml.model", Value::from("t5"));
    let err = Tokenizer::from_gguf(&meta).err().unwrap();
    assert!(err.to_string().contains("\"t5\"") && err.to_string().contains("\"bert\" (WordPiece)"), "{err}");
}

/// xorshift64*: deterministic, so a failure names its round and repeats.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }

    /// A short string over characters of every kind WordPiece treats apart.
    fn text(&mut self, max_chars: usize) -> String {
        const CHARS: &[char] = &[
            'a',
            'B',
            'é',
            'E',
            '\u{301}',
            '▁',
            ' ',
            '\t',
            '\n',
            '\u{3000}',
            '\0',
            '\u{7}',
            '\u{FFFD}',
            '\u{200B}',
            '!',
            '$',
            '`',
            '×',
            '東',
            '가',
            'İ',
            'ǅ',
            '\u{E000}',
            '\u{10FFFF}',
            '[',
            ']',
        ];
        let n = self.below(max_chars + 1);
        (0..n).map(|_| CHARS[self.below(CHARS.len())]).collect()
    }
}

/// Random vocabularies, flags and texts: every build either loads or is
/// refused, and every encoding gives ids inside the vocabulary and decodes.
#[test]
fn random_vocabularies_and_texts_never_panic() {
    let mut rng = Rng(0x5EED_B3E7);
    for round in 0..300 {
        let mut tokens: Vec<String> = (0..rng.below(40)).map(|_| rng.text(4)).collect();
        tokens.sort();
        tokens.dedup();
        let mut meta = Metadata::new();
        meta.insert("tokenizer.ggml.model", Value::from("bert"));
        let n = tokens.len() as u32;
        meta.insert("tokenizer.ggml.tokens", Value::string_array(tokens));
        for key in ["bos_token_id", "seperator_token_id", "unknown_token_id", "eos_token_id"] {
            if rng.below(2) == 0 {
                meta.insert(format!("tokenizer.ggml.{key}"), Value::from(rng.below(n as usize + 2) as u32));
            }
        }
        for key in ["add_bos_token", "add_sep_token", "normalizer.lowercase", "normalizer.strip_accents"] {
            if rng.below(2) == 0 {
                meta.insert(format!("tokenizer.ggml.{key}"), Value::from(rng.below(2) == 0));
            }
        }
        let Ok(tok) = Tokenizer::from_gguf(&meta) else { continue };
        for _ in 0..10 {
            let text = rng.text(30);
            for (add, parse) in [(true, true), (false, false)] {
                let ids = tok.encode(&text, add, parse);
                assert!(ids.iter().all(|&id| id < n), "round {round}: {text:?} gave {ids:?} of {n} tokens");
                let _ = tok.decode(&ids);
            }
        }
    }
}

fn model_path() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("FLEXSERVE_CACHE").map(PathBuf::from).unwrap_or_else(|| root.join(".cache"));
    cache.join("models/nomic-embed-text-v1.5.f16.gguf")
}

/// nomic-embed-text-v1.5's vocabulary (BERT's uncased one) against the ids
/// llama.cpp's llama-tokenize gave (llama-cpp-python 0.3.36), [CLS] and [SEP] included.
#[test]
fn real_vocabulary_matches_llama_cpp() {
    let path = model_path();
    if !path.exists() {
        eprintln!("note: {} is missing (run scripts/fetch-model.sh); skipping", path.display());
        return;
    }
    let file = GgufFile::open(&path).unwrap();
    let tok = Tokenizer::from_gguf(&file.header.metadata).unwrap();
    let cases: &[(&str, &[u32])] = &[
        ("search_query: What is TSNE?", &[101, 3945, 1035, 23032, 1024, 2054, 2003, 24529, 2638, 1029, 102]),
        (
            "Café déjà vu: naïve résumés, über-cool façades!",
            &[101, 7668, 2139, 3900, 24728, 1024, 15743, 13746, 2015, 1010, 19169, 1011, 4658, 28708, 999, 102],
        ),
        (
            "fn main() { println!(\"hello, world\"); } // Rust code",
            &[
                101, 1042, 2078, 2364, 1006, 1007, 1063, 6140, 19666, 999, 1006, 1000, 7592, 1010, 2088, 1000, 1007,
                1025, 1065, 1013, 1013, 18399, 3642, 102,
            ],
        ),
        (
            "Prices rose 3.5% in Q3 2024, to $1,299.99 per unit (up from $1,250).",
            &[
                101, 7597, 3123, 1017, 1012, 1019, 1003, 1999, 1053, 2509, 16798, 2549, 1010, 2000, 1002, 1015, 1010,
                25926, 1012, 5585, 2566, 3131, 1006, 2039, 2013, 1002, 1015, 1010, 5539, 1007, 1012, 102,
            ],
        ),
        ("東京は日本の首都です。", &[101, 1879, 1755, 1672, 1864, 1876, 1671, 100, 1961, 1665, 30184, 1636, 102]),
        (
            "A secure world holds the model's weights; the normal world only sees ciphertext.",
            &[
                101, 1037, 5851, 2088, 4324, 1996, 2944, 1005, 1055, 15871, 1025, 1996, 3671, 2088, 2069, 5927, 27715,
                18209, 1012, 102,
            ],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(tok.encode(text, true, false), *expected, "{text:?}");
    }
    let ids = tok.encode("The quick brown fox jumps over the lazy dog.", true, false);
    assert_eq!(tok.decode(&ids), " the quick brown fox jumps over the lazy dog .");
}
