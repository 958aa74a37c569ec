//! The integer merge loops against the string ones they replaced (kept in
//! `merge::oracle`): thousands of random texts over random vocabularies, and
//! the real model's vocabulary when it is present.

use std::collections::{BTreeSet, HashMap};

use super::{Piece, Tokenizer};
use crate::config::{ModelKind, TokenType, TokenizerConfig};
use crate::merge::oracle;
use crate::pretokenize::PreTokenizerKind;

/// xorshift64*: deterministic, so a failure names its seed and repeats.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Bits of text the random strings are made of: several scripts, emoji (with a
/// joiner), digits of several kinds, spaces of several kinds, punctuation,
/// contractions, `▁`, and runs that make long words.
const UNITS: &[&str] = &[
    "a", "b", "e", "l", "o", "s", "t", "he", "ll", "hello", " world", "A", "Zz", "é", "ß", "ж", "яд", "中文", "ا", "ب",
    "😀", "👍🏽", "\u{200d}", "1", "23", "9", "٣", "²", " ", "  ", "\n", "\t", "\r\n", "\u{3000}", "\u{a0}", ".", ",",
    "!?", "'s", "'ll", "'RE", "'", "(", ")", "-", "$", "+=", "<", "|", ">", "\u{2581}", "\u{301}", "\u{0}", "aaaa",
    "    ", "0000",
];

fn random_text(rng: &mut Rng, max_units: usize) -> String {
    (0..rng.below(max_units + 1)).map(|_| *rng.pick(UNITS)).collect()
}

/// A long text that is mostly one unit, so long words and long runs of equal merges appear.
fn long_text(rng: &mut Rng) -> String {
    let unit = *rng.pick(&["a", "aa", " ", "1", "ab", "😀", "he", "\u{2581}"]);
    let mut text = unit.repeat(200 + rng.below(800));
    if rng.chance(50) {
        text.push_str(&random_text(rng, 10));
    }
    text
}

fn texts(rng: &mut Rng, count: usize) -> Vec<String> {
    (0..count).map(|i| if i % 50 == 0 { long_text(rng) } else { random_text(rng, 24) }).collect()
}

/// Random substrings (2..=8 characters) of `words`.
fn substrings(rng: &mut Rng, words: &[Vec<char>], count: usize) -> Vec<Vec<char>> {
    let mut out = Vec::new();
    while out.len() < count {
        let word = rng.pick(words);
        if word.len() < 2 {
            continue;
        }
        let start = rng.below(word.len() - 1);
        let len = 2 + rng.below((word.len() - start - 1).min(7));
        out.push(word[start..start + len].to_vec());
    }
    out
}

const PRE_KINDS: [PreTokenizerKind; 5] = [
    PreTokenizerKind::Gpt2,
    PreTokenizerKind::SmolLm,
    PreTokenizerKind::Llama3,
    PreTokenizerKind::Qwen2,
    PreTokenizerKind::Default,
];

