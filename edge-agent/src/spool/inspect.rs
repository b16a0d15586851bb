//! `edgeloop spool inspect` and `edgeloop spool check`: what is in a spool,
//! read without changing it, for someone debugging a device in the field.

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

use super::disk::{self, scan_segment, DiskSpool, DiskSpoolConfig, RecoveryEvent};
use super::SpoolError;

/// One segment file as found on disk.
#[derive(Debug, Clone)]
pub struct SegmentInfo {
    pub name: String,
    pub first_seq: u64,
    pub records: u64,
    pub bytes: u64,
    pub channels: Vec<String>,
    pub oldest_ts_micros: Option<i64>,
    pub newest_ts_micros: i64,
    /// What is wrong with it, if anything (what recovery would act on).
    pub problem: Option<String>,
}

/// What a spool directory holds.
#[derive(Debug, Clone, Default)]
pub struct Inspection {
    pub dir: PathBuf,
    pub segments: Vec<SegmentInfo>,
    /// The persisted ack watermark, if any.
    pub acked: Option<u64>,
    pub losses: Vec<disk::Loss>,
    pub quarantine: Vec<(String, u64)>,
    /// Seq ranges no segment holds and no loss report explains.
    pub gaps: Vec<(u64, u64)>,
}

impl Inspection {
    /// Problems recovery would act on (corrupt segments, torn tails, gaps).
    pub fn problems(&self) -> usize {
        self.segments.iter().filter(|s| s.problem.is_some()).count() + self.gaps.len()
    }
}

/// Reads a spool directory without changing anything.
pub fn inspect(dir: &Path) -> Result<Inspection, SpoolError> {
    let seg_dir = dir.join("segments");
    if !seg_dir.is_dir() {
        return Err(SpoolError::Io {
            action: "opening",
            path: seg_dir,
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "not a spool directory (no segments/)",
            ),
        });
    }
    let mut out = Inspection {
        dir: dir.to_path_buf(),
        ..Inspection::default()
    };
    let mut names: Vec<PathBuf> = fs::read_dir(&seg_dir)
        .map_err(|source| SpoolError::Io {
            action: "listing",
            path: seg_dir.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    names.sort();
    for path in names {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let scan = scan_segment(&path)?;
        let named_first = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok());
        let problem = match (named_first, &scan.problem) {
            (None, _) => Some("has a name that is not {first_seq}.seg".to_string()),
            (Some(first), None) if first != scan.first_seq => {
                Some(format!("has a header for seq {}", scan.first_seq))
            }
            (_, p) => p.clone(),
        };
        out.segments.push(SegmentInfo {
            name,
            first_seq: named_first.unwrap_or(scan.first_seq),
            records: scan.records,
            bytes: scan.file_bytes,
            channels: scan.channels,
            oldest_ts_micros: scan.oldest_ts_micros,
            newest_ts_micros: scan.newest_ts_micros,
            problem,
        });
    }
    let mut recovery = Vec::new();
    out.losses = disk::load_losses(&dir.join("losses.log"), &mut recovery)?;
    out.acked = disk::read_acked(&dir.join("acked"));
    for w in out.segments.windows(2) {
        let end = w[0].first_seq + w[0].records;
        let next = w[1].first_seq;
        let explained = out
            .losses
            .iter()
            .any(|l| l.first_seq <= end && l.end_seq >= next);
        if end < next && !explained && w[0].problem.is_none() {
            out.gaps.push((end, next));
        }
    }
    if let Ok(entries) = fs::read_dir(dir.join("quarantine")) {
        for e in entries.flatten() {
            let bytes = e.metadata().map(|m| m.len()).unwrap_or(0);
            out.quarantine
                .push((e.file_name().to_string_lossy().into_owned(), bytes));
        }
        out.quarantine.sort();
    }
    Ok(out)
}

/// Opens the spool, which applies the recovery rules (cuts torn tails,
/// quarantines corrupt segments, records losses); returns what it did.
pub fn repair(dir: &Path) -> Result<Vec<RecoveryEvent>, SpoolError> {
    let channels = inspect(dir)?
        .segments
        .iter()
        .rev()
        .find(|s| s.problem.is_none())
        .map(|s| s.channels.clone())
        .unwrap_or_default();
    // Repair applies the recovery rules only: nothing is evicted for size or age.
    let config = DiskSpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: u64::MAX,
        max_age: std::time::Duration::from_secs(u64::from(u32::MAX)),
        ..DiskSpoolConfig::default()
    };
    let spool = DiskSpool::open(config, channels)?;
    Ok(spool.recovery().to_vec())
}

