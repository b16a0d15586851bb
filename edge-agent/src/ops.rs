//! The agent's operations endpoint (`metrics_listen`, off by default): the
//! same `/healthz`, `/readyz` and Prometheus `/metrics` the broker and the
//! processor serve (`edgeloop-ops`), for a device supervisor (systemd, a
//! container runtime) or a gateway scraped by Prometheus. Every metric is in
//! `docs/operations.md`.
//!
//! `/readyz` is 200 while every uplink's MQTT session is up: a device that
//! is not ready keeps taking readings into its spool, it just is not
//! sending them.

use std::sync::Arc;

use edgeloop_ops::{counter, gauge};

use crate::stats::AgentStats;

/// Serves `stats` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    stats: Arc<AgentStats>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    edgeloop_ops::serve(listener, Arc::new(Endpoint(stats)), shutdown).await
}

struct Endpoint(Arc<AgentStats>);

impl edgeloop_ops::Endpoint for Endpoint {
    fn metrics(&self) -> String {
        render(&self.0, now_micros())
    }

    fn ready(&self) -> Result<(), String> {
        readiness(&self.0)
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// Ready while at least one uplink runs and every uplink is connected.
pub fn readiness(stats: &AgentStats) -> Result<(), String> {
    let (uplinks, connected) = (
        AgentStats::get(&stats.uplinks),
        AgentStats::get(&stats.uplinks_connected),
    );
    match (uplinks, connected) {
        (0, _) => Err("no uplink is running yet".into()),
        (1, 0) => Err("not connected to the MQTT broker (readings wait in the spool)".into()),
        (n, c) if c < n => Err(format!(
            "{c} of {n} uplinks connected to the MQTT broker (the others' readings wait in their spools)"
        )),
        _ => Ok(()),
    }
}

/// The Prometheus text exposition of `stats` at `now` (µs since the epoch).
pub fn render(stats: &AgentStats, now_micros: i64) -> String {
    let g = AgentStats::get;
    let mut out = String::new();
    let counters = [
        (
            "edgeloop_agent_readings_generated_total",
            "Readings the sources produced",
            &stats.readings_generated,
        ),
        (
            "edgeloop_agent_readings_published_total",
            "Readings published for the first time (resends not counted)",
            &stats.readings_published,
        ),
        (
            "edgeloop_agent_readings_acknowledged_total",
            "Readings the cloud acknowledged (they are in Kafka)",
            &stats.readings_acknowledged,
        ),
        (
            "edgeloop_agent_readings_resent_total",
            "Readings published again after a reconnect or a stalled ack watermark",
            &stats.readings_resent,
        ),
        (
            "edgeloop_agent_batches_published_total",
            "Batches (MQTT messages) published, resends included",
            &stats.batches_published,
        ),
        (
            "edgeloop_agent_loss_reports_sent_total",
            "Loss reports sent, resends included",
            &stats.loss_reports_sent,
        ),
        (
            "edgeloop_agent_reconnects_total",
            "MQTT connections lost and made again",
            &stats.reconnects,
        ),
        (
            "edgeloop_agent_broker_switches_total",
            "Lost or refused MQTT connections after which the next broker (mqtt.fallback_servers) was tried",
            &stats.server_switches,
        ),
        (
            "edgeloop_agent_readings_lost_total",
            "Readings the spool lost (evicted when full or too old, or corrupt on disk) since it was opened; each is reported to the cloud in a loss report",
            &stats.readings_lost,
        ),
        (
            "edgeloop_agent_bad_lines_total",
            "Lines or samples a source could not turn into readings (skipped)",
            &stats.bad_lines,
        ),
        (
            "edgeloop_agent_model_updates_applied_total",
            "Model updates verified, stored and swapped in",
            &stats.model_updates_applied,
        ),
        (
            "edgeloop_agent_model_updates_refused_total",
            "Model updates refused (signature, hash, lower version, artifact that does not load) and stored models quarantined at start-up",
            &stats.model_updates_refused,
        ),
        (
            "edgeloop_agent_predictions_total",
            "Predictions added to readings by on-device inference",
            &stats.predictions_made,
        ),
        (
            "edgeloop_agent_predictions_failed_total",
            "Predictions a loaded model could not make (the reading went without)",
            &stats.predictions_failed,
        ),
    ];
    for (name, help, value) in counters {
        counter(&mut out, name, help, g(value));
    }
    let gauges = [
        (
            "edgeloop_agent_backlog_readings",
            "Readings in the spool not yet acknowledged",
            &stats.backlog_readings,
        ),
        (
            "edgeloop_agent_backlog_bytes",
            "Bytes of the spool's segment files",
            &stats.backlog_bytes,
        ),
        (
            "edgeloop_agent_uplinks",
            "Uplinks running (one per device, a gateway's children included)",
            &stats.uplinks,
        ),
        (
            "edgeloop_agent_uplinks_connected",
            "Uplinks whose MQTT session is up",
            &stats.uplinks_connected,
        ),
    ];
    for (name, help, value) in gauges {
        gauge(&mut out, name, help, g(value));
    }
    let age = stats
        .oldest_unacked_micros()
        .map_or(0.0, |ts| (now_micros - ts).max(0) as f64 / 1e6);
    gauge(
        &mut out,
        "edgeloop_agent_backlog_oldest_age_seconds",
        "Age of the oldest reading not yet acknowledged, by its timestamp (0: none waits)",
        age,
    );
    gauge(
        &mut out,
        "edgeloop_agent_ready",
        "1 while /readyz answers 200 (every uplink connected)",
        u8::from(readiness(stats).is_ok()),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_needs_every_uplink_connected() {
        let stats = AgentStats::default();
        assert!(readiness(&stats).unwrap_err().contains("no uplink"));
        AgentStats::add(&stats.uplinks, 2);
        AgentStats::add(&stats.uplinks_connected, 1);
        assert_eq!(
            readiness(&stats).unwrap_err(),
            "1 of 2 uplinks connected to the MQTT broker (the others' readings wait in their spools)"
        );
        AgentStats::add(&stats.uplinks_connected, 1);
        assert_eq!(readiness(&stats), Ok(()));
    }

    #[test]
    fn the_backlog_age_is_that_of_the_oldest_reading_over_every_device() {
        let stats = AgentStats::default();
        let render_age = |stats: &AgentStats| {
            render(stats, 100_000_000)
                .lines()
                .find_map(|l| l.strip_prefix("edgeloop_agent_backlog_oldest_age_seconds "))
                .map(str::to_string)
        };
        assert_eq!(render_age(&stats).as_deref(), Some("0"));
        stats.set_oldest_unacked("a", Some(90_000_000));
        stats.set_oldest_unacked("b", Some(97_500_000));
        assert_eq!(render_age(&stats).as_deref(), Some("10"));
        stats.set_oldest_unacked("a", None);
        assert_eq!(render_age(&stats).as_deref(), Some("2.5"));
    }

    #[test]
    fn the_operations_doc_describes_every_metric() {
        let doc = include_str!("../../docs/operations.md");
        let missing = edgeloop_ops::undocumented(&render(&AgentStats::default(), 0), doc);
        assert!(missing.is_empty(), "not in docs/operations.md: {missing:?}");
    }
}
