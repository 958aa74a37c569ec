//! Matrix-vector products for decoding: many weight rows against one
//! activation row.
//!
//! The plain `dot` of one row is a single chain of FMAs, one per block, so it
//! runs at the FMA latency. The GEMV kernels instead walk several rows at once:
//! the activation block is loaded (and its scale converted) once for all of
//! them, and each row keeps its own accumulator, so the chains overlap.
//!
//! Each row goes through exactly the same per-block arithmetic as the plain
//! AVX2 `dot` (same integer lane sums, same `d_w * d_a` scale, same FMA order,
//! same final reduction), so results are bit-identical to it; the portable
//! variants loop the portable `dot`.

#[cfg(target_arch = "x86_64")]
mod avx2;
#[cfg(target_arch = "x86_64")]
mod kquants_avx2;

use crate::{kernels_for, GgmlType, Isa};

/// Computes `out[r] = dot(w_rows[r], a)` for `r < rows`, where weight row `r`
/// starts at `w[r * w_row_bytes]`; each row holds `n` elements (weights in the
/// kernel's type, `a` in its `vec_dot_type`).
///
/// Panics when `n` is not a whole number of blocks or a slice is too short for
/// the shape it is given (a caller bug, as with the plain `dot`).
pub type GemvFn = fn(n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]);

/// The GEMV kernel for weight type `ty` using the active tier (`active_isa`), or
/// `None` where only the plain dot exists.
pub fn gemv_kernel(ty: GgmlType) -> Option<GemvFn> {
    gemv_kernel_for(ty, crate::active_isa())
}

/// The GEMV kernel for `ty` restricted to `isa`. The set of types with a GEMV
/// kernel does not depend on `isa`: the portable variant loops the portable
/// dot. Asking for an ISA the CPU lacks gives the portable variant.
pub fn gemv_kernel_for(ty: GgmlType, isa: Isa) -> Option<GemvFn> {
    let portable = portable_gemv(ty)?;
    match isa.usable() {
        Isa::Portable => Some(portable),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => Some(avx2_gemv(ty).unwrap_or(portable)),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => Some(crate::tile::float_gemv_avx512(ty).or_else(|| avx2_gemv(ty)).unwrap_or(portable)),
        Isa::Neon | Isa::NeonDot => Some(crate::neon::gemv(ty, isa).unwrap_or(portable)),
        #[cfg(not(target_arch = "x86_64"))]
        _ => Some(portable),
    }
}

/// The AVX2 GEMV kernel of `ty`, if there is one (the AVX-512 tier uses
/// them for the quantized types).
#[cfg(target_arch = "x86_64")]
fn avx2_gemv(ty: GgmlType) -> Option<GemvFn> {
    avx2::gemv(ty).or_else(|| kquants_avx2::gemv(ty)).or_else(|| crate::tile::float_gemv_avx2(ty))
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

/// Loops the plain portable dot over every row.
fn portable_loop(ty: GgmlType, n: usize, w: &[u8], w_row_bytes: usize, rows: usize, a: &[u8], out: &mut [f32]) {
    let k = kernels_for(ty, Isa::Portable).expect("gemv kernels exist only for supported types");
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
                portable_loop(GgmlType::$ty, n, w, w_row_bytes, rows, a, out)
            }
        )*

        /// The portable GEMV kernel of `ty`, for the types with a SIMD GEMV kernel.
        fn portable_gemv(ty: GgmlType) -> Option<GemvFn> {
            match ty {
                $(GgmlType::$ty => Some($name),)*
                _ => None,
            }
        }
    };
}

portable_gemvs!(
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
