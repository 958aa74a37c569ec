//! The merge loops of both tokenizer models, on integer symbols.
//!
//! A word starts as one symbol per byte (byte-level BPE) or per character
//! (SentencePiece); the adjacent pair that merges first is merged until no pair
//! merges. "First" is the lowest merge rank (BPE) or the highest score of the
//! merged token (SentencePiece); ties go to the leftmost pair.
//!
//! Symbols are small integers, so a pair is looked up by one integer hash, and
//! they sit in a linked list; a min-queue holds (priority, left position) of every
//! pair that could merge. An entry is not removed when its pair changes: when it
//! comes out of the queue, it is used only if the pair now at its left position
//! still has exactly its priority (then it is the pair a fresh entry would name).
//! Each merge adds at most two entries, so a word of n symbols costs O(n log n).

use std::cmp::Reverse;
use std::collections::hash_map::Entry;
use std::collections::{BinaryHeap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};

/// No symbol / no part: the end of the list, a merged-away symbol, or a
/// character that takes part in no merge.
pub(crate) const NONE: u32 = u32::MAX;

/// Most symbols one merge run handles; longer words (over 4 GiB, which no
/// message can be) are merged in pieces of this size.
pub(crate) const MAX_SYMBOLS: usize = (u32::MAX - 1) as usize;

/// Hashes the integer keys of the pair tables (splitmix64's finalizer). The
/// tables are built from the model alone; the input only looks keys up.
#[derive(Default)]
pub(crate) struct IntHasher(u64);

impl Hasher for IntHasher {
    fn finish(&self) -> u64 {
        let mut x = self.0;
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.write_u64(n.into());
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = self.0.rotate_left(32) ^ n;
    }
}

pub(crate) type IntMap<K, V> = HashMap<K, V, BuildHasherDefault<IntHasher>>;

fn pair_key(left: u32, right: u32) -> u64 {
    (u64::from(left) << 32) | u64::from(right)
}

/// Byte-level BPE merges. Every string that is a merge side or result, and every
/// byte's character, is a "part" with a small id.
pub(crate) struct RankedMerges {
    /// (left part, right part) -> (rank, merged part).
    pairs: IntMap<u64, (u32, u32)>,
    /// The token whose text is each part, or NONE. Part `b` is byte `b`'s character.
    part_tokens: Vec<u32>,
}

impl RankedMerges {
    /// `byte_chars[b]` is byte `b`'s character; `merges` are in rank order.
    pub(crate) fn new(
        byte_chars: &[char; 256],
        merges: Vec<(String, String)>,
        token_id: impl Fn(&str) -> Option<u32>,
    ) -> RankedMerges {
        let mut parts: HashMap<String, u32> = byte_chars.iter().zip(0..).map(|(c, id)| (c.to_string(), id)).collect();
        let mut part_id = |text: String| {
            let next = parts.len() as u32;
            *parts.entry(text).or_insert(next)
        };
        let mut pairs = IntMap::default();
        for (rank, (left, right)) in merges.into_iter().enumerate() {
            let merged = part_id(format!("{left}{right}"));
            let key = pair_key(part_id(left), part_id(right));
            // A repeated merge keeps its first (best) rank.
            pairs.entry(key).or_insert((rank as u32, merged));
        }
        let mut part_tokens = vec![NONE; parts.len()];
        for (text, id) in parts {
            part_tokens[id as usize] = token_id(&text).unwrap_or(NONE);
        }
        RankedMerges { pairs, part_tokens }
    }

    /// The token of byte `b`'s character, if it is one.
    pub(crate) fn byte_token(&self, b: u8) -> Option<u32> {
        self.token(u32::from(b))
    }

    fn token(&self, part: u32) -> Option<u32> {
        self.part_tokens.get(part as usize).copied().filter(|&t| t != NONE)
    }

