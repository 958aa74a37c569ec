//! AVX2 + FMA + F16C tile and GEMV kernels for F32, F16 and BF16 weights.
//!
//! A micro-tile of 4 weight rows by 3 tokens keeps one 8-lane accumulator per
//! (row, token) pair, 12 in all, beside the three tokens' activation vectors
//! and one weight vector: the 16 registers of AVX2. Per eight elements it
//! converts three activation and four weight vectors and runs twelve FMAs;
//! each pair's FMAs form the plain dot's single chain in the dot's order, and
//! each pair ends as the dot does, so results are bit-identical to it. The
//! twelve chains overlap, which hides the FMA latency that bounds the dot.
//!
//! Tokens are taken a chunk of about `TOK_CHUNK_BYTES` of activations at a
//! time, which stays in L2 while every block of `ROW_BLOCK` rows passes it;
//! within a block, every token triple of the chunk passes the block while its
//! weights stay in L1/L2, and a micro-tile's three activation rows stay in L1
//! for the block's four micro-tiles. (Without the chunks, a long prompt's
//! activations came from L3 again for every block of rows, and two threads
//! shared that traffic: 3% of a 512-token prefill.)
//!
//! The GEMV kernel is the same sweep over one token (micro-tiles of 4 x 1).

use super::{check_tile, TileFn};
use crate::float::avx2::{eight, finish, format_type, BF16, F16, F32};
use crate::gemv::{check_gemv, GemvFn};
use crate::legacy::avx2::pin_ps;
use crate::GgmlType;
use std::arch::x86_64::*;

/// Weight rows and tokens per micro-tile.
const ROWS: usize = 4;
const TOKS: usize = 3;
/// Weight rows that every token passes while they stay in cache (for rows
/// of 4096 f16 elements, 128 KiB).
const ROW_BLOCK: usize = 16;
/// Activation bytes per chunk of tokens: a chunk stays in L2 while every
/// block of rows passes it.
const TOK_CHUNK_BYTES: usize = 128 * 1024;

/// The AVX2 tile kernel of `ty`, if there is one.
pub(super) fn tile(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::F32 => Some(tile_wrapper::<F32>),
        GgmlType::F16 => Some(tile_wrapper::<F16>),
        GgmlType::BF16 => Some(tile_wrapper::<BF16>),
        _ => None,
    }
}

/// The AVX2 GEMV kernel of `ty`, if there is one.
pub(crate) fn gemv(ty: GgmlType) -> Option<GemvFn> {
    match ty {
        GgmlType::F32 => Some(gemv_wrapper::<F32>),
        GgmlType::F16 => Some(gemv_wrapper::<F16>),
        GgmlType::BF16 => Some(gemv_wrapper::<BF16>),
        _ => None,
    }
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
    let ty = format_type(F);
    // Float weights take activations of their own type.
    check_tile(ty, ty, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    if rows == 0 || toks == 0 {
        return;
    }
    // SAFETY: the kernel is only handed out after the CPU was found to
    // support AVX2, FMA and F16C; `check_tile` verified that `rows` weight
    // rows and `toks` activation rows of `n` elements lie within `w` and `a`
    // at their strides, and that `toks` output rows of `rows` floats lie
    // within `out`.
    unsafe { sweep::<F>(n, w.as_ptr(), w_row_bytes, rows, a.as_ptr(), a_row_bytes, toks, out.as_mut_ptr(), out_stride) }
}

fn gemv_wrapper<const F: u8>(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
    let ty = format_type(F);
    check_gemv(ty, ty, n, w, w_row_bytes, rows, a, out);
    if rows == 0 {
        return;
    }
    // SAFETY: as in `tile_wrapper`; `check_gemv` verified `rows` weight rows
    // and one activation row of `n` elements, and `rows` output floats.
    unsafe { gemv_sweep::<F>(n, w.as_ptr(), w_row_bytes, rows, a.as_ptr(), out.as_mut_ptr()) }
}

/// The GEMV: four chains at once, each walking its own quarter of the rows
/// in order, so that the weights are read as four long sequential streams
/// (rows lie back to back) rather than four short ones per group of rows.
/// The `rows % 4` rows left over follow one micro-tile.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` weight rows and one
/// activation row of `n` elements must be readable, `rows` floats at `out`
/// writable.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn gemv_sweep<const F: u8>(n: usize, w: *const u8, w_stride: usize, rows: usize, a: *const u8, out: *mut f32) {
    let quarter = rows / ROWS;
    for r in 0..quarter {
        micro::<F, ROWS, 1>(n, w.add(r * w_stride), quarter * w_stride, a, 0, out.add(r), quarter, 0);
    }
    let done = quarter * ROWS;
    let (w, out) = (w.add(done * w_stride), out.add(done));
    match rows - done {
        1 => micro::<F, 1, 1>(n, w, w_stride, a, 0, out, 1, 0),
        2 => micro::<F, 2, 1>(n, w, w_stride, a, 0, out, 1, 0),
        3 => micro::<F, 3, 1>(n, w, w_stride, a, 0, out, 1, 0),
        _ => {}
    }
}

