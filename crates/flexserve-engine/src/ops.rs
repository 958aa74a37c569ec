//! Layer operations on f32 activations: norms, rotary embedding, activation
//! functions and the quantized matrix multiplication.

use flexserve_gguf::GgmlType;
use flexserve_quant::{KernelSet, Kernels, QuantizeFn, Repacked};
use rayon::prelude::*;

use std::sync::Arc;

use crate::memory::{Buf, ScratchSource};
use crate::weights::{Layout, Tensor};
use crate::EngineError;

/// `out = x / rms(x) * w` per row of `w.len()` values.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        // Squares rounded to f32 and summed in f64, in order, as llama.cpp's
        // norm does: long rows would lose digits in an f32 sum.
        let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((ss / n as f64) as f32 + eps).sqrt();
        for ((o, &xv), &wv) in or.iter_mut().zip(xr).zip(w) {
            *o = (xv * scale) * wv;
        }
    }
}

/// `out = (x - mean(x)) / sqrt(var(x) + eps) * w + b` per row of `w.len()` values.
pub fn layer_norm(x: &[f32], w: &[f32], b: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        // Moments in f64: long rows would lose digits in f32.
        let mean = xr.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = xr.iter().map(|&v| (v as f64 - mean) * (v as f64 - mean)).sum::<f64>() / n as f64;
        let scale = 1.0 / ((var as f32) + eps).sqrt();
        let mean = mean as f32;
        for (((o, &xv), &wv), &bv) in or.iter_mut().zip(xr).zip(w).zip(b) {
            *o = (xv - mean) * scale * wv + bv;
        }
    }
}

/// `x += y`, element by element.
pub fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// Rotary position embedding of one head vector at position `pos`.
///
/// `cos_sin` holds the precomputed (cos, sin) per rotated pair for this
/// position. `neox` pairs element i with i + rope_dim/2 (Qwen2); otherwise
/// adjacent elements 2i, 2i+1 are paired (Llama as stored in GGUF).
///
/// Each output is one product rounded and one fused multiply-add, as
/// llama.cpp's compiled rotation has them (`x0 c - x1 s` and `x0 s + x1 c`,
/// the first product of each fused; checked against its traced outputs):
/// two separate products differ from it in the last bit now and then, and
/// that bit can flip the f16 rounding of a cached key.
#[inline]
pub fn rope_head(head: &mut [f32], cos_sin: &[(f32, f32)], neox: bool) {
    let half = cos_sin.len();
    for (i, &(c, s)) in cos_sin.iter().enumerate() {
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let x0 = head[a];
        let x1 = head[b];
        head[a] = x0.mul_add(c, -(x1 * s));
        head[b] = x0.mul_add(s, x1 * c);
    }
}

/// Rotary angles for one position: theta_i = pos * scale * base^(-2i/dim) / factor_i.
pub fn rope_angles(
    pos: usize,
    dim: usize,
    base: f32,
    pos_scale: f32,
    freq_factors: Option<&[f32]>,
    out: &mut Vec<(f32, f32)>,
) {
    out.clear();
    let theta_scale = base.powf(-2.0 / dim as f32);
    let mut theta = pos as f32 * pos_scale;
    for i in 0..dim / 2 {
        let ff = freq_factors.map_or(1.0, |f| f[i]);
        let t = theta / ff;
        out.push((t.cos(), t.sin()));
        theta *= theta_scale;
    }
}

/// [`rms_norm`] in place, with the same arithmetic (a test holds them to the
/// same bits): per row of `w.len()` values, as for the per-head norms of
/// queries and keys, and the norms of a block's outputs (gemma3).
pub fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for xr in x.chunks_exact_mut(n) {
        let ss: f64 = xr.iter().map(|&v| (v * v) as f64).sum();
        let scale = 1.0 / ((ss / n as f64) as f32 + eps).sqrt();
        for (xv, &wv) in xr.iter_mut().zip(w) {
            *xv = (*xv * scale) * wv;
        }
    }
}

/// GELU with the tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) x (1 + 0.044715 x^2)))`.
pub fn gelu(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    const COEF_A: f32 = 0.044715;
    // `1 + a x^2` as one multiply-add, as llama.cpp's build fuses it.
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * x * (COEF_A * x).mul_add(x, 1.0)).tanh())
}

