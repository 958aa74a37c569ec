//! Tiled dot products: many weight rows against many activation rows at once.
//!
//! A matmul over a batch of tokens computes the dot product of every weight
//! row with every activation row. Calling the plain `dot` per pair re-reads
//! the activation row for each weight row and reduces one vector accumulator
//! per call. The tile kernels instead work on micro-tiles of a few weight
//! rows by a few tokens: each weight block is decoded once for all tokens of
//! the micro-tile, the micro-tile's activation rows stay in L1 for all its
//! rows, and each (row, token) pair keeps its own vector accumulator, reduced
//! only at the end. Micro-tiles are visited in cache-sized chunks of rows and
//! tokens. Callers get the best throughput with `rows` a multiple of 4.
//!
//! Every pair goes through exactly the same per-block arithmetic as the plain
//! `dot` of its tier (same integer sums, same scale products, same FMA order,
//! same final reduction), so the results are bit-identical to it; the
//! portable variants loop the portable `dot`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(target_arch = "x86_64")]
mod float_simd;
#[cfg(target_arch = "x86_64")]
mod kquants_avx2;
#[cfg(target_arch = "x86_64")]
mod kquants_avx512;

/// The float formats' GEMV kernels and plain dots are their micro-tile over
/// one token (and one row, for the dot).
#[cfg(target_arch = "x86_64")]
pub(crate) use float_simd::{
    avx2::dot as float_dot_avx2, avx2::gemv as float_gemv_avx2, avx512::dot as float_dot_avx512,
    avx512::gemv as float_gemv_avx512,
};

use crate::{kernels_for, GgmlType, Isa};

/// A tile's geometry as the SIMD kernels walk it: blocks per row (of the
/// weight type's block size) and strides (bytes for rows, floats for the output).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Shape {
    nb: usize,
    w_stride: usize,
    a_stride: usize,
    out_stride: usize,
}

