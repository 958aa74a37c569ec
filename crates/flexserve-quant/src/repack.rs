//! Weights rearranged at load time for matrix products that walk eight rows
//! at once: Q4_0, Q4_1 and Q8_0 with llama.cpp's arithmetic for such
//! rearranged weights (below), Q4_K and Q6_K with the portable dot's (see
//! `q4k` and `q6k`, whose products equal the plain dots bit for bit).
//!
//! llama.cpp's default CPU path on AVX2 stores Q4_0 matrices whose row count
//! is a multiple of 8 in groups of eight interleaved rows, and computes each
//! output as
//!
//! ```text
//! acc = 0
//! for each block b:  acc = fma(f32(isum_b), f32(d_w[b]) * f32(d_a[b]), acc)
//! ```
//!
//! where `isum_b` is the exact integer dot of the block's 32 weight levels
//! (`q - 8`) with the 32 Q8_0 activation quants and the scale product is
//! rounded to f32 before the fused multiply-add. No horizontal sum of float
//! lanes follows: each lane of the accumulator belongs to one row. The plain
//! dot (`Kernels::dot`) instead keeps eight partial float sums per row and adds
//! them at the end, so its results differ in the last bits. The kernels here
//! reproduce the grouped arithmetic exactly, whatever the ISA, so a model
//! whose weights are rearranged agrees with default llama.cpp bit for bit in
//! its matrix products.
//!
//! # Layout (`Q4_0x8`)
//!
//! Rows are taken in groups of eight. A group holds, per block column `b`,
//! 144 bytes: the eight rows' f16 scales (row order), then 128 quant bytes
//! where byte `32 * m + 4 * r + i` (`m < 4`, `r < 8`, `i < 4`) is byte
//! `4 * m + i` of row `r`'s original block: its low nibble is element
//! `4 * m + i`, its high nibble element `16 + 4 * m + i`. A 32-byte load thus
//! gives, per 32-bit lane `r`, four consecutive elements of row `r`. The
//! rearranged matrix has exactly the size of the original.
//!
//! # Layout (`Q8_0x8`)
//!
//! The same grouping for Q8_0 rows, which llama.cpp keeps row by row. A group
//! holds, per block column `b`, 272 bytes: the eight rows' f16 scales, then
//! 256 quant bytes where byte `32 * k + 4 * r + i` (`k < 8`, `r < 8`, `i < 4`)
//! is quant `4 * k + i` of row `r`'s block. The products use the same grouped
//! arithmetic as `Q4_0x8` (exact integer block sums, one FMA per block with the
//! rounded scale product), so each row's result is the chained sum
//! `sum_b f32(isum_b) * (d_w * d_a)`; the plain dot keeps eight partial sums
//! instead and differs from it in the last bits.
//!
//! # Layout (`Q4_1x8`)
//!
//! Q4_1 rows (level `q` in 0..15 stands for `d * q + m`), grouped like Q4_0:
//! per block column, 160 bytes: the eight rows' f16 scales `d`, the eight f16
//! minimums `m`, then the 128 quant bytes in the `Q4_0x8` order. Activations
//! are Q8_1, whose blocks carry `s = d_a * sum(a)`. Per block, each row takes
//! `acc = fma(f32(isum_b), d_w * d_a, acc)` and then `acc = fma(m_w, s_a, acc)`
//! (`isum_b` the exact integer dot of the unsigned levels with the activation
//! quants); the plain dot keeps the minimum terms in a chain of their own and
//! differs from it in the last bits.

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
mod q4k;
#[cfg(target_arch = "x86_64")]
pub(crate) mod q4k_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod q4k_avx512;
mod q6k;
#[cfg(target_arch = "x86_64")]
pub(crate) mod q6k_avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod q6k_avx512;
#[cfg(target_arch = "x86_64")]
mod sweep;

