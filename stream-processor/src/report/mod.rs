//! `edgeloop report`: a picture of the loop, drawn from the Parquet data set
//! and the trainer's decision log as one SVG file: readings per device over
//! time, the labels over time, how each labelling rule votes, the model
//! versions the gate published or rejected with their metrics, the model
//! version each device ran over time, and the losses devices reported.
//!
//! It reads only the columns it draws (`device_id`, `ts`, `label`,
//! `predictions` of `readings`; `losses`; `rule_stats`), in two passes over
//! `readings` (the time range, then the counts), so its memory is bounded by
//! the number of devices and labels, not of readings. The model version a
//! device ran is the one its own predictions name (`predictions`), so it is
//! what the device applied, as it reported it with its readings. A file (or
//! decision-log line) it cannot read is left out and named in the report and
//! in the result, never fatal.

pub mod svg;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow_array::{
    Array, Int64Array, ListArray, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use crate::labeller::stats::{summarize, RuleSummary};
use svg::{Area, Svg};

/// Time buckets across the readings' time range, at most.
const MAX_BUCKETS: i64 = 60;
/// Bucket widths to choose from, in seconds: the smallest that needs at
/// most [`MAX_BUCKETS`] buckets.
const WIDTHS: [i64; 16] = [
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 86400,
];
/// Devices drawn one row each in the heat map, at most.
const DEVICE_ROWS: usize = 40;
/// Rules and devices drawn in bar charts at most.
const BAR_ROWS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("{0} has no readings table: is it the root of an edgeloop data set (`DIR/parquet` for `edgeloop up`)?")]
    NotADataSet(PathBuf),
}

/// What the report drew, for the command to print.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub readings: u64,
    pub devices: usize,
    pub labelled: u64,
    pub first_ts_micros: Option<i64>,
    pub last_ts_micros: Option<i64>,
    pub lost_readings: u64,
    pub rules: usize,
    /// Gate decisions drawn, and how many of them published a version.
    pub decisions: usize,
    pub published: usize,
    /// Devices whose readings carry a prediction, and the highest model
    /// version any of them ran.
    pub devices_with_model: usize,
    pub highest_applied_version: Option<u64>,
    /// Files left out because they could not be read, and why.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The SVG document and what it shows.
#[derive(Debug, Clone)]
pub struct Report {
    pub svg: String,
    pub summary: Summary,
}

/// The Parquet files of `table` under `root`, hidden (temporary) ones left
/// out, in name order.
pub fn table_files(root: &Path, table: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(table)];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = e.path();
            let hidden = e.file_name().to_string_lossy().starts_with('.');
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") && !hidden {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Reads the named columns of every batch of `path` (columns a file lacks
/// are absent from its batches).
fn read_columns(
    path: &Path,
    columns: &[&str],
    each: &mut dyn FnMut(&RecordBatch),
) -> Result<(), String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| e.to_string())?;
    let schema = builder.parquet_schema();
    // By top-level column, so a nested column (`predictions`) is read
    // whole and a nested field never matches a flat column's name.
    let leaves: Vec<usize> = schema
        .columns()
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            c.path()
                .parts()
                .first()
                .is_some_and(|top| columns.contains(&top.as_str()))
        })
        .map(|(i, _)| i)
        .collect();
    let mask = ProjectionMask::leaves(schema, leaves);
    let reader = builder
        .with_projection(mask)
        .build()
        .map_err(|e| e.to_string())?;
    for batch in reader {
        each(&batch.map_err(|e| e.to_string())?);
    }
    Ok(())
}

fn strings<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a StringArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
}

fn micros<'a>(batch: &'a RecordBatch, name: &str) -> Option<&'a TimestampMicrosecondArray> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<TimestampMicrosecondArray>())
}

