//! Helpers shared by the integration tests.
#![allow(dead_code)]

use flexserve_gguf::{GgmlType, GgufWriter, Value};

/// Hand-assembles GGUF bytes, so tests can write headers the writer refuses to.
#[derive(Default)]
pub struct Raw(pub Vec<u8>);

impl Raw {
    /// Magic, version, tensor count and metadata entry count.
    pub fn header(version: u32, tensors: u64, kvs: u64) -> Raw {
        let mut raw = Raw::default();
        raw.bytes(b"GGUF").u32(version).u64(tensors).u64(kvs);
        raw
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }

    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.bytes(&[v])
    }

    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_le_bytes())
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.u64(s.len() as u64).bytes(s.as_bytes())
    }

    /// A metadata entry holding a u32.
    pub fn kv_u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.str(key).u32(4).u32(v)
    }

    /// A tensor directory entry.
    pub fn tensor(&mut self, name: &str, dims: &[u64], type_id: u32, offset: u64) -> &mut Self {
        self.str(name).u32(dims.len() as u32);
        for &d in dims {
            self.u64(d);
        }
        self.u32(type_id).u64(offset)
    }

    /// Zero padding up to `alignment`, then `data_len` bytes of data.
    pub fn pad_and_data(&mut self, alignment: usize, data_len: usize) -> &mut Self {
        while !self.0.len().is_multiple_of(alignment) {
            self.0.push(0);
        }
        self.0.resize(self.0.len() + data_len, 0xAB);
        self
    }
}

/// Deterministic bytes for tensor data.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
}

/// A small but complete file: a few metadata types and two tensors.
pub fn small_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", Value::from("llama"));
    w.set("llama.block_count", Value::from(2u32));
    w.set("eps", Value::from(1e-5f32));
    w.set("flag", Value::from(true));
    w.set("tokens", Value::string_array(vec!["a".into(), "bc".into(), "<s>".into()]));
    w.set("ids", Value::i32_array(vec![1, -2, 3]));
    w.add_tensor("a", GgmlType::F32, &[4, 2], pattern(32, 1)).unwrap();
    w.add_tensor("b", GgmlType::Q8_0, &[32], pattern(34, 2)).unwrap();
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}
