//! The mixed workload shared by the heap test binaries (each installs its own SecureHeap).

use std::sync::atomic::{AtomicUsize, Ordering};

/// A small xorshift generator: deterministic per thread, no dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

fn byte_for(tag: u64, index: usize) -> u8 {
    (tag as u8).wrapping_add(index as u8).wrapping_mul(13) ^ (index >> 10) as u8
}

fn check(buf: &[u8], tag: u64) {
    // Checking every byte of a large buffer would dominate the test; sample it densely instead.
    let step = if buf.len() > 1 << 16 { 97 } else { 1 };
    for i in (0..buf.len()).step_by(step) {
        assert_eq!(buf[i], byte_for(tag, i), "byte {i} of a {}-byte buffer", buf.len());
    }
    if let Some(&last) = buf.last() {
        assert_eq!(last, byte_for(tag, buf.len() - 1));
    }
}

fn fill(buf: &mut [u8], tag: u64, from: usize) {
    for (i, b) in buf.iter_mut().enumerate().skip(from) {
        *b = byte_for(tag, i);
    }
}

/// Many threads allocating, freeing and reallocating buffers of random sizes, checking their contents;
/// each thread also makes a few buffers over 16 MiB. Returns the number of buffers checked.
pub fn mixed_workload(threads: usize, rounds: usize) -> usize {
    let checked = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for thread in 0..threads {
            let checked = &checked;
            scope.spawn(move || {
                let mut rng = Rng::new(thread as u64 + 1);
                let mut live: Vec<(Vec<u8>, u64)> = Vec::new();
                for round in 0..rounds {
                    let size = match rng.below(100) {
                        0..=69 => 1 + rng.below(512),
                        70..=94 => 512 + rng.below(64 << 10),
                        95..=98 => (64 << 10) + rng.below(2 << 20),
                        _ => 1 + rng.below(4 << 20),
                    };
                    // A couple of buffers past 16 MiB per thread, at fixed rounds.
                    let size = if round == rounds / 3 || round == 2 * rounds / 3 {
                        (17 << 20) + rng.below(8 << 20)
                    } else {
                        size
                    };
                    let tag = rng.next();
                    let mut buf = vec![0u8; size];
                    assert!(buf.iter().step_by(4093).all(|&b| b == 0), "zeroed allocation");
                    fill(&mut buf, tag, 0);
                    live.push((buf, tag));

                    match rng.below(4) {
                        0 if !live.is_empty() => {
                            let (buf, tag) = live.swap_remove(rng.below(live.len()));
                            check(&buf, tag);
                            checked.fetch_add(1, Ordering::Relaxed);
                        }
                        1 if !live.is_empty() => {
                            // Grow or shrink with realloc, then check the kept prefix and refill the rest.
                            let index = rng.below(live.len());
                            let (buf, tag) = &mut live[index];
                            let old_len = buf.len();
                            let new_len =
                                if rng.below(2) == 0 { old_len * 2 + rng.below(4096) } else { old_len / 2 + 1 };
                            if new_len > old_len {
                                buf.reserve_exact(new_len - old_len);
                                buf.resize(new_len, 0);
                            } else {
                                buf.truncate(new_len);
                                buf.shrink_to_fit();
                            }
                            check(&buf[..old_len.min(new_len)], *tag);
                            fill(buf, *tag, old_len.min(new_len));
                            check(buf, *tag);
                            checked.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {}
                    }
                    // Keep the working set bounded: large buffers are freed soon, the heap reuses them.
                    while live.iter().map(|(b, _)| b.len()).sum::<usize>() > (48 << 20) {
                        let (buf, tag) = live.remove(0);
                        check(&buf, tag);
                        checked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                for (buf, tag) in live {
                    check(&buf, tag);
                    checked.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    checked.into_inner()
}
