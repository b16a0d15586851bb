//! The processor's HTTP endpoint: `/metrics` (Prometheus text format),
//! `/healthz` and `/readyz`, served by `edgeloop-ops` (the server the
//! broker and the agent share).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use crate::labeller::RuleCounts;
use crate::stats::ProcessorStats;

/// Per (rules version, rule): counts summed over every closed file, and the
/// latest estimated accuracy.
#[derive(Debug, Default)]
pub struct RuleMetrics {
    pub rules: BTreeMap<(String, String), (RuleCounts, Option<f64>)>,
    /// The rules in force: version, and (name, label) of each rule in file
    /// order (none: no rules file, or none accepted yet).
    pub in_force: Option<(String, Vec<(String, String)>)>,
}

pub type SharedRuleMetrics = Arc<Mutex<RuleMetrics>>;

/// A metric family of rule counts: name, help, which count.
type Family = (&'static str, &'static str, fn(&RuleCounts) -> u64);

fn render(stats: &ProcessorStats, rules: &RuleMetrics) -> String {
    let mut out = String::new();
    let counters = [
        (
            "edgeloop_processor_records_total",
            "Kafka records consumed",
            &stats.records_consumed,
        ),
        (
            "edgeloop_processor_rows_written_total",
            "Readings in files renamed into the data set",
            &stats.rows_written,
        ),
        (
            "edgeloop_processor_files_written_total",
            "Parquet files renamed into the data set",
            &stats.files_written,
        ),
        (
            "edgeloop_processor_dead_letters_total",
            "Records sent to the dead-letter topic",
            &stats.dead_letters,
        ),
        (
            "edgeloop_processor_commit_errors_total",
            "Offset commits that failed",
            &stats.commit_errors,
        ),
        (
            "edgeloop_processor_startup_kafka_retries_total",
            "Times start-up asked Kafka again after no answer (topic creation)",
            &stats.startup_kafka_retries,
        ),
        (
            "edgeloop_processor_consumer_restarts_total",
            "Kafka consumers replaced after Kafka fenced them for good (a fatal librdkafka error)",
            &stats.consumer_restarts,
        ),
        (
            "edgeloop_processor_offset_gaps_total",
            "Partitions whose first record after assignment came past the committed offset (records between were no longer in Kafka)",
            &stats.offset_gaps,
        ),
        (
            "edgeloop_processor_files_aborted_total",
            "Open files dropped on a rebalance",
            &stats.files_aborted,
        ),
        (
            "edgeloop_processor_loss_reports_total",
            "Loss reports from devices",
            &stats.loss_reports,
        ),
        (
            "edgeloop_processor_readings_reported_lost_total",
            "Readings devices reported lost",
            &stats.readings_reported_lost,
        ),
        (
            "edgeloop_processor_invalid_batches_total",
            "Batches refused for their content (dead letters) whose seqs were recorded in losses as invalid_batch",
            &stats.invalid_batches,
        ),
        (
            "edgeloop_processor_readings_invalid_total",
            "Seqs of batches refused for their content, recorded in losses as invalid_batch",
            &stats.readings_invalid,
        ),
        (
            "edgeloop_processor_statuses_refused_total",
            "Device status records the control API refused (not a DeviceStatus, another device than the key, time or seq out of range)",
            &stats.statuses_refused,
        ),
        (
            "edgeloop_processor_duplicates_dropped_total",
            "Readings dropped as already in the data set",
            &stats.duplicates_dropped,
        ),
        (
            "edgeloop_processor_rules_reloads_total",
            "Rules files taken into force",
            &stats.rules_reloads,
        ),
        (
            "edgeloop_processor_rules_refused_total",
            "Rules files refused",
            &stats.rules_refused,
        ),
    ];
    for (name, help, value) in counters {
        edgeloop_ops::counter(&mut out, name, help, value.load(Ordering::Relaxed));
    }
    edgeloop_ops::gauge(
        &mut out,
        "edgeloop_processor_partitions_assigned",
        "Partitions of the readings topic assigned to this processor",
        stats.partitions_assigned.load(Ordering::Relaxed),
    );
    edgeloop_ops::gauge(
        &mut out,
        "edgeloop_processor_devices_without_trainer_profile",
        "Devices seen (in this processor's partitions) whose profile no trainer profile has: they get no model",
        stats.devices_without_trainer_profile.load(Ordering::Relaxed),
    );
    edgeloop_ops::gauge(
        &mut out,
        "edgeloop_processor_unassigned_seconds",
        "Seconds this processor has been without any partition (0 while it has some)",
        stats.unassigned_seconds.load(Ordering::Relaxed),
    );
    let families: [Family; 5] = [
        (
            "edgeloop_rule_readings_total",
            "Readings a labelling rule saw",
            |c| c.readings,
        ),
        (
            "edgeloop_rule_votes_total",
            "Readings a labelling rule voted on (coverage = votes / readings)",
            |c| c.votes,
        ),
        (
            "edgeloop_rule_overlaps_total",
            "Votes cast alongside another rule's",
            |c| c.overlaps,
        ),
        (
            "edgeloop_rule_conflicts_total",
            "Votes cast against another rule's label",
            |c| c.conflicts,
        ),
        (
            "edgeloop_rule_agreements_total",
            "Votes equal to the final label",
            |c| c.agreements,
        ),
    ];
    for (name, help, get) in families {
        let _ = writeln!(out, "# HELP {name} {help}.\n# TYPE {name} counter");
        for ((version, rule), (counts, _)) in &rules.rules {
            let _ = writeln!(
                out,
                "{name}{{rules_version=\"{version}\",rule=\"{rule}\"}} {}",
                get(counts)
            );
        }
    }
    let t = &stats.trainer;
    let trainer_counters = [
        (
            "edgeloop_trainer_examples_total",
            "Labelled readings added to a (task, profile) training buffer",
            &t.examples,
        ),
        (
            "edgeloop_trainer_examples_dropped_total",
            "Labelled readings not given to the trainer because its queue was full",
            &t.dropped,
        ),
        (
            "edgeloop_trainer_low_confidence_total",
            "Labelled readings left out of training for a confidence below trainer.min_confidence",
            &t.low_confidence,
        ),
        (
            "edgeloop_trainer_drift_detections_total",
            "Times Page-Hinkley detected a rise of the live model's disagreement with the rules",
            &t.drifts,
        ),
        (
            "edgeloop_trainer_failures_total",
            "Candidates that could not be trained, quantized or published",
            &t.failures,
        ),
        (
            "edgeloop_processor_parity_checked_total",
            "On-device predictions re-computed with the device's model version on the same readings and compared",
            &t.parity_checked,
        ),
        (
            "edgeloop_processor_parity_mismatches_total",
            "Re-computed on-device predictions whose class differed from the device's (must stay at zero)",
            &t.parity_mismatches,
        ),
    ];
    for (name, help, value) in trainer_counters {
        let _ = writeln!(
            out,
            "# HELP {name} {help}.\n# TYPE {name} counter\n{name} {}",
            value.load(Ordering::Relaxed)
        );
    }
    let name = "edgeloop_trainer_gate_decisions_total";
    let _ = writeln!(
        out,
        "# HELP {name} Quality gate decisions per task, device profile and decision (published, rejected, or pinned).\n# TYPE {name} counter"
    );
    for ((task, profile, decision), n) in
        t.decisions.lock().unwrap_or_else(|p| p.into_inner()).iter()
    {
        let _ = writeln!(
            out,
            "{name}{{task=\"{task}\",profile=\"{profile}\",decision=\"{decision}\"}} {n}"
        );
    }
    let name = "edgeloop_processor_parity_unverifiable_total";
    let _ = writeln!(
        out,
        "# HELP {name} Sampled on-device predictions that could not be re-computed, per reason.\n# TYPE {name} counter"
    );
    for (reason, n) in t
        .parity_unverifiable
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let _ = writeln!(out, "{name}{{reason=\"{reason}\"}} {n}");
    }
    let name = "edgeloop_rule_estimated_accuracy";
    let _ = writeln!(out, "# HELP {name} The label model's estimated accuracy of a labelling rule.\n# TYPE {name} gauge");
    for ((version, rule), (_, accuracy)) in &rules.rules {
        if let Some(a) = accuracy {
            let _ = writeln!(
                out,
                "{name}{{rules_version=\"{version}\",rule=\"{rule}\"}} {a}"
            );
        }
    }
    out
}

/// Serves until `shutdown`.
pub async fn serve(
    listen: SocketAddr,
    stats: Arc<ProcessorStats>,
    rules: SharedRuleMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = edgeloop_ops::bind(listen).await?;
    edgeloop_ops::serve(listener, Arc::new(Endpoint { stats, rules }), shutdown).await
}

struct Endpoint {
    stats: Arc<ProcessorStats>,
    rules: SharedRuleMetrics,
}

impl edgeloop_ops::Endpoint for Endpoint {
    fn metrics(&self) -> String {
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        render(&self.stats, &rules)
    }

    /// The processor is ready as soon as it serves: the consumer group, not
    /// a load balancer, hands it work.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}
