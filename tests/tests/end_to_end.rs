//! End-to-end tests of the slice device → MQTT → Kafka → Parquet, against the
//! real components: Apache Kafka, `edgeloop broker` and
//! `edgeloop processor` as child processes, agents in-process with rumqttc.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_agent::config::SourceConfig;
use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_agent::{AgentConfig, AgentStats};
use edgeloop_kafka::local::LocalKafka;
use edgeloop_proto::v1::{Ack, DeviceStatus, ModelUpdate, ReadingBatch};
use edgeloop_proto::{topics, Message as _};
use edgeloop_tests::{
    batch, check_exactly_once, http_get, metric, parquet_files, produce, read_rows, read_topic,
    start_kafka, wait_for, Component,
};
use rdkafka::message::Headers;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;

/// The `edgeloop` binary the tests start: `EDGELOOP_BIN` if set (a copy of a
/// build, so that another build sharing the target directory cannot replace
/// it in the middle of a run), else the one cargo built for these tests.
fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

struct Stack {
    dir: tempfile::TempDir,
    kafka: LocalKafka,
    /// The MQTT broker (killed on drop); `None` while it is down.
    broker: Option<Component>,
    mqtt: SocketAddr,
    parquet: PathBuf,
    group: String,
    /// Extra arguments of every `edgeloop broker` this stack starts.
    broker_args: Vec<String>,
}

impl Stack {
    async fn start() -> Result<Stack> {
        let mut stack = Stack::without_broker().await?;
        stack.start_broker().await?;
        Ok(stack)
    }

    /// Kafka only; the MQTT address is reserved but nothing listens on it.
    async fn without_broker() -> Result<Stack> {
        let dir = tempfile::tempdir()?;
        let kafka = start_kafka(dir.path()).await?;
        Stack::around(dir, kafka)
    }

    /// A stack around a Kafka already started in `dir`; no broker yet.
    fn around(dir: tempfile::TempDir, kafka: LocalKafka) -> Result<Stack> {
        let mqtt = edgeloop_tests::free_addr()?;
        let parquet = dir.path().join("parquet");
        let group = format!("test-{}", std::process::id());
        Ok(Stack {
            dir,
            kafka,
            broker: None,
            mqtt,
            parquet,
            group,
            broker_args: Vec::new(),
        })
    }

    async fn start_broker(&mut self) -> Result<()> {
        let mqtt = self.mqtt;
        let (listen, bootstrap) = (mqtt.to_string(), self.kafka.bootstrap());
        let mut args = vec![
            "broker",
            "--listen",
            &listen,
            "--kafka",
            &bootstrap,
            "--allow-anonymous",
        ];
        args.extend(self.broker_args.iter().map(String::as_str));
        let mut broker = Component::start(&edgeloop_bin(), "broker", &args, self.dir.path())?;
        wait_for(Duration::from_secs(60), "the MQTT listener", || {
            let running = broker.check_running();
            async move {
                running?;
                Ok(tokio::net::TcpStream::connect(mqtt).await.ok().map(|_| ()))
            }
        })
        .await?;
        self.broker = Some(broker);
        Ok(())
    }

    fn processor(&self, name: &str) -> Result<Component> {
        self.processor_with(name, &[])
    }

    fn processor_with(&self, name: &str, extra: &[&str]) -> Result<Component> {
        let bootstrap = self.kafka.bootstrap();
        let parquet = self.parquet.to_string_lossy().into_owned();
        let mut args = vec![
            "processor",
            "--kafka",
            &bootstrap,
            "--group-id",
            &self.group,
            "--parquet-root",
            &parquet,
            "--max-age",
            "1s",
            "--instance-id",
            "processor-0",
        ];
        args.extend_from_slice(extra);
        Component::start(&edgeloop_bin(), name, &args, self.dir.path())
    }

    fn agent(&self, device: &str, seed: u64, limit: u64, rate: f64, batch: usize) -> AgentConfig {
        let mut config = AgentConfig {
            device_id: device.into(),
            ..AgentConfig::default()
        };
        config.spool.dir = self.dir.path().join("spool").join(device);
        config.spool.sync_interval = Duration::from_millis(20);
        config.mqtt.host = self.mqtt.ip().to_string();
        config.mqtt.port = self.mqtt.port();
        config.uplink.batch_size = batch;
        config.uplink.linger = Duration::from_millis(50);
        config.uplink.resend_after = Duration::from_secs(5);
        config.source = SourceConfig::Simulator(SimulatorConfig {
            seed,
            limit: Some(limit),
            rate_hz: rate,
            anomaly_rate: 0.01,
            ..SimulatorConfig::default()
        });
        config
    }
}

