//! A read-only streaming kernel: reads every byte of a buffer and folds them
//! into a checksum, as cheaply as the loads allow. `flexserve bench engine`
//! uses it to measure the machine's read bandwidth, which it sets against the
//! bytes of weights decode streams per second.
//!
//! The checksum is the wrapping sum of the buffer's little-endian 64-bit
//! words, the last partial word (fewer than eight bytes) padded with zeros.
//! Addition modulo 2^64 is associative and commutative, so any lane order
//! gives the same result: every tier keeps several vector accumulators (so
//! that the adds do not chain on one register), adds them up at the end, and
//! hands the bytes after its last whole step to the portable kernel (steps
//! are multiples of eight bytes, so the words line up).

/// Reads every byte of the buffer; returns its checksum (see the module
/// documentation), the same for every tier.
pub type ReadFn = fn(bytes: &[u8]) -> u64;

/// The portable kernel.
pub(crate) fn read_portable(bytes: &[u8]) -> u64 {
    let (words, tail) = bytes.split_at(bytes.len() - bytes.len() % 8);
    // Four sums side by side: independent adds, which the compiler also
    // turns into vector adds.
    let mut acc = [0u64; 4];
    let mut quads = words.chunks_exact(32);
    for q in &mut quads {
        for (a, w) in acc.iter_mut().zip(q.chunks_exact(8)) {
            *a = a.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
        }
    }
    let mut sum = acc.iter().fold(0u64, |s, &a| s.wrapping_add(a));
    for w in quads.remainder().chunks_exact(8) {
        sum = sum.wrapping_add(u64::from_le_bytes(w.try_into().expect("8 bytes")));
    }
    let mut last = [0u8; 8];
    last[..tail.len()].copy_from_slice(tail);
    sum.wrapping_add(u64::from_le_bytes(last))
}

/// The AVX2 kernel, for a CPU with AVX2.
#[cfg(target_arch = "x86_64")]
pub(crate) fn read_avx2(bytes: &[u8]) -> u64 {
    // SAFETY: only handed out when the CPU has AVX2 (`Isa::Avx2` or above);
    // the kernel reads `bytes` only, within its length.
    let (sum, done) = unsafe { read_avx2_impl(bytes) };
    sum.wrapping_add(read_portable(&bytes[done..]))
}

/// The checksum of the first `done` bytes (a multiple of 128) and `done`.
///
/// # Safety
/// AVX2 must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_avx2_impl(bytes: &[u8]) -> (u64, usize) {
    use std::arch::x86_64::*;
    const STEP: usize = 4 * 32;
    let done = bytes.len() - bytes.len() % STEP;
    let p = bytes.as_ptr();
    let mut acc = [_mm256_setzero_si256(); 4];
    for i in (0..done).step_by(STEP) {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + STEP <= done <= bytes.len(); unaligned loads.
            let v = unsafe { _mm256_loadu_si256(p.add(i + 32 * j).cast()) };
            *a = _mm256_add_epi64(*a, v);
        }
    }
    let all = _mm256_add_epi64(_mm256_add_epi64(acc[0], acc[1]), _mm256_add_epi64(acc[2], acc[3]));
    let mut lanes = [0u64; 4];
    // SAFETY: `lanes` is 32 bytes; unaligned store.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), all) };
    (lanes.iter().fold(0u64, |s, &l| s.wrapping_add(l)), done)
}

/// The AVX-512 kernel, for a CPU with AVX-512 F.
#[cfg(target_arch = "x86_64")]
pub(crate) fn read_avx512(bytes: &[u8]) -> u64 {
    // SAFETY: only handed out when the CPU has AVX-512 F (`Isa::Avx512`);
    // the kernel reads `bytes` only, within its length.
    let (sum, done) = unsafe { read_avx512_impl(bytes) };
    sum.wrapping_add(read_portable(&bytes[done..]))
}

/// The checksum of the first `done` bytes (a multiple of 256) and `done`.
///
/// # Safety
/// AVX-512 F must be available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn read_avx512_impl(bytes: &[u8]) -> (u64, usize) {
    use std::arch::x86_64::*;
    const STEP: usize = 4 * 64;
    let done = bytes.len() - bytes.len() % STEP;
    let p = bytes.as_ptr();
    let mut acc = [_mm512_setzero_si512(); 4];
    for i in (0..done).step_by(STEP) {
        for (j, a) in acc.iter_mut().enumerate() {
            // SAFETY: i + STEP <= done <= bytes.len(); unaligned loads.
            let v = unsafe { _mm512_loadu_si512(p.add(i + 64 * j).cast()) };
            *a = _mm512_add_epi64(*a, v);
        }
    }
    let all = _mm512_add_epi64(_mm512_add_epi64(acc[0], acc[1]), _mm512_add_epi64(acc[2], acc[3]));
    (_mm512_reduce_add_epi64(all) as u64, done)
}
