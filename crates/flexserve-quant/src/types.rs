//! What every kernel family implements: the signatures of the row kernels
//! (gathered per type in [`Kernels`]) and of the matrix products (tile,
//! two-step tile, GEMV), and the crate's error.

use flexserve_gguf::GgmlType;

/// `dst[i] = dequant(src)[i]`; `src.len()` must be the row size of `dst.len()` elements.
pub type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);
/// Quantizes `src` into `dst`, which must be the row size of `src.len()` elements.
pub type QuantizeFn = fn(src: &[f32], dst: &mut [u8]);
/// Dot product of `n` elements: weight row `w` (the weight type) and activation
/// row `a` (the weight type's `vec_dot_type`).
pub type DotFn = fn(n: usize, w: &[u8], a: &[u8]) -> f32;

/// The kernels for one tensor type.
#[derive(Clone, Copy)]
pub struct Kernels {
    pub ty: GgmlType,
    /// The type activations are quantized to before `dot`.
    pub vec_dot_type: GgmlType,
    pub dequantize: DequantizeFn,
    pub quantize: QuantizeFn,
    /// `None` for types that only serve as activation formats (Q8_1, Q8_K).
    pub dot: Option<DotFn>,
}

#[derive(Debug, thiserror::Error)]
pub enum QuantError {
    #[error("tensor type {0} is not supported by the kernels")]
    Unsupported(GgmlType),
    #[error("row of {n} elements is not a multiple of the {ty} block size {block}")]
    NotBlockMultiple { ty: GgmlType, n: usize, block: usize },
    #[error("{ty} matrix of {rows} rows cannot be interleaved in groups of {group}")]
    RowsNotGroupMultiple { ty: GgmlType, rows: usize, group: usize },
    #[error("{ty} row of {n} elements needs {expected} bytes, got {got}")]
    BadLength { ty: GgmlType, n: usize, expected: usize, got: usize },
}

/// Computes `out[t * out_stride + r] = dot(w_rows[r], a_rows[t])` for
/// `r < rows`, `t < toks`, where weight row `r` starts at `w[r * w_row_bytes]`
/// and activation row `t` at `a[t * a_row_bytes]`; each row holds `n`
/// elements (weights in the kernel's type, activations in its
/// `vec_dot_type`). The output is token-major, as the layers that follow
/// read it: one row of `rows` results per token.
///
/// Panics when `n` is not a whole number of blocks or a slice is too short for
/// the shape it is given (a caller bug, as with the plain `dot`).
pub type TileFn = fn(
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    toks: usize,
    out: &mut [f32],
    out_stride: usize,
);

/// A tile kernel in two steps: a product's activations laid out once, in
/// the form its micro-tiles load, then any number of row ranges multiplied
/// against that layout. The tasks of one parallel product share the layout
/// instead of each laying out every token again. Results are bit-identical
/// to the one-step tile kernel ([`TileFn`]) of the same tier.
#[derive(Clone, Copy)]
pub struct SharedActTile {
    /// f32 words of layout for `toks` activation rows of `n` elements.
    pub layout_len: fn(n: usize, toks: usize) -> usize,
    /// Lays out `toks` activation rows of `n` elements (at `a`,
    /// `a_row_bytes` apart, in the weight type's activation format) into
    /// `layout`, which must hold at least `layout_len(n, toks)` words.
    pub lay_out: fn(n: usize, a: &[u8], a_row_bytes: usize, toks: usize, layout: &mut [f32]),
    /// As [`TileFn`], with the laid-out `toks` tokens in place of the
    /// activation rows.
    #[allow(clippy::type_complexity)]
    pub tile: fn(
        n: usize,
        w: &[u8],
        w_row_bytes: usize,
        rows: usize,
        layout: &[f32],
        toks: usize,
        out: &mut [f32],
        out_stride: usize,
    ),
}

/// Computes `out[r] = dot(w_rows[r], a)` for `r < rows`, where weight row `r`
/// starts at `w[r * w_row_bytes]`; each row holds `n` elements (weights in the
/// kernel's type, `a` in its `vec_dot_type`).
///
/// Panics when `n` is not a whole number of blocks or a slice is too short for
/// the shape it is given (a caller bug, as with the plain `dot`).
pub type GemvFn = fn(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]);
