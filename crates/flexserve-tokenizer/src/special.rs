//! Special tokens written in text: found in one left-to-right pass over a
//! byte trie of their texts.
//!
//! The work is bounded per input byte whatever the vocabulary: at each
//! position the trie is walked at most [`MAX_SPECIAL_TOKEN_BYTES`] deep, so
//! splitting `n` bytes costs at most `n * MAX_SPECIAL_TOKEN_BYTES` steps (in
//! practice a step or two per byte), not one scan of the text per special
//! token (a hostile vocabulary may declare a million of them).
//!
//! Where special tokens overlap in the text, the one that starts first wins,
//! and of those starting at the same byte the longest (as Hugging Face
//! tokenizers split added tokens). llama.cpp takes the longest token first
//! wherever it occurs; the two agree unless two special tokens overlap in the
//! text itself, which real vocabularies' delimited tokens (`<|im_start|>`)
//! and whitespace runs never make them do.

/// Longest special token (control, user-defined or unknown) a vocabulary may
/// hold, in bytes: the real vocabularies' longest are whitespace runs and
/// tags of a few dozen bytes.
pub const MAX_SPECIAL_TOKEN_BYTES: usize = 256;

/// Special tokens' texts as a byte trie.
pub(crate) struct SpecialTrie {
    /// Node 0 is the root.
    nodes: Vec<Node>,
}

#[derive(Default)]
struct Node {
    /// Children by next byte, sorted by byte.
    children: Vec<(u8, u32)>,
    /// The special token whose text ends here.
    token: Option<u32>,
}

impl SpecialTrie {
    /// A trie of `(id, text)` pairs; texts are distinct, non-empty and at most
    /// [`MAX_SPECIAL_TOKEN_BYTES`] long (the caller checks).
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = (u32, &'a str)>) -> SpecialTrie {
        let mut nodes = vec![Node::default()];
        for (id, text) in tokens {
            let mut at = 0usize;
            for &b in text.as_bytes() {
                at = match nodes[at].children.binary_search_by_key(&b, |&(c, _)| c) {
                    Ok(i) => nodes[at].children[i].1 as usize,
                    Err(i) => {
                        let next = nodes.len();
                        nodes.push(Node::default());
                        nodes[at].children.insert(i, (b, next as u32));
                        next
                    }
                };
            }
            nodes[at].token = Some(id);
        }
        SpecialTrie { nodes }
    }

    fn child(&self, node: usize, b: u8) -> Option<usize> {
        let children = &self.nodes[node].children;
        children.binary_search_by_key(&b, |&(c, _)| c).ok().map(|i| children[i].1 as usize)
    }

    /// The longest token that `eligible` accepts starting at byte `at` of
    /// `bytes`, with its length; and the trie steps taken.
    fn longest_at(&self, bytes: &[u8], at: usize, eligible: impl Fn(u32) -> bool) -> (Option<(u32, usize)>, usize) {
        let mut node = 0;
        let mut best = None;
        let mut steps = 0;
        for (depth, &b) in bytes[at..].iter().enumerate() {
            steps += 1;
            let Some(next) = self.child(node, b) else { break };
            node = next;
            if let Some(id) = self.nodes[node].token.filter(|&id| eligible(id)) {
                best = Some((id, depth + 1));
            }
        }
        (best, steps)
    }

    /// Cuts `text` into plain text and the special tokens `eligible` accepts.
    pub(crate) fn split<'t>(&self, text: &'t str, eligible: impl Fn(u32) -> bool) -> Vec<Piece<'t>> {
        self.split_counting(text, eligible).0
    }

    /// [`Self::split`], also giving the trie steps it took (the work bound's measure).
    fn split_counting<'t>(&self, text: &'t str, eligible: impl Fn(u32) -> bool) -> (Vec<Piece<'t>>, usize) {
        let mut pieces = Vec::new();
        let mut work = 0;
        if self.nodes[0].children.is_empty() {
            if !text.is_empty() {
                pieces.push(Piece::Text(text));
            }
            return (pieces, work);
        }
        let bytes = text.as_bytes();
        let (mut start, mut at) = (0, 0);
        while at < bytes.len() {
            // A token is whole UTF-8 text, so a match starts and ends on
            // character boundaries; only those are tried.
            let found = if text.is_char_boundary(at) {
                let (found, steps) = self.longest_at(bytes, at, &eligible);
                work += steps;
                found
            } else {
                None
            };
            match found {
                Some((id, len)) => {
                    if at > start {
                        pieces.push(Piece::Text(&text[start..at]));
                    }
                    pieces.push(Piece::Token(id));
                    at += len;
                    start = at;
                }
                None => at += 1,
            }
        }
        if start < bytes.len() {
            pieces.push(Piece::Text(&text[start..]));
        }
        (pieces, work)
    }
}

