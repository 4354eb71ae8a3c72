//! The protocol decoder on arbitrary text: never panics, and whatever it
//! accepts re-encodes to text that decodes to the same frame.
#![no_main]

use keepwire_proto::{Limits, decode_client, decode_server, encode, is_unknown_server_type};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    if let Ok(frame) = decode_client(text, &limits) {
        let again = encode(&frame);
        let back =
            decode_client(&again, &limits).expect("a decoded frame re-encodes to a valid one");
        assert_eq!(back, frame, "client frame round trip");
    }
    if let Ok(frame) = decode_server(text) {
        let again = encode(&frame);
        let back = decode_server(&again).expect("a decoded server frame re-encodes");
        assert_eq!(back, frame, "server frame round trip");
    }
    let _ = is_unknown_server_type(text);
});
