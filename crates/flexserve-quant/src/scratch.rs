//! Per-thread scratch buffers for the matmul kernels.
//!
//! A kernel call is one task of a matmul, and every layer of every token
//! runs several; the buffers a call needs (converted scales, unpacked
//! factors, block sums) are therefore kept per thread between calls, so that
//! a thread allocates only when it first meets a larger shape.

/// Defines `fn $name<R>(len, fill, body) -> R`, which runs `body` with `len`
/// elements of type `$ty` set to `fill`, taken from the calling thread's
/// buffer `$buffer` (a thread-local of the module that invokes it).
macro_rules! scratch_fn {
    ($($(#[$doc:meta])* $vis:vis fn $name:ident: $ty:ty => $buffer:ident;)*) => {$(
        thread_local! {
            static $buffer: std::cell::Cell<Vec<$ty>> = const { std::cell::Cell::new(Vec::new()) };
        }
        $(#[$doc])*
        $vis fn $name<R>(len: usize, fill: $ty, body: impl FnOnce(&mut [$ty]) -> R) -> R {
            // Taken out of the cell while in use, so that a nested call gets a
            // buffer of its own rather than this one.
            let mut buffer = $buffer.take();
            buffer.clear();
            buffer.resize(len, fill);
            let result = body(&mut buffer);
            $buffer.set(buffer);
            result
        }
    )*};
}
pub(crate) use scratch_fn;

scratch_fn! {
    /// Scratch of f32 values (scales, scale products).
    pub(crate) fn with_f32: f32 => F32_SCRATCH;
    /// Scratch of i32 values (block sums).
    pub(crate) fn with_i32: i32 => I32_SCRATCH;
}

/// [`with_f32`] for a kernel whose results depend only on elements it
/// writes first:
/// `body` gets `len` elements holding whatever the thread's earlier calls
/// left there (initialised values: zero, or this thread's own results), so
/// that a large scratch is not filled again on every call.
pub(crate) fn with_f32_unfilled<R>(len: usize, body: impl FnOnce(&mut [f32]) -> R) -> R {
    let mut buffer = F32_SCRATCH.take();
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    let result = body(&mut buffer[..len]);
    F32_SCRATCH.set(buffer);
    result
}

/// Zeroes the calling thread's scratch that may hold values derived from
/// activations (and so from a user's prompt), over its whole capacity: what
/// a thread scrubs before its core goes to another world (Flex-NPU). The
/// buffers of unpacked weight factors hold nothing of the user's and stay.
pub fn scrub_thread_scratch() {
    fn scrub<T: zeroize::DefaultIsZeroes>(cell: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>) {
        let mut buffer = cell.take();
        // Every element up to the capacity is written, so all of it is
        // initialised and zero (the zeroing is not optimised away).
        buffer.resize(buffer.capacity(), T::default());
        zeroize::Zeroize::zeroize(buffer.as_mut_slice());
        cell.set(buffer);
    }
    scrub(&F32_SCRATCH);
    scrub(&I32_SCRATCH);
}

/// Whether the calling thread's activation scratch is scrubbed: every
/// element zero, over its whole capacity (for tests of [`scrub_thread_scratch`]).
#[doc(hidden)]
pub fn thread_scratch_is_zero() -> bool {
    fn zero<T: Copy + Default + PartialEq>(cell: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>) -> bool {
        let buffer = cell.take();
        let ok = buffer.len() == buffer.capacity() && buffer.iter().all(|&v| v == T::default());
        cell.set(buffer);
        ok
    }
    zero(&F32_SCRATCH) && zero(&I32_SCRATCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_filled_afresh_and_nest() {
        with_f32(3, 1.5, |outer| {
            outer.fill(7.0);
            // A nested call gets its own buffer, filled as asked.
            with_f32(5, 0.0, |inner| assert_eq!(inner, [0.0; 5]));
            assert_eq!(outer, [7.0; 3]);
        });
        // The next call sees the requested fill, not the last contents.
        with_f32(4, 2.0, |again| assert_eq!(again, [2.0; 4]));
        with_i32(2, -1, |ints| assert_eq!(ints, [-1, -1]));
    }

    #[test]
    fn unfilled_scratch_keeps_what_was_there() {
        with_f32(6, 4.0, |_| ());
        with_f32_unfilled(4, |b| assert_eq!(b, [4.0; 4]));
        // Growing fills only the new part.
        with_f32_unfilled(8, |b| assert_eq!(b, [4.0, 4.0, 4.0, 4.0, 4.0, 4.0, 0.0, 0.0]));
    }

    #[test]
    fn scrubbing_zeroes_the_whole_capacity() {
        with_f32(64, 3.25, |b| b.fill(9.5));
        with_i32(16, 7, |_| ());
        with_f32(4, 1.0, |_| ());
        assert!(!thread_scratch_is_zero());
        scrub_thread_scratch();
        assert!(thread_scratch_is_zero());
        // Still usable, filled as asked.
        with_f32(8, 2.0, |b| assert_eq!(b, [2.0; 8]));
    }
}
