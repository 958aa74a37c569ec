//! WordPiece (BERT) tokenization, giving the ids llama.cpp gives for a `bert` vocabulary.
//!
//! Text is cut into words: whitespace separates them; control characters,
//! U+0000 and U+FFFD are dropped; punctuation, ASCII symbols and CJK ideographs
//! are words of one character. With accent stripping each character is replaced
//! by the first character of its canonical decomposition (llama.cpp keeps one
//! code point per character, so a Hangul syllable becomes its leading jamo
//! rather than its full NFD) and combining marks are dropped; with lower-casing
//! each character takes its one-character lower case. Each word, prefixed with `▁` (the GGUF vocabulary marks word-initial
//! pieces so, and stores continuations without `##`), becomes the longest
//! vocabulary tokens that cover it from the left; a word with any position that
//! no token starts is the unknown token instead.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

use crate::unicode::{is_mark, is_punctuation, is_whitespace};

/// Longest token a WordPiece vocabulary may hold, in bytes. Matching a word
/// costs at most this many steps per byte; real vocabularies' longest tokens
/// are a few dozen bytes.
pub const MAX_WORDPIECE_TOKEN_BYTES: usize = 256;

/// The mark of a word-initial piece.
const WORD_START: char = '\u{2581}';

/// How text is normalized before it is cut into words.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Normalize {
    pub(crate) lowercase: bool,
    pub(crate) strip_accents: bool,
}

/// The vocabulary, searchable by longest prefix.
pub(crate) struct WordPiece {
    /// Token ids ordered by their texts' bytes: the tokens that start with a
    /// given prefix are a contiguous run, narrowed one byte at a time.
    sorted: Vec<u32>,
    normalize: Normalize,
    unk: Option<u32>,
}

impl WordPiece {
    /// `tokens` must each be at most [`MAX_WORDPIECE_TOKEN_BYTES`] long (the caller checks).
    pub(crate) fn new(tokens: &[String], normalize: Normalize, unk: Option<u32>) -> WordPiece {
        let mut sorted: Vec<u32> = (0..tokens.len() as u32).collect();
        sorted.sort_unstable_by(|&a, &b| tokens[a as usize].as_bytes().cmp(tokens[b as usize].as_bytes()));
        WordPiece { sorted, normalize, unk }
    }

    /// Appends the tokens of `text` (plain text, special tokens already split out).
    pub(crate) fn encode(&self, tokens: &[String], text: &str, out: &mut Vec<u32>) {
        let mut word = String::from(WORD_START);
        let prefix_len = word.len();
        let end_word = |word: &mut String, out: &mut Vec<u32>| {
            if word.len() > prefix_len {
                self.encode_word(tokens, word.as_bytes(), out);
                word.truncate(prefix_len);
            }
        };
        for c in text.chars() {
            if is_whitespace(c) {
                end_word(&mut word, out);
                continue;
            }
            let c = if self.normalize.strip_accents { first_of_decomposition(c) } else { c };
            let category = get_general_category(c);
            if c == '\0' || c == char::REPLACEMENT_CHARACTER || is_control(category) {
                continue;
            }
            if self.normalize.strip_accents && is_mark(c) {
                continue;
            }
            let stands_alone = is_punctuation(c) || c.is_ascii_punctuation() || is_cjk_ideograph(c);
            let c = if self.normalize.lowercase { simple_lowercase(c) } else { c };
            if stands_alone {
                end_word(&mut word, out);
                word.push(c);
                end_word(&mut word, out);
            } else {
                word.push(c);
            }
        }
        end_word(&mut word, out);
    }

    /// Greedy longest match from the left over one `▁`-prefixed word.
    fn encode_word(&self, tokens: &[String], word: &[u8], out: &mut Vec<u32>) {
        let start = out.len();
        let mut at = 0;
        while at < word.len() {
            match self.longest_prefix(tokens, &word[at..]) {
                Some((id, len)) => {
                    out.push(id);
                    at += len;
                }
                None => {
                    out.truncate(start);
                    break;
                }
            }
        }
        if out.len() == start {
            out.extend(self.unk);
        }
    }

    /// The longest token that `bytes` starts with, and its length.
    fn longest_prefix(&self, tokens: &[String], bytes: &[u8]) -> Option<(u32, usize)> {
        let text = |id: u32| tokens[id as usize].as_bytes();
        let mut run = &self.sorted[..];
        let mut best = None;
        for (depth, &b) in bytes.iter().enumerate().take(MAX_WORDPIECE_TOKEN_BYTES) {
            // Every token in `run` starts with bytes[..depth]; a token that is
            // exactly that prefix sorts first, then the rest by their next byte.
            let below = |id: &u32, inclusive: bool| {
                let t = text(*id);
                t.len() <= depth || if inclusive { t[depth] <= b } else { t[depth] < b }
            };
            let lo = run.partition_point(|id| below(id, false));
            let hi = run.partition_point(|id| below(id, true));
            run = &run[lo..hi];
            let Some(&first) = run.first() else { break };
            if text(first).len() == depth + 1 {
                best = Some((first, depth + 1));
            }
        }
        best
    }
}

/// The first character of `c`'s canonical decomposition (`c` itself if it has none).
fn first_of_decomposition(c: char) -> char {
    let mut first = None;
    unicode_normalization::char::decompose_canonical(c, |d| {
        first.get_or_insert(d);
    });
    first.unwrap_or(c)
}

/// A character's lower case when that is one character; for the one character
/// whose full lower case is longer (U+0130), its first character, which is the
/// one-character mapping of the Unicode data.
fn simple_lowercase(c: char) -> char {
    c.to_lowercase().next().unwrap_or(c)
}

