//! Several broker replicas on one Apache Kafka: `edgeloop broker` twice as
//! child processes, devices as rumqttc clients that move between them.
//!
//! - A device's ack watermark follows it to whichever replica it lands on
//!   (each replica follows `edgeloop.acks`).
//! - A device connected to two replicas at once keeps only its newest
//!   session: the older replica closes its connection (`edgeloop.sessions`).
//! - An agent given both replicas (`--mqtt A,B`) moves to B when A is
//!   killed, and every reading it took lands once.
//! - `edgeloop up --brokers 2` spreads its devices over two replicas.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_kafka::local::LocalKafka;
use edgeloop_proto::v1::{Ack, DeviceStatus, ModelUpdate, ReadingBatch};
use edgeloop_proto::{topics, Message as _};
use edgeloop_tests::{
    batch, free_addr, http_get, metric, produce, read_topic, start_kafka, wait_for, Component,
};
use rdkafka::Message;
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use tokio::sync::{mpsc, oneshot};

/// The `edgeloop` binary: `EDGELOOP_BIN` if set, else the one cargo built.
fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

struct Replica {
    mqtt: SocketAddr,
    ops: SocketAddr,
    process: Component,
}

/// `edgeloop broker` as replica `id` on `kafka`, once its MQTT listener
/// accepts connections.
async fn start_replica(dir: &Path, kafka: &LocalKafka, id: &str) -> Result<Replica> {
    let (mqtt, ops) = (free_addr()?, free_addr()?);
    let (listen, bootstrap, metrics) = (mqtt.to_string(), kafka.bootstrap(), ops.to_string());
    let args = [
        "broker",
        "--listen",
        &listen,
        "--kafka",
        &bootstrap,
        "--allow-anonymous",
        "--metrics-listen",
        &metrics,
        "--replica-id",
        id,
    ];
    let mut process = Component::start(&edgeloop_bin(), &format!("broker-{id}"), &args, dir)?;
    wait_for(Duration::from_secs(60), "the MQTT listener", || {
        let running = process.check_running();
        async move {
            running?;
            Ok(tokio::net::TcpStream::connect(mqtt).await.ok().map(|_| ()))
        }
    })
    .await?;
    Ok(Replica { mqtt, ops, process })
}

/// A device's MQTT connection: its client, the acks it receives, and word
/// of its connection ending (the event loop's first error; it is not
/// polled again, so it does not reconnect).
struct Device {
    client: AsyncClient,
    acks: mpsc::UnboundedReceiver<u64>,
    ended: oneshot::Receiver<String>,
    pump: tokio::task::JoinHandle<()>,
}

/// Connects `device` to `mqtt` (MQTT 3.1.1, clean session) and subscribes
/// it to its `ack/{device}`; returns once the broker answered the CONNECT.
async fn connect(mqtt: SocketAddr, device: &str) -> Result<Device> {
    connect_with_will(mqtt, device, None).await
}

/// A `DeviceStatus` of `device`, as a device publishes it retained (and
/// sets it, offline, as its last will).
fn status(device: &str, online: bool) -> Vec<u8> {
    DeviceStatus {
        device_id: device.into(),
        profile: "f32".into(),
        online,
        ts_micros: 1_800_000_000_000_000,
        ..DeviceStatus::default()
    }
    .encode_to_vec()
}

/// As [`connect`], with `will` as its last will.
async fn connect_with_will(
    mqtt: SocketAddr,
    device: &str,
    will: Option<LastWill>,
) -> Result<Device> {
    let mut options = MqttOptions::new(device, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    if let Some(will) = will {
        options.set_last_will(will);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 100);
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Packet::ConnAck(_)) = eventloop.poll().await? {
                return Ok::<_, rumqttc::ConnectionError>(());
            }
        }
    })
    .await;
    match connected {
        Ok(Ok(())) => {}
        Ok(Err(e)) => bail!("{device} could not connect to {mqtt}: {e}"),
        Err(_) => bail!("{device} got no CONNACK from {mqtt} within 30 s"),
    }
    client
        .subscribe(topics::ack(device), QoS::AtLeastOnce)
        .await?;
    let (acks_tx, acks) = mpsc::unbounded_channel();
    let (ended_tx, ended) = oneshot::channel();
    let pump = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    if let Ok(ack) = Ack::decode(p.payload.as_ref()) {
                        let _ = acks_tx.send(ack.committed_seq);
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect)) => {
                    let _ = ended_tx.send("DISCONNECT from the broker".into());
                    return;
                }
                Ok(_) => {}
                Err(e) => {
                    let _ = ended_tx.send(e.to_string());
                    return;
                }
            }
        }
    });
    Ok(Device {
        client,
        acks,
        ended,
        pump,
    })
}

