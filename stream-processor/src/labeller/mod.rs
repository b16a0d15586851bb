//! Streaming auto-labelling with heuristic rules.
//!
//! - [`rules`]: the rules file an expert writes (TOML), parsed and checked.
//! - [`Engine`]: applies the rules to each reading of a device, keeping the
//!   per-device state that rate-of-change, z-score, flat and duration rules
//!   need; each rule votes its label or abstains.
//! - [`LabelModel`]: combines the votes, by majority or by weighting each
//!   rule with its accuracy estimated without ground truth, from the
//!   agreements, disagreements and abstentions between rules (a latent-class
//!   Dawid–Skene model fitted by online EM, in the manner of Snorkel's label
//!   model). Readings on which every rule abstained stay unlabelled.
//!
//! - [`stats`]: per-rule statistics from the `rule_stats` table (`edgeloop
//!   labels stats`).
//!
//! The per-device state and the model are part of the processor's snapshot at
//! every commit, so a restart resumes them where the data set stands and does
//! not change labels.

#[cfg(test)]
mod quality;
pub mod rules;
pub mod stats;

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use rules::{Combiner, Condition, Rule, RulesError, RulesFile};

/// State of one stateful condition node for one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum NodeState {
    Rate { prev: Option<(i64, f64)> },
    Window { values: VecDeque<f64> },
    Duration { since: Option<i64> },
}

fn initial_states(cond: &Condition, out: &mut Vec<NodeState>) {
    match cond {
        Condition::RateOfChange { .. } => out.push(NodeState::Rate { prev: None }),
        Condition::Zscore { .. } | Condition::Flat { .. } => out.push(NodeState::Window {
            values: VecDeque::new(),
        }),
        Condition::Duration { .. } => out.push(NodeState::Duration { since: None }),
        Condition::All { of } | Condition::Any { of } => {
            of.iter().for_each(|c| initial_states(c, out))
        }
        Condition::Not { of } => initial_states(of, out),
        Condition::Threshold { .. } | Condition::Range { .. } => {}
    }
}

fn beyond(v: f64, above: Option<f64>, below: Option<f64>) -> bool {
    above.is_some_and(|a| v > a) || below.is_some_and(|b| v < b)
}

/// Takes the next state node, a window, together with the reading's value
/// (`None` when either is missing; the node is taken all the same).
fn window_node<'a>(
    states: &'a mut [NodeState],
    next: &mut usize,
    value: Option<f64>,
) -> Option<(&'a mut VecDeque<f64>, f64)> {
    let i = *next;
    *next += 1;
    match (states.get_mut(i), value) {
        (Some(NodeState::Window { values }), Some(v)) => Some((values, v)),
        _ => None,
    }
}

/// Evaluates `cond` on one reading, updating its state nodes (every node is
/// visited, so `all`/`any` do not short-circuit state updates).
fn eval(
    cond: &Condition,
    value: &dyn Fn(&str) -> Option<f64>,
    ts: i64,
    states: &mut [NodeState],
    next: &mut usize,
) -> bool {
    match cond {
        Condition::Threshold {
            channel,
            above,
            below,
        } => value(channel).is_some_and(|v| beyond(v, *above, *below)),
        Condition::Range {
            channel,
            min,
            max,
            inside,
        } => value(channel).is_some_and(|v| ((*min..=*max).contains(&v)) == *inside),
        Condition::RateOfChange {
            channel,
            max_per_second,
        } => {
            let i = *next;
            *next += 1;
            let Some(NodeState::Rate { prev }) = states.get_mut(i) else {
                return false;
            };
            let Some(v) = value(channel) else {
                return false;
            };
            let fired = prev.is_some_and(|(pts, pv)| {
                let dt = (ts - pts) as f64 / 1e6;
                dt > 0.0 && ((v - pv) / dt).abs() > *max_per_second
            });
            *prev = Some((ts, v));
            fired
        }
        Condition::Zscore {
            channel,
            window,
            above,
        } => {
            let Some((values, v)) = window_node(states, next, value(channel)) else {
                return false;
            };
            let n = values.len();
            let fired = n >= (*window / 2).max(2) && {
                let mean = values.iter().sum::<f64>() / n as f64;
                let var = values.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
                let sd = var.sqrt();
                if sd > 0.0 {
                    ((v - mean) / sd).abs() > *above
                } else {
                    v != mean
                }
            };
            values.push_back(v);
            while values.len() > *window {
                values.pop_front();
            }
            fired
        }
        Condition::Flat {
            channel,
            window,
            tolerance,
        } => {
            let Some((values, v)) = window_node(states, next, value(channel)) else {
                return false;
            };
            values.push_back(v);
            while values.len() > *window {
                values.pop_front();
            }
            values.len() == *window && {
                let (lo, hi) = values
                    .iter()
                    .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
                hi - lo <= *tolerance
            }
        }
        Condition::Duration {
            channel,
            above,
            below,
            for_seconds,
        } => {
            let i = *next;
            *next += 1;
            let Some(NodeState::Duration { since }) = states.get_mut(i) else {
                return false;
            };
            match value(channel) {
                Some(v) if beyond(v, *above, *below) => {
                    let start = *since.get_or_insert(ts);
                    (ts - start) as f64 / 1e6 >= *for_seconds
                }
                _ => {
                    *since = None;
                    false
                }
            }
        }
        // Every child is evaluated (no short-circuit) so that its state
        // sees every reading.
        Condition::All { of } => {
            let results: Vec<bool> = of
                .iter()
                .map(|c| eval(c, value, ts, states, next))
                .collect();
            results.iter().all(|r| *r)
        }
        Condition::Any { of } => {
            let results: Vec<bool> = of
                .iter()
                .map(|c| eval(c, value, ts, states, next))
                .collect();
            results.iter().any(|r| *r)
        }
        Condition::Not { of } => !eval(of, value, ts, states, next),
    }
}

