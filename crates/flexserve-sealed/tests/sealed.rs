//! Round trips, tampering and malformed input for sealed models.

use std::path::{Path, PathBuf};

use flexserve_gguf::{GgmlType, GgufFile, GgufWriter, Value};
use flexserve_sealed::{
    seal_file, unseal_to_gguf_bytes, ModelKey, SealError, SealOptions, SealedHeader, SealedModel, CHUNK_ENTRY_LEN,
    HEADER_TAG_LEN, PREAMBLE_LEN,
};

const CHUNK: usize = 4096;

/// Deterministic pseudo-random bytes.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// A small GGUF with tensors below, at, and across the 4 KiB chunk size.
fn tiny_gguf(dir: &Path) -> PathBuf {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::String("llama".into()));
    w.set("general.name", Value::String("sealed test model".into()));
    let tensors: [(&str, GgmlType, u64); 6] = [
        ("token_embd.weight", GgmlType::F32, 10),       // 40 bytes
        ("blk.0.attn_q.weight", GgmlType::F32, 3000),   // 12000 bytes: 3 chunks
        ("blk.0.attn_k.weight", GgmlType::F32, 1024),   // exactly 1 chunk
        ("blk.0.ffn_up.weight", GgmlType::F16, 4096),   // exactly 2 chunks
        ("blk.0.ffn_down.weight", GgmlType::F16, 4100), // 2 chunks and 8 bytes
        ("output_norm.weight", GgmlType::F32, 33),      // 132 bytes
    ];
    for (i, (name, ty, n)) in tensors.into_iter().enumerate() {
        let bytes = (n as usize) * ty.type_size();
        w.add_tensor(name, ty, &[n], noise(i as u64 + 1, bytes)).unwrap();
    }
    let path = dir.join("tiny.gguf");
    w.write_file(&path).unwrap();
    path
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    gguf: PathBuf,
    sealed: PathBuf,
    key: ModelKey,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_owned();
    let gguf = tiny_gguf(&path);
    let sealed = path.join("tiny.fsm");
    let key = ModelKey::generate();
    seal_file(&gguf, &sealed, &key, &SealOptions { chunk_size: CHUNK, ..Default::default() }, &mut |_, _| {}).unwrap();
    Fixture { _dir: dir, dir: path, gguf, sealed, key }
}

/// Opens every chunk of an in-memory sealed file. After a failed chunk the
/// output buffer (pre-filled with a marker) must be all zeros.
fn open_all(bytes: &[u8], key: &ModelKey) -> Result<Vec<u8>, SealError> {
    let model = SealedModel::open(bytes, key)?;
    let h = model.header();
    let mut out = Vec::new();
    for (index, c) in h.chunks.iter().enumerate() {
        let range = c.file_offset as usize..(c.file_offset as usize + c.sealed_len()).min(bytes.len());
        let ciphertext = bytes.get(range).unwrap_or(&[]);
        let mut plain = vec![0x5a; c.len as usize];
        if let Err(e) = model.open_chunk(index, ciphertext, &mut plain) {
            assert!(plain.iter().all(|&b| b == 0), "chunk {index}: output not zeroed after {e}");
            return Err(e);
        }
        out.extend_from_slice(&plain);
    }
    if bytes.len() as u64 != h.file_len {
        return Err(SealError::FileSize { path: "<memory>".into(), expected: h.file_len, actual: bytes.len() as u64 });
    }
    Ok(out)
}

#[test]
fn round_trip_is_byte_identical() {
    let f = fixture();
    let original = std::fs::read(&f.gguf).unwrap();
    assert_eq!(unseal_to_gguf_bytes(&f.sealed, &f.key).unwrap(), original);

    let sealed = std::fs::read(&f.sealed).unwrap();
    let plain = GgufFile::open(&f.gguf).unwrap();
    let model = SealedModel::open(&sealed, &f.key).unwrap();
    let h = model.header();
    assert_eq!(h.chunks.len(), 1 + 3 + 1 + 2 + 3 + 1);
    assert_eq!(h.gguf.tensors.len(), 6);
    for (t, info) in h.gguf.tensors.iter().enumerate() {
        let mut tensor = Vec::new();
        for index in h.chunks_of_tensor(t) {
            let c = h.chunks[index];
            assert_eq!(c.tensor_index as usize, t);
            assert!(c.len as usize <= CHUNK);
            let mut out = vec![0u8; c.len as usize];
            model
                .open_chunk(index, &sealed[c.file_range().start as usize..c.file_range().end as usize], &mut out)
                .unwrap();
            tensor.extend_from_slice(&out);
        }
        assert_eq!(tensor, plain.tensor_data(&info.name).unwrap(), "tensor {}", info.name);
    }
    // The directory is readable without the key, and the ciphertext hides the data.
    let public = SealedHeader::read(&sealed).unwrap();
    assert_eq!(public.gguf.tensors[1].name, "blk.0.attn_q.weight");
    assert_eq!(public.gguf.metadata.get_str("general.name").unwrap(), Some("sealed test model"));
    let first = public.chunks[1];
    let data = plain.tensor_data("blk.0.attn_q.weight").unwrap();
    assert_ne!(&sealed[first.file_offset as usize..][..64], &data[..64]);
}

