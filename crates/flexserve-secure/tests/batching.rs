//! Continuous batching in the secure world, on real `flexserve-secure`
//! processes and the real sealed model: generations admitted one after
//! another into a model's batch (the first while the model still loads
//! through the pipeline) and decoded together give each the plain engine's
//! greedy answer; a finished or ended stream gives its KV cache back; the
//! bounds and refusals name what is wrong.

mod common;

use std::collections::BTreeMap;

use common::{options, plain_generate, request, sealed};
use flexserve_normal::{NormalError, SecureWorld};
use flexserve_protocol::{ErrorCode, StreamStep, MAX_STREAMS};

/// Adds a step's text to its stream's answer; the ids of streams that ended.
fn collect(answers: &mut BTreeMap<u32, String>, steps: Vec<StreamStep>) -> Vec<u32> {
    let mut ended = Vec::new();
    for s in steps {
        answers.entry(s.stream).or_default().push_str(&s.text);
        if let Some(report) = s.finished {
            assert!(report.generated_tokens > 0, "stream {}: {report:?}", s.stream);
            ended.push(s.stream);
        }
    }
    ended
}

fn bad_argument(result: Result<StreamStep, NormalError>, says: &str) {
    match result {
        Err(NormalError::Secure { code: ErrorCode::BadArgument, message }) => {
            assert!(message.contains(says), "{message:?} should say {says:?}")
        }
        other => panic!("expected BadArgument saying {says:?}, got {other:?}"),
    }
}

#[test]
fn streams_decoded_together_give_each_its_own_answer_and_give_their_memory_back() {
    let s = sealed();
    // (stream, prompt, tokens): different lengths, so that streams leave at different steps.
    let jobs = [
        (11, "The three primary colors are", 16u32),
        (12, "def fibonacci(n):", 9),
        (13, "Once upon a time, in a small village,", 14),
        (14, "The capital of France is", 5),
    ];
    let expected: BTreeMap<u32, String> = jobs.iter().map(|&(id, p, n)| (id, plain_generate(p, n as usize))).collect();

    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    // Header only: the first stream's prompt loads the weights as it computes.
    let (model, _) = world.open_model_header(&s.model).unwrap();
    assert!(world.step_streams(&model).unwrap().is_empty(), "no streams yet");
    let mut answers = BTreeMap::new();
    let mut ended = Vec::new();
    let (id, prompt, n) = jobs[0];
    let first = world.start_stream(&model, id, request(&model, prompt, n), || false).unwrap();
    ended.extend(collect(&mut answers, vec![first]));
    assert!(world.take_pipelined_load().is_some(), "the first stream's prompt loaded the model");
    // The weights and the first stream's KV cache.
    let one_stream = world.status().unwrap().in_use;
    // The others join one at a time, a step apart.
    for &(id, prompt, n) in &jobs[1..] {
        let steps = world.step_streams(&model).unwrap();
        ended.extend(collect(&mut answers, steps));
        let first = world.start_stream(&model, id, request(&model, prompt, n), || false).unwrap();
        ended.extend(collect(&mut answers, vec![first]));
    }
    let in_batch = world.status().unwrap().in_use;
    assert!(in_batch > one_stream, "four KV caches in granted granules: {in_batch} > {one_stream}");
    // Refusals while the batch runs: the same id again, a kept conversation,
    // evicting the model whose layers the batch uses.
    bad_argument(world.start_stream(&model, 13, request(&model, "x", 2), || false), "already in a batch");
    let mut kept = request(&model, "x", 2);
    kept.conversation = 5;
    bad_argument(world.start_stream(&model, 20, kept, || false), "one-off generation");
    match world.evict(model.id, 1) {
        Err(NormalError::Secure { code: ErrorCode::BadArgument, message }) => {
            assert!(message.contains("in its batch"), "{message}")
        }
        other => panic!("evicting a batch's model: {other:?}"),
    }
    let mut steps_taken = 0;
    while ended.len() < jobs.len() {
        let steps = world.step_streams(&model).unwrap();
        assert!(!steps.is_empty(), "streams left: {ended:?}");
        ended.extend(collect(&mut answers, steps));
        steps_taken += 1;
        assert!(steps_taken < 64, "the batch does not end");
    }
    assert_eq!(answers, expected, "each stream's answer is the plain engine's");
    assert!(world.step_streams(&model).unwrap().is_empty(), "every stream left");
    let weights_only = world.status().unwrap().in_use;
    assert!(weights_only < one_stream, "the streams' KV caches went back to the free pool");

    // A stream ended by the normal world (its client left) leaves at once.
    let first = world.start_stream(&model, 30, request(&model, "Once upon a time, there was", 200), || false).unwrap();
    assert!(first.finished.is_none(), "{first:?}");
    assert_eq!(world.step_streams(&model).unwrap().len(), 1);
    world.end_stream(30).unwrap();
    world.end_stream(30).unwrap();
    assert!(world.step_streams(&model).unwrap().is_empty());
    assert_eq!(world.status().unwrap().in_use, weights_only);

    // At most MAX_STREAMS at once (small caches: 32 positions each).
    let small = |p: &str| {
        let mut r = request(&model, p, 8);
        r.n_ctx = 32;
        r
    };
    for id in 0..MAX_STREAMS as u32 {
        world.start_stream(&model, 100 + id, small("Count: 1, 2, 3,"), || false).unwrap();
    }
    bad_argument(world.start_stream(&model, 99, small("One more"), || false), "MAX_STREAMS");
    let steps = world.step_streams(&model).unwrap();
    assert_eq!(steps.len(), MAX_STREAMS, "one step serves every stream");
    let texts: Vec<&str> = steps.iter().map(|s| s.text.as_str()).collect();
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "the same prompt gives every stream the same token: {texts:?}");
    // Unloading the model ends its streams.
    world.unload(&model).unwrap();
    let (model, _) = world.open_model(&s.model).unwrap();
    assert!(world.step_streams(&model).unwrap().is_empty(), "the unloaded model's streams are gone");
    world.shutdown().unwrap();
}
