//! `edgeloop`: one binary, a subcommand per component. Each subcommand only
//! parses its config and calls a library's `run(config, shutdown, …)`.

mod add_device;
mod bench;
mod chaos;
mod check;
mod config_env;
mod ctl;
mod report;
mod up;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

/// jemalloc instead of glibc's malloc, for every subcommand, on x86_64
/// Linux. In the fleet bench (100,000 readings/s) glibc's per-thread arenas
/// held the broker at ~600 MiB, 0.8 GiB while devices connected; jemalloc
/// does the same work in ~260 MiB (docs/benchmarks.md, "Fleet benchmark").
/// Not on other targets: jemalloc is built for one page size, and ARM boards
/// run 4, 16 or 64 KiB pages (a Raspberry Pi 5's kernel uses 16 KiB).
/// librdkafka (C) keeps glibc's malloc.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser, Debug)]
#[command(
    name = "edgeloop",
    version,
    about = "Closes the machine-learning loop for fleets of IoT devices",
    long_about = "Closes the machine-learning loop for fleets of IoT devices: edge agents publish \
                  readings over MQTT to a broker bridged into Kafka, and a stream processor writes \
                  them to a Hive-partitioned Parquet data set.\n\n\
                  `edgeloop up` runs everything on one machine; `broker`, `processor` and `agent` \
                  run one part each (how Kubernetes runs them). Every flag can also be set from \
                  the environment variable shown in its help."
)]
struct Cli {
    /// Log format.
    #[arg(long, global = true, env = "EDGELOOP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter (tracing's EnvFilter syntax), e.g. `info` or `edgeloop_broker=debug`.
    #[arg(long, global = true, env = "EDGELOOP_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the whole loop on this machine: a single-node Apache Kafka (KRaft), the MQTT
    /// broker and its Kafka bridge, the stream processor, and a fleet of
    /// simulated devices. Prints progress; Ctrl-C stops everything in order.
    Up(up::UpArgs),
    /// The chaos soak: a whole stack as child processes, killed, restarted
    /// and cut off at random (seeded) for a while, then checked: every reading
    /// a device fsynced is in Parquet exactly once or reported lost.
    Chaos(chaos::ChaosArgs),
    /// Load-test a stack with a simulated fleet (thousands of devices, each
    /// its own MQTT connection and spool) and report throughput, latency,
    /// CPU, memory and spool backlogs; `--local DIR` starts the stack too.
    ///
    /// Against a running stack: --mqtt HOST:PORT; --parquet-root (a local
    /// data set) and/or --processor-metrics for what landed; --pid NAME=PID
    /// for CPU and memory; --provision-credentials FILE unless the broker
    /// allows anonymous devices. The simulated devices take the agent's
    /// settings as `edgeloop agent` reads them (its defaults and
    /// `EDGELOOP_AGENT__*` variables, e.g. `EDGELOOP_AGENT__UPLINK__LINGER=50ms`),
    /// with the bench's options over them. Progress goes to stderr every few
    /// seconds, the final report to stdout (--json for machines). How it
    /// measures: docs/benchmarks.md, "Fleet benchmark".
    Bench(bench::BenchArgs),
    /// Run the MQTT broker and its bridge to Kafka.
    ///
    /// Devices publish readings on telemetry/{device}; the bridge produces
    /// them to Kafka and publishes the ack watermark retained on
    /// ack/{device} once Kafka holds them. Acks are also kept in the
    /// compacted Kafka topic edgeloop.acks, and models come from the
    /// compacted edgeloop.models: at start-up both are read back and
    /// republished retained (ack/{device}, models/{task}/{profile}) before
    /// the MQTT listener opens, so a restart loses neither.
    Broker(BrokerArgs),
    /// Run the stream processor: Kafka readings into the Parquet data set.
    Processor(ProcessorArgs),
    /// Run one edge agent (a simulated device) against a broker.
    Agent(AgentArgs),
    /// Look into a device's spool directory (for debugging a device in the field).
    #[command(subcommand)]
    Spool(SpoolCommand),
    /// The labelling rules: check a file, or see how each rule behaves.
    #[command(subcommand)]
    Labels(LabelsCommand),
    /// Draw a picture of the loop from the Parquet data set: readings per
    /// device over time, labels over time, how each rule votes, and the
    /// losses devices reported, as one SVG file (`edgeloop up` writes
    /// DIR/report.svg at the end of a run).
    Report(report::ReportArgs),
    /// Ask a running processor's control API (docs/control-api.md): devices,
    /// rules, health, models (list, show, rollback, pin, unpin). Tables, or --json.
    Ctl(ctl::CtlArgs),
    /// Keys that sign model updates (Ed25519).
    #[command(subcommand)]
    Keys(ctl::KeysCommand),
    /// Check a config file offline, as its component would read it at start-up
    /// (the file, its EDGELOOP_{COMPONENT}__* environment overrides, every
    /// value; for the processor also the rules file it names, against its
    /// channels, and its key and token files); connects to nothing. Prints
    /// what it found; exit status 1 and the field that is wrong if refused.
    Check(check::CheckArgs),
}

