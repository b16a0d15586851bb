//! The durable spool: a bounded log of segment files on the device's disk.
//!
//! # On-disk format
//!
//! ```text
//! {dir}/segments/{first_seq:020}.seg   the log, oldest first
//! {dir}/losses.log                     loss ranges not yet acknowledged
//! {dir}/acked                          the ack watermark: u64 | crc32c u32
//! {dir}/quarantine/                    what recovery moved aside (never deleted)
//! ```
//!
//! A segment starts with a header, then records, one per reading:
//!
//! ```text
//! header: "ELSPSEG1" | first_seq u64 | channel count u16 | (len u16, utf-8 name)* | crc32c u32
//! record: len u32 | crc32c u32 | seq u64 | payload (len bytes: a protobuf `Reading`)
//! ```
//!
//! All integers are little-endian. A record's CRC32C covers its `seq` and
//! payload; the header's covers every header byte before it. Records of a
//! segment have consecutive seqs from `first_seq`, so the next `seq` is the
//! end of the newest segment: it keeps rising across restarts. The newest
//! segment is never deleted, and every start opens a new one, so the file
//! name always records where seq stands even when everything is acknowledged.
//!
//! `losses.log` holds records of the same layout whose payload is a protobuf
//! `LossReport` and whose `seq` is the report's first seq.
//!
//! # Durability
//!
//! Appends go to a buffer; [`DiskSpool::sync`] writes and fsyncs it (group
//! commit: the agent calls it every `sync_interval`, or sooner once
//! `sync_bytes` are waiting; never once per reading). Only fsynced readings
//! are served to the uplink, so no reading leaves the device before it is on
//! its disk, and a seq that reached the cloud is never reused after a crash.
//! `acked` is rewritten (create, fsync, rename) at a sync at most every
//! `ack_persist_interval` and at [`Spool::close`]; on open the watermark is
//! the higher of it and the oldest segment left, so a crash can only make the
//! agent send again what was acknowledged since.
//!
//! # Recovery rules (on open)
//!
//! - A segment whose header is invalid, or whose records fail their checksum
//!   anywhere but at the tail of the newest segment (zero-filled blocks fail
//!   it too), is moved to `quarantine/`; its seq range is reported lost.
//! - An invalid record at the tail of the newest segment is a torn write: the
//!   file is cut there and the cut bytes are moved to `quarantine/`. Those
//!   readings were never fsynced, so never sent, and their seqs are reused.
//! - A seq range between two segments that no file holds (a deleted file) is
//!   reported lost.
//! - The agent always starts: recovery never fails on bad data, only on I/O
//!   errors (a disk that cannot be read or written).
//!
//! Every lost range becomes a [`Loss`] that the uplink sends upstream in the
//! place of the lost seqs, so the ack watermark passes them and analysts see
//! why the gap is there.
//!
//! # Bounds
//!
//! `max_bytes` bounds the segments on disk and `max_age` the age of the
//! oldest reading. When full, `drop_oldest` evicts the oldest segment,
//! `drop_newest` drops the incoming readings (they still take their seqs, so
//! the loss is a range like any other), and `block` refuses them so the
//! source waits. A segment is deleted otherwise only when every reading in it
//! is acknowledged.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeloop_proto::v1::{LossReport, Reading, ReadingBatch};
use edgeloop_proto::Message;
use serde::{Deserialize, Serialize};

use super::{Backlog, Chunk, Relayed, Spool, SpoolError};

const MAGIC: &[u8; 8] = b"ELSPSEG1";
/// len + crc + seq
const RECORD_HEADER: usize = 16;
/// Largest record payload accepted when reading back (a reading is far smaller).
const MAX_PAYLOAD: u32 = 1 << 20;

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Evict the oldest segment (reported as a loss).
    #[default]
    DropOldest,
    /// Drop the incoming readings (reported as a loss).
    DropNewest,
    /// Refuse them: the source slows down.
    Block,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DiskSpoolConfig {
    /// Directory of the spool.
    pub dir: PathBuf,
    /// Bytes of segments on disk at most.
    pub max_bytes: u64,
    /// Readings older than this are evicted (segment by segment).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// A segment is closed and a new one started at this size.
    pub segment_bytes: u64,
    /// Group commit: fsync at least this often (200 ms: a device that loses
    /// power loses at most the readings of the last interval; each sync's
    /// readings go out together, see `uplink.linger`)…
    #[serde(with = "humantime_serde")]
    pub sync_interval: Duration,
    /// …or as soon as this many bytes wait.
    pub sync_bytes: u64,
    /// The ack watermark is written to `acked` (a small file: create, fsync,
    /// rename) at a sync at most this often, and when the spool closes.
    /// After a crash the agent resends what was acknowledged since, which
    /// the cloud skips. 0s: at every sync where it moved.
    #[serde(with = "humantime_serde")]
    pub ack_persist_interval: Duration,
    /// What to do when full.
    pub full_policy: FullPolicy,
}

impl Default for DiskSpoolConfig {
    fn default() -> Self {
        DiskSpoolConfig {
            dir: PathBuf::from("spool"),
            max_bytes: 1 << 30,
            max_age: Duration::from_secs(7 * 24 * 3600),
            segment_bytes: 8 << 20,
            sync_interval: Duration::from_millis(200),
            sync_bytes: 1 << 20,
            ack_persist_interval: Duration::from_secs(1),
            full_policy: FullPolicy::DropOldest,
        }
    }
}

impl DiskSpoolConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.dir.as_os_str().is_empty() {
            return Err("dir: must not be empty".into());
        }
        if self.segment_bytes < 4096 {
            return Err("segment_bytes: must be at least 4096".into());
        }
        if self.max_bytes < 2 * self.segment_bytes {
            return Err(format!(
                "max_bytes: {} must be at least twice segment_bytes ({})",
                self.max_bytes, self.segment_bytes
            ));
        }
        if self.sync_interval.is_zero() {
            return Err("sync_interval: must be longer than zero".into());
        }
        Ok(())
    }
}

/// A range of seqs lost on the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loss {
    pub first_seq: u64,
    pub end_seq: u64,
    pub reason: String,
    pub detected_at_micros: i64,
}

/// Something recovery found and did, for the log and `edgeloop spool check`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryEvent {
    /// A segment failed its checksum and was moved aside; its range is lost.
    Quarantined {
        segment: String,
        moved_to: PathBuf,
        first_seq: u64,
        end_seq: u64,
        reason: String,
    },
    /// A torn tail was cut from the newest segment.
    TornTail {
        segment: String,
        at_seq: u64,
        bytes: u64,
        moved_to: PathBuf,
    },
    /// No segment holds this range (a file was deleted).
    Missing { first_seq: u64, end_seq: u64 },
    /// A record of losses.log was unreadable and skipped.
    BadLossRecord { offset: u64 },
}

