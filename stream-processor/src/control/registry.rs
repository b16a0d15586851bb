//! The model registry as the control API sees it: every `ModelUpdate` read
//! from `edgeloop.models`, per (task, profile) and version. The topic is
//! compacted by `task/profile`, so once Kafka has compacted it the registry
//! holds the latest version per key; earlier versions stay listed while the
//! topic still has them (and for as long as this process has seen them).
//!
//! [`rollback`] publishes an earlier version's artifact again as a new
//! version, one above the highest known, so devices (which refuse a lower
//! version than the one they run) take it. [`pin`] records in the compacted
//! topic `edgeloop.pins` that a (task, profile) keeps a version (the model
//! publisher publishes no new version of it while the pin stands); [`unpin`]
//! removes the pin.

use std::collections::BTreeMap;
use std::time::Duration;

use edgeloop_proto::signing::{self, VerifyingKey};
use edgeloop_proto::v1::ModelUpdate;
use edgeloop_proto::{topics, Message as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tonic::Status;

use super::{lock, pb, State};

/// One published version and where it is in the topic.
#[derive(Debug, Clone)]
pub struct Entry {
    pub update: ModelUpdate,
    pub partition: i32,
    pub offset: i64,
}

#[derive(Debug, Default)]
pub struct Registry {
    /// (task, profile) → version → entry.
    pub models: BTreeMap<(String, String), BTreeMap<u64, Entry>>,
    /// (task, profile) → pinned version (`edgeloop.pins`).
    pub pins: BTreeMap<(String, String), u64>,
}

/// The value of a record in `edgeloop.pins`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Pin {
    pub task: String,
    pub profile: String,
    pub version: u64,
    pub pinned_at_micros: i64,
}

impl Registry {
    /// Adds (or, for a version read again, replaces) a version.
    pub fn insert(&mut self, update: ModelUpdate, partition: i32, offset: i64) {
        self.models
            .entry((update.task.clone(), update.profile.clone()))
            .or_default()
            .insert(
                update.version,
                Entry {
                    update,
                    partition,
                    offset,
                },
            );
    }

    /// A tombstone: the model of (task, profile) was withdrawn.
    pub fn withdraw(&mut self, task: &str, profile: &str) {
        self.models.remove(&(task.to_string(), profile.to_string()));
    }

    /// The highest version of (task, profile), if any.
    pub fn live(&self, task: &str, profile: &str) -> Option<u64> {
        self.models
            .get(&(task.to_string(), profile.to_string()))
            .and_then(|v| v.keys().next_back().copied())
    }

    pub fn get(&self, task: &str, profile: &str, version: u64) -> Option<&Entry> {
        let versions = self.models.get(&(task.to_string(), profile.to_string()))?;
        if version == 0 {
            versions.values().next_back()
        } else {
            versions.get(&version)
        }
    }
}

impl Registry {
    /// Whether `entry`'s version is the pinned one of its task and profile.
    pub fn is_pinned(&self, entry: &Entry) -> bool {
        self.pins
            .get(&(entry.update.task.clone(), entry.update.profile.clone()))
            .is_some_and(|v| *v == entry.update.version)
    }
}

/// The API's view of one entry.
pub fn describe(entry: &Entry, live: bool, key: Option<&VerifyingKey>) -> pb::ModelVersion {
    let u = &entry.update;
    let actual = signing::sha256(&u.artifact);
    let signature = match key {
        Some(_) if u.signature.is_empty() => "unchecked: not signed".to_string(),
        Some(key) => match signing::verify_update(u, key) {
            Ok(()) => "valid".to_string(),
            Err(e) => format!("invalid: {e}"),
        },
        None => "unchecked: no verify key configured".to_string(),
    };
    pb::ModelVersion {
        task: u.task.clone(),
        profile: u.profile.clone(),
        version: u.version,
        format: u.format.clone(),
        sha256: signing::to_hex(&u.sha256),
        sha256_ok: u.sha256.as_ref() == actual.as_slice(),
        artifact_bytes: u.artifact.len() as u64,
        signed: !u.signature.is_empty(),
        signature,
        published_at_micros: u.published_at_micros,
        lineage_json: u.lineage_json.clone(),
        live,
        kafka_partition: entry.partition,
        kafka_offset: entry.offset,
        pinned: false,
    }
}

fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

fn check_names(task: &str, profile: &str) -> Result<(), Status> {
    if topics::is_topic_level(task) && topics::is_topic_level(profile) {
        Ok(())
    } else {
        Err(Status::invalid_argument(
            "task and profile must be non-empty and contain no '/', '+' or '#'",
        ))
    }
}

