//! QoS 1 publishes per second through `edgeloop broker` (the gate, rumqttd
//! and the bridge into Kafka) and, with the same load generator in the same
//! run, through Mosquitto alone; p50/p99 publish-to-PUBACK latency for both.
//!
//! `cargo bench --bench broker -- [SECONDS]` (default 5 per cell);
//! `BENCH_PAYLOADS=100,1024` and `BENCH_CONNECTIONS=1,100,1000` choose the
//! cells, `BENCH_BROKER_LOG` the broker's log filter (default `warn`). Needs
//! Apache Kafka's jars and Java 17+ (`scripts/setup.sh`) and the `mosquitto` binary (Debian package
//! `mosquitto`; `scripts/bench-broker.sh` installs it). Prints figures;
//! asserts nothing.

// A benchmark program: a failure ends it with the reason, like a test.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::Mutex;

const BIN: &str = env!("CARGO_BIN_EXE_edgeloop");

/// How many one-channel readings make a batch of about `bytes` bytes.
fn readings_for(bytes: usize) -> u64 {
    (1..10_000)
        .find(|n| edgeloop_tests::batch("device-0000", 0, *n).len() >= bytes)
        .unwrap_or(10_000)
}

struct Cell {
    published: u64,
    latencies: Vec<Duration>,
}

