//! The broker: an embedded rumqttd that devices connect to, and the bridge
//! that carries their telemetry into Kafka and the ack watermark and the
//! models back.
//!
//! - [`config`]: the broker's TOML configuration.
//! - [`bridge`]: MQTT `telemetry/+` → Kafka `edgeloop.readings`, delivery
//!   reports → retained `ack/{device}` and `edgeloop.acks` ([`bridge::acks`]
//!   computes the watermark, [`bridge::ack_log`] writes it to Kafka);
//!   Kafka `edgeloop.models` → retained `models/{task}/{profile}`
//!   ([`bridge::models`]).
//! - [`ops`]: `/healthz`, `/readyz` and Prometheus `/metrics`
//!   (`metrics_listen`).
//! - [`gate`]: the listeners devices reach (TCP and TLS, MQTT 3.1.1 and 5):
//!   authentication and per-device topic ACLs in front of rumqttd, which
//!   listens on loopback only (the module docs explain the design).
//! - [`backpressure`]: the gate lets at most `bridge.max_lag_bytes` of
//!   telemetry into rumqttd ahead of the bridge.
//! - [`stats`]: the broker's counters.
//! - [`replicas`]: several replicas on one Kafka: each follows
//!   `edgeloop.acks` (a device's watermark follows it to any replica) and
//!   `edgeloop.sessions` (the newest session of a device wins).
//!
//! Start-up, in order: create the Kafka topics (`edgeloop.status`,
//! `edgeloop.models`, `edgeloop.acks` and `edgeloop.sessions` compacted);
//! read `edgeloop.acks` back, republish every retained `ack/{device}` and
//! seed the watermarks (the bridge keeps following it); start following
//! `edgeloop.sessions` from its end; read `edgeloop.models` back and
//! republish every model retained; subscribe to telemetry; only then open the MQTT listener. So a device that connects
//! finds its ack and the models retained, as before the restart: rumqttd
//! keeps retained messages only in memory, and Kafka is their source of
//! truth.
//!
//! rumqttd's `Broker::start()` blocks and has no shutdown, so it runs on its
//! own thread; the bridge reaches it through local links. On shutdown the
//! bridge stops taking telemetry, flushes to Kafka and publishes the last
//! acks; the rumqttd thread ends with the process.

pub mod backpressure;
pub mod bridge;
pub mod config;
pub mod gate;
pub mod ops;
pub mod replicas;
pub mod stats;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use config::BrokerConfig;
use edgeloop_proto::topics;
pub use stats::BrokerStats;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid broker config: {0}")]
    Config(String),
    #[error(transparent)]
    Kafka(#[from] edgeloop_kafka::Error),
    #[error(transparent)]
    Bridge(#[from] bridge::BridgeError),
    #[error("the MQTT broker could not start: {0}")]
    Mqtt(String),
    #[error("the MQTT listener on {addr} did not come up within {waited:?}")]
    ListenerTimeout { addr: SocketAddr, waited: Duration },
    #[error("could not listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Credentials(#[from] gate::credentials::CredentialsError),
    #[error(transparent)]
    Tls(#[from] gate::tls::TlsError),
    #[error("could not serve /metrics, /healthz, /readyz on {addr}: {source}")]
    Ops {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// rumqttd behind the gate: loopback listeners for MQTT 3.1.1 and 5 that
/// accept only the gate's per-process credential.
struct Inner {
    /// One listener per `mqtt.listener_threads` for each protocol level.
    v4: Vec<SocketAddr>,
    v5: Vec<SocketAddr>,
    user: String,
    secret: String,
}

impl Inner {
    fn new(threads: usize) -> Result<Inner, Error> {
        use argon2::password_hash::rand_core::{OsRng, RngCore};
        let mut raw = [0u8; 16];
        OsRng.fill_bytes(&mut raw);
        let secret = raw.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Inner {
            v4: (0..threads)
                .map(|_| free_loopback_port())
                .collect::<Result<_, _>>()?,
            v5: (0..threads)
                .map(|_| free_loopback_port())
                .collect::<Result<_, _>>()?,
            user: "edgeloop-gate".into(),
            secret,
        })
    }
}

impl Inner {
    /// The listeners as the readiness probe sees them, named as rumqttd
    /// names them (`rumqttd_config`).
    fn listeners(&self) -> Vec<ops::Listener> {
        let named = |level: u8, addrs: &[SocketAddr]| {
            addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| ops::Listener {
                    name: format!("v{level}-{}", i + 1),
                    addr: *addr,
                    level,
                })
                .collect::<Vec<_>>()
        };
        let mut all = named(4, &self.v4);
        all.extend(named(5, &self.v5));
        all
    }
}

fn free_loopback_port() -> Result<SocketAddr, Error> {
    let addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| Error::Listen { addr, source })?;
    listener
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })
}

