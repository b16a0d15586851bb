//! `edgeloop up`: the whole loop on one machine.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgeloop_agent::AgentStats;
use edgeloop_broker::BrokerStats;
use edgeloop_kafka::local::{KafkaInstall, LocalKafka, LocalKafkaOptions};
use edgeloop_processor::{ProcessorConfig, ProcessorStats};
use tokio_util::sync::CancellationToken;

pub(crate) mod config;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// The whole stack from one file: devices (simulated, replayed files,
    /// stdin), and the broker's, processor's and agents' configs with the
    /// schema of their own commands (config/up.example.toml). The flags
    /// below win over it.
    #[arg(long, env = "EDGELOOP_UP_CONFIG")]
    config: Option<PathBuf>,
    /// Replay these files (CSV with a header, or JSON Lines), one device
    /// each, named after the file, its channels from the header; the run
    /// ends when every file is sent and acknowledged. Without --rules the
    /// readings are written but neither labelled nor learnt from.
    #[arg(long, num_args = 1.., value_name = "FILE")]
    replay: Vec<PathBuf>,
    /// --replay at this many readings per second per file (default: as fast
    /// as possible; the readings keep their own timestamps).
    #[arg(long, value_name = "N", conflicts_with = "replay_realtime")]
    replay_rate: Option<f64>,
    /// --replay at the pace of the files' timestamps.
    #[arg(long)]
    replay_realtime: bool,
    /// Labelling rules (docs/labelling.md); default: the config's
    /// `processor.rules_file`, else for simulated devices DIR/rules.toml,
    /// written from the shipped example on the first run.
    #[arg(long, env = "EDGELOOP_RULES", value_name = "FILE")]
    rules: Option<PathBuf>,
    /// Simulated devices, each with its own MQTT connection [default: 10].
    #[arg(long, env = "EDGELOOP_DEVICES")]
    devices: Option<usize>,
    /// Readings per second of each simulated device [default: 10].
    #[arg(long, env = "EDGELOOP_RATE")]
    rate: Option<f64>,
    /// Readings per MQTT message [default: 100].
    #[arg(long, env = "EDGELOOP_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Stop by itself after this long (e.g. `30s`); without it, run until
    /// Ctrl-C, or until every device is done (replayed files).
    #[arg(long, env = "EDGELOOP_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Directory for everything the run writes: Parquet under DIR/parquet/,
    /// Kafka's storage and log under DIR/kafka/, each device's spool under
    /// DIR/spool/{device}/ [default: data].
    #[arg(long, env = "EDGELOOP_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Kafka bootstrap servers of an existing cluster; without it a
    /// single-node Apache Kafka (KRaft) is started as a child process, its
    /// storage under DIR/kafka/ (Java 17 or newer and scripts/setup.sh's
    /// install of its jars are needed).
    #[arg(long, env = "EDGELOOP_KAFKA_BOOTSTRAP")]
    kafka: Option<String>,
    /// Where the started Kafka serves clients; its controller listens on
    /// the next port up [default: 127.0.0.1:19092].
    #[arg(long, env = "EDGELOOP_KAFKA_LISTEN")]
    kafka_listen: Option<SocketAddr>,
    /// Where the started Kafka's KRaft controller listens (default: the
    /// port after --kafka-listen).
    #[arg(long, env = "EDGELOOP_KAFKA_CONTROLLER_LISTEN")]
    kafka_controller_listen: Option<SocketAddr>,
    /// The started Kafka's maximum JVM heap [default: 1g].
    #[arg(long, env = "EDGELOOP_KAFKA_HEAP")]
    kafka_heap: Option<String>,
    /// MQTT listen address of the broker [default: 127.0.0.1:1883].
    #[arg(long, env = "EDGELOOP_MQTT_LISTEN")]
    mqtt_listen: Option<SocketAddr>,
    /// Broker replicas, on the MQTT (and metrics) ports counted up from
    /// --mqtt-listen (and --broker-metrics-listen); the devices are spread
    /// over them and move to the next one after a lost connection
    /// (docs/broker.md, "Several replicas") [default: 1].
    #[arg(long, env = "EDGELOOP_BROKERS")]
    brokers: Option<usize>,
    /// Close Parquet files (and commit their offsets) at this age at the
    /// latest [default: 10s].
    #[arg(long, env = "EDGELOOP_SINK_MAX_AGE", value_parser = humantime::parse_duration)]
    file_max_age: Option<Duration>,
    /// Where the processor serves the gRPC control API (`edgeloop ctl`); its
    /// bearer token is in DIR/control.token [default: 127.0.0.1:9470].
    #[arg(long, env = "EDGELOOP_CONTROL_LISTEN")]
    control_listen: Option<SocketAddr>,
    /// Where the MQTT broker serves /healthz, /readyz and Prometheus
    /// /metrics, as `edgeloop broker --metrics-listen` does
    /// (docs/operations.md) [default: 127.0.0.1:9465].
    #[arg(long, env = "EDGELOOP_BROKER_METRICS_LISTEN")]
    broker_metrics_listen: Option<SocketAddr>,
    /// How often progress is printed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    progress_every: Duration,
}

