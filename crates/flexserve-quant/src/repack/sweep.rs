//! The loop order shared by the SIMD kernels of rearranged weights: which
//! groups of rows meet which activation rows, in what order.

use super::{Product, REPACK_ROWS};
use crate::legacy::QK;

/// Activation rows per pass: each group block's unpacked weights serve this
/// many. For `Q8_0x8` four measured fastest on the Zen 3 host, ahead of five,
/// six and eight.
pub(super) const TOKENS: usize = 4;

/// Calls `$kernel::<T, ...>(args)` with `T` the pass's token count (1 to
/// `TOKENS`): each count has a kernel of its own, with its own registers.
macro_rules! by_tokens {
    ($tn:expr => $kernel:ident::<_ $(, $param:ident)*>($($arg:expr),* $(,)?)) => {
        match $tn {
            4 => $kernel::<4 $(, $param)*>($($arg),*),
            3 => $kernel::<3 $(, $param)*>($($arg),*),
            2 => $kernel::<2 $(, $param)*>($($arg),*),
            _ => $kernel::<1 $(, $param)*>($($arg),*),
        }
    };
}
pub(super) use by_tokens;
const _: () = assert!(TOKENS == 4, "by_tokens covers 1 to 4 tokens");

/// How far ahead of the group block in hand the kernels of rearranged
/// weights prefetch, in bytes. One group is one stream of memory, which the
/// hardware prefetchers alone keep too short in a one-token product over a
/// matrix that is not in the caches (decode). On the Zen 3 host, one thread:
/// Q6_K streamed at 8 GB/s without it and 13-14 with it (1 to 8 of its
/// 1680-byte blocks ahead measured alike); Q4_0 (144-byte blocks) at 15.6
/// GB/s without it, about 20 with 2-5 KiB ahead, and less at 576 bytes.
/// Four Q4_K group blocks.
pub(super) const AHEAD_BYTES: usize = 4608;

/// Asks for the `bytes` at `at` to be brought into the caches.
#[inline]
pub(super) fn prefetch(at: *const u8, bytes: usize) {
    for line in (0..bytes).step_by(64) {
        // SAFETY: a prefetch is a hint that never faults, whatever the
        // address; `wrapping_add` keeps the arithmetic defined past the end.
        unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.wrapping_add(line).cast()) };
    }
}

/// A `pshufb` pattern that copies, in every 32-bit lane, the low (`half`
/// 0) or the high (`half` 1) 16-bit half into both halves; byte indices count
/// within a 128-bit lane, so it serves vectors of any width.
#[inline]
pub(super) fn dup_pattern(half: u8) -> std::arch::x86_64::__m128i {
    let bytes: [u8; 16] = std::array::from_fn(|i| i as u8 / 4 * 4 + 2 * half + i as u8 % 2);
    // SAFETY: SSE2 is part of x86-64; the load reads the 16 bytes of `bytes`.
    unsafe { std::arch::x86_64::_mm_loadu_si128(bytes.as_ptr().cast()) }
}

/// Bytes of groups swept by every pass of tokens before the next groups are
/// taken (kept in L2 while the activations stream past).
const CHUNK_BYTES: usize = 192 * 1024;

/// One pass: up to `groups_per_pass` neighbouring groups against up to
/// `TOKENS` activation rows.
pub(super) struct Pass {
    /// Blocks per row.
    pub nb: usize,
    /// The first group's first block.
    pub w: *const u8,
    /// Groups in the pass (1 up to the sweep's `groups_per_pass`; fewer only
    /// at the matrix's end), `group_bytes` apart.
    pub groups: usize,
    pub group_bytes: usize,
    /// The pass's first activation row and the stride between rows.
    pub a: *const u8,
    pub a_stride: usize,
    /// Index of the pass's first token.
    pub t0: usize,
    /// Tokens in the pass (1 to `TOKENS`).
    pub tn: usize,
    /// Whether the pass is one of llama.cpp's groups of four tokens, which
    /// its rearranged K-quant products compute with an arithmetic of their
    /// own: `TOKENS` tokens of a product whose rows are one sequence's
    /// (`Product::grouped`).
    pub grouped: bool,
    /// Where the first token's results go (eight per group), and the stride
    /// between tokens.
    pub out: *mut f32,
    pub out_stride: usize,
}

