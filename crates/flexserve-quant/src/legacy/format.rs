//! The 32-element block formats as const-generic ids, and what every x86
//! kernel family (dots, GEMV, tiles) needs to know about each: its type,
//! its block size, its activation format and where that format's quants lie.
//! Kernels are compiled once per format id (`const F: u8`).

use super::{Q4_0_BYTES, Q4_1_BYTES, Q5_0_BYTES, Q5_1_BYTES, Q8_0_BYTES, Q8_1_BYTES};
use flexserve_gguf::GgmlType;

pub(crate) const Q4_0: u8 = 0;
pub(crate) const Q4_1: u8 = 1;
pub(crate) const Q5_0: u8 = 2;
pub(crate) const Q5_1: u8 = 3;
pub(crate) const Q8_0: u8 = 4;

pub(crate) const fn weight_type(f: u8) -> GgmlType {
    match f {
        Q4_0 => GgmlType::Q4_0,
        Q4_1 => GgmlType::Q4_1,
        Q5_0 => GgmlType::Q5_0,
        Q5_1 => GgmlType::Q5_1,
        _ => GgmlType::Q8_0,
    }
}

pub(crate) const fn weight_block_bytes(f: u8) -> usize {
    match f {
        Q4_0 => Q4_0_BYTES,
        Q4_1 => Q4_1_BYTES,
        Q5_0 => Q5_0_BYTES,
        Q5_1 => Q5_1_BYTES,
        _ => Q8_0_BYTES,
    }
}

/// Formats with a minimum `m` pair with Q8_1 activations (scale, sum,
/// quants); the others with Q8_0 (scale, quants).
pub(crate) const fn has_min(f: u8) -> bool {
    matches!(f, Q4_1 | Q5_1)
}

pub(crate) const fn act_type(f: u8) -> GgmlType {
    if has_min(f) {
        GgmlType::Q8_1
    } else {
        GgmlType::Q8_0
    }
}

pub(crate) const fn act_block_bytes(f: u8) -> usize {
    if has_min(f) {
        Q8_1_BYTES
    } else {
        Q8_0_BYTES
    }
}

/// Offset of the 32 activation quants in an activation block.
pub(crate) const fn act_quants_at(f: u8) -> usize {
    if has_min(f) {
        4
    } else {
        2
    }
}
