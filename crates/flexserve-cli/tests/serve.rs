//! `flexserve serve` with the clients its users use: the `openai` Python
//! package and curl, against the real model, plain and sealed (the sealed
//! one in a development secure world: these tests are about the API; the
//! secure world's isolation is tested in crates/flexserve-launcher).

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{flexserve, model, ok, plain_and_sealed, Daemon as Server, KEY};

const CHAT_PROMPT: &str = "What is the capital of France?";
const RAW_PROMPT: &str = "The capital of France is";

/// The daemon these tests run (a [`common::Daemon`]): the real model as
/// `plain` and, sealed with `flexserve keygen` and `flexserve seal`, as `sealed`.
impl Server {
    fn start(extra: &[&str]) -> Server {
        let home = tempfile::tempdir().unwrap();
        let key = home.path().join("m.key");
        let sealed = home.path().join("m.fsm");
        ok(flexserve(home.path()).args(["keygen", "-o", key.to_str().unwrap()]).output().unwrap());
        ok(flexserve(home.path())
            .args(["seal", "--model", model().to_str().unwrap(), "--key", key.to_str().unwrap(), "-o"])
            .arg(&sealed)
            .output()
            .unwrap());
        Server::spawn(home, |c| {
            c.args(["--api-key", KEY, "--key"]).arg(&key).args(plain_and_sealed(&sealed)).args(extra)
        })
    }

    /// curl with the API key: (status, body).
    fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        self.curl_with(&["-H", &format!("Authorization: Bearer {KEY}")], method, path, body)
    }

    fn curl_with(&self, extra: &[&str], method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-sS", "-N", "-X", method, "-w", "\n%{http_code}", "--max-time", "120"]).args(extra);
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
        }
        let out = ok(c.arg(format!("{}{path}", self.url)).output().unwrap());
        let (body, code) = out.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    }

    /// curl streaming a chat completion's events to its piped stdout.
    fn stream_chat(&self, body: &str) -> Child {
        Command::new("curl")
            .args(["-sS", "-N", "-H", &format!("Authorization: Bearer {KEY}"), "-H", "Content-Type: application/json"])
            .args(["--data-binary", body, &format!("{}/v1/chat/completions", self.url)])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn json(&self, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
        let (code, text) = self.curl(method, path, body);
        assert_eq!(code, 200, "{path}: {text}");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}"))
    }

    fn model_state(&self, name: &str) -> String {
        let models = self.json("GET", "/v1/models", None);
        let m = models["data"].as_array().unwrap().iter().find(|m| m["id"] == name).unwrap();
        m["state"].as_str().unwrap().to_string()
    }
}

/// The CLI's greedy answers, the reference for the server's.
fn cli_answers(home: &Path, model: &Path) -> (String, String) {
    let m = model.to_str().unwrap();
    let chat = ok(flexserve(home)
        .args(["chat", "--model", m, "--prompt", CHAT_PROMPT, "--max-tokens", "24", "--temperature", "0"])
        .output()
        .unwrap());
    let raw = ok(flexserve(home)
        .args(["generate", "--model", m, "--prompt", RAW_PROMPT, "--max-tokens", "16", "--temperature", "0"])
        .output()
        .unwrap());
    (chat.trim().to_string(), raw)
}

fn chat_body(model: &str, prompt: &str, max_tokens: u32, extra: &str) -> String {
    let prompt = serde_json::to_string(prompt).unwrap();
    format!(
        r#"{{"model":"{model}","messages":[{{"role":"user","content":{prompt}}}],"max_tokens":{max_tokens},"temperature":0{extra}}}"#
    )
}