use crate::legacy::{read_f16, QK};
use crate::types::QuantError;
use flexserve_gguf::GgmlType;
use std::marker::PhantomData;

/// Rows per interleaved group.
pub const REPACK_ROWS: usize = 8;
/// Bytes of one block column of a `Q8_0x8` group: eight f16 scales and 256 quant bytes.
#[cfg(target_arch = "x86_64")]
const Q8_GROUP_BLOCK_BYTES: usize = REPACK_ROWS * crate::legacy::Q8_0_BYTES;

/// The layouts as const parameters of the kernels shared between them.
pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q8_0: u8 = 2;
pub(crate) const Q4_K: u8 = 3;
pub(crate) const Q6_K: u8 = 4;

/// The layout of a const parameter code.
pub(crate) const fn layout(code: u8) -> Repacked {
    match code {
        Q4_0 => Repacked::Q4_0x8,
        Q4_1 => Repacked::Q4_1x8,
        Q4_K => Repacked::Q4_Kx8,
        Q6_K => Repacked::Q6_Kx8,
        _ => Repacked::Q8_0x8,
    }
}

/// A rearranged layout of eight-row groups, with its matrix product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repacked {
    /// Q4_0 rows, four levels of a row per 32-bit lane (see the module docs).
    Q4_0x8,
    /// Q8_0 rows, four quants of a row per 32-bit lane (see the module docs).
    Q8_0x8,
    /// Q4_1 rows, laid out as `Q4_0x8` with the minimums after the scales.
    Q4_1x8,
    /// Q4_K rows, one row per 32-bit lane (see `q4k`).
    #[allow(non_camel_case_types)] // the block type's name, as in the other variants
    Q4_Kx8,
    /// Q6_K rows, one row per 32-bit lane (see `q6k`).
    #[allow(non_camel_case_types)] // the block type's name, as in the other variants
    Q6_Kx8,
}

impl Repacked {
    /// The rearranged layout of `ty`'s rows, whatever the shape and CPU.
    pub fn of_type(ty: GgmlType) -> Option<Repacked> {
        match ty {
            GgmlType::Q4_0 => Some(Repacked::Q4_0x8),
            GgmlType::Q8_0 => Some(Repacked::Q8_0x8),
            GgmlType::Q4_1 => Some(Repacked::Q4_1x8),
            GgmlType::Q4_K => Some(Repacked::Q4_Kx8),
            GgmlType::Q6_K => Some(Repacked::Q6_Kx8),
            _ => None,
        }
    }

    /// The layout a `ty` matrix of `rows x cols` is rearranged into for the
    /// matrix products, if any: Q4_0, Q4_1, Q8_0 and Q4_K matrices whose rows
    /// come in whole groups of eight and whose width is whole blocks; Q6_K ones
    /// too where the kernels run at the AVX-512 tier (`active_isa`). On AVX2 the
    /// one-token product over `Q6_Kx8` streamed a large matrix at about 0.9 of
    /// the row-by-row GEMV's speed, and the decode of a Q4_K_M model lost 5-9%
    /// with it, more than its prefill gained; on AVX-512 it is 1.7x the Q6_K
    /// tile in prefill and decode is well ahead of llama.cpp's with it.
    pub fn for_matrix(ty: GgmlType, rows: usize, cols: usize) -> Option<Repacked> {
        let layout = Repacked::of_type(ty)?;
        // llama.cpp keeps Q4_1, Q8_0 and Q6_K matrices row by row and
        // multiplies them with its plain dot, whose eight partial sums per
        // row the one-lane-per-row arithmetic of these layouts does not
        // reproduce: products one rounding apart feed the next activation
        // quantization, which turns them into visibly different logits. The
        // layouts stay, with their kernels, for measurements.
        if matches!(layout, Repacked::Q4_1x8 | Repacked::Q8_0x8 | Repacked::Q6_Kx8) {
            return None;
        }
        let whole = rows > 0 && rows.is_multiple_of(REPACK_ROWS) && cols > 0 && cols.is_multiple_of(ty.block_size());
        whole.then_some(layout)
    }