/// Visits the whole `rows x toks` tile: per chunk of tokens and block of
/// rows, every token triple of the chunk, then the block's micro-tiles.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` weight rows and `toks`
/// activation rows of `n` elements must be readable at their strides, and
/// `toks` output rows of `rows` floats writable.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn sweep<const F: u8>(
    n: usize,
    w: *const u8,
    w_stride: usize,
    rows: usize,
    a: *const u8,
    a_stride: usize,
    toks: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let row_bytes = n * format_type(F).type_size();
    let chunk = (TOK_CHUNK_BYTES / row_bytes.max(1) / TOKS).max(1) * TOKS;
    for t_chunk in (0..toks).step_by(chunk) {
        let t_end = toks.min(t_chunk + chunk);
        for block in (0..rows).step_by(ROW_BLOCK) {
            let block_end = rows.min(block + ROW_BLOCK);
            for t in (t_chunk..t_end).step_by(TOKS) {
                let tt = TOKS.min(t_end - t);
                for r in (block..block_end).step_by(ROWS) {
                    let rr = ROWS.min(block_end - r);
                    let w = w.add(r * w_stride);
                    let a = a.add(t * a_stride);
                    let out = out.add(t * out_stride + r);
                    macro_rules! dispatch {
                    ($(($r:literal, $t:literal)),*) => {
                        match (rr, tt) {
                            $(($r, $t) => micro::<F, $r, $t>(n, w, w_stride, a, a_stride, out, 1, out_stride),)*
                            _ => unreachable!("micro-tile of {rr} x {tt} is larger than {ROWS} x {TOKS}"),
                        }
                    };
                }
                    dispatch!(
                        (4, 3),
                        (4, 2),
                        (4, 1),
                        (3, 3),
                        (3, 2),
                        (3, 1),
                        (2, 3),
                        (2, 2),
                        (2, 1),
                        (1, 3),
                        (1, 2),
                        (1, 1)
                    );
                }
            }
        }
    }
}

/// One micro-tile: `R` weight rows (at `w`, `w_stride` bytes apart) by `T`
/// activation rows (at `a`, `a_stride` bytes apart) of `n` elements, each
/// pair's dot written at `out[r * row_step + t * tok_step]`.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the rows must hold `n` elements and
/// the outputs be writable.
#[inline]
#[allow(clippy::needless_range_loop)] // (row, token) indices read clearest here
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro<const F: u8, const R: usize, const T: usize>(
    n: usize,
    w: *const u8,
    w_stride: usize,
    a: *const u8,
    a_stride: usize,
    out: *mut f32,
    row_step: usize,
    tok_step: usize,
) {
    let main = n - n % 8;
    let mut acc = [[_mm256_setzero_ps(); T]; R];
    for i in (0..main).step_by(8) {
        let mut av = [_mm256_setzero_ps(); T];
        for (t, v) in av.iter_mut().enumerate() {
            *v = eight::<F>(a.add(t * a_stride), i);
        }
        for r in 0..R {
            let wv = eight::<F>(w.add(r * w_stride), i);
            for t in 0..T {
                acc[r][t] = _mm256_fmadd_ps(wv, av[t], acc[r][t]);
            }
            // Keeps the accumulators in registers and the loads in order
            // (see `pin`); left free, the compiler spills one of them and
            // every step then waits on a store and a reload.
            pin_ps(&mut acc[r]);
        }
    }
    for r in 0..R {
        for t in 0..T {
            *out.add(r * row_step + t * tok_step) =
                finish::<F>(acc[r][t], n, main, w.add(r * w_stride), a.add(t * a_stride));
        }
    }
}