#[cfg(target_arch = "x86_64")]
impl Shape {
    /// The geometry of a tile of `ty` rows of `n` elements that `check_tile` accepted.
    fn of(ty: GgmlType, n: usize, w_stride: usize, a_stride: usize, out_stride: usize) -> Shape {
        Shape { nb: n / ty.block_size(), w_stride, a_stride, out_stride }
    }
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

/// The tile kernel for weight type `ty` using the active tier (`active_isa`), or
/// `None` where only the plain dot exists.
pub fn tile_kernel(ty: GgmlType) -> Option<TileFn> {
    tile_kernel_for(ty, crate::active_isa())
}

/// The tile kernel for `ty` restricted to `isa`. The set of types with a tile
/// kernel does not depend on `isa`: the portable variant loops the portable
/// dot. Asking for an ISA the CPU lacks gives the portable variant.
pub fn tile_kernel_for(ty: GgmlType, isa: Isa) -> Option<TileFn> {
    let portable = portable_tile(ty)?;
    match isa.usable() {
        Isa::Portable => Some(portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Some(avx2_tile(ty).unwrap_or(portable)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(
            kquants_avx512::tile(ty)
                .or_else(|| avx512::tile(ty))
                .or_else(|| float_simd::avx512::tile(ty))
                .or_else(|| avx2_tile(ty))
                .unwrap_or(portable),
        ),
        Isa::Neon | Isa::NeonDot => Some(crate::neon::tile(ty, isa).unwrap_or(portable)),
        #[cfg(not(target_arch = "x86_64"))]
        _ => Some(portable),
    }
}

/// A tile kernel in two steps: a product's activations laid out once, in
/// the form its micro-tiles load, then any number of row ranges multiplied
/// against that layout. The tasks of one parallel product share the layout
/// instead of each laying out every token again. Results are bit-identical
/// to the one-step [`tile_kernel`] of the same tier.
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

/// The two-step tile kernel of `ty` at the active tier, where that tier has
/// one (the AVX-512 kernels of the 32-element formats); `None` otherwise,
/// where [`tile_kernel`] is the one to use.
pub fn shared_act_tile(ty: GgmlType) -> Option<SharedActTile> {
    shared_act_tile_for(ty, crate::active_isa())
}

/// [`shared_act_tile`] restricted to `isa`.
pub fn shared_act_tile_for(ty: GgmlType, isa: Isa) -> Option<SharedActTile> {
    #[cfg(target_arch = "x86_64")]
    if isa.usable() == Isa::Avx512 {
        return avx512::shared(ty);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ty, isa);
    None
}

/// The most f32 words that the layout of `toks` activation rows of `n`
/// elements takes for any two-step kernel of the active tier (0 where it has
/// none): what a caller reserves ahead for a product of up to `toks` tokens.
pub fn shared_act_layout_max(n: usize, toks: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if crate::active_isa() == Isa::Avx512 {
        return avx512::layout_len_max(n, toks);
    }
    let _ = (n, toks);
    0
}

/// Tokens from which llama.cpp's CPU backend multiplies Q6_K (and other
/// K-quant matrices it keeps row by row) with its tiled kernel.
pub const SEQUENCE_CHAIN_MIN_TOKENS: usize = 8;

/// The tile kernel for `toks` consecutive tokens of one sequence, at the
/// active tier: llama.cpp multiplies a Q6_K matrix with its row-by-row dot
/// for fewer than [`SEQUENCE_CHAIN_MIN_TOKENS`] tokens (as [`tile_kernel`]
/// does, eight lanes per result) and with its tiled kernel from there on,
/// whose results are one f32 chain per (row, token) (`acc = fma(isum * d_w,
/// d_a, acc)` per super-block); the two differ in the last bits. Other types
/// get [`tile_kernel`]'s. Rows that are single tokens of different sessions
/// take [`tile_kernel`], as each would alone.
pub fn sequence_tile_kernel(ty: GgmlType, toks: usize) -> Option<TileFn> {
    sequence_tile_kernel_for(ty, toks, crate::active_isa())
}

/// [`sequence_tile_kernel`] restricted to `isa`.
pub fn sequence_tile_kernel_for(ty: GgmlType, toks: usize, isa: Isa) -> Option<TileFn> {
    if ty != GgmlType::Q6_K || toks < SEQUENCE_CHAIN_MIN_TOKENS {
        return tile_kernel_for(ty, isa);
    }
    match isa.usable() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(kquants_avx2::q6k_chain_of_tier::<true>()),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Some(kquants_avx2::q6k_chain_of_tier::<false>()),
        _ => Some(portable_q6_k_chain),
    }
}

/// The portable Q6_K chain tile (see [`sequence_tile_kernel_for`]).
#[allow(clippy::too_many_arguments)]
fn portable_q6_k_chain(
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
    let ty = GgmlType::Q6_K;
    check_tile(ty, GgmlType::Q8_K, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    let w_bytes = n / ty.block_size() * ty.type_size();
    let a_bytes = n / GgmlType::Q8_K.block_size() * GgmlType::Q8_K.type_size();
    for r in 0..rows {
        let w_row = &w[r * w_row_bytes..r * w_row_bytes + w_bytes];
        for t in 0..toks {
            let a_row = &a[t * a_row_bytes..t * a_row_bytes + a_bytes];
            out[t * out_stride + r] = crate::kquants::q6k::dot_chain(n, w_row, a_row);
        }
    }
}

/// The AVX2 tile kernel of `ty`, if there is one.
#[cfg(target_arch = "x86_64")]
fn avx2_tile(ty: GgmlType) -> Option<TileFn> {
    avx2::tile(ty).or_else(|| kquants_avx2::tile(ty)).or_else(|| float_simd::avx2::tile(ty))
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

/// Loops the plain portable dot over every pair.
#[allow(clippy::too_many_arguments)]
fn portable_loop(
    ty: GgmlType,
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
    let k = kernels_for(ty, Isa::Portable).expect("tile kernels exist only for supported types");
    let dot = k.dot.expect("tile kernels exist only for weight types");
    check_tile(ty, k.vec_dot_type, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
    if rows == 0 || toks == 0 {
        return;
    }
    let w_bytes = n / ty.block_size() * ty.type_size();
    let a_bytes = n / k.vec_dot_type.block_size() * k.vec_dot_type.type_size();
    for r in 0..rows {
        let w_row = &w[r * w_row_bytes..r * w_row_bytes + w_bytes];
        for t in 0..toks {
            out[t * out_stride + r] = dot(n, w_row, &a[t * a_row_bytes..t * a_row_bytes + a_bytes]);
        }
    }
}

macro_rules! portable_tiles {
    ($($ty:ident => $name:ident),* $(,)?) => {
        $(
            #[allow(clippy::too_many_arguments)]
            fn $name(
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
                portable_loop(GgmlType::$ty, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride)
            }
        )*

        /// The portable tile kernel of `ty`, for the types with a SIMD tile kernel.
        fn portable_tile(ty: GgmlType) -> Option<TileFn> {
            match ty {
                $(GgmlType::$ty => Some($name),)*
                _ => None,
            }
        }
    };
}

portable_tiles!(
    Q4_0 => portable_q4_0,
    Q4_1 => portable_q4_1,
    Q5_0 => portable_q5_0,
    Q5_1 => portable_q5_1,
    Q8_0 => portable_q8_0,
    Q4_K => portable_q4_k,
    Q6_K => portable_q6_k,
    F32 => portable_f32,
    F16 => portable_f16,
    BF16 => portable_bf16,
);
