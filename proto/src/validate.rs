//! What the cloud accepts from a device: one check of a `ReadingBatch` (and
//! of a `DeviceStatus`), run the same way by the broker's bridge, which
//! decides from it what to acknowledge, and by the processor's decode
//! stage, which decides what becomes rows. No I/O.
//!
//! **Identity.** The device a message is from is the one of its topic
//! (`telemetry/{device}`, `status/{device}`), which the broker has
//! authenticated, and after the bridge the Kafka key. A payload naming
//! another device (`ReadingBatch.device_id`, `LossReport.device_id`,
//! `DeviceStatus.device_id`) is refused, never filed under the device it
//! names.
//!
//! **What is refused, and what then happens to its seqs.** A refusal says
//! whether the seqs the batch takes in its device's stream are real
//! ([`Refused::lost`]):
//!
//! - *Not real*: the payload does not decode, names another device, has
//!   seqs past [`MAX_SEQ`], or is a loss report whose range is
//!   inconsistent. Nothing in it can be trusted to say which seqs it
//!   covers: the bridge does not acknowledge it (the device's watermark
//!   stays below it) and the processor dead-letters it.
//! - *Real* (it decodes, is the device's own, its seqs are possible, but its
//!   content is not: values per channel, channel names, too many channels,
//!   a timestamp out of range): the bridge acknowledges it like any batch,
//!   so the device does not resend it forever, and the processor
//!   dead-letters its bytes with the reason and writes a `losses` row
//!   (reason [`INVALID_BATCH`]) for its seqs, so the gap is explained in the
//!   data set (docs/device-protocol.md, "What happens to a bad payload").

use std::collections::BTreeMap;

use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::v1::{DeviceStatus, ReadingBatch};

/// The largest seq, and end of a batch's seq range, a device can have:
/// `2^63 - 1`. The data set stores seqs as Parquet `int64`, and a device
/// taking a million readings a second reaches it after 292,000 years, so a
/// seq past it is a bug or a lie, never a reading. (`u64::MAX` in
/// particular would make the ack watermark `u64::MAX`, past which the
/// device could never send again.)
pub const MAX_SEQ: u64 = i64::MAX as u64;

/// The earliest timestamp accepted, in µs since the Unix epoch:
/// 1970-01-01T00:00:00Z (a device whose clock was never set counts from
/// there).
pub const MIN_TS_MICROS: i64 = 0;

/// The latest timestamp accepted, in µs since the Unix epoch:
/// 2099-12-31T23:59:59.999999Z. Far past any device's lifetime, and well
/// inside what every reader of the data set represents (pandas' `datetime64[ns]`
/// ends in 2262, `humantime`'s RFC 3339 in 9999).
pub const MAX_TS_MICROS: i64 = 4_102_444_800_000_000 - 1;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_NAME_LEN: usize = 64;

/// The default of [`BatchLimits::max_channels`].
pub const DEFAULT_MAX_CHANNELS: usize = 64;

/// The largest value [`BatchLimits::validate`] accepts for a channel limit:
/// every channel is a column of the data set.
pub const MAX_CHANNELS_LIMIT: usize = 1024;

/// The `losses.reason` of the seqs of a batch that was refused for its
/// content (its bytes are in `edgeloop.deadletter` with the reason).
pub const INVALID_BATCH: &str = "invalid_batch";

/// Column names the data set reserves; a channel may not use them.
pub const RESERVED_COLUMNS: &[&str] = &[
    "device_id",
    "profile",
    "seq",
    "ts",
    "true_label",
    "label",
    "label_confidence",
    "rules_version",
    "predictions",
    "kafka_partition",
    "kafka_offset",
    "date",
    "hour",
];

/// Whether `ts_micros` is inside the accepted range
/// ([`MIN_TS_MICROS`]..=[`MAX_TS_MICROS`]).
pub fn ts_in_range(ts_micros: i64) -> bool {
    (MIN_TS_MICROS..=MAX_TS_MICROS).contains(&ts_micros)
}

