//! The real nomic-embed-text-v1.5 encoder against llama.cpp's embeddings of
//! the same sentences (tests/reference/nomic-embed.json, recorded with
//! llama.cpp's llama-embedding at its defaults): cosine >= 0.999 for each,
//! from llama.cpp's own token ids, at every kernel tier of this CPU.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flexserve_engine::encoder::cosine;
use flexserve_engine::{Encoder, Normalization, Pooling};
use flexserve_gguf::GgufFile;
use serde_json::Value as Json;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path() -> PathBuf {
    let cache = std::env::var_os("FLEXSERVE_CACHE").map(PathBuf::from).unwrap_or_else(|| root().join(".cache"));
    let p = cache.join("models/nomic-embed-text-v1.5.f16.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn reference() -> Json {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/nomic-embed.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

fn floats(v: &Json) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

/// Each case's cosine with llama.cpp's embedding, with the current kernels.
fn cosines(encoder: &Encoder, cases: &[Json]) -> Vec<(String, f32)> {
    cases
        .iter()
        .map(|case| {
            let got = encoder.embed(&ids(&case["ids"]), Normalization::Euclidean).unwrap();
            (case["text"].as_str().unwrap().to_owned(), cosine(&got, &floats(&case["embedding"])))
        })
        .collect()
}

#[test]
fn embeddings_match_llama_cpp_at_every_tier() {
    let file = Arc::new(GgufFile::open(model_path()).unwrap());
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for isa in flexserve_quant::usable_isas() {
        // Tiers are picked as a model loads.
        flexserve_quant::limit_isa(isa);
        let encoder = Encoder::from_gguf(file.clone(), 2).unwrap();
        assert_eq!(encoder.config.pooling, Pooling::Mean);
        for (text, cos) in cosines(&encoder, cases) {
            eprintln!("{isa:?}: cosine {cos:.6}: {text:?}");
            assert!(cos >= 0.999, "{isa:?}: {text:?}: cosine {cos} with llama.cpp's embedding");
        }
    }
}
