//! The OpenAI-compatible request and response bodies, and errors in the
//! OpenAI error format. Field names follow the OpenAI API; `timings`
//! follows llama-server.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// Largest request body accepted (prompts, messages): 4 MiB, the same bound
/// as a frame to the secure world.
pub const MAX_BODY_BYTES: usize = 4 << 20;
/// Tokens generated when a request does not say.
pub const DEFAULT_MAX_TOKENS: u32 = 256;

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `keep_alive` as ollama takes it: seconds, or a duration such as "5m"; 0
/// unloads after the request, a negative value keeps the model for ever.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum KeepAliveValue {
    Seconds(f64),
    Text(String),
}

#[derive(Debug, Clone, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Sampling and limits shared by both completion endpoints.
#[derive(Debug, Clone, Deserialize)]
pub struct Params {
    pub max_tokens: Option<u32>,
    /// The newer OpenAI name for `max_tokens`.
    pub max_completion_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<u32>,
    pub min_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub keep_alive: Option<KeepAliveValue>,
    /// The model the client will ask next (an agent loop's next step): the
    /// daemon loads it, weights and all, once this request is answered.
    pub next_model: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessageIn {
    pub role: String,
    pub content: MessageContent,
}

/// Message content: a string, or the OpenAI list of parts (text parts only).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

impl MessageContent {
    pub fn into_text(self) -> Result<String, ApiError> {
        match self {
            MessageContent::Text(t) => Ok(t),
            MessageContent::Parts(parts) => {
                let mut text = String::new();
                for p in parts {
                    match (p.kind.as_str(), p.text) {
                        ("text", Some(t)) => text.push_str(&t),
                        (kind, _) => {
                            return Err(ApiError::bad_request(
                                format!("content part of type {kind:?} is not supported (text only)"),
                                Some("messages"),
                            ))
                        }
                    }
                }
                Ok(text)
            }
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    pub model: String,
    pub messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    pub params: Params,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: String,
    #[serde(flatten)]
    pub params: Params,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ModelRequest {
    pub model: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

/// llama-server's `timings`.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    pub prompt_n: u32,
    pub prompt_ms: f64,
    pub prompt_per_second: f64,
    pub predicted_n: u32,
    pub predicted_ms: f64,
    pub predicted_per_second: f64,
}

/// What kind of OpenAI error an [`ApiError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Authentication,
    NotFound,
    Overloaded,
    Unavailable,
    Internal,
    /// A request body over [`MAX_BODY_BYTES`].
    TooLarge,
}

impl ErrorKind {
    fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Authentication => StatusCode::UNAUTHORIZED,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Overloaded | ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    fn type_name(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::TooLarge => "invalid_request_error",
            ErrorKind::Authentication => "authentication_error",
            ErrorKind::NotFound => "not_found_error",
            ErrorKind::Overloaded => "overloaded_error",
            ErrorKind::Unavailable => "unavailable_error",
            ErrorKind::Internal => "server_error",
        }
    }
}

/// An error answered in the OpenAI format: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<&'static str>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError { kind, message: message.into(), param: None, code: None }
    }

    pub fn bad_request(message: impl Into<String>, param: Option<&'static str>) -> ApiError {
        ApiError { param, ..ApiError::new(ErrorKind::InvalidRequest, message) }
    }

    /// A request body over [`MAX_BODY_BYTES`]: 413, naming the bound.
    pub fn body_too_large() -> ApiError {
        ApiError::new(
            ErrorKind::TooLarge,
            format!("request body exceeds the limit of {MAX_BODY_BYTES} bytes (MAX_BODY_BYTES)"),
        )
        .with_code("request_too_large")
    }

    pub fn with_code(mut self, code: &'static str) -> ApiError {
        self.code = Some(code);
        self
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind.type_name(),
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.kind.status(), axum::Json(self.body())).into_response()
    }
}

/// Parses a `keep_alive` value: `None` keeps the model for ever.
pub fn keep_alive(value: &KeepAliveValue) -> Result<Option<std::time::Duration>, ApiError> {
    let seconds = match value {
        KeepAliveValue::Seconds(s) => *s,
        KeepAliveValue::Text(t) => parse_duration(t).ok_or_else(|| {
            ApiError::bad_request(
                format!("keep_alive {t:?}: expected e.g. 300, \"5m\", \"1h\", 0 or -1"),
                Some("keep_alive"),
            )
        })?,
    };
    if !seconds.is_finite() {
        return Err(ApiError::bad_request("keep_alive must be a finite number", Some("keep_alive")));
    }
    Ok((seconds >= 0.0).then(|| std::time::Duration::from_secs_f64(seconds.min(1e9))))
}

/// Seconds in "300", "300s", "5m", "1h", "-1".
pub fn parse_duration(text: &str) -> Option<f64> {
    let t = text.trim();
    let (number, unit) = match t.find(|c: char| c.is_ascii_alphabetic()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: f64 = number.trim().parse().ok()?;
    let scale = match unit {
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return None,
    };
    Some(n * scale)
}

/// A request's body, at most [`MAX_BODY_BYTES`] (the router's
/// `DefaultBodyLimit`): a larger one is answered 413 in the OpenAI error
/// format, naming the bound, instead of axum's plain-text rejection.
pub struct Body(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Body, ApiError> {
        Bytes::from_request(request, state).await.map(Body).map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::body_too_large()
            } else {
                ApiError::bad_request(e.body_text(), None)
            }
        })
    }
}

pub(crate) fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_data() { "invalid request body" } else { "malformed JSON" };
        ApiError::bad_request(format!("{what}: {e}"), None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_values_read_as_ollama_reads_them() {
        assert_eq!(keep_alive(&KeepAliveValue::Seconds(0.0)).unwrap(), Some(std::time::Duration::ZERO));
        assert_eq!(keep_alive(&KeepAliveValue::Seconds(-1.0)).unwrap(), None);
        assert_eq!(keep_alive(&KeepAliveValue::Text("5m".into())).unwrap(), Some(std::time::Duration::from_secs(300)));
        assert_eq!(keep_alive(&KeepAliveValue::Text("-1".into())).unwrap(), None);
        assert_eq!(keep_alive(&KeepAliveValue::Text("90".into())).unwrap(), Some(std::time::Duration::from_secs(90)));
        let e = keep_alive(&KeepAliveValue::Text("soon".into())).unwrap_err();
        assert_eq!(e.param, Some("keep_alive"));
    }

    #[test]
    fn errors_have_the_openai_shape() {
        let e = ApiError::bad_request("bad temperature", Some("temperature")).body();
        assert_eq!(e["error"]["type"], "invalid_request_error");
        assert_eq!(e["error"]["param"], "temperature");
        assert_eq!(e["error"]["message"], "bad temperature");
        let e = ApiError::body_too_large();
        assert_eq!(e.kind.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let body = e.body();
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "request_too_large");
        assert_eq!(body["error"]["message"], "request body exceeds the limit of 4194304 bytes (MAX_BODY_BYTES)");
    }
}