impl std::fmt::Display for RecoveryEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryEvent::Quarantined { segment, moved_to, first_seq, end_seq, reason } => write!(
                f,
                "spool segment {segment} {reason}; quarantined as {}; seqs {first_seq}..{end_seq} lost",
                moved_to.display()
            ),
            RecoveryEvent::TornTail { segment, at_seq, bytes, moved_to } => write!(
                f,
                "spool segment {segment} had a torn tail at seq {at_seq}: {bytes} bytes cut (never fsynced, never sent), kept as {}",
                moved_to.display()
            ),
            RecoveryEvent::Missing { first_seq, end_seq } => {
                write!(f, "no spool segment holds seqs {first_seq}..{end_seq} (a file was deleted); they are lost")
            }
            RecoveryEvent::BadLossRecord { offset } => {
                write!(f, "losses.log has an unreadable record at byte {offset}; skipped")
            }
        }
    }
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    end_seq: u64,
    bytes: u64,
    /// Byte offset where records start.
    data_start: u64,
    /// Timestamp of the newest reading (for max_age).
    newest_ts_micros: i64,
    /// Timestamp of the oldest reading.
    oldest_ts_micros: Option<i64>,
    channels: Vec<String>,
    path: PathBuf,
}

struct Active {
    writer: BufWriter<File>,
    /// Bytes written to the writer and not yet fsynced.
    unsynced: u64,
}

/// Sequential-read position cache: (segment first_seq, seq, byte offset).
type ReadCursor = (u64, u64, u64);

pub struct DiskSpool {
    config: DiskSpoolConfig,
    segments: VecDeque<Segment>,
    active: Option<Active>,
    losses: Vec<Loss>,
    /// Everything below is acknowledged.
    acked: u64,
    /// The watermark last written to `acked` (written at sync time), and when.
    persisted_acked: u64,
    acked_persisted_at: Option<std::time::Instant>,
    /// Readings below this are fsynced.
    synced_end: u64,
    next_seq: u64,
    total_bytes: u64,
    cursor: Option<ReadCursor>,
    /// Channels of the active segment.
    channels: Vec<String>,
    /// Bytes of the active segment known to be fsynced.
    active_synced_len: u64,
    /// Seqs lost since open (including what open found).
    lost_total: u64,
    recovery: Vec<RecoveryEvent>,
}

fn io(action: &'static str, path: &Path, source: std::io::Error) -> SpoolError {
    SpoolError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn encode_header(first_seq: u64, channels: &[String]) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(MAGIC);
    h.extend_from_slice(&first_seq.to_le_bytes());
    h.extend_from_slice(&(channels.len() as u16).to_le_bytes());
    for c in channels {
        let bytes = &c.as_bytes()[..c.len().min(u16::MAX as usize)];
        h.extend_from_slice(&(bytes.len() as u16).to_le_bytes());
        h.extend_from_slice(bytes);
    }
    let crc = crc32c::crc32c(&h);
    h.extend_from_slice(&crc.to_le_bytes());
    h
}

/// Parses a segment header; `None` if it is invalid.
pub fn decode_header(bytes: &[u8]) -> Option<(u64, Vec<String>, usize)> {
    let take = |at: usize, n: usize| bytes.get(at..at + n);
    if take(0, 8)? != MAGIC {
        return None;
    }
    let first_seq = u64::from_le_bytes(take(8, 8)?.try_into().ok()?);
    let count = u16::from_le_bytes(take(16, 2)?.try_into().ok()?) as usize;
    let mut at = 18;
    let mut channels = Vec::with_capacity(count.min(256));
    for _ in 0..count {
        let len = u16::from_le_bytes(take(at, 2)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(take(at + 2, len)?).ok()?;
        channels.push(name.to_string());
        at += 2 + len;
    }
    let crc = u32::from_le_bytes(take(at, 4)?.try_into().ok()?);
    (crc32c::crc32c(&bytes[..at]) == crc).then_some((first_seq, channels, at + 4))
}

fn encode_record(seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    let mut checked = Vec::with_capacity(8 + payload.len());
    checked.extend_from_slice(&seq.to_le_bytes());
    checked.extend_from_slice(payload);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&checked).to_le_bytes());
    out.extend_from_slice(&checked);
}

/// A decoded record: (seq, payload, bytes taken).
pub type Record<'a> = (u64, &'a [u8], usize);

/// Why a record could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordError {
    /// The bytes end inside the record.
    Truncated,
    /// The length is implausible or the checksum does not match.
    Corrupt,
}

/// Decodes the record at the start of `bytes`. Never panics.
pub fn decode_record(bytes: &[u8]) -> Result<Record<'_>, RecordError> {
    let header = bytes.get(..RECORD_HEADER).ok_or(RecordError::Truncated)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_PAYLOAD {
        return Err(RecordError::Corrupt);
    }
    let total = RECORD_HEADER + len as usize;
    let checked = bytes.get(8..total).ok_or(RecordError::Truncated)?;
    if crc32c::crc32c(checked) != crc {
        return Err(RecordError::Corrupt);
    }
    let seq = u64::from_le_bytes([
        checked[0], checked[1], checked[2], checked[3], checked[4], checked[5], checked[6],
        checked[7],
    ]);
    Ok((seq, &checked[8..], total))
}

/// What a scan of one segment file found.
#[derive(Debug)]
pub struct SegmentScan {
    pub first_seq: u64,
    pub channels: Vec<String>,
    pub records: u64,
    pub data_start: u64,
    /// Bytes of valid header and records.
    pub valid_bytes: u64,
    pub file_bytes: u64,
    pub oldest_ts_micros: Option<i64>,
    pub newest_ts_micros: i64,
    /// Set when a record failed (or the header did): why.
    pub problem: Option<String>,
}

/// Reads and checks a whole segment file.
pub fn scan_segment(path: &Path) -> Result<SegmentScan, SpoolError> {
    let bytes = fs::read(path).map_err(|e| io("reading", path, e))?;
    let mut scan = SegmentScan {
        first_seq: 0,
        channels: Vec::new(),
        records: 0,
        data_start: 0,
        valid_bytes: 0,
        file_bytes: bytes.len() as u64,
        oldest_ts_micros: None,
        newest_ts_micros: 0,
        problem: None,
    };
    let Some((first_seq, channels, header_len)) = decode_header(&bytes) else {
        scan.problem = Some("has an invalid header".into());
        return Ok(scan);
    };
    scan.first_seq = first_seq;
    scan.channels = channels;
    scan.data_start = header_len as u64;
    let mut at = header_len;
    while at < bytes.len() {
        match decode_record(&bytes[at..]) {
            Ok((seq, payload, taken)) => {
                let expected = first_seq + scan.records;
                if seq != expected {
                    scan.problem = Some(format!(
                        "has seq {seq} at byte {at} where {expected} was due"
                    ));
                    break;
                }
                match Reading::decode(payload) {
                    Ok(r) => {
                        scan.oldest_ts_micros.get_or_insert(r.ts_micros);
                        scan.newest_ts_micros = scan.newest_ts_micros.max(r.ts_micros);
                    }
                    Err(_) => {
                        scan.problem = Some(format!("has an undecodable reading at byte {at}"));
                        break;
                    }
                }
                scan.records += 1;
                at += taken;
            }
            Err(e) => {
                scan.problem = Some(match e {
                    RecordError::Truncated => format!("ends inside a record at byte {at}"),
                    RecordError::Corrupt => format!("failed its checksum at byte {at}"),
                });
                break;
            }
        }
    }
    scan.valid_bytes = at as u64;
    Ok(scan)
}

