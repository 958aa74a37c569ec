//! A workflow's retrieve steps in this process: a plain encoder model embeds
//! the step's documents (once per run) and its query, and the step outputs
//! the passages nearest to the query.

use std::path::Path;

use anyhow::{Context, Result};
use flexserve_engine::encoder::{join_passages, PassageIndex};
use flexserve_engine::Normalization;
use flexserve_workflow::Retrieval;

use crate::plain::LoadedEncoder;

/// An encoder model opened for retrieve steps.
pub struct Retriever(LoadedEncoder);

impl Retriever {
    pub fn open(path: &Path, threads: usize) -> Result<Retriever> {
        LoadedEncoder::open(path, threads).map(Retriever)
    }

    /// The unit-length embedding of `text` and its token count.
    fn embed(&self, text: &str) -> Result<(Vec<f32>, usize)> {
        self.0.embed(text, Normalization::Euclidean)
    }

    /// The step's documents, each passage embedded with the step's prefix;
    /// and the tokens embedded.
    pub fn index(&self, retrieval: &Retrieval) -> Result<(PassageIndex, usize)> {
        let passages = retrieval.read_passages()?;
        let mut vectors = Vec::with_capacity(passages.len());
        let mut tokens = 0;
        for (i, passage) in passages.iter().enumerate() {
            let (v, n) = self
                .embed(&format!("{}{passage}", retrieval.prefix))
                .with_context(|| format!("passage {} of {}", i + 1, retrieval.documents.display()))?;
            vectors.push(v);
            tokens += n;
        }
        let index = PassageIndex::new(passages, vectors).context("one embedding per passage")?;
        Ok((index, tokens))
    }

    /// The step's output for `query`: the nearest passages, a blank line
    /// apart; and the query's token count.
    pub fn retrieve(&self, index: &PassageIndex, retrieval: &Retrieval, query: &str) -> Result<(String, usize)> {
        let (vector, tokens) = self.embed(query).context("embedding the query")?;
        Ok((join_passages(&index.search(&vector, retrieval.passages)), tokens))
    }
}
