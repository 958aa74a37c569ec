//! The tiers of both architectures: detection, the partial order between
//! them, and (on aarch64) that the NEON tiers are picked and equal the
//! portable kernels bit for bit, with and without the dot-product
//! instructions.

mod common;

use common::*;
use flexserve_quant::{detected_isa, kernels_for, usable_isas, GgmlType, Isa};
use rand::Rng;

/// An x86-64 tier.
fn x86(isa: Isa) -> bool {
    isa == Isa::Avx2 || isa == Isa::Avx512
}

const ALL: [Isa; 5] = [Isa::Portable, Isa::Avx2, Isa::Avx512, Isa::Neon, Isa::NeonDot];

#[test]
fn tiers_of_different_architectures_do_not_compare() {
    for isa in ALL {
        assert!(Isa::Portable <= isa, "{isa:?}");
        assert_eq!(Isa::from_name(isa.name()), Some(isa));
    }
    assert!(Isa::Avx2 < Isa::Avx512 && Isa::Neon < Isa::NeonDot);
    for (x86, arm) in [(Isa::Avx2, Isa::Neon), (Isa::Avx512, Isa::NeonDot), (Isa::Avx2, Isa::NeonDot)] {
        assert_eq!(x86.partial_cmp(&arm), None);
        assert_ne!(x86, arm);
    }
    assert_eq!(Isa::from_name("sve"), None);
}

#[test]
fn usable_tiers_belong_to_this_architecture() {
    let best = detected_isa();
    let foreign: &[Isa] =
        if cfg!(target_arch = "aarch64") { &[Isa::Avx2, Isa::Avx512] } else { &[Isa::Neon, Isa::NeonDot] };
    for &isa in foreign {
        assert_eq!(isa.usable(), Isa::Portable, "{isa:?} on {best:?}");
        assert!(!usable_isas().contains(&isa));
    }
    for isa in usable_isas() {
        assert!(isa <= best, "{isa:?} above {best:?}");
        assert_eq!(isa.usable(), isa);
    }
}

#[cfg(target_arch = "aarch64")]
#[test]
fn neon_is_detected_and_picked_on_aarch64() {
    use flexserve_quant::{gemv_kernel_for, tile_kernel_for};
    let dotprod = std::arch::is_aarch64_feature_detected!("dotprod");
    let best = detected_isa();
    assert_eq!(best, if dotprod { Isa::NeonDot } else { Isa::Neon });
    eprintln!("aarch64: detected {}", best.name());
    assert_eq!(Isa::NeonDot.usable(), best);
    assert!(usable_isas().contains(&Isa::Neon));
    // Function addresses tell the variants apart.
    let addr = |isa: Isa, ty: GgmlType| kernels_for(ty, isa).unwrap().dot.map(|f| f as usize);
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0, GgmlType::Q4_K] {
        assert_ne!(addr(Isa::Neon, ty), addr(Isa::Portable, ty), "{ty}");
        if dotprod {
            assert_ne!(addr(Isa::NeonDot, ty), addr(Isa::Neon, ty), "{ty}");
        }
        let tile = |isa| tile_kernel_for(ty, isa).map(|f| f as usize);
        let gemv = |isa| gemv_kernel_for(ty, isa).map(|f| f as usize);
        assert_ne!(tile(Isa::Neon), tile(Isa::Portable), "{ty}");
        assert_ne!(gemv(Isa::Neon), gemv(Isa::Portable), "{ty}");
    }
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let quantize = |isa| kernels_for(ty, isa).unwrap().quantize as usize;
        assert_ne!(quantize(Isa::Neon), quantize(Isa::Portable), "{ty}");
    }
}

/// Raw blocks of `ty`: random bytes (every quant pattern its quantizer
/// gives: Q8_0 / Q8_1 activations never hold -128) with sane scales, and
/// for Q8_K consistent group sums.
fn random_blocks(ty: GgmlType, rng: &mut rand::rngs::StdRng, blocks: usize) -> Vec<u8> {
    let size = ty.type_size();
    let mut out = vec![0u8; blocks * size];
    rng.fill(&mut out[..]);
    let h = |v: f32| half::f16::from_f32(v).to_le_bytes();
    for block in out.chunks_mut(size) {
        if matches!(ty, GgmlType::Q8_0 | GgmlType::Q8_1) {
            block.iter_mut().filter(|b| **b == 0x80).for_each(|b| *b = 0x81);
        }
        match ty {
            GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Q8_0 => {
                block[..2].copy_from_slice(&h(rng.gen_range(-0.1..0.1)))
            }
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q8_1 | GgmlType::Q4_K | GgmlType::Q5_K => {
                block[..2].copy_from_slice(&h(rng.gen_range(-0.1..0.1)));
                block[2..4].copy_from_slice(&h(rng.gen_range(-1.0..1.0)));
            }
            GgmlType::Q6_K => block[208..].copy_from_slice(&h(rng.gen_range(-0.1..0.1))),
            GgmlType::Q8_K => {
                block[..4].copy_from_slice(&rng.gen_range(-0.1f32..0.1).to_le_bytes());
                for g in 0..16 {
                    let s: i16 = block[4 + 16 * g..20 + 16 * g].iter().map(|&b| b as i8 as i16).sum();
                    block[260 + 2 * g..262 + 2 * g].copy_from_slice(&s.to_le_bytes());
                }
            }
            _ => unreachable!("{ty}"),
        }
    }
    out
}