/// Limits on what one batch may carry. The broker's bridge
/// (`bridge.batch_limits`) and the processor (`batch_limits`) must be given
/// the same: the bridge decides from them what to acknowledge, the processor
/// what becomes rows (a batch the processor refuses and the bridge took is
/// still explained by a `losses` row, but its readings are not in the data
/// set).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct BatchLimits {
    /// Channels one batch may name at most, for a device profile not listed
    /// in `max_channels_by_profile`. Each channel is a column of the data
    /// set, so this bounds how wide one device can make it. Default 64;
    /// 1 to 1024.
    pub max_channels: usize,
    /// The same limit for particular device profiles (`ReadingBatch.profile`),
    /// e.g. `{ mcu8 = 8 }`. Default: none.
    pub max_channels_by_profile: BTreeMap<String, usize>,
}

impl Default for BatchLimits {
    fn default() -> Self {
        BatchLimits {
            max_channels: DEFAULT_MAX_CHANNELS,
            max_channels_by_profile: BTreeMap::new(),
        }
    }
}

impl BatchLimits {
    /// The channel limit of `profile`.
    pub fn max_channels_of(&self, profile: &str) -> usize {
        self.max_channels_by_profile
            .get(profile)
            .copied()
            .unwrap_or(self.max_channels)
    }

    /// Checks every field; the error names the field, under `prefix`
    /// (`bridge.batch_limits`, say).
    pub fn validate(&self, prefix: &str) -> Result<(), String> {
        let ok = |n: usize| (1..=MAX_CHANNELS_LIMIT).contains(&n);
        if !ok(self.max_channels) {
            return Err(format!(
                "{prefix}.max_channels: {} is out of range; give 1 to {MAX_CHANNELS_LIMIT}",
                self.max_channels
            ));
        }
        for (profile, n) in &self.max_channels_by_profile {
            if !ok(*n) {
                return Err(format!(
                    "{prefix}.max_channels_by_profile.{profile}: {n} is out of range; give 1 to {MAX_CHANNELS_LIMIT}"
                ));
            }
        }
        Ok(())
    }
}

/// Why a batch was refused: a sentence, kept as the dead letter's `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("payload does not decode as a ReadingBatch: {0}")]
    Undecodable(String),
    #[error("invalid device id: {0}")]
    DeviceId(String),
    #[error("the batch names device {named:?} but came from device {from:?} (its topic, and the Kafka key); a device may send only its own readings")]
    DeviceMismatch { named: String, from: String },
    #[error("the batch's loss report names device {named:?} but came from device {from:?}; a device may report only its own losses")]
    LossDeviceMismatch { named: String, from: String },
    #[error("the batch's seqs {first_seq}..{end_seq} go past the largest seq a device can have ({MAX_SEQ}, 2^63 - 1)")]
    SeqOutOfRange { first_seq: u64, end_seq: u64 },
    #[error("a loss report must carry no readings and cover first_seq {first}.. (it covers {loss_first}..{loss_end} with {readings} readings)")]
    BadLoss {
        first: u64,
        loss_first: u64,
        loss_end: u64,
        readings: usize,
    },
    #[error("channel {index} is named {name:?}, which is not a valid column name (1 to {MAX_CHANNEL_NAME_LEN} letters, digits or '_', and not one of the data set's own columns)")]
    BadChannel { index: usize, name: String },
    #[error("channel name {0:?} appears twice")]
    DuplicateChannel(String),
    #[error("the batch names {channels} channels; profile {profile:?} allows at most {max}")]
    TooManyChannels {
        channels: usize,
        max: usize,
        profile: String,
    },
    #[error("reading {index} has {values} values for {channels} channels")]
    ValueCount {
        index: usize,
        values: usize,
        channels: usize,
    },
    #[error("reading {index} has timestamp {ts_micros} µs, outside the accepted range 1970-01-01T00:00:00Z to 2099-12-31T23:59:59.999999Z ({MIN_TS_MICROS}..={MAX_TS_MICROS} µs)")]
    TimestampOutOfRange { index: usize, ts_micros: i64 },
    #[error("the loss report's detected_at_micros {0} is outside the accepted range 1970-01-01T00:00:00Z to 2099-12-31T23:59:59.999999Z")]
    LossTimestampOutOfRange(i64),
}

