//! Weight access: tensor by name -> byte range -> buffer handed in.
//!
//! The engine never reads files itself. A [`TensorSource`] names the tensors
//! (from a GGUF directory) and hands out [`TensorBytes`]: a range inside some
//! [`WeightStorage`] — a plain file's mmap today, secure memory that a
//! pipeline fills layer by layer tomorrow.

use std::ops::Range;
use std::sync::Arc;

use flexserve_gguf::{GgmlType, GgufFile, GgufHeader, TensorInfo};
pub use flexserve_quant::Repacked;
use flexserve_quant::{KernelSet, QuantError};

use crate::EngineError;

/// Memory holding tensor bytes.
pub trait WeightStorage: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// `range` is no longer needed in memory (its tensor was copied into
    /// another layout); storage that can give the pages back does.
    fn release(&self, _range: Range<usize>) {}
}

impl WeightStorage for GgufFile {
    fn bytes(&self) -> &[u8] {
        GgufFile::bytes(self)
    }

    fn release(&self, range: Range<usize>) {
        self.drop_resident(range);
    }
}

impl WeightStorage for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A tensor's bytes: a range of a shared storage.
#[derive(Clone)]
pub struct TensorBytes {
    storage: Arc<dyn WeightStorage>,
    range: Range<usize>,
}

impl TensorBytes {
    /// Fails if `range` lies outside the storage.
    pub fn new(storage: Arc<dyn WeightStorage>, range: Range<usize>) -> Result<Self, EngineError> {
        let len = storage.bytes().len();
        if range.start > range.end || range.end > len {
            return Err(EngineError::Weights(format!(
                "byte range {}..{} is outside the {len}-byte weight buffer",
                range.start, range.end
            )));
        }
        Ok(Self { storage, range })
    }

    pub fn from_vec(v: Vec<u8>) -> Self {
        let range = 0..v.len();
        Self { storage: Arc::new(v), range }
    }

    #[inline]
    pub fn as_slice(&self) -> &[u8] {
        &self.storage.bytes()[self.range.clone()]
    }
}

/// Names the tensors of a model and yields their bytes.
pub trait TensorSource {
    fn info(&self, name: &str) -> Option<&TensorInfo>;
    fn bytes(&self, info: &TensorInfo) -> Result<TensorBytes, EngineError>;
    /// How the source holds the tensor's bytes: a source that rearranged
    /// them in place already (secure memory, to hold one copy) says so.
    fn layout(&self, _info: &TensorInfo) -> Layout {
        Layout::Rows
    }
}

/// Plaintext weights held in ordinary memory (a decrypted model, or a
/// rearranged copy of a tensor), wiped when dropped so that no copy outlives
/// the model.
pub struct OwnedWeights(Vec<u8>);

impl OwnedWeights {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(bytes)
    }
}

impl WeightStorage for OwnedWeights {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for OwnedWeights {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Zeroizes `bytes` (volatile writes the compiler cannot drop), eight bytes
/// per write where the alignment allows: wiping a model-sized buffer byte by
/// byte took a visible share of a short run.
pub fn wipe(bytes: &mut [u8]) {
    let (head, words, tail) = bytemuck::pod_align_to_mut::<u8, u64>(bytes);
    zeroize::Zeroize::zeroize(head);
    zeroize::Zeroize::zeroize(words);
    zeroize::Zeroize::zeroize(tail);
}

/// A GGUF image (header plus the bytes it describes) as a tensor source:
/// a memory-mapped file, or a decrypted model in memory.
pub struct GgufSource {
    header: GgufHeader,
    storage: Arc<dyn WeightStorage>,
}

impl GgufSource {
    pub fn from_file(file: Arc<GgufFile>) -> Self {
        Self { header: file.header.clone(), storage: file }
    }

    /// `bytes` holds a whole GGUF file; its header is parsed and every tensor
    /// checked to lie inside it.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, EngineError> {
        let storage = OwnedWeights::new(bytes);
        let header = GgufHeader::parse(storage.bytes())?;
        Ok(Self { header, storage: Arc::new(storage) })
    }

    pub fn header(&self) -> &GgufHeader {
        &self.header
    }
}

impl TensorSource for GgufSource {
    fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.header.tensor(name)
    }

    fn bytes(&self, info: &TensorInfo) -> Result<TensorBytes, EngineError> {
        let r = self.header.tensor_file_range(info);
        TensorBytes::new(self.storage.clone(), r.start as usize..r.end as usize)
            .map_err(|e| EngineError::Weights(format!("tensor {}: {e}", info.name)))
    }
}

/// How a tensor's bytes are arranged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row after row, as in the file.
    Rows,
    /// Rows interleaved in groups of eight for the grouped matrix kernels
    /// (`flexserve_quant::Repacked`).
    Packed(Repacked),
}

/// A 2-D weight matrix: `rows` rows of `cols` elements, each row encoded in `ty`.
#[derive(Clone)]
pub struct Tensor {
    pub name: String,
    pub ty: GgmlType,
    pub rows: usize,
    pub cols: usize,
    pub row_bytes: usize,
    pub layout: Layout,
    pub data: TensorBytes,
    /// The kernels of `ty` at the tier active when the tensor loaded
    /// (`None` for a type they do not support): resolved once, for every
    /// product that follows.
    kernels: Option<KernelSet>,
}

impl Tensor {
    /// The kernels this tensor resolved when it loaded.
    #[inline]
    pub fn kernels(&self) -> Result<&KernelSet, EngineError> {
        self.kernels.as_ref().ok_or_else(|| EngineError::Weights(QuantError::Unsupported(self.ty).to_string()))
    }