/// A byte-level BPE config with merges drawn from substrings of random text: shorter
/// first (roughly), some repeated later, most results tokens and some not.
fn random_bpe_config(rng: &mut Rng, pre: PreTokenizerKind) -> TokenizerConfig {
    let byte_map = crate::unicode::ByteMap::new();
    let mapped = |text: &str| {
        let mut s = String::new();
        byte_map.encode_into(text.as_bytes(), &mut s);
        s.chars().collect::<Vec<char>>()
    };
    let corpus: Vec<Vec<char>> = (0..40).map(|_| mapped(&random_text(rng, 6))).collect();
    let count = 100 + rng.below(400);
    let mut candidates = substrings(rng, &corpus, count);
    candidates.sort_by_cached_key(|s| s.len() * 4 + rng.below(6));
    let mut merges: Vec<(String, String)> = Vec::new();
    for s in &candidates {
        let split = 1 + rng.below(s.len() - 1);
        merges.push((s[..split].iter().collect(), s[split..].iter().collect()));
        if rng.chance(5) && !merges.is_empty() {
            let again = rng.pick(&merges).clone();
            merges.push(again);
        }
    }
    let mut tokens: Vec<String> = byte_map.chars().iter().map(|c| c.to_string()).collect();
    // Drop a few byte tokens so the fallback for unknown pieces runs too.
    tokens.retain(|_| !rng.chance(3));
    let mut seen: BTreeSet<String> = tokens.iter().cloned().collect();
    for (l, r) in &merges {
        let joined = format!("{l}{r}");
        if rng.chance(85) && seen.insert(joined.clone()) {
            tokens.push(joined);
        }
    }
    let mut types = vec![TokenType::Normal; tokens.len()];
    for (text, ty) in [("<|im_end|>", TokenType::Control), ("<|u|>", TokenType::UserDefined)] {
        tokens.push(text.to_string());
        types.push(ty);
    }
    let mut config = TokenizerConfig::new(ModelKind::Bpe, tokens);
    config.token_types = Some(types);
    config.merges = merges;
    config.pre = pre;
    config
}

/// A SentencePiece config: random pieces with scores from a small set (many ties,
/// and both zeros), byte tokens or not, and a user-defined token.
fn random_spm_config(rng: &mut Rng) -> TokenizerConfig {
    let escape = |text: String| text.replace(' ', "\u{2581}").chars().collect::<Vec<char>>();
    let corpus: Vec<Vec<char>> = (0..40).map(|_| escape(random_text(rng, 6))).collect();
    let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "<|u|>"].map(String::from).to_vec();
    let mut types = vec![TokenType::Unknown, TokenType::Control, TokenType::Control, TokenType::UserDefined];
    if rng.chance(70) {
        tokens.extend((0..=255u8).map(|b| format!("<0x{b:02X}>")));
        types.extend([TokenType::Byte; 256]);
    }
    let mut seen: BTreeSet<String> = tokens.iter().cloned().collect();
    for word in &corpus {
        for &c in word {
            if rng.chance(70) && seen.insert(c.to_string()) {
                tokens.push(c.to_string());
                types.push(TokenType::Normal);
            }
        }
    }
    let count = 100 + rng.below(300);
    for piece in substrings(rng, &corpus, count) {
        let text: String = piece.into_iter().collect();
        if seen.insert(text.clone()) {
            tokens.push(text);
            types.push(TokenType::Normal);
        }
    }
    let score_set = [0.0, -0.0, -1.0, -1.5, -2.0, -3.25, 1.0];
    let scores = tokens.iter().map(|_| *rng.pick(&score_set)).collect();
    let mut config = TokenizerConfig::new(ModelKind::Spm, tokens);
    config.token_types = Some(types);
    config.scores = Some(scores);
    config.add_space_prefix = Some(rng.chance(70));
    config
}

/// `encode` as it was written before the integer merge loops (special tokens
/// always parsed, no BOS / EOS).
struct OracleEncoder {
    ranks: HashMap<(String, String), u32>,
    scores: Vec<f32>,
}

impl OracleEncoder {
    fn new(config: &TokenizerConfig) -> OracleEncoder {
        let mut ranks = HashMap::new();
        for (rank, merge) in config.merges.iter().enumerate() {
            ranks.entry(merge.clone()).or_insert(rank as u32);
        }
        OracleEncoder { ranks, scores: config.scores.clone().unwrap_or_default() }
    }

