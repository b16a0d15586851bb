//! The broker's operations endpoint (`metrics_listen`): `/healthz` (the
//! process answers), `/readyz` (200 only while the MQTT listener is up and
//! Kafka answered the last metadata request) and Prometheus `/metrics`.
//! Every metric is documented in `docs/operations.md`.
//!
//! Kafka's state is not asked per request: [`check_kafka`] asks for the
//! readings topic's metadata every `kafka_check_interval` in the background
//! and records the answer. The HTTP server is `edgeloop-ops`, shared with
//! the processor and the agent.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use edgeloop_proto::topics;
use rdkafka::producer::Producer as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::bridge::Producer;
use crate::stats::BrokerStats;

pub use edgeloop_ops::bind;

/// Serves until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    stats: Arc<BrokerStats>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    edgeloop_ops::serve(listener, Arc::new(Endpoint(stats)), shutdown).await
}

struct Endpoint(Arc<BrokerStats>);

impl edgeloop_ops::Endpoint for Endpoint {
    fn metrics(&self) -> String {
        render(&self.0)
    }

    fn ready(&self) -> Result<(), String> {
        readiness(&self.0)
    }
}

/// Ready while the MQTT listener is up and Kafka answered; otherwise why not.
fn readiness(stats: &BrokerStats) -> Result<(), String> {
    if stats.ready() {
        return Ok(());
    }
    let mut why = Vec::new();
    if !stats.mqtt_up.load(Ordering::Relaxed) {
        why.push("the MQTT listener is not up".to_string());
    }
    if !stats.kafka_up.load(Ordering::Relaxed) {
        why.push("Kafka did not answer the last metadata request".to_string());
    }
    if stats.stopping.load(Ordering::Relaxed) {
        why.push("the broker is shutting down (closing its devices' connections)".to_string());
    }
    let down = stats.listeners_down();
    if !down.is_empty() {
        why.push(format!(
            "rumqttd listener(s) {} did not answer the last CONNECT probe (devices landing there \
             get CONNACK \"server unavailable\"; restart the broker)",
            down.join(", ")
        ));
    }
    Err(why.join("; "))
}

/// One rumqttd listener behind the gate, as [`check_listeners`] probes it.
#[derive(Debug, Clone)]
pub struct Listener {
    /// rumqttd's name for it (`v4-1`, `v5-2`, …).
    pub name: String,
    pub addr: std::net::SocketAddr,
    /// 4 (MQTT 3.1.1) or 5.
    pub level: u8,
}

/// Logs in to `listener` as the gate does (a CONNECT with the gate's
/// credential, client id `edgeloop-probe-{name}`), waiting at most
/// `timeout` for a CONNACK that accepts it, then disconnects.
pub async fn probe_listener(
    listener: &Listener,
    user: &str,
    secret: &str,
    timeout: Duration,
) -> Result<(), String> {
    use crate::gate::packet;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(listener.addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let client_id = format!("edgeloop-probe-{}", listener.name);
        let connect = packet::encode_connect(
            listener.level,
            &client_id,
            Some(user),
            Some(secret.as_bytes()),
        );
        s.write_all(&connect).await.map_err(|e| e.to_string())?;
        let mut buf = Vec::with_capacity(64);
        let len = loop {
            if let Some(len) =
                packet::frame(&buf, 1 << 16).map_err(|e| format!("its answer: {e}"))?
            {
                break len;
            }
            if s.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
                return Err("closed before its CONNACK".to_string());
            }
        };
        match packet::connack_code(&buf[..len]) {
            Some(0) => {
                let _ = s.write_all(&[packet::DISCONNECT << 4, 0]).await;
                Ok(())
            }
            Some(code) => Err(format!("CONNACK code {code:#04x}")),
            None => Err("answered with a packet other than CONNACK".to_string()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("no CONNACK within {timeout:?}")),
    }
}

/// Probes every listener once and records which answered in
/// `stats.listeners`, logging each change.
pub async fn probe_listeners(
    listeners: &[Listener],
    user: &str,
    secret: &str,
    timeout: Duration,
    stats: &BrokerStats,
) {
    let mut results = Vec::with_capacity(listeners.len());
    for l in listeners {
        results.push((
            l.name.clone(),
            probe_listener(l, user, secret, timeout).await,
        ));
    }
    let mut recorded = stats.listeners.lock().unwrap_or_else(|p| p.into_inner());
    let before: std::collections::HashMap<String, bool> = recorded.iter().cloned().collect();
    for (name, result) in &results {
        match (result, before.get(name).copied().unwrap_or(true)) {
            (Err(e), true) => {
                tracing::error!(listener = %name, error = %e, "a rumqttd listener does not answer: not ready")
            }
            (Ok(()), false) => {
                tracing::info!(listener = %name, "the rumqttd listener answers again")
            }
            _ => {}
        }
    }
    *recorded = results
        .into_iter()
        .map(|(name, result)| (name, result.is_ok()))
        .collect();
}

