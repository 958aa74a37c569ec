//! GGUF: the model file format of the llama.cpp ecosystem.
//!
//! The reader parses the header (metadata, tensor directory) from any byte
//! source and checks every count, offset and size against hard bounds before
//! allocating; the writer produces files that llama.cpp loads.

mod error;
mod file;
mod reader;
mod types;
mod value;
mod writer;

pub use error::GgufError;
pub use file::GgufFile;
pub use reader::{layer_of, limits, GgufHeader, TensorInfo, DEFAULT_ALIGNMENT, MAGIC, MAX_DIMS, VERSION};
pub use types::GgmlType;
pub use types::ALL as ALL_TYPES;
pub use value::{Array, Metadata, Value, ValueType, ALIGNMENT_KEY, ARCHITECTURE_KEY};
pub use writer::GgufWriter;
