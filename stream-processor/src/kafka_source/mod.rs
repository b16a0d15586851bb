//! The Kafka source: a consumer-group member on `edgeloop.readings` that
//! turns each record into rows of its partition's open Parquet file.
//!
//! It runs on its own thread (Parquet encoding is CPU work) with a
//! `BaseConsumer`. Offsets are never committed automatically: a partition's
//! offset is committed, synchronously, right after the file holding its
//! records is renamed into place (or, with no file open, right after a dead
//! letter is acknowledged by Kafka). At most one renamed-but-uncommitted file
//! per partition can therefore exist at a crash, and it starts at the
//! committed offset: the file re-written after restart has the same name and
//! replaces it.
//!
//! On a rebalance, open files of revoked partitions are dropped unwritten;
//! their next owner re-reads them from the committed offset.
//!
//! Readings already in the data set (device re-sends) are dropped by
//! [`crate::dedup`], whose state is snapshotted at every commit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use edgeloop_proto::topics;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use crate::config::ProcessorConfig;
use crate::deadletter::{DeadLetterError, DeadLetters};
use crate::decode;
use crate::dedup::{self, DedupError, PartitionSnapshot};
use crate::labeller::{Engine, Labelled, RulesFile};
use crate::metrics::SharedRuleMetrics;
use crate::parquet_sink::{losses, rule_stats, Bucket, OpenFile, SinkError};
use crate::stats::ProcessorStats;
use crate::trainer::{LabelledBatch, TrainerHandle};
use edgeloop_proto::v1::ReadingBatch;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("could not create the Kafka consumer: {0}")]
    Create(KafkaError),
    #[error("could not subscribe to {topic}: {source}")]
    Subscribe { topic: String, source: KafkaError },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error(transparent)]
    Dedup(#[from] DedupError),
}

/// Records revoked partitions during a rebalance (called inside `poll`).
#[derive(Default)]
pub struct RebalanceContext {
    revoked: Mutex<Vec<i32>>,
}

impl ClientContext for RebalanceContext {}

impl ConsumerContext for RebalanceContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(list) = rebalance {
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions revoked");
            let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            revoked.extend(partitions);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance {
            let partitions: Vec<i32> = list.elements().iter().map(|e| e.partition()).collect();
            tracing::info!(?partitions, "partitions assigned");
        }
    }
}

struct Sink<'a> {
    config: &'a ProcessorConfig,
    consumer: &'a BaseConsumer<RebalanceContext>,
    stats: &'a ProcessorStats,
    open: HashMap<i32, OpenFile>,
    /// Seqs in the data set (and the open file) and labeller state per
    /// partition; loaded from the snapshot of the offset it resumes at.
    seen: HashMap<i32, PartitionSnapshot>,
    /// The labelling rules in force, if any, and where they come from.
    rules: Option<Engine>,
    rule_metrics: &'a SharedRuleMetrics,
    rules_file: RulesWatch,
    /// The trainer's queue, when training is enabled.
    trainer: Option<TrainerHandle>,
    /// Device profiles without a trainer profile, already warned of.
    orphan_profiles: std::collections::HashSet<String>,
}

/// Watches the rules file for changes (hot reload).
struct RulesWatch {
    path: Option<std::path::PathBuf>,
    modified: Option<std::time::SystemTime>,
    checked: std::time::Instant,
}

