//! Tile and GEMV kernels for F32, F16 and BF16 weights, for AVX2 (with FMA
//! and F16C) and AVX-512 F, both made from one template (`float_tier!`).
//!
//! A micro-tile of R weight rows by T tokens keeps one vector accumulator
//! per (row, token) pair beside the T tokens' activation vectors and one
//! weight vector: 4 x 3 with AVX2's 16 registers (12 accumulators), 4 x 4
//! with AVX-512's 32 (16 accumulators; 4 x 6 spilled some of its 24 to the
//! stack in the inner loop, 4 x 4 spills none). Per vector of elements it converts T
//! activation and R weight vectors and runs R x T FMAs; each pair's FMAs form
//! its tier's plain dot's single chain in the dot's order, and each pair ends
//! as the dot does, so results are bit-identical to it. The chains overlap,
//! which hides the FMA latency that bounds the dot.
//!
//! Tokens are taken a chunk of about `TOK_CHUNK_BYTES` of activations at a
//! time, which stays in L2 while every block of `ROW_BLOCK` rows passes it;
//! within a block, every token group of the chunk passes the block while its
//! weights stay in L1/L2, and a micro-tile's activation rows stay in L1 for
//! the block's micro-tiles. (Without the chunks, a long prompt's activations
//! came from L3 again for every block of rows, and two threads shared that
//! traffic: 3% of a 512-token prefill.)
//!
//! The GEMV kernel is the same micro-tile over one token, and the tier's plain
//! dot (`dot`, which `float::avx2_kernels` and `float::avx512_kernels` hand
//! out) is its 1 x 1 micro-tile.

