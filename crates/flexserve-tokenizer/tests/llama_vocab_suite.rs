//! llama.cpp's tokenizer suite: the vocabularies `ggml-vocab-NAME.gguf` of
//! llama.cpp's `models/` folder, each with test strings (`.inp`) and the ids
//! llama.cpp gives them (`.out`), fetched by `scripts/fetch-vocab-suite.sh`
//! into `.cache/llama-vocab/` (`$FLEXSERVE_CACHE/llama-vocab/` if set).
//!
//! Every case of every vocabulary FlexServe supports must match exactly; a
//! vocabulary it does not support must be refused with an error naming what it
//! lacks. The strings are tokenized as llama.cpp's `test-tokenizer-0` does:
//! without adding special tokens and without parsing them in the text.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use flexserve_gguf::{GgufFile, Metadata};
use flexserve_tokenizer::{keys, Tokenizer, TokenizerError};

/// Vocabularies that must be supported, so that a regression cannot pass as
/// "unsupported".
const SUPPORTED: &[&str] = &[
    "bert-bge",
    "command-r",
    "falcon",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
];

/// What separates test strings in a `.inp` file.
const SEPARATOR: &str = "\n__ggml_vocab_test__\n";

fn suite_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let cache = std::env::var_os("FLEXSERVE_CACHE").map(PathBuf::from).unwrap_or_else(|| root.join(".cache"));
    cache.join("llama-vocab")
}

/// The test strings and expected ids, split as `test-tokenizer-0` splits them.
fn read_cases(inp: &Path, out: &Path) -> Result<Vec<(String, Vec<u32>)>, String> {
    let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let raw = read(inp)?;
    let mut texts = Vec::new();
    let mut rest = raw.as_str();
    // A separator at the very end closes the last string rather than starting another.
    while !rest.is_empty() {
        match rest.split_once(SEPARATOR) {
            Some((text, after)) => {
                texts.push(text.to_owned());
                rest = after;
            }
            None => {
                texts.push(rest.to_owned());
                rest = "";
            }
        }
    }
    let expected = read(out)?
        .lines()
        .enumerate()
        .map(|(n, line)| {
            line.split_whitespace()
                .map(|id| id.parse::<u32>().map_err(|e| format!("{} line {}: {id:?}: {e}", out.display(), n + 1)))
                .collect::<Result<Vec<u32>, String>>()
        })
        .collect::<Result<Vec<_>, _>>()?;
    if texts.len() != expected.len() {
        return Err(format!(
            "{} has {} strings but {} has {} lines",
            inp.display(),
            texts.len(),
            out.display(),
            expected.len()
        ));
    }
    Ok(texts.into_iter().zip(expected).collect())
}

/// Checks that a refusal names the model or split rules found in the file.
fn check_refusal(meta: &Metadata, err: &TokenizerError) -> Result<String, String> {
    let named = |key: &str| meta.get_str(key).ok().flatten().unwrap_or_default().to_owned();
    match err {
        TokenizerError::UnknownModel(found) if *found == named(keys::MODEL) => {
            Ok(format!("tokenizer model {found:?} unsupported"))
        }
        TokenizerError::UnknownPreTokenizer { found, .. } if *found == named(keys::PRE) => {
            Ok(format!("pre-tokenizer {found:?} unsupported"))
        }
        other => Err(format!("refused with an error that does not name what is unsupported: {other}")),
    }
}

#[test]
fn every_supported_vocabulary_matches_llama_cpp() {
    let dir = suite_dir();
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| {
        panic!("{}: {e}; run scripts/fetch-vocab-suite.sh to fetch llama.cpp's tokenizer suite", dir.display())
    });
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|f| Some(f.strip_prefix("ggml-vocab-")?.strip_suffix(".gguf")?.to_owned()))
        .filter(|name| dir.join(format!("ggml-vocab-{name}.gguf.inp")).exists())
        .collect();
    names.sort();
    for name in SUPPORTED {
        assert!(names.iter().any(|n| n == name), "{}: ggml-vocab-{name}.gguf with .inp/.out is missing", dir.display());
    }

    let mut report = String::new();
    let mut failures = Vec::new();
    let mut unsupported = Vec::new();
    for name in &names {
        let gguf = dir.join(format!("ggml-vocab-{name}.gguf"));
        let cases = read_cases(&gguf.with_extension("gguf.inp"), &gguf.with_extension("gguf.out"))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let file = GgufFile::open(&gguf).unwrap_or_else(|e| panic!("{name}: {e}"));
        let meta = &file.header.metadata;
        let tok = match Tokenizer::from_gguf(meta) {
            Ok(tok) => tok,
            Err(err) => {
                match check_refusal(meta, &err) {
                    Ok(why) => {
                        let _ = writeln!(report, "{name:>16}: unsupported ({why})");
                        unsupported.push(name.clone());
                    }
                    Err(why) => failures.push(format!("{name}: {why}")),
                }
                if SUPPORTED.contains(&name.as_str()) {
                    failures.push(format!("{name}: must be supported, but: {err}"));
                }
                continue;
            }
        };
        let mut passed = 0;
        for (text, expected) in &cases {
            let ids = tok.encode(text, false, false);
            if ids == *expected {
                passed += 1;
            } else if failures.len() < 20 {
                failures.push(format!("{name}: {text:?}\n  expected {expected:?}\n       got {ids:?}"));
            }
        }
        let _ = writeln!(report, "{name:>16}: {passed}/{} cases pass", cases.len());
        if passed != cases.len() {
            failures.push(format!("{name}: {passed}/{} cases pass", cases.len()));
        }
    }
    eprintln!("llama.cpp tokenizer suite ({}):\n{report}unsupported: {unsupported:?}", dir.display());
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
