//! AVX2 helpers shared by the x86-64 kernels of every family: loads (bytes,
//! f16 and bf16 values, nibbles, bit masks), the unsigned-by-signed byte
//! products, horizontal sums and register pins. They import nothing from the
//! rest of the crate.
//!
//! Every helper is an `unsafe fn` for its `target_feature` (AVX2, FMA and
//! F16C: the caller must have checked the CPU, as the kernels' safe wrappers
//! do) and, where it takes pointers, for the bytes it reads there.

use std::arch::x86_64::*;

// ---------------------------------------------------------------------------
// Loads

/// The 32 bytes at `p` (any alignment).
///
/// # Safety
/// AVX2 must be available and `p` must point to 32 readable bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load(p: *const u8) -> __m256i {
    _mm256_loadu_si256(p.cast())
}

/// Reads the f16 at `p` (any alignment) as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_f16(p: *const u8) -> f32 {
    _mm_cvtss_f32(load_f16_pair(p, p))
}

/// Lanes 0 and 1: the f16 values at `p` and `q` (any alignment) as f32.
///
/// Both halves are combined in a general register and moved over with
/// `movd`, which clears the rest of the vector. Loading them straight into a
/// vector lane would merge into whatever register the compiler picks — in a
/// dot-product loop that was the accumulator, chaining every iteration
/// behind the previous one's FMA.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_f16_pair(p: *const u8, q: *const u8) -> __m128 {
    let lo = u16::from_le_bytes(p.cast::<[u8; 2]>().read_unaligned()) as u32;
    let hi = u16::from_le_bytes(q.cast::<[u8; 2]>().read_unaligned()) as u32;
    _mm_cvtph_ps(_mm_cvtsi32_si128((lo | (hi << 16)) as i32))
}

/// The f16 at `bytes[at..at + 2]` as f32.
///
/// # Safety
/// F16C must be available (`at + 2 <= bytes.len()` is checked by indexing).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn f16_at(bytes: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The eight f16 values at `p` (any alignment) as f32.
///
/// # Safety
/// F16C must be available and 16 bytes at `p` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_f16x8(p: *const u8) -> __m256 {
    _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
}

/// The eight bf16 values at `p` (any alignment) as f32 (exact: a bf16 is
/// the upper half of an f32).
///
/// # Safety
/// AVX2 must be available and 16 bytes at `p` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_bf16x8(p: *const u8) -> __m256 {
    let wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast()));
    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(wide))
}

/// The 32 nibbles of the 16 bytes at `p` as bytes 0..=15 in element order:
/// low nibbles in the lower 128-bit lane, high nibbles in the upper one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_nibbles(p: *const u8) -> __m256i {
    let packed = _mm_loadu_si128(p.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(packed), packed);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
}

/// Byte `j` is 0xFF where bit `j` of the little-endian u32 at `p` is set, else 0.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn load_bit_mask(p: *const u8) -> __m256i {
    let bits = u32::from_le_bytes(p.cast::<[u8; 4]>().read_unaligned());
    // Byte j takes source byte j / 8 (the shuffle indexes within each lane,
    // and each lane holds the four source bytes) ...
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(bits as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, //
            2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    // ... and keeps bit j % 8 of it.
    let select = _mm256_set1_epi64x(0x8040_2010_0804_0201_u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, select), select)
}

// ---------------------------------------------------------------------------
// Products and sums

/// Eight f32 sums of four neighbouring products of unsigned `u` and signed `s` bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_u8_i8(u: __m256i, s: __m256i) -> __m256 {
    let pairs = _mm256_maddubs_epi16(u, s);
    _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
}

/// Sum of the eight lanes: upper half onto lower, then pairs, then the last
/// two (llama.cpp's AVX2 reduction, which every tier's dots reproduce).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum(v: __m256) -> f32 {
    hsum_128(_mm_add_ps(_mm256_extractf128_ps::<1>(v), _mm256_castps256_ps128(v)))
}

/// Sum of the four lanes: pairs, then the last two.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_128(v: __m128) -> f32 {
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

/// The sum of the eight i32 lanes of `v` (exact while it fits).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_i32(v: __m256i) -> i32 {
    hsum_i32_128(_mm_add_epi32(_mm256_extracti128_si256::<1>(v), _mm256_castsi256_si128(v)))
}

/// The sum of the four i32 lanes of `v`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn hsum_i32_128(v: __m128i) -> i32 {
    let v = _mm_add_epi32(v, _mm_unpackhi_epi64(v, v));
    _mm_cvtsi128_si32(_mm_add_epi32(v, _mm_shuffle_epi32::<0b01>(v)))
}

// ---------------------------------------------------------------------------
// Register pins

/// Defines a `pin` function per vector type (see `pin`).
macro_rules! pins {
    ($($(#[$doc:meta])* $name:ident: $vector:ty;)*) => {$(
        $(#[$doc])*
        ///
        /// # Safety
        /// AVX must be available.
        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        pub(crate) unsafe fn $name<const T: usize>(vectors: &mut [$vector; T]) {
            for v in vectors.iter_mut() {
                // SAFETY: an empty instruction template; the operand only tells
                // the compiler that `v` is read and written in a register here.
                std::arch::asm!("/* {0} */", inout(ymm_reg) * v, options(nostack, preserves_flags));
            }
        }
    )*};
}

pins! {
    /// Keeps `vectors` in registers at this point and stops the compiler from
    /// moving loads across it, so that the unrolled inner loops keep their
    /// order: left free, it hoists and interleaves them into far more live
    /// vectors than there are registers, and spills.
    pin: __m256i;
    /// `pin` for float vectors.
    pin_ps: __m256;
}
