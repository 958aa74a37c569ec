//! GGUF: the model file format of the llama.cpp ecosystem.
//!
//! The reader parses the header (metadata, tensor directory) from any byte
//! source and checks every count, offset and size against hard bounds before
//! allocating; the writer produces files that llama.cpp loads.

mod types;

pub use types::GgmlType;
pub use types::ALL as ALL_TYPES;
