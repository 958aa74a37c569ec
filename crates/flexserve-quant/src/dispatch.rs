//! Which kernel runs: every choice between the tiers is made here, and only
//! here. The families hand out their tiers' kernels (`legacy::avx2::kernels`,
//! `kquants::tile_avx512::tile`, ...) without asking which tier runs.
//!
//! A weight tensor's kernels are resolved once, when it loads, into a
//! [`KernelSet`]: one table per (tensor type, tier) with the type's row
//! kernels, the quantizer of its activation format, and its GEMV, tile,
//! two-step tile, sequence tile and rearranged products. The engine keeps it
//! beside the tensor and calls through it on every product, with no lookup
//! left on the way. The free functions (`kernels_for`, `tile_kernel_for`,
//! ...) answer the same questions one at a time from the same resolvers, so
//! they agree with the tables; those without `_for` answer for the active
//! tier (`active_isa`).
//!
//! Every resolver takes a tier this CPU runs (`Isa::usable` lowers the one
//! asked for first), so the SIMD kernels it hands out have their CPU
//! features.

use crate::activation::{self, Activations};
use crate::f16acc::{self, F16Acc};
#[cfg(target_arch = "x86_64")]
use crate::float;
use crate::isa::{active_isa, Isa};
use crate::read::{self, ReadFn};
use crate::repack::{self, ColumnPart, PackedKernels, Repacked, RepackedMatmulFn};
use crate::types::{GemvFn, Kernels, QuantError, QuantizeFn, SharedActTile, TileFn};
use crate::{kquants, legacy, looped};
use flexserve_gguf::GgmlType;

/// The kernels of one tensor type at one tier, resolved once (see the
/// module docs).
#[derive(Clone, Copy)]
pub struct KernelSet {
    /// The tier of every kernel here: the one asked for, lowered to what this
    /// CPU runs.
    pub isa: Isa,
    /// The type's row kernels: dequantization, quantization, and the dot
    /// with its activation format (`row.vec_dot_type`; `row.dot` is `None`
    /// for the types that only serve as activation formats).
    pub row: Kernels,
    /// The quantizer of the activation format `row.vec_dot_type`.
    pub quantize_activations: QuantizeFn,
    /// Rows against one activation row, where the type has a GEMV kernel
    /// (otherwise `row.dot` per row).
    pub gemv: Option<GemvFn>,
    /// Rows against several activation rows, where the type has a tile
    /// kernel (otherwise `row.dot` per pair).
    pub tile: Option<TileFn>,
    /// The tile in two steps, where this tier has one for the type: then the
    /// one to use for several activation rows.
    pub shared_tile: Option<SharedActTile>,
    /// The tile for [`SEQUENCE_CHAIN_MIN_TOKENS`] or more consecutive tokens
    /// of one sequence, where it differs from `tile` (Q6_K; see
    /// [`sequence_tile_kernel`]).
    pub chain_tile: Option<TileFn>,
    /// The products of the type's rearranged layout ([`Repacked::of_type`]),
    /// for a tensor stored in it.
    pub packed: Option<PackedKernels>,
}

impl KernelSet {
    /// The kernels of `ty` at `isa` (lowered to the best tier at or below it
    /// that this CPU runs); an error for a type the kernels do not support.
    pub fn for_type(ty: GgmlType, isa: Isa) -> Result<KernelSet, QuantError> {
        let tier = isa.usable();
        let kernels = row(ty, tier).ok_or(QuantError::Unsupported(ty))?;
        let act = row(kernels.vec_dot_type, tier).ok_or(QuantError::Unsupported(kernels.vec_dot_type))?;
        Ok(KernelSet {
            isa: tier,
            row: kernels,
            quantize_activations: act.quantize,
            gemv: gemv(ty, tier),
            tile: tile(ty, tier),
            shared_tile: shared(ty, tier),
            chain_tile: chain(ty, tier),
            packed: Repacked::of_type(ty).map(|layout| packed(layout, tier)),
        })
    }

