//! Fixtures shared by the integration tests that start real
//! `flexserve-secure` processes on the real model: the model, sealed with a
//! fresh key; the options of a development secure world holding that key;
//! greedy requests; and the plain engine's answer to compare with.

// Each test binary includes this module and uses only some of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flexserve_normal::{MemoryBudget, OpenedModel, SecureWorld, SecureWorldOptions};
use flexserve_protocol::{GenerateRequest, Input, Sampling};
use flexserve_sealed::{ModelKey, SealOptions};

/// The real model (SmolLM2-135M-Instruct, Q4_1), fetched by `scripts/fetch-model.sh`.
pub fn plain_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// The real model sealed with a fresh key, in a temporary directory.
pub struct Sealed {
    pub dir: tempfile::TempDir,
    pub model: PathBuf,
    pub key: PathBuf,
}

pub fn sealed() -> Sealed {
    let dir = tempfile::tempdir().unwrap();
    let (model, key) = (dir.path().join("m.fsm"), dir.path().join("m.key"));
    let k = ModelKey::generate();
    k.save(&key).unwrap();
    flexserve_sealed::seal_file(&plain_model(), &model, &k, &SealOptions::default(), &mut |_, _| {}).unwrap();
    Sealed { dir, model, key }
}

/// A development secure world (this test's own `flexserve-secure`) that
/// holds the key of `s`, on 2 threads, with a budget of 1 GiB.
pub fn options(s: &Sealed) -> SecureWorldOptions {
    SecureWorldOptions {
        binary: Some(env!("CARGO_BIN_EXE_flexserve-secure").into()),
        model_keys: vec![s.key.clone()],
        threads: 2,
        budget: MemoryBudget::Bytes(1 << 30),
        ..SecureWorldOptions::default()
    }
}

/// A greedy request for up to `max_tokens` tokens after the raw `prompt`,
/// keeping no conversation.
pub fn request(model: &OpenedModel, prompt: &str, max_tokens: u32) -> GenerateRequest {
    request_to(model.id, prompt, max_tokens)
}

/// [`request`] to a model known by its id only (in a session spoken by hand).
pub fn request_to(model: u32, prompt: &str, max_tokens: u32) -> GenerateRequest {
    GenerateRequest {
        model,
        conversation: 0,
        input: Input::Raw { text: prompt.to_string() },
        max_tokens,
        n_ctx: 512,
        sampling: Sampling { temperature: 0.0, ..Sampling::default() },
        stop: vec![],
    }
}

/// What the secure world generates for [`request`]; fails the test on any error.
pub fn generate(world: &mut SecureWorld, model: &OpenedModel, prompt: &str, max_tokens: u32) -> String {
    let mut text = String::new();
    let report = world.generate(model, request(model, prompt, max_tokens), |t| text.push_str(t)).unwrap();
    assert!(report.generated_tokens > 0);
    text
}

/// What the plain model generates in this process (the reference).
pub fn plain_generate(prompt: &str, max_tokens: usize) -> String {
    use flexserve_engine::{GenerateOptions, Generator, Model, SamplingParams, Session};
    let file = std::sync::Arc::new(flexserve_gguf::GgufFile::open(plain_model()).unwrap());
    let tok = flexserve_tokenizer::Tokenizer::from_gguf(&file.header.metadata).unwrap();
    let model = Model::from_gguf(file, 2).unwrap();
    let mut g = Generator::new(Session::new(&model, 512), &tok);
    let opts = GenerateOptions { max_tokens, sampling: SamplingParams::greedy(), stop: vec![] };
    let mut text = String::new();
    g.generate(&tok.encode(prompt, true, true), &opts, |t| text.push_str(t)).unwrap();
    text
}

/// A development secure world spoken to by hand (raw protocol), with the
/// sealed model's header at offset 0 of its shared buffer and every chunk
/// placed after it; replies time out after `timeout`.
pub struct RawWithModel {
    pub raw: flexserve_normal::RawSecureWorld,
    /// Each chunk's place in the shared buffer, in chunk order.
    pub refs: Vec<flexserve_protocol::ChunkRef>,
    /// Bytes of the header region (for `OpenModel`).
    pub header_len: u64,
}

pub fn raw_world_with_model(s: &Sealed, timeout: std::time::Duration) -> RawWithModel {
    use flexserve_protocol::{BufferRange, ChunkRef};
    use flexserve_sealed::SealedHeader;
    let bytes = std::fs::read(&s.model).unwrap();
    let prefix = SealedHeader::read_prefix(&bytes[..]).unwrap();
    let header = SealedHeader::read(&prefix).unwrap();
    // Room for the header and every chunk at once.
    let chunks_at = (prefix.len() as u64).next_multiple_of(4096);
    let sealed_bytes: u64 = header.chunks.iter().map(|c| c.sealed_len() as u64).sum();
    let opts = SecureWorldOptions { shared_len: (chunks_at + sealed_bytes) as usize, ..options(s) };
    let mut raw = flexserve_normal::spawn_process(&opts).unwrap();
    raw.socket.set_read_timeout(Some(timeout)).unwrap();
    raw.shared.copy_in(0, &prefix).unwrap();
    let mut refs = Vec::new();
    let mut at = chunks_at;
    for (index, c) in header.chunks.iter().enumerate() {
        let sealed = &bytes[c.file_offset as usize..c.file_offset as usize + c.sealed_len()];
        raw.shared.copy_in(at, sealed).unwrap();
        refs.push(ChunkRef { index: index as u32, at: BufferRange { offset: at, len: sealed.len() as u64 } });
        at += sealed.len() as u64;
    }
    RawWithModel { raw, refs, header_len: prefix.len() as u64 }
}