    /// The block type of the original rows.
    pub fn ty(self) -> GgmlType {
        match self {
            Repacked::Q4_0x8 => GgmlType::Q4_0,
            Repacked::Q8_0x8 => GgmlType::Q8_0,
            Repacked::Q4_1x8 => GgmlType::Q4_1,
            Repacked::Q4_Kx8 => GgmlType::Q4_K,
            Repacked::Q6_Kx8 => GgmlType::Q6_K,
        }
    }

    /// The block type of the activation rows the product takes (the
    /// original type's `vec_dot_type`): Q8_1 for `Q4_1x8`, Q8_K for the
    /// K-quant layouts, else Q8_0.
    pub fn activation_type(self) -> GgmlType {
        match self {
            Repacked::Q4_1x8 => GgmlType::Q8_1,
            Repacked::Q4_Kx8 | Repacked::Q6_Kx8 => GgmlType::Q8_K,
            _ => GgmlType::Q8_0,
        }
    }

    /// Bytes of factors ahead of the quants in each original block of the
    /// 32-element layouts (`d`, and `m` for Q4_1).
    fn header_bytes(self) -> usize {
        match self {
            Repacked::Q4_1x8 => 4,
            _ => 2,
        }
    }

    /// Offset of the quant bytes inside a group block: the eight rows' factors come first.
    pub(crate) fn group_quants(self) -> usize {
        REPACK_ROWS * self.header_bytes()
    }

    /// Offset of the quants inside an activation block (after `d`, and `s` for Q8_1).
    pub(crate) fn act_quants(self) -> usize {
        self.activation_type().type_size() - QK
    }

    /// Rearranges a row-major matrix of `rows x cols` (same size).
    pub fn repack(self, src: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
        match self {
            Repacked::Q4_Kx8 => q4k::repack(src, rows, cols),
            Repacked::Q6_Kx8 => q6k::repack(src, rows, cols),
            _ => repack_groups(self, src, rows, cols),
        }
    }
}

/// A layout's product at one tier (see `KernelSet::packed`): the checked
/// entry point on slices, and the driver it hands a checked product to.
#[derive(Clone, Copy)]
pub struct PackedKernels {
    layout: Repacked,
    matmul: RepackedMatmulFn,
    driver: fn(Product),
}

impl PackedKernels {
    /// The layout these kernels multiply.
    pub fn layout(&self) -> Repacked {
        self.layout
    }

    /// The product on whole slices (see [`RepackedMatmulFn`]).
    pub fn matmul(&self) -> RepackedMatmulFn {
        self.matmul
    }

    /// The product into one part of a shared output: `w` holds the
    /// `part.width()` rows (a multiple of 8) whose results go in the part's
    /// columns, `a` the `n_tok` activation rows, one sequence's consecutive
    /// tokens if `grouped` (see `Product::grouped`; [`PackedKernels::matmul`]
    /// takes them so). Panics when a slice is too short for the shape or
    /// `n_tok` is not the output's.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_part(
        &self,
        n: usize,
        w: &[u8],
        a: &[u8],
        a_row_bytes: usize,
        n_tok: usize,
        grouped: bool,
        part: ColumnPart<'_>,
    ) {
        let layout = self.layout;
        assert_eq!(part.rows.n_tok, n_tok, "{layout:?} product: {n_tok} tokens into an output of {}", part.rows.n_tok);
        let rows = part.rows.width;
        check_repacked(layout, n, w, rows, a, a_row_bytes, n_tok);
        let out = part.rows;
        (self.driver)(Product { layout, n, w, rows, a, a_row_bytes, n_tok, out, grouped })
    }
}

