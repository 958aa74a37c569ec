//! Seal and open 1 MiB buffers with AES-256-GCM through ring, aws-lc-rs and
//! RustCrypto's aes-gcm, alternating between them, and print the median
//! GB/s of each with ratios against ring.

use std::time::Instant;

const BUF: usize = 1 << 20;
const ROUNDS: usize = 7;
const ITERS: usize = 64;

fn ring_pass(key: &[u8; 32], buf: &mut Vec<u8>) -> (f64, f64) {
    use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let t0 = Instant::now();
    let mut tag = None;
    for i in 0..ITERS {
        let n = nonce(i);
        tag = Some(k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(b"aad"), buf).unwrap());
    }
    let seal = gbps(t0);
    // Open the last sealed buffer ITERS times (decrypting a copy each time).
    let sealed = buf.clone();
    let tag = tag.unwrap();
    let t0 = Instant::now();
    for _ in 0..ITERS {
        buf.copy_from_slice(&sealed);
        k.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce(ITERS - 1)),
            Aad::from(b"aad"),
            tag,
            buf,
            0..,
        )
        .unwrap();
    }
    (seal, gbps(t0))
}

fn awslc_pass(key: &[u8; 32], buf: &mut Vec<u8>) -> (f64, f64) {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).unwrap());
    let t0 = Instant::now();
    let mut tag = None;
    for i in 0..ITERS {
        tag = Some(
            k.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(b"aad"), buf).unwrap(),
        );
    }
    let seal = gbps(t0);
    let sealed = buf.clone();
    let tag = tag.unwrap();
    let t0 = Instant::now();
    for _ in 0..ITERS {
        buf.copy_from_slice(&sealed);
        k.open_separate_gather(
            Nonce::assume_unique_for_key(nonce(ITERS - 1)),
            Aad::from(b"aad"),
            &sealed,
            tag.as_ref(),
            buf,
        )
        .unwrap();
    }
    (seal, gbps(t0))
}

fn rustcrypto_pass(key: &[u8; 32], buf: &mut Vec<u8>) -> (f64, f64) {
    use aes_gcm::aead::{AeadInPlace, KeyInit};
    use aes_gcm::{Aes256Gcm, Nonce};
    let k = Aes256Gcm::new_from_slice(key).unwrap();
    let t0 = Instant::now();
    let mut tag = None;
    for i in 0..ITERS {
        tag = Some(k.encrypt_in_place_detached(Nonce::from_slice(&nonce(i)), b"aad", buf).unwrap());
    }
    let seal = gbps(t0);
    let sealed = buf.clone();
    let tag = tag.unwrap();
    let t0 = Instant::now();
    for _ in 0..ITERS {
        buf.copy_from_slice(&sealed);
        k.decrypt_in_place_detached(Nonce::from_slice(&nonce(ITERS - 1)), b"aad", buf, &tag).unwrap();
    }
    (seal, gbps(t0))
}

fn nonce(i: usize) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&(i as u64).to_be_bytes());
    n
}

fn gbps(t0: Instant) -> f64 {
    (BUF * ITERS) as f64 / t0.elapsed().as_secs_f64() / 1e9
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let key = [7u8; 32];
    let mut buf = vec![0x5au8; BUF];
    type Pass = fn(&[u8; 32], &mut Vec<u8>) -> (f64, f64);
    let passes: [(&str, Pass); 3] = [("ring", ring_pass), ("aws-lc-rs", awslc_pass), ("RustCrypto aes-gcm", rustcrypto_pass)];
    let mut seal = vec![Vec::new(); 3];
    let mut open = vec![Vec::new(); 3];
    for round in 0..ROUNDS {
        for j in 0..3 {
            let i = (j + round) % 3; // rotate the order every round
            let (s, o) = passes[i].1(&key, &mut buf);
            seal[i].push(s);
            open[i].push(o);
        }
    }
    let ring = (median(seal[0].clone()), median(open[0].clone()));
    println!("AES-256-GCM, 1 MiB buffers, 1 thread, median of {ROUNDS} rounds x {ITERS} buffers");
    println!("{:<20} {:>10} {:>10} {:>12} {:>12}", "implementation", "seal GB/s", "open GB/s", "seal / ring", "open / ring");
    for (i, (name, _)) in passes.iter().enumerate() {
        let (s, o) = (median(seal[i].clone()), median(open[i].clone()));
        println!("{name:<20} {s:>10.2} {o:>10.2} {:>12.2} {:>12.2}", s / ring.0, o / ring.1);
    }
}
