//! Real models against llama.cpp's recorded outputs: greedy continuations
//! token for token at every kernel tier of this CPU (tests/reference/greedy-*.json,
//! recorded by bench/record_reference.py with llama.cpp's defaults and two
//! threads), and the perplexity of SmolLM2 within 1% (../shared/reference).
//!
//! Each model has short prompts and long ones (64 tokens or more: llama.cpp's
//! tiled attention; some past 256 positions, where its decoding splits the
//! keys between its threads). The engine runs on two threads too, as the
//! split's rounding depends on the thread count.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use flexserve_engine::perplexity::perplexity;
use flexserve_engine::{Logits, Model, Session};
use flexserve_gguf::GgufFile;
use flexserve_quant::Isa;
use flexserve_tokenizer::Tokenizer;
use serde_json::Value as Json;

/// A model and llama.cpp's greedy continuations of it.
struct GreedyReference {
    /// The model's file in `.cache/models/` (scripts/fetch-model.sh).
    model: &'static str,
    /// llama.cpp's continuations, in tests/reference/.
    reference: &'static str,
    /// Generated tokens compared at the portable tier, where a large model is
    /// slow on a small machine (`None`: all that llama.cpp recorded). The
    /// portable kernels are checked bit for bit against the SIMD ones by the
    /// quant crate's tests, so fewer tokens there still test the tier's
    /// own arithmetic on every prompt.
    portable_tokens: Option<usize>,
    /// Cases compared at the portable tier (the first ones; `None`: all),
    /// for models whose prompts alone take minutes there (a 1.5B model
    /// takes about a second per token on two cores).
    portable_cases: Option<usize>,
    /// Generated tokens compared at the AVX2 tier where this CPU has a
    /// higher one (`None`: all): a 1.5B model decodes about ten tokens a
    /// second on two cores, and the AVX-512 tier compares every token.
    avx2_tokens: Option<usize>,
    /// Whether the long-prompt cases (see [`LONG_PROMPT`]) are compared at
    /// the AVX2 tier where this CPU has a higher one (with `avx2_tokens`).
    long_avx2: bool,
    /// The long-prompt cases (indices among them, in the reference's order)
    /// compared at the portable tier, with its limits: their prefill is slow
    /// there, and the tiled attention they add is checked bit for bit
    /// across tiers by the engine's unit tests.
    long_portable: &'static [usize],
}

/// Prompts of at least this many tokens are long: llama.cpp takes its tiled
/// attention kernel for them.
const LONG_PROMPT: usize = 64;

/// Every model whose greedy continuations must be llama.cpp's.
const GREEDY: &[GreedyReference] = &[
    GreedyReference {
        model: "SmolLM2-135M-Instruct.Q4_1.gguf",
        reference: "greedy-smollm2.json",
        portable_tokens: None,
        portable_cases: None,
        avx2_tokens: None,
        long_avx2: true,
        long_portable: &[0],
    },
    // A 1.5B model: every case and token at the CPU's best tier, fewer below.
    GreedyReference {
        model: "Qwen2.5-Coder-1.5B-Instruct.Q4_K_M.gguf",
        reference: "greedy-qwen2.json",
        portable_tokens: Some(4),
        portable_cases: Some(3),
        avx2_tokens: Some(16),
        long_avx2: false,
        long_portable: &[],
    },
    // Gemma 3: sliding-window attention; a 262144-token vocabulary, slow at the portable tier.
    GreedyReference {
        model: "gemma-3-270m-q4_k_m.gguf",
        reference: "greedy-gemma3.json",
        portable_tokens: Some(8),
        portable_cases: None,
        avx2_tokens: None,
        long_avx2: true,
        long_portable: &[0],
    },
];

/// A subset compared at every tier, for runs under emulation
/// (scripts/aarch64.sh): `FLEXSERVE_REFERENCE_SUBSET="short=N,long=N,tokens=N"`
/// takes the first `short` short-prompt cases, the first `long` long-prompt
/// ones and the first `tokens` tokens of each, within the tier's own limits.
struct Subset {
    short: usize,
    long: usize,
    tokens: usize,
}

impl Subset {
    fn from_env() -> Option<Subset> {
        let text = std::env::var("FLEXSERVE_REFERENCE_SUBSET").ok()?;
        let mut subset = Subset { short: usize::MAX, long: usize::MAX, tokens: usize::MAX };
        for part in text.split(',').filter(|p| !p.trim().is_empty()) {
            let (key, value) = part.split_once('=').unwrap_or_else(|| {
                panic!("FLEXSERVE_REFERENCE_SUBSET: {part:?} is not key=value (keys: short, long, tokens)")
            });
            let n: usize =
                value.trim().parse().unwrap_or_else(|e| panic!("FLEXSERVE_REFERENCE_SUBSET: {key}={value:?}: {e}"));
            match key.trim() {
                "short" => subset.short = n,
                "long" => subset.long = n,
                "tokens" => subset.tokens = n,
                other => panic!("FLEXSERVE_REFERENCE_SUBSET: unknown key {other:?} (keys: short, long, tokens)"),
            }
        }
        Some(subset)
    }
}