/// Rows of the data set once exactly `expected` distinct identities are there.
async fn wait_for_rows(
    stack: &Stack,
    expected: usize,
    limit: Duration,
) -> Result<Vec<edgeloop_tests::Row>> {
    let root = stack.parquet.clone();
    wait_for(limit, &format!("{expected} readings in Parquet"), || {
        let root = root.clone();
        async move {
            let rows = read_rows(&root)?;
            let distinct = edgeloop_tests::identity_counts(&rows).len();
            Ok((distinct >= expected).then_some(rows))
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_of_every_device_reach_parquet_exactly_once_with_their_values() -> Result<()> {
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let (devices, per_device) = (4usize, 600u64);
    let mut template = stack.agent("unused", 100, per_device, 1_000.0, 50);
    template.spool.dir = stack.dir.path().join("spool");
    let stats = Arc::new(AgentStats::default());
    let reports = tokio::time::timeout(
        Duration::from_secs(120),
        edgeloop_agent::run_fleet(
            template.clone(),
            "dev",
            devices,
            CancellationToken::new(),
            stats,
        ),
    )
    .await
    .context("fleet did not finish")??;
    for r in &reports {
        ensure!(
            r.next_seq == per_device && r.committed_seq == per_device,
            "{r:?}"
        );
    }

    let rows = wait_for_rows(
        &stack,
        devices * per_device as usize,
        Duration::from_secs(60),
    )
    .await?;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("dev-{i:04}"), per_device))
        .collect();
    check_exactly_once(&rows, &expected)?;

    // The values are those the device generated: replay each simulator.
    let by_id: HashMap<(String, i64), &edgeloop_tests::Row> = rows
        .iter()
        .map(|r| ((r.device_id.clone(), r.seq), r))
        .collect();
    let SourceConfig::Simulator(sim) = &template.source else {
        bail!("the template simulates");
    };
    let mut anomalies = 0;
    for i in 0..devices {
        let device = format!("dev-{i:04}");
        let mut replay = Simulator::new(edgeloop_agent::source::simulator::SimulatorConfig {
            seed: sim.seed + i as u64,
            ..sim.clone()
        });
        let names = replay.channel_names();
        for seq in 0..per_device as i64 {
            let want = replay.next_reading();
            let row = by_id[&(device.clone(), seq)];
            for (name, value) in names.iter().zip(&want.values) {
                ensure!(
                    row.channels.get(name) == Some(&Some(*value)),
                    "{device} seq {seq} {name}: Parquet has {:?}, the device sent {value}",
                    row.channels.get(name)
                );
            }
            ensure!(
                row.true_label.as_deref() == Some(want.label),
                "{device} seq {seq} label"
            );
            anomalies += usize::from(want.label != "normal");
        }
    }
    ensure!(anomalies > 0, "the simulated data should contain anomalies");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payload_lands_in_the_deadletter_topic_and_later_readings_still_arrive(
) -> Result<()> {
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let garbage: &[u8] = b"\xff\xfe this is not a ReadingBatch";
    let mut options =
        rumqttc::MqttOptions::new("x", stack.mqtt.ip().to_string(), stack.mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .publish(
            topics::telemetry("x"),
            rumqttc::QoS::AtLeastOnce,
            false,
            garbage.to_vec(),
        )
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !puback(&mut eventloop).await? {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "no PUBACK for the malformed publish"
        );
    }

    let after = stack.agent("after", 7, 120, 500.0, 30);
    let report = tokio::time::timeout(
        Duration::from_secs(60),
        edgeloop_agent::run(
            after,
            CancellationToken::new(),
            Arc::new(AgentStats::default()),
        ),
    )
    .await??;
    ensure!(report.committed_seq == 120, "{report:?}");
    let rows = wait_for_rows(&stack, 120, Duration::from_secs(60)).await?;
    check_exactly_once(&rows, &HashMap::from([("after".to_string(), 120)]))?;

    let letters = wait_for(Duration::from_secs(30), "the dead letter", || {
        let read = read_topic(&stack.kafka, topics::KAFKA_DEADLETTER);
        async move { Ok(read.ok().filter(|l| !l.is_empty())) }
    })
    .await?;
    ensure!(
        letters.len() == 1,
        "expected one dead letter, found {}",
        letters.len()
    );
    let letter = &letters[0];
    ensure!(
        letter.payload() == Some(garbage),
        "the original bytes are kept"
    );
    ensure!(
        letter.key() == Some(b"x".as_slice()),
        "the original key is kept"
    );
    let reason = letter
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "reason").and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .context("no reason header")?;
    ensure!(
        reason.starts_with("payload does not decode as a ReadingBatch"),
        "reason: {reason}"
    );
    Ok(())
}

/// Polls the event loop once; true when a PUBACK arrived.
async fn puback(eventloop: &mut rumqttc::EventLoop) -> Result<bool> {
    match tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await {
        Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => Ok(true),
        Ok(Ok(_)) | Err(_) => Ok(false),
        Ok(Err(e)) => bail!("MQTT: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_killed_mid_stream_and_restarted_loses_and_duplicates_nothing() -> Result<()> {
    let stack = Stack::start().await?;
    let mut processor = stack.processor("processor-1")?;
    let (devices, per_device) = (3usize, 3_000u64);
    let mut template = stack.agent("unused", 300, per_device, 300.0, 30);
    template.spool.dir = stack.dir.path().join("spool");
    let fleet = tokio::spawn(edgeloop_agent::run_fleet(
        template,
        "kill",
        devices,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    ));
    // Kill it once it has written files (and so committed offsets) and is
    // in the middle of more.
    let root = stack.parquet.clone();
    wait_for(Duration::from_secs(60), "two Parquet files", || {
        let files = parquet_files(&root);
        async move { Ok((files?.len() >= 2).then_some(())) }
    })
    .await?;
    processor.check_running()?;
    processor.kill9().await?;
    let written_before = read_rows(&stack.parquet)?.len();
    ensure!(
        written_before < devices * per_device as usize,
        "the kill came too late to test anything"
    );
    let mut processor = stack.processor("processor-2")?;

    let reports = tokio::time::timeout(Duration::from_secs(120), fleet).await???;
    ensure!(
        reports.iter().all(|r| r.committed_seq == per_device),
        "{reports:?}"
    );
    let total = devices * per_device as usize;
    wait_for_rows(&stack, total, Duration::from_secs(120)).await?;
    // Let the processor close whatever it still has open, then stop it
    // cleanly and look at the final data set.
    processor.terminate(Duration::from_secs(30)).await?;
    let rows = read_rows(&stack.parquet)?;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("kill-{i:04}"), per_device))
        .collect();
    check_exactly_once(&rows, &expected)?;
    Ok(())
}

/// The seqs of `device` now in the Kafka readings topic.
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_watermark_reaches_the_device_and_never_passes_what_kafka_holds() -> Result<()> {
    let stack = Stack::start().await?;
    let device = "acker";
    let mut options =
        rumqttc::MqttOptions::new(device, stack.mqtt.ip().to_string(), stack.mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe(topics::ack(device), rumqttc::QoS::AtLeastOnce)
        .await?;
    let (ack_tx, mut acks) = tokio::sync::mpsc::unbounded_channel();
    let ack_topic = topics::ack(device);
    let pump = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)))
                    if p.topic == ack_topic =>
                {
                    let ack = Ack::decode(p.payload.as_ref()).map(|a| a.committed_seq);
                    if ack_tx.send(ack).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });

    // Every ack seen is checked against Kafka at once; returns the last.
    let mut last = 0u64;
    let mut next_ack =
        async |want: u64,
               acks: &mut tokio::sync::mpsc::UnboundedReceiver<Result<u64, prost::DecodeError>>|
               -> Result<u64> {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            loop {
                let ack = tokio::time::timeout_at(deadline, acks.recv())
                    .await
                    .with_context(|| format!("no ack {want} within 30 s (last {last})"))?
                    .context("ack pump ended")??;
                ensure!(ack >= last, "ack went backwards: {last} then {ack}");
                last = ack;
                let in_kafka = seqs_in_kafka(&stack.kafka, device)?;
                let missing: Vec<u64> = (0..ack).filter(|s| !in_kafka.contains(s)).collect();
                ensure!(
                    missing.is_empty(),
                    "ack {ack} published while Kafka lacks seqs {missing:?}"
                );
                if ack >= want {
                    return Ok(ack);
                }
            }
        };

    send_batch(&client, device, 0, 10).await?;
    ensure!(next_ack(10, &mut acks).await? == 10);
    // 10..20 is withheld: 20..30 reaches Kafka, but the watermark must not
    // jump the gap.
    send_batch(&client, device, 20, 10).await?;
    wait_for(Duration::from_secs(30), "seq 20..30 in Kafka", || {
        let seqs = seqs_in_kafka(&stack.kafka, device);
        async move { Ok(seqs?.contains(&29).then_some(())) }
    })
    .await?;
    // The bridge publishes acks every 50 ms; give it many rounds.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    while let Ok(ack) = acks.try_recv() {
        let ack = ack?;
        ensure!(ack == 10, "the watermark moved past the gap to {ack}");
    }
    send_batch(&client, device, 10, 10).await?;
    ensure!(next_ack(30, &mut acks).await? == 30);
    pump.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_while_publishing_loses_no_fsynced_reading_and_sends_none_twice() -> Result<()>
{
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let spool = stack.dir.path().join("spool-k");
    let mqtt = stack.mqtt.to_string();
    let spool_arg = spool.to_string_lossy().into_owned();
    let agent = |name: &str, limit: &str| {
        Component::start(
            &edgeloop_bin(),
            name,
            &[
                "agent",
                "--device-id",
                "killed",
                "--mqtt",
                &mqtt,
                "--rate",
                "1000",
                "--limit",
                limit,
                "--batch-size",
                "50",
                "--spool-dir",
                &spool_arg,
            ],
            stack.dir.path(),
        )
    };
    let mut first = agent("agent-1", "20000")?;
    // Kill it once readings are flowing into the data set.
    wait_for(
        Duration::from_secs(60),
        "readings of the first run in Parquet",
        || {
            let rows = read_rows(&stack.parquet);
            async move { Ok((rows?.len() >= 200).then_some(())) }
        },
    )
    .await?;
    first.check_running()?;
    first.kill9().await?;
    // The broker notices the dead connection and publishes the last will:
    // the retained status says offline, and it reaches Kafka.
    let statuses = wait_for(
        Duration::from_secs(30),
        "the last will in edgeloop.status",
        || {
            let read = read_topic(&stack.kafka, topics::KAFKA_STATUS);
            async move {
                let statuses: Vec<DeviceStatus> = read?
                    .iter()
                    .filter_map(|m| DeviceStatus::decode(m.payload().unwrap_or_default()).ok())
                    .collect();
                Ok(statuses
                    .last()
                    .is_some_and(|s| !s.online)
                    .then_some(statuses))
            }
        },
    )
    .await?;
    ensure!(
        statuses.iter().any(|s| s.online && s.device_id == "killed"),
        "an online status came first"
    );
    let mut second = agent("agent-2", "500")?;
    wait_for(Duration::from_secs(120), "the second run to finish", || {
        let status = second.check_running();
        async move { Ok(status.is_err().then_some(())) }
    })
    .await?;
    ensure!(
        second.tail_log().contains("all acknowledged"),
        "second run: {}",
        second.tail_log()
    );

    // Whatever the spool holds as durable is the truth: seqs 0..next_seq.
    let opened = edgeloop_agent::spool::disk::DiskSpool::open(
        edgeloop_agent::spool::disk::DiskSpoolConfig {
            dir: spool.clone(),
            ..Default::default()
        },
        vec![],
    )?;
    let next_seq = edgeloop_agent::spool::Spool::next_seq(&opened);
    ensure!(
        next_seq >= 700,
        "both runs took readings: next_seq {next_seq}"
    );
    let rows = wait_for_rows(&stack, next_seq as usize, Duration::from_secs(60)).await?;
    check_exactly_once(&rows, &HashMap::from([("killed".to_string(), next_seq)]))?;
    ensure!(
        edgeloop_tests::read_losses(&stack.parquet)?.is_empty(),
        "a kill loses nothing fsynced"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_down_for_30_seconds_loses_nothing_and_the_spools_drain() -> Result<()> {
    let mut stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let (devices, per_device) = (3usize, 6_000u64);
    let mut template = stack.agent("unused", 500, per_device, 150.0, 50);
    template.spool.dir = stack.dir.path().join("spool");
    template.uplink.reconnect_max = Duration::from_secs(2);
    // The fleet's /readyz and /metrics follow the outage.
    let ops = edgeloop_tests::free_addr()?;
    template.metrics_listen = Some(ops);
    let fleet = tokio::spawn(edgeloop_agent::run_fleet(
        template,
        "outage",
        devices,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    ));
    wait_for(Duration::from_secs(60), "readings in Parquet", || {
        let rows = read_rows(&stack.parquet);
        async move { Ok((rows?.len() >= 300).then_some(())) }
    })
    .await?;
    ensure!(http_status(ops, "/readyz").await == Some(200));
    let metrics = http_get(ops, "/metrics").await?;
    ensure!(
        metric(&metrics, "edgeloop_agent_readings_acknowledged_total") >= Some(300.0),
        "{metrics}"
    );
    ensure!(metric(&metrics, "edgeloop_agent_uplinks") == Some(devices as f64));
    let mut broker = stack.broker.take().context("broker")?;
    broker.kill9().await?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    ensure!(
        !fleet.is_finished(),
        "the devices cannot have finished while the broker was down"
    );
    let not_ready = http_get(ops, "/readyz").await?;
    ensure!(
        not_ready.starts_with("HTTP/1.1 503")
            && not_ready.contains("0 of 3 uplinks connected to the MQTT broker"),
        "{not_ready}"
    );
    ensure!(http_status(ops, "/healthz").await == Some(200));
    let metrics = http_get(ops, "/metrics").await?;
    let age = metric(&metrics, "edgeloop_agent_backlog_oldest_age_seconds").unwrap_or(0.0);
    ensure!(
        (25.0..120.0).contains(&age),
        "the backlog is as old as the outage, not {age} s"
    );
    ensure!(metric(&metrics, "edgeloop_agent_uplinks_connected") == Some(0.0));
    stack.start_broker().await?;
    // Ready again once every uplink reconnected. On a loaded machine the
    // fleet can drain and end (taking its endpoint with it) before a poll
    // sees it; its reports below then show that every uplink came back.
    wait_for(Duration::from_secs(30), "the fleet ready again", || {
        let finished = fleet.is_finished();
        async move {
            let ready = http_status(ops, "/readyz").await == Some(200);
            Ok((ready || finished).then_some(()))
        }
    })
    .await?;
    let reports = tokio::time::timeout(Duration::from_secs(120), fleet).await???;
    ensure!(
        reports
            .iter()
            .all(|r| r.committed_seq == per_device && r.next_seq == per_device),
        "spools drained: {reports:?}"
    );
    let total = devices * per_device as usize;
    let rows = wait_for_rows(&stack, total, Duration::from_secs(60)).await?;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("outage-{i:04}"), per_device))
        .collect();
    check_exactly_once(&rows, &expected)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_with_the_link_down_reports_its_loss_and_every_gap_is_explained() -> Result<()>
{
    let mut stack = Stack::without_broker().await?;
    let total = 3_000u64;
    let mut config = stack.agent("tiny", 9, total, 5_000.0, 100);
    config.spool.max_bytes = 16 * 1024;
    config.spool.segment_bytes = 4096;
    let stats = Arc::new(AgentStats::default());
    let agent = tokio::spawn(edgeloop_agent::run(
        config.clone(),
        CancellationToken::new(),
        stats.clone(),
    ));
    // All readings taken while no broker listens: the spool must evict.
    wait_for(Duration::from_secs(30), "the source to finish", || {
        let n = AgentStats::get(&stats.readings_generated);
        async move { Ok((n >= total).then_some(())) }
    })
    .await?;
    stack.start_broker().await?;
    let _processor = stack.processor("processor")?;
    let report = tokio::time::timeout(Duration::from_secs(120), agent).await???;
    ensure!(report.committed_seq == total, "{report:?}");

    let root = stack.parquet.clone();
    let (rows, losses) = wait_for(
        Duration::from_secs(60),
        "readings and losses to cover every seq",
        || {
            let root = root.clone();
            async move {
                let rows = read_rows(&root)?;
                let losses = edgeloop_tests::read_losses(&root)?;
                let lost: i64 = losses.iter().map(|l| l.end_seq - l.first_seq).sum();
                let covered = edgeloop_tests::identity_counts(&rows).len() as i64 + lost;
                Ok((covered >= total as i64).then_some((rows, losses)))
            }
        },
    )
    .await?;
    ensure!(!losses.is_empty(), "the tiny spool must have evicted");
    ensure!(
        losses
            .iter()
            .all(|l| l.device_id == "tiny" && l.reason == "evicted_full"),
        "{losses:?}"
    );
    let counts = edgeloop_tests::identity_counts(&rows);
    for seq in 0..total as i64 {
        let in_rows = counts.get(&("tiny".to_string(), seq)).copied().unwrap_or(0);
        let in_losses = losses
            .iter()
            .filter(|l| l.first_seq <= seq && seq < l.end_seq)
            .count();
        ensure!(
            in_rows + in_losses == 1,
            "seq {seq}: {in_rows} rows, {in_losses} loss reports"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_first_sends_new_readings_ahead_of_the_backlog_after_an_outage() -> Result<()> {
    let mut stack = Stack::without_broker().await?;
    // Readings taken: enough that some are still to come once the broker
    // is up, however long its start takes on a loaded machine (at 1,000/s,
    // 14 s after the 2,000 of the backlog the test waits for).
    const TAKEN: u64 = 16_000;
    let mut config = stack.agent("live", 3, TAKEN, 1_000.0, 10);
    config.uplink.drain_order = edgeloop_agent::config::DrainOrder::LiveFirst;
    // Reconnect at once when the broker comes up: readings taken while the
    // agent waits out a long backoff would be backlog too.
    config.uplink.reconnect_max = Duration::from_millis(200);
    // An in-flight window well under the backlog, so that the backlog cannot
    // all go out at the connect, before the first live reading exists (it
    // did with the default of 20,000 when the broker came up quickly: the
    // order then depended on the timing, not on the drain order). 50: the
    // backlog takes 80 and more ack round trips, and the spool syncs every
    // 20 ms, so live readings are durable while it drains. (With 200 and
    // the default 200 ms sync, Apache Kafka's quick acks drained the
    // backlog within one sync in a CI run; with 1,000 a fast broker once
    // did too.)
    config.uplink.max_unacked_readings = 50;
    config.spool.sync_interval = Duration::from_millis(20);
    let stats = Arc::new(AgentStats::default());
    let agent = tokio::spawn(edgeloop_agent::run(
        config,
        CancellationToken::new(),
        stats.clone(),
    ));
    // A backlog builds up while no broker listens.
    wait_for(Duration::from_secs(30), "a backlog of 2000", || {
        let n = AgentStats::get(&stats.readings_generated);
        async move { Ok((n >= 2_000).then_some(n)) }
    })
    .await?;
    stack.start_broker().await?;
    // Everything taken before the broker listened is backlog (the broker's
    // start took seconds more in a loaded CI run: counting from before it
    // called those readings live).
    let backlog = AgentStats::get(&stats.readings_generated);
    ensure!(
        backlog < TAKEN,
        "all {TAKEN} readings were taken before the broker was up: nothing is live"
    );
    let _processor = stack.processor("processor")?;
    let report = tokio::time::timeout(Duration::from_secs(120), agent).await???;
    ensure!(report.committed_seq == TAKEN, "{report:?}");
    let rows = wait_for_rows(&stack, TAKEN as usize, Duration::from_secs(60)).await?;
    check_exactly_once(&rows, &HashMap::from([("live".to_string(), TAKEN)]))?;

    // In Kafka's order (one device, one partition): some batch taken after
    // the outage precedes some batch of the backlog.
    let order: Vec<(u64, u64)> = read_topic(&stack.kafka, topics::KAFKA_READINGS)?
        .iter()
        .filter_map(|m| ReadingBatch::decode(m.payload().unwrap_or_default()).ok())
        .map(|b| (b.first_seq, b.end_seq()))
        .collect();
    let first_live = order
        .iter()
        .position(|(first, _)| *first >= backlog)
        .context("no live batch")?;
    let last_backlog = order
        .iter()
        .rposition(|(_, end)| *end <= backlog)
        .context("no backlog batch")?;
    ensure!(
        first_live < last_backlog,
        "live batch at {first_live} came after the whole backlog (last at {last_backlog})"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_csv_file_lands_row_for_row_and_its_bad_lines_are_skipped() -> Result<()> {
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let csv = stack.dir.path().join("readings.csv");
    let mut text = String::from("ts,temperature,humidity\n");
    for i in 0..500 {
        text.push_str(&format!(
            "{}.{:03},{},{}\n",
            1_800_000_000 + i / 10,
            (i % 10) * 100,
            20.0 + i as f64 / 100.0,
            50 - i % 7
        ));
        if i % 100 == 50 {
            text.push_str("not-a-time,1,2\n");
            text.push_str("1800000000,warm,2\n");
            text.push_str("1800000000,1\n");
        }
    }
    std::fs::write(&csv, text)?;
    let spool = stack
        .dir
        .path()
        .join("spool-replay")
        .to_string_lossy()
        .into_owned();
    let mut agent = Component::start(
        &edgeloop_bin(),
        "agent-replay",
        &[
            "agent",
            "--device-id",
            "replayed",
            "--mqtt",
            &stack.mqtt.to_string(),
            "--replay",
            &csv.to_string_lossy(),
            "--spool-dir",
            &spool,
        ],
        stack.dir.path(),
    )?;
    wait_for(Duration::from_secs(60), "the replay to finish", || {
        let status = agent.check_running();
        async move { Ok(status.is_err().then_some(())) }
    })
    .await?;
    let log = agent.tail_log();
    ensure!(
        log.contains("500 readings taken, all acknowledged"),
        "agent log: {log}"
    );
    ensure!(
        log.contains("15 bad lines skipped") && log.matches("skipping a line").count() == 10,
        "15 bad lines, the first 10 logged: {log}"
    );
    let rows = wait_for_rows(&stack, 500, Duration::from_secs(60)).await?;
    check_exactly_once(&rows, &HashMap::from([("replayed".to_string(), 500)]))?;
    let by_seq: HashMap<i64, &edgeloop_tests::Row> = rows.iter().map(|r| (r.seq, r)).collect();
    for i in 0..500i64 {
        let row = by_seq[&i];
        ensure!(
            row.ts_micros == (1_800_000_000 + i / 10) * 1_000_000 + (i % 10) * 100_000,
            "ts of row {i}"
        );
        ensure!(
            row.channels["temperature"] == Some(20.0 + i as f64 / 100.0),
            "temperature of row {i}"
        );
        ensure!(
            row.channels["humidity"] == Some((50 - i % 7) as f64),
            "humidity of row {i}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_behind_a_gateway_arrives_exactly_once_under_its_own_id_across_an_uplink_cut(
) -> Result<()> {
    let mut stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let gateway_listen = edgeloop_tests::free_addr()?;
    let mut gateway = stack.agent("gw", 1, 200, 50.0, 50);
    gateway.gateway = Some(edgeloop_agent::config::GatewayConfig {
        listen: gateway_listen,
        ..Default::default()
    });
    gateway.uplink.reconnect_max = Duration::from_secs(1);
    let gateway_stop = CancellationToken::new();
    let gateway_task = tokio::spawn(edgeloop_agent::run(
        gateway,
        gateway_stop.clone(),
        Arc::new(AgentStats::default()),
    ));
    wait_for(
        Duration::from_secs(30),
        "the gateway's listener",
        || async move {
            Ok(tokio::net::TcpStream::connect(gateway_listen)
                .await
                .ok()
                .map(|_| ()))
        },
    )
    .await?;

    let per_child = 3_000u64;
    let mut child = stack.agent("child-1", 77, per_child, 300.0, 30);
    child.mqtt.host = gateway_listen.ip().to_string();
    child.mqtt.port = gateway_listen.port();
    let child_task = tokio::spawn(edgeloop_agent::run(
        child,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    ));
    wait_for(
        Duration::from_secs(60),
        "the child's readings in Parquet",
        || {
            let rows = read_rows(&stack.parquet);
            async move {
                Ok(
                    (rows?.iter().filter(|r| r.device_id == "child-1").count() >= 300)
                        .then_some(()),
                )
            }
        },
    )
    .await?;
    // Cut the gateway's uplink: the cloud broker goes away for a while; the
    // child keeps publishing to the gateway, which keeps spooling.
    let mut broker = stack.broker.take().context("broker")?;
    broker.kill9().await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    ensure!(
        !child_task.is_finished(),
        "the child cannot be acknowledged while the uplink is cut"
    );
    stack.start_broker().await?;

    let report = tokio::time::timeout(Duration::from_secs(120), child_task).await???;
    ensure!(
        report.committed_seq == per_child,
        "the child got the cloud's ack through the gateway: {report:?}"
    );
    let rows = wait_for_rows(&stack, per_child as usize + 200, Duration::from_secs(60)).await?;
    check_exactly_once(
        &rows,
        &HashMap::from([("child-1".to_string(), per_child), ("gw".to_string(), 200)]),
    )?;
    gateway_stop.cancel();
    tokio::time::timeout(Duration::from_secs(30), gateway_task).await???;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_label_readings_a_changed_file_is_taken_and_a_broken_one_refused() -> Result<()> {
    let stack = Stack::start().await?;
    let rules = stack.dir.path().join("rules.toml");
    std::fs::write(&rules, include_str!("../../config/rules.example.toml"))?;
    let rules_arg = rules.to_string_lossy().into_owned();
    let metrics = edgeloop_tests::free_addr()?;
    let metrics_arg = metrics.to_string();
    let mut processor = stack.processor_with(
        "processor",
        &[
            "--rules",
            &rules_arg,
            "--channels",
            "temperature,humidity,vibration",
            "--metrics-listen",
            &metrics_arg,
        ],
    )?;
    // Phase 1: the shipped rules (version sim-v1).
    // 10 readings/s of simulated time (what the rules are written for),
    // fast-forwarded 200 times.
    let mut first = stack.agent("lab-1", 5, 4_000, 10.0, 100);
    if let SourceConfig::Simulator(sim) = &mut first.source {
        sim.speedup = 200.0;
    }
    let report = edgeloop_agent::run(
        first,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    )
    .await?;
    ensure!(report.committed_seq == 4_000);
    let rows = wait_for_rows(&stack, 4_000, Duration::from_secs(60)).await?;
    ensure!(
        rows.iter()
            .all(|r| r.rules_version.as_deref() == Some("sim-v1")),
        "every row carries the rules version"
    );
    let stuck: Vec<_> = rows
        .iter()
        .filter(|r| r.true_label.as_deref() == Some("stuck"))
        .collect();
    let caught = stuck
        .iter()
        .filter(|r| r.label.as_deref() == Some("stuck"))
        .count();
    ensure!(
        !stuck.is_empty() && caught * 2 > stuck.len(),
        "stuck readings found: {caught} of {}",
        stuck.len()
    );
    ensure!(rows
        .iter()
        .all(|r| r.label.is_none() == r.label_confidence.is_none()));

    // The rule statistics are exported as Prometheus metrics.
    let exported = wait_for(Duration::from_secs(30), "rule metrics", || async move {
        let body = http_get(metrics, "/metrics").await.unwrap_or_default();
        Ok(body
            .contains("edgeloop_rule_votes_total{rules_version=\"sim-v1\",rule=\"stuck_sensor\"}")
            .then_some(body))
    })
    .await?;
    ensure!(
        exported.contains("edgeloop_rule_estimated_accuracy{"),
        "{exported}"
    );
    ensure!(http_get(metrics, "/healthz").await?.ends_with("ok\n"));
    // The only processor of its group holds every partition (kafka.partitions).
    let partitions = f64::from(edgeloop_kafka::KafkaConfig::default().partitions);
    ensure!(
        metric(&exported, "edgeloop_processor_partitions_assigned") == Some(partitions)
            && metric(&exported, "edgeloop_processor_unassigned_seconds") == Some(0.0),
        "{exported}"
    );

    // Phase 2: a broken file is refused and the running rules stay.
    std::fs::write(&rules, "[[rule]]\nname = \"oops\"\nlabel = \"x\"\nwhen = { kind = \"threshold\", channel = \"pressure\", above = 1.0 }\n")?;
    let log_path = processor.log.clone();
    wait_for(
        Duration::from_secs(30),
        "the refusal in the processor's log",
        || {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            async move { Ok(log.contains("labelling rules refused").then_some(())) }
        },
    )
    .await?;
    let log = std::fs::read_to_string(&processor.log)?;
    ensure!(
        log.contains("oops") && log.contains("when.channel") && log.contains("pressure"),
        "the refusal names the rule, the field and the channel: {log}"
    );
    processor.check_running()?;

    // Phase 3: a valid new version is taken into force without a restart.
    let v2 = include_str!("../../config/rules.example.toml")
        .replace("version = \"sim-v1\"", "version = \"sim-v2\"");
    std::fs::write(&rules, v2)?;
    wait_for(Duration::from_secs(30), "sim-v2 in force", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        async move { Ok(log.contains("sim-v2").then_some(())) }
    })
    .await?;
    let mut second = stack.agent("lab-2", 6, 1_000, 10.0, 100);
    if let SourceConfig::Simulator(sim) = &mut second.source {
        sim.speedup = 200.0;
    }
    let report = edgeloop_agent::run(
        second,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    )
    .await?;
    ensure!(report.committed_seq == 1_000);
    let rows = wait_for_rows(&stack, 5_000, Duration::from_secs(60)).await?;
    ensure!(
        rows.iter()
            .filter(|r| r.device_id == "lab-2")
            .all(|r| r.rules_version.as_deref() == Some("sim-v2")),
        "readings after the change carry the new version"
    );
    Ok(())
}

/// Runs a Python snippet (DuckDB / pyarrow, installed by scripts/setup.sh)
/// with the data set root as argv[1]; returns what it printed.
fn python(script: &str, root: &std::path::Path) -> Result<String> {
    let out = std::process::Command::new("python3")
        .args(["-c", script])
        .arg(root)
        .output()
        .context("running python3 (scripts/setup.sh installs duckdb and pyarrow)")?;
    ensure!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duckdb_and_pyarrow_read_the_labelled_data_set_and_prune_by_date() -> Result<()> {
    let stack = Stack::start().await?;
    let rules = stack.dir.path().join("rules.toml");
    std::fs::write(&rules, include_str!("../../config/rules.example.toml"))?;
    let _processor = stack.processor_with("processor", &["--rules", &rules.to_string_lossy()])?;
    let mut template = stack.agent("unused", 40, 1_500, 10.0, 100);
    template.spool.dir = stack.dir.path().join("spool");
    if let SourceConfig::Simulator(sim) = &mut template.source {
        sim.speedup = 300.0;
    }
    let reports = edgeloop_agent::run_fleet(
        template,
        "duck",
        3,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    )
    .await?;
    ensure!(reports.iter().all(|r| r.committed_seq == 1_500));
    wait_for_rows(&stack, 4_500, Duration::from_secs(60)).await?;
    // Let the last file's rule statistics land too.
    let root = stack.parquet.clone();
    wait_for(Duration::from_secs(30), "rule statistics for every reading", || {
        let root = root.clone();
        async move {
            let n = python(
                "import duckdb,sys; print(duckdb.execute(f\"SELECT coalesce(sum(readings),0) FROM read_parquet('{sys.argv[1]}/rule_stats/**/*.parquet') WHERE rule = 'all_in_band'\").fetchone()[0])",
                &root,
            )
            .unwrap_or_default();
            Ok((n == "4500").then_some(()))
        }
    })
    .await?;

    let duck = python(
        r#"
import duckdb, sys
root = sys.argv[1]
r = f"read_parquet('{root}/readings/**/*.parquet', hive_partitioning = true, union_by_name = true)"
total, distinct, labelled, versions = duckdb.execute(f"SELECT count(*), count(DISTINCT (device_id, seq)), count(label), count(DISTINCT rules_version) FROM {r}").fetchone()
day = duckdb.execute(f"SELECT min(date) FROM {r}").fetchone()[0]
same_day = duckdb.execute(f"SELECT count(*) FROM {r} WHERE date = DATE '{day}'").fetchone()[0]
other_day = duckdb.execute(f"SELECT count(*) FROM {r} WHERE date = DATE '{day}' + 1").fetchone()[0]
print(total, distinct, labelled, versions, same_day, other_day)
"#,
        &stack.parquet,
    )?;
    let numbers: Vec<i64> = duck
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        numbers == vec![4_500, 4_500, numbers[2], 1, 4_500, 0],
        "duckdb: {duck}"
    );
    ensure!(numbers[2] > 4_000, "most readings are labelled: {duck}");

    let arrow = python(
        r#"
import pyarrow.dataset as ds, sys
d = ds.dataset(sys.argv[1] + "/readings", format="parquet", partitioning="hive")
t = d.to_table(columns=["device_id", "seq", "label", "label_confidence", "rules_version"])
print(t.num_rows, len(set(zip(t["device_id"].to_pylist(), t["seq"].to_pylist()))), str(t.schema.field("label_confidence").type))
"#,
        &stack.parquet,
    )?;
    ensure!(arrow == "4500 4500 double", "pyarrow: {arrow}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processor_killed_twice_while_devices_resend_loses_and_duplicates_nothing() -> Result<()> {
    let mut stack = Stack::start().await?;
    let mut processor = stack.processor("processor-1")?;
    let (devices, per_device) = (3usize, 4_000u64);
    let mut template = stack.agent("unused", 600, per_device, 200.0, 40);
    template.spool.dir = stack.dir.path().join("spool");
    template.uplink.reconnect_max = Duration::from_secs(1);
    let fleet = tokio::spawn(edgeloop_agent::run_fleet(
        template,
        "twice",
        devices,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    ));
    let parquet = stack.parquet.clone();
    let files = |n: usize| {
        let root = parquet.clone();
        move || {
            let found = parquet_files(&root);
            async move { Ok((found?.len() >= n).then_some(())) }
        }
    };
    wait_for(Duration::from_secs(60), "first files", files(2)).await?;
    processor.kill9().await?;
    // The broker restarts too: the devices reconnect and resend from their
    // watermarks, so Kafka holds readings more than once.
    let mut broker = stack.broker.take().context("broker")?;
    broker.kill9().await?;
    stack.start_broker().await?;
    let mut processor = stack.processor("processor-2")?;
    wait_for(Duration::from_secs(60), "more files", files(4)).await?;
    processor.kill9().await?;
    let mut processor = stack.processor("processor-3")?;
    let reports = tokio::time::timeout(Duration::from_secs(120), fleet).await???;
    ensure!(
        reports.iter().all(|r| r.committed_seq == per_device),
        "{reports:?}"
    );
    let total = devices * per_device as usize;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("twice-{i:04}"), per_device))
        .collect();
    if let Err(e) = wait_for_rows(&stack, total, Duration::from_secs(120)).await {
        // What is missing; the directory (processor logs, data set) is kept
        // for a look.
        let gaps = check_exactly_once(&read_rows(&stack.parquet)?, &expected).err();
        let dir = stack.dir.keep();
        bail!("{e}: {gaps:?}; kept {}", dir.display());
    }
    processor.terminate(Duration::from_secs(30)).await?;
    let rows = read_rows(&stack.parquet)?;
    check_exactly_once(&rows, &expected)?;
    Ok(())
}

/// The status code of a GET, or `None` if nothing answered.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let response = http_get(addr, path).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// Publishes readings `first..first + n` of `device` to its telemetry topic
/// (QoS 1).
async fn send_batch(
    client: &rumqttc::AsyncClient,
    device: &str,
    first: u64,
    n: u64,
) -> Result<(), rumqttc::ClientError> {
    client
        .publish(
            topics::telemetry(device),
            rumqttc::QoS::AtLeastOnce,
            false,
            batch(device, first, n),
        )
        .await
}

/// A fresh MQTT client `id` subscribed with QoS 1 to `filters`; the
/// publishes it receives arrive on the channel.
async fn subscriber(
    mqtt: SocketAddr,
    id: &str,
    filters: &[String],
) -> Result<(
    rumqttc::AsyncClient,
    tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    tokio::task::JoinHandle<()>,
)> {
    let mut options = rumqttc::MqttOptions::new(id, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
    for filter in filters {
        client
            .subscribe(filter.clone(), rumqttc::QoS::AtLeastOnce)
            .await?;
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let pump = tokio::spawn(async move {
        loop {
            match eventloop.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    if tx.send(p).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok((client, rx, pump))
}

/// Receives publishes until `done` returns `Some`, for at most 30 s.
async fn receive_until<T>(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<rumqttc::Publish>,
    what: &str,
    mut done: impl FnMut(&rumqttc::Publish) -> Result<Option<T>>,
) -> Result<T> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let p = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| format!("waiting 30 s for {what}"))?
            .context("the MQTT client stopped")?;
        if let Some(value) = done(&p)? {
            return Ok(value);
        }
    }
}

fn ack_of(p: &rumqttc::Publish) -> Result<u64> {
    Ok(Ack::decode(p.payload.as_ref())?.committed_seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_broker_restarts_with_the_retained_model_and_the_ack_watermark_it_had(
) -> Result<()> {
    let mut stack = Stack::without_broker().await?;
    let metrics = edgeloop_tests::free_addr()?;
    stack.broker_args = vec!["--metrics-listen".into(), metrics.to_string()];
    stack.start_broker().await?;

    // The model publisher's records: version 2, then an older version 1 and a
    // record that is not a ModelUpdate at all.
    let model = |version: u64| {
        let artifact: Vec<u8> = (0..4_000u64).map(|i| (i * 31 + version) as u8).collect();
        ModelUpdate {
            task: "anomaly".into(),
            profile: "int8".into(),
            version,
            artifact: artifact.into(),
            format: "edgeloop-int8-v1".into(),
            published_at_micros: 1_800_000_000_000_000,
            lineage_json: format!("{{\"test\":{version}}}"),
            ..ModelUpdate::default()
        }
        .encode_to_vec()
    };
    let v2 = model(2);
    let key = topics::model_key("anomaly", "int8");
    produce(&stack.kafka, topics::KAFKA_MODELS, &key, &v2).await?;
    produce(&stack.kafka, topics::KAFKA_MODELS, &key, &model(1)).await?;
    produce(
        &stack.kafka,
        topics::KAFKA_MODELS,
        &key,
        b"\xff\xfe not a model",
    )
    .await?;

    // A device publishes readings 0..100 and is acknowledged; it also
    // receives the model, published from Kafka while it was connected.
    let device = "restorer";
    let model_topic = topics::models("anomaly", "int8");
    let filters = [topics::ack(device), model_topic.clone()];
    let (client, mut rx, pump) = subscriber(stack.mqtt, device, &filters).await?;
    for first in (0..100).step_by(10) {
        send_batch(&client, device, first, 10).await?;
    }
    let (mut got_model, mut last_ack) = (None, 0);
    receive_until(&mut rx, "the model and ack 100", |p| {
        if p.topic == model_topic {
            got_model = Some(p.payload.to_vec());
        } else {
            let ack = ack_of(p)?;
            ensure!(ack >= last_ack, "ack went backwards: {last_ack} then {ack}");
            last_ack = ack;
        }
        Ok((got_model.is_some() && last_ack == 100).then_some(()))
    })
    .await?;
    ensure!(
        got_model.as_deref() == Some(v2.as_slice()),
        "the device got version 2, byte for byte"
    );
    // The bridge writes an ack to edgeloop.acks right after the device
    // sees it.
    wait_for(
        Duration::from_secs(20),
        "ack 100 in edgeloop.acks",
        || async { Ok((acked_in_kafka(&stack.kafka)?.get(device) == Some(&100)).then_some(())) },
    )
    .await?;
    pump.abort();
    drop(client);

    // A crash: rumqttd's retained messages are gone with the process.
    let mut broker = stack.broker.take().context("broker")?;
    broker.kill9().await?;
    stack.start_broker().await?;

    let (client, mut rx, pump) = subscriber(stack.mqtt, device, &filters).await?;
    let (mut got_model, mut got_ack) = (None, None);
    receive_until(&mut rx, "the retained model and ack", |p| {
        ensure!(p.retain, "{} arrives retained", p.topic);
        ensure!(
            p.qos == rumqttc::QoS::AtLeastOnce,
            "{} arrives with QoS 1, not {:?}",
            p.topic,
            p.qos
        );
        if p.topic == model_topic {
            got_model = Some(p.payload.to_vec());
        } else {
            got_ack = Some(ack_of(p)?);
        }
        Ok((got_model.is_some() && got_ack.is_some()).then_some(()))
    })
    .await?;
    ensure!(
        got_model.as_deref() == Some(v2.as_slice()),
        "the restored model is version 2, byte for byte"
    );
    ensure!(
        got_ack == Some(100),
        "the restored watermark is the one the device had: {got_ack:?}"
    );

    // Acks continue from the restored watermark: a batch straddling it moves
    // it on, a batch entirely below it only re-publishes it.
    send_batch(&client, device, 90, 20).await?;
    let ack = receive_until(&mut rx, "ack 110", |p| {
        let ack = ack_of(p)?;
        ensure!(ack >= 100, "ack went backwards to {ack}");
        Ok((ack == 110).then_some(ack))
    })
    .await?;
    ensure!(ack == 110);
    send_batch(&client, device, 0, 10).await?;
    let again = receive_until(&mut rx, "the ack re-published", |p| Ok(Some(ack_of(p)?))).await?;
    ensure!(again == 110, "a stale batch re-publishes 110, not {again}");
    pump.abort();
    drop(client);

    // A crash between publishing an ack and its record reaching Kafka: the
    // device holds ack 130 (readings 110..130 went to Kafka and the ack to
    // the device, and the broker died before the record 130), so the
    // restart restores less (110) than the device holds. The device's
    // status on connect, sent before it resends, lifts the watermark, and
    // its resend from 130 is acknowledged (without that it would wait for
    // 110..130, which the device no longer has).
    wait_for(
        Duration::from_secs(20),
        "ack 110 in edgeloop.acks",
        || async { Ok((acked_in_kafka(&stack.kafka)?.get(device) == Some(&110)).then_some(())) },
    )
    .await?;
    let mut broker = stack.broker.take().context("broker")?;
    broker.kill9().await?;
    stack.start_broker().await?;
    let (client, mut rx, pump) = subscriber(stack.mqtt, device, &filters).await?;
    let status = DeviceStatus {
        device_id: device.to_string(),
        online: true,
        acked_seq: 130,
        next_seq: 140,
        ..DeviceStatus::default()
    };
    client
        .publish(
            topics::status(device),
            rumqttc::QoS::AtLeastOnce,
            true,
            status.encode_to_vec(),
        )
        .await?;
    send_batch(&client, device, 130, 10).await?;
    receive_until(&mut rx, "ack 140 after the device's status", |p| {
        Ok((p.topic != model_topic && ack_of(p)? == 140).then_some(()))
    })
    .await?;
    pump.abort();

    let exposition = http_get(metrics, "/metrics").await?;
    for (name, want) in [
        ("edgeloop_bridge_acks_restored_total", 1.0),
        ("edgeloop_bridge_watermarks_raised_by_device_total", 1.0),
        ("edgeloop_bridge_models_republished_total", 1.0),
        ("edgeloop_bridge_models_stale_total", 1.0),
        ("edgeloop_bridge_records_undecodable_total", 1.0),
    ] {
        ensure!(
            metric(&exposition, name) == Some(want),
            "{name} should be {want}: {exposition}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_for_30_seconds_while_devices_publish_loses_and_duplicates_nothing() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let kafka = edgeloop_tests::start_kafka(dir.path()).await?;
    let mut stack = Stack::around(dir, kafka)?;
    // A small in-flight limit, so that the outage fills it and the bridge
    // has to stop taking telemetry.
    let in_flight_limit = 16u32;
    let config = stack.dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "kafka_check_interval = \"1s\"\n[bridge]\nmax_in_flight_batches = {in_flight_limit}\nstatistics_interval = \"1s\"\n"
        ),
    )?;
    let metrics = edgeloop_tests::free_addr()?;
    stack.broker_args = vec![
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--metrics-listen".into(),
        metrics.to_string(),
    ];
    stack.start_broker().await?;
    let broker_pid = stack
        .broker
        .as_ref()
        .and_then(Component::pid)
        .context("broker pid")?;
    let _processor = stack.processor("processor")?;
    wait_for(Duration::from_secs(30), "the broker ready", || async move {
        Ok((http_status(metrics, "/readyz").await == Some(200)).then_some(()))
    })
    .await?;

    let (devices, per_device) = (3usize, 6_000u64);
    let mut template = stack.agent("unused", 700, per_device, 150.0, 50);
    template.spool.dir = stack.dir.path().join("spool");
    let fleet = tokio::spawn(edgeloop_agent::run_fleet(
        template,
        "kafka-outage",
        devices,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    ));
    wait_for(Duration::from_secs(60), "readings in Parquet", || {
        let rows = read_rows(&stack.parquet);
        async move { Ok((rows?.len() >= 300).then_some(())) }
    })
    .await?;

    // Watch the broker for the rest of the test: its memory, /readyz, and
    // how many records wait for Kafka.
    #[derive(Debug, Default)]
    struct Watched {
        max_rss_kib: u64,
        not_ready: u32,
        ready_after_not_ready: bool,
        max_in_flight: f64,
    }
    let watched = Arc::new(std::sync::Mutex::new(Watched::default()));
    let stop_watching = CancellationToken::new();
    let watcher = {
        let (watched, stop) = (watched.clone(), stop_watching.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let rss = edgeloop_tests::rss_kib(broker_pid).unwrap_or(0);
                let status = http_status(metrics, "/readyz").await;
                let in_flight = http_get(metrics, "/metrics")
                    .await
                    .ok()
                    .and_then(|m| metric(&m, "edgeloop_bridge_in_flight_records"));
                {
                    let mut w = watched.lock().unwrap_or_else(|p| p.into_inner());
                    w.max_rss_kib = w.max_rss_kib.max(rss);
                    if status == Some(503) {
                        w.not_ready += 1;
                    } else if status == Some(200) && w.not_ready > 0 {
                        w.ready_after_not_ready = true;
                    }
                    w.max_in_flight = w.max_in_flight.max(in_flight.unwrap_or(0.0));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };

    // A crash of Kafka (SIGKILL), restarted 30 s later on the same address
    // with the same storage.
    stack.kafka.kill_keeping_storage().await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    ensure!(
        !fleet.is_finished(),
        "the devices cannot have finished while Kafka was down"
    );
    if let Some(broker) = stack.broker.as_mut() {
        broker.check_running()?;
    }
    {
        let w = watched.lock().unwrap_or_else(|p| p.into_inner());
        ensure!(w.not_ready > 0, "/readyz said ready all through the outage");
        ensure!(
            w.max_in_flight == f64::from(in_flight_limit),
            "the outage should fill the in-flight limit, and never pass it: {w:?}"
        );
    }
    stack.kafka.start_again().await?;

    let reports = tokio::time::timeout(Duration::from_secs(180), fleet)
        .await
        .context("the devices did not drain after Kafka came back")???;
    ensure!(
        reports
            .iter()
            .all(|r| r.committed_seq == per_device && r.next_seq == per_device),
        "spools drained: {reports:?}"
    );
    let total = devices * per_device as usize;
    let rows = wait_for_rows(&stack, total, Duration::from_secs(120)).await?;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("kafka-outage-{i:04}"), per_device))
        .collect();
    check_exactly_once(&rows, &expected)?;

    wait_for(Duration::from_secs(30), "/readyz ready again", || {
        let watched = watched.clone();
        async move {
            let w = watched.lock().unwrap_or_else(|p| p.into_inner());
            Ok(w.ready_after_not_ready.then_some(()))
        }
    })
    .await?;
    stop_watching.cancel();
    watcher.await?;
    let w = watched.lock().unwrap_or_else(|p| p.into_inner());
    eprintln!("the broker through the Kafka outage: {w:?}");
    ensure!(
        w.max_rss_kib > 0 && w.max_rss_kib < 300 * 1024,
        "the broker's RSS stayed under 300 MiB: {w:?}"
    );
    ensure!(
        w.max_in_flight <= f64::from(in_flight_limit),
        "in flight never passed the limit: {w:?}"
    );
    Ok(())
}

/// SIGSTOP / SIGCONT to a process (the Kafka-API broker): it stalls, with
/// its connections open, as a broker in a long GC pause or on a saturated
/// disk does.
async fn signal(pid: u32, signal: &str) -> Result<()> {
    let status = tokio::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await?;
    ensure!(status.success(), "kill {signal} {pid}: {status}");
    Ok(())
}

/// A stack whose rumqttd telemetry log keeps 128 KiB for certain (64 KiB ×
/// (3 − 1)), so the bridge may lag 64 KiB, and whose bridge has 4 records
/// in flight at most, so a stall of Kafka fills them at once; a held publish
/// waits `max_hold` at most. Returns it with the broker's metrics address
/// and the Kafka-API broker's pid.
async fn stack_with_a_small_log(max_hold: &str) -> Result<(Stack, SocketAddr, u32)> {
    let dir = tempfile::tempdir()?;
    let kafka = edgeloop_tests::start_kafka(dir.path()).await?;
    let kafka_pid = kafka.pid().context("kafka pid")?;
    let mut stack = Stack::around(dir, kafka)?;
    let config = stack.dir.path().join("broker.toml");
    std::fs::write(
        &config,
        format!(
            "[mqtt]\nmax_segment_bytes = 65536\nmax_segment_count = 3\n\
             [bridge]\nmax_in_flight_batches = 4\nmax_hold = \"{max_hold}\"\n"
        ),
    )?;
    let metrics = edgeloop_tests::free_addr()?;
    stack.broker_args = vec![
        "--config".into(),
        config.to_string_lossy().into_owned(),
        "--metrics-listen".into(),
        metrics.to_string(),
    ];
    stack.start_broker().await?;
    Ok((stack, metrics, kafka_pid))
}

/// Devices of [`small_log_fleet`].
const SMALL_LOG_DEVICES: usize = 3;

/// A fleet running in the test, with its agents' reports at the end.
type FleetTask =
    tokio::task::JoinHandle<Result<Vec<edgeloop_agent::AgentReport>, edgeloop_agent::Error>>;

/// 3 devices × 1,000 readings/s in batches of 50 (≈ 2.3 KB each): a
/// 10-second stall is ≈ 7 MB, far more than the log.
fn small_log_fleet(
    stack: &Stack,
    prefix: &'static str,
    per_device: u64,
    resend_after: Duration,
    stats: Arc<AgentStats>,
) -> FleetTask {
    let mut template = stack.agent("unused", 701, per_device, 1_000.0, 50);
    template.spool.dir = stack.dir.path().join("spool").join(prefix);
    template.uplink.resend_after = resend_after;
    tokio::spawn(edgeloop_agent::run_fleet(
        template,
        prefix,
        SMALL_LOG_DEVICES,
        CancellationToken::new(),
        stats,
    ))
}

/// Stops Kafka (SIGSTOP) for `stall` once readings flow, watching the
/// bridge's lag; returns (most lag seen, the limit, publishes held).
async fn stall_kafka(
    stack: &Stack,
    metrics: SocketAddr,
    kafka_pid: u32,
    stall: Duration,
) -> Result<(f64, f64, f64)> {
    wait_for(Duration::from_secs(60), "readings in Parquet", || {
        let rows = read_rows(&stack.parquet);
        async move { Ok((rows?.len() >= 1_000).then_some(())) }
    })
    .await?;
    signal(kafka_pid, "-STOP").await?;
    let stalled = tokio::time::Instant::now();
    let (mut max_lag, mut limit) = (0f64, 0f64);
    while stalled.elapsed() < stall {
        let m = http_get(metrics, "/metrics").await?;
        max_lag = max_lag.max(metric(&m, "edgeloop_bridge_lag_bytes").unwrap_or(0.0));
        limit = metric(&m, "edgeloop_bridge_max_lag_bytes").unwrap_or(0.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    signal(kafka_pid, "-CONT").await?;
    let m = http_get(metrics, "/metrics").await?;
    let held = metric(&m, "edgeloop_gate_publishes_held_total").unwrap_or(0.0);
    Ok((max_lag, limit, held))
}

/// A stack with a small log ([`stack_with_a_small_log`]), its processor,
/// and a [`small_log_fleet`] whose Kafka was stalled ([`stall_kafka`]).
struct StalledKafka {
    stack: Stack,
    _processor: Component,
    metrics: SocketAddr,
    stats: Arc<AgentStats>,
    fleet: FleetTask,
    max_lag: f64,
    limit: f64,
    held: f64,
}

async fn stall_kafka_under_a_small_log_fleet(
    max_hold: &str,
    prefix: &'static str,
    per_device: u64,
    resend_after: Duration,
    stall: Duration,
) -> Result<StalledKafka> {
    let (stack, metrics, kafka_pid) = stack_with_a_small_log(max_hold).await?;
    let processor = stack.processor("processor")?;
    let stats = Arc::new(AgentStats::default());
    let fleet = small_log_fleet(&stack, prefix, per_device, resend_after, stats.clone());
    let (max_lag, limit, held) = stall_kafka(&stack, metrics, kafka_pid, stall).await?;
    Ok(StalledKafka {
        stack,
        _processor: processor,
        metrics,
        stats,
        fleet,
        max_lag,
        limit,
        held,
    })
}

/// Waits up to `limit` for the fleet of [`small_log_fleet`] to drain (`why`
/// names what a timeout means), then for its readings, each in Parquet once.
async fn drained_and_in_parquet_once(
    stack: &Stack,
    fleet: FleetTask,
    prefix: &str,
    per_device: u64,
    limit: Duration,
    why: &'static str,
) -> Result<()> {
    let reports = tokio::time::timeout(limit, fleet).await.context(why)???;
    ensure!(
        reports
            .iter()
            .all(|r| r.committed_seq == per_device && r.next_seq == per_device),
        "spools drained: {reports:?}"
    );
    let rows = wait_for_rows(
        stack,
        SMALL_LOG_DEVICES * per_device as usize,
        Duration::from_secs(120),
    )
    .await?;
    let expected: HashMap<String, u64> = (0..SMALL_LOG_DEVICES)
        .map(|i| (format!("{prefix}-{i:04}"), per_device))
        .collect();
    check_exactly_once(&rows, &expected)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_kafka_holds_the_devices_back_instead_of_the_broker_dropping_their_telemetry(
) -> Result<()> {
    // A publish may wait 30 s, longer than the stall. A device resends only
    // after its watermark has not moved for 120 s, so had the broker dropped
    // anything, the spools could not drain within the time below.
    let per_device = 30_000u64;
    let run = stall_kafka_under_a_small_log_fleet(
        "30s",
        "stalled-kafka",
        per_device,
        Duration::from_secs(120),
        Duration::from_secs(10),
    )
    .await?;
    let (max_lag, limit, held) = (run.max_lag, run.limit, run.held);
    ensure!(limit == 65_536.0, "the lag limit is half the log: {limit}");
    ensure!(held > 0.0, "the gate held no publish while Kafka stalled");
    ensure!(
        max_lag > 0.0 && max_lag <= limit,
        "the bridge's lag stayed within the limit: {max_lag} of {limit}"
    );

    drained_and_in_parquet_once(
        &run.stack,
        run.fleet,
        "stalled-kafka",
        per_device,
        Duration::from_secs(90),
        "the spools did not drain: the broker dropped telemetry the devices must resend",
    )
    .await?;
    let resent = run
        .stats
        .readings_resent
        .load(std::sync::atomic::Ordering::Relaxed);
    ensure!(resent == 0, "{resent} readings were sent twice");
    let log = std::fs::read_to_string(&run.stack.broker.as_ref().context("broker")?.log)?;
    ensure!(
        !log.contains("jumped"),
        "rumqttd skipped part of a log (\"Read cursor start jumped\"):\n{log}"
    );
    eprintln!("stalled Kafka: {held} publishes held, the bridge at most {max_lag} bytes behind");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_longer_than_max_hold_lets_telemetry_in_and_the_count_recovers_after() -> Result<()>
{
    // Holds end after 1 s: the stall of 8 s outlasts them, publishes go in
    // anyway (owed to the budget), the log rolls and devices resend (5 s).
    let per_device = 20_000u64;
    let run = stall_kafka_under_a_small_log_fleet(
        "1s",
        "long-stall",
        per_device,
        Duration::from_secs(5),
        Duration::from_secs(8),
    )
    .await?;
    let (max_lag, limit, held, metrics) = (run.max_lag, run.limit, run.held, run.metrics);
    ensure!(held > 0.0, "the gate held no publish while Kafka stalled");
    ensure!(
        max_lag > limit,
        "held publishes went in after max_hold, past the limit: {max_lag} of {limit}"
    );

    // Nothing stays stuck: the fleet drains, every reading lands once, and
    // the count is back under the limit (the debt paid or reset).
    drained_and_in_parquet_once(
        &run.stack,
        run.fleet,
        "long-stall",
        per_device,
        Duration::from_secs(120),
        "the spools did not drain after a stall longer than max_hold",
    )
    .await?;
    let lag = wait_for(
        Duration::from_secs(30),
        "the bridge's lag back to 0",
        || async move {
            let m = http_get(metrics, "/metrics").await?;
            let lag = metric(&m, "edgeloop_bridge_lag_bytes").unwrap_or(f64::MAX);
            Ok((lag == 0.0).then_some(lag))
        },
    )
    .await?;
    eprintln!(
        "stall past max_hold: {held} publishes held, lag at most {max_lag} of {limit}, {lag} after, {} readings resent",
        run.stats.readings_resent.load(std::sync::atomic::Ordering::Relaxed)
    );
    Ok(())
}

// SIGTERM under load, to each component: it exits by itself within its
// configured grace period (set here through the environment, as Kubernetes
// would), and nothing it acknowledged is lost.

/// The last ack watermark of each device in `edgeloop.acks`: what the
/// bridge acknowledged (it writes there right after it publishes
/// `ack/{device}`, and only what Kafka holds).
fn acked_in_kafka(kafka: &LocalKafka) -> Result<HashMap<String, u64>> {
    let mut out = HashMap::new();
    for m in read_topic(kafka, topics::KAFKA_ACKS)? {
        let device = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
        let ack = Ack::decode(m.payload().unwrap_or_default())?;
        out.insert(device, ack.committed_seq);
    }
    Ok(out)
}

/// Every reading each device was acknowledged is in the Kafka readings topic.
fn acknowledged_readings_are_in_kafka(kafka: &LocalKafka) -> Result<u64> {
    let acked = acked_in_kafka(kafka)?;
    ensure!(!acked.is_empty(), "nothing was acknowledged");
    let mut seqs: HashMap<String, BTreeSet<u64>> = HashMap::new();
    for m in edgeloop_tests::read_topic(kafka, topics::KAFKA_READINGS)? {
        let b = ReadingBatch::decode(m.payload().unwrap_or_default())?;
        seqs.entry(b.device_id.clone())
            .or_default()
            .extend(b.first_seq..b.end_seq());
    }
    let mut total = 0;
    for (device, watermark) in &acked {
        let held = seqs.get(device).cloned().unwrap_or_default();
        let missing: Vec<u64> = (0..*watermark).filter(|s| !held.contains(s)).collect();
        ensure!(
            missing.is_empty(),
            "{device}: acknowledged up to {watermark} but {} of those are not in Kafka (first {:?})",
            missing.len(),
            missing.first()
        );
        total += watermark;
    }
    Ok(total)
}

fn fleet(stack: &Stack, prefix: &'static str, devices: usize, per_device: u64) -> FleetTask {
    let mut template = stack.agent("unused", 700, per_device, 400.0, 20);
    template.spool.dir = stack.dir.path().join("spool").join(prefix);
    template.shutdown_grace = Duration::from_secs(60);
    tokio::spawn(edgeloop_agent::run_fleet(
        template,
        prefix,
        devices,
        CancellationToken::new(),
        Arc::new(AgentStats::default()),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_broker_under_load_exits_within_its_grace_and_loses_no_acknowledged_reading(
) -> Result<()> {
    let mut stack = Stack::without_broker().await?;
    let grace = Duration::from_secs(4);
    let (mqtt, bootstrap) = (stack.mqtt.to_string(), stack.kafka.bootstrap());
    let broker_args = [
        "broker",
        "--listen",
        &mqtt,
        "--kafka",
        &bootstrap,
        "--allow-anonymous",
    ];
    let env = [(
        "EDGELOOP_BROKER__SHUTDOWN_GRACE".to_string(),
        "4s".to_string(),
    )];
    let mut broker = Component::start_with_env(
        &edgeloop_bin(),
        "broker-1",
        &broker_args,
        &env,
        stack.dir.path(),
    )?;
    let addr = stack.mqtt;
    wait_for(
        Duration::from_secs(60),
        "the MQTT listener",
        || async move { Ok(tokio::net::TcpStream::connect(addr).await.ok().map(|_| ())) },
    )
    .await?;
    let _processor = stack.processor("processor")?;
    let (devices, per_device) = (3usize, 6_000u64);
    let fleet = fleet(&stack, "bterm", devices, per_device);
    wait_for(Duration::from_secs(60), "acks under way", || {
        let acked = acked_in_kafka(&stack.kafka);
        async move { Ok(acked?.values().any(|w| *w >= 500).then_some(())) }
    })
    .await?;
    broker.check_running()?;
    // It exits by itself within its grace period, plus start-up slack.
    broker.terminate(grace + Duration::from_secs(5)).await?;
    let acked = acknowledged_readings_are_in_kafka(&stack.kafka)?;
    ensure!(
        acked < (devices as u64) * per_device,
        "the SIGTERM came after the load: nothing was in flight"
    );
    // A new broker: the devices send what they still hold, and every
    // reading lands once.
    stack.start_broker().await?;
    let reports = tokio::time::timeout(Duration::from_secs(180), fleet).await???;
    ensure!(
        reports.iter().all(|r| r.committed_seq == per_device),
        "{reports:?}"
    );
    let total = devices * per_device as usize;
    let rows = wait_for_rows(&stack, total, Duration::from_secs(120)).await?;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("bterm-{i:04}"), per_device))
        .collect();
    check_exactly_once(&rows, &expected)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_the_processor_under_load_exits_within_its_grace_with_every_committed_record_in_parquet(
) -> Result<()> {
    let stack = Stack::start().await?;
    let grace = Duration::from_secs(10);
    let bootstrap = stack.kafka.bootstrap();
    let parquet = stack.parquet.to_string_lossy().into_owned();
    let processor_args = |name: &'static str| {
        [
            "processor",
            "--kafka",
            &bootstrap,
            "--group-id",
            &stack.group,
            "--parquet-root",
            &parquet,
            "--max-age",
            "1s",
            "--instance-id",
            name,
        ]
        .map(str::to_string)
    };
    let env = [(
        "EDGELOOP_PROCESSOR__SHUTDOWN_GRACE".to_string(),
        "10s".to_string(),
    )];
    let args = processor_args("processor-0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut processor = Component::start_with_env(
        &edgeloop_bin(),
        "processor-1",
        &args,
        &env,
        stack.dir.path(),
    )?;
    let (devices, per_device) = (3usize, 6_000u64);
    let fleet = fleet(&stack, "pterm", devices, per_device);
    let root = stack.parquet.clone();
    wait_for(Duration::from_secs(60), "two Parquet files", || {
        let files = parquet_files(&root);
        async move { Ok((files?.len() >= 2).then_some(())) }
    })
    .await?;
    processor.check_running()?;
    processor.terminate(grace + Duration::from_secs(5)).await?;

    // Every record below the group's committed offsets is in Parquet.
    let consumer = edgeloop_tests::kafka_consumer(&stack.kafka, &stack.group)?;
    let mut assignment = rdkafka::TopicPartitionList::new();
    for p in 0..4 {
        assignment.add_partition(topics::KAFKA_READINGS, p);
    }
    let committed =
        edgeloop_kafka::committed_offsets(&consumer, &assignment, Duration::from_secs(10))?;
    let committed: HashMap<i32, i64> = committed
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            rdkafka::Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect();
    ensure!(
        !committed.is_empty(),
        "nothing committed before the SIGTERM"
    );
    let in_parquet: BTreeSet<(String, i64)> = read_rows(&stack.parquet)?
        .into_iter()
        .map(|r| (r.device_id, r.seq))
        .collect();
    let mut checked = 0;
    for m in read_topic(&stack.kafka, topics::KAFKA_READINGS)? {
        if committed
            .get(&m.partition())
            .is_some_and(|c| m.offset() < *c)
        {
            let b = ReadingBatch::decode(m.payload().unwrap_or_default())?;
            for seq in b.first_seq..b.end_seq() {
                ensure!(
                    in_parquet.contains(&(b.device_id.clone(), seq as i64)),
                    "{} seq {seq} is below the committed offset of partition {} but not in Parquet",
                    b.device_id,
                    m.partition()
                );
                checked += 1;
            }
        }
    }
    ensure!(checked > 0, "no committed record to check");

    // Restarted, it takes up where it committed: every reading once.
    let args = processor_args("processor-0");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut processor = Component::start_with_env(
        &edgeloop_bin(),
        "processor-2",
        &args,
        &env,
        stack.dir.path(),
    )?;
    let reports = tokio::time::timeout(Duration::from_secs(180), fleet).await???;
    ensure!(
        reports.iter().all(|r| r.committed_seq == per_device),
        "{reports:?}"
    );
    let total = devices * per_device as usize;
    wait_for_rows(&stack, total, Duration::from_secs(120)).await?;
    processor.terminate(grace + Duration::from_secs(5)).await?;
    let expected: HashMap<String, u64> = (0..devices)
        .map(|i| (format!("pterm-{i:04}"), per_device))
        .collect();
    check_exactly_once(&read_rows(&stack.parquet)?, &expected)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_to_an_agent_under_load_exits_within_its_grace_and_its_spool_keeps_the_rest(
) -> Result<()> {
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let grace = Duration::from_secs(3);
    let spool = stack.dir.path().join("spool-t");
    let mqtt = stack.mqtt.to_string();
    let spool_arg = spool.to_string_lossy().into_owned();
    let ops = edgeloop_tests::free_addr()?;
    let agent = |name: &str, limit: &str, ops: Option<SocketAddr>| {
        let mut args = vec![
            "agent".to_string(),
            "--device-id".into(),
            "termed".into(),
            "--mqtt".into(),
            mqtt.clone(),
            "--rate".into(),
            "2000".into(),
            "--limit".into(),
            limit.into(),
            "--batch-size".into(),
            "50".into(),
            "--spool-dir".into(),
            spool_arg.clone(),
        ];
        if let Some(ops) = ops {
            args.extend(["--metrics-listen".into(), ops.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Component::start_with_env(
            &edgeloop_bin(),
            name,
            &args,
            &[(
                "EDGELOOP_AGENT__SHUTDOWN_GRACE".to_string(),
                "3s".to_string(),
            )],
            stack.dir.path(),
        )
    };
    let mut first = agent("agent-1", "40000", Some(ops))?;
    wait_for(Duration::from_secs(60), "readings in Parquet", || {
        let rows = read_rows(&stack.parquet);
        async move { Ok((rows?.len() >= 200).then_some(())) }
    })
    .await?;
    first.check_running()?;
    // `edgeloop agent --metrics-listen`: the device's own endpoint.
    ensure!(http_status(ops, "/healthz").await == Some(200));
    ensure!(http_status(ops, "/readyz").await == Some(200));
    let metrics = http_get(ops, "/metrics").await?;
    ensure!(
        metric(&metrics, "edgeloop_agent_readings_acknowledged_total") >= Some(200.0)
            && metric(&metrics, "edgeloop_agent_ready") == Some(1.0),
        "{metrics}"
    );
    first.terminate(grace + Duration::from_secs(5)).await?;
    let log = first.tail_log();
    ensure!(
        log.contains("all acknowledged") || log.contains("they stay in the spool"),
        "the agent did not say how it stopped: {log}"
    );
    acknowledged_readings_are_in_kafka(&stack.kafka)?;

    let mut second = agent("agent-2", "500", None)?;
    wait_for(Duration::from_secs(120), "the second run to finish", || {
        let status = second.check_running();
        async move { Ok(status.is_err().then_some(())) }
    })
    .await?;
    let opened = edgeloop_agent::spool::disk::DiskSpool::open(
        edgeloop_agent::spool::disk::DiskSpoolConfig {
            dir: spool.clone(),
            ..Default::default()
        },
        vec![],
    )?;
    let next_seq = edgeloop_agent::spool::Spool::next_seq(&opened);
    let rows = wait_for_rows(&stack, next_seq as usize, Duration::from_secs(60)).await?;
    check_exactly_once(&rows, &HashMap::from([("termed".to_string(), next_seq)]))?;
    ensure!(
        edgeloop_tests::read_losses(&stack.parquet)?.is_empty(),
        "a SIGTERM loses nothing"
    );
    Ok(())
}

/// The control API's token in the tests that start it.
const CONTROL_TOKEN: &str = "test-token-0123456789";

/// A `ReadingBatch` of `device` with channels `a` and `b`, readings
/// `first..first + n` whose values are their seq.
fn two_channel_batch(device: &str, first: u64, n: u64) -> ReadingBatch {
    ReadingBatch {
        device_id: device.into(),
        profile: "f32".into(),
        first_seq: first,
        channels: vec!["a".into(), "b".into()],
        readings: (first..first + n)
            .map(|s| edgeloop_proto::v1::Reading {
                ts_micros: 1_800_000_000_000_000 + s as i64,
                values: vec![s as f64, s as f64],
                true_label: String::new(),
                predictions: Vec::new(),
            })
            .collect(),
        loss: None,
    }
}

/// Publishes `payload` on `topic` with QoS 1.
async fn publish_raw(
    client: &rumqttc::AsyncClient,
    topic: String,
    retain: bool,
    payload: Vec<u8>,
) -> Result<()> {
    client
        .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
        .await?;
    Ok(())
}

/// The `reason` header of a dead letter.
fn reason_of(letter: &rdkafka::message::OwnedMessage) -> String {
    letter
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == "reason").and_then(|h| h.value))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

/// Dead letters keyed `key`, once there are at least `n`.
async fn dead_letters_of(
    stack: &Stack,
    key: &str,
    n: usize,
) -> Result<Vec<rdkafka::message::OwnedMessage>> {
    wait_for(
        Duration::from_secs(60),
        &format!("{n} dead letters of {key}"),
        || {
            let read = read_topic(&stack.kafka, topics::KAFKA_DEADLETTER);
            async move {
                let letters: Vec<_> = read?
                    .into_iter()
                    .filter(|l| l.key() == Some(key.as_bytes()))
                    .collect();
                Ok((letters.len() >= n).then_some(letters))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_invalid_for_its_content_is_acknowledged_dead_lettered_and_its_seqs_recorded_as_lost(
) -> Result<()> {
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let device = "bad-content";
    let (client, mut acks, _pump) = subscriber(stack.mqtt, device, &[topics::ack(device)]).await?;
    // 0..10: valid, with the three non-finite values in it.
    let mut first = two_channel_batch(device, 0, 10);
    first.readings[5].values = vec![f64::INFINITY, f64::NEG_INFINITY];
    first.readings[6].values = vec![f64::NAN, 1.0];
    // 10..20: one reading with three values for two channels.
    let mut values = two_channel_batch(device, 10, 10);
    values.readings[3].values.push(3.0);
    // 20..21: 3,000 channels (the data set would grow to 3,016 columns).
    let mut wide = two_channel_batch(device, 20, 1);
    wide.channels = (0..3000).map(|i| format!("c{i}")).collect();
    wide.readings[0].values = vec![1.0; 3000];
    // 21..22: taken in the year 3000.
    let mut future = two_channel_batch(device, 21, 1);
    future.readings[0].ts_micros = 32_503_680_000_000_000;
    let last = two_channel_batch(device, 22, 10);
    for b in [&first, &values, &wide, &future, &last] {
        publish_raw(&client, topics::telemetry(device), false, b.encode_to_vec()).await?;
    }
    // The device is not left resending the invalid batches forever.
    receive_until(&mut acks, "the ack of 32", |p| {
        let ack = ack_of(p)?;
        ensure!(ack <= 32, "ack {ack} is past what the device sent");
        Ok((ack == 32).then_some(()))
    })
    .await?;

    // Every gap the acknowledged invalid batches left is explained.
    let losses = wait_for(
        Duration::from_secs(60),
        "three invalid_batch losses",
        || {
            let read = edgeloop_tests::read_losses(&stack.parquet);
            async move {
                let mut rows: Vec<(i64, i64)> = read?
                    .into_iter()
                    .filter(|l| l.device_id == device && l.reason == "invalid_batch")
                    .map(|l| (l.first_seq, l.end_seq))
                    .collect();
                rows.sort();
                Ok((rows.len() >= 3).then_some(rows))
            }
        },
    )
    .await?;
    ensure!(losses == [(10, 20), (20, 21), (21, 22)], "{losses:?}");
    let rows = wait_for_rows(&stack, 20, Duration::from_secs(60)).await?;
    let mut seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    seqs.sort();
    ensure!(
        seqs == (0..10).chain(22..32).collect::<Vec<i64>>(),
        "{seqs:?}"
    );
    for row in &rows {
        ensure!(
            row.channels.keys().all(|c| c == "a" || c == "b"),
            "the data set grew columns: {:?}",
            row.channels.keys().collect::<Vec<_>>()
        );
    }
    let value = |seq: i64, channel: &str| -> Result<Option<f64>> {
        let row = rows.iter().find(|r| r.seq == seq).context("row")?;
        Ok(row.channels.get(channel).copied().flatten())
    };
    // NaN, +inf and -inf are all "no value": null.
    ensure!(value(5, "a")?.is_none() && value(5, "b")?.is_none());
    ensure!(value(6, "a")?.is_none() && value(6, "b")? == Some(1.0));
    ensure!(value(7, "a")? == Some(7.0));

    let letters = dead_letters_of(&stack, device, 3).await?;
    let reasons: Vec<String> = letters.iter().map(reason_of).collect();
    ensure!(letters.len() == 3, "{reasons:?}");
    for expected in [
        "3 values for 2 channels",
        "allows at most 64",
        "outside the accepted range",
    ] {
        ensure!(
            reasons.iter().any(|r| r.contains(expected)),
            "no dead letter says {expected:?}: {reasons:?}"
        );
    }
    ensure!(
        letters
            .iter()
            .any(|l| l.payload() == Some(values.encode_to_vec().as_slice())),
        "the dead letter keeps the original bytes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_batch_at_seq_2_pow_64_minus_1_is_refused_and_the_device_goes_on_from_0(
) -> Result<()> {
    let stack = Stack::start().await?;
    let _processor = stack.processor("processor")?;
    let device = "seq-max";
    let (client, mut acks, _pump) = subscriber(stack.mqtt, device, &[topics::ack(device)]).await?;
    let mut last_seq = two_channel_batch(device, 0, 1);
    last_seq.first_seq = u64::MAX;
    publish_raw(
        &client,
        topics::telemetry(device),
        false,
        last_seq.encode_to_vec(),
    )
    .await?;
    send_batch(&client, device, 0, 5).await?;
    // Before: the bridge published an ack of u64::MAX with nothing in Kafka
    // and skipped every later batch of the device.
    receive_until(&mut acks, "the ack of 5", |p| {
        let ack = ack_of(p)?;
        ensure!(ack <= 5, "ack {ack} is past what the device sent");
        Ok((ack == 5).then_some(()))
    })
    .await?;
    let rows = wait_for_rows(&stack, 5, Duration::from_secs(60)).await?;
    check_exactly_once(&rows, &HashMap::from([(device.to_string(), 5)]))?;
    let letters = dead_letters_of(&stack, device, 1).await?;
    ensure!(
        reason_of(&letters[0]).contains("largest seq"),
        "{}",
        reason_of(&letters[0])
    );
    ensure!(
        edgeloop_tests::read_losses(&stack.parquet)?.is_empty(),
        "an impossible seq is not recorded as lost"
    );
    Ok(())
}

/// A `DeviceStatus` of `device` as the agent sends it.
fn status_of(device: &str, agent_version: &str, ts_micros: i64) -> DeviceStatus {
    DeviceStatus {
        device_id: device.into(),
        profile: "f32".into(),
        agent_version: agent_version.into(),
        online: true,
        ts_micros,
        ..DeviceStatus::default()
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Runs `edgeloop ctl --addr ADDR ARGS…` with the token; its exit status
/// and what it printed.
async fn ctl(addr: SocketAddr, args: &[&str]) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(edgeloop_bin())
        .arg("ctl")
        .arg("--addr")
        .arg(addr.to_string())
        .args(args)
        .env("EDGELOOP_CONTROL_TOKEN", CONTROL_TOKEN)
        .output()
        .await?)
}

/// `ctl ARGS… --json`, parsed.
async fn ctl_json(addr: SocketAddr, args: &[&str]) -> Result<serde_json::Value> {
    let mut with_json = args.to_vec();
    with_json.push("--json");
    let out = ctl(addr, &with_json).await?;
    ensure!(
        out.status.success(),
        "edgeloop ctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A processor with the control API and `/metrics`; their addresses.
fn processor_with_control(stack: &Stack) -> Result<(Component, SocketAddr, SocketAddr)> {
    let control = edgeloop_tests::free_addr()?;
    let metrics = edgeloop_tests::free_addr()?;
    let (control_arg, metrics_arg) = (control.to_string(), metrics.to_string());
    let processor = stack.processor_with(
        "processor",
        &[
            "--control-listen",
            &control_arg,
            "--control-token",
            CONTROL_TOKEN,
            "--metrics-listen",
            &metrics_arg,
        ],
    )?;
    Ok((processor, control, metrics))
}

async fn metric_at_least(addr: SocketAddr, name: &str, n: f64) -> Result<()> {
    wait_for(
        Duration::from_secs(60),
        &format!("{name} >= {n}"),
        || async move {
            let Ok(text) = http_get(addr, "/metrics").await else {
                return Ok(None);
            };
            Ok(metric(&text, name).filter(|v| *v >= n).map(|_| ()))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_naming_another_device_is_refused_and_that_device_keeps_its_own_record(
) -> Result<()> {
    let mut stack = Stack::without_broker().await?;
    let broker_metrics = edgeloop_tests::free_addr()?;
    stack.broker_args = vec!["--metrics-listen".into(), broker_metrics.to_string()];
    stack.start_broker().await?;
    let (_processor, control, processor_metrics) = processor_with_control(&stack)?;
    let now = now_micros();
    let (victim, _victim_rx, _victim_pump) = subscriber(stack.mqtt, "victim", &[]).await?;
    publish_raw(
        &victim,
        topics::status("victim"),
        true,
        status_of("victim", "victim-1.0", now).encode_to_vec(),
    )
    .await?;
    wait_for(
        Duration::from_secs(60),
        "the victim's status in the control API",
        || async move {
            let Ok(d) = ctl_json(control, &["device", "victim"]).await else {
                return Ok(None);
            };
            Ok((d["agent_version"] == "victim-1.0").then_some(()))
        },
    )
    .await?;

    // Through the broker: published on status/forger, naming the victim.
    let (forger, _forger_rx, _forger_pump) = subscriber(stack.mqtt, "forger", &[]).await?;
    let mut forged = status_of("victim", "forged", now + 1_000_000);
    forged.last_model_error = "forged".into();
    publish_raw(
        &forger,
        topics::status("forger"),
        true,
        forged.encode_to_vec(),
    )
    .await?;
    metric_at_least(
        broker_metrics,
        "edgeloop_bridge_statuses_refused_total",
        1.0,
    )
    .await?;
    let letters = dead_letters_of(&stack, "forger", 1).await?;
    ensure!(
        reason_of(&letters[0]).contains("names device \"victim\""),
        "{}",
        reason_of(&letters[0])
    );
    // Straight into edgeloop.status, as a bridge that did not check would
    // have filed it: the control API refuses it too.
    produce(
        &stack.kafka,
        topics::KAFKA_STATUS,
        "forger",
        &forged.encode_to_vec(),
    )
    .await?;
    metric_at_least(
        processor_metrics,
        "edgeloop_processor_statuses_refused_total",
        1.0,
    )
    .await?;

    let d = ctl_json(control, &["device", "victim"]).await?;
    ensure!(d["agent_version"] == "victim-1.0", "{d}");
    ensure!(d["last_model_error"] == "", "{d}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_devices_prints_its_table_after_a_device_sent_timestamps_out_of_range() -> Result<()> {
    let stack = Stack::start().await?;
    let (_processor, control, _metrics) = processor_with_control(&stack)?;
    let device = "bad-clock";
    let (client, _rx, _pump) = subscriber(stack.mqtt, device, &[]).await?;
    publish_raw(
        &client,
        topics::status(device),
        true,
        status_of(device, "1.0", now_micros()).encode_to_vec(),
    )
    .await?;
    let mut bad = two_channel_batch(device, 0, 3);
    for (r, ts) in bad
        .readings
        .iter_mut()
        .zip([i64::MAX, i64::MIN, 32_503_680_000_000_000])
    {
        r.ts_micros = ts;
    }
    publish_raw(
        &client,
        topics::telemetry(device),
        false,
        bad.encode_to_vec(),
    )
    .await?;
    publish_raw(
        &client,
        topics::status(device),
        true,
        status_of(device, "1.0", i64::MAX).encode_to_vec(),
    )
    .await?;
    publish_raw(
        &client,
        topics::telemetry(device),
        false,
        two_channel_batch(device, 3, 1).encode_to_vec(),
    )
    .await?;
    // Seq 3 comes after the bad batch in the device's partition: once it is
    // in the data set, the bad batch was handled.
    wait_for_rows(&stack, 1, Duration::from_secs(60)).await?;
    wait_for(
        Duration::from_secs(60),
        "the device in the control API",
        || async move {
            let Ok(d) = ctl_json(control, &["device", device]).await else {
                return Ok(None);
            };
            Ok((d["readings_seen"].as_u64() >= Some(1)).then_some(()))
        },
    )
    .await?;

    let out = ctl(control, &["devices"]).await?;
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "edgeloop ctl devices failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(table.contains(device), "{table}");
    let out = ctl(control, &["device", device]).await?;
    ensure!(
        out.status.success(),
        "edgeloop ctl device failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The readings out of range are refused, their seqs explained.
    let losses = edgeloop_tests::read_losses(&stack.parquet)?;
    ensure!(
        losses.iter().any(|l| l.device_id == device
            && l.reason == "invalid_batch"
            && (l.first_seq, l.end_seq) == (0, 3)),
        "{losses:?}"
    );
    let rows = read_rows(&stack.parquet)?;
    ensure!(
        rows.iter().all(|r| r.seq == 3),
        "{:?}",
        rows.iter()
            .map(|r| (r.seq, r.ts_micros))
            .collect::<Vec<_>>()
    );
    Ok(())
}
