//! The aarch64 NEON tiers (`Isa::Neon`, and `Isa::NeonDot` with the
//! dot-product instructions): shared helpers (`ops`), and the tile and GEMV
//! kernels of those tiers, which loop the tier's plain dot over the rows and
//! tokens (as the portable ones loop the portable dot), so that they are
//! bit-identical to it. The dots themselves live with their formats
//! (`legacy/neon.rs`, `kquants/neon.rs`).
//!
//! Off aarch64 this module only answers `None`: the dispatchers ask it for
//! the NEON tiers, which `Isa::usable` never returns there.

use crate::{GemvFn, GgmlType, Isa, TileFn};

#[cfg(target_arch = "aarch64")]
pub(crate) mod ops;

/// The NEON tile kernel of `ty` at `isa` (`Neon` or `NeonDot`), where the
/// tier has a dot of its own for `ty`.
#[cfg(target_arch = "aarch64")]
pub(crate) fn tile(ty: GgmlType, isa: Isa) -> Option<TileFn> {
    loops::table(ty, isa).map(|(tile, _)| tile)
}

/// The NEON GEMV kernel of `ty` at `isa`, where the tier has a dot of its
/// own for `ty`.
#[cfg(target_arch = "aarch64")]
pub(crate) fn gemv(ty: GgmlType, isa: Isa) -> Option<GemvFn> {
    loops::table(ty, isa).map(|(_, gemv)| gemv)
}

/// No NEON tile kernels off aarch64.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) fn tile(_: GgmlType, _: Isa) -> Option<TileFn> {
    None
}

/// No NEON GEMV kernels off aarch64.
#[cfg(not(target_arch = "aarch64"))]
pub(crate) fn gemv(_: GgmlType, _: Isa) -> Option<GemvFn> {
    None
}

#[cfg(target_arch = "aarch64")]
mod loops {
    use crate::{kernels_for, GemvFn, GgmlType, Isa, TileFn};

    /// The types whose NEON tiers have a dot of their own.
    const TYPES: [GgmlType; 7] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q6_K,
    ];

    /// The tier of `DOT`.
    const fn tier(dot: bool) -> Isa {
        if dot {
            Isa::NeonDot
        } else {
            Isa::Neon
        }
    }

    /// `TYPES[T]`'s dot at the tier of `DOT` (the CPU has it: the loops are
    /// only handed out for a usable tier), and its activation type.
    fn dot_of<const T: usize, const DOT: bool>() -> (crate::DotFn, GgmlType) {
        let k = kernels_for(TYPES[T], tier(DOT)).expect("NEON kernels exist for these types");
        (k.dot.expect("weight types have a dot"), k.vec_dot_type)
    }

    #[allow(clippy::too_many_arguments)]
    fn tile_loop<const T: usize, const DOT: bool>(
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
        let ty = TYPES[T];
        let (dot, act) = dot_of::<T, DOT>();
        crate::tile::check_tile(ty, act, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
        if rows == 0 || toks == 0 {
            return;
        }
        let w_bytes = n / ty.block_size() * ty.type_size();
        let a_bytes = n / act.block_size() * act.type_size();
        for r in 0..rows {
            let w_row = &w[r * w_row_bytes..r * w_row_bytes + w_bytes];
            for t in 0..toks {
                out[t * out_stride + r] = dot(n, w_row, &a[t * a_row_bytes..t * a_row_bytes + a_bytes]);
            }
        }
    }

    fn gemv_loop<const T: usize, const DOT: bool>(
        n: usize,
        w: &[u8],
        w_row_bytes: usize,
        rows: usize,
        a: &[u8],
        out: &mut [f32],
    ) {
        let ty = TYPES[T];
        let (dot, act) = dot_of::<T, DOT>();
        crate::gemv::check_gemv(ty, act, n, w, w_row_bytes, rows, a, out);
        let w_bytes = n / ty.block_size() * ty.type_size();
        let a = &a[..n / act.block_size() * act.type_size()];
        for (r, o) in out[..rows].iter_mut().enumerate() {
            *o = dot(n, &w[r * w_row_bytes..r * w_row_bytes + w_bytes], a);
        }
    }

    macro_rules! entries {
        ($($t:literal),*) => {
            [$(
                [
                    (tile_loop::<$t, false> as TileFn, gemv_loop::<$t, false> as GemvFn),
                    (tile_loop::<$t, true> as TileFn, gemv_loop::<$t, true> as GemvFn),
                ],
            )*]
        };
    }

    /// The tile and GEMV loops of `ty` at `isa` (`Neon` or `NeonDot`).
    pub(super) fn table(ty: GgmlType, isa: Isa) -> Option<(TileFn, GemvFn)> {
        const TABLE: [[(TileFn, GemvFn); 2]; 7] = entries!(0, 1, 2, 3, 4, 5, 6);
        let dot = match isa.usable() {
            Isa::Neon => 0,
            Isa::NeonDot => 1,
            _ => return None,
        };
        TYPES.iter().position(|&t| t == ty).map(|i| TABLE[i][dot])
    }
}
