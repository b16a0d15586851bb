//! Readings from text: a CSV or JSON Lines file replayed (as fast as
//! possible or in real time), or lines on standard input.
//!
//! Each line (row) has a timestamp field and one field per channel:
//!
//! - **CSV**: a header row names the columns; the timestamp column is
//!   `ts_column`, every other column is a channel unless `channels` lists the
//!   ones to keep. Quoted fields are allowed.
//! - **JSON Lines**: one object per line, `{"ts": …, "temperature": 21.5}`;
//!   `channels` must list the channel keys.
//!
//! A timestamp is a number of seconds since the Unix epoch (fractions
//! allowed) or an RFC 3339 string (`2026-11-30T10:00:00.5Z`); an empty one
//! means "now". A missing or empty channel value is stored as null. A line
//! that cannot be read (bad number, bad timestamp, wrong field count, not
//! JSON) is counted in `bad_lines`, logged with its line number, and skipped;
//! it never stops the agent.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgeloop_proto::v1::Reading;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio_util::sync::CancellationToken;

use super::SourceError;
use crate::spool::SharedSpool;
use crate::stats::AgentStats;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LineFormat {
    #[default]
    Csv,
    JsonLines,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LinesConfig {
    /// The file to replay; `None` (for the `stdin` source) reads standard input.
    pub path: Option<PathBuf>,
    pub format: LineFormat,
    /// The timestamp field.
    pub ts_column: String,
    /// Channels to keep (required for JSON Lines; for CSV, empty means every
    /// column but the timestamp).
    pub channels: Vec<String>,
    /// Replay at the pace of the timestamps instead of as fast as possible.
    pub realtime: bool,
    /// Replay at this many readings per second instead of as fast as
    /// possible (the timestamps stay those of the file). Not with
    /// `realtime`.
    pub rate_hz: Option<f64>,
}

impl Default for LinesConfig {
    fn default() -> Self {
        LinesConfig {
            path: None,
            format: LineFormat::Csv,
            ts_column: "ts".into(),
            channels: Vec::new(),
            realtime: false,
            rate_hz: None,
        }
    }
}

/// Lines logged in full before only counting.
const LOGGED_BAD_LINES: u64 = 10;

fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl LinesConfig {
    pub fn validate(&self, needs_path: bool) -> Result<(), String> {
        if needs_path && self.path.is_none() {
            return Err("path: the file to replay is missing".into());
        }
        if let Some(rate) = self.rate_hz {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(format!(
                    "rate_hz: {rate} must be a positive number of readings per second"
                ));
            }
            if self.realtime {
                return Err(
                    "rate_hz: set either realtime (the timestamps' pace) or rate_hz, not both"
                        .into(),
                );
            }
        }
        if self.format == LineFormat::JsonLines && self.channels.is_empty() {
            return Err("channels: JSON Lines needs the list of channel keys".into());
        }
        if let Some(bad) = self.channels.iter().find(|c| !valid_channel(c)) {
            return Err(format!(
                "channels: {bad:?} must be letters, digits or '_' (at most 64)"
            ));
        }
        Ok(())
    }

    /// The channels, in value order. For a CSV file without a `channels`
    /// list, the header decides.
    pub fn resolve_channels(&self) -> Result<Vec<String>, String> {
        if !self.channels.is_empty() || self.format == LineFormat::JsonLines {
            return Ok(self.channels.clone());
        }
        let Some(path) = &self.path else {
            return Err("channels: reading CSV from stdin needs the list of channels".into());
        };
        let mut reader =
            csv::Reader::from_path(path).map_err(|e| format!("path: {}: {e}", path.display()))?;
        let header = reader
            .headers()
            .map_err(|e| format!("path: {}: {e}", path.display()))?;
        let channels: Vec<String> = header
            .iter()
            .filter(|h| *h != self.ts_column)
            .map(str::to_string)
            .collect();
        if let Some(bad) = channels.iter().find(|c| !valid_channel(c)) {
            return Err(format!(
                "path: column {bad:?} of {} is not a valid channel name",
                path.display()
            ));
        }
        Ok(channels)
    }
}

/// Parses a timestamp: seconds since the epoch, or RFC 3339. `None` if bad.
pub fn parse_ts(field: &str, now_micros: i64) -> Option<i64> {
    let field = field.trim();
    if field.is_empty() {
        return Some(now_micros);
    }
    if let Ok(secs) = field.parse::<f64>() {
        return (secs.is_finite() && secs.abs() < 1e12).then(|| (secs * 1e6).round() as i64);
    }
    chrono::DateTime::parse_from_rfc3339(field)
        .ok()
        .map(|t| t.timestamp_micros())
}

