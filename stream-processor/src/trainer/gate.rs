//! The quality gate: a time-based split of the buffered examples, the
//! comparison of a candidate with the live model on the held-out part (each
//! in its device numerics), and the decision log.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::buffer::Example;
use super::config::{GateConfig, GateMetric};
use super::fit::Metrics;

/// Examples split by reading time: everything in `train` is strictly older
/// than everything in `held_out`.
#[derive(Debug)]
pub struct Split<'a> {
    pub train: Vec<&'a Example>,
    pub held_out: Vec<&'a Example>,
    /// The first held-out timestamp: train has `ts < cut`, held-out `ts >= cut`.
    pub cut_micros: i64,
}

/// Holds out the most recent `fraction` of `examples` by reading time.
/// Examples with the cut's timestamp all go to the held-out side, so no
/// training example is as recent as a held-out one (with several devices,
/// equal timestamps are common). `None` when there is nothing on one side.
pub fn split<'a>(examples: impl Iterator<Item = &'a Example>, fraction: f64) -> Option<Split<'a>> {
    let mut all: Vec<&Example> = examples.collect();
    all.sort_by_key(|e| (e.ts_micros, e.partition, e.offset));
    let n = all.len();
    let held = ((n as f64 * fraction).ceil() as usize).clamp(1, n.max(1));
    let cut_micros = all.get(n.checked_sub(held)?)?.ts_micros;
    let first_held = all.partition_point(|e| e.ts_micros < cut_micros);
    let held_out = all.split_off(first_held);
    if all.is_empty() || held_out.is_empty() {
        return None;
    }
    Some(Split {
        train: all,
        held_out,
        cut_micros,
    })
}

/// `published`, `rejected`, or `pinned` (the candidate passed the gate but
/// its (task, profile) is pinned: `edgeloop ctl models pin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Published,
    Rejected,
    Pinned,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Published => "published",
            Verdict::Rejected => "rejected",
            Verdict::Pinned => "pinned",
        }
    }
}

/// The gate's rule: with no live model the candidate passes; otherwise its
/// metric must be at least the live one's minus the margin. Returns the
/// verdict and the reason, a sentence.
pub fn judge(
    config: &GateConfig,
    candidate: &Metrics,
    live: Option<&Metrics>,
    model_bytes: usize,
    max_model_bytes: usize,
) -> (Verdict, String) {
    if model_bytes > max_model_bytes {
        return (
            Verdict::Rejected,
            format!(
                "the artifact is {model_bytes} bytes, above the profile's max_model_bytes {max_model_bytes}"
            ),
        );
    }
    let metric = |m: &Metrics| match config.metric {
        GateMetric::MacroF1 => m.macro_f1,
        GateMetric::Accuracy => m.accuracy,
    };
    let name = match config.metric {
        GateMetric::MacroF1 => "macro-F1",
        GateMetric::Accuracy => "accuracy",
    };
    let Some(live) = live else {
        return (
            Verdict::Published,
            format!("no live model; candidate {name} {:.4}", metric(candidate)),
        );
    };
    let (c, l) = (metric(candidate), metric(live));
    if c >= l - config.margin {
        (
            Verdict::Published,
            format!(
                "candidate {name} {c:.4} is not worse than the live model's {l:.4} by more than {}",
                config.margin
            ),
        )
    } else {
        (
            Verdict::Rejected,
            format!(
                "candidate {name} {c:.4} is worse than the live model's {l:.4} by more than {}",
                config.margin
            ),
        )
    }
}

/// Offsets of `edgeloop.readings` the examples came from, per partition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OffsetRange {
    pub partition: i32,
    pub first: i64,
    pub last: i64,
}

/// Reading-time range of a set of examples (µs since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TimeRange {
    pub from_micros: i64,
    pub to_micros: i64,
}

/// Offsets and time range of `examples`.
pub fn lineage(examples: &[&Example]) -> (Vec<OffsetRange>, Option<TimeRange>) {
    let mut per: std::collections::BTreeMap<i32, (i64, i64)> = Default::default();
    let mut range: Option<TimeRange> = None;
    for e in examples {
        let r = per.entry(e.partition).or_insert((e.offset, e.offset));
        r.0 = r.0.min(e.offset);
        r.1 = r.1.max(e.offset);
        let t = range.get_or_insert(TimeRange {
            from_micros: e.ts_micros,
            to_micros: e.ts_micros,
        });
        t.from_micros = t.from_micros.min(e.ts_micros);
        t.to_micros = t.to_micros.max(e.ts_micros);
    }
    let offsets = per
        .into_iter()
        .map(|(partition, (first, last))| OffsetRange {
            partition,
            first,
            last,
        })
        .collect();
    (offsets, range)
}

