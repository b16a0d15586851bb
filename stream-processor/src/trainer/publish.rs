//! Where a model that passed the gate goes.
//!
//! [`Publisher`] is the seam. The production implementation is
//! [`KafkaPublisher`](super::publish_kafka::KafkaPublisher) (signed
//! `ModelUpdate`s on the compacted Kafka topic `edgeloop.models`, pins read
//! from `edgeloop.pins`), used when `trainer.signing_key_file` is set; it
//! also mirrors every version it publishes into a [`DirPublisher`] tree.
//! [`DirPublisher`] alone (no signing key) keeps the loop observable on one
//! machine without publishing to devices: it writes `DIR/models/{task}/{profile}/v{N}.bin` (the encoded
//! artifact, `edgeloop-int8-v1` or `edgeloop-f32-v1`) and `v{N}.json` (its
//! lineage), each to a temporary name, fsynced, then renamed, with `N`
//! monotonic per (task, profile) across restarts (the next version is one
//! above the highest on disk).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use edgeloop_proto::model::Artifact;

/// Why a model could not be published or the live one read.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("could not {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the live model {path} cannot be decoded: {reason}")]
    Decode { path: PathBuf, reason: String },
    /// Expected: `edgeloop ctl models pin` holds the (task, profile) at a
    /// version; nothing new is published until it is unpinned.
    #[error("pinned at v{version}")]
    Pinned { version: u64 },
    #[error("Kafka: {0}")]
    Kafka(String),
    #[error("{0}")]
    Config(String),
}

/// Publishes gated models and says which one is live.
pub trait Publisher: Send {
    /// The model live for (task, profile), with its version, if any.
    fn live(&self, task: &str, profile: &str) -> Result<Option<(u64, Artifact)>, PublishError>;

    /// Publishes `artifact` with its `lineage` (JSON); returns its version,
    /// one above the previous for (task, profile).
    fn publish(
        &mut self,
        task: &str,
        profile: &str,
        artifact: &Artifact,
        lineage: &serde_json::Value,
    ) -> Result<u64, PublishError>;

    /// The artifact of a version of (task, profile) the publisher knows (a
    /// published one, or one read back), for the parity check of devices'
    /// predictions. `None` when unknown.
    fn artifact(&self, task: &str, profile: &str, version: u64) -> Option<Arc<Artifact>>;
}

impl<P: Publisher + ?Sized> Publisher for Box<P> {
    fn live(&self, task: &str, profile: &str) -> Result<Option<(u64, Artifact)>, PublishError> {
        (**self).live(task, profile)
    }

    fn publish(
        &mut self,
        task: &str,
        profile: &str,
        artifact: &Artifact,
        lineage: &serde_json::Value,
    ) -> Result<u64, PublishError> {
        (**self).publish(task, profile, artifact, lineage)
    }

    fn artifact(&self, task: &str, profile: &str, version: u64) -> Option<Arc<Artifact>> {
        (**self).artifact(task, profile, version)
    }
}

/// Writes models into a directory tree (see the module docs).
#[derive(Debug, Clone)]
pub struct DirPublisher {
    root: PathBuf,
}

impl DirPublisher {
    /// Models go under `dir/models/`.
    pub fn new(dir: &Path) -> Self {
        DirPublisher {
            root: dir.join("models"),
        }
    }

    fn lane_dir(&self, task: &str, profile: &str) -> PathBuf {
        self.root.join(task).join(profile)
    }