impl Device {
    /// Publishes readings `first..first + n` (QoS 1).
    async fn send(&self, device: &str, first: u64, n: u64) -> Result<()> {
        self.client
            .publish(
                topics::telemetry(device),
                QoS::AtLeastOnce,
                false,
                batch(device, first, n),
            )
            .await?;
        Ok(())
    }

    /// Receives acks until one reaches `seq` (within 30 s); every ack seen
    /// on the way, that one included.
    async fn ack_reaching(&mut self, seq: u64, seen: &mut Vec<u64>) -> Result<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ack = tokio::time::timeout_at(deadline, self.acks.recv())
                .await
                .with_context(|| format!("no ack reached {seq} within 30 s; acks seen: {seen:?}"))?
                .context("the MQTT connection ended")?;
            seen.push(ack);
            if ack >= seq {
                return Ok(ack);
            }
        }
    }

    /// Disconnects cleanly and waits for the event loop to end.
    async fn leave(self) -> Result<()> {
        self.client.disconnect().await?;
        let _ = tokio::time::timeout(Duration::from_secs(10), self.pump).await;
        Ok(())
    }
}

/// The seqs of `device` in `edgeloop.readings`.
fn seqs_in_kafka(kafka: &LocalKafka, device: &str) -> Result<BTreeSet<u64>> {
    let mut seqs = BTreeSet::new();
    for m in read_topic(kafka, topics::KAFKA_READINGS)? {
        if m.key() == Some(device.as_bytes()) {
            let b = ReadingBatch::decode(m.payload().unwrap_or_default())?;
            seqs.extend(b.first_seq..b.end_seq());
        }
    }
    Ok(seqs)
}

/// The `online` flag of each status of `device` in `edgeloop.status`, in
/// order.
fn statuses_in_kafka(kafka: &LocalKafka, device: &str) -> Result<Vec<bool>> {
    read_topic(kafka, topics::KAFKA_STATUS)?
        .iter()
        .filter(|m| m.key() == Some(device.as_bytes()))
        .map(|m| Ok(DeviceStatus::decode(m.payload().unwrap_or_default())?.online))
        .collect()
}

/// Every seq below every ack seen is in Kafka: no ack ever claimed more
/// than Kafka took.
fn acks_within_kafka(kafka: &LocalKafka, device: &str, acks: &[u64]) -> Result<()> {
    let in_kafka = seqs_in_kafka(kafka, device)?;
    let highest = acks.iter().copied().max().unwrap_or(0);
    let missing: Vec<u64> = (0..highest).filter(|s| !in_kafka.contains(s)).collect();
    ensure!(
        missing.is_empty(),
        "acks up to {highest} were published but Kafka lacks seqs {missing:?}"
    );
    Ok(())
}

async fn metric_of(replica: &Replica, name: &str) -> Result<f64> {
    let exposition = http_get(replica.ops, "/metrics").await?;
    metric(&exposition, name).with_context(|| format!("{name} is not in /metrics"))
}