/// Per-device state of every rule.
pub type DeviceState = Vec<Vec<NodeStateBox>>;

/// Opaque, serializable state of a rule's stateful conditions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStateBox(NodeState);

/// The rules in force and what they need to remember per device.
#[derive(Debug, Clone)]
pub struct Engine {
    pub rules: RulesFile,
    /// The distinct labels the rules vote, sorted.
    pub labels: Vec<String>,
    /// Index in `labels` of each rule's label.
    rule_label: Vec<usize>,
}

impl Engine {
    pub fn new(rules: RulesFile) -> Engine {
        let mut labels: Vec<String> = rules.rules.iter().map(|r| r.label.clone()).collect();
        labels.sort();
        labels.dedup();
        let rule_label = rules
            .rules
            .iter()
            .map(|r| labels.binary_search(&r.label).unwrap_or(0))
            .collect();
        Engine {
            rules,
            labels,
            rule_label,
        }
    }

    /// Fresh per-device state for these rules.
    pub fn new_state(&self) -> DeviceState {
        self.rules
            .rules
            .iter()
            .map(|r| {
                let mut s = Vec::new();
                initial_states(&r.when, &mut s);
                s.into_iter().map(NodeStateBox).collect()
            })
            .collect()
    }

    /// The vote of each rule (an index into `labels`) on one reading.
    pub fn votes(
        &self,
        state: &mut DeviceState,
        value: &dyn Fn(&str) -> Option<f64>,
        ts: i64,
    ) -> Vec<Option<usize>> {
        if state.len() != self.rules.rules.len() {
            *state = self.new_state();
        }
        self.rules
            .rules
            .iter()
            .zip(state.iter_mut())
            .enumerate()
            .map(|(i, (rule, boxes))| {
                // Unbox for evaluation, box again after.
                let mut nodes: Vec<NodeState> = boxes.drain(..).map(|b| b.0).collect();
                let fired = eval(&rule.when, value, ts, &mut nodes, &mut 0);
                boxes.extend(nodes.into_iter().map(NodeStateBox));
                fired.then_some(self.rule_label[i])
            })
            .collect()
    }
}

/// The label of one reading.
#[derive(Debug, Clone, PartialEq)]
pub struct Labelled {
    pub label: Option<String>,
    pub confidence: Option<f64>,
}

