//! The batch and status validation (`edgeloop_proto::validate`), which the
//! broker's bridge and the processor both run on every payload a device
//! sends: it must not panic on any bytes, and what it accepts or refuses
//! must keep its promises. An accepted batch is the sending device's own,
//! has possible seqs, one value per channel, no more channels than the
//! limit and timestamps in range; a refusal hands the bridge seqs to
//! acknowledge only when they are real, and never past 2^63 - 1. Each input
//! is judged as coming from the device it names and from another one.
#![no_main]

use edgeloop_proto::validate::{self, BatchLimits, MAX_SEQ};
use edgeloop_proto::v1::ReadingBatch;
use edgeloop_proto::Message as _;
use libfuzzer_sys::fuzz_target;

fn check(device: &str, data: &[u8], limits: &BatchLimits) {
    match validate::decode_batch(device, data, limits) {
        Ok(batch) => {
            assert_eq!(batch.device_id, device);
            assert!(batch.first_seq <= MAX_SEQ && batch.end_seq() <= MAX_SEQ);
            assert!(batch.channels.len() <= limits.max_channels_of(&batch.profile));
            for r in &batch.readings {
                assert_eq!(r.values.len(), batch.channels.len());
                assert!(validate::ts_in_range(r.ts_micros));
            }
            if let Some(loss) = &batch.loss {
                assert!(batch.readings.is_empty());
                assert!(loss.first_seq == batch.first_seq && loss.end_seq > loss.first_seq);
            }
        }
        Err(refused) => {
            let _ = refused.to_string();
            assert_eq!(refused.lost.is_some(), refused.reason.seqs_are_real());
            if let Some(lost) = &refused.lost {
                assert!(lost.first_seq <= lost.end_seq && lost.end_seq <= MAX_SEQ);
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let limits = BatchLimits {
        max_channels: 4,
        ..BatchLimits::default()
    };
    let named = ReadingBatch::decode(data)
        .map(|b| b.device_id)
        .unwrap_or_default();
    for device in [named.as_str(), "device-0000"] {
        check(device, data, &limits);
        check(device, data, &BatchLimits::default());
        if let Ok(status) = validate::decode_status(device, data) {
            assert_eq!(status.device_id, device);
            assert!(validate::ts_in_range(status.ts_micros));
            assert!(status.acked_seq <= MAX_SEQ && status.next_seq <= MAX_SEQ);
        }
    }
});
