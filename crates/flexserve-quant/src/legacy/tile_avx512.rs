//! AVX-512 (F, BW, VL, VNNI) tile kernels for the 32-element block formats
//! (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), bit-identical to the AVX2 dot and tile.
//!
//! Each (row, token) result is what llama.cpp's row-by-row dot computes:
//! eight f32 lanes, lane `j` accumulating `fma(d_w * d_a, isum_j, acc_j)`
//! per block, where `isum_j` is the exact integer sum of the products of
//! elements `4j..4j + 4`; then the lanes folded in the AVX2 `hsum` order,
//! plus (Q4_1, Q5_1) a separate FMA chain of the `m_w * s_a` terms. Here one
//! 512-bit vector holds two such eight-lane accumulators, one row with two
//! consecutive tokens, so that every instruction of the per-pair work (one
//! `vpdpbusd`, a conversion, the scale product and the FMA) serves two pairs.
//!
//! `vpdpbusd` multiplies unsigned by signed bytes. Weights are stored
//! unsigned per row chunk before the sweep: the nibbles (Q4_0, Q4_1), the
//! five-bit levels (Q5_0, Q5_1), `q + 128` (Q8_0). The formats whose true
//! levels are `q - k` (k = 8, 16, 128) start each block's integer sums at
//! `-k * (sum of the four activation quants)` per lane, computed once per
//! token chunk: the sums are exact, so they equal the AVX2 kernels' lanes.
//!
//! A product's activations are laid out once per pair of tokens and block:
//! the two tokens' 32 quants (one 64-byte load), their lane offsets, and
//! their scales broadcast over each half, so that the micro-tile loads whole
//! vectors and the per-pair scale product is one multiply by the weight's
//! broadcast scale. The engine lays them out once for all the tasks of a
//! parallel product (`SharedActTile`); the one-step `TileFn` lays them out
//! per call.
//!
//! Many tokens (a prompt) sweep chunks of weight rows unpacked once into the
//! thread's scratch, which every token tile then reads. A single token tile
//! (a decode batch of up to eight sequences) uses each weight block once, so
//! it unpacks the blocks in registers where it uses them (`direct`).

use super::format::{
    act_block_bytes, act_quants_at, act_type, has_min, weight_block_bytes, weight_type, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
};
use super::QK;
use crate::shape::{check_output, check_rows, check_tile, Shape};
use crate::simd::avx2::{hsum, load_bit_mask, load_f16, load_nibbles};
use crate::types::{SharedActTile, TileFn};
use flexserve_gguf::GgmlType;
use std::arch::x86_64::*;

/// Calls `$kernel::<F, R, P>(args)` for the micro-tile of `rr` rows by `tt`
/// tokens (`P` = pairs), each at most the full size, for both micro-tile
/// kernels.
macro_rules! by_micro_size {
    ($rr:expr, $tt:expr, $kernel:ident::<$f:ident>($($arg:expr),*)) => {{
        const { assert!(ROWS == 4 && PAIRS == 4, "by_size_4x4 lists the 4 x 4 sizes") };
        by_size_4x4!($rr, ($tt as usize).div_ceil(2), $kernel::<$f>($($arg),*))
    }};
}

mod direct;

use direct::direct_any;

/// Weight rows per micro-tile.
const ROWS: usize = 4;
/// Pairs of tokens per micro-tile: 4 x 4 accumulators of 512 bits, half the
/// register file, with room for each pair's quants, offsets and scales.
const PAIRS: usize = 4;
/// Tokens per micro-tile.
const TOKS: usize = 2 * PAIRS;

/// Bytes of unpacked weight rows per chunk (kept in L2 while every token
/// tile sweeps them).
const ROW_CHUNK_BYTES: usize = 128 * 1024;

/// The AVX-512 tile kernel of `ty`, if there is one.
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

/// `k` of the formats whose levels are the stored unsigned value less `k`.
const fn level_offset(f: u8) -> u8 {
    match f {
        Q4_0 => 8,
        Q5_0 => 16,
        Q8_0 => 128,
        _ => 0,
    }
}

/// Bytes per pair of tokens and block in the laid-out activations: the
/// quants, the lane offsets (formats with a level offset), the scales.
const fn act_unit_bytes(f: u8) -> usize {
    if level_offset(f) > 0 {
        192
    } else {
        128
    }
}

