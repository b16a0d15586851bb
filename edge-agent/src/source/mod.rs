//! Where readings come from. Each source appends to the spool, which gives
//! every reading the next `seq`; when the spool is full the source waits
//! (policy `block`) or the spool evicts.
//!
//! - [`simulator`]: seeded signals with labelled anomalies.
//! - [`lines`]: a CSV or JSON Lines file replayed, or lines on stdin.
//! - [`sysfs`]: the thermal zones and hwmon sensors of a Linux device.

pub mod lines;
pub mod simulator;
pub mod sysfs;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use edgeloop_proto::v1::Reading;
use tokio_util::sync::CancellationToken;

use crate::config::{AgentConfig, SourceConfig};
use crate::spool::SharedSpool;
use crate::stats::AgentStats;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("the spool refused readings: {0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("reading the source's input: {0}")]
    Input(std::io::Error),
    #[error("source.{0}")]
    Config(String),
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// The channel names the configured source produces, in value order. The
/// error names the config field at fault.
pub fn channels(config: &AgentConfig) -> Result<Vec<String>, String> {
    match &config.source {
        SourceConfig::Simulator(sim) => Ok(sim.channels.iter().map(|c| c.name.clone()).collect()),
        SourceConfig::Replay(lines) | SourceConfig::Stdin(lines) => lines.resolve_channels(),
        SourceConfig::Sysfs(sys) => {
            let sensors = sysfs::discover(&sys.root);
            if sensors.is_empty() {
                return Err(format!(
                    "root: no thermal zone or hwmon sensor under {}",
                    sys.root.display()
                ));
            }
            Ok(sensors.into_iter().map(|s| s.channel).collect())
        }
    }
}

/// Runs the configured source until `shutdown` or until it is exhausted.
pub async fn run(
    config: &AgentConfig,
    spool: Arc<SharedSpool>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<(), SourceError> {
    match &config.source {
        SourceConfig::Simulator(sim) => run_simulator(sim, spool, shutdown, stats).await,
        SourceConfig::Replay(lines_config) => {
            let channels = lines_config
                .resolve_channels()
                .map_err(SourceError::Config)?;
            let path = lines_config.path.clone().unwrap_or_default();
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(SourceError::Input)?;
            let input = tokio::io::BufReader::new(file);
            lines::run(lines_config, channels, input, spool, shutdown, stats).await
        }
        SourceConfig::Stdin(lines_config) => {
            let channels = lines_config
                .resolve_channels()
                .map_err(SourceError::Config)?;
            let input = tokio::io::BufReader::new(tokio::io::stdin());
            lines::run(lines_config, channels, input, spool, shutdown, stats).await
        }
        SourceConfig::Sysfs(sys) => {
            let sensors = sysfs::discover(&sys.root);
            sysfs::run(sys, sensors, spool, shutdown, stats).await
        }
    }
}

async fn run_simulator(
    config: &simulator::SimulatorConfig,
    spool: Arc<SharedSpool>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<(), SourceError> {
    let mut sim = simulator::Simulator::new(config.clone());
    let start = tokio::time::Instant::now();
    let start_micros = now_micros();
    let step_micros = 1e6 / config.rate_hz;
    // Tick often enough for low rates to be smooth, not so often that a fleet
    // of thousands burns CPU on timers.
    let wall_rate = config.rate_hz * config.speedup;
    let tick = Duration::from_secs_f64((1.0 / wall_rate).clamp(0.01, 1.0));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut generated: u64 = 0;
    let limit = config.limit.unwrap_or(u64::MAX);
    while generated < limit {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = interval.tick() => {}
        }
        let due = ((start.elapsed().as_secs_f64() * wall_rate) as u64).min(limit);
        let mut batch = Vec::with_capacity(due.saturating_sub(generated) as usize);
        while generated < due {
            let r = sim.next_reading();
            batch.push(Reading {
                ts_micros: start_micros + (generated as f64 * step_micros) as i64,
                values: r.values,
                true_label: r.label.to_string(),
                predictions: Vec::new(),
            });
            generated += 1;
        }
        let n = batch.len() as u64;
        if !spool.append_waiting(batch, &shutdown).await? {
            break;
        }
        AgentStats::add(&stats.readings_generated, n);
    }
    Ok(())
}
