//! The control API (gRPC, tonic): fleet, labelling, models and health,
//! described in `proto/proto/control.proto`, served on `control.listen`.
//!
//! It is served by the processor because that is where the state lives: the
//! labeller's rules and per-rule statistics, and the per-device view of the
//! readings and loss reports, are in this process; the device status and the
//! model registry are compacted Kafka topics any process can read, and the
//! processor follows them here ([`feed`]). With several processor replicas
//! each serves the whole status topic and registry, but the readings-derived
//! fields and rule statistics of its own partitions only.
//!
//! - [`ControlConfig`]: listen address, bearer token, key files.
//! - [`feed`]: follows `edgeloop.status`, `edgeloop.models` and
//!   `edgeloop.pins` from their beginning into [`State`].
//! - [`registry`]: the model registry and rollback (republish as a new,
//!   higher, signed version).
//! - [`service`]: the four gRPC services and the token check.
//! - [`pb`]: the generated messages, servers and clients (`edgeloop ctl`
//!   and the tests use the clients).

pub mod feed;
pub mod registry;
pub mod service;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use edgeloop_kafka::KafkaConfig;
use edgeloop_proto::signing::{self, SigningKey, VerifyingKey};
use edgeloop_proto::v1::DeviceStatus;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::metrics::SharedRuleMetrics;
use crate::stats::ProcessorStats;

/// Generated code of `control.proto`, package `edgeloop.control.v1`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("edgeloop.control.v1");
    /// The encoded descriptor set of `control.proto`, served by reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/control_descriptor.bin"));
}

/// The shortest bearer token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// The client side of the token check: adds `authorization: Bearer TOKEN`
/// to every request (none: no authorization metadata). Used by `edgeloop
/// ctl` and the tests, with `*Client::with_interceptor`.
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// `None` for no token; an error if the token cannot be an HTTP header.
    pub fn new(token: Option<&str>) -> Result<Bearer, String> {
        token
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token is not valid in an HTTP header".to_string())
            })
            .transpose()
            .map(Bearer)
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            request.metadata_mut().insert("authorization", v.clone());
        }
        Ok(request)
    }
}

/// `[control]` of the processor's config.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Where to serve the gRPC control API, e.g. `0.0.0.0:9470` (none: not
    /// served).
    pub listen: Option<SocketAddr>,
    /// The bearer token every call must carry (`authorization: Bearer
    /// TOKEN`), at least 16 characters; required when `listen` is set.
    /// Override with the environment variable `EDGELOOP_CONTROL_TOKEN`.
    pub token: Option<String>,
    /// A file holding the token instead (a mounted Kubernetes Secret, say;
    /// surrounding whitespace ignored). Override with
    /// `EDGELOOP_CONTROL_TOKEN_FILE`. `token` wins when both are set.
    pub token_file: Option<PathBuf>,
    /// Private key (64 hex digits, `edgeloop keys generate`) used to sign
    /// the new version a rollback publishes; none: rollback is refused.
    pub signing_key_file: Option<PathBuf>,
    /// Public key (64 hex digits) the registry's signatures are checked
    /// against; none: the key of `signing_key_file`, if set, else unchecked.
    pub verify_key_file: Option<PathBuf>,
}

impl ControlConfig {
    /// Checks the fields; the error names the one that is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.listen.is_none() {
            return Ok(());
        }
        match (&self.token, &self.token_file) {
            (Some(t), _) => check_token("control.token", t),
            (None, Some(_)) => Ok(()),
            (None, None) => Err(
                "control.token: must be set when control.listen is (or control.token_file, or env EDGELOOP_CONTROL_TOKEN)"
                    .into(),
            ),
        }
    }

    /// The token, read from `token_file` if `token` is not set.
    pub fn resolve_token(&self) -> Result<String, ControlError> {
        if let Some(t) = &self.token {
            check_token("control.token", t).map_err(ControlError::Token)?;
            return Ok(t.clone());
        }
        let Some(path) = &self.token_file else {
            return Err(ControlError::Token("control.token: not set".into()));
        };
        let text = std::fs::read_to_string(path).map_err(|e| {
            ControlError::Token(format!("control.token_file {}: {e}", path.display()))
        })?;
        let token = text.trim();
        check_token(&format!("control.token_file {}", path.display()), token)
            .map_err(ControlError::Token)?;
        Ok(token.to_string())
    }
}

fn check_token(field: &str, t: &str) -> Result<(), String> {
    if t.is_empty() {
        Err(format!("{field}: is empty"))
    } else if t.len() < MIN_TOKEN_LEN {
        Err(format!(
            "{field}: {} characters is too short to guess hard; use at least {MIN_TOKEN_LEN}",
            t.len()
        ))
    } else if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Err(format!(
            "{field}: must not contain whitespace or control characters"
        ))
    } else {
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{field} {path}: {reason}")]
    KeyFile {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{0}")]
    Token(String),
    #[error("the control API server failed: {0}")]
    Serve(String),
    #[error("the control API could not reach Kafka: {0}")]
    Kafka(String),
}

/// How far a follower of a compacted topic got.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedHealth {
    /// Reached the end the topic had when following started.
    pub caught_up: bool,
    pub records: u64,
    /// The last error, cleared by the next record read.
    pub error: Option<String>,
}