    /// The highest version on disk for (task, profile), if any.
    pub fn latest_version(&self, task: &str, profile: &str) -> Result<Option<u64>, PublishError> {
        let dir = self.lane_dir(task, profile);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(PublishError::Io {
                    action: "list",
                    path: dir,
                    source,
                })
            }
        };
        Ok(entries
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix('v')?
                    .strip_suffix(".bin")?
                    .parse::<u64>()
                    .ok()
            })
            .max())
    }

    /// Writes `artifact` as version `version` of (task, profile), with its
    /// lineage (to which `version` and `format` are added).
    pub fn write(
        &self,
        task: &str,
        profile: &str,
        version: u64,
        artifact: &Artifact,
        lineage: &serde_json::Value,
    ) -> Result<(), PublishError> {
        let dir = self.lane_dir(task, profile);
        std::fs::create_dir_all(&dir).map_err(|source| PublishError::Io {
            action: "create directory",
            path: dir.clone(),
            source,
        })?;
        let mut lineage = lineage.clone();
        if let Some(obj) = lineage.as_object_mut() {
            obj.insert("version".into(), version.into());
            obj.insert("format".into(), artifact.format().into());
        }
        // The lineage first: a `.bin` (what makes the version exist) always
        // has its `.json`.
        let json = serde_json::to_vec_pretty(&lineage).unwrap_or_default();
        write_atomic(&dir.join(format!("v{version}.json")), &json)?;
        write_atomic(&dir.join(format!("v{version}.bin")), &artifact.encode())?;
        Ok(())
    }

    fn read(&self, task: &str, profile: &str, version: u64) -> Result<Artifact, PublishError> {
        let path = self.lane_dir(task, profile).join(format!("v{version}.bin"));
        let bytes = std::fs::read(&path).map_err(|source| PublishError::Io {
            action: "read",
            path: path.clone(),
            source,
        })?;
        Artifact::decode(&bytes).map_err(|e| PublishError::Decode {
            path,
            reason: e.to_string(),
        })
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PublishError> {
    use std::io::Write;
    let io = |action, source| PublishError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).map_err(|e| io("create", e))?;
    f.write_all(bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("fsync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| io("rename into place", e))?;
    Ok(())
}

impl Publisher for DirPublisher {
    fn live(&self, task: &str, profile: &str) -> Result<Option<(u64, Artifact)>, PublishError> {
        let Some(v) = self.latest_version(task, profile)? else {
            return Ok(None);
        };
        Ok(Some((v, self.read(task, profile, v)?)))
    }

    fn publish(
        &mut self,
        task: &str,
        profile: &str,
        artifact: &Artifact,
        lineage: &serde_json::Value,
    ) -> Result<u64, PublishError> {
        let version = self.latest_version(task, profile)?.unwrap_or(0) + 1;
        self.write(task, profile, version, artifact, lineage)?;
        Ok(version)
    }

    fn artifact(&self, task: &str, profile: &str, version: u64) -> Option<Arc<Artifact>> {
        self.read(task, profile, version).ok().map(Arc::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeloop_proto::features::FeatureSet;
    use edgeloop_proto::model::FloatModel;

    #[test]
    fn versions_are_monotonic_per_task_and_profile_across_restarts(
    ) -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let model = FloatModel::new(
            FeatureSet {
                channels: vec!["a".into()],
                window: 2,
            },
            vec!["x".into(), "y".into()],
            vec![0.0; 6],
            vec![1.0; 6],
            vec![0.5; 12],
            vec![0.0, 1.0],
        )?;
        let artifact = Artifact::F32(model);
        let mut p = DirPublisher::new(dir.path());
        assert!(p.live("t", "p")?.is_none());
        assert_eq!(p.publish("t", "p", &artifact, &serde_json::json!({}))?, 1);
        assert_eq!(p.publish("t", "p", &artifact, &serde_json::json!({}))?, 2);
        assert_eq!(p.publish("t", "q", &artifact, &serde_json::json!({}))?, 1);
        let mut again = DirPublisher::new(dir.path());
        assert_eq!(
            again.publish("t", "p", &artifact, &serde_json::json!({}))?,
            3
        );
        let (v, live) = again.live("t", "p")?.ok_or("no live model")?;
        assert_eq!((v, live), (3, artifact));
        let lineage: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("models/t/p/v3.json"))?)?;
        assert_eq!(lineage["version"], 3);
        assert_eq!(lineage["format"], "edgeloop-f32-v1");
        Ok(())
    }
}
