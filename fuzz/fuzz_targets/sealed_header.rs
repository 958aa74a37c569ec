//! The sealed-model header reader (preamble, key-wrap and signature sections,
//! embedded GGUF header, chunk table) must reject anything malformed without
//! panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flexserve_sealed::SealedHeader::read(data);
});
