//! One module per instruction set with the SIMD helpers that every kernel
//! family shares (loads, conversions, horizontal sums, register pins). They
//! import nothing from the rest of the crate; the families import them and
//! never each other's private helpers.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "aarch64")]
pub(crate) mod neon;
