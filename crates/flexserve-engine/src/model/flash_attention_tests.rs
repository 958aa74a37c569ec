//! The attention paths of `flash_attention` on synthetic inputs: each
//! against a plain softmax attention in f64 (within a tolerance: they round
//! as llama.cpp does, which the reference tests check), with sliding
//! windows and sizes that are no multiple of a tile or a vector; and the
//! properties their exactness rests on (a row's result does not depend on
//! the rows beside it; every tier gives the same bits).

use half::f16;

use super::flash_attention::{
    attend_head, attention_tiled_with, block_kernel_for, decode_head, padded_kv_len, BlockFn,
};
use super::KvCache;
use crate::config::{Arch, FfnActivation, ModelConfig, RopeScaling};
use crate::memory::{heap_scratch, Buf};

/// Two layers: the first attends within `window` (when given), the second to every position.
fn config(n_head: usize, n_head_kv: usize, head_dim: usize, window: Option<usize>) -> ModelConfig {
    ModelConfig {
        arch: Arch::Llama,
        n_layer: 2,
        n_embd: n_head * head_dim,
        n_head,
        n_head_kv,
        head_dim,
        n_ff: 1,
        n_vocab: 1,
        n_ctx_train: 4096,
        rms_eps: 1e-6,
        rope_base: 10_000.0,
        rope_dim: head_dim,
        rope_scaling: RopeScaling::None,
        sliding_window: window,
        local_layers: vec![window.is_some(), false],
        rope_base_local: 10_000.0,
        embd_scale: 1.0,
        query_scale: None,
        kq_scale: 1.0 / (head_dim as f32).sqrt(),
        final_logit_softcap: None,
        ffn_activation: FfnActivation::Silu,
    }
}

/// Deterministic values in [-scale, scale), exact in f16.
fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 40) as f32 / (1u64 << 24) as f32;
            f16::from_f32((2.0 * u - 1.0) * scale).to_f32()
        })
        .collect()
}

/// A cache of `n_pos` positions in both layers.
fn cache(c: &ModelConfig, n_pos: usize, seed: u64) -> KvCache {
    let kvd = c.kv_dim();
    let mut kv = KvCache::new(c, n_pos);
    for layer in 0..c.n_layer {
        // Keys large enough that the softmax is far from uniform.
        let k = values(n_pos * kvd, seed + 10 * layer as u64, 3.0);
        let v = values(n_pos * kvd, seed + 10 * layer as u64 + 1, 1.0);
        for p in 0..n_pos {
            kv.store(layer, p, &k[p * kvd..(p + 1) * kvd], &v[p * kvd..(p + 1) * kvd]);
        }
    }
    kv
}

/// Plain softmax attention of one query head at `pos`, in f64.
fn reference(c: &ModelConfig, kv: &KvCache, layer: usize, pos: usize, head: usize, q: &[f32]) -> Vec<f64> {
    let (hd, kvd) = (c.head_dim, c.kv_dim());
    let kvh = head / (c.n_head / c.n_head_kv);
    let at = |cache: &[u16], p: usize, d: usize| f16::from_bits(cache[p * kvd + kvh * hd + d]).to_f64();
    let seen: Vec<usize> = (c.first_visible(layer, pos)..=pos).collect();
    let scores: Vec<f64> = seen
        .iter()
        .map(|&p| (0..hd).map(|d| q[d] as f64 * at(kv.k(layer), p, d)).sum::<f64>() * c.kq_scale as f64)
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
    let total: f64 = weights.iter().sum();
    (0..hd).map(|d| seen.iter().zip(&weights).map(|(&p, w)| w * at(kv.v(layer), p, d)).sum::<f64>() / total).collect()
}

fn max_error(got: &[f32], want: &[f64]) -> f64 {
    got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max)
}

/// The tiled attention of queries at `pos0..pos0 + n` with `kernel`.
fn tiled(kernel: BlockFn, c: &ModelConfig, kv: &KvCache, layer: usize, pos0: usize, q: &[f32]) -> Vec<f32> {
    let mut out = vec![0f32; q.len()];
    let mut kv32 = (Buf::new(heap_scratch()), Buf::new(heap_scratch()));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    pool.install(|| attention_tiled_with(kernel, c, kv, layer, pos0, q, &mut out, &mut kv32)).unwrap();
    out
}

/// Shapes: heads, KV heads, head size, window; odd sizes on purpose.
const SHAPES: [(usize, usize, usize, Option<usize>); 4] =
    [(4, 2, 64, None), (6, 2, 20, Some(50)), (3, 3, 37, Some(70)), (2, 1, 128, Some(300))];

