//! Causal grouped-query attention over the f16 cache, rounding for rounding
//! as llama.cpp's CPU flash attention (its default) computes it in its
//! AVX-512 build, in each of the three ways it takes:
//!
//! - **One pass per query head** (`ggml_compute_forward_flash_attn_ext_f16_one_chunk`):
//!   a batch of fewer than 64 queries, and a single query over fewer than
//!   512 cells. The query is rounded to f16, each key's score is an f16 dot,
//!   the softmax is online and the weighted sum of values is kept in f16
//!   ([`attend_head`]).
//! - **Split keys** (its split-KV path and `ggml_flash_attn_ext_reduce_partials`):
//!   a single query once llama.cpp's padded KV length reaches 512. The cells
//!   are cut into one chunk per thread, each chunk takes the pass above
//!   without the final division, and the chunks' maxima, sums and weighted
//!   sums are combined in order after ([`decode_head`]). The rounding depends
//!   on the thread count, as llama.cpp's does: the two agree when both run
//!   with the same number of threads.
//! - **Tiles** (`ggml_compute_forward_flash_attn_ext_tiled`): a batch of 64
//!   queries or more. Queries and keys in f32, the scores of 64 keys at a
//!   time by one fused multiply-add per dimension in order, the tile's
//!   softmax in one step (its maximum, llama.cpp's vector exponential, the
//!   sum of each 16 lanes reduced as `_mm512_reduce_add_ps` does and added
//!   in f64), the weighted sum of f32 values kept in f32 by one fused
//!   multiply-add per key in order ([`attention_tiled`]). llama.cpp groups
//!   64 queries per tile and skips the tiles of keys that none of them sees;
//!   neither changes a query's result (a tile it does not see adds exact
//!   zeros), so the engine groups its own way.
//!
//! llama.cpp's padded KV length is its cache's used cells rounded up to a
//! multiple of 256 (`llama_kv_cache::get_n_kv`); cells hold positions in
//! order from 0, as they do for one sequence in a fresh context.

use std::cell::RefCell;
use std::ops::{Range, RangeInclusive};

use half::f16;
use rayon::prelude::*;

use super::KvCache;
use crate::config::ModelConfig;
use crate::memory::Buf;
use crate::ops;
use crate::EngineError;

/// Batches of at least this many queries take the tiled kernel, as
/// llama.cpp's does at this size (`GGML_FA_TILE_Q`).
pub(super) const TILED_MIN_BATCH: usize = 64;

/// Keys per tile (`GGML_FA_TILE_KV`): a tile's softmax is one step.
pub(super) const KV_TILE: usize = 64;

/// Queries per task of the tiled kernel: a 128-token prompt makes eight tasks.
const QUERY_BLOCK: usize = 16;

/// llama.cpp attends over its used cells rounded up to a multiple of this.
const KV_PAD: usize = 256;

/// A single query over at least this many (padded) cells takes the split path.
const SPLIT_KV_MIN: usize = 512;

/// Lanes of the vector whose sum `_mm512_reduce_add_ps` reduces.
const LANES: usize = 16;

