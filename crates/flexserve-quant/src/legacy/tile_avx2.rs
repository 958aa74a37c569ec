//! AVX2 + FMA + F16C tile kernels for the 32-element block formats.
//!
//! A micro-tile of `R` weight rows by `T` tokens keeps `R * T` f32 vector
//! accumulators. Per block, the `T` activation quants are loaded once, and
//! each of the `R` weight blocks is decoded once and multiplied with all of
//! them. The per-pair work — integer lane sums, `d_w * d_a` scale, FMA into
//! the pair's accumulator, one reduction at the end, and for the formats
//! with a minimum the separate `m_w * s_a` FMA chain — is the same as in the
//! plain AVX2 dot, so every result is bit-identical to it. Q4_0 and Q8_0
//! have their own micro-tiles (`micro_q4_0`, `micro_q8_0`) that reach the
//! same integer sums and scale products with fewer instructions per pair.
//!
//! Up to `FEW_TOKENS_MAX` tokens (a batched decode step) go to the GEMV's
//! few-token form instead, which decodes each weight block once in
//! registers and needs no scale tables.
//!
//! Micro-tiles are visited in cache-sized chunks: a chunk of weight rows
//! (kept in L2) is swept by all token tiles of a chunk of tokens, whose
//! activations are reused by every row tile from L1.

use super::format::{
    act_block_bytes, act_quants_at, act_type, has_min, weight_block_bytes, weight_type, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
};
use super::gemv_avx2::{few_tokens, FEW_TOKENS_MAX};
use super::{Q4_0_BYTES, Q8_0_BYTES};
use crate::shape::{check_tile, Shape};
use crate::simd::avx2::{dot_u8_i8, hsum, load_bit_mask, load_f16, load_nibbles};
use crate::types::TileFn;
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Weight rows per micro-tile.
const ROWS: usize = 4;
/// Tokens per micro-tile. 4 x 4 accumulators exceed the 16 vector registers,
/// but measured faster on this project's Zen 3 host than 4 x 3, 3 x 3, 4 x 2
/// or 2 x 4: the extra reuse outweighs the accumulator spills.
const TOKS: usize = 4;
/// Weight rows and tokens per Q8_0 micro-tile. With its per-pair work cut
/// down (see `micro_q8_0`), the 16 accumulators of 4 x 4 spill and cost more
/// than the reuse gains: 2 x 4 measured fastest on the Zen 3 host, ahead of
/// 1 x 4, 3 x 4 and 4 x 4. The token count is fixed at 4 (one `__m128` of
/// scale products per row).
const Q8_ROWS: usize = 2;
const Q8_TOKS: usize = 4;

/// The micro-tile of format `f`: weight rows by tokens, at most `ROWS x TOKS`.
const fn micro_tile(f: u8) -> (usize, usize) {
    match f {
        Q8_0 => (Q8_ROWS, Q8_TOKS),
        _ => (ROWS, TOKS),
    }
}

/// Bytes of weight rows swept by one chunk of tokens (fits in L2).
const ROW_CHUNK_BYTES: usize = 64 * 1024;
/// Bytes of activation rows in one chunk of tokens (fits in L2 beside the weights).
const TOK_CHUNK_BYTES: usize = 128 * 1024;

/// The AVX2 tile kernel of `ty`, if there is one.
pub(crate) fn tile(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::Q4_0 => Some(tile_wrapper::<Q4_0>),
        GgmlType::Q4_1 => Some(tile_wrapper::<Q4_1>),
        GgmlType::Q5_0 => Some(tile_wrapper::<Q5_0>),
        GgmlType::Q5_1 => Some(tile_wrapper::<Q5_1>),
        GgmlType::Q8_0 => Some(tile_wrapper::<Q8_0>),
        _ => None,
    }
}

/// Formats whose weight levels are signed (and so multiply via `sign`).
const fn signed_weights(f: u8) -> bool {
    matches!(f, Q4_0 | Q5_0 | Q8_0)
}

