//! Harness of the end-to-end tests (`tests/tests/*.rs`): it starts the real
//! components, Apache Kafka (KRaft) and `edgeloop broker` / `edgeloop
//! processor` as child processes, on free loopback ports, and reads the
//! Parquet data set back with the parquet crate's reader.

use std::collections::HashMap;
use std::fs::File;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use arrow_array::{Array, Float64Array, Int64Array, RecordBatch, StringArray};
use edgeloop_kafka::local::{KafkaInstall, LocalKafka, LocalKafkaOptions};
use edgeloop_proto::v1::{Reading, ReadingBatch};
use edgeloop_proto::Message as _;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::process::{Child, Command};

/// A free port on 127.0.0.1 (bound, then released for the component).
pub fn free_addr() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Java and Apache Kafka's jars, from the environment (`JAVA_HOME`, `PATH`,
/// `EDGELOOP_KAFKA_LIBS`; installed by scripts/setup.sh).
pub fn kafka_install() -> Result<KafkaInstall> {
    Ok(KafkaInstall::locate(|k| std::env::var_os(k))?)
}

/// Starts a single-node Apache Kafka (KRaft) with its storage under
/// `dir/kafka` on free loopback ports. It can be killed and started again
/// ([`LocalKafka::kill_keeping_storage`], [`LocalKafka::start_again`]) with
/// what it held.
pub async fn start_kafka(dir: &Path) -> Result<LocalKafka> {
    Ok(LocalKafka::start(
        &kafka_install()?,
        &LocalKafkaOptions::single(&dir.join("kafka")),
    )
    .await?)
}

/// Resident set size of process `pid` in KiB (`VmRSS` of /proc/PID/status).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("no VmRSS line")?
        .parse()
        .context("VmRSS is not a number")
}

/// An `edgeloop` subcommand running as a child process, killed when dropped.
pub struct Component {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Component {
    /// Starts `bin` with `args`, logging to `{dir}/{name}.log`.
    pub fn start(bin: &Path, name: &str, args: &[&str], dir: &Path) -> Result<Component> {
        Component::start_with_env(bin, name, args, &[], dir)
    }

    /// As [`Component::start`], with these environment variables set too
    /// (after `EDGELOOP_LOG=info`, so they may override it).
    pub fn start_with_env(
        bin: &Path,
        name: &str,
        args: &[&str],
        env: &[(String, String)],
        dir: &Path,
    ) -> Result<Component> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(bin)
            .args(args)
            .env("EDGELOOP_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        Ok(Component {
            name: name.into(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub async fn kill9(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGTERM, then waits up to `grace` for a clean exit; fails otherwise.
    pub async fn terminate(&mut self, grace: Duration) -> Result<()> {
        let pid = self.pid().context("already exited")?;
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await?;
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(status) => bail!(
                "{} exited with {status:?}; log: {}",
                self.name,
                self.tail_log()
            ),
            Err(_) => bail!("{} did not exit within {grace:?}", self.name),
        }
    }

    /// Its exit status once it has exited by itself.
    pub fn exited(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited with {status}; log: {}",
                self.name,
                self.tail_log()
            );
        }
        Ok(())
    }

    /// The last 30 lines of the log, leaving out the frames of a
    /// backtrace (with `RUST_BACKTRACE` set they would hide the error).
    pub fn tail_log(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                let t = l.trim_start();
                let frame = t
                    .split_once(':')
                    .is_some_and(|(n, _)| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()));
                !(frame || t.starts_with("at ") || t == "Stack backtrace:")
            })
            .collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `limit`
/// with `what` in the message.
pub async fn wait_for<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One row of the data set, as read back.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub device_id: String,
    pub seq: i64,
    pub ts_micros: i64,
    pub channels: HashMap<String, Option<f64>>,
    pub true_label: Option<String>,
    pub label: Option<String>,
    pub label_confidence: Option<f64>,
    pub rules_version: Option<String>,
    pub kafka_offset: i64,
}

