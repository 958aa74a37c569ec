//! The secure inference pipeline as a process: a model opened header-only
//! (`open_model_header`) loads on its first generation, each layer computing
//! as soon as its chunks are verified while the later ones stream in.
//! Each test starts real `flexserve-secure` processes on the real model.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{generate, options, plain_generate, request, request_to, sealed};
use flexserve_normal::control::{request_recall, RecallAmount};
use flexserve_normal::{resident_bytes, NormalError, OpenedModel, SecureWorld};
use flexserve_protocol::{ErrorCode, ModelStatus, Reply, Request};
use flexserve_sealed::SealedHeader;

/// Layers of the real model.
const LAYERS: u32 = 30;

fn model_status(world: &mut SecureWorld, model: &OpenedModel) -> ModelStatus {
    let st = world.status().unwrap();
    st.models.into_iter().find(|m| m.model == model.id).unwrap_or_else(|| panic!("model {} not in status", model.id))
}

/// The parsed header of a sealed file.
fn sealed_header(path: &Path) -> SealedHeader {
    let bytes = std::fs::read(path).unwrap();
    let prefix = SealedHeader::read_prefix(&bytes[..]).unwrap();
    SealedHeader::read(&prefix).unwrap()
}

/// The transformer layer of each chunk (`None`: embeddings, output).
fn chunk_layers(header: &SealedHeader) -> Vec<Option<usize>> {
    header.chunks.iter().map(|c| header.gguf.tensors[c.tensor_index as usize].layer()).collect()
}

/// The chunks the secure world reports missing (`MissingChunks`).
fn missing_chunks(world: &mut SecureWorld, model: &OpenedModel) -> BTreeSet<usize> {
    match world.call(&Request::MissingChunks { model: model.id }).unwrap() {
        Reply::Missing { chunks } => chunks.iter().flat_map(|s| s.start as usize..s.end as usize).collect(),
        other => panic!("MissingChunks answered {other:?}"),
    }
}

#[test]
fn pipelined_load_gives_the_same_tokens_as_loading_everything_and_as_the_plain_model() {
    let s = sealed();
    let prompts = ["The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village,"];
    let expected: Vec<String> = prompts.iter().map(|p| plain_generate(p, 16)).collect();
    let header = sealed_header(&s.model);
    let sealed_bytes: u64 = header.chunks.iter().map(|c| c.sealed_len() as u64).sum();

    // Everything loaded before the first generation.
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, load) = world.open_model(&s.model).unwrap();
    assert_eq!(load.chunks, model.chunks as usize);
    for (prompt, expected) in prompts.iter().zip(&expected) {
        assert_eq!(&generate(&mut world, &model, prompt, 16), expected, "loaded up front: {prompt:?}");
    }
    assert!(world.take_pipelined_load().is_none(), "nothing was loaded by a generation");
    world.shutdown().unwrap();

    // Header only: the first generation loads the weights as it computes.
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, open) = world.open_model_header(&s.model).unwrap();
    assert_eq!(model.chunks as usize, header.chunks.len());
    assert_eq!((open.chunks, open.bytes), (0, 0), "{open:?}");
    let before = world.status().unwrap();
    assert_eq!((before.granted, before.in_use), (0, 0), "nothing is granted for a model opened header-only");
    let m = model_status(&mut world, &model);
    assert_eq!((m.layers, m.resident_layers, m.resident_chunks, m.chunks), (LAYERS, 0, 0, model.chunks), "{m:?}");
    assert_eq!(missing_chunks(&mut world, &model).len(), model.chunks as usize);

    let t0 = Instant::now();
    let mut text = String::new();
    let report = world.generate(&model, request(&model, prompts[0], 16), |t| text.push_str(t)).unwrap();
    let first = t0.elapsed();
    assert_eq!(text, expected[0], "pipelined: {:?}", prompts[0]);
    assert!(report.generated_tokens > 0);
    let load = world.take_pipelined_load().expect("the first generation loaded the model");
    assert_eq!(load.chunks, model.chunks as usize, "{load:?}");
    assert_eq!(load.bytes, sealed_bytes, "every chunk was read once: {load:?}");
    assert!(load.total > Duration::ZERO && load.total <= first, "{load:?} within a generation of {first:?}");
    let m = model_status(&mut world, &model);
    assert_eq!((m.resident_layers, m.resident_chunks, m.chunks), (LAYERS, model.chunks, model.chunks), "{m:?}");
    assert!(missing_chunks(&mut world, &model).is_empty());
    eprintln!(
        "pipelined first generation: {:.0} ms, of which the load ({} chunks, {} MiB, read {:.0} ms) {:.0} ms",
        first.as_secs_f64() * 1e3,
        load.chunks,
        load.bytes >> 20,
        load.read.as_secs_f64() * 1e3,
        load.total.as_secs_f64() * 1e3
    );

    // Resident now: the next generations load nothing and answer the same.
    for (prompt, expected) in prompts.iter().zip(&expected).skip(1).chain([(&prompts[0], &expected[0])]) {
        assert_eq!(&generate(&mut world, &model, prompt, 16), expected, "pipelined, resident: {prompt:?}");
        assert!(world.take_pipelined_load().is_none(), "a resident model was loaded again for {prompt:?}");
    }
    let m = model_status(&mut world, &model);
    assert_eq!((m.resident_layers, m.resident_chunks), (LAYERS, model.chunks), "{m:?}");
    world.shutdown().unwrap();
}