fn ts(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let acked = self.acked.unwrap_or(0);
        let mut t = String::new();
        let _ = writeln!(t, "spool {}", self.dir.display());
        let _ = writeln!(
            t,
            "{:<26} {:>12} {:>12} {:>10} {:>10}  {:<20} {:<20} state",
            "segment", "first seq", "end seq", "readings", "bytes", "oldest", "newest"
        );
        for s in &self.segments {
            let end = s.first_seq + s.records;
            let state = match &s.problem {
                Some(p) => format!("CORRUPT: {p}"),
                None if end <= acked && s.records > 0 => "acknowledged".into(),
                None if s.first_seq < acked => format!("acknowledged below {acked}"),
                None => "unacknowledged".into(),
            };
            let _ = writeln!(
                t,
                "{:<26} {:>12} {:>12} {:>10} {:>10}  {:<20} {:<20} {}",
                s.name,
                s.first_seq,
                end,
                s.records,
                s.bytes,
                s.oldest_ts_micros.map(ts).unwrap_or_else(|| "-".into()),
                if s.records > 0 {
                    ts(s.newest_ts_micros)
                } else {
                    "-".into()
                },
                state
            );
        }
        let _ = writeln!(
            t,
            "ack watermark: {}",
            self.acked.map_or("none recorded".into(), |a| a.to_string())
        );
        for l in &self.losses {
            let _ = writeln!(
                t,
                "lost, not yet reported upstream: seqs {}..{} ({})",
                l.first_seq, l.end_seq, l.reason
            );
        }
        for (a, b) in &self.gaps {
            let _ = writeln!(t, "GAP: no segment holds seqs {a}..{b}");
        }
        for (name, bytes) in &self.quarantine {
            let _ = writeln!(t, "quarantined: {name} ({bytes} bytes)");
        }
        let _ = write!(t, "{} problem(s)", self.problems());
        f.write_str(&t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::Spool;
    use edgeloop_proto::v1::Reading;

    #[test]
    fn inspect_reports_corruption_and_repair_quarantines_it(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let config = DiskSpoolConfig {
            dir: dir.path().to_path_buf(),
            segment_bytes: 4096,
            // The readings are from 2023: keep them.
            max_age: std::time::Duration::from_secs(100 * 365 * 86_400),
            ..DiskSpoolConfig::default()
        };
        let mut spool = DiskSpool::open(config, vec!["v".into()])?;
        let mut readings: Vec<Reading> = (0..300)
            .map(|i| Reading {
                ts_micros: 1_700_000_000_000_000 + i,
                values: vec![i as f64],
                true_label: String::new(),
                predictions: Vec::new(),
            })
            .collect();
        spool.append(&mut readings)?;
        spool.sync()?;
        spool.acknowledge(50)?;
        spool.sync()?;
        drop(spool);
        let clean = inspect(dir.path())?;
        assert_eq!(clean.problems(), 0, "{clean}");
        assert_eq!(clean.acked, Some(50));
        let last = clean.segments.last().expect("segments");
        assert_eq!(last.first_seq + last.records, 300);
        assert!(
            clean.segments[0].first_seq <= 50,
            "acknowledged segments are gone, the rest kept: {clean}"
        );
        assert!(
            clean.to_string().contains("2023-11-14T22:13:20Z"),
            "{clean}"
        );

        let victim = dir.path().join("segments").join(&clean.segments[1].name);
        let mut bytes = fs::read(&victim)?;
        let at = bytes.len() - 10;
        bytes[at] ^= 1;
        fs::write(&victim, bytes)?;
        let found = inspect(dir.path())?;
        assert_eq!(found.problems(), 1);
        assert!(found.to_string().contains("CORRUPT"), "{found}");
        let events = repair(dir.path())?;
        assert!(
            matches!(events[0], RecoveryEvent::Quarantined { .. }),
            "{events:?}"
        );
        let after = inspect(dir.path())?;
        assert_eq!(after.problems(), 0, "{after}");
        assert_eq!(after.quarantine.len(), 1);
        assert_eq!(after.losses.len(), 1);
        Ok(())
    }
}
