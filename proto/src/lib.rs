//! The contract between device and cloud. No I/O happens here.
//!
//! - [`v1`]: the protobuf messages generated from `proto/edgeloop.proto`
//!   (`ReadingBatch`, `Ack`, `DeviceStatus`, `ModelUpdate`, `LossReport`).
//! - [`topics`]: every MQTT topic and Kafka topic name, in one place.
//! - [`device_id`]: what a device id may look like.
//! - [`signing`]: Ed25519 signatures of model updates (`sign_update`,
//!   `verify_update`) over the payload documented in docs/device-protocol.md.
//! - [`features`]: the features a model sees, computed from a window of
//!   readings (one function for trainer and device).
//! - [`model`]: the float model, its int8 quantization the TFLite way, the
//!   integer-only kernel, the artifact formats and the `.tflite` export.
//! - [`validate`]: what the cloud accepts in a `ReadingBatch` and a
//!   `DeviceStatus` (identity, seq and time ranges, channels), checked the
//!   same way by the broker's bridge and the processor.
//!
//! Code that both the device and the cloud run lives in this crate and
//! nowhere else, so the two sides cannot drift apart.

pub mod device_id;
pub mod features;
pub mod model;
pub mod signing;
pub mod topics;
pub mod validate;

/// The device profile an agent announces unless told otherwise, and the
/// name of the shipped trainer profile for Linux-class devices (f32
/// models): a device left on the default gets models from a trainer left
/// on its shipped profiles. The other shipped profile is `mcu8` (int8, for
/// microcontrollers).
pub const DEFAULT_PROFILE: &str = "gateway";

/// Generated protobuf types, package `edgeloop.v1`.
#[allow(clippy::all, missing_docs)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/edgeloop.v1.rs"));
}

pub use prost::Message;

impl v1::ReadingBatch {
    /// The seq after the last reading of this batch (exclusive end); for a
    /// loss report, the end of the lost range.
    pub fn end_seq(&self) -> u64 {
        match &self.loss {
            Some(loss) => loss.end_seq.max(self.first_seq),
            None => self.first_seq.saturating_add(self.readings.len() as u64),
        }
    }
}

#[cfg(test)]
mod golden {
    use super::v1::{Reading, ReadingBatch};
    use prost::Message;

    fn sample() -> ReadingBatch {
        ReadingBatch {
            device_id: "dev-1".into(),
            profile: "f32".into(),
            first_seq: 300,
            channels: vec!["temp".into(), "hum".into()],
            readings: vec![
                Reading {
                    ts_micros: 1_700_000_000_000_000,
                    values: vec![21.5, 40.0],
                    true_label: "normal".into(),
                    predictions: Vec::new(),
                },
                Reading {
                    ts_micros: 1_700_000_000_100_000,
                    values: vec![-1.25, f64::NAN],
                    true_label: String::new(),
                    predictions: Vec::new(),
                },
            ],
            loss: None,
        }
    }

    /// Pins the wire encoding of `ReadingBatch`: firmware written against
    /// `edgeloop.proto` must keep decoding what the agent sends. If this test
    /// fails, the wire contract changed.
    #[test]
    fn reading_batch_encoding_is_pinned_by_golden_bytes() {
        let bytes = sample().encode_to_vec();
        let golden: &[u8] = &[
            0x0a, 0x05, b'd', b'e', b'v', b'-', b'1', // 1: device_id
            0x12, 0x03, b'f', b'3', b'2', // 2: profile
            0x18, 0xac, 0x02, // 3: first_seq = 300
            0x22, 0x04, b't', b'e', b'm', b'p', // 4: channels[0]
            0x22, 0x03, b'h', b'u', b'm', // 4: channels[1]
            0x2a, 0x23, // 5: readings[0], 35 bytes
            0x08, 0x80, 0x80, 0xf9, 0xc0, 0xc1, 0xc4, 0x82, 0x03, // 1: ts_micros
            0x12, 0x10, // values, packed, 16 bytes
            0x00, 0x00, 0x00, 0x00, 0x00, 0x80, 0x35, 0x40, // 21.5
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x44, 0x40, // 40.0
            0x1a, 0x06, b'n', b'o', b'r', b'm', b'a', b'l', // true_label
            0x2a, 0x1b, // 5: readings[1], 27 bytes
            0x08, 0xa0, 0x8d, 0xff, 0xc0, 0xc1, 0xc4, 0x82, 0x03, // 1: ts_micros
            0x12, 0x10, // values
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf4, 0xbf, // -1.25
            0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x7f, // NaN
        ];
        assert_eq!(bytes, golden, "encoded: {bytes:02x?}");
        let decoded = ReadingBatch::decode(golden).expect("golden bytes decode");
        assert_eq!(decoded.device_id, "dev-1");
        assert_eq!(decoded.first_seq, 300);
        assert_eq!(decoded.end_seq(), 302);
        assert_eq!(decoded.readings[0].values, vec![21.5, 40.0]);
        assert!(decoded.readings[1].values[1].is_nan());
    }

    #[test]
    fn truncated_batch_is_an_error_not_a_panic() {
        let bytes = sample().encode_to_vec();
        for cut in 1..bytes.len() {
            // Every prefix either decodes (ending on a field boundary) or
            // errors; none panics.
            let _ = ReadingBatch::decode(&bytes[..cut]);
        }
        assert!(ReadingBatch::decode(&bytes[..bytes.len() - 3]).is_err());
    }
}
