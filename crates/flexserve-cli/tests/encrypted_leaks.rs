//! What encrypted sessions (docs/encrypted-sessions.md) keep from the
//! normal world, against a real `flexserve serve` whose secure world
//! (development mode) serves the real model sealed: the daemon's memory and
//! the traffic it carries hold neither the prompt nor the answer of an
//! encrypted chat, while the same chat in plain mode shows both (the
//! controls, which prove that the memory scan and the capture see them).
//! Everything listens on loopback only.

mod common;
#[path = "common/memscan.rs"]
mod memscan;
#[path = "common/relay.rs"]
mod relay;
#[path = "common/sessions.rs"]
mod sessions;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use common::{Daemon as Server, KEY};
use memscan::{is_root, scan_stopped, Matcher, Needle};
use relay::{Relay, RelayMode};
use serde_json::Value;
use sessions::{chat_body, curl, driver, openai_through, Guard, Proxy, StreamingChat};

/// A prompt that gets a long answer (200 tokens), so that the daemon can be stopped while it streams.
const LONG_PROMPT: &str = "Write a long, detailed story about a lighthouse keeper named Orla who lives on a \
windswept island in the North Atlantic, her cat, the supply boat that comes every second Tuesday, and the winter \
storm that changes everything.";
const LONG_TOKENS: u32 = 200;
/// The chat whose traffic is captured.
const CAPTURE_PROMPT: &str = "Describe the smell of fresh bread in a small bakery early on a winter morning.";
const CAPTURE_TOKENS: u32 = 64;

/// A process stopped (SIGSTOP) until this is dropped.
struct Paused(u32);

