//! Pre-tokenizers: split text into words before byte-level BPE merges.
//!
//! Each kind is a sequence of split stages. A stage refines every piece from the
//! previous stage on its own; the text a stage's pattern does not match stays a
//! piece of its own. The stages are hand-written matchers of these patterns
//! (leftmost match, alternatives tried in order, as a backtracking regex engine does):
//!
//! | kind      | stages |
//! |-----------|--------|
//! | `gpt2`    | `'s\|'t\|'re\|'ve\|'m\|'ll\|'d\| ?\p{L}+\| ?\p{N}+\| ?[^\s\p{L}\p{N}]+\|\s+(?!\S)` |
//! | `smollm`  | `\p{N}` (every digit alone), then the `gpt2` pattern |
//! | `llama-bpe` | `(?i:'s\|'t\|'re\|'ve\|'m\|'ll\|'d)\|[^\r\n\p{L}\p{N}]?\p{L}+\|\p{N}{1,3}\| ?[^\s\p{L}\p{N}]+[\r\n]*\|\s*[\r\n]+\|\s+(?!\S)\|\s+` |
//! | `qwen2`   | as `llama-bpe` with `\p{N}` (single digits) |
//! | `qwen35`  | as `qwen2` with `[\p{L}\p{M}]` for `\p{L}` (and marks not in `[^\s\p{L}\p{N}]`) |
//! | `default` | `[\p{P}$+<=>^~\|]+`, the `gpt2` pattern, `\p{N}+`, `[0-9][0-9][0-9]` |
//! | `falcon`  | ``[\p{P}$+<=>^~\|`]+``, the `gpt2` pattern, `[0-9][0-9][0-9]` |
//!
//! Note the `gpt2` pattern has no final `\s+`: a single space before a word-less
//! character (say `" \n"`) is left unmatched and so becomes a piece by itself,
//! which is the same outcome.

use std::ops::Range;

use crate::unicode::{classify, is_mark, is_number, is_punctuation, CharClass};

/// Which split rules run before the BPE merges (`tokenizer.ggml.pre`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizerKind {
    /// `default`, or no `tokenizer.ggml.pre` at all.
    Default,
    /// `gpt2` / `gpt-2`, and `mpt` / `olmo` which share its rules.
    Gpt2,
    /// `llama-bpe` / `llama3` / `llama-v3` / `falcon3`: Llama 3's rules.
    Llama3,
    /// `qwen2` / `deepseek-r1-qwen`.
    Qwen2,
    /// `qwen35`: as `qwen2` with combining marks counted as letters.
    Qwen35,
    /// `smollm` and the others sharing its rules (`starcoder`, `refact`, `command-r`, `codeshell`,
    /// `exaone`, `minerva`).
    SmolLm,
    /// `falcon`.
    Falcon,
}

