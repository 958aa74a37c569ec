//! Round trips, every decoding bound, stream behaviour and fuzzing of the codec.

use std::io::{self, Cursor};

use flexserve_protocol::{
    decode_reply, decode_request, encode_reply, encode_request, read_reply, read_request, write_reply, write_request,
    BufferRange, ChunkRef, ChunkSpan, Deployment, ErrorCode, GenerateRequest, GenerationReport, Input, LayerTiming,
    Message, ModelStatus, ProtocolError, Reply, Request, Sampling, StatusReport, StopReason, StreamStep, MAX_FRAME_LEN,
    MAX_LIST_LEN, MAX_TEXT_LEN, PROTOCOL_VERSION,
};
use rand::{Rng, SeedableRng};

fn sampling() -> Sampling {
    Sampling {
        temperature: 0.7,
        top_k: 40,
        top_p: 0.95,
        min_p: 0.05,
        repeat_penalty: 1.1,
        repeat_last_n: 64,
        seed: 0xdead_beef_cafe_f00d,
    }
}

fn generate(input: Input, stop: Vec<String>) -> Request {
    Request::Generate(GenerateRequest {
        model: 3,
        conversation: 7,
        input,
        max_tokens: 128,
        n_ctx: 0,
        sampling: sampling(),
        stop,
    })
}

fn all_requests() -> Vec<Request> {
    vec![
        Request::Hello { version: PROTOCOL_VERSION },
        Request::Hello { version: u16::MAX },
        Request::OpenModel { name: "smol".into(), header: BufferRange { offset: 0, len: 4096 } },
        Request::OpenModel { name: String::new(), header: BufferRange { offset: u64::MAX, len: u64::MAX } },
        Request::Grant { granules: 0 },
        Request::Grant { granules: u32::MAX },
        Request::LoadChunks { model: 1, chunks: vec![] },
        Request::LoadChunks {
            model: 1,
            chunks: vec![
                ChunkRef { index: 0, at: BufferRange { offset: 0, len: 10 } },
                ChunkRef { index: u32::MAX, at: BufferRange { offset: 1 << 40, len: 1 } },
            ],
        },
        Request::MissingChunks { model: 9 },
        generate(Input::Raw { text: "Once upon a time".into() }, vec![]),
        generate(Input::Raw { text: String::new() }, vec![String::new(), "\n\n".into(), "ünïcødé 🦀".into()]),
        generate(Input::ChatTurn { system: None, user: "hi".into() }, vec!["</s>".into()]),
        generate(Input::ChatTurn { system: Some(String::new()), user: String::new() }, vec![]),
        generate(Input::ChatTurn { system: Some("be brief".into()), user: "what is 2+2?".into() }, vec![]),
        Request::Generate(GenerateRequest {
            model: u32::MAX,
            conversation: 0,
            input: Input::Raw { text: "x".into() },
            max_tokens: u32::MAX,
            n_ctx: u32::MAX,
            sampling: Sampling {
                temperature: 0.0,
                top_k: 0,
                top_p: f32::INFINITY,
                min_p: -0.0,
                repeat_penalty: f32::MIN_POSITIVE,
                repeat_last_n: u32::MAX,
                seed: u64::MAX,
            },
            stop: vec![],
        }),
        Request::EndConversation { model: 1, conversation: 2 },
        Request::Unload { model: 4 },
        Request::Recall { granules: 12 },
        Request::Evict { model: 2, granules: 40 },
        Request::Pause,
        Request::Resume,
        Request::Status,
        Request::Shutdown,
        Request::DevicePublicKey,
        Request::ImportKey { key: "00".repeat(32) },
        Request::AddStoredKey { stored: "ff".repeat(68) },
        Request::Cancel,
        Request::Identity,
        Request::OpenEncrypted { model: 3, handshake: vec![7; 48] },
        Request::GenerateEncrypted { session: u64::MAX, n_ctx: 512, message: (0..=255).collect() },
        Request::GenerateEncrypted { session: 1, n_ctx: 0, message: Vec::new() },
        Request::CloseEncrypted { session: 0x0123_4567_89ab_cdef },
        Request::StartStream {
            stream: 7,
            request: GenerateRequest {
                model: 2,
                conversation: 0,
                input: Input::Raw { text: "Once".into() },
                max_tokens: 16,
                n_ctx: 0,
                sampling: Sampling::default(),
                stop: vec!["\n".into()],
            },
        },
        Request::StepStreams { model: u32::MAX },
        Request::EndStream { stream: 0 },
        generate(
            Input::Messages {
                messages: vec![
                    Message { role: "system".into(), content: "Be brief.".into() },
                    Message { role: "user".into(), content: "Hi".into() },
                    Message { role: "assistant".into(), content: String::new() },
                ],
            },
            vec![],
        ),
        generate(Input::Messages { messages: vec![] }, vec![]),
        Request::Perplexity { model: 1, text: "Some text to score.".into(), n_ctx: 512 },
        Request::Perplexity { model: u32::MAX, text: String::new(), n_ctx: 0 },
    ]
}