/// A piece of input after special tokens were split out.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Piece<'t> {
    Text(&'t str),
    Token(u32),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split<'t>(tokens: &[&str], text: &'t str) -> Vec<Piece<'t>> {
        let trie = SpecialTrie::new(tokens.iter().enumerate().map(|(i, t)| (i as u32, *t)));
        trie.split(text, |_| true)
    }

    #[test]
    fn splits_out_tokens_leftmost_then_longest() {
        use Piece::{Text, Token};
        let tokens = ["<|a|>", "<|ab|>", "  ", "   "];
        assert_eq!(split(&tokens, "x<|a|>y<|ab|>"), [Text("x"), Token(0), Text("y"), Token(1)]);
        assert_eq!(split(&tokens, "<|a|><|a|>"), [Token(0), Token(0)]);
        // Whitespace runs: longest at each start.
        assert_eq!(split(&tokens, "a     b"), [Text("a"), Token(3), Token(2), Text("b")]);
        assert_eq!(split(&tokens, "<|a"), [Text("<|a")]);
        assert_eq!(split(&tokens, ""), []);
        assert_eq!(split(&[], "text"), [Text("text")]);
        // Non-ASCII text around tokens stays whole.
        assert_eq!(split(&tokens, "é<|a|>ü"), [Text("é"), Token(0), Text("ü")]);
    }

    #[test]
    fn ineligible_tokens_stay_text_and_a_shorter_eligible_one_still_matches() {
        let trie = SpecialTrie::new([(0, "<s>"), (1, "<s>x")]);
        assert_eq!(trie.split("<s>x", |id| id == 0), [Piece::Token(0), Piece::Text("x")]);
        assert_eq!(trie.split("<s>x", |_| false), [Piece::Text("<s>x")]);
    }

    /// Many special tokens cost nothing per byte of text that holds none of
    /// them: the walk stops at the first byte with no child.
    #[test]
    fn work_per_byte_does_not_grow_with_the_vocabulary() {
        let texts: Vec<String> = (0..200_000).map(|i| format!("<tok{i}>")).collect();
        let trie = SpecialTrie::new(texts.iter().enumerate().map(|(i, t)| (i as u32, t.as_str())));
        let text = "plain text ".repeat(10_000);
        let (pieces, work) = trie.split_counting(&text, |_| true);
        assert_eq!(pieces, [Piece::Text(&text)]);
        assert_eq!(work, text.len(), "one trie step per byte");
        // Text made of token prefixes walks each prefix once per start.
        let text = "<tok1999".repeat(10_000);
        let (_, work) = trie.split_counting(&text, |_| true);
        assert!(work <= text.len() * 9, "{work} steps for {} bytes", text.len());
        let with = "a<tok199999>b<tok7>";
        assert_eq!(
            trie.split(with, |_| true),
            [Piece::Text("a"), Piece::Token(199_999), Piece::Text("b"), Piece::Token(7)]
        );
    }

    /// The worst vocabulary (every run of one byte up to the longest allowed
    /// is a token) still costs at most MAX_SPECIAL_TOKEN_BYTES steps a byte.
    #[test]
    fn work_per_byte_is_bounded_by_the_longest_special_token() {
        let texts: Vec<String> = (1..=MAX_SPECIAL_TOKEN_BYTES).map(|n| "a".repeat(n)).collect();
        let trie = SpecialTrie::new(texts.iter().enumerate().map(|(i, t)| (i as u32, t.as_str())));
        let text = "a".repeat(100_000);
        // Only the shortest is eligible, so every start walks the full depth.
        let (pieces, work) = trie.split_counting(&text, |id| id == 0);
        assert_eq!(pieces.len(), text.len());
        assert!(work <= text.len() * (MAX_SPECIAL_TOKEN_BYTES + 1), "{work}");
    }
}
