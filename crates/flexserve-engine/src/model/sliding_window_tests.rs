//! Sliding-window attention (gemma3) in every attention path: a token
//! before a query's window has no influence on it, bit for bit, whether
//! the query is in a small batch, a long one (the f32 path), decoded alone
//! or decoded beside another session.

use flexserve_gguf::GgmlType;

use super::{Logits, Model, Session};
use crate::config::Arch;
use crate::synth::{synth_model, SynthSpec};
use crate::weights::GgufSource;

/// A tiny gemma3 whose two layers both attend within a window of 4: the
/// query at `p` depends on the tokens `p - 6 ..= p` (two windows deep) alone.
/// `pattern` 2 makes the second layer global instead.
fn model(pattern: u32) -> Model {
    let mut spec = SynthSpec::tiny(Arch::Gemma3, GgmlType::Q8_0);
    spec.sliding_window = 4;
    spec.sliding_window_pattern = pattern;
    let mut image = Vec::new();
    synth_model(&spec, None).unwrap().write_to(&mut image).unwrap();
    Model::from_source(&GgufSource::from_bytes(image).unwrap(), 2).unwrap()
}

/// Two prompts that differ in their first token only.
fn prompts(n: usize) -> (Vec<u32>, Vec<u32>) {
    let a: Vec<u32> = (0..n as u32).map(|i| (i * 41 + 9) % 300).collect();
    let mut b = a.clone();
    b[0] = 123;
    (a, b)
}

/// Logits of every position, the prompt evaluated in batches of `batch`.
fn all_logits(m: &Model, tokens: &[u32], batch: usize) -> Vec<Vec<f32>> {
    let mut s = Session::new(m, 128);
    let mut out = Vec::new();
    for chunk in tokens.chunks(batch) {
        let logits = s.eval(chunk, Logits::From(0)).unwrap();
        out.extend(logits.chunks(m.config.n_vocab).map(<[f32]>::to_vec));
    }
    out
}

#[test]
fn a_token_before_the_window_does_not_influence() {
    let m = model(0);
    assert!(m.config.is_local(0) && m.config.is_local(1));
    let (a, b) = prompts(80);
    // Batches of 10 (per-head attention), 80 (the f32 path), one token at a time.
    for batch in [10, 80, 1] {
        let (la, lb) = (all_logits(&m, &a, batch), all_logits(&m, &b, batch));
        assert_ne!(la[6], lb[6], "batch {batch}: position 6 is within reach of token 0: the test proves nothing");
        for p in 7..a.len() {
            assert_eq!(la[p], lb[p], "batch {batch}: position {p} saw token 0");
        }
    }
}

#[test]
fn a_global_layer_sees_every_position() {
    let m = model(2);
    assert!(m.config.is_local(0) && !m.config.is_local(1));
    let (a, b) = prompts(40);
    for batch in [40, 1] {
        let (la, lb) = (all_logits(&m, &a, batch), all_logits(&m, &b, batch));
        assert_ne!(la[39], lb[39], "batch {batch}");
    }
}

#[test]
fn batched_decode_honours_the_window() {
    let m = model(0);
    let (a, b) = prompts(12);
    let (mut sa, mut sb, mut alone) = (Session::new(&m, 64), Session::new(&m, 64), Session::new(&m, 64));
    sa.eval(&a, Logits::Last).unwrap();
    sb.eval(&b, Logits::Last).unwrap();
    alone.eval(&a, Logits::Last).unwrap();
    for t in [5u32, 77, 200] {
        let out = Session::decode_batch(&mut [&mut sa, &mut sb], &[t, t]).unwrap();
        // Past the window the prompts' difference is gone, and each row is
        // what the session gives decoding alone.
        assert_eq!(out[0], out[1], "token {t}");
        assert_eq!(out[0], alone.eval(&[t], Logits::Last).unwrap(), "token {t}");
    }
}
