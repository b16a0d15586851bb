//! Decoding and checking one Kafka record of `edgeloop.readings`.
//!
//! A record is accepted only if it decodes as a `ReadingBatch`, its device id
//! is valid and equals the record's key, every reading has one value per
//! channel, and no channel name collides with a fixed column. Anything else
//! gets a reason, a sentence, and goes to the dead-letter topic.

use edgeloop_proto::v1::ReadingBatch;
use edgeloop_proto::Message;

/// Column names the data set reserves; a channel may not use them.
pub const RESERVED_COLUMNS: &[&str] = &[
    "device_id",
    "profile",
    "seq",
    "ts",
    "true_label",
    "kafka_partition",
    "kafka_offset",
    "date",
    "hour",
];

/// Why a record was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("payload does not decode as a ReadingBatch: {0}")]
    Undecodable(String),
    #[error("the batch's device_id {batch:?} differs from the Kafka key {key:?}")]
    KeyMismatch { batch: String, key: String },
    #[error("invalid device id: {0}")]
    DeviceId(String),
    #[error("channel {index} is named {name:?}, which is not a valid column name")]
    BadChannel { index: usize, name: String },
    #[error("channel name {0:?} appears twice")]
    DuplicateChannel(String),
    #[error("reading {index} has {values} values for {channels} channels")]
    ValueCount {
        index: usize,
        values: usize,
        channels: usize,
    },
    #[error("the batch's seq range overflows (first_seq {0})")]
    SeqOverflow(u64),
    #[error("a loss report must carry no readings and cover first_seq {first}.. (it covers {loss_first}..{loss_end} with {readings} readings)")]
    BadLoss {
        first: u64,
        loss_first: u64,
        loss_end: u64,
        readings: usize,
    },
}

/// Decodes and checks a record's payload.
pub fn decode(key: Option<&[u8]>, payload: &[u8]) -> Result<ReadingBatch, Refused> {
    let batch = ReadingBatch::decode(payload).map_err(|e| Refused::Undecodable(e.to_string()))?;
    edgeloop_proto::device_id::validate(&batch.device_id).map_err(Refused::DeviceId)?;
    let key = key.map(String::from_utf8_lossy).unwrap_or_default();
    if key != batch.device_id {
        return Err(Refused::KeyMismatch {
            batch: batch.device_id.clone(),
            key: key.into_owned(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for (index, name) in batch.channels.iter().enumerate() {
        let valid = !name.is_empty()
            && name.len() <= 64
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !RESERVED_COLUMNS.contains(&name.as_str());
        if !valid {
            return Err(Refused::BadChannel {
                index,
                name: name.clone(),
            });
        }
        if !seen.insert(name) {
            return Err(Refused::DuplicateChannel(name.clone()));
        }
    }
    for (index, r) in batch.readings.iter().enumerate() {
        if r.values.len() != batch.channels.len() {
            return Err(Refused::ValueCount {
                index,
                values: r.values.len(),
                channels: batch.channels.len(),
            });
        }
    }
    if let Some(loss) = &batch.loss {
        if !batch.readings.is_empty()
            || loss.first_seq != batch.first_seq
            || loss.end_seq <= loss.first_seq
        {
            return Err(Refused::BadLoss {
                first: batch.first_seq,
                loss_first: loss.first_seq,
                loss_end: loss.end_seq,
                readings: batch.readings.len(),
            });
        }
    }
    if batch
        .first_seq
        .checked_add(batch.readings.len() as u64)
        .is_none()
        || batch.end_seq() > i64::MAX as u64
    {
        return Err(Refused::SeqOverflow(batch.first_seq));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_proto::v1::Reading;

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
            decode(Some(b"d1"), &b.encode_to_vec()),
            Err(Refused::BadLoss { .. })
        ));
        b.readings.clear();
        assert!(decode(Some(b"d1"), &b.encode_to_vec()).is_ok());
        b.loss = Some(loss(0, 0));
        assert!(matches!(
            decode(Some(b"d1"), &b.encode_to_vec()),
            Err(Refused::BadLoss { .. })
        ));
    }

    #[test]
    fn well_formed_batch_is_accepted() {
        let bytes = batch().encode_to_vec();
        assert_eq!(decode(Some(b"d1"), &bytes), Ok(batch()));
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let err = decode(Some(b"d1"), b"\xff\xff\xff not protobuf").expect_err("refused");
        assert!(
            err.to_string().starts_with("payload does not decode"),
            "{err}"
        );
    }

    #[test]
    fn mismatched_key_wrong_value_count_and_reserved_channel_are_refused() {
        let bytes = batch().encode_to_vec();
        assert!(matches!(
            decode(Some(b"d2"), &bytes),
            Err(Refused::KeyMismatch { .. })
        ));
        let mut b = batch();
        b.readings[0].values.push(2.0);
        assert!(matches!(
            decode(Some(b"d1"), &b.encode_to_vec()),
            Err(Refused::ValueCount { .. })
        ));
        let mut b = batch();
        b.channels[0] = "seq".into();
        assert!(matches!(
            decode(Some(b"d1"), &b.encode_to_vec()),
            Err(Refused::BadChannel { .. })
        ));
    }
}