impl DiskSpool {
    /// Opens (or creates) the spool in `config.dir`, recovering from whatever
    /// a crash or power cut left. `channels` are those of the readings that
    /// will be appended. Fails only on I/O errors.
    pub fn open(config: DiskSpoolConfig, channels: Vec<String>) -> Result<DiskSpool, SpoolError> {
        let seg_dir = config.dir.join("segments");
        let quarantine = config.dir.join("quarantine");
        fs::create_dir_all(&seg_dir).map_err(|e| io("creating", &seg_dir, e))?;
        let mut recovery = Vec::new();
        let mut losses = load_losses(&config.dir.join("losses.log"), &mut recovery)?;

        let mut names: Vec<(u64, PathBuf)> = Vec::new();
        for entry in fs::read_dir(&seg_dir).map_err(|e| io("listing", &seg_dir, e))? {
            let path = entry.map_err(|e| io("listing", &seg_dir, e))?.path();
            let first = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|n| n.parse::<u64>().ok());
            match first {
                Some(first) => names.push((first, path)),
                None => {
                    let moved = move_aside(&path, &quarantine)?;
                    tracing::warn!(path = %path.display(), moved = %moved.display(), "unexpected file in the spool moved aside");
                }
            }
        }
        names.sort();

        let mut segments: VecDeque<Segment> = VecDeque::new();
        let count = names.len();
        for (i, (first, path)) in names.iter().enumerate() {
            let newest = i + 1 == count;
            let next_first = names.get(i + 1).map(|(f, _)| *f);
            let scan = scan_segment(path)?;
            let name = segment_name(*first);
            let header_ok = scan.data_start > 0 && scan.first_seq == *first;
            match (&scan.problem, header_ok, newest) {
                (None, true, _) => {}
                (Some(_), true, true) => {
                    // A torn tail of the newest segment: cut it, keep the bytes.
                    let at_seq = first + scan.records;
                    let tail = cut_tail(path, scan.valid_bytes, &quarantine, &name)?;
                    recovery.push(RecoveryEvent::TornTail {
                        segment: name,
                        at_seq,
                        bytes: scan.file_bytes - scan.valid_bytes,
                        moved_to: tail,
                    });
                }
                (problem, _, _) => {
                    let moved = move_aside(path, &quarantine)?;
                    // A segment's range ends where the next one starts; the
                    // newest one's end is unknown beyond its valid records.
                    let end = next_first.unwrap_or(first + scan.records).max(*first);
                    let reason = problem
                        .clone()
                        .unwrap_or_else(|| "has a header for another seq".into());
                    recovery.push(RecoveryEvent::Quarantined {
                        segment: name,
                        moved_to: moved,
                        first_seq: *first,
                        end_seq: end,
                        reason: reason.clone(),
                    });
                    if end > *first {
                        losses.push(Loss {
                            first_seq: *first,
                            end_seq: end,
                            reason: "corrupt_segment".into(),
                            detected_at_micros: now_micros(),
                        });
                    }
                    continue;
                }
            }
            let end_seq = first + scan.records;
            if let Some(prev) = segments.back() {
                let explained = losses
                    .iter()
                    .any(|l| l.first_seq <= prev.end_seq && l.end_seq >= *first);
                if prev.end_seq < *first && !explained {
                    recovery.push(RecoveryEvent::Missing {
                        first_seq: prev.end_seq,
                        end_seq: *first,
                    });
                    losses.push(Loss {
                        first_seq: prev.end_seq,
                        end_seq: *first,
                        reason: "missing_segment".into(),
                        detected_at_micros: now_micros(),
                    });
                }
            }
            segments.push_back(Segment {
                first_seq: *first,
                end_seq,
                bytes: scan.valid_bytes,
                data_start: scan.data_start,
                newest_ts_micros: scan.newest_ts_micros,
                oldest_ts_micros: scan.oldest_ts_micros,
                channels: scan.channels,
                path: path.clone(),
            });
        }
        for event in &recovery {
            tracing::warn!("{event}");
        }

