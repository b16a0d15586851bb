//! Gateway mode: an agent that child devices with no link of their own
//! connect to.
//!
//! - An embedded rumqttd listens on `gateway.listen`; children speak the
//!   ordinary device protocol to it (`telemetry/{child}`, `ack/{child}`,
//!   `models/…`), so a child never learns it is behind a gateway.
//! - Each child's batches go into a spool of its own
//!   (`{spool.dir}/children/{child}/`) under the child's own `(device_id,
//!   seq)`; resends are skipped, a batch beyond a gap is refused (the child
//!   resends from its watermark).
//! - Each child gets an uplink of its own to the cloud broker, as the child
//!   (client id = child id), which sends from the child's spool and follows
//!   the cloud's `ack/{child}`.
//! - The cloud's watermark for a child is relayed down as the retained
//!   `ack/{child}` on the local broker, so the child frees its own spool only
//!   once the cloud has its readings: the acknowledgement stays end to end.
//! - Model topics this agent receives (`models/#`) are republished retained on
//!   the local broker for the children.
//!
//! rumqttd cannot be stopped: its thread ends with the process.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgeloop_proto::v1::{Ack, ReadingBatch};
use edgeloop_proto::{topics, Message};
use rumqttd::local::LinkTx;
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, GatewayConfig};
use crate::spool::disk::DiskSpool;
use crate::spool::{Relayed, SharedSpool, SpoolError};
use crate::stats::AgentStats;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway: the local MQTT broker: {0}")]
    Mqtt(String),
    #[error("gateway: the listener on {addr} did not come up")]
    Listener { addr: SocketAddr },
}

