//! Decoding and checking one Kafka record of `edgeloop.readings`.
//!
//! The check is [`edgeloop_proto::validate`]'s, the one the broker's bridge
//! ran before acknowledging the batch: the record's key is the sending
//! device, a payload naming another one is refused, and so are seqs past
//! 2^63 − 1, bad channels, too many of them, wrong value counts and
//! timestamps outside 1970–2099. A refused record gets its reason, a
//! sentence, and goes to the dead-letter topic; when its seqs are real
//! ([`Refused::lost`]) the caller also records them in `losses`.
//!
//! A value that is not finite (NaN, +inf, −inf) is "no value": it is made NaN
//! here, so every later stage (labels, training, the Parquet sink, where it
//! is null) sees one kind of missing value.

use edgeloop_proto::v1::ReadingBatch;
pub use edgeloop_proto::validate::{BatchLimits, Refused};

/// Decodes and checks a record's payload (`key`: the Kafka key, the device
/// that sent it), with every non-finite value made NaN.
pub fn decode(
    key: Option<&[u8]>,
    payload: &[u8],
    limits: &BatchLimits,
) -> Result<ReadingBatch, Refused> {
    let key = key.map(String::from_utf8_lossy).unwrap_or_default();
    let mut batch = edgeloop_proto::validate::decode_batch(&key, payload, limits)?;
    for reading in &mut batch.readings {
        for v in &mut reading.values {
            if !v.is_finite() {
                *v = f64::NAN;
            }
        }
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_proto::v1::Reading;
    use edgeloop_proto::validate::{Invalid, LostSeqs};
    use edgeloop_proto::Message as _;

    fn batch() -> ReadingBatch {
        ReadingBatch {
            device_id: "d1".into(),
            profile: "f32".into(),
            first_seq: 0,
            channels: vec!["temp".into()],
            readings: vec![Reading {
                ts_micros: 1,
                values: vec![1.0],
                true_label: String::new(),
                predictions: Vec::new(),
            }],
            loss: None,
        }
    }

    fn decoded(key: &[u8], b: &ReadingBatch) -> Result<ReadingBatch, Refused> {
        decode(Some(key), &b.encode_to_vec(), &BatchLimits::default())
    }

    #[test]
    fn loss_report_with_readings_or_an_empty_range_is_refused() {
        let loss = |first, end| edgeloop_proto::v1::LossReport {
            device_id: "d1".into(),
            first_seq: first,
            end_seq: end,
            reason: "evicted_full".into(),
            detected_at_micros: 0,
        };
        let mut b = batch();
        b.loss = Some(loss(0, 10));
        assert!(matches!(
            decoded(b"d1", &b).map_err(|r| r.reason),
            Err(Invalid::BadLoss { .. })
        ));
        b.readings.clear();
        assert!(decoded(b"d1", &b).is_ok());
        b.loss = Some(loss(0, 0));
        assert!(matches!(
            decoded(b"d1", &b).map_err(|r| r.reason),
            Err(Invalid::BadLoss { .. })
        ));
    }

    #[test]
    fn well_formed_batch_is_accepted() {
        assert_eq!(decoded(b"d1", &batch()), Ok(batch()));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = decode(
            Some(b"d1"),
            b"\xff\xff\xff not protobuf",
            &BatchLimits::default(),
        )
        .expect_err("refused");
        assert!(
            err.to_string().starts_with("payload does not decode"),
            "{err}"
        );
        assert_eq!(err.lost, None);
    }

    #[test]
    fn mismatched_key_wrong_value_count_and_reserved_channel_are_refused() {
        assert!(matches!(
            decoded(b"d2", &batch()).map_err(|r| r.reason),
            Err(Invalid::DeviceMismatch { .. })
        ));
        let mut b = batch();
        b.readings[0].values.push(2.0);
        let refused = decoded(b"d1", &b).expect_err("refused");
        assert!(matches!(refused.reason, Invalid::ValueCount { .. }));
        assert_eq!(
            refused.lost,
            Some(LostSeqs {
                first_seq: 0,
                end_seq: 1,
                profile: "f32".into()
            }),
            "a content refusal keeps its seqs, to be recorded as lost"
        );
        let mut b = batch();
        b.channels[0] = "seq".into();
        assert!(matches!(
            decoded(b"d1", &b).map_err(|r| r.reason),
            Err(Invalid::BadChannel { .. })
        ));
    }

    #[test]
    fn a_batch_naming_another_device_than_its_key_is_refused_with_no_seqs_to_record() {
        let refused = decoded(b"forger", &batch()).expect_err("refused");
        assert!(
            refused.to_string().contains("came from device \"forger\""),
            "{refused}"
        );
        assert_eq!(refused.lost, None);
        assert!(decode(None, &batch().encode_to_vec(), &BatchLimits::default()).is_err());
    }

    #[test]
    fn timestamps_outside_1970_to_2099_are_refused() {
        for ts in [i64::MAX, i64::MIN, 32_503_680_000_000_000] {
            let mut b = batch();
            b.readings[0].ts_micros = ts;
            let refused = decoded(b"d1", &b).expect_err("refused");
            assert!(
                matches!(refused.reason, Invalid::TimestampOutOfRange { ts_micros, .. } if ts_micros == ts),
                "{refused}"
            );
        }
    }

    #[test]
    fn nan_and_both_infinities_become_the_same_missing_value() {
        let mut b = batch();
        b.channels = vec!["a".into(), "b".into(), "c".into(), "d".into()];
        b.readings[0].values = vec![f64::NAN, f64::INFINITY, f64::NEG_INFINITY, -0.5];
        let got = decoded(b"d1", &b).expect("accepted");
        let values = &got.readings[0].values;
        assert!(values[..3].iter().all(|v| v.is_nan()), "{values:?}");
        assert_eq!(values[3], -0.5);
    }

    #[test]
    fn a_batch_over_the_channel_limit_is_refused() {
        let mut b = batch();
        b.channels = (0..3000).map(|i| format!("c{i}")).collect();
        b.readings[0].values = vec![0.0; 3000];
        assert!(matches!(
            decoded(b"d1", &b).map_err(|r| r.reason),
            Err(Invalid::TooManyChannels { channels: 3000, .. })
        ));
    }
}