#[test]
fn the_openai_client_and_curl_get_the_clis_answers_plain_and_sealed() {
    let server = Server::start(&["--ctx", "256"]);
    let (chat, raw) = cli_answers(server.home.path(), &model());
    for name in ["plain", "sealed"] {
        let o = Command::new("python3")
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_client.py"))
            .args([&server.url, KEY, name])
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "the openai client failed (scripts/test.sh installs the `openai` package): {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(r["chat"]["text"].as_str().unwrap().trim(), chat, "{name}: {r}");
        assert_eq!(r["chat"]["object"], "chat.completion");
        assert_eq!(r["chat_stream"]["text"], r["chat"]["text"], "{name}: streamed and whole differ");
        assert!(r["chat_stream"]["chunks"].as_u64().unwrap() > 1, "{r}");
        assert_eq!(r["completion"]["text"].as_str().unwrap(), raw, "{name}: {r}");
        assert_eq!(r["completion_stream"]["text"], r["completion"]["text"]);
        assert_eq!(r["completion"]["finish_reason"], "length");
        for usage in [&r["chat"]["usage"], &r["chat_stream"]["usage"], &r["completion"]["usage"]] {
            let (p, c, t) = (
                usage["prompt_tokens"].as_u64().unwrap(),
                usage["completion_tokens"].as_u64().unwrap(),
                usage["total_tokens"].as_u64().unwrap(),
            );
            assert!(p > 0 && c > 0 && p + c == t, "{usage}");
        }
        assert_eq!(r["completion"]["usage"]["completion_tokens"], 16);
        assert_eq!(r["chat"]["usage"], r["chat_stream"]["usage"]);
        assert_eq!(r["models"], serde_json::json!(["plain", "sealed"]));
        assert_eq!(r["unknown_model"]["status"], 404, "{r}");
        assert_eq!(r["wrong_key"]["status"], 401, "{r}");
        assert_eq!(server.model_state(name), "loaded");
    }

    // Authentication: /health is open, the rest needs the key.
    assert_eq!(server.curl_with(&[], "GET", "/health", None).0, 200);
    let (code, body) = server.curl_with(&[], "GET", "/v1/models", None);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("missing API key"), "{body}");
    let (code, _) = server.curl_with(&["-H", "Authorization: Bearer nope"], "GET", "/v1/models", None);
    assert_eq!(code, 401);

    // Bad input: each gets the documented error, in the OpenAI format.
    for (body, param, said) in [
        ("{not json", "", "malformed JSON"),
        (r#"{"model":"plain"}"#, "", "invalid request body"),
        (
            r#"{"model":"plain","messages":[{"role":"user","content":"hi"}],"temperature":-1}"#,
            "temperature",
            "temperature",
        ),
        (&chat_body("plain", "hi", 0, ""), "max_tokens", "max_tokens"),
        (&chat_body("plain", "hi", 8, r#","top_p":0"#), "top_p", "top_p"),
        (r#"{"model":"plain","messages":[]}"#, "messages", "must not be empty"),
        (r#"{"model":"plain","messages":[{"role":"robot","content":"x"}]}"#, "messages", "role"),
    ] {
        let (code, text) = server.curl("POST", "/v1/chat/completions", Some(body));
        assert_eq!(code, 400, "{body}: {text}");
        let e: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(e["error"]["type"], "invalid_request_error", "{text}");
        assert!(e["error"]["message"].as_str().unwrap().contains(said), "{text}");
        if !param.is_empty() {
            assert_eq!(e["error"]["param"], param, "{text}");
        }
    }
    // A prompt longer than the context (256 here), plain and sealed.
    let long = "The lighthouse keeper counted the ships. ".repeat(60);
    for name in ["plain", "sealed"] {
        let (code, text) = server.curl("POST", "/v1/chat/completions", Some(&chat_body(name, &long, 8, "")));
        assert_eq!(code, 400, "{name}: {text}");
        assert!(text.contains("context"), "{name}: {text}");
    }

    // Status, metrics, unload and load, keep-alive.
    let status = server.json("GET", "/status", None);
    let secure = &status["secure_world"][0];
    assert_eq!(secure["model"], "sealed", "{status}");
    assert_eq!(secure["deployment"], "development");
    assert_eq!(secure["unprotected"], true);
    let (code, metrics) = server.curl("GET", "/metrics", None);
    assert_eq!(code, 200);
    for name in [
        "flexserve_requests_total",
        "flexserve_generated_tokens_total",
        "flexserve_time_to_first_token_seconds_bucket",
        "flexserve_token_latency_seconds_count",
        "flexserve_secure_memory_in_use_bytes",
        "flexserve_secure_world_restarts_total 0",
    ] {
        assert!(metrics.contains(name), "{name} missing:\n{metrics}");
    }
    let unloaded = server.json("POST", "/models/unload", Some(r#"{"model":"sealed"}"#));
    assert_eq!(unloaded["was_loaded"], true);
    assert_eq!(server.model_state("sealed"), "unloaded");
    server.json("POST", "/models/load", Some(r#"{"model":"sealed"}"#));
    assert_eq!(server.model_state("sealed"), "loaded");
    // keep_alive 0: unloaded once the request is over.
    let (code, _) =
        server.curl("POST", "/v1/chat/completions", Some(&chat_body("plain", "Hi", 4, r#","keep_alive":0"#)));
    assert_eq!(code, 200);
    let t0 = Instant::now();
    while server.model_state("plain") != "unloaded" {
        assert!(t0.elapsed() < Duration::from_secs(5), "keep_alive 0 did not unload the model");
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn sixteen_concurrent_clients_each_get_their_own_answer() {
    let server = Server::start(&[]);
    let prompts: Vec<String> = (0..16).map(|i| format!("Name one thing about the number {i}.")).collect();
    let ask = |model: &str, prompt: &str| -> String {
        let (code, text) = server.curl("POST", "/v1/chat/completions", Some(&chat_body(model, prompt, 12, "")));
        assert_eq!(code, 200, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["choices"][0]["message"]["content"].as_str().unwrap().to_string()
    };
    for (model, n) in [("plain", 16), ("sealed", 16)] {
        let alone: Vec<String> = prompts[..n].iter().map(|p| ask(model, p)).collect();
        let together: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = prompts[..n].iter().map(|p| s.spawn(|| ask(model, p))).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(together, alone, "{model}: concurrent answers differ from single ones");
        let distinct: std::collections::BTreeSet<&String> = alone.iter().collect();
        assert!(distinct.len() > n / 2, "{model}: the prompts should get different answers: {alone:?}");
    }
}

#[test]
fn killing_the_secure_world_mid_stream_ends_that_stream_with_an_error_and_the_next_request_works() {
    let server = Server::start(&[]);
    server.json("POST", "/models/load", Some(r#"{"model":"sealed"}"#));
    let secure_pid = {
        let o = ok(Command::new("pgrep")
            .args(["-P", &server.child.id().to_string(), "-f", "flexserve-secure"])
            .output()
            .unwrap());
        o.trim().lines().next().unwrap().parse::<i32>().unwrap()
    };
    let body = chat_body("sealed", "Tell me a very long story about a lighthouse.", 2000, r#","stream":true"#);
    let mut curl = server.stream_chat(&body);
    let mut stdout = curl.stdout.take().unwrap();
    let mut first = [0u8; 64];
    stdout.read_exact(&mut first).unwrap();
    // SAFETY: kill sends SIGKILL to the secure world this test's server started.
    unsafe { libc::kill(secure_pid, libc::SIGKILL) };
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    curl.wait().unwrap();
    let last_events: Vec<&str> = rest.lines().filter(|l| l.starts_with("data: ")).collect();
    let n = last_events.len();
    assert!(n >= 2, "{rest}");
    assert_eq!(last_events[n - 1], "data: [DONE]");
    assert!(last_events[n - 2].contains("\"error\"") && last_events[n - 2].contains("secure world"), "{rest}");

    let (code, text) = server.curl("POST", "/v1/chat/completions", Some(&chat_body("sealed", "Hi", 4, "")));
    assert_eq!(code, 200, "{text}");
    let (_, metrics) = server.curl("GET", "/metrics", None);
    assert!(metrics.contains("flexserve_secure_world_restarts_total 1"), "{metrics}");
}

#[test]
fn a_client_that_leaves_mid_stream_cancels_its_generation() {
    let server = Server::start(&[]);
    for model in ["plain", "sealed"] {
        let body = chat_body(model, "Tell me a very long story about a lighthouse.", 4000, r#","stream":true"#);
        let mut curl = server.stream_chat(&body);
        let mut first = [0u8; 64];
        curl.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
        curl.kill().unwrap();
        curl.wait().unwrap();
        let t0 = Instant::now();
        loop {
            let (_, metrics) = server.curl("GET", "/metrics", None);
            let want = if model == "plain" { "flexserve_cancelled_total 1" } else { "flexserve_cancelled_total 2" };
            if metrics.contains(want) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(30), "{model}: the generation went on without its client");
            std::thread::sleep(Duration::from_millis(50));
        }
        // The model serves the next request.
        let (code, text) = server.curl("POST", "/v1/chat/completions", Some(&chat_body(model, "Hi", 4, "")));
        assert_eq!(code, 200, "{text}");
    }
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let mut server = Server::start(&["--preload"]);
    let t0 = Instant::now();
    while server.curl_with(&[], "GET", "/health", None).0 != 200 {
        assert!(t0.elapsed() < Duration::from_secs(60), "the models did not preload");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.model_state("sealed"), "loaded");
    // SAFETY: kill sends SIGTERM to our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let status = server.child.wait().unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&server.log).unwrap();
    assert!(log.contains("flexserve serve: stopped") && !log.contains("panicked"), "{log}");
}

#[test]
fn a_config_file_names_the_models_and_settings_and_options_override_it() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("api.key"), format!("{KEY}\n")).unwrap();
    std::os::unix::fs::symlink(model(), dir.path().join("smol.gguf")).unwrap();
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        "port = 1\nkeep_alive = \"-1\"\napi_key_file = \"api.key\"\n[models]\nsmol = \"smol.gguf\"\n",
    )
    .unwrap();
    // --port 0 overrides the file's port 1 (which could not be bound).
    let mut child = flexserve(dir.path())
        .args(["serve", "--port", "0", "--config"])
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = common::listening_url(&mut child);
    let get = |key: &str| {
        ok(Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", "-H", &format!("Authorization: Bearer {key}")])
            .arg(format!("{url}/v1/models"))
            .output()
            .unwrap())
    };
    let listed = get(KEY);
    assert!(listed.ends_with("\n200") && listed.contains("\"id\":\"smol\""), "{listed}");
    assert!(get("wrong").ends_with("\n401"), "the key file's key is required");
    // SAFETY: kill sends SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert!(child.wait().unwrap().success());

    std::fs::write(&config, "colour = \"blue\"\n").unwrap();
    let o = flexserve(dir.path()).args(["serve", "--config"]).arg(&config).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("serve.toml") && e.contains("colour"), "{e}");
}

/// A request body over the daemon's bound (`MAX_BODY_BYTES`) is answered 413
/// with an error in the OpenAI format that names the bound, on every endpoint
/// that takes a body, whether the client states the length up front or sends
/// the body in chunks; a body of exactly the bound is read (and judged on
/// what it says).
#[test]
fn an_oversized_body_is_a_413_in_the_openai_format_naming_the_bound() {
    let limit = flexserve_server::api::MAX_BODY_BYTES;
    let server = Server::start(&[]);
    let file = |name: &str, len: usize| {
        let path = server.home.path().join(name);
        let mut body = br#"{"model":"plain","prompt":""#.to_vec();
        body.resize(len, b'x');
        std::fs::write(&path, body).unwrap();
        format!("@{}", path.display())
    };
    let (at_limit, over) = (file("at-limit.json", limit), file("over.json", limit + 1));
    let too_large = |code: u16, text: &str, how: &str| {
        assert_eq!(code, 413, "{how}: {text}");
        let e: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("{how}: {e}: {text}"));
        assert_eq!(e["error"]["type"], "invalid_request_error", "{how}: {text}");
        assert_eq!(e["error"]["code"], "request_too_large", "{how}: {text}");
        let message = e["error"]["message"].as_str().unwrap();
        assert_eq!(message, format!("request body exceeds the limit of {limit} bytes (MAX_BODY_BYTES)"), "{how}");
    };
    for path in ["/v1/chat/completions", "/v1/completions", "/models/load", "/models/unload"] {
        let (code, text) = server.curl("POST", path, Some(&over));
        too_large(code, &text, path);
    }
    let chunked = ["-H", &format!("Authorization: Bearer {KEY}"), "-H", "Transfer-Encoding: chunked"];
    let (code, text) = server.curl_with(&chunked, "POST", "/v1/completions", Some(&over));
    too_large(code, &text, "chunked");
    // At the bound the body is read: an unterminated JSON string.
    let (code, text) = server.curl("POST", "/v1/completions", Some(&at_limit));
    assert_eq!(code, 400, "{text}");
    assert!(text.contains("malformed JSON"), "{text}");
    // The daemon serves on.
    let (code, text) = server.curl("POST", "/v1/chat/completions", Some(&chat_body("plain", "Hi", 4, "")));
    assert_eq!(code, 200, "{text}");
}