/// Combines votes into a label and a confidence, learning each rule's
/// accuracy from the stream.
///
/// A latent-class (Dawid–Skene) model fitted by incremental EM, in the
/// manner of Snorkel's label model: every reading has a true label `y` that
/// no one sees, rules are independent given `y`, and each rule, given `y`,
/// votes or abstains with probabilities of its own:
///
/// - `P(vote y | y)`: how often it votes a label's readings right, per label;
/// - `P(vote v | y ≠ v)`: how often it votes `v` on readings of another
///   label, one figure per vote (a rule's false alarms for `v` are not told
///   apart by what the reading really was: that would let the model invent
///   a label out of one rule's false alarms);
/// - abstaining otherwise.
///
/// Abstaining is evidence too: when the rules that see real spikes stay
/// silent, a lone "spike" vote is likely a false alarm, so a rule that votes
/// where no other rule agrees is found out even where it conflicts with a
/// single other rule. The label balance is learned as well.
///
/// Each reading on which at least one rule voted adds its posterior over `y`
/// to the expected counts. The first [`WARM_UP`] such readings add the
/// majority vote's shares instead: counted from the model's own early,
/// prior-only posteriors, a label seen late could be folded into a common
/// one for good (online EM keeps what it counted first).
///
/// A rule's accuracy is estimable only from readings on which it voted
/// together with another rule: a rule that always votes alone (rules an
/// expert wrote to exclude each other) is explained equally well as always
/// right or often wrong, and the model would answer with its prior, about
/// 1.0. Such a rule's accuracy is `None` until it has voted alongside
/// another rule on [`MIN_OVERLAPS`] readings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelModel {
    /// Per rule, per true label, per outcome (each label, then abstain): the
    /// expected number of readings.
    outcomes: Vec<Vec<Vec<f64>>>,
    /// Per true label: the expected number of readings with a vote.
    classes: Vec<f64>,
    /// Per rule: readings it voted on while another rule voted too (the
    /// evidence on its accuracy). Absent from a snapshot of an older
    /// processor: counted afresh from the restart.
    #[serde(default)]
    overlaps: Vec<u64>,
}

/// Readings on which a rule must have voted together with another rule
/// before the model gives an estimate of its accuracy (fewer: `None`, not
/// estimable). A handful of overlaps would leave the estimate at the prior.
pub const MIN_OVERLAPS: u64 = 10;

/// Readings with a vote that the model learns from by majority shares
/// before it learns from its own posterior.
const WARM_UP: f64 = 1000.0;
/// Beta priors, as pseudo-readings: a rule votes its label on half of that
/// label's readings, and `v` on 1 in 11 of other labels' readings (a vote
/// is, a priori, ten times likelier right than wrong).
const PRIOR_RIGHT: (f64, f64) = (2.0, 2.0);
const PRIOR_WRONG: (f64, f64) = (0.2, 2.0);
/// Dirichlet prior of the label balance.
const PRIOR_CLASS: f64 = 10.0;

/// The outcome index of a vote: the label, or `labels` for abstain.
fn outcome_of(vote: Option<usize>, labels: usize) -> usize {
    vote.filter(|v| *v < labels).unwrap_or(labels)
}

impl LabelModel {
    pub fn new(rules: usize, labels: usize) -> LabelModel {
        LabelModel {
            outcomes: vec![vec![vec![0.0; labels + 1]; labels]; rules],
            classes: vec![0.0; labels],
            overlaps: vec![0; rules],
        }
    }

    fn labels(&self) -> usize {
        self.classes.len()
    }

    /// The label balance among readings with a vote.
    fn balance(&self) -> Vec<f64> {
        let k = self.labels();
        let total: f64 = self.classes.iter().sum::<f64>() + PRIOR_CLASS * k as f64;
        self.classes
            .iter()
            .map(|n| (n + PRIOR_CLASS) / total)
            .collect()
    }

    /// Rule `j`'s parameters: `right[y]` = P(vote y | y) and `wrong[v]` =
    /// P(vote v | a label other than v).
    fn rule(&self, j: usize, right: &mut [f64], wrong: &mut [f64]) {
        let counts = &self.outcomes[j];
        // Every reading learned from adds its posterior to one outcome of
        // every rule, so a label's readings are the same for all rules.
        let all: f64 = self.classes.iter().sum();
        let (a, b) = PRIOR_RIGHT;
        let (c, d) = PRIOR_WRONG;
        for (v, readings) in self.classes.iter().enumerate() {
            right[v] = (counts[v][v] + a) / (readings + a + b);
            let votes: f64 = counts.iter().map(|c| c[v]).sum::<f64>() - counts[v][v];
            wrong[v] = (votes + c) / (all - readings + c + d);
        }
    }

