//! What the encrypted-session tests (encrypted.rs, encrypted_leaks.rs) share:
//! a `flexserve serve` whose secure world (development mode) serves the real
//! model plain and sealed, `flexserve client` in front of it, the Python
//! clients (tests/clients: the real `openai` package and
//! python/flexserve_e2e.py through encrypted_driver.py), and curl; every
//! process bounded by [`CHILD_LIMIT`], everything on loopback only.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{flexserve, model, ok, plain_and_sealed, wait_listening, Daemon as Server, CHILD_LIMIT, KEY};

pub fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// python3 with the `openai` and `cryptography` packages, or a failure that says how to get them.
pub fn python() -> Command {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready =
        READY.get_or_init(|| match Command::new("python3").args(["-c", "import openai, cryptography"]).output() {
            Err(e) => Err(format!("cannot run python3 ({e}): install Python 3 and run scripts/test.sh")),
            Ok(o) if !o.status.success() => Err(format!(
                "python3 lacks the `openai` or `cryptography` package ({}): run scripts/test.sh, which installs \
                 them (or `python3 -m pip install openai cryptography`)",
                String::from_utf8_lossy(&o.stderr).trim().lines().last().unwrap_or("")
            )),
            Ok(_) => Ok(()),
        });
    if let Err(e) = ready {
        panic!("{e}");
    }
    Command::new("python3")
}

/// A child process killed and reaped when dropped (a test that fails leaves none behind).
pub struct Guard(pub Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to its end, within [`CHILD_LIMIT`] (killed past it).
pub fn run(cmd: &mut Command) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let mut guard = Guard(child);
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let stdout = drain(Box::new(guard.0.stdout.take().unwrap()));
    let stderr = drain(Box::new(guard.0.stderr.take().unwrap()));
    let deadline = Instant::now() + CHILD_LIMIT;
    let status = loop {
        if let Some(status) = guard.0.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            drop(guard);
            let stderr = String::from_utf8_lossy(&stderr.join().unwrap()).into_owned();
            panic!("{what} ran past {CHILD_LIMIT:?}; its stderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() }
}

/// The daemon these tests run (a [`crate::common::Daemon`]): the real model as
/// `plain` and, sealed, as `sealed`, behind the API key [`KEY`].
impl Server {
    pub fn start() -> Server {
        let home = tempfile::tempdir().unwrap();
        let key_path = home.path().join("model.key");
        let sealed = home.path().join("model.fsm");
        let key = flexserve_sealed::ModelKey::generate();
        key.save(&key_path).unwrap();
        let options = flexserve_sealed::SealOptions::default();
        flexserve_sealed::seal_file(&model(), &sealed, &key, &options, &mut |_, _| {}).unwrap();
        Server::spawn(home, |c| c.args(["--api-key", KEY, "--key"]).arg(&key_path).args(plain_and_sealed(&sealed)))
    }

    /// The client's machine: its own FLEXSERVE_HOME (pins).
    pub fn client_home(&self) -> PathBuf {
        let home = self.home.path().join("client");
        std::fs::create_dir_all(&home).unwrap();
        home
    }

    /// The secure world's identity key, from the daemon's identity report.
    pub fn identity_key(&self) -> String {
        let (code, body) = curl(&self.url, "GET", "/v1/secure/identity", None, Some(KEY));
        assert_eq!(code, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        let report: Value = serde_json::from_str(body["report"].as_str().unwrap()).unwrap();
        report["identity_ed25519"].as_str().unwrap().to_string()
    }
}

/// curl: (status, body).
pub fn curl(base: &str, method: &str, path: &str, body: Option<&str>, key: Option<&str>) -> (u16, String) {
    let mut c = Command::new("curl");
    c.args(["-sS", "-N", "-X", method, "-w", "\n%{http_code}", "--max-time", "60"]);
    if let Some(k) = key {
        c.args(["-H", &format!("Authorization: Bearer {k}")]);
    }
    if let Some(b) = body {
        c.args(["-H", "Content-Type: application/json", "--data-binary", b]);
    }
    let out = ok(run(c.arg(format!("{base}{path}"))));
    let (body, code) = out.rsplit_once('\n').unwrap();
    (code.parse().unwrap(), body.to_string())
}

pub fn chat_body(model: &str, prompt: &str, max_tokens: u32, stream: bool) -> String {
    serde_json::json!({
        "model": model, "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens, "temperature": 0, "stream": stream,
    })
    .to_string()
}

/// A running `flexserve client`: a local OpenAI endpoint forwarding through encrypted sessions.
pub struct Proxy {
    child: Guard,
    pub url: String,
}

/// `flexserve client --server TO` on a free port, pinning in the server's client home.
pub fn client_command(server: &Server, to: &str, extra: &[&str]) -> Command {
    let mut c = flexserve(&server.client_home());
    c.args(["client", "--server", to, "--port", "0", "--api-key", KEY]).args(extra);
    c
}

impl Proxy {
    pub fn start(server: &Server, to: &str, extra: &[&str]) -> Proxy {
        let log = server.home.path().join("client.log");
        let child = client_command(server, to, extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut child = Guard(child);
        let url = wait_listening(&mut child.0, "flexserve client")
            .unwrap_or_else(|e| panic!("{e}; its log:\n{}", std::fs::read_to_string(&log).unwrap_or_default()));
        Proxy { child, url }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // SAFETY: kill only signals our own child; Guard then kills and reaps it.
        unsafe { libc::kill(self.child.0.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && matches!(self.child.0.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The openai package through `flexserve client`: the greedy chat whole and streamed.
pub fn openai_through(proxy: &Proxy, prompt: &str, max_tokens: u32) -> Value {
    let o = run(python().arg(clients_dir().join("encrypted_openai_client.py")).args([
        &proxy.url,
        "sealed",
        prompt,
        &max_tokens.to_string(),
    ]));
    assert!(o.status.success(), "the openai client failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// Runs tests/clients/encrypted_driver.py to its end: its last JSON line.
pub fn driver(args: &[&str]) -> Value {
    let o = run(python().arg(clients_dir().join("encrypted_driver.py")).args(args));
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "encrypted_driver.py {args:?} failed:\n{}{stdout}", String::from_utf8_lossy(&o.stderr));
    let last = stdout.lines().last().unwrap_or_else(|| panic!("encrypted_driver.py {args:?} printed nothing"));
    serde_json::from_str(last).unwrap()
}

/// The driver's `chat` as it streams: its JSON lines as they come.
pub struct StreamingChat {
    _child: Guard,
    lines: mpsc::Receiver<Value>,
}

impl StreamingChat {
    pub fn start(args: &[&str]) -> StreamingChat {
        let mut child = Guard(
            python()
                .arg(clients_dir().join("encrypted_driver.py"))
                .args(args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap(),
        );
        let stdout = child.0.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(serde_json::from_str(&line).unwrap_or(Value::String(line))).is_err() {
                    break;
                }
            }
        });
        StreamingChat { _child: child, lines }
    }

    pub fn next(&self) -> Value {
        self.lines.recv_timeout(CHILD_LIMIT).expect("the encrypted chat stopped answering (see its stderr above)")
    }
}