/// Rearranges a row-major matrix of `rows x cols` blocks of `layout.ty()`
/// (a multiple of 8 rows) into `layout` (same size): per group and block
/// column, the eight scales (then the eight minimums for Q4_1), then each
/// row's quant bytes four at a time, row after row for each run of four.
fn repack_groups(layout: Repacked, src: &[u8], rows: usize, cols: usize) -> Result<Vec<u8>, QuantError> {
    let (header, quants_at) = (layout.header_bytes(), layout.group_quants());
    rearrange(layout.ty(), src, rows, cols, |dst, blocks| {
        for (r, block) in blocks.iter().enumerate() {
            // Factor h (d, then m) of row r goes to the h-th run of eight.
            for h in 0..header / 2 {
                let to = 2 * (h * REPACK_ROWS + r);
                dst[to..to + 2].copy_from_slice(&block[2 * h..2 * h + 2]);
            }
            for (j, four) in block[header..].chunks_exact(4).enumerate() {
                let to = quants_at + 32 * j + 4 * r;
                dst[to..to + 4].copy_from_slice(four);
            }
        }
    })
}

/// Checks that `src` holds `rows` (a multiple of 8) rows of `cols` elements
/// of `ty`, then builds the rearranged matrix (same size) group block by group
/// block: `fill(dst, blocks)` writes the group block `dst` from the original
/// blocks of its eight rows in the same block column.
fn rearrange(
    ty: GgmlType,
    src: &[u8],
    rows: usize,
    cols: usize,
    mut fill: impl FnMut(&mut [u8], [&[u8]; REPACK_ROWS]),
) -> Result<Vec<u8>, QuantError> {
    let block = ty.block_size();
    if !cols.is_multiple_of(block) {
        return Err(QuantError::NotBlockMultiple { ty, n: cols, block });
    }
    if !rows.is_multiple_of(REPACK_ROWS) {
        return Err(QuantError::RowsNotGroupMultiple { ty, rows, group: REPACK_ROWS });
    }
    let block_bytes = ty.type_size();
    let row_bytes = cols / block * block_bytes;
    let expected = rows * row_bytes;
    if src.len() != expected {
        return Err(QuantError::BadLength { ty, n: rows * cols, expected, got: src.len() });
    }
    let mut out = vec![0u8; expected];
    for (group_src, group_dst) in
        src.chunks_exact(REPACK_ROWS * row_bytes).zip(out.chunks_exact_mut(REPACK_ROWS * row_bytes))
    {
        for (b, dst) in group_dst.chunks_exact_mut(REPACK_ROWS * block_bytes).enumerate() {
            fill(dst, std::array::from_fn(|r| &group_src[r * row_bytes + b * block_bytes..][..block_bytes]));
        }
    }
    Ok(out)
}

/// Matrix product of rearranged weights with activation rows of the
/// layout's `activation_type` (Q8_0, or Q8_1 for `Q4_1x8`):
/// `out[t * out_stride + r] = dot(weight row r, activation row t)` for
/// `r < rows` and `t < n_tok`, with llama.cpp's grouped arithmetic.
///
/// `w` holds `rows` (a multiple of 8) rows of `n` elements in the kernel's
/// layout, starting at a group boundary; activation row `t` starts at
/// `a[t * a_row_bytes]`. Panics when a slice is too short for the shape given
/// (a caller bug).
#[allow(clippy::too_many_arguments)]
pub type RepackedMatmulFn =
    fn(n: usize, w: &[u8], rows: usize, a: &[u8], a_row_bytes: usize, n_tok: usize, out: &mut [f32], out_stride: usize);

