//! `edgeloop bench`: a simulated fleet against a running stack, with figures.
//!
//! - this file: the command's arguments, the fleet (one [`edgeloop_agent::run`]
//!   per device, each with its own MQTT connection, spool and counters), the
//!   sampling loop and the report;
//! - [`latency`]: the latency histogram;
//! - [`parquet_scan`]: readings landed in the Parquet data set, read back as
//!   its files appear (count and reading-to-Parquet latency);
//! - [`procstat`]: CPU and memory of the stack's processes from /proc;
//! - [`local`]: `--local DIR`, the whole stack started here, one process per part;
//! - [`ceiling`]: `--kafka-ceiling`, the same Kafka with only the bridge's
//!   producer in front of it, in the same run.
//!
//! Reading-to-ack latency: the simulator stamps reading `k` of a device with
//! `start + k / rate` (`start` being when the device's source started), and
//! a fresh spool numbers readings from 0, so the ack watermark `w` of a
//! device says readings `0..w` are acknowledged. The bench samples every
//! device's counters every `--sample-every` (50 ms): `start` is bounded above
//! by `now - generated / rate` at every sample (the tightest bound is kept),
//! and readings newly below the watermark are acknowledged at the sample's
//! time at the latest. The latency is thus exact up to one sampling interval
//! (an upper bound by at most 50 ms).

pub mod ceiling;
pub mod latency;
pub mod local;
pub mod parquet_scan;
pub mod procstat;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use edgeloop_agent::{AgentConfig, AgentStats};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use latency::{Histogram, Quantiles};
use parquet_scan::ParquetScan;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Start the whole stack here (Apache Kafka, `edgeloop broker`, `edgeloop
    /// processor`, each its own process) with its data and logs under DIR,
    /// and stop it at the end. Without it, bench a running stack (--mqtt).
    /// To profile a part, name a command to start it under in
    /// EDGELOOP_BENCH_WRAP_BROKER or EDGELOOP_BENCH_WRAP_PROCESSOR, e.g.
    /// `env LD_PRELOAD=/path/lib.so` or `heaptrack -o FILE`. The figures are
    /// of the process the bench started: the part itself with `env` (it
    /// execs), the wrapper with heaptrack (it forks; the part outlives the
    /// bench then: stop it with SIGTERM).
    #[arg(long, env = "EDGELOOP_BENCH_LOCAL", conflicts_with = "mqtt")]
    local: Option<PathBuf>,
    /// The MQTT broker of a running stack, HOST:PORT; its replicas as
    /// HOST:PORT,HOST:PORT,… (the devices are spread over them).
    #[arg(long, env = "EDGELOOP_MQTT", required_unless_present = "local")]
    mqtt: Option<String>,
    /// With --local: broker replicas, 1 to 5, each its own process
    /// (`broker-0`, … in the report); device i connects to replica i mod N
    /// and lists the others as its mqtt.fallback_servers.
    #[arg(long, env = "EDGELOOP_BENCH_BROKERS", default_value_t = 1, requires = "local", value_parser = clap::value_parser!(u32).range(1..=5))]
    brokers: u32,
    /// Simulated devices, each with its own MQTT connection and spool.
    #[arg(long, env = "EDGELOOP_BENCH_DEVICES", default_value_t = 1000)]
    devices: usize,
    /// Readings per second of each device.
    #[arg(long, env = "EDGELOOP_BENCH_RATE", default_value_t = 100.0)]
    rate: f64,
    /// Readings per MQTT message.
    #[arg(long, env = "EDGELOOP_BENCH_BATCH_SIZE", default_value_t = 100)]
    batch_size: usize,
    /// Channels (values) per reading; the first three are the simulator's
    /// temperature, humidity and vibration, further ones `ch3`, `ch4`, ….
    #[arg(long, env = "EDGELOOP_BENCH_CHANNELS", default_value_t = 3)]
    channels: usize,
    /// How long the devices take readings (e.g. `60s`, `10m`).
    #[arg(long, env = "EDGELOOP_BENCH_DURATION", default_value = "60s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// After the run: how long the devices may take to get their last
    /// readings acknowledged, and then how long to wait for every
    /// acknowledged reading to land in Parquet (files close at the
    /// processor's `sink.max_age`).
    #[arg(long, env = "EDGELOOP_BENCH_DRAIN", default_value = "90s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Device id prefix; ids are `{prefix}-00000`, …. Default: `bench-`
    /// and a run id, so every run has devices (and seqs) of its own.
    #[arg(long, env = "EDGELOOP_BENCH_PREFIX")]
    prefix: Option<String>,
    /// Where the devices' spools go (`DIR/{device}`); must be empty or
    /// absent. Default: a directory under the system's temporary directory
    /// (under DIR/spool with --local), removed at the end.
    #[arg(long, env = "EDGELOOP_BENCH_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Write the fleet's credentials (salted hashes) into this credentials
    /// file, which the broker re-reads when it changes (its
    /// `auth.credentials_file`). Without it the devices connect without a
    /// password: the broker must run with --allow-anonymous.
    #[arg(long, env = "EDGELOOP_BENCH_PROVISION_CREDENTIALS")]
    provision_credentials: Option<PathBuf>,
    /// The Parquet data set's root, if it is on this machine: landed
    /// readings and reading-to-Parquet latency are read from its files.
    #[arg(long, env = "EDGELOOP_PARQUET_ROOT")]
    parquet_root: Option<PathBuf>,
    /// The processor's metrics address (HOST:PORT of its /metrics): rows
    /// written per second (all devices, not only this bench's).
    #[arg(long, env = "EDGELOOP_BENCH_PROCESSOR_METRICS")]
    processor_metrics: Option<SocketAddr>,
    /// The broker's metrics address (HOST:PORT of its /metrics): readings
    /// the bridge has in Kafka per second (all devices); repeat it for each
    /// replica.
    #[arg(long, env = "EDGELOOP_BENCH_BROKER_METRICS", value_delimiter = ',')]
    broker_metrics: Vec<SocketAddr>,
    /// A local process to watch, NAME=PID (repeatable), e.g.
    /// `--pid broker=1234 --pid processor=1240 --pid kafka=1200`: CPU and
    /// memory from /proc. The bench's own process is always watched as `fleet`.
    #[arg(long = "pid", value_parser = parse_pid)]
    pids: Vec<(String, u32)>,
    /// How often a progress line is printed (on stderr).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    report_every: Duration,
    /// How often the devices' counters are sampled (the resolution of the
    /// reading-to-ack latency).
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    sample_every: Duration,
    /// The share of the run treated as warm-up: the "steady" figures leave it out.
    #[arg(long, default_value_t = 0.2)]
    warmup: f64,
    /// Print the final report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// Also run one device as its own `edgeloop agent` process (id
    /// `{prefix}.probe`, same rate and batch size, the simulator's 3
    /// channels), watched as `agent-probe`: the resident memory of a real
    /// agent under this load. Its readings are not in the fleet's counts.
    #[arg(long)]
    probe_agent: bool,
    /// With --local: before the fleet starts, measure the bare ceiling of
    /// the same Kafka for this long: the bridge's producer sending records
    /// shaped like the fleet's (same devices, batch size, channels) with no
    /// edgeloop in the path. The report gives it and the fleet's
    /// acknowledged rate as a share of it.
    #[arg(long, requires = "local", value_parser = humantime::parse_duration)]
    kafka_ceiling: Option<Duration>,
    /// With --local and two or more --brokers: SIGKILL replica `broker-0`
    /// this long after the fleet starts (it stays down), and report how
    /// long its devices took to be acknowledged again through the others
    /// (`broker_kill`: each device's time from the kill to its first new
    /// ack).
    #[arg(long, requires = "local", value_parser = humantime::parse_duration)]
    kill_broker_after: Option<Duration>,
    /// With --local: the Kafka JVM's maximum heap.
    #[arg(long, default_value = "1g", requires = "local")]
    kafka_heap: String,
    /// With --local: the processor's `sink.max_age` (files close at this age).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    file_max_age: Duration,
}

