//! Flex-NPU's pause as a process: a generation whose cores are always
//! wanted elsewhere pauses between layers and tokens again and again, scrubs its workers'
//! scratch each time, and still gives the plain model's tokens; a Cancel
//! sent while it pauses ends it without a Resume.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::{options, plain_generate, request, sealed};
use flexserve_normal::{CoreLease, NormalError, SecureWorld};
use flexserve_protocol::ErrorCode;

/// A lease the other world always wants: every hand-over is counted.
#[derive(Default)]
struct AlwaysWanted {
    hand_overs: AtomicU64,
    unscrubbed: AtomicU64,
}

impl CoreLease for AlwaysWanted {
    fn contended(&self) -> bool {
        true
    }

    fn hand_over(&self, scrubbed: bool) {
        self.hand_overs.fetch_add(1, Ordering::SeqCst);
        self.unscrubbed.fetch_add(u64::from(!scrubbed), Ordering::SeqCst);
    }
}

#[test]
fn a_generation_pauses_between_tokens_with_its_scratch_scrubbed_and_gives_the_same_tokens() {
    let s = sealed();
    let prompt = "The three primary colors are";
    let expected = plain_generate(prompt, 12);
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let lease = Arc::new(AlwaysWanted::default());
    world.set_core_lease(lease.clone());
    let (model, _) = world.open_model_header(&s.model).unwrap();
    let mut text = String::new();
    world.generate(&model, request(&model, prompt, 12), |t| text.push_str(t)).unwrap();
    assert_eq!(text, expected);
    let hand_overs = lease.hand_overs.load(Ordering::SeqCst);
    // The normal world asks as soon as it sees the other world waiting (here:
    // always), and the secure world pauses at its next layer of the prompt
    // or its next token: many times over a 12-token generation.
    assert!(hand_overs >= 2, "{hand_overs} hand-overs");
    assert_eq!(lease.unscrubbed.load(Ordering::SeqCst), 0);
    // The session is ready for the next request.
    assert_eq!(common::generate(&mut world, &model, prompt, 12), expected);
    world.shutdown().unwrap();
}

#[test]
fn a_cancel_sent_while_paused_ends_the_generation_and_the_session_goes_on() {
    let s = sealed();
    let prompt = "The three primary colors are";
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    world.set_core_lease(Arc::new(AlwaysWanted::default()));
    let (model, _) = world.open_model_header(&s.model).unwrap();
    // Cancelled once the first token is out: the next Pause and the Cancel cross.
    let first = AtomicBool::new(false);
    let result = world.generate_until(
        &model,
        request(&model, prompt, 64),
        |_| first.store(true, Ordering::SeqCst),
        || first.load(Ordering::SeqCst),
    );
    match result {
        Err(NormalError::Secure { code: ErrorCode::Cancelled, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(common::generate(&mut world, &model, prompt, 8), plain_generate(prompt, 8));
    world.shutdown().unwrap();
}
