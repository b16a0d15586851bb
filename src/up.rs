//! `edgeloop up`: the whole loop on one machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use edgeloop_agent::{AgentConfig, AgentStats};
use edgeloop_broker::{BrokerConfig, BrokerStats};
use edgeloop_kafka::local::{KafkaInstall, LocalKafka, LocalKafkaOptions};
use edgeloop_processor::{ProcessorConfig, ProcessorStats};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Simulated devices, each with its own MQTT connection.
    #[arg(long, env = "EDGELOOP_DEVICES", default_value_t = 10)]
    devices: usize,
    /// Readings per second of each device.
    #[arg(long, env = "EDGELOOP_RATE", default_value_t = 10.0)]
    rate: f64,
    /// Readings per MQTT message.
    #[arg(long, env = "EDGELOOP_BATCH_SIZE", default_value_t = 100)]
    batch_size: usize,
    /// Stop by itself after this long (e.g. `30s`); without it, run until Ctrl-C.
    #[arg(long, env = "EDGELOOP_DURATION", value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Directory for everything the run writes: Parquet under DIR/parquet/,
    /// Kafka's storage and log under DIR/kafka/, each device's spool under
    /// DIR/spool/{device}/.
    #[arg(long, env = "EDGELOOP_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Kafka bootstrap servers of an existing cluster; without it a
    /// single-node Apache Kafka (KRaft) is started as a child process, its
    /// storage under DIR/kafka/ (Java 17 or newer and scripts/setup.sh's
    /// install of its jars are needed).
    #[arg(long, env = "EDGELOOP_KAFKA_BOOTSTRAP")]
    kafka: Option<String>,
    /// Where the started Kafka serves clients; its controller listens on
    /// the next port up.
    #[arg(long, env = "EDGELOOP_KAFKA_LISTEN", default_value = "127.0.0.1:19092")]
    kafka_listen: SocketAddr,
    /// Where the started Kafka's KRaft controller listens (default: the
    /// port after --kafka-listen).
    #[arg(long, env = "EDGELOOP_KAFKA_CONTROLLER_LISTEN")]
    kafka_controller_listen: Option<SocketAddr>,
    /// The started Kafka's maximum JVM heap.
    #[arg(long, env = "EDGELOOP_KAFKA_HEAP", default_value = "1g")]
    kafka_heap: String,
    /// MQTT listen address of the broker.
    #[arg(long, env = "EDGELOOP_MQTT_LISTEN", default_value = "127.0.0.1:1883")]
    mqtt_listen: SocketAddr,
    /// Close Parquet files (and commit their offsets) at this age at the latest.
    #[arg(long, env = "EDGELOOP_SINK_MAX_AGE", default_value = "10s", value_parser = humantime::parse_duration)]
    file_max_age: Duration,
    /// Where the processor serves the gRPC control API (`edgeloop ctl`); its
    /// bearer token is in DIR/control.token.
    #[arg(
        long,
        env = "EDGELOOP_CONTROL_LISTEN",
        default_value = "127.0.0.1:9470"
    )]
    control_listen: std::net::SocketAddr,
    /// Where the MQTT broker serves /healthz, /readyz and Prometheus
    /// /metrics, as `edgeloop broker --metrics-listen` does (docs/operations.md).
    #[arg(
        long,
        env = "EDGELOOP_BROKER_METRICS_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    broker_metrics_listen: SocketAddr,
    /// How often progress is printed.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    progress_every: Duration,
}

struct Counters {
    fleet: Arc<AgentStats>,
    broker: Arc<BrokerStats>,
    processor: Arc<ProcessorStats>,
}

impl Counters {
    fn line(&self, elapsed: Duration, rate: f64) -> String {
        let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "{:>6.1}s  published {:>9}  acknowledged {:>9}  spooled {:>7}  lost {}  in Kafka {:>9}  in Parquet {:>9} ({} files)  dead letters {}  | {:.0} readings/s to Parquet",
            elapsed.as_secs_f64(),
            g(&self.fleet.readings_published),
            g(&self.fleet.readings_acknowledged),
            g(&self.fleet.backlog_readings),
            g(&self.fleet.readings_lost),
            g(&self.broker.readings_in_kafka),
            g(&self.processor.rows_written),
            g(&self.processor.files_written),
            g(&self.processor.dead_letters),
            rate,
        )
    }
}

