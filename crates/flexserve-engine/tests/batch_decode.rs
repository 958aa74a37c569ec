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

/// Generations parked between steps (as the secure world keeps the streams
/// of its batch between requests) and decoded together give each the text
/// and tokens it gets alone, sampled at a temperature (the sampler's state
/// parks too) and cut by a stop string.
#[test]
fn parked_token_streams_decoded_together_give_each_generation_its_own_answer() {
    use flexserve_engine::{GenerateOptions, Generator, Next, ParkedTokens, SamplingParams, SessionState};
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    let source = GgufSource::from_file(Arc::new(GgufFile::open(&path).unwrap()));
    let tokenizer = Tokenizer::from_gguf(&source.header().metadata).unwrap();
    let model = Model::from_source(&source, 2).unwrap();
    let prompts = ["Les élèves écrivent", "def fibonacci(n):", "Once upon a time,"];
    let opts: Vec<GenerateOptions> = (0..prompts.len() as u64)
        .map(|i| GenerateOptions {
            max_tokens: 10 + 3 * i as usize,
            sampling: SamplingParams { temperature: 0.9, seed: 7 + i, ..SamplingParams::default() },
            stop: vec!["\n\n".to_string()],
        })
        .collect();
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| tokenizer.encode(p, true, true)).collect();

    let alone: Vec<(String, Vec<u32>)> = ids
        .iter()
        .zip(&opts)
        .map(|(p, o)| {
            let mut g = Generator::new(Session::new(&model, 64), &tokenizer);
            let mut text = String::new();
            let stats = g.generate(p, o, |t| text.push_str(t)).unwrap();
            (text, stats.tokens)
        })
        .collect();

    struct Parked {
        state: SessionState,
        tokens: ParkedTokens,
        logits: Vec<f32>,
        text: String,
    }
    let mut live: Vec<(usize, Parked)> = Vec::new();
    for (i, (p, o)) in ids.iter().zip(&opts).enumerate() {
        let mut g = Generator::new(Session::new(&model, 64), &tokenizer);
        let pre = g.prefill_with(p, o, &mut |_| Ok(())).unwrap();
        let (session, _) = g.into_parts();
        let parked =
            Parked { state: session.into_state(), tokens: pre.tokens.park(), logits: pre.logits, text: String::new() };
        live.push((i, parked));
    }
    let mut together: Vec<Option<(String, Vec<u32>)>> = vec![None; prompts.len()];
    while !live.is_empty() {
        let mut going = Vec::new();
        let mut next = Vec::new();
        for (i, mut p) in live.drain(..) {
            let mut stream = p.tokens.resume(&tokenizer);
            let room = p.state.n_past() < p.state.n_ctx();
            match stream.step(&p.logits, room, &mut |t| p.text.push_str(t)) {
                Next::Done(_) => together[i] = Some((std::mem::take(&mut p.text), stream.generated().to_vec())),
                Next::Evaluate(id) => {
                    p.tokens = stream.park();
                    next.push(id);
                    going.push((i, p));
                }
            }
        }
        if going.is_empty() {
            break;
        }
        let mut sessions: Vec<Session> = Vec::new();
        let mut rest = Vec::new();
        for (i, p) in going {
            let Parked { state, tokens, logits: _, text } = p;
            sessions.push(Session::resume(&model, state).unwrap());
            rest.push((i, tokens, text));
        }
        let logits = {
            let mut refs: Vec<&mut Session> = sessions.iter_mut().collect();
            Session::decode_batch(&mut refs, &next).unwrap()
        };
        for ((session, (i, tokens, text)), logits) in sessions.into_iter().zip(rest).zip(logits) {
            live.push((i, Parked { state: session.into_state(), tokens, logits, text }));
        }
    }
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(Some(a), t.as_ref(), "generation {i} ({:?})", prompts[i]);
    }
}