/// Calls `pass` for every run of `groups_per_pass` groups of eight rows and
/// every run of up to `TOKENS` activation rows, sweeping a chunk of groups
/// (`CHUNK_BYTES`) with all tokens before taking the next. The caller has
/// checked the shapes (`check_repacked`).
pub(super) fn sweep(p: Product, groups_per_pass: usize, mut pass: impl FnMut(Pass)) {
    let Product { layout, n, w, rows, a, a_row_bytes, n_tok, out, grouped } = p;
    let out_stride = out.stride;
    let nb = n / layout.ty().block_size();
    let group_bytes = nb * REPACK_ROWS * layout.ty().type_size();
    let groups = rows / REPACK_ROWS;
    let chunk = (CHUNK_BYTES / group_bytes.max(1)).max(1).next_multiple_of(groups_per_pass);
    for g_chunk in (0..groups).step_by(chunk) {
        let g_end = groups.min(g_chunk + chunk);
        for t0 in (0..n_tok).step_by(TOKENS) {
            let tn = (n_tok - t0).min(TOKENS);
            for g in (g_chunk..g_end).step_by(groups_per_pass) {
                pass(Pass {
                    nb,
                    w: w[g * group_bytes..].as_ptr(),
                    groups: (g_end - g).min(groups_per_pass),
                    group_bytes,
                    a: a[t0 * a_row_bytes..].as_ptr(),
                    a_stride: a_row_bytes,
                    t0,
                    tn,
                    grouped: grouped && tn == TOKENS,
                    out: out.at(t0, g * REPACK_ROWS),
                    out_stride,
                });
            }
        }
    }
}

/// Runs `body` with the product and `factor` times the sum of each block's
/// activation quants (the layout's activation type), per token and block
/// (`nb` per token): what an unsigned view of the weights adds to the exact
/// block sums, to be taken off again. With `factor` 0 (no offset to take
/// off) the slice is empty.
///
/// # Safety
/// AVX2 must be available (the drivers of both SIMD tiers call it).
pub(super) unsafe fn with_block_sums<'a, R>(
    p: Product<'a>,
    factor: i32,
    body: impl FnOnce(Product<'a>, &[i32]) -> R,
) -> R {
    if factor == 0 {
        return body(p, &[]);
    }
    let Product { layout, a, a_row_bytes, n_tok, .. } = p;
    let nb = p.n / QK;
    let (block, quants) = (layout.activation_type().type_size(), layout.act_quants());
    crate::scratch::with_i32(n_tok * nb, 0, |out| {
        for (t, sums) in out.chunks_exact_mut(nb).enumerate() {
            let row = &a[t * a_row_bytes..][..nb * block];
            // SAFETY: the caller's guarantee for AVX2.
            unsafe { row_block_sums(row, block, quants, factor, sums) };
        }
        body(p, out)
    })
}

/// `factor` times the sum of the 32 quants at `quants` in each block of
/// `block` bytes of `row`, one per block into `sums`.
///
/// # Safety
/// AVX2 must be available.
#[target_feature(enable = "avx2")]
unsafe fn row_block_sums(row: &[u8], block: usize, quants: usize, factor: i32, sums: &mut [i32]) {
    for (b, sum) in row.chunks_exact(block).zip(sums) {
        let quants: &[u8; QK] = b[quants..].try_into().expect("a block ends with QK quants");
        *sum = factor * sum_i8x32(quants);
    }
}

/// The sum of 32 signed bytes: offset to unsigned, one `vpsadbw` against
/// zero (four partial sums), the offset taken off again. A matmul task sums
/// every block of every token, so this runs once per block and task.
///
/// # Safety
/// AVX2 must be available.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn sum_i8x32(quants: &[u8; QK]) -> i32 {
    use std::arch::x86_64::*;
    let unsigned = _mm256_xor_si256(_mm256_loadu_si256(quants.as_ptr().cast()), _mm256_set1_epi8(i8::MIN));
    let partial = _mm256_sad_epu8(unsigned, _mm256_setzero_si256());
    let halves = _mm_add_epi64(_mm256_castsi256_si128(partial), _mm256_extracti128_si256::<1>(partial));
    let total = _mm_add_epi64(halves, _mm_unpackhi_epi64(halves, halves));
    _mm_cvtsi128_si32(total) - 128 * QK as i32
}