/// Every tier's dot equals the portable dot bit for bit, on random blocks
/// and on quantized data, at odd addresses.
#[test]
fn every_tier_dot_equals_the_portable_dot() {
    let mut rng = rng(0xA64);
    let types = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];
    for ty in types {
        let p = portable(ty);
        let ak = portable(p.vec_dot_type);
        for blocks in [1usize, 2, 3, 8, 17] {
            let n = blocks * ty.block_size();
            for round in 0..4 {
                let (w, a) = if round < 2 {
                    (
                        random_blocks(ty, &mut rng, blocks),
                        random_blocks(p.vec_dot_type, &mut rng, blocks * ty.block_size() / ak.ty.block_size()),
                    )
                } else {
                    let shape = SHAPES[(round + blocks) % SHAPES.len()];
                    (
                        quantize(&p, &data(&mut rng, shape, n, ty.block_size())),
                        quantize(&ak, &data(&mut rng, Shape::Scaled, n, 32)),
                    )
                };
                let want = (p.dot.unwrap())(n, &w, &a);
                let (wbuf, wo) = misaligned(&w);
                let (abuf, ao) = misaligned(&a);
                // The AVX2 Q5_K dot sums in another order (it agrees within
                // rounding, `kquant_kernels.rs`); every other dot is exact.
                for isa in usable_isas().into_iter().filter(|&isa| !(ty == GgmlType::Q5_K && x86(isa))) {
                    let got = (kernels_for(ty, isa).unwrap().dot.unwrap())(
                        n,
                        &wbuf[wo..wo + w.len()],
                        &abuf[ao..ao + a.len()],
                    );
                    assert_eq!(
                        got.to_bits(),
                        want.to_bits(),
                        "{ty} {} x{blocks} round {round}: {got} vs {want}",
                        isa.name()
                    );
                }
            }
        }
    }
}

/// Every tier's activation quantizers equal the portable ones byte for
/// byte, ties, zeros and non-finite values included.
#[test]
fn every_tier_activation_quantizer_equals_the_portable_one() {
    let mut rng = rng(0xA65);
    for ty in [GgmlType::Q8_0, GgmlType::Q8_1, GgmlType::Q8_K] {
        let p = portable(ty);
        let block = ty.block_size();
        for blocks in [1usize, 3, 8] {
            let n = blocks * block;
            let mut rows: Vec<Vec<f32>> = SHAPES.iter().map(|&s| data(&mut rng, s, n, block)).collect();
            // Exact ties once the extreme is 127 (the scale is then 1).
            let mut ties: Vec<f32> = (0..n).map(|i| ((i % 253) as f32 - 126.0) + 0.5 * (i % 2) as f32).collect();
            ties[0] = 127.0;
            ties[1] = -127.0;
            rows.push(ties);
            let mut specials = data(&mut rng, Shape::Uniform, n, block);
            specials[1] = f32::NAN;
            specials[2] = f32::INFINITY;
            specials[n - 1] = 1e-40;
            rows.push(specials);
            rows.push(vec![1e-42; n]);
            // The same magnitude with both signs: the first one sets the sign.
            let mut signs = data(&mut rng, Shape::Uniform, n, block);
            signs[4] = -3.0;
            signs[7] = 3.0;
            rows.push(signs);
            for x in &rows {
                let want = quantize(&p, x);
                // The AVX2 Q8_0 / Q8_1 quantizers turn the NaN or infinity
                // that an infinite or subnormal input gives into -128 (the
                // portable one into 0 or 127); the NEON ones agree with the
                // portable one there too.
                let edge = x.iter().any(|v| !v.is_normal() && *v != 0.0);
                for isa in usable_isas().into_iter().filter(|&isa| !(edge && ty != GgmlType::Q8_K && x86(isa))) {
                    assert_eq!(quantize(&kernels_for(ty, isa).unwrap(), x), want, "{ty} {} x{blocks}", isa.name());
                }
            }
        }
    }
}
