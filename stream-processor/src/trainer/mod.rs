//! The trainer: labelled readings → per (task, device profile) candidate
//! models → the quality gate → a [`Publisher`]. It runs on its own thread
//! (`trainer`), fed through a bounded queue by the Kafka source after the
//! labeller; see `docs/training.md`.
//!
//! - [`config`]: device profiles, tasks, buffers, triggers, drift, gate.
//! - [`buffer`]: bounded memory: sliding window + reservoir sample.
//! - [`drift`]: Page-Hinkley on the live model's disagreement with the rules.
//! - [`fit`]: smartcore logistic regression → `proto` float model → the
//!   profile's numerics (int8 through `proto::model::quantize`); metrics.
//! - [`gate`]: time-based split, the gate's rule, the decision log.
//! - [`publish`]: the [`Publisher`] seam and [`DirPublisher`].
//! - [`publish_kafka`]: [`KafkaPublisher`], signed models on Kafka
//!   `edgeloop.models`, following the control API's rollbacks and pins.
//! - [`parity`]: re-computes a sample of devices' own predictions and
//!   counts mismatches.
//!
//! Per device, the trainer keeps the last readings (the longest profile
//! window); each labelled reading becomes, for every profile whose channels
//! the device sends and every task of that profile whose classes the label
//! maps to, an example: the profile's features (`proto::features`, the code
//! the device runs) over the device's window ending at that reading.

pub mod buffer;
pub mod config;
pub mod drift;
pub mod fit;
pub mod gate;
pub mod parity;
pub mod publish;
pub mod publish_kafka;
#[cfg(test)]
mod quality;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use edgeloop_proto::model::Artifact;
use edgeloop_proto::v1::ReadingBatch;

pub use config::{DeviceProfile, Numerics, TaskConfig, TrainerConfig};
pub use publish::{DirPublisher, PublishError, Publisher};
pub use publish_kafka::KafkaPublisher;

use crate::labeller::Labelled;
use buffer::{Example, ExampleBuffer};
use drift::PageHinkley;
use gate::{Decision, DecisionLog, Verdict};

/// The trainer's counters, exported on `/metrics`.
#[derive(Debug, Default)]
pub struct TrainerStats {
    /// Examples added to a (task, profile) buffer.
    pub examples: AtomicU64,
    /// Labelled readings not given to the trainer because its queue was full.
    pub dropped: AtomicU64,
    /// Labelled readings left out for a confidence below `min_confidence`.
    pub low_confidence: AtomicU64,
    /// Drift detections.
    pub drifts: AtomicU64,
    /// Candidates that failed to train, quantize or publish.
    pub failures: AtomicU64,
    /// Gate decisions per (task, profile, decision).
    pub decisions: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    /// On-device predictions re-computed and compared (match or mismatch).
    pub parity_checked: AtomicU64,
    /// Of those, the ones whose class differed from the device's.
    pub parity_mismatches: AtomicU64,
    /// Sampled predictions that could not be checked, per reason.
    pub parity_unverifiable: Mutex<BTreeMap<&'static str, u64>>,
}

impl TrainerStats {
    /// The gate's decisions per (task, profile), e.g. `anomaly/mcu8 3
    /// published, 1 rejected; anomaly/gateway 2 published`, or `no gate
    /// decision yet` (the exit summary's `models:` line, which `edgeloop up`
    /// follows with the versions its devices ran).
    pub fn gate_summary(&self) -> String {
        let decisions = self
            .decisions
            .lock()
            .map(|d| d.clone())
            .unwrap_or_else(|p| p.into_inner().clone());
        let mut lanes: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for ((task, profile, verdict), n) in decisions {
            lanes
                .entry((task, profile))
                .or_default()
                .push(format!("{n} {verdict}"));
        }
        if lanes.is_empty() {
            return "no gate decision yet".to_string();
        }
        lanes
            .iter()
            .map(|((t, p), v)| format!("{t}/{p} {}", v.join(", ")))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// The parity check of the devices' own predictions, as one line:
    /// `parity: N device predictions recomputed in the cloud, M mismatches,
    /// U could not be checked`.
    pub fn parity_line(&self) -> String {
        let unverifiable: u64 = self
            .parity_unverifiable
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or_else(|p| p.into_inner().values().sum());
        format!(
            "parity: {} device predictions recomputed in the cloud, {} mismatches, {} could not be checked",
            crate::ProcessorStats::get(&self.parity_checked),
            crate::ProcessorStats::get(&self.parity_mismatches),
            unverifiable
        )
    }
}

/// Labelled readings of one batch, as the trainer receives them.
#[derive(Debug, Clone)]
pub struct LabelledBatch {
    pub batch: ReadingBatch,
    pub labels: Vec<Labelled>,
    pub rules_version: Option<String>,
    pub partition: i32,
    pub offset: i64,
}

/// The Kafka source's end of the trainer's queue.
#[derive(Debug, Clone)]
pub struct TrainerHandle {
    tx: SyncSender<LabelledBatch>,
    stats: Arc<TrainerStats>,
}

impl TrainerHandle {
    /// Queues a batch without blocking the data path: when the queue is
    /// full the batch is counted and left out of training (the data set has
    /// it; training sees a sample of the stream anyway).
    pub fn offer(&self, batch: LabelledBatch) {
        let n = batch.labels.len() as u64;
        match self.tx.try_send(batch) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                crate::ProcessorStats::add(&self.stats.dropped, n)
            }
        }
    }
}

