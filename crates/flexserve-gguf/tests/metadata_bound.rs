//! The reader's memory stays within a bound proportional to the file on
//! metadata built to amplify it (millions of one-byte strings, empty arrays,
//! tiny entries): at most 3 bytes per input byte plus 128 MiB, measured with a
//! counting allocator; past the bound it stops with an error naming it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use flexserve_gguf::limits::{MEMORY_ALLOWANCE, MEMORY_PER_INPUT_BYTE};
use flexserve_gguf::{GgufError, GgufHeader};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract; passed through.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = CURRENT.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const ARRAY: u32 = 9;
const STRING: u32 = 8;
const U8: u32 = 0;

fn header(kv_count: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes()); // tensors
    b.extend_from_slice(&kv_count.to_le_bytes());
    b
}

fn key(b: &mut Vec<u8>, k: &str) {
    b.extend_from_slice(&(k.len() as u64).to_le_bytes());
    b.extend_from_slice(k.as_bytes());
}

/// One array of `n` one-byte strings.
fn tiny_strings(n: u64) -> Vec<u8> {
    let mut b = header(1);
    key(&mut b, "amplify.strings");
    b.extend_from_slice(&ARRAY.to_le_bytes());
    b.extend_from_slice(&STRING.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    for _ in 0..n {
        b.extend_from_slice(&1u64.to_le_bytes());
        b.push(b'x');
    }
    b
}

/// One array of `n` empty arrays of u8.
fn empty_arrays(n: u64) -> Vec<u8> {
    let mut b = header(1);
    key(&mut b, "amplify.arrays");
    b.extend_from_slice(&ARRAY.to_le_bytes());
    b.extend_from_slice(&ARRAY.to_le_bytes());
    b.extend_from_slice(&n.to_le_bytes());
    for _ in 0..n {
        b.extend_from_slice(&U8.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
    }
    b
}

/// `n` entries with short distinct keys, each a u8.
fn tiny_entries(n: u64) -> Vec<u8> {
    let mut b = header(n);
    for i in 0..n {
        key(&mut b, &format!("{i:x}"));
        b.extend_from_slice(&U8.to_le_bytes());
        b.push(1);
    }
    b
}

/// Parses `file` and returns the result and the most memory the parse added.
fn parse_measured(file: &[u8]) -> (Result<GgufHeader, GgufError>, usize) {
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = GgufHeader::parse(file);
    (result, PEAK.load(Ordering::Relaxed) - before)
}

#[test]
fn amplifying_metadata_stays_within_its_memory_bound() {
    // Big enough that each shape's estimate outgrows the fixed allowance.
    let size = 48 << 20;
    for (name, file) in [
        ("one-byte strings", tiny_strings(size / 9)),
        ("empty arrays", empty_arrays(size / 12)),
        ("tiny entries", tiny_entries(1 << 20)),
    ] {
        let bound = MEMORY_PER_INPUT_BYTE as usize * file.len() + MEMORY_ALLOWANCE as usize;
        let (result, peak) = parse_measured(&file);
        eprintln!("{name}: {} MiB file, parse took at most {} MiB", file.len() >> 20, peak >> 20);
        assert!(peak <= bound, "{name}: {peak} bytes against a bound of {bound}");
        match result {
            Err(GgufError::LimitExceeded { what, limit_desc, .. }) => {
                assert!(what.contains("metadata memory"), "{name}: {what}");
                assert!(limit_desc.contains("per byte read"), "{name}: {limit_desc}");
                assert!(limit_desc.contains("MEMORY_PER_INPUT_BYTE"), "{name}: {limit_desc}");
            }
            other => panic!("{name}: expected the memory bound to trip, got {other:?}"),
        }
    }
    // Small files of the same shapes are within the bound and parse.
    for mut file in [tiny_strings(1000), empty_arrays(1000), tiny_entries(1000)] {
        // The data section (empty here) starts at the default alignment.
        file.resize(file.len().next_multiple_of(32), 0);
        GgufHeader::parse(&file).unwrap();
    }
}
