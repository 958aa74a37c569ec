//! Embeddings of the real nomic-embed-text-v1.5 model, from text to vector:
//! `flexserve embed` against llama.cpp's recorded embeddings (the engine's
//! reference file), and the daemon's `/v1/embeddings` with the `openai`
//! package and curl, beside a generative model.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{flexserve, model, ok, Daemon, KEY};
use flexserve_engine::encoder::cosine;
use serde_json::Value;

fn encoder_model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/nomic-embed-text-v1.5.f16.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh nomic-embed", p.display());
    p
}

fn reference_cases() -> Vec<Value> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexserve-engine/tests/reference/nomic-embed.json");
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    reference["cases"].as_array().unwrap().clone()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

#[test]
fn embed_gives_llama_cpps_embeddings_from_text() {
    let home = tempfile::tempdir().unwrap();
    let cases = reference_cases();
    let mut cmd = flexserve(home.path());
    cmd.arg("embed").arg("--model").arg(encoder_model());
    for case in &cases {
        cmd.args(["--text", case["text"].as_str().unwrap()]);
    }
    let out = ok(cmd.output().unwrap());
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), cases.len(), "{out}");
    for (line, case) in lines.iter().zip(&cases) {
        let got: Vec<f32> = serde_json::from_str(line).unwrap();
        let cos = cosine(&got, &floats(&case["embedding"]));
        assert!(cos >= 0.999, "{:?}: cosine {cos} with llama.cpp", case["text"]);
    }
}

#[test]
fn embed_refuses_a_generative_model_by_name() {
    let home = tempfile::tempdir().unwrap();
    let o = flexserve(home.path()).arg("embed").arg("--model").arg(model()).args(["--text", "hi"]).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("\"llama\"") && err.contains("nomic-bert"), "{err}");
}

fn curl(daemon: &Daemon, path: &str, body: &str) -> (u16, Value) {
    let o = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}", "--max-time", "120", "-H", &format!("Authorization: Bearer {KEY}")])
        .args(["-H", "Content-Type: application/json", "--data-binary", body])
        .arg(format!("{}{path}", daemon.url))
        .output()
        .unwrap();
    let text = ok(o);
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")))
}

#[test]
fn the_daemon_serves_embeddings_to_the_openai_client_and_curl() {
    let home = tempfile::tempdir().unwrap();
    let (encoder, chat) = (format!("nomic={}", encoder_model().display()), format!("chat={}", model().display()));
    let daemon =
        Daemon::spawn(home, |c| c.args(["--api-key", KEY, "--model", &encoder, "--model", &chat, "--ctx", "256"]));
    let cases = reference_cases();
    let texts: Vec<&str> = cases.iter().take(3).map(|c| c["text"].as_str().unwrap()).collect();

    let o = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/openai_embeddings.py"))
        .args([daemon.url.as_str(), KEY, "nomic"])
        .args(&texts)
        .output()
        .unwrap();
    assert!(o.status.success(), "the openai client failed: {}\n{}", String::from_utf8_lossy(&o.stderr), daemon.log());
    let r: Value = serde_json::from_slice(&o.stdout).unwrap();
    let vectors = r["default"].as_array().unwrap();
    assert_eq!(vectors.len(), 3);
    for (v, case) in vectors.iter().zip(&cases) {
        let v = floats(v);
        assert_eq!(v.len(), 768);
        let cos = cosine(&v, &floats(&case["embedding"]));
        assert!(cos >= 0.999, "{:?}: cosine {cos} with llama.cpp", case["text"]);
    }
    // The float encoding carries the same vector as the default base64 one.
    assert_eq!(floats(&r["float"]), floats(&vectors[0]));
    let prompt_tokens: usize = cases.iter().take(3).map(|c| c["ids"].as_array().unwrap().len()).sum();
    assert_eq!(r["usage"]["prompt_tokens"], prompt_tokens, "{r}");
    assert_eq!(r["object"], "list");
    assert_eq!(r["bad_dimensions"]["status"], 400, "{r}");

    // curl: one text; token ids as given; the errors name what is wrong.
    let (code, one) = curl(&daemon, "/v1/embeddings", &format!(r#"{{"model":"nomic","input":{:?}}}"#, texts[1]));
    assert_eq!(code, 200, "{one}");
    assert_eq!(one["data"][0]["index"], 0);
    assert!(cosine(&floats(&one["data"][0]["embedding"]), &floats(&vectors[1])) > 0.99999);
    let ids = cases[2]["ids"].to_string();
    let (code, by_ids) = curl(&daemon, "/v1/embeddings", &format!(r#"{{"model":"nomic","input":[{ids}]}}"#));
    assert_eq!(code, 200, "{by_ids}");
    assert!(cosine(&floats(&by_ids["data"][0]["embedding"]), &floats(&vectors[2])) > 0.99999);
    let (code, err) = curl(&daemon, "/v1/embeddings", r#"{"model":"chat","input":"hello"}"#);
    assert_eq!((code, err["error"]["code"].as_str()), (400, Some("model_not_embedding")), "{err}");
    let (code, err) = curl(&daemon, "/v1/completions", r#"{"model":"nomic","prompt":"hello","max_tokens":4}"#);
    assert_eq!((code, err["error"]["code"].as_str()), (400, Some("model_not_generative")), "{err}");
    let long = "word ".repeat(3000);
    let (code, err) = curl(&daemon, "/v1/embeddings", &format!(r#"{{"model":"nomic","input":["hi",{long:?}]}}"#));
    assert_eq!(code, 400, "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.contains("input 1 has 3002 tokens") && message.contains("2048"), "{message}");
    let (code, err) = curl(&daemon, "/v1/embeddings", r#"{"model":"nomic","input":[]}"#);
    assert_eq!(code, 400, "{err}");
    // The generative model beside it still answers.
    let (code, done) =
        curl(&daemon, "/v1/completions", r#"{"model":"chat","prompt":"The capital of France is","max_tokens":4}"#);
    assert_eq!(code, 200, "{done}");
}
