//! Broker replicas: several brokers bridging to one Kafka are
//! interchangeable. A device may connect to any of them, and to another one
//! at its next connection; Kafka is the only state they share.
//!
//! Each replica has an id (`replica_id`: the host name by default, the pod
//! name on Kubernetes) and, per process, a random nonce, so two runs of one
//! replica (a restart) never share a session id.
//!
//! ## The ack watermark follows the device
//!
//! Every replica keeps following the compacted topic `edgeloop.acks` after
//! its start-up read ([`crate::bridge::restore_acks`] leaves the consumer
//! assigned and the bridge reads on from where the restore ended), and
//! merges each record into its [`crate::bridge::acks::AckTracker`]
//! ([`AckTracker::merge`](crate::bridge::acks::AckTracker::merge)):
//!
//! - **Only up.** A merged watermark only ever raises a device's watermark
//!   (`max`), so records read out of order, twice, or a lower one written
//!   later by a replica that was behind (compaction keeps the *last* record
//!   of a key, not the highest) never lower it.
//! - **Never past what is true.** A record of `edgeloop.acks` is written by
//!   a bridge only for a watermark it published: one its own delivery
//!   reports from Kafka (`acks=all`) reached over a contiguous run of
//!   batches, or one a device reported holding, which some bridge published
//!   for the same reason. So every record says "every reading of this device
//!   below N is in `edgeloop.readings`", and the highest of several true
//!   statements is true. Merging it cannot acknowledge a reading Kafka has
//!   not taken. (The one trust in this, as before replicas: a device's
//!   reported `acked_seq` is taken as true of its own readings; a device
//!   that reports more than it was told skips only its own readings.)
//! - **No feedback loop.** A followed record also marks its value as
//!   already logged in the [`crate::bridge::ack_log::AckLog`], so the replica
//!   never writes back a watermark it read (its own records come back too and
//!   change nothing); it writes only watermarks its own deliveries moved
//!   past what the topic holds.
//! - **Who is told.** A merged watermark is published retained on
//!   `ack/{device}` only when the device is connected to this replica
//!   ([`Replica::is_connected`]); for the others the tracker just keeps it.
//!   Every replica reads every ack record of the fleet, and a retained
//!   publish for each would multiply the router's work by the number of
//!   replicas for devices that are not here to receive it. A device that
//!   connects later gets the retained ack this replica last published for
//!   it (maybe older than what it holds: a device keeps the highest ack it
//!   received, docs/device-protocol.md, and the agent does), then sends its
//!   status with the ack it holds, and a tracker that knows more marks the
//!   device to be told
//!   ([`AckTracker::raise_to_device_ack`](crate::bridge::acks::AckTracker::raise_to_device_ack));
//!   a resend below the watermark is skipped and the ack re-published too.
//!   A child behind a gateway is connected through the gateway's client id,
//!   not its own, so a merged watermark of a child is not published at
//!   merge; the child learns it from its status or resend as above.
//!
//! Memory: one tracker entry and one ack-log entry per device in
//! `edgeloop.acks`, the same table the start-up restore already built, now
//! kept current rather than grown. Computed from the structures (not
//! measured): the tracker's bucket is 64 bytes (the id's `String`, the
//! watermark, an empty `BTreeMap`, a flag), the ack log's 56 (the id and
//! three `u64`s), each hash map 57–87 % full, plus each map's copy of the
//! id (16–32 bytes for ids of up to 32 bytes): ~170–280 bytes a device,
//! ~0.2–0.3 GiB per replica for a million devices. (The start-up restore
//! also republishes each restored watermark retained, which rumqttd keeps
//! at ~300 bytes a device.) Nothing else grows with the fleet: pending batches exist only for devices
//! sending here, and librdkafka's fetch queue for the follower is bounded
//! by its `queued.max.messages.kbytes` (64 MiB by default).
//!
//! ## The newest session wins
//!
//! On each device CONNECT that rumqttd accepted, the gate claims the client
//! id here ([`Replica::claim`]) and a record is written to the compacted
//! topic `edgeloop.sessions` (key = client id, value = JSON
//! [`SessionRecord`]: replica id, session id, connect time). Every replica
//! follows that topic from the end it had at start-up ([`follow`]): records
//! older than the start concern no session of this process.
//!
//! "Newest" is the order of the topic's partition, not a clock: all
//! records of one client id land in one partition, which Kafka orders. A
//! replica holding a local session of the client reads its own record and,
//! after it, any record of another session: then its session is the older
//! one and it closes it ([`Replica::on_record`]). A record of another
//! session read *before* its own means its own is newer: it keeps it, and
//! the other replica closes its connection when it reads this one's record
//! after its own. Clocks of the replicas never matter (the connect time is
//! only for people reading the topic). A replica reads records of its own
//! earlier sessions of the client (rumqttd already resolves a takeover
//! inside one replica) and ignores them.
//!
//! Closing an old session: the gate sends rumqttd a normal DISCONNECT for
//! it, so rumqttd drops its will (the device is online elsewhere; its will
//! would file it offline in `edgeloop.status`), then closes the device's
//! connection (an MQTT 5 device gets DISCONNECT 0x8E, session taken over).
//!
//! Nothing acknowledged is lost and nothing is acknowledged that Kafka has
//! not taken, whichever session is closed: an ack is published only for
//! readings Kafka took (or, merged, for readings some replica had Kafka
//! take); a batch the old replica had already passed to its bridge is still
//! delivered, its watermark still written to `edgeloop.acks` and merged by
//! the new replica; what the old session had not passed on was never
//! acknowledged, and the device resends from its own ack on the new
//! session (duplicates are removed downstream by `(device_id, seq)`).
//!
//! If a session record cannot be written (Kafka unreachable), the session
//! stays open and is counted (`edgeloop_broker_session_record_errors_total`):
//! while Kafka is away the replicas cannot resolve a takeover between them,
//! and no reading is acknowledged either. A follower that lags behind
//! `edgeloop.sessions` by more than its active segment could see its own
//! record compacted away by a newer one of the client, and then keep an old
//! session open until the device goes; the default segments (1 GiB, 7 days)
//! put that far out of reach.
//!
//! Memory: one entry per client connected to this replica (its session id
//! and a cancellation token); nothing for the rest of the fleet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeloop_proto::topics;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::Message as _;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::bridge::compacted::CompactedConsumer;
use crate::bridge::Producer;
use crate::stats::BrokerStats;