#[test]
fn a_tampered_chunk_fails_the_pipelined_request_naming_it_before_any_token() {
    let s = sealed();
    let header = sealed_header(&s.model);
    let layers = chunk_layers(&header);
    // A chunk of a transformer layer in the middle of the file, not the
    // first of its layer (so that its layer has chunks verified before it).
    let index = (header.chunks.len() / 2..header.chunks.len())
        .find(|&i| layers[i].is_some() && layers[i - 1] == layers[i])
        .expect("a layer chunk past the middle");
    let layer = layers[index].unwrap();
    assert!(layer > 0 && layer < LAYERS as usize - 1, "chunk {index} is in layer {layer}");
    let chunk = header.chunks[index];
    let tampered = s.dir.path().join("t.fsm");
    let mut bytes = std::fs::read(&s.model).unwrap();
    // One bit of the ciphertext, in the middle of the chunk's body.
    bytes[(chunk.file_offset + u64::from(chunk.len) / 2) as usize] ^= 0x10;
    std::fs::write(&tampered, &bytes).unwrap();
    drop(bytes);

    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    // The header is untouched: it opens.
    let (bad, _) = world.open_model_header(&tampered).unwrap();
    let mut pieces = 0;
    let result = world.generate(&bad, request(&bad, "The three primary colors are", 8), |_| pieces += 1);
    match result {
        Err(NormalError::Secure { code: ErrorCode::Verification, message }) => {
            let names = format!("chunk {index} (layer {layer} of model t.fsm)");
            assert!(message.contains(&names), "the error does not name {names}: {message}");
        }
        other => panic!("a tampered chunk must fail the generation with a verification error: {other:?}"),
    }
    assert_eq!(pieces, 0, "text was delivered before the tampered layer was verified");
    // The load stopped at the chunk: nothing reports it complete.
    if let Some(load) = world.take_pipelined_load() {
        assert!(load.chunks < bad.chunks as usize, "{load:?}");
    }

    // The layers before it are resident; its own was evicted whole (every
    // chunk missing, the verified ones before the tampered chunk included).
    let m = model_status(&mut world, &bad);
    assert!(m.resident_chunks < m.chunks && m.resident_layers < LAYERS, "{m:?}");
    let missing = missing_chunks(&mut world, &bad);
    assert!(missing.contains(&index), "chunk {index} is reported resident");
    let resident_layer = |l: usize| (0..layers.len()).all(|i| layers[i] != Some(l) || !missing.contains(&i));
    for l in 0..layer {
        assert!(resident_layer(l), "layer {l}, before the tampered one, is not resident");
    }
    let of_layer: Vec<usize> = (0..layers.len()).filter(|&i| layers[i] == Some(layer)).collect();
    assert!(of_layer.len() > 1 && of_layer.iter().all(|i| missing.contains(i)), "layer {layer} kept chunks");
    let counted = (0..LAYERS as usize).filter(|&l| resident_layer(l)).count() as u32;
    assert_eq!(m.resident_layers, counted, "status and MissingChunks disagree: {m:?}");
    assert_eq!(m.resident_chunks as usize, layers.len() - missing.len(), "{m:?}");
    eprintln!(
        "tampered chunk {index} of layer {layer}: {} layers and {} of {} chunks resident afterwards",
        m.resident_layers, m.resident_chunks, m.chunks
    );

    // Asked again, the same chunk fails the same way.
    match world.generate(&bad, request(&bad, "Hello", 4), |_| pieces += 1) {
        Err(NormalError::Secure { code: ErrorCode::Verification, message }) => {
            assert!(message.contains(&format!("chunk {index} ")), "{message}")
        }
        other => panic!("the tampered model generated on the second try: {other:?}"),
    }
    assert_eq!(pieces, 0);

    // The session serves on: status, and the untampered model, opened now
    // and loaded by its first generation, gives the plain tokens.
    assert_eq!(world.status().unwrap().models.len(), 1);
    let (good, _) = world.open_model_header(&s.model).unwrap();
    let prompt = "The three primary colors are";
    assert_eq!(generate(&mut world, &good, prompt, 12), plain_generate(prompt, 12));
    assert_eq!(world.take_pipelined_load().map(|l| l.chunks), Some(good.chunks as usize));
    let m = model_status(&mut world, &good);
    assert_eq!((m.resident_layers, m.resident_chunks), (LAYERS, good.chunks), "{m:?}");
    world.shutdown().unwrap();
}

