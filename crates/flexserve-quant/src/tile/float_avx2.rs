//! AVX2 + FMA + F16C tile kernels for F32, F16 and BF16 weights.
//!
//! The plain AVX2 dot of these types keeps four 8-lane accumulators (the
//! `j`-th takes elements `32 i + 8 j ..= 32 i + 8 j + 7`), folds them, and
//! adds the last `n % 32` products one by one. Four accumulators per
//! (row, token) pair do not fit in registers for a micro-tile of several
//! pairs, so the micro-tile makes four passes over its rows: pass `j` takes
//! exactly the elements of accumulator `j`, with one accumulator per pair, and
//! parks the result. The fold, the reduction and the tail then follow as in
//! the dot. Every pair sees the same FMAs in the same order as the dot, so
//! results are bit-identical to it.
//!
//! Activations are widened to f32 once per chunk of tokens (exactly: every
//! f16 and bf16 value is an f32), so that per eight elements a micro-tile
//! widens only its weight vectors and reads the activations as they are.

use super::{check_tile, TileFn};
use crate::float::avx2::{add_tail, load_bf16x8, load_f16x8, read_bf16, read_f16, reduce4};
use crate::legacy::avx2::pin_ps;
use crate::GgmlType;
use std::arch::x86_64::*;

/// Weight rows and tokens per micro-tile: 12 accumulators beside the three
/// tokens' activation vectors and one weight vector.
const ROWS: usize = 4;
const TOKS: usize = 3;
/// Elements of a row taken in one go by a micro-tile's four passes (a
/// multiple of 32): a token tile's activations over a span stay in L1.
const SPAN: usize = 1024;
/// Weight rows and tokens per chunk: a span of the chunk's rows and tokens
/// and the pairs' parked accumulators (128 bytes each) stay in L2.
const ROW_CHUNK: usize = 64;
const TOK_CHUNK: usize = 48;
/// Floats parked per pair of a chunk (row-major): its four accumulators of
/// eight lanes.
const PAIR_FLOATS: usize = 4 * 8;

// Format ids, used as a const generic so that each kernel is compiled per format.
const F32: u8 = 0;
const F16: u8 = 1;
const BF16: u8 = 2;

/// The AVX2 tile kernel of `ty`, if there is one.
pub(super) fn tile(ty: GgmlType) -> Option<TileFn> {
    match ty {
        GgmlType::F32 => Some(tile_wrapper::<F32>),
        GgmlType::F16 => Some(tile_wrapper::<F16>),
        GgmlType::BF16 => Some(tile_wrapper::<BF16>),
        _ => None,
    }
}

