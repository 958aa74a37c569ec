//! The normal world decodes every reply the secure world sends: decoding must
//! never panic, and the codec is canonical, so a payload that decodes
//! re-encodes to exactly the same bytes.
#![no_main]

use flexserve_protocol::{decode_reply, encode_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reply) = decode_reply(data) {
        let again = encode_reply(&reply).expect("a decoded reply re-encodes");
        assert!(again == data, "not canonical: {reply:?} re-encodes to {again:02x?}");
    }
});