/// The value of a record of `edgeloop.sessions`. Unknown fields are
/// accepted (unlike a config's): during a rolling upgrade an older replica
/// must still read a newer one's records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The replica the client connected to (`replica_id`).
    pub replica: String,
    /// The session: the replica process's nonce and a counter.
    pub session: String,
    /// When the replica accepted the CONNECT (its clock; for people, never
    /// for ordering).
    pub connected_at_micros: u64,
}

/// What [`Replica::on_record`] made of a session record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No session of that client here.
    NotHere,
    /// The record of the local session itself.
    Own,
    /// A record of an earlier session of this process (rumqttd resolved
    /// that takeover), or of another replica's session older than the
    /// local one.
    Kept,
    /// A newer session elsewhere: the local one is being closed.
    TakenOver,
}

struct Local {
    session: String,
    /// Whether the follower has read this session's own record.
    seen_own: bool,
    closed: CancellationToken,
}

/// This replica: its id, and its sessions by client id.
pub struct Replica {
    id: String,
    nonce: String,
    next: AtomicU64,
    local: Mutex<HashMap<String, Local>>,
    /// Where session records go (none: nothing is written, for tests of the
    /// gate alone).
    producer: Option<Producer>,
    stats: Arc<BrokerStats>,
}

/// A local session's claim on its client id; dropping it (the connection
/// ended) forgets the session.
pub struct Claim {
    replica: Arc<Replica>,
    client_id: String,
    session: String,
    /// Cancelled when a newer session of the client appeared on another
    /// replica.
    pub closed: CancellationToken,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut local = self.replica.lock();
        if local
            .get(&self.client_id)
            .is_some_and(|l| l.session == self.session)
        {
            local.remove(&self.client_id);
        }
    }
}

impl Replica {
    pub fn new(id: String, producer: Option<Producer>, stats: Arc<BrokerStats>) -> Replica {
        use argon2::password_hash::rand_core::{OsRng, RngCore};
        Replica {
            id,
            nonce: format!("{:016x}", OsRng.next_u64()),
            next: AtomicU64::new(0),
            local: Mutex::new(HashMap::new()),
            producer,
            stats,
        }
    }