        let next_seq = segments
            .back()
            .map(|s| s.end_seq)
            .into_iter()
            .chain(losses.iter().map(|l| l.end_seq))
            .chain(names.iter().map(|(f, _)| *f))
            .max()
            .unwrap_or(0);
        let acked = segments
            .front()
            .map(|s| s.first_seq)
            .into_iter()
            .chain(losses.iter().map(|l| l.first_seq))
            .min()
            .unwrap_or(next_seq);
        let acked =
            read_acked(&config.dir.join("acked")).map_or(acked, |a| a.max(acked).min(next_seq));
        losses.retain(|l| l.end_seq > acked);
        losses.sort_by_key(|l| l.first_seq);
        let total_bytes = segments.iter().map(|s| s.bytes).sum();
        let lost_total = losses.iter().map(|l| l.end_seq - l.first_seq).sum();
        let mut spool = DiskSpool {
            config,
            segments,
            active: None,
            losses,
            acked,
            persisted_acked: acked,
            acked_persisted_at: None,
            synced_end: next_seq,
            next_seq,
            total_bytes,
            cursor: None,
            channels,
            active_synced_len: 0,
            lost_total,
            recovery,
        };
        spool.write_losses()?;
        spool.start_segment()?;
        Ok(spool)
    }

    /// What recovery found when the spool was opened.
    pub fn recovery(&self) -> &[RecoveryEvent] {
        &self.recovery
    }

    /// Loss ranges not yet acknowledged.
    pub fn losses(&self) -> &[Loss] {
        &self.losses
    }

    fn start_segment(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let path = self
            .config
            .dir
            .join("segments")
            .join(segment_name(self.next_seq));
        let header = encode_header(self.next_seq, &self.channels);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .map_err(|e| io("creating", &path, e))?;
        file.write_all(&header)
            .map_err(|e| io("writing", &path, e))?;
        file.sync_all().map_err(|e| io("fsyncing", &path, e))?;
        sync_dir(&self.config.dir.join("segments"))?;
        // A restart before any append leaves an empty segment with the same
        // name as this one: replace it.
        if self
            .segments
            .back()
            .is_some_and(|s| s.first_seq == self.next_seq)
        {
            if let Some(old) = self.segments.pop_back() {
                self.total_bytes -= old.bytes;
            }
        }
        self.segments.push_back(Segment {
            first_seq: self.next_seq,
            end_seq: self.next_seq,
            bytes: header.len() as u64,
            data_start: header.len() as u64,
            newest_ts_micros: 0,
            oldest_ts_micros: None,
            channels: self.channels.clone(),
            path,
        });
        self.total_bytes += header.len() as u64;
        self.active_synced_len = header.len() as u64;
        self.active = Some(Active {
            writer: BufWriter::with_capacity(64 * 1024, file),
            unsynced: 0,
        });
        Ok(())
    }

    /// Bytes appended and not yet fsynced.
    pub fn unsynced_bytes(&self) -> u64 {
        self.active.as_ref().map_or(0, |a| a.unsynced)
    }

    pub fn config(&self) -> &DiskSpoolConfig {
        &self.config
    }

    fn add_loss(&mut self, first_seq: u64, end_seq: u64, reason: &str) -> Result<(), SpoolError> {
        if end_seq <= first_seq {
            return Ok(());
        }
        tracing::warn!(first_seq, end_seq, reason, "spool lost readings");
        self.lost_total += end_seq - first_seq;
        match self.losses.last_mut() {
            Some(last) if last.end_seq == first_seq && last.reason == reason => {
                last.end_seq = end_seq
            }
            _ => self.losses.push(Loss {
                first_seq,
                end_seq,
                reason: reason.into(),
                detected_at_micros: now_micros(),
            }),
        }
        self.losses.sort_by_key(|l| l.first_seq);
        self.write_losses()
    }

    /// Writes the ack watermark to `acked` if it moved since the last write.
    fn persist_acked(&mut self) -> Result<(), SpoolError> {
        if self.acked == self.persisted_acked {
            return Ok(());
        }
        let mut bytes = self.acked.to_le_bytes().to_vec();
        bytes.extend_from_slice(&crc32c::crc32c(&bytes).to_le_bytes());
        write_atomically(
            &self.config.dir.join(".acked.tmp"),
            &self.config.dir.join("acked"),
            &bytes,
        )?;
        self.persisted_acked = self.acked;
        self.acked_persisted_at = Some(std::time::Instant::now());
        Ok(())
    }

    fn write_losses(&self) -> Result<(), SpoolError> {
        let path = self.config.dir.join("losses.log");
        let tmp = self.config.dir.join(".losses.log.tmp");
        let mut out = Vec::new();
        for l in &self.losses {
            let report = LossReport {
                device_id: String::new(),
                first_seq: l.first_seq,
                end_seq: l.end_seq,
                reason: l.reason.clone(),
                detected_at_micros: l.detected_at_micros,
            };
            encode_record(l.first_seq, &report.encode_to_vec(), &mut out);
        }
        write_atomically(&tmp, &path, &out)?;
        sync_dir(&self.config.dir)
    }

    /// Removes the oldest closed segment, reporting its unacknowledged part as
    /// lost with `reason`. Returns false when only the active segment is left.
    fn evict_oldest(&mut self, reason: &str) -> Result<bool, SpoolError> {
        if self.segments.len() < 2 {
            return Ok(false);
        }
        let Some(seg) = self.segments.pop_front() else {
            return Ok(false);
        };
        fs::remove_file(&seg.path).map_err(|e| io("removing", &seg.path, e))?;
        self.total_bytes -= seg.bytes;
        self.cursor = None;
        let from = seg.first_seq.max(self.acked);
        self.add_loss(from, seg.end_seq, reason)?;
        Ok(true)
    }

    fn evict_aged(&mut self) -> Result<(), SpoolError> {
        let horizon = now_micros() - self.config.max_age.as_micros() as i64;
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.end_seq > s.first_seq && s.newest_ts_micros < horizon)
        {
            self.evict_oldest("evicted_age")?;
        }
        Ok(())
    }

    fn read_readings(&mut self, from: u64, max: usize) -> Result<Option<Chunk>, SpoolError> {
        let end = self.synced_end;
        let Some(seg) = self
            .segments
            .iter()
            .find(|s| s.first_seq <= from && from < s.end_seq)
        else {
            return Ok(None);
        };
        let (seg_first, seg_end, path, channels) = (
            seg.first_seq,
            seg.end_seq,
            seg.path.clone(),
            seg.channels.clone(),
        );
        let mut file = File::open(&path).map_err(|e| io("opening", &path, e))?;
        let (mut seq, offset) = match self.cursor {
            Some((first, seq, offset)) if first == seg_first && seq <= from => (seq, offset),
            _ => (seg_first, seg.data_start),
        };
        file.seek(SeekFrom::Start(offset))
            .map_err(|e| io("seeking", &path, e))?;
        let mut reader = std::io::BufReader::with_capacity(64 * 1024, file);
        let mut offset = offset;
        let mut readings = Vec::new();
        let stop = end.min(seg_end);
        let mut header = [0u8; RECORD_HEADER];
        let mut payload = Vec::new();
        while seq < stop && readings.len() < max {
            reader
                .read_exact(&mut header)
                .map_err(|e| io("reading", &path, e))?;
            let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            if len > MAX_PAYLOAD {
                return Err(SpoolError::Corrupt { path, offset });
            }
            payload.resize(len as usize, 0);
            reader
                .read_exact(&mut payload)
                .map_err(|e| io("reading", &path, e))?;
            offset += (RECORD_HEADER + len as usize) as u64;
            if seq >= from {
                let mut whole = Vec::with_capacity(RECORD_HEADER + payload.len());
                whole.extend_from_slice(&header);
                whole.extend_from_slice(&payload);
                let (_, body, _) = decode_record(&whole).map_err(|_| SpoolError::Corrupt {
                    path: path.clone(),
                    offset,
                })?;
                let reading = Reading::decode(body).map_err(|_| SpoolError::Corrupt {
                    path: path.clone(),
                    offset,
                })?;
                readings.push(reading);
            }
            seq += 1;
        }
        self.cursor = Some((seg_first, seq, offset));
        if readings.is_empty() {
            return Ok(None);
        }
        Ok(Some(Chunk::Readings {
            first_seq: from,
            channels,
            readings,
        }))
    }
}

fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("fsyncing directory", dir, e))
}

fn write_atomically(tmp: &Path, path: &Path, bytes: &[u8]) -> Result<(), SpoolError> {
    let mut f = File::create(tmp).map_err(|e| io("creating", tmp, e))?;
    f.write_all(bytes).map_err(|e| io("writing", tmp, e))?;
    f.sync_all().map_err(|e| io("fsyncing", tmp, e))?;
    fs::rename(tmp, path).map_err(|e| io("renaming", tmp, e))
}