pub async fn run(args: UpArgs, shutdown: CancellationToken) -> Result<()> {
    let data_dir = args.data_dir.clone();
    std::fs::create_dir_all(data_dir.join("kafka"))
        .with_context(|| format!("creating {}", data_dir.join("kafka").display()))?;

    let mut local_kafka = None;
    let bootstrap = match &args.kafka {
        Some(b) => b.clone(),
        None => {
            let install = KafkaInstall::locate(|k| std::env::var_os(k))?;
            let opts = LocalKafkaOptions {
                listen: Some(args.kafka_listen),
                controller_listen: args.kafka_controller_listen,
                max_heap: args.kafka_heap.clone(),
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

    let mut broker_config = BrokerConfig::default();
    broker_config.mqtt.listen = args.mqtt_listen;
    broker_config.metrics_listen = Some(args.broker_metrics_listen);
    // Device identity: each simulated device gets a credential of its own
    // (the broker keeps the hash, the device its password), kept across runs.
    let (credentials_file, passwords) = provision_fleet(&data_dir, "device", args.devices)?;
    broker_config.auth.credentials_file = Some(credentials_file);
    broker_config.kafka.bootstrap_servers = bootstrap.clone();
    let mut processor_config = ProcessorConfig::default();
    processor_config.kafka.bootstrap_servers = bootstrap.clone();
    processor_config.parquet_root = data_dir.join("parquet");
    processor_config.group_id = "edgeloop-up".into();
    processor_config.instance_id = Some("edgeloop-up-0".into());
    processor_config.sink.max_age = args.file_max_age;
    // Labelling rules: DIR/rules.toml, written from the shipped example on
    // the first run; edit it while `up` runs and the processor reloads it.
    let rules = data_dir.join("rules.toml");
    if !rules.exists() {
        std::fs::write(&rules, include_str!("../config/rules.example.toml"))
            .with_context(|| format!("writing {}", rules.display()))?;
    }
    processor_config.rules_file = Some(rules);
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
    processor_config.control.listen = Some(args.control_listen);
    processor_config.control.token_file = Some(token_file.clone());
    processor_config.control.signing_key_file = Some(signing_key.clone());
    processor_config.channels = edgeloop_agent::source::simulator::SimulatorConfig::default()
        .channels
        .iter()
        .map(|c| c.name.clone())
        .collect();
    // Training (docs/training.md): the shipped `mcu8` (int8) and `gateway`
    // (f32) profiles, models and decisions under DIR/trainer/.
    processor_config.trainer = edgeloop_processor::trainer::TrainerConfig::simulator(
        &processor_config.channels,
        data_dir.join("trainer"),
    );
    // A demonstration run is short: a first model once 2,000 labelled
    // readings are in, then a retrain every 2,000 more (or every minute),
    // on at most 4,000 examples (the last 2,500 and a sample of 1,500
    // older), so a retrain takes well under a second in a release build.
    processor_config.trainer.retrain_every_examples = 2_000;
    processor_config.trainer.window_examples = 2_500;
    processor_config.trainer.reservoir_examples = 1_500;
    processor_config.trainer.retrain_every = Duration::from_secs(60);
    // Models are signed and published to edgeloop.models; the bridge
    // retains them on models/{task}/{profile} for the devices.
    processor_config.trainer.signing_key_file = Some(signing_key.clone());
    let profiles: Vec<String> = processor_config
        .trainer
        .profiles
        .iter()
        .map(|p| p.name.clone())
        .collect();
    let mut agent = AgentConfig::default();
    agent.mqtt.host = args.mqtt_listen.ip().to_string();
    if args.mqtt_listen.ip().is_unspecified() {
        agent.mqtt.host = "127.0.0.1".into();
    }
    agent.mqtt.port = args.mqtt_listen.port();
    agent.uplink.batch_size = args.batch_size;
    agent.spool.dir = data_dir.join("spool");
    // Devices take the profiles in turn (device-0000 mcu8, device-0001
    // gateway, …), check models with the public key and run them.
    agent.models.verify_key_file = Some(verify_key.clone());
    agent.uplink.max_unacked_readings = agent
        .uplink
        .max_unacked_readings
        .max(args.batch_size as u64 * 4);
    if let edgeloop_agent::config::SourceConfig::Simulator(sim) = &mut agent.source {
        sim.rate_hz = args.rate;
    }
    broker_config.validate().map_err(anyhow::Error::msg)?;
    processor_config.validate().map_err(anyhow::Error::msg)?;
    agent.validate().map_err(anyhow::Error::msg)?;

    let counters = Counters {
        fleet: Arc::new(AgentStats::default()),
        broker: Arc::new(BrokerStats::default()),
        processor: Arc::new(ProcessorStats::default()),
    };

    let broker_stop = CancellationToken::new();
    let broker_ready = CancellationToken::new();
    let mut broker = tokio::spawn(edgeloop_broker::run(
        broker_config,
        broker_stop.clone(),
        broker_ready.clone(),
        counters.broker.clone(),
    ));
    tokio::select! {
        _ = broker_ready.cancelled() => {}
        result = &mut broker => {
            result.context("broker task")??;
            anyhow::bail!("the broker stopped during start-up");
        }
    }
    println!(
        "MQTT broker on {}; bridge to Kafka {bootstrap}; broker metrics on http://{}/metrics",
        args.mqtt_listen, args.broker_metrics_listen
    );

    let processor_stop = CancellationToken::new();
    let mut processor = tokio::spawn(edgeloop_processor::run(
        processor_config,
        processor_stop.clone(),
        counters.processor.clone(),
    ));
    println!(
        "Stream processor writing Parquet under {}; control API on {} (edgeloop ctl --addr {} --token-file {} devices)",
        data_dir.join("parquet").display(),
        args.control_listen,
        args.control_listen,
        token_file.display()
    );

    let fleet_stop = CancellationToken::new();
    let fleet_counters = counters.fleet.clone();
    let fleet_shutdown = fleet_stop.clone();
    let devices = args.devices;
    let mut fleet = tokio::spawn(async move {
        edgeloop_agent::run_fleet_with_passwords(
            agent,
            "device",
            devices,
            &passwords,
            &profiles,
            fleet_shutdown,
            fleet_counters,
        )
        .await
    });
    println!(
        "{} simulated devices at {} readings/s each, batches of {}{}",
        args.devices,
        args.rate,
        args.batch_size,
        match args.duration {
            Some(d) => format!(", for {}", humantime::format_duration(d)),
            None => ", until Ctrl-C".into(),
        }
    );

    let start = Instant::now();
    let deadline = args.duration.map(|d| tokio::time::Instant::now() + d);
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
            result = &mut broker => {
                result.context("broker task")??;
                anyhow::bail!("the broker stopped unexpectedly");
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
    broker.await.context("broker task")??;
    // Let the processor take everything Kafka acknowledged before it stops.
    let in_kafka = BrokerStats::get(&counters.broker.batches_in_kafka);
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
        data_dir.join("parquet").display()
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

/// A random bearer token for the control API, written with mode 0600.
fn write_token(path: &std::path::Path) -> Result<()> {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut bytes);
    crate::ctl::write_private(
        path,
        &format!("{}\n", edgeloop_proto::signing::to_hex(&bytes)),
    )
}

/// Credentials for the simulated devices `{prefix}-0000…`: the broker's
/// credentials file (hashes) under DIR/broker/, and the devices' own
/// passwords under DIR/fleet/passwords.toml, as each device would keep its
/// own. Devices added since the last run get new credentials.
fn provision_fleet(
    data_dir: &std::path::Path,
    prefix: &str,
    count: usize,
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
    let missing: Vec<String> = (0..count)
        .map(|i| format!("{prefix}-{i:04}"))
        .filter(|id| !passwords.contains_key(id) || !known.credentials.iter().any(|c| &c.id == id))
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
        let (credentials, passwords) = provision_fleet(dir.path(), "device", 2)?;
        let secrets = dir.path().join("fleet/passwords.toml");
        assert_eq!(passwords.len(), 2);
        assert_eq!(mode(&secrets), 0o600, "{}", secrets.display());
        assert_eq!(mode(&credentials), 0o600, "{}", credentials.display());
        // A file left world-readable by an earlier version is replaced,
        // with the same passwords.
        std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644))?;
        let (_, again) = provision_fleet(dir.path(), "device", 2)?;
        assert_eq!(again, passwords);
        assert_eq!(mode(&secrets), 0o600);
        Ok(())
    }
}
