//! Parsing and checking the GGUF header: magic, version, metadata, tensor directory.
//!
//! Every count and length read from the input is checked against fixed maxima
//! and, when the input length is known, against the bytes that remain, before
//! anything is allocated for it; vectors sized by an untrusted count reserve at
//! most a small fixed amount up front and grow as data actually arrives.

use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::ops::Range;

use crate::value::{Array, Metadata, Value, ValueType, ALIGNMENT_KEY};
use crate::{GgmlType, GgufError};

/// The four bytes every GGUF file starts with.
pub const MAGIC: [u8; 4] = *b"GGUF";
/// The version the writer produces.
pub const VERSION: u32 = 3;
/// Alignment of the data section and of tensor offsets when
/// `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The most dimensions a tensor may have.
pub const MAX_DIMS: usize = 4;

/// Sanity bounds on what the reader accepts. Real models stay far below them.
pub mod limits {
    /// Tensors in one file.
    pub const MAX_TENSORS: u64 = 1 << 20;
    /// Metadata entries in one file.
    pub const MAX_KV: u64 = 1 << 20;
    /// Bytes in a metadata key.
    pub const MAX_KEY_LEN: u64 = 1 << 16;
    /// Bytes in a tensor name.
    pub const MAX_TENSOR_NAME_LEN: u64 = 1 << 16;
    /// Bytes in a metadata string value.
    pub const MAX_STRING_LEN: u64 = 1 << 26;
    /// Elements in one metadata array.
    pub const MAX_ARRAY_LEN: u64 = 1 << 24;
    /// Levels of arrays nested inside arrays (a plain array is level 1).
    pub const MAX_ARRAY_DEPTH: usize = 8;
    /// Memory the parsed metadata and tensor directory may take, as a
    /// multiple of the bytes read so far plus a fixed allowance: a file of
    /// tiny strings or empty arrays cannot make the reader hold many times
    /// its own size. Real models' metadata is mostly vocabulary: short
    /// strings that take several times their size once parsed.
    pub const MEMORY_PER_INPUT_BYTE: u64 = 3;
    /// The fixed allowance of the memory bound, in bytes. The largest real
    /// vocabularies (Gemma's 262144 tokens with their merges: 16 MB of file,
    /// about 116 MB parsed) need more than 64 MiB of it.
    pub const MEMORY_ALLOWANCE: u64 = 128 << 20;
}
use limits::*;

/// Elements reserved ahead of reading an array or directory of unknown real size.
const PREALLOC: usize = 1024;
/// Smallest possible encoding of a metadata entry: key length, value type, one byte.
const MIN_KV_BYTES: u64 = 8 + 4 + 1;
/// Smallest possible tensor directory entry: name length, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Buffer size for reading long strings and skipping padding from unknown-length input.
const CHUNK: usize = 64 * 1024;

/// One entry of the tensor directory.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    pub name: String,
    /// Dimensions, fastest-varying (`ne0`, the row length) first, as in the file.
    pub dims: Vec<u64>,
    pub ty: GgmlType,
    /// Start of the tensor's data relative to the data section.
    pub offset: u64,
}

/// The transformer layer a tensor name belongs to (`blk.N.…`), if any.
pub fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

impl TensorInfo {
    /// The transformer layer this tensor belongs to (`blk.N.…`), if any.
    pub fn layer(&self) -> Option<usize> {
        layer_of(&self.name)
    }

    /// Number of elements (saturating; exact for tensors that passed validation).
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |n, &d| n.saturating_mul(d))
    }

    /// Bytes of data (saturating; exact for tensors that passed validation).
    pub fn byte_size(&self) -> u64 {
        self.checked_byte_size().unwrap_or(u64::MAX)
    }

    /// Bytes of data, or `None` if the row length is not a whole number of
    /// blocks or the size overflows.
    pub fn checked_byte_size(&self) -> Option<u64> {
        let (&ne0, rest) = self.dims.split_first()?;
        let row = self.ty.row_size(ne0)?;
        rest.iter().try_fold(row, |n, &d| n.checked_mul(d))
    }

    /// Bytes in one row (`dims[0]` elements), or `None` if not a whole number of blocks.
    pub fn row_size(&self) -> Option<u64> {
        self.ty.row_size(*self.dims.first()?)
    }
}