#[allow(clippy::too_many_arguments)]
fn tile_wrapper<const F: u8>(
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    toks: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    let (ty, act_ty) = (weight_type(F), act_type(F));
    check_tile(ty, act_ty, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    if rows == 0 || toks == 0 {
        return;
    }
    let shape = Shape::of(ty, n, w_row_bytes, a_row_bytes, out_stride);
    if toks <= FEW_TOKENS_MAX {
        // SAFETY: as below; `few_tokens` reads and writes the same tile.
        return unsafe { few_tokens::<F>(shape, w.as_ptr(), rows, a.as_ptr(), toks, out.as_mut_ptr()) };
    }
    // SAFETY: the wrapper is only handed out after the CPU was found to
    // support AVX2, FMA and F16C; `check_tile` verified that `rows` weight rows
    // and `toks` activation rows of `nb` blocks each, and `toks` output rows of
    // `rows` floats, lie within the slices at the given strides, which is
    // exactly what the kernel reads and writes.
    unsafe { tile_avx2::<F>(shape, w.as_ptr(), rows, a.as_ptr(), toks, out.as_mut_ptr()) }
}

/// The f32 block scales of a chunk of rows or tokens, converted from f16 once
/// and reused by every micro-tile of the chunk.
struct ChunkScales<'a> {
    /// `d` of each block (weights: row-major `[row][block]`; activations:
    /// block-major `[block][token]`, so that a token tile's values are adjacent).
    d: &'a mut [f32],
    /// The second f16 field: `m` of weights / `s` of activations (formats with a minimum only).
    second: &'a mut [f32],
}

impl<'a> ChunkScales<'a> {
    /// Floats for `count` rows of `nb` blocks in groups of `group`, plus one
    /// vector of slack so that four-lane loads at the end stay in bounds.
    fn len<const F: u8>(count: usize, nb: usize, group: usize) -> usize {
        let one = count.div_ceil(group) * group * nb + 4;
        if has_min(F) {
            2 * one
        } else {
            one
        }
    }

    /// Takes the room `len` asks for from the front of `buf`; returns the rest.
    fn carve<const F: u8>(
        buf: &'a mut [f32],
        count: usize,
        nb: usize,
        group: usize,
    ) -> (ChunkScales<'a>, &'a mut [f32]) {
        let (mine, rest) = buf.split_at_mut(Self::len::<F>(count, nb, group));
        let (d, second) = if has_min(F) { mine.split_at_mut(mine.len() / 2) } else { (mine, &mut [][..]) };
        (ChunkScales { d, second }, rest)
    }

    /// Converts the scales of `count` rows at `p` (`stride` apart, blocks of
    /// `block_bytes`) into `[i / group][b][i % group]`: the scales one
    /// micro-tile reads lie together, in the order it reads them.
    ///
    /// # Safety
    /// F16C must be available; the rows must be readable.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fill<const F: u8>(
        &mut self,
        p: *const u8,
        stride: usize,
        count: usize,
        nb: usize,
        block_bytes: usize,
        group: usize,
    ) {
        for i in 0..count {
            for b in 0..nb {
                let block = p.add(i * stride + b * block_bytes);
                let at = (i / group * nb + b) * group + i % group;
                self.d[at] = load_f16(block);
                if has_min(F) {
                    self.second[at] = load_f16(block.add(2));
                }
            }
        }
    }
}

/// Pointers to the scales of one micro-tile.
#[derive(Clone, Copy)]
struct TileScales {
    /// Weight `d` and `m` of the first row, `[block * w_step + row]`.
    w_d: *const f32,
    w_m: *const f32,
    w_step: usize,
    /// Activation `d` and `s` of the first token, `[block * a_step + token]`.
    a_d: *const f32,
    a_s: *const f32,
    a_step: usize,
    /// Room for the `d_w * d_a` products of one micro-tile, rows times
    /// tokens per block (see `fill_products`).
    products: *mut f32,
}