#[test]
fn chunks_open_from_several_threads() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let model = SealedModel::open(&sealed, &f.key).unwrap();
    let expected = open_all(&sealed, &f.key).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|t| {
                let (model, sealed) = (&model, &sealed);
                s.spawn(move || {
                    let mut all = Vec::new();
                    for (i, c) in model.header().chunks.iter().enumerate() {
                        let mut out = vec![0; c.len as usize];
                        let r = c.file_range();
                        model.open_chunk(i, &sealed[r.start as usize..r.end as usize], &mut out).unwrap();
                        all.extend_from_slice(&out);
                    }
                    (t, all)
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap().1, expected);
        }
    });
}

#[test]
fn sealing_twice_gives_different_files() {
    let f = fixture();
    let other = f.dir.join("again.fsm");
    seal_file(&f.gguf, &other, &f.key, &SealOptions { chunk_size: CHUNK, ..Default::default() }, &mut |_, _| {})
        .unwrap();
    let (a, b) = (std::fs::read(&f.sealed).unwrap(), std::fs::read(&other).unwrap());
    assert_eq!(a.len(), b.len());
    let (ha, hb) = (SealedHeader::read(&a).unwrap(), SealedHeader::read(&b).unwrap());
    assert_ne!(ha.file_id, hb.file_id);
    let c = ha.chunks[0];
    assert_ne!(a[c.file_offset as usize..][..c.sealed_len()], b[c.file_offset as usize..][..c.sealed_len()]);
}

#[test]
fn progress_reaches_total() {
    let f = fixture();
    let mut calls = Vec::new();
    let out = f.dir.join("progress.fsm");
    let report =
        seal_file(&f.gguf, &out, &f.key, &SealOptions { chunk_size: CHUNK, ..Default::default() }, &mut |d, t| {
            calls.push((d, t))
        })
        .unwrap();
    assert_eq!(calls.first(), Some(&(0, report.plaintext_bytes)));
    assert_eq!(calls.last(), Some(&(report.plaintext_bytes, report.plaintext_bytes)));
    assert!(calls.windows(2).all(|w| w[0].0 <= w[1].0));
    assert_eq!(calls.len(), report.chunks + 1);
    assert_eq!(std::fs::metadata(&out).unwrap().len(), report.sealed_bytes);
}

#[test]
fn wrong_key_is_reported_as_such() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let err = SealedModel::open(&sealed, &ModelKey::generate()).unwrap_err();
    assert!(matches!(err, SealError::WrongKey), "{err}");
    assert!(err.to_string().contains("wrong model key"));
    let err = unseal_to_gguf_bytes(&f.sealed, &ModelKey::generate()).unwrap_err();
    assert!(matches!(err, SealError::WrongKey), "{err}");
}

/// Every bit flipped anywhere in the header region (preamble, GGUF header
/// and tensor directory, chunk table, header tag) is rejected before any chunk is opened.
#[test]
fn flipped_header_bits_are_rejected() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let h = SealedHeader::read(&sealed).unwrap();
    let prefix_len = h.chunks_offset as usize;
    assert_eq!(
        prefix_len,
        PREAMBLE_LEN + h.gguf_header_len as usize + h.chunks.len() * CHUNK_ENTRY_LEN + HEADER_TAG_LEN
    );
    for pos in 0..prefix_len {
        for bit in [0, 3, 7] {
            let mut bytes = sealed.clone();
            bytes[pos] ^= 1 << bit;
            let err = open_all(&bytes, &f.key).expect_err(&format!("flip of bit {bit} at byte {pos} accepted"));
            let region = region_of(&h, pos);
            assert!(
                !matches!(err, SealError::ChunkAuth { .. } | SealError::ChunkLength { .. }),
                "flip in {region} at byte {pos} got past the header: {err}"
            );
            let msg = err.to_string();
            assert!(
                msg.contains("sealed header")
                    || msg.contains("not a sealed model")
                    || msg.contains("wrong model key")
                    || msg.contains("chunk table"),
                "flip in {region} at byte {pos}: unhelpful message {msg}"
            );
        }
    }
}