    /// Merges `word` (raw bytes); calls `piece(bytes, token)` for each final piece in order.
    pub(crate) fn merge(&self, merger: &mut Merger, word: &[u8], mut piece: impl FnMut(&[u8], Option<u32>)) {
        for chunk in word.chunks(MAX_SYMBOLS) {
            merger.run(chunk.iter().map(|&b| u32::from(b)), |l, r| self.pairs.get(&pair_key(l, r)).copied());
            for (start, end, part) in merger.pieces() {
                piece(&chunk[start..end], self.token(part));
            }
        }
    }
}

/// SentencePiece merges: two adjacent symbols merge when their text together is a
/// token. A symbol is a token id, or (for a character that is no token but is part
/// of one) an id above the vocabulary.
pub(crate) struct ScoredMerges {
    n_vocab: u32,
    /// (left symbol, right symbol) -> the token of their joined text.
    pairs: IntMap<u64, u32>,
    /// Heap priority of each token: its score, highest first.
    priority: Vec<u32>,
    ascii_symbols: [u32; 128],
    other_symbols: IntMap<char, u32>,
}

/// An order-keeping map of scores to integers, highest score lowest. -0 and +0 are
/// equal; NaN comes last.
fn score_priority(score: f32) -> u32 {
    if score.is_nan() {
        return NONE;
    }
    let bits = (score + 0.0).to_bits();
    let ascending = if bits >> 31 == 1 { !bits } else { bits | (1 << 31) };
    !ascending
}

impl ScoredMerges {
    pub(crate) fn new(tokens: &[String], scores: &[f32], token_id: impl Fn(&str) -> Option<u32>) -> ScoredMerges {
        let n_vocab = tokens.len() as u32;
        let mut chars: IntMap<char, u32> = IntMap::default();
        for (id, text) in (0..).zip(tokens) {
            let mut it = text.chars();
            if let (Some(c), None) = (it.next(), it.next()) {
                chars.insert(c, id);
            }
        }
        // A side of a split is a token, or a single character given an id of its own.
        let mut symbol = |side: &str| -> Option<u32> {
            if let Some(id) = token_id(side) {
                return Some(id);
            }
            let mut it = side.chars();
            let (Some(c), None) = (it.next(), it.next()) else { return None };
            let next = n_vocab.checked_add(chars.len() as u32).filter(|&id| id < NONE)?;
            Some(*chars.entry(c).or_insert(next))
        };
        let mut pairs = IntMap::default();
        for (id, text) in (0..).zip(tokens) {
            for (split, _) in text.char_indices().skip(1) {
                let (left, right) = text.split_at(split);
                if let (Some(l), Some(r)) = (symbol(left), symbol(right)) {
                    pairs.insert(pair_key(l, r), id);
                }
            }
        }
        let mut ascii_symbols = [NONE; 128];
        for (b, slot) in ascii_symbols.iter_mut().enumerate() {
            *slot = chars.get(&char::from(b as u8)).copied().unwrap_or(NONE);
        }
        chars.retain(|c, _| !c.is_ascii());
        ScoredMerges {
            n_vocab,
            pairs,
            priority: scores.iter().map(|&s| score_priority(s)).collect(),
            ascii_symbols,
            other_symbols: chars,
        }
    }

    fn symbol(&self, c: char) -> u32 {
        match self.ascii_symbols.get(c as usize) {
            Some(&id) => id,
            None => self.other_symbols.get(&c).copied().unwrap_or(NONE),
        }
    }

    /// Merges `chars`; calls `piece(first char, token)` for each final piece in
    /// order. A piece that is no token is always a single character.
    pub(crate) fn merge(&self, merger: &mut Merger, chars: &[char], mut piece: impl FnMut(char, Option<u32>)) {
        for chunk in chars.chunks(MAX_SYMBOLS) {
            merger.run(chunk.iter().map(|&c| self.symbol(c)), |l, r| {
                let token = *self.pairs.get(&pair_key(l, r))?;
                Some((self.priority[token as usize], token))
            });
            for (start, _, symbol) in merger.pieces() {
                piece(chunk[start], (symbol < self.n_vocab).then_some(symbol));
            }
        }
    }
}

