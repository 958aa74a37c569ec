use super::*;
use crate::codec::tests::{every_record, sample_request, Rng};
use crate::types::{ChatMessage, Done, StopReason};
use crate::{RECORD_PADDING, REQUEST_PADDING};

/// A server key pair (snow generates it).
fn server_keys() -> ([u8; 32], [u8; 32]) {
    let keys = Builder::new(NOISE_PARAMS.parse().unwrap()).generate_keypair().unwrap();
    (keys.private.try_into().unwrap(), keys.public.try_into().unwrap())
}

fn connect(secret: &[u8; 32], public: &[u8; 32]) -> (ClientSession, ServerSession) {
    let (handshake, message1) = ClientHandshake::start(public).unwrap();
    assert_eq!(message1.len(), HANDSHAKE_LEN);
    let (server, message2) = respond(secret, &message1).unwrap();
    assert_eq!(message2.len(), HANDSHAKE_LEN);
    (handshake.finish(&message2).unwrap(), server)
}

fn pair() -> (ClientSession, ServerSession) {
    let (secret, public) = server_keys();
    connect(&secret, &public)
}

/// Opens and accepts a request.
fn receive(server: &mut ServerSession, message: &[u8]) -> Result<ChatRequest, E2eError> {
    let opened = server.open_request(message)?;
    server.accept(&opened)?;
    Ok(opened.request.clone())
}

/// The secure world ends the current answer (a done record) and the client
/// reads it, so that the client may send its next request.
fn end_answer(client: &mut ClientSession, server: &mut ServerSession) {
    let done = Done {
        stop: StopReason::EndOfGeneration,
        prompt_tokens: 1,
        generated_tokens: 1,
        prefill_micros: 1,
        decode_micros: 1,
    };
    client.open_record(&server.seal_record(&Record::Done(done)).unwrap()).unwrap();
}

fn large_request() -> ChatRequest {
    let mut request = sample_request();
    // Three Noise messages: over two pieces of 65519 bytes.
    request.messages.push(ChatMessage::new("user", "ü ".repeat(50_000)));
    request
}

#[test]
fn requests_and_records_round_trip_in_order() {
    let (mut client, mut server) = pair();
    for request in [sample_request(), large_request(), sample_request()] {
        let message = client.seal_request(&request).unwrap();
        assert_eq!(receive(&mut server, &message).unwrap(), request);
        for record in every_record() {
            let message = server.seal_record(&record).unwrap();
            assert!(message.len() <= MAX_NOISE_MESSAGE);
            assert_eq!(client.open_record(&message).unwrap(), record);
        }
    }
    assert_eq!(client.recv, server.send);
    assert_eq!(client.send, server.recv);
}

#[test]
fn a_large_request_is_cut_into_full_noise_messages() {
    let (mut client, mut server) = pair();
    let request = large_request();
    let message = client.seal_request(&request).unwrap();
    let plain = codec::encode_request(&request).unwrap().len();
    let pieces = plain.div_ceil(MAX_NOISE_PAYLOAD);
    assert!(pieces >= 2 && plain > MAX_NOISE_PAYLOAD, "{plain} bytes in {pieces} pieces");
    assert_eq!(message.len(), plain + pieces * TAG_LEN);
    let opened = server.open_request(&message).unwrap();
    assert_eq!(opened.pieces(), pieces as u64);
    assert_eq!(opened.request, request);
    server.accept(&opened).unwrap();
    assert_eq!(client.send, pieces as u64);
    assert_eq!(server.recv, pieces as u64);
}

#[test]
fn ciphertext_lengths_are_bucketed() {
    let (mut client, mut server) = pair();
    let mut request_lengths = std::collections::BTreeSet::new();
    let mut record_lengths = std::collections::BTreeSet::new();
    for n in 0..300 {
        let request = ChatRequest::new("m", vec![ChatMessage::new("user", "a".repeat(n))]);
        let message = client.seal_request(&request).unwrap();
        assert_eq!((message.len() - TAG_LEN) % REQUEST_PADDING, 0);
        request_lengths.insert(message.len());
        receive(&mut server, &message).unwrap();
        let message = server.seal_record(&Record::Text("b".repeat(n))).unwrap();
        assert_eq!((message.len() - TAG_LEN) % RECORD_PADDING, 0);
        record_lengths.insert(message.len());
        client.open_record(&message).unwrap();
        end_answer(&mut client, &mut server);
    }
    assert_eq!(request_lengths.into_iter().collect::<Vec<_>>(), [256 + 16, 512 + 16]);
    assert_eq!(record_lengths.into_iter().collect::<Vec<_>>(), [80, 144, 208, 272, 336]);
    // Every done record is as long as the shortest text record.
    let done = Done {
        stop: StopReason::MaxTokens,
        prompt_tokens: 1,
        generated_tokens: 1,
        prefill_micros: 1,
        decode_micros: 1,
    };
    assert_eq!(server.seal_record(&Record::Done(done)).unwrap().len(), 64 + 16);
}