fn model_status(model: u32, name: &str) -> ModelStatus {
    ModelStatus {
        model,
        name: name.into(),
        layers: 30,
        resident_layers: 12,
        chunks: 31,
        resident_chunks: 13,
        weight_bytes: 90_000_000,
        kv_granules: 3,
    }
}

fn all_replies() -> Vec<Reply> {
    vec![
        Reply::Hello {
            version: PROTOCOL_VERSION,
            protection: "memfd_secret".into(),
            pool_mode: "flexible".into(),
            granule_size: 2 << 20,
        },
        Reply::Hello { version: 0, protection: String::new(), pool_mode: String::new(), granule_size: u64::MAX },
        Reply::ModelOpened { model: 1, chunks: 31, granules_needed: 45 },
        Reply::Granted { granted: 10, prepared: 4, micros: 1234 },
        Reply::ChunksLoaded { loaded: 0 },
        Reply::Missing { chunks: vec![] },
        Reply::Missing { chunks: vec![ChunkSpan { start: 0, end: 3 }, ChunkSpan { start: 7, end: u32::MAX }] },
        Reply::Token { text: " world".into() },
        Reply::Token { text: String::new() },
        Reply::Generated(GenerationReport {
            prompt_tokens: 12,
            cached_tokens: 0,
            generated_tokens: 40,
            prefill_micros: 5000,
            decode_micros: 400_000,
            layers: vec![
                LayerTiming {
                    layer: 0,
                    decrypt_from: 10,
                    decrypt_to: 900,
                    decrypt_micros: 700,
                    compute_from: 950,
                    compute_to: 1200,
                },
                LayerTiming { layer: 1, ..LayerTiming::default() },
            ],
            stop: StopReason::EndOfGeneration,
        }),
        Reply::Generated(GenerationReport {
            prompt_tokens: u32::MAX,
            cached_tokens: u32::MAX,
            generated_tokens: u32::MAX,
            prefill_micros: u64::MAX,
            decode_micros: u64::MAX,
            layers: vec![LayerTiming {
                layer: u32::MAX,
                decrypt_from: u64::MAX,
                decrypt_to: u64::MAX,
                decrypt_micros: u64::MAX,
                compute_from: u64::MAX,
                compute_to: u64::MAX,
            }],
            stop: StopReason::MaxTokens,
        }),
        Reply::Generated(GenerationReport {
            prompt_tokens: 1,
            cached_tokens: 1,
            generated_tokens: 1,
            prefill_micros: 1,
            decode_micros: 1,
            layers: vec![],
            stop: StopReason::StopString,
        }),
        Reply::Generated(GenerationReport {
            prompt_tokens: 1,
            cached_tokens: 1,
            generated_tokens: 1,
            prefill_micros: 1,
            decode_micros: 1,
            layers: vec![],
            stop: StopReason::ContextFull,
        }),
        Reply::Recalled { released: 8, evicted: 3, micros: 99 },
        Reply::Evicted { freed: 41, groups: 2, micros: 77 },
        Reply::Paused { scrubbed: true },
        Reply::Paused { scrubbed: false },
        Reply::Stepped { streams: vec![] },
        Reply::Stepped {
            streams: vec![
                StreamStep { stream: 1, text: "é".into(), finished: None },
                StreamStep {
                    stream: 4,
                    text: String::new(),
                    finished: Some(GenerationReport {
                        prompt_tokens: 9,
                        cached_tokens: 0,
                        generated_tokens: 3,
                        prefill_micros: 10,
                        decode_micros: 20,
                        layers: vec![],
                        stop: StopReason::MaxTokens,
                    }),
                },
            ],
        },
        Reply::Status(StatusReport {
            deployment: Deployment::Service,
            secure_uid: 998,
            ptrace_scope: "1".into(),
            lockdown: "none".into(),
            policy: vec!["protection = memfd_secret".into(), "allow_perplexity = false".into()],
            warnings: vec!["root can inject code".into()],
            protection: "locked-anonymous".into(),
            pool_mode: "static-carve-out".into(),
            granule_size: 1 << 21,
            granted: 64,
            prepared: 32,
            in_use: 30,
            heap_bytes: 1 << 24,
            heap_allocated: 5 << 20,
            heap_peak: 5 << 30,
            models: vec![],
        }),
        Reply::Status(StatusReport {
            deployment: Deployment::Development,
            secure_uid: 0,
            ptrace_scope: "absent".into(),
            lockdown: "absent".into(),
            policy: vec![],
            warnings: vec![],
            protection: "memfd_secret".into(),
            pool_mode: "flexible".into(),
            granule_size: 1 << 21,
            granted: 64,
            prepared: 32,
            in_use: 30,
            heap_bytes: 1 << 24,
            heap_allocated: 5 << 20,
            heap_peak: 5 << 30,
            models: vec![model_status(1, "planner"), model_status(2, "")],
        }),
        Reply::Ok,
        Reply::Perplexity { tokens: 5120, chunks: 10, ppl: 14.934_2, ppl_err: 0.145_6 },
        Reply::Perplexity { tokens: 0, chunks: 0, ppl: f64::MAX, ppl_err: f64::INFINITY },
        Reply::MemoryNeeded { granules: 17 },
        Reply::DevicePublicKey { key: "ab".repeat(32) },
        Reply::KeyImported { stored: "cd".repeat(68) },
        Reply::Identity { report: "{\"a\":1}".into(), signature: "ef".repeat(64) },
        Reply::EncryptedOpened { session: 42, handshake: vec![1; 48] },
        Reply::Sealed { record: vec![0xA5; 80] },
        Reply::Error { code: ErrorCode::EncryptedSession, message: "ended".into() },
        Reply::Error { code: ErrorCode::Malformed, message: "bad".into() },
        Reply::Error { code: ErrorCode::OutOfOrder, message: String::new() },
        Reply::Error { code: ErrorCode::Version, message: "v".into() },
        Reply::Error { code: ErrorCode::NoSuchModel, message: "m".into() },
        Reply::Error { code: ErrorCode::Verification, message: "tag mismatch".into() },
        Reply::Error { code: ErrorCode::NoMemory, message: "n".into() },
        Reply::Error { code: ErrorCode::NotResident, message: "r".into() },
        Reply::Error { code: ErrorCode::BadArgument, message: "a".into() },
        Reply::Error { code: ErrorCode::Engine, message: "e".into() },
        Reply::Error { code: ErrorCode::Internal, message: "i".into() },
        Reply::LoadNeeded { chunks: vec![] },
        Reply::LoadNeeded { chunks: vec![ChunkSpan { start: 9, end: 12 }, ChunkSpan { start: 0, end: 9 }] },
    ]
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

fn malformed_what(err: ProtocolError) -> String {
    assert!(err.stream_usable(), "{err}");
    match err {
        ProtocolError::Malformed { what } => what,
        other => panic!("expected Malformed, got {other:?}"),
    }
}

fn oversized_what(err: ProtocolError) -> String {
    assert!(err.stream_usable(), "{err}");
    match err {
        ProtocolError::Oversized { what } => what,
        other => panic!("expected Oversized, got {other:?}"),
    }
}

#[test]
fn every_request_round_trips_through_bytes_and_stream() {
    let mut stream = Vec::new();
    for request in all_requests() {
        let payload = encode_request(&request).unwrap();
        assert_eq!(decode_request(&payload).unwrap(), request);
        write_request(&mut stream, &request).unwrap();
    }
    let mut reader = Cursor::new(stream);
    for request in all_requests() {
        assert_eq!(read_request(&mut reader).unwrap(), request);
    }
    assert!(matches!(read_request(&mut reader), Err(ProtocolError::Closed)));
}

#[test]
fn every_reply_round_trips_through_bytes_and_stream() {
    let mut stream = Vec::new();
    for reply in all_replies() {
        let payload = encode_reply(&reply).unwrap();
        assert_eq!(decode_reply(&payload).unwrap(), reply);
        write_reply(&mut stream, &reply).unwrap();
    }
    let mut reader = Cursor::new(stream);
    for reply in all_replies() {
        assert_eq!(read_reply(&mut reader).unwrap(), reply);
    }
    assert!(matches!(read_reply(&mut reader), Err(ProtocolError::Closed)));
}

#[test]
fn layout_matches_the_documented_format() {
    let payload = encode_request(&Request::Grant { granules: 0x0102_0304 }).unwrap();
    assert_eq!(payload, [0x03, 0x04, 0x03, 0x02, 0x01]);
    let payload =
        encode_request(&Request::OpenModel { name: "ab".into(), header: BufferRange { offset: 1, len: 2 } }).unwrap();
    assert_eq!(payload, [0x02, 2, 0, 0, 0, b'a', b'b', 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
    let mut stream = Vec::new();
    write_reply(&mut stream, &Reply::Ok).unwrap();
    assert_eq!(stream, [1, 0, 0, 0, 0x8a]);
    let payload = encode_reply(&Reply::Error { code: ErrorCode::Internal, message: "x".into() }).unwrap();
    assert_eq!(payload, [0x8b, 9, 1, 0, 0, 0, b'x']);
}

#[test]
fn float_bits_are_kept_exactly() {
    let mut request = generate(Input::Raw { text: "t".into() }, vec![]);
    let Request::Generate(g) = &mut request else { unreachable!() };
    g.sampling.temperature = f32::from_bits(0x7fc0_1234); // a NaN with a payload
    g.sampling.min_p = -0.0;
    let payload = encode_request(&request).unwrap();
    let Request::Generate(back) = decode_request(&payload).unwrap() else { panic!("not Generate") };
    assert_eq!(back.sampling.temperature.to_bits(), 0x7fc0_1234);
    assert_eq!(back.sampling.min_p.to_bits(), (-0.0f32).to_bits());
}

#[test]
fn longest_string_and_list_round_trip() {
    let long = "é".repeat(MAX_TEXT_LEN / 2);
    assert_eq!(long.len(), MAX_TEXT_LEN);
    let request = generate(Input::Raw { text: long }, vec![]);
    assert_eq!(decode_request(&encode_request(&request).unwrap()).unwrap(), request);

    let request = generate(Input::Raw { text: String::new() }, vec![String::new(); MAX_LIST_LEN]);
    assert_eq!(decode_request(&encode_request(&request).unwrap()).unwrap(), request);

    let chunks = vec![ChunkSpan { start: 1, end: 2 }; MAX_LIST_LEN];
    let reply = Reply::Missing { chunks };
    assert_eq!(decode_reply(&encode_reply(&reply).unwrap()).unwrap(), reply);
}

#[test]
fn encoding_refuses_what_the_peer_would_reject() {
    let request = generate(Input::Raw { text: "a".repeat(MAX_TEXT_LEN + 1) }, vec![]);
    let what = oversized_what(write_request(&mut Vec::new(), &request).unwrap_err());
    assert!(what.contains("GenerateRequest.input.text"), "{what}");

    let request = generate(Input::Raw { text: String::new() }, vec![String::new(); MAX_LIST_LEN + 1]);
    let what = oversized_what(encode_request(&request).unwrap_err());
    assert!(what.contains("GenerateRequest.stop") && what.contains("65537"), "{what}");

    // Two strings within the text limit that together exceed the frame limit.
    let half = "b".repeat(MAX_TEXT_LEN);
    let request = generate(Input::ChatTurn { system: Some(half.clone()), user: half }, vec![]);
    let mut sink = Vec::new();
    let what = oversized_what(write_request(&mut sink, &request).unwrap_err());
    assert!(what.contains("GenerateRequest.input.user") && what.contains("frame limit"), "{what}");
    assert!(sink.is_empty(), "nothing may be written for an oversized message");
}

#[test]
fn oversized_frame_length_is_too_large_and_ends_the_stream() {
    let mut bytes = ((MAX_FRAME_LEN + 1) as u32).to_le_bytes().to_vec();
    bytes.extend_from_slice(&[0x0a; 16]);
    let err = read_request(&mut Cursor::new(&bytes)).unwrap_err();
    assert!(!err.stream_usable());
    match err {
        ProtocolError::TooLarge { len, max } => assert_eq!((len, max), (MAX_FRAME_LEN + 1, MAX_FRAME_LEN)),
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let err = read_reply(&mut Cursor::new(u32::MAX.to_le_bytes())).unwrap_err();
    assert!(matches!(err, ProtocolError::TooLarge { len, .. } if len == u32::MAX as usize), "{err:?}");
    // A frame of exactly the limit is read (and here rejected only for its contents).
    let mut bytes = (MAX_FRAME_LEN as u32).to_le_bytes().to_vec();
    bytes.resize(4 + MAX_FRAME_LEN, 0);
    let what = malformed_what(read_request(&mut Cursor::new(&bytes)).unwrap_err());
    assert_eq!(what, "unknown Request tag 0x00");
}

#[test]
fn string_longer_than_the_limit_is_malformed() {
    let mut payload = vec![0x86];
    payload.extend_from_slice(&((MAX_TEXT_LEN + 1) as u32).to_le_bytes());
    payload.resize(payload.len() + MAX_TEXT_LEN + 1, b'a');
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(
        what,
        format!("Reply::Token.text: length {} exceeds the limit of {MAX_TEXT_LEN} bytes", MAX_TEXT_LEN + 1)
    );
}

#[test]
fn string_longer_than_the_frame_is_malformed() {
    let mut payload = vec![0x86];
    payload.extend_from_slice(&10u32.to_le_bytes());
    payload.extend_from_slice(b"abc");
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(what, "Reply::Token.text: length 10 exceeds the 3 bytes left");
}

#[test]
fn list_counts_are_bounded_by_the_limit_and_the_frame() {
    let mut payload = vec![0x85];
    payload.extend_from_slice(&((MAX_LIST_LEN + 1) as u32).to_le_bytes());
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(
        what,
        format!("Reply::Missing.chunks: {} elements exceed the limit of {MAX_LIST_LEN}", MAX_LIST_LEN + 1)
    );

    // Within the limit but more than the frame could hold: rejected before allocating.
    let mut payload = vec![0x85];
    payload.extend_from_slice(&(MAX_LIST_LEN as u32).to_le_bytes());
    payload.extend_from_slice(&[0; 16]);
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(what, format!("Reply::Missing.chunks: {MAX_LIST_LEN} elements cannot fit in the 16 bytes left"));

    let mut payload = vec![0x04, 1, 0, 0, 0];
    payload.extend_from_slice(&2u32.to_le_bytes());
    payload.extend_from_slice(&[0; 39]);
    let what = malformed_what(decode_request(&payload).unwrap_err());
    assert!(what.starts_with("Request::LoadChunks.chunks: 2 elements cannot fit"), "{what}");
}

#[test]
fn bad_tags_are_named() {
    let what = malformed_what(decode_request(&[0x7f]).unwrap_err());
    assert_eq!(what, "unknown Request tag 0x7f");
    // A reply sent where a request is expected, and the other way round.
    let what = malformed_what(decode_request(&encode_reply(&Reply::Ok).unwrap()).unwrap_err());
    assert_eq!(what, "unknown Request tag 0x8a");
    let what = malformed_what(decode_reply(&encode_request(&Request::Status).unwrap()).unwrap_err());
    assert_eq!(what, "unknown Reply tag 0x0a");

    let mut payload = encode_request(&generate(Input::Raw { text: String::new() }, vec![])).unwrap();
    payload[9] = 3; // after tag, model, conversation: the Input tag
    let what = malformed_what(decode_request(&payload).unwrap_err());
    assert_eq!(what, "unknown GenerateRequest.input tag 0x03");

    let what = malformed_what(decode_reply(&[0x8b, 13, 0, 0, 0, 0]).unwrap_err());
    assert_eq!(what, "unknown Reply::Error.code tag 0x0d");

    let mut payload = encode_reply(&all_replies()[9]).unwrap();
    *payload.last_mut().unwrap() = 4;
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(what, "unknown GenerationReport.stop tag 0x04");
}

#[test]
fn option_flag_must_be_zero_or_one() {
    let mut payload = encode_request(&generate(Input::ChatTurn { system: None, user: "u".into() }, vec![])).unwrap();
    assert_eq!(payload[10], 0);
    payload[10] = 2;
    let what = malformed_what(decode_request(&payload).unwrap_err());
    assert_eq!(what, "GenerateRequest.input.system: invalid Option flag 0x02");
}

#[test]
fn boolean_flag_must_be_zero_or_one() {
    let mut payload = encode_reply(&Reply::Paused { scrubbed: true }).unwrap();
    assert_eq!(payload, [0x95, 1]);
    payload[1] = 2;
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(what, "Reply::Paused.scrubbed: invalid flag 0x02");
}

#[test]
fn invalid_utf8_is_named_with_its_position() {
    let request = generate(Input::Raw { text: String::new() }, vec!["a".into(), "b".into(), "abcd".into()]);
    let mut payload = encode_request(&request).unwrap();
    let at = payload.len() - 2;
    payload[at] = 0xff;
    let what = malformed_what(decode_request(&payload).unwrap_err());
    assert_eq!(what, "GenerateRequest.stop[2]: invalid UTF-8 at byte 2");

    let mut reply = encode_reply(&Reply::Status(StatusReport {
        deployment: Deployment::Development,
        secure_uid: 0,
        ptrace_scope: "absent".into(),
        lockdown: "absent".into(),
        policy: vec![],
        warnings: vec![],
        protection: "p".into(),
        pool_mode: "f".into(),
        granule_size: 1,
        granted: 1,
        prepared: 1,
        in_use: 1,
        heap_bytes: 1,
        heap_allocated: 2,
        heap_peak: 3,
        models: vec![model_status(1, "one"), model_status(2, "two")],
    }))
    .unwrap();
    // The second model's name starts 4 + 4 bytes after... find it by content.
    let at = reply.windows(3).position(|w| w == b"two").unwrap();
    reply[at] = 0xc3; // a lead byte followed by a non-continuation byte
    let what = malformed_what(decode_reply(&reply).unwrap_err());
    assert_eq!(what, "StatusReport.models[1].name: invalid UTF-8 at byte 0");
}

#[test]
fn truncated_payloads_are_malformed() {
    let payload = encode_request(&generate(Input::Raw { text: "hello".into() }, vec!["x".into()])).unwrap();
    for cut in 0..payload.len() {
        let err = decode_request(&payload[..cut]).unwrap_err();
        let what = malformed_what(err);
        assert!(what.contains("truncated") || what.contains("bytes left"), "cut {cut}: {what}");
    }
    assert_eq!(malformed_what(decode_request(&[]).unwrap_err()), "Request tag: truncated (needs 1 bytes, 0 left)");
    let what = malformed_what(decode_reply(&[0x8a + 1, 5]).unwrap_err());
    assert_eq!(what, "Reply::Error.message length: truncated (needs 4 bytes, 0 left)");
}

#[test]
fn trailing_bytes_are_malformed() {
    let what = malformed_what(decode_request(&[0x0a, 1, 2, 3]).unwrap_err());
    assert_eq!(what, "trailing 3 bytes after Request::Status");
    let mut payload = encode_reply(&Reply::Token { text: "t".into() }).unwrap();
    payload.push(0);
    let what = malformed_what(decode_reply(&payload).unwrap_err());
    assert_eq!(what, "trailing 1 bytes after Reply::Token");
}

#[test]
fn stream_stays_usable_after_a_malformed_frame() {
    let mut stream = Vec::new();
    stream.extend(frame(&[0x7f, 1, 2]));
    write_request(&mut stream, &Request::Status).unwrap();
    stream.extend(frame(&[0x0b, 0]));
    stream.extend(frame(&[0x03, 1]));
    write_request(&mut stream, &Request::Grant { granules: 5 }).unwrap();

    let mut reader = Cursor::new(stream);
    assert_eq!(malformed_what(read_request(&mut reader).unwrap_err()), "unknown Request tag 0x7f");
    assert_eq!(read_request(&mut reader).unwrap(), Request::Status);
    assert_eq!(malformed_what(read_request(&mut reader).unwrap_err()), "trailing 1 bytes after Request::Shutdown");
    let what = malformed_what(read_request(&mut reader).unwrap_err());
    assert_eq!(what, "Request::Grant.granules: truncated (needs 4 bytes, 1 left)");
    assert_eq!(read_request(&mut reader).unwrap(), Request::Grant { granules: 5 });
    assert!(matches!(read_request(&mut reader), Err(ProtocolError::Closed)));
}

#[test]
fn end_of_stream_inside_a_frame_is_an_io_error() {
    let mut full = Vec::new();
    write_reply(&mut full, &Reply::Token { text: "hello".into() }).unwrap();
    for cut in 1..full.len() {
        let err = read_reply(&mut Cursor::new(&full[..cut])).unwrap_err();
        assert!(!err.stream_usable());
        match err {
            ProtocolError::Io(e) => assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut {cut}"),
            other => panic!("cut {cut}: expected Io(UnexpectedEof), got {other:?}"),
        }
    }
    assert!(matches!(read_reply(&mut Cursor::new(&[][..])), Err(ProtocolError::Closed)));
    assert!(!ProtocolError::Closed.stream_usable());
}

/// Reads in pieces of at most 3 bytes, with interruptions, like a slow socket.
struct Trickle<'a> {
    bytes: &'a [u8],
    interrupt: bool,
}

impl io::Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.interrupt = !self.interrupt;
        if self.interrupt {
            return Err(io::Error::from(io::ErrorKind::Interrupted));
        }
        let n = buf.len().min(self.bytes.len()).min(3);
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

#[test]
fn short_reads_and_interruptions_are_handled() {
    let mut stream = Vec::new();
    for reply in all_replies() {
        write_reply(&mut stream, &reply).unwrap();
    }
    let mut reader = Trickle { bytes: &stream, interrupt: false };
    for reply in all_replies() {
        assert_eq!(read_reply(&mut reader).unwrap(), reply);
    }
    assert!(matches!(read_reply(&mut reader), Err(ProtocolError::Closed)));
}

/// Anything that decodes must re-encode to the same bytes (the encoding is canonical).
fn check_request_bytes(bytes: &[u8]) -> bool {
    match decode_request(bytes) {
        Ok(request) => {
            let again = encode_request(&request).expect("a decoded request re-encodes");
            assert_eq!(again, bytes, "re-encoding {request:?}");
            let back = decode_request(&again).expect("a re-encoded request decodes");
            assert_eq!(encode_request(&back).unwrap(), again);
            true
        }
        Err(e) => {
            assert!(matches!(e, ProtocolError::Malformed { .. }), "{e:?}");
            false
        }
    }
}

fn check_reply_bytes(bytes: &[u8]) -> bool {
    match decode_reply(bytes) {
        Ok(reply) => {
            let again = encode_reply(&reply).expect("a decoded reply re-encodes");
            assert_eq!(again, bytes, "re-encoding {reply:?}");
            let back = decode_reply(&again).expect("a re-encoded reply decodes");
            assert_eq!(encode_reply(&back).unwrap(), again);
            true
        }
        Err(e) => {
            assert!(matches!(e, ProtocolError::Malformed { .. }), "{e:?}");
            false
        }
    }
}

#[test]
fn fuzz_random_bytes() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0001);
    let (mut requests_ok, mut replies_ok) = (0, 0);
    for i in 0..20_000 {
        let len = rng.gen_range(0..64);
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // Give most inputs a valid tag and small lengths so that decoding gets past the first byte.
        if !bytes.is_empty() && i % 4 != 0 {
            bytes[0] = if i % 2 == 0 { rng.gen_range(0x01..=0x0b) } else { rng.gen_range(0x81..=0x8b) };
            for b in bytes.iter_mut().skip(1) {
                if rng.gen_bool(0.5) {
                    *b %= 4;
                }
            }
        }
        requests_ok += check_request_bytes(&bytes) as u32;
        replies_ok += check_reply_bytes(&bytes) as u32;
    }
    // Random bytes rarely have exactly the right length; the mutation fuzzer covers the deep paths.
    assert!(requests_ok >= 20 && replies_ok >= 20, "too few random inputs decoded: {requests_ok} / {replies_ok}");
}

fn mutate(rng: &mut impl Rng, valid: &[u8]) -> Vec<u8> {
    let mut bytes = valid.to_vec();
    let edits = if rng.gen_bool(0.5) { 1 } else { rng.gen_range(2..6) };
    for _ in 0..edits {
        match rng.gen_range(0..6) {
            0 | 1 if !bytes.is_empty() => {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] = rng.gen();
            }
            2 if !bytes.is_empty() => {
                let at = rng.gen_range(0..bytes.len());
                bytes[at] ^= 1 << rng.gen_range(0..8);
            }
            3 => {
                let at = rng.gen_range(0..=bytes.len());
                bytes.insert(at, rng.gen());
            }
            4 if !bytes.is_empty() => {
                let at = rng.gen_range(0..bytes.len());
                bytes.remove(at);
            }
            _ => {
                let keep = rng.gen_range(0..=bytes.len());
                bytes.truncate(keep);
            }
        }
    }
    bytes
}