/// Readings counted per time bucket.
#[derive(Debug, Default)]
struct Timeline {
    first: i64,
    width: i64,
    buckets: usize,
    per_device: HashMap<String, Vec<u64>>,
    /// Per label (`None`: unlabelled).
    per_label: BTreeMap<Option<String>, Vec<u64>>,
    /// Per device, the highest model version its predictions name in each
    /// bucket (0: none).
    per_device_model: HashMap<String, Vec<u64>>,
}

/// The highest `model_version` among the predictions of row `r`.
fn highest_version(predictions: &ListArray, r: usize) -> Option<u64> {
    if predictions.is_null(r) {
        return None;
    }
    let entries = predictions.value(r);
    let versions = entries
        .as_any()
        .downcast_ref::<StructArray>()?
        .column_by_name("model_version")?
        .as_any()
        .downcast_ref::<Int64Array>()?;
    versions
        .iter()
        .flatten()
        .filter(|v| *v > 0)
        .map(|v| v as u64)
        .max()
}

impl Timeline {
    fn bucket(&self, ts: i64) -> usize {
        (((ts - self.first) / self.width).max(0) as usize).min(self.buckets - 1)
    }
}

fn read_timeline(root: &Path, summary: &mut Summary) -> Option<Timeline> {
    let files = table_files(root, "readings");
    let mut readable = Vec::new();
    let (mut first, mut last) = (i64::MAX, i64::MIN);
    for path in files {
        let mut bad = None;
        let result = read_columns(&path, &["ts"], &mut |batch| {
            let Some(ts) = micros(batch, "ts") else {
                bad = Some("no ts column of microsecond timestamps".to_string());
                return;
            };
            for t in ts.iter().flatten() {
                first = first.min(t);
                last = last.max(t);
            }
        });
        match result.err().or(bad) {
            Some(reason) => summary.skipped.push((path, reason)),
            None => readable.push(path),
        }
    }
    if first > last {
        return None;
    }
    let first_ts = first;
    let span = last - first + 1;
    let seconds = WIDTHS
        .into_iter()
        .find(|w| span <= w * 1_000_000 * MAX_BUCKETS)
        .unwrap_or((span / 1_000_000 / MAX_BUCKETS).max(1) + 1);
    let width = seconds * 1_000_000;
    // Buckets start on a multiple of their width, as a clock reads.
    let first = first - first.rem_euclid(width);
    let timeline = Timeline {
        first,
        width,
        buckets: ((last - first) / width + 1) as usize,
        ..Timeline::default()
    };
    let mut timeline = timeline;
    let buckets = timeline.buckets;
    for path in readable {
        let columns = ["device_id", "ts", "label", "predictions"];
        let result = read_columns(&path, &columns, &mut |batch| {
            let (Some(device), Some(ts)) = (strings(batch, "device_id"), micros(batch, "ts"))
            else {
                return;
            };
            let label = strings(batch, "label");
            let predictions = batch
                .column_by_name("predictions")
                .and_then(|c| c.as_any().downcast_ref::<ListArray>());
            for r in 0..batch.num_rows() {
                if ts.is_null(r) || device.is_null(r) {
                    continue;
                }
                let b = timeline.bucket(ts.value(r));
                let counts = timeline
                    .per_device
                    .entry(device.value(r).to_string())
                    .or_insert_with(|| vec![0; buckets]);
                counts[b] += 1;
                if let Some(v) = predictions.and_then(|p| highest_version(p, r)) {
                    let versions = timeline
                        .per_device_model
                        .entry(device.value(r).to_string())
                        .or_insert_with(|| vec![0; buckets]);
                    versions[b] = versions[b].max(v);
                }
                let l = label
                    .filter(|l| !l.is_null(r))
                    .map(|l| l.value(r).to_string());
                summary.readings += 1;
                summary.labelled += u64::from(l.is_some());
                timeline
                    .per_label
                    .entry(l)
                    .or_insert_with(|| vec![0; buckets])[b] += 1;
            }
        });
        if let Err(reason) = result {
            summary.skipped.push((path, reason));
        }
    }
    summary.devices = timeline.per_device.len();
    summary.devices_with_model = timeline.per_device_model.len();
    summary.highest_applied_version = timeline
        .per_device_model
        .values()
        .flat_map(|v| v.iter().copied())
        .max();
    summary.first_ts_micros = Some(first_ts);
    summary.last_ts_micros = Some(last);
    Some(timeline)
}