/// rumqttd keeps a log per subscription filter, and every device subscribes
/// to its own `ack/{device}`: with the log size of `mqtt.max_segment_*` that
/// is up to 64 MiB of old acks per device, and it only ever grew (at 100,000
/// readings/s from 200 devices the broker gained ~0.4 MiB/s, ~350 bytes per
/// ack; docs/benchmarks.md). An ack is a cumulative watermark and retained,
/// so only the newest one matters: a device's ack log is [`small_log`]s of
/// 1 KiB. rumqttd counts an entry as 4 bytes plus its topic and payload
/// (~45 bytes for an ack) but keeps ~300 for it (the publish and its
/// properties, 232 bytes, and two allocations): 16 KiB segments, as this
/// was, held ~700 acks, ~200 KiB per device, and a fleet of 2,000 filled
/// them for ten minutes (the broker +0.55 MiB/s; with 1 KiB +0.27 MiB/s;
/// docs/benchmarks.md). 1 KiB is ~20 acks a segment. A device further
/// behind skips to the newest ack, which says all the older ones said.
const ACK_LOG_SEGMENT_BYTES: usize = 1 << 10;

/// A log of two segments of `bytes`: the one being written and the one
/// before it. Not one: rumqttd counts the segment being written, so a log of
/// one segment drops it whole when it fills, and a subscriber that had not
/// yet read its last message skips that message (seen in the broker's log
/// as "Read cursor start jumped" by one on `status/+`). With two, a
/// subscriber has a whole segment of time to read on before it skips.
fn small_log(bytes: usize) -> rumqttd::SegmentConfig {
    rumqttd::SegmentConfig {
        max_segment_size: bytes,
        max_segment_count: 2,
    }
}

fn rumqttd_config(config: &config::MqttConfig, inner: &Inner) -> rumqttd::Config {
    let server = |name: &str, listen: SocketAddr| {
        let connections = rumqttd::ConnectionSettings {
            connection_timeout_ms: config.connect_timeout.as_millis().min(u128::from(u16::MAX))
                as u16,
            // The gate refuses a packet over `max_payload_bytes` whole;
            // rumqttd compares the remaining length, a few bytes less, with
            // this, so it takes every packet the gate lets through.
            max_payload_size: config.max_payload_bytes,
            max_inflight_count: config.max_inflight,
            auth: Some(HashMap::from([(inner.user.clone(), inner.secret.clone())])),
            external_auth: None,
            dynamic_filters: true,
        };
        rumqttd::ServerSettings {
            name: name.into(),
            listen,
            tls: None,
            next_connection_delay_ms: 0,
            connections,
        }
    };
    // rumqttd runs each of these on a thread of its own.
    let servers = |level: &str, listens: &[SocketAddr]| {
        listens
            .iter()
            .enumerate()
            .map(|(i, listen)| {
                let name = format!("{level}-{}", i + 1);
                (name.clone(), server(&name, *listen))
            })
            .collect::<HashMap<_, _>>()
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: config.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: config.max_segment_bytes,
            max_segment_count: config.max_segment_count,
            custom_segment: Some(HashMap::from([
                (
                    topics::ACK_FILTER.to_string(),
                    small_log(ACK_LOG_SEGMENT_BYTES),
                ),
                // Small because each status in it keeps the whole 8 KiB
                // read buffer it arrived in alive (MqttConfig's
                // `status_segment_bytes`; docs/operations.md, "Broker
                // memory"). `edgeloop.status` is compacted by device, so a
                // bridge further behind skips to newer statuses.
                (
                    topics::STATUS_FILTER.to_string(),
                    small_log(config.status_segment_bytes),
                ),
            ])),
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(servers("v4", &inner.v4)),
        v5: Some(servers("v5", &inner.v5)),
        ..Default::default()
    }
}

