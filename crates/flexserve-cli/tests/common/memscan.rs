//! A scan of another process's memory for byte strings whose presence would
//! be a leak, shared by the tests that prove what the normal world never
//! holds (isolation.rs: weights and token ids; encrypted_leaks.rs: prompts and
//! answers of encrypted sessions).
//!
//! The scan reads every readable mapping of the process through
//! /proc/PID/mem while the process is stopped (SIGSTOP): its heap, stacks,
//! anonymous and file mappings, and the buffer it shares with its secure world.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

pub fn is_root() -> bool {
    // SAFETY: geteuid has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A byte pattern whose presence would be a leak (at least 8 bytes).
pub struct Needle {
    pub bytes: Vec<u8>,
    /// What it is, for the failure message.
    pub what: String,
    /// Which group it belongs to (needles are counted by kind).
    pub kind: &'static str,
}

/// Finds many needles in one pass: a bitmap over a hash of each needle's
/// first 8 bytes filters positions before an exact comparison.
pub struct Matcher {
    pub needles: Vec<Needle>,
    filter: Vec<u64>,
    by_prefix: HashMap<u64, Vec<usize>>,
    longest: usize,
}

const FILTER_BITS: u32 = 24;

fn filter_slot(prefix: u64) -> usize {
    (prefix.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (64 - FILTER_BITS)) as usize
}

impl Matcher {
    pub fn new(needles: Vec<Needle>) -> Matcher {
        let mut filter = vec![0u64; (1 << FILTER_BITS) / 64];
        let mut by_prefix: HashMap<u64, Vec<usize>> = HashMap::new();
        for (i, n) in needles.iter().enumerate() {
            assert!(n.bytes.len() >= 8, "needle {} is shorter than 8 bytes", n.what);
            let prefix = u64::from_le_bytes(n.bytes[..8].try_into().unwrap());
            let slot = filter_slot(prefix);
            filter[slot / 64] |= 1 << (slot % 64);
            by_prefix.entry(prefix).or_default().push(i);
        }
        let longest = needles.iter().map(|n| n.bytes.len()).max().unwrap_or(8);
        Matcher { needles, filter, by_prefix, longest }
    }

    /// Marks in `found` the needles that occur in `data`.
    pub fn scan(&self, data: &[u8], found: &mut [bool]) {
        if data.len() < 8 {
            return;
        }
        for at in 0..=data.len() - 8 {
            let prefix = u64::from_le_bytes(data[at..at + 8].try_into().unwrap());
            let slot = filter_slot(prefix);
            if self.filter[slot / 64] & (1 << (slot % 64)) == 0 {
                continue;
            }
            if let Some(candidates) = self.by_prefix.get(&prefix) {
                for &i in candidates {
                    if data[at..].starts_with(&self.needles[i].bytes) {
                        found[i] = true;
                    }
                }
            }
        }
    }

    /// The needles found in `data`.
    pub fn found_in(&self, data: &[u8]) -> Vec<bool> {
        let mut found = vec![false; self.needles.len()];
        self.scan(data, &mut found);
        found
    }

    /// For the needles of `kind`: (how many were found, how many there are, what was found).
    pub fn hits(&self, found: &[bool], kind: &str) -> (usize, usize, Vec<String>) {
        let of_kind: Vec<usize> = (0..found.len()).filter(|&i| self.needles[i].kind == kind).collect();
        let hits: Vec<String> = of_kind.iter().filter(|&&i| found[i]).map(|&i| self.needles[i].what.clone()).collect();
        (hits.len(), of_kind.len(), hits)
    }
}

/// What a scan of one process saw.
pub struct Scan {
    pub found: Vec<bool>,
    pub mappings: usize,
    pub bytes_read: u64,
    pub bytes_unreadable: u64,
    /// Command names of the process's children (the secure world, for a sealed model).
    pub children: Vec<String>,
}

impl Scan {
    /// Whether a child's command name (cut to 15 bytes) is flexserve-secure.
    pub fn has_secure_child(&self) -> bool {
        self.children.iter().any(|c| is_secure_world(c))
    }
}

/// The children of `pid` (of every thread: a daemon starts the secure world
/// from a worker thread): their pids and command names (cut to 15 bytes).
pub fn children(pid: u32) -> std::io::Result<Vec<(u32, String)>> {
    let mut children = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))?.flatten() {
        children += &std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        children.push(' ');
    }
    Ok(children
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .map(|c: u32| (c, std::fs::read_to_string(format!("/proc/{c}/comm")).unwrap_or_default().trim().to_owned()))
        .collect())
}