    /// The tile for `toks` consecutive tokens of one sequence (see
    /// [`sequence_tile_kernel`]).
    #[inline]
    pub fn sequence_tile(&self, toks: usize) -> Option<TileFn> {
        match self.chain_tile {
            Some(chain) if toks >= SEQUENCE_CHAIN_MIN_TOKENS => Some(chain),
            _ => self.tile,
        }
    }
}

/// The kernels of `ty` at the active tier (`active_isa`), as a tensor of
/// that type keeps them once it is loaded.
pub fn kernel_set(ty: GgmlType) -> Result<KernelSet, QuantError> {
    KernelSet::for_type(ty, active_isa())
}

// ---------------------------------------------------------------------------
// Row kernels

/// Row kernels for `ty` at the active tier (`active_isa`).
pub fn kernels(ty: GgmlType) -> Result<Kernels, QuantError> {
    kernels_for(ty, active_isa())
}

/// Row kernels for `ty` restricted to `isa` (tests compare the tiers against
/// each other). Asking for a tier the CPU lacks gives the best one below it.
pub fn kernels_for(ty: GgmlType, isa: Isa) -> Result<Kernels, QuantError> {
    row(ty, isa.usable()).ok_or(QuantError::Unsupported(ty))
}

/// The row kernels of `ty` at `tier`: the portable ones, with what the
/// tier's families replace of them (each family leaves other types alone).
fn row(ty: GgmlType, tier: Isa) -> Option<Kernels> {
    let portable = looped::portable_kernels(ty)?;
    Some(match tier {
        // The AVX-512 tier keeps the AVX2 row kernels but for the float dots.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => kquants::avx2::kernels(legacy::avx2::kernels(float::avx2_kernels(portable))),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => kquants::avx2::kernels(legacy::avx2::kernels(float::avx512_kernels(portable))),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => {
            let dotprod = tier == Isa::NeonDot;
            kquants::neon::kernels(legacy::neon::kernels(portable, dotprod), dotprod)
        }
        // The portable tier (another architecture's tiers are never usable).
        _ => portable,
    })
}

// ---------------------------------------------------------------------------
// Tiles

/// The tile kernel for weight type `ty` at the active tier (`active_isa`),
/// or `None` where only the plain dot exists.
pub fn tile_kernel(ty: GgmlType) -> Option<TileFn> {
    tile_kernel_for(ty, active_isa())
}

/// The tile kernel for `ty` restricted to `isa`. The set of types with a tile
/// kernel does not depend on `isa`: the portable variant loops the portable
/// dot. Asking for a tier the CPU lacks gives the best one below it.
pub fn tile_kernel_for(ty: GgmlType, isa: Isa) -> Option<TileFn> {
    tile(ty, isa.usable())
}