/// One gate decision, as a line of `decisions.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// When (RFC 3339, UTC).
    pub at: String,
    pub task: String,
    pub profile: String,
    pub numerics: &'static str,
    pub decision: Verdict,
    pub reason: String,
    /// What started the retrain: `examples`, `time`, `drift`, `rules_changed`.
    pub trigger: &'static str,
    /// The metric the gate compared (`macro_f1` or `accuracy`) and its margin.
    pub metric: GateMetric,
    pub margin: f64,
    /// Both models on the same held-out examples, each in the profile's numerics.
    pub candidate: Metrics,
    pub live: Option<Metrics>,
    pub live_version: Option<u64>,
    /// The version given to the candidate, when published.
    pub version: Option<u64>,
    pub model_bytes: usize,
    pub classes: Vec<String>,
    pub train_examples: usize,
    pub held_out_examples: usize,
    pub train_window: Option<TimeRange>,
    pub held_out_window: Option<TimeRange>,
    pub train_offsets: Vec<OffsetRange>,
    pub held_out_offsets: Vec<OffsetRange>,
    pub rules_versions: Vec<String>,
    pub min_confidence: f64,
    pub fit_millis: u64,
}

/// Appends decisions to `DIR/decisions.jsonl`, one JSON object per line,
/// fsynced after each.
#[derive(Debug)]
pub struct DecisionLog {
    path: PathBuf,
}

impl DecisionLog {
    pub fn new(dir: &Path) -> Self {
        DecisionLog {
            path: dir.join("decisions.jsonl"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn append(&self, decision: &Decision) -> std::io::Result<()> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut line = serde_json::to_vec(decision).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&line)?;
        f.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ex(ts: i64, offset: i64) -> Example {
        Example {
            features: vec![],
            class: 0,
            ts_micros: ts,
            partition: (offset % 3) as i32,
            offset,
            rules_version: Arc::from("v"),
        }
    }

    #[test]
    fn time_based_split_never_leaks_training_rows() {
        // Many devices: timestamps repeat (10 readings per timestamp), and
        // arrive out of order.
        let data: Vec<Example> = (0..1000i64)
            .map(|i| ex((i * 7919) % 1000 / 10, i))
            .collect();
        for fraction in [0.05, 0.2, 0.5, 0.9] {
            let s = split(data.iter(), fraction).expect("both sides");
            let newest_train = s.train.iter().map(|e| e.ts_micros).max().expect("train");
            let oldest_held = s.held_out.iter().map(|e| e.ts_micros).min().expect("held");
            assert!(newest_train < oldest_held, "fraction {fraction}");
            assert_eq!(oldest_held, s.cut_micros);
            assert_eq!(s.train.len() + s.held_out.len(), data.len());
            // No example on both sides.
            let train: std::collections::HashSet<i64> = s.train.iter().map(|e| e.offset).collect();
            assert!(s.held_out.iter().all(|e| !train.contains(&e.offset)));
            // Roughly the fraction asked for (whole timestamps move together).
            let got = s.held_out.len() as f64 / data.len() as f64;
            assert!((got - fraction).abs() <= 0.011, "{fraction}: {got}");
        }
    }

    #[test]
    fn split_refuses_when_one_side_would_be_empty() {
        let same: Vec<Example> = (0..10).map(|i| ex(5, i)).collect();
        assert!(split(same.iter(), 0.2).is_none());
        assert!(split(std::iter::empty(), 0.2).is_none());
    }

    fn metrics(f1: f64) -> Metrics {
        Metrics {
            accuracy: f1,
            macro_f1: f1,
            examples: 100,
        }
    }

    #[test]
    fn judge_applies_the_margin_and_the_size_limit() {
        let g = GateConfig::default();
        assert_eq!(
            judge(&g, &metrics(0.5), None, 10, 100).0,
            Verdict::Published
        );
        assert_eq!(
            judge(&g, &metrics(0.79), Some(&metrics(0.8)), 10, 100).0,
            Verdict::Published
        );
        assert_eq!(
            judge(&g, &metrics(0.7), Some(&metrics(0.8)), 10, 100).0,
            Verdict::Rejected
        );
        let (v, why) = judge(&g, &metrics(0.9), None, 101, 100);
        assert_eq!(v, Verdict::Rejected);
        assert!(why.contains("max_model_bytes"), "{why}");
    }
}
