//! Prefetch at the protocol level: `LoadChunks` naming model B while model A
//! generates loads into B's regions (B's missing chunks go, A's answer is
//! unchanged), an id that names no model is refused, named, without
//! stopping the generation, and chunks of another model sent while the
//! generation's own first layers load are not taken. A real
//! `flexserve-secure` process on the real model, spoken to by hand.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{request_to, sealed};
use flexserve_protocol::{read_reply, write_request, BufferRange, ChunkRef, ErrorCode, Reply, Request};

/// Layers of the real model.
const LAYERS: u32 = 30;

struct Peer {
    /// The sealed file and key, and the shared buffer: kept for the secure world.
    _sealed: common::Sealed,
    _shared: flexserve_protocol::SharedBuffer,
    socket: std::os::unix::net::UnixStream,
    child: std::process::Child,
    /// Every chunk of the sealed file, placed once in the shared buffer
    /// (models opened from the same file share their ciphertext).
    refs: Vec<ChunkRef>,
    header_len: u64,
}

impl Peer {
    fn send(&mut self, request: &Request) {
        write_request(&mut self.socket, request).unwrap();
    }

    fn next(&mut self) -> Reply {
        read_reply(&mut self.socket).unwrap()
    }

    fn call(&mut self, request: &Request) -> Reply {
        self.send(request);
        self.next()
    }

    fn open(&mut self, name: &str) -> u32 {
        let header = BufferRange { offset: 0, len: self.header_len };
        match self.call(&Request::OpenModel { name: name.into(), header }) {
            Reply::ModelOpened { model, .. } => model,
            other => panic!("OpenModel answered {other:?}"),
        }
    }

    fn missing(&mut self, model: u32) -> Vec<u32> {
        match self.call(&Request::MissingChunks { model }) {
            Reply::Missing { chunks } => chunks.iter().flat_map(|s| s.start..s.end).collect(),
            other => panic!("MissingChunks answered {other:?}"),
        }
    }

    fn load(&mut self, model: u32, chunks: &[u32]) -> Request {
        Request::LoadChunks { model, chunks: chunks.iter().map(|&i| self.refs[i as usize]).collect() }
    }

    /// The text of a generation that needs nothing loaded, and every reply to the end.
    fn collect_until_generated(&mut self) -> (String, Vec<Reply>) {
        let mut replies = Vec::new();
        loop {
            let reply = self.next();
            let end = !matches!(reply, Reply::Token { .. } | Reply::ChunksLoaded { .. } | Reply::Error { .. });
            let fatal = matches!(reply, Reply::Error { code, .. } if code != ErrorCode::NoSuchModel);
            replies.push(reply);
            assert!(!fatal, "{replies:?}");
            if end {
                break;
            }
        }
        let text =
            replies.iter().filter_map(|r| if let Reply::Token { text } = r { Some(text.as_str()) } else { None });
        (text.collect(), replies)
    }
}

fn start() -> Peer {
    let s = sealed();
    let common::RawWithModel { raw, refs, header_len } = common::raw_world_with_model(&s, Duration::from_secs(60));
    let mut peer = Peer { _sealed: s, _shared: raw.shared, socket: raw.socket, child: raw.child, refs, header_len };
    assert!(matches!(
        peer.call(&Request::Hello { version: flexserve_protocol::PROTOCOL_VERSION }),
        Reply::Hello { .. }
    ));
    peer
}