impl Sink<'_> {
    /// A device announcing a profile no trainer profile has never gets a
    /// model: said once per profile in the log, counted per device.
    fn check_profile(&mut self, device: &str, profile: &str) {
        let trainer = &self.config.trainer;
        if trainer.serves_profile(profile) {
            return;
        }
        ProcessorStats::add(&self.stats.devices_without_trainer_profile, 1);
        if self.orphan_profiles.insert(profile.to_string()) {
            let known = trainer.profile_names();
            tracing::warn!(
                device,
                profile,
                trainer_profiles = ?known,
                "a device announces a profile no trainer profile has: it will get no model (set its agent's `profile` to one of the trainer's, or add a [[trainer.profiles]] of that name)"
            );
        }
    }

    /// Reloads the rules file if it changed. A file with an error is refused
    /// with a message naming the rule and the field; the rules in force stay.
    fn reload_rules(&mut self) -> Result<(), SourceError> {
        let Some(path) = self.rules_file.path.clone() else {
            return Ok(());
        };
        if self.rules_file.checked.elapsed() < self.config.rules_check_interval
            && self.rules_file.modified.is_some()
        {
            return Ok(());
        }
        self.rules_file.checked = std::time::Instant::now();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        if modified.is_none() || modified == self.rules_file.modified {
            return Ok(());
        }
        self.rules_file.modified = modified;
        let known = |c: &str| {
            self.config.channels.is_empty() || self.config.channels.iter().any(|k| k == c)
        };
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| RulesFile::parse(&text, Some(&known)).map_err(|e| e.to_string()));
        match parsed {
            Ok(rules) => {
                // Close the open files first: a file's labels (and its rule
                // statistics) come from one rules version.
                let open: Vec<i32> = self.open.keys().copied().collect();
                for p in open {
                    self.close(p)?;
                }
                tracing::info!(path = %path.display(), version = rules.version(), rules = rules.rules.len(), "labelling rules in force");
                self.rule_metrics
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .in_force = Some((
                    rules.version().to_string(),
                    rules
                        .rules
                        .iter()
                        .map(|r| (r.name.clone(), r.label.clone()))
                        .collect(),
                ));
                self.rules = Some(Engine::new(rules));
                ProcessorStats::add(&self.stats.rules_reloads, 1);
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, kept = self.rules.as_ref().map(|r| r.rules.version().to_string()).unwrap_or_else(|| "none".into()), "labelling rules refused; the rules in force stay");
                ProcessorStats::add(&self.stats.rules_refused, 1);
            }
        }
        Ok(())
    }

    /// The label of every reading of `batch`, in order (empty: no rules).
    fn labels(&mut self, partition: i32, batch: &ReadingBatch) -> Vec<Labelled> {
        let Some(engine) = &self.rules else {
            return Vec::new();
        };
        let state = &mut self.seen.entry(partition).or_default().labels;
        batch
            .readings
            .iter()
            .map(|r| {
                let value = |c: &str| {
                    batch
                        .channels
                        .iter()
                        .position(|name| name == c)
                        .and_then(|i| r.values.get(i).copied())
                        .filter(|v| v.is_finite())
                };
                state.label(engine, &batch.device_id, &value, r.ts_micros)
            })
            .collect()
    }
}

/// The hour a record's rows go to: its Kafka timestamp's, else (a record
/// without one) its first reading's.
fn bucket_of(message: &BorrowedMessage<'_>, batch: &ReadingBatch) -> Bucket {
    let millis = message
        .timestamp()
        .to_millis()
        .or_else(|| batch.readings.first().map(|r| r.ts_micros / 1000))
        .unwrap_or(0);
    Bucket::of_millis(millis)
}

