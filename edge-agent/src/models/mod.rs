//! Model updates and on-device inference: the device's end of
//! `models/{task}/{profile}`.
//!
//! - [`Models`]: the models this device runs, one per task, shared by the
//!   updater (which swaps them) and the sources' appends (which read them).
//! - [`Models::apply`]: what the device does with one message of
//!   `models/{task}/{profile}`, in order: an empty payload (the retained
//!   model was cleared) is ignored; the payload must decode as a
//!   `ModelUpdate` whose task and profile are the topic's; its SHA-256 and
//!   Ed25519 signature must verify with the provisioned public key
//!   (`models.verify_key_file`); a version lower than the applied one is
//!   refused, an equal one is the retained re-delivery after a reconnect and
//!   changes nothing; the artifact must decode, be of the announced format
//!   and read only channels this device has. Only then is the update stored
//!   ([`store`]: temporary file, fsync, rename, fsync of the directory) and
//!   swapped in. A refusal keeps the model in use, is counted
//!   (`AgentStats::model_updates_refused`), logged, and reported in
//!   `DeviceStatus.last_model_error`.
//! - [`run_updater`]: the task that applies the messages the uplink hands
//!   over, off the async workers, and wakes the uplink to publish a
//!   `DeviceStatus` at once.
//! - [`inference`]: each reading a device's own sources append gets one
//!   `Prediction` per loaded model, computed over the device's last readings
//!   with `proto`'s feature code and kernels, exactly as the trainer does.
//!
//! `docs/device-protocol.md` describes the same steps for firmware authors.

pub mod inference;
pub mod store;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use edgeloop_proto::model::{Artifact, CodecError};
use edgeloop_proto::signing::{self, SignatureError, VerifyingKey};
use edgeloop_proto::v1::ModelUpdate;
use edgeloop_proto::{topics, Message as _};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, Notify};

use crate::stats::AgentStats;

pub use inference::History;

/// The `[models]` section of the agent config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelsConfig {
    /// The Ed25519 public key model updates must be signed with: a file
    /// holding 64 hex digits (`edgeloop keys generate` writes one). Model
    /// updates (and on-device inference) are on when this is set.
    pub verify_key_file: Option<PathBuf>,
    /// Where applied models are stored, one `{task}.update` file per task.
    /// Default: `{spool.dir}/models` (so each device of a simulated fleet has
    /// its own).
    pub dir: Option<PathBuf>,
}

impl ModelsConfig {
    /// The public key read from `verify_key_file`, `None` when it is not
    /// set. The error names the field.
    pub fn verifying_key(&self) -> Result<Option<VerifyingKey>, String> {
        let Some(path) = &self.verify_key_file else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            format!(
                "models.verify_key_file: cannot read {}: {e}",
                path.display()
            )
        })?;
        signing::parse_verifying_key(&text)
            .map(Some)
            .map_err(|e| format!("models.verify_key_file: {}: {e}", path.display()))
    }
}