fn parse_value(field: Option<&str>) -> Result<f64, String> {
    match field.map(str::trim) {
        None | Some("") => Ok(f64::NAN),
        Some(v) => v
            .parse::<f64>()
            .map_err(|_| format!("{v:?} is not a number")),
    }
}

/// Turns one line into a reading, or says why it cannot.
pub struct LineParser {
    format: LineFormat,
    ts_column: String,
    channels: Vec<String>,
    /// CSV: column index of the timestamp and of each channel.
    csv_ts: usize,
    csv_channels: Vec<Option<usize>>,
    csv_fields: usize,
}

impl LineParser {
    /// `header` is the CSV header row (ignored for JSON Lines).
    pub fn new(
        config: &LinesConfig,
        channels: Vec<String>,
        header: Option<&[String]>,
    ) -> Result<LineParser, String> {
        let (mut csv_ts, mut csv_channels, mut csv_fields) = (0, Vec::new(), 0);
        if config.format == LineFormat::Csv {
            let header: Vec<String> = match header {
                Some(h) => h.to_vec(),
                // stdin CSV without a header: ts then the channels.
                None => std::iter::once(config.ts_column.clone())
                    .chain(channels.iter().cloned())
                    .collect(),
            };
            csv_ts = header
                .iter()
                .position(|h| *h == config.ts_column)
                .ok_or_else(|| {
                    format!(
                        "ts_column: {:?} is not a column of the header",
                        config.ts_column
                    )
                })?;
            csv_channels = channels
                .iter()
                .map(|c| header.iter().position(|h| h == c))
                .collect();
            csv_fields = header.len();
        }
        Ok(LineParser {
            format: config.format,
            ts_column: config.ts_column.clone(),
            channels,
            csv_ts,
            csv_channels,
            csv_fields,
        })
    }