/// `gate[i] = gelu(gate[i]) * up[i]`, as llama.cpp's CPU backend computes the
/// GELU-gated product: inputs up to -10 give 0, inputs from 10 on themselves,
/// and the rest are rounded to f16 and looked up in a table holding, for
/// every f16 value, its [`gelu`] rounded to f16.
pub fn gelu_mul(gate: &mut [f32], up: &[f32]) {
    let table = gelu_f16_table();
    for (g, &u) in gate.iter_mut().zip(up) {
        let x = *g;
        *g = if x <= -10.0 {
            0.0
        } else if x >= 10.0 {
            x * u
        } else {
            half::f16::from_bits(table[half::f16::from_f32(x).to_bits() as usize]).to_f32() * u
        };
    }
}

/// [`gelu`] of every f16 value (by its bits), rounded to f16; built once.
fn gelu_f16_table() -> &'static [u16] {
    static TABLE: std::sync::OnceLock<Vec<u16>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        (0..=u16::MAX).map(|bits| half::f16::from_f32(gelu(half::f16::from_bits(bits).to_f32())).to_bits()).collect()
    })
}

/// Soft-caps logits in place: `cap * tanh(x / cap)` (as `x * (1 / cap)`, as llama.cpp scales).
pub fn softcap(x: &mut [f32], cap: f32) {
    let inv = 1.0 / cap;
    for v in x {
        *v = (*v * inv).tanh() * cap;
    }
}

/// Activations quantized to one weight type's dot-product format.
pub struct QuantizedActs {
    pub ty: GgmlType,
    pub row_bytes: usize,
    pub n_rows: usize,
    pub data: Buf<u8>,
    /// The rows are one token each of different sessions (a batched decode
    /// step), not one sequence's consecutive tokens: every row then takes
    /// the arithmetic it takes alone, where llama.cpp's rearranged K-quant
    /// products would take a sequence's tokens four at a time with another
    /// (`flexserve_quant::PackedKernels::matmul_part`).
    pub independent_rows: bool,
}

impl QuantizedActs {
    /// Empty, taking memory from `source` as it grows.
    pub fn new(source: Arc<dyn ScratchSource>) -> Self {
        Self { ty: GgmlType::F32, row_bytes: 0, n_rows: 0, data: Buf::new(source), independent_rows: false }
    }

    /// Quantizes `n_rows` rows of `cols` values from `x` to `ty`.
    pub fn quantize(&mut self, x: &[f32], cols: usize, ty: GgmlType) -> Result<(), EngineError> {
        self.quantize_with(x, cols, ty, kernels(ty)?.quantize)
    }

    /// [`QuantizedActs::quantize`] with `ty`'s quantizer `quant` at hand (a
    /// weight's, resolved when it loaded).
    pub fn quantize_with(
        &mut self,
        x: &[f32],
        cols: usize,
        ty: GgmlType,
        quant: QuantizeFn,
    ) -> Result<(), EngineError> {
        let row_bytes = ty
            .row_size(cols as u64)
            .ok_or_else(|| EngineError::Weights(format!("{cols} columns is not a whole number of {ty} blocks")))?
            as usize;
        let n_rows = x.len() / cols;
        self.data.resize(n_rows * row_bytes, 0)?;
        if n_rows > 1 {
            self.data.par_chunks_mut(row_bytes).zip(x.par_chunks(cols)).for_each(|(d, s)| quant(s, d));
        } else {
            for (d, s) in self.data.chunks_exact_mut(row_bytes).zip(x.chunks_exact(cols)) {
                quant(s, d);
            }
        }
        self.ty = ty;
        self.row_bytes = row_bytes;
        self.n_rows = n_rows;
        Ok(())
    }

    #[inline]
    pub fn row(&self, i: usize) -> &[u8] {
        &self.data[i * self.row_bytes..(i + 1) * self.row_bytes]
    }
}

impl Default for QuantizedActs {
    /// On the heap.
    fn default() -> Self {
        Self::new(crate::memory::heap_scratch())
    }
}

pub fn kernels(ty: GgmlType) -> Result<Kernels, EngineError> {
    flexserve_quant::kernels(ty).map_err(|e| EngineError::Weights(e.to_string()))
}

