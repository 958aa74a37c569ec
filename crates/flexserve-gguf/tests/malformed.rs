//! Malformed input: every problem is an error naming what and where, never a panic.

mod common;

use std::io::Cursor;

use common::{small_file, Raw};
use flexserve_gguf::{GgufError, GgufFile, GgufHeader};

/// Parses `bytes`, expecting an error whose message contains every one of `needles`.
#[track_caller]
fn parse_err(bytes: &[u8], needles: &[&str]) -> GgufError {
    let err = GgufHeader::parse(bytes).expect_err("malformed input was accepted");
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "{msg:?} does not mention {needle:?}");
    }
    err
}

/// A file with one metadata entry and one F32 [8] tensor at `offset`,
/// with `data_len` bytes of data.
fn one_tensor(offset: u64, data_len: usize) -> Vec<u8> {
    let mut raw = Raw::header(3, 1, 1);
    raw.kv_u32("k", 1).tensor("w", &[8], 0, offset).pad_and_data(32, data_len);
    raw.0
}

#[test]
fn valid_baselines_parse() {
    GgufHeader::parse(&small_file()).unwrap();
    GgufHeader::parse(&one_tensor(0, 32)).unwrap();
    GgufHeader::parse(&Raw::header(2, 0, 0).pad_and_data(32, 0).0).unwrap();
}

#[test]
fn bad_magic() {
    let mut bytes = small_file();
    bytes[..4].copy_from_slice(b"GGML");
    let err = parse_err(&bytes, &["magic", "not a GGUF file"]);
    assert!(matches!(err, GgufError::BadMagic { found } if &found == b"GGML"));
}

#[test]
fn unsupported_versions() {
    let v1 = Raw::header(1, 0, 0).pad_and_data(32, 0).0.clone();
    parse_err(&v1, &["version 1", "32-bit counts"]);
    let v4 = Raw::header(4, 0, 0).pad_and_data(32, 0).0.clone();
    let err = parse_err(&v4, &["version 4", "supported versions are 2 and 3"]);
    assert!(matches!(err, GgufError::UnsupportedVersion { version: 4, .. }));
    let big_endian = Raw::header(3u32.swap_bytes(), 0, 0).0.clone();
    parse_err(&big_endian, &["big-endian"]);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = small_file();
    let full = GgufHeader::parse(&bytes).unwrap();
    let header_len = full.data_offset as usize;
    // Padding after the last tensor's data is optional.
    let needed = full.tensors.iter().map(|t| full.tensor_file_range(t).end as usize).max().unwrap();
    for n in 0..needed {
        let prefix = &bytes[..n];
        let err = GgufHeader::parse(prefix).expect_err("truncated file was accepted");
        let msg = err.to_string();
        if n < header_len {
            assert!(matches!(err, GgufError::Truncated { .. } | GgufError::LimitExceeded { .. }), "prefix {n}: {msg}");
        } else {
            assert!(msg.contains("extends past the end"), "prefix {n}: {msg}");
        }

        // Streaming cannot know the length, so it reports exactly where input ran out.
        match GgufHeader::read(Cursor::new(prefix)) {
            Err(GgufError::Truncated { offset, .. }) => {
                assert!(n < header_len);
                assert_eq!(offset, n as u64, "prefix {n}");
            }
            Ok(h) => {
                assert!(n >= header_len, "prefix {n} streamed fine");
                assert!(h.check_data_len((n - header_len) as u64).is_err());
            }
            Err(other) => panic!("prefix {n}: unexpected {other}"),
        }
    }
    for n in needed..=bytes.len() {
        GgufHeader::parse(&bytes[..n]).unwrap();
    }
}