/// Moves `path` into `quarantine/` under a name that does not clash.
fn move_aside(path: &Path, quarantine: &Path) -> Result<PathBuf, SpoolError> {
    fs::create_dir_all(quarantine).map_err(|e| io("creating", quarantine, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut target = quarantine.join(&name);
    let mut n = 1;
    while target.exists() {
        target = quarantine.join(format!("{name}.{n}"));
        n += 1;
    }
    fs::rename(path, &target).map_err(|e| io("quarantining", path, e))?;
    Ok(target)
}

/// Copies the bytes of `path` from `keep` on into quarantine, then truncates.
fn cut_tail(path: &Path, keep: u64, quarantine: &Path, name: &str) -> Result<PathBuf, SpoolError> {
    fs::create_dir_all(quarantine).map_err(|e| io("creating", quarantine, e))?;
    let bytes = fs::read(path).map_err(|e| io("reading", path, e))?;
    let tail = bytes.get(keep as usize..).unwrap_or_default();
    let mut target = quarantine.join(format!("{name}.tail-{keep}"));
    let mut n = 1;
    while target.exists() {
        target = quarantine.join(format!("{name}.tail-{keep}.{n}"));
        n += 1;
    }
    write_atomically(&quarantine.join(".tail.tmp"), &target, tail)?;
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| io("opening", path, e))?;
    f.set_len(keep).map_err(|e| io("truncating", path, e))?;
    f.sync_all().map_err(|e| io("fsyncing", path, e))?;
    Ok(target)
}

pub(crate) fn read_acked(path: &Path) -> Option<u64> {
    let bytes = fs::read(path).ok()?;
    let value: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    let crc: [u8; 4] = bytes.get(8..12)?.try_into().ok()?;
    (crc32c::crc32c(&value) == u32::from_le_bytes(crc)).then(|| u64::from_le_bytes(value))
}

pub(crate) fn load_losses(
    path: &Path,
    recovery: &mut Vec<RecoveryEvent>,
) -> Result<Vec<Loss>, SpoolError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("reading", path, e)),
    };
    let mut losses = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        match decode_record(&bytes[at..]) {
            Ok((_, payload, taken)) => {
                match LossReport::decode(payload) {
                    Ok(r) if r.end_seq > r.first_seq => losses.push(Loss {
                        first_seq: r.first_seq,
                        end_seq: r.end_seq,
                        reason: r.reason,
                        detected_at_micros: r.detected_at_micros,
                    }),
                    _ => recovery.push(RecoveryEvent::BadLossRecord { offset: at as u64 }),
                }
                at += taken;
            }
            Err(_) => {
                recovery.push(RecoveryEvent::BadLossRecord { offset: at as u64 });
                break;
            }
        }
    }
    Ok(losses)
}

impl Spool for DiskSpool {
    fn append(&mut self, readings: &mut Vec<Reading>) -> Result<usize, SpoolError> {
        if readings.is_empty() {
            return Ok(0);
        }
        let mut record = Vec::with_capacity(128);
        let mut taken = 0;
        while taken < readings.len() {
            if self.total_bytes >= self.config.max_bytes {
                match self.config.full_policy {
                    FullPolicy::Block => break,
                    FullPolicy::DropNewest => {
                        let n = (readings.len() - taken) as u64;
                        let first = self.next_seq;
                        self.next_seq += n;
                        // The dropped seqs are "synced" in the sense that a
                        // loss report now stands for them.
                        self.sync()?;
                        self.synced_end = self.next_seq;
                        // Start a new segment so segment seqs stay contiguous.
                        self.add_loss(first, first + n, "evicted_full")?;
                        self.start_segment()?;
                        taken = readings.len();
                        break;
                    }
                    FullPolicy::DropOldest => {
                        if !self.evict_oldest("evicted_full")? {
                            // Only the active segment is left: close it so the
                            // next round can evict it.
                            self.start_segment()?;
                            if !self.evict_oldest("evicted_full")? {
                                break;
                            }
                        }
                        continue;
                    }
                }
            }
            let reading = &readings[taken];
            record.clear();
            encode_record(self.next_seq, &reading.encode_to_vec(), &mut record);
            let active = self.active.as_mut().ok_or(SpoolError::Closed)?;
            let path = &self
                .segments
                .back()
                .map(|s| s.path.clone())
                .unwrap_or_default();
            active
                .writer
                .write_all(&record)
                .map_err(|e| io("writing", path, e))?;
            active.unsynced += record.len() as u64;
            if let Some(seg) = self.segments.back_mut() {
                seg.end_seq += 1;
                seg.bytes += record.len() as u64;
                seg.newest_ts_micros = seg.newest_ts_micros.max(reading.ts_micros);
                seg.oldest_ts_micros.get_or_insert(reading.ts_micros);
            }
            self.total_bytes += record.len() as u64;
            self.next_seq += 1;
            taken += 1;
            if self
                .segments
                .back()
                .is_some_and(|s| s.bytes >= self.config.segment_bytes)
            {
                self.start_segment()?;
            }
        }
        readings.drain(..taken);
        if taken == 0 {
            return Err(SpoolError::Full {
                capacity: self.config.max_bytes as usize,
            });
        }
        Ok(taken)
    }

    fn read(&mut self, from_seq: u64, max: usize) -> Result<Option<Chunk>, SpoolError> {
        let from = from_seq.max(self.acked);
        if let Some(loss) = self
            .losses
            .iter()
            .find(|l| l.first_seq <= from && from < l.end_seq)
        {
            return Ok(Some(Chunk::Lost(Loss {
                first_seq: from,
                ..loss.clone()
            })));
        }
        if from >= self.synced_end {
            return Ok(None);
        }
        self.read_readings(from, max)
    }