/// Lost readings per device and reason, from the `losses` table.
fn read_losses(root: &Path, summary: &mut Summary) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    for path in table_files(root, "losses") {
        let result = read_columns(
            &path,
            &["device_id", "reason", "lost_readings"],
            &mut |batch| {
                let (Some(device), Some(reason)) =
                    (strings(batch, "device_id"), strings(batch, "reason"))
                else {
                    return;
                };
                let Some(lost) = batch
                    .column_by_name("lost_readings")
                    .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
                else {
                    return;
                };
                for r in 0..batch.num_rows() {
                    let n = lost.value(r).max(0) as u64;
                    summary.lost_readings += n;
                    *out.entry(device.value(r).to_string())
                        .or_default()
                        .entry(reason.value(r).to_string())
                        .or_default() += n;
                }
            },
        );
        if let Err(reason) = result {
            summary.skipped.push((path, reason));
        }
    }
    out
}

/// One gate decision, as the report draws it.
#[derive(Debug, Clone, PartialEq)]
struct GateDecision {
    at_micros: i64,
    /// `task/profile`.
    lane: String,
    /// `published`, `rejected`, …
    decision: String,
    version: Option<u64>,
    /// The gate's metric (`macro_f1` or `accuracy`) of the candidate and of
    /// the live model on the same held-out data.
    metric: String,
    candidate: f64,
    live: Option<f64>,
}

fn parse_decision(line: &str) -> Result<GateDecision, String> {
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let text = |k: &str| {
        v.get(k)
            .and_then(|x| x.as_str())
            .ok_or_else(|| format!("no {k}"))
    };
    let at_micros = chrono::DateTime::parse_from_rfc3339(text("at")?)
        .map_err(|e| format!("at: {e}"))?
        .timestamp_micros();
    let metric = text("metric")?.to_string();
    let value = |m: Option<&serde_json::Value>| m.and_then(|m| m.get(&metric)?.as_f64());
    Ok(GateDecision {
        at_micros,
        lane: format!("{}/{}", text("task")?, text("profile")?),
        decision: text("decision")?.to_string(),
        version: v.get("version").and_then(|x| x.as_u64()),
        candidate: value(v.get("candidate")).ok_or("no candidate metric")?,
        live: value(v.get("live")),
        metric,
    })
}

/// The trainer's decision log (`decisions.jsonl`); a line that cannot be
/// read is left out and the first such line named.
fn read_decisions(path: &Path, summary: &mut Summary) -> Vec<GateDecision> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            summary.skipped.push((path.to_path_buf(), e.to_string()));
            return Vec::new();
        }
    };
    let mut out = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match parse_decision(line) {
            Ok(d) => out.push(d),
            Err(e) => bad.push(format!("line {}: {e}", i + 1)),
        }
    }
    if let Some(first) = bad.first() {
        summary.skipped.push((
            path.to_path_buf(),
            format!("{} unreadable line(s), first {first}", bad.len()),
        ));
    }
    out.sort_by_key(|d| d.at_micros);
    summary.decisions = out.len();
    summary.published = out.iter().filter(|d| d.decision == "published").count();
    out
}

fn clock(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%H:%M:%S").to_string())
        .unwrap_or_default()
}