fn region_of(h: &SealedHeader, pos: usize) -> &'static str {
    let gguf_end = (h.gguf_header_offset + h.gguf_header_len) as usize;
    match pos {
        p if p < PREAMBLE_LEN => "preamble",
        p if p < gguf_end => "GGUF header",
        p if p < h.tag_offset as usize => "chunk table",
        p if p < h.chunks_offset as usize => "header tag",
        _ => "chunks",
    }
}

#[test]
fn specific_header_fields_give_specific_errors() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let h = SealedHeader::read(&sealed).unwrap();
    let flip = |pos: usize| {
        let mut b = sealed.clone();
        b[pos] ^= 1;
        SealedModel::open(&b, &f.key).unwrap_err()
    };
    assert!(matches!(flip(0), SealError::NotSealed { .. }));
    assert!(matches!(flip(8), SealError::UnsupportedVersion(_)));
    assert!(matches!(flip(13), SealError::Malformed { field: "flags", .. }));
    // The device-wrap flag without its section.
    assert!(matches!(flip(12), SealError::Malformed { field: "key-wrap section length", .. }));
    assert!(matches!(flip(68), SealError::Malformed { field: "key-wrap section length", .. }));
    assert!(matches!(flip(16), SealError::WrongKey), "file id feeds the key schedule");
    assert!(matches!(flip(50), SealError::WrongKey));
    // A metadata string byte: parses, but the tag no longer matches.
    let name_at = find(&sealed, b"sealed test model");
    assert!(matches!(flip(name_at), SealError::HeaderAuth), "{}", flip(name_at));
    // A tensor name byte in the directory.
    let tensor_at = find(&sealed, b"ffn_up");
    assert!(matches!(flip(tensor_at), SealError::HeaderAuth), "{}", flip(tensor_at));
    // Chunk table: a file offset.
    let entry = h.tag_offset as usize - CHUNK_ENTRY_LEN + 16;
    assert!(matches!(flip(entry), SealError::ChunkTable { .. }), "{}", flip(entry));
    // Header tag.
    assert!(matches!(flip(h.tag_offset as usize + 5), SealError::HeaderAuth));
}

fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).expect("needle present")
}

/// Bits flipped in chunk ciphertext and tags fail that chunk, by index and tensor name.
#[test]
fn flipped_chunk_bits_are_rejected() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let h = SealedHeader::read(&sealed).unwrap();
    for (index, c) in h.chunks.iter().enumerate() {
        let start = c.file_offset as usize;
        let tag = start + c.len as usize;
        let mut positions: Vec<usize> = (start..tag).step_by(523).collect();
        positions.extend([start, tag - 1, tag, tag + 7, tag + 15]);
        for pos in positions {
            let mut bytes = sealed.clone();
            bytes[pos] ^= 0x10;
            let err = open_all(&bytes, &f.key).unwrap_err();
            let SealError::ChunkAuth { index: failed, ref tensor, .. } = err else {
                panic!("flip at byte {pos} of chunk {index}: {err}")
            };
            assert_eq!(failed, index);
            assert_eq!(tensor, &h.gguf.tensors[c.tensor_index as usize].name);
            let msg = err.to_string();
            assert!(msg.contains(&format!("chunk {index} ")) && msg.contains(tensor.as_str()), "{msg}");
        }
    }
}