/// Visits the whole `rows x toks` tile in cache-sized chunks of micro-tiles.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` weight rows and `toks`
/// activation rows of `shape.nb` blocks must be readable at the strides, and
/// `toks` output rows of `rows` floats writable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_avx2<const F: u8>(shape: Shape, w: *const u8, rows: usize, a: *const u8, toks: usize, out: *mut f32) {
    let nb = shape.nb;
    let (tile_rows, tile_toks) = micro_tile(F);
    let row_chunk = (ROW_CHUNK_BYTES / shape.w_stride.max(1)).max(1).div_ceil(tile_rows) * tile_rows;
    let tok_chunk = (TOK_CHUNK_BYTES / shape.a_stride.max(1)).max(1).div_ceil(tile_toks) * tile_toks;
    let (w_count, a_count) = (row_chunk.min(rows), tok_chunk.min(toks));
    let products_per_block = if F == Q8_0 { Q8_ROWS * Q8_TOKS } else { ROWS * TOKS };
    let scratch = ChunkScales::len::<F>(w_count, nb, tile_rows)
        + ChunkScales::len::<F>(a_count, nb, tile_toks)
        + nb * products_per_block;
    let (w_bytes, a_bytes) = (weight_block_bytes(F), act_block_bytes(F));
    crate::scratch::with_f32(scratch, 0.0, |buf| {
        let (mut w_scales, rest) = ChunkScales::carve::<F>(buf, w_count, nb, tile_rows);
        let (mut a_scales, products) = ChunkScales::carve::<F>(rest, a_count, nb, tile_toks);
        for t_chunk in (0..toks).step_by(tok_chunk) {
            let t_chunk_end = toks.min(t_chunk + tok_chunk);
            let tc = t_chunk_end - t_chunk;
            a_scales.fill::<F>(a.add(t_chunk * shape.a_stride), shape.a_stride, tc, nb, a_bytes, tile_toks);
            for r_chunk in (0..rows).step_by(row_chunk) {
                let r_chunk_end = rows.min(r_chunk + row_chunk);
                let w_chunk = w.add(r_chunk * shape.w_stride);
                let rc = r_chunk_end - r_chunk;
                w_scales.fill::<F>(w_chunk, shape.w_stride, rc, nb, w_bytes, tile_rows);
                for t in (t_chunk..t_chunk_end).step_by(tile_toks) {
                    let tt = tile_toks.min(t_chunk_end - t);
                    for r in (r_chunk..r_chunk_end).step_by(tile_rows) {
                        let rr = tile_rows.min(r_chunk_end - r);
                        let (w, a) = (w.add(r * shape.w_stride), a.add(t * shape.a_stride));
                        let out = out.add(t * shape.out_stride + r);
                        // Each tile's scales are a group of its own (see `ChunkScales::fill`).
                        let (w_at, a_at) = ((r - r_chunk) * nb, (t - t_chunk) * nb);
                        let scales = TileScales {
                            w_d: w_scales.d.as_ptr().add(w_at),
                            w_m: w_scales.second.as_ptr().wrapping_add(w_at),
                            w_step: tile_rows,
                            a_d: a_scales.d.as_ptr().add(a_at),
                            a_s: a_scales.second.as_ptr().wrapping_add(a_at),
                            a_step: tile_toks,
                            products: products.as_mut_ptr(),
                        };
                        micro_any::<F>(rr, tt, shape, w, a, out, scales);
                    }
                }
            }
        }
    })
}

/// Runs the micro-tile kernel of the exact size `rr x tt` (each at most the full size).
///
/// # Safety
/// As for `micro`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_any<const F: u8>(
    rr: usize,
    tt: usize,
    s: Shape,
    w: *const u8,
    a: *const u8,
    out: *mut f32,
    scales: TileScales,
) {
    if F == Q8_0 {
        const { assert!(Q8_ROWS == 2 && Q8_TOKS == 4, "the Q8_0 dispatch below lists the 2 x 4 sizes") };
        macro_rules! dispatch_q8_0 {
            ($(($r:literal, $t:literal)),*) => {
                match (rr, tt) {
                    $(($r, $t) => micro_q8_0::<$r, $t>(s, w, a, out, scales),)*
                    _ => unreachable!("micro-tile of {rr} x {tt} is larger than {Q8_ROWS} x {Q8_TOKS}"),
                }
            };
        }
        return dispatch_q8_0!((2, 4), (2, 3), (2, 2), (2, 1), (1, 4), (1, 3), (1, 2), (1, 1));
    }
    const { assert!(ROWS == 4 && TOKS == 4, "by_size_4x4 lists the 4 x 4 sizes") };
    by_size_4x4!(rr, tt, micro::<F>(s, w, a, out, scales))
}