#[test]
fn a_flipped_bit_anywhere_is_refused_and_ends_the_session() {
    let (secret, public) = server_keys();
    let mut rng = Rng(7);
    let request = sample_request();
    let length = connect(&secret, &public).0.seal_request(&request).unwrap().len();
    for i in 0..length {
        let (mut client, mut server) = connect(&secret, &public);
        let mut message = client.seal_request(&request).unwrap();
        message[i] ^= 1 << rng.below(8);
        let e = server.open_request(&message).unwrap_err();
        assert_eq!(e, E2eError::Decrypt { what: "a request", nonce: 0 }, "byte {i}");
        assert!(e.to_string().contains("tampered with, replayed, reordered or dropped"), "{e}");
        // The secure world can still tell the client why (which ends the answer).
        let record = Record::Error { code: 4, message: e.to_string() };
        assert_eq!(client.open_record(&server.seal_record(&record).unwrap()).unwrap(), record);
        // The session is over: the genuine request is refused too, and cannot be accepted.
        let genuine = client.seal_request(&request).unwrap();
        assert!(matches!(server.open_request(&genuine), Err(E2eError::Broken(_))));
        assert!(server.broken().unwrap().contains("tampered"));
    }
    let record = Record::Text("a secret answer".into());
    let length = pair().1.seal_record(&record).unwrap().len();
    for i in 0..length {
        let (mut client, mut server) = connect(&secret, &public);
        let mut message = server.seal_record(&record).unwrap();
        message[i] ^= 1 << rng.below(8);
        assert_eq!(client.open_record(&message).unwrap_err(), E2eError::Decrypt { what: "a record", nonce: 0 });
        let next = server.seal_record(&record).unwrap();
        let e = client.open_record(&next).unwrap_err();
        assert!(matches!(&e, E2eError::Broken(why) if why.contains("tampered")), "{e}");
        assert!(client.broken().is_some());
        assert!(matches!(client.seal_request(&request), Err(E2eError::Broken(_))));
    }
}

#[test]
fn a_tampered_piece_of_a_large_request_is_refused_at_its_nonce() {
    let (secret, public) = server_keys();
    for (at, nonce) in [(10, 0), (MAX_NOISE_MESSAGE + 10, 1), (2 * MAX_NOISE_MESSAGE + 10, 2)] {
        let (mut client, server) = connect(&secret, &public);
        let mut message = client.seal_request(&large_request()).unwrap();
        message[at] ^= 0x80;
        assert_eq!(server.open_request(&message).unwrap_err(), E2eError::Decrypt { what: "a request", nonce });
    }
}