/// A different pick is forgiven only where llama.cpp itself saw its two best
/// candidates this close: a tie that any change of rounding may break.
const NEAR_TIE: f32 = 0.01;

/// The kernel tier is process-wide (`flexserve_quant::limit_isa`): tests that
/// load a model take this lock, so that none runs on a tier another one set.
static TIER: Mutex<()> = Mutex::new(());

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_path(name: &str) -> PathBuf {
    let cache = std::env::var_os("FLEXSERVE_CACHE").map(PathBuf::from).unwrap_or_else(|| root().join(".cache"));
    let p = cache.join("models").join(name);
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn read_json(p: &Path) -> Json {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ids(v: &Json) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn load(name: &str) -> (Model, Tokenizer) {
    let file = Arc::new(GgufFile::open(model_path(name)).unwrap());
    let tok = Tokenizer::from_gguf(&file.header.metadata).unwrap();
    (Model::from_gguf(file, 2).unwrap(), tok)
}

/// The best logit's margin over the second best.
fn top2_gap(logits: &[f32]) -> f32 {
    let (mut first, mut second) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in logits {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    first - second
}

/// How one case went at one tier.
enum Outcome {
    /// Every compared token is llama.cpp's.
    Exact,
    /// A different pick where llama.cpp's own top two were within `NEAR_TIE`.
    NearTie(String),
    /// A different pick beyond a near tie.
    Failed(String),
}

/// Greedy-decodes one recorded case and compares each pick with llama.cpp's
/// up to `max_tokens`, stopping at the first difference.
fn run_case(model: &Model, tok: &Tokenizer, case: &Json, max_tokens: Option<usize>) -> Outcome {
    let prompt = case["prompt"].as_str().unwrap();
    let prompt_ids = ids(&case["prompt_ids"]);
    assert_eq!(tok.encode(prompt, true, true), prompt_ids, "prompt ids of {prompt:?}");
    let mut want = ids(&case["continuation_ids"]);
    let gaps: Vec<f32> = case["top2_gaps"].as_array().unwrap().iter().map(|g| g.as_f64().unwrap() as f32).collect();
    assert_eq!(gaps.len(), want.len(), "one recorded gap per token of {prompt:?}");
    want.truncate(max_tokens.unwrap_or(usize::MAX));
    let mut s = Session::new(model, prompt_ids.len() + want.len() + 1);
    let mut logits = s.eval(&prompt_ids, Logits::Last).unwrap();
    for (i, &w) in want.iter().enumerate() {
        let g = flexserve_engine::sampling::argmax(&logits);
        if g != w {
            let what = format!(
                "{prompt:?}: position {i}: FlexServe {g}, llama.cpp {w}; llama.cpp's top-two gap {:.5}, \
                 FlexServe's {:.5} (its logit of {w} is {:.5} below)",
                gaps[i],
                top2_gap(&logits),
                logits[g as usize] - logits[w as usize]
            );
            return if gaps[i] < NEAR_TIE { Outcome::NearTie(what) } else { Outcome::Failed(what) };
        }
        if i + 1 < want.len() {
            logits = s.eval(&[g], Logits::Last).unwrap();
        }
    }
    Outcome::Exact
}

#[test]
fn greedy_continuations_match_llama_cpp_at_every_tier() {
    let _tier = TIER.lock().unwrap_or_else(|e| e.into_inner());
    let mut failures = Vec::new();
    // Under emulation (scripts/aarch64.sh) a subset of the models: their
    // file names' prefixes, comma-separated.
    let only = std::env::var("FLEXSERVE_REFERENCE_MODELS").ok();
    let wanted = |r: &&GreedyReference| only.as_deref().is_none_or(|o| o.split(',').any(|p| r.model.starts_with(p)));
    let subset = Subset::from_env();
    for r in GREEDY.iter().filter(wanted) {
        let reference = read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference").join(r.reference));
        assert_eq!(reference["model"].as_str(), Some(r.model), "{}: recorded on another model", r.reference);
        let all_cases = reference["cases"].as_array().unwrap();
        assert!(all_cases.len() >= 20, "{}: too few cases", r.reference);
        // Long prompts: tiled prefill, and decoding past 256 positions (llama.cpp's split keys).
        let lengths: Vec<usize> = all_cases.iter().map(|c| c["prompt_ids"].as_array().unwrap().len()).collect();
        let medium = lengths.iter().filter(|&&n| (LONG_PROMPT..=200).contains(&n)).count();
        let past_split = lengths.iter().filter(|&&n| n >= 300).count();
        assert!(medium >= 2 && past_split >= 2, "{}: too few long prompts ({lengths:?})", r.reference);
        for isa in flexserve_quant::usable_isas() {
            // Kernels are picked as the model loads.
            flexserve_quant::limit_isa(isa);
            let started = std::time::Instant::now();
            let (model, tok) = load(r.model);
            let portable = isa == Isa::Portable;
            let below_best = isa < flexserve_quant::detected_isa();
            let tier_tokens = match isa {
                Isa::Portable => r.portable_tokens,
                Isa::Avx2 if below_best => r.avx2_tokens,
                _ => None,
            };
            let max_tokens = match (&subset, tier_tokens) {
                (Some(q), Some(t)) => Some(q.tokens.min(t)),
                (Some(q), None) => Some(q.tokens),
                (None, t) => t,
            };
            let n_cases = if portable { r.portable_cases.unwrap_or(usize::MAX) } else { usize::MAX };
            let is_long = |case: &Json| case["prompt_ids"].as_array().unwrap().len() >= LONG_PROMPT;
            let (mut short_index, mut long_index) = (0, 0);
            let cases: Vec<&Json> = all_cases[..n_cases.min(all_cases.len())]
                .iter()
                .filter(|case| {
                    if !is_long(case) {
                        short_index += 1;
                        return subset.as_ref().is_none_or(|q| short_index <= q.short);
                    }
                    long_index += 1;
                    let in_subset = subset.as_ref().is_none_or(|q| long_index <= q.long);
                    in_subset
                        && match isa {
                            Isa::Portable => r.long_portable.contains(&(long_index - 1)),
                            Isa::Avx2 if below_best => r.long_avx2,
                            _ => true,
                        }
                })
                .collect();
            let n_long = cases.iter().filter(|case| is_long(case)).count();
            let (mut exact, mut near) = (0, 0);
            for case in &cases {
                match run_case(&model, &tok, case, max_tokens) {
                    Outcome::Exact => exact += 1,
                    Outcome::NearTie(what) => {
                        near += 1;
                        eprintln!("{} {}: near tie: {what}", r.model, isa.name());
                    }
                    Outcome::Failed(what) => failures.push(format!("{} {}: {what}", r.model, isa.name())),
                }
            }
            let tokens = max_tokens.map_or(String::new(), |n| format!(" (first {n} tokens)"));
            eprintln!(
                "{} {}{tokens}: {exact} exact, {near} near ties, {} failing, of {} ({n_long} long) ({:.0?})",
                r.model,
                isa.name(),
                cases.len() - exact - near,
                cases.len(),
                started.elapsed()
            );
        }
    }
    flexserve_quant::limit_isa(flexserve_quant::detected_isa());
    assert!(
        failures.is_empty(),
        "greedy picks that differ from llama.cpp's beyond a near tie:\n{}",
        failures.join("\n")
    );
}

#[test]
fn perplexity_within_one_percent_of_llama_cpp() {
    let _tier = TIER.lock().unwrap_or_else(|e| e.into_inner());
    let reference = read_json(&root().join("../shared/reference/perplexity.json"));
    let text_file = reference["text_file"].as_str().unwrap();
    let want = reference["ppl"].as_f64().unwrap();
    let ctx = reference["ctx"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(text_file).unwrap_or_else(|e| panic!("{text_file}: {e}"));
    let (model, tok) = load("SmolLM2-135M-Instruct.Q4_1.gguf");
    let tokens = tok.encode(&text, true, false);
    let r = perplexity(&model, &tokens, ctx, None, |_, _, _| {}).unwrap();
    assert_eq!(r.n_chunks as u64, reference["n_chunks"].as_u64().unwrap());
    let rel = (r.ppl - want).abs() / want;
    eprintln!("PPL {:.4} vs llama.cpp {want:.4} ({:.3}%)", r.ppl, rel * 100.0);
    assert!(rel < 0.01, "PPL {:.4} vs llama.cpp {want:.4}", r.ppl);
}

#[test]
fn gemma3_perplexity_within_one_percent_of_llama_cpp() {
    let _tier = TIER.lock().unwrap_or_else(|e| e.into_inner());
    // Chunks of 1024 over local layers' window of 512: the scored second
    // halves see only the window there (bench/record_perplexity.py).
    let reference = read_json(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/perplexity-gemma3.json"));
    let text_file = reference["text_file"].as_str().unwrap();
    let want = reference["ppl"].as_f64().unwrap();
    let ctx = reference["ctx"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(text_file).unwrap_or_else(|e| panic!("{text_file}: {e}"));
    let (model, tok) = load(reference["model"].as_str().unwrap());
    let tokens = tok.encode(&text, true, false);
    assert_eq!(tokens.len() as u64, reference["n_tokens"].as_u64().unwrap(), "tokens of {text_file}");
    // Each chunk starts with BOS, as llama-perplexity does for a model that adds one.
    let bos = tok.bos().filter(|b| tokens.first() == Some(b));
    let r = perplexity(&model, &tokens, ctx, bos, |_, _, _| {}).unwrap();
    assert_eq!(r.n_chunks as u64, reference["n_chunks"].as_u64().unwrap());
    let rel = (r.ppl - want).abs() / want;
    eprintln!("gemma3 PPL {:.4} vs llama.cpp {want:.4} ({:.3}%)", r.ppl, rel * 100.0);
    assert!(rel < 0.01, "PPL {:.4} vs llama.cpp {want:.4}", r.ppl);
}