impl PreTokenizerKind {
    /// The kind for a `tokenizer.ggml.pre` value, or None for an unknown one.
    pub fn from_name(name: &str) -> Option<PreTokenizerKind> {
        Some(match name {
            "default" => PreTokenizerKind::Default,
            "gpt2" | "gpt-2" | "mpt" | "olmo" => PreTokenizerKind::Gpt2,
            "llama-bpe" | "llama3" | "llama-v3" | "falcon3" => PreTokenizerKind::Llama3,
            "qwen2" | "deepseek-r1-qwen" => PreTokenizerKind::Qwen2,
            "qwen35" => PreTokenizerKind::Qwen35,
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva" => {
                PreTokenizerKind::SmolLm
            }
            "falcon" => PreTokenizerKind::Falcon,
            _ => return None,
        })
    }

    /// Names accepted by [`PreTokenizerKind::from_name`], for error messages.
    pub const SUPPORTED: &'static str = "default, gpt2, gpt-2, mpt, olmo, llama-bpe, llama3, llama-v3, falcon3, \
        qwen2, deepseek-r1-qwen, qwen35, smollm, starcoder, refact, command-r, codeshell, exaone, minerva, falcon";

    /// Splits `text` into pieces (consecutive, covering all of it).
    pub fn split(self, text: &str) -> Vec<&str> {
        let chars: Vec<char> = text.chars().collect();
        // Byte offset of every char boundary, so char ranges map back to slices.
        let mut offsets: Vec<usize> = text.char_indices().map(|(i, _)| i).collect();
        offsets.push(text.len());

        // One piece covering the whole text to start with.
        let mut pieces: Vec<Range<usize>> = std::iter::once(0..chars.len()).collect();
        let stages: &[Stage] = match self {
            PreTokenizerKind::Gpt2 => &[Stage::Gpt2],
            PreTokenizerKind::SmolLm => &[Stage::EachNumber, Stage::Gpt2],
            PreTokenizerKind::Llama3 => &[Stage::Llama3 { digit_group: 3, marks_are_letters: false }],
            PreTokenizerKind::Qwen2 => &[Stage::Llama3 { digit_group: 1, marks_are_letters: false }],
            PreTokenizerKind::Qwen35 => &[Stage::Llama3 { digit_group: 1, marks_are_letters: true }],
            PreTokenizerKind::Default => {
                &[Stage::PunctuationRuns { backtick: false }, Stage::Gpt2, Stage::NumberRuns, Stage::AsciiDigitTriples]
            }
            PreTokenizerKind::Falcon => {
                &[Stage::PunctuationRuns { backtick: true }, Stage::Gpt2, Stage::AsciiDigitTriples]
            }
        };
        for stage in stages {
            let mut next = Vec::with_capacity(pieces.len() * 2);
            for piece in &pieces {
                let mut sink = Sink { out: &mut next, prev: piece.start };
                stage.run(&chars, piece.clone(), &mut sink);
                sink.finish(piece.end);
            }
            pieces = next;
        }
        pieces.into_iter().map(|r| &text[offsets[r.start]..offsets[r.end]]).collect()
    }
}

#[derive(Clone, Copy)]
enum Stage {
    Gpt2,
    Llama3 {
        digit_group: usize,
        marks_are_letters: bool,
    },
    /// `\p{N}`: every number character on its own.
    EachNumber,
    /// `\p{N}+`
    NumberRuns,
    /// `[\p{P}$+<=>^~|]+`, with `` ` `` too when `backtick`.
    PunctuationRuns {
        backtick: bool,
    },
    /// `[0-9][0-9][0-9]`
    AsciiDigitTriples,
}

/// Collects piece boundaries; text between the last cut and a new cut becomes a piece.
struct Sink<'a> {
    out: &'a mut Vec<Range<usize>>,
    prev: usize,
}

impl Sink<'_> {
    /// Ends the current piece at `end` (no piece if it would be empty).
    fn cut(&mut self, end: usize) {
        if end > self.prev {
            self.out.push(self.prev..end);
        }
        self.prev = end;
    }

    fn finish(&mut self, end: usize) {
        self.cut(end);
    }
}

impl Stage {
    fn run(self, chars: &[char], range: Range<usize>, sink: &mut Sink) {
        match self {
            Stage::Gpt2 => split_gpt2(chars, range, sink),
            Stage::Llama3 { digit_group, marks_are_letters } => {
                split_llama3(chars, range, digit_group, marks_are_letters, sink)
            }
            Stage::EachNumber => split_class(chars, range, false, is_number, sink),
            Stage::NumberRuns => split_class(chars, range, true, is_number, sink),
            Stage::PunctuationRuns { backtick } => split_class(
                chars,
                range,
                true,
                |c| {
                    is_punctuation(c)
                        || matches!(c, '$' | '+' | '<' | '=' | '>' | '^' | '~' | '|')
                        || (backtick && c == '`')
                },
                sink,
            ),
            Stage::AsciiDigitTriples => {
                let mut pos = range.start;
                while pos + 3 <= range.end {
                    if chars[pos..pos + 3].iter().all(char::is_ascii_digit) {
                        sink.cut(pos);
                        pos += 3;
                        sink.cut(pos);
                    } else {
                        pos += 1;
                    }
                }
            }
        }
    }
}