impl Invalid {
    /// Whether the batch's seqs are real although its content is not: it
    /// decoded, is the sending device's own, and its seqs are possible and
    /// consistent. Such seqs are acknowledged and recorded as lost; any
    /// other refusal is neither.
    pub fn seqs_are_real(&self) -> bool {
        match self {
            Invalid::Undecodable(_)
            | Invalid::DeviceId(_)
            | Invalid::DeviceMismatch { .. }
            | Invalid::LossDeviceMismatch { .. }
            | Invalid::SeqOutOfRange { .. }
            | Invalid::BadLoss { .. } => false,
            Invalid::BadChannel { .. }
            | Invalid::DuplicateChannel(_)
            | Invalid::TooManyChannels { .. }
            | Invalid::ValueCount { .. }
            | Invalid::TimestampOutOfRange { .. }
            | Invalid::LossTimestampOutOfRange(_) => true,
        }
    }
}

/// The seqs a refused batch took in its device's stream, when they are real
/// ([`Invalid::seqs_are_real`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostSeqs {
    pub first_seq: u64,
    /// Exclusive.
    pub end_seq: u64,
    /// The batch's profile, as it gave it.
    pub profile: String,
}

/// A refused batch: why, and its seqs if they are real.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Refused {
    pub reason: Invalid,
    /// `Some` when the seqs are real: the bridge acknowledges them and the
    /// processor writes them to `losses` as [`INVALID_BATCH`].
    pub lost: Option<LostSeqs>,
}

/// Decodes `payload` as a `ReadingBatch` sent by `device` (its topic's
/// device, or the Kafka key) and checks it ([`check_batch`]).
pub fn decode_batch(
    device: &str,
    payload: &[u8],
    limits: &BatchLimits,
) -> Result<ReadingBatch, Refused> {
    let batch = ReadingBatch::decode(payload).map_err(|e| Refused {
        reason: Invalid::Undecodable(e.to_string()),
        lost: None,
    })?;
    match check_batch(device, &batch, limits) {
        Ok(()) => Ok(batch),
        Err(reason) => {
            let lost = reason.seqs_are_real().then(|| LostSeqs {
                first_seq: batch.first_seq,
                end_seq: batch.end_seq(),
                profile: batch.profile.clone(),
            });
            Err(Refused { reason, lost })
        }
    }
}

/// Checks a batch sent by `device`. Identity and seqs are checked before
/// content, so a refusal for content ([`Invalid::seqs_are_real`]) implies
/// the batch's seqs are `device`'s own and possible.
pub fn check_batch(
    device: &str,
    batch: &ReadingBatch,
    limits: &BatchLimits,
) -> Result<(), Invalid> {
    crate::device_id::validate(&batch.device_id).map_err(Invalid::DeviceId)?;
    if batch.device_id != device {
        return Err(Invalid::DeviceMismatch {
            named: batch.device_id.clone(),
            from: device.to_string(),
        });
    }
    if let Some(loss) = &batch.loss {
        // Empty: the batch around it names the device already.
        if !loss.device_id.is_empty() && loss.device_id != device {
            return Err(Invalid::LossDeviceMismatch {
                named: loss.device_id.clone(),
                from: device.to_string(),
            });
        }
    }
    let end = match &batch.loss {
        Some(loss) => Some(loss.end_seq),
        None => batch.first_seq.checked_add(batch.readings.len() as u64),
    };
    match end {
        Some(end) if batch.first_seq <= MAX_SEQ && end <= MAX_SEQ => {}
        _ => {
            return Err(Invalid::SeqOutOfRange {
                first_seq: batch.first_seq,
                end_seq: end.unwrap_or(u64::MAX),
            })
        }
    }
    if let Some(loss) = &batch.loss {
        if !batch.readings.is_empty()
            || loss.first_seq != batch.first_seq
            || loss.end_seq <= loss.first_seq
        {
            return Err(Invalid::BadLoss {
                first: batch.first_seq,
                loss_first: loss.first_seq,
                loss_end: loss.end_seq,
                readings: batch.readings.len(),
            });
        }
        if !ts_in_range(loss.detected_at_micros) {
            return Err(Invalid::LossTimestampOutOfRange(loss.detected_at_micros));
        }
    }
    let max = limits.max_channels_of(&batch.profile);
    if batch.channels.len() > max {
        return Err(Invalid::TooManyChannels {
            channels: batch.channels.len(),
            max,
            profile: batch.profile.clone(),
        });
    }
    for (index, name) in batch.channels.iter().enumerate() {
        let valid = !name.is_empty()
            && name.len() <= MAX_CHANNEL_NAME_LEN
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
            && !RESERVED_COLUMNS.contains(&name.as_str());
        if !valid {
            return Err(Invalid::BadChannel {
                index,
                name: name.clone(),
            });
        }
        // Quadratic, but over at most `MAX_CHANNELS_LIMIT` short names.
        if batch.channels[..index].contains(name) {
            return Err(Invalid::DuplicateChannel(name.clone()));
        }
    }
    for (index, r) in batch.readings.iter().enumerate() {
        if r.values.len() != batch.channels.len() {
            return Err(Invalid::ValueCount {
                index,
                values: r.values.len(),
                channels: batch.channels.len(),
            });
        }
        if !ts_in_range(r.ts_micros) {
            return Err(Invalid::TimestampOutOfRange {
                index,
                ts_micros: r.ts_micros,
            });
        }
    }
    Ok(())
}