    /// P(outcome `o` | true label `y`) from a rule's parameters (outcome
    /// `right.len()` is abstain).
    fn probability(y: usize, o: usize, right: &[f64], wrong: &[f64]) -> f64 {
        // A rule voting several labels could push the votes past 1:
        // abstaining keeps a sliver and the votes are scaled down.
        let voted = right[y] + wrong.iter().sum::<f64>() - wrong[y];
        let scale = if voted > 0.999 { 0.999 / voted } else { 1.0 };
        if o == y {
            right[y] * scale
        } else if o < right.len() {
            wrong[o] * scale
        } else {
            1.0 - voted * scale
        }
    }

    /// Estimated accuracy of each rule: the probability, under the model,
    /// that the label it votes is the true one; `None` (not estimable) for
    /// a rule that voted together with another rule on fewer than
    /// [`MIN_OVERLAPS`] readings.
    pub fn accuracies(&self) -> Vec<Option<f64>> {
        let k = self.labels();
        let balance = self.balance();
        let (mut right, mut wrong) = (vec![0.0; k], vec![0.0; k]);
        (0..self.outcomes.len())
            .map(|j| {
                if self.overlaps.get(j).copied().unwrap_or(0) < MIN_OVERLAPS {
                    return None;
                }
                self.rule(j, &mut right, &mut wrong);
                let (mut correct, mut all) = (0.0, 0.0);
                for (y, p) in balance.iter().enumerate() {
                    for o in 0..k {
                        let mass = p * Self::probability(y, o, &right, &wrong);
                        all += mass;
                        if o == y {
                            correct += mass;
                        }
                    }
                }
                Some(if all > 0.0 { correct / all } else { 0.0 })
            })
            .collect()
    }

    fn posterior(&self, votes: &[Option<usize>]) -> Vec<f64> {
        let k = self.labels();
        let mut log: Vec<f64> = self.balance().iter().map(|p| p.ln()).collect();
        let (mut right, mut wrong) = (vec![0.0; k], vec![0.0; k]);
        for (j, v) in votes.iter().enumerate() {
            self.rule(j, &mut right, &mut wrong);
            let o = outcome_of(*v, k);
            for (y, l) in log.iter_mut().enumerate() {
                *l += Self::probability(y, o, &right, &wrong).ln();
            }
        }
        let max = log.iter().cloned().fold(f64::MIN, f64::max);
        let exp: Vec<f64> = log.iter().map(|l| (l - max).exp()).collect();
        let sum: f64 = exp.iter().sum();
        exp.into_iter().map(|e| e / sum).collect()
    }

    /// Labels one reading from its votes and learns from them.
    pub fn label(
        &mut self,
        combiner: Combiner,
        votes: &[Option<usize>],
        labels: &[String],
    ) -> Labelled {
        let voting = votes.iter().filter(|v| v.is_some()).count();
        if voting == 0 || labels.is_empty() {
            return Labelled {
                label: None,
                confidence: None,
            };
        }
        if self.outcomes.len() != votes.len() || self.labels() != labels.len() {
            *self = LabelModel::new(votes.len(), labels.len());
        }
        let k = labels.len();
        let posterior = self.posterior(votes);
        let learn = if self.classes.iter().sum::<f64>() < WARM_UP {
            let mut shares = vec![0.0; k];
            votes
                .iter()
                .flatten()
                .filter(|v| **v < k)
                .for_each(|v| shares[*v] += 1.0 / voting as f64);
            shares
        } else {
            posterior.clone()
        };
        if voting > 1 {
            self.overlaps.resize(votes.len(), 0);
            for (j, v) in votes.iter().enumerate() {
                self.overlaps[j] += u64::from(v.is_some());
            }
        }
        for (y, p) in learn.iter().enumerate() {
            self.classes[y] += p;
            for (j, v) in votes.iter().enumerate() {
                self.outcomes[j][y][outcome_of(*v, k)] += p;
            }
        }
        let (best, confidence) = match combiner {
            Combiner::LabelModel => {
                posterior
                    .iter()
                    .enumerate()
                    .fold(
                        (0, f64::MIN),
                        |(bi, bp), (i, p)| if *p > bp { (i, *p) } else { (bi, bp) },
                    )
            }
            Combiner::Majority => {
                let mut counts = vec![0usize; labels.len()];
                votes.iter().flatten().for_each(|v| counts[*v] += 1);
                // Ties go to the first label in sorted order: deterministic.
                let (best, n) = counts.iter().enumerate().fold((0, 0), |(bi, bn), (i, n)| {
                    if *n > bn {
                        (i, *n)
                    } else {
                        (bi, bn)
                    }
                });
                (best, n as f64 / voting as f64)
            }
        };
        Labelled {
            label: Some(labels[best].clone()),
            confidence: Some(confidence),
        }
    }
}

