//! A GGUF file mapped into memory.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::{GgufError, GgufHeader};

/// A GGUF file mapped read-only into memory, its header parsed and every
/// tensor's data range checked against the file size.
pub struct GgufFile {
    pub header: GgufHeader,
    path: PathBuf,
    map: Mmap,
}

impl GgufFile {
    /// Opens and maps `path`. Every error names the file.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        Self::open_inner(path).map_err(|e| e.in_file(path))
    }

    fn open_inner(path: &Path) -> Result<GgufFile, GgufError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| GgufError::Io { what, source }
        };
        let file = File::open(path).map_err(io("cannot open"))?;
        let len = file.metadata().map_err(io("cannot read file size"))?.len();
        if len == 0 {
            // Mapping an empty file fails on some systems; report it as what it is.
            return Err(GgufError::Truncated { offset: 0, what: "magic (the file is empty)".to_owned() });
        }
        // SAFETY: the file is opened read-only and the mapping is never written
        // through. As with any file mapping, another process truncating or
        // rewriting the file while it is mapped would change (or fault on) the
        // bytes seen here; model files are treated as immutable while served.
        let map = unsafe { Mmap::map(&file) }.map_err(io("cannot map into memory"))?;
        let header = GgufHeader::parse(&map)?;
        Ok(GgufFile { header, path: path.to_owned(), map })
    }

    /// The whole data section.
    pub fn data(&self) -> &[u8] {
        // `parse` guarantees data_offset <= file length.
        let start = usize::try_from(self.header.data_offset).unwrap_or(usize::MAX);
        self.map.get(start..).unwrap_or(&[])
    }

    /// The data of the tensor named `name`, exactly its byte size.
    pub fn tensor_data(&self, name: &str) -> Option<&[u8]> {
        let t = self.header.tensor(name)?;
        let range = self.header.tensor_file_range(t);
        let start = usize::try_from(range.start).ok()?;
        let end = usize::try_from(range.end).ok()?;
        self.map.get(start..end)
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.map
    }

    /// Lets the kernel drop the resident pages of `range` (whole pages inside
    /// it) from this process, for bytes no longer needed in memory (a tensor
    /// copied into another layout). Touching them again reads them back from
    /// the file, so nothing changes for a reader; only resident memory falls.
    pub fn drop_resident(&self, range: std::ops::Range<usize>) {
        let page = 4096;
        let start = range.start.next_multiple_of(page);
        let end = range.end.min(self.map.len()) / page * page;
        if end > start {
            // SAFETY: the map is a read-only shared mapping of a file, so
            // MADV_DONTNEED only discards clean pages that are re-read from
            // the file on the next access: no reader can see other contents.
            let _ = unsafe { self.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start) };
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("len", &self.map.len())
            .field("version", &self.header.version)
            .field("metadata_entries", &self.header.metadata.len())
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}