fn parse_pid(s: &str) -> Result<(String, u32), String> {
    let (name, pid) = s
        .split_once('=')
        .ok_or_else(|| format!("--pid {s:?}: expected NAME=PID"))?;
    let pid = pid
        .parse()
        .map_err(|_| format!("--pid {s:?}: {pid:?} is not a process id"))?;
    if name.is_empty() {
        return Err(format!("--pid {s:?}: the name is empty"));
    }
    Ok((name.to_string(), pid))
}

impl BenchArgs {
    fn validate(&self) -> Result<()> {
        if self.devices == 0 {
            bail!("--devices must be at least 1");
        }
        if !(self.rate.is_finite() && self.rate > 0.0) {
            bail!("--rate {} must be a positive number", self.rate);
        }
        if self.channels == 0 {
            bail!("--channels must be at least 1");
        }
        if self.duration.is_zero() {
            bail!("--duration must be longer than 0s");
        }
        if self.sample_every.is_zero() || self.report_every.is_zero() {
            bail!("--sample-every and --report-every must be longer than 0s");
        }
        if !(0.0..1.0).contains(&self.warmup) {
            bail!("--warmup {} must be in 0..1", self.warmup);
        }
        if self.kill_broker_after.is_some() && self.brokers < 2 {
            bail!("--kill-broker-after needs --brokers 2 or more (the devices move to the others)");
        }
        Ok(())
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn load(c: &std::sync::atomic::AtomicU64) -> u64 {
    AgentStats::get(c)
}

/// One device as the bench follows it.
struct Device {
    id: String,
    stats: Arc<AgentStats>,
    /// Upper bound of its source's start, µs since the epoch.
    start_micros: i64,
    acked: u64,
    backlog_max: u64,
}

/// `--kill-broker-after`: replica 0's devices, from its kill until each has
/// a new ack.
struct BrokerKill {
    /// When replica 0 was killed (run time, s).
    at: f64,
    /// Per device on replica 0: its index, its acknowledged count once the
    /// kill has settled (`None` until then), and when a later ack came.
    devices: Vec<(usize, Option<u64>, Option<f64>)>,
}

impl BrokerKill {
    /// Acks already on their way when the broker died can still arrive: a
    /// device's baseline is taken this long after the kill.
    const SETTLE_S: f64 = 0.2;

    /// Notes, at run time `at`, which of the devices have been acknowledged
    /// again.
    fn observe(&mut self, devices: &[Device], at: f64) {
        if at < self.at + Self::SETTLE_S {
            return;
        }
        for (i, base, recovered) in &mut self.devices {
            let acked = devices[*i].acked;
            match base {
                None => *base = Some(acked),
                Some(b) if recovered.is_none() && acked > *b => *recovered = Some(at - self.at),
                Some(_) => {}
            }
        }
    }

    fn summary(&self) -> serde_json::Value {
        let mut times: Vec<f64> = self.devices.iter().filter_map(|d| d.2).collect();
        times.sort_by(f64::total_cmp);
        let pick = |q: f64| {
            (!times.is_empty())
                .then(|| round1(times[((times.len() - 1) as f64 * q).round() as usize]))
        };
        json!({
            "killed": "broker-0",
            "at_s": round1(self.at),
            "devices": self.devices.len(),
            "acknowledged_again": times.len(),
            "seconds_to_ack_again": {"p50": pick(0.5), "p99": pick(0.99), "max": pick(1.0)},
        })
    }
}

/// Totals over the fleet at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Totals {
    at: f64,
    offered: u64,
    acked: u64,
    landed: u64,
    backlog_sum: u64,
    backlog_max: u64,
}

/// The parquet scanner's shared state.
#[derive(Default)]
struct Landed {
    total: u64,
    per_device: HashMap<String, u64>,
    all: Histogram,
    interval: Histogram,
    files: u64,
    error: Option<String>,
}

/// A watched process: its first, previous and latest samples.
struct Watched {
    name: String,
    pid: u32,
    first: Option<(f64, procstat::ProcSample)>,
    last: Option<(f64, procstat::ProcSample)>,
    rss_max: u64,
    /// RSS at the end of the warm-up.
    rss_steady_start: Option<u64>,
}

impl Watched {
    /// Samples the process; returns its CPU % since the previous sample.
    fn sample(&mut self, at: f64, warm: bool) -> Option<(f64, u64)> {
        let s = procstat::sample(self.pid)?;
        let cpu = self.last.as_ref().map(|(t, prev)| {
            if at > *t {
                (s.cpu_seconds - prev.cpu_seconds) / (at - t) * 100.0
            } else {
                0.0
            }
        });
        self.rss_max = self.rss_max.max(s.rss_kib);
        if warm && self.rss_steady_start.is_none() {
            self.rss_steady_start = Some(s.rss_kib);
        }
        let rss = s.rss_kib;
        if self.first.is_none() {
            self.first = Some((at, s.clone()));
        }
        self.last = Some((at, s));
        Some((cpu.unwrap_or(0.0), rss))
    }