impl Paused {
    fn new(pid: u32) -> Paused {
        memscan::signal(pid, libc::SIGSTOP);
        memscan::wait_stopped(pid);
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: kill only signals a process this test started (the daemon's secure world).
        unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
    }
}

// ---- Needles -------------------------------------------------------------------------------

const PROMPT: &str = "prompt";
const ANSWER: &str = "answer";

/// Windows of `len` bytes of `text`, every `step` bytes (the last one ending at its end).
fn windows(text: &str, kind: &'static str, len: usize, step: usize) -> Vec<Needle> {
    let bytes = text.as_bytes();
    assert!(bytes.len() >= len, "{kind} {text:?} is shorter than {len} bytes");
    let mut starts: Vec<usize> = (0..=bytes.len() - len).step_by(step).collect();
    if starts.last() != Some(&(bytes.len() - len)) {
        starts.push(bytes.len() - len);
    }
    starts
        .into_iter()
        .map(|at| Needle {
            bytes: bytes[at..at + len].to_vec(),
            what: format!("{kind} bytes {at}..{}: {:?}", at + len, String::from_utf8_lossy(&bytes[at..at + len])),
            kind,
        })
        .collect()
}

/// Windows of the answer as [`windows`], less those the prompt holds too (an
/// answer that repeats the prompt's words must not make the prompt count as the answer).
fn answer_windows(answer: &str, prompt: &str, len: usize, step: usize) -> Vec<Needle> {
    let mut needles = windows(answer, ANSWER, len, step);
    needles.retain(|n| !prompt.as_bytes().windows(len).any(|w| w == n.bytes));
    needles
}

/// Whether a JSON string carries `window` as it is (no byte of it escaped).
fn json_verbatim(window: &[u8]) -> bool {
    window.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// Fails naming the windows of the prompt and of the answer that `found` (of `matcher`'s needles) holds.
fn assert_neither(matcher: &Matcher, found: &[bool], place: &str) {
    let (_, _, prompt_leaks) = matcher.hits(found, PROMPT);
    let (_, _, answer_leaks) = matcher.hits(found, ANSWER);
    assert!(prompt_leaks.is_empty(), "the prompt is in {place}: {prompt_leaks:#?}");
    assert!(answer_leaks.is_empty(), "the answer is in {place}: {answer_leaks:#?}");
}

/// Standard base64 with its padding, as the messages travel; trailing bits
/// left unchecked, so that every run of a capture that decodes is searched.
const BASE64: GeneralPurpose =
    GeneralPurpose::new(&base64::alphabet::STANDARD, GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true));

/// Every run of 24 or more base64 characters in `capture` that decodes, decoded and joined.
fn base64_runs(capture: &[u8]) -> Vec<u8> {
    let is_base64 = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=');
    capture
        .split(|c| !is_base64(c))
        .filter(|run| run.len() >= 24)
        .filter_map(|run| BASE64.decode(run).ok())
        .flatten()
        .collect()
}

// ---- The tests -----------------------------------------------------------------------------

/// While the daemon carries an encrypted chat's answer, its memory holds
/// neither the prompt nor the answer; while it serves the same chat in plain
/// mode, it holds both (the control: the scan sees the daemon's heap).
#[test]
fn the_daemons_memory_holds_neither_the_prompt_nor_the_answer_of_an_encrypted_chat() {
    let server = Server::start();
    let tokens = LONG_TOKENS.to_string();
    let chat_args = ["chat", &server.url, KEY, "sealed", LONG_PROMPT, &tokens];
    // Greedy answers repeat: a first chat gives the answer the needles are cut from.
    let first = driver(&chat_args);
    let answer = first["text"].as_str().unwrap().to_string();
    assert!(answer.len() >= 400, "the answer is too short to stop the daemon in its middle: {answer:?}");
    let mut needles = windows(LONG_PROMPT, PROMPT, 24, 12);
    needles.extend(answer_windows(&answer, LONG_PROMPT, 24, 12));
    let matcher = Matcher::new(needles);

    // The same chat again, the daemon stopped once the client has received part of the answer.
    let chat = StreamingChat::start(&chat_args);
    let mut received = String::new();
    while received.len() < 96 {
        let line = chat.next();
        match line["piece"].as_str() {
            Some(piece) => received.push_str(piece),
            None => panic!("the answer ended before the daemon could be stopped: {line}"),
        }
    }
    let scan = match scan_stopped(server.pid(), &matcher) {
        Ok(scan) => scan,
        Err(e) if !is_root() => {
            eprintln!("skipping: cannot read another process's memory as a non-root user here ({e})");
            return;
        }
        Err(e) => panic!("reading the daemon's memory: {e}"),
    };
    let stopped_at = received.len();
    let last = loop {
        let line = chat.next();
        match line["piece"].as_str() {
            Some(piece) => received.push_str(piece),
            None => break line,
        }
    };
    assert_eq!(last["text"].as_str(), Some(answer.as_str()), "the second greedy answer differs from the first");
    assert!(stopped_at < answer.len(), "the daemon was stopped after the answer");
    let (prompt_hits, prompts, _) = matcher.hits(&scan.found, PROMPT);
    let (answer_hits, answers, _) = matcher.hits(&scan.found, ANSWER);
    eprintln!(
        "encrypted chat, the daemon stopped after {stopped_at} of {} answer bytes: {} mappings, {:.1} MiB read; \
         prompt windows {prompt_hits}/{prompts}, answer windows {answer_hits}/{answers}",
        answer.len(),
        scan.mappings,
        scan.bytes_read as f64 / f64::from(1 << 20)
    );
    assert!(scan.has_secure_child(), "the sealed model must run in a flexserve-secure child: {:?}", scan.children);
    // The records pass through the buffer the daemon shares with its secure world: the scan covers it.
    assert!(scan.bytes_read >= flexserve_normal::DEFAULT_SHARED_LEN as u64, "the scan missed the shared buffer");
    assert_neither(&matcher, &scan.found, "the daemon's memory during the encrypted chat");
    // Once the whole answer has passed through it, nothing of it stayed behind either.
    let after = scan_stopped(server.pid(), &matcher).expect("reading the daemon's memory");
    assert_neither(&matcher, &after.found, "the daemon's memory after the encrypted chat");

    // Control: the same chat in plain mode, on the same sealed model, scanned while it is answered.
    let mut curl = Guard(
        Command::new("curl")
            .args(["-sS", "--max-time", "60", "-H", &format!("Authorization: Bearer {KEY}")])
            .args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(chat_body("sealed", LONG_PROMPT, LONG_TOKENS, false))
            .arg(format!("{}/v1/chat/completions", server.url))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The secure world is paused around each scan, so that the answer cannot be completed during one.
    let secure = memscan::children(server.pid())
        .unwrap()
        .into_iter()
        .find(|(_, name)| memscan::is_secure_world(name))
        .expect("the daemon's secure world")
        .0;
    let started = Instant::now();
    let mut control = None;
    let mut scans = 0;
    while control.is_none() {
        std::thread::sleep(Duration::from_millis(100));
        let paused = Paused::new(secure);
        // The daemon takes in what the secure world had sent.
        std::thread::sleep(Duration::from_millis(20));
        // Only a scan made before the daemon answered counts.
        if curl.0.try_wait().unwrap().is_some() {
            break;
        }
        let scan = scan_stopped(server.pid(), &matcher).expect("reading the daemon's memory");
        drop(paused);
        scans += 1;
        let (prompt_hits, _, _) = matcher.hits(&scan.found, PROMPT);
        let (answer_hits, _, _) = matcher.hits(&scan.found, ANSWER);
        if prompt_hits > 0 && answer_hits > 0 {
            control = Some((prompt_hits, answer_hits, started.elapsed()));
        }
    }
    let mut plain = String::new();
    curl.0.stdout.take().unwrap().read_to_string(&mut plain).unwrap();
    assert!(curl.0.wait().unwrap().success(), "the plain chat failed");
    let plain: Value = serde_json::from_str(&plain).unwrap();
    assert_eq!(
        plain["choices"][0]["message"]["content"].as_str(),
        Some(answer.as_str()),
        "the plain-mode answer differs from the encrypted one"
    );
    let Some((prompt_hits, answer_hits, at)) = control else {
        panic!(
            "control: in {scans} scans while the daemon answered the plain chat, the prompt and the answer were \
             not both found in its memory; the scanner is broken"
        )
    };
    eprintln!(
        "plain chat (control), scan {scans} at {at:.1?}: prompt windows {prompt_hits}/{prompts}, answer windows \
         {answer_hits}/{answers}"
    );
}

/// A capture of the traffic between `flexserve client` and the daemon holds
/// no 16-byte window of the prompt or of the answer; the same chat in plain
/// mode through the same relay shows both (the control).
#[test]
fn a_capture_between_flexserve_client_and_the_daemon_holds_neither_the_prompt_nor_the_answer() {
    let server = Server::start();
    let relay = Relay::start(server.addr(), RelayMode::Record);
    let proxy = Proxy::start(&server, &relay.url(), &[]);
    let r = openai_through(&proxy, CAPTURE_PROMPT, CAPTURE_TOKENS);
    let answer = r["chat"]["text"].as_str().unwrap().to_string();
    assert_eq!(r["chat_stream"]["text"], r["chat"]["text"], "{r}");
    assert!(answer.len() >= 64, "{r}");
    drop(proxy);
    let (up, down) = relay.take();
    let (up_text, down_text) = (String::from_utf8_lossy(&up), String::from_utf8_lossy(&down));
    // The capture is of the encrypted sessions: their opening, two chats, their records.
    assert!(up_text.contains("POST /v1/secure/sessions "), "{up_text}");
    assert!(up_text.matches("POST /v1/secure/sessions/").count() >= 2, "{up_text}");
    assert!(down_text.matches("data: ").count() >= CAPTURE_TOKENS as usize, "{down_text}");

    // The messages travel base64-encoded: what they decode to is searched too.
    assert_eq!(BASE64.decode("ZmxleHNlcnZlIQ==").ok(), Some(b"flexserve!".to_vec()));
    let (up_decoded, down_decoded) = (base64_runs(&up), base64_runs(&down));
    let records: Vec<&str> = down_text.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    let mut record_bytes = 0;
    for record in &records {
        let bytes = BASE64.decode(record).unwrap_or_else(|e| panic!("a record that is not base64 ({e}): {record}"));
        assert!(bytes.len() >= 80 && (bytes.len() - 16).is_multiple_of(64), "a record of {} bytes", bytes.len());
        record_bytes += bytes.len();
    }
    assert!(down_decoded.len() >= record_bytes && up_decoded.len() >= 2 * 272, "the capture's base64 went undecoded");

    let mut needles = windows(CAPTURE_PROMPT, PROMPT, 16, 1);
    needles.extend(answer_windows(&answer, CAPTURE_PROMPT, 16, 1));
    let matcher = Matcher::new(needles);
    for (direction, bytes) in [
        ("client to daemon", &up),
        ("daemon to client", &down),
        ("client to daemon, base64 decoded", &up_decoded),
        ("daemon to client, base64 decoded", &down_decoded),
    ] {
        assert_neither(&matcher, &matcher.found_in(bytes), &format!("the capture, {direction}"));
    }
    eprintln!(
        "capture of the encrypted chats: {} bytes client to daemon, {} bytes daemon to client ({} records, {} bytes \
         base64 decoded); no window of the prompt ({} bytes) or the answer ({} bytes)",
        up.len(),
        down.len(),
        records.len(),
        up_decoded.len() + down_decoded.len(),
        CAPTURE_PROMPT.len(),
        answer.len()
    );

    // Control: the plain-mode chat through the same relay.
    let (code, body) = curl(
        &relay.url(),
        "POST",
        "/v1/chat/completions",
        Some(&chat_body("sealed", CAPTURE_PROMPT, CAPTURE_TOKENS, false)),
        Some(KEY),
    );
    assert_eq!(code, 200, "{body}");
    let plain: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(plain["choices"][0]["message"]["content"].as_str(), Some(answer.as_str()), "{body}");
    let (up, down) = relay.take();
    let (up_found, down_found) = (matcher.found_in(&up), matcher.found_in(&down));
    let (prompt_hits, prompts, _) = matcher.hits(&up_found, PROMPT);
    assert_eq!(prompt_hits, prompts, "control: the plain request carries the whole prompt; the capture is broken");
    let verbatim = matcher.needles.iter().filter(|n| n.kind == ANSWER && json_verbatim(&n.bytes)).count();
    let (answer_hits, answers, _) = matcher.hits(&down_found, ANSWER);
    assert!(
        verbatim > answers / 2 && answer_hits >= verbatim,
        "control: the plain answer carries every answer window JSON leaves as it is ({verbatim} of {answers}), \
         found {answer_hits}; the capture is broken"
    );
}
