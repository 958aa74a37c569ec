//! Encrypted sessions (docs/encrypted-sessions.md) end to end, against a real
//! `flexserve serve` whose secure world (development mode) serves the real
//! model sealed: the clients get the same greedy answers as `flexserve chat`,
//! a tampered, replayed, reordered or cut message is refused and ends its
//! session, and a client refuses a secure world whose identity key is not the
//! one it expects. (What the daemon's memory and the traffic it carries do not
//! hold: encrypted_leaks.rs.)
//!
//! The clients: `flexserve client` (a local OpenAI endpoint) driven by the
//! real `openai` package and by curl, and python/flexserve_e2e.py driven by
//! tests/clients/encrypted_driver.py. Everything listens on loopback only.

mod common;
#[path = "common/relay.rs"]
mod relay;
#[path = "common/sessions.rs"]
mod sessions;

use std::path::{Path, PathBuf};

use common::{flexserve, model, ok, Daemon as Server, KEY};
use relay::{Relay, RelayMode};
use serde_json::Value;
use sessions::{chat_body, client_command, curl, driver, openai_through, run, Proxy};

/// A short greedy answer, compared with `flexserve chat`'s.
const GREEDY_PROMPT: &str = "Name three rivers in Europe and say one thing about each.";
const GREEDY_TOKENS: u32 = 40;

/// `flexserve chat`'s greedy answer on the plain model: the reference.
fn cli_chat(home: &Path, prompt: &str, max_tokens: u32) -> String {
    let m = model();
    let out = ok(run(flexserve(home)
        .args(["chat", "--model", m.to_str().unwrap(), "--prompt", prompt, "--temperature", "0"])
        .args(["--max-tokens", &max_tokens.to_string()])));
    out.trim().to_string()
}