    fn summary(&self) -> serde_json::Value {
        let (Some((t0, first)), Some((t1, last))) = (&self.first, &self.last) else {
            return json!({"name": self.name, "pid": self.pid, "error": "no sample (not running, or not Linux)"});
        };
        let wall = (t1 - t0).max(1e-9);
        let mut threads: Vec<(String, f64)> = last
            .threads
            .iter()
            .map(|(name, secs)| {
                let before = first.threads.get(name).copied().unwrap_or(0.0);
                (name.clone(), (secs - before) / wall * 100.0)
            })
            .filter(|(_, pct)| *pct >= 0.5)
            .collect();
        threads.sort_by(|a, b| b.1.total_cmp(&a.1));
        json!({
            "name": self.name,
            "pid": self.pid,
            "cpu_percent": round1((last.cpu_seconds - first.cpu_seconds) / wall * 100.0),
            "cpu_seconds": round1(last.cpu_seconds - first.cpu_seconds),
            "rss_kib_start": first.rss_kib,
            "rss_kib_steady_start": self.rss_steady_start,
            "rss_kib_end": last.rss_kib,
            "rss_kib_max": self.rss_max,
            "threads_cpu_percent": threads
                .into_iter()
                .map(|(n, p)| json!({"thread": n, "cpu_percent": round1(p)}))
                .collect::<Vec<_>>(),
        })
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn quantiles_json(q: Option<Quantiles>) -> serde_json::Value {
    match q {
        Some(q) => {
            json!({"count": q.count, "p50_ms": round1(q.p50_ms), "p99_ms": round1(q.p99_ms), "max_ms": round1(q.max_ms)})
        }
        None => serde_json::Value::Null,
    }
}

fn fmt_q(q: Option<Quantiles>) -> String {
    match q {
        Some(q) => format!(
            "p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms",
            q.p50_ms, q.p99_ms, q.max_ms
        ),
        None => "-".into(),
    }
}

/// A plain HTTP GET of `/metrics`; the value of unlabelled metric `name`.
async fn scrape(addr: SocketAddr, name: &str) -> Option<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let fetch = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).await.ok()?;
        Some(body)
    };
    let body = tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()??;
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (n, v) = l.split_once(' ')?;
        (n == name).then(|| v.trim().parse().ok())?
    })
}

/// `name` summed over the broker replicas' /metrics, if any is known and
/// every one answered.
async fn scrape_brokers(broker_metrics: &[SocketAddr], name: &str) -> Option<f64> {
    if broker_metrics.is_empty() {
        return None;
    }
    let mut sum = 0.0;
    for addr in broker_metrics {
        sum += scrape(*addr, name).await?;
    }
    Some(sum)
}

/// Telemetry publishes the brokers' gates held (back-pressure), if their
/// metrics are known.
async fn held_by_gate(broker_metrics: &[SocketAddr]) -> Option<f64> {
    scrape_brokers(broker_metrics, "edgeloop_gate_publishes_held_total").await
}

/// The agent configuration every device starts from: `base` (the agent's
/// defaults and `EDGELOOP_AGENT__*`, as `edgeloop agent` reads them) with
/// the bench's own settings over it.
fn template(
    args: &BenchArgs,
    base: &AgentConfig,
    host: String,
    port: u16,
    spool: PathBuf,
) -> AgentConfig {
    let mut agent = base.clone();
    agent.mqtt.host = host;
    agent.mqtt.port = port;
    agent.uplink.batch_size = args.batch_size;
    agent.uplink.max_unacked_readings = agent
        .uplink
        .max_unacked_readings
        .max(args.batch_size as u64 * 4);
    agent.spool.dir = spool;
    agent.shutdown_grace = args.drain;
    if let edgeloop_agent::config::SourceConfig::Simulator(sim) = &mut agent.source {
        sim.rate_hz = args.rate;
        let shape = sim.channels.last().cloned();
        sim.channels.truncate(args.channels);
        while sim.channels.len() < args.channels {
            if let Some(mut c) = shape.clone() {
                c.name = format!("ch{}", sim.channels.len());
                sim.channels.push(c);
            }
        }
    }
    agent
}

fn channel_names(agent: &AgentConfig) -> Vec<String> {
    match &agent.source {
        edgeloop_agent::config::SourceConfig::Simulator(sim) => {
            sim.channels.iter().map(|c| c.name.clone()).collect()
        }
        _ => Vec::new(),
    }
}

/// Credentials for `ids` in `file` (replacing any of the same ids); their passwords.
fn provision(file: &std::path::Path, ids: &[String]) -> Result<HashMap<String, String>> {
    use edgeloop_broker::gate::acl::Role;
    use edgeloop_broker::gate::credentials::CredentialsFile;
    let mut known = CredentialsFile::read(file)?;
    let before = known.credentials.len();
    known.credentials.retain(|c| !ids.contains(&c.id));
    if known.credentials.len() != before {
        known.write(file)?;
    }
    Ok(CredentialsFile::add(file, ids, Role::Device, &[])?
        .into_iter()
        .collect())
}