/// Starts the trainer thread, publishing with `publisher` (a
/// [`KafkaPublisher`] when `trainer.signing_key_file` is set, else a
/// [`DirPublisher`] on `trainer.dir`: see [`publisher`]); it stops when
/// every handle is dropped.
pub fn spawn<P: Publisher + 'static>(
    config: TrainerConfig,
    publisher: P,
    stats: Arc<TrainerStats>,
) -> std::io::Result<(TrainerHandle, TrainerThread)> {
    let (tx, rx) = std::sync::mpsc::sync_channel(config.queue);
    let thread_stats = stats.clone();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let thread_stop = stop.clone();
    let join = std::thread::Builder::new()
        .name("trainer".into())
        .spawn(move || {
            let mut trainer = Trainer::new(config, publisher, thread_stats);
            run(&mut trainer, &rx, &thread_stop);
        })?;
    Ok((TrainerHandle { tx, stats }, TrainerThread { join, stop }))
}

/// The trainer's thread, to stop when the processor stops.
#[derive(Debug)]
pub struct TrainerThread {
    join: std::thread::JoinHandle<()>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl TrainerThread {
    /// Tells the trainer to stop (it leaves what is still queued: the data
    /// set has it, and a retrain on it would only delay the exit) and waits
    /// up to `grace` for the thread, which first finishes a retrain in
    /// progress. A thread still busy then is left to end with the process
    /// (logged): waiting longer would hold the shutdown up. Whether it
    /// ended.
    pub async fn stop(self, grace: std::time::Duration) -> bool {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + grace;
        while !self.join.is_finished() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        if self.join.is_finished() {
            if self.join.join().is_err() {
                tracing::error!("the trainer thread panicked");
            }
            true
        } else {
            tracing::warn!(
                ?grace,
                "the trainer did not stop within the grace period (a retrain in progress); left to end with the process"
            );
            false
        }
    }
}

/// The publisher `config` asks for: with `signing_key_file`, a
/// [`KafkaPublisher`] on `kafka` (caught up within `catch_up`) mirroring
/// into `trainer.dir`; without, a [`DirPublisher`] on `trainer.dir` only (no
/// device receives the models; logged).
pub async fn publisher(
    config: &TrainerConfig,
    kafka: &edgeloop_kafka::KafkaConfig,
    catch_up: std::time::Duration,
) -> Result<Box<dyn Publisher>, PublishError> {
    let dir = DirPublisher::new(&config.dir);
    match config.signing_key().map_err(PublishError::Config)? {
        Some(key) => {
            let p = KafkaPublisher::start(kafka, key, Some(dir), catch_up).await?;
            tracing::info!(dir = %config.dir.display(), "the trainer publishes signed models to edgeloop.models (and copies them under trainer.dir)");
            Ok(Box::new(p))
        }
        None => {
            tracing::warn!(dir = %config.dir.display(), "trainer.signing_key_file is not set: models are written under trainer.dir only; no device receives them");
            Ok(Box::new(dir))
        }
    }
}

fn run<P: Publisher>(
    trainer: &mut Trainer<P>,
    rx: &Receiver<LabelledBatch>,
    stop: &std::sync::atomic::AtomicBool,
) {
    let tick = std::time::Duration::from_millis(500);
    loop {
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        match rx.recv_timeout(tick) {
            Ok(batch) => trainer.ingest(&batch),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
        }
        trainer.maybe_retrain(Instant::now());
    }
}

/// Why a (task, profile) retrains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Examples,
    Time,
    Drift,
    RulesChanged,
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Examples => "examples",
            Trigger::Time => "time",
            Trigger::Drift => "drift",
            Trigger::RulesChanged => "rules_changed",
        }
    }
}