/// Offset of the scales in an activation unit.
const fn act_scales_at(f: u8) -> usize {
    act_unit_bytes(f) - 64
}

/// Bytes per row and block of unpacked weights (32 levels).
const W_UNIT_BYTES: usize = QK;

/// The kernel of `ty` in two steps, if there is one (see [`SharedActTile`]).
pub(crate) fn shared(ty: GgmlType) -> Option<SharedActTile> {
    macro_rules! of {
        ($f:expr) => {
            SharedActTile { layout_len: layout_len::<{ $f }>, lay_out: lay_out::<{ $f }>, tile: run::<{ $f }> }
        };
    }
    match ty {
        GgmlType::Q4_0 => Some(of!(Q4_0)),
        GgmlType::Q4_1 => Some(of!(Q4_1)),
        GgmlType::Q5_0 => Some(of!(Q5_0)),
        GgmlType::Q5_1 => Some(of!(Q5_1)),
        GgmlType::Q8_0 => Some(of!(Q8_0)),
        _ => None,
    }
}

/// The parts of the laid-out activations of `toks` tokens of `nb` blocks,
/// in f32 words: the pair units, then (formats with a minimum) the sums.
const fn layout_parts<const F: u8>(nb: usize, toks: usize) -> (usize, usize) {
    let units = toks.div_ceil(2) * nb * act_unit_bytes(F) / 4;
    let sums = if has_min(F) { toks.div_ceil(TOKS) * TOKS * nb } else { 0 };
    (units, sums)
}

fn layout_len<const F: u8>(n: usize, toks: usize) -> usize {
    let (units, sums) = layout_parts::<F>(n / QK, toks);
    units + sums
}

/// The largest `layout_len` of the five formats.
pub(crate) fn layout_len_max(n: usize, toks: usize) -> usize {
    [layout_len::<Q4_0>, layout_len::<Q4_1>, layout_len::<Q5_0>, layout_len::<Q5_1>, layout_len::<Q8_0>]
        .iter()
        .map(|len| len(n, toks))
        .max()
        .unwrap_or(0)
}

/// f32 words of scratch for `rows` unpacked weight rows of `nb` blocks:
/// the levels, the scales, the minimums.
const fn weight_scratch_len(rows: usize, nb: usize) -> usize {
    rows * nb * (W_UNIT_BYTES / 4 + 2)
}

/// Rows of a chunk of unpacked weights (a whole number of micro-tiles).
fn row_chunk(nb: usize) -> usize {
    (ROW_CHUNK_BYTES / (nb * (W_UNIT_BYTES + 8))).max(1).div_ceil(ROWS) * ROWS
}

/// Panics with a clear message unless `layout` has room for `toks` tokens.
fn check_layout<const F: u8>(n: usize, toks: usize, layout: &[f32]) {
    let needed = layout_len::<F>(n, toks);
    assert!(
        layout.len() >= needed,
        "{} tile: {toks} tokens of {n} elements need {needed} words of laid-out activations, got {}",
        weight_type(F),
        layout.len()
    );
}

fn lay_out<const F: u8>(n: usize, a: &[u8], a_row_bytes: usize, toks: usize, layout: &mut [f32]) {
    check_rows("activation", act_type(F), n, a, a_row_bytes, toks);
    check_layout::<F>(n, toks, layout);
    if toks == 0 {
        return;
    }
    let nb = n / QK;
    let (units, _) = layout_parts::<F>(nb, toks);
    let base = layout.as_mut_ptr();
    // SAFETY: `lay_out` is only handed out at the AVX-512 tier (AVX2, FMA,
    // F16C, AVX-512 F/BW/VL/VNNI); `check_rows` verified that `toks`
    // rows of `nb` blocks lie within `a` at its stride, and `check_layout`
    // that `layout` has room for what is written.
    unsafe { lay_out_activations::<F>(nb, a.as_ptr(), a_row_bytes, toks, base.cast(), base.add(units)) }
}