#[derive(Subcommand, Debug)]
enum LabelsCommand {
    /// Per rule and rules version: coverage, overlap, conflict, agreement with
    /// the final label and estimated accuracy, from the data set's
    /// `rule_stats` table.
    Stats {
        /// Root of the Parquet data set (`DIR/parquet` for `edgeloop up`).
        #[arg(long, env = "EDGELOOP_PARQUET_ROOT", default_value = "data/parquet")]
        parquet_root: PathBuf,
    },
    /// Check a rules file as the processor would; exit status 1 if refused.
    Check {
        /// The rules file.
        file: PathBuf,
        /// The data set's channels, comma-separated (empty: any).
        #[arg(long, value_delimiter = ',')]
        channels: Vec<String>,
    },
}

#[derive(Subcommand, Debug)]
enum SpoolCommand {
    /// What is in a spool: segments, seq ranges, acknowledged or not, losses
    /// not yet reported, quarantined files. Changes nothing.
    Inspect {
        /// The spool directory (the agent's `spool.dir`).
        dir: PathBuf,
    },
    /// Check every record's checksum; exit status 1 if anything is wrong.
    /// With --repair, apply the recovery rules the agent applies at start
    /// (cut torn tails, quarantine corrupt segments, record the losses).
    Check {
        /// The spool directory (the agent's `spool.dir`).
        dir: PathBuf,
        /// Repair what the check finds.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(clap::Subcommand, Debug)]
enum BrokerCommand {
    /// Create a credential for each device and give out its password once
    /// (the credentials file keeps only a salted argon2 hash): on stdout by
    /// default, into a file of mode 0600 with --password-file, or as JSON
    /// with --json. A running broker picks it up without a restart.
    AddDevice(add_device::AddDeviceArgs),
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
struct BrokerArgs {
    #[command(subcommand)]
    command: Option<BrokerCommand>,
    /// TOML config file (see config/broker.example.toml); flags override it.
    #[arg(long, env = "EDGELOOP_BROKER_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT listen address.
    #[arg(long, env = "EDGELOOP_MQTT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "EDGELOOP_KAFKA_BOOTSTRAP")]
    kafka: Option<String>,
    /// Kafka compression of the readings: none, gzip, snappy, lz4, zstd.
    #[arg(long, env = "EDGELOOP_BRIDGE_COMPRESSION")]
    compression: Option<String>,
    /// Credentials file of the devices (`edgeloop broker add-device` writes it).
    #[arg(long, env = "EDGELOOP_CREDENTIALS_FILE")]
    credentials: Option<PathBuf>,
    /// Let clients without a user name connect (they get the topic ACLs of
    /// their client id).
    #[arg(long, env = "EDGELOOP_ALLOW_ANONYMOUS")]
    allow_anonymous: bool,
    /// TLS listen address (MQTT over TLS); needs --tls-cert and --tls-key.
    #[arg(long, env = "EDGELOOP_MQTT_TLS_LISTEN")]
    tls_listen: Option<SocketAddr>,
    /// PEM certificate chain for the TLS listener.
    #[arg(long, env = "EDGELOOP_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for the TLS listener.
    #[arg(long, env = "EDGELOOP_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM CA that signs device certificates: a verified certificate's common
    /// name is the device id.
    #[arg(long, env = "EDGELOOP_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// Serve /healthz, /readyz (200 only while the MQTT listener is up and
    /// Kafka answers) and Prometheus /metrics on this address (e.g.
    /// 0.0.0.0:9465); see docs/operations.md.
    #[arg(long, env = "EDGELOOP_BROKER_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// This replica's name among the brokers bridging to the same Kafka
    /// (default: the host name); see docs/broker.md, "Several replicas".
    #[arg(long, env = "EDGELOOP_BROKER_REPLICA_ID")]
    replica_id: Option<String>,
}

#[derive(clap::Args, Debug)]
struct ProcessorArgs {
    /// TOML config file (see config/processor.example.toml); flags override it.
    #[arg(long, env = "EDGELOOP_PROCESSOR_CONFIG")]
    config: Option<PathBuf>,
    /// Kafka bootstrap servers.
    #[arg(long, env = "EDGELOOP_KAFKA_BOOTSTRAP")]
    kafka: Option<String>,
    /// Kafka consumer group id.
    #[arg(long, env = "EDGELOOP_GROUP_ID")]
    group_id: Option<String>,
    /// Stable name of this processor instance (Kafka static group membership),
    /// e.g. the pod name: a restart under the same name resumes at once.
    #[arg(long, env = "EDGELOOP_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Root directory of the Parquet data set.
    #[arg(long, env = "EDGELOOP_PARQUET_ROOT")]
    parquet_root: Option<PathBuf>,
    /// Kafka consumer session timeout, default `10s`: how long a silent member
    /// keeps its partitions (with --instance-id, a restart within it resumes them).
    #[arg(long, env = "EDGELOOP_SESSION_TIMEOUT", value_parser = humantime::parse_duration)]
    session_timeout: Option<Duration>,
    /// Labelling rules file (TOML, docs/labelling.md); watched and hot-reloaded.
    #[arg(long, env = "EDGELOOP_RULES_FILE")]
    rules: Option<PathBuf>,
    /// Serve /metrics, /healthz and /readyz on this address (e.g. 0.0.0.0:9464).
    #[arg(long, env = "EDGELOOP_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// The data set's channels, comma-separated: rules naming another channel are refused.
    #[arg(long, env = "EDGELOOP_CHANNELS", value_delimiter = ',')]
    channels: Vec<String>,
    /// Close a Parquet file (and commit its offsets) once it is this old, e.g. `10s`.
    #[arg(long, env = "EDGELOOP_SINK_MAX_AGE", value_parser = humantime::parse_duration)]
    max_age: Option<Duration>,
    /// Serve the gRPC control API on this address (e.g. 0.0.0.0:9470);
    /// needs a token (docs/control-api.md).
    #[arg(long, env = "EDGELOOP_CONTROL_LISTEN")]
    control_listen: Option<SocketAddr>,
    /// The control API's bearer token (at least 16 characters).
    #[arg(long, env = "EDGELOOP_CONTROL_TOKEN", hide_env_values = true)]
    control_token: Option<String>,
    /// A file holding the control API's token (e.g. a mounted Secret).
    #[arg(long, env = "EDGELOOP_CONTROL_TOKEN_FILE")]
    control_token_file: Option<PathBuf>,
    /// Private key a rollback or pin signs the version it republishes with
    /// (config `control.signing_key_file`; `edgeloop keys generate`).
    #[arg(long, env = "EDGELOOP_CONTROL_SIGNING_KEY_FILE")]
    control_signing_key_file: Option<PathBuf>,
    /// Train models on the labelled readings (config `trainer.enabled`; needs
    /// rules and `[[trainer.profiles]]`, see docs/training.md).
    #[arg(long, env = "EDGELOOP_TRAINER", num_args = 0..=1, default_missing_value = "true")]
    trainer: Option<bool>,
    /// Where the trainer writes decisions.jsonl and models/{task}/{profile}/v{N}.bin.
    #[arg(long, env = "EDGELOOP_TRAINER_DIR")]
    trainer_dir: Option<PathBuf>,
    /// Private key the trainer signs published models with (config
    /// `trainer.signing_key_file`; set: models go to Kafka edgeloop.models).
    #[arg(long, env = "EDGELOOP_TRAINER_SIGNING_KEY_FILE")]
    trainer_signing_key_file: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct AgentArgs {
    /// TOML config file (see config/agent.example.toml); flags override it.
    #[arg(long, env = "EDGELOOP_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// Device id (also the MQTT client id).
    #[arg(long, env = "EDGELOOP_DEVICE_ID")]
    device_id: Option<String>,
    /// Device profile.
    #[arg(long, env = "EDGELOOP_PROFILE")]
    profile: Option<String>,
    /// MQTT broker, HOST:PORT; several broker replicas as
    /// HOST:PORT,HOST:PORT,… (the first is mqtt.host and mqtt.port, the
    /// others mqtt.fallback_servers, tried in turn after a lost connection).
    #[arg(long, env = "EDGELOOP_MQTT")]
    mqtt: Option<String>,
    /// File holding the MQTT password (from `edgeloop broker add-device`;
    /// surrounding whitespace ignored); the user name is the device id.
    /// Without it the password is taken from the environment variable
    /// EDGELOOP_MQTT_PASSWORD, if set. There is no flag for the password
    /// itself: a command line is visible to every local user (`ps`).
    #[arg(long, env = "EDGELOOP_MQTT_PASSWORD_FILE")]
    password_file: Option<PathBuf>,
    /// Refused: see --password-file.
    #[arg(long, hide = true)]
    password: Option<String>,
    /// Readings per second: of the simulator, of --sysfs sampling, or of a
    /// --replay (instead of as fast as possible).
    #[arg(long, env = "EDGELOOP_RATE")]
    rate: Option<f64>,
    /// Stop after this many readings (once all are acknowledged).
    #[arg(long, env = "EDGELOOP_LIMIT")]
    limit: Option<u64>,
    /// Simulator seed.
    #[arg(long, env = "EDGELOOP_SEED")]
    seed: Option<u64>,
    /// Readings per MQTT message.
    #[arg(long, env = "EDGELOOP_BATCH_SIZE")]
    batch_size: Option<usize>,
    /// Directory of the device's spool (readings wait there until acknowledged).
    #[arg(long, env = "EDGELOOP_SPOOL_DIR")]
    spool_dir: Option<PathBuf>,
    /// Source: replay this CSV or JSON Lines file (`.jsonl`/`.ndjson`) instead
    /// of simulating; stops when the file ends and all is acknowledged.
    #[arg(long, env = "EDGELOOP_REPLAY", conflicts_with_all = ["stdin", "sysfs"])]
    replay: Option<PathBuf>,
    /// With --replay: keep the pace of the timestamps instead of going as fast as possible.
    #[arg(long, requires = "replay", conflicts_with = "rate")]
    realtime: bool,
    /// Source: read lines (CSV, or JSON Lines with --format json-lines) on stdin.
    #[arg(long, conflicts_with = "sysfs")]
    stdin: bool,
    /// Source: sample this machine's thermal zones and hwmon sensors (at --rate per second).
    #[arg(long)]
    sysfs: bool,
    /// Line format for --stdin (and --replay when the extension does not say).
    #[arg(long, value_enum)]
    format: Option<InputFormat>,
    /// The timestamp column/key of --replay and --stdin lines.
    #[arg(long, default_value = "ts")]
    ts_column: String,
    /// Channels to keep, comma-separated (needed for JSON Lines and CSV on stdin).
    #[arg(long, value_delimiter = ',')]
    channels: Vec<String>,
    /// Gateway mode: accept child devices on this MQTT address and relay
    /// their readings, acks and model topics (e.g. `0.0.0.0:1884`).
    #[arg(long, env = "EDGELOOP_GATEWAY_LISTEN")]
    gateway_listen: Option<SocketAddr>,
    /// Model updates: the Ed25519 public key file (64 hex digits, the
    /// `signing.pub` of `edgeloop keys generate`) that updates on
    /// models/+/{profile} must be signed with. Without it (or `[models]
    /// verify_key_file`) the agent takes no models and makes no predictions.
    #[arg(long, env = "EDGELOOP_MODELS_VERIFY_KEY")]
    models_verify_key: Option<PathBuf>,
    /// Serve /healthz, /readyz (200 while connected to the MQTT broker) and
    /// Prometheus /metrics on this address (e.g. 127.0.0.1:9466); see
    /// docs/operations.md.
    #[arg(long, env = "EDGELOOP_AGENT_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum InputFormat {
    Csv,
    JsonLines,
}

/// The agent's MQTT password: the contents of `file` (trimmed), else
/// `from_env` (EDGELOOP_MQTT_PASSWORD). Never from the command line, which
/// every local user can read in `ps`: `on_command_line` (a `--password`
/// flag, as earlier versions had) is refused, saying what to use instead.
fn agent_password(
    on_command_line: bool,
    file: Option<&Path>,
    from_env: Option<String>,
) -> Result<Option<String>> {
    anyhow::ensure!(
        !on_command_line,
        "--password is not accepted: a command line is visible to every local user (ps). \
         Put the password in a file readable only by the agent's user and pass \
         --password-file FILE (or EDGELOOP_MQTT_PASSWORD_FILE), or set EDGELOOP_MQTT_PASSWORD"
    );
    if let Some(file) = file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the MQTT password from {}", file.display()))?;
        let password = text.trim();
        anyhow::ensure!(
            !password.is_empty(),
            "{} is empty: no MQTT password in it",
            file.display()
        );
        return Ok(Some(password.to_string()));
    }
    Ok(from_env.filter(|p| !p.is_empty()))
}

/// A component's config: its TOML file, with every key overridable from
/// the environment (`EDGELOOP_{COMPONENT}__{KEY}`; see `config_env`).
fn read_config<T: serde::de::DeserializeOwned>(component: &str, path: Option<&Path>) -> Result<T> {
    config_env::load(component, path, std::env::vars())
}

fn split_host_port(s: &str) -> Result<(String, u16)> {
    let (host, port) = s
        .rsplit_once(':')
        .with_context(|| format!("{s:?} is not HOST:PORT"))?;
    let port = port
        .parse()
        .with_context(|| format!("{port:?} in {s:?} is not a port number"))?;
    Ok((host.to_string(), port))
}

/// A token cancelled on Ctrl-C or SIGTERM.
fn shutdown_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        t.cancel();
    });
    token
}