/// The kernels of a weight tensor (resolved when it loaded) with its dot.
fn weight_kernels(w: &Tensor) -> Result<(&KernelSet, flexserve_quant::DotFn), EngineError> {
    let k = w.kernels()?;
    let dot = k
        .row
        .dot
        .ok_or_else(|| EngineError::Weights(format!("tensor {}: type {} cannot be used as a weight", w.name, w.ty)))?;
    Ok((k, dot))
}

/// The dot product kernel of a weight tensor, with its activation format.
pub fn dot_kernel(w: &Tensor) -> Result<(flexserve_quant::DotFn, GgmlType), EngineError> {
    let (k, dot) = weight_kernels(w)?;
    Ok((dot, k.row.vec_dot_type))
}

/// Quantizes `x` (rows of `cols`) into the activation format of `w`.
pub fn quantize_for(acts: &mut QuantizedActs, x: &[f32], cols: usize, w: &Tensor) -> Result<(), EngineError> {
    let (k, _) = weight_kernels(w)?;
    acts.quantize_with(x, cols, k.row.vec_dot_type, k.quantize_activations)
}

/// For a weight that reads the same `x` as the previous one (k/v after q, up
/// after gate): quantizes again only if its activation format differs.
pub fn reuse_for(acts: &mut QuantizedActs, x: &[f32], cols: usize, w: &Tensor) -> Result<(), EngineError> {
    let (k, _) = weight_kernels(w)?;
    if acts.ty != k.row.vec_dot_type {
        acts.quantize_with(x, cols, k.row.vec_dot_type, k.quantize_activations)?;
    }
    Ok(())
}

/// `out[t][o] = dot(w.row(o), acts.row(t))` for all tokens t and output rows o.
/// `out` is token-major: `acts.n_rows` rows of `w.rows` values. For
/// multi-token batches, `scratch` holds the tasks' parts (each task a range
/// of weight rows, token-major) before they are copied into place. The
/// kernels are the ones `w` resolved when it loaded.
pub fn matmul(w: &Tensor, acts: &QuantizedActs, out: &mut [f32], scratch: &mut Buf<f32>) -> Result<(), EngineError> {
    let (k, dot) = weight_kernels(w)?;
    if let Layout::Packed(packing) = w.layout {
        return matmul_packed(w, packing, k, acts, out);
    }
    debug_assert_eq!(k.row.vec_dot_type, acts.ty);
    let n_tok = acts.n_rows;
    let n = w.cols;
    let rows = w.rows;
    debug_assert_eq!(out.len(), n_tok * rows);
    // Enough tasks to balance the threads, few enough to keep overhead low.
    let tasks = rayon::current_num_threads() * 8;
    let per_task = rows.div_ceil(tasks).max(16);
    if n_tok == 1 {
        let a = acts.row(0);
        // GEMV kernels walk several rows at once; tasks cover whole groups of rows.
        let per_task = per_task.next_multiple_of(8);
        let gemv = k.gemv;
        out.par_chunks_mut(per_task).enumerate().for_each(|(c, chunk)| {
            let base = c * per_task;
            match gemv {
                Some(gemv) => gemv(n, &w.bytes()[base * w.row_bytes..], w.row_bytes, chunk.len(), a, chunk),
                None => {
                    for (i, o) in chunk.iter_mut().enumerate() {
                        *o = dot(n, w.row(base + i), a);
                    }
                }
            }
        });
        return Ok(());
    }
    // Tile kernels reuse each activation block across several weight rows;
    // tasks cover whole micro-tiles (multiples of 4 rows).
    let per_task = per_task.next_multiple_of(4);
    if let Some(shared) = k.shared_tile {
        // Activations laid out once, beside the tasks' parts, for all tasks.
        let layout_len = (shared.layout_len)(n, n_tok);
        scratch.resize(rows * n_tok + layout_len, 0.0)?;
        let (parts, layout) = scratch.split_at_mut(rows * n_tok);
        (shared.lay_out)(n, &acts.data, acts.row_bytes, n_tok, layout);
        let (layout, w_bytes) = (&*layout, w.bytes());
        parts.par_chunks_mut(per_task * n_tok).enumerate().for_each(|(c, part)| {
            let base = c * per_task;
            let nrows = part.len() / n_tok;
            (shared.tile)(n, &w_bytes[base * w.row_bytes..], w.row_bytes, nrows, layout, n_tok, part, nrows);
        });
        place_parts(out, parts, rows, per_task);
        return Ok(());
    }
    scratch.resize(rows * n_tok, 0.0)?;
    // A sequence's tokens take llama.cpp's kernel for their count; rows of
    // different sessions each take what they take alone.
    let tile = if acts.independent_rows { k.tile } else { k.sequence_tile(n_tok) };
    let w_bytes = w.bytes();
    scratch.par_chunks_mut(per_task * n_tok).enumerate().for_each(|(c, part)| {
        let base = c * per_task;
        let nrows = part.len() / n_tok;
        match tile {
            Some(tile) => tile(
                n,
                &w_bytes[base * w.row_bytes..],
                w.row_bytes,
                nrows,
                &acts.data,
                acts.row_bytes,
                n_tok,
                part,
                nrows,
            ),
            None => {
                for (t, results) in part.chunks_exact_mut(nrows).enumerate() {
                    for (i, o) in results.iter_mut().enumerate() {
                        *o = dot(n, w.row(base + i), acts.row(t));
                    }
                }
            }
        }
    });
    place_parts(out, scratch, rows, per_task);
    Ok(())
}

