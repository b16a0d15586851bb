//! Back-pressure from the bridge to the devices: the gate lets at most
//! `bridge.max_lag_bytes` of telemetry into rumqttd ahead of the bridge.
//!
//! rumqttd has no flow control of its own: it acknowledges a publish once it
//! is in its in-memory log and, when the log is full, drops the oldest
//! segment, read or not. A bridge that falls further behind than the
//! `telemetry/+` log (Kafka slower than the fleet) therefore skips batches;
//! their devices' watermarks stall and, after `uplink.resend_after`, they
//! send their whole unacknowledged window again, which puts more into the
//! log the bridge cannot keep up with (seen in a bench overloaded for
//! minutes: ack latency 30–120 s and no recovery before the load stopped;
//! docs/benchmarks.md).
//!
//! So the gate counts what it lets into the log and the bridge counts what
//! it takes out, both as rumqttd sizes a log entry (4 + topic + payload
//! bytes): a FIFO semaphore of `max_lag_bytes` permits, which the gate takes
//! before relaying a telemetry publish and the bridge gives back as it reads
//! one. When none are left the gate holds that device's next publish and
//! stops reading its connection: the device gets no PUBACK, its MQTT client
//! stops at its in-flight limit, and its readings wait in its spool, where
//! they are durable. The bridge's lag, and so the broker's memory, stays
//! under the log, and nothing is skipped or resent.
//!
//! A publish is held at most `bridge.max_hold` (10 s): the held connection
//! carries nothing else from the device either, its PINGREQs included, so a
//! hold must end well within the devices' keep-alive (30 s for the edge
//! agent) and rumqttd's (1.5 × that). A publish that waited that long goes
//! into the log anyway and its cost is owed ([`Backpressure::force`]): what
//! the bridge gives back pays the debt first, so the count stays true. Holds
//! that long mean Kafka is away, not slow; then the log rolls as it did
//! without back-pressure, only far slower, and devices resend what it
//! dropped.
//!
//! Counts that do not meet (a publish rumqttd never logged, a connection cut
//! between the gate and rumqttd) would leak permits, so whenever the bridge
//! has found nothing to read for [`IDLE_REFILL`] the budget is full again:
//! a bridge with nothing to read has nothing in the log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{AcquireError, Semaphore};

/// How long the bridge must have found nothing to read before the budget is
/// refilled.
pub const IDLE_REFILL: Duration = Duration::from_secs(1);

/// The telemetry the gate may put into rumqttd's log ahead of the bridge.
#[derive(Debug)]
pub struct Backpressure {
    /// Bytes of log entries; `None`: no limit (`bridge.max_lag_bytes = 0`).
    budget: Option<Arc<Semaphore>>,
    limit: usize,
    /// Costs of publishes let in without the budget ([`Self::force`]), to be
    /// paid from what the bridge gives back before the budget grows.
    debt: AtomicU64,
}

impl Backpressure {
    /// `limit` bytes of log entries; 0 turns back-pressure off.
    pub fn new(limit: usize) -> Backpressure {
        // tokio's most (2^61 on 64 bits, 2^29 on 32).
        let limit = limit.min(Semaphore::MAX_PERMITS);
        Backpressure {
            budget: (limit > 0).then(|| Arc::new(Semaphore::new(limit))),
            limit,
            debt: AtomicU64::new(0),
        }
    }

    /// Whether publishes to `topic` count: telemetry, whose log is the one
    /// that fills.
    pub fn counts(topic: &[u8]) -> bool {
        topic.starts_with(b"telemetry/")
    }

    /// What a publish costs: rumqttd's size of its log entry, at most the
    /// whole budget (a publish larger than the budget goes alone).
    pub fn cost(&self, topic_len: usize, payload_len: usize) -> u32 {
        let size = 4usize.saturating_add(topic_len).saturating_add(payload_len);
        u32::try_from(size.min(self.limit)).unwrap_or(u32::MAX)
    }