impl UpArgs {
    fn overrides(&self) -> config::Overrides {
        config::Overrides {
            devices: self.devices,
            rate: self.rate,
            batch_size: self.batch_size,
            duration: self.duration,
            data_dir: self.data_dir.clone(),
            kafka: self.kafka.clone(),
            kafka_listen: self.kafka_listen,
            kafka_controller_listen: self.kafka_controller_listen,
            kafka_heap: self.kafka_heap.clone(),
            mqtt_listen: self.mqtt_listen,
            file_max_age: self.file_max_age,
            control_listen: self.control_listen,
            broker_metrics_listen: self.broker_metrics_listen,
            brokers: self.brokers,
            replay: self.replay.clone(),
            replay_rate: self.replay_rate,
            replay_realtime: self.replay_realtime,
            rules: self.rules.clone(),
        }
    }

    /// The run these arguments describe (reading --config, if given).
    fn plan(&self) -> Result<config::Plan> {
        let (file, dir) = match &self.config {
            Some(path) => {
                let file = config::UpFile::read(path, std::env::vars())?;
                let dir = path
                    .parent()
                    .map(|d| {
                        if d.as_os_str().is_empty() {
                            Path::new(".")
                        } else {
                            d
                        }
                    })
                    .map(Path::to_path_buf);
                (file, dir)
            }
            None => (config::UpFile::default(), None),
        };
        config::plan(file, dir.as_deref(), &self.overrides()).with_context(|| match &self.config {
            Some(path) => format!("in {}", path.display()),
            None => "in the flags of edgeloop up".to_string(),
        })
    }
}

struct Counters {
    fleet: Arc<AgentStats>,
    /// One per broker replica.
    brokers: Vec<Arc<BrokerStats>>,
    processor: Arc<ProcessorStats>,
}

impl Counters {
    /// A broker counter summed over the replicas.
    fn brokers(&self, counter: impl Fn(&BrokerStats) -> &std::sync::atomic::AtomicU64) -> u64 {
        self.brokers
            .iter()
            .map(|b| BrokerStats::get(counter(b)))
            .sum()
    }

    fn line(&self, elapsed: Duration, rate: f64) -> String {
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "{:>6.1}s  published {:>9}  acknowledged {:>9}  spooled {:>7}  lost {}  in Kafka {:>9}  in Parquet {:>9} ({} files)  dead letters {}  | {:.0} readings/s to Parquet",
            elapsed.as_secs_f64(),
            g(&self.fleet.readings_published),
            g(&self.fleet.readings_acknowledged),
            g(&self.fleet.backlog_readings),
            g(&self.fleet.readings_lost),
            self.brokers(|b| &b.readings_in_kafka),
            g(&self.processor.rows_written),
            g(&self.processor.files_written),
            g(&self.processor.dead_letters),
            rate,
        )
    }
}