struct Child {
    spool: Arc<SharedSpool>,
    /// The watermark last relayed down to the child.
    relayed_ack: Option<u64>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

fn broker_config(gw: &GatewayConfig) -> rumqttd::Config {
    let connections = rumqttd::ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: gw.max_payload_bytes,
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = rumqttd::ServerSettings {
        name: "gateway".into(),
        listen: gw.listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections,
    };
    rumqttd::Config {
        id: 0,
        router: rumqttd::RouterConfig {
            max_connections: gw.max_children + 4,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

async fn publish_retained(
    link: &mut LinkTx,
    topic: String,
    payload: Vec<u8>,
) -> Result<(), GatewayError> {
    let publish = Publish::new(bytes::Bytes::from(topic), bytes::Bytes::from(payload), true);
    link.send(Packet::Publish(publish, None))
        .await
        .map(|_| ())
        .map_err(|e| GatewayError::Mqtt(e.to_string()))
}

/// Opens a child's spool and starts its sync task and uplink.
async fn start_child(
    config: &AgentConfig,
    child_id: &str,
    profile: &str,
    shutdown: &CancellationToken,
    stats: &Arc<AgentStats>,
) -> Result<Child, SpoolError> {
    let mut spool_config = config.spool.clone();
    spool_config.dir = config.spool.dir.join("children").join(child_id);
    let opened = tokio::task::spawn_blocking(move || DiskSpool::open(spool_config, Vec::new()))
        .await
        .map_err(|_| SpoolError::Closed)??;
    let spool = Arc::new(SharedSpool::new(Box::new(opened)));
    let stop = CancellationToken::new();
    let sync = spool.spawn_sync_task(config.spool.sync_interval, stop.clone());
    let mut child_config = config.clone();
    child_config.device_id = child_id.to_string();
    child_config.profile = profile.to_string();
    child_config.gateway = None;
    let uplink = {
        let spool = spool.clone();
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        // The relay never "runs out" of readings: it stops with the agent.
        let never_done = CancellationToken::new();
        tokio::spawn(async move {
            if let Err(e) = crate::uplink::run(
                &child_config,
                spool,
                shutdown,
                never_done,
                stats,
                None,
                None,
            )
            .await
            {
                tracing::error!(child = %child_config.device_id, error = %e, "child uplink stopped");
            }
        })
    };
    let sync = tokio::spawn(async move {
        if let Ok(Err(e)) = sync.await {
            tracing::error!(error = %e, "child spool sync failed");
        }
    });
    tracing::info!(child = child_id, "relaying a new child device");
    Ok(Child {
        spool,
        relayed_ack: None,
        stop,
        tasks: vec![uplink, sync],
    })
}

/// Runs the gateway until `shutdown`.
pub async fn run(
    config: AgentConfig,
    gw: GatewayConfig,
    mut models: mpsc::Receiver<(String, Vec<u8>)>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<(), GatewayError> {
    let mut broker = rumqttd::Broker::new(broker_config(&gw));
    let (mut link_tx, mut link_rx) = broker
        .link("edgeloop-gateway")
        .map_err(|e| GatewayError::Mqtt(e.to_string()))?;
    link_tx
        .subscribe(topics::TELEMETRY_FILTER)
        .map_err(|e| GatewayError::Mqtt(e.to_string()))?;
    std::thread::Builder::new()
        .name("gateway-rumqttd".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "the gateway's MQTT broker stopped");
            }
        })
        .map_err(|e| GatewayError::Mqtt(e.to_string()))?;
    let probe = if gw.listen.ip().is_unspecified() {
        SocketAddr::from(([127, 0, 0, 1], gw.listen.port()))
    } else {
        gw.listen
    };
    let mut up = false;
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(probe).await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if !up {
        return Err(GatewayError::Listener { addr: gw.listen });
    }
    tracing::info!(listen = %gw.listen, "gateway listening for child devices");

    let mut children: HashMap<String, Child> = HashMap::new();
    let mut ack_tick = tokio::time::interval(Duration::from_millis(50));
    ack_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some((topic, payload)) = models.recv() => {
                publish_retained(&mut link_tx, topic, payload).await?;
            }
            _ = ack_tick.tick() => {
                for (id, child) in children.iter_mut() {
                    let (_, acked, _) = child.spool.positions();
                    if child.relayed_ack.is_none_or(|r| acked > r) {
                        let ack = Ack { committed_seq: acked }.encode_to_vec();
                        publish_retained(&mut link_tx, topics::ack(id), ack).await?;
                        child.relayed_ack = Some(acked);
                    }
                }
            }
            notification = link_rx.next() => {
                let publish = match notification {
                    Ok(Some(Notification::Forward(forward))) => forward.publish,
                    Ok(Some(Notification::Unschedule)) => {
                        link_rx.wake().await.map_err(|e| GatewayError::Mqtt(e.to_string()))?;
                        continue;
                    }
                    Ok(_) => continue,
                    Err(e) => return Err(GatewayError::Mqtt(e.to_string())),
                };
                let topic = String::from_utf8_lossy(&publish.topic).into_owned();
                let Some(child_id) = topics::device_of_telemetry(&topic).map(str::to_owned) else {
                    continue;
                };
                let batch = match ReadingBatch::decode(publish.payload.as_ref()) {
                    Ok(b) if b.device_id == child_id && edgeloop_proto::device_id::validate(&child_id).is_ok() => b,
                    _ => {
                        AgentStats::add(&stats.bad_lines, 1);
                        tracing::warn!(child = %child_id, "a child's batch does not decode or names another device; not relayed");
                        continue;
                    }
                };
                if child_id == config.device_id {
                    tracing::warn!(child = %child_id, "a child uses the gateway's own id; not relayed");
                    continue;
                }
                if !children.contains_key(&child_id) {
                    if children.len() >= gw.max_children {
                        tracing::warn!(child = %child_id, max = gw.max_children, "too many child devices; not relayed");
                        continue;
                    }
                    match start_child(&config, &child_id, &batch.profile, &shutdown, &stats).await {
                        Ok(child) => {
                            children.insert(child_id.clone(), child);
                        }
                        Err(e) => {
                            tracing::error!(child = %child_id, error = %e, "could not open a child's spool");
                            continue;
                        }
                    }
                }
                let Some(child) = children.get(&child_id) else { continue };
                match child.spool.with(|s| s.append_relayed(&batch).map(|r| (r, s.wants_sync()))) {
                    Ok((Relayed::Taken(_), wants_sync)) => {
                        if wants_sync {
                            child.spool.sync_wanted.notify_one();
                        }
                    }
                    Ok((Relayed::Duplicate, _)) => {}
                    Ok((Relayed::Gap { expected }, _)) => {
                        tracing::debug!(child = %child_id, expected, first_seq = batch.first_seq, "a child's batch beyond a gap; it will resend");
                    }
                    Err(e) => tracing::error!(child = %child_id, error = %e, "could not spool a child's batch"),
                }
            }
        }
    }
    // The children's uplinks drain within their grace period (they watch
    // `shutdown` themselves); then their spools get a last sync.
    for (_, child) in children {
        // No more relayed readings arrive: a last sync, then wait for the
        // uplink (it drains within the grace period).
        child.stop.cancel();
        for task in child.tasks {
            let _ = task.await;
        }
    }
    Ok(())
}