#[test]
fn swapped_repeated_and_transplanted_chunks_are_rejected() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let h = SealedHeader::read(&sealed).unwrap();
    let span = |i: usize| h.chunks[i].file_offset as usize..h.chunks[i].file_offset as usize + h.chunks[i].sealed_len();
    // Chunks 1 and 2 (same tensor, full 4 KiB) and 2 and 4 (different tensors, same length).
    for (a, b) in [(1, 2), (2, 4), (5, 7)] {
        assert_eq!(h.chunks[a].len, h.chunks[b].len);
        let mut bytes = sealed.clone();
        let (ca, cb) = (sealed[span(a)].to_vec(), sealed[span(b)].to_vec());
        bytes[span(a)].copy_from_slice(&cb);
        bytes[span(b)].copy_from_slice(&ca);
        let err = open_all(&bytes, &f.key).unwrap_err();
        assert!(matches!(err, SealError::ChunkAuth { index, .. } if index == a), "swap {a},{b}: {err}");

        // Repeat: chunk a's bytes in b's place too.
        let mut bytes = sealed.clone();
        bytes[span(b)].copy_from_slice(&ca);
        let err = open_all(&bytes, &f.key).unwrap_err();
        assert!(matches!(err, SealError::ChunkAuth { index, .. } if index == b), "repeat {a}->{b}: {err}");
    }
    // Swapping two table entries (the chunks stay put) breaks the header.
    let table = h.tag_offset as usize - h.chunks.len() * CHUNK_ENTRY_LEN;
    let mut bytes = sealed.clone();
    let (e1, e2) = (table + CHUNK_ENTRY_LEN, table + 2 * CHUNK_ENTRY_LEN);
    let entry1 = sealed[e1..e1 + CHUNK_ENTRY_LEN].to_vec();
    bytes.copy_within(e2..e2 + CHUNK_ENTRY_LEN, e1);
    bytes[e2..e2 + CHUNK_ENTRY_LEN].copy_from_slice(&entry1);
    let err = open_all(&bytes, &f.key).unwrap_err();
    assert!(matches!(err, SealError::ChunkTable { index: 1, .. }), "{err}");

    // Another file sealed from the same model with the same key.
    let other_path = f.dir.join("other.fsm");
    seal_file(&f.gguf, &other_path, &f.key, &SealOptions { chunk_size: CHUNK, ..Default::default() }, &mut |_, _| {})
        .unwrap();
    let other = std::fs::read(&other_path).unwrap();
    assert_eq!(other.len(), sealed.len());
    for i in [0, 3, h.chunks.len() - 1] {
        let mut bytes = sealed.clone();
        bytes[span(i)].copy_from_slice(&other[span(i)]);
        let err = open_all(&bytes, &f.key).unwrap_err();
        assert!(matches!(err, SealError::ChunkAuth { index, .. } if index == i), "transplant {i}: {err}");
    }
    // The other file's whole header with this file's chunks.
    let mut bytes = sealed.clone();
    bytes[..h.chunks_offset as usize].copy_from_slice(&other[..h.chunks_offset as usize]);
    let err = open_all(&bytes, &f.key).unwrap_err();
    assert!(matches!(err, SealError::ChunkAuth { index: 0, .. }), "{err}");
}

#[test]
fn wrong_lengths_and_indices_are_rejected_and_zero_the_output() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let model = SealedModel::open(&sealed, &f.key).unwrap();
    let c = model.header().chunks[1];
    let r = c.file_range();
    let ct = &sealed[r.start as usize..r.end as usize];
    let mut out = vec![0x77; c.len as usize];
    let err = model.open_chunk(1, &ct[..ct.len() - 1], &mut out).unwrap_err();
    assert!(matches!(err, SealError::ChunkLength { index: 1, what: "ciphertext", .. }), "{err}");
    assert!(err.to_string().contains("blk.0.attn_q.weight"));
    assert!(out.iter().all(|&b| b == 0));
    let mut short = vec![0x77; c.len as usize - 1];
    assert!(matches!(model.open_chunk(1, ct, &mut short), Err(SealError::ChunkLength { what: "output buffer", .. })));
    let n = model.header().chunks.len();
    let err = model.open_chunk(n, ct, &mut out).unwrap_err();
    assert!(matches!(err, SealError::ChunkIndex { index, count } if index == n && count == n));
    // Right bytes, wrong index.
    let mut out = vec![0x77; c.len as usize];
    assert!(matches!(model.open_chunk(2, ct, &mut out), Err(SealError::ChunkAuth { index: 2, .. })));
    assert!(out.iter().all(|&b| b == 0));
}