    /// The replica id.
    pub fn id(&self) -> &str {
        &self.id
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Local>> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A client connected here: registers its session (the newest local one
    /// of that client id) and writes its record to `edgeloop.sessions`.
    pub fn claim(self: &Arc<Self>, client_id: &str) -> Claim {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let session = format!("{}-{n}", self.nonce);
        let closed = CancellationToken::new();
        self.lock().insert(
            client_id.to_string(),
            Local {
                session: session.clone(),
                seen_own: false,
                closed: closed.clone(),
            },
        );
        if let Some(producer) = &self.producer {
            let record = SessionRecord {
                replica: self.id.clone(),
                session: session.clone(),
                connected_at_micros: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_micros() as u64),
            };
            let (producer, stats, key) =
                (producer.clone(), self.stats.clone(), client_id.to_string());
            tokio::spawn(async move { write(&producer, &key, &record, &stats).await });
        }
        Claim {
            replica: self.clone(),
            client_id: client_id.to_string(),
            session,
            closed,
        }
    }

    /// Whether a session of `client_id` is open here (and not being closed).
    pub fn is_connected(&self, client_id: &str) -> bool {
        self.lock()
            .get(client_id)
            .is_some_and(|l| !l.closed.is_cancelled())
    }

    /// The session id of the local session of `client_id`, if one is open.
    pub fn session_of(&self, client_id: &str) -> Option<String> {
        self.lock().get(client_id).map(|l| l.session.clone())
    }

    /// A record of `edgeloop.sessions`, in the topic's order (module docs).
    pub fn on_record(&self, client_id: &str, record: &SessionRecord) -> Outcome {
        let mut local = self.lock();
        let Some(l) = local.get_mut(client_id) else {
            return Outcome::NotHere;
        };
        if record.session == l.session {
            l.seen_own = true;
            return Outcome::Own;
        }
        let this_process = record
            .session
            .strip_prefix(self.nonce.as_str())
            .is_some_and(|rest| rest.starts_with('-'));
        if this_process || !l.seen_own {
            return Outcome::Kept;
        }
        if !l.closed.is_cancelled() {
            l.closed.cancel();
            BrokerStats::add(&self.stats.sessions_taken_over, 1);
        }
        Outcome::TakenOver
    }
}

async fn write(producer: &Producer, client_id: &str, record: &SessionRecord, stats: &BrokerStats) {
    let payload = match serde_json::to_vec(record) {
        Ok(p) => p,
        // A struct of strings and an integer always serializes.
        Err(e) => {
            tracing::warn!(%client_id, error = %e, "could not encode a session record");
            return;
        }
    };
    let sent = producer
        .send(
            FutureRecord::to(topics::KAFKA_SESSIONS)
                .key(client_id.as_bytes())
                .payload(&payload),
            Duration::from_secs(10),
        )
        .await;
    match sent {
        Ok(_) => BrokerStats::add(&stats.session_records, 1),
        Err((e, _)) => {
            tracing::warn!(
                %client_id,
                error = %e,
                "Kafka did not take a session record: a newer session of this client on another replica will not close it"
            );
            BrokerStats::add(&stats.session_record_errors, 1);
        }
    }
}

/// Follows `edgeloop.sessions` (assigned by
/// [`crate::bridge::compacted::assign_at_end`] before the listener opened)
/// until `shutdown`, closing the local sessions that a newer one elsewhere
/// took over.
pub async fn follow(
    replica: Arc<Replica>,
    consumer: Arc<CompactedConsumer>,
    shutdown: CancellationToken,
) {
    loop {
        let received = tokio::select! {
            _ = shutdown.cancelled() => break,
            received = consumer.recv() => received,
        };
        let message = match received {
            Ok(m) => m,
            Err(KafkaError::PartitionEOF(_)) => continue,
            // Transport errors: the consumer's context logs them, and
            // librdkafka reconnects by itself.
            Err(e) => {
                tracing::debug!(topic = topics::KAFKA_SESSIONS, error = %e, "reading sessions from Kafka");
                continue;
            }
        };
        let client_id = message.key().and_then(|k| std::str::from_utf8(k).ok());
        let record = message
            .payload()
            .map(serde_json::from_slice::<SessionRecord>);
        match (client_id, record) {
            (Some(client_id), Some(Ok(record))) => {
                if replica.on_record(client_id, &record) == Outcome::TakenOver {
                    tracing::info!(
                        %client_id,
                        newer_on = %record.replica,
                        session = %record.session,
                        "closing this replica's session of the client: a newer one is on another replica"
                    );
                }
            }
            // A tombstone: nothing to resolve.
            (Some(_), None) => {}
            (client_id, record) => {
                tracing::warn!(
                    topic = topics::KAFKA_SESSIONS,
                    partition = message.partition(),
                    offset = message.offset(),
                    key = ?client_id,
                    error = ?record.and_then(Result::err).map(|e| e.to_string()),
                    "skipping a session record that does not decode"
                );
                BrokerStats::add(&replica.stats.records_undecodable, 1);
            }
        }
    }
    let _ = consumer.unassign();
}

/// The replica id when `replica_id` is not configured: the host name (on
/// Kubernetes, the pod's name), else `broker`.
pub fn default_replica_id() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|h| h.trim().to_string())
        .find(|h| valid_replica_id(h))
        .unwrap_or_else(|| "broker".into())
}