/// The arguments of one product on rearranged weights, as the entry points
/// hand them to the drivers after `check_repacked` accepted them.
pub(super) struct Product<'a> {
    pub layout: Repacked,
    pub n: usize,
    pub w: &'a [u8],
    pub rows: usize,
    pub a: &'a [u8],
    pub a_row_bytes: usize,
    pub n_tok: usize,
    /// `n_tok` rows of `rows` results.
    pub out: OutRows<'a>,
    /// Whether the activation rows are one sequence's consecutive tokens,
    /// which llama.cpp multiplies in groups of four with, for the rearranged
    /// K-quants, an arithmetic of their own (`q4k`): the first
    /// `n_tok - n_tok % 4` tokens take it, the rest the one-token arithmetic.
    /// Otherwise (one token of each of several sessions) every token takes
    /// the one-token arithmetic, as it would alone.
    pub grouped: bool,
}

/// Where a product's results go: `n_tok` rows of `width` floats, `stride`
/// floats apart, from `ptr`: the whole of an output slice, or one part of a
/// shared output (`ColumnPart`), whose other columns belong to other tasks.
pub(super) struct OutRows<'a> {
    ptr: *mut f32,
    n_tok: usize,
    pub stride: usize,
    width: usize,
    _out: PhantomData<&'a mut [f32]>,
}

impl<'a> OutRows<'a> {
    /// The first `width` floats of `n_tok` rows of `out`, `stride` apart.
    fn of_slice(out: &'a mut [f32], n_tok: usize, stride: usize, width: usize) -> OutRows<'a> {
        assert!(
            n_tok == 0 || width == 0 || (stride >= width && out.len() >= (n_tok - 1) * stride + width),
            "{n_tok} output rows of {width} (stride {stride}) need more than {} floats",
            out.len()
        );
        OutRows { ptr: out.as_mut_ptr(), n_tok, stride, width, _out: PhantomData }
    }

    /// Where the result of row `t`, column `c` goes. Writing there is the
    /// caller's to justify: within bounds for `t < n_tok` and `c < width`.
    pub fn at(&self, t: usize, c: usize) -> *mut f32 {
        self.ptr.wrapping_add(t * self.stride + c)
    }

    /// Writes `values` into row `t` from column `c`.
    pub fn store(&mut self, t: usize, c: usize, values: &[f32]) {
        assert!(t < self.n_tok && c + values.len() <= self.width, "store of row {t}, columns {c}.. out of bounds");
        // SAFETY: in bounds as asserted; these columns of these rows belong to
        // this `OutRows` alone (a slice borrowed mutably, or a `ColumnPart`).
        unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), self.at(t, c), values.len()) }
    }
}

/// A token-major output (`n_tok` rows of `cols` results, `stride` floats
/// apart) handed out as parts of whole columns, each once, so that parallel
/// tasks write their rows' results straight into place
/// ([`Repacked::matmul_part`]) instead of into scratch that is copied after.
pub struct ColumnParts<'a> {
    /// The columns not handed out yet.
    rest: ColumnPart<'a>,
    width: usize,
}

impl<'a> ColumnParts<'a> {
    /// Splits `out` into parts of `width` columns (the last one narrower
    /// where `width` does not divide `cols`). Panics when `out` is too short
    /// for the shape or `width` is zero.
    pub fn new(out: &'a mut [f32], n_tok: usize, stride: usize, cols: usize, width: usize) -> ColumnParts<'a> {
        assert!(width > 0, "column parts need a width");
        ColumnParts { rest: ColumnPart { rows: OutRows::of_slice(out, n_tok, stride, cols), first: 0 }, width }
    }
}

impl<'a> Iterator for ColumnParts<'a> {
    type Item = ColumnPart<'a>;

    /// Splits the next part off the front of the columns left.
    fn next(&mut self) -> Option<ColumnPart<'a>> {
        let rest = &mut self.rest;
        if rest.rows.width == 0 {
            return None;
        }
        let width = self.width.min(rest.rows.width);
        let rows = OutRows { width, ..rest.rows };
        let part = ColumnPart { rows, first: rest.first };
        (rest.rows.ptr, rest.rows.width, rest.first) =
            (rest.rows.ptr.wrapping_add(width), rest.rows.width - width, rest.first + width);
        Some(part)
    }
}