/// How one rule behaved on one device's readings (since the counts were
/// last taken).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCounts {
    /// Readings the rule saw.
    pub readings: u64,
    /// Readings it voted on (coverage = votes / readings).
    pub votes: u64,
    /// Votes cast while at least one other rule voted too.
    pub overlaps: u64,
    /// Votes cast while another rule voted a different label.
    pub conflicts: u64,
    /// Votes equal to the label the reading got.
    pub agreements: u64,
}

impl RuleCounts {
    /// Counts one reading's votes into `counts[rule]` (brute force is the
    /// definition: every field above, per rule).
    pub fn count(counts: &mut [RuleCounts], votes: &[Option<usize>], label: Option<usize>) {
        for (j, vote) in votes.iter().enumerate() {
            let Some(c) = counts.get_mut(j) else { continue };
            c.readings += 1;
            let Some(v) = vote else { continue };
            c.votes += 1;
            let others = votes
                .iter()
                .enumerate()
                .filter(|(k, o)| *k != j && o.is_some());
            let (mut overlap, mut conflict) = (false, false);
            for (_, o) in others {
                overlap = true;
                conflict |= *o != Some(*v);
            }
            c.overlaps += u64::from(overlap);
            c.conflicts += u64::from(conflict);
            c.agreements += u64::from(label == Some(*v));
        }
    }
}

/// The labeller of one partition: rules, per-device state, the model, and
/// the rule statistics of the open file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionLabels {
    /// Rules version the state belongs to; state of other versions is dropped.
    pub rules_version: String,
    pub devices: HashMap<String, DeviceState>,
    #[serde(default, deserialize_with = "model_or_relearn")]
    pub model: Option<LabelModel>,
    /// Per device, per rule: counts since they were last taken (at a file
    /// close, into the `rule_stats` table). Not part of the snapshot: a
    /// snapshot is taken right after they are.
    #[serde(skip)]
    pub counts: std::collections::BTreeMap<String, Vec<RuleCounts>>,
}

/// A snapshot saved by an older processor may hold a label model of another
/// form: it is dropped and learned again rather than making the whole
/// snapshot, and with it the seqs already in the data set, unreadable.
fn model_or_relearn<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<LabelModel>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Saved {
        Current(LabelModel),
        Other(serde::de::IgnoredAny),
    }
    Ok(match Option::<Saved>::deserialize(d)? {
        Some(Saved::Current(model)) => Some(model),
        Some(Saved::Other(_)) | None => None,
    })
}

