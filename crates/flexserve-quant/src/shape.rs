//! The shapes of the matrix products: the checks every tile and GEMV kernel
//! runs on its slices before it touches raw pointers, and the loop orders
//! the SIMD kernels share.

use flexserve_gguf::GgmlType;

/// A tile's geometry as the SIMD kernels walk it: blocks per row (of the
/// weight type's block size) and strides (bytes for rows, floats for the output).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) nb: usize,
    pub(crate) w_stride: usize,
    pub(crate) a_stride: usize,
    pub(crate) out_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl Shape {
    /// The geometry of a tile of `ty` rows of `n` elements that `check_tile` accepted.
    pub(crate) fn of(ty: GgmlType, n: usize, w_stride: usize, a_stride: usize, out_stride: usize) -> Shape {
        Shape { nb: n / ty.block_size(), w_stride, a_stride, out_stride }
    }
}

/// Panics with a clear message unless the slices hold the shape described.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_tile(
    ty: GgmlType,
    vec_dot_type: GgmlType,
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    a_row_bytes: usize,
    toks: usize,
    out: &[f32],
    out_stride: usize,
) {
    // Lengths are checked only for a tile with work in it (an empty one reads nothing).
    let empty = rows == 0 || toks == 0;
    check_rows("weight", ty, n, w, w_row_bytes, if empty { 0 } else { rows });
    check_rows("activation", vec_dot_type, n, a, a_row_bytes, if empty { 0 } else { toks });
    check_output(rows, toks, out, out_stride);
}

/// Panics with a clear message unless `count` rows of `n` elements of `ty`
/// (`what` they hold: weight, activation) lie within `bytes`, `stride` apart.
pub(crate) fn check_rows(what: &str, ty: GgmlType, n: usize, bytes: &[u8], stride: usize, count: usize) {
    let block = ty.block_size();
    assert!(
        n.is_multiple_of(block),
        "tile of {ty} {what} rows: {n} elements is not a multiple of the block size {block}"
    );
    let row = n / block * ty.type_size();
    assert!(stride >= row, "tile of {ty} {what} rows: row stride {stride} is below the row size {row}");
    if count > 0 {
        let needed = (count - 1).checked_mul(stride).and_then(|v| v.checked_add(row));
        assert!(
            needed.is_some_and(|need| bytes.len() >= need),
            "tile of {count} {ty} {what} rows of {n} elements (stride {stride}) needs more than the {} {what} bytes given",
            bytes.len()
        );
    }
}

/// Panics with a clear message unless `toks` output rows of `rows` floats
/// lie within `out`, `out_stride` apart.
pub(crate) fn check_output(rows: usize, toks: usize, out: &[f32], out_stride: usize) {
    if rows == 0 || toks == 0 {
        return;
    }
    assert!(out_stride >= rows, "tile output stride {out_stride} is below the {rows} results per token");
    let needed = (toks - 1).checked_mul(out_stride).and_then(|v| v.checked_add(rows));
    assert!(
        needed.is_some_and(|need| out.len() >= need),
        "tile of {rows} x {toks} results (stride {out_stride}) needs more than the {} output floats given",
        out.len()
    );
}

/// A SIMD kernel for a fixed number of rows: `(nb, w, w_row_bytes, a, out)`
/// with `nb` blocks per row, the first row at `w`, one activation row at `a`
/// and one output per row at `out`.
#[cfg(target_arch = "x86_64")]
pub(crate) type RowsKernel = unsafe fn(usize, *const u8, usize, *const u8, *mut f32);

/// Checks the slices for `rows` rows of weight type `ty` against one row of
/// `act_ty` activations, then runs `by_count[3]` (the four-row kernel) over
/// every group of four rows and the kernel for the one to three rows left.
///
/// # Safety
/// The CPU must have what the kernels need.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn in_groups_of_four(
    ty: GgmlType,
    act_ty: GgmlType,
    by_count: [RowsKernel; 4],
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    out: &mut [f32],
) {
    check_gemv(ty, act_ty, n, w, w_row_bytes, rows, a, out);
    let nb = n / ty.block_size();
    let full = rows / 4 * 4;
    for r in (0..full).step_by(4) {
        // SAFETY: the caller's guarantee for the CPU; `check_gemv` accepted
        // the slices, and rows `r..r + 4` lie within the checked `rows`.
        unsafe { by_count[3](nb, w.as_ptr().add(r * w_row_bytes), w_row_bytes, a.as_ptr(), out.as_mut_ptr().add(r)) }
    }
    if rows > full {
        // SAFETY: as above, for the remaining `rows - full` (1 to 3) rows.
        unsafe {
            by_count[rows - full - 1](
                nb,
                w[full * w_row_bytes..].as_ptr(),
                w_row_bytes,
                a.as_ptr(),
                out[full..].as_mut_ptr(),
            )
        }
    }
}

/// Panics with a clear message unless the slices hold the shape described.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gemv(
    ty: GgmlType,
    vec_dot_type: GgmlType,
    n: usize,
    w: &[u8],
    w_row_bytes: usize,
    rows: usize,
    a: &[u8],
    out: &[f32],
) {
    let block = ty.block_size();
    assert!(n.is_multiple_of(block), "gemv of {ty} rows: {n} elements is not a multiple of the block size {block}");
    let w_bytes = n / block * ty.type_size();
    let a_bytes = n / vec_dot_type.block_size() * vec_dot_type.type_size();
    assert!(w_row_bytes >= w_bytes, "gemv of {ty} rows: row stride {w_row_bytes} is below the row size {w_bytes}");
    assert!(a.len() >= a_bytes, "gemv of {n} {vec_dot_type} activations needs {a_bytes} bytes, got {}", a.len());
    assert!(out.len() >= rows, "gemv of {rows} rows needs {rows} output floats, got {}", out.len());
    if rows == 0 {
        return;
    }
    let w_needed = (rows - 1).checked_mul(w_row_bytes).and_then(|v| v.checked_add(w_bytes));
    assert!(
        w_needed.is_some_and(|need| w.len() >= need),
        "gemv of {rows} {ty} rows of {n} elements (stride {w_row_bytes}) needs more than the {} weight bytes given",
        w.len()
    );
}

/// Walks `rows x toks` in chunks of `row_chunk` rows and `tok_chunk` tokens
/// (whole micro-tiles): per chunk of tokens and chunk of rows `r0..r1`,
/// `prepare(r0, r1)`, then `micro(r, rr, t, tt, r0)` for each micro-tile of
/// `rr <= tile.0` rows from `r` by `tt <= tile.1` tokens from `t`. Every chunk
/// of rows passes a chunk of tokens while its activations stay in L2.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn for_each_micro_tile(
    rows: usize,
    toks: usize,
    tile: (usize, usize),
    (row_chunk, tok_chunk): (usize, usize),
    mut prepare: impl FnMut(usize, usize),
    mut micro: impl FnMut(usize, usize, usize, usize, usize),
) {
    for t_chunk in (0..toks).step_by(tok_chunk) {
        let t_chunk_end = toks.min(t_chunk + tok_chunk);
        for r_chunk in (0..rows).step_by(row_chunk) {
            let r_chunk_end = rows.min(r_chunk + row_chunk);
            prepare(r_chunk, r_chunk_end);
            for t in (t_chunk..t_chunk_end).step_by(tile.1) {
                let tt = tile.1.min(t_chunk_end - t);
                for r in (r_chunk..r_chunk_end).step_by(tile.0) {
                    micro(r, tile.0.min(r_chunk_end - r), t, tt, r_chunk);
                }
            }
        }
    }
}