impl Sink<'_> {
    /// Saves the dedup state for `next_offset`, then commits it.
    fn commit(&self, partition: i32, next_offset: i64) -> Result<(), SourceError> {
        if let Some(seen) = self.seen.get(&partition) {
            dedup::save(&self.config.parquet_root, partition, next_offset, seen)?;
        }
        let mut list = TopicPartitionList::new();
        if list
            .add_partition_offset(
                topics::KAFKA_READINGS,
                partition,
                Offset::Offset(next_offset),
            )
            .is_err()
        {
            return Ok(());
        }
        if let Err(e) = self.consumer.commit(&list, CommitMode::Sync) {
            // Not fatal: the records are re-read and the file replaced.
            tracing::warn!(partition, next_offset, error = %e, "offset commit failed");
            ProcessorStats::add(&self.stats.commit_errors, 1);
        }
        Ok(())
    }

    /// Commits past `offset` unless an open file still holds earlier records
    /// of the partition (its close commits them all).
    fn commit_if_idle(&self, partition: i32, offset: i64) -> Result<(), SourceError> {
        if self.open.contains_key(&partition) {
            return Ok(());
        }
        self.commit(partition, offset + 1)
    }

    fn close(&mut self, partition: i32) -> Result<(), SourceError> {
        if let Some(file) = self.open.remove(&partition) {
            let bucket = file.bucket.clone();
            let first_offset = file.first_offset;
            let closed = file.close()?;
            self.write_rule_stats(partition, &bucket, first_offset)?;
            tracing::debug!(path = %closed.path.display(), rows = closed.rows, "file written");
            ProcessorStats::add(&self.stats.rows_written, closed.rows as u64);
            ProcessorStats::add(&self.stats.files_written, 1);
            self.commit(partition, closed.last_offset + 1)?;
        }
        Ok(())
    }

    fn mark_seen(&mut self, partition: i32, device: &str, ranges: &[(u64, u64)]) {
        let seen = &mut self.seen.entry(partition).or_default().seen;
        for &(a, b) in ranges {
            seen.insert(device, a, b);
        }
    }

    /// Writes (and resets) the rule statistics of the file just closed.
    fn write_rule_stats(
        &mut self,
        partition: i32,
        bucket: &Bucket,
        first_offset: i64,
    ) -> Result<(), SourceError> {
        let Some(engine) = &self.rules else {
            return Ok(());
        };
        let Some(state) = self.seen.get_mut(&partition) else {
            return Ok(());
        };
        let counts = std::mem::take(&mut state.labels.counts);
        if counts.is_empty() || state.labels.rules_version != engine.rules.version() {
            return Ok(());
        }
        let accuracies = state
            .labels
            .model
            .as_ref()
            .map(|m| m.accuracies())
            .unwrap_or_default();
        let rows: Vec<rule_stats::StatsRow<'_>> =
            counts
                .iter()
                .flat_map(|(device, per_rule)| {
                    let accuracies = &accuracies;
                    engine.rules.rules.iter().zip(per_rule).enumerate().map(
                        move |(j, (rule, c))| rule_stats::StatsRow {
                            device_id: device,
                            rule: &rule.name,
                            rule_label: &rule.label,
                            counts: *c,
                            estimated_accuracy: accuracies.get(j).copied().flatten(),
                        },
                    )
                })
                .collect();
        rule_stats::write(
            &self.config.parquet_root,
            bucket,
            partition,
            first_offset,
            engine.rules.version(),
            &rows,
        )?;
        let mut metrics = self.rule_metrics.lock().unwrap_or_else(|p| p.into_inner());
        for row in &rows {
            let entry = metrics
                .rules
                .entry((engine.rules.version().to_string(), row.rule.to_string()))
                .or_default();
            let c = &mut entry.0;
            c.readings += row.counts.readings;
            c.votes += row.counts.votes;
            c.overlaps += row.counts.overlaps;
            c.conflicts += row.counts.conflicts;
            c.agreements += row.counts.agreements;
            entry.1 = row.estimated_accuracy;
        }
        Ok(())
    }

    /// Drops what was in progress for a revoked partition.
    fn revoke(&mut self, partition: i32) {
        self.seen.remove(&partition);
        if let Some(file) = self.open.remove(&partition) {
            tracing::info!(partition, "partition revoked: dropping its open file");
            file.abort();
            ProcessorStats::add(&self.stats.files_aborted, 1);
        }
    }

    fn handle(
        &mut self,
        message: &BorrowedMessage<'_>,
        dead: &DeadLetters,
    ) -> Result<(), SourceError> {
        ProcessorStats::add(&self.stats.records_consumed, 1);
        let partition = message.partition();
        let offset = message.offset();
        if !self.seen.contains_key(&partition) {
            let (loaded, at) = dedup::load(&self.config.parquet_root, partition, offset)?;
            self.seen.insert(partition, loaded);
            if let Some(at) = at.filter(|at| *at < offset) {
                // Kafka serves a partition from the committed offset on;
                // records before this one are no longer there (retention
                // deleted them before the processor read them).
                tracing::error!(
                    partition,
                    committed = at,
                    first = offset,
                    "the first record after assignment is past the committed offset: records between are no longer in Kafka (retention shorter than the processor's lag?)"
                );
                ProcessorStats::add(&self.stats.offset_gaps, 1);
            }
        }
        let batch = match decode::decode(
            message.key(),
            message.payload().unwrap_or_default(),
            &self.config.batch_limits,
        ) {
            Ok(batch) => batch,
            Err(refused) => {
                let reason = refused.to_string();
                tracing::warn!(partition, offset, %reason, "dead-lettering a record");
                dead.send(message, &reason)?;
                ProcessorStats::add(&self.stats.dead_letters, 1);
                if let Some(lost) = &refused.lost {
                    self.record_invalid(message, lost)?;
                }
                return self.commit_if_idle(partition, offset);
            }
        };
        if self.stats.saw_batch(&batch) {
            self.check_profile(&batch.device_id, &batch.profile);
        }
        let bucket = bucket_of(message, &batch);
        let seen = &mut self.seen.entry(partition).or_default().seen;
        let unseen = seen.unseen(&batch.device_id, batch.first_seq, batch.end_seq());
        let covered: u64 = unseen.iter().map(|(a, b)| b - a).sum();
        ProcessorStats::add(
            &self.stats.duplicates_dropped,
            batch.end_seq() - batch.first_seq - covered,
        );
        // The seqs become "seen" only once they are in the data set or in
        // the open file: a commit (which snapshots the set) may happen below,
        // before this batch is written, when the open file has to close first.
        if unseen.is_empty() {
            return self.commit_if_idle(partition, offset);
        }
        if let Some(loss) = &batch.loss {
            let path = losses::write(
                &self.config.parquet_root,
                &bucket,
                partition,
                offset,
                &batch.device_id,
                &batch.profile,
                std::slice::from_ref(loss),
            )?;
            tracing::info!(device = %batch.device_id, first_seq = loss.first_seq, end_seq = loss.end_seq, reason = %loss.reason, path = %path.display(), "device reported lost readings");
            self.mark_seen(partition, &batch.device_id, &unseen);
            ProcessorStats::add(&self.stats.loss_reports, 1);
            ProcessorStats::add(
                &self.stats.readings_reported_lost,
                loss.end_seq - loss.first_seq,
            );
            return self.commit_if_idle(partition, offset);
        }
        if batch.readings.is_empty() {
            self.mark_seen(partition, &batch.device_id, &unseen);
            return self.commit_if_idle(partition, offset);
        }
        if self
            .open
            .get(&partition)
            .is_some_and(|f| !f.accepts(&bucket, &batch.channels))
        {
            self.close(partition)?;
        }
        match self.open.entry(partition) {
            std::collections::hash_map::Entry::Occupied(_) => {}
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(OpenFile::open(
                    &self.config.parquet_root,
                    partition,
                    offset,
                    bucket,
                    batch.channels.clone(),
                    &self.config.sink,
                )?);
            }
        }
        // Part of the batch may already be in the data set: write the rest.
        let parts: Vec<ReadingBatch> = if unseen == [(batch.first_seq, batch.end_seq())] {
            vec![batch]
        } else {
            unseen
                .iter()
                .map(|&(a, b)| {
                    let skip = (a - batch.first_seq) as usize;
                    ReadingBatch {
                        first_seq: a,
                        readings: batch.readings[skip..skip + (b - a) as usize].to_vec(),
                        ..batch.clone()
                    }
                })
                .collect()
        };
        for part in &parts {
            let labels = self.labels(partition, part);
            let version = self.rules.as_ref().map(|e| e.rules.version().to_string());
            if let Some(file) = self.open.get_mut(&partition) {
                file.append(part, offset, &labels, version.as_deref())?;
            }
            if let Some(trainer) = &self.trainer {
                if !labels.is_empty() {
                    trainer.offer(LabelledBatch {
                        batch: part.clone(),
                        labels,
                        rules_version: version,
                        partition,
                        offset,
                    });
                }
            }
        }
        self.mark_seen(partition, &parts[0].device_id, &unseen);
        let Some(file) = self.open.get(&partition) else {
            return Ok(());
        };
        if file.rows >= self.config.sink.max_rows || file.est_bytes >= self.config.sink.max_bytes {
            self.close(partition)?;
        }
        Ok(())
    }

    /// Records in `losses` (reason `invalid_batch`) the seqs of a batch
    /// refused for its content, those not already in the data set: the
    /// bridge acknowledged them (the device deleted them), so the gap they
    /// leave is explained; the dead letter holds the bytes and the reason.
    fn record_invalid(
        &mut self,
        message: &BorrowedMessage<'_>,
        lost: &edgeloop_proto::validate::LostSeqs,
    ) -> Result<(), SourceError> {
        let (partition, offset) = (message.partition(), message.offset());
        let device = message
            .key()
            .map(String::from_utf8_lossy)
            .unwrap_or_default()
            .into_owned();
        let unseen = self.seen.entry(partition).or_default().seen.unseen(
            &device,
            lost.first_seq,
            lost.end_seq,
        );
        if unseen.is_empty() {
            return Ok(());
        }
        let detected_at_micros = message
            .timestamp()
            .to_millis()
            .map_or(0, |ms| ms.saturating_mul(1000));
        let reports: Vec<edgeloop_proto::v1::LossReport> = unseen
            .iter()
            .map(|&(first_seq, end_seq)| edgeloop_proto::v1::LossReport {
                device_id: device.clone(),
                first_seq,
                end_seq,
                reason: edgeloop_proto::validate::INVALID_BATCH.into(),
                detected_at_micros,
            })
            .collect();
        let bucket = Bucket::of_millis(message.timestamp().to_millis().unwrap_or(0));
        let path = losses::write(
            &self.config.parquet_root,
            &bucket,
            partition,
            offset,
            &device,
            &lost.profile,
            &reports,
        )?;
        let readings: u64 = unseen.iter().map(|(a, b)| b - a).sum();
        tracing::info!(%device, first_seq = lost.first_seq, end_seq = lost.end_seq, path = %path.display(), "the seqs of a refused batch are recorded as lost (invalid_batch)");
        self.mark_seen(partition, &device, &unseen);
        ProcessorStats::add(&self.stats.invalid_batches, 1);
        ProcessorStats::add(&self.stats.readings_invalid, readings);
        Ok(())
    }

    fn close_aged(&mut self) -> Result<(), SourceError> {
        let aged: Vec<i32> = self
            .open
            .iter()
            .filter(|(_, f)| f.opened_at.elapsed() >= self.config.sink.max_age)
            .map(|(p, _)| *p)
            .collect();
        for p in aged {
            self.close(p)?;
        }
        Ok(())
    }
}

