//! The secure world decodes every request the normal world sends: decoding
//! must never panic, and the codec is canonical, so a payload that decodes
//! re-encodes to exactly the same bytes.
#![no_main]

use flexserve_protocol::{decode_request, encode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = decode_request(data) {
        let again = encode_request(&request).expect("a decoded request re-encodes");
        assert!(again == data, "not canonical: {request:?} re-encodes to {again:02x?}");
    }
});