/// Why a device status was refused: a sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidStatus {
    #[error("payload does not decode as a DeviceStatus: {0}")]
    Undecodable(String),
    #[error("the status names device {named:?} but came from device {from:?} (its topic, and the Kafka key); a device may report only its own status")]
    DeviceMismatch { named: String, from: String },
    #[error("the status's ts_micros {0} is outside the accepted range 1970-01-01T00:00:00Z to 2099-12-31T23:59:59.999999Z")]
    TimestampOutOfRange(i64),
    #[error("the status's {field} {value} is past the largest seq a device can have ({MAX_SEQ}, 2^63 - 1)")]
    SeqOutOfRange { field: &'static str, value: u64 },
}

/// Decodes `payload` as a `DeviceStatus` sent by `device` and checks it
/// ([`check_status`]).
pub fn decode_status(device: &str, payload: &[u8]) -> Result<DeviceStatus, InvalidStatus> {
    let status =
        DeviceStatus::decode(payload).map_err(|e| InvalidStatus::Undecodable(e.to_string()))?;
    check_status(device, &status)?;
    Ok(status)
}

/// Checks a status sent by `device`: it names `device`, its time is in the
/// accepted range, and its seqs are possible.
pub fn check_status(device: &str, status: &DeviceStatus) -> Result<(), InvalidStatus> {
    if status.device_id != device {
        return Err(InvalidStatus::DeviceMismatch {
            named: status.device_id.clone(),
            from: device.to_string(),
        });
    }
    if !ts_in_range(status.ts_micros) {
        return Err(InvalidStatus::TimestampOutOfRange(status.ts_micros));
    }
    for (field, value) in [
        ("next_seq", status.next_seq),
        ("acked_seq", status.acked_seq),
    ] {
        if value > MAX_SEQ {
            return Err(InvalidStatus::SeqOutOfRange { field, value });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{LossReport, Reading};

    fn batch() -> ReadingBatch {
        ReadingBatch {
            device_id: "d1".into(),
            profile: "f32".into(),
            first_seq: 10,
            channels: vec!["temp".into(), "hum".into()],
            readings: vec![Reading {
                ts_micros: 1_700_000_000_000_000,
                values: vec![1.0, 2.0],
                true_label: String::new(),
                predictions: Vec::new(),
            }],
            loss: None,
        }
    }

    fn loss(first: u64, end: u64) -> ReadingBatch {
        ReadingBatch {
            channels: Vec::new(),
            readings: Vec::new(),
            first_seq: first,
            loss: Some(LossReport {
                device_id: "d1".into(),
                first_seq: first,
                end_seq: end,
                reason: "evicted_full".into(),
                detected_at_micros: 1_700_000_000_000_000,
            }),
            ..batch()
        }
    }

    fn refused(device: &str, b: &ReadingBatch) -> Refused {
        match decode_batch(device, &b.encode_to_vec(), &BatchLimits::default()) {
            Ok(b) => panic!("accepted: {b:?}"),
            Err(r) => r,
        }
    }

    #[test]
    fn a_well_formed_batch_and_loss_report_are_accepted() {
        let limits = BatchLimits::default();
        assert_eq!(
            decode_batch("d1", &batch().encode_to_vec(), &limits),
            Ok(batch())
        );
        assert!(check_batch("d1", &loss(0, 10), &limits).is_ok());
        let mut b = loss(0, 10);
        if let Some(l) = &mut b.loss {
            l.device_id.clear();
        }
        assert!(
            check_batch("d1", &b, &limits).is_ok(),
            "an empty loss device_id is the batch's"
        );
    }

    #[test]
    fn a_batch_or_loss_report_naming_another_device_is_refused_and_its_seqs_not_taken() {
        let r = refused("d2", &batch());
        assert!(matches!(r.reason, Invalid::DeviceMismatch { .. }), "{r}");
        assert_eq!(r.lost, None);
        let mut b = loss(0, 10);
        if let Some(l) = &mut b.loss {
            l.device_id = "d2".into();
        }
        let r = refused("d1", &b);
        assert!(
            matches!(r.reason, Invalid::LossDeviceMismatch { .. }),
            "{r}"
        );
        assert_eq!(r.lost, None);
    }

    #[test]
    fn garbage_is_refused_with_a_reason_and_no_seqs() {
        let r = match decode_batch("d1", b"\xff\xff\xff not protobuf", &BatchLimits::default()) {
            Ok(_) => panic!("accepted"),
            Err(r) => r,
        };
        assert!(r.to_string().starts_with("payload does not decode"), "{r}");
        assert_eq!(r.lost, None);
    }

    #[test]
    fn seqs_past_2_pow_63_are_refused_and_not_taken() {
        for first in [u64::MAX, MAX_SEQ, 1 << 63] {
            let mut b = batch();
            b.first_seq = first;
            let r = refused("d1", &b);
            assert!(
                matches!(r.reason, Invalid::SeqOutOfRange { .. }),
                "{first}: {r}"
            );
            assert_eq!(r.lost, None);
        }
        let r = refused("d1", &loss(5, u64::MAX));
        assert!(matches!(r.reason, Invalid::SeqOutOfRange { .. }), "{r}");
        // The last possible seq is fine.
        let mut b = batch();
        b.first_seq = MAX_SEQ - 1;
        assert!(check_batch("d1", &b, &BatchLimits::default()).is_ok());
    }

    #[test]
    fn bad_content_is_refused_with_its_seqs_kept_as_lost() {
        let lost = Some(LostSeqs {
            first_seq: 10,
            end_seq: 11,
            profile: "f32".into(),
        });
        let mut cases: Vec<(ReadingBatch, &str)> = Vec::new();
        let mut b = batch();
        b.readings[0].values.push(3.0);
        cases.push((b, "3 values for 2 channels"));
        let mut b = batch();
        b.readings[0].values.pop();
        cases.push((b, "1 values for 2 channels"));
        let mut b = batch();
        b.channels[1] = "temp".into();
        cases.push((b, "appears twice"));
        for bad in ["", "seq", "label", "a b", "é", &"x".repeat(65)] {
            let mut b = batch();
            b.channels[1] = bad.into();
            cases.push((b, "not a valid column name"));
        }
        for ts in [
            i64::MAX,
            i64::MIN,
            -1,
            32_503_680_000_000_000,
            MAX_TS_MICROS + 1,
        ] {
            let mut b = batch();
            b.readings[0].ts_micros = ts;
            cases.push((b, "outside the accepted range"));
        }
        for (b, why) in cases {
            let r = refused("d1", &b);
            assert!(r.to_string().contains(why), "{r} (expected {why:?})");
            assert!(r.reason.seqs_are_real());
            assert_eq!(r.lost, lost, "{r}");
        }
        let mut b = loss(0, 10);
        if let Some(l) = &mut b.loss {
            l.detected_at_micros = i64::MAX;
        }
        assert_eq!(refused("d1", &b).lost.map(|l| l.end_seq), Some(10));
    }

    #[test]
    fn a_batch_wider_than_its_profiles_limit_is_refused() {
        let mut b = batch();
        b.channels = (0..3000).map(|i| format!("c{i}")).collect();
        b.readings[0].values = vec![0.0; 3000];
        let r = refused("d1", &b);
        assert!(
            matches!(
                r.reason,
                Invalid::TooManyChannels {
                    channels: 3000,
                    max: 64,
                    ..
                }
            ),
            "{r}"
        );
        let mut limits = BatchLimits::default();
        limits.max_channels_by_profile.insert("f32".into(), 1);
        assert!(matches!(
            check_batch("d1", &batch(), &limits),
            Err(Invalid::TooManyChannels { max: 1, .. })
        ));
        limits.max_channels = 3000;
        limits.max_channels_by_profile.clear();
        assert!(check_batch("d1", &b, &limits).is_ok());
    }

    #[test]
    fn inconsistent_loss_reports_are_refused_and_not_taken() {
        let mut with_readings = loss(0, 10);
        with_readings.readings = batch().readings;
        let mut shifted = loss(0, 10);
        shifted.first_seq = 3;
        for b in [with_readings, shifted, loss(5, 5), loss(5, 2)] {
            let r = refused("d1", &b);
            assert!(matches!(r.reason, Invalid::BadLoss { .. }), "{r}");
            assert_eq!(r.lost, None);
        }
    }

    #[test]
    fn limits_out_of_range_are_refused_naming_the_field() {
        assert!(BatchLimits::default().validate("x").is_ok());
        let e = BatchLimits {
            max_channels: 0,
            ..BatchLimits::default()
        }
        .validate("bridge.batch_limits")
        .unwrap_err();
        assert!(e.starts_with("bridge.batch_limits.max_channels:"), "{e}");
        let mut l = BatchLimits::default();
        l.max_channels_by_profile.insert("mcu8".into(), 5000);
        let e = l.validate("batch_limits").unwrap_err();
        assert!(
            e.starts_with("batch_limits.max_channels_by_profile.mcu8:"),
            "{e}"
        );
        let parsed: BatchLimits =
            toml::from_str("max_channels = 16\nmax_channels_by_profile = { mcu8 = 8 }").unwrap();
        assert_eq!(parsed.max_channels_of("mcu8"), 8);
        assert_eq!(parsed.max_channels_of("f32"), 16);
        assert!(toml::from_str::<BatchLimits>("max_chanels = 1").is_err());
    }

    fn status() -> DeviceStatus {
        DeviceStatus {
            device_id: "d1".into(),
            ts_micros: 1_700_000_000_000_000,
            online: true,
            ..DeviceStatus::default()
        }
    }

    #[test]
    fn a_status_naming_another_device_or_out_of_range_is_refused() {
        assert_eq!(decode_status("d1", &status().encode_to_vec()), Ok(status()));
        assert!(matches!(
            check_status("d2", &status()),
            Err(InvalidStatus::DeviceMismatch { .. })
        ));
        let mut s = status();
        s.device_id.clear();
        assert!(matches!(
            check_status("d1", &s),
            Err(InvalidStatus::DeviceMismatch { .. })
        ));
        for ts in [i64::MAX, i64::MIN, 32_503_680_000_000_000] {
            let mut s = status();
            s.ts_micros = ts;
            assert_eq!(
                check_status("d1", &s),
                Err(InvalidStatus::TimestampOutOfRange(ts))
            );
        }
        let mut s = status();
        s.acked_seq = u64::MAX;
        assert!(matches!(
            check_status("d1", &s),
            Err(InvalidStatus::SeqOutOfRange {
                field: "acked_seq",
                ..
            })
        ));
        assert!(decode_status("d1", b"\xff\xff").is_err());
    }

    #[test]
    fn the_accepted_time_range_is_1970_to_2099() {
        assert!(ts_in_range(0));
        assert!(ts_in_range(MAX_TS_MICROS));
        assert!(!ts_in_range(-1));
        assert!(!ts_in_range(MAX_TS_MICROS + 1));
        // 2100-01-01T00:00:00Z is 4,102,444,800 s after the epoch.
        assert_eq!((MAX_TS_MICROS + 1) / 1_000_000, 4_102_444_800);
    }
}