/// The weight levels of one block as 32 bytes: signed for the formats with
/// `signed_weights`, unsigned otherwise.
///
/// # Safety
/// AVX2 must be available and the block at `wb` readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn weight_levels<const F: u8>(wb: *const u8) -> __m256i {
    match F {
        Q4_0 => _mm256_sub_epi8(load_nibbles(wb.add(2)), _mm256_set1_epi8(8)),
        Q4_1 => load_nibbles(wb.add(4)),
        // q - 16 as a signed byte: the nibble where the fifth bit is set, the
        // nibble with 0xF0 on top (nibble - 16) where it is not.
        Q5_0 => {
            let high = _mm256_andnot_si256(load_bit_mask(wb.add(2)), _mm256_set1_epi8(0xF0u8 as i8));
            _mm256_or_si256(load_nibbles(wb.add(6)), high)
        }
        Q5_1 => {
            let high = _mm256_and_si256(load_bit_mask(wb.add(4)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(load_nibbles(wb.add(8)), high)
        }
        _ => _mm256_loadu_si256(wb.add(2).cast()),
    }
}

/// One micro-tile of `R` weight rows (at `w`, `s.w_stride` apart) by `T`
/// tokens (at `a`, `s.a_stride` apart), written token-major to `out` (tokens
/// `s.out_stride` apart).
///
/// # Safety
/// AVX2, FMA and F16C must be available; the `R` weight rows and `T`
/// activation rows of `s.nb` blocks must be readable, the `R x T` outputs
/// writable, and `scales` must point at the converted scales of these rows
/// and tokens (with four readable lanes from each token-tile start).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro<const F: u8, const R: usize, const T: usize>(
    s: Shape,
    w: *const u8,
    a: *const u8,
    out: *mut f32,
    scales: TileScales,
) {
    if F == Q4_0 {
        return micro_q4_0::<R, T>(s, w, a, out, scales);
    }
    if F == Q8_0 {
        unreachable!("Q8_0 micro-tiles run in micro_q8_0");
    }
    const { assert!(TOKS == 4 && R <= ROWS && T <= TOKS) };
    fill_products::<R>(s.nb, scales, ROWS);
    let (w_bytes, a_bytes) = (weight_block_bytes(F), act_block_bytes(F));
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..s.nb {
        let ab = a.add(b * a_bytes);
        let products = scales.products.add(b * ROWS * TOKS);
        for (r, acc_r) in acc.iter_mut().enumerate() {
            let wb = w.add(r * s.w_stride + b * w_bytes);
            let qw = weight_levels::<F>(wb);
            // Signed levels multiply as |qw| (unsigned) times qa with qw's sign.
            let unsigned = if signed_weights(F) { _mm256_sign_epi8(qw, qw) } else { qw };
            for (t, acc_rt) in acc_r.iter_mut().enumerate() {
                let qa = _mm256_loadu_si256(ab.add(t * s.a_stride + act_quants_at(F)).cast());
                let qa = if signed_weights(F) { _mm256_sign_epi8(qa, qw) } else { qa };
                let scale = _mm256_broadcast_ss(&*products.add(r * TOKS + t));
                *acc_rt = _mm256_fmadd_ps(scale, dot_u8_i8(unsigned, qa), *acc_rt);
            }
        }
    }

    // The minimum terms m_w * s_a, one FMA chain per pair as in the plain
    // dot; lane t of `mins[r]` holds pair (r, t).
    let mut mins = [[0.0f32; 4]; R];
    if has_min(F) {
        let mut chains = [_mm_setzero_ps(); R];
        for b in 0..s.nb {
            let sa = _mm_loadu_ps(scales.a_s.add(b * scales.a_step));
            for (r, chain) in chains.iter_mut().enumerate() {
                let mw = _mm_broadcast_ss(&*scales.w_m.add(b * scales.w_step + r));
                *chain = _mm_fmadd_ps(mw, sa, *chain);
            }
        }
        for (m, chain) in mins.iter_mut().zip(chains) {
            _mm_storeu_ps(m.as_mut_ptr(), chain);
        }
    }

    for r in 0..R {
        for t in 0..T {
            let mut v = hsum(acc[r][t]);
            if has_min(F) {
                v += mins[r][t];
            }
            *out.add(t * s.out_stride + r) = v;
        }
    }
}

/// Stores the `d_w * d_a` products of the first `R` rows and four tokens of
/// a micro-tile (the same f32 products as the plain dot's scales) at
/// `scales.products`: `rows_per_block * 4` floats per block, row `r`'s four
/// tokens at `r * 4`. Four tokens take one multiply; the kernels then
/// broadcast each product with a plain load, where a product of two
/// broadcasts would cost a multiply and a shuffle per pair.
///
/// # Safety
/// AVX and FMA must be available; `scales` must point at the converted
/// scales of `R` rows and four tokens (the chunk scales have slack for the
/// last token tile) and `scales.products` have room for `nb * rows_per_block * 4` floats.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fill_products<const R: usize>(nb: usize, scales: TileScales, rows_per_block: usize) {
    for b in 0..nb {
        let a_d = _mm_loadu_ps(scales.a_d.add(b * scales.a_step));
        for r in 0..R {
            let d_w = _mm_broadcast_ss(&*scales.w_d.add(b * scales.w_step + r));
            _mm_storeu_ps(scales.products.add((b * rows_per_block + r) * 4), _mm_mul_ps(d_w, a_d));
        }
    }
}

