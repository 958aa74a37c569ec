//! AVX-512 helpers shared by the x86-64 kernels of every family; they import
//! nothing from the rest of the crate.

use std::arch::x86_64::*;

/// Keeps `vectors` in registers at this point, so that the compiler keeps
/// the loop order instead of hoisting every weight vector of a block (as
/// `simd::avx2::pin` does for 256-bit vectors).
///
/// # Safety
/// AVX-512 F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pin<const T: usize>(vectors: &mut [__m512i; T]) {
    for v in vectors.iter_mut() {
        // SAFETY: an empty instruction template; the operand only tells the
        // compiler that `v` is read and written in a register here.
        std::arch::asm!("/* {0} */", inout(zmm_reg) * v, options(nostack, preserves_flags));
    }
}

/// `pin` for float vectors.
///
/// # Safety
/// AVX-512 F must be available.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn pin_ps<const T: usize>(vectors: &mut [__m512; T]) {
    for v in vectors.iter_mut() {
        // SAFETY: as in `pin`.
        std::arch::asm!("/* {0} */", inout(zmm_reg) * v, options(nostack, preserves_flags));
    }
}
