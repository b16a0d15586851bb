//! The edge agent: it takes readings on the device, keeps them until the cloud
//! has them, and sends them up over MQTT.
//!
//! The path of a reading through this crate:
//!
//! - [`source`]: where readings come from. [`source::simulator`] is a seeded
//!   signal generator with anomalies whose true label it knows.
//! - [`spool`]: where readings wait until the cloud acknowledges them:
//!   [`spool::disk`], a bounded log of segment files on the device's disk,
//!   group-committed, that survives restarts and power cuts.
//! - [`uplink`]: batches readings into `ReadingBatch` messages, publishes them
//!   with QoS 1 on `telemetry/{device}`, follows the retained `ack/{device}`
//!   watermark and resends from it after a reconnect or a stall.
//! - [`models`]: model updates from `models/+/{profile}` (verified,
//!   stored atomically, swapped in) and on-device inference: a prediction
//!   per loaded model on every reading the device's sources take.
//! - [`gateway`]: gateway mode, for child devices with no link of their own:
//!   an embedded MQTT listener, a spool and an uplink per child, acks and
//!   model topics relayed back down.
//! - [`config`]: the agent's configuration; [`stats`]: its counters;
//!   [`ops`]: `/healthz`, `/readyz` and `/metrics` on `metrics_listen`.
//!
//! [`run`] wires them together for one device; [`run_fleet`] runs many
//! simulated devices in one process (what `edgeloop up` does).

pub mod config;
pub mod gateway;
pub mod models;
pub mod ops;
pub mod source;
pub mod spool;
pub mod stats;
pub mod uplink;

use std::collections::HashMap;
use std::sync::Arc;

pub use config::AgentConfig;
pub use stats::AgentStats;
use tokio_util::sync::CancellationToken;

use crate::spool::SharedSpool;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid agent config: {0}")]
    Config(String),
    #[error("agent task failed: {0}")]
    Task(String),
    #[error("{0}")]
    Spool(String),
    #[error("{0}")]
    Models(String),
    #[error("could not serve /metrics, /healthz, /readyz on {addr} (metrics_listen): {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Serves `/healthz`, `/readyz` and `/metrics` on `listen` (none: nothing)
/// until the returned guard is dropped.
async fn serve_ops(
    listen: Option<std::net::SocketAddr>,
    stats: &Arc<AgentStats>,
) -> Result<Option<tokio_util::sync::DropGuard>, Error> {
    let Some(addr) = listen else {
        return Ok(None);
    };
    let listener = edgeloop_ops::bind(addr)
        .await
        .map_err(|source| Error::MetricsListen { addr, source })?;
    let stop = CancellationToken::new();
    let (stats, token) = (stats.clone(), stop.clone());
    tokio::spawn(async move {
        if let Err(e) = ops::serve(listener, stats, token).await {
            tracing::error!(%addr, error = %e, "the /metrics endpoint stopped");
        }
    });
    Ok(Some(stop.drop_guard()))
}

/// What an agent did, returned when it stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentReport {
    pub device_id: String,
    /// The profile it announced.
    pub profile: String,
    /// The model version it ran at exit, per task (none: no model).
    pub applied_models: std::collections::BTreeMap<String, u64>,
    /// The seq the next reading would get (the spool keeps it across restarts).
    pub next_seq: u64,
    /// The acknowledged watermark at exit: readings below it are in Kafka.
    pub committed_seq: u64,
}

/// Runs one agent until `shutdown` is cancelled (or its source is exhausted
/// and everything is acknowledged). On shutdown the source stops first; the
/// uplink then keeps sending until every reading is acknowledged or the
/// configured grace period ends.
pub async fn run(
    config: AgentConfig,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<AgentReport, Error> {
    config.validate().map_err(Error::Config)?;
    let _ops = serve_ops(config.metrics_listen, &stats).await?;
    let channels = source::channels(&config).map_err(|e| Error::Config(format!("source.{e}")))?;
    let opened = {
        let spool_config = config.spool.clone();
        let channels = channels.clone();
        tokio::task::spawn_blocking(move || spool::disk::DiskSpool::open(spool_config, channels))
            .await
            .map_err(|e| Error::Task(e.to_string()))?
            .map_err(|e| Error::Spool(e.to_string()))?
    };
    let models = open_models(&config, channels, &stats).await?;
    let mut spool = SharedSpool::new(Box::new(opened));
    if let Some(models) = &models {
        spool = spool.with_models(models.clone());
    }
    let spool = Arc::new(spool);
    let store = models.clone();
    let (model_link, updater_task) = match models {
        Some(models) => {
            let (deliveries, rx) = tokio::sync::mpsc::channel(64);
            let task = tokio::spawn(models::run_updater(models.clone(), rx));
            (Some(models::ModelLink { models, deliveries }), Some(task))
        }
        None => (None, None),
    };
    let sync_stop = CancellationToken::new();
    let sync_task = spool.spawn_sync_task(config.spool.sync_interval, sync_stop.clone());
    // Gateway mode: children's readings are relayed, the model topics they
    // need come down through this agent's own connection.
    let (models_tx, gateway_task) = match &config.gateway {
        Some(gw) => {
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            let task = tokio::spawn(gateway::run(
                config.clone(),
                gw.clone(),
                rx,
                shutdown.clone(),
                stats.clone(),
            ));
            (Some(tx), Some(task))
        }
        None => (None, None),
    };
    let source_done = CancellationToken::new();
    let source = {
        let config = config.clone();
        let spool = spool.clone();
        let shutdown = shutdown.clone();
        let source_done = source_done.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let result = source::run(&config, spool, shutdown, stats).await;
            source_done.cancel();
            result
        })
    };
    let uplink = uplink::run(
        &config,
        spool.clone(),
        shutdown.clone(),
        source_done,
        stats.clone(),
        models_tx,
        model_link,
    )
    .await;
    // The uplink held the updater's only sender: the updater ends with it.
    if let Some(task) = updater_task {
        task.await.map_err(|e| Error::Task(e.to_string()))?;
    }
    let applied = store.map(|m| m.applied_versions()).unwrap_or_default();
    if let Some(task) = gateway_task {
        // The gateway stops with `shutdown`; its children's uplinks drain
        // within the grace period.
        shutdown.cancelled().await;
        task.await
            .map_err(|e| Error::Task(e.to_string()))?
            .map_err(|e| Error::Task(e.to_string()))?;
    }
    // The uplink only returns once the source has finished (or failed).
    let source_result = source.await.map_err(|e| Error::Task(e.to_string()))?;
    sync_stop.cancel();
    let synced = sync_task.await.map_err(|e| Error::Task(e.to_string()))?;
    source_result.map_err(|e| Error::Task(e.to_string()))?;
    uplink.map_err(|e| Error::Task(e.to_string()))?;
    synced.map_err(|e| Error::Spool(e.to_string()))?;
    let (next_seq, committed_seq, _) = spool.positions();
    Ok(AgentReport {
        device_id: config.device_id.clone(),
        profile: config.profile.clone(),
        applied_models: applied.into_iter().collect(),
        next_seq,
        committed_seq,
    })
}

