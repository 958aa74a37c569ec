//! The read kernel (`read_checksum`): every tier the CPU runs against the
//! portable one and against a plain reference, at lengths around the
//! kernels' steps and at every start alignment.

use flexserve_quant::{read_checksum, read_kernel, read_kernel_for, usable_isas, Isa};
use rand::{Rng, SeedableRng};

/// The checksum as documented: wrapping sum of little-endian 64-bit words,
/// the last partial word padded with zeros.
fn reference(bytes: &[u8]) -> u64 {
    bytes.chunks(8).fold(0u64, |s, w| {
        let mut word = [0u8; 8];
        word[..w.len()].copy_from_slice(w);
        s.wrapping_add(u64::from_le_bytes(word))
    })
}

#[test]
fn every_tier_equals_the_portable_one_at_any_length_and_alignment() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    // Random bytes with the high bits set often, so that the sums wrap.
    let buf: Vec<u8> = (0..8192 + 64).map(|_| rng.gen()).collect();
    let portable = read_kernel_for(Isa::Portable);
    let mut lengths: Vec<usize> = (0..=300).collect();
    // Around the AVX2 (128-byte) and AVX-512 (256-byte) steps and larger.
    for base in [511, 512, 513, 1023, 1024, 1025, 4096 - 1, 4096 + 7, 8191, 8192] {
        lengths.push(base);
    }
    let tiers = usable_isas();
    for &len in &lengths {
        for offset in [0, 1, 3, 8, 31, 63] {
            let bytes = &buf[offset..offset + len];
            let want = reference(bytes);
            assert_eq!(portable(bytes), want, "portable, {len} bytes at offset {offset}");
            for &isa in &tiers {
                assert_eq!(read_kernel_for(isa)(bytes), want, "{isa:?}, {len} bytes at offset {offset}");
            }
        }
    }
    eprintln!("read kernels compared on tiers {tiers:?}");
}

#[test]
fn the_checksum_wraps_and_sees_every_byte() {
    // All ones: each word is u64::MAX, so n words sum to -n (wrapping).
    let ones = vec![0xFFu8; 4096 + 5];
    let want = 0u64.wrapping_sub(512).wrapping_add(0xFF_FFFF_FFFF);
    for isa in usable_isas() {
        assert_eq!(read_kernel_for(isa)(&ones), want, "{isa:?}");
    }
    // Changing any one byte changes the checksum.
    let mut buf = vec![0u8; 1000];
    for i in [0, 7, 8, 127, 128, 255, 256, 511, 999] {
        buf[i] = 1;
        assert_eq!(read_checksum(&buf), 1u64 << (8 * (i % 8)), "byte {i}");
        buf[i] = 0;
    }
    assert_eq!(read_checksum(&[]), 0);
    assert_eq!(read_kernel() as usize, read_kernel_for(flexserve_quant::active_isa()) as usize);
}