    pub fn parse(&self, line: &str, now_micros: i64) -> Result<Reading, String> {
        match self.format {
            LineFormat::Csv => {
                let mut reader = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .from_reader(line.as_bytes());
                let record = reader
                    .records()
                    .next()
                    .ok_or("empty line")?
                    .map_err(|e| format!("not CSV: {e}"))?;
                if record.len() != self.csv_fields {
                    return Err(format!(
                        "{} fields where the header has {}",
                        record.len(),
                        self.csv_fields
                    ));
                }
                let ts = parse_ts(record.get(self.csv_ts).unwrap_or(""), now_micros).ok_or_else(
                    || format!("bad timestamp {:?}", record.get(self.csv_ts).unwrap_or("")),
                )?;
                let values = self
                    .csv_channels
                    .iter()
                    .map(|i| parse_value(i.and_then(|i| record.get(i))))
                    .collect::<Result<Vec<f64>, String>>()?;
                Ok(Reading {
                    ts_micros: ts,
                    values,
                    true_label: String::new(),
                    predictions: Vec::new(),
                })
            }
            LineFormat::JsonLines => {
                let object: HashMap<String, serde_json::Value> =
                    serde_json::from_str(line).map_err(|e| format!("not a JSON object: {e}"))?;
                let ts = match object.get(&self.ts_column) {
                    None | Some(serde_json::Value::Null) => Some(now_micros),
                    Some(serde_json::Value::Number(n)) => n
                        .as_f64()
                        .and_then(|s| parse_ts(&s.to_string(), now_micros)),
                    Some(serde_json::Value::String(s)) => parse_ts(s, now_micros),
                    Some(_) => None,
                }
                .ok_or_else(|| format!("bad timestamp in {:?}", self.ts_column))?;
                let values = self
                    .channels
                    .iter()
                    .map(|c| match object.get(c) {
                        None | Some(serde_json::Value::Null) => Ok(f64::NAN),
                        Some(serde_json::Value::Number(n)) => {
                            n.as_f64().ok_or_else(|| format!("{c}: not a number"))
                        }
                        Some(v) => Err(format!("{c}: {v} is not a number")),
                    })
                    .collect::<Result<Vec<f64>, String>>()?;
                Ok(Reading {
                    ts_micros: ts,
                    values,
                    true_label: String::new(),
                    predictions: Vec::new(),
                })
            }
        }
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Moves `batch` into the spool (waiting for room); `false` if `shutdown`
/// came first.
async fn flush(
    spool: &SharedSpool,
    batch: &mut Vec<Reading>,
    shutdown: &CancellationToken,
    stats: &AgentStats,
) -> Result<bool, SourceError> {
    if batch.is_empty() {
        return Ok(true);
    }
    let n = batch.len() as u64;
    if !spool
        .append_waiting(std::mem::take(batch), shutdown)
        .await?
    {
        return Ok(false);
    }
    AgentStats::add(&stats.readings_generated, n);
    Ok(true)
}

/// Reads `input` line by line into the spool until it ends or `shutdown`.
pub async fn run<R: AsyncBufRead + Unpin>(
    config: &LinesConfig,
    channels: Vec<String>,
    mut input: R,
    spool: Arc<SharedSpool>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<(), SourceError> {
    let mut line = String::new();
    let mut number = 0u64;
    let mut header: Option<Vec<String>> = None;
    if config.format == LineFormat::Csv && config.path.is_some() {
        let n = input
            .read_line(&mut line)
            .await
            .map_err(SourceError::Input)?;
        number += 1;
        if n == 0 {
            return Ok(());
        }
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(false)
            .from_reader(line.as_bytes());
        if let Some(Ok(record)) = reader.records().next() {
            header = Some(record.iter().map(str::to_string).collect());
        }
    }
    let parser =
        LineParser::new(config, channels, header.as_deref()).map_err(SourceError::Config)?;
    let mut batch = Vec::with_capacity(256);
    let start = tokio::time::Instant::now();
    let mut first_ts: Option<i64> = None;
    let mut paced = 0u64;
    loop {
        line.clear();
        let read = tokio::select! {
            _ = shutdown.cancelled() => break,
            read = input.read_line(&mut line) => read.map_err(SourceError::Input)?,
        };
        if read == 0 {
            break;
        }
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        match parser.parse(line.trim_end_matches(['\r', '\n']), now_micros()) {
            Ok(reading) => {
                let due = if config.realtime {
                    let first = *first_ts.get_or_insert(reading.ts_micros);
                    Some(start + Duration::from_micros((reading.ts_micros - first).max(0) as u64))
                } else {
                    config.rate_hz.map(|rate| {
                        paced += 1;
                        start + Duration::from_secs_f64((paced - 1) as f64 / rate)
                    })
                };
                if let Some(due) = due {
                    if due > tokio::time::Instant::now()
                        && !flush(&spool, &mut batch, &shutdown, &stats).await?
                    {
                        return Ok(());
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep_until(due) => {}
                    }
                }
                batch.push(reading);
            }
            Err(reason) => {
                let bad = stats
                    .bad_lines
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                if bad <= LOGGED_BAD_LINES {
                    tracing::warn!(line = number, %reason, "skipping a line that is not a reading");
                } else if bad == LOGGED_BAD_LINES + 1 {
                    tracing::warn!("more bad lines; counting them without logging each");
                }
            }
        }
        if batch.len() >= 256 && !flush(&spool, &mut batch, &shutdown, &stats).await? {
            return Ok(());
        }
    }
    flush(&spool, &mut batch, &shutdown, &stats).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_in_seconds_and_rfc3339_parse_and_garbage_does_not() {
        assert_eq!(parse_ts("1700000000.5", 0), Some(1_700_000_000_500_000));
        assert_eq!(
            parse_ts("2023-11-14T22:13:20Z", 0),
            Some(1_700_000_000_000_000)
        );
        assert_eq!(parse_ts("", 42), Some(42));
        assert_eq!(parse_ts("yesterday", 0), None);
        assert_eq!(parse_ts("1e300", 0), None);
    }

    #[test]
    fn csv_and_json_lines_parse_and_bad_lines_say_why() {
        let config = LinesConfig {
            ts_column: "time".into(),
            ..LinesConfig::default()
        };
        let header: Vec<String> = ["temp", "time", "hum"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = LineParser::new(&config, vec!["temp".into(), "hum".into()], Some(&header))
            .expect("parser");
        let r = p.parse("21.5,1700000000,", 0).expect("good line");
        assert_eq!(r.ts_micros, 1_700_000_000_000_000);
        assert_eq!(r.values[0], 21.5);
        assert!(r.values[1].is_nan(), "an empty value is no value");
        assert!(p
            .parse("abc,1700000000,3", 0)
            .expect_err("bad number")
            .contains("not a number"));
        assert!(p.parse("1,2", 0).expect_err("short").contains("fields"));

        let config = LinesConfig {
            format: LineFormat::JsonLines,
            channels: vec!["temp".into()],
            ..LinesConfig::default()
        };
        let p = LineParser::new(&config, config.channels.clone(), None).expect("parser");
        let r = p
            .parse(r#"{"ts": "2023-11-14T22:13:20Z", "temp": 3}"#, 0)
            .expect("good");
        assert_eq!((r.ts_micros, r.values[0]), (1_700_000_000_000_000, 3.0));
        assert!(p.parse("{not json", 0).is_err());
        assert!(p.parse(r#"{"ts": 1, "temp": "hot"}"#, 0).is_err());
    }
}