/// Opens the model store when model updates are on (`models.verify_key_file`
/// set); says once per process why they are off otherwise.
async fn open_models(
    config: &AgentConfig,
    channels: Vec<String>,
    stats: &Arc<AgentStats>,
) -> Result<Option<Arc<models::Models>>, Error> {
    static OFF: std::sync::Once = std::sync::Once::new();
    let Some(key) = config.models.verifying_key().map_err(Error::Config)? else {
        OFF.call_once(|| {
            tracing::info!("model updates are off: models.verify_key_file is not set, so the agent does not subscribe to models/ and makes no predictions");
        });
        return Ok(None);
    };
    let (device, profile, dir) = (
        config.device_id.clone(),
        config.profile.clone(),
        config.models_dir(),
    );
    let stats = stats.clone();
    let opened = tokio::task::spawn_blocking(move || {
        models::Models::open(&device, &profile, channels, key, &dir, stats)
            .map_err(|e| Error::Models(format!("model store {}: {e}", dir.display())))
    })
    .await
    .map_err(|e| Error::Task(e.to_string()))??;
    Ok(Some(Arc::new(opened)))
}

/// Runs `count` simulated agents derived from `template`: device `i` gets the
/// id `{prefix}-{i:04}`, the seed `template seed + i`, the spool
/// `{template spool dir}/{device id}` and, when the template sets
/// `models.dir`, the model store `{template models dir}/{device id}` (by
/// default it is under the device's spool).
pub async fn run_fleet(
    template: AgentConfig,
    prefix: &str,
    count: usize,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<Vec<AgentReport>, Error> {
    run_fleet_with_passwords(
        template,
        prefix,
        count,
        &HashMap::new(),
        &[],
        shutdown,
        stats,
    )
    .await
}

/// [`run_fleet`], each device logging in with its id as user name and its
/// password from `passwords` (devices not in it use the template's), and
/// device `i` announcing `profiles[i % profiles.len()]` (none: the
/// template's profile).
pub async fn run_fleet_with_passwords(
    template: AgentConfig,
    prefix: &str,
    count: usize,
    passwords: &HashMap<String, String>,
    profiles: &[String],
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<Vec<AgentReport>, Error> {
    let mut configs = Vec::with_capacity(count);
    for i in 0..count {
        let mut config = template.clone();
        config.device_id = format!("{prefix}-{i:04}");
        if let Some(password) = passwords.get(&config.device_id) {
            config.mqtt.username = Some(config.device_id.clone());
            config.mqtt.password = Some(password.clone());
        }
        if !profiles.is_empty() {
            config.profile = profiles[i % profiles.len()].clone();
        }
        config.spool.dir = template.spool.dir.join(&config.device_id);
        if let Some(dir) = &template.models.dir {
            config.models.dir = Some(dir.join(&config.device_id));
        }
        if let config::SourceConfig::Simulator(sim) = &mut config.source {
            sim.seed = sim.seed.wrapping_add(i as u64);
        }
        configs.push(config);
    }
    run_devices(configs, template.metrics_listen, shutdown, stats).await
}

/// Runs one agent per config, in this process, until each is done (a
/// replayed file sent and acknowledged) or `shutdown`; their counters are
/// summed in `stats`, served on `metrics_listen` if set (each config's own
/// `metrics_listen` is ignored).
pub async fn run_devices(
    configs: Vec<AgentConfig>,
    metrics_listen: Option<std::net::SocketAddr>,
    shutdown: CancellationToken,
    stats: Arc<AgentStats>,
) -> Result<Vec<AgentReport>, Error> {
    // One endpoint for the whole fleet, its counters summed over the devices.
    let _ops = serve_ops(metrics_listen, &stats).await?;
    let mut tasks = tokio::task::JoinSet::new();
    let count = configs.len();
    for mut config in configs {
        config.metrics_listen = None;
        let shutdown = shutdown.clone();
        let stats = stats.clone();
        tasks.spawn(async move { run(config, shutdown, stats).await });
    }
    let mut reports = Vec::with_capacity(count);
    while let Some(joined) = tasks.join_next().await {
        reports.push(joined.map_err(|e| Error::Task(e.to_string()))??);
    }
    Ok(reports)
}