#[test]
fn chunks_for_another_model_during_a_generation_land_in_that_model_and_the_answer_is_unchanged() {
    let mut peer = start();
    let a = peer.open("a.fsm");
    let b = peer.open("b.fsm");
    // Room for three models (397 granules each), their KV caches and activations.
    assert!(matches!(peer.call(&Request::Grant { granules: 2000 }), Reply::Granted { .. }));
    let all = peer.missing(a);
    for batch in all.chunks(32) {
        let request = peer.load(a, batch);
        assert!(matches!(peer.call(&request), Reply::ChunksLoaded { .. }));
    }
    let prompt = "Once upon a time, in a small village,";
    peer.send(&Request::Generate(request_to(a, prompt, 96)));
    let (reference, _) = peer.collect_until_generated();
    assert!(!reference.is_empty());
    let order = peer.missing(b);
    assert_eq!(order.len(), all.len(), "b is opened header-only");

    // A generates again; once its first token is out, b's chunks come in
    // two batches, with a batch for a model that does not exist between them.
    peer.send(&Request::Generate(request_to(a, prompt, 96)));
    let first = peer.next();
    assert!(matches!(first, Reply::Token { .. }), "{first:?}");
    let (head, tail) = order.split_at(order.len() / 2);
    let (head, tail) = (peer.load(b, head), peer.load(b, tail));
    peer.send(&head);
    let ghost = peer.load(999, &order[..1]);
    peer.send(&ghost);
    peer.send(&tail);
    let (rest, replies) = peer.collect_until_generated();
    let Reply::Token { text } = first else { unreachable!() };
    assert_eq!(text + &rest, reference, "a's answer is unchanged");
    let loaded: Vec<u32> = replies
        .iter()
        .filter_map(|r| if let Reply::ChunksLoaded { loaded } = r { Some(*loaded) } else { None })
        .collect();
    assert_eq!(loaded, [count(&head), count(&tail)], "{replies:?}");
    let refused = replies.iter().find_map(|r| match r {
        Reply::Error { code: ErrorCode::NoSuchModel, message } => Some(message.clone()),
        _ => None,
    });
    let refused = refused.unwrap_or_else(|| panic!("the batch for model 999 is refused: {replies:?}"));
    assert!(refused.contains("999") && refused.contains(&format!("model {a} generates")), "{refused}");
    // Served during the generation: tokens came after the chunks' answers.
    let last_loaded = replies.iter().rposition(|r| matches!(r, Reply::ChunksLoaded { .. })).unwrap();
    assert!(replies[last_loaded..].iter().any(|r| matches!(r, Reply::Token { .. })), "{replies:?}");
    assert!(matches!(replies.last(), Some(Reply::Generated(_))), "{replies:?}");

    // b is resident, a untouched; b's weights answer as a's do.
    assert_eq!(peer.missing(b), Vec::<u32>::new());
    assert_eq!(peer.missing(a), Vec::<u32>::new());
    let Reply::Status(status) = peer.call(&Request::Status) else { panic!("Status") };
    let resident: BTreeSet<(u32, u32)> = status.models.iter().map(|m| (m.model, m.resident_layers)).collect();
    assert_eq!(resident, BTreeSet::from([(a, LAYERS), (b, LAYERS)]));
    peer.send(&Request::Generate(request_to(b, prompt, 96)));
    let (from_b, replies) = peer.collect_until_generated();
    assert!(!replies.iter().any(|r| matches!(r, Reply::LoadNeeded { .. })), "{replies:?}");
    assert_eq!(from_b, reference);

    // While a generation's own first layers load, another model's chunks are not taken.
    let c = peer.open("c.fsm");
    let d = peer.open("d.fsm");
    peer.send(&Request::Generate(request_to(c, prompt, 8)));
    let own = match peer.next() {
        Reply::LoadNeeded { chunks } => chunks.iter().flat_map(|s| s.start..s.end).collect::<Vec<u32>>(),
        other => panic!("c asks for its chunks: {other:?}"),
    };
    let early = peer.load(d, &own[..4]);
    assert_eq!(peer.call(&early), Reply::ChunksLoaded { loaded: 0 });
    for batch in own.chunks(32) {
        let request = peer.load(c, batch);
        peer.send(&request);
    }
    let (from_c, _) = peer.collect_until_generated();
    assert!(reference.starts_with(&from_c), "{from_c:?} / {reference:?}");
    assert_eq!(peer.missing(d).len(), all.len());

    peer.socket.shutdown(std::net::Shutdown::Both).unwrap();
    let status = peer.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

/// Chunks a `LoadChunks` carries.
fn count(request: &Request) -> u32 {
    match request {
        Request::LoadChunks { chunks, .. } => chunks.len() as u32,
        _ => 0,
    }
}