/// Without following `edgeloop.acks`, replica B knows only the watermark
/// it acknowledged itself (10): the device's batch from 20, after replica A
/// acknowledged 10..20, waits for a gap B never sees filled, and no ack
/// comes. The device here sends no status (the C SDK's firmware need not
/// before resending), so nothing but the record A wrote tells B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_moving_between_replicas_is_acknowledged_where_it_lands_from_where_it_left(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let a = start_replica(dir.path(), &kafka, "a").await?;
    let b = start_replica(dir.path(), &kafka, "b").await?;
    let device = "dev-moving";
    let mut seen = Vec::new();

    // On B: readings 0..10, acknowledged 10.
    let mut on_b = connect(b.mqtt, device).await?;
    on_b.send(device, 0, 10).await?;
    ensure!(on_b.ack_reaching(10, &mut seen).await? == 10, "{seen:?}");
    on_b.leave().await?;

    // Moves to A: 10..20, acknowledged 20 by A.
    let mut on_a = connect(a.mqtt, device).await?;
    on_a.send(device, 10, 10).await?;
    ensure!(on_a.ack_reaching(20, &mut seen).await? == 20, "{seen:?}");
    on_a.leave().await?;

    // Back to B, going on from its own ack (20): B continues from where A
    // left it.
    let mut on_b = connect(b.mqtt, device).await?;
    on_b.send(device, 20, 10).await?;
    let mut back_on_b = Vec::new();
    let acked = on_b.ack_reaching(30, &mut back_on_b).await?;
    ensure!(
        acked == 30,
        "B acknowledged {acked}; acks on B: {back_on_b:?}"
    );
    seen.extend(&back_on_b);
    on_b.leave().await?;

    // Every reading landed, and no ack claimed more than Kafka had.
    let in_kafka = seqs_in_kafka(&kafka, device)?;
    ensure!(
        in_kafka == (0..30).collect::<BTreeSet<_>>(),
        "seqs in Kafka: {in_kafka:?}"
    );
    acks_within_kafka(&kafka, device, &seen)?;
    ensure!(
        metric_of(&b, "edgeloop_bridge_acks_merged_total").await? >= 1.0,
        "B merged none of A's ack records"
    );
    Ok(())
}

/// Without the session records, A never hears of the device's session on
/// B: its old connection stays open (its keep-alive answered), and the
/// wait for its end times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_connecting_to_a_second_replica_has_its_older_session_on_the_first_closed(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let a = start_replica(dir.path(), &kafka, "a").await?;
    let b = start_replica(dir.path(), &kafka, "b").await?;
    let device = "dev-twice";
    let mut seen = Vec::new();

    // A device's last will: offline, retained on its status topic.
    let will = LastWill::new(
        topics::status(device),
        status(device, false),
        QoS::AtLeastOnce,
        true,
    );
    let mut old = connect_with_will(a.mqtt, device, Some(will)).await?;
    old.send(device, 0, 10).await?;
    ensure!(old.ack_reaching(10, &mut seen).await? == 10, "{seen:?}");

    // The same device on B, while the connection to A stays open (as a
    // half-open one would, from A's side).
    let mut new = connect(b.mqtt, device).await?;
    let ended = tokio::time::timeout(Duration::from_secs(30), &mut old.ended)
        .await
        .context("A kept the older session open for 30 s after the device connected to B")?
        .context("the old connection's event loop went away")?;
    eprintln!("old session on A ended: {ended}");
    ensure!(
        metric_of(&a, "edgeloop_gate_sessions_taken_over_total").await? == 1.0,
        "A counted no takeover"
    );
    ensure!(
        metric_of(&b, "edgeloop_gate_sessions_taken_over_total").await? == 0.0,
        "B closed its newer session"
    );

    // The device goes on through B, from its ack, online.
    new.client
        .publish(
            topics::status(device),
            QoS::AtLeastOnce,
            true,
            status(device, true),
        )
        .await?;
    new.send(device, 10, 10).await?;
    new.send(device, 20, 5).await?;
    let acked = new.ack_reaching(25, &mut seen).await?;
    ensure!(acked == 25, "acks: {seen:?}");
    // B's session stays: a further batch is still acknowledged.
    new.send(device, 25, 5).await?;
    ensure!(new.ack_reaching(30, &mut seen).await? == 30, "{seen:?}");
    ensure!(
        new.ended.try_recv().is_err(),
        "the newer session on B was closed"
    );
    new.leave().await?;

    let in_kafka = seqs_in_kafka(&kafka, device)?;
    ensure!(
        in_kafka == (0..30).collect::<BTreeSet<_>>(),
        "seqs in Kafka: {in_kafka:?}"
    );
    acks_within_kafka(&kafka, device, &seen)?;
    // A closed the older session with a normal DISCONNECT to rumqttd, so
    // its will did not file the device offline while it is online on B.
    let statuses = wait_for(
        Duration::from_secs(30),
        "the device's status in Kafka",
        || {
            let statuses = statuses_in_kafka(&kafka, device);
            async move {
                let statuses = statuses?;
                Ok(statuses.contains(&true).then_some(statuses))
            }
        },
    )
    .await?;
    ensure!(
        statuses == [true],
        "statuses of the device in Kafka (online?): {statuses:?}"
    );
    Ok(())
}

