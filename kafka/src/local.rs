//! A Kafka-API broker for one machine: Tansu (the cargo package `tansu`, a
//! real broker speaking the Kafka protocol), run as a managed child process.
//! `edgeloop up` and the end-to-end tests use it when no Kafka is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

#[derive(Debug, thiserror::Error)]
pub enum LocalKafkaError {
    #[error(
        "could not start the Kafka-API broker {bin}: {source} (install it with scripts/setup.sh)"
    )]
    Spawn {
        bin: PathBuf,
        source: std::io::Error,
    },
    #[error("the Kafka-API broker exited at start-up ({status}); see {log}")]
    Exited { status: String, log: String },
    #[error("the Kafka-API broker did not listen on {addr} within {waited:?}")]
    Timeout { addr: SocketAddr, waited: Duration },
    #[error("could not open the broker log {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where the `tansu` binary is: the first `tansu` file on `path` (the value
/// of `PATH`), else `{home}/.cargo/bin/tansu` where `cargo install` puts it.
/// The caller passes the environment in; this crate does not read it.
pub fn find_tansu(path: Option<&std::ffi::OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    path.and_then(|paths| {
        std::env::split_paths(paths)
            .map(|p| p.join("tansu"))
            .find(|p| p.is_file())
    })
    .or_else(|| {
        home.map(|h| h.join(".cargo/bin/tansu"))
            .filter(|p| p.is_file())
    })
}

/// A running Tansu broker; killed when dropped.
pub struct LocalKafka {
    child: Child,
    addr: SocketAddr,
}

impl LocalKafka {
    /// Starts `bin` listening on `addr` with the given storage engine URL
    /// (`memory://tansu/` or `sqlite://PATH`), logging to `log`.
    pub async fn start(
        bin: &Path,
        addr: SocketAddr,
        storage: &str,
        log: &Path,
    ) -> Result<LocalKafka, LocalKafkaError> {
        let url = format!("tcp://{addr}");
        let log_file = std::fs::File::create(log).map_err(|source| LocalKafkaError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        let log_err = log_file
            .try_clone()
            .map_err(|source| LocalKafkaError::Log {
                path: log.to_path_buf(),
                source,
            })?;
        let mut child = Command::new(bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", storage])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LocalKafkaError::Spawn {
                bin: bin.to_path_buf(),
                source,
            })?;
        let waited = Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + waited;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LocalKafkaError::Exited {
                    status: status.to_string(),
                    log: log.display().to_string(),
                });
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(LocalKafka { child, addr });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LocalKafkaError::Timeout { addr, waited });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// Asks the broker to stop (SIGTERM), waiting up to `grace` before killing it.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}
