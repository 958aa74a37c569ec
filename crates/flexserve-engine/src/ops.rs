//! Layer operations on f32 activations: norms, rotary embedding, activation
//! functions and the quantized matrix multiplication.

use flexserve_gguf::GgmlType;
use flexserve_quant::{Kernels, Repacked};
use rayon::prelude::*;

use std::sync::Arc;

use crate::memory::{Buf, ScratchSource};
use crate::weights::{Layout, Tensor};
use crate::EngineError;

/// `out = x / rms(x) * w` per row of `w.len()` values.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (xr, or) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        // Sum of squares in f64: long rows would lose digits in f32.
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
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
#[inline]
pub fn rope_head(head: &mut [f32], cos_sin: &[(f32, f32)], neox: bool) {
    let half = cos_sin.len();
    for (i, &(c, s)) in cos_sin.iter().enumerate() {
        let (a, b) = if neox { (i, i + half) } else { (2 * i, 2 * i + 1) };
        let x0 = head[a];
        let x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
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

/// Activations quantized to one weight type's dot-product format.
pub struct QuantizedActs {
    pub ty: GgmlType,
    pub row_bytes: usize,
    pub n_rows: usize,
    pub data: Buf<u8>,
}

impl QuantizedActs {
    /// Empty, taking memory from `source` as it grows.
    pub fn new(source: Arc<dyn ScratchSource>) -> Self {
        Self { ty: GgmlType::F32, row_bytes: 0, n_rows: 0, data: Buf::new(source) }
    }

    /// Quantizes `n_rows` rows of `cols` values from `x` to `ty`.
    pub fn quantize(&mut self, x: &[f32], cols: usize, ty: GgmlType) -> Result<(), EngineError> {
        let k = kernels(ty)?;
        let row_bytes = ty
            .row_size(cols as u64)
            .ok_or_else(|| EngineError::Weights(format!("{cols} columns is not a whole number of {ty} blocks")))?
            as usize;
        let n_rows = x.len() / cols;
        self.data.resize(n_rows * row_bytes, 0)?;
        let quant = k.quantize;
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

/// The dot product kernel of a weight tensor, with its activation format.
pub fn dot_kernel(w: &Tensor) -> Result<(flexserve_quant::DotFn, GgmlType), EngineError> {
    let k = kernels(w.ty)?;
    let dot = k
        .dot
        .ok_or_else(|| EngineError::Weights(format!("tensor {}: type {} cannot be used as a weight", w.name, w.ty)))?;
    Ok((dot, k.vec_dot_type))
}

/// Quantizes `x` (rows of `cols`) into the activation format of `w`.
pub fn quantize_for(acts: &mut QuantizedActs, x: &[f32], cols: usize, w: &Tensor) -> Result<(), EngineError> {
    let (_, ty) = dot_kernel(w)?;
    acts.quantize(x, cols, ty)
}

/// For a weight that reads the same `x` as the previous one (k/v after q, up
/// after gate): quantizes again only if its activation format differs.
pub fn reuse_for(acts: &mut QuantizedActs, x: &[f32], cols: usize, w: &Tensor) -> Result<(), EngineError> {
    let (_, ty) = dot_kernel(w)?;
    if acts.ty != ty {
        acts.quantize(x, cols, ty)?;
    }
    Ok(())
}

/// `out[t][o] = dot(w.row(o), acts.row(t))` for all tokens t and output rows o.
/// `out` is token-major: `acts.n_rows` rows of `w.rows` values. For
/// multi-token batches, `scratch` holds the tasks' parts (each task a range
/// of weight rows, token-major) before they are copied into place.
pub fn matmul(w: &Tensor, acts: &QuantizedActs, out: &mut [f32], scratch: &mut Buf<f32>) -> Result<(), EngineError> {
    if let Layout::Packed(packing) = w.layout {
        return matmul_packed(w, packing, acts, out);
    }
    let (dot, act_ty) = dot_kernel(w)?;
    debug_assert_eq!(act_ty, acts.ty);
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
        let gemv = flexserve_quant::gemv_kernel(w.ty);
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
    scratch.resize(rows * n_tok, 0.0)?;
    // Tile kernels reuse each activation block across several weight rows;
    // tasks cover whole micro-tiles (multiples of 4 rows).
    let per_task = per_task.next_multiple_of(4);
    let tile = flexserve_quant::tile_kernel(w.ty);
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
fn matmul_packed(w: &Tensor, packing: Repacked, acts: &QuantizedActs, out: &mut [f32]) -> Result<(), EngineError> {
    if acts.ty != packing.activation_type() {
        return Err(EngineError::Weights(format!(
            "tensor {}: rearranged {} weights need {} activations, got {}",
            w.name,
            w.ty,
            packing.activation_type(),
            acts.ty
        )));
    }
    let kernel = packing.kernel();
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
        packing.matmul_part(n, w_task, &acts.data, acts.row_bytes, n_tok, part);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
