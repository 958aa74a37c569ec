//! The two merge loops: ranked merges (byte-level BPE) and scored merges (SentencePiece BPE).
//!
//! Both start from one symbol per character and repeatedly merge the best adjacent
//! pair; ties go to the leftmost pair. Symbols are byte ranges of the word; a merge
//! grows the left symbol and empties the right one, so a queued pair is stale when
//! either side is empty or their lengths no longer add up to the pair's length.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

fn char_symbols(word: &str) -> Vec<Symbol> {
    let n = word.chars().count();
    word.char_indices()
        .enumerate()
        .map(|(i, (start, c))| Symbol {
            start,
            len: c.len_utf8(),
            prev: i.checked_sub(1),
            next: (i + 1 < n).then_some(i + 1),
        })
        .collect()
}

/// Merges `symbols[right]` into `symbols[left]` and unlinks it.
fn merge_into_left(symbols: &mut [Symbol], left: usize, right: usize) {
    symbols[left].len += symbols[right].len;
    symbols[right].len = 0;
    let after = symbols[right].next;
    symbols[left].next = after;
    if let Some(after) = after {
        symbols[after].prev = Some(left);
    }
}

fn text<'w>(word: &'w str, s: &Symbol) -> &'w str {
    &word[s.start..s.start + s.len]
}

/// Byte-level BPE: merges the adjacent pair of lowest `rank` until none has a rank.
/// Returns the final pieces of `word` in order.
pub(crate) fn ranked(word: &str, rank: impl Fn(&str, &str) -> Option<u32>) -> Vec<&str> {
    let mut symbols = char_symbols(word);
    // Min-heap on (rank, left index); the pair's byte length detects staleness.
    let mut queue: BinaryHeap<Reverse<(u32, usize, usize, usize)>> = BinaryHeap::new();
    let push = |queue: &mut BinaryHeap<_>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
        if let (Some(l), Some(r)) = (left, right) {
            let (a, b) = (&symbols[l], &symbols[r]);
            if let Some(rank) = rank(text(word, a), text(word, b)) {
                queue.push(Reverse((rank, l, r, a.len + b.len)));
            }
        }
    };
    for i in 1..symbols.len() {
        push(&mut queue, &symbols, Some(i - 1), Some(i));
    }
    while let Some(Reverse((_, left, right, len))) = queue.pop() {
        let (l, r) = (symbols[left], symbols[right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != len {
            continue;
        }
        merge_into_left(&mut symbols, left, right);
        push(&mut queue, &symbols, symbols[left].prev, Some(left));
        push(&mut queue, &symbols, Some(left), symbols[left].next);
    }
    symbols.iter().filter(|s| s.len > 0).map(|s| text(word, s)).collect()
}

/// A queued SentencePiece pair: highest score first, then leftmost.
struct ScoredPair {
    score: f32,
    left: usize,
    right: usize,
    len: usize,
}

impl PartialEq for ScoredPair {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for ScoredPair {}
impl PartialOrd for ScoredPair {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for ScoredPair {
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.partial_cmp(&other.score).unwrap_or(Ordering::Equal).then_with(|| other.left.cmp(&self.left))
    }
}

/// SentencePiece BPE: merges the adjacent pair whose concatenation is a token with
/// the highest `score` until no concatenation is a token. Returns the final pieces.
pub(crate) fn scored(word: &str, score: impl Fn(&str) -> Option<f32>) -> Vec<&str> {
    let mut symbols = char_symbols(word);
    let mut queue: BinaryHeap<ScoredPair> = BinaryHeap::new();
    let push = |queue: &mut BinaryHeap<_>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
        if let (Some(l), Some(r)) = (left, right) {
            let len = symbols[l].len + symbols[r].len;
            let start = symbols[l].start;
            if let Some(score) = score(&word[start..start + len]) {
                queue.push(ScoredPair { score, left: l, right: r, len });
            }
        }
    };
    for i in 1..symbols.len() {
        push(&mut queue, &symbols, Some(i - 1), Some(i));
    }
    while let Some(pair) = queue.pop() {
        let (l, r) = (symbols[pair.left], symbols[pair.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != pair.len {
            continue;
        }
        merge_into_left(&mut symbols, pair.left, pair.right);
        push(&mut queue, &symbols, symbols[pair.left].prev, Some(pair.left));
        push(&mut queue, &symbols, Some(pair.left), symbols[pair.left].next);
    }
    symbols.iter().filter(|s| s.len > 0).map(|s| text(word, s)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranked_applies_lowest_rank_first() {
        let ranks = [("a", "b", 1), ("b", "c", 0), ("a", "bc", 2)];
        let rank = |l: &str, r: &str| ranks.iter().find(|m| m.0 == l && m.1 == r).map(|m| m.2);
        // "bc" wins over "ab", then "a"+"bc".
        assert_eq!(ranked("abc", rank), ["abc"]);
        assert_eq!(ranked("abab", rank), ["ab", "ab"]);
        assert_eq!(ranked("", rank), Vec::<&str>::new());
    }

    #[test]
    fn scored_prefers_high_scores_then_left() {
        let vocab = [("ab", -1.0), ("bc", -2.0), ("aa", -1.0)];
        let score = |t: &str| vocab.iter().find(|v| v.0 == t).map(|v| v.1);
        assert_eq!(scored("abc", score), ["ab", "c"]);
        assert_eq!(scored("aaa", score), ["aa", "a"]);
    }
}