/// The version of the retained `models/{task}/{profile}` a fresh client of
/// `mqtt` receives (within 30 s).
async fn retained_model_version(mqtt: SocketAddr, client_id: &str, topic: &str) -> Result<u64> {
    let mut options = MqttOptions::new(client_id, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    client.subscribe(topic, QoS::AtLeastOnce).await?;
    let version = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Event::Incoming(Packet::Publish(p)) = eventloop.poll().await? {
                if p.topic == topic {
                    return Ok::<_, anyhow::Error>(
                        ModelUpdate::decode(p.payload.as_ref())?.version,
                    );
                }
            }
        }
    })
    .await
    .with_context(|| format!("no retained {topic} on {mqtt} within 30 s"))??;
    let _ = client.disconnect().await;
    Ok(version)
}

/// Models already reached every replica before this change (each follows
/// `edgeloop.models`); this holds it for replicas that were running when
/// the model was published, so a device gets it wherever it lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_published_once_is_retained_on_every_replica() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let a = start_replica(dir.path(), &kafka, "a").await?;
    let b = start_replica(dir.path(), &kafka, "b").await?;
    let update = ModelUpdate {
        task: "anomaly".into(),
        profile: "f32".into(),
        version: 3,
        artifact: vec![1, 2, 3].into(),
        ..ModelUpdate::default()
    };
    produce(
        &kafka,
        topics::KAFKA_MODELS,
        "anomaly/f32",
        &update.encode_to_vec(),
    )
    .await?;
    let topic = topics::models("anomaly", "f32");
    for (replica, name) in [(&a, "a"), (&b, "b")] {
        let version =
            retained_model_version(replica.mqtt, &format!("dev-model-{name}"), &topic).await?;
        ensure!(version == 3, "replica {name} retains version {version}");
    }
    Ok(())
}

/// An agent's counter on its /metrics.
async fn agent_metric(ops: SocketAddr, name: &str) -> Result<f64> {
    let exposition = http_get(ops, "/metrics").await?;
    metric(&exposition, name).with_context(|| format!("{name} is not on the agent's /metrics"))
}

/// Without `mqtt.fallback_servers` the agent keeps reconnecting to the
/// killed replica A: no reading is acknowledged after the kill, and the wait
/// for more acks times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_moves_to_the_next_replica_when_its_replica_is_killed() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let mut a = start_replica(dir.path(), &kafka, "a").await?;
    let b = start_replica(dir.path(), &kafka, "b").await?;
    let device = "dev-failover";
    let (servers, ops) = (format!("{},{}", a.mqtt, b.mqtt), free_addr()?);
    let (ops_arg, spool) = (ops.to_string(), dir.path().join("spool"));
    let spool = spool.to_string_lossy();
    const TAKEN: u64 = 3_000;
    let limit = TAKEN.to_string();
    let mut agent = Component::start(
        &edgeloop_bin(),
        "agent",
        &[
            "agent",
            "--device-id",
            device,
            "--mqtt",
            &servers,
            "--rate",
            "200",
            "--limit",
            &limit,
            "--batch-size",
            "50",
            "--spool-dir",
            &spool,
            "--metrics-listen",
            &ops_arg,
        ],
        dir.path(),
    )?;
    // The agent's acknowledged readings, once at least `at_least` (its
    // endpoint may not answer yet at first).
    let acked = |at_least: f64| {
        move || async move {
            let m = agent_metric(ops, "edgeloop_agent_readings_acknowledged_total").await;
            Ok(m.ok().filter(|n| *n >= at_least))
        }
    };
    let before = wait_for(
        Duration::from_secs(60),
        "500 readings acknowledged by A",
        acked(500.0),
    )
    .await?;
    ensure!(
        metric_of(&b, "edgeloop_bridge_batches_received_total").await? == 0.0,
        "the agent published to B before A was killed"
    );
    a.process.kill9().await?;
    let after = wait_for(
        Duration::from_secs(60),
        "readings acknowledged after A was killed",
        acked(before + 500.0),
    )
    .await?;
    eprintln!("acknowledged {before} before the kill, {after} after");
    ensure!(
        agent_metric(ops, "edgeloop_agent_broker_switches_total").await? >= 1.0,
        "the agent counted no move to another broker"
    );
    let status = wait_for(
        Duration::from_secs(120),
        "the agent to finish its readings",
        || {
            let exited = agent.exited();
            async move { exited }
        },
    )
    .await?;
    ensure!(
        status.success(),
        "agent exited with {status}: {}",
        agent.tail_log()
    );
    let in_kafka = seqs_in_kafka(&kafka, device)?;
    ensure!(
        in_kafka == (0..TAKEN).collect::<BTreeSet<_>>(),
        "{} of {TAKEN} seqs in Kafka; missing {:?}",
        in_kafka.len(),
        (0..TAKEN)
            .filter(|s| !in_kafka.contains(s))
            .take(20)
            .collect::<Vec<_>>()
    );
    Ok(())
}

