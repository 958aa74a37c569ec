//! `flexserve embed`: embeddings of texts from a plain encoder model (one
//! JSON array of floats per input, one input per line).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use flexserve_engine::weights::GgufSource;
use flexserve_engine::{Encoder, Normalization};
use flexserve_tokenizer::Tokenizer;

use crate::plain::ModelFile;

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
    let t0 = Instant::now();
    let source = match ModelFile::open(&args.model)? {
        ModelFile::Plain(file) => GgufSource::from_file(Arc::new(file)),
        ModelFile::Sealed(_) => bail!(
            "{} is sealed: embeddings run on plain encoder models for now (sealed encoders are not served yet)",
            args.model.display()
        ),
    };
    let tokenizer = Tokenizer::from_gguf(&source.header().metadata)
        .with_context(|| format!("tokenizer of {}", args.model.display()))?;
    let encoder =
        Encoder::from_source(&source, args.threads).with_context(|| format!("loading {}", args.model.display()))?;
    eprintln!(
        "loaded {} ({}, {} layers, {} pooling, {} threads) in {:.0} ms",
        args.model.display(),
        encoder.config.arch.name(),
        encoder.config.n_layer,
        encoder.config.pooling.name(),
        encoder.threads(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let normalization = if args.no_normalize { Normalization::None } else { Normalization::Euclidean };
    let mut out = std::io::stdout().lock();
    for (i, text) in inputs.iter().enumerate() {
        let ids = flexserve_engine::encoder::encoder_tokens(&tokenizer, text);
        let vector = encoder.embed(&ids, normalization).with_context(|| format!("input {}", i + 1))?;
        serde_json::to_writer(&mut out, &vector)?;
        writeln!(out)?;
    }
    Ok(())
}