/// The secure world's own resident memory: its resident set without the
/// pages of the shared buffer it has read ciphertext from (shared memory that
/// the normal world owns; a pipelined load maps up to one batch of each half
/// into the secure world, which `resident_bytes` alone would count).
fn own_resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = |field: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in {status}"));
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let rss = resident_bytes(pid).unwrap();
    assert_eq!(rss, kib("VmRSS:") * 1024);
    rss - kib("RssShmem:") * 1024
}

#[test]
fn a_recall_during_a_pipelined_load_completes_cleanly_and_memory_drops() {
    /// Granules each recall asks for, and the most recalls sent.
    const ASK: u32 = 4;
    const MOST: usize = 25;
    /// Free granules granted ahead beyond the weights: the KV cache and the
    /// activations take theirs from these, and more than the recalls can
    /// take remain, so that none of them has to evict anything.
    const SPARE: u32 = 320;
    let s = sealed();
    // A long prompt: each layer's prefill takes a while, during which the
    // secure world sends nothing and the normal world serves recalls.
    let prompt = "The lighthouse keeper counted the ships that passed the rocks each night. ".repeat(34);
    let expected = plain_generate(&prompt, 16);
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let granule = world.info().granule_size;
    let (model, _) = world.open_model_header(&s.model).unwrap();
    let run = tempfile::tempdir().unwrap();
    let socket = world.listen(&run.path().join("run")).unwrap();
    let ahead = u64::from(model.granules_needed + SPARE);
    assert_eq!(world.grant(ahead).unwrap(), ahead);
    let granted = world.granted();
    let own_before = own_resident_bytes(world.pid());

    // `flexserve recall` clients, one after another, while the generation runs.
    let done = Arc::new(AtomicBool::new(false));
    let asker = {
        let (done, socket) = (done.clone(), socket.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut answers = Vec::new();
            while !done.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(2) && answers.len() < MOST {
                let answer = request_recall(&socket, RecallAmount::Granules(ASK), Duration::from_secs(20));
                answers.push((Instant::now(), answer));
            }
            answers
        })
    };
    let t0 = Instant::now();
    let mut text = String::new();
    let mut first_token = None;
    let report = world
        .generate(&model, request(&model, &prompt, 16), |t| {
            first_token.get_or_insert_with(Instant::now);
            text.push_str(t)
        })
        .unwrap();
    let generated = t0.elapsed();
    assert_eq!(text, expected, "recalls during the generation changed the tokens");
    assert!(report.prompt_tokens > 400, "{report:?}");
    let load = world.take_pipelined_load().expect("the generation loaded the model");
    assert_eq!(load.chunks, model.chunks as usize, "{load:?}");
    // The load completed though recalls ran: every layer is resident.
    let m = model_status(&mut world, &model);
    assert_eq!((m.resident_layers, m.resident_chunks), (LAYERS, model.chunks), "{m:?}");

    // A client still waiting is served now, between requests.
    done.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !asker.is_finished() {
        assert!(Instant::now() < deadline, "a recall client was never answered");
        world.serve_control().unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let answers = asker.join().unwrap();
    let first_token = first_token.expect("tokens came");
    let recalls = world.take_recalls();
    assert_eq!(recalls.len(), answers.len(), "{recalls:?}");
    let during = recalls.iter().filter(|r| r.during_generation).count();
    // Answered before `t0 + load.total`, so before the load's last answer
    // (the load starts after t0): certainly during the load.
    let during_load = answers.iter().filter(|(at, _)| *at < t0 + load.total).count();
    let before_first_token = answers.iter().filter(|(at, _)| *at < first_token).count();
    eprintln!(
        "{} recalls: {during} during the generation ({:.0} ms), {during_load} of them certainly during the load \
         ({:.0} ms), {before_first_token} before the first token ({:.0} ms)",
        answers.len(),
        generated.as_secs_f64() * 1e3,
        load.total.as_secs_f64() * 1e3,
        (first_token - t0).as_secs_f64() * 1e3
    );
    assert!(during > 0 && before_first_token > 0, "no recall was served during the prefill: {recalls:?}");
    // Free granules were there all along: each recall got what it asked,
    // and none evicted anything (during the generation only free granules go).
    for (r, (_, a)) in recalls.iter().zip(&answers) {
        let a = a.as_ref().unwrap_or_else(|e| panic!("a recall failed: {e}"));
        assert!(r.by_client, "{r:?}");
        assert_eq!((r.requested, r.released, r.evicted), (ASK, ASK, 0), "{r:?}");
        assert_eq!((a.released, a.evicted, a.granule_size, a.secure_pid), (ASK, 0, granule, world.pid()), "{a:?}");
    }
    let released: u64 = recalls.iter().map(|r| u64::from(r.released)).sum();
    assert_eq!(world.granted(), granted - released);
    let st = world.status().unwrap();
    assert_eq!(u64::from(st.granted), world.granted(), "the two worlds agree on what is granted: {st:?}");
    // The generation itself may touch a little more secure heap (its text,
    // its buffers) meanwhile: up to 1 MiB of that is allowed for.
    let dropped = own_before.saturating_sub(own_resident_bytes(world.pid()));
    assert!(
        dropped as f64 >= 0.9 * (released * granule) as f64 - (1 << 20) as f64,
        "resident memory fell by {dropped} bytes after {released} granules of {granule} went back"
    );

    // A recall between requests evicts layers too (all the free granules,
    // then half of those in use); the next generation loads them again
    // through the pipeline and answers the same.
    let want = (st.granted - st.in_use) + st.in_use / 2;
    let own_before = own_resident_bytes(world.pid());
    let (released, evicted, _) = world.recall(want).unwrap();
    assert_eq!(released, want);
    assert!(evicted > 0);
    let m = model_status(&mut world, &model);
    assert!(m.resident_layers < LAYERS && m.resident_chunks < m.chunks, "{m:?}");
    let dropped = own_before.saturating_sub(own_resident_bytes(world.pid()));
    assert!(
        dropped as f64 >= 0.9 * (u64::from(released) * granule) as f64,
        "resident memory fell by {dropped} bytes after {released} granules of {granule} went back"
    );
    let evicted_chunks = (m.chunks - m.resident_chunks) as usize;
    assert_eq!(generate(&mut world, &model, &prompt, 16), expected, "after layers were evicted");
    let reload = world.take_pipelined_load().expect("the evicted layers were loaded by the generation");
    assert_eq!(reload.chunks, evicted_chunks, "{reload:?}");
    let m = model_status(&mut world, &model);
    assert_eq!((m.resident_layers, m.resident_chunks), (LAYERS, model.chunks), "{m:?}");
    world.shutdown().unwrap();
}

