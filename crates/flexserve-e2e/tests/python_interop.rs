//! The Python initiator (python/flexserve_e2e.py, on the `cryptography`
//! package) against this crate's responder, with no daemon: JSON lines to a
//! driver (python/tests/e2e_interop_driver.py), then the Python HTTP client
//! against a small fake daemon built on the responder.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};

use flexserve_e2e::{
    respond, ChatMessage, ChatRequest, Done, E2eError, Record, Sampling, ServerSession, StopReason, MAX_NOISE_MESSAGE,
    REQUEST_PADDING, TAG_LEN,
};
use serde_json::{json, Value};

fn driver_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../python/tests/e2e_interop_driver.py")
}

/// python3 with the `cryptography` package, or a failure that says how to get it.
fn python() -> Command {
    let probe = Command::new("python3").args(["-c", "import cryptography"]).output();
    match probe {
        Err(e) => panic!("cannot run python3 ({e}): install Python 3 and run scripts/test.sh"),
        Ok(o) if !o.status.success() => panic!(
            "python3 lacks the `cryptography` package ({}): run scripts/test.sh, which installs it \
             (or `python3 -m pip install cryptography`)",
            String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("")
        ),
        Ok(_) => Command::new("python3"),
    }
}

fn server_keys() -> ([u8; 32], [u8; 32]) {
    let keys = snow::Builder::new(flexserve_e2e::NOISE_PARAMS.parse().unwrap()).generate_keypair().unwrap();
    (keys.private.try_into().unwrap(), keys.public.try_into().unwrap())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}

/// The Python driver in its JSON-lines mode.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Driver {
    fn start() -> Driver {
        let mut child = python()
            .arg(driver_path())
            .arg("stdio")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Driver { child, stdin, stdout }
    }

    fn call(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the Python driver exited (see its stderr above)");
        let answer: Value = serde_json::from_str(&line).unwrap();
        assert!(answer.get("fatal").is_none(), "{}", answer["fatal"]);
        answer
    }

    fn handshake(&mut self, secret: &[u8; 32], public: &[u8; 32]) -> ServerSession {
        let m1 = unhex(self.call(json!({"op": "start", "server_public": hex(public)}))["message1"].as_str().unwrap());
        let (server, m2) = respond(secret, &m1).unwrap();
        assert_eq!(self.call(json!({"op": "finish", "message2": hex(&m2)})), json!({"ok": true}));
        server
    }

    fn seal(&mut self, request: &ChatRequest) -> Value {
        self.call(json!({"op": "seal", "request": request_json(request)}))
    }

    fn open(&mut self, message: &[u8]) -> Value {
        self.call(json!({"op": "open", "message": hex(message)}))
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.child.wait();
    }
}

fn request_json(r: &ChatRequest) -> Value {
    let s = &r.sampling;
    // f32 -> f64 is exact, so Python packs back the very same f32.
    json!({
        "model": r.model, "max_tokens": r.max_tokens, "stop": r.stop,
        "sampling": {"temperature": f64::from(s.temperature), "top_k": s.top_k, "top_p": f64::from(s.top_p),
            "min_p": f64::from(s.min_p), "repeat_penalty": f64::from(s.repeat_penalty),
            "repeat_last_n": s.repeat_last_n, "seed": s.seed},
        "messages": r.messages.iter().map(|m| [m.role.as_str(), m.content.as_str()]).collect::<Vec<_>>(),
    })
}

const STOP_NAMES: [&str; 4] = ["end_of_generation", "max_tokens", "stop_string", "context_full"];

fn record_json(r: &Record) -> Value {
    match r {
        Record::Text(t) => json!({"kind": "text", "text": t}),
        Record::Done(d) => json!({"kind": "done",
            "stop": STOP_NAMES[usize::from(d.stop.code())],
            "prompt_tokens": d.prompt_tokens, "generated_tokens": d.generated_tokens,
            "prefill_micros": d.prefill_micros, "decode_micros": d.decode_micros}),
        Record::Error { code, message } => json!({"kind": "error", "code": code, "message": message}),
    }
}

