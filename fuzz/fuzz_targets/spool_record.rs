//! The spool's record and header decoders must not panic on any bytes.
#![no_main]

use edgeloop_agent::spool::disk::{decode_header, decode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_header(data);
    let mut at = 0;
    while at < data.len() {
        match decode_record(&data[at..]) {
            Ok((_, payload, taken)) => {
                assert!(taken >= 16 && taken <= data.len() - at);
                assert!(payload.len() + 16 == taken);
                at += taken;
            }
            Err(_) => break,
        }
    }
});
