//! A TCP relay on loopback between a client and `flexserve serve`, shared by
//! the encrypted-session tests: it records the traffic it carries (to search
//! a capture for what must not be in it) or cuts an answer's event stream
//! short (to see a truncated answer refused). Bounded: it listens on
//! 127.0.0.1 only, records at most [`RECORD_LIMIT`] bytes a direction, serves
//! at most [`MAX_CONNECTIONS`] connections and rewrites responses of at most
//! [`RESPONSE_LIMIT`] bytes.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What a [`Relay`] does with the traffic it carries.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum RelayMode {
    /// Carries the bytes as they are, recording both directions.
    Record,
    /// Carries one request per connection and answers it whole, less its
    /// last server-sent event (the answer's `done` record): a stream cut short.
    DropLastEvent,
}

/// Most bytes recorded per direction, most connections served, largest response rewritten.
pub const RECORD_LIMIT: usize = 16 << 20;
pub const MAX_CONNECTIONS: usize = 256;
pub const RESPONSE_LIMIT: usize = 16 << 20;

struct RelayState {
    mode: RelayMode,
    upstream: String,
    /// Client to daemon, daemon to client.
    up: Mutex<Vec<u8>>,
    down: Mutex<Vec<u8>>,
    overflow: AtomicBool,
    connections: AtomicUsize,
    dropped_events: AtomicUsize,
    /// Every socket, shut down when the relay is dropped (which ends its threads).
    sockets: Mutex<Vec<TcpStream>>,
    stop: AtomicBool,
}

/// A TCP relay between a client and the daemon, on 127.0.0.1.
pub struct Relay {
    addr: std::net::SocketAddr,
    state: Arc<RelayState>,
    accept: Option<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(upstream: &str, mode: RelayMode) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(RelayState {
            mode,
            upstream: upstream.to_string(),
            up: Mutex::default(),
            down: Mutex::default(),
            overflow: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            dropped_events: AtomicUsize::new(0),
            sockets: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let s = state.clone();
        let accept = std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                if s.connections.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    continue;
                }
                let Ok(server) = TcpStream::connect(&s.upstream) else { continue };
                {
                    let mut sockets = s.sockets.lock().unwrap();
                    sockets.push(client.try_clone().unwrap());
                    sockets.push(server.try_clone().unwrap());
                }
                let s = s.clone();
                std::thread::spawn(move || match s.mode {
                    RelayMode::Record => s.pipe(client, server),
                    RelayMode::DropLastEvent => s.drop_last_event(client, server),
                });
            }
        });
        Relay { addr, state, accept: Some(accept) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What was recorded so far in each direction (client to daemon, daemon to client), emptied.
    pub fn take(&self) -> (Vec<u8>, Vec<u8>) {
        assert!(!self.state.overflow.load(Ordering::SeqCst), "the relay recorded more than {RECORD_LIMIT} bytes");
        let up = std::mem::take(&mut *self.state.up.lock().unwrap());
        let down = std::mem::take(&mut *self.state.down.lock().unwrap());
        (up, down)
    }

    pub fn dropped_events(&self) -> usize {
        self.state.dropped_events.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop, which then sees `stop`; no socket is added after it ends.
        let _ = TcpStream::connect(self.addr);
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
        for socket in self.state.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(Shutdown::Both);
        }
    }
}

impl RelayState {
    fn record(&self, into: &Mutex<Vec<u8>>, bytes: &[u8]) {
        let mut buf = into.lock().unwrap();
        if buf.len() + bytes.len() > RECORD_LIMIT {
            self.overflow.store(true, Ordering::SeqCst);
        } else {
            buf.extend_from_slice(bytes);
        }
    }