#[test]
fn replayed_reordered_and_dropped_messages_are_refused() {
    // Replay of an earlier request.
    let (mut client, mut server) = pair();
    let first = client.seal_request(&sample_request()).unwrap();
    receive(&mut server, &first).unwrap();
    let e = server.open_request(&first).unwrap_err();
    assert_eq!(e, E2eError::Decrypt { what: "a request", nonce: 1 });

    // Two requests in the wrong order.
    let (mut client, mut server) = pair();
    let a = client.seal_request(&sample_request()).unwrap();
    end_answer(&mut client, &mut server);
    let b = client.seal_request(&large_request()).unwrap();
    assert_eq!(server.open_request(&b).unwrap_err(), E2eError::Decrypt { what: "a request", nonce: 0 });
    assert!(matches!(server.open_request(&a), Err(E2eError::Broken(_))));

    // A large request's pieces in another order.
    let (mut client, server) = pair();
    let message = client.seal_request(&large_request()).unwrap();
    let mut swapped = message[MAX_NOISE_MESSAGE..2 * MAX_NOISE_MESSAGE].to_vec();
    swapped.extend_from_slice(&message[..MAX_NOISE_MESSAGE]);
    swapped.extend_from_slice(&message[2 * MAX_NOISE_MESSAGE..]);
    assert_eq!(server.open_request(&swapped).unwrap_err(), E2eError::Decrypt { what: "a request", nonce: 0 });

    // A dropped record.
    let (mut client, mut server) = pair();
    let r1 = server.seal_record(&Record::Text("one".into())).unwrap();
    let r2 = server.seal_record(&Record::Text("two".into())).unwrap();
    let _ = r1;
    let e = client.open_record(&r2).unwrap_err();
    assert_eq!(e, E2eError::Decrypt { what: "a record", nonce: 0 });
    assert!(e.to_string().contains("dropped"));

    // A replayed record.
    let (mut client, mut server) = pair();
    let r1 = server.seal_record(&Record::Text("one".into())).unwrap();
    client.open_record(&r1).unwrap();
    assert_eq!(client.open_record(&r1).unwrap_err(), E2eError::Decrypt { what: "a record", nonce: 1 });

    // A request spliced with a piece of the next one decrypts piece by piece
    // but is refused by its length.
    let (mut client, mut server) = pair();
    let small = client.seal_request(&sample_request()).unwrap();
    end_answer(&mut client, &mut server);
    let next = client.seal_request(&sample_request()).unwrap();
    let mut spliced = small.clone();
    spliced.extend_from_slice(&next);
    assert!(matches!(server.open_request(&spliced), Err(E2eError::Decrypt { .. } | E2eError::Truncated { .. })));
}

#[test]
fn truncated_messages_are_refused_as_truncated() {
    let length = pair().0.seal_request(&sample_request()).unwrap().len();
    for cut in [1, 15, 16, 17, 256, length - 1, length] {
        let (mut client, server) = pair();
        let message = client.seal_request(&sample_request()).unwrap();
        let e = server.open_request(&message[..message.len() - cut]).unwrap_err();
        assert!(matches!(e, E2eError::Truncated { what: "a request message", .. }), "cut {cut}: {e}");
        assert!(e.to_string().contains("truncated or extended"), "{e}");
    }
    // The last piece of a large request dropped.
    let (mut client, server) = pair();
    let message = client.seal_request(&large_request()).unwrap();
    let e = server.open_request(&message[..2 * MAX_NOISE_MESSAGE]).unwrap_err();
    assert!(matches!(e, E2eError::Truncated { .. }), "{e}");

    for cut in [1, 16, 63] {
        let (mut client, mut server) = pair();
        let message = server.seal_record(&Record::Text("answer".into())).unwrap();
        let e = client.open_record(&message[..message.len() - cut]).unwrap_err();
        assert!(matches!(e, E2eError::Truncated { what: "a record message", .. }), "cut {cut}: {e}");
    }
    // Cut by a whole bucket, the tag no longer verifies.
    let (mut client, mut server) = pair();
    let message = server.seal_record(&Record::Text("a".repeat(100))).unwrap();
    let e = client.open_record(&message[..message.len() - RECORD_PADDING]).unwrap_err();
    assert_eq!(e, E2eError::Decrypt { what: "a record", nonce: 0 });
}

#[test]
fn a_wrong_server_key_fails_the_handshake() {
    let (secret, public) = server_keys();
    let (_, other_public) = server_keys();
    let (_, message1) = ClientHandshake::start(&other_public).unwrap();
    let e = respond(&secret, &message1).unwrap_err();
    assert!(matches!(e, E2eError::Handshake(_)), "{e}");
    assert!(e.to_string().contains("another server key"), "{e}");

    // A message 2 from someone else, tampered or cut.
    let (handshake, message1) = ClientHandshake::start(&public).unwrap();
    let (_, mut message2) = respond(&secret, &message1).unwrap();
    message2[40] ^= 1;
    assert!(matches!(handshake.finish(&message2), Err(E2eError::Handshake(_))));
    let (handshake, message1) = ClientHandshake::start(&public).unwrap();
    let (_, message2) = respond(&secret, &message1).unwrap();
    assert!(matches!(handshake.finish(&message2[..47]), Err(E2eError::Handshake(_))));
    // Message 2 of another handshake does not answer this one.
    let (handshake, _) = ClientHandshake::start(&public).unwrap();
    let (other, message1) = ClientHandshake::start(&public).unwrap();
    let (_, message2) = respond(&secret, &message1).unwrap();
    assert!(matches!(handshake.finish(&message2), Err(E2eError::Handshake(_))));
    other.finish(&message2).unwrap();
    // A message 1 with a payload, or cut.
    assert!(matches!(respond(&secret, &[0; HANDSHAKE_LEN + 1]), Err(E2eError::Handshake(_))));
    assert!(matches!(respond(&secret, &message1[..HANDSHAKE_LEN - 1]), Err(E2eError::Handshake(_))));
}