/// What the control API serves from, shared with the feeds.
pub struct State {
    pub kafka: KafkaConfig,
    pub stats: Arc<ProcessorStats>,
    pub rules: SharedRuleMetrics,
    pub rules_file: Option<PathBuf>,
    /// The latest status report per device (`edgeloop.status`).
    pub statuses: Mutex<BTreeMap<String, DeviceStatus>>,
    pub registry: Mutex<registry::Registry>,
    pub status_feed: Mutex<FeedHealth>,
    pub models_feed: Mutex<FeedHealth>,
    pub pins_feed: Mutex<FeedHealth>,
    /// Per partition of `edgeloop.models`, the offset after the last record
    /// the models feed applied (so a rollback or pin can wait for the
    /// registry to hold everything Kafka has: [`registry::catch_up`]).
    pub models_read: Mutex<std::collections::HashMap<i32, i64>>,
    pub signing_key: Option<SigningKey>,
    pub verify_key: Option<VerifyingKey>,
    /// Held while a rollback picks its version and publishes it.
    pub publishing: tokio::sync::Mutex<()>,
    /// The trainer's profile names (`None`: this processor does not train).
    pub trainer_profiles: Option<Vec<String>>,
}

fn read_key<T>(
    field: &'static str,
    path: &std::path::Path,
    parse: fn(&str) -> Result<T, signing::SignatureError>,
) -> Result<T, ControlError> {
    let err = |reason: String| ControlError::KeyFile {
        field,
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    parse(&text).map_err(|e| err(e.to_string()))
}

/// Reads an Ed25519 private key file (64 hex digits, `edgeloop keys
/// generate`); the error names `field` and the file. The control API
/// (`control.signing_key_file`) and the trainer's model publisher
/// (`trainer.signing_key_file`) both load their key with it.
pub fn load_signing_key(
    field: &'static str,
    path: &std::path::Path,
) -> Result<SigningKey, ControlError> {
    read_key(field, path, signing::parse_signing_key)
}

impl State {
    pub fn new(
        config: &ControlConfig,
        kafka: KafkaConfig,
        stats: Arc<ProcessorStats>,
        rules: SharedRuleMetrics,
        rules_file: Option<PathBuf>,
    ) -> Result<State, ControlError> {
        let signing_key = config
            .signing_key_file
            .as_deref()
            .map(|p| load_signing_key("control.signing_key_file", p))
            .transpose()?;
        let verify_key = match config.verify_key_file.as_deref() {
            Some(p) => Some(read_key(
                "control.verify_key_file",
                p,
                signing::parse_verifying_key,
            )?),
            None => signing_key.as_ref().map(|k| k.verifying_key()),
        };
        Ok(State {
            kafka,
            stats,
            rules,
            rules_file,
            statuses: Mutex::default(),
            registry: Mutex::default(),
            status_feed: Mutex::default(),
            models_feed: Mutex::default(),
            pins_feed: Mutex::default(),
            models_read: Mutex::default(),
            signing_key,
            verify_key,
            publishing: tokio::sync::Mutex::new(()),
            trainer_profiles: None,
        })
    }
}

/// Locks a mutex, taking the data of a poisoned one (a panic elsewhere
/// does not stop the control API from answering).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Binds `config.listen`, starts the feeds, and serves until `shutdown`.
/// Returns once the listener is bound (the serving goes on in tasks), so a
/// bad address is reported at start-up.
pub async fn start(
    config: &ControlConfig,
    state: Arc<State>,
    shutdown: CancellationToken,
) -> Result<Option<SocketAddr>, ControlError> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let token = config.resolve_token()?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ControlError::Bind { addr, source })?;
    let bound = listener
        .local_addr()
        .map_err(|source| ControlError::Bind { addr, source })?;
    feed::spawn(state.clone(), shutdown.clone())?;
    let router = service::router(state, token)?;
    tokio::spawn(async move {
        let incoming = tonic::transport::server::TcpIncoming::from(listener);
        if let Err(e) = router
            .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
            .await
        {
            tracing::error!(%bound, error = %e, "the control API stopped");
        }
    });
    tracing::info!(listen = %bound, "serving the gRPC control API");
    Ok(Some(bound))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listen_address_needs_a_long_enough_token() {
        let mut c = ControlConfig {
            listen: Some(([127, 0, 0, 1], 0).into()),
            ..Default::default()
        };
        assert!(c
            .validate()
            .expect_err("no token")
            .starts_with("control.token"));
        c.token = Some("short".into());
        assert!(c.validate().expect_err("short").contains("too short"));
        c.token = Some("a token with spaces in it".into());
        assert!(c.validate().expect_err("spaces").contains("whitespace"));
        c.token = Some("0123456789abcdef".into());
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(ControlConfig::default().validate(), Ok(()));
    }

    #[test]
    fn a_token_file_is_read_trimmed_and_checked() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdefXYZ\n")?;
        let mut c = ControlConfig {
            listen: Some(([127, 0, 0, 1], 0).into()),
            token_file: Some(path.clone()),
            ..Default::default()
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.resolve_token()?, "0123456789abcdefXYZ");
        std::fs::write(&path, "short")?;
        let e = c.resolve_token().expect_err("short").to_string();
        assert!(
            e.starts_with("control.token_file") && e.contains("too short"),
            "{e}"
        );
        c.token_file = Some(dir.path().join("missing"));
        assert!(c.resolve_token().is_err());
        Ok(())
    }
}
