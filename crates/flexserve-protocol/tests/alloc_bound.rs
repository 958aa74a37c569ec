//! Decoding hostile payloads allocates in proportion to the payload, never
//! what its length and count fields claim. (One test: the counting allocator
//! is global to this test binary.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use flexserve_protocol::{decode_reply, decode_request, MAX_LIST_LEN};
use rand::{Rng, SeedableRng};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Peak bytes allocated while decoding `payload` both ways.
fn peak_while_decoding(payload: &[u8]) -> usize {
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let request = decode_request(payload);
    let reply = decode_reply(payload);
    let peak = PEAK.load(Ordering::Relaxed) - base;
    drop((request, reply));
    peak
}

#[test]
fn decoding_allocates_in_proportion_to_the_payload() {
    // In memory a `String` is 24 bytes against 4 encoded (an empty stop string),
    // the worst ratio of any field; error messages add a little.
    let bound = |len: usize| 6 * len + 1024;

    // Counts and lengths that claim far more than the payload holds.
    let mut hostile = Vec::new();
    for tag in [0x85u8, 0x89, 0x86] {
        let mut p = vec![tag];
        if tag == 0x89 {
            p.extend_from_slice(&[0; 4 + 4 + 8 + 4 + 4 + 4 + 8]);
        }
        p.extend_from_slice(&(MAX_LIST_LEN as u32).to_le_bytes());
        p.extend_from_slice(&[0; 64]);
        hostile.push(p);
    }
    let mut stop_list = vec![0x06];
    stop_list.extend_from_slice(&[0; 8]);
    stop_list.push(0); // Input::Raw
    stop_list.extend_from_slice(&[0; 4 + 4 + 4 + 4 * 6 + 8]);
    stop_list.extend_from_slice(&(MAX_LIST_LEN as u32).to_le_bytes());
    hostile.push(stop_list.clone());
    // The same list, complete: the worst legitimate ratio.
    stop_list.resize(stop_list.len() + 4 * MAX_LIST_LEN, 0);
    assert!(decode_request(&stop_list).is_ok());
    hostile.push(stop_list);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0004);
    for _ in 0..5_000 {
        let len = rng.gen_range(0..256);
        hostile.push((0..len).map(|_| if rng.gen_bool(0.7) { rng.gen::<u8>() % 4 } else { rng.gen() }).collect());
    }

    for payload in &hostile {
        let peak = peak_while_decoding(payload);
        assert!(peak <= bound(payload.len()), "{peak} bytes allocated for a {}-byte payload", payload.len());
    }
}