/// Every `*.parquet` file under `{root}/readings` (temporary files excluded).
pub fn parquet_files(root: &Path) -> Result<Vec<PathBuf>> {
    table_files(root, "readings")
}

/// Every `*.parquet` file of `table` (`readings`, `losses`) under `root`.
pub fn table_files(root: &Path, table: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![root.join(table)];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "parquet")
                && !path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn column<'a, T: 'static>(batch: &'a RecordBatch, name: &str) -> Result<&'a T> {
    batch
        .column_by_name(name)
        .with_context(|| format!("column {name} missing"))?
        .as_any()
        .downcast_ref::<T>()
        .with_context(|| format!("column {name} has an unexpected type"))
}

/// Reads every row of the data set under `root`.
pub fn read_rows(root: &Path) -> Result<Vec<Row>> {
    let fixed = [
        "device_id",
        "profile",
        "seq",
        "ts",
        "true_label",
        "label",
        "label_confidence",
        "rules_version",
        "kafka_partition",
        "kafka_offset",
        "predictions",
    ];
    let mut rows = Vec::new();
    for path in parquet_files(root)? {
        let file = File::open(&path)?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("opening {}", path.display()))?
            .build()?;
        for batch in reader {
            let batch = batch?;
            let device = column::<StringArray>(&batch, "device_id")?;
            let seq = column::<Int64Array>(&batch, "seq")?;
            let ts = column::<arrow_array::TimestampMicrosecondArray>(&batch, "ts")?;
            let label = column::<StringArray>(&batch, "true_label")?;
            let voted = column::<StringArray>(&batch, "label")?;
            let confidence = column::<Float64Array>(&batch, "label_confidence")?;
            let version = column::<StringArray>(&batch, "rules_version")?;
            let offset = column::<Int64Array>(&batch, "kafka_offset")?;
            let schema = batch.schema();
            let channel_names: Vec<String> = schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .filter(|n| !fixed.contains(&n.as_str()))
                .collect();
            let channels: Vec<&Float64Array> = channel_names
                .iter()
                .map(|n| column::<Float64Array>(&batch, n))
                .collect::<Result<_>>()?;
            for i in 0..batch.num_rows() {
                rows.push(Row {
                    device_id: device.value(i).to_string(),
                    seq: seq.value(i),
                    ts_micros: ts.value(i),
                    channels: channel_names
                        .iter()
                        .zip(&channels)
                        .map(|(n, c)| (n.clone(), (!c.is_null(i)).then(|| c.value(i))))
                        .collect(),
                    true_label: (!label.is_null(i)).then(|| label.value(i).to_string()),
                    label: (!voted.is_null(i)).then(|| voted.value(i).to_string()),
                    label_confidence: (!confidence.is_null(i)).then(|| confidence.value(i)),
                    rules_version: (!version.is_null(i)).then(|| version.value(i).to_string()),
                    kafka_offset: offset.value(i),
                });
            }
        }
    }
    Ok(rows)
}

/// Counts of `(device_id, seq)` in `rows`.
pub fn identity_counts(rows: &[Row]) -> HashMap<(String, i64), usize> {
    let mut counts = HashMap::new();
    for r in rows {
        *counts.entry((r.device_id.clone(), r.seq)).or_insert(0) += 1;
    }
    counts
}

/// Checks that rows hold every seq `0..per_device[d]` of each device exactly
/// once and nothing else; the error lists what is missing or duplicated.
pub fn check_exactly_once(rows: &[Row], per_device: &HashMap<String, u64>) -> Result<()> {
    let counts = identity_counts(rows);
    let mut missing = Vec::new();
    for (device, n) in per_device {
        for seq in 0..*n as i64 {
            if !counts.contains_key(&(device.clone(), seq)) {
                missing.push((device.clone(), seq));
            }
        }
    }
    let duplicated: Vec<_> = counts
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(k, c)| (k.clone(), *c))
        .collect();
    let unexpected: Vec<_> = counts
        .keys()
        .filter(|(d, s)| per_device.get(d).is_none_or(|n| *s >= *n as i64))
        .cloned()
        .collect();
    if !missing.is_empty() || !duplicated.is_empty() || !unexpected.is_empty() {
        bail!(
            "{} missing (first {:?}), {} duplicated (first {:?}), {} unexpected (first {:?})",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            duplicated.len(),
            duplicated.iter().take(5).collect::<Vec<_>>(),
            unexpected.len(),
            unexpected.iter().take(5).collect::<Vec<_>>()
        );
    }
    Ok(())
}