fn date_time(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// Ticks under the x axis at bucket starts: for a heat map (`cells`, a
/// bucket is a cell) or for points on bucket starts (a line or area).
fn x_ticks(t: &Timeline, cells: bool) -> Vec<(f64, String)> {
    let last = t.buckets.saturating_sub(1) as i64;
    let ticks = last.clamp(1, 4);
    let span = if cells { last + 1 } else { last.max(1) } as f64;
    let mut out: Vec<(f64, String)> = (0..=ticks)
        .map(|i| {
            let b = last * i / ticks;
            (b as f64 / span, clock(t.first + t.width * b))
        })
        .collect();
    out.dedup();
    out
}

fn draw_devices(svg: &mut Svg, t: Option<&Timeline>) {
    let rows = t.map_or(1, |t| t.per_device.len().clamp(1, DEVICE_ROWS));
    let note = t.map_or(String::new(), |t| {
        format!(
            "readings per second by when they were taken (ts), one row per device, {} s per cell; blank: nothing from the device",
            t.width / 1_000_000
        )
    });
    let area = svg.panel("Readings per device", &note, 110.0 + 14.0 * rows as f64);
    let Some(t) = t.filter(|t| !t.per_device.is_empty()) else {
        svg.empty(area, "no readings in the data set yet");
        return;
    };
    let mut devices: Vec<(&String, &Vec<u64>)> = t.per_device.iter().collect();
    if devices.len() > DEVICE_ROWS {
        // The busiest devices, shown in name order.
        devices.sort_by(|a, b| {
            b.1.iter()
                .sum::<u64>()
                .cmp(&a.1.iter().sum::<u64>())
                .then(a.0.cmp(b.0))
        });
        devices.truncate(DEVICE_ROWS);
    }
    devices.sort_by(|a, b| a.0.cmp(b.0));
    let per_second = 1e6 / t.width as f64;
    let rows: Vec<(String, Vec<f64>)> = devices
        .iter()
        .map(|(d, c)| {
            (
                (*d).clone(),
                c.iter().map(|v| *v as f64 * per_second).collect(),
            )
        })
        .collect();
    let max = rows
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max);
    svg.heat(area, &rows, max);
    svg.x_axis(area, &x_ticks(t, true));
    let mut legend = vec![format!("darkest: {} /s", svg::short(max))];
    if t.per_device.len() > DEVICE_ROWS {
        legend.push(format!(
            "{} busiest of {} devices",
            DEVICE_ROWS,
            t.per_device.len()
        ));
    }
    svg.notes(area, &legend);
}

fn draw_labels(svg: &mut Svg, t: Option<&Timeline>) {
    let note = "share of readings per label in each time bucket (label model or majority)";
    let area = svg.panel("Labels over time", note, 280.0);
    let Some(t) = t.filter(|t| !t.per_label.is_empty()) else {
        svg.empty(area, "no readings in the data set yet");
        return;
    };
    let totals: Vec<u64> = (0..t.buckets)
        .map(|b| t.per_label.values().map(|c| c[b]).sum())
        .collect();
    let mut names = Vec::new();
    let mut layers = Vec::new();
    for (label, counts) in &t.per_label {
        names.push(label.clone().unwrap_or_else(|| "(unlabelled)".into()));
        layers.push(
            counts
                .iter()
                .zip(&totals)
                .map(|(c, n)| if *n == 0 { 0.0 } else { *c as f64 / *n as f64 })
                .collect::<Vec<f64>>(),
        );
    }
    svg.axes(area, &x_ticks(t, false), 1.0, "share");
    svg.stacked(area, &layers, 1.0);
    svg.legend(area, &names);
}