impl PartitionLabels {
    /// Labels one reading of `device`.
    pub fn label(
        &mut self,
        engine: &Engine,
        device: &str,
        value: &dyn Fn(&str) -> Option<f64>,
        ts: i64,
    ) -> Labelled {
        if self.rules_version != engine.rules.version() {
            *self = PartitionLabels {
                rules_version: engine.rules.version().to_string(),
                ..Default::default()
            };
        }
        let state = self
            .devices
            .entry(device.to_string())
            .or_insert_with(|| engine.new_state());
        let votes = engine.votes(state, value, ts);
        let model = self
            .model
            .get_or_insert_with(|| LabelModel::new(engine.rules.rules.len(), engine.labels.len()));
        let labelled = model.label(engine.rules.combiner, &votes, &engine.labels);
        let label = labelled
            .label
            .as_ref()
            .and_then(|l| engine.labels.binary_search(l).ok());
        let counts = self
            .counts
            .entry(device.to_string())
            .or_insert_with(|| vec![RuleCounts::default(); engine.rules.rules.len()]);
        RuleCounts::count(counts, &votes, label);
        labelled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine(text: &str) -> Engine {
        Engine::new(RulesFile::parse(text, None).expect("rules parse"))
    }

    #[test]
    fn each_rule_kind_fires_where_it_should() {
        let e = engine(
            r#"
            [[rule]]
            name = "hot"
            label = "hot"
            when = { kind = "threshold", channel = "t", above = 30.0 }
            [[rule]]
            name = "jump"
            label = "jump"
            when = { kind = "rate_of_change", channel = "t", max_per_second = 5.0 }
            [[rule]]
            name = "odd"
            label = "odd"
            when = { kind = "zscore", channel = "t", window = 10, above = 3.0 }
            [[rule]]
            name = "long_hot"
            label = "long_hot"
            when = { kind = "duration", channel = "t", above = 30.0, for_seconds = 2.0 }
            [[rule]]
            name = "stuck"
            label = "stuck"
            when = { kind = "flat", channel = "t", window = 3 }
            [[rule]]
            name = "cold_or_hot"
            label = "extreme"
            when = { kind = "any", of = [ { kind = "range", channel = "t", min = 0.0, max = 30.0 } ] }
            "#,
        );
        let mut state = e.new_state();
        let series = [
            20.0, 20.5, 20.2, 19.8, 20.1, 20.3, 19.9, 20.0, 20.2, 40.0, 40.0, 40.0, 40.0,
        ];
        let mut fired: Vec<Vec<&str>> = Vec::new();
        for (i, v) in series.iter().enumerate() {
            let value = |c: &str| (c == "t").then_some(*v);
            let votes = e.votes(&mut state, &value, i as i64 * 1_000_000);
            let mut labels: Vec<&str> = votes
                .iter()
                .flatten()
                .map(|l| e.labels[*l].as_str())
                .collect();
            labels.sort();
            fired.push(labels);
        }
        assert!(fired[8].is_empty(), "{:?}", fired[8]);
        assert_eq!(fired[9], vec!["extreme", "hot", "jump", "odd"]);
        assert_eq!(fired[10], vec!["extreme", "hot"]);
        assert_eq!(fired[11], vec!["extreme", "hot", "long_hot", "stuck"]);
    }

    #[test]
    fn rule_statistics_match_a_brute_force_count() {
        let e = engine(
            r#"
            [[rule]]
            name = "hot"
            label = "hot"
            when = { kind = "threshold", channel = "t", above = 25.0 }
            [[rule]]
            name = "warm"
            label = "hot"
            when = { kind = "threshold", channel = "t", above = 22.0 }
            [[rule]]
            name = "fine"
            label = "normal"
            when = { kind = "range", channel = "t", min = 10.0, max = 24.0, inside = true }
            "#,
        );
        let mut labels = PartitionLabels::default();
        let mut brute_state = e.new_state();
        let series: Vec<f64> = (0..500).map(|i| 15.0 + (i % 13) as f64).collect();
        let mut all_votes = Vec::new();
        let mut all_labels = Vec::new();
        for (i, v) in series.iter().enumerate() {
            let value = |c: &str| (c == "t").then_some(*v);
            let l = labels.label(&e, "d", &value, i as i64);
            all_votes.push(e.votes(&mut brute_state, &value, i as i64));
            all_labels.push(l.label);
        }
        let counts = &labels.counts["d"];
        for (j, name) in ["hot", "warm", "fine"].iter().enumerate() {
            let votes = all_votes.iter().filter(|v| v[j].is_some()).count() as u64;
            let overlaps = all_votes
                .iter()
                .filter(|v| {
                    v[j].is_some() && v.iter().enumerate().any(|(k, o)| k != j && o.is_some())
                })
                .count() as u64;
            let conflicts = all_votes
                .iter()
                .filter(|v| {
                    v[j].is_some()
                        && v.iter()
                            .enumerate()
                            .any(|(k, o)| k != j && o.is_some() && *o != v[j])
                })
                .count() as u64;
            let agreements = all_votes
                .iter()
                .zip(&all_labels)
                .filter(|(v, l)| {
                    v[j].is_some() && l.as_deref() == v[j].map(|x| e.labels[x].as_str())
                })
                .count() as u64;
            assert_eq!(
                counts[j],
                RuleCounts {
                    readings: 500,
                    votes,
                    overlaps,
                    conflicts,
                    agreements
                },
                "rule {name}"
            );
        }
        assert!(
            counts[1].conflicts > 0 && counts[0].overlaps > 0,
            "the series exercises overlaps and conflicts"
        );
    }

    #[test]
    fn every_rule_abstaining_leaves_the_reading_unlabelled() {
        let mut m = LabelModel::new(2, 2);
        let labels = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            m.label(Combiner::LabelModel, &[None, None], &labels),
            Labelled {
                label: None,
                confidence: None
            }
        );
        let l = m.label(Combiner::Majority, &[Some(1), None], &labels);
        assert_eq!((l.label.as_deref(), l.confidence), (Some("b"), Some(1.0)));
    }

