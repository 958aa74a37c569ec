//! Where a session's memory comes from: its KV cache and its scratch buffers
//! (the activations). By default both are ordinary heap memory; a caller can
//! supply its own (the secure world passes regions of granted granules, so
//! that KV cache and activations live in Flex-Mem).

use std::sync::Arc;

use bytemuck::Pod;

use crate::EngineError;

/// A block of memory the engine may use, aligned for `f32` at least.
pub trait MemoryBlock: Send + Sync {
    fn bytes(&self) -> &[u8];
    fn bytes_mut(&mut self) -> &mut [u8];
}

/// Hands out blocks for a session's scratch buffers.
pub trait ScratchSource: Send + Sync {
    /// A block of at least `bytes` bytes (contents unspecified).
    fn block(&self, bytes: usize) -> Result<Box<dyn MemoryBlock>, EngineError>;
}

/// Heap memory. Allocated zeroed, so that large blocks come as untouched
/// pages from the OS: pages are touched only as they are used.
pub(crate) struct HeapBlock(Vec<u64>);

impl HeapBlock {
    pub(crate) fn new(bytes: usize) -> Self {
        HeapBlock(vec![0u64; bytes.div_ceil(8)])
    }
}

impl MemoryBlock for HeapBlock {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.0)
    }
}

/// Scratch buffers on the heap.
pub struct HeapScratch;

impl ScratchSource for HeapScratch {
    fn block(&self, bytes: usize) -> Result<Box<dyn MemoryBlock>, EngineError> {
        Ok(Box::new(HeapBlock::new(bytes)))
    }
}

/// The heap source shared by every session that is given no other.
pub fn heap_scratch() -> Arc<dyn ScratchSource> {
    Arc::new(HeapScratch)
}

/// A growable buffer of `T` in blocks from a [`ScratchSource`]: `resize`
/// keeps the contents and fills new elements, like `Vec::resize`, and only
/// takes a new block when the length outgrows the current one.
pub struct Buf<T> {
    source: Arc<dyn ScratchSource>,
    block: Option<Box<dyn MemoryBlock>>,
    len: usize,
    _values: std::marker::PhantomData<T>,
}

impl<T: Pod> Buf<T> {
    pub fn new(source: Arc<dyn ScratchSource>) -> Self {
        Self { source, block: None, len: 0, _values: std::marker::PhantomData }
    }

    /// Elements the current block holds.
    pub fn capacity(&self) -> usize {
        self.block.as_ref().map_or(0, |b| b.bytes().len() / std::mem::size_of::<T>())
    }

    /// Makes room for `len` elements (keeping the contents) without changing the length.
    pub fn reserve(&mut self, len: usize) -> Result<(), EngineError> {
        if len <= self.capacity() {
            return Ok(());
        }
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| EngineError::Other(format!("a scratch buffer of {len} elements is too large")))?;
        let mut block = self.source.block(bytes)?;
        if block.bytes().len() < bytes || block.bytes().as_ptr().align_offset(std::mem::align_of::<T>()) != 0 {
            return Err(EngineError::Other(format!("a scratch block of {bytes} bytes came short or misaligned")));
        }
        let keep = self.len * std::mem::size_of::<T>();
        if let Some(old) = &self.block {
            block.bytes_mut()[..keep].copy_from_slice(&old.bytes()[..keep]);
        }
        self.block = Some(block);
        Ok(())
    }

    /// Sets the length to `len`, filling new elements with `value`.
    pub fn resize(&mut self, len: usize, value: T) -> Result<(), EngineError> {
        self.reserve(len)?;
        let old = self.len;
        self.len = len;
        if len > old {
            self[old..len].fill(value);
        }
        Ok(())
    }
}

impl<T: Pod> std::ops::Deref for Buf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.block {
            Some(b) => &bytemuck::cast_slice(whole::<T>(b.bytes()))[..self.len],
            None => &[],
        }
    }
}

impl<T: Pod> std::ops::DerefMut for Buf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.block {
            Some(b) => &mut bytemuck::cast_slice_mut(whole_mut::<T>(b.bytes_mut()))[..self.len],
            None => &mut [],
        }
    }
}

/// The bytes that make whole elements of `T`.
fn whole<T>(bytes: &[u8]) -> &[u8] {
    &bytes[..bytes.len() / std::mem::size_of::<T>() * std::mem::size_of::<T>()]
}

fn whole_mut<T>(bytes: &mut [u8]) -> &mut [u8] {
    let n = bytes.len() / std::mem::size_of::<T>() * std::mem::size_of::<T>();
    &mut bytes[..n]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Counts the blocks and bytes asked for, and hands out odd-sized ones.
    struct Counting(AtomicUsize, AtomicUsize);

    impl ScratchSource for Counting {
        fn block(&self, bytes: usize) -> Result<Box<dyn MemoryBlock>, EngineError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            self.1.fetch_add(bytes, Ordering::Relaxed);
            Ok(Box::new(HeapBlock::new(bytes + 13)))
        }
    }

    #[test]
    fn buffers_grow_like_vectors_and_take_blocks_only_to_grow() {
        let source = Arc::new(Counting(AtomicUsize::new(0), AtomicUsize::new(0)));
        let mut b: Buf<f32> = Buf::new(source.clone());
        assert!(b.is_empty());
        b.resize(3, 1.5).unwrap();
        b[1] = 7.0;
        b.resize(10, 2.0).unwrap();
        assert_eq!(&b[..], &[1.5, 7.0, 1.5, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
        b.resize(2, 0.0).unwrap();
        b.resize(4, 9.0).unwrap();
        assert_eq!(&b[..], &[1.5, 7.0, 9.0, 9.0], "shrinking then growing refills, as Vec does");
        assert_eq!(source.0.load(Ordering::Relaxed), 2, "a block for 3 elements, then one for 10");
        b.reserve(100).unwrap();
        assert_eq!((b.len(), b.capacity() >= 100), (4, true));
        assert_eq!(&b[..], &[1.5, 7.0, 9.0, 9.0]);
        assert_eq!(source.1.load(Ordering::Relaxed), (3 + 10 + 100) * 4);
    }
}