fn draw_rules(svg: &mut Svg, rules: &BTreeMap<(String, String), RuleSummary>) {
    let note = "coverage (share of readings the rule voted on); estimated accuracy and conflicts beside each bar";
    let rows = rules.len().clamp(1, BAR_ROWS);
    let area = svg.panel("Labelling rules", note, 110.0 + 22.0 * rows as f64);
    if rules.is_empty() {
        svg.empty(
            area,
            "no rule statistics yet (no rules in force, or no file closed)",
        );
        return;
    }
    let bars: Vec<(String, f64, String)> = rules
        .iter()
        .take(BAR_ROWS)
        .map(|((version, rule), s)| {
            let c = s.counts;
            let coverage = if c.readings > 0 {
                c.votes as f64 / c.readings as f64
            } else {
                0.0
            };
            let conflict = if c.votes > 0 {
                c.conflicts as f64 / c.votes as f64
            } else {
                0.0
            };
            let accuracy = s
                .estimated_accuracy
                .map_or("-".to_string(), |a| format!("{a:.2}"));
            (
                format!("{rule} → {} ({version})", s.label),
                coverage,
                format!("{coverage:.3} · accuracy {accuracy} · conflict {conflict:.2}"),
            )
        })
        .collect();
    let area = Area {
        x: area.x + 170.0,
        w: area.w - 170.0,
        ..area
    };
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    svg.bars(area, &bars, max, svg::colour(0));
}

fn draw_gate(svg: &mut Svg, decisions: &[GateDecision]) {
    let note = "every retrain: the candidate's held-out metric; filled: published (its version above), hollow: refused by the gate; × the live model's metric it was compared with";
    let area = svg.panel("Models and the quality gate", note, 300.0);
    let (Some(first), Some(last)) = (decisions.first(), decisions.last()) else {
        svg.empty(
            area,
            "no gate decision yet (no trainer log, or not enough labelled data)",
        );
        return;
    };
    let (from, to) = (first.at_micros, last.at_micros);
    let span = (to - from).max(1) as f64;
    let at = |t: i64| {
        if to > from {
            (t - from) as f64 / span
        } else {
            0.5
        }
    };
    let mut lanes: Vec<&str> = decisions.iter().map(|d| d.lane.as_str()).collect();
    lanes.sort_unstable();
    lanes.dedup();
    let metric = first.metric.replace('_', "-");
    let ticks: Vec<(f64, String)> = if to > from {
        (0..=4)
            .map(|i| (i as f64 / 4.0, clock(from + (to - from) * i / 4)))
            .collect()
    } else {
        vec![(0.5, clock(from))]
    };
    svg.axes(area, &ticks, 1.0, &metric);
    for d in decisions {
        let Some(i) = lanes.iter().position(|l| *l == d.lane) else {
            continue;
        };
        let colour = svg::colour(i);
        if let Some(live) = d.live {
            svg.cross(area, at(d.at_micros), live, 1.0, colour);
        }
        let published = d.decision == "published";
        let label = match (published, d.version) {
            (true, Some(v)) => format!("v{v}"),
            _ => String::new(),
        };
        svg.dot(
            area,
            at(d.at_micros),
            d.candidate,
            1.0,
            colour,
            published,
            &label,
        );
    }
    svg.legend(
        area,
        &lanes.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
    );
}

fn draw_applied(svg: &mut Svg, t: Option<&Timeline>) {
    let rows = t.map_or(1, |t| t.per_device_model.len().clamp(1, DEVICE_ROWS));
    let note = "the model version each device ran, as its own predictions name it (the darker the newer; blank: no model yet)";
    let area = svg.panel(
        "Model versions on devices",
        note,
        110.0 + 14.0 * rows as f64,
    );
    let Some(t) = t.filter(|t| !t.per_device_model.is_empty()) else {
        svg.empty(area, "no device has sent a prediction yet");
        return;
    };
    let mut devices: Vec<(&String, &Vec<u64>)> = t.per_device_model.iter().collect();
    devices.sort_by(|a, b| a.0.cmp(b.0));
    let shown = devices.len().min(DEVICE_ROWS);
    let rows: Vec<(String, Vec<f64>)> = devices
        .iter()
        .take(DEVICE_ROWS)
        .map(|(d, v)| ((*d).clone(), v.iter().map(|x| *x as f64).collect()))
        .collect();
    let max = t
        .per_device_model
        .values()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0);
    svg.heat(area, &rows, max as f64);
    svg.x_axis(area, &x_ticks(t, true));
    let latest: usize = t
        .per_device_model
        .values()
        .filter(|v| v.iter().copied().max() == Some(max))
        .count();
    let mut legend = vec![
        format!("darkest: v{max}"),
        format!("{latest} of {} devices ran v{max}", t.per_device.len()),
    ];
    if devices.len() > shown {
        legend.push(format!("first {shown} of {} devices", devices.len()));
    }
    svg.notes(area, &legend);
}