/// Consumes until `shutdown`, then closes every open file and commits.
///
/// A consumer that Kafka has fenced for good (librdkafka's fatal errors:
/// with static membership, `FencedInstanceId` after the consumer's own
/// session expired during a Kafka outage and it rejoined under the same
/// `group.instance.id`) is replaced by a new one: its open files are
/// dropped uncommitted (they are written again from the committed offsets),
/// and the new consumer joins the group as the old one did.
pub fn run(
    config: &ProcessorConfig,
    shutdown: &CancellationToken,
    stats: &ProcessorStats,
    rule_metrics: &SharedRuleMetrics,
    trainer: Option<TrainerHandle>,
) -> Result<(), SourceError> {
    let dead = DeadLetters::new(&config.kafka)?;
    ensure_dir(&config.parquet_root)?;
    while let Some((code, reason)) = consume(
        config,
        shutdown,
        stats,
        rule_metrics,
        trainer.clone(),
        &dead,
    )? {
        tracing::warn!(
            ?code,
            %reason,
            "the Kafka consumer was fenced for good; starting a new one (open files are written again from the committed offsets)"
        );
        ProcessorStats::add(&stats.consumer_restarts, 1);
    }
    Ok(())
}

/// One consumer's life: until `shutdown` (then `None`), or until librdkafka
/// reports a fatal error (then that error, and the open files are dropped).
fn consume(
    config: &ProcessorConfig,
    shutdown: &CancellationToken,
    stats: &ProcessorStats,
    rule_metrics: &SharedRuleMetrics,
    trainer: Option<TrainerHandle>,
    dead: &DeadLetters,
) -> Result<Option<(RDKafkaErrorCode, String)>, SourceError> {
    let session = config.session_timeout.as_millis().to_string();
    let mut settings = vec![
        ("group.id", config.group_id.as_str()),
        ("enable.auto.commit", "false"),
        ("enable.auto.offset.store", "false"),
        ("auto.offset.reset", "earliest"),
        ("session.timeout.ms", &session),
        ("client.id", "edgeloop-processor"),
    ];
    if let Some(instance) = &config.instance_id {
        settings.push(("group.instance.id", instance));
    }
    let consumer: BaseConsumer<RebalanceContext> = config
        .kafka
        .client_config(&settings)
        .create_with_context(RebalanceContext::default())
        .map_err(SourceError::Create)?;
    consumer
        .subscribe(&[topics::KAFKA_READINGS])
        .map_err(|source| SourceError::Subscribe {
            topic: topics::KAFKA_READINGS.into(),
            source,
        })?;
    let mut sink = Sink {
        config,
        consumer: &consumer,
        stats,
        open: HashMap::new(),
        seen: HashMap::new(),
        rules: None,
        rule_metrics,
        rules_file: RulesWatch {
            path: config.rules_file.clone(),
            modified: None,
            checked: std::time::Instant::now(),
        },
        trainer,
        orphan_profiles: Default::default(),
    };
    sink.reload_rules()?;
    let mut watch = AssignmentWatch::new(config.session_timeout);
    while !shutdown.is_cancelled() {
        let polled = consumer.poll(Duration::from_millis(100));
        watch.check(&consumer, stats);
        let revoked: Vec<i32> = std::mem::take(
            &mut *consumer
                .context()
                .revoked
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for p in revoked {
            sink.revoke(p);
        }
        match polled {
            None => {}
            Some(Ok(message)) => sink.handle(&message, dead)?,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "Kafka consumer error");
                if let Some(fatal) = consumer.client().fatal_error() {
                    let open: Vec<i32> = sink.open.keys().copied().collect();
                    for p in open {
                        sink.revoke(p);
                    }
                    return Ok(Some(fatal));
                }
            }
        }
        sink.close_aged()?;
        sink.reload_rules()?;
    }
    let partitions: Vec<i32> = sink.open.keys().copied().collect();
    for p in partitions {
        sink.close(p)?;
    }
    consumer.unsubscribe();
    Ok(None)
}