#[test]
fn sessions_have_their_own_keys() {
    let (secret, public) = server_keys();
    let (mut c1, _s1) = connect(&secret, &public);
    let (_c2, s2) = connect(&secret, &public);
    let message = c1.seal_request(&sample_request()).unwrap();
    assert_eq!(s2.open_request(&message).unwrap_err(), E2eError::Decrypt { what: "a request", nonce: 0 });
    // The same request sealed twice in two sessions differs.
    let (mut c3, _s3) = connect(&secret, &public);
    assert_ne!(c3.seal_request(&sample_request()).unwrap(), message);
}

#[test]
fn a_request_opens_again_until_accepted_then_is_refused() {
    let (mut client, mut server) = pair();
    let message = client.seal_request(&large_request()).unwrap();
    let first = server.open_request(&message).unwrap();
    let second = server.open_request(&message).unwrap();
    assert_eq!(first.request, second.request);
    server.accept(&second).unwrap();
    // The first opening is now stale.
    let e = server.accept(&first).unwrap_err();
    assert_eq!(e, E2eError::StaleRequest { opened_at: 0, expected: 3 });
    let e = server.open_request(&message).unwrap_err();
    assert_eq!(e, E2eError::Decrypt { what: "a request", nonce: 3 });
    assert!(matches!(server.accept(&first), Err(E2eError::Broken(_))));
}

#[test]
fn over_large_requests_are_refused_before_decrypting() {
    let (mut client, server) = pair();
    let mut request = sample_request();
    request.messages.push(ChatMessage::new("user", "x".repeat(MAX_REQUEST_PLAINTEXT)));
    let e = client.seal_request(&request).unwrap_err();
    assert!(e.to_string().contains("MAX_REQUEST_PLAINTEXT"), "{e}");
    assert_eq!(client.send, 0);
    let e = server.open_request(&vec![0u8; 5 << 20]).unwrap_err();
    assert!(matches!(e, E2eError::TooLarge { limit: "MAX_REQUEST_PLAINTEXT", .. }), "{e}");
    let (mut client, _) = pair();
    let e = client.open_record(&[0u8; MAX_NOISE_MESSAGE + 1]).unwrap_err();
    assert!(matches!(e, E2eError::TooLarge { .. }), "{e}");
}

#[test]
fn nonces_run_out_before_the_reserved_one() {
    let (mut client, mut server) = pair();
    client.send = u64::MAX - 1;
    server.recv = u64::MAX - 1;
    let message = client.seal_request(&sample_request()).unwrap();
    receive(&mut server, &message).unwrap();
    end_answer(&mut client, &mut server);
    assert_eq!(client.seal_request(&sample_request()).unwrap_err(), E2eError::Exhausted);
    server.send = u64::MAX;
    assert_eq!(server.seal_record(&Record::Text("x".into())).unwrap_err(), E2eError::Exhausted);
}

/// Records are numbered per session: a client that sent another request
/// before the previous answer ended could be handed the withheld answer as
/// the new one. The client refuses to seal until the answer's final record.
#[test]
fn a_request_waits_for_the_previous_answer_to_end() {
    let (mut client, mut server) = pair();
    let request = ChatRequest::new("m", vec![ChatMessage::new("user", "first")]);
    let first = client.seal_request(&request).unwrap();
    receive(&mut server, &first).unwrap();
    let text = server.seal_record(&Record::Text("one".into())).unwrap();
    let done = server
        .seal_record(&Record::Done(Done {
            stop: StopReason::EndOfGeneration,
            prompt_tokens: 1,
            generated_tokens: 1,
            prefill_micros: 1,
            decode_micros: 1,
        }))
        .unwrap();
    // The daemon withholds the answer (an HTTP error, say): no second request.
    let refused = client.seal_request(&request).unwrap_err();
    assert!(matches!(&refused, E2eError::Broken(why) if why.contains("not read to its end")), "{refused}");
    // A text record does not end the answer; the done record does.
    client.open_record(&text).unwrap();
    assert!(client.seal_request(&request).is_err());
    client.open_record(&done).unwrap();
    client.seal_request(&request).unwrap();
}