/// One (task, profile).
struct Lane {
    task: usize,
    profile: usize,
    buffer: ExampleBuffer,
    new_examples: u64,
    last_train: Instant,
    drift: PageHinkley,
    /// A trigger that fired (drift, rules change) and waits for enough data.
    pending: Option<Trigger>,
    /// After a retrain that built no candidate (one class only, say), the
    /// buffer length to wait for before the pending trigger tries again.
    retry_at_len: usize,
    live: Option<(u64, Artifact)>,
}

/// A device's recent readings (the last `capacity`), in arrival order.
struct History {
    channels: Vec<String>,
    readings: VecDeque<Recent>,
    capacity: usize,
}

/// One reading of a device's history.
struct Recent {
    seq: u64,
    ts_micros: i64,
    values: Vec<f64>,
}

/// The trainer's state (its thread owns it; tests drive it directly).
pub struct Trainer<P: Publisher> {
    config: TrainerConfig,
    lanes: Vec<Lane>,
    devices: HashMap<String, History>,
    max_window: usize,
    rules_version: Option<String>,
    publisher: P,
    log: DecisionLog,
    stats: Arc<TrainerStats>,
    /// Readings with predictions seen (for `parity_sample`).
    parity_seen: u64,
    /// Artifacts looked up for parity, by (task, profile, version): a
    /// version never changes once published, and the directory publisher
    /// would read and decode a file per lookup.
    parity_cache: HashMap<(String, String, u64), Arc<Artifact>>,
}

/// Most artifacts kept in the parity cache (it is emptied when full).
const PARITY_CACHE: usize = 256;

impl<P: Publisher> Trainer<P> {
    /// A trainer over validated `config`; the live model of each (task,
    /// profile) is read from the publisher.
    pub fn new(config: TrainerConfig, publisher: P, stats: Arc<TrainerStats>) -> Self {
        let now = Instant::now();
        let mut lanes = Vec::new();
        for (p, profile) in config.profiles.iter().enumerate() {
            for name in &profile.tasks {
                let Some(t) = config.tasks.iter().position(|t| &t.name == name) else {
                    continue;
                };
                let live = match publisher.live(name, &profile.name) {
                    Ok(live) => live,
                    Err(e) => {
                        tracing::error!(task = %name, profile = %profile.name, error = %e, "cannot read the live model; starting without one");
                        None
                    }
                };
                lanes.push(Lane {
                    task: t,
                    profile: p,
                    buffer: ExampleBuffer::new(
                        config.window_examples,
                        config.reservoir_examples,
                        config.seed ^ (lanes.len() as u64),
                    ),
                    new_examples: 0,
                    last_train: now,
                    drift: PageHinkley::new(
                        config.drift.delta,
                        config.drift.threshold,
                        config.drift.min_examples,
                    ),
                    pending: None,
                    retry_at_len: 0,
                    live,
                });
            }
        }
        let max_window = config
            .profiles
            .iter()
            .map(|p| p.features.window)
            .max()
            .unwrap_or(1);
        let log = DecisionLog::new(&config.dir);
        Trainer {
            config,
            lanes,
            devices: HashMap::new(),
            max_window,
            rules_version: None,
            publisher,
            log,
            stats,
            parity_seen: 0,
            parity_cache: HashMap::new(),
        }
    }

    /// The live model of (task, profile).
    pub fn live(&self, task: &str, profile: &str) -> Option<&(u64, Artifact)> {
        self.lanes
            .iter()
            .find(|l| {
                self.config.tasks[l.task].name == task
                    && self.config.profiles[l.profile].name == profile
            })
            .and_then(|l| l.live.as_ref())
    }