/// A recall that reaches the secure world while the base group (embeddings,
/// output) of a pipelined load is still loading must leave the granules that
/// admission counted for the request's KV cache and activations: the
/// generation was admitted (`LoadNeeded`: "its memory is there"), so it must
/// not come back with `MemoryNeeded` once the chunks stream, which the relay
/// cannot take (it is mid-stream). Spoken by hand, so that the recall
/// arrives there for certain (the relay sends one there only when the secure
/// world is silent for 50 ms, as when decrypting a batch is that slow).
#[test]
fn a_recall_while_the_base_group_loads_leaves_what_the_admitted_request_needs() {
    use flexserve_protocol::{read_reply, write_request, BufferRange};
    let s = sealed();
    let common::RawWithModel { mut raw, refs, header_len } = common::raw_world_with_model(&s, Duration::from_secs(20));
    let mut socket = raw.socket.try_clone().unwrap();
    let mut send = |request: &Request| write_request(&mut socket, request).unwrap();
    let mut reader = raw.socket.try_clone().unwrap();
    let mut next = || read_reply(&mut reader).unwrap();

    send(&Request::Hello { version: flexserve_protocol::PROTOCOL_VERSION });
    assert!(matches!(next(), Reply::Hello { .. }));
    send(&Request::OpenModel { name: "m.fsm".into(), header: BufferRange { offset: 0, len: header_len } });
    let Reply::ModelOpened { model, .. } = next() else { panic!("OpenModel") };
    let g = request_to(model, "The three primary colors are", 4);
    // Admission: what is missing, granted exactly.
    send(&Request::Generate(g.clone()));
    let Reply::MemoryNeeded { granules } = next() else { panic!("the first Generate asks for memory") };
    send(&Request::Grant { granules });
    assert!(matches!(next(), Reply::Granted { .. }));
    send(&Request::Generate(g));
    let order: Vec<u32> = match next() {
        Reply::LoadNeeded { chunks } => chunks.iter().flat_map(|s| s.start..s.end).collect(),
        other => panic!("admitted, the generation asks for its chunks: {other:?}"),
    };
    assert_eq!(order.len(), refs.len());
    // A recall before any chunk: nothing is free beyond what the request needs.
    send(&Request::Recall { granules: u32::MAX });
    let recalled = next();
    let mut replies = Vec::new();
    for batch in order.chunks(32) {
        send(&Request::LoadChunks { model, chunks: batch.iter().map(|&i| refs[i as usize]).collect() });
        loop {
            let reply = next();
            let loaded = matches!(reply, Reply::ChunksLoaded { .. });
            replies.push(reply);
            if loaded {
                break;
            }
        }
    }
    let end = |r: &Reply| !matches!(r, Reply::ChunksLoaded { .. } | Reply::Token { .. });
    while !replies.iter().any(end) {
        replies.push(next());
    }
    let ends: Vec<&Reply> = replies.iter().filter(|r| end(r)).collect();
    assert!(matches!(ends.as_slice(), [Reply::Generated(_)]), "after LoadNeeded and {recalled:?}: {ends:?}");
    assert!(matches!(recalled, Reply::Recalled { released: 0, evicted: 0, .. }), "{recalled:?}");
    // The peer goes away: the secure world ends cleanly.
    raw.socket.shutdown(std::net::Shutdown::Both).unwrap();
    let status = raw.child.wait().unwrap();
    assert!(status.success(), "{status}");
}