/// Matches of a one-character class, each character alone or in maximal runs.
fn split_class(chars: &[char], range: Range<usize>, runs: bool, in_class: impl Fn(char) -> bool, sink: &mut Sink) {
    let mut pos = range.start;
    while pos < range.end {
        if !in_class(chars[pos]) {
            pos += 1;
            continue;
        }
        sink.cut(pos);
        pos += 1;
        if runs {
            while pos < range.end && in_class(chars[pos]) {
                pos += 1;
            }
        }
        sink.cut(pos);
    }
}

/// Class of the character at `pos`, or None past the end of the piece.
fn class_at(chars: &[char], end: usize, pos: usize) -> Option<CharClass> {
    (pos < end).then(|| classify(chars[pos]))
}

/// Length of an English contraction (`'s`, `'t`, `'re`, `'ve`, `'m`, `'ll`, `'d`) at `pos`.
fn contraction_len(chars: &[char], end: usize, pos: usize, any_case: bool) -> Option<usize> {
    if chars[pos] != '\'' || pos + 1 >= end {
        return None;
    }
    let lower = |c: char| if any_case { c.to_ascii_lowercase() } else { c };
    let next = lower(chars[pos + 1]);
    if matches!(next, 's' | 't' | 'm' | 'd') {
        return Some(2);
    }
    if pos + 2 < end {
        let next2 = lower(chars[pos + 2]);
        if matches!((next, next2), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
            return Some(3);
        }
    }
    None
}

/// Whitespace handling shared by both patterns: `\s+(?!\S)` then `\s+`. A run
/// followed by a non-space keeps its last character for the next word.
fn whitespace_run_end(chars: &[char], end: usize, pos: usize) -> Option<usize> {
    let mut n = 0;
    while class_at(chars, end, pos + n) == Some(CharClass::Space) {
        n += 1;
    }
    if n > 1 && pos + n < end {
        Some(pos + n - 1)
    } else if n > 0 {
        Some(pos + n)
    } else {
        None
    }
}

