//! Where readings wait until the cloud acknowledges them.
//!
//! [`Spool`] is the interface the uplink and the sources use: append gives each
//! reading the next `seq`; `read` serves any unacknowledged range again (for
//! resends); `acknowledge` frees everything below the cloud's watermark. The
//! only implementation today is [`memory::MemorySpool`], a bounded in-memory
//! queue: it does not survive a restart. The durable on-disk spool replaces it
//! behind this same trait.
//!
//! [`SharedSpool`] puts a spool behind a mutex with two wake-ups, "new data"
//! for the uplink and "space freed" for the sources.

pub mod memory;

use std::sync::Mutex;

use edgeloop_proto::v1::Reading;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpoolError {
    /// Expected: the spool holds its maximum; the caller waits for acks.
    #[error("spool is full ({capacity} readings held, none acknowledged yet)")]
    Full { capacity: usize },
}

/// Counts of what waits in a spool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backlog {
    pub records: u64,
    pub bytes: u64,
    /// Timestamp of the oldest unacknowledged reading, if any.
    pub oldest_ts_micros: Option<i64>,
}

pub trait Spool: Send {
    /// Appends readings, giving them consecutive seqs; returns how many were
    /// taken (fewer than offered when the spool fills up).
    fn append(&mut self, readings: &mut Vec<Reading>) -> Result<usize, SpoolError>;
    /// Up to `max` readings starting at `from_seq` (clamped to what is held).
    /// Returns the seq of the first one returned.
    fn read(&self, from_seq: u64, max: usize) -> (u64, Vec<Reading>);
    /// Frees every reading with seq below `committed_seq`.
    fn acknowledge(&mut self, committed_seq: u64);
    /// The seq the next appended reading gets.
    fn next_seq(&self) -> u64;
    /// The lowest seq not yet acknowledged (== next_seq when empty).
    fn first_unacked(&self) -> u64;
    fn backlog(&self) -> Backlog;
}

/// A spool shared by the source and the uplink of one agent.
pub struct SharedSpool {
    inner: Mutex<Box<dyn Spool>>,
    channels: Mutex<Vec<String>>,
    /// Woken when readings are appended.
    pub data: Notify,
    /// Woken when readings are acknowledged (space freed).
    pub space: Notify,
}

impl SharedSpool {
    pub fn new(spool: Box<dyn Spool>) -> Self {
        SharedSpool {
            inner: Mutex::new(spool),
            channels: Mutex::new(Vec::new()),
            data: Notify::new(),
            space: Notify::new(),
        }
    }

    /// Runs `f` on the spool. A poisoned lock (a panic while holding it) is
    /// taken over: the spool's state is updated by single assignments only.
    pub fn with<R>(&self, f: impl FnOnce(&mut dyn Spool) -> R) -> R {
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.as_mut())
    }

    pub fn set_channels(&self, channels: Vec<String>) {
        *self.channels.lock().unwrap_or_else(|p| p.into_inner()) = channels;
    }

    pub fn channels(&self) -> Vec<String> {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// (next_seq, first_unacked)
    pub fn positions(&self) -> (u64, u64) {
        self.with(|s| (s.next_seq(), s.first_unacked()))
    }

    /// Appends all of `readings`, waiting for space when the spool is full.
    /// Returns `false` if `shutdown` fired before everything was taken.
    pub async fn append_waiting(
        &self,
        mut readings: Vec<Reading>,
        shutdown: &CancellationToken,
    ) -> Result<bool, SpoolError> {
        loop {
            let space = self.space.notified();
            let result = self.with(|s| s.append(&mut readings));
            match result {
                Ok(n) if n > 0 => self.data.notify_waiters(),
                Ok(_) => {}
                Err(SpoolError::Full { .. }) => {}
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

    pub fn acknowledge(&self, committed_seq: u64) {
        self.with(|s| s.acknowledge(committed_seq));
        self.space.notify_waiters();
    }
}