use super::avx2::{check_dot, format_type, BF16, F16, F32};
use crate::shape::{check_gemv, check_tile, for_each_micro_tile};
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Weight rows that every token passes while they stay in cache (for rows
/// of 4096 f16 elements, 128 KiB); a multiple of both tiers' micro-tile rows.
const ROW_BLOCK: usize = 16;
/// Activation bytes per chunk of tokens: a chunk stays in L2 while every
/// block of rows passes it.
const TOK_CHUNK_BYTES: usize = 128 * 1024;

/// Defines module `$tier` with the tile (`tile`) and GEMV (`gemv`) kernels
/// of one instruction set: `load::<F>(p, i)` reads `$lanes` elements of
/// format `F` from element `i` as one `$vector`, `finish::<F>` reduces an
/// accumulator and adds a row's leftover products as that tier's dot does,
/// and `$pin` keeps accumulators in registers.
macro_rules! float_tier {
    (
        $(#[$doc:meta])*
        $tier:ident {
            features: $features:literal,
            vector: $vector:ty,
            lanes: $lanes:literal,
            zero: $zero:path,
            fma: $fma:path,
            load: $load:path,
            store: $store:path,
            finish: $finish:path,
            pin: $pin:path,
            micro_tile: ($rows:literal, $toks:literal),
            shapes: [$(($r:literal, $t:literal)),* $(,)?] $(,)?
        }
    ) => {
        $(#[$doc])*
        pub(crate) mod $tier {
            use super::*;
            use crate::types::{GemvFn, TileFn};
            use $finish as finish;
            use $load as load;
            use $pin as pin;

            /// Weight rows and tokens per micro-tile.
            const ROWS: usize = $rows;
            const TOKS: usize = $toks;

            /// The tile kernel of `ty`, if there is one.
            pub(crate) fn tile(ty: GgmlType) -> Option<TileFn> {
                match ty {
                    GgmlType::F32 => Some(tile_wrapper::<F32>),
                    GgmlType::F16 => Some(tile_wrapper::<F16>),
                    GgmlType::BF16 => Some(tile_wrapper::<BF16>),
                    _ => None,
                }
            }

            /// The GEMV kernel of `ty`, if there is one.
            pub(crate) fn gemv(ty: GgmlType) -> Option<GemvFn> {
                match ty {
                    GgmlType::F32 => Some(gemv_wrapper::<F32>),
                    GgmlType::F16 => Some(gemv_wrapper::<F16>),
                    GgmlType::BF16 => Some(gemv_wrapper::<BF16>),
                    _ => None,
                }
            }

            /// The plain dot of this tier: the 1 x 1 micro-tile, so that every
            /// tile and GEMV of the tier equals it by construction.
            pub(crate) fn dot<const F: u8>(n: usize, w: &[u8], a: &[u8]) -> f32 {
                check_dot(n, w, a, format_type(F).type_size());
                let mut out = 0.0;
                // SAFETY: only handed out at its tier, after the CPU was found to
                // support `$features`; both rows hold `n` elements (checked above),
                // which is all the micro-tile reads, and it writes one float.
                unsafe { micro::<F, 1, 1>(n, w.as_ptr(), 0, a.as_ptr(), 0, &mut out, 0, 0) };
                out
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
                // SAFETY: the kernel is only handed out at its tier, after the
                // CPU was found to support `$features`; `check_tile` verified
                // that `rows` weight rows and `toks` activation rows of `n`
                // elements lie within `w` and `a` at their strides, and that
                // `toks` output rows of `rows` floats lie within `out`.
                unsafe {
                    sweep::<F>(n, w.as_ptr(), w_row_bytes, rows, a.as_ptr(), a_row_bytes, toks, out.as_mut_ptr(), out_stride)
                }
            }

            fn gemv_wrapper<const F: u8>(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
                let ty = format_type(F);
                check_gemv(ty, ty, n, w, w_row_bytes, rows, a, out);
                if rows == 0 {
                    return;
                }
                // SAFETY: as in `tile_wrapper`; `check_gemv` verified `rows`
                // weight rows and one activation row of `n` elements, and
                // `rows` output floats.
                unsafe { gemv_sweep::<F>(n, w.as_ptr(), w_row_bytes, rows, a.as_ptr(), out.as_mut_ptr()) }
            }

            /// The GEMV: `ROWS` chains at once, each walking its own part of
            /// the rows in order, so that the weights are read as a few long
            /// sequential streams (rows lie back to back) rather than short
            /// ones per group of rows. The `rows % ROWS` rows left over
            /// follow one micro-tile.
            ///
            /// # Safety
            /// The CPU must support `$features`; `rows` weight rows and one
            /// activation row of `n` elements must be readable, `rows` floats
            /// at `out` writable.
            #[target_feature(enable = $features)]
            unsafe fn gemv_sweep<const F: u8>(
                n: usize,
                w: *const u8,
                w_stride: usize,
                rows: usize,
                a: *const u8,
                out: *mut f32,
            ) {
                let part = rows / ROWS;
                for r in 0..part {
                    micro::<F, ROWS, 1>(n, w.add(r * w_stride), part * w_stride, a, 0, out.add(r), part, 0);
                }
                let done = part * ROWS;
                let (w, out) = (w.add(done * w_stride), out.add(done));
                for r in 0..rows - done {
                    micro::<F, 1, 1>(n, w.add(r * w_stride), w_stride, a, 0, out.add(r), 1, 0);
                }
            }

            /// Visits the whole `rows x toks` tile: per chunk of tokens and
            /// block of rows, every token group of the chunk, then the
            /// block's micro-tiles.
            ///
            /// # Safety
            /// The CPU must support `$features`; `rows` weight rows and `toks`
            /// activation rows of `n` elements must be readable at their
            /// strides, and `toks` output rows of `rows` floats writable.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
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
                if F != F32 && n % $lanes == 0 && toks > TOKS {
                    return widened_sweep::<F>(n, w, w_stride, rows, a, a_stride, toks, out, out_stride);
                }
                let row_bytes = n * format_type(F).type_size();
                let tok_chunk = (TOK_CHUNK_BYTES / row_bytes.max(1) / TOKS).max(1) * TOKS;
                for_each_micro_tile(rows, toks, (ROWS, TOKS), (ROW_BLOCK, tok_chunk), |_, _| {}, |r, rr, t, tt, _| {
                    let (w, a, out) = (w.add(r * w_stride), a.add(t * a_stride), out.add(t * out_stride + r));
                    match (rr, tt) {
                        $(($r, $t) => micro::<F, $r, $t>(n, w, w_stride, a, a_stride, out, 1, out_stride),)*
                        _ => unreachable!("no {rr} x {tt} micro-tile"),
                    }
                });
            }

            /// [`sweep`] of 16-bit rows over several token groups: each chunk
            /// of tokens and each block of rows is widened to f32 once, in the
            /// thread's scratch, and the micro-tiles run on the f32 copies,
            /// instead of converting every vector again for every micro-tile
            /// that reads it. The products and their order are the same
            /// (widening is exact, and with `n` a multiple of the lanes no
            /// element is left for `finish`, whose f32 and 16-bit forms then
            /// agree), so results are bit-identical to [`sweep`]'s.
            ///
            /// # Safety
            /// As for [`sweep`]; `n` must be a multiple of the lanes.
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
            unsafe fn widened_sweep<const F: u8>(
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
                let f32_row = n * 4;
                let tok_chunk = (TOK_CHUNK_BYTES / f32_row.max(1) / TOKS).max(1) * TOKS;
                let chunk_toks = tok_chunk.min(toks);
                // Activations (a prompt's) and weights in the scratch that
                // `scrub_thread_scratch` clears.
                crate::scratch::with_f32((chunk_toks + ROW_BLOCK) * n, 0.0, |buffer| {
                    let (acts, weights) = buffer.split_at_mut(chunk_toks * n);
                    for t0 in (0..toks).step_by(tok_chunk) {
                        let t_count = tok_chunk.min(toks - t0);
                        for (t, row) in acts.chunks_exact_mut(n).take(t_count).enumerate() {
                            widen::<F>(a.add((t0 + t) * a_stride), row);
                        }
                        for r0 in (0..rows).step_by(ROW_BLOCK) {
                            let r_count = ROW_BLOCK.min(rows - r0);
                            for (r, row) in weights.chunks_exact_mut(n).take(r_count).enumerate() {
                                widen::<F>(w.add((r0 + r) * w_stride), row);
                            }
                            let (wp, ap) = (weights.as_ptr().cast::<u8>(), acts.as_ptr().cast::<u8>());
                            for t in (0..t_count).step_by(TOKS) {
                                let tt = TOKS.min(t_count - t);
                                for r in (0..r_count).step_by(ROWS) {
                                    let rr = ROWS.min(r_count - r);
                                    let (w, a) = (wp.add(r * f32_row), ap.add(t * f32_row));
                                    let out = out.add((t0 + t) * out_stride + r0 + r);
                                    match (rr, tt) {
                                        $(($r, $t) => micro::<F32, $r, $t>(n, w, f32_row, a, f32_row, out, 1, out_stride),)*
                                        _ => unreachable!("no {rr} x {tt} micro-tile"),
                                    }
                                }
                            }
                        }
                    }
                });
            }

            /// Widens the `dst.len()` elements of format `F` at `src` (a
            /// multiple of the lanes) to f32.
            ///
            /// # Safety
            /// The CPU must support `$features`; `dst.len()` elements must be
            /// readable at `src`.
            #[inline]
            #[target_feature(enable = $features)]
            unsafe fn widen<const F: u8>(src: *const u8, dst: &mut [f32]) {
                for i in (0..dst.len()).step_by($lanes) {
                    $store(dst.as_mut_ptr().add(i), load::<F>(src, i));
                }
            }

            /// One micro-tile of `R` weight rows (at `w`, `w_stride` bytes
            /// apart) by `T` activation rows (at `a`, `a_stride` bytes apart)
            /// of `n` elements, each pair's dot written at
            /// `out[r * row_step + t * tok_step]`.
            ///
            /// # Safety
            /// The CPU must support `$features`; the rows must hold `n`
            /// elements and the outputs be writable.
            #[inline]
            #[allow(clippy::needless_range_loop)] // (row, token) indices read clearest here
            #[allow(clippy::too_many_arguments)]
            #[target_feature(enable = $features)]
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
                let main = n - n % $lanes;
                let mut acc: [[$vector; T]; R] = [[$zero(); T]; R];
                for i in (0..main).step_by($lanes) {
                    let mut av: [$vector; T] = [$zero(); T];
                    for (t, v) in av.iter_mut().enumerate() {
                        *v = load::<F>(a.add(t * a_stride), i);
                    }
                    for r in 0..R {
                        let wv = load::<F>(w.add(r * w_stride), i);
                        for t in 0..T {
                            acc[r][t] = $fma(wv, av[t], acc[r][t]);
                        }
                        // Keeps the accumulators in registers and the loads in
                        // order (see `pin`); left free, the compiler spills one
                        // of them and every step then waits on a store and a
                        // reload.
                        pin(&mut acc[r]);
                    }
                }
                for r in 0..R {
                    for t in 0..T {
                        *out.add(r * row_step + t * tok_step) =
                            finish::<F>(acc[r][t], n, main, w.add(r * w_stride), a.add(t * a_stride));
                    }
                }
            }
        }
    };
}

float_tier! {
    /// AVX2, FMA and F16C: eight lanes, micro-tiles of 4 x 3.
    avx2 {
        features: "avx2,fma,f16c",
        vector: __m256,
        lanes: 8,
        zero: _mm256_setzero_ps,
        fma: _mm256_fmadd_ps,
        load: crate::float::avx2::eight,
        store: _mm256_storeu_ps,
        finish: crate::float::avx2::finish,
        pin: crate::simd::avx2::pin_ps,
        micro_tile: (4, 3),
        shapes: [(4, 3), (4, 2), (4, 1), (3, 3), (3, 2), (3, 1), (2, 3), (2, 2), (2, 1), (1, 3), (1, 2), (1, 1)],
    }
}

float_tier! {
    /// AVX-512 F: sixteen lanes, micro-tiles of 4 x 4.
    avx512 {
        features: "avx2,fma,f16c,avx512f",
        vector: __m512,
        lanes: 16,
        zero: _mm512_setzero_ps,
        fma: _mm512_fmadd_ps,
        load: crate::float::avx512::sixteen,
        store: _mm512_storeu_ps,
        finish: crate::float::avx512::finish,
        pin: crate::simd::avx512::pin_ps,
        micro_tile: (4, 4),
        shapes: [
            (4, 4), (4, 3), (4, 2), (4, 1),
            (3, 4), (3, 3), (3, 2), (3, 1),
            (2, 4), (2, 3), (2, 2), (2, 1),
            (1, 4), (1, 3), (1, 2), (1, 1),
        ],
    }
}