fn tile(ty: GgmlType, tier: Isa) -> Option<TileFn> {
    let portable = looped::portable_tile(ty)?;
    Some(match tier {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_tile(ty).unwrap_or(portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => kquants::tile_avx512::tile(ty)
            .or_else(|| legacy::tile_avx512::tile(ty))
            .or_else(|| float::matmul::avx512::tile(ty))
            .or_else(|| avx2_tile(ty))
            .unwrap_or(portable),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => looped::neon::table(ty, tier).map_or(portable, |(tile, _)| tile),
        _ => portable,
    })
}

/// The AVX2 tile kernel of `ty`, if there is one.
#[cfg(target_arch = "x86_64")]
fn avx2_tile(ty: GgmlType) -> Option<TileFn> {
    legacy::tile_avx2::tile(ty).or_else(|| kquants::tile_avx2::tile(ty)).or_else(|| float::matmul::avx2::tile(ty))
}

/// The two-step tile kernel of `ty` at the active tier, where that tier has
/// one (the AVX-512 kernels of the 32-element formats); `None` otherwise,
/// where [`tile_kernel`] is the one to use.
pub fn shared_act_tile(ty: GgmlType) -> Option<SharedActTile> {
    shared_act_tile_for(ty, active_isa())
}

/// [`shared_act_tile`] restricted to `isa`.
pub fn shared_act_tile_for(ty: GgmlType, isa: Isa) -> Option<SharedActTile> {
    shared(ty, isa.usable())
}

fn shared(ty: GgmlType, tier: Isa) -> Option<SharedActTile> {
    #[cfg(target_arch = "x86_64")]
    if tier == Isa::Avx512 {
        return legacy::tile_avx512::shared(ty);
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ty, tier);
    None
}

/// The most f32 words that the layout of `toks` activation rows of `n`
/// elements takes for any two-step kernel of the active tier (0 where it has
/// none): what a caller reserves ahead for a product of up to `toks` tokens.
pub fn shared_act_layout_max(n: usize, toks: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    if active_isa() == Isa::Avx512 {
        return legacy::tile_avx512::layout_len_max(n, toks);
    }
    #[cfg(not(target_arch = "x86_64"))]
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
    sequence_tile_kernel_for(ty, toks, active_isa())
}

/// [`sequence_tile_kernel`] restricted to `isa`.
pub fn sequence_tile_kernel_for(ty: GgmlType, toks: usize, isa: Isa) -> Option<TileFn> {
    let tier = isa.usable();
    match chain(ty, tier) {
        Some(chain) if toks >= SEQUENCE_CHAIN_MIN_TOKENS => Some(chain),
        _ => tile(ty, tier),
    }
}

/// The chain tile of `ty` (Q6_K only; see [`sequence_tile_kernel`]).
fn chain(ty: GgmlType, tier: Isa) -> Option<TileFn> {
    if ty != GgmlType::Q6_K {
        return None;
    }
    Some(match tier {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => kquants::tile_avx512::q6k_chain(),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => kquants::tile_avx2::q6k_chain(),
        _ => looped::portable_q6_k_chain,
    })
}

// ---------------------------------------------------------------------------
// GEMV

/// The GEMV kernel for weight type `ty` at the active tier (`active_isa`),
/// or `None` where only the plain dot exists.
pub fn gemv_kernel(ty: GgmlType) -> Option<GemvFn> {
    gemv_kernel_for(ty, active_isa())
}

/// The GEMV kernel for `ty` restricted to `isa`. The set of types with a GEMV
/// kernel does not depend on `isa`: the portable variant loops the portable
/// dot. Asking for a tier the CPU lacks gives the best one below it.
pub fn gemv_kernel_for(ty: GgmlType, isa: Isa) -> Option<GemvFn> {
    gemv(ty, isa.usable())
}

fn gemv(ty: GgmlType, tier: Isa) -> Option<GemvFn> {
    let portable = looped::portable_gemv(ty)?;
    Some(match tier {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2_gemv(ty).unwrap_or(portable),
        // The quantized formats keep the AVX2 GEMVs at the AVX-512 tier.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => float::matmul::avx512::gemv(ty).or_else(|| avx2_gemv(ty)).unwrap_or(portable),
        #[cfg(target_arch = "aarch64")]
        Isa::Neon | Isa::NeonDot => looped::neon::table(ty, tier).map_or(portable, |(_, gemv)| gemv),
        _ => portable,
    })
}

/// The AVX2 GEMV kernel of `ty`, if there is one.
#[cfg(target_arch = "x86_64")]
fn avx2_gemv(ty: GgmlType) -> Option<GemvFn> {
    legacy::gemv_avx2::gemv(ty).or_else(|| kquants::gemv_avx2::gemv(ty)).or_else(|| float::matmul::avx2::gemv(ty))
}

// ---------------------------------------------------------------------------
// Rearranged weights

impl Repacked {
    /// The matrix product for the active tier (`active_isa`).
    pub fn kernel(self) -> RepackedMatmulFn {
        self.kernel_for(active_isa())
    }

    /// The matrix product restricted to `isa` (a tier the CPU lacks gives the
    /// best one below it).
    pub fn kernel_for(self, isa: Isa) -> RepackedMatmulFn {
        packed(self, isa.usable()).matmul()
    }

    /// The product at the active tier into one part of a shared output (see
    /// [`PackedKernels::matmul_part`]).
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_part(
        self,
        n: usize,
        w: &[u8],
        a: &[u8],
        a_row_bytes: usize,
        n_tok: usize,
        grouped: bool,
        part: ColumnPart<'_>,
    ) {
        packed(self, active_isa()).matmul_part(n, w, a, a_row_bytes, n_tok, grouped, part)
    }
}

fn packed(layout: Repacked, tier: Isa) -> PackedKernels {
    match (layout, tier) {
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q4_0x8, Isa::Avx512) => repack::avx512::q4_0x8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q4_0x8, Isa::Avx2) => repack::avx2::q4_0x8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q8_0x8, Isa::Avx512) => repack::avx512::q8_0x8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q8_0x8, Isa::Avx2) => repack::avx2::q8_0x8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q4_1x8, Isa::Avx512) => repack::avx512::q4_1x8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q4_1x8, Isa::Avx2) => repack::avx2::q4_1x8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q4_Kx8, Isa::Avx512) => repack::q4k_avx512::q4_kx8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q4_Kx8, Isa::Avx2) => repack::q4k_avx2::q4_kx8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q6_Kx8, Isa::Avx512) => repack::q6k_avx512::q6_kx8,
        #[cfg(target_arch = "x86_64")]
        (Repacked::Q6_Kx8, Isa::Avx2) => repack::q6k_avx2::q6_kx8,
        (Repacked::Q4_0x8, _) => repack::portable_q4_0x8,
        (Repacked::Q8_0x8, _) => repack::portable_q8_0x8,
        (Repacked::Q4_1x8, _) => repack::portable_q4_1x8,
        (Repacked::Q4_Kx8, _) => repack::portable_q4_kx8,
        (Repacked::Q6_Kx8, _) => repack::portable_q6_kx8,
    }
}

