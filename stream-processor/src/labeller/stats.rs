//! `edgeloop labels stats`: per rule and rules version, from the `rule_stats`
//! table of the data set: coverage (share of readings the rule voted on),
//! overlap and conflict (share of its votes cast alongside another rule's, and
//! against another rule's label), agreement with the final label, and the
//! label model's estimated accuracy.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::{Array, Float64Array, Int64Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::RuleCounts;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("reading {path}: {reason}")]
    Read { path: PathBuf, reason: String },
}

/// One rule of one rules version, summed over devices and files.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuleSummary {
    pub label: String,
    pub devices: usize,
    pub counts: RuleCounts,
    /// Votes-weighted mean of the label model's estimates.
    pub estimated_accuracy: Option<f64>,
}

/// A summary being summed: (summary, accuracy × votes, votes with an
/// accuracy, devices seen).
type Accumulator = (RuleSummary, f64, f64, std::collections::BTreeSet<String>);

/// (rules version, rule) → summary.
pub fn summarize(root: &Path) -> Result<BTreeMap<(String, String), RuleSummary>, StatsError> {
    let mut out: BTreeMap<(String, String), Accumulator> = BTreeMap::new();
    for path in crate::report::table_files(root, "rule_stats") {
        let err = |reason: String| StatsError::Read {
            path: path.clone(),
            reason,
        };
        let file = File::open(&path).map_err(|e| err(e.to_string()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .and_then(|b| b.build())
            .map_err(|e| err(e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| err(e.to_string()))?;
            let s = |n: &str| {
                batch
                    .column_by_name(n)
                    .and_then(|c| c.as_any().downcast_ref::<StringArray>())
                    .cloned()
            };
            let i = |n: &str| {
                batch
                    .column_by_name(n)
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                    .cloned()
            };
            let (Some(device), Some(version), Some(rule), Some(label)) = (
                s("device_id"),
                s("rules_version"),
                s("rule"),
                s("rule_label"),
            ) else {
                return Err(err("not a rule_stats file".into()));
            };
            let (Some(readings), Some(votes), Some(overlaps), Some(conflicts), Some(agreements)) = (
                i("readings"),
                i("votes"),
                i("overlaps"),
                i("conflicts"),
                i("agreements"),
            ) else {
                return Err(err("not a rule_stats file".into()));
            };
            let accuracy = batch
                .column_by_name("estimated_accuracy")
                .and_then(|c| c.as_any().downcast_ref::<Float64Array>())
                .cloned();
            for r in 0..batch.num_rows() {
                let entry = out
                    .entry((version.value(r).to_string(), rule.value(r).to_string()))
                    .or_default();
                entry.0.label = label.value(r).to_string();
                let c = &mut entry.0.counts;
                c.readings += readings.value(r) as u64;
                c.votes += votes.value(r) as u64;
                c.overlaps += overlaps.value(r) as u64;
                c.conflicts += conflicts.value(r) as u64;
                c.agreements += agreements.value(r) as u64;
                if let Some(a) = accuracy.as_ref().filter(|a| !a.is_null(r)) {
                    entry.1 += a.value(r) * votes.value(r) as f64;
                    entry.2 += votes.value(r) as f64;
                }
                entry.3.insert(device.value(r).to_string());
            }
        }
    }
    Ok(out
        .into_iter()
        .map(|(k, (mut s, weighted, weight, devices))| {
            s.estimated_accuracy = (weight > 0.0).then(|| weighted / weight);
            s.devices = devices.len();
            (k, s)
        })
        .collect())
}

fn share(a: u64, b: u64) -> String {
    if b == 0 {
        "-".into()
    } else {
        format!("{:.3}", a as f64 / b as f64)
    }
}

/// A readable table of `summarize`'s result.
pub fn table(summary: &BTreeMap<(String, String), RuleSummary>) -> String {
    let mut t = String::new();
    let _ = writeln!(
        t,
        "{:<12} {:<28} {:<10} {:>8} {:>11} {:>9} {:>8} {:>8} {:>9} {:>9}",
        "version",
        "rule",
        "label",
        "devices",
        "readings",
        "coverage",
        "overlap",
        "conflict",
        "agreement",
        "accuracy"
    );
    for ((version, rule), s) in summary {
        let c = &s.counts;
        let _ = writeln!(
            t,
            "{:<12} {:<28} {:<10} {:>8} {:>11} {:>9} {:>8} {:>8} {:>9} {:>9}",
            version,
            rule,
            s.label,
            s.devices,
            c.readings,
            share(c.votes, c.readings),
            share(c.overlaps, c.votes),
            share(c.conflicts, c.votes),
            share(c.agreements, c.votes),
            s.estimated_accuracy
                .map_or("-".into(), |a| format!("{a:.3}")),
        );
    }
    if summary.is_empty() {
        t.push_str("(no rule statistics yet: no labelled file has been closed)\n");
    }
    t
}
