//! The single-token-tile path: [`micro`](super::micro) on packed weight
//! rows, each block unpacked in registers once and used by every pair of
//! tokens. The levels and scales are those `unpack_weights` writes, so the
//! results are the same bit for bit.

use super::{
    act_scales_at, act_unit_bytes, block_levels, has_min, level_offset, store_pairs, weight_block_bytes, Laid, Shape,
    PAIRS, Q4_0, Q4_1, Q8_0, ROWS, TOKS,
};
use std::arch::x86_64::*;

/// Runs the direct micro-tile kernel of the exact size `rr x tt` (each at most the full size).
///
/// # Safety
/// As for `direct`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn direct_any<const F: u8>(
    rr: usize,
    tt: usize,
    shape: &Shape,
    w: *const u8,
    laid: Laid,
    out: *mut f32,
    out_stride: usize,
) {
    by_micro_size!(rr, tt, direct::<F>(shape, w, laid, tt, out, out_stride))
}

/// Blocks whose scales [`direct`] converts at once.
const SCALE_RUN: usize = 16;

/// The scales `d` (and minimums `m`) of up to `SCALE_RUN` blocks of the row
/// at `row`, from block `b0` on, as f32 into `d` and `m`: the f16 bits
/// gathered with plain loads (a vector gather is far slower here, and it
/// stalls on the cache misses of a row streamed from memory), then one
/// exact conversion of all sixteen, as `load_f16` converts each.
///
/// # Safety
/// As for `direct`; blocks `b0 .. b0 + count` of the row must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_scales<const F: u8>(
    row: *const u8,
    b0: usize,
    count: usize,
    d: &mut [f32; SCALE_RUN],
    m: &mut [f32; SCALE_RUN],
) {
    let (mut d_bits, mut m_bits) = ([0u16; SCALE_RUN], [0u16; SCALE_RUN]);
    for k in 0..count {
        let block = row.add((b0 + k) * weight_block_bytes(F));
        d_bits[k] = block.cast::<u16>().read_unaligned();
        if has_min(F) {
            m_bits[k] = block.add(2).cast::<u16>().read_unaligned();
        }
    }
    _mm512_storeu_ps(d.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(d_bits.as_ptr().cast())));
    if has_min(F) {
        _mm512_storeu_ps(m.as_mut_ptr(), _mm512_cvtph_ps(_mm256_loadu_si256(m_bits.as_ptr().cast())));
    }
}

/// The levels of the weight block at `block` in both halves of a vector, as
/// [`block_levels`] gives them: for the 4-bit formats from one broadcast load
/// (each 128-bit lane the block's 16 bytes, the odd lanes shifted to their
/// high nibbles), for Q8_0 one broadcast load.
///
/// # Safety
/// As for `direct`; the block must be readable.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn block_levels_x2<const F: u8>(block: *const u8) -> __m512i {
    let nibbles = |at: usize| {
        let lanes = _mm512_broadcast_i32x4(_mm_loadu_si128(block.add(at).cast()));
        let shifted = _mm512_srlv_epi64(lanes, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4));
        _mm512_and_si512(shifted, _mm512_set1_epi8(0x0F))
    };
    match F {
        Q4_0 => nibbles(2),
        Q4_1 => nibbles(4),
        Q8_0 => _mm512_xor_si512(
            _mm512_broadcast_i64x4(_mm256_loadu_si256(block.add(2).cast())),
            _mm512_set1_epi8(0x80u8 as i8),
        ),
        _ => _mm512_broadcast_i64x4(block_levels::<F>(block)),
    }
}

/// [`micro`] on `R` packed weight rows at `w` (`shape.w_stride` apart) and
/// the first `P` pairs of tokens: each weight block is unpacked in
/// registers once and used by every pair, the same levels and scales that
/// `unpack_weights` writes, so the results are the same bit for bit.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; the `R`
/// rows must be readable, the layout hold the `tt` tokens, and the `R x tt`
/// outputs be writable.
#[allow(clippy::needless_range_loop)] // (row, pair) indices read clearest here
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn direct<const F: u8, const R: usize, const P: usize>(
    shape: &Shape,
    w: *const u8,
    laid: Laid,
    tt: usize,
    out: *mut f32,
    out_stride: usize,
) {
    let nb = shape.nb;
    let unit = act_unit_bytes(F);
    let mut chains = [_mm256_setzero_ps(); R];
    let mut acc = [[_mm512_setzero_ps(); P]; R];
    let mut d = [[0.0f32; SCALE_RUN]; R];
    let mut m = [[0.0f32; SCALE_RUN]; R];
    for b0 in (0..nb).step_by(SCALE_RUN) {
        let run = SCALE_RUN.min(nb - b0);
        for i in 0..R {
            block_scales::<F>(w.add(i * shape.w_stride), b0, run, &mut d[i], &mut m[i]);
        }
        for k in 0..run {
            let b = b0 + k;
            let mut qw = [_mm512_setzero_si512(); R];
            for i in 0..R {
                qw[i] = block_levels_x2::<F>(w.add(i * shape.w_stride + b * weight_block_bytes(F)));
            }
            if has_min(F) {
                let s_a = _mm256_loadu_ps(laid.sums.add(b * TOKS));
                for i in 0..R {
                    chains[i] = _mm256_fmadd_ps(_mm256_set1_ps(m[i][k]), s_a, chains[i]);
                }
            }
            for p in 0..P {
                let pair = laid.units.add((p * nb + b) * unit);
                let qa = _mm512_loadu_si512(pair.cast());
                let start =
                    if level_offset(F) > 0 { _mm512_loadu_si512(pair.add(64).cast()) } else { _mm512_setzero_si512() };
                let d_a = _mm512_loadu_ps(pair.add(act_scales_at(F)).cast());
                for i in 0..R {
                    let sums = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(start, qw[i], qa));
                    let scale = _mm512_mul_ps(d_a, _mm512_set1_ps(d[i][k]));
                    acc[i][p] = _mm512_fmadd_ps(scale, sums, acc[i][p]);
                }
            }
        }
    }
    store_pairs::<F, R, P>(&acc, &chains, tt, out, out_stride);
}