#[allow(clippy::too_many_arguments)]
fn run<const F: u8>(
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    layout: &[f32],
    toks: usize,
    out: &mut [f32],
    out_stride: usize,
) {
    check_rows("weight", weight_type(F), n, w, w_row_bytes, rows);
    check_output(rows, toks, out, out_stride);
    check_layout::<F>(n, toks, layout);
    if rows == 0 || toks == 0 {
        return;
    }
    let shape = Shape::of(weight_type(F), n, w_row_bytes, 0, out_stride);
    let nb = shape.nb;
    let (units, _) = layout_parts::<F>(nb, toks);
    crate::scratch::with_f32_unfilled(weight_scratch_len(row_chunk(nb).min(rows), nb), |weights| {
        let base = layout.as_ptr();
        // SAFETY: `run` is only handed out at the AVX-512 tier; the checks
        // above verified that `rows` weight rows of `nb` blocks lie within
        // `w` at its stride, that `toks` output rows of `rows` floats lie
        // within `out`, and that the layout holds `toks` tokens; the weight
        // scratch has room for one row chunk.
        unsafe { sweep::<F>(shape, w.as_ptr(), rows, base.cast(), base.add(units), toks, out.as_mut_ptr(), weights) }
    })
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
    check_tile(weight_type(F), act_type(F), n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    if rows == 0 || toks == 0 {
        return;
    }
    let shape = Shape::of(weight_type(F), n, w_row_bytes, a_row_bytes, out_stride);
    let nb = shape.nb;
    let (units, sums) = layout_parts::<F>(nb, toks);
    let weights_len = weight_scratch_len(row_chunk(nb).min(rows), nb);
    // One scratch for both (a nested scratch call would allocate), not
    // filled: every result depends only on elements written first.
    crate::scratch::with_f32_unfilled(units + sums + weights_len, |buf| {
        let (layout, weights) = buf.split_at_mut(units + sums);
        let base = layout.as_mut_ptr();
        // SAFETY: the wrapper is only handed out at the AVX-512 tier, which
        // requires AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI; `check_tile`
        // verified that `rows` weight rows and `toks` activation rows of
        // `nb` blocks each, and `toks` output rows of `rows` floats, lie
        // within the slices at the given strides, which is exactly what the
        // kernel reads and writes; the scratch has room for the layout of
        // `toks` tokens and one chunk of unpacked rows.
        unsafe {
            lay_out_activations::<F>(nb, a.as_ptr(), a_row_bytes, toks, base.cast(), base.add(units));
            sweep::<F>(shape, w.as_ptr(), rows, base.cast(), base.add(units), toks, out.as_mut_ptr(), weights);
        }
    })
}

/// Unpacked weight rows of one chunk, in the thread's scratch.
struct Unpacked {
    /// Levels: `[row][block]` 32 bytes.
    levels: *mut u8,
    /// Scales `d`: `[row][block]`.
    d: *mut f32,
    /// Minimums `m` (formats with a minimum): `[row][block]`.
    m: *mut f32,
}

/// Laid-out activations of a whole product.
#[derive(Clone, Copy)]
struct Laid {
    /// `[pair][block]` units (see the module comment).
    units: *const u8,
    /// Sums `s` (formats with a minimum): `[token tile][block][token % TOKS]`.
    sums: *const f32,
}

/// Multiplies `rows` weight rows by the laid-out `toks` tokens, a chunk of
/// unpacked rows at a time.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `rows`
/// weight rows of `shape.nb` blocks must be readable at the stride, the
/// layout must hold `toks` tokens, `toks` output rows of `rows` floats be
/// writable, and `weights` have room for one chunk of unpacked rows.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn sweep<const F: u8>(
    shape: Shape,
    w: *const u8,
    rows: usize,
    units: *const u8,
    sums: *const f32,
    toks: usize,
    out: *mut f32,
    weights: &mut [f32],
) {
    let nb = shape.nb;
    let laid = Laid { units, sums };
    // One token tile (a decode batch): every weight block is used once, so
    // it is unpacked in registers where it is used, not through the scratch.
    if toks <= TOKS {
        for r in (0..rows).step_by(ROWS) {
            let rr = ROWS.min(rows - r);
            direct_any::<F>(rr, toks, &shape, w.add(r * shape.w_stride), laid, out.add(r), shape.out_stride);
        }
        return;
    }
    let chunk = row_chunk(nb).min(rows);
    let base = weights.as_mut_ptr();
    let unpacked = Unpacked {
        levels: base.cast(),
        d: base.add(chunk * nb * W_UNIT_BYTES / 4),
        m: base.add(chunk * nb * (W_UNIT_BYTES / 4 + 1)),
    };
    for r_chunk in (0..rows).step_by(chunk) {
        let rc = chunk.min(rows - r_chunk);
        unpack_weights::<F>(&shape, w.add(r_chunk * shape.w_stride), rc, &unpacked);
        for t in (0..toks).step_by(TOKS) {
            let tt = TOKS.min(toks - t);
            for r in (0..rc).step_by(ROWS) {
                let rr = ROWS.min(rc - r);
                let out = out.add(t * shape.out_stride + r_chunk + r);
                micro_any::<F>(rr, tt, nb, &unpacked, laid, r, t, out, shape.out_stride);
            }
        }
    }
}