fn requests() -> Vec<ChatRequest> {
    let sampling = Sampling {
        temperature: 0.7,
        top_k: 17,
        top_p: 0.9,
        min_p: 0.03,
        repeat_penalty: 1.15,
        repeat_last_n: 128,
        seed: u64::MAX - 1,
    };
    vec![
        ChatRequest {
            model: "smollm2-135m".into(),
            max_tokens: 300,
            sampling,
            stop: vec!["\n\n".into(), "Schluß ✓".into()],
            messages: vec![ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Grüße! 你好 🦀")],
        },
        // Several Noise messages.
        ChatRequest {
            model: "m".into(),
            max_tokens: 0,
            sampling: Sampling::default(),
            stop: Vec::new(),
            messages: vec![
                ChatMessage::new("user", "ä€🦀".repeat(20_000)),
                ChatMessage::new("assistant", ""),
                ChatMessage::new("user", "y".repeat(70_000)),
            ],
        },
        ChatRequest::new("", Vec::new()),
    ]
}

fn records() -> Vec<Record> {
    let done = |stop, n| Done {
        stop,
        prompt_tokens: n,
        generated_tokens: n + 1,
        prefill_micros: u64::from(n) << 33,
        decode_micros: u64::MAX - u64::from(n),
    };
    vec![
        Record::Text("Hallo, 世界 🦀".into()),
        Record::Text(String::new()),
        Record::Text("z".repeat(flexserve_e2e::codec::MAX_RECORD_TEXT)),
        Record::Done(done(StopReason::EndOfGeneration, 0)),
        Record::Done(done(StopReason::MaxTokens, 1)),
        Record::Done(done(StopReason::StopString, 2)),
        Record::Done(done(StopReason::ContextFull, u32::MAX - 1)),
        Record::Error { code: 8, message: "the context is full — 上下文".into() },
    ]
}

#[test]
fn the_python_initiator_and_the_rust_responder_agree() {
    let (secret, public) = server_keys();
    let mut py = Driver::start();
    let mut server = py.handshake(&secret, &public);

    for request in requests() {
        let answer = py.seal(&request);
        let message = unhex(answer["message"].as_str().unwrap_or_else(|| panic!("{answer}")));
        let pieces = message.len().div_ceil(MAX_NOISE_MESSAGE);
        assert_eq!((message.len() - pieces * TAG_LEN) % REQUEST_PADDING, 0, "padded");
        let opened = server.open_request(&message).unwrap();
        // Not accepted: the same bytes open again.
        let again = server.open_request(&message).unwrap();
        assert_eq!(opened.request, request);
        assert_eq!(again.request, request);
        assert_eq!(opened.pieces(), pieces as u64);
        server.accept(&opened).unwrap();
        assert!(server.open_request(&message).is_err());
        if request.model == "m" {
            assert!(pieces >= 3, "{pieces} pieces");
        }
        // A fresh server session for the next request: the failed open above ended this one.
        server = py.handshake(&secret, &public);
    }

    for record in records() {
        let message = server.seal_record(&record).unwrap();
        assert_eq!(py.open(&message)["record"], record_json(&record), "{record:?}");
    }

    // Python's decoders only ever raise their own errors, and what they decode re-encodes exactly.
    let mut valid = vec![hex(&flexserve_e2e::codec::encode_request(&requests()[0]).unwrap())];
    valid.extend(
        records()
            .iter()
            .filter(|r| !matches!(r, Record::Text(t) if t.len() > 100))
            .map(|r| hex(&flexserve_e2e::codec::encode_record(r).unwrap())),
    );
    let answer = py.call(json!({"op": "fuzz", "seed": 11, "rounds": 20_000, "valid": valid}));
    assert!(answer["decoded"].as_u64().unwrap_or_else(|| panic!("{answer}")) > 0, "{answer}");

    // A tampered record is refused and ends the Python session.
    let mut message = server.seal_record(&Record::Text("secret".into())).unwrap();
    message[20] ^= 4;
    let answer = py.open(&message);
    assert_eq!(answer["type"], "DecryptError", "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("tampered with, replayed, reordered or dropped"), "{answer}");
    let answer = py.open(&server.seal_record(&Record::Text("next".into())).unwrap());
    assert_eq!(answer["type"], "BrokenSessionError", "{answer}");

    // Dropped, replayed and truncated records.
    let mut server = py.handshake(&secret, &public);
    let _dropped = server.seal_record(&Record::Text("one".into())).unwrap();
    let second = server.seal_record(&Record::Text("two".into())).unwrap();
    assert_eq!(py.open(&second)["type"], "DecryptError");
    let mut server = py.handshake(&secret, &public);
    let first_again = server.seal_record(&Record::Text("one".into())).unwrap();
    assert_eq!(py.open(&first_again)["record"]["text"], "one");
    assert_eq!(py.open(&first_again)["type"], "DecryptError", "a replay");
    let mut server = py.handshake(&secret, &public);
    let message = server.seal_record(&Record::Text("cut".into())).unwrap();
    assert_eq!(py.open(&message[..message.len() - 1])["type"], "TruncatedError");

    // Python's requests are refused as Rust's are when tampered with or replayed.
    let server = py.handshake(&secret, &public);
    let mut message = unhex(py.seal(&requests()[1])["message"].as_str().unwrap());
    message[MAX_NOISE_MESSAGE + 100] ^= 0x10;
    let e = server.open_request(&message).unwrap_err();
    assert_eq!(e, E2eError::Decrypt { what: "a request", nonce: 1 });
    let mut server = py.handshake(&secret, &public);
    let message = unhex(py.seal(&requests()[0])["message"].as_str().unwrap());
    let opened = server.open_request(&message).unwrap();
    server.accept(&opened).unwrap();
    let e = server.open_request(&message).unwrap_err();
    assert_eq!(e, E2eError::Decrypt { what: "a request", nonce: 1 });

    // Too large a request is refused by Python, naming the limit.
    let mut huge = requests()[0].clone();
    huge.messages.push(ChatMessage::new("user", "h".repeat(flexserve_e2e::MAX_REQUEST_PLAINTEXT)));
    let answer = py.seal(&huge);
    assert_eq!(answer["type"], "TooLargeError", "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("MAX_REQUEST_PLAINTEXT"));

    // A Python client given another server key fails the handshake.
    let (_, other_public) = server_keys();
    let m1 = unhex(py.call(json!({"op": "start", "server_public": hex(&other_public)}))["message1"].as_str().unwrap());
    assert!(matches!(respond(&secret, &m1), Err(E2eError::Handshake(_))));
    // And Python refuses a message 2 that answers another message 1.
    let start = json!({"op": "start", "server_public": hex(&public)});
    let earlier = unhex(py.call(start.clone())["message1"].as_str().unwrap());
    let (_, m2) = respond(&secret, &earlier).unwrap();
    py.call(start);
    assert_eq!(py.call(json!({"op": "finish", "message2": hex(&m2)}))["type"], "HandshakeError");
}

// ---- A fake daemon for the Python HTTP client ---------------------------------------------------

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for c in bytes.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            out.push(if i <= c.len() { B64[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn unb64(s: &str) -> Vec<u8> {
    let digits: Vec<u32> =
        s.bytes().filter(|&b| b != b'=').map(|b| B64.iter().position(|&d| d == b).expect("base64") as u32).collect();
    let mut out = Vec::new();
    for c in digits.chunks(4) {
        let n = c.iter().enumerate().fold(0, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..c.len()]);
    }
    out
}

struct FakeDaemon {
    secret: [u8; 32],
    api_key: String,
    identity: Value,
    sessions: HashMap<String, (ServerSession, String)>,
    opened: Arc<Mutex<Vec<ChatRequest>>>,
    next_id: u32,
}

fn respond_json(stream: &mut TcpStream, status: u16, body: Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(body.as_bytes()).unwrap();
}

fn error(stream: &mut TcpStream, status: u16, message: &str) {
    respond_json(stream, status, json!({"error": {"message": message}}));
}

impl FakeDaemon {
    fn serve(&mut self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut stream = stream;
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        let mut parts = line.split_whitespace();
        let (method, path) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
        let (mut length, mut authorized) = (0, false);
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).unwrap();
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.trim().parse().unwrap(),
                "authorization" => authorized = value.trim() == format!("Bearer {}", self.api_key),
                _ => {}
            }
        }
        let mut body = vec![0; length];
        reader.read_exact(&mut body).unwrap();
        if !authorized {
            return error(&mut stream, 401, "invalid API key");
        }
        let body: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(&body).unwrap() };
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.as_str(), segments.as_slice()) {
            ("GET", ["v1", "secure", "identity"]) => respond_json(&mut stream, 200, self.identity.clone()),
            ("POST", ["v1", "secure", "sessions"]) => {
                let model = body["model"].as_str().unwrap().to_string();
                let (session, message2) = respond(&self.secret, &unb64(body["handshake"].as_str().unwrap())).unwrap();
                self.next_id += 1;
                let id = format!("s{}", self.next_id);
                self.sessions.insert(id.clone(), (session, model.clone()));
                respond_json(&mut stream, 200, json!({"session": id, "model": model, "handshake": b64(&message2)}));
            }
            ("POST", ["v1", "secure", "sessions", id, "chat"]) => {
                let Some((session, model)) = self.sessions.get_mut(*id) else {
                    return error(&mut stream, 404, "no such session");
                };
                let opened = match session.open_request(&unb64(body["message"].as_str().unwrap())) {
                    Ok(opened) => opened,
                    Err(e) => return error(&mut stream, 400, &e.to_string()),
                };
                session.accept(&opened).unwrap();
                let request = opened.request;
                assert_eq!(&request.model, model);
                request.validate().unwrap();
                self.opened.lock().unwrap().push(request.clone());
                chat(&mut stream, session, &request);
            }
            ("DELETE", ["v1", "secure", "sessions", id]) => match self.sessions.remove(*id) {
                Some(_) => respond_json(&mut stream, 200, json!({"deleted": true})),
                None => error(&mut stream, 404, "no such session"),
            },
            _ => error(&mut stream, 404, "no such endpoint"),
        }
    }
}