/// `conns` clients publishing QoS 1 as fast as their in-flight window lets
/// them for `secs`; PUBACKs counted and timed from the publish leaving.
async fn load(addr: SocketAddr, conns: usize, bytes: usize, secs: u64, tag: &str) -> Cell {
    let results = Arc::new(Mutex::new(Cell {
        published: 0,
        latencies: Vec::new(),
    }));
    let deadline = Instant::now() + Duration::from_secs(secs);
    let n = readings_for(bytes);
    let mut tasks = Vec::new();
    for c in 0..conns {
        let results = results.clone();
        let id = format!("{tag}-{c:04}");
        tasks.push(tokio::spawn(async move {
            let mut options = MqttOptions::new(&id, addr.ip().to_string(), addr.port());
            options.set_keep_alive(Duration::from_secs(30));
            options.set_inflight(20);
            options.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = AsyncClient::new(options, 100);
            let topic = format!("telemetry/{id}");
            let publisher = {
                let client = client.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    let mut seq = 0;
                    while Instant::now() < deadline {
                        let p = edgeloop_tests::batch(&id, seq, n);
                        seq += n;
                        if client
                            .publish(&topic, QoS::AtLeastOnce, false, p)
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                })
            };
            let mut sent: HashMap<u16, Instant> = HashMap::new();
            let mut acked = 0u64;
            let mut latencies = Vec::new();
            let stop = deadline + Duration::from_secs(2);
            while Instant::now() < stop {
                let event =
                    tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
                match event {
                    Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                        sent.insert(pkid, Instant::now());
                    }
                    Ok(Ok(Event::Incoming(Packet::PubAck(ack)))) => {
                        if let Some(t) = sent.remove(&ack.pkid) {
                            if Instant::now() <= deadline {
                                acked += 1;
                                latencies.push(t.elapsed());
                            }
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        eprintln!("{id}: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(_) => {
                        if Instant::now() > deadline && sent.is_empty() {
                            break;
                        }
                    }
                }
            }
            publisher.abort();
            // Not `disconnect().await`: the request queue may be full and
            // nothing polls the event loop any more.
            let _ = client.try_disconnect();
            let mut r = results.lock().await;
            r.published += acked;
            r.latencies.extend(latencies);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Arc::try_unwrap(results).ok().unwrap().into_inner()
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// Records in the readings topic now (sum of the partitions' high watermarks).
fn records_in_kafka(consumer: &BaseConsumer) -> i64 {
    let topic = edgeloop_proto::topics::KAFKA_READINGS;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    metadata
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .map(|p| {
            consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .map(|(_, high)| high)
                .unwrap_or(0)
        })
        .sum()
}

/// Waits until the readings topic stops growing (the bridge drained); the
/// count then and when it last grew.
async fn settled(consumer: &BaseConsumer) -> (i64, Instant) {
    let mut last = records_in_kafka(consumer);
    let mut grew = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = records_in_kafka(consumer);
        if now == last && grew.elapsed() > Duration::from_secs(2) {
            return (now, grew);
        }
        if now != last {
            grew = Instant::now();
            last = now;
        }
    }
}

async fn wait_port(addr: SocketAddr) {
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("nothing listens on {addr}");
}

#[tokio::main]
async fn main() {
    let secs: u64 = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with("--"))
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let dir = tempfile::tempdir().expect("tempdir");
    let kafka = edgeloop_tests::start_kafka(dir.path())
        .await
        .expect("Apache Kafka (scripts/setup.sh)");
    let edgeloop_addr = edgeloop_tests::free_addr().expect("port");
    let _broker = edgeloop_tests::Component::start(
        Path::new(BIN),
        "broker",
        &[
            "broker",
            "--listen",
            &edgeloop_addr.to_string(),
            "--kafka",
            &kafka.bootstrap(),
            "--allow-anonymous",
            "--log",
            &std::env::var("BENCH_BROKER_LOG").unwrap_or_else(|_| "warn".into()),
        ],
        dir.path(),
    )
    .expect("edgeloop broker");
    wait_port(edgeloop_addr).await;
    let mosquitto_addr = edgeloop_tests::free_addr().expect("port");
    let conf = dir.path().join("mosquitto.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {} 127.0.0.1\nallow_anonymous true\nmax_inflight_messages 20\nmax_queued_messages 100000\npersistence false\n",
            mosquitto_addr.port()
        ),
    )
    .expect("mosquitto.conf");
    let mut mosquitto = tokio::process::Command::new("mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("mosquitto (apt-get install mosquitto; scripts/bench-broker.sh)");
    wait_port(mosquitto_addr).await;
    let version = std::process::Command::new("mosquitto")
        .arg("-h")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .unwrap_or_default();
    println!("QoS 1 publishes acknowledged per second, {secs} s per cell, one load generator (rumqttc, 20 in flight per connection)");
    println!(
        "edgeloop broker = gate + rumqttd + bridge into Kafka (Apache Kafka, acks=all); peer: {version}"
    );
    let counter: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .set("group.id", "bench-counter")
        .create()
        .expect("Kafka client");
    println!(
        "| payload | connections | edgeloop msg/s | p50 ms | p99 ms | into Kafka msg/s | mosquitto msg/s | p50 ms | p99 ms | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    let mut round = 0;
    let list = |var: &str, default: &[usize]| -> Vec<usize> {
        std::env::var(var)
            .ok()
            .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| default.to_vec())
    };
    for bytes in list("BENCH_PAYLOADS", &[100, 1024]) {
        for conns in list("BENCH_CONNECTIONS", &[1, 100, 1000]) {
            round += 1;
            let mut cells = Vec::new();
            let mut kafka_rate = 0.0;
            for (addr, name) in [(edgeloop_addr, "e"), (mosquitto_addr, "m")] {
                let tag = format!("b{round}{name}");
                let before = records_in_kafka(&counter);
                let start = Instant::now();
                let mut cell = load(addr, conns, bytes, secs, &tag).await;
                if name == "e" {
                    // The bridge's rate: records Kafka acknowledged, from the
                    // start of the load until the topic stopped growing.
                    let (after, last) = settled(&counter).await;
                    kafka_rate = (after - before) as f64 / (last - start).as_secs_f64();
                }
                cell.latencies.sort();
                cells.push(cell);
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            let rate = |c: &Cell| c.published as f64 / secs as f64;
            println!(
                "| {bytes} B | {conns} | {:.0} | {:.1} | {:.1} | {kafka_rate:.0} | {:.0} | {:.1} | {:.1} | {:.2} |",
                rate(&cells[0]),
                percentile(&cells[0].latencies, 0.5),
                percentile(&cells[0].latencies, 0.99),
                rate(&cells[1]),
                percentile(&cells[1].latencies, 0.5),
                percentile(&cells[1].latencies, 0.99),
                rate(&cells[0]) / rate(&cells[1]),
            );
        }
    }
    let _ = mosquitto.kill().await;
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("kept {}", dir.keep().display());
    }
}