#[test]
fn the_tiled_attention_is_softmax_attention() {
    let portable = block_kernel_for(flexserve_quant::Isa::Portable);
    for (i, &(n_head, n_head_kv, hd, window)) in SHAPES.iter().enumerate() {
        let c = config(n_head, n_head_kv, hd, window);
        for (pos0, n) in [(0, 64), (0, 131), (37, 100), (250, 70)] {
            let kv = cache(&c, pos0 + n, i as u64);
            let q = values(n * c.q_dim(), 99 + i as u64, 1.0);
            for layer in 0..2 {
                let out = tiled(portable, &c, &kv, layer, pos0, &q);
                for t in 0..n {
                    for h in 0..n_head {
                        let at = t * c.q_dim() + h * hd;
                        let want = reference(&c, &kv, layer, pos0 + t, h, &q[at..at + hd]);
                        let err = max_error(&out[at..at + hd], &want);
                        assert!(err < 2e-5, "shape {i} pos0 {pos0} n {n} layer {layer} row {t} head {h}: error {err}");
                    }
                }
            }
        }
    }
}

#[test]
fn every_tier_tiles_to_the_same_bits() {
    for (i, &(n_head, n_head_kv, hd, window)) in SHAPES.iter().enumerate() {
        let c = config(n_head, n_head_kv, hd, window);
        let (pos0, n) = (90, 77);
        let kv = cache(&c, pos0 + n, i as u64);
        let q = values(n * c.q_dim(), 7 + i as u64, 1.0);
        for layer in 0..2 {
            let want = tiled(block_kernel_for(flexserve_quant::Isa::Portable), &c, &kv, layer, pos0, &q);
            for isa in flexserve_quant::usable_isas() {
                let got = tiled(block_kernel_for(isa), &c, &kv, layer, pos0, &q);
                assert!(got == want, "shape {i} layer {layer}: {} differs from portable", isa.name());
            }
        }
    }
}

/// llama.cpp tiles 64 queries at a time from the batch's first; the engine
/// groups its own way. That is exact only if a query's result does not
/// depend on the queries beside it: the same query in two different
/// batches must give the same bits.
#[test]
fn a_tiled_row_does_not_depend_on_its_batch() {
    let kernel = block_kernel_for(flexserve_quant::active_isa());
    let c = config(6, 2, 20, Some(50));
    let kv = cache(&c, 200, 3);
    let qd = c.q_dim();
    let q = values(200 * qd, 5, 1.0);
    for layer in 0..2 {
        let whole = tiled(kernel, &c, &kv, layer, 0, &q);
        // The last 64 queries alone (positions 136..200), and 100 from position 70.
        let tail = tiled(kernel, &c, &kv, layer, 136, &q[136 * qd..]);
        assert!(tail == whole[136 * qd..], "layer {layer}: the last 64 queries alone");
        let middle = tiled(kernel, &c, &kv, layer, 70, &q[70 * qd..170 * qd]);
        assert!(middle == whole[70 * qd..170 * qd], "layer {layer}: queries 70..170 alone");
    }
}

#[test]
fn llama_cpp_pads_the_kv_length_to_256() {
    assert_eq!([1, 255, 256, 257, 512, 513].map(padded_kv_len), [256, 256, 256, 512, 512, 768]);
}

/// One query (decoding) at positions on both sides of llama.cpp's split
/// (a padded KV length of 512: 257 cells used), with several thread counts.
#[test]
fn decoding_is_softmax_attention_split_or_not() {
    for (i, &(n_head, n_head_kv, hd, window)) in SHAPES.iter().enumerate() {
        let c = config(n_head, n_head_kv, hd, window);
        let kv = cache(&c, 700, 20 + i as u64);
        for pos in [100, 255, 256, 300, 511, 699] {
            let q = values(c.q_dim(), 40 + pos as u64, 1.0);
            for layer in 0..2 {
                let seen = c.first_visible(layer, pos)..=pos;
                for h in 0..n_head {
                    let qh = &q[h * hd..(h + 1) * hd];
                    let want = reference(&c, &kv, layer, pos, h, qh);
                    let mut whole = vec![0f32; hd];
                    attend_head(&c, kv.k(layer), kv.v(layer), h, seen.clone(), qh, &mut whole);
                    for threads in [1, 2, 3, 8] {
                        let mut o = vec![0f32; hd];
                        decode_head(&c, kv.k(layer), kv.v(layer), h, seen.clone(), qh, &mut o, threads);
                        // The weighted sum is kept in f16: its rounding, not the method, bounds the error.
                        let err = max_error(&o, &want);
                        assert!(
                            err < 4e-3,
                            "shape {i} pos {pos} layer {layer} head {h} threads {threads}: error {err}"
                        );
                        if pos < 256 || threads == 1 {
                            // Below the split, and with one chunk, it is the one pass.
                            assert_eq!(o, whole, "shape {i} pos {pos} layer {layer} head {h} threads {threads}");
                        }
                    }
                }
            }
        }
    }
}