/// One row of the `losses` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LossRow {
    pub device_id: String,
    pub first_seq: i64,
    pub end_seq: i64,
    pub reason: String,
}

/// Reads every row of the `losses` table under `root`.
pub fn read_losses(root: &Path) -> Result<Vec<LossRow>> {
    let mut rows = Vec::new();
    for path in table_files(root, "losses")? {
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path)?)?.build()?;
        for batch in reader {
            let batch = batch?;
            let device = column::<StringArray>(&batch, "device_id")?;
            let first = column::<Int64Array>(&batch, "first_seq")?;
            let end = column::<Int64Array>(&batch, "end_seq")?;
            let reason = column::<StringArray>(&batch, "reason")?;
            for i in 0..batch.num_rows() {
                rows.push(LossRow {
                    device_id: device.value(i).to_string(),
                    first_seq: first.value(i),
                    end_seq: end.value(i),
                    reason: reason.value(i).to_string(),
                });
            }
        }
    }
    Ok(rows)
}

/// A consumer of `kafka` in `group` that commits nothing.
pub fn kafka_consumer(kafka: &LocalKafka, group: &str) -> Result<BaseConsumer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?)
}

/// Every record currently in `topic` (all partitions, from the beginning).
pub fn read_topic(kafka: &LocalKafka, topic: &str) -> Result<Vec<rdkafka::message::OwnedMessage>> {
    let consumer = kafka_consumer(kafka, "test-reader")?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0i64;
    let mut ends = HashMap::new();
    for p in &partitions {
        let (low, high) = consumer.fetch_watermarks(topic, *p, Duration::from_secs(10))?;
        assignment.add_partition_offset(topic, *p, Offset::Beginning)?;
        remaining += high - low;
        ends.insert(*p, high);
    }
    consumer.assign(&assignment)?;
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while remaining > 0 {
        ensure!(
            std::time::Instant::now() < deadline,
            "reading {topic}: {remaining} records not read"
        );
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() < ends[&m.partition()] => {
                remaining -= 1;
                out.push(m.detach());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => bail!("reading {topic}: {e}"),
            None => {}
        }
    }
    Ok(out)
}

/// Produces one record and waits for Kafka to take it.
pub async fn produce(kafka: &LocalKafka, topic: &str, key: &str, payload: &[u8]) -> Result<()> {
    let producer: rdkafka::producer::FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    producer
        .send(
            rdkafka::producer::FutureRecord::to(topic)
                .key(key)
                .payload(payload),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    Ok(())
}

/// A plain HTTP GET on loopback; the whole response.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await?;
    Ok(response)
}

/// The value of an unlabelled metric in a Prometheus text exposition.
pub fn metric(exposition: &str, name: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// An encoded `ReadingBatch` of `device`: one channel `v`, readings
/// `first_seq..first_seq + n` whose value is their seq.
pub fn batch(device: &str, first_seq: u64, n: u64) -> Vec<u8> {
    ReadingBatch {
        device_id: device.into(),
        profile: "f32".into(),
        first_seq,
        channels: vec!["v".into()],
        readings: (first_seq..first_seq + n)
            .map(|s| Reading {
                ts_micros: 1_800_000_000_000_000 + s as i64,
                values: vec![s as f64],
                true_label: String::new(),
                predictions: Vec::new(),
            })
            .collect(),
        loss: None,
    }
    .encode_to_vec()
}
