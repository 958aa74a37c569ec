//! Errors of sealing and opening. Every variant says what failed: the file,
//! the chunk (index and tensor name), the header field, or the offset where
//! the input ended.

use std::path::PathBuf;

use flexserve_gguf::GgufError;

use crate::SignatureFailure;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {what}: {source}")]
    Io { path: PathBuf, what: &'static str, source: std::io::Error },

    #[error("{path}: not a usable GGUF file to seal: {source}")]
    Input { path: PathBuf, source: GgufError },

    #[error("{path}: cannot seal: {reason}")]
    Unsealable { path: PathBuf, reason: String },

    #[error("invalid seal options: {0}")]
    Options(String),

    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },

    #[error("invalid model key: {0}")]
    InvalidKey(String),

    #[error("not a sealed model: magic is {found:02x?}, expected \"FSMODEL1\"")]
    NotSealed { found: [u8; 8] },

    #[error("sealed header: unsupported format version {0} (this build reads version 1)")]
    UnsupportedVersion(u32),

    #[error("sealed header is truncated: {what} needs bytes {start}..{end} but the input ends at byte {available}")]
    Truncated { what: &'static str, start: u64, end: u64, available: u64 },

    #[error("sealed header: {field}: {reason}")]
    Malformed { field: &'static str, reason: String },

    #[error("sealed header: embedded GGUF header is invalid: {0}")]
    Directory(#[source] GgufError),

    #[error("sealed header: chunk table entry {index}: {reason}")]
    ChunkTable { index: usize, reason: String },

    #[error("wrong model key: the key check value in the sealed header does not match this key")]
    WrongKey,

    #[error("the sealed file is not wrapped to a device key; open it with the model key")]
    NotDeviceWrapped,

    #[error("the sealed file is wrapped to device key {expected}, not to this device ({found})")]
    WrongDevice { expected: String, found: String },

    #[error("cannot unwrap the model key: the key-wrap section was modified")]
    KeyUnwrap,

    #[error("cannot open the stored model key: it was modified, or sealed by another device's secure world")]
    StoredKey,

    #[error("vendor signature check failed: {failure}")]
    Signature { failure: SignatureFailure },

    #[error(
        "sealed header authentication failed: the preamble, GGUF header, tensor directory, \
         chunk table or header tag was modified"
    )]
    HeaderAuth,

    #[error("chunk index {index} is out of range (the model has {count} chunks)")]
    ChunkIndex { index: usize, count: usize },

    #[error("chunk {index} (tensor {tensor:?}): {what} is {got} bytes, expected {expected}")]
    ChunkLength { index: usize, tensor: String, what: &'static str, got: usize, expected: usize },

    #[error(
        "chunk {index} (tensor {tensor:?}, bytes {tensor_offset}..{tensor_end} of the tensor) failed \
         authentication: its ciphertext or tag was modified, or it belongs to another position or file"
    )]
    ChunkAuth { index: usize, tensor: String, tensor_offset: u64, tensor_end: u64 },

    #[error("{path}: file is {actual} bytes, the sealed header describes {expected} bytes")]
    FileSize { path: PathBuf, expected: u64, actual: u64 },

    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
}