/// Two free loopback ports in a row (`up --brokers 2` counts ports up).
fn free_port_pair() -> Result<SocketAddr> {
    for _ in 0..50 {
        let first = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = first.local_addr()?;
        let Some(next) = addr.port().checked_add(1) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", next)).is_ok() {
            return Ok(addr);
        }
    }
    bail!("no two consecutive free ports on 127.0.0.1")
}

/// `edgeloop up --brokers 2`: both replicas take devices (each bridges
/// batches into Kafka while the run goes on) and every reading taken is
/// acknowledged and written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_with_two_broker_replicas_spreads_the_devices_and_lands_every_reading() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("run");
    let (mqtt, metrics) = (free_port_pair()?, free_port_pair()?);
    let (kafka, control) = (free_port_pair()?, free_addr()?);
    let second = |a: SocketAddr| SocketAddr::new(a.ip(), a.port() + 1);
    let args: Vec<String> = [
        "up",
        "--brokers",
        "2",
        "--devices",
        "4",
        "--duration",
        "15s",
        "--data-dir",
        &data.to_string_lossy(),
        "--mqtt-listen",
        &mqtt.to_string(),
        "--broker-metrics-listen",
        &metrics.to_string(),
        "--kafka-listen",
        &kafka.to_string(),
        "--control-listen",
        &control.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Component::start(&edgeloop_bin(), "up", &args, dir.path())?;
    for replica in [metrics, second(metrics)] {
        wait_for(
            Duration::from_secs(120),
            &format!("batches through the replica with metrics on {replica}"),
            || {
                let running = up.check_running();
                async move {
                    running?;
                    let exposition = http_get(replica, "/metrics").await.unwrap_or_default();
                    Ok(
                        metric(&exposition, "edgeloop_bridge_batches_received_total")
                            .filter(|n| *n > 0.0),
                    )
                }
            },
        )
        .await?;
    }
    let status = wait_for(Duration::from_secs(120), "up to finish", || {
        let exited = up.exited();
        async move { exited }
    })
    .await?;
    let log = std::fs::read_to_string(&up.log)?;
    ensure!(
        status.success(),
        "up exited with {status}: {}",
        up.tail_log()
    );
    ensure!(
        log.contains(&format!(
            "2 MQTT broker replicas on {mqtt}, {}",
            second(mqtt)
        )),
        "up did not say it runs two replicas:\n{log}"
    );
    let done = log
        .lines()
        .find(|l| l.starts_with("done: "))
        .with_context(|| format!("no done line:\n{log}"))?;
    let numbers: Vec<u64> = done
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    // done: {taken} readings taken by {devices} devices, {acked} acknowledged, {rows} written …
    ensure!(numbers.len() >= 4, "{done}");
    let (taken, devices, acked, rows) = (numbers[0], numbers[1], numbers[2], numbers[3]);
    ensure!(
        devices == 4 && taken > 0 && acked == taken && rows == taken,
        "{done}"
    );
    let landed = edgeloop_tests::read_rows(&data.join("parquet"))?;
    let counts = edgeloop_tests::identity_counts(&landed);
    ensure!(
        counts.len() as u64 == taken && counts.values().all(|n| *n == 1),
        "{} distinct of {} rows for {taken} taken",
        counts.len(),
        landed.len()
    );
    Ok(())
}