    /// Buffered examples of (task, profile).
    pub fn buffered(&self, task: &str, profile: &str) -> usize {
        self.lanes
            .iter()
            .find(|l| {
                self.config.tasks[l.task].name == task
                    && self.config.profiles[l.profile].name == profile
            })
            .map_or(0, |l| l.buffer.len())
    }

    /// Takes a labelled batch into the device histories and the buffers.
    pub fn ingest(&mut self, input: &LabelledBatch) {
        if let Some(v) = &input.rules_version {
            if self.rules_version.as_ref().is_some_and(|old| old != v) {
                // New rules: old labels mean something else. Start the
                // buffers afresh and retrain once there is enough data.
                tracing::info!(rules_version = %v, "rules changed: the trainer starts its buffers afresh");
                for lane in &mut self.lanes {
                    lane.buffer.clear();
                    lane.new_examples = 0;
                    lane.drift.reset();
                    lane.pending = Some(Trigger::RulesChanged);
                }
            }
            self.rules_version = Some(v.clone());
        }
        let rules_version: Arc<str> = Arc::from(input.rules_version.as_deref().unwrap_or(""));
        let batch = &input.batch;
        let max_window = self.max_window;
        let history = self
            .devices
            .entry(batch.device_id.clone())
            .or_insert_with(|| History {
                channels: batch.channels.clone(),
                readings: VecDeque::new(),
                capacity: max_window,
            });
        if history.channels != batch.channels {
            history.channels = batch.channels.clone();
            history.readings.clear();
        }
        for (i, reading) in batch.readings.iter().enumerate() {
            let seq = batch.first_seq + i as u64;
            history.readings.push_back(Recent {
                seq,
                ts_micros: reading.ts_micros,
                values: reading.values.clone(),
            });
            while history.readings.len() > history.capacity {
                history.readings.pop_front();
            }
            if !reading.predictions.is_empty() && self.config.parity_sample > 0 {
                self.parity_seen += 1;
                if self.parity_seen.is_multiple_of(self.config.parity_sample) {
                    for p in &reading.predictions {
                        let key = (p.task.clone(), batch.profile.clone(), p.model_version);
                        let artifact = match self.parity_cache.get(&key) {
                            Some(a) => Some(a.clone()),
                            None => {
                                let a = self.publisher.artifact(&key.0, &key.1, key.2);
                                if let Some(a) = &a {
                                    if self.parity_cache.len() >= PARITY_CACHE {
                                        self.parity_cache.clear();
                                    }
                                    self.parity_cache.insert(key, a.clone());
                                }
                                a
                            }
                        };
                        let outcome = parity::check(artifact.as_deref(), p, history, seq);
                        record_parity(
                            &self.stats,
                            &batch.device_id,
                            &batch.profile,
                            seq,
                            p,
                            outcome,
                        );
                    }
                }
            }
            let Some(labelled) = input.labels.get(i) else {
                continue;
            };
            let Some(label) = &labelled.label else {
                continue;
            };
            if labelled.confidence.unwrap_or(1.0) < self.config.min_confidence {
                crate::ProcessorStats::add(&self.stats.low_confidence, 1);
                continue;
            }
            for lane in &mut self.lanes {
                let task = &self.config.tasks[lane.task];
                let profile = &self.config.profiles[lane.profile];
                let Some(class) = task.class_of(label) else {
                    continue;
                };
                let Some(features) = features(profile, history) else {
                    continue;
                };
                if let Some((_, live)) = &lane.live {
                    if self.config.drift.enabled {
                        let predicted = fit::predict(live, &features)
                            .ok()
                            .and_then(|c| fit::classes(live).get(c));
                        let disagree = predicted != task.classes.get(class);
                        if lane.drift.update(f64::from(u8::from(disagree))) {
                            tracing::info!(task = %task.name, profile = %profile.name, "drift: the live model disagrees more often with the rules");
                            crate::ProcessorStats::add(&self.stats.drifts, 1);
                            lane.pending.get_or_insert(Trigger::Drift);
                        }
                    }
                }
                lane.buffer.push(Example {
                    features,
                    class,
                    ts_micros: reading.ts_micros,
                    partition: input.partition,
                    offset: input.offset,
                    rules_version: rules_version.clone(),
                });
                lane.new_examples += 1;
                crate::ProcessorStats::add(&self.stats.examples, 1);
            }
        }
    }