/// Words up to this many symbols queue their pairs in one binary heap; longer
/// ones in [`PairQueue`]'s per-priority buckets.
const SMALL_WORD: usize = 64;

/// A min-queue of (priority, position) entries, duplicates allowed; it gives
/// exactly the order of a binary heap on the pair.
///
/// A long word spends its time in a few priorities (a run of one letter merges
/// pair by pair, left to right), so its entries are kept per priority: positions
/// that arrive in increasing order are appended to a list read from the front, the
/// others go to a small heap; a heap of the priorities in use picks the bucket.
/// That keeps the big lists sequential in memory, where one heap over every entry
/// of a long word spends most of its time waiting for memory.
#[derive(Default)]
struct PairQueue {
    bucketed: bool,
    heap: BinaryHeap<Reverse<u64>>,
    buckets: Vec<Bucket>,
    bucket_of: IntMap<u32, usize>,
    idle: Vec<usize>,
    priorities: BinaryHeap<Reverse<u32>>,
}

#[derive(Default)]
struct Bucket {
    /// Sorted; `run[head..]` is still queued.
    run: Vec<u32>,
    head: usize,
    late: BinaryHeap<Reverse<u32>>,
}

impl Bucket {
    fn push(&mut self, position: u32) {
        if self.head == self.run.len() {
            self.run.clear();
            self.head = 0;
        }
        if self.run.last().is_none_or(|&last| last <= position) {
            self.run.push(position);
        } else {
            self.late.push(Reverse(position));
        }
    }

    fn pop(&mut self) -> Option<u32> {
        let in_run = self.run.get(self.head).copied();
        match (in_run, self.late.peek()) {
            (Some(a), Some(&Reverse(b))) if b < a => self.late.pop().map(|r| r.0),
            (Some(a), _) => {
                self.head += 1;
                Some(a)
            }
            (None, _) => self.late.pop().map(|r| r.0),
        }
    }

    fn is_empty(&self) -> bool {
        self.head == self.run.len() && self.late.is_empty()
    }
}

impl PairQueue {
    /// Empties the queue and picks the layout for a word of `symbols` symbols.
    fn reset(&mut self, symbols: usize) {
        self.bucketed = symbols > SMALL_WORD;
        self.heap.clear();
        for (_, index) in self.bucket_of.drain() {
            let bucket = &mut self.buckets[index];
            bucket.run.clear();
            bucket.head = 0;
            bucket.late.clear();
            self.idle.push(index);
        }
        self.priorities.clear();
    }

    fn push(&mut self, priority: u32, position: u32) {
        if !self.bucketed {
            self.heap.push(Reverse((u64::from(priority) << 32) | u64::from(position)));
            return;
        }
        let index = match self.bucket_of.entry(priority) {
            Entry::Occupied(e) => *e.get(),
            Entry::Vacant(e) => {
                let index = self.idle.pop().unwrap_or_else(|| {
                    self.buckets.push(Bucket::default());
                    self.buckets.len() - 1
                });
                self.priorities.push(Reverse(priority));
                *e.insert(index)
            }
        };
        self.buckets[index].push(position);
    }

    fn pop(&mut self) -> Option<(u32, u32)> {
        if !self.bucketed {
            return self.heap.pop().map(|Reverse(key)| ((key >> 32) as u32, key as u32));
        }
        let &Reverse(priority) = self.priorities.peek()?;
        let index = *self.bucket_of.get(&priority)?;
        let bucket = &mut self.buckets[index];
        let position = bucket.pop()?;
        if bucket.is_empty() {
            self.priorities.pop();
            self.bucket_of.remove(&priority);
            self.idle.push(index);
        }
        Some((priority, position))
    }
}

/// The merge loop and its buffers, kept between words.
#[derive(Default)]
pub(crate) struct Merger {
    symbols: Vec<u32>,
    prev: Vec<u32>,
    next: Vec<u32>,
    queue: PairQueue,
}

