//! Measures sealing and opening 1 MiB chunks (AES-256-GCM through this
//! crate's chunk path) on one core. Run with `cargo run --release --example
//! aead_throughput -p flexserve-sealed`.

use std::time::Instant;

use flexserve_gguf::{GgmlType, GgufWriter, Value};
use flexserve_sealed::{seal_file, ModelKey, SealOptions, SealedModel};

fn main() {
    const MIB: usize = 1 << 20;
    const CHUNKS: usize = 256;
    let dir = std::env::temp_dir().join(format!("flexserve-sealed-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    let data: Vec<u8> = (0..CHUNKS * MIB).map(|i| (i * 31 % 251) as u8).collect();
    w.add_tensor("weights", GgmlType::F32, &[(CHUNKS * MIB / 4) as u64], data).unwrap();
    let (plain, sealed) = (dir.join("bench.gguf"), dir.join("bench.fsm"));
    w.write_file(&plain).unwrap();
    let key = ModelKey::generate();

    let t = Instant::now();
    seal_file(&plain, &sealed, &key, &SealOptions { chunk_size: MIB, ..Default::default() }, &mut |_, _| {}).unwrap();
    let seal_s = t.elapsed().as_secs_f64();

    let bytes = std::fs::read(&sealed).unwrap();
    let model = SealedModel::open(&bytes, &key).unwrap();
    let mut out = vec![0u8; MIB];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for (i, c) in model.header().chunks.iter().enumerate() {
            let r = c.file_range();
            model.open_chunk(i, &bytes[r.start as usize..r.end as usize], &mut out).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let gb = (CHUNKS * MIB) as f64 / 1e9;

    // The bare cipher, in place, without this crate's copy and checks.
    let raw = ring::aead::LessSafeKey::new(ring::aead::UnboundKey::new(&ring::aead::AES_256_GCM, &[7u8; 32]).unwrap());
    let nonce = |i: usize| {
        let mut n = [0u8; 12];
        n[..8].copy_from_slice(&(i as u64).to_be_bytes());
        ring::aead::Nonce::assume_unique_for_key(n)
    };
    let mut buf = vec![1u8; MIB];
    let mut tags = Vec::with_capacity(CHUNKS);
    let t = Instant::now();
    for i in 0..CHUNKS {
        tags.push(raw.seal_in_place_separate_tag(nonce(i), ring::aead::Aad::empty(), &mut buf).unwrap());
    }
    let raw_seal = t.elapsed().as_secs_f64();
    // Opening fails authentication here (the buffer was re-encrypted many
    // times), but the tag check runs after the full GHASH and decryption pass.
    let t = Instant::now();
    for (i, tag) in tags.into_iter().enumerate() {
        let _ = raw.open_in_place_separate_tag(nonce(i), ring::aead::Aad::empty(), tag, &mut buf, 0..);
    }
    let raw_open = t.elapsed().as_secs_f64();
    println!("raw AES-256-GCM seal_in_place 1 MiB: {:.2} GB/s", gb / raw_seal);
    println!("raw AES-256-GCM open_in_place 1 MiB: {:.2} GB/s", gb / raw_open);
    println!("seal_file (read, encrypt, write, fsync) {CHUNKS} MiB: {:.2} GB/s", gb / seal_s);
    println!("open_chunk 1 MiB chunks, one thread (best of 5): {:.2} GB/s", gb / best);
    std::fs::remove_dir_all(&dir).unwrap();
}