    /// Takes `cost` now if the budget has it; false: wait with [`Self::take`].
    pub fn try_take(&self, cost: u32) -> bool {
        match &self.budget {
            None => true,
            Some(s) => match s.try_acquire_many(cost) {
                Ok(permit) => {
                    permit.forget();
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// Waits until the budget has `cost` (in order of arrival: a device
    /// waiting longer goes first) and takes it.
    pub async fn take(&self, cost: u32) -> Result<(), AcquireError> {
        if let Some(s) = &self.budget {
            s.clone().acquire_many_owned(cost).await?.forget();
        }
        Ok(())
    }

    /// A publish of `cost` went into the log without the budget (it was
    /// held too long).
    pub fn force(&self, cost: u32) {
        if self.budget.is_some() {
            self.debt.fetch_add(u64::from(cost), Ordering::Relaxed);
        }
    }

    /// The bridge took a publish of `cost` from the log.
    pub fn give_back(&self, cost: u32) {
        if let Some(s) = &self.budget {
            let mut cost = u64::from(cost);
            // Only the bridge gives back, so nobody else lowers the debt.
            let debt = self.debt.load(Ordering::Relaxed);
            if debt > 0 {
                let paid = debt.min(cost);
                self.debt.fetch_sub(paid, Ordering::Relaxed);
                cost -= paid;
            }
            // Never above the limit: only the gate takes concurrently, so
            // what is outstanding can only grow before the add.
            s.add_permits((cost as usize).min(self.outstanding(s)));
        }
    }

    /// The bridge has found nothing to read for a while: nothing of the
    /// telemetry let in is still in the log, whatever the counts say.
    pub fn refill(&self) {
        if let Some(s) = &self.budget {
            self.debt.store(0, Ordering::Relaxed);
            let outstanding = self.outstanding(s);
            if outstanding > 0 {
                tracing::debug!(
                    bytes = outstanding,
                    "telemetry budget refilled (the bridge is idle)"
                );
                s.add_permits(outstanding);
            }
        }
    }

    /// Bytes let into the log and not yet taken by the bridge.
    pub fn lag_bytes(&self) -> u64 {
        self.budget.as_ref().map_or(0, |s| {
            self.outstanding(s) as u64 + self.debt.load(Ordering::Relaxed)
        })
    }

    /// What the gate has taken from the budget and the bridge not given back.
    fn outstanding(&self, budget: &Semaphore) -> usize {
        self.limit.saturating_sub(budget.available_permits())
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_costs_what_rumqttd_counts_and_at_most_the_budget() {
        let b = Backpressure::new(1000);
        assert_eq!(b.cost(16, 100), 120);
        assert_eq!(b.cost(16, 5000), 1000);
        assert_eq!(Backpressure::new(0).cost(16, 5000), 0);
    }

    #[test]
    fn the_gate_waits_once_the_bridge_is_a_budget_behind() {
        let b = Backpressure::new(300);
        assert!(b.try_take(120));
        assert!(b.try_take(120));
        assert_eq!(b.lag_bytes(), 240);
        assert!(!b.try_take(120), "over the budget");
        b.give_back(120);
        assert!(b.try_take(120));
        assert_eq!(b.lag_bytes(), 240);
    }

    #[test]
    fn giving_back_more_than_was_taken_never_raises_the_budget_above_the_limit() {
        let b = Backpressure::new(300);
        assert!(b.try_take(100));
        b.give_back(250);
        assert_eq!(b.lag_bytes(), 0);
        assert!(!b.try_take(301), "the limit still holds");
        assert!(b.try_take(300));
    }

    #[test]
    fn a_publish_forced_in_is_paid_for_before_the_budget_grows() {
        let b = Backpressure::new(300);
        assert!(b.try_take(300));
        b.force(100);
        assert_eq!(b.lag_bytes(), 400);
        b.give_back(100);
        assert_eq!(b.lag_bytes(), 300, "the debt is paid");
        assert!(!b.try_take(1));
        b.give_back(300);
        assert_eq!(b.lag_bytes(), 0);
        assert!(b.try_take(300));
    }

    #[test]
    fn a_refill_forgets_what_leaked() {
        let b = Backpressure::new(300);
        assert!(b.try_take(200));
        b.force(50);
        b.refill();
        assert_eq!(b.lag_bytes(), 0);
        assert!(b.try_take(300));
    }

    #[test]
    fn off_never_holds() {
        let b = Backpressure::new(0);
        assert!(b.try_take(u32::MAX));
        b.give_back(10);
        assert_eq!(b.lag_bytes(), 0);
    }

    // A current-thread runtime: each yield lets the spawned tasks run up to
    // their wait, so the order of arrival is the order of spawning.
    #[tokio::test]
    async fn waiters_go_in_order_of_arrival_as_the_bridge_gives_back() {
        let b = Arc::new(Backpressure::new(100));
        assert!(b.try_take(100));
        let pause = || async {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
        };
        let first = tokio::spawn({
            let b = b.clone();
            async move { b.take(60).await }
        });
        pause().await;
        let second = tokio::spawn({
            let b = b.clone();
            async move { b.take(10).await }
        });
        pause().await;
        // 50 back: enough for the second, not the first, which came first.
        b.give_back(50);
        pause().await;
        assert!(!first.is_finished(), "60 wanted, 50 there");
        assert!(!second.is_finished(), "behind the first");
        b.give_back(50);
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(b.lag_bytes(), 70);
    }
}
