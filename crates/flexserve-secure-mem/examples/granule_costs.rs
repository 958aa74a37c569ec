//! Per-granule costs of the granule pool for each protection, plus raw first-touch cost per page.
//!
//! Run: `cargo run --release -p flexserve-secure-mem --example granule_costs [granules]` (default 64).
//! Prints medians; nothing is asserted.

use std::time::{Duration, Instant};

use flexserve_secure_mem::{GranulePool, PoolConfig, ProtectionPolicy, DEFAULT_GRANULE_SIZE};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort_unstable();
    samples[samples.len() / 2]
}

fn micros(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

struct Costs {
    grant: Duration,
    alloc_in_place: Duration,
    alloc_moved_per_granule: Duration,
    scrub: Duration,
    release: Duration,
}

fn measure_pool(policy: ProtectionPolicy, granules: usize) -> Result<(String, Costs), Box<dyn std::error::Error>> {
    let pool = GranulePool::new(PoolConfig::flexible().with_protection(policy))?;
    let name = pool.protection().name().to_string();

    let grant = median((0..granules).map(|_| pool.grant(1).map(|r| r.elapsed)).collect::<Result<_, _>>()?);

    // Single-granule regions: alloc in place, write everything, time the drop (scrub and return).
    let mut alloc_samples = Vec::new();
    let mut scrub_samples = Vec::new();
    for _ in 0..granules {
        let started = Instant::now();
        let mut region = pool.alloc(DEFAULT_GRANULE_SIZE)?;
        alloc_samples.push(started.elapsed());
        region.as_mut_slice().fill(0x5A);
        let started = Instant::now();
        drop(region);
        scrub_samples.push(started.elapsed());
    }

    // Scatter the free granules (every other one held), then time assembling a region from them.
    let singles: Vec<_> = (0..granules).map(|_| pool.alloc(1)).collect::<Result<_, _>>()?;
    let kept: Vec<_> = singles.into_iter().enumerate().filter_map(|(i, r)| (i % 2 == 1).then_some(r)).collect();
    let scattered = pool.stats().free;
    let started = Instant::now();
    let assembled = pool.alloc(scattered * DEFAULT_GRANULE_SIZE)?;
    let alloc_moved_per_granule = started.elapsed() / scattered as u32;
    drop(assembled);
    drop(kept);

    let release = median((0..granules).map(|_| pool.release(1).elapsed).collect());
    Ok((
        name,
        Costs {
            grant,
            alloc_in_place: median(alloc_samples),
            alloc_moved_per_granule,
            scrub: median(scrub_samples),
            release,
        },
    ))
}

/// Time to first-touch each 4 KiB page of a fresh 2 MiB mapping of each kind, outside the pool.
fn first_touch_per_page(kind: &str, repeats: usize) -> Option<Duration> {
    let len = DEFAULT_GRANULE_SIZE;
    let mut samples = Vec::new();
    for _ in 0..repeats {
        // SAFETY: plain system calls on a mapping created and destroyed here; the touch stays in bounds.
        unsafe {
            let (fd, flags) = if kind == "memfd_secret" {
                let fd = libc::syscall(libc::SYS_memfd_secret, libc::O_CLOEXEC as libc::c_long) as libc::c_int;
                if fd < 0 || libc::ftruncate(fd, len as libc::off_t) != 0 {
                    return None;
                }
                (fd, libc::MAP_SHARED)
            } else {
                (-1, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
            };
            let addr = libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, flags, fd, 0);
            if fd >= 0 {
                libc::close(fd);
            }
            if addr == libc::MAP_FAILED {
                return None;
            }
            if kind == "locked-anonymous" {
                libc::mlock2(addr, len, libc::MLOCK_ONFAULT);
            }
            let base = addr.cast::<u8>();
            let started = Instant::now();
            for offset in (0..len).step_by(4096) {
                std::ptr::write_volatile(base.add(offset), 1);
            }
            samples.push(started.elapsed() / (len / 4096) as u32);
            libc::munmap(addr, len);
        }
    }
    Some(median(samples))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let granules: usize = std::env::args().nth(1).map(|a| a.parse()).transpose()?.unwrap_or(64);
    println!(
        "granule {} MiB, medians over {granules} granules (alloc-moved: one region from {} scattered granules)",
        DEFAULT_GRANULE_SIZE >> 20,
        granules / 2
    );
    println!(
        "{:<17} {:>12} {:>10} {:>14} {:>11} {:>12} {:>14} {:>15}",
        "protection",
        "grant us/gr",
        "alloc us",
        "alloc-moved us",
        "scrub us/gr",
        "release us/gr",
        "1st touch us/pg",
        "grant s/GiB"
    );
    let mut policies = vec![ProtectionPolicy::LockedAnonymous, ProtectionPolicy::Unprotected];
    if flexserve_secure_mem::secret_memory_available().is_ok() {
        policies.insert(0, ProtectionPolicy::RequireSecretMemory);
    }
    for policy in policies {
        let (name, costs) = measure_pool(policy, granules)?;
        let touch = first_touch_per_page(&name, 16).map_or("n/a".to_string(), micros);
        let per_gib = costs.grant.as_secs_f64() * (1024.0 * 1024.0 * 1024.0 / DEFAULT_GRANULE_SIZE as f64);
        println!(
            "{:<17} {:>12} {:>10} {:>14} {:>11} {:>12} {:>14} {:>15.2}",
            name,
            micros(costs.grant),
            micros(costs.alloc_in_place),
            micros(costs.alloc_moved_per_granule),
            micros(costs.scrub),
            micros(costs.release),
            touch,
            per_gib
        );
    }
    Ok(())
}
