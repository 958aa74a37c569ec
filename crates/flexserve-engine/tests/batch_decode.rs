//! Continuous batching: one decode step for several sessions gives each the
//! logits it gets alone, bit for bit, so batched and single answers agree.

use std::path::Path;
use std::sync::Arc;

use flexserve_engine::weights::GgufSource;
use flexserve_engine::{Logits, Model, Session};
use flexserve_gguf::GgufFile;
use flexserve_tokenizer::Tokenizer;

fn argmax(v: &[f32]) -> u32 {
    v.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

#[test]
fn a_batched_step_gives_each_session_its_own_logits() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    let source = GgufSource::from_file(Arc::new(GgufFile::open(&path).unwrap()));
    let tokenizer = Tokenizer::from_gguf(&source.header().metadata).unwrap();
    let model = Model::from_source(&source, 2).unwrap();
    let prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far away", "1, 2, 3,"];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode(p, true, true)).collect();

    // Alone: each prompt, then 12 greedy tokens one by one.
    let mut alone = Vec::new();
    for p in &ids {
        let mut s = Session::new(&model, 128);
        let mut logits = s.eval(p, Logits::Last).unwrap();
        let mut steps = vec![logits.clone()];
        for _ in 0..12 {
            logits = s.eval(&[argmax(&logits)], Logits::Last).unwrap();
            steps.push(logits.clone());
        }
        alone.push(steps);
    }

    // Together: the same prompts, then 12 batched steps (sessions at different positions).
    let mut sessions: Vec<Session> = ids.iter().map(|_| Session::new(&model, 128)).collect();
    let mut logits: Vec<Vec<f32>> =
        sessions.iter_mut().zip(&ids).map(|(s, p)| s.eval(p, Logits::Last).unwrap()).collect();
    for step in 0..=12 {
        for (i, (l, single)) in logits.iter().zip(&alone).enumerate() {
            assert!(l == &single[step], "session {i}, step {step}: batched logits differ from single ones");
        }
        if step == 12 {
            break;
        }
        let next: Vec<u32> = logits.iter().map(|l| argmax(l)).collect();
        let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
        logits = Session::decode_batch(&mut refs, &next).unwrap();
    }
    for (s, p) in sessions.iter().zip(&ids) {
        assert_eq!(s.n_past(), p.len() + 12);
    }

    // Mismatched inputs are refused, not mis-evaluated.
    let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
    assert!(Session::decode_batch(&mut refs, &[1]).is_err());
    assert!(Session::decode_batch(&mut refs, &[u32::MAX; 4]).is_err());
}
