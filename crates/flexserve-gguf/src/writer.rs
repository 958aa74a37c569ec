//! Building GGUF files.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::reader::{align_up, alignment_of, check_shape, limits, MAGIC, VERSION};
use crate::value::{Metadata, Value};
use crate::{GgmlType, GgufError};

struct PendingTensor {
    name: String,
    ty: GgmlType,
    dims: Vec<u64>,
    data: Vec<u8>,
}

/// Builds a GGUF v3 file: metadata in insertion order, then tensors in the
/// order added, each tensor's data aligned to `general.alignment` (default 32).
#[derive(Default)]
pub struct GgufWriter {
    metadata: Metadata,
    tensors: Vec<PendingTensor>,
    index: HashMap<String, usize>,
}

impl GgufWriter {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn metadata(&self) -> &Metadata {
        &self.metadata
    }

    pub fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.metadata
    }

    /// Sets a metadata entry (replacing any previous value for the key).
    pub fn set(&mut self, key: impl Into<String>, value: Value) {
        self.metadata.insert(key, value);
    }

    /// Adds a tensor whose data is already encoded as `ty`. `dims` lists the
    /// row length first; `data` must be exactly the tensor's byte size.
    pub fn add_tensor(
        &mut self,
        name: impl Into<String>,
        ty: GgmlType,
        dims: &[u64],
        data: Vec<u8>,
    ) -> Result<(), GgufError> {
        let name = name.into();
        let index = self.tensors.len();
        let invalid = |reason: String| GgufError::InvalidTensor { index, name: name.clone(), reason };
        if name.len() as u64 > limits::MAX_TENSOR_NAME_LEN {
            return Err(invalid(format!("name is {} bytes, more than {}", name.len(), limits::MAX_TENSOR_NAME_LEN)));
        }
        let size = check_shape(ty, dims).map_err(|reason| invalid(format!("{ty} tensor {reason}")))?;
        if data.len() as u64 != size {
            return Err(invalid(format!(
                "data is {} bytes but a {ty} tensor of dims {dims:?} takes {size}",
                data.len()
            )));
        }
        if let Some(&first) = self.index.get(&name) {
            return Err(GgufError::DuplicateTensor { name, first, second: index });
        }
        self.index.insert(name.clone(), index);
        self.tensors.push(PendingTensor { name, ty, dims: dims.to_vec(), data });
        Ok(())
    }

    /// Adds an F32 tensor from values.
    pub fn add_f32_tensor(&mut self, name: impl Into<String>, dims: &[u64], values: &[f32]) -> Result<(), GgufError> {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, GgmlType::F32, dims, data)
    }

    /// Number of tensors added so far.
    pub fn tensor_count(&self) -> usize {
        self.tensors.len()
    }

    /// Writes the whole file to `w`.
    pub fn write_to<W: Write>(&self, w: W) -> Result<(), GgufError> {
        let alignment = alignment_of(&self.metadata)?;
        for (key, value) in self.metadata.iter() {
            check_value(key, value, 0)?;
        }
        let mut out = Output { inner: BufWriter::new(w), pos: 0 };
        out.write_header(self, alignment)
            .and_then(|()| out.inner.flush())
            .map_err(|source| GgufError::Io { what: format!("writing GGUF data at byte {}", out.pos), source })
    }

    /// Writes to a temporary file in the same directory, syncs it to disk and
    /// renames it over `path`, so readers never see a partial file.
    pub fn write_file(&self, path: impl AsRef<Path>) -> Result<(), GgufError> {
        let path = path.as_ref();
        self.write_file_inner(path).map_err(|e| e.in_file(path))
    }

    fn write_file_inner(&self, path: &Path) -> Result<(), GgufError> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| GgufError::Io { what, source }
        };
        let file_name = path.file_name().ok_or_else(|| GgufError::Io {
            what: "path has no file name".to_owned(),
            source: std::io::ErrorKind::InvalidInput.into(),
        })?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(format!(".tmp-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
        let tmp = dir.join(tmp_name);

        let result = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(io("cannot create temporary file"))?;
            self.write_to(&file)?;
            file.sync_all().map_err(io("cannot sync to disk"))?;
            fs::rename(&tmp, path).map_err(io("cannot rename temporary file into place"))
        })();
        if result.is_err() {
            // Best effort: the original error matters more than a leftover temp file.
            let _ = fs::remove_file(&tmp);
            return result;
        }
        // Persist the rename itself; not every platform can sync a directory,
        // and the data is already safe, so a failure here is not reported.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// Checks that the reader would accept a value: homogeneous arrays, bounded