/// Runs the broker and its bridge until `shutdown`. `ready` is cancelled once
/// the MQTT listener accepts connections and the bridge is running.
pub async fn run(
    config: BrokerConfig,
    shutdown: CancellationToken,
    ready: CancellationToken,
    stats: Arc<BrokerStats>,
) -> Result<(), Error> {
    config.validate().map_err(Error::Config)?;
    // The helper tasks below (endpoint, Kafka check, models follower) stop
    // with `shutdown`, and also when this function returns for any reason.
    let tasks = shutdown.child_token();
    // Unready from the first moment of a shutdown, so a load balancer sends
    // new devices elsewhere while this replica closes its connections.
    {
        let (stats, shutdown, tasks) = (stats.clone(), shutdown.clone(), tasks.clone());
        tokio::spawn(async move {
            tasks.cancelled().await;
            if shutdown.is_cancelled() {
                stats.stopping.store(true, Ordering::Relaxed);
            }
        });
    }
    let _stop_tasks = tasks.clone().drop_guard();
    if let Some(addr) = config.metrics_listen {
        let listener = ops::bind(addr)
            .await
            .map_err(|source| Error::Ops { addr, source })?;
        let (stats, tasks) = (stats.clone(), tasks.clone());
        tokio::spawn(async move {
            if let Err(e) = ops::serve(listener, stats, tasks).await {
                tracing::error!(%addr, error = %e, "the operations endpoint stopped");
            }
        });
    }
    // While Kafka is away at start-up the topic creation waits for it (up
    // to two minutes); a shutdown then stops the broker at once (these
    // start-up steps are cancel-safe: dropped, they stop asking).
    let created = shutdown
        .run_until_cancelled(async {
            edgeloop_kafka::ensure_topics(
                &config.kafka,
                &[topics::KAFKA_READINGS, topics::KAFKA_DEADLETTER],
            )
            .await?;
            edgeloop_kafka::ensure_compacted_topics(
                &config.kafka,
                &[
                    topics::KAFKA_STATUS,
                    topics::KAFKA_MODELS,
                    topics::KAFKA_ACKS,
                    topics::KAFKA_SESSIONS,
                ],
            )
            .await
        })
        .await;
    match created {
        Some(created) => created?,
        None => {
            tracing::info!("shutdown requested while waiting for Kafka at start-up: stopping");
            return Ok(());
        }
    }
    let producer = bridge::producer(&config.kafka, &config.bridge, stats.clone())?;
    let replica = Arc::new(replicas::Replica::new(
        config.replica_id(),
        Some(producer.clone()),
        stats.clone(),
    ));
    tracing::info!(replica_id = replica.id(), "broker replica");
    tokio::spawn(ops::check_kafka(
        producer.clone(),
        config.kafka_check_interval,
        stats.clone(),
        tasks.clone(),
    ));

    let inner = Inner::new(config.mqtt.listener_threads())?;
    let broker = rumqttd::Broker::new(rumqttd_config(&config.mqtt, &inner));
    let (mut link_tx, link_rx) = broker
        .link("edgeloop-bridge")
        .map_err(|e| Error::Mqtt(e.to_string()))?;
    // Acks and models are back before devices can connect and before any
    // telemetry is taken.
    let restoring = bridge::restore_acks(
        &config.kafka,
        config.bridge.restore_timeout,
        &mut link_tx,
        replica.clone(),
        &stats,
    );
    let Some(restored) = shutdown.run_until_cancelled(restoring).await else {
        tracing::info!("shutdown requested while reading edgeloop.acks at start-up: stopping");
        return Ok(());
    };
    let restored = restored?;
    // Sessions written from now on: every one this process will have.
    let sessions = bridge::compacted::consumer(&config.kafka, "edgeloop-bridge-sessions")?;
    bridge::compacted::assign_at_end(
        &sessions,
        topics::KAFKA_SESSIONS,
        config.bridge.restore_timeout,
    )
    .await?;
    tokio::spawn(replicas::follow(replica.clone(), sessions, tasks.clone()));
    let (models_tx, models_rx) = broker
        .link("edgeloop-models")
        .map_err(|e| Error::Mqtt(e.to_string()))?;
    let models = bridge::models::Models::catch_up(
        &config.kafka,
        config.bridge.restore_timeout,
        models_tx,
        models_rx,
        stats.clone(),
    )
    .await?;
    let models = tokio::spawn(models.follow(tasks.clone()));
    for filter in [topics::TELEMETRY_FILTER, topics::STATUS_FILTER] {
        link_tx
            .subscribe(filter)
            .map_err(|e| Error::Mqtt(e.to_string()))?;
    }
    let backpressure = Arc::new(backpressure::Backpressure::new(config.max_lag_bytes()));
    BrokerStats::set(&stats.max_lag_bytes, backpressure.limit() as u64);
    start_rumqttd(broker, &inner, &config.mqtt, &stats, &tasks).await?;
    // Stop accepting devices as soon as shutdown begins; the bridge then
    // flushes what it took.
    open_gate(
        &config,
        &inner,
        Some(replica),
        backpressure.clone(),
        &stats,
        &shutdown,
        &tasks,
    )
    .await?;
    stats.mqtt_up.store(true, Ordering::Relaxed);
    ready.cancel();

    let result = bridge::run(
        producer,
        config.bridge.clone(),
        link_tx,
        link_rx,
        restored,
        backpressure,
        shutdown.clone(),
        config.shutdown_grace,
        stats,
    )
    .await;
    tasks.cancel();
    match models.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "the models follower stopped"),
        Err(e) => tracing::warn!(error = %e, "the models follower failed"),
        Ok(Ok(())) => {}
    }
    result?;
    Ok(())
}