/// Watches how many partitions the group gives this processor. A processor
/// left without any for long is either one more than the readings topic has
/// partitions, or in a group where another member holds them or a
/// rebalance does not finish (docs/operations.md "Processor without
/// partitions"): it says so in the log
/// and the gauges, since it writes nothing meanwhile.
struct AssignmentWatch {
    every: Duration,
    last_check: std::time::Instant,
    /// When it last had a partition (or started).
    last_assigned: std::time::Instant,
    /// Warn after this long without a partition.
    warn_after: Duration,
    warned: bool,
}

impl AssignmentWatch {
    fn new(session_timeout: Duration) -> Self {
        let now = std::time::Instant::now();
        AssignmentWatch {
            every: Duration::from_secs(1),
            last_check: now,
            last_assigned: now,
            warn_after: (session_timeout * 2).max(Duration::from_secs(60)),
            warned: false,
        }
    }

    fn check(&mut self, consumer: &BaseConsumer<RebalanceContext>, stats: &ProcessorStats) {
        if self.last_check.elapsed() < self.every {
            return;
        }
        self.last_check = std::time::Instant::now();
        let Ok(assignment) = consumer.assignment() else {
            return;
        };
        let assigned = assignment.count() as u64;
        stats
            .partitions_assigned
            .store(assigned, std::sync::atomic::Ordering::Relaxed);
        if assigned > 0 {
            if self.warned {
                tracing::info!(partitions = assigned, "partitions assigned again");
            }
            self.last_assigned = self.last_check;
            self.warned = false;
        }
        let without = self.last_assigned.elapsed();
        let seconds = if assigned > 0 { 0 } else { without.as_secs() };
        stats
            .unassigned_seconds
            .store(seconds, std::sync::atomic::Ordering::Relaxed);
        if assigned == 0 && without >= self.warn_after && !self.warned {
            self.warned = true;
            tracing::warn!(
                seconds = without.as_secs(),
                topic = topics::KAFKA_READINGS,
                "no partition assigned for this long: this processor writes nothing. Either the group has more processors than the topic has partitions, or another member holds them or the rebalance does not finish (kafka-consumer-groups.sh --describe --members). See docs/operations.md, Processor without partitions"
            );
        }
    }
}

fn ensure_dir(path: &Path) -> Result<(), SinkError> {
    std::fs::create_dir_all(path).map_err(|source| SinkError::Io {
        action: "creating directory",
        path: path.to_path_buf(),
        source,
    })
}
