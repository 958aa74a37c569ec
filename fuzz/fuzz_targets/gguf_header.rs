//! The GGUF header reader must reject any malformed header without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = flexserve_gguf::GgufHeader::parse(data);
});