/// A replica id: 1 to 128 bytes, printable, no whitespace.
pub fn valid_replica_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str) -> Arc<Replica> {
        Arc::new(Replica::new(
            id.into(),
            None,
            Arc::new(BrokerStats::default()),
        ))
    }

    fn record_of(claim: &Claim, replica: &str) -> SessionRecord {
        SessionRecord {
            replica: replica.into(),
            session: claim.session.clone(),
            connected_at_micros: 0,
        }
    }

    fn other(session: &str) -> SessionRecord {
        SessionRecord {
            replica: "b".into(),
            session: session.into(),
            connected_at_micros: 0,
        }
    }

    #[test]
    fn a_session_read_after_the_own_record_closes_the_local_one() {
        let a = replica("a");
        let claim = a.claim("dev-1");
        assert!(a.is_connected("dev-1"));
        assert_eq!(a.on_record("dev-1", &record_of(&claim, "a")), Outcome::Own);
        assert_eq!(a.on_record("dev-1", &other("x-0")), Outcome::TakenOver);
        assert!(claim.closed.is_cancelled());
        assert!(!a.is_connected("dev-1"));
        // Read again: counted once.
        assert_eq!(a.on_record("dev-1", &other("x-0")), Outcome::TakenOver);
        assert_eq!(BrokerStats::get(&a.stats.sessions_taken_over), 1);
    }

    #[test]
    fn a_session_read_before_the_own_record_is_older_and_the_local_one_stays() {
        let a = replica("a");
        let claim = a.claim("dev-1");
        assert_eq!(a.on_record("dev-1", &other("x-0")), Outcome::Kept);
        assert_eq!(a.on_record("dev-1", &record_of(&claim, "a")), Outcome::Own);
        assert!(!claim.closed.is_cancelled());
        assert_eq!(a.on_record("other", &other("x-0")), Outcome::NotHere);
    }

    #[test]
    fn records_of_earlier_sessions_of_this_process_never_close_the_newest() {
        let a = replica("a");
        let first = a.claim("dev-1");
        let first_record = record_of(&first, "a");
        // rumqttd took the first over locally; its record comes after the
        // second's (two writes race).
        let second = a.claim("dev-1");
        assert_eq!(a.on_record("dev-1", &record_of(&second, "a")), Outcome::Own);
        assert_eq!(a.on_record("dev-1", &first_record), Outcome::Kept);
        assert!(!second.closed.is_cancelled());
        // The first one ending does not forget the second.
        drop(first);
        assert!(a.is_connected("dev-1"));
        drop(second);
        assert!(!a.is_connected("dev-1"));
    }

    #[test]
    fn a_session_record_is_json_with_its_three_fields_and_later_fields_are_accepted(
    ) -> Result<(), serde_json::Error> {
        let r = SessionRecord {
            replica: "broker-0".into(),
            session: "00ff-3".into(),
            connected_at_micros: 7,
        };
        let json = serde_json::to_string(&r)?;
        assert_eq!(
            json,
            r#"{"replica":"broker-0","session":"00ff-3","connected_at_micros":7}"#
        );
        assert_eq!(serde_json::from_str::<SessionRecord>(&json)?, r);
        assert!(serde_json::from_str::<SessionRecord>(r#"{"replica":"x"}"#).is_err());
        // A field a later version adds does not stop this one reading it.
        let later =
            r#"{"replica":"broker-0","session":"00ff-3","connected_at_micros":7,"zone":"z"}"#;
        assert_eq!(serde_json::from_str::<SessionRecord>(later)?, r);
        Ok(())
    }

    #[test]
    fn the_default_replica_id_is_a_valid_one() {
        assert!(valid_replica_id(&default_replica_id()));
        assert!(!valid_replica_id(""));
        assert!(!valid_replica_id("a b"));
    }
}
