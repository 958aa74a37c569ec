//! `limit_isa` caps the tier of every default kernel table. A test binary of
//! its own: the cap is process-wide.

use flexserve_quant::{
    activations, activations_for, active_isa, detected_isa, f16_acc, f16_acc_for, gemv_kernel, gemv_kernel_for,
    kernels, kernels_for, limit_isa, read_kernel, read_kernel_for, tile_kernel, tile_kernel_for, GgmlType, Isa,
    Repacked,
};

#[test]
fn the_cap_reaches_every_default_table_and_lifts_again() {
    assert_eq!(active_isa(), detected_isa(), "no cap at start");
    assert_eq!(limit_isa(Isa::Portable), Isa::Portable);
    assert_eq!(active_isa(), Isa::Portable);
    // Function addresses tell the variants apart (many are bit-identical in their results).
    let ty = GgmlType::Q4_0;
    assert_eq!(
        kernels(ty).unwrap().dot.map(|f| f as usize),
        kernels_for(ty, Isa::Portable).unwrap().dot.map(|f| f as usize)
    );
    assert_eq!(tile_kernel(ty).map(|f| f as usize), tile_kernel_for(ty, Isa::Portable).map(|f| f as usize));
    assert_eq!(gemv_kernel(ty).map(|f| f as usize), gemv_kernel_for(ty, Isa::Portable).map(|f| f as usize));
    assert_eq!(Repacked::Q4_0x8.kernel() as usize, Repacked::Q4_0x8.kernel_for(Isa::Portable) as usize);
    assert_eq!(activations().silu_mul as usize, activations_for(Isa::Portable).silu_mul as usize);
    assert_eq!(f16_acc().dot as usize, f16_acc_for(Isa::Portable).dot as usize);
    assert_eq!(read_kernel() as usize, read_kernel_for(Isa::Portable) as usize);
    if detected_isa() >= Isa::Avx2 {
        assert_ne!(Repacked::Q4_0x8.kernel() as usize, Repacked::Q4_0x8.kernel_for(Isa::Avx2) as usize);
    }
    // A cap above the CPU's best tier gives the best tier.
    let top = if cfg!(target_arch = "aarch64") { Isa::NeonDot } else { Isa::Avx512 };
    assert_eq!(limit_isa(top), detected_isa());
    assert_eq!(Repacked::Q4_0x8.kernel() as usize, Repacked::Q4_0x8.kernel_for(detected_isa()) as usize);
}
