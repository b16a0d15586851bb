//! Where readings wait until the cloud acknowledges them.
//!
//! [`Spool`] is the interface the uplink and the sources use: append gives each
//! reading the next `seq`; `read` serves any unacknowledged range again (for
//! resends), or the loss report standing in for a range the device lost;
//! `acknowledge` frees everything below the cloud's watermark. Its
//! implementation is [`disk::DiskSpool`], a bounded log of segment files that
//! survives restarts and power cuts (the format and recovery rules are in its
//! module docs).
//!
//! [`inspect`] reads a spool directory without changing it (for `edgeloop
//! spool inspect` and `check`).
//!
//! [`SharedSpool`] puts a spool behind a mutex with wake-ups: "new durable
//! data" for the uplink, "space freed" for the sources, "sync wanted" for the
//! group-commit task.

pub mod disk;
pub mod inspect;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use edgeloop_proto::v1::{Reading, ReadingBatch};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub use disk::Loss;

use crate::models::Models;

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Expected: the spool holds its maximum (policy `block`); the caller waits.
    #[error("spool is full ({capacity} bytes held, not yet acknowledged)")]
    Full { capacity: usize },
    #[error("spool: {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("spool segment {path} is corrupt at byte {offset} (it checked out at start-up; the disk changed under it)")]
    Corrupt { path: PathBuf, offset: u64 },
    #[error("spool is closed")]
    Closed,
}

/// Counts of what waits in a spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    /// Timestamp of the oldest unacknowledged reading, if any.
    pub oldest_ts_micros: Option<i64>,
    /// Readings this spool lost since it was opened (evicted or corrupt),
    /// those found lost when it was opened included.
    pub lost_readings: u64,
}

/// What the spool serves from a seq on.
#[derive(Debug, Clone, PartialEq)]
pub enum Chunk {
    /// Readings with consecutive seqs from `first_seq`, all of the same channels.
    Readings {
        first_seq: u64,
        channels: Vec<String>,
        readings: Vec<Reading>,
    },
    /// A range the device lost; sent upstream as a loss report.
    Lost(Loss),
}

pub trait Spool: Send {
    /// Appends readings, giving them consecutive seqs; returns how many were
    /// taken. `Full` when none could be (policy `block`).
    fn append(&mut self, readings: &mut Vec<Reading>) -> Result<usize, SpoolError>;
    /// What is held from `from_seq` on (at most `max` readings), clamped to
    /// what is acknowledged and durable; `None` when nothing is.
    fn read(&mut self, from_seq: u64, max: usize) -> Result<Option<Chunk>, SpoolError>;
    /// Frees every reading (and loss) with seq below `committed_seq`.
    fn acknowledge(&mut self, committed_seq: u64) -> Result<(), SpoolError>;
    /// Makes every appended reading durable (group commit).
    fn sync(&mut self) -> Result<(), SpoolError>;
    /// The last sync before the spool is let go: also writes what `sync`
    /// writes only now and then (the disk spool's ack watermark).
    fn close(&mut self) -> Result<(), SpoolError> {
        self.sync()
    }
    /// Whether enough is waiting that a sync should not wait for its timer.
    fn wants_sync(&self) -> bool;
    /// The seq the next appended reading gets.
    fn next_seq(&self) -> u64;
    /// Readings below this are durable (and may be sent).
    fn durable_end(&self) -> u64;
    /// The lowest seq not yet acknowledged.
    fn first_unacked(&self) -> u64;
    fn backlog(&self) -> Backlog;
    /// Takes a batch relayed from a child device (gateway mode), keeping the
    /// child's own seqs: what the spool already holds is skipped, a batch
    /// beyond a gap is refused (the child resends from its watermark), and a
    /// fresh spool starts wherever the child stands.
    fn append_relayed(&mut self, batch: &ReadingBatch) -> Result<Relayed, SpoolError>;
}

/// What became of a relayed batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relayed {
    /// This many seqs (readings or a loss range) were taken.
    Taken(u64),
    /// Everything in it is already held (a resend).
    Duplicate,
    /// It starts beyond the next expected seq.
    Gap { expected: u64 },
}