/// Checks a tensor's shape against its type; returns the byte size or the reason it is invalid.
pub(crate) fn check_shape(ty: GgmlType, dims: &[u64]) -> Result<u64, String> {
    if dims.is_empty() || dims.len() > MAX_DIMS {
        return Err(format!("has {} dimensions; must have 1 to {MAX_DIMS}", dims.len()));
    }
    if let Some(axis) = dims.iter().position(|&d| d == 0) {
        return Err(format!("dimension {axis} is zero (dims {dims:?})"));
    }
    // ggml counts elements in i64, so the product must fit there.
    let n_elements = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d).filter(|&n| n <= i64::MAX as u64))
        .ok_or_else(|| format!("element count of dims {dims:?} overflows"))?;
    let block = ty.block_size() as u64;
    if !dims[0].is_multiple_of(block) {
        return Err(format!("row length {} is not a multiple of the {ty} block size {block}", dims[0]));
    }
    (n_elements / block)
        .checked_mul(ty.type_size() as u64)
        .ok_or_else(|| format!("byte size of dims {dims:?} overflows"))
}

/// The parsed header of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufHeader {
    pub version: u32,
    pub metadata: Metadata,
    pub tensors: Vec<TensorInfo>,
    /// Alignment of the data section and of every tensor offset.
    pub alignment: u64,
    /// Absolute file offset where the data section starts. A file without
    /// tensors may end before the padding that aligns it; then this is the
    /// file's end.
    pub data_offset: u64,
}

impl GgufHeader {
    /// Parses the header from a reader positioned at the file start, consuming
    /// exactly `data_offset` bytes (through the padding before the data section).
    ///
    /// The input length is unknown here, so only fixed bounds apply and tensor
    /// data ranges are not checked; call [`GgufHeader::check_data_len`] once the
    /// data size is known. Small reads are issued, so buffer a slow reader.
    pub fn read<R: Read>(r: R) -> Result<GgufHeader, GgufError> {
        Input::new(r, None).header()
    }

    /// Parses the header from the start of a whole in-memory file and checks
    /// every tensor's data range against the file length.
    pub fn parse(bytes: &[u8]) -> Result<GgufHeader, GgufError> {
        let header = Input::new(bytes, Some(bytes.len() as u64)).header()?;
        // `header()` consumed the padding, so the data section starts inside the file.
        let data_len = (bytes.len() as u64).saturating_sub(header.data_offset);
        header.check_data_len(data_len)?;
        Ok(header)
    }

    /// Checks that each tensor's data lies inside a data section of `data_len`
    /// bytes, starts at a multiple of the alignment, and overlaps no other tensor.
    pub fn check_data_len(&self, data_len: u64) -> Result<(), GgufError> {
        let invalid = |index: usize, reason: String| GgufError::InvalidTensor {
            index,
            name: self.tensors[index].name.clone(),
            reason,
        };
        let mut ranges = Vec::with_capacity(self.tensors.len());
        for (index, t) in self.tensors.iter().enumerate() {
            if self.alignment == 0 || t.offset % self.alignment != 0 {
                return Err(invalid(
                    index,
                    format!("data offset {} is not a multiple of the alignment {}", t.offset, self.alignment),
                ));
            }
            let size = t
                .checked_byte_size()
                .ok_or_else(|| invalid(index, format!("invalid shape {:?} for {}", t.dims, t.ty)))?;
            let end = t.offset.checked_add(size).filter(|&end| end <= data_len);
            let Some(end) = end else {
                return Err(invalid(
                    index,
                    format!(
                        "data at offset {} ({size} bytes, file bytes {}..{}) extends past the end \
                         of the data section ({data_len} bytes, file ends at byte {})",
                        t.offset,
                        self.data_offset.saturating_add(t.offset),
                        self.data_offset.saturating_add(t.offset).saturating_add(size),
                        self.data_offset.saturating_add(data_len),
                    ),
                ));
            };
            ranges.push((t.offset..end, index));
        }
        ranges.sort_by_key(|(r, _)| (r.start, r.end));
        for pair in ranges.windows(2) {
            let ((first, i), (second, j)) = (&pair[0], &pair[1]);
            if second.start < first.end {
                return Err(invalid(
                    *j,
                    format!("data range {second:?} overlaps tensor #{i} {:?} at {first:?}", self.tensors[*i].name),
                ));
            }
        }
        Ok(())
    }

