//! An encrypted session's plaintexts (docs/encrypted-sessions.md), as the
//! secure world and the client decode them after decryption: any bytes are
//! refused with an error or decode to a request or record that re-encodes to
//! exactly the same bytes. The first byte picks the decoder.
#![no_main]

use flexserve_e2e::codec::{decode_record, decode_request, encode_record, encode_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, plain)) = data.split_first() else { return };
    if pick % 2 == 0 {
        if let Ok(request) = decode_request(plain) {
            let again = encode_request(&request).expect("a decoded request encodes");
            assert_eq!(&again[..], plain, "a request re-encodes to its bytes");
        }
    } else if let Ok(record) = decode_record(plain) {
        let again = encode_record(&record).expect("a decoded record encodes");
        assert_eq!(&again[..], plain, "a record re-encodes to its bytes");
    }
});