/// Starts rumqttd on a thread of its own, waits until its listeners accept
/// connections, probes each once with a CONNECT (`stats.listeners`), and
/// keeps probing every `mqtt.listener_check_interval` until `tasks` ends.
async fn start_rumqttd(
    mut broker: rumqttd::Broker,
    inner: &Inner,
    config: &config::MqttConfig,
    stats: &Arc<BrokerStats>,
    tasks: &CancellationToken,
) -> Result<(), Error> {
    let mqtt_stats = stats.clone();
    std::thread::Builder::new()
        .name("rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the MQTT broker stopped");
            }
            mqtt_stats.mqtt_up.store(false, Ordering::Relaxed);
        })
        .map_err(|e| Error::Mqtt(e.to_string()))?;
    for listen in inner.v4.iter().chain(&inner.v5) {
        wait_listening(*listen, Duration::from_secs(10)).await?;
    }
    let listeners = inner.listeners();
    ops::probe_listeners(
        &listeners,
        &inner.user,
        &inner.secret,
        config.connect_timeout,
        stats,
    )
    .await;
    tokio::spawn(ops::check_listeners(
        listeners,
        inner.user.clone(),
        inner.secret.clone(),
        config.listener_check_interval,
        config.connect_timeout,
        stats.clone(),
        tasks.clone(),
    ));
    Ok(())
}