/// Lays out `count` activation rows at `a` (`a_stride` apart) as pairs of
/// tokens (see the module comment) at `units`, and their sums at `sums`;
/// an odd last token is paired with itself.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; the rows
/// must be readable and the layout (`layout_parts`) writable.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn lay_out_activations<const F: u8>(
    nb: usize,
    a: *const u8,
    a_stride: usize,
    count: usize,
    units: *mut u8,
    sums: *mut f32,
) {
    let offset = level_offset(F);
    for p in 0..count.div_ceil(2) {
        let tokens = [2 * p, (2 * p + 1).min(count - 1)];
        for b in 0..nb {
            let unit = units.add((p * nb + b) * act_unit_bytes(F));
            for (half, &t) in tokens.iter().enumerate() {
                let block = a.add(t * a_stride + b * act_block_bytes(F));
                let quants = _mm256_loadu_si256(block.add(act_quants_at(F)).cast());
                _mm256_storeu_si256(unit.add(32 * half).cast(), quants);
                if offset > 0 {
                    // -k times each lane's four quants, exactly.
                    let sums = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_set1_epi8(offset as i8), quants);
                    let negated = _mm256_sub_epi32(_mm256_setzero_si256(), sums);
                    _mm256_storeu_si256(unit.add(64 + 32 * half).cast(), negated);
                }
                let d = _mm256_set1_ps(load_f16(block));
                _mm256_storeu_ps(unit.add(act_scales_at(F) + 32 * half).cast(), d);
            }
        }
    }
    if has_min(F) {
        for t in 0..count {
            for b in 0..nb {
                let block = a.add(t * a_stride + b * act_block_bytes(F));
                *sums.add((t / TOKS * nb + b) * TOKS + t % TOKS) = load_f16(block.add(2));
            }
        }
    }
}

/// Unpacks `count` weight rows at `w` (`s.w_stride` apart) into unsigned
/// levels and f32 scales (and minimums).
///
/// # Safety
/// As for `sweep`; `to` must have room for `count` rows.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack_weights<const F: u8>(s: &Shape, w: *const u8, count: usize, to: &Unpacked) {
    let nb = s.nb;
    for r in 0..count {
        for b in 0..nb {
            let block = w.add(r * s.w_stride + b * weight_block_bytes(F));
            let at = r * nb + b;
            _mm256_storeu_si256(to.levels.add(at * W_UNIT_BYTES).cast(), block_levels::<F>(block));
            *to.d.add(at) = load_f16(block);
            if has_min(F) {
                *to.m.add(at) = load_f16(block.add(2));
            }
        }
    }
}