/// The Q4_0 micro-tile: as `micro`, but per block the `R` weight blocks are
/// decoded into registers first and each token's quants are then loaded once
/// for all of them. The levels `q - 8` are not formed: the unsigned nibbles
/// `q` are multiplied and `8 * sum(a)` subtracted per lane (computed once per
/// token and block), the same integer lane sums as the plain dot's with fewer
/// instructions per pair than moving signs.
///
/// # Safety
/// As for `micro`.
#[inline]
#[allow(clippy::needless_range_loop)] // (row, token) indices read clearest here
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_q4_0<const R: usize, const T: usize>(
    s: Shape,
    w: *const u8,
    a: *const u8,
    out: *mut f32,
    scales: TileScales,
) {
    const { assert!(TOKS == 4 && R <= ROWS && T <= TOKS) };
    fill_products::<R>(s.nb, scales, ROWS);
    let ones = _mm256_set1_epi16(1);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..s.nb {
        let ab = a.add(b * Q8_0_BYTES);
        let products = scales.products.add(b * ROWS * TOKS);
        let mut q = [_mm256_setzero_si256(); R];
        for (r, q_r) in q.iter_mut().enumerate() {
            *q_r = load_nibbles(w.add(r * s.w_stride + b * Q4_0_BYTES + 2));
        }
        for t in 0..T {
            let qa = _mm256_loadu_si256(ab.add(t * s.a_stride + 2).cast());
            let correction = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), qa), ones);
            for r in 0..R {
                let sums = _mm256_sub_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(q[r], qa), ones), correction);
                let scale = _mm256_broadcast_ss(&*products.add(r * TOKS + t));
                acc[r][t] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(sums), acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            *out.add(t * s.out_stride + r) = hsum(acc[r][t]);
        }
    }
}

/// The Q8_0 micro-tile: as `micro`, with two changes in how the work is
/// arranged, not in what is computed. The `d_w * d_a` products of all pairs
/// and blocks are computed first, four tokens per multiply, into
/// `scales.products`, from where each is broadcast by a plain load (a
/// product of two broadcasts would cost a multiply and a shuffle per pair).
/// And each row's weight quants and their magnitudes are kept in registers
/// while the tokens' quants are loaded per pair, so that the per-pair work is
/// the sign move, `maddubs`, `madd`, conversion and FMA alone.
///
/// # Safety
/// As for `micro`, with `R <= Q8_ROWS` and `T <= Q8_TOKS`; `scales.products`
/// must have room for `s.nb * Q8_ROWS * Q8_TOKS` floats.
#[inline]
#[allow(clippy::needless_range_loop)] // (row, token) indices read clearest here
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro_q8_0<const R: usize, const T: usize>(
    s: Shape,
    w: *const u8,
    a: *const u8,
    out: *mut f32,
    scales: TileScales,
) {
    const PER_BLOCK: usize = Q8_ROWS * Q8_TOKS;
    const { assert!(Q8_TOKS == 4 && R <= Q8_ROWS && T <= Q8_TOKS) };
    fill_products::<R>(s.nb, scales, Q8_ROWS);
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for b in 0..s.nb {
        let ab = a.add(b * Q8_0_BYTES);
        let products = scales.products.add(b * PER_BLOCK);
        for r in 0..R {
            let qw = _mm256_loadu_si256(w.add(r * s.w_stride + b * Q8_0_BYTES + 2).cast());
            // Signed levels multiply as |qw| (unsigned) times qa with qw's sign.
            let unsigned = _mm256_sign_epi8(qw, qw);
            for t in 0..T {
                let qa = _mm256_loadu_si256(ab.add(t * s.a_stride + 2).cast());
                let scale = _mm256_broadcast_ss(&*products.add(r * Q8_TOKS + t));
                acc[r][t] = _mm256_fmadd_ps(scale, dot_u8_i8(unsigned, _mm256_sign_epi8(qa, qw)), acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            *out.add(t * s.out_stride + r) = hsum(acc[r][t]);
        }
    }
}