    /// The tensor named `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute byte range of a tensor's data in the file.
    pub fn tensor_file_range(&self, t: &TensorInfo) -> Range<u64> {
        let start = self.data_offset.saturating_add(t.offset);
        start..start.saturating_add(t.byte_size())
    }
}

/// Where in the header a value sits, formatted only when an error needs it.
#[derive(Clone, Copy)]
enum Loc<'a> {
    /// The fixed header fields.
    Header,
    /// The key of the `n`th metadata entry (its name is not known yet).
    Entry(u64),
    Key(&'a str),
    Element(&'a Loc<'a>, u64),
    Tensor(u64),
    NamedTensor(u64, &'a str),
}

impl fmt::Display for Loc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Loc::Header => f.write_str("the file header"),
            Loc::Entry(n) => write!(f, "metadata entry #{n}"),
            Loc::Key(key) => write!(f, "metadata key {key:?}"),
            Loc::Element(parent, i) => write!(f, "{parent} element {i}"),
            Loc::Tensor(n) => write!(f, "tensor #{n}"),
            Loc::NamedTensor(n, name) => write!(f, "tensor #{n} {name:?}"),
        }
    }
}

/// A field at a location: "string length of metadata key \"x\"".
#[derive(Clone, Copy)]
struct What<'a> {
    field: &'static str,
    loc: &'a Loc<'a>,
}

impl fmt::Display for What<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.loc {
            Loc::Header => f.write_str(self.field),
            loc => write!(f, "{} of {loc}", self.field),
        }
    }
}

fn what<'a>(field: &'static str, loc: &'a Loc<'a>) -> What<'a> {
    What { field, loc }
}

/// A byte source that tracks its position and, when known, its length.
struct Input<R> {
    inner: R,
    pos: u64,
    len: Option<u64>,
    /// Estimated bytes of memory the values parsed so far take.
    held: u64,
}

/// Estimated memory of one value slot (a `Value` in a vector that may have
/// grown by doubling) and of one heap allocation's bookkeeping.
const VALUE_SLOT_COST: u64 = 2 * std::mem::size_of::<Value>() as u64;
const ALLOCATION_COST: u64 = 32;
/// Estimated memory of one metadata entry beside its key and value.
const ENTRY_COST: u64 = 256;

impl<R: Read> Input<R> {
    fn new(inner: R, len: Option<u64>) -> Self {
        Input { inner, pos: 0, len, held: 0 }
    }

    /// Counts `bytes` more of parsed metadata against the memory bound
    /// ([`MEMORY_PER_INPUT_BYTE`] times the bytes read, plus [`MEMORY_ALLOWANCE`]).
    fn hold(&mut self, bytes: u64, what: What<'_>) -> Result<(), GgufError> {
        self.held = self.held.saturating_add(bytes);
        let limit = self.pos.saturating_mul(MEMORY_PER_INPUT_BYTE).saturating_add(MEMORY_ALLOWANCE);
        if self.held > limit {
            return Err(GgufError::LimitExceeded {
                what: format!("metadata memory at {what}"),
                offset: self.pos,
                value: self.held,
                limit,
                limit_desc: "limits::MEMORY_PER_INPUT_BYTE (3) bytes of memory per byte read plus limits::MEMORY_ALLOWANCE (128 MiB)",
            });
        }
        Ok(())
    }

    fn remaining(&self) -> Option<u64> {
        self.len.map(|len| len.saturating_sub(self.pos))
    }