/// nesting and lengths.
fn check_value(key: &str, value: &Value, depth: usize) -> Result<(), GgufError> {
    let invalid = |reason: String| GgufError::InvalidMetadata { key: key.to_owned(), reason };
    if key.len() as u64 > limits::MAX_KEY_LEN {
        return Err(invalid(format!("key is {} bytes, more than {}", key.len(), limits::MAX_KEY_LEN)));
    }
    match value {
        Value::String(s) if s.len() as u64 > limits::MAX_STRING_LEN => {
            Err(invalid(format!("string is {} bytes, more than {}", s.len(), limits::MAX_STRING_LEN)))
        }
        Value::Array(a) => {
            if depth + 1 > limits::MAX_ARRAY_DEPTH {
                return Err(invalid(format!("arrays are nested more than {} levels deep", limits::MAX_ARRAY_DEPTH)));
            }
            if a.values.len() as u64 > limits::MAX_ARRAY_LEN {
                return Err(invalid(format!(
                    "array has {} elements, more than {}",
                    a.values.len(),
                    limits::MAX_ARRAY_LEN
                )));
            }
            for (i, v) in a.values.iter().enumerate() {
                if v.value_type() != a.elem_type {
                    return Err(invalid(format!(
                        "array element {i} is {}, but the array's element type is {}",
                        v.value_type(),
                        a.elem_type
                    )));
                }
                check_value(key, v, depth + 1)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// A writer that counts the bytes written, for padding.
struct Output<W: Write> {
    inner: W,
    pos: u64,
}

impl<W: Write> Output<W> {
    fn bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(b)?;
        self.pos += b.len() as u64;
        Ok(())
    }

    fn u32(&mut self, v: u32) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> std::io::Result<()> {
        self.bytes(&v.to_le_bytes())
    }

    fn string(&mut self, s: &str) -> std::io::Result<()> {
        self.u64(s.len() as u64)?;
        self.bytes(s.as_bytes())
    }

    fn pad_to(&mut self, alignment: u64) -> std::io::Result<()> {
        const ZEROS: [u8; 64] = [0; 64];
        let mut left = align_up(self.pos, alignment).unwrap_or(self.pos) - self.pos;
        while left > 0 {
            let step = left.min(ZEROS.len() as u64);
            self.bytes(&ZEROS[..step as usize])?;
            left -= step;
        }
        Ok(())
    }

    fn value(&mut self, value: &Value) -> std::io::Result<()> {
        match value {
            Value::U8(v) => self.bytes(&v.to_le_bytes()),
            Value::I8(v) => self.bytes(&v.to_le_bytes()),
            Value::U16(v) => self.bytes(&v.to_le_bytes()),
            Value::I16(v) => self.bytes(&v.to_le_bytes()),
            Value::U32(v) => self.bytes(&v.to_le_bytes()),
            Value::I32(v) => self.bytes(&v.to_le_bytes()),
            Value::U64(v) => self.bytes(&v.to_le_bytes()),
            Value::I64(v) => self.bytes(&v.to_le_bytes()),
            Value::F32(v) => self.bytes(&v.to_le_bytes()),
            Value::F64(v) => self.bytes(&v.to_le_bytes()),
            Value::Bool(v) => self.bytes(&[u8::from(*v)]),
            Value::String(s) => self.string(s),
            Value::Array(a) => {
                self.u32(a.elem_type.id())?;
                self.u64(a.values.len() as u64)?;
                a.values.iter().try_for_each(|v| self.value(v))
            }
        }
    }

    fn write_header(&mut self, w: &GgufWriter, alignment: u64) -> std::io::Result<()> {
        self.bytes(&MAGIC)?;
        self.u32(VERSION)?;
        self.u64(w.tensors.len() as u64)?;
        self.u64(w.metadata.len() as u64)?;
        for (key, value) in w.metadata.iter() {
            self.string(key)?;
            self.u32(value.value_type().id())?;
            self.value(value)?;
        }
        let mut offset = 0u64;
        for t in &w.tensors {
            self.string(&t.name)?;
            self.u32(t.dims.len() as u32)?;
            for &d in &t.dims {
                self.u64(d)?;
            }
            self.u32(t.ty.id())?;
            self.u64(offset)?;
            offset = align_up(offset + t.data.len() as u64, alignment).unwrap_or(u64::MAX);
        }
        self.pad_to(alignment)?;
        for t in &w.tensors {
            self.bytes(&t.data)?;
            self.pad_to(alignment)?;
        }
        Ok(())
    }
}