const fn weight_type(f: u8) -> GgmlType {
    match f {
        F32 => GgmlType::F32,
        F16 => GgmlType::F16,
        _ => GgmlType::BF16,
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
    let ty = weight_type(F);
    // Float weights take activations of their own type.
    check_tile(ty, ty, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    if rows == 0 || toks == 0 {
        return;
    }
    // Widened rows one cache line longer than they need be: rows a power of
    // two apart would map the tokens' loads of a step to the same L1 banks.
    let wide_stride = n.next_multiple_of(16) + 16;
    let (row_chunk, tok_chunk) = (ROW_CHUNK.min(rows), TOK_CHUNK.min(toks));
    // Per-thread buffers, kept between calls: a matmul calls the kernel once
    // per task, and fresh buffers of this size would be mapped and faulted
    // in every time.
    SCRATCH.with_borrow_mut(|scratch| {
        let (wide, parts) = scratch.take(tok_chunk * wide_stride, row_chunk * tok_chunk * PAIR_FLOATS);
        // SAFETY: the kernel is only handed out after the CPU was found to
        // support AVX2, FMA and F16C; `check_tile` verified that `rows`
        // weight rows and `toks` activation rows of `n` elements lie within
        // `w` and `a` at their strides, and that `rows` output rows of `toks`
        // floats lie within `out`; the buffers have the sizes `sweep` derives
        // from the same chunk constants.
        unsafe {
            let (w, a, out) = (w.as_ptr(), a.as_ptr(), out.as_mut_ptr());
            sweep::<F>(n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride, wide, wide_stride, parts)
        }
    })
}

/// The float tiles' per-thread buffers: widened activations and parked accumulators.
#[derive(Default)]
struct Scratch {
    wide: Vec<f32>,
    parts: Vec<f32>,
}

impl Scratch {
    /// The two buffers with at least the lengths given (contents unspecified).
    fn take(&mut self, wide: usize, parts: usize) -> (&mut [f32], &mut [f32]) {
        for (buf, len) in [(&mut self.wide, wide), (&mut self.parts, parts)] {
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
        }
        (&mut self.wide[..wide], &mut self.parts[..parts])
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// Visits the whole `rows x toks` tile in chunks of rows and tokens. Within
/// a chunk, rows are taken a span of `SPAN` elements at a time for every
/// micro-tile (tokens outer, so that a token tile's span stays in L1 while
/// the rows pass), the pairs' four accumulators parked in `parts` between
/// spans; each pair's sum is finished once its last span is done.
///
/// # Safety
/// AVX2, FMA and F16C must be available; `rows` weight rows and `toks`
/// activation rows of `n` elements must be readable at their strides, and
/// `rows` output rows of `toks` floats writable; `wide` must hold a chunk of
/// widened activation rows `wide_stride` apart, `parts` a chunk's parked
/// accumulators (`PAIR_FLOATS` per pair).
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
    wide: &mut [f32],
    wide_stride: usize,
    parts: &mut [f32],
) {
    let main = n - n % 32;
    let (row_chunk, tok_chunk) = (ROW_CHUNK.min(rows), TOK_CHUNK.min(toks));
    for t_chunk in (0..toks).step_by(tok_chunk) {
        let tc = tok_chunk.min(toks - t_chunk);
        for t in 0..tc {
            widen::<F>(n, a.add((t_chunk + t) * a_stride), wide.as_mut_ptr().add(t * wide_stride));
        }
        let parts_row = tc * PAIR_FLOATS;
        for r_chunk in (0..rows).step_by(row_chunk) {
            let rc = row_chunk.min(rows - r_chunk);
            for k0 in (0..main).step_by(SPAN) {
                let span = k0..main.min(k0 + SPAN);
                for t in (0..tc).step_by(TOKS) {
                    let tt = TOKS.min(tc - t);
                    for r in (0..rc).step_by(ROWS) {
                        let rr = ROWS.min(rc - r);
                        let w = w.add((r_chunk + r) * w_stride);
                        let a = wide.as_ptr().add(t * wide_stride);
                        let p = parts.as_mut_ptr().add(r * parts_row + t * PAIR_FLOATS);
                        macro_rules! dispatch {
                            ($(($r:literal, $t:literal)),*) => {
                                match (rr, tt) {
                                    $(($r, $t) => micro::<F, $r, $t>(span.clone(), w, w_stride, a, wide_stride, p, parts_row),)*
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
            for r in 0..rc {
                let w_row = w.add((r_chunk + r) * w_stride);
                for t in 0..tc {
                    let p = parts.as_ptr().add(r * parts_row + t * PAIR_FLOATS);
                    // Rows shorter than one step of 32 ran no span: their sum is all tail.
                    let acc = if main == 0 {
                        [_mm256_setzero_ps(); 4]
                    } else {
                        [0, 1, 2, 3].map(|j| _mm256_loadu_ps(p.add(8 * j)))
                    };
                    let a_row = wide.as_ptr().add(t * wide_stride);
                    let tail = (main..n).map(|i| element::<F>(w_row, i) * *a_row.add(i));
                    *out.add((r_chunk + r) * out_stride + t_chunk + t) = add_tail(reduce4(acc), F != F32, tail);
                }
            }
        }
    }
}

/// Widens one activation row of `n` elements at `src` to f32 at `dst`.
///
/// # Safety
/// AVX2 and F16C must be available; `n` elements at `src` readable, `n`
/// floats at `dst` writable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen<const F: u8>(n: usize, src: *const u8, dst: *mut f32) {
    let main = n - n % 8;
    for i in (0..main).step_by(8) {
        _mm256_storeu_ps(dst.add(i), eight::<F>(src, i));
    }
    for i in main..n {
        *dst.add(i) = element::<F>(src, i);
    }
}

/// Element `i` of a row of format `F` at `p`, as f32.
///
/// # Safety
/// F16C must be available; element `i` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn element<const F: u8>(p: *const u8, i: usize) -> f32 {
    match F {
        F32 => p.add(4 * i).cast::<f32>().read_unaligned(),
        F16 => read_f16(p.add(2 * i)),
        _ => read_bf16(p.add(2 * i)),
    }
}

/// Eight elements from element `i` of a row of format `F` at `p`, as f32.
///
/// # Safety
/// AVX2 and F16C must be available; eight elements from `i` must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn eight<const F: u8>(p: *const u8, i: usize) -> __m256 {
    match F {
        F32 => _mm256_loadu_ps(p.add(4 * i).cast()),
        F16 => load_f16x8(p.add(2 * i)),
        _ => load_bf16x8(p.add(2 * i)),
    }
}

/// One span of a micro-tile: `R` weight rows (at `w`, `w_stride` bytes
/// apart) by `T` widened activation rows (at `a`, `a_stride` floats apart),
/// over the elements of `span` (whole steps of 32), adding into the pairs'
/// parked accumulators at `parts` (pair `(r, t)` at `r * parts_row + PAIR_FLOATS * t`),
/// or starting them when the span is a row's first.
///
/// # Safety
/// AVX2, FMA and F16C must be available; the rows must hold the span's
/// elements and the pairs' accumulators be readable and writable.
#[inline]
#[allow(clippy::needless_range_loop)] // (row, token) indices read clearest here
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn micro<const F: u8, const R: usize, const T: usize>(
    span: std::ops::Range<usize>,
    w: *const u8,
    w_stride: usize,
    a: *const f32,
    a_stride: usize,
    parts: *mut f32,
    parts_row: usize,
) {
    let part = |r: usize, t: usize, j: usize| parts.add(r * parts_row + PAIR_FLOATS * t + 8 * j);
    // One pass per accumulator of the dot, taking exactly its elements.
    for j in 0..4 {
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        if span.start > 0 {
            for r in 0..R {
                for t in 0..T {
                    acc[r][t] = _mm256_loadu_ps(part(r, t, j));
                }
            }
        }
        for i in (span.start + 8 * j..span.end).step_by(32) {
            let mut av = [_mm256_setzero_ps(); T];
            for (t, v) in av.iter_mut().enumerate() {
                *v = _mm256_loadu_ps(a.add(t * a_stride + i));
            }
            for r in 0..R {
                let wv = eight::<F>(w.add(r * w_stride), i);
                for t in 0..T {
                    acc[r][t] = _mm256_fmadd_ps(wv, av[t], acc[r][t]);
                }
                // Keeps the accumulators in registers and the loads in
                // order (see `pin`); left free, the compiler spills them.
                pin_ps(&mut acc[r]);
            }
        }
        for r in 0..R {
            for t in 0..T {
                _mm256_storeu_ps(part(r, t, j), acc[r][t]);
            }
        }
    }
}
