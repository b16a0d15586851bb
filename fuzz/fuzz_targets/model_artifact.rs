//! The model artifact decoder (`edgeloop-int8-v1`, `edgeloop-f32-v1`) must
//! not panic on any bytes, and whatever it accepts must run and re-encode to
//! the same bytes. Each input is also tried behind a valid magic and format
//! string, so the fuzzer reaches the fields after the header.
#![no_main]

use edgeloop_proto::model::Artifact;
use libfuzzer_sys::fuzz_target;

const INT8_HEADER: &[u8] = b"EDGELOOP\x10edgeloop-int8-v1";
const F32_HEADER: &[u8] = b"EDGELOOP\x0fedgeloop-f32-v1";

fn check(data: &[u8]) {
    if let Ok(artifact) = Artifact::decode(data) {
        assert_eq!(artifact.encode(), data);
        match &artifact {
            Artifact::Int8(m) => {
                let _ = m.predict(&vec![0.5; m.n_inputs()]);
                let _ = m.predict_quantized(&vec![-128; m.n_inputs()]);
                let _ = m.to_tflite();
            }
            Artifact::F32(m) => {
                let _ = m.predict(&vec![0.5; m.n_inputs()]);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data);
    for header in [INT8_HEADER, F32_HEADER] {
        let mut with_header = header.to_vec();
        with_header.extend_from_slice(data);
        check(&with_header);
    }
});