pub async fn run(args: UpArgs, shutdown: CancellationToken) -> Result<()> {
    let plan = args.plan()?;
    let data_dir = plan.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("kafka"))
        .with_context(|| format!("creating {}", data_dir.join("kafka").display()))?;

    let mut local_kafka = None;
    let bootstrap = match &plan.bootstrap {
        Some(b) => b.clone(),
        None => {
            let install = KafkaInstall::locate(|k| std::env::var_os(k))?;
            let opts = LocalKafkaOptions {
                listen: Some(plan.kafka_listen),
                controller_listen: plan.kafka_controller_listen,
                max_heap: plan.kafka_heap.clone(),
                ..LocalKafkaOptions::single(&data_dir.join("kafka"))
            };
            let kafka = LocalKafka::start(&install, &opts).await?;
            println!(
                "Apache Kafka {} (KRaft, one node) on {}; storage and log (kafka.log) in {}",
                edgeloop_kafka::local::KAFKA_VERSION,
                kafka.bootstrap(),
                data_dir.join("kafka").display()
            );
            let b = kafka.bootstrap();
            local_kafka = Some(kafka);
            b
        }
    };

    let mut broker_configs = plan.brokers;
    // Device identity: each device gets a credential of its own (the
    // broker keeps the hash, the device its password), kept across runs.
    let ids: Vec<String> = plan.devices.iter().map(|d| d.device_id.clone()).collect();
    let (credentials_file, passwords) = provision_fleet(&data_dir, &ids)?;
    for broker in &mut broker_configs {
        broker.auth.credentials_file = Some(credentials_file.clone());
        broker.kafka.bootstrap_servers = bootstrap.clone();
    }
    let mqtt_listens: Vec<String> = broker_configs
        .iter()
        .map(|b| b.mqtt.listen.to_string())
        .collect();
    let broker_metrics: Vec<String> = broker_configs
        .iter()
        .filter_map(|b| b.metrics_listen)
        .map(|a| format!("http://{a}/metrics"))
        .collect();
    let mut processor_config = plan.processor;
    processor_config.kafka.bootstrap_servers = bootstrap.clone();
    // The simulator's labelling rules: DIR/rules.toml, written from the
    // shipped example on the first run; edit it while `up` runs and the
    // processor reloads it.
    if let (true, Some(rules)) = (plan.example_rules, &processor_config.rules_file) {
        if !rules.exists() {
            std::fs::write(rules, include_str!("../config/rules.example.toml"))
                .with_context(|| format!("writing {}", rules.display()))?;
        }
    }
    // Model signing: one key pair per data directory, made on the first run
    // (DIR/keys/signing.key signs, the devices check with signing.pub).
    let keys = data_dir.join("keys");
    let (signing_key, verify_key) = (keys.join("signing.key"), keys.join("signing.pub"));
    if !signing_key.exists() && !verify_key.exists() {
        crate::ctl::generate_key_files(&keys)?;
    }
    // The control API, with a token made on the first run.
    let token_file = data_dir.join("control.token");
    if !token_file.exists() {
        write_token(&token_file)?;
    }
    let control_listen = processor_config.control.listen;
    processor_config.control.token_file = Some(token_file.clone());
    processor_config.control.signing_key_file = Some(signing_key.clone());
    // Models are signed and published to edgeloop.models; the bridge
    // retains them on models/{task}/{profile} for the devices.
    processor_config.trainer.signing_key_file = Some(signing_key.clone());
    let mut devices = plan.devices;
    for device in &mut devices {
        // Each device checks models with the public key and runs them.
        device.models.verify_key_file = Some(verify_key.clone());
        if let Some(password) = passwords.get(&device.device_id) {
            device.mqtt.username = Some(device.device_id.clone());
            device.mqtt.password = Some(password.clone());
        }
    }
    for broker in &broker_configs {
        broker.validate().map_err(anyhow::Error::msg)?;
    }
    processor_config.validate().map_err(anyhow::Error::msg)?;
    warn_of_profiles_without_models(&processor_config, &devices);
    if processor_config.rules_file.is_none() {
        println!(
            "no labelling rules (--rules FILE or processor.rules_file, docs/labelling.md): readings are written to Parquet but not labelled, and no model is trained"
        );
    }

    let counters = Counters {
        fleet: Arc::new(AgentStats::default()),
        brokers: broker_configs
            .iter()
            .map(|_| Arc::new(BrokerStats::default()))
            .collect(),
        processor: Arc::new(ProcessorStats::default()),
    };

    // The broker replicas, each a task; the first to end (an error, or a
    // stop nobody asked for) ends the run.
    let broker_stop = CancellationToken::new();
    let mut brokers = tokio::task::JoinSet::new();
    let mut readies = Vec::new();
    for (i, (config, stats)) in broker_configs
        .into_iter()
        .zip(&counters.brokers)
        .enumerate()
    {
        let ready = CancellationToken::new();
        readies.push(ready.clone());
        let (stop, stats) = (broker_stop.clone(), stats.clone());
        brokers.spawn(async move { (i, edgeloop_broker::run(config, stop, ready, stats).await) });
    }
    for ready in &readies {
        tokio::select! {
            _ = ready.cancelled() => {}
            Some(joined) = brokers.join_next() => {
                let (i, result) = joined.context("broker task")?;
                result?;
                anyhow::bail!("broker replica {i} stopped during start-up");
            }
        }
    }
    let metrics_line = if broker_metrics.is_empty() {
        String::new()
    } else {
        format!("; broker metrics on {}", broker_metrics.join(", "))
    };
    if mqtt_listens.len() == 1 {
        println!(
            "MQTT broker on {}; bridge to Kafka {bootstrap}{metrics_line}",
            mqtt_listens[0]
        );
    } else {
        println!(
            "{} MQTT broker replicas on {}, the devices spread over them (each moves to the next \
             after a lost connection); bridges to Kafka {bootstrap}{metrics_line}",
            mqtt_listens.len(),
            mqtt_listens.join(", ")
        );
    }

    let processor_stop = CancellationToken::new();
    let processor_config_trained = processor_config.trainer.enabled;
    let first_model = processor_config.trainer.retrain_every_examples;
    let parquet_root = processor_config.parquet_root.clone();
    let mut processor = tokio::spawn(edgeloop_processor::run(
        processor_config,
        processor_stop.clone(),
        counters.processor.clone(),
    ));
    println!(
        "Stream processor writing Parquet under {}{}",
        parquet_root.display(),
        control_listen
            .map(|a| format!(
                "; control API on {a} (edgeloop ctl --addr {a} --token-file {} devices)",
                token_file.display()
            ))
            .unwrap_or_default()
    );

    let fleet_stop = CancellationToken::new();
    let fleet_counters = counters.fleet.clone();
    let fleet_shutdown = fleet_stop.clone();
    let replayed: std::collections::HashSet<String> = devices
        .iter()
        .filter(|d| matches!(d.source, edgeloop_agent::config::SourceConfig::Replay(_)))
        .map(|d| d.device_id.clone())
        .collect();
    let mut fleet = tokio::spawn(async move {
        edgeloop_agent::run_devices(devices, None, fleet_shutdown, fleet_counters).await
    });
    println!(
        "{}, batches of {}{}",
        plan.description.join("; "),
        plan.batch_size,
        match plan.duration {
            Some(d) => format!(", for {}", humantime::format_duration(d)),
            None if plan.ends_by_itself =>
                ", until every device's input is sent (or Ctrl-C)".into(),
            None => ", until Ctrl-C".into(),
        }
    );

    let start = Instant::now();
    let deadline = plan.duration.map(|d| tokio::time::Instant::now() + d);
    let mut ticker = tokio::time::interval(args.progress_every);
    ticker.tick().await;
    let mut last = (Instant::now(), 0u64);
    let mut fleet_result = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)), if deadline.is_some() => break,
            result = &mut fleet => { fleet_result = Some(result); break; }
            result = &mut processor => {
                result.context("processor task")??;
                anyhow::bail!("the stream processor stopped unexpectedly");
            }
            Some(joined) = brokers.join_next() => {
                let (i, result) = joined.context("broker task")?;
                result?;
                anyhow::bail!("broker replica {i} stopped unexpectedly");
            }
            _ = ticker.tick() => {
                let rows = ProcessorStats::get(&counters.processor.rows_written);
                let rate = (rows - last.1) as f64 / last.0.elapsed().as_secs_f64();
                last = (Instant::now(), rows);
                println!("{}", counters.line(start.elapsed(), rate));
            }
        }
    }

    println!(
        "stopping: devices send what they hold, then the bridge, the processor and Kafka stop"
    );
    fleet_stop.cancel();
    let reports = match fleet_result {
        Some(r) => r,
        None => fleet.await,
    }
    .context("fleet task")??;
    broker_stop.cancel();
    while let Some(joined) = brokers.join_next().await {
        joined.context("broker task")?.1?;
    }
    // Let the processor take everything Kafka acknowledged before it stops.
    let in_kafka = counters.brokers(|b| &b.batches_in_kafka);
    let wait_until = Instant::now() + Duration::from_secs(20);
    while ProcessorStats::get(&counters.processor.records_consumed) < in_kafka
        && Instant::now() < wait_until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    processor_stop.cancel();
    processor.await.context("processor task")??;
    if let Some(kafka) = local_kafka {
        kafka.stop(Duration::from_secs(30)).await;
    }

    let taken: u64 = reports.iter().map(|r| r.next_seq).sum();
    let acked: u64 = reports.iter().map(|r| r.committed_seq).sum();
    let elapsed = start.elapsed();
    let rows = ProcessorStats::get(&counters.processor.rows_written);
    println!(
        "{}",
        counters.line(elapsed, rows as f64 / elapsed.as_secs_f64())
    );
    println!(
        "done: {taken} readings taken by {} devices, {acked} acknowledged, {rows} written to Parquet in {} files under {}",
        reports.len(),
        ProcessorStats::get(&counters.processor.files_written),
        parquet_root.display()
    );
    if acked < taken {
        println!(
            "note: {} readings had no ack at their device when its grace period ended; they stay in \
             the devices' spools under {} and are sent on the next run",
            taken - acked,
            data_dir.join("spool").display()
        );
    }
    println!("{}", models_line(&counters.processor.trainer, &reports));
    let without_model = reports
        .iter()
        .filter(|r| replayed.contains(&r.device_id) && r.applied_models.is_empty())
        .count();
    if without_model > 0 && processor_config_trained {
        println!(
            "note: {without_model} replayed device(s) finished their file before any model reached them, \
             so their readings carry no prediction: the first model is trained once \
             {first_model} labelled readings are in; replay more slowly (--replay-rate N, or rate = N \
             in the config's [[devices]]) for the devices to run the models they get"
        );
    }
    println!("{}", counters.processor.trainer.parity_line());
    let report = data_dir.join("report.svg");
    let decisions = data_dir.join("trainer/decisions.jsonl");
    match crate::report::write(&data_dir.join("parquet"), Some(&decisions), &report) {
        Ok(_) => println!("report: {}", report.display()),
        Err(e) => println!("report: not written: {e:#}"),
    }
    Ok(())
}