thread_local! {
    // Per worker thread, kept between calls: one allocation per task would
    // churn the heap for every layer of every token. The query in f16 (one
    // pass per head) and the f32 scratch of the split and tiled paths.
    static QUERY_F16: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Zeroes the calling thread's attention scratch (queries, scores, partial
/// sums: derived from the prompt) over its whole capacity, and its kernels' scratch.
pub(crate) fn scrub_thread_scratch() {
    QUERY_F16.with_borrow_mut(|q| {
        q.resize(q.capacity(), 0);
        zeroize::Zeroize::zeroize(q.as_mut_slice());
    });
    SCRATCH.with_borrow_mut(|s| {
        s.resize(s.capacity(), 0.0);
        zeroize::Zeroize::zeroize(s.as_mut_slice());
    });
    flexserve_quant::scrub_thread_scratch();
}

/// Whether the calling thread's scratch is scrubbed (see [`scrub_thread_scratch`]).
pub(crate) fn thread_scratch_is_zero() -> bool {
    let q = QUERY_F16.with_borrow(|q| q.len() == q.capacity() && q.iter().all(|&b| b == 0));
    let s = SCRATCH.with_borrow(|s| s.len() == s.capacity() && s.iter().all(|&v| v == 0.0));
    q && s && flexserve_quant::thread_scratch_is_zero()
}

/// llama.cpp's KV length when `used` cells are taken: rounded up to a
/// multiple of 256, at least 256.
pub(super) fn padded_kv_len(used: usize) -> usize {
    used.div_ceil(KV_PAD).max(1) * KV_PAD
}

/// One head's attention output `o` for the query `q`, over the positions
/// `seen` (up to the query's own, from the start of its window) of one
/// layer's cache (`kc`, `vc`), in one pass.
pub(super) fn attend_head(
    c: &ModelConfig,
    kc: &[u16],
    vc: &[u16],
    head: usize,
    seen: RangeInclusive<usize>,
    q: &[f32],
    o: &mut [f32],
) {
    QUERY_F16.with_borrow_mut(|q16| {
        query_f16(q, q16);
        let (_, sum) = one_chunk(c, kc, vc, kv_head(c, head), *seen.start()..*seen.end() + 1, q16, o);
        let inv = 1.0 / sum;
        o.iter_mut().for_each(|v| *v *= inv);
    })
}

/// One head's attention output for a single query (decoding), as llama.cpp
/// computes it running on `threads` threads: over llama.cpp's padded KV
/// length of 512 or more the split path, else [`attend_head`].
#[allow(clippy::too_many_arguments)]
pub(super) fn decode_head(
    c: &ModelConfig,
    kc: &[u16],
    vc: &[u16],
    head: usize,
    seen: RangeInclusive<usize>,
    q: &[f32],
    o: &mut [f32],
    threads: usize,
) {
    let (first, last) = (*seen.start(), *seen.end());
    let n_kv = padded_kv_len(last + 1);
    if n_kv < SPLIT_KV_MIN {
        return attend_head(c, kc, vc, head, seen, q, o);
    }
    let chunk = n_kv.div_ceil(threads.max(1));
    QUERY_F16.with_borrow_mut(|q16| {
        SCRATCH.with_borrow_mut(|partial| {
            query_f16(q, q16);
            partial.resize(o.len(), 0.0);
            let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
            o.fill(0.0);
            for start in (0..n_kv).step_by(chunk) {
                // A chunk with no visible cell has a sum of 0: the reduction skips it.
                let keys = start.max(first)..(start + chunk).min(n_kv).min(last + 1);
                if keys.is_empty() {
                    continue;
                }
                let (m, s) = one_chunk(c, kc, vc, kv_head(c, head), keys, q16, partial);
                let m_new = max.max(m);
                let (scale_old, scale_new) = ((max - m_new).exp(), (m - m_new).exp());
                for (v, &p) in o.iter_mut().zip(partial.iter()) {
                    *v = combine(*v, scale_old, p, scale_new);
                }
                sum = combine(sum, scale_old, s, scale_new);
                max = m_new;
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        })
    })
}

/// `a * x + b * y` as GCC contracts llama.cpp's reduction of partials (the
/// first product fused with the sum, the second rounded on its own). One
/// of `x`, `y` is 1 whenever two chunks combine, so the other orders rarely
/// round differently: the references agree with this one, and have not
/// told it from the others.
#[inline(always)]
fn combine(a: f32, x: f32, b: f32, y: f32) -> f32 {
    a.mul_add(x, b * y)
}

fn kv_head(c: &ModelConfig, head: usize) -> usize {
    head / (c.n_head / c.n_head_kv)
}

/// The query in f16, as the cache stores keys: the pass meets them in f16.
fn query_f16(q: &[f32], q16: &mut Vec<u8>) {
    let to_f16 = ops::kernels(flexserve_gguf::GgmlType::F16).expect("F16 kernels are always present").quantize;
    q16.resize(q.len() * 2, 0);
    to_f16(q, q16);
}

/// The online softmax of the query `q16` (f16) against KV head `kvh`'s
/// cells `keys` (all visible): leaves the unnormalised weighted sum of
/// values in `o` (f16 precision, as f32) and returns the largest score and
/// the sum of weights (`M` and `S` of llama.cpp's pass).
fn one_chunk(
    c: &ModelConfig,
    kc: &[u16],
    vc: &[u16],
    kvh: usize,
    keys: Range<usize>,
    q16: &[u8],
    o: &mut [f32],
) -> (f32, f32) {
    let hd = c.head_dim;
    let kvd = c.kv_dim();
    let acc = flexserve_quant::f16_acc();
    let mut max = f32::NEG_INFINITY;
    let mut sum = 0f32;
    o.fill(0.0);
    for j in keys {
        let at = j * kvd + kvh * hd;
        let krow: &[u8] = bytemuck::cast_slice(&kc[at..at + hd]);
        let s = (acc.dot)(hd, krow, q16) * c.kq_scale;
        let (rescale, weight) = if s > max {
            // New maximum: rescale what was accumulated so far.
            let rescale = (max - s).exp();
            max = s;
            (acc.scale)(o, rescale);
            (rescale, 1.0)
        } else {
            (1.0, (s - max).exp())
        };
        (acc.mad)(o, bytemuck::cast_slice(&vc[at..at + hd]), weight);
        // One rounding, as llama.cpp's `S = S*ms + vs` compiles (fused).
        sum = sum.mul_add(rescale, weight);
    }
    (max, sum)
}

/// Attention of a batch of queries (rows of `q`, positions from `pos0` on)
/// over layer `layer` of the cache, by llama.cpp's tiled kernel, into `out`.
///
/// Keys and values are widened from the f16 cache once per layer into
/// `kv32`, one block per KV head and tile of 64 positions: keys transposed
/// (a row of 64 keys per dimension, zero past the last position), values
/// position-major. A task takes 16 queries, every head.
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_tiled(
    c: &ModelConfig,
    kv: &KvCache,
    layer: usize,
    pos0: usize,
    q: &[f32],
    out: &mut [f32],
    kv32: &mut (Buf<f32>, Buf<f32>),
) -> Result<(), EngineError> {
    attention_tiled_with(block_kernel(), c, kv, layer, pos0, q, out, kv32)
}

/// [`attention_tiled`] with the given block kernel (tests compare the tiers').
#[allow(clippy::too_many_arguments)]
pub(super) fn attention_tiled_with(
    kernel: BlockFn,
    c: &ModelConfig,
    kv: &KvCache,
    layer: usize,
    pos0: usize,
    q: &[f32],
    out: &mut [f32],
    kv32: &mut (Buf<f32>, Buf<f32>),
) -> Result<(), EngineError> {
    use half::slice::HalfFloatSliceExt;
    let (hd, qd, kvd) = (c.head_dim, c.q_dim(), c.kv_dim());
    let n_pos = pos0 + out.len() / qd;
    let n_tiles = n_pos.div_ceil(KV_TILE);
    let tile_len = hd * KV_TILE;
    let (kt, v32) = kv32;
    kt.resize(c.n_head_kv * n_tiles * tile_len, 0.0)?;
    v32.resize(c.n_head_kv * n_tiles * tile_len, 0.0)?;
    // Keys of KV head `h`, tile `t`: dimension `d` of its key `j` at `((h * n_tiles + t) * hd + d) * 64 + j`.
    let keys: &[f16] = bytemuck::cast_slice(&kv.k(layer)[..n_pos * kvd]);
    kt.par_chunks_mut(tile_len).enumerate().for_each(|(ht, block)| {
        let (h, t) = (ht / n_tiles, ht % n_tiles);
        block.fill(0.0);
        for (j, p) in (t * KV_TILE..n_pos.min((t + 1) * KV_TILE)).enumerate() {
            for (d, k) in keys[p * kvd + h * hd..][..hd].iter().enumerate() {
                block[d * KV_TILE + j] = k.to_f32();
            }
        }
    });
    // Values of KV head `h`: position `p` at `(h * n_tiles * 64 + p) * hd`.
    let values: &[f16] = bytemuck::cast_slice(&kv.v(layer)[..n_pos * kvd]);
    v32.par_chunks_mut(tile_len).enumerate().for_each(|(ht, block)| {
        let (h, t) = (ht / n_tiles, ht % n_tiles);
        for (j, row) in block.chunks_exact_mut(hd).enumerate() {
            match t * KV_TILE + j {
                p if p < n_pos => values[p * kvd + h * hd..][..hd].convert_to_f32_slice(row),
                _ => row.fill(0.0),
            }
        }
    });
    let tiles = Tiles { c, layer, pos0, q, kt: &kt[..], v32: &v32[..], n_tiles };
    out.par_chunks_mut(QUERY_BLOCK * qd)
        .enumerate()
        .for_each(|(b, o)| SCRATCH.with_borrow_mut(|scratch| kernel(&tiles, b * QUERY_BLOCK, o, scratch)));
    Ok(())
}

/// What every task of [`attention_tiled`] reads.
pub(super) struct Tiles<'a> {
    c: &'a ModelConfig,
    layer: usize,
    pos0: usize,
    q: &'a [f32],
    /// Keys, transposed per KV head and tile.
    kt: &'a [f32],
    /// Values, per KV head and position.
    v32: &'a [f32],
    n_tiles: usize,
}

/// One block of queries (rows `t0..`, as many as `o` holds), every head.
pub(super) type BlockFn = fn(tiles: &Tiles<'_>, t0: usize, o: &mut [f32], scratch: &mut Vec<f32>);

/// The block kernel for the active tier: the same arithmetic at every one
/// (fused multiply-adds in the same order), vectorised where the CPU can.
fn block_kernel() -> BlockFn {
    block_kernel_for(flexserve_quant::active_isa())
}

/// The block kernel for `isa` (portable where the CPU lacks it).
pub(super) fn block_kernel_for(isa: flexserve_quant::Isa) -> BlockFn {
    #[cfg(target_arch = "x86_64")]
    {
        use flexserve_quant::Isa;
        let isa = isa.usable();
        if isa >= Isa::Avx512 {
            return block_avx512;
        }
        if isa >= Isa::Avx2 {
            return block_avx2;
        }
    }
    let _ = isa;
    block::<4, 16>
}

#[cfg(target_arch = "x86_64")]
fn block_avx512(tiles: &Tiles<'_>, t0: usize, o: &mut [f32], scratch: &mut Vec<f32>) {
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn imp(tiles: &Tiles<'_>, t0: usize, o: &mut [f32], scratch: &mut Vec<f32>) {
        block::<4, 64>(tiles, t0, o, scratch)
    }
    // SAFETY: `block_kernel` hands this out only on the AVX-512 tier, whose
    // CPUs have AVX-512 F, AVX2 and FMA; the function needs nothing else.
    unsafe { imp(tiles, t0, o, scratch) }
}

#[cfg(target_arch = "x86_64")]
fn block_avx2(tiles: &Tiles<'_>, t0: usize, o: &mut [f32], scratch: &mut Vec<f32>) {
    #[target_feature(enable = "avx2,fma")]
    fn imp(tiles: &Tiles<'_>, t0: usize, o: &mut [f32], scratch: &mut Vec<f32>) {
        block::<4, 16>(tiles, t0, o, scratch)
    }
    // SAFETY: `block_kernel` hands this out only on the AVX2 tier or above,
    // whose CPUs have AVX2 and FMA; the function needs nothing else.
    unsafe { imp(tiles, t0, o, scratch) }
}

/// One block of queries through every tile of keys any of them sees, each
/// head in turn; the products by `MR` rows and `NR` columns at a time.
#[inline(always)]
fn block<const MR: usize, const NR: usize>(tiles: &Tiles<'_>, t0: usize, o: &mut [f32], scratch: &mut Vec<f32>) {
    let Tiles { c, layer, pos0, q, kt, v32, n_tiles } = *tiles;
    let (hd, qd) = (c.head_dim, c.q_dim());
    let group = c.n_head / c.n_head_kv;
    let tile_len = hd * KV_TILE;
    let n_q = o.len() / qd;
    scratch.resize(n_q * (KV_TILE + hd + 2), 0.0);
    let (scores, rest) = scratch.split_at_mut(n_q * KV_TILE);
    let (acc, rest) = rest.split_at_mut(n_q * hd);
    let (max, sum) = rest.split_at_mut(n_q);
    // The block's queries see positions `first..=last` at most: tiles
    // before `first` none of them sees.
    let (first, last) = (c.first_visible(layer, pos0 + t0), pos0 + t0 + n_q - 1);
    for h in 0..c.n_head {
        let kvh = h / group;
        let queries = &q[t0 * qd + h * hd..];
        max.fill(f32::NEG_INFINITY);
        sum.fill(0.0);
        acc.fill(0.0);
        for t in first / KV_TILE..=last / KV_TILE {
            let base = t * KV_TILE;
            scores.fill(0.0);
            let keys = &kt[(kvh * n_tiles + t) * tile_len..][..tile_len];
            gemm::<MR, NR>(scores, KV_TILE, queries, qd, keys, KV_TILE, n_q, hd, KV_TILE);
            for (r, row) in scores.chunks_exact_mut(KV_TILE).enumerate() {
                let pos = pos0 + t0 + r;
                let from = c.first_visible(layer, pos).clamp(base, base + KV_TILE) - base;
                let to = (pos + 1).clamp(base, base + KV_TILE) - base;
                let row: &mut [f32; KV_TILE] = row.try_into().expect("rows of a tile");
                match tile_softmax(row, from..to, c.kq_scale, max[r]) {
                    Some((new_max, rescale, tile_sum)) => {
                        if rescale != 1.0 {
                            acc[r * hd..(r + 1) * hd].iter_mut().for_each(|v| *v *= rescale);
                            sum[r] *= rescale;
                        }
                        max[r] = new_max;
                        // llama.cpp's `S += ggml_vec_soft_max_f32(...)`: a float plus a double.
                        sum[r] = (sum[r] as f64 + tile_sum) as f32;
                    }
                    // A tile the query does not see: no weight.
                    None => row.fill(0.0),
                }
            }
            // The values of the keys some query sees (the others weigh 0).
            let lo = first.clamp(base, base + KV_TILE) - base;
            let hi = (last + 1).clamp(base, base + KV_TILE) - base;
            let values = &v32[(kvh * n_tiles * KV_TILE + base + lo) * hd..][..(hi - lo) * hd];
            gemm::<MR, NR>(acc, hd, &scores[lo..], KV_TILE, values, hd, n_q, hi - lo, hd);
        }
        for r in 0..n_q {
            let inv = 1.0 / sum[r];
            for (v, a) in o[r * qd + h * hd..][..hd].iter_mut().zip(&acc[r * hd..(r + 1) * hd]) {
                *v = a * inv;
            }
        }
    }
}

/// One query's scores against a tile of keys, in place: scaled where the
/// query sees the key (`visible`), minus infinity elsewhere, then weighed
/// against the running maximum `max` raised to the tile's: `exp(s - max)`
/// by llama.cpp's vector exponential. Returns the new maximum, the factor
/// for what was accumulated before, and the sum of the weights (16 lanes
/// reduced as `_mm512_reduce_add_ps` does, those sums added in f64); `None`
/// where the query sees no key of the tile.
#[inline(always)]
fn tile_softmax(row: &mut [f32; KV_TILE], visible: Range<usize>, scale: f32, max: f32) -> Option<(f32, f32, f64)> {
    for (j, v) in row.iter_mut().enumerate() {
        *v = if visible.contains(&j) { *v * scale } else { f32::NEG_INFINITY };
    }
    let tile_max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if tile_max == f32::NEG_INFINITY {
        return None;
    }
    let new_max = max.max(tile_max);
    let rescale = if new_max > max { (max - new_max).exp() } else { 1.0 };
    let mut sum = 0f64;
    for lanes in row.chunks_exact_mut(LANES) {
        let lanes: &mut [f32; LANES] = lanes.try_into().expect("whole vectors");
        for v in lanes.iter_mut() {
            *v = expf_llama(*v - new_max);
        }
        sum += reduce16(lanes) as f64;
    }
    Some((new_max, rescale, sum))
}

/// Sums 16 lanes as `_mm512_reduce_add_ps` does: the upper 8 onto the lower
/// 8, the upper 4 onto the lower 4, lanes 0+2 and 1+3, then those two.
#[inline(always)]
fn reduce16(x: &[f32; LANES]) -> f32 {
    let t8: [f32; 8] = std::array::from_fn(|i| x[8 + i] + x[i]);
    let t4: [f32; 4] = std::array::from_fn(|i| t8[4 + i] + t8[i]);
    (t4[0] + t4[2]) + (t4[1] + t4[3])
}

/// llama.cpp's vector exponential of its AVX-512 build (`ggml_v_expf`), one
/// lane: `n = round(x log2 e)`, `b = x - n ln 2` in two fused steps, a
/// degree-5 polynomial `j` in `b` (fused steps in its order), and `j * 2^n`
/// rounded once (`vscalefps`); `|n| > 192` gives infinity or zero (so minus
/// infinity gives 0). Branch-free, so that a row vectorises.
#[inline(always)]
fn expf_llama(x: f32) -> f32 {
    const SHIFT: f32 = 12_582_912.0; // 0x1.8p23: added and subtracted, it rounds to an integer.
    let c = f32::from_bits;
    let z = x.mul_add(c(0x3fb8_aa3b), SHIFT);
    let n = z - SHIFT;
    let b = (-n).mul_add(c(0x35bf_be8e), (-n).mul_add(c(0x3f31_7200), x));
    let u = b * b;
    let j = c(0x3c07_2010)
        .mul_add(b, c(0x3d2b_9f17))
        .mul_add(u, c(0x3e2a_af33).mul_add(b, c(0x3eff_fedb)))
        .mul_add(u, c(0x3f7f_fff6).mul_add(b, 1.0));
    // `j * 2^n` is exact in f64; one rounding to f32 as `vscalefps` rounds.
    let k = n.clamp(-192.0, 192.0) as i32;
    let scaled = (j as f64 * f64::from_bits(((k + 1023) as u64) << 52)) as f32;
    if n.abs() > 192.0 {
        if n <= 0.0 {
            0.0
        } else {
            f32::INFINITY
        }
    } else {
        scaled
    }
}

/// `c[i][j] += a[i][k] * b[k][j]` over `k < depth` for `i < m`, `j < n`
/// (rows `ldc`, `lda`, `ldb` apart): each element one fused multiply-add per
/// `k` in order of `k`, as llama.cpp's `simd_gemm` computes it. `MR` rows
/// and `NR` columns at a time (kept in registers), the rest one by one.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn gemm<const MR: usize, const NR: usize>(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    m: usize,
    depth: usize,
    n: usize,
) {
    if depth == 0 {
        return;
    }
    let mut i = 0;
    while i < m {
        let rows = if m - i >= MR { MR } else { 1 };
        let (ci, ai) = (&mut c[i * ldc..], &a[i * lda..]);
        let mut j = 0;
        while j + NR <= n {
            match rows {
                1 => micro::<1, NR>(ci, ldc, ai, lda, b, ldb, depth, j),
                _ => micro::<MR, NR>(ci, ldc, ai, lda, b, ldb, depth, j),
            }
            j += NR;
        }
        for j in j..n {
            for r in 0..rows {
                micro::<1, 1>(&mut ci[r * ldc..], ldc, &ai[r * lda..], lda, b, ldb, depth, j);
            }
        }
        i += rows;
    }
}

/// Rows `0..R`, columns `j0..j0 + N` of [`gemm`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn micro<const R: usize, const N: usize>(
    c: &mut [f32],
    ldc: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    depth: usize,
    j0: usize,
) {
    let mut acc = [[0f32; N]; R];
    for (i, row) in acc.iter_mut().enumerate() {
        row.copy_from_slice(&c[i * ldc + j0..][..N]);
    }
    let a = &a[..(R - 1) * lda + depth];
    let b = &b[..(depth - 1) * ldb + j0 + N];
    for k in 0..depth {
        let bk: &[f32; N] = b[k * ldb + j0..][..N].try_into().expect("N columns");
        for (i, row) in acc.iter_mut().enumerate() {
            let x = a[i * lda + k];
            for (v, &y) in row.iter_mut().zip(bk) {
                *v = x.mul_add(y, *v);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        c[i * ldc + j0..][..N].copy_from_slice(row);
    }
}