impl Merger {
    /// Runs the merges over `symbols` (at most [`MAX_SYMBOLS`]). `pair(left, right)`
    /// gives the priority of merging two adjacent symbols and the merged symbol.
    fn run(&mut self, symbols: impl Iterator<Item = u32>, pair: impl Fn(u32, u32) -> Option<(u32, u32)>) {
        self.symbols.clear();
        self.symbols.extend(symbols);
        let n = self.symbols.len();
        debug_assert!(n <= MAX_SYMBOLS);
        let n32 = n as u32;
        self.prev.clear();
        self.prev.extend((0..n32).map(|i| i.checked_sub(1).unwrap_or(NONE)));
        self.next.clear();
        self.next.extend((1..=n32).map(|i| if i == n32 { NONE } else { i }));

        let (symbols, prev, next) = (&mut self.symbols, &mut self.prev, &mut self.next);
        let priority = |left: u32, right: u32| match (left, right) {
            (NONE, _) | (_, NONE) => None,
            _ => pair(left, right),
        };
        let queue = &mut self.queue;
        queue.reset(n);
        for (left, w) in (0..).zip(symbols.windows(2)) {
            if let Some((p, _)) = priority(w[0], w[1]) {
                queue.push(p, left);
            }
        }
        while let Some((p, left)) = queue.pop() {
            let l = left as usize;
            let right = next[l];
            if right == NONE {
                continue;
            }
            let merged = match priority(symbols[l], symbols[right as usize]) {
                Some((now, merged)) if now == p => merged,
                _ => continue,
            };
            symbols[l] = merged;
            symbols[right as usize] = NONE;
            let after = next[right as usize];
            next[l] = after;
            if after != NONE {
                prev[after as usize] = left;
                if let Some((p, _)) = priority(merged, symbols[after as usize]) {
                    queue.push(p, left);
                }
            }
            let before = prev[l];
            if before != NONE {
                if let Some((p, _)) = priority(symbols[before as usize], merged) {
                    queue.push(p, before);
                }
            }
        }
    }

    /// The final pieces of the last run: (first index, end index, symbol).
    fn pieces(&self) -> impl Iterator<Item = (usize, usize, u32)> + '_ {
        let n = self.symbols.len();
        let mut at = if n == 0 { NONE } else { 0 };
        std::iter::from_fn(move || {
            if at == NONE {
                return None;
            }
            let start = at as usize;
            at = self.next[start];
            let end = if at == NONE { n } else { at as usize };
            Some((start, end, self.symbols[start]))
        })
    }
}