fn init_logging(format: LogFormat, filter: &str) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("--log {filter:?} is not a valid log filter"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log)?;
    let shutdown = shutdown_signal();
    match cli.command {
        Command::Up(args) => up::run(args, shutdown).await,
        Command::Chaos(args) => chaos::run(args, shutdown).await,
        Command::Bench(args) => bench::run(args, shutdown).await,
        Command::Broker(args) => {
            if let Some(BrokerCommand::AddDevice(args)) = args.command {
                return Ok(add_device::run(args, &mut std::io::stdout().lock())?);
            }
            let mut config: edgeloop_broker::BrokerConfig =
                read_config("broker", args.config.as_deref())?;
            if let Some(path) = args.credentials {
                config.auth.credentials_file = Some(path);
            }
            if args.allow_anonymous {
                config.auth.allow_anonymous = true;
            }
            if let Some(id) = args.replica_id {
                config.replica_id = Some(id);
            }
            if let Some(addr) = args.tls_listen {
                config.mqtt.tls_listen = Some(addr);
            }
            if let (Some(cert_file), Some(key_file)) = (args.tls_cert, args.tls_key) {
                config.tls = Some(edgeloop_broker::config::TlsConfig {
                    cert_file,
                    key_file,
                    client_ca_file: args.tls_client_ca,
                    require_client_cert: false,
                });
            }
            if let Some(listen) = args.listen {
                config.mqtt.listen = listen;
            }
            if let Some(kafka) = args.kafka {
                config.kafka.bootstrap_servers = kafka;
            }
            if let Some(c) = args.compression {
                config.bridge.compression = c;
            }
            if let Some(listen) = args.metrics_listen {
                config.metrics_listen = Some(listen);
            }
            let stats = Arc::new(edgeloop_broker::BrokerStats::default());
            edgeloop_broker::run(config, shutdown, CancellationToken::new(), stats).await?;
            // rumqttd's thread cannot be stopped; the process exit ends it.
            std::process::exit(0);
        }
        Command::Processor(args) => {
            let mut config: edgeloop_processor::ProcessorConfig =
                read_config("processor", args.config.as_deref())?;
            if let Some(kafka) = args.kafka {
                config.kafka.bootstrap_servers = kafka;
            }
            if let Some(g) = args.group_id {
                config.group_id = g;
            }
            if let Some(i) = args.instance_id {
                config.instance_id = Some(i);
            }
            if let Some(root) = args.parquet_root {
                config.parquet_root = root;
            }
            if let Some(rules) = args.rules {
                config.rules_file = Some(rules);
            }
            if let Some(timeout) = args.session_timeout {
                config.session_timeout = timeout;
            }
            if !args.channels.is_empty() {
                config.channels = args.channels;
            }
            if let Some(listen) = args.metrics_listen {
                config.metrics_listen = Some(listen);
            }
            if let Some(age) = args.max_age {
                config.sink.max_age = age;
            }
            if let Some(listen) = args.control_listen {
                config.control.listen = Some(listen);
            }
            if let Some(token) = args.control_token {
                config.control.token = Some(token);
            }
            if let Some(file) = args.control_token_file {
                config.control.token_file = Some(file);
            }
            if let Some(file) = args.control_signing_key_file {
                config.control.signing_key_file = Some(file);
            }
            if let Some(enabled) = args.trainer {
                config.trainer.enabled = enabled;
            }
            if let Some(dir) = args.trainer_dir {
                config.trainer.dir = dir;
            }
            if let Some(key) = args.trainer_signing_key_file {
                config.trainer.signing_key_file = Some(key);
            }
            let stats = Arc::new(edgeloop_processor::ProcessorStats::default());
            let result = edgeloop_processor::run(config, shutdown, stats.clone()).await;
            for line in stats.exit_summary() {
                tracing::info!("{line}");
            }
            Ok(result?)
        }
        Command::Report(args) => report::run(args),
        Command::Ctl(args) => ctl::run(args).await,
        Command::Keys(command) => ctl::keys(command),
        Command::Labels(LabelsCommand::Stats { parquet_root }) => {
            let summary = edgeloop_processor::labeller::stats::summarize(&parquet_root)?;
            print!("{}", edgeloop_processor::labeller::stats::table(&summary));
            Ok(())
        }
        Command::Labels(LabelsCommand::Check { file, channels }) => {
            match check::rules_summary(&file, &channels) {
                Ok(line) => {
                    println!("{}: {line}", file.display());
                    Ok(())
                }
                Err(e) => {
                    eprintln!("{}: refused: {e:#}", file.display());
                    std::process::exit(1);
                }
            }
        }
        Command::Check(args) => match check::check(&args.file, args.kind, std::env::vars()) {
            Ok(summary) => {
                println!("{summary}");
                Ok(())
            }
            Err(e) => {
                eprintln!("{}: refused: {e:#}", args.file.display());
                std::process::exit(1);
            }
        },
        Command::Spool(SpoolCommand::Inspect { dir }) => {
            let found = edgeloop_agent::spool::inspect::inspect(&dir)?;
            println!("{found}");
            Ok(())
        }
        Command::Spool(SpoolCommand::Check { dir, repair }) => {
            let found = edgeloop_agent::spool::inspect::inspect(&dir)?;
            println!("{found}");
            if repair && found.problems() > 0 {
                for event in edgeloop_agent::spool::inspect::repair(&dir)? {
                    println!("repaired: {event}");
                }
                let after = edgeloop_agent::spool::inspect::inspect(&dir)?;
                println!("after repair: {} problem(s)", after.problems());
                if after.problems() > 0 {
                    std::process::exit(1);
                }
            } else if found.problems() > 0 {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Agent(args) => {
            let mut config: edgeloop_agent::AgentConfig =
                read_config("agent", args.config.as_deref())?;
            if let Some(id) = args.device_id {
                config.device_id = id;
            }
            if let Some(p) = args.profile {
                config.profile = p;
            }
            if let Some(mqtt) = args.mqtt {
                let mut servers = mqtt.split(',').map(str::trim);
                (config.mqtt.host, config.mqtt.port) =
                    split_host_port(servers.next().unwrap_or_default())?;
                config.mqtt.fallback_servers = servers.map(str::to_string).collect();
            }
            if let Some(password) = agent_password(
                args.password.is_some(),
                args.password_file.as_deref(),
                std::env::var("EDGELOOP_MQTT_PASSWORD").ok(),
            )? {
                config.mqtt.username = Some(config.device_id.clone());
                config.mqtt.password = Some(password);
            }
            if let Some(b) = args.batch_size {
                config.uplink.batch_size = b;
            }
            if let Some(dir) = args.spool_dir {
                config.spool.dir = dir;
            }
            if let Some(listen) = args.gateway_listen {
                config.gateway.get_or_insert_with(Default::default).listen = listen;
            }
            if let Some(key) = args.models_verify_key {
                config.models.verify_key_file = Some(key);
            }
            if let Some(listen) = args.metrics_listen {
                config.metrics_listen = Some(listen);
            }
            use edgeloop_agent::config::SourceConfig;
            use edgeloop_agent::source::lines::{LineFormat, LinesConfig};
            let lines = |path: Option<PathBuf>| {
                let json = args.format == Some(InputFormat::JsonLines)
                    || path
                        .as_ref()
                        .and_then(|p| p.extension())
                        .is_some_and(|e| e == "jsonl" || e == "ndjson" || e == "json");
                LinesConfig {
                    path,
                    format: if json {
                        LineFormat::JsonLines
                    } else {
                        LineFormat::Csv
                    },
                    ts_column: args.ts_column.clone(),
                    channels: args.channels.clone(),
                    realtime: args.realtime,
                    rate_hz: None,
                }
            };
            if let Some(file) = args.replay.clone() {
                config.source = SourceConfig::Replay(lines(Some(file)));
            } else if args.stdin {
                config.source = SourceConfig::Stdin(lines(None));
            } else if args.sysfs {
                config.source = SourceConfig::Sysfs(Default::default());
            }
            match &mut config.source {
                SourceConfig::Simulator(sim) => {
                    if let Some(rate) = args.rate {
                        sim.rate_hz = rate;
                    }
                    if let Some(limit) = args.limit {
                        sim.limit = Some(limit);
                    }
                    if let Some(seed) = args.seed {
                        sim.seed = seed;
                    }
                }
                SourceConfig::Sysfs(sys) => {
                    if let Some(rate) = args.rate {
                        sys.rate_hz = rate;
                    }
                }
                SourceConfig::Replay(lines) => {
                    if args.rate.is_some() {
                        lines.rate_hz = args.rate;
                    }
                }
                SourceConfig::Stdin(_) => {}
            }
            let stats = Arc::new(edgeloop_agent::AgentStats::default());
            let report = edgeloop_agent::run(config, shutdown, stats.clone()).await?;
            let bad = edgeloop_agent::AgentStats::get(&stats.bad_lines);
            if bad > 0 {
                println!("{bad} bad lines skipped");
            }
            if report.committed_seq < report.next_seq {
                println!(
                    "stopped with readings {}..{} unacknowledged; they stay in the spool and are sent on the next start",
                    report.committed_seq, report.next_seq
                );
                return Ok(());
            }
            println!("{} readings taken, all acknowledged", report.next_seq);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_takes_its_password_from_a_file_or_the_environment_never_the_command_line(
    ) -> Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("password");
        std::fs::write(&file, "s3cret\n")?;
        assert_eq!(
            agent_password(false, Some(&file), Some("env".into()))?,
            Some("s3cret".into())
        );
        assert_eq!(
            agent_password(false, None, Some("env".into()))?,
            Some("env".into())
        );
        assert_eq!(agent_password(false, None, None)?, None);
        let refused = agent_password(true, Some(&file), None)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("--password-file"), "{refused}");
        std::fs::write(&file, "  \n")?;
        assert!(agent_password(false, Some(&file), None).is_err());
        Ok(())
    }
}