/// The gate in front of rumqttd: the device listeners (TCP, and TLS when
/// configured) until `shutdown`, and the credentials watcher until `tasks`
/// ends. Returns the gate and the address of its TCP listener.
async fn open_gate(
    config: &BrokerConfig,
    inner: &Inner,
    replica: Option<Arc<replicas::Replica>>,
    backpressure: Arc<backpressure::Backpressure>,
    stats: &Arc<BrokerStats>,
    shutdown: &CancellationToken,
    tasks: &CancellationToken,
) -> Result<(Arc<gate::Gate>, SocketAddr), Error> {
    let credentials = match &config.auth.credentials_file {
        Some(path) => Some(Arc::new(gate::credentials::Credentials::open(path)?)),
        None => None,
    };
    if credentials.is_none() && !config.auth.allow_anonymous {
        tracing::warn!(
            "no auth.credentials_file and anonymous access off: every device will be refused"
        );
    }
    let gate = Arc::new(gate::Gate {
        credentials,
        allow_anonymous: config.auth.allow_anonymous,
        inner_v4: inner.v4.clone(),
        inner_v5: inner.v5.clone(),
        next_upstream: Default::default(),
        inner_user: inner.user.clone(),
        inner_secret: inner.secret.clone(),
        max_packet_bytes: config.mqtt.max_payload_bytes,
        connect_timeout: config.mqtt.connect_timeout,
        connections: Arc::new(tokio::sync::Semaphore::new(config.mqtt.max_connections)),
        stats: stats.clone(),
        backpressure,
        max_hold: config.bridge.max_hold,
        sessions: Default::default(),
        replica,
        refusals: Default::default(),
    });
    tokio::spawn(gate::watch_credentials(
        gate.clone(),
        config.auth.reload_interval,
        tasks.clone(),
    ));
    let addr = config.mqtt.listen;
    let plain = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Listen { addr, source })?;
    let bound = plain
        .local_addr()
        .map_err(|source| Error::Listen { addr, source })?;
    tokio::spawn(gate::serve(gate.clone(), plain, None, shutdown.clone()));
    tracing::info!(listen = %bound, "MQTT listener (TCP) up");
    if let (Some(addr), Some(tls)) = (config.mqtt.tls_listen, &config.tls) {
        let acceptor = gate::tls::acceptor(tls)?;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })?;
        tokio::spawn(gate::serve(
            gate.clone(),
            listener,
            Some(acceptor),
            shutdown.clone(),
        ));
        tracing::info!(listen = %addr, client_certs = tls.client_ca_file.is_some(), "MQTT listener (TLS) up");
    }
    Ok((gate, bound))
}

