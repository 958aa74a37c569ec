//! The governor's control socket: how `flexserve recall` (or any program of
//! the same user) asks a running normal world to take secure memory back.
//!
//! Every normal-world process holding a secure world listens on
//! `<runtime dir>/<pid>.sock` (the directory is private to the user, mode
//! 0700). A client sends one line and reads one line back:
//!
//! ```text
//! recall granules N        or        recall bytes N
//! recalled released=R evicted=E micros=T granule_size=G secure_pid=P
//! error MESSAGE
//! ```
//!
//! The socket only carries management requests: the secure world decides
//! what to give up, and nothing secret passes here.

use std::fs;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// Longest request line accepted.
const MAX_LINE: u64 = 256;
/// A client that connects but does not send its line in this time is dropped.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

/// How much a client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecallAmount {
    Granules(u32),
    Bytes(u64),
}

impl RecallAmount {
    /// Granules of `granule_size` bytes that cover the amount (at most `u32::MAX`).
    pub fn granules(self, granule_size: u64) -> u32 {
        match self {
            RecallAmount::Granules(n) => n,
            RecallAmount::Bytes(b) => u32::try_from(b.div_ceil(granule_size.max(1))).unwrap_or(u32::MAX),
        }
    }
}

/// What the secure world gave back, as the control socket reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecallAnswer {
    pub released: u32,
    pub evicted: u32,
    pub micros: u64,
    pub granule_size: u64,
    pub secure_pid: u32,
}

/// Parses a request line.
pub fn parse_request(line: &str) -> Result<RecallAmount, String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    let number = |w: &str| w.parse::<u64>().map_err(|_| format!("{w:?} is not a whole number"));
    match words.as_slice() {
        ["recall", "granules", n] => {
            let n = number(n)?;
            u32::try_from(n).map(RecallAmount::Granules).map_err(|_| format!("{n} granules is too many"))
        }
        ["recall", "bytes", n] => number(n).map(RecallAmount::Bytes),
        _ => Err(format!("expected \"recall granules N\" or \"recall bytes N\", got {line:?}")),
    }
}

pub fn format_answer(a: &RecallAnswer) -> String {
    format!(
        "recalled released={} evicted={} micros={} granule_size={} secure_pid={}",
        a.released, a.evicted, a.micros, a.granule_size, a.secure_pid
    )
}

/// Parses an answer line (an `error ...` line becomes the error's text).
pub fn parse_answer(line: &str) -> Result<RecallAnswer, String> {
    let line = line.trim_end();
    if let Some(message) = line.strip_prefix("error ") {
        return Err(message.to_string());
    }
    let fields = line.strip_prefix("recalled ").ok_or_else(|| format!("unexpected answer {line:?}"))?;
    let mut a = RecallAnswer { released: 0, evicted: 0, micros: 0, granule_size: 0, secure_pid: 0 };
    for field in fields.split_whitespace() {
        let (key, value) = field.split_once('=').ok_or_else(|| format!("unexpected field {field:?}"))?;
        let value: u64 = value.parse().map_err(|_| format!("field {key}: {value:?} is not a number"))?;
        let small = |v: u64| u32::try_from(v).map_err(|_| format!("field {key}: {v} is out of range"));
        match key {
            "released" => a.released = small(value)?,
            "evicted" => a.evicted = small(value)?,
            "micros" => a.micros = value,
            "granule_size" => a.granule_size = value,
            "secure_pid" => a.secure_pid = small(value)?,
            _ => {} // Fields added later are skipped.
        }
    }
    Ok(a)
}

/// A recall asked for through the socket, waiting to be served.
pub struct PendingRecall {
    pub amount: RecallAmount,
    client: UnixStream,
}

impl PendingRecall {
    /// Tells the client what came back (or why nothing did).
    pub fn answer(self, result: Result<RecallAnswer, String>) {
        answer_client(self.client, result)
    }
}

fn answer_client(mut client: UnixStream, result: Result<RecallAnswer, String>) {
    let line = match result {
        Ok(a) => format_answer(&a),
        Err(e) => format!("error {}", e.replace('\n', " ")),
    };
    // A client that went away is no one's concern.
    let _ = writeln!(client, "{line}");
}

/// The directory of control sockets: `$FLEXSERVE_RUNTIME_DIR`, else
/// `$XDG_RUNTIME_DIR/flexserve`, else `/tmp/flexserve-<uid>`.
pub fn runtime_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLEXSERVE_RUNTIME_DIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&dir).join("flexserve");
    }
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/flexserve-{uid}"))
}

/// Creates the runtime directory private to this user, or checks that an
/// existing one is (owned by us, no access for others).
fn private_dir(dir: &Path) -> io::Result<()> {
    match fs::DirBuilder::new().recursive(true).mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::metadata(dir)?;
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "{} must be a directory owned by uid {uid} with no access for others (mode 0700)",
            dir.display()
        )));
    }
    Ok(())
}

/// The listening side, owned by the normal world's [`crate::SecureWorld`].
pub struct ControlSocket {
    path: PathBuf,
    pending: mpsc::Receiver<PendingRecall>,
}

