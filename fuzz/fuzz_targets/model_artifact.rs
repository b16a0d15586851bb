//! The model artifact decoder (`edgeloop-int8-v1`, `edgeloop-f32-v1`) must
//! not panic on any bytes, and whatever it accepts must run and re-encode to
//! the same bytes.
#![no_main]

use edgeloop_proto::model::Artifact;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
});