/// Why a model update was not applied.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("the payload does not decode as a ModelUpdate ({0})")]
    Undecodable(String),
    #[error("it came on models/{topic_task}/{topic_profile} but names task `{task}` and profile `{profile}`")]
    TopicMismatch {
        topic_task: String,
        topic_profile: String,
        task: String,
        profile: String,
    },
    #[error("it is for profile `{got}`, and this device's profile is `{ours}`")]
    WrongProfile { got: String, ours: String },
    #[error("{0}")]
    Signature(#[from] SignatureError),
    #[error("version {version} is lower than version {applied}, which this device runs")]
    Older { version: u64, applied: u64 },
    #[error("the artifact does not load: {0}")]
    Artifact(#[from] CodecError),
    #[error("the update says format `{claimed}` but the artifact is `{actual}`")]
    FormatMismatch { claimed: String, actual: String },
    #[error("the model reads channel `{0}`, which this device does not have")]
    UnknownChannel(String),
    #[error("storing it failed: {0}")]
    Store(#[from] std::io::Error),
}

/// A refused update: the sentence of `DeviceStatus.last_model_error`.
#[derive(Debug, thiserror::Error)]
#[error("model update for task `{task}` version {} refused: {reason}", version.map_or_else(|| "unknown".to_string(), |v| v.to_string()))]
pub struct Refusal {
    pub task: String,
    pub version: Option<u64>,
    pub reason: Box<UpdateError>,
}

/// What became of one message on a model topic.
#[derive(Debug)]
pub enum Outcome {
    /// The model was stored and swapped in.
    Applied {
        task: String,
        version: u64,
    },
    /// The version this device already runs (a retained re-delivery).
    AlreadyApplied {
        task: String,
        version: u64,
    },
    /// An empty retained message (the model was withdrawn), or a topic of
    /// another profile: nothing to do.
    Ignored(String),
    Refused(Refusal),
}

/// A model ready to run: what inference needs, precomputed.
#[derive(Debug)]
pub struct Loaded {
    pub task: String,
    pub version: u64,
    pub artifact: Artifact,
    /// For each channel of the model's feature set, its index among the
    /// device's channels (the reading's values).
    pub inputs: Vec<usize>,
}

impl Loaded {
    /// The feature window of the model, in readings.
    pub fn window(&self) -> usize {
        self.artifact.features().window
    }
}

#[derive(Debug, Default)]
struct Reported {
    versions: BTreeMap<String, u64>,
    last_error: String,
}

/// The models of one device.
pub struct Models {
    device: String,
    profile: String,
    /// The device's channels, in value order.
    channels: Vec<String>,
    key: VerifyingKey,
    dir: PathBuf,
    /// What inference runs: swapped whole, read without waiting on a store.
    loaded: RwLock<Arc<Vec<Arc<Loaded>>>>,
    reported: Mutex<Reported>,
    /// The device's recent readings, for the models' feature windows.
    pub(crate) history: Mutex<History>,
    /// Notified after every apply or refusal: the uplink publishes a status.
    pub changed: Notify,
    stats: Arc<AgentStats>,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("device", &self.device)
            .field("profile", &self.profile)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; take it over.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Models {
    /// Opens the model store of a device with these `channels` (in value
    /// order): loads every stored model, verifying it again. A stored file
    /// that does not verify or load is moved to `{dir}/quarantine/` and
    /// reported; it never stops the agent. Fails only when `dir` cannot be
    /// created or listed. Blocking (file I/O).
    pub fn open(
        device: &str,
        profile: &str,
        channels: Vec<String>,
        key: VerifyingKey,
        dir: &Path,
        stats: Arc<AgentStats>,
    ) -> Result<Models, std::io::Error> {
        let models = Models {
            device: device.into(),
            profile: profile.into(),
            channels: channels.clone(),
            key,
            dir: dir.to_path_buf(),
            loaded: RwLock::new(Arc::new(Vec::new())),
            reported: Mutex::new(Reported::default()),
            history: Mutex::new(History::new(channels.len())),
            changed: Notify::new(),
            stats,
        };
        for stored in store::load_all(dir)? {
            match stored {
                store::Stored::Update { task, path, bytes } => {
                    match models.check(&task, &models.profile, &bytes) {
                        Ok(loaded) => {
                            tracing::info!(device = %models.device, %task, version = loaded.version, "loaded the stored model");
                            models.install(loaded);
                        }
                        Err(refusal) => models.quarantine(&path, &refusal.to_string()),
                    }
                }
                store::Stored::Unreadable { path, error } => {
                    models.quarantine(&path, &format!("stored model {}: {error}", path.display()))
                }
            }
        }
        Ok(models)
    }

    fn quarantine(&self, path: &Path, why: &str) {
        AgentStats::add(&self.stats.model_updates_refused, 1);
        let message = match store::quarantine(&self.dir, path) {
            Ok(to) => format!(
                "stored model {} was moved to {}: {why}",
                path.display(),
                to.display()
            ),
            Err(e) => format!(
                "stored model {} could not be quarantined ({e}) and was not loaded: {why}",
                path.display()
            ),
        };
        tracing::error!(device = %self.device, "{message}");
        lock(&self.reported).last_error = message;
    }

    /// The directory of the store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The models in use.
    pub fn loaded(&self) -> Arc<Vec<Arc<Loaded>>> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The applied version per task, as `DeviceStatus.applied_model_versions`.
    pub fn applied_versions(&self) -> std::collections::HashMap<String, u64> {
        lock(&self.reported)
            .versions
            .iter()
            .map(|(t, v)| (t.clone(), *v))
            .collect()
    }

    /// The last refusal, as `DeviceStatus.last_model_error` (empty when the
    /// last update was applied or none was refused).
    pub fn last_error(&self) -> String {
        lock(&self.reported).last_error.clone()
    }

    /// Decodes, verifies and loads an encoded `ModelUpdate` for `task`
    /// (as named by the topic or the file name). No version check.
    fn check(&self, task: &str, profile: &str, bytes: &[u8]) -> Result<Loaded, Refusal> {
        let refuse = |version, reason| Refusal {
            task: task.to_string(),
            version,
            reason: Box::new(reason),
        };
        let update = ModelUpdate::decode(bytes)
            .map_err(|e| refuse(None, UpdateError::Undecodable(e.to_string())))?;
        let version = Some(update.version);
        if update.task != task || update.profile != profile {
            return Err(refuse(
                version,
                UpdateError::TopicMismatch {
                    topic_task: task.into(),
                    topic_profile: profile.into(),
                    task: update.task.clone(),
                    profile: update.profile.clone(),
                },
            ));
        }
        if update.profile != self.profile {
            return Err(refuse(
                version,
                UpdateError::WrongProfile {
                    got: update.profile.clone(),
                    ours: self.profile.clone(),
                },
            ));
        }
        signing::verify_update(&update, &self.key).map_err(|e| refuse(version, e.into()))?;
        let artifact = Artifact::decode(&update.artifact).map_err(|e| refuse(version, e.into()))?;
        if artifact.format() != update.format {
            return Err(refuse(
                version,
                UpdateError::FormatMismatch {
                    claimed: update.format.clone(),
                    actual: artifact.format().into(),
                },
            ));
        }
        let inputs = artifact
            .features()
            .channels
            .iter()
            .map(|name| {
                self.channels
                    .iter()
                    .position(|c| c == name)
                    .ok_or_else(|| refuse(version, UpdateError::UnknownChannel(name.clone())))
            })
            .collect::<Result<Vec<usize>, Refusal>>()?;
        Ok(Loaded {
            task: task.into(),
            version: update.version,
            artifact,
            inputs,
        })
    }

    /// Swaps `loaded` in for its task.
    fn install(&self, loaded: Loaded) {
        let task = loaded.task.clone();
        let version = loaded.version;
        let window = loaded.window();
        {
            let mut slot = self.loaded.write().unwrap_or_else(|p| p.into_inner());
            let mut next: Vec<Arc<Loaded>> =
                slot.iter().filter(|l| l.task != task).cloned().collect();
            next.push(Arc::new(loaded));
            next.sort_by(|a, b| a.task.cmp(&b.task));
            let largest = next.iter().map(|l| l.window()).max().unwrap_or(0);
            lock(&self.history).set_capacity(largest.max(window));
            *slot = Arc::new(next);
        }
        lock(&self.reported).versions.insert(task, version);
    }

    fn applied_version(&self, task: &str) -> Option<u64> {
        lock(&self.reported).versions.get(task).copied()
    }

    /// Handles one message of a model topic (see the module docs for the
    /// order of the checks). Blocking (verification, file I/O): run it on a
    /// blocking thread.
    pub fn apply(&self, topic: &str, payload: &[u8]) -> Outcome {
        let outcome = self.decide(topic, payload);
        match &outcome {
            Outcome::Applied { task, version } => {
                AgentStats::add(&self.stats.model_updates_applied, 1);
                tracing::info!(device = %self.device, %task, version, "applied a model update");
                lock(&self.reported).last_error.clear();
            }
            Outcome::AlreadyApplied { task, version } => {
                tracing::debug!(device = %self.device, %task, version, "model update already applied");
            }
            Outcome::Ignored(why) => {
                tracing::debug!(device = %self.device, %topic, "{why}");
            }
            Outcome::Refused(refusal) => {
                AgentStats::add(&self.stats.model_updates_refused, 1);
                tracing::warn!(device = %self.device, %topic, "{refusal}");
                lock(&self.reported).last_error = refusal.to_string();
            }
        }
        outcome
    }

    fn decide(&self, topic: &str, payload: &[u8]) -> Outcome {
        let Some((task, profile)) = topic
            .strip_prefix("models/")
            .and_then(|rest| rest.split_once('/'))
            .filter(|(t, p)| topics::is_topic_level(t) && topics::is_topic_level(p))
        else {
            return Outcome::Ignored(format!("{topic} is not a model topic"));
        };
        if profile != self.profile {
            return Outcome::Ignored(format!("{topic} is for another profile"));
        }
        if payload.is_empty() {
            return Outcome::Ignored(format!(
                "the retained model of {topic} was cleared; the model in use stays"
            ));
        }
        let loaded = match self.check(task, profile, payload) {
            Ok(loaded) => loaded,
            Err(refusal) => return Outcome::Refused(refusal),
        };
        let version = loaded.version;
        match self.applied_version(task) {
            Some(applied) if version < applied => {
                return Outcome::Refused(Refusal {
                    task: task.into(),
                    version: Some(version),
                    reason: Box::new(UpdateError::Older { version, applied }),
                })
            }
            Some(applied) if version == applied => {
                return Outcome::AlreadyApplied {
                    task: task.into(),
                    version,
                }
            }
            _ => {}
        }
        if let Err(e) = store::write_atomically(&self.dir, task, payload) {
            return Outcome::Refused(Refusal {
                task: task.into(),
                version: Some(version),
                reason: Box::new(e.into()),
            });
        }
        self.install(loaded);
        Outcome::Applied {
            task: task.into(),
            version,
        }
    }
}

/// A message of a model topic, as the uplink hands it over.
pub type Delivery = (String, bytes::Bytes);

/// What the uplink needs of the models: where to hand model messages
/// over, and what to report in `DeviceStatus`.
#[derive(Debug, Clone)]
pub struct ModelLink {
    pub models: Arc<Models>,
    pub deliveries: mpsc::Sender<Delivery>,
}

impl ModelLink {
    /// The filter this device subscribes to: `models/+/{profile}`.
    pub fn filter(&self) -> String {
        format!("models/+/{}", self.models.profile)
    }

    /// Whether `topic` is one of this device's model topics.
    pub fn wants(&self, topic: &str) -> bool {
        topic
            .strip_prefix("models/")
            .and_then(|rest| rest.split_once('/'))
            .is_some_and(|(_, profile)| profile == self.models.profile)
    }
}

/// Applies the deliveries on `rx` one after the other until the channel
/// closes (the uplink stopped), each on a blocking thread, and notifies
/// `models.changed` after every apply or refusal.
pub async fn run_updater(models: Arc<Models>, mut rx: mpsc::Receiver<Delivery>) {
    while let Some((topic, payload)) = rx.recv().await {
        let m = models.clone();
        let outcome = match tokio::task::spawn_blocking(move || m.apply(&topic, &payload)).await {
            Ok(outcome) => outcome,
            Err(e) => {
                tracing::error!(device = %models.device, error = %e, "applying a model update panicked");
                continue;
            }
        };
        if matches!(outcome, Outcome::Applied { .. } | Outcome::Refused(_)) {
            models.changed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
