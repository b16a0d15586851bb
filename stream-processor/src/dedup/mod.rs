//! Duplicate removal by `(device_id, seq)`.
//!
//! Devices resend from their ack watermark after a reconnect or a stall, so
//! the readings topic can hold a seq more than once. Per partition the
//! processor keeps the seqs it has written, per device, as sorted disjoint
//! ranges ([`SeenSet`]): one range per device in the normal case, a few more
//! while a gap waits to be filled. Only readings outside the set are written.
//!
//! The set (with the labeller's per-device state, [`PartitionSnapshot`])
//! survives restarts and rebalances: at every offset commit it is
//! saved as `{root}/_state/partition-{p}/{offset:020}.json` (written to a
//! temporary name, fsynced, renamed) *before* the commit, so the snapshot for
//! the committed offset always exists. Whoever next owns the partition resumes
//! at the committed offset `C` and loads the newest snapshot at or below `C`:
//! never one above it, which would claim readings not yet in the data set. The
//! last few snapshots per partition are kept.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Everything the processor remembers about a partition, saved at every
/// commit: the seqs in the data set and the labeller's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionSnapshot {
    #[serde(default)]
    pub seen: SeenSet,
    #[serde(default)]
    pub labels: crate::labeller::PartitionLabels,
}

/// Snapshots kept per partition.
const KEEP: usize = 3;

/// Seqs seen per device: sorted, disjoint, non-adjacent half-open ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenSet {
    devices: BTreeMap<String, Vec<(u64, u64)>>,
}

impl SeenSet {
    /// The parts of `[first, end)` not yet seen for `device`.
    pub fn unseen(&self, device: &str, first: u64, end: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut at = first;
        for &(a, b) in self
            .devices
            .get(device)
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            if b <= at {
                continue;
            }
            if a >= end {
                break;
            }
            if a > at {
                out.push((at, a));
            }
            at = at.max(b);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push((at, end));
        }
        out
    }

    /// Marks `[first, end)` of `device` as seen.
    pub fn insert(&mut self, device: &str, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let ranges = self.devices.entry(device.to_string()).or_default();
        ranges.push((first, end));
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for &(a, b) in ranges.iter() {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        *ranges = merged;
    }

    /// Number of (device, range) entries: the state's size.
    pub fn ranges(&self) -> usize {
        self.devices.values().map(Vec::len).sum()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    #[error("dedup state: {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> DedupError + 'a {
    move |source| DedupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// Where snapshots of partition `p` live.
fn partition_dir(root: &Path, partition: i32) -> PathBuf {
    root.join("_state").join(format!("partition-{partition}"))
}

/// Saves `set` as the state of `partition` at `offset` (the next offset to read).
pub fn save(
    root: &Path,
    partition: i32,
    offset: i64,
    set: &PartitionSnapshot,
) -> Result<(), DedupError> {
    let dir = partition_dir(root, partition);
    fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
    let path = dir.join(format!("{offset:020}.json"));
    let tmp = dir.join(format!(".{offset:020}.json.tmp"));
    let bytes = serde_json::to_vec(set).map_err(|e| DedupError::Io {
        action: "encoding",
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    let mut file = fs::File::create(&tmp).map_err(io("creating", &tmp))?;
    file.write_all(&bytes).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("fsyncing", &tmp))?;
    fs::rename(&tmp, &path).map_err(io("renaming", &tmp))?;
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsyncing", &dir))?;
    let mut older = snapshots(&dir)?;
    older.retain(|(o, _)| *o < offset);
    let excess = older.len().saturating_sub(KEEP - 1);
    for (_, old) in older.into_iter().take(excess) {
        let _ = fs::remove_file(old);
    }
    Ok(())
}

fn snapshots(dir: &Path) -> Result<Vec<(i64, PathBuf)>, DedupError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io("listing", dir)(e)),
    };
    let mut out: Vec<(i64, PathBuf)> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let offset = p
                .file_name()?
                .to_str()?
                .strip_suffix(".json")?
                .parse()
                .ok()?;
            Some((offset, p))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The state of `partition` for resuming at `offset`: the newest snapshot at
/// or below it (an unreadable one is skipped with a warning) and the offset
/// it was saved for, else empty.
pub fn load(
    root: &Path,
    partition: i32,
    offset: i64,
) -> Result<(PartitionSnapshot, Option<i64>), DedupError> {
    let dir = partition_dir(root, partition);
    for (at, path) in snapshots(&dir)?
        .into_iter()
        .rev()
        .filter(|(o, _)| *o <= offset)
    {
        match fs::read(&path).map(|b| serde_json::from_slice::<PartitionSnapshot>(&b)) {
            Ok(Ok(set)) => return Ok((set, Some(at))),
            Ok(Err(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable dedup snapshot skipped")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable dedup snapshot skipped")
            }
        }
    }
    Ok((PartitionSnapshot::default(), None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unseen_parts_and_merging_match_a_brute_force_set() {
        let mut set = SeenSet::default();
        let mut brute = std::collections::HashSet::new();
        let ops = [
            (0, 10),
            (20, 30),
            (5, 25),
            (40, 41),
            (39, 40),
            (100, 120),
            (0, 1),
        ];
        for (a, b) in ops {
            let unseen = set.unseen("d", a, b);
            let expected: Vec<u64> = (a..b).filter(|s| !brute.contains(s)).collect();
            let got: Vec<u64> = unseen.iter().flat_map(|(x, y)| *x..*y).collect();
            assert_eq!(got, expected, "unseen of {a}..{b}");
            set.insert("d", a, b);
            brute.extend(a..b);
        }
        assert_eq!(set.devices["d"], vec![(0, 30), (39, 41), (100, 120)]);
        assert_eq!(set.unseen("other", 3, 5), vec![(3, 5)]);
    }

    #[test]
    fn load_never_takes_a_snapshot_above_the_resume_offset(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let root = tempfile::tempdir()?;
        let mut set = PartitionSnapshot::default();
        set.seen.insert("d", 0, 10);
        save(root.path(), 2, 5, &set)?;
        set.seen.insert("d", 10, 20);
        save(root.path(), 2, 9, &set)?;
        assert_eq!(load(root.path(), 2, 9)?.0.seen.unseen("d", 0, 20), vec![]);
        // Resuming at 7 (a commit after 5 was lost): the 5 snapshot.
        assert_eq!(
            load(root.path(), 2, 7)?.0.seen.unseen("d", 0, 20),
            vec![(10, 20)]
        );
        assert_eq!(load(root.path(), 2, 4)?.0, PartitionSnapshot::default());
        assert_eq!(load(root.path(), 3, 9)?.0, PartitionSnapshot::default());
        for o in 10..20 {
            save(root.path(), 2, o, &set)?;
        }
        assert_eq!(snapshots(&partition_dir(root.path(), 2))?.len(), KEEP);
        Ok(())
    }
}
