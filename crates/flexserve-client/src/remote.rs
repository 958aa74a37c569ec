//! A daemon that carries encrypted sessions to its secure world: the
//! identity is checked once, then sessions are opened and chats sent through
//! them. The daemon sees which model, sizes and timing; nothing else.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use flexserve_e2e::{ChatRequest, ClientHandshake, ClientSession, Done, Record};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::identity::{check_identity, CheckedIdentity};
use crate::sse::SseParser;
use crate::{ClientError, Result};

/// A daemon and the secure world behind it, its identity checked.
pub struct Remote {
    http: Http,
    pub identity: CheckedIdentity,
}

/// The daemon's HTTP API.
struct Http {
    base: String,
    api_key: Option<String>,
    client: reqwest::Client,
}

/// An encrypted session with the secure world, for one model.
pub struct Session {
    pub id: String,
    pub model: String,
    transport: ClientSession,
}

async fn answer(what: &str, response: reqwest::Response) -> Result<reqwest::Response> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let error = &body["error"];
    Err(ClientError::Server {
        what: what.to_string(),
        status: status.as_u16(),
        code: error["code"].as_str().map(str::to_string),
        message: error["message"].as_str().map_or(text.clone(), str::to_string),
    })
}

fn field<'a>(body: &'a Value, name: &str, what: &str) -> Result<&'a str> {
    body[name].as_str().ok_or_else(|| ClientError::Protocol(format!("{what}: the reply has no {name:?}")))
}

fn unbase64(text: &str, what: &str) -> Result<Vec<u8>> {
    BASE64.decode(text).map_err(|e| ClientError::Protocol(format!("{what}: not base64: {e}")))
}

impl Remote {
    /// Fetches the secure world's identity report from the daemon at `base`
    /// (`http://host:port`) and checks it (see [`check_identity`]).
    pub async fn connect(base: &str, api_key: Option<String>, expect: Option<&str>, pin_path: &Path) -> Result<Remote> {
        let http = Http { base: base.trim_end_matches('/').to_string(), api_key, client: reqwest::Client::new() };
        let body: Value = http.get("/v1/secure/identity", "fetching the identity report").await?;
        let report = field(&body, "report", "the identity report")?;
        let signature = field(&body, "signature", "the identity report")?;
        let identity = check_identity(report, signature, expect, pin_path)?;
        Ok(Remote { http, identity })
    }

    pub fn base(&self) -> &str {
        &self.http.base
    }

    /// A GET on the daemon whose JSON answer is returned (`/v1/models`).
    pub async fn get(&self, path: &str, what: &str) -> Result<Value> {
        self.http.get(path, what).await
    }

    /// Opens an encrypted session for `model` with the secure world whose
    /// identity was checked.
    pub async fn open_session(&self, model: &str) -> Result<Session> {
        let (handshake, first) = ClientHandshake::start(&self.identity.x25519)?;
        let what = "opening an encrypted session";
        let body = json!({"model": model, "handshake": BASE64.encode(first)});
        let reply: Value = self
            .http
            .post("/v1/secure/sessions", &body, what)
            .await?
            .json()
            .await
            .map_err(|source| ClientError::Http { what: what.to_string(), source })?;
        let second = unbase64(field(&reply, "handshake", what)?, what)?;
        let transport = handshake.finish(&second)?;
        Ok(Session { id: field(&reply, "session", what)?.to_string(), model: model.to_string(), transport })
    }

    /// Ends a session (best effort: the secure world forgets it either way
    /// once the model unloads).
    pub async fn close_session(&self, session: Session) {
        let _ = self.http.request(reqwest::Method::DELETE, &format!("/v1/secure/sessions/{}", session.id)).send().await;
    }

    /// Sends an encrypted chat on `session`; each piece of the answer goes to
    /// `on_text` as it is decrypted. Ends with the `done` record's figures, or
    /// an error (an `error` record, a record that does not decrypt as the
    /// next one, a stream that ends early). After an error the session must
    /// not be used again.
    pub async fn chat(
        &self,
        session: &mut Session,
        request: &ChatRequest,
        mut on_text: impl FnMut(&str),
    ) -> Result<Done> {
        let what = "an encrypted chat";
        let sealed = session.transport.seal_request(request)?;
        let body = json!({"message": BASE64.encode(sealed)});
        let response = self.http.post(&format!("/v1/secure/sessions/{}/chat", session.id), &body, what).await?;
        let mut stream = response.bytes_stream();
        let mut parser = SseParser::default();
        let mut events = Vec::new();
        let mut records = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|source| ClientError::Http { what: what.to_string(), source })?;
            parser.push(&chunk, &mut events).map_err(ClientError::Protocol)?;
            for event in events.drain(..) {
                if event.name == "error" {
                    let body: Value = serde_json::from_str(&event.data).unwrap_or(Value::Null);
                    return Err(ClientError::Server {
                        what: what.to_string(),
                        status: 200,
                        code: body["error"]["code"].as_str().map(str::to_string),
                        message: body["error"]["message"].as_str().unwrap_or(&event.data).to_string(),
                    });
                }
                let record = session.transport.open_record(&unbase64(&event.data, what)?)?;
                records += 1;
                match &record {
                    Record::Text(text) => on_text(text),
                    Record::Done(done) => return Ok(*done),
                    Record::Error { code, message } => {
                        return Err(ClientError::Refused { code: *code, message: message.clone() })
                    }
                }
            }
        }
        Err(ClientError::Truncated { records })
    }
}

impl Http {
    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, format!("{}{path}", self.base));
        match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn get(&self, path: &str, what: &str) -> Result<Value> {
        let sent = self.request(reqwest::Method::GET, path).send().await;
        let response = sent.map_err(|source| ClientError::Http { what: what.to_string(), source })?;
        answer(what, response)
            .await?
            .json()
            .await
            .map_err(|source| ClientError::Http { what: what.to_string(), source })
    }

    async fn post(&self, path: &str, body: &Value, what: &str) -> Result<reqwest::Response> {
        let sent = self.request(reqwest::Method::POST, path).json(body).send().await;
        answer(what, sent.map_err(|source| ClientError::Http { what: what.to_string(), source })?).await
    }
}