/// (the entry of `version` (0: live), the live version) of (task, profile).
fn find(state: &State, task: &str, profile: &str, version: u64) -> Result<(Entry, u64), Status> {
    let registry = lock(&state.registry);
    let live = registry.live(task, profile).ok_or_else(|| {
        Status::not_found(format!(
            "no model for task {task:?} and profile {profile:?}"
        ))
    })?;
    let entry = registry.get(task, profile, version).cloned().ok_or_else(|| {
        Status::not_found(format!(
            "version {version} of {task}/{profile} is not in the registry (compacted away, or never published)"
        ))
    })?;
    Ok((entry, live))
}

async fn produce(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    payload: Option<&[u8]>,
) -> Result<(i32, i64), Status> {
    let mut record: FutureRecord<'_, str, [u8]> = FutureRecord::to(topic).key(key);
    if let Some(p) = payload {
        record = record.payload(p);
    }
    producer
        .send(record, Duration::from_secs(10))
        .await
        .map(|d| (d.partition, d.offset))
        .map_err(|(e, _)| Status::unavailable(format!("publishing to {topic}: {e}")))
}

/// How long a rollback or pin waits for the registry to catch up.
const CATCH_UP: Duration = Duration::from_secs(10);

/// Waits until the models feed has applied every record `edgeloop.models`
/// holds now, so the version a rollback or pin picks is above every
/// version published so far (by the trainer, say, a moment ago), not only
/// above those the feed had read.
pub async fn catch_up(state: &State) -> Result<(), Status> {
    let kafka = state.kafka.clone();
    let ends = tokio::task::spawn_blocking(move || -> Result<Vec<(i32, i64)>, String> {
        use rdkafka::consumer::BaseConsumer;
        let consumer: BaseConsumer = kafka
            .client_config(&[("group.id", "edgeloop-control-catch-up")])
            .create()
            .map_err(|e| e.to_string())?;
        match edgeloop_kafka::topic_ends(&consumer, topics::KAFKA_MODELS, Duration::from_secs(5)) {
            Ok((_, ends)) => Ok(ends.into_iter().collect()),
            // No topic yet: nothing to catch up with.
            Err(rdkafka::error::KafkaError::MetadataFetch(
                rdkafka::types::RDKafkaErrorCode::UnknownTopicOrPartition,
            )) => Ok(Vec::new()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .map_err(|e| Status::internal(e.to_string()))?
    .map_err(|e| {
        Status::unavailable(format!("reading the ends of {}: {e}", topics::KAFKA_MODELS))
    })?;
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    loop {
        let behind: Vec<(i32, i64, i64)> = {
            let read = lock(&state.models_read);
            ends.iter()
                .filter_map(|(p, end)| {
                    let at = read.get(p).copied().unwrap_or(0);
                    (at < *end).then_some((*p, at, *end))
                })
                .collect()
        };
        if behind.is_empty() {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Status::unavailable(format!(
                "the model registry has not caught up with {} within {CATCH_UP:?} (partition, read to, end: {behind:?}); try again",
                topics::KAFKA_MODELS
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes `source`'s artifact as version `live + 1`, signed; waits until
/// Kafka has it (acks=all) and registers it. The caller holds
/// `state.publishing`.
async fn republish(
    state: &State,
    producer: &FutureProducer,
    source: Entry,
    live: u64,
    why: &str,
) -> Result<pb::ModelVersion, Status> {
    let Some(key) = &state.signing_key else {
        return Err(Status::failed_precondition(
            "publishing an earlier version again needs a signing key: set control.signing_key_file in the processor's config (edgeloop keys generate writes one)",
        ));
    };
    let version = live + 1;
    let lineage = serde_json::json!({
        why: {
            "republishes_version": source.update.version,
            "replaces_version": live,
        },
        "original_lineage": serde_json::from_str::<serde_json::Value>(&source.update.lineage_json)
            .unwrap_or(serde_json::Value::String(source.update.lineage_json.clone())),
    });
    let from = source.update.version;
    let mut update = ModelUpdate {
        version,
        published_at_micros: now_micros(),
        lineage_json: lineage.to_string(),
        ..source.update
    };
    signing::sign_update(&mut update, key);
    let (partition, offset) = produce(
        producer,
        topics::KAFKA_MODELS,
        &topics::model_key(&update.task, &update.profile),
        Some(&update.encode_to_vec()),
    )
    .await?;
    tracing::info!(task = %update.task, profile = %update.profile, version, from, why, "an earlier model republished as a new version");
    let entry = Entry {
        update,
        partition,
        offset,
    };
    let described = describe(&entry, true, state.verify_key.as_ref());
    lock(&state.registry).insert(entry.update, partition, offset);
    Ok(described)
}

/// Publishes version `to_version` of (task, profile) again as a new version
/// above every known one, signed with the configured key; waits until
/// Kafka has it (acks=all) and returns it as registered.
pub async fn rollback(
    state: &State,
    producer: &FutureProducer,
    req: pb::RollbackRequest,
) -> Result<pb::ModelVersion, Status> {
    check_names(&req.task, &req.profile)?;
    if req.to_version == 0 {
        return Err(Status::invalid_argument(
            "to_version: name the earlier version to roll back to",
        ));
    }
    let _publishing = state.publishing.lock().await;
    catch_up(state).await?;
    let (source, live) = find(state, &req.task, &req.profile, req.to_version)?;
    if req.to_version == live {
        return Err(Status::failed_precondition(format!(
            "version {live} of {}/{} is already live",
            req.task, req.profile
        )));
    }
    let mut published = republish(state, producer, source, live, "rollback").await?;
    published.pinned = lock(&state.registry)
        .pins
        .get(&(req.task, req.profile))
        .is_some_and(|v| *v == published.version);
    Ok(published)
}

/// Pins a version (republishing it first if it is not the live one).
pub async fn pin(
    state: &State,
    producer: &FutureProducer,
    req: pb::PinRequest,
) -> Result<pb::PinResponse, Status> {
    check_names(&req.task, &req.profile)?;
    let _publishing = state.publishing.lock().await;
    catch_up(state).await?;
    let (entry, live) = find(state, &req.task, &req.profile, req.version)?;
    let (mut model, republished) = if entry.update.version == live {
        (describe(&entry, true, state.verify_key.as_ref()), false)
    } else {
        (republish(state, producer, entry, live, "pin").await?, true)
    };
    let pin = Pin {
        task: req.task.clone(),
        profile: req.profile.clone(),
        version: model.version,
        pinned_at_micros: now_micros(),
    };
    let value = serde_json::to_vec(&pin).map_err(|e| Status::internal(e.to_string()))?;
    produce(
        producer,
        topics::KAFKA_PINS,
        &topics::model_key(&req.task, &req.profile),
        Some(&value),
    )
    .await?;
    tracing::info!(task = %req.task, profile = %req.profile, version = model.version, republished, "model pinned");
    lock(&state.registry)
        .pins
        .insert((req.task, req.profile), model.version);
    model.pinned = true;
    Ok(pb::PinResponse {
        pinned: Some(model),
        republished,
    })
}

/// Removes the pin of (task, profile): a tombstone in `edgeloop.pins`.
pub async fn unpin(
    state: &State,
    producer: &FutureProducer,
    req: pb::UnpinRequest,
) -> Result<pb::UnpinResponse, Status> {
    check_names(&req.task, &req.profile)?;
    let _publishing = state.publishing.lock().await;
    let was_pinned = lock(&state.registry)
        .pins
        .contains_key(&(req.task.clone(), req.profile.clone()));
    produce(
        producer,
        topics::KAFKA_PINS,
        &topics::model_key(&req.task, &req.profile),
        None,
    )
    .await?;
    tracing::info!(task = %req.task, profile = %req.profile, was_pinned, "model unpinned");
    lock(&state.registry).pins.remove(&(req.task, req.profile));
    Ok(pb::UnpinResponse { was_pinned })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update(version: u64) -> ModelUpdate {
        ModelUpdate {
            task: "anomaly".into(),
            profile: "int8".into(),
            version,
            artifact: vec![version as u8; 4].into(),
            ..Default::default()
        }
    }

    #[test]
    fn registry_keeps_every_version_and_knows_the_live_one() {
        let mut r = Registry::default();
        r.insert(update(2), 0, 5);
        r.insert(update(1), 0, 3);
        assert_eq!(r.live("anomaly", "int8"), Some(2));
        assert_eq!(r.get("anomaly", "int8", 0).map(|e| e.offset), Some(5));
        assert_eq!(r.get("anomaly", "int8", 1).map(|e| e.offset), Some(3));
        assert!(r.get("anomaly", "f32", 1).is_none());
        r.withdraw("anomaly", "int8");
        assert_eq!(r.live("anomaly", "int8"), None);
    }

    #[test]
    fn description_reports_hash_and_signature_state() {
        let key = signing::SigningKey::from_bytes(&[3; 32]);
        let mut u = update(1);
        signing::sign_update(&mut u, &key);
        let entry = Entry {
            update: u,
            partition: 0,
            offset: 0,
        };
        let d = describe(&entry, true, Some(&key.verifying_key()));
        assert!(d.sha256_ok && d.signed);
        assert_eq!(d.signature, "valid");
        let other = signing::SigningKey::from_bytes(&[4; 32]).verifying_key();
        assert!(describe(&entry, true, Some(&other))
            .signature
            .starts_with("invalid"));
        let mut tampered = entry.clone();
        tampered.update.artifact = vec![9u8; 4].into();
        assert!(!describe(&tampered, true, None).sha256_ok);
    }
}