/// [`probe_listeners`] every `interval` until `shutdown`.
pub async fn check_listeners(
    listeners: Vec<Listener>,
    user: String,
    secret: String,
    interval: Duration,
    timeout: Duration,
    stats: Arc<BrokerStats>,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        probe_listeners(&listeners, &user, &secret, timeout, &stats).await;
    }
}

/// Asks Kafka for the readings topic's metadata every `interval` (waiting at
/// most `interval` for the answer) and records whether it answered, until
/// `shutdown`.
pub async fn check_kafka(
    producer: Producer,
    interval: Duration,
    stats: Arc<BrokerStats>,
    shutdown: CancellationToken,
) {
    loop {
        let client = producer.clone();
        let answered = tokio::task::spawn_blocking(move || {
            client
                .client()
                .fetch_metadata(Some(topics::KAFKA_READINGS), interval)
                .map_err(|e| e.to_string())
                .and_then(|m| match m.topics().first().and_then(|t| t.error()) {
                    Some(e) => Err(format!("{e:?}")),
                    None => Ok(()),
                })
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let was = stats.kafka_up.swap(answered.is_ok(), Ordering::Relaxed);
        match (&answered, was) {
            (Ok(()), false) => tracing::info!("Kafka answers: ready"),
            (Err(e), true) => {
                tracing::warn!(error = %e, "Kafka does not answer: not ready")
            }
            _ => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

use edgeloop_ops::{counter, gauge};

/// The Prometheus text exposition of `stats`.
pub fn render(stats: &BrokerStats) -> String {
    let g = BrokerStats::get;
    let mut out = String::new();
    let counters = [
        (
            "edgeloop_bridge_batches_received_total",
            "Telemetry publishes the bridge took from the MQTT broker",
            &stats.batches_received,
        ),
        (
            "edgeloop_bridge_statuses_received_total",
            "Device status messages the bridge took from the MQTT broker",
            &stats.statuses_received,
        ),
        (
            "edgeloop_bridge_watermarks_raised_by_device_total",
            "Ack watermarks raised to the ack a device reported holding, above what was restored",
            &stats.watermarks_raised_by_device,
        ),
        (
            "edgeloop_bridge_batches_skipped_total",
            "Batches not produced again: already acknowledged or on their way",
            &stats.batches_skipped,
        ),
        (
            "edgeloop_bridge_malformed_forwarded_total",
            "Telemetry refused with no seqs to acknowledge (does not decode, names another device, seqs past 2^63-1): forwarded for dead-lettering, not acknowledged",
            &stats.malformed_forwarded,
        ),
        (
            "edgeloop_bridge_batches_invalid_total",
            "Telemetry refused for its content (channels, values, timestamps): acknowledged, dead-lettered and recorded as lost (invalid_batch) by the processor",
            &stats.batches_invalid,
        ),
        (
            "edgeloop_bridge_statuses_refused_total",
            "Device statuses refused (not a DeviceStatus, another device than the topic's, time or seq out of range): dead-lettered",
            &stats.statuses_refused,
        ),
        (
            "edgeloop_bridge_batches_in_kafka_total",
            "Readings records (batches and loss reports) Kafka acknowledged",
            &stats.batches_in_kafka,
        ),
        (
            "edgeloop_bridge_readings_in_kafka_total",
            "Readings in the records Kafka acknowledged",
            &stats.readings_in_kafka,
        ),
        (
            "edgeloop_bridge_delivery_errors_total",
            "Readings and status records Kafka did not take (devices resend them)",
            &stats.delivery_errors,
        ),
        (
            "edgeloop_gate_publishes_held_total",
            "Telemetry publishes held until the bridge caught up (bridge.max_lag_bytes)",
            &stats.publishes_held,
        ),
        (
            "edgeloop_gate_connections_refused_total",
            "Connections closed at accept: the connection limit was reached",
            &stats.connections_refused,
        ),
        (
            "edgeloop_gate_auth_failures_total",
            "CONNECTs refused: unknown identity, wrong password, client id not the credential's, anonymous when off",
            &stats.auth_failures,
        ),
        (
            "edgeloop_gate_acl_refused_publishes_total",
            "Publishes (and will topics) refused by the topic ACLs",
            &stats.acl_refused_publishes,
        ),
        (
            "edgeloop_gate_acl_refused_subscriptions_total",
            "Subscription filters refused by the topic ACLs",
            &stats.acl_refused_subscriptions,
        ),
        (
            "edgeloop_gate_malformed_packets_total",
            "Connections closed for a malformed or oversized packet",
            &stats.malformed_packets,
        ),
        (
            "edgeloop_gate_packets_too_large_total",
            "Connections closed for a packet over mqtt.max_payload_bytes (MQTT 5: DISCONNECT 0x95)",
            &stats.packets_too_large,
        ),
        (
            "edgeloop_gate_sessions_revoked_total",
            "Sessions ended because a credentials reload removed or changed their credential",
            &stats.sessions_revoked,
        ),
        (
            "edgeloop_gate_upstream_login_retries_total",
            "Devices logged in to rumqttd a second time, rumqttd having closed the first log-in without a CONNACK",
            &stats.upstream_login_retries,
        ),
        (
            "edgeloop_gate_publishes_telemetry_total",
            "Publishes let through to telemetry/{device}",
            &stats.publishes_telemetry,
        ),
        (
            "edgeloop_gate_publishes_status_total",
            "Publishes let through to status/{device}",
            &stats.publishes_status,
        ),
        (
            "edgeloop_gate_publishes_other_total",
            "Publishes let through to other topics (service identities)",
            &stats.publishes_other,
        ),
        (
            "edgeloop_bridge_acks_published_total",
            "Ack watermarks published retained on ack/{device}",
            &stats.acks_published,
        ),
        (
            "edgeloop_bridge_records_produced_total",
            "Records handed to the Kafka producer (readings, status and ack records)",
            &stats.records_produced,
        ),
        (
            "edgeloop_bridge_produced_bytes_total",
            "Key and payload bytes of the records handed to the Kafka producer",
            &stats.bytes_produced,
        ),
        (
            "edgeloop_bridge_enqueue_retries_total",
            "Times a record was offered again because the producer's queue was full",
            &stats.enqueue_retries,
        ),
        (
            "edgeloop_bridge_ack_records_total",
            "Ack watermarks Kafka took into edgeloop.acks",
            &stats.ack_records,
        ),
        (
            "edgeloop_bridge_ack_record_errors_total",
            "Ack records Kafka did not take (written again)",
            &stats.ack_record_errors,
        ),
        (
            "edgeloop_bridge_acks_restored_total",
            "Devices whose ack watermark was restored from edgeloop.acks at start-up",
            &stats.acks_restored,
        ),
        (
            "edgeloop_bridge_acks_followed_total",
            "Records of edgeloop.acks read while following it after start-up",
            &stats.acks_followed,
        ),
        (
            "edgeloop_bridge_acks_merged_total",
            "Followed ack records (another replica's watermark) that raised a watermark here",
            &stats.acks_merged,
        ),
        (
            "edgeloop_broker_session_records_total",
            "Session records written to edgeloop.sessions (one per device CONNECT)",
            &stats.session_records,
        ),
        (
            "edgeloop_broker_session_record_errors_total",
            "Session records Kafka did not take",
            &stats.session_record_errors,
        ),
        (
            "edgeloop_gate_sessions_taken_over_total",
            "Local sessions closed because a newer session of the same client id appeared on another replica",
            &stats.sessions_taken_over,
        ),
        (
            "edgeloop_bridge_models_republished_total",
            "Models published retained on models/{task}/{profile} from edgeloop.models",
            &stats.models_republished,
        ),
        (
            "edgeloop_bridge_models_stale_total",
            "Model records ignored because a higher version was already published",
            &stats.models_stale,
        ),
        (
            "edgeloop_bridge_models_cleared_total",
            "Tombstones in edgeloop.models that cleared a retained model",
            &stats.models_cleared,
        ),
        (
            "edgeloop_bridge_records_undecodable_total",
            "Records of edgeloop.models and edgeloop.acks that did not decode (skipped)",
            &stats.records_undecodable,
        ),
    ];
    for (name, help, value) in counters {
        counter(&mut out, name, help, g(value));
    }
    let name = "edgeloop_gate_publish_hold_seconds_total";
    let _ = writeln!(
        out,
        "# HELP {name} Time telemetry publishes waited in the gate for the bridge to catch up.\n# TYPE {name} counter\n{name} {}",
        g(&stats.publish_hold_micros) as f64 / 1e6
    );
    gauge(
        &mut out,
        "edgeloop_bridge_lag_bytes",
        "Telemetry in rumqttd's log not yet taken by the bridge (bytes of log entries)",
        g(&stats.lag_bytes),
    );
    gauge(
        &mut out,
        "edgeloop_bridge_max_lag_bytes",
        "bridge.max_lag_bytes in effect: the gate holds telemetry beyond it (0: off)",
        g(&stats.max_lag_bytes),
    );
    gauge(
        &mut out,
        "edgeloop_bridge_in_flight_records",
        "Readings and status records waiting for Kafka's delivery report",
        g(&stats.in_flight),
    );

    histogram(
        &mut out,
        "edgeloop_bridge_delivery_latency_seconds",
        "Seconds from handing a record to the producer to Kafka's delivery report (delivered records)",
        &stats.delivery_latency,
    );
    histogram(
        &mut out,
        "edgeloop_gate_connect_seconds",
        "Seconds from the gate connecting an authenticated device to rumqttd to rumqttd's CONNACK",
        &stats.connect_latency,
    );

    let up = |b: &std::sync::atomic::AtomicBool| u8::from(b.load(Ordering::Relaxed));
    gauge(
        &mut out,
        "edgeloop_broker_ready",
        "1 while /readyz answers 200 (MQTT listener and every rumqttd listener up, Kafka answering)",
        u8::from(stats.ready()),
    );
    gauge(
        &mut out,
        "edgeloop_gate_connections_open",
        "Device connections open through the gate",
        stats.connections_open.load(Ordering::Relaxed),
    );
    gauge(
        &mut out,
        "edgeloop_broker_mqtt_up",
        "1 while the MQTT listener is up",
        up(&stats.mqtt_up),
    );
    let listeners = stats
        .listeners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let name = "edgeloop_broker_mqtt_listener_up";
    let _ = writeln!(out, "# HELP {name} 1 while a rumqttd listener behind the gate answered its last CONNECT probe.\n# TYPE {name} gauge");
    for (listener, up) in &listeners {
        let _ = writeln!(out, "{name}{{listener=\"{listener}\"}} {}", u8::from(*up));
    }
    gauge(
        &mut out,
        "edgeloop_broker_mqtt_listeners_down",
        "rumqttd listeners behind the gate that did not answer their last CONNECT probe (not ready while above 0)",
        listeners.iter().filter(|(_, up)| !up).count(),
    );
    gauge(
        &mut out,
        "edgeloop_broker_kafka_up",
        "1 if Kafka answered the last metadata request",
        up(&stats.kafka_up),
    );

    let kafka = stats
        .kafka_client
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if kafka.seen {
        gauge(
            &mut out,
            "edgeloop_kafka_producer_queue_messages",
            "Messages in the producer's queues, not yet delivered (librdkafka msg_cnt)",
            kafka.msg_cnt,
        );
        gauge(
            &mut out,
            "edgeloop_kafka_producer_queue_bytes",
            "Bytes of the messages in the producer's queues (librdkafka msg_size)",
            kafka.msg_size,
        );
        counter(
            &mut out,
            "edgeloop_kafka_producer_sent_messages_total",
            "Messages the producer sent to brokers (librdkafka txmsgs)",
            kafka.txmsgs,
        );
        counter(
            &mut out,
            "edgeloop_kafka_producer_sent_bytes_total",
            "Message bytes the producer sent to brokers (librdkafka txmsg_bytes)",
            kafka.txmsg_bytes,
        );
        counter(
            &mut out,
            "edgeloop_kafka_producer_retries_total",
            "Requests the producer sent again, summed over brokers (librdkafka txretries)",
            kafka.txretries,
        );
        counter(
            &mut out,
            "edgeloop_kafka_producer_send_errors_total",
            "Send errors, summed over brokers (librdkafka txerrs)",
            kafka.txerrs,
        );
        counter(
            &mut out,
            "edgeloop_kafka_producer_request_timeouts_total",
            "Requests that timed out, summed over brokers (librdkafka req_timeouts)",
            kafka.req_timeouts,
        );
        let name = "edgeloop_kafka_broker_rtt_seconds";
        let _ = writeln!(out, "# HELP {name} Average round-trip time to a broker over the last statistics interval (librdkafka rtt.avg).\n# TYPE {name} gauge");
        for b in &kafka.brokers {
            let _ = writeln!(
                out,
                "{name}{{broker=\"{}\"}} {}",
                b.name.replace(['"', '\\', '\n'], "_"),
                b.rtt_avg_seconds
            );
        }
        let name = "edgeloop_kafka_broker_up";
        let _ = writeln!(out, "# HELP {name} 1 while the producer's connection to a broker is up (librdkafka state UP).\n# TYPE {name} gauge");
        for b in &kafka.brokers {
            let _ = writeln!(
                out,
                "{name}{{broker=\"{}\"}} {}",
                b.name.replace(['"', '\\', '\n'], "_"),
                u8::from(b.up)
            );
        }
    }
    out
}

/// Appends a histogram of `h` with its HELP and TYPE lines (`help` without
/// the final full stop).
fn histogram(out: &mut String, name: &str, help: &str, h: &crate::stats::LatencyHistogram) {
    let (buckets, count, sum) = h.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} histogram");
    for (bound, n) in buckets {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {n}");
    }
    let _ = writeln!(
        out,
        "{name}_bucket{{le=\"+Inf\"}} {count}\n{name}_sum {sum}\n{name}_count {count}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_has_help_and_type_and_readiness_needs_both_sides() {
        let stats = BrokerStats::default();
        stats.delivery_latency.observe(Duration::from_millis(3));
        {
            let mut k = stats.kafka_client.lock().unwrap_or_else(|p| p.into_inner());
            k.seen = true;
            k.brokers.push(crate::stats::BrokerRtt {
                name: "127.0.0.1:9092/1".into(),
                up: true,
                rtt_avg_seconds: 0.002,
            });
        }
        let text = render(&stats);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line
                .split(['{', ' '])
                .next()
                .unwrap_or_default()
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {name} ")),
                "{name} has no TYPE"
            );
            assert!(name.starts_with("edgeloop_"), "{name}");
        }
        assert!(text.contains("edgeloop_bridge_delivery_latency_seconds_bucket{le=\"0.005\"} 1"));
        assert!(
            text.contains("edgeloop_kafka_broker_rtt_seconds{broker=\"127.0.0.1:9092/1\"} 0.002")
        );

        assert!(readiness(&stats).unwrap_err().contains("MQTT listener"));
        stats.mqtt_up.store(true, Ordering::Relaxed);
        let why = readiness(&stats).unwrap_err();
        assert!(why.contains("Kafka") && !why.contains("MQTT"), "{why}");
        stats.kafka_up.store(true, Ordering::Relaxed);
        assert_eq!(readiness(&stats), Ok(()));
        // A rumqttd listener that stops answering makes the broker unready.
        *stats.listeners.lock().unwrap() = vec![("v4-1".into(), true), ("v4-2".into(), false)];
        let why = readiness(&stats).unwrap_err();
        assert!(why.contains("v4-2") && !why.contains("v4-1"), "{why}");
        let text = render(&stats);
        assert!(text.contains("edgeloop_broker_mqtt_listener_up{listener=\"v4-2\"} 0"));
        assert!(text.contains("edgeloop_broker_mqtt_listeners_down 1"));
        assert!(text.contains("edgeloop_broker_ready 0"));
        // A shutdown makes it unready at once, whatever else holds.
        stats.listeners.lock().unwrap().clear();
        assert_eq!(readiness(&stats), Ok(()));
        stats.stopping.store(true, Ordering::Relaxed);
        let why = readiness(&stats).unwrap_err();
        assert!(why.contains("shutting down"), "{why}");
    }

    /// A listener that accepts and closes, one that accepts and never
    /// answers, and an address nobody listens on: each is found down, with
    /// why.
    #[tokio::test]
    async fn a_listener_that_does_not_answer_a_connect_is_found_down() {
        let closing = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (closing_addr, silent_addr) =
            (closing.local_addr().unwrap(), silent.local_addr().unwrap());
        let nobody = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        tokio::spawn(async move {
            while let Ok((s, _)) = closing.accept().await {
                drop(s);
            }
        });
        let held = tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((s, _)) = silent.accept().await {
                open.push(s);
            }
        });
        let listeners: Vec<Listener> = [
            ("v4-1", closing_addr),
            ("v4-2", silent_addr),
            ("v5-1", nobody),
        ]
        .into_iter()
        .map(|(name, addr)| Listener {
            name: name.into(),
            addr,
            level: 4,
        })
        .collect();
        let stats = BrokerStats::default();
        probe_listeners(&listeners, "u", "s", Duration::from_millis(300), &stats).await;
        assert_eq!(stats.listeners_down(), ["v4-1", "v4-2", "v5-1"]);
        held.abort();
    }

    #[test]
    fn the_operations_doc_describes_every_metric() {
        let doc = include_str!("../../docs/operations.md");
        let stats = BrokerStats::default();
        stats
            .kafka_client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .seen = true;
        let missing = edgeloop_ops::undocumented(&render(&stats), doc);
        assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
    }
}