/// `\p{C}` less unassigned code points, which llama.cpp keeps.
fn is_control(category: Gc) -> bool {
    matches!(category, Gc::Control | Gc::Format | Gc::PrivateUse | Gc::Surrogate)
}

/// The CJK ideograph blocks BERT splits into single characters. The range from
/// U+2B920 rather than U+2B820 follows Hugging Face's tokenizer, as llama.cpp does.
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const BERT: Normalize = Normalize { lowercase: true, strip_accents: true };

    fn vocab() -> Vec<String> {
        [
            "[UNK]", "▁hello", "▁hell", "▁he", "▁world", "▁un", "aff", "able", "ab", "##x", "▁!", "▁,", "▁.", "▁cafe",
            "▁你", "▁好", "▁i", "▁ii", "s", "▁a", "▁+", "▁`", "▁ǆ", "▁x", "▁ab", "bc",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    fn encode_with(normalize: Normalize, text: &str) -> Vec<u32> {
        let tokens = vocab();
        let wp = WordPiece::new(&tokens, normalize, Some(0));
        let mut out = Vec::new();
        wp.encode(&tokens, text, &mut out);
        out
    }

    fn encode(text: &str) -> Vec<String> {
        let tokens = vocab();
        encode_with(BERT, text).into_iter().map(|id| tokens[id as usize].clone()).collect()
    }

    #[test]
    fn greedy_longest_match() {
        assert_eq!(encode("hello"), ["▁hello"]);
        assert_eq!(encode("hell"), ["▁hell"]);
        assert_eq!(encode("unaffable"), ["▁un", "aff", "able"]);
        // "▁hello" is longest at the start, then "s" continues the word.
        assert_eq!(encode("hellos"), ["▁hello", "s"]);
        // Longest first, even where a shorter start would let the rest match ("▁a" "bc").
        assert_eq!(encode("abc"), ["[UNK]"]);
    }

    #[test]
    fn a_word_with_an_unmatched_position_is_unknown() {
        assert_eq!(encode("hellq world"), ["[UNK]", "▁world"]);
        assert_eq!(encode("zzz"), ["[UNK]"]);
        // Continuations are stored without "##": "##x" never matches "x".
        assert_eq!(encode("hex"), ["[UNK]"]);
        let tokens = vocab();
        let wp = WordPiece::new(&tokens, BERT, None);
        let mut out = Vec::new();
        wp.encode(&tokens, "zzz hello", &mut out);
        assert_eq!(out, [1], "without an unknown token the word gives nothing");
    }

    #[test]
    fn punctuation_and_ascii_symbols_stand_alone() {
        assert_eq!(encode("hello,world!"), ["▁hello", "▁,", "▁world", "▁!"]);
        assert_eq!(encode("a+a`a"), ["▁a", "▁+", "▁a", "▁`", "▁a"]);
        // A non-ASCII symbol (U+00D7) stays inside its word.
        assert_eq!(encode("a×a"), ["[UNK]"]);
    }

    #[test]
    fn case_and_accents() {
        assert_eq!(encode("HeLLo WORLD"), ["▁hello", "▁world"]);
        // Precomposed and combining accents both go.
        assert_eq!(encode("Café CAFE\u{301}"), ["▁cafe", "▁cafe"]);
        assert_eq!(encode("ǅ"), ["▁ǆ"]);
        let keep = Normalize { lowercase: false, strip_accents: false };
        assert_eq!(encode_with(keep, "Hello"), [0]);
        assert_eq!(encode_with(keep, "café"), [0]);
        // Without stripping, a combining mark stays in the word.
        let lower = Normalize { lowercase: true, strip_accents: false };
        assert_eq!(encode_with(lower, "CAFE"), [13]);
        assert_eq!(encode_with(lower, "cafe\u{301}"), [0]);
        // U+0130's full lower case is "i" + U+0307; the one-character mapping is "i".
        assert_eq!(encode_with(lower, "İ"), [16]);
        // One code point per character: a Hangul syllable keeps only its leading jamo.
        assert_eq!(first_of_decomposition('가'), '\u{1100}');
        assert_eq!(first_of_decomposition('ǅ'), 'ǅ');
    }

    #[test]
    fn cjk_ideographs_are_words_of_their_own() {
        assert_eq!(encode("你好"), ["▁你", "▁好"]);
        assert_eq!(encode("a你a"), ["▁a", "▁你", "▁a"]);
    }

    #[test]
    fn whitespace_and_dropped_characters() {
        assert_eq!(encode("  hello\t\n\u{3000}world\u{A0} "), ["▁hello", "▁world"]);
        // Controls, NUL and U+FFFD vanish without cutting the word.
        assert_eq!(encode("hel\u{0}l\u{7}o wor\u{FFFD}ld\u{200B}"), ["▁hello", "▁world"]);
        assert!(encode("").is_empty());
        assert!(encode(" \t\n ").is_empty());
        assert!(encode("\u{0}\u{7}").is_empty());
    }

    #[test]
    fn longest_prefix_search() {
        let tokens = vocab();
        let wp = WordPiece::new(&tokens, BERT, None);
        let find =
            |s: &str| wp.longest_prefix(&tokens, s.as_bytes()).map(|(id, len)| (tokens[id as usize].as_str(), len));
        assert_eq!(find("▁hellox"), Some(("▁hello", 8)));
        assert_eq!(find("▁hel"), Some(("▁he", 5)));
        assert_eq!(find("▁ii"), Some(("▁ii", 5)));
        assert_eq!(find("▁q"), None);
        assert_eq!(find(""), None);
        assert_eq!(find("abl"), Some(("ab", 2)));
    }
}