#[test]
fn truncated_files_are_rejected() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let h = SealedHeader::read(&sealed).unwrap();
    let mut points: Vec<usize> = (0..h.chunks_offset as usize).step_by(7).collect();
    points.extend((h.chunks_offset as usize..sealed.len()).step_by(1009));
    points.extend([sealed.len() - 1, sealed.len() - 16, h.chunks_offset as usize]);
    let path = f.dir.join("cut.fsm");
    for &n in &points {
        let cut = &sealed[..n];
        if n < h.chunks_offset as usize {
            let err = SealedHeader::read(cut).unwrap_err();
            assert!(matches!(err, SealError::Truncated { available, .. } if available == n as u64), "cut {n}: {err}");
            assert!(err.to_string().contains(&format!("ends at byte {n}")), "{err}");
        } else {
            assert!(open_all(cut, &f.key).is_err(), "cut at {n} accepted");
        }
        if n % 3 == 0 || n >= h.chunks_offset as usize {
            std::fs::write(&path, cut).unwrap();
            let err = unseal_to_gguf_bytes(&path, &f.key).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains("truncated") || msg.contains("not a sealed model") || msg.contains("cut.fsm"),
                "{msg}"
            );
        }
    }
    // Extra bytes are refused too.
    let mut long = sealed.clone();
    long.push(0);
    std::fs::write(&path, &long).unwrap();
    assert!(matches!(unseal_to_gguf_bytes(&path, &f.key), Err(SealError::FileSize { .. })));
}

/// Random mutations and absurd counts never panic or allocate from the count.
#[test]
fn malformed_headers_never_panic() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let h = SealedHeader::read(&sealed).unwrap();
    let prefix = &sealed[..h.chunks_offset as usize];
    let mut rng = noise(99, 200_000).into_iter();
    let mut next = move || rng.next().unwrap() as usize;
    for round in 0..3000 {
        let mut bytes = prefix.to_vec();
        for _ in 0..1 + next() % 4 {
            let pos = (next() << 8 | next()) % bytes.len();
            bytes[pos] = match round % 3 {
                0 => next() as u8,
                1 => 0xff,
                _ => 0,
            };
        }
        if round % 5 == 0 {
            bytes.truncate((next() << 8 | next()) % bytes.len());
        }
        let _ = SealedHeader::read(&bytes);
        let _ = SealedHeader::read_prefix(&bytes[..]);
        let _ = SealedModel::open(&bytes, &f.key);
    }
    // Absurd sizes in each length field of the preamble.
    for (field, at) in [("chunk size", 64), ("header length", 72), ("data length", 80), ("chunk count", 88)] {
        for value in [u64::MAX, 1 << 40, 1 << 31] {
            let mut bytes = prefix.to_vec();
            let width = if at == 64 { 4 } else { 8 };
            bytes[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            let err = SealedHeader::read(&bytes).expect_err(field);
            assert!(!err.to_string().is_empty());
            let _ = SealedHeader::read_prefix(&bytes[..]);
        }
    }
    // A reader that never ends with an absurd chunk count is refused before buffering.
    let mut bytes = prefix[..PREAMBLE_LEN].to_vec();
    bytes[88..96].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let endless = std::io::Read::chain(&bytes[..], std::io::repeat(0));
    let err = SealedHeader::read_prefix(endless).unwrap_err();
    assert!(matches!(err, SealError::Malformed { .. }), "{err}");
}

#[test]
fn read_prefix_returns_exactly_the_header_region() {
    let f = fixture();
    let file = std::fs::File::open(&f.sealed).unwrap();
    let prefix = SealedHeader::read_prefix(std::io::BufReader::new(file)).unwrap();
    let h = SealedHeader::read(&prefix).unwrap();
    assert_eq!(prefix.len() as u64, h.chunks_offset);
    SealedModel::open(&prefix, &f.key).unwrap();
}

#[test]
fn key_files_round_trip_with_owner_only_mode() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.key");
    let key = ModelKey::from_bytes(&(0..32).collect::<Vec<u8>>()).unwrap();
    key.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text, "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n");
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let loaded = ModelKey::load(&path).unwrap();
    // Same key: it opens what the original sealed.
    let f = fixture();
    let sealed_with = dir.path().join("k.fsm");
    seal_file(&f.gguf, &sealed_with, &key, &SealOptions { chunk_size: CHUNK, ..Default::default() }, &mut |_, _| {})
        .unwrap();
    unseal_to_gguf_bytes(&sealed_with, &loaded).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2, "no temporary files left");

    std::fs::write(&path, "zz").unwrap();
    let err = ModelKey::load(&path).unwrap_err();
    assert!(err.to_string().contains("model.key"), "{err}");
    std::fs::write(&path, "g".repeat(64)).unwrap();
    assert!(ModelKey::load(&path).unwrap_err().to_string().contains("not a hexadecimal digit"));
    assert!(ModelKey::from_bytes(&[0; 31]).is_err());
}