/// A file without tensors may end right after its metadata, without the
/// padding that would align a data section (llama.cpp's vocabulary-only files
/// do); one with tensors may not.
#[test]
fn files_without_tensors_may_end_after_the_metadata() {
    let mut raw = Raw::header(3, 0, 1);
    raw.kv_u32("k", 7);
    let end = raw.0.len();
    assert!(!end.is_multiple_of(32), "the test needs an unaligned metadata end");
    raw.pad_and_data(32, 0);
    let padded = raw.0.clone();
    for n in end..=padded.len() {
        let h = GgufHeader::parse(&padded[..n]).unwrap_or_else(|e| panic!("{n} bytes: {e}"));
        assert_eq!(h.data_offset, n as u64);
        assert_eq!(h.metadata.get_u32("k").unwrap(), Some(7));
        let mut cursor = Cursor::new(&padded[..n]);
        let streamed = GgufHeader::read(&mut cursor).unwrap();
        assert_eq!((streamed.data_offset, cursor.position()), (n as u64, n as u64));
    }
    // Cut inside the metadata, it is still truncated.
    let err = parse_err(&padded[..end - 1], &["truncated", "metadata key \"k\""]);
    assert!(matches!(err, GgufError::Truncated { .. }));

    // With a tensor, the padding before its data is required.
    let with_tensor = one_tensor(0, 32);
    let h = GgufHeader::parse(&with_tensor).unwrap();
    let metadata_end = h.data_offset as usize - 1;
    let err = parse_err(&with_tensor[..metadata_end], &["truncated", "padding before the data section"]);
    assert!(matches!(err, GgufError::Truncated { .. }));
}

#[test]
fn truncation_messages_say_where() {
    let bytes = small_file();
    let err = GgufHeader::read(Cursor::new(&bytes[..6])).unwrap_err();
    assert_eq!(err.to_string(), "file truncated: unexpected end of data at byte 6 while reading version");
    // Cut inside the value of the second key ("llama.block_count", a u32).
    let key_end = bytes.windows(17).position(|w| w == b"llama.block_count").unwrap() + 17;
    let err = GgufHeader::read(Cursor::new(&bytes[..key_end + 6])).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "file truncated: unexpected end of data at byte {} while reading value of metadata key \"llama.block_count\"",
            key_end + 6
        )
    );
}

#[test]
fn huge_counts() {
    parse_err(&Raw::header(3, 0, u64::MAX).0, &["metadata entry count", "at byte 16", "limits::MAX_KV"]);
    parse_err(&Raw::header(3, u64::MAX, 0).0, &["tensor count", "at byte 8", "limits::MAX_TENSORS"]);
    // Within the fixed bounds but more than the file could hold.
    parse_err(&Raw::header(3, 0, 1000).u64(0).0, &["metadata entry count", "1000", "bytes left"]);
    parse_err(&Raw::header(3, 1000, 0).0, &["tensor count", "1000", "bytes left"]);
    // Streaming: fixed bounds apply, then the input runs out.
    let err = GgufHeader::read(Cursor::new(Raw::header(3, u64::MAX, 0).0)).unwrap_err();
    assert!(err.to_string().contains("tensor count"), "{err}");
    let err = GgufHeader::read(Cursor::new(Raw::header(3, 0, 1000).0)).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { offset: 24, .. }), "{err}");
}

#[test]
fn huge_string_lengths() {
    // Key length.
    parse_err(
        &Raw::header(3, 0, 1).u64(1 << 40).bytes(&[0; 64]).0,
        &["key of metadata entry #0", "at byte 24", "1099511627776", "limits::MAX_KEY_LEN"],
    );
    // String value length, beyond the cap and beyond the file.
    let mut raw = Raw::header(3, 0, 1);
    raw.str("name").u32(8).u64(u64::MAX).bytes(b"abc");
    parse_err(&raw.0, &["string of metadata key \"name\"", "at byte 40", "limits::MAX_STRING_LEN"]);
    let mut raw = Raw::header(3, 0, 1);
    raw.str("name").u32(8).u64(1000).bytes(b"abc");
    parse_err(&raw.0, &["metadata key \"name\"", "1000", "bytes left"]);
    // Streaming a plausible but false length: error at the end of the input, no huge buffer.
    let mut raw = Raw::header(3, 0, 1);
    raw.str("name").u32(8).u64(60 << 20).bytes(b"abc");
    let err = GgufHeader::read(Cursor::new(&raw.0)).unwrap_err();
    assert!(matches!(err, GgufError::Truncated { offset: 51, .. }), "{err}");
    // Tensor name length.
    let mut raw = Raw::header(3, 1, 0);
    raw.u64(u64::MAX >> 1).bytes(&[0; 64]);
    parse_err(&raw.0, &["name of tensor #0", "limits::MAX_TENSOR_NAME_LEN"]);
}