    #[inline]
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Row `i` of a tensor in [`Layout::Rows`] (rearranged tensors have no
    /// contiguous rows: a caller bug).
    #[inline]
    pub fn row(&self, i: usize) -> &[u8] {
        assert_eq!(self.layout, Layout::Rows, "tensor {}: rows of a rearranged tensor are not contiguous", self.name);
        &self.bytes()[i * self.row_bytes..(i + 1) * self.row_bytes]
    }

    /// The layout [`Tensor::repack_for_matmul`] would rearrange this tensor
    /// into, if any.
    pub fn pending_repack(&self) -> Option<Repacked> {
        match self.layout {
            Layout::Rows => Repacked::for_matrix(self.ty, self.rows, self.cols),
            Layout::Packed(_) => None,
        }
    }

    /// Rearranges a matrix-product weight for the grouped kernels where its
    /// type and shape allow it (`Repacked::for_matrix`: Q4_0 and Q4_K, as
    /// llama.cpp's default CPU path does, with its arithmetic for them, so
    /// that products agree with it bit for bit); other tensors are left as
    /// they are. The rearranged bytes go to a new buffer
    /// (wiped on drop) and the tensor lets go of the original ones.
    pub fn repack_for_matmul(&mut self) -> Result<(), EngineError> {
        let Some(packing) = self.pending_repack() else {
            return Ok(());
        };
        let packed = packing
            .repack(self.bytes(), self.rows, self.cols)
            .map_err(|e| EngineError::Weights(format!("tensor {}: {e}", self.name)))?;
        // A mapped file's pages of the original layout are not needed any more.
        self.data.storage.release(self.data.range.clone());
        self.data = TensorBytes::new(Arc::new(OwnedWeights::new(packed)), 0..self.rows * self.row_bytes)?;
        self.layout = Layout::Packed(packing);
        Ok(())
    }

    /// Loads `name`, requiring the shape `[cols, rows]` (file order: ne0 first).
    pub fn load(src: &dyn TensorSource, name: &str, cols: usize, rows: usize) -> Result<Self, EngineError> {
        let info = src.info(name).ok_or_else(|| EngineError::MissingTensor(name.to_string()))?;
        Self::from_info(src, info, Some((cols, rows)))
    }

    /// Loads `name` if the model has it.
    pub fn load_opt(src: &dyn TensorSource, name: &str, cols: usize, rows: usize) -> Result<Option<Self>, EngineError> {
        match src.info(name) {
            Some(info) => Self::from_info(src, info, Some((cols, rows))).map(Some),
            None => Ok(None),
        }
    }

    fn from_info(src: &dyn TensorSource, info: &TensorInfo, want: Option<(usize, usize)>) -> Result<Self, EngineError> {
        let name = &info.name;
        let cols = *info.dims.first().unwrap_or(&1) as usize;
        let rows: u64 = info.dims.iter().skip(1).product();
        let rows = rows as usize;
        if let Some((wc, wr)) = want {
            if (cols, rows) != (wc, wr) {
                return Err(EngineError::Weights(format!(
                    "tensor {name} has shape {:?}, expected [{wc}, {wr}]",
                    info.dims
                )));
            }
        }
        let row_bytes = info.ty.row_size(cols as u64).ok_or_else(|| {
            EngineError::Weights(format!("tensor {name}: {cols} columns is not a whole number of {} blocks", info.ty))
        })? as usize;
        let data = src.bytes(info)?;
        if data.as_slice().len() != row_bytes * rows {
            return Err(EngineError::Weights(format!(
                "tensor {name}: {} bytes, expected {}",
                data.as_slice().len(),
                row_bytes * rows
            )));
        }
        let layout = src.layout(info);
        if let Layout::Packed(packing) = layout {
            if Repacked::for_matrix(info.ty, rows, cols) != Some(packing) {
                return Err(EngineError::Weights(format!(
                    "tensor {name}: a {} [{cols}, {rows}] cannot be {packing:?}",
                    info.ty
                )));
            }
        }
        let kernels = flexserve_quant::kernel_set(info.ty).ok();
        Ok(Self { name: name.clone(), ty: info.ty, rows, cols, row_bytes, layout, data, kernels })
    }

    /// Dequantizes the whole tensor (for small vectors: norms, biases).
    pub fn to_f32(&self) -> Result<Vec<f32>, EngineError> {
        if self.layout != Layout::Rows {
            return Err(EngineError::Weights(format!("tensor {}: cannot dequantize a rearranged tensor", self.name)));
        }
        let k = self.kernels.as_ref().ok_or_else(|| {
            EngineError::Weights(format!("tensor {}: {}", self.name, QuantError::Unsupported(self.ty)))
        })?;
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, dst) in out.chunks_exact_mut(self.cols).enumerate() {
            (k.row.dequantize)(self.row(r), dst);
        }
        Ok(out)
    }
}

/// Loads a 1-D vector of `n` values (any type) as f32.
pub fn load_vector(src: &dyn TensorSource, name: &str, n: usize) -> Result<Vec<f32>, EngineError> {
    Tensor::load(src, name, n, 1)?.to_f32()
}

pub fn load_vector_opt(src: &dyn TensorSource, name: &str, n: usize) -> Result<Option<Vec<f32>>, EngineError> {
    match Tensor::load_opt(src, name, n, 1)? {
        Some(t) => t.to_f32().map(Some),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::wipe;

    #[test]
    fn wipe_zeroes_exactly_the_slice_at_any_alignment() {
        for (start, len) in [(0, 0), (0, 64), (3, 5), (3, 100), (7, 1)] {
            let mut v = vec![0xA5u8; start + len + 9];
            wipe(&mut v[start..start + len]);
            assert!(v[start..start + len].iter().all(|&b| b == 0), "{start} {len}");
            assert!(v[..start].iter().chain(&v[start + len..]).all(|&b| b == 0xA5), "{start} {len}");
        }
    }
}