impl ControlSocket {
    /// Listens at `<dir>/<this pid>.sock`; a thread accepts clients and
    /// queues their requests for the owner to serve.
    pub fn bind(dir: &Path) -> io::Result<ControlSocket> {
        private_dir(dir)?;
        let path = dir.join(format!("{}.sock", std::process::id()));
        // A socket left by an earlier process with this pid is stale.
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let (tx, pending) = mpsc::channel();
        std::thread::Builder::new().name("flexserve-control".into()).spawn(move || accept_loop(listener, tx))?;
        Ok(ControlSocket { path, pending })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The next request waiting, if any.
    pub fn next_pending(&self) -> Option<PendingRecall> {
        self.pending.try_recv().ok()
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // The accept thread ends with the process; the path goes now so that
        // clients do not find a socket no one serves.
        let _ = fs::remove_file(&self.path);
    }
}

fn accept_loop(listener: UnixListener, tx: mpsc::Sender<PendingRecall>) {
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        let _ = client.set_read_timeout(Some(CLIENT_TIMEOUT));
        let mut line = String::new();
        let read = client.try_clone().and_then(|c| BufReader::new(c).take(MAX_LINE).read_line(&mut line));
        if read.is_err() {
            continue;
        }
        match parse_request(&line) {
            Ok(amount) => {
                if tx.send(PendingRecall { amount, client }).is_err() {
                    return; // The owner is gone.
                }
            }
            Err(e) => answer_client(client, Err(e)),
        }
    }
}

/// The control sockets in `dir`, by the pid of their normal-world process.
pub fn list_sockets(dir: &Path) -> io::Result<Vec<(u32, PathBuf)>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let pid = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".sock"));
        if let Some(pid) = pid.and_then(|p| p.parse::<u32>().ok()) {
            found.push((pid, path));
        }
    }
    found.sort();
    Ok(found)
}

/// Asks the normal world listening at `socket` to recall `amount`; waits up
/// to `timeout` for the answer (a generation answers between two tokens).
pub fn request_recall(socket: &Path, amount: RecallAmount, timeout: Duration) -> Result<RecallAnswer, String> {
    let mut stream = UnixStream::connect(socket).map_err(|e| format!("{}: {e}", socket.display()))?;
    let line = match amount {
        RecallAmount::Granules(n) => format!("recall granules {n}\n"),
        RecallAmount::Bytes(n) => format!("recall bytes {n}\n"),
    };
    stream.write_all(line.as_bytes()).map_err(|e| format!("{}: {e}", socket.display()))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(stream).take(4096).read_line(&mut answer).map_err(|e| match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("{}: no answer within {} s", socket.display(), timeout.as_secs())
        }
        _ => format!("{}: {e}", socket.display()),
    })?;
    if answer.is_empty() {
        return Err(format!("{}: closed without an answer", socket.display()));
    }
    parse_answer(&answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_parse_both_ways() {
        assert_eq!(parse_request("recall granules 12\n"), Ok(RecallAmount::Granules(12)));
        assert_eq!(parse_request("recall bytes 1048576"), Ok(RecallAmount::Bytes(1 << 20)));
        for bad in
            ["", "recall", "recall granules", "recall granules -1", "recall pages 3", "recall granules 9999999999"]
        {
            assert!(parse_request(bad).is_err(), "{bad:?}");
        }
        assert_eq!(RecallAmount::Bytes(1).granules(4096), 1);
        assert_eq!(RecallAmount::Bytes(8192).granules(4096), 2);
        assert_eq!(RecallAmount::Bytes(u64::MAX).granules(1), u32::MAX);
        let a = RecallAnswer { released: 5, evicted: 2, micros: 1234, granule_size: 262144, secure_pid: 77 };
        assert_eq!(parse_answer(&format_answer(&a)), Ok(a));
        assert_eq!(parse_answer("error no secure world\n"), Err("no secure world".to_string()));
        assert!(parse_answer("recalled released=x").is_err());
    }

    #[test]
    fn a_client_is_answered_through_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let control = ControlSocket::bind(&dir.path().join("run")).unwrap();
        let mode = fs::metadata(dir.path().join("run")).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let path = control.path().to_path_buf();
        assert_eq!(list_sockets(&dir.path().join("run")).unwrap(), vec![(std::process::id(), path.clone())]);
        let client = std::thread::spawn({
            let path = path.clone();
            move || request_recall(&path, RecallAmount::Granules(3), Duration::from_secs(10))
        });
        let pending = loop {
            if let Some(p) = control.next_pending() {
                break p;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(pending.amount, RecallAmount::Granules(3));
        let a = RecallAnswer { released: 3, evicted: 1, micros: 10, granule_size: 4096, secure_pid: 1 };
        pending.answer(Ok(a));
        assert_eq!(client.join().unwrap(), Ok(a));
        // A malformed line is answered with the reason, not queued.
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"give memory back\n").unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        assert!(line.starts_with("error expected"), "{line}");
        drop(control);
        assert!(!path.exists(), "the socket goes with its owner");
    }
}