fn split_gpt2(chars: &[char], range: Range<usize>, sink: &mut Sink) {
    let end = range.end;
    let mut pos = range.start;
    while pos < end {
        if let Some(len) = contraction_len(chars, end, pos, false) {
            pos += len;
            sink.cut(pos);
            continue;
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
        let space = chars[pos] == ' ';
        let lead = class_at(chars, end, pos + usize::from(space));
        if let Some(class @ (CharClass::Letter | CharClass::Number | CharClass::Other)) = lead {
            pos += usize::from(space);
            while class_at(chars, end, pos) == Some(class) {
                pos += 1;
            }
            sink.cut(pos);
            continue;
        }
        pos = whitespace_run_end(chars, end, pos).unwrap_or(pos + 1);
        sink.cut(pos);
    }
}

fn split_llama3(chars: &[char], range: Range<usize>, digit_group: usize, marks_are_letters: bool, sink: &mut Sink) {
    let end = range.end;
    // Qwen 3.5's rules put combining marks with letters (`[\p{L}\p{M}]+`).
    let class_of = |c: char| match classify(c) {
        CharClass::Other if marks_are_letters && is_mark(c) => CharClass::Letter,
        class => class,
    };
    let class_of_at = |pos: usize| (pos < end).then(|| class_of(chars[pos]));
    let mut pos = range.start;
    while pos < end {
        let c = chars[pos];
        if let Some(len) = contraction_len(chars, end, pos, true) {
            pos += len;
            sink.cut(pos);
            continue;
        }
        let class = class_of(c);
        // `[^\r\n\p{L}\p{N}]?\p{L}+`
        if !(c == '\r' || c == '\n' || class == CharClass::Number)
            && (class == CharClass::Letter || class_of_at(pos + 1) == Some(CharClass::Letter))
        {
            pos += 1;
            while class_of_at(pos) == Some(CharClass::Letter) {
                pos += 1;
            }
            sink.cut(pos);
            continue;
        }
        // `\p{N}{1,3}` (or `\p{N}` alone): a digit run cut into groups.
        if class == CharClass::Number {
            let mut group_start = pos;
            while class_of_at(pos) == Some(CharClass::Number) {
                pos += 1;
                if pos - group_start >= digit_group {
                    sink.cut(pos);
                    group_start = pos;
                }
            }
            sink.cut(pos);
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
        let space = c == ' ';
        let lead = if space { class_of_at(pos + 1) } else { Some(class) };
        if !matches!(lead, Some(CharClass::Space | CharClass::Letter | CharClass::Number)) {
            pos += usize::from(space);
            while class_of_at(pos) == Some(CharClass::Other) {
                pos += 1;
            }
            while pos < end && matches!(chars[pos], '\r' | '\n') {
                pos += 1;
            }
            sink.cut(pos);
            continue;
        }
        // `\s*[\r\n]+`: whitespace up to and including its last line break.
        let mut n = 0;
        let mut after_last_break = None;
        while class_of_at(pos + n) == Some(CharClass::Space) {
            if matches!(chars[pos + n], '\r' | '\n') {
                after_last_break = Some(pos + n + 1);
            }
            n += 1;
        }
        if let Some(stop) = after_last_break {
            pos = stop;
            sink.cut(pos);
            continue;
        }
        pos = whitespace_run_end(chars, end, pos).unwrap_or(pos + 1);
        sink.cut(pos);
    }
}

#[cfg(test)]
mod tests {
    use super::PreTokenizerKind::{self, *};

    fn split(kind: PreTokenizerKind, text: &str) -> Vec<&str> {
        kind.split(text)
    }

    #[test]
    fn gpt2_rules() {
        assert_eq!(
            split(Gpt2, "Hello world's  end!!\n\n 123"),
            ["Hello", " world", "'s", " ", " end", "!!", "\n\n", " 123"]
        );
        assert_eq!(split(Gpt2, "a   b"), ["a", "  ", " b"]);
        assert_eq!(split(Gpt2, "x  "), ["x", "  "]);
        assert_eq!(split(Gpt2, "I'M"), ["I", "'", "M"]);
    }

    #[test]
    fn smollm_splits_every_digit() {
        assert_eq!(split(SmolLm, "12345"), ["1", "2", "3", "4", "5"]);
        assert_eq!(split(SmolLm, "a 42b"), ["a", " ", "4", "2", "b"]);
    }

    #[test]
    fn llama3_rules() {
        assert_eq!(split(Llama3, "1234567"), ["123", "456", "7"]);
        assert_eq!(split(Llama3, "I'M fine"), ["I", "'M", " fine"]);
        assert_eq!(split(Llama3, "a\n\n  b"), ["a", "\n\n", " ", " b"]);
        assert_eq!(split(Llama3, "x  \n y"), ["x", "  \n", " y"]);
        assert_eq!(split(Llama3, "(hi)...\n"), ["(hi", ")...\n"]);
        assert_eq!(split(Qwen2, "123"), ["1", "2", "3"]);
        // A combining mark after a space: its own piece for Qwen 2, part of the word for Qwen 3.5.
        assert_eq!(split(Qwen2, "a \u{301}b"), ["a", " \u{301}", "b"]);
        assert_eq!(split(Qwen35, "a \u{301}b"), ["a", " \u{301}b"]);
    }

    #[test]
    fn default_rules() {
        assert_eq!(split(Default, "1234567"), ["123", "456", "7"]);
        assert_eq!(split(Default, "a+b=c"), ["a", "+", "b", "=", "c"]);
        assert_eq!(split(Default, "x`!y"), ["x", "`", "!", "y"]);
    }

    #[test]
    fn falcon_rules() {
        // A backtick joins the punctuation run.
        assert_eq!(split(Falcon, "x`!y"), ["x", "`!", "y"]);
        // Digit runs are not cut apart before the triples are.
        assert_eq!(split(Falcon, "x 1234567"), ["x", " ", "123", "456", "7"]);
        assert_eq!(PreTokenizerKind::from_name("falcon"), Some(Falcon));
        assert_eq!(PreTokenizerKind::from_name("mpt"), Some(Gpt2));
        assert_eq!(PreTokenizerKind::from_name("command-r"), Some(SmolLm));
    }

    #[test]
    fn pieces_cover_the_text() {
        let text = "Ünïcödé  \u{3000}x\r\n\t¹²³ 'll ()";
        for kind in [Default, Gpt2, Llama3, Qwen2, Qwen35, SmolLm, Falcon] {
            assert_eq!(split(kind, text).concat(), text, "{kind:?}");
        }
    }
}