pub async fn run(args: BenchArgs, shutdown: CancellationToken) -> Result<()> {
    args.validate()?;
    let run_id = format!("{:x}", now_micros() / 1_000_000);
    let prefix = args
        .prefix
        .clone()
        .unwrap_or_else(|| format!("bench-{run_id}"));
    let ids: Vec<String> = (0..args.devices)
        .map(|i| format!("{prefix}-{i:05}"))
        .collect();
    for id in ids.iter().take(1) {
        edgeloop_proto::device_id::validate(id).map_err(|e| anyhow::anyhow!("--prefix: {e}"))?;
    }

    // The stack: started here, or given.
    let base: AgentConfig = crate::read_config("agent", None)
        .context("the devices' agent settings (EDGELOOP_AGENT__* variables)")?;
    let probe_channels = channel_names(&template(&args, &base, "x".into(), 1, PathBuf::new()));
    let mut stack = None;
    let mut kafka_ceiling: Option<ceiling::Ceiling> = None;
    let mut watched: Vec<Watched> = Vec::new();
    let (servers, parquet_root, processor_metrics, broker_metrics, credentials, spool_default) =
        match &args.local {
            Some(dir) => {
                let s = local::LocalStack::start(&local::LocalOptions {
                    dir: dir.clone(),
                    kafka_heap: args.kafka_heap.clone(),
                    channels: probe_channels.clone(),
                    file_max_age: args.file_max_age,
                    rules: args.channels >= 3,
                    brokers: args.brokers as usize,
                })
                .await?;
                let n = s.brokers.len();
                let parts = [("kafka".to_string(), s.kafka.pid())]
                    .into_iter()
                    .chain(
                        s.brokers
                            .iter()
                            .enumerate()
                            .map(|(i, b)| (local::broker_name(i, n), b.id())),
                    )
                    .chain([("processor".to_string(), s.processor.id())]);
                for (name, pid) in parts {
                    if let Some(pid) = pid {
                        watched.push(Watched::new(&name, pid));
                    }
                }
                if let Some(d) = args.kafka_ceiling {
                    eprintln!(
                        "bare Kafka ceiling: the bridge's producer alone, {} s of records like the fleet's",
                        d.as_secs()
                    );
                    let c = ceiling::run(
                        &s.kafka.bootstrap(),
                        args.devices,
                        args.batch_size,
                        args.channels,
                        d,
                    )
                    .await?;
                    eprintln!(
                        "bare Kafka ceiling: {:.0} readings/s ({} records of {} bytes in {:.1} s)",
                        c.readings_per_s, c.records, c.record_bytes, c.seconds
                    );
                    kafka_ceiling = Some(c);
                }
                let out = (
                    s.mqtt
                        .iter()
                        .map(|a| (a.ip().to_string(), a.port()))
                        .collect(),
                    Some(s.parquet_root.clone()),
                    Some(s.processor_metrics),
                    s.broker_metrics.clone(),
                    Some(s.credentials.clone()),
                    dir.join("spool").join(&prefix),
                );
                stack = Some(s);
                out
            }
            None => {
                let mqtt = args.mqtt.clone().unwrap_or_default();
                let servers = mqtt
                    .split(',')
                    .map(|s| crate::split_host_port(s.trim()).context("--mqtt"))
                    .collect::<Result<Vec<_>>>()?;
                (
                    servers,
                    args.parquet_root.clone(),
                    args.processor_metrics,
                    args.broker_metrics.clone(),
                    args.provision_credentials.clone(),
                    std::env::temp_dir().join(format!("edgeloop-bench-{run_id}")),
                )
            }
        };
    for (name, pid) in &args.pids {
        watched.push(Watched::new(name, *pid));
    }
    watched.push(Watched::new("fleet", std::process::id()));

    let result = bench(
        &args,
        &base,
        &prefix,
        &ids,
        &servers,
        parquet_root,
        processor_metrics,
        broker_metrics,
        credentials,
        spool_default,
        &mut watched,
        &mut stack,
        kafka_ceiling,
        shutdown,
    )
    .await;
    if let Some(s) = stack {
        s.stop().await;
    }
    result
}