    /// Fills `buf` completely, reporting where the input ended if it did.
    fn fill(&mut self, buf: &mut [u8], what: What<'_>) -> Result<(), GgufError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => return Err(GgufError::Truncated { offset: self.pos + filled as u64, what: what.to_string() }),
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(GgufError::ReadFailed {
                        offset: self.pos + filled as u64,
                        what: what.to_string(),
                        source,
                    })
                }
            }
        }
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: What<'_>) -> Result<[u8; N], GgufError> {
        let mut buf = [0u8; N];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn u8(&mut self, what: What<'_>) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u32(&mut self, what: What<'_>) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: What<'_>) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// Checks a count or length read at `offset` against a fixed maximum and,
    /// when the input length is known, against what `min_bytes_each` items
    /// would need from the remaining bytes.
    fn check_count(
        &self,
        value: u64,
        (max, max_name): (u64, &'static str),
        min_bytes_each: u64,
        offset: u64,
        what: What<'_>,
    ) -> Result<(), GgufError> {
        let too_big =
            |limit, limit_desc| GgufError::LimitExceeded { what: what.to_string(), offset, value, limit, limit_desc };
        if value > max {
            return Err(too_big(max, max_name));
        }
        if let Some(remaining) = self.remaining() {
            // value <= max (< 2^27) and min_bytes_each is small, so this cannot overflow.
            if value.saturating_mul(min_bytes_each) > remaining {
                return Err(too_big(remaining / min_bytes_each.max(1), "what the bytes left in the file can hold"));
            }
        }
        Ok(())
    }

    /// Reads a length-prefixed UTF-8 string of at most `max` bytes.
    fn string(&mut self, max: (u64, &'static str), what: What<'_>) -> Result<String, GgufError> {
        let len_offset = self.pos;
        let len = self.u64(what)?;
        self.check_count(len, max, 1, len_offset, what)?;
        let start = self.pos;
        let bytes = self.bytes(len, what)?;
        self.hold(len + ALLOCATION_COST, what)?;
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 { what: what.to_string(), offset: start })
    }

    /// Reads `len` bytes (already bounded by the caller). When the input length
    /// is unknown the buffer grows chunk by chunk as data arrives, so a lying
    /// length cannot force a large allocation.
    fn bytes(&mut self, len: u64, what: What<'_>) -> Result<Vec<u8>, GgufError> {
        let len = usize::try_from(len).map_err(|_| GgufError::LimitExceeded {
            what: what.to_string(),
            offset: self.pos,
            value: len,
            limit: usize::MAX as u64,
            limit_desc: "the address space",
        })?;
        if self.len.is_some() || len <= CHUNK {
            let mut buf = vec![0u8; len];
            self.fill(&mut buf, what)?;
            return Ok(buf);
        }
        let mut buf = Vec::with_capacity(CHUNK);
        while buf.len() < len {
            let start = buf.len();
            let step = (len - start).min(CHUNK);
            buf.resize(start + step, 0);
            self.fill(&mut buf[start..], what)?;
        }
        Ok(buf)
    }

    /// Skips `n` bytes (the padding before the data section); where `may_end`,
    /// the input may end before them. Returns how many were skipped.
    fn skip(&mut self, n: u64, may_end: bool, what: What<'_>) -> Result<u64, GgufError> {
        let mut scratch = [0u8; 256];
        let mut skipped = 0;
        while skipped < n {
            let step = (n - skipped).min(scratch.len() as u64) as usize;
            match self.inner.read(&mut scratch[..step]) {
                Ok(0) if may_end => break,
                Ok(0) => return Err(GgufError::Truncated { offset: self.pos, what: what.to_string() }),
                Ok(read) => {
                    skipped += read as u64;
                    self.pos += read as u64;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(GgufError::ReadFailed { offset: self.pos, what: what.to_string(), source }),
            }
        }
        Ok(skipped)
    }

    fn header(mut self) -> Result<GgufHeader, GgufError> {
        let loc = Loc::Header;
        let magic = self.array::<4>(what("magic", &loc))?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic { found: magic });
        }
        let version = self.u32(what("version", &loc))?;
        check_version(version)?;

        let count_offset = self.pos;
        let tensor_count = self.u64(what("tensor count", &loc))?;
        let kv_count = self.u64(what("metadata entry count", &loc))?;
        self.check_count(
            kv_count,
            (MAX_KV, "limits::MAX_KV"),
            MIN_KV_BYTES,
            count_offset + 8,
            what("metadata entry count", &loc),
        )?;
        self.check_count(
            tensor_count,
            (MAX_TENSORS, "limits::MAX_TENSORS"),
            MIN_TENSOR_INFO_BYTES,
            count_offset,
            what("tensor count", &loc),
        )?;

        let metadata = self.metadata(kv_count)?;
        let alignment = alignment_of(&metadata)?;
        let tensors = self.tensor_directory(tensor_count, alignment)?;

        let data_offset = align_up(self.pos, alignment).ok_or_else(|| GgufError::LimitExceeded {
            what: "data section start".to_owned(),
            offset: self.pos,
            value: self.pos,
            limit: u64::MAX - alignment,
            limit_desc: "the largest offset that can be aligned",
        })?;
        // With no tensors there is no data to align: llama.cpp writes (and
        // reads) vocabulary-only files that end right after the metadata.
        let may_end = tensors.is_empty();
        let start = self.pos;
        let data_offset =
            start + self.skip(data_offset - start, may_end, what("padding before the data section", &loc))?;
        Ok(GgufHeader { version, metadata, tensors, alignment, data_offset })
    }

    fn metadata(&mut self, kv_count: u64) -> Result<Metadata, GgufError> {
        let mut metadata = Metadata::new();
        metadata.reserve(kv_count.min(PREALLOC as u64) as usize);
        for n in 0..kv_count {
            let key_offset = self.pos;
            let key = self.string((MAX_KEY_LEN, "limits::MAX_KEY_LEN"), what("key", &Loc::Entry(n)))?;
            // The entry's slots (an ordered list and an index, each of which
            // may have grown by doubling) and the index's copy of the key.
            self.hold(ENTRY_COST + key.len() as u64, what("key", &Loc::Entry(n)))?;
            let loc = Loc::Key(&key);
            let value = self.tagged_value(&loc, 0)?;
            if metadata.contains_key(&key) {
                return Err(GgufError::DuplicateKey { key, offset: key_offset });
            }
            metadata.insert_new(key, value);
        }
        Ok(metadata)
    }

    fn value_type(&mut self, what: What<'_>) -> Result<ValueType, GgufError> {
        let offset = self.pos;
        let id = self.u32(what)?;
        ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType { what: what.to_string(), offset, id })
    }

    /// A value preceded by its type id.
    fn tagged_value(&mut self, loc: &Loc<'_>, depth: usize) -> Result<Value, GgufError> {
        let ty = self.value_type(what("value type", loc))?;
        self.value(ty, loc, depth)
    }

    /// A value of type `ty`; `depth` counts the arrays it is nested in.
    fn value(&mut self, ty: ValueType, loc: &Loc<'_>, depth: usize) -> Result<Value, GgufError> {
        let w = what("value", loc);
        Ok(match ty {
            ValueType::U8 => Value::U8(self.u8(w)?),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(w)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(w)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(w)?)),
            ValueType::U32 => Value::U32(self.u32(w)?),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(w)?)),
            ValueType::U64 => Value::U64(self.u64(w)?),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(w)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(w)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(w)?)),
            ValueType::Bool => {
                let offset = self.pos;
                match self.u8(w)? {
                    0 => Value::Bool(false),
                    1 => Value::Bool(true),
                    b => {
                        return Err(GgufError::InvalidValue {
                            what: w.to_string(),
                            offset,
                            reason: format!("bool byte is {b}, must be 0 or 1"),
                        })
                    }
                }
            }
            ValueType::String => {
                Value::String(self.string((MAX_STRING_LEN, "limits::MAX_STRING_LEN"), what("string", loc))?)
            }
            ValueType::Array => Value::Array(self.array_value(loc, depth + 1)?),
        })
    }

    fn array_value(&mut self, loc: &Loc<'_>, depth: usize) -> Result<Array, GgufError> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(GgufError::InvalidValue {
                what: what("array", loc).to_string(),
                offset: self.pos,
                reason: format!("arrays are nested more than {MAX_ARRAY_DEPTH} levels deep (limits::MAX_ARRAY_DEPTH)"),
            });
        }
        let elem_type = self.value_type(what("array element type", loc))?;
        let count_offset = self.pos;
        let count = self.u64(what("array length", loc))?;
        // Strings need at least their 8-byte length, arrays their type and count.
        let min_elem_bytes = elem_type.fixed_size().unwrap_or(match elem_type {
            ValueType::String => 8,
            _ => 12,
        }) as u64;
        self.check_count(
            count,
            (MAX_ARRAY_LEN, "limits::MAX_ARRAY_LEN"),
            min_elem_bytes,
            count_offset,
            what("array length", loc),
        )?;
        let mut values = Vec::with_capacity(count.min(PREALLOC as u64) as usize);
        self.hold(ALLOCATION_COST, what("array", loc))?;
        for i in 0..count {
            self.hold(VALUE_SLOT_COST, what("array element", loc))?;
            values.push(self.value(elem_type, &Loc::Element(loc, i), depth)?);
        }
        Ok(Array { elem_type, values })
    }

    fn tensor_directory(&mut self, tensor_count: u64, alignment: u64) -> Result<Vec<TensorInfo>, GgufError> {
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(tensor_count.min(PREALLOC as u64) as usize);
        let mut by_name: HashMap<String, usize> = HashMap::new();
        for n in 0..tensor_count {
            let index = tensors.len();
            let name =
                self.string((MAX_TENSOR_NAME_LEN, "limits::MAX_TENSOR_NAME_LEN"), what("name", &Loc::Tensor(n)))?;
            let loc = Loc::NamedTensor(n, &name);
            let invalid = |reason: String| GgufError::InvalidTensor { index, name: name.clone(), reason };

            let n_dims_offset = self.pos;
            let n_dims = self.u32(what("dimension count", &loc))?;
            if n_dims == 0 || n_dims as usize > MAX_DIMS {
                return Err(invalid(format!(
                    "dimension count at byte {n_dims_offset} is {n_dims}; must be 1 to {MAX_DIMS}"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(self.u64(what("dimension", &loc))?);
            }

            let type_offset = self.pos;
            let type_id = self.u32(what("type", &loc))?;
            let ty = GgmlType::from_id(type_id)
                .ok_or_else(|| invalid(format!("unknown tensor type id {type_id} at byte {type_offset}")))?;

            let offset_at = self.pos;
            let offset = self.u64(what("data offset", &loc))?;

            check_shape(ty, &dims).map_err(|reason| invalid(format!("{ty} tensor {reason}")))?;
            if offset % alignment != 0 {
                return Err(invalid(format!(
                    "data offset {offset} (at byte {offset_at}) is not a multiple of the alignment {alignment}"
                )));
            }
            if let Some(&first) = by_name.get(&name) {
                return Err(GgufError::DuplicateTensor { name, first, second: index });
            }
            by_name.insert(name.clone(), index);
            tensors.push(TensorInfo { name, dims, ty, offset });
        }
        Ok(tensors)
    }
}

fn check_version(version: u32) -> Result<(), GgufError> {
    let hint = match version {
        2 | 3 => return Ok(()),
        1 => "version 1 used 32-bit counts and is no longer supported",
        0 => "not a valid version",
        v if (1..=3).contains(&v.swap_bytes()) => "the file appears to be big-endian",
        _ => "newer than this reader",
    };
    Err(GgufError::UnsupportedVersion { version, hint })
}

/// `general.alignment` if present (a nonzero power-of-two u32), else the default.
pub(crate) fn alignment_of(metadata: &Metadata) -> Result<u64, GgufError> {
    match metadata.get(ALIGNMENT_KEY) {
        None => Ok(DEFAULT_ALIGNMENT),
        Some(Value::U32(a)) if a.is_power_of_two() => Ok(u64::from(*a)),
        Some(other) => Err(GgufError::BadAlignment { found: other.describe() }),
    }
}

/// Rounds `pos` up to a multiple of `alignment` (a power of two).
pub(crate) fn align_up(pos: u64, alignment: u64) -> Option<u64> {
    Some(pos.checked_add(alignment - 1)? & !(alignment - 1))
}

#[cfg(test)]
mod tests {
    use super::layer_of;

    #[test]
    fn layer_names() {
        assert_eq!(layer_of("blk.12.attn_q.weight"), Some(12));
        assert_eq!(layer_of("token_embd.weight"), None);
        assert_eq!(layer_of("blk.x.attn_q.weight"), None);
        assert_eq!(layer_of("blk."), None);
    }
}