/// Echoes the last message in pieces of up to 10 characters, or misbehaves as it asks.
fn chat(stream: &mut TcpStream, session: &mut ServerSession, request: &ChatRequest) {
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n").unwrap();
    let mut send = |record: &Record, tamper: bool| {
        let mut message = session.seal_record(record).unwrap();
        if tamper {
            message[3] ^= 1;
        }
        stream.write_all(format!("data: {}\n\n", b64(&message)).as_bytes()).unwrap();
    };
    let content = request.messages.last().unwrap().content.clone();
    match content.as_str() {
        "please fail" => send(&Record::Error { code: 8, message: "the context is full".into() }, false),
        "please daemon-error" => {
            send(&Record::Text("partial".into()), false);
            stream
                .write_all(b"event: error\ndata: {\"error\":{\"message\":\"the secure world crashed\"}}\n\n")
                .unwrap();
        }
        "please truncate" => send(&Record::Text("partial".into()), false),
        "please tamper" => send(&Record::Text("partial".into()), true),
        _ => {
            let chars: Vec<char> = content.chars().collect();
            let pieces: Vec<String> = chars.chunks(10).map(|c| c.iter().collect()).collect();
            for piece in &pieces {
                send(&Record::Text(piece.clone()), false);
            }
            let done = Done {
                stop: StopReason::MaxTokens,
                prompt_tokens: request.messages.len() as u32,
                generated_tokens: pieces.len() as u32,
                prefill_micros: 1,
                decode_micros: 2,
            };
            send(&Record::Done(done), false);
        }
    }
}

