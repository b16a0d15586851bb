//! The stream processor: Kafka `edgeloop.readings` → a Hive-partitioned
//! Parquet data set for analysts.
//!
//! - [`kafka_source`]: the consumer-group member and its commit discipline.
//! - [`decode`]: decoding and checking one record; refusals have reasons.
//! - [`dedup`]: drops readings the data set already has, by `(device_id, seq)`.
//! - [`deadletter`]: refused records go to `edgeloop.deadletter`.
//! - [`parquet_sink`]: open files per partition, rolled by rows, bytes, age,
//!   hour and schema; written to a temporary name, fsynced, renamed.
//! - [`labeller`]: labelling rules, the label model, rule statistics.
//! - [`trainer`]: device profiles, training per (task, profile) on its own
//!   thread, the quality gate and the model publisher.
//! - [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`control`]: the gRPC control API (fleet, labelling, models, health),
//!   served on `control.listen`.
//! - [`config`], [`stats`].

pub mod config;
pub mod control;
pub mod deadletter;
pub mod decode;
pub mod dedup;
pub mod kafka_source;
pub mod labeller;
pub mod metrics;
pub mod parquet_sink;
pub mod report;
pub mod stats;
pub mod trainer;

use std::sync::Arc;

pub use config::ProcessorConfig;
use edgeloop_proto::topics;
pub use stats::ProcessorStats;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid processor config: {0}")]
    Config(String),
    #[error(transparent)]
    Kafka(#[from] edgeloop_kafka::Error),
    #[error(transparent)]
    Source(#[from] kafka_source::SourceError),
    #[error(
        "the shutdown grace period ({0:?}) ended before the open files were closed and committed; \
         their records are read again at the next start"
    )]
    ShutdownGrace(std::time::Duration),
    #[error("the processor thread failed: {0}")]
    Thread(String),
    #[error(transparent)]
    Control(#[from] control::ControlError),
    #[error("the trainer's model publisher could not start: {0}")]
    Publisher(trainer::PublishError),
}

/// The longest the trainer's model publisher waits at start to have read
/// `edgeloop.models` and `edgeloop.pins` (it follows them on afterwards).
pub const TRAINER_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the processor until `shutdown`; then closes and commits every open
/// file before returning.
///
/// A shutdown during start-up (Kafka unreachable, topics being created,
/// leaders awaited, the model publisher catching up) stops it there: `run`
/// returns `Ok` at once, having written nothing.
pub async fn run(
    config: ProcessorConfig,
    shutdown: CancellationToken,
    stats: Arc<ProcessorStats>,
) -> Result<(), Error> {
    config.validate().map_err(Error::Config)?;
    let topics_ready = edgeloop_kafka::ensure_topics_counted(
        &config.kafka,
        &[topics::KAFKA_READINGS, topics::KAFKA_DEADLETTER],
        &stats.startup_kafka_retries,
    );
    let Some(ready) = unless_stopped(&shutdown, topics_ready).await else {
        return Ok(());
    };
    ready?;
    let rule_metrics = metrics::SharedRuleMetrics::default();
    if let Some(listen) = config.metrics_listen {
        let (stats, rules, shutdown) = (stats.clone(), rule_metrics.clone(), shutdown.clone());
        tokio::spawn(async move {
            if let Err(e) = metrics::serve(listen, stats, rules, shutdown).await {
                tracing::error!(%listen, error = %e, "the metrics endpoint stopped");
            }
        });
    }
    if config.control.listen.is_some() {
        let mut state = control::State::new(
            &config.control,
            config.kafka.clone(),
            stats.clone(),
            rule_metrics.clone(),
            config.rules_file.clone(),
        )?;
        state.trainer_profiles = config.trainer.enabled.then(|| {
            config
                .trainer
                .profiles
                .iter()
                .map(|p| p.name.clone())
                .collect()
        });
        control::start(&config.control, Arc::new(state), shutdown.clone()).await?;
    }
    // The trainer's thread is stopped once the processor thread has ended,
    // and joined, so its Kafka publisher is closed when `run` returns
    // (unless a retrain outlasts the grace period).
    let mut trainer_thread = None;
    let trainer = if config.trainer.enabled {
        let publisher = trainer::publisher(&config.trainer, &config.kafka, TRAINER_CATCH_UP);
        let Some(publisher) = unless_stopped(&shutdown, publisher).await else {
            return Ok(());
        };
        let publisher = publisher.map_err(|e| match e {
            trainer::PublishError::Config(e) => Error::Config(e),
            e => Error::Publisher(e),
        })?;
        let (handle, join) =
            trainer::spawn(config.trainer.clone(), publisher, stats.trainer.clone())
                .map_err(|e| Error::Thread(e.to_string()))?;
        trainer_thread = Some(join);
        Some(handle)
    } else {
        None
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let grace = config.shutdown_grace;
    let stop = shutdown.clone();
    std::thread::Builder::new()
        .name("processor".into())
        .spawn(move || {
            let result = kafka_source::run(&config, &stop, &stats, &rule_metrics, trainer);
            let _ = done_tx.send(result);
        })
        .map_err(|e| Error::Thread(e.to_string()))?;
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    let result = tokio::select! {
        done = done_rx => done.map_err(|e| Error::Thread(e.to_string())).and_then(|r| Ok(r?)),
        () = deadline => Err(Error::ShutdownGrace(grace)),
    };
    if let Some(thread) = trainer_thread {
        // It finishes a retrain in progress first; within the grace period.
        thread.stop(grace).await;
    }
    result
}

/// `stage`, unless `shutdown` comes first: then `None`, and `stage` is
/// dropped (every start-up stage is cancel-safe: dropped, it stops its
/// retries and waits).
async fn unless_stopped<T>(
    shutdown: &CancellationToken,
    stage: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        biased;
        () = shutdown.cancelled() => {
            tracing::info!("shutdown requested during start-up; stopping before Kafka was ready");
            None
        }
        done = stage => Some(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn processor_cancelled_while_kafka_is_unreachable_returns_ok_before_its_retries_end(
    ) -> Result<(), Box<dyn std::error::Error>> {
        // A port nothing listens on.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let mut config = ProcessorConfig {
            parquet_root: dir.path().join("parquet"),
            ..ProcessorConfig::default()
        };
        config.kafka.bootstrap_servers = format!("127.0.0.1:{port}");
        // Each unanswered request gives up after 2 s, so it retries soon.
        config
            .kafka
            .librdkafka_options
            .insert("socket.timeout.ms".into(), "2000".into());
        let stats = Arc::new(ProcessorStats::default());
        let shutdown = CancellationToken::new();
        let processor = tokio::spawn(run(config, shutdown.clone(), stats.clone()));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while ProcessorStats::get(&stats.startup_kafka_retries) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the processor never retried"
            );
            assert!(!processor.is_finished(), "the processor stopped by itself");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        // Well within its 120 s of retries: it stopped for the shutdown.
        let result = tokio::time::timeout(Duration::from_secs(20), processor)
            .await
            .map_err(|_| "the processor kept retrying after the shutdown")??;
        assert!(result.is_ok(), "{result:?}");
        Ok(())
    }
}