#[test]
fn after_a_recall_of_the_last_layers_a_request_computes_the_first_while_they_reload() {
    let s = sealed();
    let prompt = "The three primary colors are";
    let expected = plain_generate(prompt, 12);
    let header = sealed_header(&s.model);
    let layer_of = chunk_layers(&header);
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model_header(&s.model).unwrap();
    assert_eq!(generate(&mut world, &model, prompt, 12), expected);

    // Take memory back a little at a time until the last layers are gone:
    // free granules first, then layers from the last.
    let mut resident = LAYERS;
    for _ in 0..200 {
        world.recall(8).unwrap();
        resident = model_status(&mut world, &model).resident_layers;
        if resident <= LAYERS - 4 {
            break;
        }
    }
    assert!((1..=LAYERS - 4).contains(&resident), "{resident} layers resident");
    let missing = missing_chunks(&mut world, &model);
    let missing_layers: BTreeSet<Option<usize>> = missing.iter().map(|&c| layer_of[c]).collect();
    let evicted: BTreeSet<Option<usize>> = (resident as usize..LAYERS as usize).map(Some).collect();
    assert_eq!(missing_layers, evicted, "the last layers go first, the base group last");

    // The same tokens; the resident layers were not loaded again, the
    // evicted ones were, and the first layer computed before the last one
    // had finished reloading.
    let mut text = String::new();
    let report = world.generate(&model, request(&model, prompt, 12), |t| text.push_str(t)).unwrap();
    assert_eq!(text, expected);
    let load = world.take_pipelined_load().expect("the evicted layers reload through the pipeline");
    assert_eq!(load.chunks, missing.len());
    let timing = |layer: u32| *report.layers.iter().find(|l| l.layer == layer).unwrap();
    for l in 0..resident {
        assert_eq!(timing(l).decrypt_micros, 0, "layer {l} was resident: {:?}", timing(l));
    }
    for l in resident..LAYERS {
        assert!(timing(l).decrypt_micros > 0 && timing(l).decrypt_to > 0, "layer {l}: {:?}", timing(l));
    }
    assert_eq!(timing(LAYERS).decrypt_micros, 0, "the base group stayed resident");
    let first_compute = timing(0).compute_from;
    let last_reloaded = timing(LAYERS - 1).decrypt_to;
    assert!(first_compute > 0 && first_compute < last_reloaded, "{:?} {:?}", timing(0), timing(LAYERS - 1));
    // Each layer computes once its own chunks are verified.
    for l in resident..LAYERS {
        assert!(timing(l).compute_from >= timing(l).decrypt_to, "layer {l}: {:?}", timing(l));
    }
    assert_eq!(model_status(&mut world, &model).resident_layers, LAYERS);
    world.shutdown().unwrap();
}

#[test]
fn a_model_file_that_fails_mid_load_ends_the_request_and_leaves_the_session_ready() {
    let s = sealed();
    let prompt = "The three primary colors are";
    let expected = plain_generate(prompt, 8);
    // A copy of the sealed file, cut short in the middle of its chunks once
    // it is open (the header is read at open; the chunks as they stream).
    let cut = s.dir.path().join("cut.fsm");
    std::fs::copy(&s.model, &cut).unwrap();
    let mut world = SecureWorld::spawn(&options(&s)).unwrap();
    let (model, _) = world.open_model_header(&cut).unwrap();
    let len = std::fs::metadata(&cut).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&cut).unwrap().set_len(len / 2).unwrap();
    let mut pieces = 0;
    let e = world.generate(&model, request(&model, prompt, 8), |_| pieces += 1).unwrap_err();
    assert!(matches!(&e, NormalError::Model { path, message } if path == &cut && message.contains("chunk")), "{e}");
    assert_eq!(pieces, 0);
    // The session is ready for the next request: the intact model answers.
    let (good, _) = world.open_model_header(&s.model).unwrap();
    assert_eq!(generate(&mut world, &good, prompt, 8), expected);
    assert!(world.status().is_ok());
    world.shutdown().unwrap();
}