// ---------------------------------------------------------------------------
// Kernels of no tensor type

/// The element-wise activation kernels for `isa` (the best tier at or below
/// it that the CPU runs).
pub fn activations_for(isa: Isa) -> Activations {
    match isa.usable() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => activation::avx2_kernels(),
        _ => activation::portable_kernels(),
    }
}

/// The element-wise activation kernels of the active tier.
pub fn activations() -> Activations {
    activations_for(active_isa())
}

/// The f16 accumulation kernels for `isa` (the best tier at or below it
/// that the CPU runs).
pub fn f16_acc_for(isa: Isa) -> F16Acc {
    match isa.usable() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 | Isa::Avx512 => f16acc::avx2_kernels(),
        _ => f16acc::portable_kernels(),
    }
}

/// The f16 accumulation kernels of the active tier.
pub fn f16_acc() -> F16Acc {
    f16_acc_for(active_isa())
}

/// The read kernel for `isa` (the best the CPU has at or below it).
pub fn read_kernel_for(isa: Isa) -> ReadFn {
    match isa.usable() {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => read::read_avx512,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => read::read_avx2,
        _ => read::read_portable,
    }
}

/// The read kernel of the active tier (`active_isa`).
pub fn read_kernel() -> ReadFn {
    read_kernel_for(active_isa())
}

/// Reads every byte of `bytes` with the active tier's kernel and returns
/// their checksum: the wrapping sum of the little-endian 64-bit words, the
/// last partial word padded with zeros.
pub fn read_checksum(bytes: &[u8]) -> u64 {
    read_kernel()(bytes)
}
