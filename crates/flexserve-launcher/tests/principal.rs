//! The secure world as its own principal, attacked from the normal world.
//!
//! Each test starts a real service: `flexserve-launcher` (as root) gives
//! `flexserve-secure` a uid of its own and a socket only one group may use;
//! the normal world is an unprivileged user in that group, created here.
//! Without root these tests cannot create users or run the launcher: they
//! say so on stderr ("SKIPPED") and pass without checking anything.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The accounts the tests create (once; kept for later runs).
const SECURE_USER: &str = "fs-test-secure";
const PEER_GROUP: &str = "fs-test-peers";
const NORMAL_USER: &str = "fs-test-normal";
const OUTSIDER: &str = "fs-test-outsider";

fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Creates the accounts once; false (after saying why) where that is impossible.
fn accounts() -> bool {
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    let ready = READY.get_or_init(|| {
        if !is_root() {
            return Err("not root: cannot create users or start the launcher".to_string());
        }
        let run = |args: &[&str]| {
            let o = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
            // 9: the account exists already.
            if o.status.success() || o.status.code() == Some(9) {
                Ok(())
            } else {
                Err(format!("{args:?}: {}", String::from_utf8_lossy(&o.stderr)))
            }
        };
        run(&["groupadd", "--system", PEER_GROUP])?;
        run(&["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SECURE_USER])?;
        run(&["useradd", "--create-home", "--groups", PEER_GROUP, NORMAL_USER])?;
        run(&["useradd", "--create-home", OUTSIDER])
    });
    match ready {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED: the principal tests need root ({why})");
            false
        }
    }
}

fn bin_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_flexserve-launcher")).parent().unwrap().to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.is_file(), "{} is missing: build the workspace (cargo build --workspace)", p.display());
    p
}

fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