/// The gate's decisions per (task, profile) and the model versions the
/// devices ran at exit, e.g. `models: anomaly/mcu8 3 published, 1 rejected;
/// devices running anomaly: mcu8 v3 ×5, gateway v2 ×5`.
fn models_line(
    trainer: &edgeloop_processor::trainer::TrainerStats,
    reports: &[edgeloop_agent::AgentReport],
) -> String {
    use std::collections::BTreeMap;
    let gate = trainer.gate_summary();
    let mut running: BTreeMap<(String, String, u64), usize> = BTreeMap::new();
    for r in reports {
        if r.applied_models.is_empty() {
            *running
                .entry((r.profile.clone(), "no model".into(), 0))
                .or_default() += 1;
        }
        for (task, v) in &r.applied_models {
            *running
                .entry((r.profile.clone(), task.clone(), *v))
                .or_default() += 1;
        }
    }
    let devices = running
        .iter()
        .map(|((profile, task, v), n)| {
            if *v == 0 {
                format!("{profile} {task} ×{n}")
            } else {
                format!("{profile} {task} v{v} ×{n}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!("models: {gate}; devices ran at exit: {devices}")
}

/// Says, for each device profile no trainer profile has, which devices
/// announce it: they would never get a model.
fn warn_of_profiles_without_models(
    processor: &ProcessorConfig,
    devices: &[edgeloop_agent::AgentConfig],
) {
    if !processor.trainer.enabled {
        return;
    }
    let mut orphans: std::collections::BTreeMap<&str, Vec<&str>> = Default::default();
    for d in devices {
        if !processor.trainer.serves_profile(&d.profile) {
            orphans.entry(&d.profile).or_default().push(&d.device_id);
        }
    }
    for (profile, ids) in orphans {
        println!(
            "warning: no trainer profile is named {profile:?}, so {} device(s) announcing it ({}{}) will get no model; \
             the trainer's profiles are {}",
            ids.len(),
            ids.iter().take(3).copied().collect::<Vec<_>>().join(", "),
            if ids.len() > 3 { ", …" } else { "" },
            processor.trainer.profile_names().join(", ")
        );
    }
}

/// A random bearer token for the control API, written with mode 0600.
fn write_token(path: &std::path::Path) -> Result<()> {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    crate::ctl::write_private(
        path,
        &format!("{}\n", edgeloop_proto::signing::to_hex(&bytes)),
    )
}

/// Credentials for the devices `ids`: the broker's credentials file
/// (hashes) under DIR/broker/, and the devices' own passwords under
/// DIR/fleet/passwords.toml, as each device would keep its own. Devices
/// added since the last run get new credentials.
fn provision_fleet(
    data_dir: &std::path::Path,
    ids: &[String],
) -> Result<(
    std::path::PathBuf,
    std::collections::HashMap<String, String>,
)> {
    use edgeloop_broker::gate::acl::Role;
    use edgeloop_broker::gate::credentials::CredentialsFile;
    let credentials = data_dir.join("broker/credentials.toml");
    let secrets = data_dir.join("fleet/passwords.toml");
    let mut passwords: std::collections::BTreeMap<String, String> =
        match std::fs::read_to_string(&secrets) {
            Ok(text) => {
                toml::from_str(&text).with_context(|| format!("reading {}", secrets.display()))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
            Err(e) => return Err(e).with_context(|| format!("reading {}", secrets.display())),
        };
    let known = CredentialsFile::read(&credentials)?;
    let missing: Vec<String> = ids
        .iter()
        .filter(|id| {
            !passwords.contains_key(*id) || !known.credentials.iter().any(|c| &c.id == *id)
        })
        .cloned()
        .collect();
    if !missing.is_empty() {
        // A device whose password was lost gets a new credential.
        let mut file = known;
        file.credentials.retain(|c| !missing.contains(&c.id));
        file.write(&credentials)?;
        for (id, password) in CredentialsFile::add(&credentials, &missing, Role::Device, &[])? {
            passwords.insert(id, password);
        }
        std::fs::create_dir_all(data_dir.join("fleet"))?;
        write_private(&secrets, toml::to_string(&passwords)?.as_bytes())
            .with_context(|| format!("writing {}", secrets.display()))?;
        println!(
            "Provisioned {} device credential(s) in {}",
            missing.len(),
            credentials.display()
        );
    }
    // A passwords file of an earlier version was readable by every local
    // user: replaced by one that is not.
    if readable_by_others(&secrets) {
        write_private(&secrets, toml::to_string(&passwords)?.as_bytes())
            .with_context(|| format!("writing {}", secrets.display()))?;
        println!(
            "{} was readable by other users; rewritten with mode 0600",
            secrets.display()
        );
    }
    Ok((credentials, passwords.into_iter().collect()))
}

use edgeloop_broker::gate::credentials::write_private;

/// Whether `path` exists with any permission for its group or others.
fn readable_by_others(path: &std::path::Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0)
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        false
    }
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(p: &std::path::Path) -> u32 {
        std::fs::metadata(p).map_or(0, |m| m.permissions().mode() & 0o777)
    }

    #[test]
    fn the_fleet_passwords_and_credentials_are_readable_by_their_owner_only() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let ids = ["device-0000".to_string(), "device-0001".to_string()];
        let (credentials, passwords) = provision_fleet(dir.path(), &ids)?;
        let secrets = dir.path().join("fleet/passwords.toml");
        assert_eq!(passwords.len(), 2);
        assert_eq!(mode(&secrets), 0o600, "{}", secrets.display());
        assert_eq!(mode(&credentials), 0o600, "{}", credentials.display());
        // A file left world-readable by an earlier version is replaced,
        // with the same passwords.
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644))?;
        let (_, again) = provision_fleet(dir.path(), &ids)?;
        assert_eq!(again, passwords);
        assert_eq!(mode(&secrets), 0o600);
        Ok(())
    }
}