#[test]
fn fuzz_mutated_encodings() {
    let requests: Vec<Vec<u8>> = all_requests().iter().map(|r| encode_request(r).unwrap()).collect();
    let replies: Vec<Vec<u8>> = all_replies().iter().map(|r| encode_reply(r).unwrap()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0002);
    let (mut requests_ok, mut replies_ok) = (0, 0);
    for _ in 0..20_000 {
        let pick = rng.gen_range(0..requests.len());
        let request = mutate(&mut rng, &requests[pick]);
        requests_ok += check_request_bytes(&request) as u32;
        let pick = rng.gen_range(0..replies.len());
        let reply = mutate(&mut rng, &replies[pick]);
        replies_ok += check_reply_bytes(&reply) as u32;
    }
    assert!(requests_ok > 100 && replies_ok > 100, "too few mutations decoded: {requests_ok} / {replies_ok}");
}

#[test]
fn fuzz_streams_of_mutated_frames() {
    // Frames whose payloads are mutated but whose lengths are right: every frame is
    // either decoded or rejected as malformed, and the stream always moves on.
    let requests: Vec<Vec<u8>> = all_requests().iter().map(|r| encode_request(r).unwrap()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0003);
    let mut stream = Vec::new();
    let mut expected = Vec::new();
    for _ in 0..2_000 {
        let pick = rng.gen_range(0..requests.len());
        let payload = mutate(&mut rng, &requests[pick]);
        expected.push(decode_request(&payload).ok());
        stream.extend(frame(&payload));
    }
    let mut reader = Cursor::new(stream);
    for want in expected {
        match (read_request(&mut reader), want) {
            (Ok(got), Some(want)) => assert_eq!(encode_request(&got).unwrap(), encode_request(&want).unwrap()),
            (Err(e), None) => assert!(e.stream_usable(), "{e:?}"),
            (got, want) => panic!("stream and bytes disagree: {got:?} vs {want:?}"),
        }
    }
    assert!(matches!(read_request(&mut reader), Err(ProtocolError::Closed)));
}