#[test]
fn huge_array_length() {
    let mut raw = Raw::header(3, 0, 1);
    raw.str("arr").u32(9).u32(4).u64(u64::MAX);
    parse_err(&raw.0, &["array length of metadata key \"arr\"", "at byte 43", "limits::MAX_ARRAY_LEN"]);
    let mut raw = Raw::header(3, 0, 1);
    raw.str("arr").u32(9).u32(4).u64(100).u32(1);
    parse_err(&raw.0, &["array length of metadata key \"arr\"", "100", "bytes left"]);
    // Element strings inside arrays are bounded too and named by index.
    let mut raw = Raw::header(3, 0, 1);
    raw.str("toks").u32(9).u32(8).u64(2).str("ok").u64(1 << 50);
    parse_err(&raw.0, &["metadata key \"toks\" element 1"]);
}

#[test]
fn deep_array_nesting() {
    let mut raw = Raw::header(3, 0, 1);
    raw.str("deep").u32(9);
    for _ in 0..20 {
        raw.u32(9).u64(1);
    }
    parse_err(&raw.0, &["metadata key \"deep\"", "nested more than 8", "limits::MAX_ARRAY_DEPTH"]);
}

#[test]
fn unknown_value_types_and_bad_bools() {
    let mut raw = Raw::header(3, 0, 1);
    raw.str("odd").u32(13).u32(0);
    parse_err(&raw.0, &["value type of metadata key \"odd\"", "unknown value type id 13"]);
    let mut raw = Raw::header(3, 0, 1);
    raw.str("arr").u32(9).u32(99).u64(0);
    parse_err(&raw.0, &["array element type of metadata key \"arr\"", "99"]);
    let mut raw = Raw::header(3, 0, 1);
    raw.str("b").u32(7).u8(2);
    parse_err(&raw.0, &["metadata key \"b\"", "bool byte is 2"]);
}

#[test]
fn duplicate_key() {
    let mut raw = Raw::header(3, 0, 2);
    raw.kv_u32("same", 1).kv_u32("same", 2).pad_and_data(32, 0);
    let err = parse_err(&raw.0, &["duplicate metadata key \"same\"", "at byte 44"]);
    assert!(matches!(err, GgufError::DuplicateKey { .. }));
}

#[test]
fn tensor_dimension_problems() {
    let mut raw = Raw::header(3, 1, 0);
    raw.tensor("five", &[1, 1, 1, 1, 1], 0, 0).pad_and_data(32, 32);
    parse_err(&raw.0, &["tensor #0 \"five\"", "dimension count", "is 5"]);

    let mut raw = Raw::header(3, 1, 0);
    raw.tensor("none", &[], 0, 0).pad_and_data(32, 32);
    parse_err(&raw.0, &["tensor #0 \"none\"", "is 0"]);

    let mut raw = Raw::header(3, 1, 0);
    raw.tensor("zero", &[4, 0], 0, 0).pad_and_data(32, 32);
    parse_err(&raw.0, &["tensor #0 \"zero\"", "dimension 1 is zero"]);

    let mut raw = Raw::header(3, 1, 0);
    raw.tensor("vast", &[1 << 32, 1 << 32], 0, 0).pad_and_data(32, 32);
    parse_err(&raw.0, &["tensor #0 \"vast\"", "overflows"]);

    let mut raw = Raw::header(3, 1, 0);
    raw.tensor("q", &[48], 2, 0).pad_and_data(32, 64);
    parse_err(&raw.0, &["tensor #0 \"q\"", "row length 48", "Q4_0 block size 32"]);
}

#[test]
fn unknown_tensor_type() {
    let mut raw = Raw::header(3, 1, 0);
    raw.tensor("w", &[32], 4, 0).pad_and_data(32, 64);
    parse_err(&raw.0, &["tensor #0 \"w\"", "unknown tensor type id 4", "at byte 45"]);
}

#[test]
fn tensor_offset_problems() {
    parse_err(&one_tensor(3, 64), &["tensor #0 \"w\"", "data offset 3", "not a multiple of the alignment 32"]);
    parse_err(&one_tensor(32, 40), &["tensor #0 \"w\"", "extends past the end of the data section (40 bytes"]);
    parse_err(&one_tensor(u64::MAX - 31, 32), &["tensor #0 \"w\"", "extends past"]);

    let mut raw = Raw::header(3, 2, 0);
    raw.tensor("a", &[16], 0, 0).tensor("b", &[8], 0, 32).pad_and_data(32, 64);
    let err = parse_err(&raw.0, &["tensor #1 \"b\"", "overlaps tensor #0 \"a\""]);
    assert!(matches!(err, GgufError::InvalidTensor { index: 1, .. }));
}