    /// Copies `from` to `to`, recording, until `from` ends.
    fn copy(&self, mut from: TcpStream, mut to: TcpStream, record: &Mutex<Vec<u8>>) {
        let mut buf = [0u8; 16 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.record(record, &buf[..n]);
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }

    fn pipe(self: Arc<Self>, client: TcpStream, server: TcpStream) {
        let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let s = self.clone();
        let up = std::thread::spawn(move || s.copy(client2, server2, &s.up));
        self.copy(server, client, &self.down);
        let _ = up.join();
    }

    /// One exchange: the request as it is, the response read whole and sent
    /// without its last event (when it is an event stream), then both closed.
    fn drop_last_event(self: Arc<Self>, client: TcpStream, server: TcpStream) {
        let (client2, server2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        let s = self.clone();
        std::thread::spawn(move || s.copy(client2, server2, &s.up));
        let mut client = client;
        let mut reader = BufReader::new(server.try_clone().unwrap());
        // A failed exchange is the client's to notice: the connection just closes.
        let _ = (|| -> std::io::Result<()> {
            loop {
                let head = read_head(&mut reader)?;
                let status: u16 = head[0].split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                if (100..200).contains(&status) {
                    client.write_all(format!("{}\r\n\r\n", head.join("\r\n")).as_bytes())?;
                    continue;
                }
                let mut body = read_body(&mut reader, &head)?;
                let sse = header(&head, "content-type").is_some_and(|v| v.starts_with("text/event-stream"));
                if sse {
                    body = self.without_last_event(&body);
                }
                let mut out: Vec<String> = vec![head[0].clone()];
                out.extend(
                    head[1..]
                        .iter()
                        .filter(|l| {
                            let name = l.split(':').next().unwrap_or("").trim().to_ascii_lowercase();
                            !matches!(name.as_str(), "content-length" | "transfer-encoding" | "connection")
                        })
                        .cloned(),
                );
                out.push(format!("content-length: {}", body.len()));
                out.push("connection: close".to_string());
                let mut response = format!("{}\r\n\r\n", out.join("\r\n")).into_bytes();
                response.extend_from_slice(&body);
                self.record(&self.down, &response);
                client.write_all(&response)?;
                return client.flush();
            }
        })();
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    }

    fn without_last_event(&self, body: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(body);
        let mut events: Vec<&str> = text.split_inclusive("\n\n").collect();
        if let Some(last) = events.iter().rposition(|e| e.lines().any(|l| l.starts_with("data:"))) {
            events.remove(last);
            self.dropped_events.fetch_add(1, Ordering::SeqCst);
        }
        events.concat().into_bytes()
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string())
}

/// The status line and header lines of an HTTP response.
fn read_head(r: &mut impl BufRead) -> std::io::Result<Vec<String>> {
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            return Err(invalid("the connection ended in a response head"));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        match (line.is_empty(), lines.is_empty()) {
            (true, true) => continue,
            (true, false) => return Ok(lines),
            _ => {}
        }
        if lines.len() > 100 {
            return Err(invalid("a response head of over 100 lines"));
        }
        lines.push(line.to_string());
    }
}

fn header<'a>(head: &'a [String], name: &str) -> Option<&'a str> {
    head[1..].iter().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then_some(v.trim())
    })
}

/// A response's body, whole: chunked, of a content length, or up to the end of the connection.
fn read_body(r: &mut impl BufRead, head: &[String]) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if header(head, "transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        loop {
            let mut size = String::new();
            r.read_line(&mut size)?;
            let size = size.trim().split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size, 16).map_err(|_| invalid("a chunk size that is not hex"))?;
            if size == 0 {
                // Trailers, up to the empty line.
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line)? == 0 || line.trim().is_empty() {
                        return Ok(body);
                    }
                }
            }
            if body.len() + size > RESPONSE_LIMIT {
                return Err(invalid("a response over the relay's limit"));
            }
            let at = body.len();
            body.resize(at + size, 0);
            r.read_exact(&mut body[at..])?;
            let mut crlf = [0u8; 2];
            r.read_exact(&mut crlf)?;
        }
    } else if let Some(len) = header(head, "content-length") {
        let len: usize = len.parse().map_err(|_| invalid("a content-length that is not a number"))?;
        if len > RESPONSE_LIMIT {
            return Err(invalid("a response over the relay's limit"));
        }
        body.resize(len, 0);
        r.read_exact(&mut body)?;
    } else {
        r.take(RESPONSE_LIMIT as u64).read_to_end(&mut body)?;
    }
    Ok(body)
}