    fn encode(&self, tok: &Tokenizer, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut after_special = true;
        for fragment in tok.split_special(text, true) {
            let text = match fragment {
                Piece::Token(id) => {
                    out.push(id);
                    after_special = true;
                    continue;
                }
                Piece::Text(text) => text,
            };
            match tok.model {
                ModelKind::Spm => {
                    let mut escaped = String::new();
                    if tok.add_space_prefix && after_special {
                        escaped.push('\u{2581}');
                    }
                    escaped.extend(text.chars().map(|c| if c == ' ' { '\u{2581}' } else { c }));
                    let score = |t: &str| tok.token_to_id.get(t).map(|&id| self.scores[id as usize]);
                    for piece in oracle::scored(&escaped, score) {
                        match tok.token_to_id.get(piece) {
                            Some(&id) => out.push(id),
                            None => out.extend(piece.bytes().filter_map(|b| tok.byte_token(b))),
                        }
                    }
                }
                ModelKind::Bpe => {
                    for word in tok.pre.split(text) {
                        let mut mapped = String::new();
                        tok.byte_map.encode_into(word.as_bytes(), &mut mapped);
                        if tok.ignore_merges {
                            if let Some(&id) = tok.token_to_id.get(&mapped) {
                                out.push(id);
                                continue;
                            }
                        }
                        let rank = |l: &str, r: &str| self.ranks.get(&(l.to_string(), r.to_string())).copied();
                        for piece in oracle::ranked(&mapped, rank) {
                            match tok.token_to_id.get(piece) {
                                Some(&id) => out.push(id),
                                None => out.extend(
                                    piece
                                        .chars()
                                        .filter(char::is_ascii)
                                        .filter_map(|c| tok.token_to_id.get(&*c.encode_utf8(&mut [0u8; 4])).copied()),
                                ),
                            }
                        }
                    }
                }
                ModelKind::WordPiece => unreachable!("WordPiece has no merge loops to compare"),
            }
            after_special = false;
        }
        out
    }
}

fn check_texts(tok: &Tokenizer, oracle: &OracleEncoder, texts: &[String], what: &str) -> usize {
    let mut merged_tokens = 0;
    for text in texts {
        let ids = tok.encode(text, false, true);
        assert_eq!(ids, oracle.encode(tok, text), "{what}: {text:?}");
        merged_tokens += ids.len();
    }
    merged_tokens
}

#[test]
fn bpe_merges_match_the_string_oracle() {
    let mut rng = Rng(0x5EED_0001);
    let mut checked = 0;
    for round in 0..40 {
        let pre = PRE_KINDS[round % PRE_KINDS.len()];
        let config = random_bpe_config(&mut rng, pre);
        let oracle = OracleEncoder::new(&config);
        let tok = Tokenizer::from_config(config).unwrap();
        let texts = texts(&mut rng, 150);
        check_texts(&tok, &oracle, &texts, &format!("round {round}, {pre:?}"));
        checked += texts.len();
    }
    assert_eq!(checked, 6000);
}

#[test]
fn spm_merges_match_the_string_oracle() {
    let mut rng = Rng(0x5EED_0002);
    for round in 0..40 {
        let config = random_spm_config(&mut rng);
        let oracle = OracleEncoder::new(&config);
        let tok = Tokenizer::from_config(config).unwrap();
        let texts = texts(&mut rng, 150);
        check_texts(&tok, &oracle, &texts, &format!("round {round}"));
    }
}

#[test]
fn real_model_merges_match_the_string_oracle() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let Ok(file) = flexserve_gguf::GgufFile::open(&path) else {
        eprintln!("note: {} is missing; skipping", path.display());
        return;
    };
    let config = TokenizerConfig::from_metadata(&file.header.metadata).unwrap();
    let oracle = OracleEncoder::new(&config);
    let tok = Tokenizer::from_config(config).unwrap();
    let mut rng = Rng(0x5EED_0003);
    let mut texts = texts(&mut rng, 2000);
    texts.push("The quick brown fox jumps over the lazy dog's 12 kennels!\n\n\tDone.".to_string());
    texts.push("x".repeat(5000));
    let tokens = check_texts(&tok, &oracle, &texts, "SmolLM2");
    assert!(tokens > texts.len(), "the texts encode to tokens");
}