#[test]
fn the_python_http_client_talks_to_a_responder_behind_a_fake_daemon() {
    let (secret, public) = server_keys();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let mut child = python()
        .arg(driver_path())
        .args(["http", &url, &hex(&public), "interop-key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let identity: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert!(identity.get("fatal").is_none(), "{}", identity["fatal"]);

    let opened = Arc::new(Mutex::new(Vec::new()));
    let mut daemon = FakeDaemon {
        secret,
        api_key: "interop-key".into(),
        identity,
        sessions: HashMap::new(),
        opened: opened.clone(),
        next_id: 0,
    };
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            daemon.serve(stream.unwrap());
        }
    });
    writeln!(child.stdin.as_mut().unwrap(), "ready").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success() && rest.contains("\"ok\""),
        "the Python client failed: {rest}{}",
        String::from_utf8_lossy(&output.stderr)
    );

    // The first request arrived with every field as the Python client set it.
    let opened = opened.lock().unwrap();
    let first = &opened[0];
    assert_eq!(first.model, "interop-model");
    assert_eq!(first.max_tokens, 7);
    assert_eq!(
        first.sampling,
        Sampling {
            temperature: 0.25,
            top_k: 3,
            top_p: 0.5,
            min_p: 0.125,
            repeat_penalty: 1.5,
            repeat_last_n: 9,
            seed: u64::MAX
        }
    );
    assert_eq!(first.stop, ["\n", "Ende"]);
    assert_eq!(first.messages[0], ChatMessage::new("system", "be brief"));
    assert_eq!(first.messages[1].role, "user");
    // The second, with the Python client's defaults.
    assert_eq!(opened[1].sampling, Sampling::default());
    assert_eq!(opened[1].max_tokens, 0);
    assert_eq!(opened[1].messages[0].content.len(), 200_000);
}