/// Greedy answers through an encrypted session, by `flexserve client` (the
/// openai package, whole and streamed) and by the Python module directly,
/// are `flexserve chat`'s.
#[test]
fn greedy_answers_through_encrypted_sessions_are_flexserve_chats() {
    let server = Server::start();
    let reference = cli_chat(server.home.path(), GREEDY_PROMPT, GREEDY_TOKENS);
    assert!(reference.len() > 40, "flexserve chat answered {reference:?}");

    let proxy = Proxy::start(&server, &server.url, &[]);
    let r = openai_through(&proxy, GREEDY_PROMPT, GREEDY_TOKENS);
    assert_eq!(r["chat"]["text"].as_str().unwrap().trim(), reference, "flexserve client, whole: {r}");
    assert_eq!(r["chat"]["object"], "chat.completion");
    assert_eq!(r["chat"]["finish_reason"], "length", "{r}");
    assert_eq!(r["chat"]["usage"]["completion_tokens"], GREEDY_TOKENS, "{r}");
    assert_eq!(r["chat_stream"]["text"], r["chat"]["text"], "flexserve client: streamed and whole differ");
    assert_eq!(r["chat_stream"]["finish_reason"], "length", "{r}");
    assert!(r["chat_stream"]["chunks"].as_u64().unwrap() > 1, "the answer did not stream: {r}");
    assert!(r["models"].as_array().unwrap().iter().any(|m| m == "sealed"), "{r}");

    let d = driver(&["chat", &server.url, KEY, "sealed", GREEDY_PROMPT, &GREEDY_TOKENS.to_string()]);
    assert_eq!(d["text"].as_str().unwrap().trim(), reference, "the Python module: {d}");
    assert_eq!(d["done"]["stop"], "max_tokens", "{d}");
    assert_eq!(d["done"]["generated_tokens"], GREEDY_TOKENS, "{d}");
    assert!(d["pieces"].as_u64().unwrap() > 1, "{d}");
    // Both clients trusted the same identity: the one the daemon's secure world reports.
    let identity = server.identity_key();
    assert_eq!(d["identity"], identity.as_str(), "{d}");
    let pins: Vec<_> = std::fs::read_dir(server.client_home().join("pins")).unwrap().flatten().collect();
    assert_eq!(pins.len(), 1, "flexserve client pins one key per daemon");
    assert_eq!(std::fs::read_to_string(pins[0].path()).unwrap().trim(), identity);
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// Tampered, replayed, reordered and cut requests sent to the real daemon
/// are refused with `encrypted_session_ended` and end their session; an
/// answer whose stream is cut short is reported truncated by both clients;
/// after each, a new session is served.
#[test]
fn tampered_replayed_reordered_and_truncated_messages_are_refused_and_end_the_session() {
    let server = Server::start();
    let r = driver(&["attacks", &server.url, KEY, "sealed"]);
    let replayed = &r["replay_first"];
    assert!(!replayed["text"].as_str().unwrap().is_empty() && replayed["done"] == "max_tokens", "{r}");
    for (case, said) in [
        ("tampered", "does not decrypt at the expected nonce 0: it was tampered with, replayed, reordered or dropped"),
        ("replayed", "does not decrypt at the expected nonce 1: it was tampered with, replayed, reordered or dropped"),
        ("reordered", "does not decrypt at the expected nonce 0: it was tampered with, replayed, reordered or dropped"),
        ("cut", "is truncated or extended"),
    ] {
        let refused = &r[case];
        assert_eq!(refused["status"], 400, "{case}: {refused}");
        assert_eq!(refused["code"], "encrypted_session_ended", "{case}: {refused}");
        let message = refused["message"].as_str().unwrap();
        assert!(message.contains(said) && message.contains("the session is ended"), "{case}: {message}");
        let then = &r[format!("{case}_then")];
        assert_eq!(then["status"], 404, "{case}: the session outlived the refused message: {then}");
        assert_eq!(then["code"], "session_not_found", "{case}: {then}");
        let fresh = &r[format!("{case}_fresh")];
        assert!(!fresh["text"].as_str().unwrap().is_empty() && fresh["done"] == "max_tokens", "{case}: {fresh}");
    }

    // An answer stream cut short: a relay drops each answer's last event (its `done` record).
    let relay = Relay::start(server.addr(), RelayMode::DropLastEvent);
    let t = driver(&["truncated", &relay.url(), KEY, "sealed", GREEDY_PROMPT, "8"]);
    assert_eq!(t["error"], "TruncatedStreamError", "the Python module: {t}");
    assert!(t["message"].as_str().unwrap().contains("truncated"), "{t}");
    assert_eq!(t["pieces"], 8, "the text records before the cut are delivered: {t}");
    let proxy = Proxy::start(&server, &relay.url(), &[]);
    let (code, body) =
        curl(&proxy.url, "POST", "/v1/chat/completions", Some(&chat_body("sealed", GREEDY_PROMPT, 8, false)), None);
    assert_eq!(code, 502, "flexserve client, whole: {body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["code"], "encrypted_session_failed", "{body}");
    assert!(e["error"]["message"].as_str().unwrap().contains("the answer was truncated"), "{body}");
    let (code, body) =
        curl(&proxy.url, "POST", "/v1/chat/completions", Some(&chat_body("sealed", GREEDY_PROMPT, 8, true)), None);
    assert_eq!(code, 200, "{body}");
    let events: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let n = events.len();
    assert!(n >= 3 && events[n - 1] == "[DONE]", "flexserve client, streamed: {body}");
    assert!(events[n - 2].contains("\"error\"") && events[n - 2].contains("the answer was truncated"), "{body}");
    assert!(!body.contains("finish_reason\":\"length"), "a truncated answer must not end as complete: {body}");
    assert!(relay.dropped_events() >= 3, "the relay dropped {} events", relay.dropped_events());

    // The daemon and its secure world serve on.
    let d = driver(&["chat", &server.url, KEY, "sealed", GREEDY_PROMPT, "8"]);
    assert_eq!(d["done"]["stop"], "max_tokens", "{d}");
    assert!(!server.log().contains("panicked"), "{}", server.log());
}

/// A client refuses a secure world whose identity key is not the one it
/// expects (given with --expect, or pinned on first use), naming both keys.
#[test]
fn a_wrong_or_substituted_identity_key_is_refused_by_the_client() {
    let server = Server::start();
    let real = server.identity_key();
    // Another secure world's identity: a development one with another device key.
    let elsewhere = tempfile::tempdir().unwrap();
    let other: Value =
        serde_json::from_str(ok(run(flexserve(elsewhere.path()).args(["identity", "--json"]))).trim()).unwrap();
    let other = other["report"]["identity_ed25519"].as_str().unwrap().to_string();
    assert_eq!(other.len(), 64);
    assert_ne!(other, real);

    // --expect another key.
    let o = run(&mut client_command(&server, &server.url, &["--expect", &other]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "flexserve client accepted another identity: {stderr}");
    assert!(stderr.contains(&real) && stderr.contains(&other), "both keys must be named: {stderr}");
    assert!(!server.client_home().join("pins").exists(), "a refused identity must not be pinned");

    // The right key is accepted; without --expect, the first use pins it.
    drop(Proxy::start(&server, &server.url, &["--expect", &real]));
    drop(Proxy::start(&server, &server.url, &[]));
    let pins: Vec<PathBuf> =
        std::fs::read_dir(server.client_home().join("pins")).unwrap().flatten().map(|e| e.path()).collect();
    assert_eq!(pins.len(), 1, "{pins:?}");
    let pin = &pins[0];
    assert_eq!(std::fs::read_to_string(pin).unwrap().trim(), real);

    // A pin holding another key: refused, naming the pin file.
    std::fs::write(pin, format!("{other}\n")).unwrap();
    let o = run(&mut client_command(&server, &server.url, &[]));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "flexserve client accepted a key other than the pinned one: {stderr}");
    assert!(
        stderr.contains(&pin.display().to_string()) && stderr.contains(&real) && stderr.contains(&other),
        "the pin file and both keys must be named: {stderr}"
    );
    assert_eq!(std::fs::read_to_string(pin).unwrap().trim(), other, "a refused key must not replace the pin");

    // The Python module with another expected key.
    let p = driver(&["wrong_identity", &server.url, KEY, "sealed", &other]);
    assert_eq!(p["error"], "IdentityError", "{p}");
    let message = p["message"].as_str().unwrap();
    assert!(message.contains(&real) && message.contains(&other), "{message}");
}

/// A plain model cannot hold an encrypted session; a deleted session is gone.
#[test]
fn a_plain_model_opens_no_session_and_a_deleted_session_is_gone() {
    let server = Server::start();
    let r = driver(&["open", &server.url, KEY, "plain"]);
    assert_eq!(r["status"], 400, "{r}");
    assert_eq!(r["code"], "model_not_sealed", "{r}");
    assert!(r["message"].as_str().unwrap().contains("plain"), "{r}");

    let d = driver(&["delete", &server.url, KEY, "sealed"]);
    assert!(!d["text"].as_str().unwrap().is_empty(), "{d}");
    assert_eq!(d["deleted"]["status"], 200, "{d}");
    assert_eq!(d["deleted"]["body"]["deleted"], true, "{d}");
    for after in ["after", "again"] {
        assert_eq!(d[after]["status"], 404, "{after}: {d}");
        assert_eq!(d[after]["code"], "session_not_found", "{after}: {d}");
    }
}
