//! Helpers shared by the integration tests that start `flexserve serve`.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The API key the tests' daemons require.
pub const KEY: &str = "test-key-0123";
/// Every process a test starts must answer within this.
pub const CHILD_LIMIT: Duration = Duration::from_secs(90);

/// The real model (fetched by scripts/fetch-model.sh).
pub fn model() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-model.sh", p.display());
    p
}

/// The real model sealed with a fresh key (`flexserve keygen`, `flexserve
/// seal`) in `home`: (sealed file, key file).
pub fn seal(home: &Path) -> (PathBuf, PathBuf) {
    let (key, sealed) = (home.join("m.key"), home.join("m.fsm"));
    ok(flexserve(home).args(["keygen", "-o"]).arg(&key).output().unwrap());
    ok(flexserve(home)
        .arg("seal")
        .arg("--model")
        .arg(model())
        .arg("--key")
        .arg(&key)
        .arg("-o")
        .arg(&sealed)
        .output()
        .unwrap());
    (sealed, key)
}

/// `--model plain=MODEL --model sealed=SEALED`: the real model served plain and, sealed, as `sealed`.
pub fn plain_and_sealed(sealed: &Path) -> [String; 4] {
    let (plain, sealed) = (format!("plain={}", model().display()), format!("sealed={}", sealed.display()));
    ["--model".to_string(), plain, "--model".to_string(), sealed]
}

/// `flexserve` in development mode with its own FLEXSERVE_HOME and no API key from the environment.
pub fn flexserve(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_flexserve"));
    c.env("FLEXSERVE_HOME", home).env("FLEXSERVE_DEV", "1").env_remove("FLEXSERVE_API_KEY");
    c
}

/// A successful run's stdout.
pub fn ok(o: Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

/// The `listening on http://ADDR` line a child (`flexserve serve` or
/// `flexserve client`, `what`) prints first on its piped stdout, within
/// [`CHILD_LIMIT`]; the pipe stays open for the child.
pub fn wait_listening(child: &mut Child, what: &str) -> Result<String, String> {
    let stdout = child.stdout.take().expect("the child's stdout is piped");
    let (tx, rx) = mpsc::channel::<(String, ChildStdout)>();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let _ = reader.read_line(&mut line);
        let _ = tx.send((line, reader.into_inner()));
    });
    let (line, stdout) = rx.recv_timeout(CHILD_LIMIT).map_err(|_| format!("{what} did not start listening"))?;
    child.stdout = Some(stdout);
    let url = line.trim().strip_prefix("listening on ").ok_or_else(|| format!("{what} printed {line:?}"))?;
    Ok(url.to_string())
}

/// The URL a `flexserve serve --port 0` child prints on its first line of
/// stdout (`listening on http://ADDR`); the child's stdout must be piped.
pub fn listening_url(child: &mut Child) -> String {
    wait_listening(child, "the daemon").unwrap_or_else(|e| panic!("{e}"))
}

/// A running `flexserve serve --port 0 ...` in its own FLEXSERVE_HOME, its
/// stderr in `serve.log` there; stopped with SIGTERM (killed 20 s past it)
/// when dropped, a daemon a test left stopped (SIGSTOP) included.
pub struct Daemon {
    pub child: Child,
    pub url: String,
    pub home: tempfile::TempDir,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts it in `home`, `args` adding its options.
    pub fn spawn(home: tempfile::TempDir, args: impl FnOnce(&mut Command) -> &mut Command) -> Daemon {
        let log = home.path().join("serve.log");
        let child = args(flexserve(home.path()).args(["serve", "--port", "0"]))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        // Built before the daemon listens, so that a daemon that does not is stopped too.
        let mut daemon = Daemon { child, url: String::new(), home, log };
        daemon.url = wait_listening(&mut daemon.child, "flexserve serve")
            .unwrap_or_else(|e| panic!("{e}; its log:\n{}", daemon.log()));
        daemon
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// What the daemon wrote to its stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // A daemon the test already reaped has no process left to signal.
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill only signals our own child, not yet reaped (a test may have left it stopped).
        unsafe {
            libc::kill(pid, libc::SIGCONT);
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
