//! `flexserve embed`: embeddings of texts from a plain encoder model (one
//! JSON array of floats per input, one input per line).

use anyhow::{bail, Context, Result};
use clap::Args;
use flexserve_engine::Normalization;
use std::io::Write;
use std::path::PathBuf;

use crate::plain::LoadedEncoder;

#[derive(Args)]
pub(crate) struct EmbedArgs {
    /// An encoder model (GGUF; nomic-bert).
    #[arg(long)]
    model: PathBuf,
    /// A text to embed (repeat for several).
    #[arg(long, conflicts_with = "file", required_unless_present = "file")]
    text: Vec<String>,
    /// Embed each non-empty line of this file (`-`: standard input).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Leave the pooled vectors as they are instead of scaling them to unit length.
    #[arg(long)]
    no_normalize: bool,
    /// Worker threads (0 = one per core).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

pub(crate) fn run(args: EmbedArgs) -> Result<()> {
    let inputs = match &args.file {
        None => args.text.clone(),
        Some(path) => {
            let text = crate::read_text(None, Some(path.clone()))?;
            text.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).collect()
        }
    };
    if inputs.is_empty() {
        bail!("nothing to embed: the input has no non-empty lines");
    }
    let loaded = LoadedEncoder::open(&args.model, args.threads)?;
    let normalization = if args.no_normalize { Normalization::None } else { Normalization::Euclidean };
    let mut out = std::io::stdout().lock();
    for (i, text) in inputs.iter().enumerate() {
        let (vector, _) = loaded.embed(text, normalization).with_context(|| format!("input {}", i + 1))?;
        serde_json::to_writer(&mut out, &vector)?;
        writeln!(out)?;
    }
    Ok(())
}
