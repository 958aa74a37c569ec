//! Models in this process: inspecting model files, and running plain
//! (unsealed) models with the engine here. Sealed models never come here:
//! they run in the secure world (`secure`).

use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use flexserve_engine::encoder::encoder_tokens;
use flexserve_engine::generate::Generator;
use flexserve_engine::weights::GgufSource;
use flexserve_engine::{Encoder, Model, Normalization, Session};
use flexserve_gguf::{GgufFile, Value};
use flexserve_tokenizer::{ChatMessage, ChatTemplate, Tokenizer};

use crate::{open, RunArgs, SamplingArgs};

/// A model file opened with its tokenizer and weights.
pub(crate) struct Loaded {
    pub(crate) tokenizer: Tokenizer,
    pub(crate) template: Option<ChatTemplate>,
    pub(crate) model: Model,
}

impl Loaded {
    /// Opens a plain GGUF model. Sealed models never come here: they run in
    /// the secure world, and this (normal-world) process never decrypts one.
    pub(crate) fn open(path: &Path, threads: usize) -> Result<Self> {
        let t0 = Instant::now();
        let source = match ModelFile::open(path)? {
            ModelFile::Plain(file) => GgufSource::from_file(Arc::new(file)),
            ModelFile::Sealed(_) => bail!("{} is sealed: it runs only in the secure world", path.display()),
        };
        let meta = &source.header().metadata;
        let tokenizer = Tokenizer::from_gguf(meta).with_context(|| format!("tokenizer of {}", path.display()))?;
        let template = ChatTemplate::from_gguf(meta, &tokenizer)
            .with_context(|| format!("chat template of {}", path.display()))?;
        let model = Model::from_source(&source, threads).with_context(|| format!("loading {}", path.display()))?;
        eprintln!(
            "loaded {} ({}, {} layers, {} threads) in {:.0} ms",
            path.display(),
            model.config.arch.name(),
            model.config.n_layer,
            model.threads(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Self { tokenizer, template, model })
    }
}

/// An encoder model (embeddings) opened with its tokenizer: plain only, as
/// for generative models here.
pub(crate) struct LoadedEncoder {
    pub(crate) tokenizer: Tokenizer,
    pub(crate) encoder: Encoder,
}

impl LoadedEncoder {
    pub(crate) fn open(path: &Path, threads: usize) -> Result<Self> {
        let t0 = Instant::now();
        let source = match ModelFile::open(path)? {
            ModelFile::Plain(file) => GgufSource::from_file(Arc::new(file)),
            ModelFile::Sealed(_) => {
                bail!("{} is sealed: encoders run plain for now (sealed encoders are not served yet)", path.display())
            }
        };
        let tokenizer = Tokenizer::from_gguf(&source.header().metadata)
            .with_context(|| format!("tokenizer of {}", path.display()))?;
        let encoder = Encoder::from_source(&source, threads).with_context(|| format!("loading {}", path.display()))?;
        eprintln!(
            "loaded {} ({}, {} layers, {} pooling, {} threads) in {:.0} ms",
            path.display(),
            encoder.config.arch.name(),
            encoder.config.n_layer,
            encoder.config.pooling.name(),
            encoder.threads(),
            t0.elapsed().as_secs_f64() * 1e3
        );
        Ok(Self { tokenizer, encoder })
    }

    /// The embedding of `text` and its token count.
    pub(crate) fn embed(&self, text: &str, normalization: Normalization) -> Result<(Vec<f32>, usize)> {
        let ids = encoder_tokens(&self.tokenizer, text);
        Ok((self.encoder.embed(&ids, normalization)?, ids.len()))
    }
}

/// Whether `path` is a sealed model (by its magic).
pub(crate) fn is_sealed(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let n = f.read(&mut magic).with_context(|| format!("reading {}", path.display()))?;
    Ok(n == 8 && magic == flexserve_sealed::MAGIC)
}

/// A model file as found on disk: plain GGUF or sealed.
pub(crate) enum ModelFile {
    Plain(GgufFile),
    /// The parsed public header.
    Sealed(Box<flexserve_sealed::SealedHeader>),
}

impl ModelFile {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let mut f = std::fs::File::open(path).with_context(|| format!("opening model {}", path.display()))?;
        let mut magic = [0u8; 8];
        let n = std::io::Read::read(&mut f, &mut magic).with_context(|| format!("reading {}", path.display()))?;
        if n == magic.len() && magic == flexserve_sealed::MAGIC {
            std::io::Seek::rewind(&mut f).with_context(|| format!("reading {}", path.display()))?;
            let prefix = flexserve_sealed::SealedHeader::read_prefix(std::io::BufReader::new(f))
                .with_context(|| format!("sealed model {}", path.display()))?;
            let header = flexserve_sealed::SealedHeader::read(&prefix)
                .with_context(|| format!("sealed model {}", path.display()))?;
            return Ok(ModelFile::Sealed(Box::new(header)));
        }
        Ok(ModelFile::Plain(open(path)?))
    }

    pub(crate) fn metadata(&self) -> &flexserve_gguf::Metadata {
        match self {
            ModelFile::Plain(f) => &f.header.metadata,
            ModelFile::Sealed(h) => &h.gguf.metadata,
        }
    }
}

pub(crate) fn report(stats: &flexserve_engine::GenerationStats) {
    eprintln!(
        "prefill: {} tokens in {:.1} ms ({:.1} tok/s){} | decode: {} tokens, {:.1} tok/s | stop: {:?}",
        stats.prompt_tokens,
        stats.prefill_secs * 1e3,
        stats.prefill_tokens_per_s(),
        if stats.cached_tokens > 0 { format!(", {} cached", stats.cached_tokens) } else { String::new() },
        stats.generated_tokens,
        stats.decode_tokens_per_s(),
        stats.stop
    );
}