#[test]
fn bad_inputs_to_seal_are_refused_cleanly() {
    let f = fixture();
    let out = f.dir.join("x.fsm");
    for size in [0, 4095, (64 << 20) + 1] {
        let err =
            seal_file(&f.gguf, &out, &f.key, &SealOptions { chunk_size: size, ..Default::default() }, &mut |_, _| {})
                .unwrap_err();
        assert!(matches!(err, SealError::Options(_)), "{err}");
    }
    let not_gguf = f.dir.join("junk.gguf");
    std::fs::write(&not_gguf, b"not a model at all").unwrap();
    let err = seal_file(&not_gguf, &out, &f.key, &SealOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("junk.gguf"), "{err}");
    let err = seal_file(&f.gguf, &f.gguf, &f.key, &SealOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, SealError::Unsealable { .. }), "{err}");
    // Non-zero padding between tensors cannot be represented.
    let mut bytes = std::fs::read(&f.gguf).unwrap();
    let g = flexserve_gguf::GgufHeader::parse(&bytes).unwrap();
    let pad = (g.data_offset + g.tensors[0].offset + g.tensors[0].byte_size()) as usize;
    assert_eq!(bytes[pad], 0);
    bytes[pad] = 1;
    let padded = f.dir.join("padded.gguf");
    std::fs::write(&padded, &bytes).unwrap();
    let err = seal_file(&padded, &out, &f.key, &SealOptions::default(), &mut |_, _| {}).unwrap_err();
    assert!(err.to_string().contains("padding"), "{err}");
    assert!(!out.exists());
    // No temporary files left behind by the failures.
    let leftovers: Vec<_> = std::fs::read_dir(&f.dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The real model round-trips exactly (skipped when the model is absent).
#[test]
fn real_model_round_trip() {
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !model.exists() {
        eprintln!("skipping: {} not found", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sealed = dir.path().join("smollm2.fsm");
    let key = ModelKey::generate();
    let report = seal_file(&model, &sealed, &key, &SealOptions::default(), &mut |_, _| {}).unwrap();
    assert_eq!(report.tensors, 272);
    let original = std::fs::read(&model).unwrap();
    let unsealed = unseal_to_gguf_bytes(&sealed, &key).unwrap();
    assert!(unsealed == original, "unsealed model differs from the original");
}

#[test]
fn chunks_open_in_place_like_into_a_separate_buffer() {
    let f = fixture();
    let sealed = std::fs::read(&f.sealed).unwrap();
    let model = SealedModel::open(&sealed, &f.key).unwrap();
    for (index, c) in model.header().chunks.iter().enumerate() {
        let range = c.file_offset as usize..c.file_offset as usize + c.sealed_len();
        let mut expected = vec![0; c.len as usize];
        model.open_chunk(index, &sealed[range.clone()], &mut expected).unwrap();
        let mut buf = sealed[range.clone()].to_vec();
        assert_eq!(model.open_chunk_in_place(index, &mut buf).unwrap(), &expected[..], "chunk {index}");

        // A flipped bit or a chunk at the wrong index fails and zeroes the buffer.
        let mut buf = sealed[range.clone()].to_vec();
        let at = index % buf.len();
        buf[at] ^= 4;
        assert!(matches!(model.open_chunk_in_place(index, &mut buf), Err(SealError::ChunkAuth { .. })));
        assert!(buf.iter().all(|&b| b == 0));
        let other = (index + 1) % model.header().chunks.len();
        let mut buf = sealed[range].to_vec();
        assert!(model.open_chunk_in_place(other, &mut buf).is_err());
        assert!(buf.iter().all(|&b| b == 0));
    }
    let mut short = vec![1u8; 10];
    assert!(matches!(model.open_chunk_in_place(0, &mut short), Err(SealError::ChunkLength { .. })));
    assert!(short.iter().all(|&b| b == 0));
    assert!(matches!(model.open_chunk_in_place(9999, &mut short), Err(SealError::ChunkIndex { .. })));
}