    /// Retrains every (task, profile) whose trigger fired and that has
    /// enough data; returns the decisions made.
    pub fn maybe_retrain(&mut self, now: Instant) -> Vec<Decision> {
        let mut decisions = Vec::new();
        for i in 0..self.lanes.len() {
            let lane = &self.lanes[i];
            if lane.new_examples == 0 {
                continue;
            }
            let trigger = if let Some(t) = lane.pending {
                if lane.buffer.len() < lane.retry_at_len {
                    continue;
                }
                t
            } else if lane.new_examples >= self.config.retrain_every_examples {
                Trigger::Examples
            } else if now.duration_since(lane.last_train) >= self.config.retrain_every {
                Trigger::Time
            } else {
                continue;
            };
            let enough = (lane.buffer.len() as f64 * self.config.gate.holdout_fraction).floor()
                as usize
                >= self.config.gate.min_holdout;
            if !enough {
                continue;
            }
            if let Some(d) = self.retrain(i, trigger, now) {
                decisions.push(d);
            }
        }
        decisions
    }

    /// Trains a candidate for lane `i`, gates it and publishes it if it
    /// passes. `None` when no candidate could be built (logged, counted).
    fn retrain(&mut self, i: usize, trigger: Trigger, now: Instant) -> Option<Decision> {
        let started = Instant::now();
        let config = &self.config;
        let lane = &mut self.lanes[i];
        lane.new_examples = 0;
        lane.last_train = now;
        lane.pending = None;
        lane.retry_at_len = 0;
        let task = &config.tasks[lane.task];
        let profile = &config.profiles[lane.profile];
        // The live model may have changed elsewhere (a rollback or pin by
        // the control API): compare with what devices run now.
        match self.publisher.live(&task.name, &profile.name) {
            Ok(live) => {
                let now_live = live.as_ref().map(|(v, _)| *v);
                if now_live != lane.live.as_ref().map(|(v, _)| *v) {
                    tracing::info!(task = %task.name, profile = %profile.name, live = ?now_live, "the live model changed outside this trainer (rollback or pin)");
                    lane.drift.reset();
                    lane.live = live;
                }
            }
            Err(e) => {
                tracing::warn!(task = %task.name, profile = %profile.name, error = %e, "cannot read the live model; gating against the last known one")
            }
        }
        // A trigger that waits for data (rules changed, drift) is kept when
        // no candidate can be built yet, and tried again once the buffer has
        // grown by `min_holdout` examples.
        let keep = |lane: &mut Lane| {
            if trigger != Trigger::Examples && trigger != Trigger::Time {
                lane.pending = Some(trigger);
                lane.retry_at_len = lane.buffer.len() + config.gate.min_holdout;
            }
        };
        let Some(split) = gate::split(lane.buffer.examples(), config.gate.holdout_fraction) else {
            keep(lane);
            return None;
        };
        let built = fit::fit(&profile.features, &task.classes, &split.train, config.l2)
            .and_then(|float| fit::build(float, profile.numerics, &split.train));
        let candidate = match built {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(task = %task.name, profile = %profile.name, trigger = trigger.as_str(), error = %e, "no candidate");
                crate::ProcessorStats::add(&self.stats.failures, 1);
                drop(split);
                keep(lane);
                return None;
            }
        };
        let fit_millis = started.elapsed().as_millis() as u64;
        let cand_metrics = fit::evaluate(&candidate, &task.classes, &split.held_out);
        let live_metrics = lane
            .live
            .as_ref()
            .map(|(_, m)| fit::evaluate(m, &task.classes, &split.held_out));
        let bytes = candidate.encode().len();
        let (mut verdict, mut reason) = gate::judge(
            &config.gate,
            &cand_metrics,
            live_metrics.as_ref(),
            bytes,
            profile.max_model_bytes,
        );
        let (train_offsets, train_window) = gate::lineage(&split.train);
        let (held_out_offsets, held_out_window) = gate::lineage(&split.held_out);
        let mut rules_versions: Vec<String> = split
            .train
            .iter()
            .chain(&split.held_out)
            .map(|e| e.rules_version.to_string())
            .collect();
        rules_versions.sort();
        rules_versions.dedup();
        let mut decision = Decision {
            at: chrono::Utc::now().to_rfc3339(),
            task: task.name.clone(),
            profile: profile.name.clone(),
            numerics: profile.numerics.as_str(),
            decision: verdict,
            reason: String::new(),
            trigger: trigger.as_str(),
            metric: config.gate.metric,
            margin: config.gate.margin,
            candidate: cand_metrics,
            live: live_metrics,
            live_version: lane.live.as_ref().map(|(v, _)| *v),
            version: None,
            model_bytes: bytes,
            classes: fit::classes(&candidate).to_vec(),
            train_examples: split.train.len(),
            held_out_examples: split.held_out.len(),
            train_window,
            held_out_window,
            train_offsets,
            held_out_offsets,
            rules_versions,
            min_confidence: config.min_confidence,
            fit_millis,
        };
        if verdict == Verdict::Published {
            decision.reason = reason.clone();
            let lineage = serde_json::to_value(&decision).unwrap_or_default();
            match self
                .publisher
                .publish(&task.name, &profile.name, &candidate, &lineage)
            {
                Ok(v) => {
                    decision.version = Some(v);
                    lane.live = Some((v, candidate));
                    lane.drift.reset();
                }
                Err(PublishError::Pinned { version }) => {
                    verdict = Verdict::Pinned;
                    reason = format!(
                        "pinned at v{version}: not published, though the gate passed it ({reason})"
                    );
                }
                Err(e) => {
                    crate::ProcessorStats::add(&self.stats.failures, 1);
                    verdict = Verdict::Rejected;
                    reason = format!("{reason}; but publishing failed: {e}");
                }
            }
        }
        decision.decision = verdict;
        decision.reason = reason;
        tracing::info!(task = %decision.task, profile = %decision.profile, decision = verdict.as_str(), version = ?decision.version, reason = %decision.reason, "gate decision");
        if let Err(e) = self.log.append(&decision) {
            tracing::error!(path = %self.log.path().display(), error = %e, "cannot append to the decision log");
        }
        let mut counts = self
            .stats
            .decisions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *counts
            .entry((
                decision.task.clone(),
                decision.profile.clone(),
                verdict.as_str(),
            ))
            .or_default() += 1;
        Some(decision)
    }
}

