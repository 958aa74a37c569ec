//! Nearest passages to a query by their embeddings (exact search: a
//! workflow's knowledge file holds tens to thousands of passages, which a
//! scan of dot products ranks in microseconds to milliseconds).

use super::cosine;

/// Passages and their embeddings, searchable by a query's embedding.
pub struct PassageIndex {
    passages: Vec<String>,
    vectors: Vec<Vec<f32>>,
}

impl PassageIndex {
    /// `vectors[i]` is the embedding of `passages[i]`; the counts must agree
    /// (else `None`).
    pub fn new(passages: Vec<String>, vectors: Vec<Vec<f32>>) -> Option<Self> {
        (passages.len() == vectors.len()).then_some(Self { passages, vectors })
    }

    pub fn len(&self) -> usize {
        self.passages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.passages.is_empty()
    }

    /// The `k` passages most similar to `query` (cosine), the nearest first;
    /// ties keep file order.
    pub fn search(&self, query: &[f32], k: usize) -> Vec<(&str, f32)> {
        let mut scored: Vec<(usize, f32)> = self.vectors.iter().map(|v| cosine(query, v)).enumerate().collect();
        scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        scored.into_iter().take(k).map(|(i, score)| (self.passages[i].as_str(), score)).collect()
    }
}

/// A retrieve step's output: the passages, nearest first, a blank line apart.
pub fn join_passages(found: &[(&str, f32)]) -> String {
    found.iter().map(|(p, _)| *p).collect::<Vec<_>>().join("\n\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_first_ties_in_file_order() {
        let passages = ["east", "north", "also east", "west"].map(String::from).to_vec();
        let vectors = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![2.0, 0.0], vec![-1.0, 0.0]];
        let index = PassageIndex::new(passages, vectors).unwrap();
        let found = index.search(&[1.0, 0.1], 3);
        let names: Vec<&str> = found.iter().map(|f| f.0).collect();
        assert_eq!(names, ["east", "also east", "north"]);
        assert_eq!(join_passages(&found[..2]), "east\n\nalso east");
        assert_eq!(index.search(&[1.0, 0.0], 10).len(), 4);
        assert!(PassageIndex::new(vec!["a".into()], vec![]).is_none());
    }
}