    fn acknowledge(&mut self, committed_seq: u64) -> Result<(), SpoolError> {
        let committed = committed_seq.min(self.synced_end);
        if committed <= self.acked {
            return Ok(());
        }
        self.acked = committed;
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.end_seq <= committed)
        {
            if let Some(seg) = self.segments.pop_front() {
                fs::remove_file(&seg.path).map_err(|e| io("removing", &seg.path, e))?;
                self.total_bytes -= seg.bytes;
                self.cursor = None;
            }
        }
        let before = self.losses.len();
        self.losses.retain(|l| l.end_seq > committed);
        if self.losses.len() != before {
            self.write_losses()?;
        }
        Ok(())
    }

    fn sync(&mut self) -> Result<(), SpoolError> {
        if let Some(active) = self.active.as_mut() {
            if active.unsynced > 0 {
                let path = self
                    .segments
                    .back()
                    .map(|s| s.path.clone())
                    .unwrap_or_default();
                active.writer.flush().map_err(|e| io("writing", &path, e))?;
                active
                    .writer
                    .get_ref()
                    .sync_data()
                    .map_err(|e| io("fsyncing", &path, e))?;
                active.unsynced = 0;
            }
        }
        self.active_synced_len = self.segments.back().map_or(0, |s| s.bytes);
        self.synced_end = self.next_seq;
        // Two fsyncs and a rename per write: at most once per
        // `ack_persist_interval` (at 200 devices on one disk, writing it at
        // every 100 ms sync was a third of the simulated fleet's CPU). A
        // crash before it re-sends a little, which the cloud ignores.
        if self
            .acked_persisted_at
            .is_none_or(|t| t.elapsed() >= self.config.ack_persist_interval)
        {
            self.persist_acked()?;
        }
        self.evict_aged()
    }

    fn close(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        self.persist_acked()
    }

    fn wants_sync(&self) -> bool {
        self.unsynced_bytes() >= self.config.sync_bytes
    }

    fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn durable_end(&self) -> u64 {
        self.synced_end
    }

    fn first_unacked(&self) -> u64 {
        self.acked
    }

    fn append_relayed(&mut self, batch: &ReadingBatch) -> Result<Relayed, SpoolError> {
        let (first, end) = (batch.first_seq, batch.end_seq());
        if end <= self.next_seq {
            return Ok(Relayed::Duplicate);
        }
        if first > self.next_seq {
            let fresh = self.acked == self.next_seq
                && self.losses.is_empty()
                && self.segments.iter().all(|s| s.end_seq == s.first_seq);
            if !fresh {
                return Ok(Relayed::Gap {
                    expected: self.next_seq,
                });
            }
            // A new child (to this gateway): its seqs start where it stands.
            self.sync()?;
            for empty in self.segments.drain(..) {
                fs::remove_file(&empty.path).map_err(|e| io("removing", &empty.path, e))?;
            }
            self.active = None;
            self.total_bytes = 0;
            self.cursor = None;
            self.next_seq = first;
            self.acked = first;
            self.synced_end = first;
            self.start_segment()?;
        }
        if let Some(loss) = &batch.loss {
            self.sync()?;
            let from = self.next_seq;
            self.next_seq = end;
            self.synced_end = end;
            self.add_loss(from, end, &loss.reason)?;
            self.start_segment()?;
            return Ok(Relayed::Taken(end - from));
        }
        if batch.channels != self.channels {
            self.channels = batch.channels.clone();
            self.start_segment()?;
        }
        let skip = (self.next_seq - first) as usize;
        let mut readings = batch.readings.get(skip..).unwrap_or_default().to_vec();
        let taken = self.append(&mut readings)?;
        Ok(Relayed::Taken(taken as u64))
    }

    fn backlog(&self) -> Backlog {
        Backlog {
            records: self.next_seq.saturating_sub(self.acked),
            bytes: self.total_bytes,
            oldest_ts_micros: self
                .segments
                .iter()
                .find(|s| s.end_seq > self.acked)
                .and_then(|s| s.oldest_ts_micros),
            lost_readings: self.lost_total,
        }
    }
}

#[cfg(test)]
impl DiskSpool {
    /// A crash: what was appended but not yet written is dropped; returns
    /// the newest segment and how many of its bytes were fsynced.
    pub fn crash(mut self) -> (PathBuf, u64) {
        if let Some(active) = self.active.take() {
            let (_file, _unwritten) = active.writer.into_parts();
        }
        let newest = self
            .segments
            .back()
            .map(|s| s.path.clone())
            .unwrap_or_default();
        (newest, self.active_synced_len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> DiskSpoolConfig {
        DiskSpoolConfig {
            dir: dir.to_path_buf(),
            max_bytes: 1 << 20,
            segment_bytes: 4096,
            ..DiskSpoolConfig::default()
        }
    }

    fn reading(seq: u64) -> Reading {
        Reading {
            ts_micros: now_micros() + seq as i64,
            values: vec![seq as f64, -(seq as f64)],
            true_label: String::new(),
            predictions: Vec::new(),
        }
    }

    fn channels() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn append(spool: &mut DiskSpool, from: u64, n: u64) {
        let mut batch: Vec<Reading> = (from..from + n).map(reading).collect();
        assert_eq!(spool.append(&mut batch).expect("append") as u64, n);
    }

    /// Everything readable from `from`: (seqs of readings, loss ranges).
    fn drain(spool: &mut DiskSpool, from: u64) -> (Vec<u64>, Vec<(u64, u64, String)>) {
        let (mut seqs, mut losses) = (Vec::new(), Vec::new());
        let mut at = from;
        while let Some(chunk) = spool.read(at, 37).expect("read") {
            match chunk {
                Chunk::Readings {
                    first_seq,
                    readings,
                    channels: c,
                } => {
                    assert_eq!(c, channels());
                    for (i, r) in readings.iter().enumerate() {
                        let seq = first_seq + i as u64;
                        assert_eq!(r.values[0], seq as f64, "value of seq {seq}");
                        seqs.push(seq);
                    }
                    at = first_seq + readings.len() as u64;
                }
                Chunk::Lost(l) => {
                    losses.push((l.first_seq, l.end_seq, l.reason.clone()));
                    at = l.end_seq;
                }
            }
        }
        (seqs, losses)
    }

    fn segment_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir.join("segments"))
            .expect("segments")
            .map(|e| e.expect("entry").path())
            .collect();
        files.sort();
        files
    }