async fn wait_listening(listen: SocketAddr, waited: Duration) -> Result<(), Error> {
    let addr = if listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], listen.port()))
    } else {
        listen
    };
    let deadline = tokio::time::Instant::now() + waited;
    while tokio::time::Instant::now() < deadline {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(Error::ListenerTimeout { addr, waited })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inner() -> Inner {
        Inner {
            v4: vec![SocketAddr::from(([127, 0, 0, 1], 1))],
            v5: vec![SocketAddr::from(([127, 0, 0, 1], 2))],
            user: "u".into(),
            secret: "s".into(),
        }
    }

    #[test]
    fn each_listener_thread_is_a_rumqttd_listener_of_its_own_for_each_protocol_level() {
        let listen = |port| SocketAddr::from(([127, 0, 0, 1], port));
        let inner = Inner {
            v4: vec![listen(1), listen(2), listen(3)],
            v5: vec![listen(4), listen(5), listen(6)],
            ..inner()
        };
        let config = rumqttd_config(&config::MqttConfig::default(), &inner);
        for (servers, want) in [(&config.v4, &inner.v4), (&config.v5, &inner.v5)] {
            let mut listens: Vec<_> = servers.iter().flatten().map(|(_, s)| s.listen).collect();
            listens.sort();
            assert_eq!(&listens, want);
        }
        let names: std::collections::BTreeSet<_> = [&config.v4, &config.v5]
            .into_iter()
            .flatten()
            .flat_map(|servers| servers.values().map(|s| s.name.clone()))
            .collect();
        assert_eq!(names.len(), 6, "{names:?}");
    }

    /// Without the start-up select, the broker keeps asking an absent Kafka
    /// for its topics for two minutes after SIGTERM, and the wait below
    /// times out.
    #[tokio::test]
    async fn a_shutdown_while_kafka_is_away_at_start_up_stops_the_broker_at_once() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = closed.local_addr().expect("addr");
        drop(closed);
        let mut config = BrokerConfig::default();
        config.kafka.bootstrap_servers = addr.to_string();
        config.mqtt.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.auth.allow_anonymous = true;
        let (shutdown, ready) = (CancellationToken::new(), CancellationToken::new());
        let stats = Arc::new(BrokerStats::default());
        let run = tokio::spawn(run(config, shutdown.clone(), ready.clone(), stats));
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(!ready.is_cancelled(), "ready without a Kafka");
        shutdown.cancel();
        let result = tokio::time::timeout(Duration::from_secs(15), run)
            .await
            .expect("the broker did not stop within 15 s of the shutdown")
            .expect("the broker task");
        assert!(result.is_ok(), "{result:?}");
    }

    /// The patch in vendor/rumqttd: a remote link waits for the router's
    /// CONNACK without blocking the thread its listener runs on, so the
    /// other connections there carry on while a device logs in. Here the
    /// "router" is this test, on the same single thread as the link: with a
    /// blocking wait it could never receive the CONNECT, and the runtime
    /// would hang (the thread below would not finish).
    #[test]
    fn a_remote_link_waiting_for_its_connack_leaves_its_thread_free() {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime");
            let outcome = runtime.block_on(async {
                let (router_tx, router_rx) = flume::bounded(10);
                let link = rumqttd::local::LinkBuilder::new("dev-1", router_tx).build_async();
                let router = async move {
                    // The link's CONNECT arrives while the link waits; the
                    // router going away unanswered ends that wait.
                    let (id, connect) = router_rx.recv_async().await.expect("a CONNECT");
                    drop((connect, router_rx));
                    id
                };
                let (built, id) = tokio::join!(link, router);
                (built.is_err(), id)
            });
            let _ = done_tx.send(outcome);
        });
        let outcome = done_rx.recv_timeout(Duration::from_secs(60));
        assert_eq!(
            outcome,
            Ok((true, 0)),
            "the link blocked its thread waiting for the CONNACK"
        );
    }

    /// rumqttd picks a filter's log size by matching the filter a client
    /// subscribed to against the keys of `custom_segment`, with its own
    /// `matches` (`router/logs.rs`, `Data::new`).
    fn log_size_of(config: &rumqttd::Config, filter: &str) -> (usize, usize) {
        let router = &config.router;
        router
            .custom_segment
            .iter()
            .flatten()
            .find(|(pattern, _)| rumqttd::protocol::matches(filter, pattern))
            .map(|(_, s)| (s.max_segment_size, s.max_segment_count))
            .unwrap_or((router.max_segment_size, router.max_segment_count))
    }

    #[test]
    fn the_ack_and_status_logs_are_small_and_the_other_logs_keep_the_configured_size() {
        let mqtt = config::MqttConfig {
            status_segment_bytes: 100_000,
            ..Default::default()
        };
        let rumqttd = rumqttd_config(&mqtt, &inner());
        let configured = (mqtt.max_segment_bytes, mqtt.max_segment_count);
        assert_eq!(
            log_size_of(&rumqttd, &topics::ack("dev-1")),
            (ACK_LOG_SEGMENT_BYTES, 2)
        );
        assert!(ACK_LOG_SEGMENT_BYTES * 2 < configured.0 * configured.1);
        // The bridge's `status/+`, and anyone watching one device's status.
        for filter in [topics::STATUS_FILTER, &topics::status("dev-1")] {
            assert_eq!(log_size_of(&rumqttd, filter), (100_000, 2), "{filter}");
        }
        for filter in [
            topics::TELEMETRY_FILTER,
            &topics::telemetry("dev-1"),
            topics::MODELS_FILTER,
            &topics::models("t", "p"),
        ] {
            assert_eq!(log_size_of(&rumqttd, filter), configured, "{filter}");
        }
    }
}
