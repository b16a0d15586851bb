//! `edgeloop chaos`: the chaos soak. It starts a whole stack under a work
//! directory, every part its own child process (Apache Kafka, one KRaft node or three,
//! `edgeloop broker`, `edgeloop processor`, one `edgeloop agent` per
//! device, each device behind a link proxy of its own), injects faults at
//! seeded random times for a set duration, then lets the system recover and
//! checks, from the devices' spools and the Parquet data set, that every
//! reading a device fsynced landed exactly once or is explained by a loss
//! report.
//!
//! - `process`: a child process that can be SIGKILLed and started again;
//! - `proxy`: a device's link, which can be cut;
//! - `verify`: the devices' records against the data set, and the counts.

mod locate;
mod process;
mod proxy;
mod verify;

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use edgeloop_agent::AgentConfig;
use edgeloop_kafka::local::{KafkaInstall, LocalKafka, LocalKafkaOptions};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use process::Proc;
use proxy::Link;
use verify::{Counts, DeviceCounts, DeviceRecord};

#[derive(clap::Args, Debug)]
#[command(
    long_about = "The chaos soak. Starts a whole stack under --data-dir, each part its own child \
                  process: Apache Kafka (one KRaft node, or three with --kafka-nodes 3), `edgeloop broker`, `edgeloop processor` and one \
                  `edgeloop agent` per device, every device reaching the broker through a link \
                  proxy of its own. For --duration it injects faults at random times from a \
                  seeded RNG (the seed is printed; --seed replays the schedule): SIGKILL and \
                  restart of the broker, the processor, a Kafka node (with three, the leader of a readings partition as often as not), all of them at once, or a random agent; \
                  a device's link \
                  cut for a while; and the small spool of device 0 filled by a long cut, so that \
                  it evicts and reports the loss.\n\n\
                  Then it stops the faults, stops the agents cleanly (each sends what it holds \
                  until acknowledged), waits for the data set to hold what was acknowledged, stops \
                  the rest and checks: every reading a device fsynced is in the readings table \
                  exactly once or covered by a row of the losses table; no (device_id, seq) twice; \
                  every spool drained. It prints the counts (--json for a machine) and exits with \
                  status 1 if any invariant fails. docs/operations.md describes it."
)]
pub struct ChaosArgs {
    /// How long faults are injected, e.g. `2m`, `1h`.
    #[arg(long, env = "EDGELOOP_CHAOS_DURATION", default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Simulated devices, each its own `edgeloop agent` process and spool.
    #[arg(long, env = "EDGELOOP_CHAOS_DEVICES", default_value_t = 4)]
    devices: usize,
    /// Readings per second of each device.
    #[arg(long, env = "EDGELOOP_CHAOS_RATE", default_value_t = 20.0)]
    rate: f64,
    /// Readings per MQTT message.
    #[arg(long, env = "EDGELOOP_CHAOS_BATCH_SIZE", default_value_t = 10)]
    batch_size: usize,
    /// Seed of the fault schedule (default: from the clock; printed either way).
    #[arg(long, env = "EDGELOOP_CHAOS_SEED")]
    seed: Option<u64>,
    /// Work directory (must not exist or be empty): DIR/parquet (the data
    /// set), DIR/kafka (Kafka's storage and logs), DIR/spool/{device},
    /// DIR/agents/{device}.toml, DIR/logs/*.log, DIR/report.json.
    #[arg(long, env = "EDGELOOP_CHAOS_DATA_DIR", default_value = "chaos-data")]
    data_dir: PathBuf,
    /// Shortest pause between two faults.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    min_gap: Duration,
    /// Longest pause between two faults.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    max_gap: Duration,
    /// Longest time a killed part stays down before it is restarted (and the
    /// longest ordinary link cut is 4 times this).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    max_down: Duration,
    /// How long device 0's link is cut to fill its small spool.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    fill_cut: Duration,
    /// Spool size cap of device 0 in bytes (the others keep the default).
    #[arg(long, default_value_t = 16384)]
    small_spool_bytes: u64,
    /// After the faults stop: how long the agents may take to get everything
    /// acknowledged, and then the processor to write it.
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    recovery_timeout: Duration,
    /// Print the report as JSON on stdout (progress goes to stderr).
    #[arg(long)]
    json: bool,
    /// Start nothing: check the work directory of an earlier run again
    /// (its spools under DIR/spool/ against DIR/parquet) and print the counts.
    #[arg(long)]
    verify_only: bool,
    /// Kafka nodes, 1 to 5: 1 (a single KRaft node, killed whole) or 3 (a
    /// KRaft cluster on loopback: topics with replication factor 3,
    /// `min.insync.replicas=2`, no unclean leader election; one node at a
    /// time is killed, the leader of a readings partition as often as not).
    #[arg(long, env = "EDGELOOP_CHAOS_KAFKA_NODES", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5))]
    kafka_nodes: u32,
    /// Broker replicas, 1 to 5. With more than one, every device has a link
    /// to each and lists them all (mqtt.fallback_servers, device i starting
    /// on replica i mod N); `kill_broker` kills one replica (its devices move
    /// to the others), and `roll_brokers` restarts every replica in turn,
    /// SIGTERM and start, as a rolling update does.
    #[arg(long, env = "EDGELOOP_CHAOS_BROKERS", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=5))]
    brokers: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
enum Fault {
    KillBroker,
    RollBrokers,
    KillProcessor,
    KillKafka,
    KillAgent,
    CutLink,
    FillSpool,
    KillCloud,
}

/// The consumer group of the soak's processor.
const PROCESSOR_GROUP: &str = "edgeloop-chaos";

/// Partitions of the topics the soak's broker and processor create.
const KAFKA_PARTITIONS: i32 = 4;

const FAULTS: [Fault; 8] = [
    Fault::KillBroker,
    Fault::RollBrokers,
    Fault::KillProcessor,
    Fault::KillKafka,
    Fault::KillAgent,
    Fault::CutLink,
    Fault::FillSpool,
    Fault::KillCloud,
];

/// The faults of a soak with `brokers` broker replicas: a rolling restart
/// needs more than one.
fn faults(brokers: u32) -> Vec<Fault> {
    FAULTS
        .into_iter()
        .filter(|f| *f != Fault::RollBrokers || brokers > 1)
        .collect()
}

#[derive(Debug, Clone, Serialize)]
struct FaultEvent {
    /// Seconds since the faults began.
    at_s: f64,
    fault: Fault,
    /// The device, for agent and link faults.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    /// The Kafka node killed (node ids from 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    kafka_node: Option<u32>,
    /// The broker replica killed (from 0), with several.
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<usize>,
    /// How long the part was down or the link cut.
    down_s: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    duration_s: f64,
    devices: usize,
    brokers: u32,
    rate: f64,
    faults: BTreeMap<Fault, u64>,
    fault_log: Vec<FaultEvent>,
    /// Connections the link proxies closed or blackholed.
    connections_severed: u64,
    /// From the end of the faults until every agent had stopped with
    /// everything acknowledged.
    agents_drained_s: f64,
    /// From then until the data set held every acknowledged reading.
    dataset_complete_s: f64,
    #[serde(flatten)]
    counts: Counts,
    parquet_files: usize,
    per_device: Vec<DeviceCounts>,
    /// Everything that went wrong besides the counts (a part that crashed by
    /// itself or did not come back, an agent that did not drain).
    problems: Vec<String>,
    /// For the first readings lost unexplained of each device: whether
    /// Kafka holds them, and where the processor's group committed (empty
    /// when none was lost).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    lost_unexplained_located: Vec<String>,
    /// Every invariant that failed (empty: the run passed).
    failures: Vec<String>,
    passed: bool,
}

fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// Polls until something listens on `addr`, up to `limit`.
async fn wait_listening(addr: SocketAddr, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

/// Progress and fault lines: stdout, or stderr under --json.
struct Out {
    json: bool,
}

impl Out {
    fn line(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

struct Stack {
    kafka: LocalKafka,
    /// The broker replicas and their MQTT addresses.
    brokers: Vec<Proc>,
    mqtt: Vec<SocketAddr>,
    processor: Proc,
    agents: Vec<Proc>,
    device_ids: Vec<String>,
    spools: Vec<PathBuf>,
    /// Per device, its link to each broker replica.
    links: Vec<Vec<Link>>,
    problems: Vec<String>,
}

impl Stack {
    /// Restarts broker replica `i` and waits until its MQTT listener is
    /// open (it opens only after the acks and models are restored from
    /// Kafka).
    async fn start_broker(&mut self, i: usize) {
        if let Err(e) = self.brokers[i].start() {
            self.problems.push(format!("{e:#}"));
            return;
        }
        // It waits up to 2 minutes for Kafka to answer at start-up.
        if !wait_listening(self.mqtt[i], Duration::from_secs(150)).await {
            self.brokers[i].note_exit();
            self.problems.push(format!(
                "{} did not listen within 150 s of a restart",
                self.brokers[i].name
            ));
        }
    }

    /// Every broker replica started again, one after another.
    async fn start_brokers(&mut self) {
        for i in 0..self.brokers.len() {
            self.start_broker(i).await;
        }
    }

    /// A rolling restart: each replica in turn gets SIGTERM, must stop
    /// cleanly, and is started again and listening before the next one.
    async fn roll_brokers(&mut self) {
        for i in 0..self.brokers.len() {
            match self.brokers[i].terminate(Duration::from_secs(30)).await {
                Ok(status) if status.success() => {}
                Ok(status) => self.problems.push(format!(
                    "{} stopped with {status} after SIGTERM in a rolling restart",
                    self.brokers[i].name
                )),
                Err(e) => self.problems.push(format!("{e:#}")),
            }
            self.start_broker(i).await;
        }
    }

    /// Cuts (or restores) every link of device `i`.
    fn cut_links(&self, i: usize, cut: bool) {
        for link in &self.links[i] {
            if cut {
                link.cut();
            } else {
                link.restore();
            }
        }
    }

    async fn start_kafka(&mut self) {
        if let Err(e) = self.kafka.start_again().await {
            self.problems
                .push(format!("Kafka did not come back after a kill: {e}"));
        }
    }

    /// The Kafka node to kill: with several, the leader of a random
    /// partition of the readings topic half the time, else a random node.
    fn kafka_victim(&self, rng: &mut ChaCha8Rng) -> u32 {
        let ids = self.kafka.node_ids();
        if ids.len() > 1 && rng.gen_bool(0.5) {
            let partition = rng.gen_range(0..KAFKA_PARTITIONS);
            if let Some(leader) = self
                .kafka
                .leader(edgeloop_proto::topics::KAFKA_READINGS, partition)
            {
                return leader;
            }
        }
        ids.choose(rng).copied().unwrap_or(1)
    }

    fn spool_totals(&self) -> (u64, u64) {
        self.device_ids
            .iter()
            .zip(&self.spools)
            .filter_map(|(id, dir)| verify::device_record(id, dir).ok())
            .fold((0, 0), |(n, a), d| {
                (n + d.next_seq, a + d.acked.min(d.next_seq))
            })
    }

    /// Records parts that exited by themselves and starts every part that
    /// is not running again (the agents too unless `agents` is false: at the
    /// end they are stopped on purpose).
    async fn revive(&mut self, agents: bool) {
        let exited: Vec<u32> = self
            .kafka
            .node_ids()
            .into_iter()
            .filter(|&id| !self.kafka.running(id))
            .collect();
        if !exited.is_empty() {
            self.problems
                .push(format!("Kafka node(s) {exited:?} had exited by themselves"));
            self.start_kafka().await;
        }
        for i in 0..self.brokers.len() {
            if self.brokers[i].note_exit() || !self.brokers[i].running() {
                self.start_broker(i).await;
            }
        }
        if self.processor.note_exit() || !self.processor.running() {
            if let Err(e) = self.processor.start() {
                self.problems.push(format!("{e:#}"));
            }
        }
        if agents {
            for agent in &mut self.agents {
                if agent.note_exit() || !agent.running() {
                    if let Err(e) = agent.start() {
                        self.problems.push(format!("{e:#}"));
                    }
                }
            }
        }
    }
}

pub async fn run(args: ChaosArgs, shutdown: CancellationToken) -> Result<()> {
    if args.devices == 0 {
        bail!("--devices: at least one device is needed");
    }
    if args.rate.is_nan() || args.rate <= 0.0 {
        bail!("--rate: must be more than 0 readings per second");
    }
    if args.min_gap > args.max_gap || args.max_gap.is_zero() {
        bail!("--min-gap must not exceed --max-gap, and --max-gap must be more than 0");
    }
    let dir = std::path::absolute(&args.data_dir).context("resolving --data-dir")?;
    if args.verify_only {
        return verify_only(&dir, args.json);
    }
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("reading --data-dir {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "--data-dir {} is not empty: the soak checks a fresh stack, so give it a new \
             directory (or remove this one)",
            dir.display()
        );
    }
    for sub in ["kafka", "logs", "agents", "spool", "parquet", "broker"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    let out = Out { json: args.json };
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    out.line(&format!(
        "chaos: seed {seed} (replay the schedule with --seed {seed}); {} devices at {}/s for {}; work dir {}",
        args.devices,
        args.rate,
        humantime::format_duration(args.duration),
        dir.display()
    ));
    let bin = std::env::current_exe().context("finding the edgeloop binary")?;

    // Kafka: one KRaft node, or a cluster whose topics are replicated to
    // three nodes with two in sync for a write (server defaults set by
    // edgeloop_kafka::local; the topics' replication factor below).
    let install = KafkaInstall::locate(|k| std::env::var_os(k))?;
    let kafka = LocalKafka::start(
        &install,
        &LocalKafkaOptions {
            nodes: args.kafka_nodes,
            ..LocalKafkaOptions::single(&dir.join("kafka"))
        },
    )
    .await?;
    out.line(&format!(
        "chaos: Apache Kafka, {} KRaft node(s) on {}; logs under {}",
        args.kafka_nodes,
        kafka.bootstrap(),
        dir.join("kafka").display()
    ));
    // Broker and processor create the topics with this replication factor.
    let kafka_toml = dir.join("kafka.toml");
    std::fs::write(
        &kafka_toml,
        format!(
            "[kafka]\npartitions = {KAFKA_PARTITIONS}\nreplication_factor = {}\n",
            args.kafka_nodes.min(3)
        ),
    )
    .with_context(|| format!("writing {}", kafka_toml.display()))?;
    let bootstrap = kafka.bootstrap();

    // Device identities.
    let device_ids: Vec<String> = (0..args.devices).map(|i| format!("chaos-{i:04}")).collect();
    let credentials = dir.join("broker/credentials.toml");
    let passwords: BTreeMap<String, String> =
        edgeloop_broker::gate::credentials::CredentialsFile::add(
            &credentials,
            &device_ids,
            edgeloop_broker::gate::acl::Role::Device,
            &[],
        )?
        .into_iter()
        .collect();

    // The broker replicas: `broker` (logs/broker.log) alone, or
    // `broker-0`, `broker-1`, … each with its replica id.
    let replicas = args.brokers as usize;
    let mut brokers = Vec::new();
    let mut mqtt = Vec::new();
    for i in 0..replicas {
        let name = if replicas == 1 {
            "broker".to_string()
        } else {
            format!("broker-{i}")
        };
        let listen = free_addr()?;
        let mut broker_args = vec![
            "broker".into(),
            "--config".into(),
            kafka_toml.clone().into(),
            "--listen".into(),
            listen.to_string().into(),
            "--kafka".into(),
            bootstrap.clone().into(),
            "--credentials".into(),
            credentials.clone().into(),
        ];
        if replicas > 1 {
            broker_args.extend(os(&["--replica-id", &format!("chaos-{name}")]));
        }
        let log = dir.join(format!("logs/{name}.log"));
        let mut broker = Proc::new(&name, &bin, broker_args, log.clone());
        broker.start()?;
        if !wait_listening(listen, Duration::from_secs(90)).await {
            bail!(
                "{name} did not listen on {listen} within 90 s; see {}",
                log.display()
            );
        }
        brokers.push(broker);
        mqtt.push(listen);
    }
    let mut processor_args = os(&["processor", "--config"]);
    processor_args.push(kafka_toml.clone().into());
    processor_args.extend(os(&[
        "--kafka",
        &bootstrap,
        "--group-id",
        PROCESSOR_GROUP,
        "--instance-id",
        "chaos-0",
        "--max-age",
        "2s",
        "--parquet-root",
    ]));
    processor_args.push(dir.join("parquet").into());
    let mut processor = Proc::new(
        "processor",
        &bin,
        processor_args,
        dir.join("logs/processor.log"),
    );
    processor.start()?;

    let links_stop = CancellationToken::new();
    let _stop_links = links_stop.clone().drop_guard();
    let mut links = Vec::new();
    let mut agents = Vec::new();
    let mut spools = Vec::new();
    for (i, id) in device_ids.iter().enumerate() {
        // A link to each replica; device i starts on replica i mod N and
        // lists the others after it.
        let mut device_links = Vec::new();
        for addr in &mqtt {
            device_links.push(Link::start(*addr, links_stop.clone()).await?);
        }
        let mut config = AgentConfig {
            device_id: id.clone(),
            ..AgentConfig::default()
        };
        let through: Vec<(String, u16)> = device_links
            .iter()
            .map(|l| (l.addr.ip().to_string(), l.addr.port()))
            .collect();
        config.mqtt.spread_over(&through, i);
        config.mqtt.username = Some(id.clone());
        config.mqtt.password = passwords.get(id).cloned();
        // A dead link is noticed within a few seconds.
        config.mqtt.keep_alive = Duration::from_secs(5);
        config.uplink.batch_size = args.batch_size;
        config.uplink.resend_after = Duration::from_secs(5);
        config.shutdown_grace = args.recovery_timeout;
        config.spool.dir = dir.join("spool").join(id);
        if i == 0 {
            config.spool.segment_bytes = 4096;
            config.spool.max_bytes = args.small_spool_bytes.max(8192);
        }
        if let edgeloop_agent::config::SourceConfig::Simulator(sim) = &mut config.source {
            sim.rate_hz = args.rate;
            sim.seed = i as u64 + 1;
        }
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("agent config of {id}: {e}"))?;
        let file = dir.join("agents").join(format!("{id}.toml"));
        // It holds the device's MQTT password.
        edgeloop_broker::gate::credentials::write_private(
            &file,
            toml::to_string(&config)?.as_bytes(),
        )
        .with_context(|| format!("writing {}", file.display()))?;
        let mut agent = Proc::new(
            id,
            &bin,
            vec!["agent".into(), "--config".into(), file.into()],
            dir.join("logs").join(format!("{id}.log")),
        );
        agent.start()?;
        agents.push(agent);
        links.push(device_links);
        spools.push(config.spool.dir.clone());
    }
    let mut stack = Stack {
        kafka,
        brokers,
        mqtt,
        processor,
        agents,
        device_ids,
        spools,
        links,
        problems: Vec::new(),
    };

    // Faults.
    let start = Instant::now();
    let end = start + args.duration;
    let mut log: Vec<FaultEvent> = Vec::new();
    // Every kind once first (in a seeded order), then at random.
    let kinds = faults(args.brokers);
    let mut first_round: Vec<Fault> = kinds.clone();
    first_round.shuffle(&mut rng);
    first_round.reverse();
    let mut cut_until: Vec<Option<Instant>> = vec![None; stack.links.len()];
    let gap = |rng: &mut ChaCha8Rng| {
        Duration::from_secs_f64(
            rng.gen_range(args.min_gap.as_secs_f64()..=args.max_gap.as_secs_f64()),
        )
    };
    let down = |rng: &mut ChaCha8Rng, max: Duration| {
        Duration::from_secs_f64(rng.gen_range(0.0..=max.as_secs_f64()))
    };
    let mut next_fault = Instant::now() + gap(&mut rng);
    let mut next_progress = Instant::now() + Duration::from_secs(10);
    loop {
        let now = Instant::now();
        for (i, until) in cut_until.iter_mut().enumerate() {
            if until.is_some_and(|u| u <= now) {
                stack.cut_links(i, false);
                *until = None;
            }
        }
        if now >= end || shutdown.is_cancelled() {
            break;
        }
        if now >= next_progress {
            let (taken, acked) = stack.spool_totals();
            out.line(&format!(
                "{:>7.1}s  readings fsynced {taken:>8}  acknowledged {acked:>8}  faults {}",
                start.elapsed().as_secs_f64(),
                log.len()
            ));
            next_progress = now + Duration::from_secs(10);
        }
        if now >= next_fault {
            stack.revive(true).await;
            let fault = match first_round.pop() {
                Some(f) => f,
                None => kinds[rng.gen_range(0..kinds.len())],
            };
            let at_s = start.elapsed().as_secs_f64();
            let mut device = None;
            let mut kafka_node = None;
            let mut broker = None;
            let downtime;
            match fault {
                Fault::KillBroker => {
                    downtime = down(&mut rng, args.max_down);
                    let i = rng.gen_range(0..stack.brokers.len());
                    broker = (replicas > 1).then_some(i);
                    stack.brokers[i].kill9().await;
                    tokio::time::sleep(downtime).await;
                    stack.start_broker(i).await;
                }
                Fault::RollBrokers => {
                    let began = Instant::now();
                    stack.roll_brokers().await;
                    downtime = began.elapsed();
                }
                Fault::KillProcessor => {
                    downtime = down(&mut rng, args.max_down);
                    stack.processor.kill9().await;
                    tokio::time::sleep(downtime).await;
                    stack.processor.start()?;
                }
                Fault::KillKafka => {
                    downtime = down(&mut rng, args.max_down * 2);
                    let node = stack.kafka_victim(&mut rng);
                    kafka_node = Some(node);
                    stack.kafka.kill_node(node).await;
                    tokio::time::sleep(downtime).await;
                    if let Err(e) = stack.kafka.start_node(node).await {
                        stack
                            .problems
                            .push(format!("Kafka node {node} did not come back: {e}"));
                    }
                }
                Fault::KillAgent => {
                    downtime = down(&mut rng, args.max_down);
                    let i = rng.gen_range(0..stack.agents.len());
                    device = Some(stack.device_ids[i].clone());
                    stack.agents[i].kill9().await;
                    tokio::time::sleep(downtime).await;
                    stack.agents[i].start()?;
                }
                Fault::KillCloud => {
                    // The whole cloud side at once (a power cut of its
                    // host); back in dependency order.
                    downtime = down(&mut rng, args.max_down);
                    stack.processor.kill9().await;
                    for broker in &mut stack.brokers {
                        broker.kill9().await;
                    }
                    stack.kafka.kill_keeping_storage().await;
                    tokio::time::sleep(downtime).await;
                    stack.start_kafka().await;
                    stack.start_brokers().await;
                    stack.processor.start()?;
                }
                Fault::CutLink | Fault::FillSpool => {
                    let i = if fault == Fault::FillSpool {
                        0
                    } else {
                        rng.gen_range(0..stack.links.len())
                    };
                    downtime = if fault == Fault::FillSpool {
                        args.fill_cut
                    } else {
                        down(&mut rng, args.max_down * 4)
                    };
                    device = Some(stack.device_ids[i].clone());
                    stack.cut_links(i, true);
                    let until = Instant::now() + downtime;
                    cut_until[i] = Some(cut_until[i].map_or(until, |u| u.max(until)));
                }
            }
            let event = FaultEvent {
                at_s,
                fault,
                device,
                kafka_node,
                broker,
                down_s: downtime.as_secs_f64(),
            };
            out.line(&format!(
                "{:>7.1}s  {:?}{} for {:.1}s",
                event.at_s,
                event.fault,
                event
                    .device
                    .as_deref()
                    .map(|d| format!(" {d}"))
                    .or(event.kafka_node.map(|n| format!(" node {n}")))
                    .or(event.broker.map(|b| format!(" replica {b}")))
                    .unwrap_or_default(),
                event.down_s
            ));
            log.push(event);
            next_fault = Instant::now() + gap(&mut rng);
        }
        let wake = cut_until
            .iter()
            .flatten()
            .copied()
            .chain([next_fault, next_progress, end])
            .min()
            .unwrap_or(end);
        tokio::select! {
            _ = tokio::time::sleep_until(wake) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    // No new faults; link cuts in progress (a spool being filled) run their
    // course unless the soak was interrupted.
    let last_cut = cut_until.iter().flatten().copied().max();
    if let Some(until) = last_cut.filter(|_| !shutdown.is_cancelled()) {
        out.line(&format!(
            "{:>7.1}s  no new faults; waiting {:.1}s for the link cuts in progress to end",
            start.elapsed().as_secs_f64(),
            until
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
        ));
        tokio::select! {
            _ = tokio::time::sleep_until(until) => {}
            _ = shutdown.cancelled() => {}
        }
    }
    // Recovery: every link back, every part running, then the agents stop
    // cleanly: each stops taking readings and sends what it holds until it
    // is acknowledged (or the recovery time runs out).
    for i in 0..stack.links.len() {
        stack.cut_links(i, false);
    }
    stack.revive(true).await;
    out.line(&format!(
        "{:>7.1}s  faults over ({} injected); links restored, agents stopping: they send what they hold",
        start.elapsed().as_secs_f64(),
        log.len()
    ));
    let recovery_start = Instant::now();
    for agent in &mut stack.agents {
        agent.sigterm().await?;
    }
    let agents_deadline = recovery_start + args.recovery_timeout + Duration::from_secs(15);
    for agent in &mut stack.agents {
        if let Err(e) = agent.wait(agents_deadline).await {
            stack.problems.push(format!("{e:#}"));
        }
    }
    let agents_drained = recovery_start.elapsed();
    let records: Vec<DeviceRecord> = stack
        .device_ids
        .iter()
        .zip(&stack.spools)
        .map(|(id, dir)| verify::device_record(id, dir))
        .collect::<Result<_>>()?;
    out.line(&format!(
        "{:>7.1}s  agents stopped after {:.1}s; waiting for the data set to hold every acknowledged reading",
        start.elapsed().as_secs_f64(),
        agents_drained.as_secs_f64()
    ));

    // The processor writes what Kafka holds; wait until every acknowledged
    // reading is in the data set (or the recovery time runs out).
    let dataset_start = Instant::now();
    let dataset_deadline = dataset_start + args.recovery_timeout;
    let parquet = dir.join("parquet");
    loop {
        stack.revive(false).await;
        let data = verify::read_dataset(&parquet)?;
        let (counts, _) = verify::verify(&records, &data);
        if counts.lost_unexplained == 0 || Instant::now() >= dataset_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let dataset_complete = dataset_start.elapsed();
    // Readings still missing: ask Kafka, while it runs, whether it holds
    // them and where the processor's group stands.
    let located = {
        let data = verify::read_dataset(&parquet)?;
        let (counts, per_device) = verify::verify(&records, &data);
        if counts.lost_unexplained == 0 {
            Vec::new()
        } else {
            let missing: BTreeMap<String, Vec<u64>> = per_device
                .iter()
                .filter(|d| !d.first_unexplained.is_empty())
                .map(|d| (d.device_id.clone(), d.first_unexplained.clone()))
                .collect();
            let bootstrap = stack.kafka.bootstrap();
            tokio::task::spawn_blocking(move || {
                locate::locate(&bootstrap, PROCESSOR_GROUP, &missing)
            })
            .await?
            .unwrap_or_else(|e| vec![format!("could not ask Kafka: {e:#}")])
        }
    };
    for line in &located {
        out.line(&format!("  lost unexplained: {line}"));
    }

    // Stop the rest in order: processor (closes its files), broker, Kafka.
    for part in std::iter::once(&mut stack.processor).chain(&mut stack.brokers) {
        part.note_exit();
        if part.running() {
            match part.terminate(Duration::from_secs(60)).await {
                Ok(status) if status.success() => {}
                Ok(status) => stack
                    .problems
                    .push(format!("{} stopped with {status} after SIGTERM", part.name)),
                Err(e) => stack.problems.push(format!("{e:#}")),
            }
        }
    }
    stack
        .kafka
        .stop_keeping_storage(Duration::from_secs(30))
        .await;
    for agent in &stack.agents {
        stack
            .problems
            .extend(agent.unexpected_exits.iter().cloned());
    }
    for broker in &stack.brokers {
        stack
            .problems
            .extend(broker.unexpected_exits.iter().cloned());
    }
    stack
        .problems
        .extend(stack.processor.unexpected_exits.iter().cloned());

    let data = verify::read_dataset(&parquet)?;
    let (counts, per_device) = verify::verify(&records, &data);
    if shutdown.is_cancelled() {
        stack
            .problems
            .push("interrupted by a signal before --duration ended".into());
    }
    let mut failures = counts.failures();
    failures.extend(stack.problems.iter().cloned());
    let mut faults: BTreeMap<Fault, u64> = kinds.iter().map(|f| (*f, 0)).collect();
    for e in &log {
        *faults.entry(e.fault).or_default() += 1;
    }
    let report = Report {
        seed,
        duration_s: args.duration.as_secs_f64(),
        devices: args.devices,
        brokers: args.brokers,
        rate: args.rate,
        faults,
        fault_log: log,
        connections_severed: stack
            .links
            .iter()
            .flatten()
            .map(|l| l.severed.load(std::sync::atomic::Ordering::Relaxed))
            .sum(),
        agents_drained_s: agents_drained.as_secs_f64(),
        dataset_complete_s: dataset_complete.as_secs_f64(),
        counts,
        parquet_files: data.files,
        per_device,
        problems: stack.problems.clone(),
        lost_unexplained_located: located,
        passed: failures.is_empty(),
        failures,
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(dir.join("report.json"), &json)
        .with_context(|| format!("writing {}", dir.join("report.json").display()))?;
    if args.json {
        println!("{json}");
    } else {
        print_summary(&report, &dir);
    }
    if !report.passed {
        bail!(
            "chaos soak failed (seed {}): {}",
            report.seed,
            report.failures.join("; ")
        );
    }
    Ok(())
}

/// `--verify-only`: the counts of an earlier run's work directory, every
/// spool under DIR/spool/ against DIR/parquet.
fn verify_only(dir: &Path, json: bool) -> Result<()> {
    let spool_root = dir.join("spool");
    let mut records = Vec::new();
    let entries = std::fs::read_dir(&spool_root).with_context(|| {
        format!(
            "--verify-only: {} has no spool/ directory; is it the work directory of a chaos run?",
            dir.display()
        )
    })?;
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for spool in dirs {
        let id = spool
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        records.push(verify::device_record(&id, &spool)?);
    }
    let data = verify::read_dataset(&dir.join("parquet"))?;
    let (counts, per_device) = verify::verify(&records, &data);
    let failures = counts.failures();
    #[derive(Serialize)]
    struct Verified<'a> {
        #[serde(flatten)]
        counts: &'a Counts,
        parquet_files: usize,
        per_device: &'a [DeviceCounts],
        failures: &'a [String],
        passed: bool,
    }
    let verified = Verified {
        counts: &counts,
        parquet_files: data.files,
        per_device: &per_device,
        failures: &failures,
        passed: failures.is_empty(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&verified)?);
    } else {
        print_counts(&counts, &per_device);
    }
    if !failures.is_empty() {
        bail!(
            "the data set under {} fails: {}",
            dir.display(),
            failures.join("; ")
        );
    }
    Ok(())
}

fn print_counts(c: &Counts, per_device: &[DeviceCounts]) {
    println!(
        "readings offered {}  landed {}  duplicated {}  lost-and-reported {}  lost-unexplained {}  \
         still spooled {}  (reported but landed {}, unexpected rows {}, pending loss reports {}, \
         spool problems {}, undrained devices {})",
        c.offered,
        c.landed,
        c.duplicated,
        c.lost_and_reported,
        c.lost_unexplained,
        c.still_spooled,
        c.reported_but_landed,
        c.unexpected_rows,
        c.pending_loss_reports,
        c.spool_problems,
        c.undrained_devices
    );
    for d in per_device {
        println!(
            "  {}: offered {} landed {} duplicated {} lost-and-reported {} lost-unexplained {}{}",
            d.device_id,
            d.counts.offered,
            d.counts.landed,
            d.counts.duplicated,
            d.counts.lost_and_reported,
            d.counts.lost_unexplained,
            if d.first_unexplained.is_empty() {
                String::new()
            } else {
                format!(" (first {:?})", d.first_unexplained)
            }
        );
    }
}

fn print_summary(r: &Report, dir: &Path) {
    let faults: Vec<String> = r.faults.iter().map(|(f, n)| format!("{f:?} {n}")).collect();
    println!(
        "faults: {} ({} connections severed)",
        faults.join(", "),
        r.connections_severed
    );
    println!(
        "recovery: agents drained {:.1}s after the faults stopped; the data set was complete {:.1}s later",
        r.agents_drained_s, r.dataset_complete_s
    );
    print_counts(&r.counts, &r.per_device);
    if r.passed {
        println!(
            "PASSED: every fsynced reading landed once or is explained by a loss report (seed {}; report in {})",
            r.seed,
            dir.join("report.json").display()
        );
    } else {
        println!("FAILED (seed {}):", r.seed);
        for f in &r.failures {
            println!("  - {f}");
        }
    }
}