/// The 32 unsigned levels of the weight block at `block`.
///
/// # Safety
/// As for `sweep`; the block must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_levels<const F: u8>(block: *const u8) -> __m256i {
    match F {
        Q4_0 => load_nibbles(block.add(2)),
        Q4_1 => load_nibbles(block.add(4)),
        Q5_0 => {
            let high = _mm256_and_si256(load_bit_mask(block.add(2)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(load_nibbles(block.add(6)), high)
        }
        Q5_1 => {
            let high = _mm256_and_si256(load_bit_mask(block.add(4)), _mm256_set1_epi8(0x10));
            _mm256_or_si256(load_nibbles(block.add(8)), high)
        }
        // q + 128 as an unsigned byte.
        _ => _mm256_xor_si256(_mm256_loadu_si256(block.add(2).cast()), _mm256_set1_epi8(0x80u8 as i8)),
    }
}

/// Runs the micro-tile kernel of the exact size `rr x tt` (each at most the full size).
///
/// # Safety
/// As for `micro`.
#[allow(clippy::too_many_arguments)]
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn micro_any<const F: u8>(
    rr: usize,
    tt: usize,
    nb: usize,
    weights: &Unpacked,
    laid: Laid,
    r: usize,
    t: usize,
    out: *mut f32,
    out_stride: usize,
) {
    by_micro_size!(rr, tt, micro::<F>(nb, weights, laid, r, t, tt, out, out_stride))
}

/// One micro-tile: `R` unpacked weight rows from row `r` of the chunk by
/// `P` pairs of tokens from token `t` of the chunk (`tt` tokens, the last
/// pair's upper half unused when `tt` is odd), written token-major to `out`.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; the scratch
/// must hold the chunk's laid-out rows and tokens, and the `R x tt` outputs
/// be writable.
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)] // (row, pair) indices read clearest here
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn micro<const F: u8, const R: usize, const P: usize>(
    nb: usize,
    weights: &Unpacked,
    laid: Laid,
    r: usize,
    t: usize,
    tt: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let unit = act_unit_bytes(F);
    let act = laid.units.add(t / 2 * nb * unit);
    let levels = weights.levels.add(r * nb * W_UNIT_BYTES);
    let w_d = weights.d.add(r * nb);
    // The minimum terms m_w * s_a, one FMA chain per pair as in the dot:
    // lane `t` of `chains[i]` is pair (row i, token t). Updated in the block
    // loop, where the other work hides each FMA's latency.
    let (w_m, sums) = (weights.m.add(r * nb), laid.sums.add(t / TOKS * nb * TOKS));
    let mut chains = [_mm256_setzero_ps(); R];
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    for b in 0..nb {
        for p in 0..P {
            let pair = act.add((p * nb + b) * unit);
            let qa = _mm512_loadu_si512(pair.cast());
            let start =
                if level_offset(F) > 0 { _mm512_loadu_si512(pair.add(64).cast()) } else { _mm512_setzero_si512() };
            let d_a = _mm512_loadu_ps(pair.add(act_scales_at(F)).cast());
            for i in 0..R {
                let qw = _mm512_broadcast_i64x4(_mm256_loadu_si256(levels.add((i * nb + b) * W_UNIT_BYTES).cast()));
                let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, qw, qa));
                let scale = _mm512_mul_ps(d_a, _mm512_set1_ps(*w_d.add(i * nb + b)));
                acc[i][p] = _mm512_fmadd_ps(scale, sums, acc[i][p]);
            }
        }
        if has_min(F) {
            let s_a = _mm256_loadu_ps(sums.add(b * TOKS));
            for (i, chain) in chains.iter_mut().enumerate() {
                *chain = _mm256_fmadd_ps(_mm256_set1_ps(*w_m.add(i * nb + b)), s_a, *chain);
            }
        }
    }
    store_pairs::<F, R, P>(&acc, &chains, tt, out, out_stride);
}

/// A micro-tile's results: each pair's two eight-lane accumulators folded
/// as the dot folds them, plus (formats with a minimum) the minimum terms.
///
/// # Safety
/// As for `micro`.
#[allow(clippy::needless_range_loop)] // (row, pair) indices read clearest here
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn store_pairs<const F: u8, const R: usize, const P: usize>(
    acc: &[[__m512; P]; R],
    chains: &[__m256; R],
    tt: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let mut mins = [[0.0f32; TOKS]; R];
    for (m, chain) in mins.iter_mut().zip(chains) {
        _mm256_storeu_ps(m.as_mut_ptr(), *chain);
    }

    for i in 0..R {
        for p in 0..P {
            let halves = [
                _mm512_castps512_ps256(acc[i][p]),
                _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc[i][p]))),
            ];
            for (half, v) in halves.into_iter().enumerate() {
                let token = 2 * p + half;
                if token < tt {
                    let mut value = hsum(v);
                    if has_min(F) {
                        value += mins[i][token];
                    }
                    *out.add(token * out_stride + i) = value;
                }
            }
        }
    }
}