/// Columns `first..first + width` of every row of a [`ColumnParts`] output.
/// Neither `Clone` nor `Copy`: it is the one handle to its columns.
pub struct ColumnPart<'a> {
    /// The part's columns of every row.
    rows: OutRows<'a>,
    first: usize,
}

// SAFETY: a part is the only handle to its columns of the output
// (`ColumnParts` hands each column out once), so another thread writing
// through it shares nothing with the others.
unsafe impl Send for ColumnPart<'_> {}

impl ColumnPart<'_> {
    /// The part's first column.
    pub fn first(&self) -> usize {
        self.first
    }

    /// The part's number of columns.
    pub fn width(&self) -> usize {
        self.rows.width
    }
}

/// Panics with a clear message unless the weights and activations hold the
/// shape described (the output is checked where its `OutRows` is made).
fn check_repacked(layout: Repacked, n: usize, w: &[u8], rows: usize, a: &[u8], a_row_bytes: usize, n_tok: usize) {
    let block = layout.ty().block_size();
    assert!(n.is_multiple_of(block), "{layout:?} product: {n} elements is not a multiple of the block size {block}");
    assert!(rows.is_multiple_of(REPACK_ROWS), "{layout:?} product: {rows} rows is not a multiple of {REPACK_ROWS}");
    let nb = n / block;
    assert!(
        w.len() >= rows * nb * layout.ty().type_size(),
        "{layout:?} product: {rows} rows of {n} need more than {} bytes",
        w.len()
    );
    if n_tok == 0 {
        return;
    }
    let act_row = nb * layout.activation_type().type_size();
    assert!(a_row_bytes >= act_row, "{layout:?} product: activation stride {a_row_bytes} is below one row");
    assert!(
        a.len() >= (n_tok - 1) * a_row_bytes + act_row,
        "{layout:?} product: {n_tok} activation rows need more than {} bytes",
        a.len()
    );
}

/// The exact integer dot of row `r`'s block in the group block `blk` with
/// the activation quants `qa`.
fn row_block_isum(layout: Repacked, blk: &[u8], r: usize, qa: &[u8]) -> i32 {
    let mut isum = 0i32;
    // Run `j` of four quant bytes of row `r`.
    let runs = (layout.ty().type_size() - layout.header_bytes()) / 4;
    for j in 0..runs {
        for i in 0..4 {
            let byte = blk[layout.group_quants() + 32 * j + 4 * r + i];
            let a = |k: usize| qa[k] as i8 as i32;
            isum += match layout {
                Repacked::Q4_0x8 => {
                    ((byte & 0x0F) as i32 - 8) * a(4 * j + i) + ((byte >> 4) as i32 - 8) * a(16 + 4 * j + i)
                }
                Repacked::Q4_1x8 => (byte & 0x0F) as i32 * a(4 * j + i) + (byte >> 4) as i32 * a(16 + 4 * j + i),
                Repacked::Q8_0x8 => byte as i8 as i32 * a(4 * j + i),
                Repacked::Q4_Kx8 | Repacked::Q6_Kx8 => unreachable!("{layout:?} products have kernels of their own"),
            };
        }
    }
    isum
}