fn id(flag: &str, user: &str) -> u32 {
    let o = Command::new("id").args([flag, user]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
}

fn group_id(group: &str) -> u32 {
    let o = Command::new("getent").args(["group", group]).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split(':').nth(2).unwrap().parse().unwrap()
}

/// A running secure world service and a FlexServe home per user.
struct Service {
    dir: tempfile::TempDir,
    state: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Service {
    fn start() -> Service {
        let dir = tempfile::tempdir().unwrap();
        // The normal world must reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let state = dir.path().join("state");
        let socket = dir.path().join("run/secure.sock");
        let log = dir.path().join("secure.log");
        let child = Command::new(bin("flexserve-launcher"))
            .arg("--state-dir")
            .arg(&state)
            .arg("--socket")
            .arg(&socket)
            .args(["--user", SECURE_USER, "--group", PEER_GROUP])
            .arg("--secure-bin")
            .arg(bin("flexserve-secure"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut service = Service { dir, state, socket, log, child: Some(child) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !service.log_text().contains("serving (uid") {
            if let Some(status) = service.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("the service exited ({status}): {}", service.log_text());
            }
            assert!(Instant::now() < deadline, "the service did not come up: {}", service.log_text());
            std::thread::sleep(Duration::from_millis(20));
        }
        service
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        // The launcher execs the secure world: same process.
        self.child.as_ref().unwrap().id()
    }

    /// A FlexServe home for `user`, owned by it.
    fn home(&self, user: &str) -> PathBuf {
        let home = self.dir.path().join(format!("home-{user}"));
        if !home.exists() {
            std::fs::create_dir(&home).unwrap();
            let uid = id("-u", user);
            let gid = id("-g", user);
            std::os::unix::fs::chown(&home, Some(uid), Some(gid)).unwrap();
        }
        home
    }

    /// `flexserve ARGS` as `user`, against this service.
    fn flexserve(&self, user: &str, args: &[&str]) -> Command {
        let mut c = Command::new("setpriv");
        c.args(["--reuid", user, "--regid", user, "--init-groups", "--"])
            .arg(bin("flexserve"))
            .args(args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", self.home(user))
            .env("FLEXSERVE_HOME", self.home(user))
            .env("FLEXSERVE_SECURE_SOCKET", &self.socket);
        c
    }

    fn run(&self, user: &str, args: &[&str]) -> Output {
        self.flexserve(user, args).output().unwrap()
    }

    /// Stops the service (SIGTERM) and returns its exit status and log.
    fn stop(&mut self) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill sends a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().unwrap();
        (status, self.log_text())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn err(o: Output) -> String {
    assert!(!o.status.success(), "unexpected success: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!e.contains("panicked"), "{e}");
    e
}

/// Copies the real model where the normal user can read it.
fn model_for(service: &Service, user: &str) -> PathBuf {
    let dst = service.home(user).join("model.gguf");
    std::fs::copy(model(), &dst).unwrap();
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o644)).unwrap();
    dst
}

/// The real model, sealed by `user` to the service's device key (asked of
/// the secure world): (plain copy, sealed file).
fn sealed_to_device(service: &Service, user: &str) -> (PathBuf, PathBuf) {
    let plain = model_for(service, user);
    let public = ok(service.run(user, &["device-key"])).trim().to_string();
    assert_eq!(public.len(), 64, "{public}");
    let sealed = service.home(user).join("m.fsm");
    ok(service
        .run(user, &["seal", "--model", plain.to_str().unwrap(), "--to", &public, "-o", sealed.to_str().unwrap()]));
    (plain, sealed)
}

fn generate_args<'a>(model: &'a str, prompt_file: &'a str) -> Vec<&'a str> {
    vec!["generate", "--model", model, "--prompt-file", prompt_file, "--max-tokens", "24", "--temperature", "0"]
}

#[test]
fn the_normal_world_reaches_no_key_no_memory_and_no_choice() {
    if !accounts() {
        return;
    }
    let service = Service::start();
    let status = ok(service.run(NORMAL_USER, &["status", "--json"]));
    let s: serde_json::Value = serde_json::from_str(status.trim()).unwrap();
    assert_eq!(s["deployment"], "service", "{s}");
    assert_eq!(s["unprotected"], false);
    assert_eq!(s["secure_uid"], id("-u", SECURE_USER));
    assert_eq!(s["pid"], service.pid());
    assert!(s["policy"].as_array().unwrap().iter().any(|l| l == "allow_perplexity = false"), "{s}");
    // Where root could still inject code, status says so.
    if s["ptrace_scope"] != "3" {
        let warnings = s["warnings"].as_array().unwrap();
        assert!(warnings.iter().any(|w| w.as_str().unwrap().contains("ptrace_scope")), "{s}");
    }

    // Each attack, as the normal world's user, with what stopped it.
    let o = Command::new("setpriv")
        // The system interpreter: a user's own (pyenv under /root) is not the normal user's to run.
        .args(["--reuid", NORMAL_USER, "--regid", NORMAL_USER, "--init-groups", "--", "/usr/bin/python3"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexserve-cli/tests/attacks/normal_world.py"))
        .arg(service.pid().to_string())
        .arg(&service.state)
        .arg(bin("flexserve-secure"))
        .arg(group_id(PEER_GROUP).to_string())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&o.stdout).into_owned();
    eprintln!("{report}");
    assert!(o.status.success(), "an attack succeeded:\n{report}{}", String::from_utf8_lossy(&o.stderr));
    for (attempt, stopper) in [
        ("read the device key", "EACCES"),
        ("list the state directory", "EACCES"),
        ("rewrite the policy", "EACCES"),
        ("read /proc/PID/mem", "EACCES"),
        ("process_vm_readv", "EPERM"),
        ("ptrace attach", "EPERM"),
        ("PTRACE_TRACEME before exec of the secure binary", "is tracing the secure world"),
    ] {
        let line = report.lines().find(|l| l.starts_with(attempt)).unwrap_or_else(|| panic!("{attempt}: not tried"));
        assert!(line.contains("stopped by") && line.contains(stopper), "{line}");
    }

    // Choosing the binary, keys or policy: the service takes none of them
    // from a peer; the CLI says so instead of pretending.
    let (_, sealed) = sealed_to_device(&service, NORMAL_USER);
    let m = sealed.to_str().unwrap();
    let mut c = service.flexserve(NORMAL_USER, &["status", "--json"]);
    c.env("FLEXSERVE_SECURE_BIN", "/bin/false");
    let s: serde_json::Value = serde_json::from_str(ok(c.output().unwrap()).trim()).unwrap();
    assert_eq!(s["pid"], service.pid(), "the binary is the service's, not the peer's");
    for (flag, value, said) in
        [("--vendor-pubkey", "00", "policy"), ("--key", "/dev/null", "key import"), ("--locked-memory", "", "policy")]
    {
        let mut args = vec!["generate", "--model", m, "--prompt", "x", flag];
        if !value.is_empty() {
            args.push(value);
        }
        let e = err(service.run(NORMAL_USER, &args));
        assert!(e.contains(flag) && e.contains(said), "{flag}: {e}");
    }

    // A user outside the group cannot even connect (the socket is the
    // group's, mode 0660); the service's own check behind it is
    // `Admission::admits` (unit-tested in flexserve-secure).
    let e = err(service.run(OUTSIDER, &["status"]));
    assert!(e.contains("does not admit this user"), "{e}");
}

#[test]
fn models_sealed_to_the_device_or_imported_run_and_nothing_readable_decrypts_them() {
    if !accounts() {
        return;
    }
    let mut service = Service::start();
    let user = NORMAL_USER;
    let home = service.home(user);
    let plain = model_for(&service, user);
    let prompt = home.join("prompt.txt");
    std::fs::write(&prompt, "def fibonacci(n):").unwrap();
    let (p, pf) = (plain.to_str().unwrap(), prompt.to_str().unwrap());
    let expected = ok(service.run(user, &generate_args(p, pf)));
    assert!(!expected.is_empty());

    // Sealed to this device: the public key comes from the secure world.
    let (_, to_device) = sealed_to_device(&service, user);
    assert_eq!(ok(service.run(user, &generate_args(to_device.to_str().unwrap(), pf))), expected);

    // Sealed with a model key: refused until imported; imported, the key file goes.
    let key = home.join("vendor.key");
    let with_key = home.join("keyed.fsm");
    let (k, wk) = (key.to_str().unwrap(), with_key.to_str().unwrap());
    ok(service.run(user, &["keygen", "-o", k]));
    ok(service.run(user, &["seal", "--model", p, "--key", k, "-o", wk]));
    let e = err(service.run(user, &generate_args(wk, pf)));
    assert!(e.contains("key import"), "{e}");
    ok(service.run(user, &["key", "import", "--key", k, "--remove"]));
    assert!(!key.exists(), "the raw key file is gone");
    assert_eq!(ok(service.run(user, &generate_args(wk, pf))), expected);
    // Scoring is off by policy.
    let e = err(service.run(user, &["perplexity", "--model", wk, "--file", pf, "--ctx", "64"]));
    assert!(e.contains("scoring is off") && e.contains("Policy"), "{e}");

    // Everything the normal world can read, tried as a key: nothing opens either model.
    let mut readable = Vec::new();
    collect_files(&home, &mut readable);
    assert!(readable.iter().any(|f| f.extension().is_some_and(|e| e == "stored")), "{readable:?}");
    for model in [&to_device, &with_key] {
        let header = {
            let f = std::fs::File::open(model).unwrap();
            flexserve_sealed::SealedHeader::read_prefix(std::io::BufReader::new(f)).unwrap()
        };
        for file in &readable {
            let bytes = std::fs::read(file).unwrap();
            for candidate in key_candidates(&bytes) {
                let as_model_key = flexserve_sealed::ModelKey::from_bytes(&candidate).unwrap();
                let opened = flexserve_sealed::SealedModel::open_with_keys(&header, None, &[as_model_key], None);
                assert!(opened.is_err(), "{} opened {}", file.display(), model.display());
                let device = flexserve_sealed::DeviceSecretKey::from_bytes(candidate);
                let opened = flexserve_sealed::SealedModel::open_with_keys(&header, Some(&device), &[], None);
                assert!(opened.is_err(), "{} opened {} as a device key", file.display(), model.display());
            }
        }
    }

    // Stopping the service scrubs and releases everything it held.
    let (status, log) = service.stop();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("scrubbed and released"), "{log}");
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            collect_files(&path, out);
        } else {
            out.push(path);
        }
    }
}

/// 32-byte keys a file could hold: as hex text, and every aligned window of its raw bytes (small files).
fn key_candidates(bytes: &[u8]) -> Vec<[u8; 32]> {
    let mut out = Vec::new();
    let text = String::from_utf8_lossy(bytes);
    let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let decoded: Vec<u8> =
        (0..digits.len() / 2).filter_map(|i| u8::from_str_radix(&digits[2 * i..2 * i + 2], 16).ok()).collect();
    for source in [&decoded[..], bytes] {
        if source.len() <= 4096 {
            for w in source.windows(32).step_by(4) {
                out.push(w.try_into().unwrap());
            }
        }
    }
    out
}

#[test]
fn a_peer_that_leaves_mid_generation_stops_it_and_the_service_serves_on() {
    if !accounts() {
        return;
    }
    let service = Service::start();
    let user = NORMAL_USER;
    let (_, sealed) = sealed_to_device(&service, user);
    let s = sealed.to_str().unwrap();

    // A long generation from standard input; killed once its first text arrives.
    let mut child = service
        .flexserve(user, &["generate", "--model", s, "--prompt-file", "-", "--max-tokens", "4000", "--ctx", "4096"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, b"Once upon a time").unwrap();
    }
    let mut first = [0u8; 1];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();

    // Its session's memory is scrubbed and given back within a bound.
    let t0 = Instant::now();
    loop {
        let s: serde_json::Value = serde_json::from_str(ok(service.run(user, &["status", "--json"])).trim()).unwrap();
        if s["in_use"] == 0 && s["granted"] == 0 {
            eprintln!("session memory back {} ms after the peer died", t0.elapsed().as_millis());
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "the dead peer's session still holds memory: {s}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // And the service goes on serving.
    let prompt = service.home(user).join("p.txt");
    std::fs::write(&prompt, "The capital of France is").unwrap();
    let out = ok(service.run(user, &generate_args(s, prompt.to_str().unwrap())));
    assert!(!out.trim().is_empty());
    let log = BufReader::new(std::fs::File::open(&service.log).unwrap());
    assert!(log.lines().all(|l| !l.unwrap().contains("panicked")));
}

/// Flex-Mem's reserve through the daemon (`flexserve serve --secure-reserve`):
/// the secure world prepares it at start; a sealed model larger than it gets
/// the rest granted through the reserve's session; while the daemon is idle
/// the reserve grows back; an unloaded model's granules stay prepared and the
/// model loads into them again without a grant; `flexserve recall` takes
/// free granules back at once and the reserve does not grow over it; stopping
/// the daemon gives everything back.
#[test]
fn a_daemon_reserve_is_prepared_ahead_kept_topped_up_and_reused() {
    if !accounts() {
        return;
    }
    let service = Service::start();
    let user = NORMAL_USER;
    let (_, sealed) = sealed_to_device(&service, user);
    let granted = || -> u64 {
        let s: serde_json::Value = serde_json::from_str(ok(service.run(user, &["status", "--json"])).trim()).unwrap();
        s["granted"].as_u64().unwrap()
    };
    assert_eq!(granted(), 0);
    let runtime = service.home(user).join("run");
    let mut daemon = service
        .flexserve(user, &["serve", "--port", "0", "--secure-reserve", "32M"])
        .arg("--model")
        .arg(format!("sealed={}", sealed.display()))
        .env("FLEXSERVE_RUNTIME_DIR", &runtime)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(daemon.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    let url = line.trim().strip_prefix("listening on ").unwrap().to_string();
    let curl = |method: &str, path: &str, body: Option<&str>| -> String {
        let mut c = Command::new("curl");
        c.args(["-sS", "-X", method, "-H", "Content-Type: application/json"]);
        if let Some(b) = body {
            c.args(["--data-binary", b]);
        }
        ok(c.arg(format!("{url}{path}")).output().unwrap())
    };
    let reserve = || -> serde_json::Value {
        let status: serde_json::Value = serde_json::from_str(&curl("GET", "/status", None)).unwrap();
        status["secure_reserve"].clone()
    };
    let chat = || {
        let answer = curl(
            "POST",
            "/v1/chat/completions",
            Some(r#"{"model":"sealed","messages":[{"role":"user","content":"Hi"}],"max_tokens":4,"temperature":0}"#),
        );
        assert!(answer.contains("chat.completion"), "{answer}");
    };
    let t0 = Instant::now();
    while !curl("GET", "/health", None).contains("\"ok\"") {
        assert!(t0.elapsed() < Duration::from_secs(60), "the reserve was not prepared");
        std::thread::sleep(Duration::from_millis(50));
    }
    let r = reserve();
    assert_eq!(r["granules"], 128, "32 MiB of 256 KiB granules: {r}");
    assert_eq!(granted(), 128);

    // The model needs more than the reserve: the rest is granted through the
    // reserve's session, and once the daemon is idle the reserve grows back.
    chat();
    let t0 = Instant::now();
    let r = loop {
        let r = reserve();
        if r["free"].as_u64().unwrap() >= 128 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "the reserve did not grow back: {r}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(r["granted_for_models"].as_u64().unwrap() > 0, "{r}");
    assert!(r["grown_in_background"].as_u64().unwrap() > 0, "{r}");
    let full = granted();
    assert!(full > 128, "{full}");

    // Unloading keeps what the model used, scrubbed: nothing is released and
    // the model loads into it again without a grant.
    curl("POST", "/models/unload", Some(r#"{"model":"sealed"}"#));
    let t0 = Instant::now();
    while reserve()["free"].as_u64().unwrap() < full {
        assert!(t0.elapsed() < Duration::from_secs(10), "the model's memory did not come back free: {}", reserve());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(granted(), full, "unloading released memory instead of keeping it");
    let before = reserve()["granted_for_models"].as_u64().unwrap();
    chat();
    assert_eq!(granted(), full, "loading the model again granted memory");
    assert_eq!(reserve()["granted_for_models"].as_u64().unwrap(), before);

    // A recall takes free granules back at once, and the reserve stays down.
    let recalled = ok(service
        .flexserve(user, &["recall", "--memory", "16M", "--pid", &daemon.id().to_string()])
        .env("FLEXSERVE_RUNTIME_DIR", &runtime)
        .output()
        .unwrap());
    assert!(recalled.contains("released 64 granules"), "{recalled}");
    assert_eq!(granted(), full - 64);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(granted(), full - 64, "the reserve grew over a recall");
    assert_eq!(reserve()["recalled"], 64);

    // SAFETY: kill sends SIGTERM to our own child.
    unsafe { libc::kill(daemon.id() as i32, libc::SIGTERM) };
    assert!(daemon.wait().unwrap().success());
    let t0 = Instant::now();
    while granted() != 0 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the reserve was not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Sessions are bounded per peer uid (`MAX_SESSIONS_PER_PEER` in
/// flexserve-secure's service): a uid that holds that many live sessions gets
/// one error frame naming the bound for its next connection, other uids are
/// still served, and a session that ends stops counting. The peer here is
/// this test process (root, which the service admits like any peer).
#[test]
fn sessions_are_bounded_per_peer_uid_and_an_ended_one_stops_counting() {
    use flexserve_normal::{MemoryBudget, NormalError, SecureWorld};
    use flexserve_protocol::ErrorCode;
    if !accounts() {
        return;
    }
    let service = Service::start();
    let connect = || SecureWorld::connect(&service.socket, MemoryBudget::Bytes(64 << 20));
    // Sessions until the service refuses one (each greeted, so each is live).
    let mut held = Vec::new();
    // A refusal can reach a client still writing its greeting as a closed
    // connection instead of the error frame (see below): tried again.
    let mut closed = 0;
    let message = loop {
        match connect() {
            Ok(world) => held.push(world),
            Err(NormalError::Secure { code: ErrorCode::NoMemory, message }) => break message,
            Err(NormalError::SessionClosed(_)) if closed < 20 => closed += 1,
            Err(e) => panic!("session {}: {e}", held.len() + 1),
        }
        assert!(held.len() <= 64, "no bound per peer after {} sessions", held.len());
    };
    assert!(
        message.contains("MAX_SESSIONS_PER_PEER")
            && message.contains(&format!("at most {} sessions per peer uid", held.len())),
        "{message}"
    );
    assert!(held.len() >= 2, "{message}");
    // Those held are served; so is another uid.
    held[0].status().unwrap();
    ok(service.run(NORMAL_USER, &["status"]));
    // One session ends: once the service has seen it end, the peer is served again, once.
    drop(held.pop());
    let t0 = Instant::now();
    let again = loop {
        match connect() {
            Ok(world) => break world,
            Err(NormalError::Secure { code: ErrorCode::NoMemory, .. }) => {
                assert!(t0.elapsed() < Duration::from_secs(10), "an ended session still counts");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => panic!("{e}"),
        }
    };
    held.push(again);
    // Refused again, every time, with the refusal itself: the service
    // answers one error frame and closes, and a client whose greeting met
    // the close reads that frame rather than reporting a broken pipe.
    for _ in 0..5 {
        match connect() {
            Err(NormalError::Secure { code: ErrorCode::NoMemory, message }) => {
                assert!(message.contains("MAX_SESSIONS_PER_PEER"), "{message}");
            }
            other => panic!("one session more than the bound: {:?}", other.map(|w| w.pid())),
        }
    }
    drop(held);
    let log = service.log_text();
    assert!(!log.contains("panicked"), "{log}");
}
