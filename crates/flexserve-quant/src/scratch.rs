//! Per-thread scratch buffers for the matmul kernels.
//!
//! A kernel call is one task of a matmul, and every layer of every token
//! runs several; the buffers a call needs (converted scales, unpacked
//! factors, block sums) are therefore kept per thread between calls, so that
//! a thread allocates only when it first meets a larger shape.

/// Defines `fn $name<R>(len, fill, body) -> R`, which runs `body` with `len`
/// elements of type `$ty` set to `fill`, taken from the calling thread's
/// buffer of that function.
macro_rules! scratch_fn {
    ($($(#[$doc:meta])* $vis:vis fn $name:ident: $ty:ty;)*) => {$(
        $(#[$doc])*
        $vis fn $name<R>(len: usize, fill: $ty, body: impl FnOnce(&mut [$ty]) -> R) -> R {
            thread_local! {
                static BUFFER: std::cell::Cell<Vec<$ty>> = const { std::cell::Cell::new(Vec::new()) };
            }
            // Taken out of the cell while in use, so that a nested call gets a
            // buffer of its own rather than this one.
            let mut buffer = BUFFER.take();
            buffer.clear();
            buffer.resize(len, fill);
            let result = body(&mut buffer);
            BUFFER.set(buffer);
            result
        }
    )*};
}
pub(crate) use scratch_fn;

scratch_fn! {
    /// Scratch of f32 values (scales, scale products).
    pub(crate) fn with_f32: f32;
    /// Scratch of i32 values (block sums).
    pub(crate) fn with_i32: i32;
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
}