#[test]
fn duplicate_tensor_name() {
    let mut raw = Raw::header(3, 2, 0);
    raw.tensor("w", &[8], 0, 0).tensor("w", &[8], 0, 32).pad_and_data(32, 64);
    let err = parse_err(&raw.0, &["duplicate tensor name \"w\"", "#0 and #1"]);
    assert!(matches!(err, GgufError::DuplicateTensor { first: 0, second: 1, .. }));
}

#[test]
fn bad_alignment_values() {
    for (value_type, value, shown) in [(4u32, 0u32, "u32 0"), (4, 24, "u32 24"), (5, 32, "i32 32")] {
        let mut raw = Raw::header(3, 0, 1);
        raw.str("general.alignment").u32(value_type).u32(value).pad_and_data(32, 0);
        parse_err(&raw.0, &["general.alignment", "power-of-two", shown]);
    }
    // A valid non-default alignment moves the data section.
    let mut raw = Raw::header(3, 1, 1);
    raw.kv_u32("general.alignment", 128).tensor("w", &[8], 0, 0).pad_and_data(128, 32);
    let h = GgufHeader::parse(&raw.0).unwrap();
    assert_eq!(h.alignment, 128);
    assert_eq!(h.data_offset, 128);
}

#[test]
fn invalid_utf8() {
    let mut raw = Raw::header(3, 0, 1);
    raw.u64(2).bytes(&[0xC3, 0x28]).u32(4).u32(0);
    parse_err(&raw.0, &["key of metadata entry #0", "at byte 32", "not valid UTF-8"]);

    let mut raw = Raw::header(3, 0, 1);
    raw.str("txt").u32(8).u64(1).bytes(&[0xFF]);
    parse_err(&raw.0, &["string of metadata key \"txt\"", "not valid UTF-8"]);

    let mut raw = Raw::header(3, 2, 0);
    raw.tensor("ok", &[8], 0, 0).u64(1).bytes(&[0x80]).bytes(&[0; 64]);
    parse_err(&raw.0, &["name of tensor #1", "not valid UTF-8"]);
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.gguf");
    let err = GgufFile::open(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.gguf"), "{err}");
    assert!(err.to_string().contains("cannot open"), "{err}");

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = GgufFile::open(&empty).unwrap_err();
    assert!(err.to_string().contains("empty.gguf"), "{err}");
    assert!(matches!(err.root(), GgufError::Truncated { offset: 0, .. }), "{err}");

    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, one_tensor(32, 40)).unwrap();
    let err = GgufFile::open(&bad).unwrap_err();
    assert!(err.to_string().starts_with(&bad.display().to_string()), "{err}");
    assert!(err.to_string().contains("extends past"), "{err}");
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_mutations_never_panic() {
    let base = small_file();
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let interesting: [u64; 8] = [0, 1, 4, 5, 31, 1 << 31, u64::MAX, u64::MAX >> 1];
    let mut accepted = 0;
    for _ in 0..10_000 {
        let mut bytes = base.clone();
        for _ in 0..1 + rng.below(4) {
            let at = rng.below(bytes.len());
            match rng.below(6) {
                0 => bytes[at] = rng.next() as u8,
                1 => bytes[at] ^= 1 << rng.below(8),
                2 => {
                    let v = interesting[rng.below(interesting.len())].to_le_bytes();
                    let n = [1, 4, 8][rng.below(3)].min(bytes.len() - at);
                    bytes[at..at + n].copy_from_slice(&v[..n]);
                }
                3 => bytes.truncate(at.max(1)),
                4 => bytes.insert(at, rng.next() as u8),
                _ => {
                    bytes.remove(at);
                    if bytes.is_empty() {
                        bytes.push(0);
                    }
                }
            }
        }
        if let Ok(h) = GgufHeader::parse(&bytes) {
            accepted += 1;
            for t in &h.tensors {
                let r = h.tensor_file_range(t);
                assert!(r.end <= bytes.len() as u64, "{} out of range", t.name);
            }
        }
        let _ = GgufHeader::read(Cursor::new(&bytes));
    }
    // Some mutations (e.g. in tensor data or metadata values) keep the file valid.
    assert!(accepted > 0);
}
