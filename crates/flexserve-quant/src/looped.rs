//! Tile and GEMV kernels that loop a tier's plain dot over the rows and
//! tokens, so that they are bit-identical to it: the portable tier's, for
//! every type that has a SIMD tile or GEMV kernel, and the NEON tiers'
//! (aarch64), for the types whose NEON tiers have a dot of their own. The
//! dots come from the families that own them.

use crate::shape::{check_gemv, check_tile};
use crate::types::{GemvFn, Kernels, TileFn};
use crate::{float, kquants, legacy};
use flexserve_gguf::GgmlType;

/// The portable row kernels of `ty`, from the family that owns it (the
/// table every tier starts from).
pub(crate) fn portable_kernels(ty: GgmlType) -> Option<Kernels> {
    float::portable_kernels(ty).or_else(|| legacy::portable_kernels(ty)).or_else(|| kquants::portable_kernels(ty))
}

/// Loops the plain portable dot over every pair.
#[allow(clippy::too_many_arguments)]
fn portable_tile_loop(
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
    let k = portable_kernels(ty).expect("tile kernels exist only for supported types");
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
                portable_tile_loop(GgmlType::$ty, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride)
            }
        )*

        /// The portable tile kernel of `ty`, for the types with a SIMD tile kernel.
        pub(crate) fn portable_tile(ty: GgmlType) -> Option<TileFn> {
            match ty {
                $(GgmlType::$ty => Some($name),)*
                _ => None,
            }
        }
    };
}

portable_tiles!(
    Q4_0 => tile_q4_0,
    Q4_1 => tile_q4_1,
    Q5_0 => tile_q5_0,
    Q5_1 => tile_q5_1,
    Q8_0 => tile_q8_0,
    Q4_K => tile_q4_k,
    Q6_K => tile_q6_k,
    F32 => tile_f32,
    F16 => tile_f16,
    BF16 => tile_bf16,
);

/// Loops the plain portable dot over every row.
fn portable_gemv_loop(ty: GgmlType, n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
    let k = portable_kernels(ty).expect("gemv kernels exist only for supported types");
    let dot = k.dot.expect("gemv kernels exist only for weight types");
    check_gemv(ty, k.vec_dot_type, n, w, w_row_bytes, rows, a, out);
    let w_bytes = n / ty.block_size() * ty.type_size();
    // Exactly one row of activations: some dots insist on whole rows.
    let a = &a[..n / k.vec_dot_type.block_size() * k.vec_dot_type.type_size()];
    for (r, o) in out[..rows].iter_mut().enumerate() {
        *o = dot(n, &w[r * w_row_bytes..r * w_row_bytes + w_bytes], a);
    }
}

macro_rules! portable_gemvs {
    ($($ty:ident => $name:ident),* $(,)?) => {
        $(
            fn $name(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
                portable_gemv_loop(GgmlType::$ty, n, w, w_row_bytes, rows, a, out)
            }
        )*

        /// The portable GEMV kernel of `ty`, for the types with a SIMD GEMV kernel.
        pub(crate) fn portable_gemv(ty: GgmlType) -> Option<GemvFn> {
            match ty {
                $(GgmlType::$ty => Some($name),)*
                _ => None,
            }
        }
    };
}

portable_gemvs!(
    Q4_0 => gemv_q4_0,
    Q4_1 => gemv_q4_1,
    Q5_0 => gemv_q5_0,
    Q5_1 => gemv_q5_1,
    Q8_0 => gemv_q8_0,
    Q4_K => gemv_q4_k,
    Q6_K => gemv_q6_k,
    F32 => gemv_f32,
    F16 => gemv_f16,
    BF16 => gemv_bf16,
);

/// The portable Q6_K chain tile (see `dispatch::sequence_tile_kernel_for`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn portable_q6_k_chain(
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
            out[t * out_stride + r] = kquants::q6k::dot_chain(n, w_row, a_row);
        }
    }
}

#[cfg(target_arch = "aarch64")]
pub(crate) mod neon {
    use crate::isa::Isa;
    use crate::kquants;
    use crate::legacy;
    use crate::shape::{check_gemv, check_tile};
    use crate::types::{DotFn, GemvFn, TileFn};
    use flexserve_gguf::GgmlType;

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

    /// `TYPES[T]`'s dot with the dot-product instructions (`DOT`) or
    /// without (the CPU has them: the loops are only handed out for a
    /// usable tier), and its activation type.
    fn dot_of<const T: usize, const DOT: bool>() -> (DotFn, GgmlType) {
        let portable = super::portable_kernels(TYPES[T]).expect("NEON kernels exist for these types");
        let k = kquants::neon::kernels(legacy::neon::kernels(portable, DOT), DOT);
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
        check_tile(ty, act, n, w, w_row_bytes, rows, a, a_row_bytes, toks, out, out_stride);
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
        check_gemv(ty, act, n, w, w_row_bytes, rows, a, out);
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

    /// The tile and GEMV loops of `ty` at `tier` (`Neon` or `NeonDot`, a
    /// tier this CPU runs), where the tier has a dot of its own for `ty`.
    pub(crate) fn table(ty: GgmlType, tier: Isa) -> Option<(TileFn, GemvFn)> {
        const TABLE: [[(TileFn, GemvFn); 2]; 7] = entries!(0, 1, 2, 3, 4, 5, 6);
        let dot = match tier {
            Isa::Neon => 0,
            Isa::NeonDot => 1,
            _ => return None,
        };
        TYPES.iter().position(|&t| t == ty).map(|i| TABLE[i][dot])
    }
}