/// Portable kernel of layout `L`: the same arithmetic as the SIMD ones, lane by lane.
fn portable_groups<const L: u8>(p: Product) {
    let Product { layout, n, w, rows, a, a_row_bytes, n_tok, mut out, .. } = p;
    let nb = n / QK;
    let group_block_bytes = REPACK_ROWS * layout.ty().type_size();
    let act_block_bytes = layout.activation_type().type_size();
    for (g, group) in w.chunks_exact(nb * group_block_bytes).take(rows / REPACK_ROWS).enumerate() {
        for t in 0..n_tok {
            let act = &a[t * a_row_bytes..];
            let mut acc = [0f32; REPACK_ROWS];
            for (b, blk) in group.chunks_exact(group_block_bytes).enumerate() {
                let ab = &act[b * act_block_bytes..(b + 1) * act_block_bytes];
                let d_a = read_f16(ab, 0);
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let isum = row_block_isum(layout, blk, r, &ab[layout.act_quants()..]);
                    let scale = read_f16(blk, 2 * r) * d_a;
                    *acc_r = (isum as f32).mul_add(scale, *acc_r);
                    if layout == Repacked::Q4_1x8 {
                        let (m_w, s_a) = (read_f16(blk, 2 * (REPACK_ROWS + r)), read_f16(ab, 2));
                        *acc_r = m_w.mul_add(s_a, *acc_r);
                    }
                }
            }
            out.store(t, g * REPACK_ROWS, &acc);
        }
    }
}

/// Defines, per name, a `PackedKernels` constant for layout `$param` whose
/// driver is `$driver::<$param>` (each ISA's driver shared by the layouts)
/// and whose `matmul` entry point checks its slices and hands them to the
/// driver as one `Product`.
macro_rules! entry_points {
    ($($(#[$doc:meta])* $name:ident => $driver:ident::<$param:tt>;)*) => {$(
        $(#[$doc])*
        #[allow(non_upper_case_globals)]
        pub(crate) const $name: $crate::repack::PackedKernels = {
            #[allow(clippy::too_many_arguments)]
            fn matmul(
                n: usize,
                w: &[u8],
                rows: usize,
                a: &[u8],
                a_row_bytes: usize,
                n_tok: usize,
                out: &mut [f32],
                out_stride: usize,
            ) {
                let layout = $crate::repack::layout($param);
                $crate::repack::check_repacked(layout, n, w, rows, a, a_row_bytes, n_tok);
                let out = $crate::repack::OutRows::of_slice(out, n_tok, out_stride, rows);
                let grouped = true;
                $driver::<$param>($crate::repack::Product { layout, n, w, rows, a, a_row_bytes, n_tok, out, grouped })
            }
            $crate::repack::PackedKernels { layout: $crate::repack::layout($param), matmul, driver: $driver::<$param> }
        };
    )*};
}
// For the SIMD modules' entry points (x86-64 only so far).
#[cfg(target_arch = "x86_64")]
use entry_points;

entry_points! {
    portable_q4_0x8 => portable_groups::<Q4_0>;
    portable_q4_1x8 => portable_groups::<Q4_1>;
    portable_q8_0x8 => portable_groups::<Q8_0>;
    portable_q4_kx8 => portable_kquant::<Q4_K>;
    portable_q6_kx8 => portable_kquant::<Q6_K>;
}

/// The portable loop of the K-quant layouts: per group, token and
/// super-block column, each row's result gains `row_term(group block,
/// activation block, row)`.
fn portable_k_rows(p: Product, group_block: usize, row_term: impl Fn(&[u8], &[u8], usize) -> f32) {
    let Product { n, w, rows, a, a_row_bytes, n_tok, mut out, .. } = p;
    let (nb, act_block) = (n / crate::kquants::QK_K, GgmlType::Q8_K.type_size());
    for (g, group) in w.chunks_exact(nb * group_block).take(rows / REPACK_ROWS).enumerate() {
        for t in 0..n_tok {
            let act = &a[t * a_row_bytes..];
            let mut acc = [0f32; REPACK_ROWS];
            for (b, blk) in group.chunks_exact(group_block).enumerate() {
                let ab = &act[b * act_block..(b + 1) * act_block];
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    *acc_r += row_term(blk, ab, r);
                }
            }
            out.store(t, g * REPACK_ROWS, &acc);
        }
    }
}

/// The portable products of the K-quant layouts (see `q4k`, `q6k`).
fn portable_kquant<const L: u8>(p: Product) {
    match L {
        Q4_K => q4k::portable(p),
        _ => q6k::portable(p),
    }
}