/// Counts (and, for a mismatch, logs) the outcome of a parity check.
fn record_parity(
    stats: &TrainerStats,
    device: &str,
    profile: &str,
    seq: u64,
    p: &edgeloop_proto::v1::Prediction,
    outcome: parity::Outcome,
) {
    match outcome {
        parity::Outcome::Match => crate::ProcessorStats::add(&stats.parity_checked, 1),
        parity::Outcome::Mismatch { expected, features } => {
            crate::ProcessorStats::add(&stats.parity_checked, 1);
            crate::ProcessorStats::add(&stats.parity_mismatches, 1);
            tracing::warn!(device, task = %p.task, profile, version = p.model_version, seq, device_label = %p.label, expected = %expected, window = p.window, ?features,
                "parity mismatch: the device's prediction differs from its model's on the same readings");
        }
        parity::Outcome::Unverifiable(reason) => {
            tracing::debug!(device, task = %p.task, profile, version = p.model_version, seq, reason = reason.as_str(), "parity: prediction not verifiable");
            *stats
                .parity_unverifiable
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(reason.as_str())
                .or_default() += 1;
        }
    }
}

/// The profile's features over the device's window ending now, if the
/// device sends every channel the profile needs.
fn features(profile: &DeviceProfile, history: &History) -> Option<Vec<f32>> {
    let window = profile.features.window;
    let start = history.readings.len().saturating_sub(window);
    let recent = history.readings.range(start..);
    let ts: Vec<i64> = recent.clone().map(|r| r.ts_micros).collect();
    let mut columns = Vec::with_capacity(profile.features.channels.len());
    for name in &profile.features.channels {
        let index = history.channels.iter().position(|c| c == name)?;
        columns.push(
            recent
                .clone()
                .map(|r| r.values.get(index).copied().unwrap_or(f64::NAN))
                .collect::<Vec<f64>>(),
        );
    }
    let columns: Vec<&[f64]> = columns.iter().map(Vec::as_slice).collect();
    profile.features.extract_columns(&ts, &columns).ok()
}