    #[test]
    fn the_label_model_learns_which_rule_disagrees_with_the_others() {
        // Rules 0 and 1 agree with the truth; rule 2 votes at random.
        let labels = vec!["a".to_string(), "b".to_string()];
        let mut m = LabelModel::new(3, 2);
        let mut rng = 12345u64;
        for i in 0..5_000 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let truth = i % 2;
            let noisy = (rng >> 33) as usize % 2;
            m.label(
                Combiner::LabelModel,
                &[Some(truth), Some(truth), Some(noisy)],
                &labels,
            );
        }
        let acc: Vec<f64> = m.accuracies().into_iter().flatten().collect();
        assert_eq!(acc.len(), 3, "every rule overlaps: {acc:?}");
        assert!(acc[2] < acc[0] && acc[2] < acc[1], "{acc:?}");
        assert!(acc[0] > 0.9 && (0.35..0.65).contains(&acc[2]), "{acc:?}");
    }

    #[test]
    fn mutually_exclusive_rules_have_no_estimated_accuracy_and_overlapping_ones_have() {
        let exclusive = r#"
            [[rule]]
            name = "hot"
            label = "hot"
            when = { kind = "threshold", channel = "t", above = 30.0 }
            [[rule]]
            name = "cold"
            label = "cold"
            when = { kind = "threshold", channel = "t", below = 30.0 }
        "#;
        // A third rule that votes "hot" with `hot` on the hottest readings.
        let overlapping = format!(
            "{exclusive}\n[[rule]]\nname = \"very_hot\"\nlabel = \"hot\"\nwhen = {{ kind = \"threshold\", channel = \"t\", above = 38.0 }}\n"
        );
        let accuracies = |text: &str| {
            let e = engine(text);
            let mut state = PartitionLabels::default();
            for i in 0..5_000i64 {
                let t = 20.0 + (i % 20) as f64;
                state.label(&e, "d1", &|_| Some(t), i * 1_000_000);
            }
            state.model.map(|m| m.accuracies()).unwrap_or_default()
        };
        assert_eq!(accuracies(exclusive), vec![None, None]);
        let acc = accuracies(&overlapping);
        assert!(
            acc[0].is_some_and(|a| (0.0..=1.0).contains(&a))
                && acc[2].is_some_and(|a| (0.0..=1.0).contains(&a)),
            "hot and very_hot vote together: {acc:?}"
        );
        assert_eq!(acc[1], None, "cold still votes alone");
    }

    #[test]
    fn a_label_model_of_an_older_form_is_learned_again() {
        let old = r#"{"rules_version":"v1","devices":{},"model":{"correct":[1.0],"voted":[2.0],"labels":2}}"#;
        let state: PartitionLabels = serde_json::from_str(old).expect("older snapshot reads");
        assert_eq!(state.rules_version, "v1");
        assert_eq!(state.model, None);
        let mut m = LabelModel::new(2, 2);
        let labels = vec!["a".to_string(), "b".to_string()];
        m.label(Combiner::LabelModel, &[Some(0), None], &labels);
        let saved = PartitionLabels {
            model: Some(m.clone()),
            ..Default::default()
        };
        let text = serde_json::to_string(&saved).expect("save");
        let back: PartitionLabels = serde_json::from_str(&text).expect("load");
        assert_eq!(back.model, Some(m));
    }

    #[test]
    fn bad_rules_are_refused_naming_the_rule_and_the_field() {
        let known = |c: &str| c == "t";
        let err = |text: &str| {
            RulesFile::parse(text, Some(&known))
                .expect_err("refused")
                .to_string()
        };
        assert!(err("[[rule]\nname=").contains("not valid TOML"));
        let e = err(r#"[[rule]]
name = "r1"
label = "x"
when = { kind = "threshold", channel = "pressure", above = 1.0 }"#);
        assert!(
            e.contains("rule \"r1\": when.channel") && e.contains("pressure"),
            "{e}"
        );
        let e = err(r#"[[rule]]
name = "r2"
label = "x"
when = { kind = "all", of = [ { kind = "zscore", channel = "t", window = 0, above = 3.0 } ] }"#);
        assert!(e.contains("rule \"r2\": when.of[0].window"), "{e}");
    }
}
