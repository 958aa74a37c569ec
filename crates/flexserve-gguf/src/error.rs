//! The error type shared by the reader, the writer and the typed getters.

use std::path::PathBuf;

/// Everything that can go wrong reading or writing a GGUF file.
///
/// Each variant names what is wrong and where: the metadata key, the tensor
/// (index and name) or the byte offset in the file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// An error from a file opened by path; `source` says what went wrong inside it.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: Box<GgufError>,
    },

    /// The operating system refused an operation (open, map, write, rename).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// A read failed part-way through the header.
    #[error("I/O error at byte {offset} while reading {what}: {source}")]
    ReadFailed {
        offset: u64,
        what: String,
        #[source]
        source: std::io::Error,
    },

    /// The first four bytes are not "GGUF".
    #[error("not a GGUF file: magic bytes at offset 0 are {found:02x?}, expected \"GGUF\" [47, 47, 55, 46]")]
    BadMagic { found: [u8; 4] },

    /// A version other than 2 or 3.
    #[error("unsupported GGUF version {version} at byte 4 ({hint}); supported versions are 2 and 3")]
    UnsupportedVersion { version: u32, hint: &'static str },

    /// The input ended before a complete header was read.
    #[error("file truncated: unexpected end of data at byte {offset} while reading {what}")]
    Truncated { offset: u64, what: String },

    /// A count or length is beyond what the input can hold or beyond a fixed sanity bound.
    #[error("{what} at byte {offset} is {value}, which exceeds {limit_desc} ({limit})")]
    LimitExceeded { what: String, offset: u64, value: u64, limit: u64, limit_desc: &'static str },

    /// A string that is not valid UTF-8.
    #[error("{what} at byte {offset} is not valid UTF-8")]
    InvalidUtf8 { what: String, offset: u64 },

    /// A metadata value type id outside 0..=12.
    #[error("{what} at byte {offset} has unknown value type id {id}")]
    UnknownValueType { what: String, offset: u64, id: u32 },

    /// A structurally invalid metadata value (bad bool byte, arrays nested too deep, ...).
    #[error("{what} at byte {offset}: {reason}")]
    InvalidValue { what: String, offset: u64, reason: String },

    /// The same metadata key appears twice.
    #[error("duplicate metadata key {key:?} at byte {offset}")]
    DuplicateKey { key: String, offset: u64 },

    /// `general.alignment` is not a nonzero power-of-two u32.
    #[error("metadata key \"general.alignment\" must be a nonzero power-of-two u32, found {found}")]
    BadAlignment { found: String },

    /// A tensor directory entry (or a tensor handed to the writer) is invalid.
    #[error("tensor #{index} {name:?}: {reason}")]
    InvalidTensor { index: usize, name: String, reason: String },

    /// Two tensors share a name.
    #[error("duplicate tensor name {name:?}: tensors #{first} and #{second}")]
    DuplicateTensor { name: String, first: usize, second: usize },

    /// A metadata value has a different type than the caller asked for.
    #[error("metadata key {key:?}: expected {expected}, found {found}")]
    MetadataType { key: String, expected: &'static str, found: String },

    /// A metadata value the writer cannot encode (e.g. an array whose
    /// elements disagree with its element type).
    #[error("metadata key {key:?}: {reason}")]
    InvalidMetadata { key: String, reason: String },
}

impl GgufError {
    /// The innermost error, looking through the [`GgufError::File`] wrapper.
    pub fn root(&self) -> &GgufError {
        match self {
            GgufError::File { source, .. } => source.root(),
            other => other,
        }
    }

    pub(crate) fn in_file(self, path: impl Into<PathBuf>) -> GgufError {
        GgufError::File { path: path.into(), source: Box::new(self) }
    }
}
