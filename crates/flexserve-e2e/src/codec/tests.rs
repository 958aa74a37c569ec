use super::*;
use crate::types::{ChatMessage, ChatRequest, Done, Record, Sampling, StopReason};

pub(crate) fn sample_request() -> ChatRequest {
    ChatRequest {
        model: "smollm2".into(),
        max_tokens: 77,
        sampling: Sampling {
            temperature: 0.7,
            top_k: 12,
            top_p: 0.9,
            min_p: 0.01,
            repeat_penalty: 1.1,
            repeat_last_n: 32,
            seed: u64::MAX - 5,
        },
        stop: vec!["\n\n".into(), "Ende — ✓".into(), String::new()],
        messages: vec![
            ChatMessage::new("system", "You are terse."),
            ChatMessage::new("user", "Grüße, 世界! 🦀"),
            ChatMessage::new("assistant", ""),
        ],
    }
}

pub(crate) fn every_record() -> Vec<Record> {
    vec![
        Record::Text("Hallo, 世界 🦀".into()),
        Record::Text(String::new()),
        Record::Text("x".repeat(MAX_RECORD_TEXT)),
        Record::Done(Done {
            stop: StopReason::EndOfGeneration,
            prompt_tokens: 1,
            generated_tokens: 2,
            prefill_micros: 3,
            decode_micros: u64::MAX,
        }),
        Record::Done(Done {
            stop: StopReason::MaxTokens,
            prompt_tokens: u32::MAX,
            generated_tokens: 0,
            prefill_micros: 0,
            decode_micros: 0,
        }),
        Record::Done(Done {
            stop: StopReason::StopString,
            prompt_tokens: 5,
            generated_tokens: 6,
            prefill_micros: 7,
            decode_micros: 8,
        }),
        Record::Done(Done {
            stop: StopReason::ContextFull,
            prompt_tokens: 9,
            generated_tokens: 10,
            prefill_micros: 11,
            decode_micros: 12,
        }),
        Record::Error { code: 8, message: "the context is full".into() },
        Record::Error { code: u16::MAX, message: String::new() },
    ]
}

#[test]
fn requests_round_trip_padded_to_256_bytes() {
    let request = sample_request();
    let plain = encode_request(&request).unwrap();
    assert_eq!(plain.len() % REQUEST_PADDING, 0);
    assert_eq!(decode_request(&plain).unwrap(), request);
    let empty = ChatRequest::new("", Vec::new());
    let plain = encode_request(&empty).unwrap();
    assert_eq!(plain.len(), REQUEST_PADDING);
    assert_eq!(decode_request(&plain).unwrap(), empty);
}

#[test]
fn records_round_trip_padded_to_64_bytes() {
    for record in every_record() {
        let plain = encode_record(&record).unwrap();
        assert_eq!(plain.len() % RECORD_PADDING, 0, "{record:?}");
        assert!(plain.len() <= MAX_RECORD_PLAINTEXT);
        assert_eq!(decode_record(&plain).unwrap(), record);
    }
}

#[test]
fn a_text_over_one_record_is_refused_and_a_long_error_is_cut_at_a_character() {
    let e = encode_record(&Record::Text("x".repeat(MAX_RECORD_TEXT + 1))).unwrap_err();
    assert!(matches!(e, E2eError::TooLarge { .. }), "{e}");
    assert!(e.to_string().contains("MAX_RECORD_TEXT"), "{e}");
    let message = "é".repeat(MAX_RECORD_ERROR_MESSAGE);
    let plain = encode_record(&Record::Error { code: 9, message }).unwrap();
    assert_eq!(plain.len(), MAX_RECORD_PLAINTEXT);
    let Record::Error { code: 9, message } = &decode_record(&plain).unwrap() else { panic!("not an error record") };
    assert_eq!(message.len(), MAX_RECORD_ERROR_MESSAGE - 1);
    assert!(message.chars().all(|c| c == 'é'));
}

#[test]
fn a_request_over_the_limit_is_refused_naming_it() {
    let mut request = sample_request();
    request.messages.push(ChatMessage::new("user", "y".repeat(MAX_REQUEST_PLAINTEXT)));
    let e = encode_request(&request).unwrap_err();
    assert!(e.to_string().contains("MAX_REQUEST_PLAINTEXT"), "{e}");
    // Exactly at the limit is fine.
    let overhead = encode_request(&ChatRequest::new("m", vec![ChatMessage::new("user", "")])).unwrap().len();
    let body = 4 + 1 + 4 + 1 + SAMPLING_BYTES + 4 + 4 + 8 + 4;
    assert!(overhead >= body);
    let content = "z".repeat(MAX_REQUEST_PLAINTEXT - body);
    let plain = encode_request(&ChatRequest::new("m", vec![ChatMessage::new("user", content)])).unwrap();
    assert_eq!(plain.len(), MAX_REQUEST_PLAINTEXT);
    assert!(decode_request(&plain).is_ok());
    let mut over = plain.to_vec();
    over.extend_from_slice(&[0; REQUEST_PADDING]);
    assert!(matches!(decode_request(&over), Err(E2eError::TooLarge { .. })));
}

/// Rewrites the body length field and returns the plaintext.
fn with_body_len(plain: &[u8], len: u32) -> Vec<u8> {
    let mut p = plain.to_vec();
    p[..4].copy_from_slice(&len.to_le_bytes());
    p
}