pub(crate) fn chat(run: RunArgs, prompt: Option<String>, system: Option<String>, sampling: SamplingArgs) -> Result<()> {
    let loaded = Loaded::open(&run.model, run.threads)?;
    let template = loaded
        .template
        .as_ref()
        .with_context(|| format!("{} has no chat template (tokenizer.chat_template)", run.model.display()))?;
    let session = Session::new(&loaded.model, run.ctx);
    let mut generator = Generator::new(session, &loaded.tokenizer);
    let mut messages: Vec<ChatMessage> = Vec::new();
    if let Some(s) = system {
        messages.push(ChatMessage { role: "system".into(), content: s });
    }
    let opts = sampling.options(run.max_tokens);
    let interactive = prompt.is_none() && is_terminal_stdin();
    let mut turn = |messages: &mut Vec<ChatMessage>, user: String| -> Result<()> {
        messages.push(ChatMessage { role: "user".into(), content: user });
        let text = template.render(messages, true)?;
        let ids = loaded.tokenizer.encode(&text, true, true);
        let mut reply = String::new();
        let mut out = std::io::stdout().lock();
        let stats = generator.generate(&ids, &opts, |t| {
            reply.push_str(t);
            let _ = out.write_all(t.as_bytes());
            let _ = out.flush();
        })?;
        writeln!(out)?;
        report(&stats);
        messages.push(ChatMessage { role: "assistant".into(), content: reply.trim().to_string() });
        Ok(())
    };
    if let Some(p) = prompt {
        return turn(&mut messages, p);
    }
    while let Some(line) = read_turn(interactive)? {
        turn(&mut messages, line)?;
    }
    Ok(())
}

/// The next non-empty line of stdin (a user turn), prompting on a terminal;
/// `None` at the end of input.
pub(crate) fn read_turn(interactive: bool) -> Result<Option<String>> {
    loop {
        if interactive {
            eprint!("> ");
            let _ = std::io::stderr().flush();
        }
        let mut line = String::new();
        if std::io::stdin().lock().read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let line = line.trim_end_matches(['\n', '\r']);
        if !line.is_empty() {
            return Ok(Some(line.to_string()));
        }
    }
}

pub(crate) fn is_terminal_stdin() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal()
}

pub(crate) fn inspect(path: &Path, full: bool) -> Result<()> {
    let file = ModelFile::open(path)?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "file: {}", path.display())?;
    let h = match &file {
        ModelFile::Plain(f) => &f.header,
        ModelFile::Sealed(s) => {
            writeln!(
                out,
                "sealed model (format {}): {} chunks of up to {} bytes, file id {}, {}",
                flexserve_sealed::FORMAT_VERSION,
                s.chunks.len(),
                s.chunk_size,
                s.file_id.iter().map(|b| format!("{b:02x}")).collect::<String>(),
                match s.wrapped_to_device() {
                    Some(d) => format!("sealed to device {}", d.to_hex()),
                    None => "opened with a model key".to_string(),
                }
            )?;
            if let Some(v) = s.signed_by() {
                writeln!(out, "signed by vendor {} (checked when opened)", v.to_hex())?;
            }
            writeln!(out, "(the header below is public and not yet authenticated: opening the model checks it)")?;
            &s.gguf
        }
    };
    writeln!(
        out,
        "GGUF version {}, {} metadata entries, {} tensors, alignment {}, data at byte {}",
        h.version,
        file.metadata().len(),
        h.tensors.len(),
        h.alignment,
        h.data_offset
    )?;
    writeln!(out, "\nmetadata:")?;
    for (k, v) in h.metadata.iter() {
        writeln!(out, "  {k} = {}", show_value(v, full))?;
    }
    writeln!(out, "\ntensors:")?;
    writeln!(out, "  {:<40} {:<6} {:<20} {:>12} {:>12}", "name", "type", "shape", "offset", "bytes")?;
    let mut total = 0u64;
    for t in &h.tensors {
        let shape = format!("{:?}", t.dims);
        writeln!(out, "  {:<40} {:<6} {:<20} {:>12} {:>12}", t.name, t.ty.name(), shape, t.offset, t.byte_size())?;
        total += t.byte_size();
    }
    writeln!(out, "\n{} tensors, {:.1} MiB of tensor data", h.tensors.len(), total as f64 / (1 << 20) as f64)?;
    Ok(())
}

pub(crate) fn show_value(v: &Value, full: bool) -> String {
    match v {
        Value::String(s) => {
            if s.len() > 200 && !full {
                format!("{:?}... ({} bytes)", &s[..s.floor_char_boundary_compat(200)], s.len())
            } else {
                format!("{s:?}")
            }
        }
        Value::Array(a) => {
            let n = a.values.len();
            let shown = if full { n } else { n.min(8) };
            let items: Vec<String> = a.values[..shown].iter().map(|x| show_value(x, full)).collect();
            if shown < n {
                format!("[{}, ... ({n} {:?} values)]", items.join(", "), a.elem_type)
            } else {
                format!("[{}]", items.join(", "))
            }
        }
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

pub(crate) trait FloorCharBoundary {
    fn floor_char_boundary_compat(&self, i: usize) -> usize;
}

impl FloorCharBoundary for String {
    fn floor_char_boundary_compat(&self, mut i: usize) -> usize {
        while !self.is_char_boundary(i) {
            i -= 1;
        }
        i
    }
}