impl Watched {
    fn new(name: &str, pid: u32) -> Watched {
        Watched {
            name: name.to_string(),
            pid,
            first: None,
            last: None,
            rss_max: 0,
            rss_steady_start: None,
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn bench(
    args: &BenchArgs,
    base: &AgentConfig,
    prefix: &str,
    ids: &[String],
    servers: &[(String, u16)],
    parquet_root: Option<PathBuf>,
    processor_metrics: Option<SocketAddr>,
    broker_metrics: Vec<SocketAddr>,
    credentials: Option<PathBuf>,
    spool_default: PathBuf,
    watched: &mut Vec<Watched>,
    stack: &mut Option<local::LocalStack>,
    kafka_ceiling: Option<ceiling::Ceiling>,
    shutdown: CancellationToken,
) -> Result<()> {
    let spool_root = args.spool_dir.clone().unwrap_or(spool_default);
    let remove_spool = args.spool_dir.is_none();
    if std::fs::read_dir(&spool_root).is_ok_and(|mut d| d.next().is_some()) {
        bail!(
            "--spool-dir {} is not empty: the bench needs fresh spools (its devices number \
             their readings from 0); remove it or pick another directory",
            spool_root.display()
        );
    }
    std::fs::create_dir_all(&spool_root)
        .with_context(|| format!("creating {}", spool_root.display()))?;

    let passwords = match &credentials {
        Some(file) => {
            let file = file.clone();
            let mut ids = ids.to_vec();
            if args.probe_agent {
                ids.push(format!("{prefix}.probe"));
            }
            eprintln!(
                "provisioning {} device credentials in {}",
                ids.len(),
                file.display()
            );
            tokio::task::spawn_blocking(move || provision(&file, &ids))
                .await
                .context("provisioning task")??
        }
        None => HashMap::new(),
    };

    let (host, port) = servers
        .first()
        .cloned()
        .context("no MQTT broker to bench")?;
    let agent = template(args, base, host, port, spool_root.clone());
    let mqtt_list: Vec<String> = servers.iter().map(|(h, p)| format!("{h}:{p}")).collect();
    agent
        .validate()
        .map_err(|e| anyhow::anyhow!("device config: {e}"))?;

    // The Parquet scanner: its own thread, reading new files every second.
    let landed = Arc::new(Mutex::new(Landed::default()));
    let scan_stop = CancellationToken::new();
    let bench_start_wall = SystemTime::now() - Duration::from_secs(1);
    let scanner = parquet_root.clone().map(|root| {
        let landed = landed.clone();
        let stop = scan_stop.clone();
        let prefix = prefix.to_string();
        std::thread::Builder::new()
            .name("bench-parquet".into())
            .spawn(move || {
                let mut scan = ParquetScan::new(&root, &format!("{prefix}-"), bench_start_wall);
                loop {
                    let done = stop.is_cancelled();
                    let result = scan.scan();
                    if let Ok(mut l) = landed.lock() {
                        match result {
                            Ok(fresh) => {
                                l.interval.merge(&fresh);
                                l.all = scan.latency.clone();
                                l.total = scan.landed_total;
                                l.per_device = scan.landed.clone();
                                l.files = scan.files;
                            }
                            Err(e) => l.error = Some(e.to_string()),
                        }
                    }
                    if done {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(1000));
                }
            })
    });
    let scanner = match scanner {
        Some(s) => Some(s.context("starting the Parquet scanner thread")?),
        None => None,
    };

    // The fleet.
    let fleet_stop = CancellationToken::new();
    let mut devices = Vec::with_capacity(ids.len());
    let mut tasks = tokio::task::JoinSet::new();
    for (i, id) in ids.iter().enumerate() {
        let mut config = agent.clone();
        config.device_id = id.clone();
        if let Some(password) = passwords.get(id) {
            config.mqtt.username = Some(id.clone());
            config.mqtt.password = Some(password.clone());
        }
        config.spool.dir = spool_root.join(id);
        // Several replicas: device i on replica i mod N, the others after it.
        config.mqtt.spread_over(servers, i);
        if let edgeloop_agent::config::SourceConfig::Simulator(sim) = &mut config.source {
            sim.seed = sim.seed.wrapping_add(i as u64);
        }
        let stats = Arc::new(AgentStats::default());
        devices.push(Device {
            id: id.clone(),
            stats: stats.clone(),
            start_micros: i64::MAX,
            acked: 0,
            backlog_max: 0,
        });
        let stop = fleet_stop.clone();
        tasks.spawn(async move { edgeloop_agent::run(config, stop, stats).await });
    }
    eprintln!(
        "{} devices ({}…) → {}, {} readings/s each ({} offered), batches of {} (linger {}, spool sync every {}), {} channels, for {}{}",
        ids.len(),
        ids.first().map(String::as_str).unwrap_or(""),
        mqtt_list.join(", "),
        args.rate,
        args.rate * ids.len() as f64,
        args.batch_size,
        humantime::format_duration(agent.uplink.linger),
        humantime::format_duration(agent.spool.sync_interval),
        args.channels,
        humantime::format_duration(args.duration),
        if credentials.is_some() { ", with credentials" } else { ", anonymous" },
    );

    let mut probe = None;
    if args.probe_agent {
        let id = format!("{prefix}.probe");
        let exe = std::env::current_exe().context("finding the edgeloop binary")?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["agent", "--device-id", &id, "--mqtt"])
            .arg(mqtt_list.join(","))
            .arg("--rate")
            .arg(args.rate.to_string())
            .arg("--batch-size")
            .arg(args.batch_size.to_string())
            .arg("--spool-dir")
            .arg(spool_root.join(&id))
            .env("EDGELOOP_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(password) = passwords.get(&id) {
            cmd.env("EDGELOOP_MQTT_PASSWORD", password);
        }
        let child = cmd.spawn().context("starting the probe agent")?;
        if let Some(pid) = child.id() {
            watched.push(Watched::new("agent-probe", pid));
        }
        probe = Some(child);
    }
    let step_micros = 1e6 / args.rate;
    let start = Instant::now();
    let warm_at = args.duration.as_secs_f64() * args.warmup;
    let mut ack_all = Histogram::default();
    let mut ack_steady = Histogram::default();
    let mut ack_interval = Histogram::default();
    let mut parquet_steady = Histogram::default();
    let mut sample_tick = tokio::time::interval(args.sample_every);
    sample_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut report_tick = tokio::time::interval(args.report_every);
    report_tick.tick().await;
    let mut intervals: Vec<serde_json::Value> = Vec::new();
    let mut last = Totals::default();
    let mut latest = Totals::default();
    let mut steady_from: Option<Totals> = None;
    let mut end_of_run: Option<Totals> = None;
    let mut metric_last: (Option<f64>, Option<f64>) = (None, None);
    let mut reconnects_seen = 0;
    let (mut resent_seen, mut held_seen) = (0, 0.0);
    let mut failures: Vec<String> = Vec::new();
    let kill_at = args
        .kill_broker_after
        .map(|d| tokio::time::Instant::now() + d);
    let mut broker_kill: Option<BrokerKill> = None;
    let mut interrupted = false;
    let run_until = tokio::time::Instant::now() + args.duration;
    let mut fleet_done = false;
    let drained_at: Option<f64>;
    for w in watched.iter_mut() {
        w.sample(0.0, false);
    }

    // Samples every device: ack latencies, backlogs; returns the totals.
    let sample = |devices: &mut [Device],
                  at: f64,
                  ack: &mut [&mut Histogram],
                  landed: &Mutex<Landed>|
     -> Totals {
        let now = now_micros();
        let mut t = Totals {
            at,
            ..Totals::default()
        };
        for d in devices.iter_mut() {
            let g = load(&d.stats.readings_generated);
            let bound = now - (g as f64 * step_micros) as i64;
            d.start_micros = d.start_micros.min(bound);
            let a = load(&d.stats.readings_acknowledged);
            for k in d.acked..a {
                let ts = d.start_micros + (k as f64 * step_micros) as i64;
                let lat = now.saturating_sub(ts).max(0) as u64;
                for h in ack.iter_mut() {
                    h.record(lat);
                }
            }
            d.acked = a.max(d.acked);
            let backlog = load(&d.stats.backlog_readings);
            d.backlog_max = d.backlog_max.max(backlog);
            t.offered += g;
            t.acked += a;
            t.backlog_sum += backlog;
            t.backlog_max = t.backlog_max.max(backlog);
        }
        t.landed = landed.lock().map(|l| l.total).unwrap_or(0);
        t
    };

    loop {
        tokio::select! {
            _ = shutdown.cancelled(), if !fleet_stop.is_cancelled() => {
                interrupted = true;
                let at = start.elapsed().as_secs_f64();
                let mut hs = [&mut ack_all, &mut ack_interval];
                end_of_run = Some(sample(&mut devices, at, &mut hs, &landed));
                eprintln!("interrupted: sources stop; devices send what they hold, then the bench waits for Parquet (Ctrl-C again does not hurry it)");
                fleet_stop.cancel();
            }
            _ = tokio::time::sleep_until(run_until), if !fleet_stop.is_cancelled() => {
                let at = start.elapsed().as_secs_f64();
                let mut hs = [&mut ack_all, &mut ack_steady, &mut ack_interval];
                end_of_run = Some(sample(&mut devices, at, &mut hs, &landed));
                eprintln!("run over: sources stop; devices send what they hold, then the bench waits for Parquet");
                fleet_stop.cancel();
            }
            joined = tasks.join_next(), if !fleet_done => match joined {
                None => {
                    fleet_done = true;
                    if !fleet_stop.is_cancelled() {
                        failures.push("every device stopped before the end of the run".into());
                        fleet_stop.cancel();
                    }
                }
                Some(Ok(Ok(_report))) => {}
                Some(Ok(Err(e))) => failures.push(format!("a device failed: {e}")),
                Some(Err(e)) => failures.push(format!("a device task failed: {e}")),
            },
            _ = tokio::time::sleep_until(kill_at.unwrap_or_else(tokio::time::Instant::now)),
                if kill_at.is_some() && broker_kill.is_none() && !fleet_stop.is_cancelled() => {
                let at = start.elapsed().as_secs_f64();
                if let Some(s) = stack.as_mut() {
                    s.kill_broker(0).await;
                    let n = s.brokers.len();
                    eprintln!("{at:>6.1}s  broker-0 killed (SIGKILL): its devices move to the other replicas");
                    broker_kill = Some(BrokerKill {
                        at,
                        devices: (0..devices.len()).filter(|i| i % n == 0).map(|i| (i, None, None)).collect(),
                    });
                }
            }
            _ = sample_tick.tick() => {
                let at = start.elapsed().as_secs_f64();
                let warm = at >= warm_at && end_of_run.is_none();
                if warm {
                    let mut hs = [&mut ack_all, &mut ack_steady, &mut ack_interval];
                    latest = sample(&mut devices, at, &mut hs, &landed);
                    if steady_from.is_none() { steady_from = Some(latest); }
                } else {
                    let mut hs = [&mut ack_all, &mut ack_interval];
                    latest = sample(&mut devices, at, &mut hs, &landed);
                }
                if let Some(k) = broker_kill.as_mut() {
                    k.observe(&devices, at);
                }
                if fleet_done {
                    // Drained when every acknowledged reading of every device landed.
                    let l = landed.lock().map(|l| {
                        devices.iter().all(|d| l.per_device.get(&d.id).copied().unwrap_or(0) >= d.acked)
                    });
                    let all_landed = parquet_root.is_none() || l.unwrap_or(false);
                    let waited = at - end_of_run.map(|t| t.at).unwrap_or(at);
                    // The devices had `drain` to get their acks, Parquet as long again.
                    if all_landed || waited > args.drain.as_secs_f64() * 2.0 {
                        drained_at = all_landed.then_some(at);
                        break;
                    }
                }
            }
            _ = report_tick.tick() => {
                if let Some(s) = stack.as_mut() {
                    if let Err(e) = s.check_running() {
                        failures.push(e.to_string());
                        fleet_stop.cancel();
                    }
                }
                let at = start.elapsed().as_secs_f64();
                let warm = at >= warm_at && end_of_run.is_none();
                let t = latest;
                let dt = (t.at - last.at).max(1e-9);
                let rate = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / dt;
                let parquet_q = landed.lock().ok().map(|mut l| {
                    let h = std::mem::take(&mut l.interval);
                    if warm { parquet_steady.merge(&h); }
                    (h.quantiles(), l.error.take())
                });
                let (parquet_q, scan_error) = parquet_q.unwrap_or((None, None));
                if let Some(e) = scan_error {
                    eprintln!("warning: reading the Parquet data set: {e}");
                }
                let mut procs = serde_json::Map::new();
                let mut proc_line = String::new();
                for w in watched.iter_mut() {
                    if let Some((cpu, rss)) = w.sample(at, warm) {
                        proc_line.push_str(&format!("  {} {:.0}% {:.0} MiB", w.name, cpu, rss as f64 / 1024.0));
                        procs.insert(w.name.clone(), json!({"cpu_percent": round1(cpu), "rss_kib": rss}));
                    }
                }
                let mut metric_rates = (None, None);
                if let Some(addr) = processor_metrics {
                    let v = scrape(addr, "edgeloop_processor_rows_written_total").await;
                    metric_rates.0 = v.zip(metric_last.0).map(|(a, b)| (a - b) / dt);
                    metric_last.0 = v;
                }
                if !broker_metrics.is_empty() {
                    let v = scrape_brokers(&broker_metrics, "edgeloop_bridge_readings_in_kafka_total").await;
                    metric_rates.1 = v.zip(metric_last.1).map(|(a, b)| (a - b) / dt);
                    metric_last.1 = v;
                }
                let reconnects: u64 = devices.iter().map(|d| load(&d.stats.reconnects)).sum();
                let resent: u64 = devices.iter().map(|d| load(&d.stats.readings_resent)).sum();
                let held = held_by_gate(&broker_metrics).await;
                let ack_q = std::mem::take(&mut ack_interval).quantiles();
                eprintln!(
                    "{:>6.1}s  offered {:>8.0}/s  acked {:>8.0}/s  landed {:>8.0}/s  | ack {}  | parquet {}  | backlog sum {} max {}{}{}{}{}",
                    at,
                    rate(t.offered, last.offered),
                    rate(t.acked, last.acked),
                    rate(t.landed, last.landed),
                    fmt_q(ack_q),
                    fmt_q(parquet_q),
                    t.backlog_sum,
                    t.backlog_max,
                    if reconnects > reconnects_seen { format!("  reconnects {reconnects}") } else { String::new() },
                    if resent > resent_seen { format!("  resent {resent}") } else { String::new() },
                    match held {
                        Some(h) if h > held_seen => format!("  held by the gate {h}"),
                        _ => String::new(),
                    },
                    proc_line,
                );
                reconnects_seen = reconnects;
                resent_seen = resent;
                held_seen = held.unwrap_or(held_seen);
                intervals.push(json!({
                    "at_s": round1(at),
                    "offered_per_s": rate(t.offered, last.offered).round(),
                    "acknowledged_per_s": rate(t.acked, last.acked).round(),
                    "landed_per_s": parquet_root.as_ref().map(|_| rate(t.landed, last.landed).round()),
                    "processor_rows_per_s": metric_rates.0.map(f64::round),
                    "bridge_readings_in_kafka_per_s": metric_rates.1.map(f64::round),
                    "reading_to_ack": quantiles_json(ack_q),
                    "reading_to_parquet": quantiles_json(parquet_q),
                    "spool_backlog_sum": t.backlog_sum,
                    "spool_backlog_max": t.backlog_max,
                    "processes": procs,
                }));
                last = t;
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => failures.push(format!("a device failed: {e}")),
            Err(e) => failures.push(format!("a device task failed: {e}")),
        }
    }
    if let Some(mut p) = probe {
        let _ = p.kill().await;
    }
    scan_stop.cancel();
    if let Some(t) = scanner {
        let _ = t.join();
    }
    let at = start.elapsed().as_secs_f64();
    let mut hs = [&mut ack_all];
    let final_totals = sample(&mut devices, at, &mut hs, &landed);
    for w in watched.iter_mut() {
        w.sample(at, false);
    }
    if remove_spool {
        let _ = std::fs::remove_dir_all(&spool_root);
    }

    // The report.
    let run_end = end_of_run.unwrap_or(final_totals);
    let run_s = run_end.at.max(1e-9);
    let steady = steady_from.map(|s| {
        let dt = (run_end.at - s.at).max(1e-9);
        (
            (run_end.offered - s.offered) as f64 / dt,
            (run_end.acked - s.acked) as f64 / dt,
            (run_end.landed.saturating_sub(s.landed)) as f64 / dt,
        )
    });
    let (landed_q, landed_files, per_device) = landed
        .lock()
        .map(|l| (l.all.quantiles(), l.files, l.per_device.clone()))
        .unwrap_or((None, 0, HashMap::new()));
    let not_landed: Vec<&str> = devices
        .iter()
        .filter(|d| per_device.get(&d.id).copied().unwrap_or(0) < d.acked)
        .map(|d| d.id.as_str())
        .collect();
    let lost: u64 = devices.iter().map(|d| load(&d.stats.readings_lost)).sum();
    let reconnects: u64 = devices.iter().map(|d| load(&d.stats.reconnects)).sum();
    let resent: u64 = devices.iter().map(|d| load(&d.stats.readings_resent)).sum();
    let held = held_by_gate(&broker_metrics).await;
    let backlog_peak_sum = intervals
        .iter()
        .filter_map(|i| i["spool_backlog_sum"].as_u64())
        .max()
        .unwrap_or(0)
        .max(run_end.backlog_sum);
    let backlog_peak_max = devices.iter().map(|d| d.backlog_max).max().unwrap_or(0);
    let has_parquet = parquet_root.is_some();
    let report = json!({
        "config": {
            "devices": ids.len(),
            "rate_per_device": args.rate,
            "batch_size": args.batch_size,
            "linger_ms": agent.uplink.linger.as_millis() as u64,
            "spool_sync_interval_ms": agent.spool.sync_interval.as_millis() as u64,
            "channels": args.channels,
            "duration_s": args.duration.as_secs_f64(),
            "mqtt": mqtt_list.join(","),
            "brokers": servers.len(),
            "device_prefix": prefix,
            "credentials": credentials.is_some(),
            "local": args.local.as_ref().map(|d| d.display().to_string()),
            "parquet_root": parquet_root.as_ref().map(|d| d.display().to_string()),
        },
        "run_s": round1(run_end.at),
        "readings": {
            "offered": run_end.offered,
            "acknowledged": run_end.acked,
            "landed": has_parquet.then_some(run_end.landed),
            "offered_per_s": (run_end.offered as f64 / run_s).round(),
            "acknowledged_per_s": (run_end.acked as f64 / run_s).round(),
            "landed_per_s": has_parquet.then(|| (run_end.landed as f64 / run_s).round()),
            "steady_offered_per_s": steady.map(|s| s.0.round()),
            "steady_acknowledged_per_s": steady.map(|s| s.1.round()),
            "steady_landed_per_s": steady.filter(|_| has_parquet).map(|s| s.2.round()),
        },
        "after_drain": {
            "offered": final_totals.offered,
            "acknowledged": final_totals.acked,
            "landed": has_parquet.then_some(final_totals.landed),
            "parquet_files": has_parquet.then_some(landed_files),
            "devices_with_acknowledged_readings_not_landed": has_parquet.then_some(not_landed.len()),
            "all_acknowledged_landed": has_parquet.then_some(not_landed.is_empty()),
            "drained_after_s": drained_at.map(|d| round1(d - run_end.at)),
            // Readings the devices took but never saw acknowledged: they
            // stay in the spools (a device sends them on its next start).
            "unacknowledged_left_in_spools": final_totals.offered.saturating_sub(final_totals.acked),
        },
        "latency": {
            "reading_to_ack": quantiles_json(ack_all.quantiles()),
            "reading_to_ack_steady": quantiles_json(ack_steady.quantiles()),
            "reading_to_ack_resolution_ms": args.sample_every.as_secs_f64() * 1000.0,
            "reading_to_parquet": quantiles_json(landed_q),
            "reading_to_parquet_steady": quantiles_json(parquet_steady.quantiles()),
        },
        "spool_backlog": {
            "peak_sum": backlog_peak_sum,
            "peak_device_max": backlog_peak_max,
            "end_of_run_sum": run_end.backlog_sum,
        },
        "readings_lost_by_spools": lost,
        "reconnects": reconnects,
        "readings_resent": resent,
        "broker_publishes_held": held,
        "broker_kill": broker_kill.as_ref().map(BrokerKill::summary),
        "processes": watched.iter().map(Watched::summary).collect::<Vec<_>>(),
        "kafka_ceiling": kafka_ceiling.as_ref().map(|c| json!({
            "readings_per_s": c.readings_per_s.round(),
            "records": c.records,
            "record_bytes": c.record_bytes,
            "seconds": round1(c.seconds),
            "steady_acknowledged_share": steady.map(|s| (s.1 / c.readings_per_s * 1000.0).round() / 1000.0),
        })),
        "intervals": intervals,
        "failures": failures,
        "interrupted": interrupted,
    });

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("{}", summary_text(&report));
    }
    if !failures.is_empty() {
        bail!("the bench failed: {}", failures.join("; "));
    }
    Ok(())
}

/// The readable summary of a report.
fn summary_text(r: &serde_json::Value) -> String {
    let n = |v: &serde_json::Value| match v.as_f64() {
        Some(x) => format!("{x:.0}"),
        None => "-".into(),
    };
    let q = |v: &serde_json::Value| {
        if v.is_null() {
            "-".to_string()
        } else {
            format!(
                "p50 {} ms, p99 {} ms, max {} ms ({} readings)",
                v["p50_ms"], v["p99_ms"], v["max_ms"], v["count"]
            )
        }
    };
    let rd = &r["readings"];
    let mut out = format!(
        "fleet benchmark: {} devices × {}/s, batches of {}, {} channels, {} s run\n\
         readings       offered {}  acknowledged {}  landed {}\n\
         per second     offered {}  acknowledged {}  landed {}  (whole run)\n\
         steady         offered {}  acknowledged {}  landed {}  (after warm-up)\n\
         after drain    acknowledged {}  landed {}  all acknowledged landed: {}  (drained {} s after the run)\n\
         reading→ack    {}  [steady: {}]\n\
         reading→Parquet {}  [steady: {}]\n\
         spool backlog  peak sum {}  peak per device {}  at end of run {}  unacknowledged left in spools {}\n\
         devices        reconnects {}  readings sent again {}  publishes held by the broker's gate {}\n",
        r["config"]["devices"],
        r["config"]["rate_per_device"],
        r["config"]["batch_size"],
        r["config"]["channels"],
        r["run_s"],
        n(&rd["offered"]),
        n(&rd["acknowledged"]),
        n(&rd["landed"]),
        n(&rd["offered_per_s"]),
        n(&rd["acknowledged_per_s"]),
        n(&rd["landed_per_s"]),
        n(&rd["steady_offered_per_s"]),
        n(&rd["steady_acknowledged_per_s"]),
        n(&rd["steady_landed_per_s"]),
        n(&r["after_drain"]["acknowledged"]),
        n(&r["after_drain"]["landed"]),
        r["after_drain"]["all_acknowledged_landed"],
        r["after_drain"]["drained_after_s"],
        q(&r["latency"]["reading_to_ack"]),
        q(&r["latency"]["reading_to_ack_steady"]),
        q(&r["latency"]["reading_to_parquet"]),
        q(&r["latency"]["reading_to_parquet_steady"]),
        r["spool_backlog"]["peak_sum"],
        r["spool_backlog"]["peak_device_max"],
        r["spool_backlog"]["end_of_run_sum"],
        r["after_drain"]["unacknowledged_left_in_spools"],
        r["reconnects"],
        r["readings_resent"],
        r["broker_publishes_held"],
    );
    if !r["kafka_ceiling"].is_null() {
        out.push_str(&format!(
            "bare Kafka     {} readings/s (the bridge's producer alone); steady acknowledged = {} of it\n",
            n(&r["kafka_ceiling"]["readings_per_s"]),
            r["kafka_ceiling"]["steady_acknowledged_share"]
        ));
    }
    if !r["broker_kill"].is_null() {
        let k = &r["broker_kill"];
        let t = &k["seconds_to_ack_again"];
        out.push_str(&format!(
            "broker-0 kill  at {} s: {} of its {} devices acknowledged again, after p50 {} s, p99 {} s, max {} s\n",
            k["at_s"], k["acknowledged_again"], k["devices"], t["p50"], t["p99"], t["max"]
        ));
    }
    if let Some(procs) = r["processes"].as_array() {
        for p in procs {
            let threads: Vec<String> = p["threads_cpu_percent"]
                .as_array()
                .map(|t| {
                    t.iter()
                        .take(4)
                        .map(|t| {
                            format!(
                                "{} {}%",
                                t["thread"].as_str().unwrap_or("?"),
                                t["cpu_percent"]
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.push_str(&format!(
                "{:<14} pid {}  CPU {}%  RSS {} → {} KiB (max {})  threads: {}\n",
                p["name"].as_str().unwrap_or("?"),
                p["pid"],
                p["cpu_percent"],
                p["rss_kib_start"],
                p["rss_kib_end"],
                p["rss_kib_max"],
                threads.join(", ")
            ));
        }
    }
    if let Some(f) = r["failures"].as_array().filter(|f| !f.is_empty()) {
        out.push_str(&format!("failures: {f:?}\n"));
    }
    out
}