#[test]
fn malformed_plaintexts_are_refused_naming_what_is_wrong() {
    let plain = encode_request(&sample_request()).unwrap().to_vec();
    let body = u32::from_le_bytes(plain[..4].try_into().unwrap());
    let err = |p: &[u8]| decode_request(p).unwrap_err().to_string();

    assert!(err(&plain[..3]).contains("shorter than its body length field"));
    assert!(err(&with_body_len(&plain, plain.len() as u32)).contains("ends before the body length"));
    // A whole bucket more (or less) than the body length gives.
    let mut extended = plain.clone();
    extended.extend_from_slice(&[0; REQUEST_PADDING]);
    assert!(err(&extended).contains("padded length"));
    assert!(err(&plain[..plain.len() - RECORD_PADDING]).contains("truncated"));
    let mut padding = plain.clone();
    *padding.last_mut().unwrap() = 1;
    assert!(err(&padding).contains("padding"));

    let mut version = plain.clone();
    version[4] = 2;
    assert_eq!(decode_request(&version).unwrap_err(), E2eError::UnknownVersion(2));

    // The model's length beyond the body.
    let mut model = plain.clone();
    model[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(err(&model).contains("request.model"), "{}", err(&model));
    // Not UTF-8.
    let mut utf8 = plain.clone();
    utf8[9] = 0xff;
    assert!(err(&utf8).contains("request.model: not UTF-8"), "{}", err(&utf8));
    // A count the body cannot hold (the stop count follows model and sampling).
    let stop_at = 4 + 1 + 4 + "smollm2".len() + SAMPLING_BYTES;
    let mut count = plain.clone();
    count[stop_at..stop_at + 4].copy_from_slice(&0x4000_0000u32.to_le_bytes());
    assert!(err(&count).contains("request.stop") && err(&count).contains("cannot fit"), "{}", err(&count));
    // Trailing bytes inside the body: one more byte in the body length.
    assert!(err(&with_body_len(&plain, body + 1)).contains("follow its last field"));
    // A body cut short: one byte less in the body length.
    let short = with_body_len(&plain, body - 1);
    assert!(err(&short).contains("request.messages.content"), "{}", err(&short));

    let record = encode_record(&Record::Text("hi".into())).unwrap().to_vec();
    let mut kind = record.clone();
    kind[4] = 9;
    assert_eq!(decode_record(&kind).unwrap_err(), E2eError::UnknownKind(9));
    let done = encode_record(&every_record()[3]).unwrap().to_vec();
    let mut reason = done.clone();
    reason[5] = 4;
    assert!(decode_record(&reason).unwrap_err().to_string().contains("done.stop_reason"));
    assert!(decode_record(&[]).unwrap_err().to_string().contains("truncated"));
}

/// A small deterministic PRNG (xorshift64*).
pub(crate) struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Mutates a valid plaintext: flips, overwrites a length with a random or
/// boundary value, cuts, or extends it.
fn mutate(rng: &mut Rng, valid: &[u8]) -> Vec<u8> {
    let mut p = valid.to_vec();
    for _ in 0..=rng.below(3) {
        match rng.below(6) {
            0 if !p.is_empty() => {
                let i = rng.below(p.len());
                p[i] ^= 1 << rng.below(8);
            }
            1 if p.len() >= 4 => {
                let i = rng.below(p.len() - 3);
                let v = [0, 1, u32::MAX, u32::MAX / 2, rng.next() as u32, (p.len() - i) as u32][rng.below(6)];
                p[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            2 => p.truncate(rng.below(p.len() + 1)),
            3 => p.resize(p.len() + [1, 64, 256][rng.below(3)], 0),
            4 if !p.is_empty() => {
                let i = rng.below(p.len());
                p[i] = rng.next() as u8;
            }
            _ => {
                // Keep the framing right so that the body's fields are reached.
                let bucket = if rng.below(2) == 0 { REQUEST_PADDING } else { RECORD_PADDING };
                let body = rng.below(p.len().saturating_sub(4) + 1);
                p.resize((body + 4).div_ceil(bucket) * bucket, 0);
                p[..4].copy_from_slice(&(body as u32).to_le_bytes());
            }
        }
    }
    p
}

#[test]
fn random_and_mutated_plaintexts_never_panic_and_what_decodes_reencodes_exactly() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut valid: Vec<Vec<u8>> = vec![encode_request(&sample_request()).unwrap().to_vec()];
    valid.extend(every_record().iter().take(2).chain(&every_record()[3..]).map(|r| encode_record(r).unwrap().to_vec()));
    let (mut requests, mut records) = (0, 0);
    for round in 0..200_000 {
        let input = if round % 4 == 0 {
            let len = rng.below(600);
            (0..len).map(|_| rng.next() as u8).collect()
        } else {
            let base = &valid[rng.below(valid.len())];
            mutate(&mut rng, base)
        };
        if let Ok(r) = decode_request(&input) {
            requests += 1;
            assert_eq!(&encode_request(&r).unwrap()[..], &input[..], "round {round}");
        }
        if let Ok(r) = decode_record(&input) {
            records += 1;
            assert_eq!(&encode_record(&r).unwrap()[..], &input[..], "round {round}");
        }
    }
    // The mutations reach the decoders' ends, not only their framing checks.
    assert!(requests > 0 && records > 0, "{requests} requests and {records} records decoded");
}