    #[test]
    fn only_synced_readings_are_served_and_seq_keeps_rising_across_restarts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("open");
        append(&mut spool, 0, 10);
        assert_eq!(
            spool.read(0, 100).expect("read"),
            None,
            "nothing served before the fsync"
        );
        spool.sync().expect("sync");
        assert_eq!(drain(&mut spool, 0).0, (0..10).collect::<Vec<_>>());
        spool.acknowledge(10).expect("ack");
        spool.sync().expect("sync");
        drop(spool);
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("reopen");
        assert_eq!(spool.next_seq(), 10);
        assert_eq!(
            drain(&mut spool, 0).0,
            Vec::<u64>::new(),
            "acknowledged readings do not come back"
        );
        append(&mut spool, 10, 5);
        spool.sync().expect("sync");
        assert_eq!(drain(&mut spool, 0).0, (10..15).collect::<Vec<_>>());
    }

    #[test]
    fn the_ack_watermark_is_written_at_most_once_per_interval_and_at_close() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DiskSpoolConfig {
            ack_persist_interval: Duration::from_secs(3600),
            ..config(dir.path())
        };
        // 20 readings: one segment, so the watermark on reopen is the file's.
        let mut spool = DiskSpool::open(cfg.clone(), channels()).expect("open");
        append(&mut spool, 0, 20);
        spool.sync().expect("sync");
        spool.acknowledge(5).expect("ack");
        spool.sync().expect("sync: the first change is written");
        spool.acknowledge(10).expect("ack");
        spool
            .sync()
            .expect("sync: within the interval, not written");
        spool.crash();
        let mut spool = DiskSpool::open(cfg.clone(), channels()).expect("reopen");
        assert_eq!(
            spool.first_unacked(),
            5,
            "after a crash 5..10 are sent again (the cloud skips them)"
        );
        assert_eq!(drain(&mut spool, 0).0, (5..20).collect::<Vec<_>>());
        spool.acknowledge(10).expect("ack");
        spool.sync().expect("sync");
        spool.acknowledge(15).expect("ack");
        spool.sync().expect("sync");
        spool.close().expect("close writes it");
        drop(spool);
        let spool = DiskSpool::open(cfg, channels()).expect("reopen");
        assert_eq!(spool.first_unacked(), 15);
    }

    #[test]
    fn acknowledged_segments_are_deleted_and_the_newest_is_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("open");
        append(&mut spool, 0, 500);
        spool.sync().expect("sync");
        let before = segment_files(dir.path()).len();
        assert!(before > 3, "several segments: {before}");
        spool.acknowledge(250).expect("ack");
        let after = segment_files(dir.path()).len();
        assert!(after < before && after > 1);
        spool.acknowledge(500).expect("ack");
        assert_eq!(segment_files(dir.path()).len(), 1);
        assert_eq!(spool.backlog().records, 0);
    }

    #[test]
    fn torn_tail_is_cut_at_every_byte_and_the_agent_always_starts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("open");
        append(&mut spool, 0, 3);
        spool.sync().expect("sync");
        drop(spool);
        let newest = segment_files(dir.path()).pop().expect("segment");
        let whole = fs::read(&newest).expect("read");
        let (_, _, header) = decode_header(&whole).expect("header");
        let record = (whole.len() - header) / 3;
        let last_start = whole.len() - record;
        for cut in last_start..whole.len() {
            let copy = tempfile::tempdir().expect("tempdir");
            fs::create_dir_all(copy.path().join("segments")).expect("mkdir");
            let name = newest.file_name().expect("name");
            fs::write(copy.path().join("segments").join(name), &whole[..cut]).expect("write");
            let mut spool =
                DiskSpool::open(config(copy.path()), channels()).expect("always starts");
            assert_eq!(spool.next_seq(), 2, "cut at {cut}");
            let torn = spool
                .recovery()
                .iter()
                .any(|e| matches!(e, RecoveryEvent::TornTail { at_seq: 2, .. }));
            assert_eq!(
                torn,
                cut > last_start,
                "cut at {cut}: {:?}",
                spool.recovery()
            );
            assert!(spool.losses().is_empty(), "an unsynced tail is not a loss");
            assert_eq!(drain(&mut spool, 0).0, vec![0, 1]);
        }
    }

    #[test]
    fn corrupt_middle_segment_is_quarantined_and_exactly_its_range_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("open");
        append(&mut spool, 0, 300);
        spool.sync().expect("sync");
        drop(spool);
        let files = segment_files(dir.path());
        let victim = &files[1];
        let first: u64 = victim
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("name");
        let next: u64 = files[2]
            .file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.parse().ok())
            .expect("name");
        let mut bytes = fs::read(victim).expect("read");
        let middle = bytes.len() / 2;
        bytes[middle] ^= 0x5a;
        fs::write(victim, bytes).expect("write");

        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("always starts");
        assert_eq!(spool.losses().len(), 1);
        assert_eq!(
            (spool.losses()[0].first_seq, spool.losses()[0].end_seq),
            (first, next)
        );
        assert!(dir
            .path()
            .join("quarantine")
            .join(victim.file_name().expect("n"))
            .exists());
        let (seqs, losses) = drain(&mut spool, 0);
        assert_eq!(losses, vec![(first, next, "corrupt_segment".to_string())]);
        let expected: Vec<u64> = (0..300).filter(|s| *s < first || *s >= next).collect();
        assert_eq!(seqs, expected);
        // Once the loss report is acknowledged it is gone, across restarts too.
        spool.acknowledge(300).expect("ack");
        spool.sync().expect("sync");
        drop(spool);
        let spool = DiskSpool::open(config(dir.path()), channels()).expect("reopen");
        assert!(spool.losses().is_empty());
    }

    #[test]
    fn zero_filled_blocks_deleted_segments_and_zero_filled_tails_are_all_survived() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("open");
        append(&mut spool, 0, 400);
        spool.sync().expect("sync");
        drop(spool);
        let files = segment_files(dir.path());
        // A zero-filled block in segment 1, segment 3 deleted, zeros after the newest.
        let mut bytes = fs::read(&files[1]).expect("read");
        let at = bytes.len() - 200;
        bytes[at..at + 100].fill(0);
        fs::write(&files[1], bytes).expect("write");
        fs::remove_file(&files[3]).expect("rm");
        let newest = files.last().expect("newest");
        let mut bytes = fs::read(newest).expect("read");
        bytes.extend_from_slice(&[0u8; 512]);
        fs::write(newest, bytes).expect("write");

        let name = |p: &PathBuf| -> u64 {
            p.file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok())
                .expect("n")
        };
        let mut spool = DiskSpool::open(config(dir.path()), channels()).expect("always starts");
        let lost: Vec<(u64, u64)> = spool
            .losses()
            .iter()
            .map(|l| (l.first_seq, l.end_seq))
            .collect();
        assert_eq!(
            lost,
            vec![
                (name(&files[1]), name(&files[2])),
                (name(&files[3]), name(&files[4]))
            ]
        );
        assert_eq!(spool.next_seq(), 400);
        let (seqs, _) = drain(&mut spool, 0);
        assert_eq!(
            seqs.len() as u64,
            400 - lost.iter().map(|(a, b)| b - a).sum::<u64>()
        );
    }

    #[test]
    fn full_spool_drops_oldest_by_default_and_reports_the_range() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DiskSpoolConfig {
            max_bytes: 16 * 1024,
            ..config(dir.path())
        };
        let mut spool = DiskSpool::open(cfg, channels()).expect("open");
        append(&mut spool, 0, 2000);
        spool.sync().expect("sync");
        assert!(
            spool.backlog().bytes <= 16 * 1024 + 4096,
            "bounded: {:?}",
            spool.backlog()
        );
        let (seqs, losses) = drain(&mut spool, 0);
        assert_eq!(
            losses.first().map(|l| (l.0, l.2.as_str())),
            Some((0, "evicted_full"))
        );
        let lost: u64 = losses.iter().map(|l| l.1 - l.0).sum();
        assert_eq!(
            lost + seqs.len() as u64,
            2000,
            "every seq is a reading or a reported loss"
        );
        assert_eq!(seqs.last(), Some(&1999));
    }

    #[test]
    fn drop_newest_and_block_policies() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DiskSpoolConfig {
            max_bytes: 16 * 1024,
            full_policy: FullPolicy::DropNewest,
            ..config(dir.path())
        };
        let mut spool = DiskSpool::open(cfg.clone(), channels()).expect("open");
        append(&mut spool, 0, 2000);
        spool.sync().expect("sync");
        let (seqs, losses) = drain(&mut spool, 0);
        assert_eq!(seqs.first(), Some(&0), "the oldest are kept");
        assert_eq!(losses.last().map(|l| l.1), Some(2000));
        assert_eq!(
            seqs.len() as u64 + losses.iter().map(|l| l.1 - l.0).sum::<u64>(),
            2000
        );
        drop(spool);
        // Reopening does not report the dropped range twice.
        let spool = DiskSpool::open(cfg, channels()).expect("reopen");
        assert_eq!(spool.losses().len(), 1, "{:?}", spool.losses());

        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = DiskSpoolConfig {
            max_bytes: 16 * 1024,
            full_policy: FullPolicy::Block,
            ..config(dir.path())
        };
        let mut spool = DiskSpool::open(cfg, channels()).expect("open");
        let mut batch: Vec<Reading> = (0..2000).map(reading).collect();
        let taken = spool.append(&mut batch).expect("some fit");
        assert!(taken < 2000 && batch.len() == 2000 - taken);
        assert!(matches!(
            spool.append(&mut batch),
            Err(SpoolError::Full { .. })
        ));
        spool.sync().expect("sync");
        spool.acknowledge(taken as u64).expect("ack");
        assert!(spool.append(&mut batch).expect("room again") > 0);
        assert!(spool.losses().is_empty());
    }

    #[test]
    fn relayed_batches_keep_the_childs_seqs_skip_resends_and_refuse_gaps() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spool = DiskSpool::open(config(dir.path()), vec![]).expect("open");
        let batch = |first: u64, n: u64| ReadingBatch {
            device_id: "child".into(),
            profile: "f32".into(),
            first_seq: first,
            channels: channels(),
            readings: (first..first + n).map(reading).collect(),
            loss: None,
        };
        // A child that already stands at seq 1000 when it first shows up.
        assert_eq!(
            spool.append_relayed(&batch(1000, 10)).expect("relay"),
            Relayed::Taken(10)
        );
        assert_eq!(
            spool.append_relayed(&batch(1000, 10)).expect("relay"),
            Relayed::Duplicate
        );
        assert_eq!(
            spool.append_relayed(&batch(1005, 10)).expect("relay"),
            Relayed::Taken(5)
        );
        assert_eq!(
            spool.append_relayed(&batch(1030, 10)).expect("relay"),
            Relayed::Gap { expected: 1015 }
        );
        let loss = ReadingBatch {
            readings: vec![],
            channels: vec![],
            loss: Some(LossReport {
                device_id: "child".into(),
                first_seq: 1015,
                end_seq: 1030,
                reason: "evicted_full".into(),
                detected_at_micros: 0,
            }),
            ..batch(1015, 0)
        };
        assert_eq!(
            spool.append_relayed(&loss).expect("relay"),
            Relayed::Taken(15)
        );
        assert_eq!(
            spool.append_relayed(&batch(1030, 10)).expect("relay"),
            Relayed::Taken(10)
        );
        spool.sync().expect("sync");
        assert_eq!(spool.first_unacked(), 1000);
        let (seqs, losses) = drain(&mut spool, 0);
        assert_eq!(seqs, (1000..1015).chain(1030..1040).collect::<Vec<_>>());
        assert_eq!(losses, vec![(1015, 1030, "evicted_full".to_string())]);
        drop(spool);
        let spool = DiskSpool::open(config(dir.path()), vec![]).expect("reopen");
        assert_eq!((spool.next_seq(), spool.first_unacked()), (1040, 1000));
    }

    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Append(u64),
        Sync,
        Ack(u64),
        Restart,
        /// Crash, then tear the newest segment: keep `.0` per mille of what
        /// was written beyond the last sync, or add zeros when `.1`.
        Crash(u16, bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..60).prop_map(Op::Append),
            3 => Just(Op::Sync),
            2 => (0u64..1000).prop_map(Op::Ack),
            1 => Just(Op::Restart),
            1 => (0u16..1000, any::<bool>()).prop_map(|(k, z)| Op::Crash(k, z)),
        ]
    }

    proptest! {
        /// The decoders the fuzz targets (fuzz/) hammer, also on every test
        /// run: any bytes give a record, an error, or `None`; never a panic.
        #[test]
        fn decoders_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_header(&bytes);
            if let Ok((_, payload, taken)) = decode_record(&bytes) {
                prop_assert_eq!(payload.len() + RECORD_HEADER, taken);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Against a model: nothing acknowledged (and synced) comes back,
        /// nothing fsynced and unacknowledged is lost, seq never repeats.
        #[test]
        fn spool_matches_its_model_through_acks_restarts_and_crashes(ops in proptest::collection::vec(op(), 1..40)) {
            let dir = tempfile::tempdir().expect("tempdir");
            // The watermark written at every sync, as the model has it
            // (`ack_persist_interval` has a test of its own).
            let cfg = DiskSpoolConfig {
                max_bytes: 64 << 20,
                ack_persist_interval: Duration::ZERO,
                ..config(dir.path())
            };
            let mut spool = DiskSpool::open(cfg.clone(), channels()).expect("open");
            // Model: next seq, synced end, acked, acked as of the last sync.
            let (mut next, mut synced, mut acked, mut persisted_ack) = (0u64, 0u64, 0u64, 0u64);
            for op in ops {
                match op {
                    Op::Append(n) => {
                        append(&mut spool, next, n);
                        next += n;
                    }
                    Op::Sync => {
                        spool.sync().expect("sync");
                        synced = next;
                        persisted_ack = acked;
                    }
                    Op::Ack(k) => {
                        let k = k.min(synced);
                        spool.acknowledge(k).expect("ack");
                        acked = acked.max(k);
                    }
                    Op::Restart => {
                        drop(spool);
                        spool = DiskSpool::open(cfg.clone(), channels()).expect("reopen");
                        // A clean stop flushed its buffer: those readings are on disk.
                        prop_assert!(spool.next_seq() >= synced);
                        next = spool.next_seq();
                        synced = next;
                        acked = spool.first_unacked();
                        prop_assert!(acked >= persisted_ack);
                        persisted_ack = acked;
                    }
                    Op::Crash(keep, zeros) => {
                        let (newest, synced_len) = spool.crash();
                        // A power cut keeps the fsynced bytes and any prefix
                        // of the rest, or leaves zeros where data was due.
                        let mut bytes = fs::read(&newest).expect("read");
                        let unsynced = bytes.len() as u64 - synced_len;
                        bytes.truncate((synced_len + unsynced * u64::from(keep) / 1000) as usize);
                        if zeros {
                            bytes.extend_from_slice(&[0u8; 100]);
                        }
                        fs::write(&newest, &bytes).expect("write");
                        spool = DiskSpool::open(cfg.clone(), channels()).expect("always starts");
                        prop_assert!(spool.losses().is_empty(), "a crash loses nothing synced: {:?}", spool.recovery());
                        prop_assert!(spool.next_seq() >= synced, "seq {} reused below {}", spool.next_seq(), synced);
                        next = spool.next_seq();
                        synced = next;
                        acked = spool.first_unacked();
                        prop_assert!(acked >= persisted_ack);
                        persisted_ack = acked;
                    }
                }
                // What the spool says is durable (a segment roll syncs too)
                // must survive any crash from here on.
                prop_assert!(spool.durable_end() >= synced);
                synced = spool.durable_end();
                // Everything synced and unacknowledged is readable, in order,
                // with its values; nothing below the ack is.
                let (seqs, losses) = drain(&mut spool, 0);
                prop_assert!(losses.is_empty());
                prop_assert_eq!(spool.first_unacked(), acked);
                let expected: Vec<u64> = (acked..synced).collect();
                prop_assert_eq!(seqs, expected);
            }
        }
    }
}