/// Whether a command name (cut to 15 bytes) is flexserve-secure's.
pub fn is_secure_world(name: &str) -> bool {
    !name.is_empty() && "flexserve-secure".starts_with(name)
}

/// Reads every readable mapping of `pid` through /proc/PID/mem and searches it.
/// Unreadable pages (guard pages, [vvar], ...) are counted and skipped.
pub fn scan_process(pid: u32, matcher: &Matcher) -> std::io::Result<Scan> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let mem = File::open(format!("/proc/{pid}/mem"))?;
    let children = children(pid)?.into_iter().map(|(_, name)| name).collect();
    let mut scan =
        Scan { found: vec![false; matcher.needles.len()], mappings: 0, bytes_read: 0, bytes_unreadable: 0, children };
    const CHUNK: u64 = 4 << 20;
    const PAGE: u64 = 4096;
    for line in maps.lines() {
        let mut fields = line.split_whitespace();
        let (Some(range), Some(perms)) = (fields.next(), fields.next()) else { continue };
        let name = fields.nth(3).unwrap_or("");
        if !perms.starts_with('r') || name.starts_with("[vvar") || name == "[vsyscall]" {
            continue;
        }
        let (start, end) = range.split_once('-').expect("maps range");
        let (start, end) = (u64::from_str_radix(start, 16).unwrap(), u64::from_str_radix(end, 16).unwrap());
        scan.mappings += 1;
        // Bytes carried over from the previous chunk, so that needles across a chunk boundary are found.
        let mut carry: Vec<u8> = Vec::new();
        let mut at = start;
        while at < end {
            let len = CHUNK.min(end - at) as usize;
            let mut buf = vec![0u8; len];
            let got = read_fully(&mem, &mut buf, at);
            if got < len {
                // Fall back to page by page for the rest of this chunk.
                let mut page_at = at + got as u64;
                let mut filled = got;
                buf.truncate(got);
                while page_at < at + len as u64 {
                    let mut page = vec![0u8; PAGE as usize];
                    let n = read_fully(&mem, &mut page, page_at);
                    if n == page.len() {
                        buf.extend_from_slice(&page);
                        filled += n;
                    } else {
                        // An unreadable page ends the contiguous run.
                        scan_with_carry(matcher, &mut carry, &buf, &mut scan.found);
                        carry.clear();
                        buf.clear();
                        scan.bytes_unreadable += PAGE;
                    }
                    page_at += PAGE;
                }
                scan.bytes_read += filled as u64;
            } else {
                scan.bytes_read += len as u64;
            }
            scan_with_carry(matcher, &mut carry, &buf, &mut scan.found);
            at += len as u64;
        }
    }
    Ok(scan)
}

fn scan_with_carry(matcher: &Matcher, carry: &mut Vec<u8>, data: &[u8], found: &mut [bool]) {
    if data.is_empty() {
        return;
    }
    let mut joined = std::mem::take(carry);
    joined.extend_from_slice(data);
    matcher.scan(&joined, found);
    let keep = (matcher.longest - 1).min(joined.len());
    *carry = joined[joined.len() - keep..].to_vec();
}

/// pread until `buf` is full or a read fails; returns the bytes read.
pub fn read_fully(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) | Err(_) => break,
            Ok(n) => done += n,
        }
    }
    done
}

pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill only sends a signal to our own child process.
    let r = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert_eq!(r, 0, "kill({pid}, {sig}): {}", std::io::Error::last_os_error());
}

/// Waits until /proc/PID/stat says the process is stopped.
pub fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the parenthesised command name.
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if state == Some('T') || state == Some('t') {
            return;
        }
        assert!(Instant::now() < deadline, "process {pid} did not stop (state {state:?})");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stops `pid`, scans its memory, and lets it go on (even if the scan fails).
pub fn scan_stopped(pid: u32, matcher: &Matcher) -> std::io::Result<Scan> {
    signal(pid, libc::SIGSTOP);
    wait_stopped(pid);
    let scan = scan_process(pid, matcher);
    signal(pid, libc::SIGCONT);
    scan
}