/// The merge loops as first written, on strings: simple, and the reference the
/// integer loops are checked against.
#[cfg(test)]
pub(crate) mod oracle {
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
    pub(crate) fn ranked(word: &str, rank: impl Fn(&str, &str) -> Option<u32>) -> Vec<&str> {
        let mut symbols = char_symbols(word);
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
    /// the highest `score` until no concatenation is a token.
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ascii_chars() -> [char; 256] {
        std::array::from_fn(|b| char::from(b as u8))
    }

    fn ranked_pieces(merges: &[(&str, &str)], vocab: &[&str], word: &str) -> Vec<String> {
        let merges = merges.iter().map(|(l, r)| (l.to_string(), r.to_string())).collect();
        let table = RankedMerges::new(&ascii_chars(), merges, |t| vocab.iter().position(|v| *v == t).map(|i| i as u32));
        let mut out = Vec::new();
        table.merge(&mut Merger::default(), word.as_bytes(), |bytes, _| {
            out.push(String::from_utf8(bytes.to_vec()).unwrap())
        });
        out
    }

    #[test]
    fn ranked_applies_lowest_rank_first() {
        let merges = [("a", "b"), ("b", "c"), ("a", "bc")];
        // "bc" (rank 1) loses to "ab" (rank 0) in "abc"; "a"+"bc" needs "bc" first.
        assert_eq!(ranked_pieces(&merges, &[], "abc"), ["ab", "c"]);
        let merges = [("b", "c"), ("a", "b"), ("a", "bc")];
        assert_eq!(ranked_pieces(&merges, &[], "abc"), ["abc"]);
        assert_eq!(ranked_pieces(&merges, &[], "abab"), ["ab", "ab"]);
        assert_eq!(ranked_pieces(&merges, &[], ""), Vec::<String>::new());
        // Ties (one merge, many places) go left to right.
        assert_eq!(ranked_pieces(&[("a", "a")], &[], "aaaaa"), ["aa", "aa", "a"]);
    }

    #[test]
    fn oracle_ranked_applies_lowest_rank_first() {
        let ranks = [("a", "b", 1), ("b", "c", 0), ("a", "bc", 2)];
        let rank = |l: &str, r: &str| ranks.iter().find(|m| m.0 == l && m.1 == r).map(|m| m.2);
        assert_eq!(oracle::ranked("abc", rank), ["abc"]);
        assert_eq!(oracle::ranked("abab", rank), ["ab", "ab"]);
        assert_eq!(oracle::ranked("", rank), Vec::<&str>::new());
    }

    #[test]
    fn scored_prefers_high_scores_then_left() {
        let vocab = ["ab", "bc", "aa", "a"];
        let scores = [-1.0, -2.0, -1.0, 0.0];
        let tokens: Vec<String> = vocab.iter().map(|s| s.to_string()).collect();
        let table = ScoredMerges::new(&tokens, &scores, |t| vocab.iter().position(|v| *v == t).map(|i| i as u32));
        let pieces = |text: &str| {
            let chars: Vec<char> = text.chars().collect();
            let mut out = Vec::new();
            table.merge(&mut Merger::default(), &chars, |c, token| out.push((c, token)));
            out
        };
        // "b" and "c" are no tokens but "ab" / "bc" are: they still merge.
        assert_eq!(pieces("abc"), [('a', Some(0)), ('c', None)]);
        assert_eq!(pieces("aaa"), [('a', Some(2)), ('a', Some(3))]);
        assert_eq!(pieces("xbc"), [('x', None), ('b', Some(1))]);

        let score = |t: &str| vocab.iter().position(|v| *v == t).map(|i| scores[i]);
        assert_eq!(oracle::scored("abc", score), ["ab", "c"]);
        assert_eq!(oracle::scored("aaa", score), ["aa", "a"]);
    }

    #[test]
    fn pair_queue_pops_in_heap_order() {
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut random = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n) as u32
        };
        let mut queue = PairQueue::default();
        for round in 0..200 {
            queue.reset(if round % 2 == 0 { SMALL_WORD + 1 } else { 2 });
            let mut heap = BinaryHeap::new();
            let (priorities, positions) = (1 + u64::from(random(8)), 1 + u64::from(random(300)));
            let mut position = 0;
            for _ in 0..500 {
                if random(3) > 0 {
                    // Mostly rising positions, as a merge sweep makes, with some jumps back.
                    position = if random(4) == 0 { random(positions) } else { position + random(3) };
                    let priority = random(priorities);
                    queue.push(priority, position);
                    heap.push(Reverse((priority, position)));
                } else {
                    assert_eq!(queue.pop(), heap.pop().map(|r| r.0), "round {round}");
                }
            }
            while let Some(Reverse(expected)) = heap.pop() {
                assert_eq!(queue.pop(), Some(expected), "round {round}");
            }
            assert_eq!(queue.pop(), None);
        }
    }

    #[test]
    fn score_priority_keeps_the_order() {
        let scores = [f32::INFINITY, 3.5, 1.0, 0.0, -1e-30, -1.0, -7.25, f32::NEG_INFINITY];
        for w in scores.windows(2) {
            assert!(score_priority(w[0]) < score_priority(w[1]), "{w:?}");
        }
        assert_eq!(score_priority(0.0), score_priority(-0.0));
        assert_eq!(score_priority(f32::NAN), NONE);
    }
}
