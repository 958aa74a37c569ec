//! `POST /v1/embeddings` (the OpenAI embeddings API) and the backend that
//! answers it: an encoder model (nomic-bert) in this process, one input
//! after another, each vector scaled to unit length as OpenAI's and
//! llama-server's are. Vectors go back as JSON floats or, as the `openai`
//! package asks by default, as base64 of little-endian f32.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use flexserve_engine::weights::GgufSource;
use flexserve_engine::{Encoder, EngineError, Normalization};
use flexserve_tokenizer::Tokenizer;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;

use crate::api::{parse, ApiError, Body, ErrorKind};
use crate::jobs::{Command, EmbedInput, EmbedJob, Embeddings, Event};
use crate::lease::{CoreArbiter, Owner};
use crate::AppState;

/// Inputs one request may carry, as OpenAI bounds them.
pub const MAX_INPUTS: usize = 2048;

/// `input`: a text, several, a token array or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InputValue {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<u32>),
    TokenLists(Vec<Vec<u32>>),
}

#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum EncodingFormat {
    #[default]
    Float,
    Base64,
}

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: InputValue,
    #[serde(default)]
    encoding_format: EncodingFormat,
    /// Only the model's own size is served (no truncated vectors).
    dimensions: Option<usize>,
    keep_alive: Option<crate::api::KeepAliveValue>,
}

pub async fn embeddings(State(state): State<Arc<AppState>>, Body(body): Body) -> Response {
    let result = async {
        state.metrics.requests.fetch_add(1, Ordering::Relaxed);
        let req: EmbeddingsRequest = parse(&body)?;
        let inputs: Vec<EmbedInput> = match req.input {
            InputValue::Text(t) => vec![EmbedInput::Text(t)],
            InputValue::Texts(ts) => ts.into_iter().map(EmbedInput::Text).collect(),
            InputValue::Tokens(ids) => vec![EmbedInput::Tokens(ids)],
            InputValue::TokenLists(lists) => lists.into_iter().map(EmbedInput::Tokens).collect(),
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(ApiError::bad_request(
                format!("input must hold 1 to {MAX_INPUTS} items, got {}", inputs.len()),
                Some("input"),
            ));
        }
        let keep_alive = req.keep_alive.as_ref().map(crate::api::keep_alive).transpose()?;
        let entry = state.registry.entry(&req.model)?;
        let lease = state.registry.lease(&entry, keep_alive, &state.metrics).await?;
        let (reply, answer) = oneshot::channel();
        lease.backend.submit(Command::Embed(EmbedJob { inputs, reply }))?;
        let embeddings =
            answer.await.map_err(|_| ApiError::new(ErrorKind::Internal, "the model stopped without an answer"))??;
        drop(lease);
        if let Some(d) = req.dimensions {
            let size = embeddings.vectors.first().map_or(0, Vec::len);
            if d != size {
                return Err(ApiError::bad_request(
                    format!("dimensions: this model's embeddings have {size} dimensions, {d} were asked"),
                    Some("dimensions"),
                ));
            }
        }
        state.metrics.prompt_tokens.fetch_add(u64::from(embeddings.prompt_tokens), Ordering::Relaxed);
        let data: Vec<_> = embeddings
            .vectors
            .iter()
            .enumerate()
            .map(|(index, v)| {
                let embedding = match req.encoding_format {
                    EncodingFormat::Float => json!(v),
                    EncodingFormat::Base64 => {
                        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                        json!(base64::engine::general_purpose::STANDARD.encode(bytes))
                    }
                };
                json!({"object": "embedding", "index": index, "embedding": embedding})
            })
            .collect();
        let tokens = embeddings.prompt_tokens;
        Ok(Json(json!({
            "object": "list",
            "data": data,
            "model": req.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    }
    .await;
    result.unwrap_or_else(|e| {
        state.metrics.errors.fetch_add(1, Ordering::Relaxed);
        e.into_response()
    })
}

/// Whether a GGUF file holds an encoder the engine runs.
pub(crate) fn is_encoder(file: &flexserve_gguf::GgufFile) -> bool {
    let arch = file.header.metadata.get_str("general.architecture").ok().flatten();
    arch.and_then(flexserve_engine::encoder::EncoderArch::from_name).is_some()
}

/// A plain encoder model in this process.
pub(crate) struct EncoderModel {
    path: PathBuf,
    encoder: Encoder,
    tokenizer: Tokenizer,
    cores: Option<Arc<CoreArbiter>>,
}

impl EncoderModel {
    /// `file` is `path`, opened.
    pub(crate) fn open(
        path: &Path,
        file: flexserve_gguf::GgufFile,
        threads: usize,
        cores: Option<Arc<CoreArbiter>>,
    ) -> Result<Self, String> {
        let source = GgufSource::from_file(Arc::new(file));
        let tokenizer = Tokenizer::from_gguf(&source.header().metadata)
            .map_err(|e| format!("tokenizer of {}: {e}", path.display()))?;
        let encoder = Encoder::from_source(&source, threads).map_err(|e| format!("loading {}: {e}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), encoder, tokenizer, cores })
    }

    /// Serves commands until the queue closes.
    pub(crate) fn serve(&self, rx: &mpsc::Receiver<Command>) {
        while let Ok(command) = rx.recv() {
            match command {
                Command::Embed(job) => {
                    let _ = job.reply.send(self.embed(job.inputs));
                }
                Command::Generate(job) => {
                    let e = ApiError::bad_request(
                        format!(
                            "{} is an embedding model: it answers /v1/embeddings, not completions",
                            self.path.display()
                        ),
                        Some("model"),
                    )
                    .with_code("model_not_generative");
                    let _ = job.events.blocking_send(Event::Failed(e));
                }
                other => crate::jobs::refuse_on_plain(other),
            }
        }
    }

    fn embed(&self, inputs: Vec<EmbedInput>) -> Result<Embeddings, ApiError> {
        let mut vectors = Vec::with_capacity(inputs.len());
        let mut prompt_tokens = 0u32;
        for (i, input) in inputs.into_iter().enumerate() {
            let ids = match input {
                EmbedInput::Text(text) => flexserve_engine::encoder::encoder_tokens(&self.tokenizer, &text),
                EmbedInput::Tokens(ids) => ids,
            };
            prompt_tokens = prompt_tokens.saturating_add(ids.len() as u32);
            let vector = self.on_cores(|| self.encoder.embed(&ids, Normalization::Euclidean)).map_err(|e| {
                let what = match e {
                    EngineError::ContextFull { n_ctx, needed } => {
                        format!("input {i} has {needed} tokens; this model takes at most {n_ctx}")
                    }
                    EngineError::EmptyInput => format!("input {i} is empty"),
                    EngineError::BadToken { id, n_vocab } => {
                        format!("input {i}: token id {id} is outside the vocabulary of {n_vocab}")
                    }
                    other => return ApiError::new(ErrorKind::Internal, format!("input {i}: {other}")),
                };
                ApiError::bad_request(what, Some("input"))
            })?;
            vectors.push(vector);
        }
        Ok(Embeddings { vectors, prompt_tokens })
    }

    /// Runs `work` holding the cores when they are leased (as plain generation does).
    fn on_cores<T>(&self, work: impl FnOnce() -> T) -> T {
        let Some(arbiter) = &self.cores else { return work() };
        let _turn = arbiter.acquire(Owner::Normal);
        let out = work();
        if arbiter.contended_by_other_than(Owner::Normal) {
            self.encoder.scrub_worker_scratch();
        }
        out
    }
}