/// Sealed bytes (an encrypted session's messages) are bounded by
/// MAX_SEALED_LEN both ways: the longest round-trips, one byte more is
/// refused before sending and malformed on receipt.
#[test]
fn sealed_bytes_are_bounded() {
    use flexserve_protocol::MAX_SEALED_LEN;
    let request = Request::GenerateEncrypted { session: 9, n_ctx: 0, message: vec![0x5a; MAX_SEALED_LEN] };
    assert_eq!(decode_request(&encode_request(&request).unwrap()).unwrap(), request);
    let over = Request::GenerateEncrypted { session: 9, n_ctx: 0, message: vec![0x5a; MAX_SEALED_LEN + 1] };
    let what = oversized_what(encode_request(&over).unwrap_err());
    assert!(
        what.contains("Request::GenerateEncrypted.message") && what.contains(&MAX_SEALED_LEN.to_string()),
        "{what}"
    );
    // A length field past the bound, hand-made: tag 0x92 (Sealed), then the length.
    let mut payload = vec![0x92];
    payload.extend_from_slice(&(MAX_SEALED_LEN as u32 + 1).to_le_bytes());
    let e = decode_reply(&payload).unwrap_err().to_string();
    assert!(e.contains("Reply::Sealed.record") && e.contains("exceeds the limit"), "{e}");
}