fn draw_losses(svg: &mut Svg, losses: &BTreeMap<String, BTreeMap<String, u64>>) {
    let note =
        "readings devices lost before they reached the cloud, as they reported them (LossReport)";
    let rows = losses.len().clamp(1, BAR_ROWS);
    let area = svg.panel(
        "Losses reported by devices",
        note,
        110.0 + 22.0 * rows as f64,
    );
    if losses.is_empty() {
        svg.empty(area, "no device reported a loss");
        return;
    }
    let mut devices: Vec<(&String, u64, String)> = losses
        .iter()
        .map(|(d, reasons)| {
            let why = reasons
                .iter()
                .map(|(r, n)| format!("{r} {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            (d, reasons.values().sum(), why)
        })
        .collect();
    devices.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let bars: Vec<(String, f64, String)> = devices
        .into_iter()
        .take(BAR_ROWS)
        .map(|(d, n, why)| (d.clone(), n as f64, why))
        .collect();
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max);
    svg.bars(area, &bars, max, svg::colour(3));
}

/// Draws the report of the data set under `root` (no gate decisions).
pub fn build(root: &Path) -> Result<Report, ReportError> {
    build_with_decisions(root, None)
}

/// Draws the report of the data set under `root`, with the trainer's
/// decision log `decisions` (`{trainer.dir}/decisions.jsonl`; a missing
/// file draws an empty panel).
pub fn build_with_decisions(root: &Path, decisions: Option<&Path>) -> Result<Report, ReportError> {
    if !root.join("readings").is_dir() {
        return Err(ReportError::NotADataSet(root.to_path_buf()));
    }
    let mut summary = Summary::default();
    let timeline = read_timeline(root, &mut summary);
    let losses = read_losses(root, &mut summary);
    let rules = match summarize(root) {
        Ok(rules) => rules,
        Err(e) => {
            summary
                .skipped
                .push((root.join("rule_stats"), e.to_string()));
            BTreeMap::new()
        }
    };
    summary.rules = rules.len();
    let decisions = decisions.map_or_else(Vec::new, |p| read_decisions(p, &mut summary));

    let mut svg = Svg::new(1100.0);
    let span = match (summary.first_ts_micros, summary.last_ts_micros) {
        (Some(a), Some(b)) => format!("{} to {}", date_time(a), date_time(b)),
        _ => "no readings yet".into(),
    };
    let labelled = if summary.readings > 0 {
        100.0 * summary.labelled as f64 / summary.readings as f64
    } else {
        0.0
    };
    svg.heading(
        "edgeloop: the loop at a glance",
        &format!(
            "{} readings from {} devices, {labelled:.1}% labelled, {} lost and reported · {span} · {}",
            summary.readings,
            summary.devices,
            summary.lost_readings,
            root.display()
        ),
    );
    draw_devices(&mut svg, timeline.as_ref());
    draw_labels(&mut svg, timeline.as_ref());
    draw_rules(&mut svg, &rules);
    draw_gate(&mut svg, &decisions);
    draw_applied(&mut svg, timeline.as_ref());
    draw_losses(&mut svg, &losses);
    if !summary.skipped.is_empty() {
        let y = svg.height + 24.0;
        let text = format!(
            "{} file(s) could not be read and are left out, first: {} ({})",
            summary.skipped.len(),
            summary.skipped[0].0.display(),
            summary.skipped[0].1
        );
        svg.text(20.0, y, 12.0, "start", &text);
        svg.height = y;
    }
    Ok(Report {
        svg: svg.finish(),
        summary,
    })
}