/// A spool shared by the sources, the uplink and the sync task of one agent.
pub struct SharedSpool {
    inner: Mutex<Box<dyn Spool>>,
    /// Woken when readings become durable.
    pub data: Notify,
    /// Woken when readings are acknowledged (space freed).
    pub space: Notify,
    /// Woken when a sync should happen before its timer.
    pub sync_wanted: Notify,
    /// On-device inference: predictions for the readings appended with
    /// [`SharedSpool::append_waiting`] (the device's own sources).
    models: Option<Arc<Models>>,
}

impl SharedSpool {
    pub fn new(spool: Box<dyn Spool>) -> Self {
        SharedSpool {
            inner: Mutex::new(spool),
            data: Notify::new(),
            space: Notify::new(),
            sync_wanted: Notify::new(),
            models: None,
        }
    }

    /// Readings appended with [`SharedSpool::append_waiting`] get the
    /// predictions of `models` first.
    pub fn with_models(mut self, models: Arc<Models>) -> Self {
        self.models = Some(models);
        self
    }

    /// Runs `f` on the spool. A poisoned lock (a panic while holding it) is
    /// taken over: the spool's files, not its memory, are the truth.
    pub fn with<R>(&self, f: impl FnOnce(&mut dyn Spool) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_mut())
    }

    /// (next_seq, first_unacked, durable_end)
    pub fn positions(&self) -> (u64, u64, u64) {
        self.with(|s| (s.next_seq(), s.first_unacked(), s.durable_end()))
    }

    /// Appends all of `readings`, waiting for space when the spool is full.
    /// Returns `false` if `shutdown` fired before everything was taken.
    /// With models, each reading gets its predictions first (the sources of
    /// one agent append one batch at a time, in seq order).
    pub async fn append_waiting(
        &self,
        mut readings: Vec<Reading>,
        shutdown: &CancellationToken,
    ) -> Result<bool, SpoolError> {
        if let Some(models) = &self.models {
            models.annotate(&mut readings);
        }
        loop {
            let space = self.space.notified();
            let result = self.with(|s| s.append(&mut readings).map(|n| (n, s.wants_sync())));
            match result {
                Ok((_, true)) => self.sync_wanted.notify_one(),
                Ok(_) | Err(SpoolError::Full { .. }) => {}
                Err(e) => return Err(e),
            }
            if readings.is_empty() {
                return Ok(true);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = space => {}
            }
        }
    }

    /// Group commit, on a blocking thread (fsync must not stall the async
    /// workers). Wakes the uplink when new readings became durable.
    pub async fn sync(self: &std::sync::Arc<Self>) -> Result<(), SpoolError> {
        self.sync_or_close(false).await
    }

    async fn sync_or_close(self: &std::sync::Arc<Self>, close: bool) -> Result<(), SpoolError> {
        let me = self.clone();
        let before = self.with(|s| s.durable_end());
        let after = tokio::task::spawn_blocking(move || {
            me.with(|s| if close { s.close() } else { s.sync() }.map(|_| s.durable_end()))
        })
        .await
        .map_err(|_| SpoolError::Closed)??;
        if after != before {
            self.data.notify_waiters();
        }
        Ok(())
    }

    /// The group-commit task: syncs every `interval`, or sooner when asked,
    /// until `stop`; then a last sync so nothing appended stays unsynced.
    pub fn spawn_sync_task(
        self: &std::sync::Arc<Self>,
        interval: std::time::Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<Result<(), SpoolError>> {
        let spool = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                    _ = spool.sync_wanted.notified() => {}
                }
                if let Err(e) = spool.sync().await {
                    tracing::error!(error = %e, "spool sync failed");
                }
            }
            spool.sync_or_close(true).await
        })
    }

    pub fn acknowledge(&self, committed_seq: u64) -> Result<(), SpoolError> {
        self.with(|s| s.acknowledge(committed_seq))?;
        self.space.notify_waiters();
        Ok(())
    }
}