/// Copies the tasks' parts of a multi-token matmul into the token-major
/// `out` (`rows` results per token): each task wrote its `per_task` rows (or
/// fewer, for the last) token-major into its own part of `scratch`.
fn place_parts(out: &mut [f32], scratch: &[f32], rows: usize, per_task: usize) {
    let n_tok = out.len() / rows;
    out.par_chunks_mut(rows).enumerate().for_each(|(t, orow)| {
        for (c, dst) in orow.chunks_mut(per_task).enumerate() {
            let part = c * per_task * n_tok;
            dst.copy_from_slice(&scratch[part + t * dst.len()..][..dst.len()]);
        }
    });
}

/// [`matmul`] for weights rearranged in groups of eight rows. Tasks cover
/// whole groups.
fn matmul_packed(
    w: &Tensor,
    packing: Repacked,
    k: &KernelSet,
    acts: &QuantizedActs,
    out: &mut [f32],
) -> Result<(), EngineError> {
    let packed = k.packed.filter(|p| p.layout() == packing).ok_or_else(|| {
        EngineError::Weights(format!("tensor {}: no {packing:?} kernels for its type {}", w.name, w.ty))
    })?;
    if acts.ty != packing.activation_type() {
        return Err(EngineError::Weights(format!(
            "tensor {}: rearranged {} weights need {} activations, got {}",
            w.name,
            w.ty,
            packing.activation_type(),
            acts.ty
        )));
    }
    let kernel = packed.matmul();
    let (n, rows, n_tok) = (w.cols, w.rows, acts.n_rows);
    debug_assert_eq!(out.len(), n_tok * rows);
    let tasks = rayon::current_num_threads() * 8;
    let per_task = rows.div_ceil(tasks).max(16).next_multiple_of(flexserve_quant::REPACK_ROWS);
    let w_bytes = w.bytes();
    if n_tok == 1 {
        out.par_chunks_mut(per_task).enumerate().for_each(|(c, chunk)| {
            let w_task = &w_bytes[c * per_task * w.row_bytes..];
            kernel(n, w_task, chunk.len(), &acts.data, acts.row_bytes, 1, chunk, chunk.len());
        });
        return Ok(());
    }
    // Each task writes its rows' results straight into their columns of
    // every token's output row: no scratch, and no copy with a join after.
    let parts = flexserve_quant::ColumnParts::new(out, n_tok, rows, rows, per_task);
    parts.par_bridge().for_each(|part| {
        let w_task = &w_bytes[part.first() * w.row_bytes..];
        packed.matmul_part(n, w_task, &acts.data, acts.row_bytes, n_tok, !acts.independent_rows, part);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    // The table comes from the C library's `tanhf`, as llama.cpp's does, and
    // aarch64's glibc rounds some entries differently from x86-64's: the
    // figure below is llama.cpp's x86-64 table; an aarch64 one was not at hand.
    #[cfg_attr(not(target_arch = "x86_64"), ignore = "the reference table is llama.cpp's x86-64 one")]
    fn gelu_table_is_llama_cpp_s() {
        // FNV-1a (64-bit) of the table's entries for every f16 value but the
        // NaNs, little-endian, as read from llama.cpp's `ggml_table_gelu_f16`
        // (libggml-cpu of llama-cpp-python 0.3.36): with `1 + a x^2` not
        // fused into one multiply-add, one entry (x = -1.999) would differ.
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for (bits, &v) in gelu_f16_table().iter().enumerate() {
            if half::f16::from_bits(bits as u16).is_nan() {
                continue;
            }
            for b in v.to_le_bytes() {
                hash = (hash ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        assert_eq!(hash, 0x097b_67b4_465d_8b6c);
    }

    #[test]
    fn gelu_mul_follows_the_table_and_its_bounds() {
        let up = [3.0f32; 8];
        let mut g = [-20.0f32, -10.0, -1.0, 0.0, 0.5, 2.0, 10.0, 12.5];
        gelu_mul(&mut g, &up);
        assert_eq!(&g[..2], &[0.0, 0.0]);
        assert_eq!(&g[6..], &[30.0, 37.5]);
        assert_eq!(g[3], 0.0);
        // Within the bounds: the f16-rounded GELU (to f16 precision) of the f16-rounded input.
        for (x, got) in [(-1.0f32, g[2]), (0.5, g[4]), (2.0, g[5])] {
            let exact = 0.5
                * x as f64
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x as f64 + 0.044715 * (x as f64).powi(3))).tanh());
            assert!(
                (got as f64 - 3.0 * exact).abs() <= 3.0 * exact.abs() * 1e-3,
                "gelu({x}) * 3 = {got}, want {}",
                3.0 * exact
            );
        }
        // GELU's shape: about x for large x, small and negative just below 0.
        assert!((gelu(5.0) - 5.0).abs() < 1e-4 && gelu(-0.5) < 0.0 && gelu(-0.5) > -0.2);
    }

    #[test]
    fn rms_norm_in_place_is_rms_norm() {
        let w: Vec<f32> = (0..64).map(|i| 0.5 + (i as f32 * 0.37).sin()).collect();
        let x: Vec<f32> = (0..256).map(|i| (i as f32 * 1.7).cos() * (1.0 + i as f32 / 50.0)).collect();
        let mut out = vec![0f32; x.len()];
        rms_norm(&x, &w, 1e-6, &mut out);
        let mut inplace = x.clone();
        rms_norm_in_place(&mut inplace, &w, 1e-6);
        assert_eq!(out, inplace);
    }

    #[test]
    fn softcap_bounds_logits() {
        let mut x = [0.0f32, 1.0, 100.0, -1000.0];
        softcap(&mut x, 30.0);
        assert_eq!(x[0], 0.0);
        assert!((x[1] - 30.0 * (1.0f32 / 30.0).tanh()).abs() < 1e-6);
        assert!(x[2] < 30.0 && x[2] > 29.0 && x[3] >= -30.0);
    }

    #[test]
    fn rms_norm_unit_rows() {
        let x = [3.0f32, 4.0, 0.0, 0.0];
        let w = [1.0f32, 2.0, 1.0, 1.0];
        let mut out = [0f32; 4];
        rms_norm(&x, &w, 0.0, &mut out);
        // rms = sqrt(25/4) = 2.5
        assert!((out[0] - 1.2).abs() < 1e-6 && (out[1] - 3.2).abs() < 1e-6);
    }

    #[test]
    fn rope_preserves_norm_and_position_zero_is_identity() {
        let mut angles = Vec::new();
        rope_angles(0, 8, 10000.0, 1.0, None, &mut angles);
        let mut h = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0];
        let orig = h;
        rope_head(&mut h, &angles, false);
        assert_eq!(h, orig);
        rope_angles(17, 8, 10000.0, 1.0, None, &mut angles);
        for neox in [false, true] {
            let mut h = orig;
            rope_head(&mut h, &angles, neox);
            let n0: f32 = orig.iter().map(|v| v * v).sum();
            let n1: f32 = h.iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-3);
            assert_ne!(h, orig);
        }
        // Adjacent layout: the first pair rotates by pos * 1 radian.
        let mut h = [1.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        rope_head(&mut h, &angles, false);
        assert!((h[0] - 17f32.cos()).abs() < 1e-5 && (h[1] - 17f32.sin()).abs() < 1e-5);
    }
}
