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
///
/// It can be stopped and started again on the same address with the same
/// storage ([`LocalKafka::kill_keeping_storage`], [`LocalKafka::start_again`]):
/// with SQLite storage (`sqlite:///PATH`) what it held survives, which is how
/// the tests take Kafka away for a while.
///
/// Tansu 0.6 with SQLite survives a crash (SIGKILL) of that kind, but not a
/// graceful stop (SIGTERM) while an idempotent producer (the bridge's) has
/// requests in flight: after the restart its storage task panics on that
/// producer's next request (`todo!()` in `init_producer` for a known
/// producer id, or "more or less than one row" for an unknown epoch) and
/// every request fails from then on. Hence the crash.
pub struct LocalKafka {
    /// `None` while stopped.
    child: Option<Child>,
    addr: SocketAddr,
    bin: PathBuf,
    storage: String,
    log: PathBuf,
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
        let mut kafka = LocalKafka {
            child: None,
            addr,
            bin: bin.to_path_buf(),
            storage: storage.to_string(),
            log: log.to_path_buf(),
        };
        let log_file = std::fs::File::create(log).map_err(|source| LocalKafkaError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        kafka.spawn(log_file).await?;
        Ok(kafka)
    }

    /// Starts the stopped broker again on the same address with the same
    /// storage, appending to the same log. Does nothing if it is running.
    pub async fn start_again(&mut self) -> Result<(), LocalKafkaError> {
        if self.child.is_some() {
            return Ok(());
        }
        let log_file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&self.log)
            .map_err(|source| LocalKafkaError::Log {
                path: self.log.clone(),
                source,
            })?;
        self.spawn(log_file).await
    }

    async fn spawn(&mut self, log_file: std::fs::File) -> Result<(), LocalKafkaError> {
        let addr = self.addr;
        let url = format!("tcp://{addr}");
        let log_err = log_file
            .try_clone()
            .map_err(|source| LocalKafkaError::Log {
                path: self.log.clone(),
                source,
            })?;
        let mut child = Command::new(&self.bin)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &self.storage])
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LocalKafkaError::Spawn {
                bin: self.bin.clone(),
                source,
            })?;
        let waited = Duration::from_secs(30);
        let deadline = tokio::time::Instant::now() + waited;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LocalKafkaError::Exited {
                    status: status.to_string(),
                    log: self.log.display().to_string(),
                });
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                self.child = Some(child);
                return Ok(());
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

    /// The broker's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Asks the broker to stop (SIGTERM), waiting up to `grace` before killing it.
    pub async fn stop(mut self, grace: Duration) {
        self.stop_keeping_storage(grace).await;
    }

    /// Kills the broker (SIGKILL, as a crash would) and keeps its address and
    /// storage so that [`LocalKafka::start_again`] brings it back.
    pub async fn kill_keeping_storage(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Stops the broker (SIGTERM, then SIGKILL after `grace`) and keeps its
    /// address and storage so that [`LocalKafka::start_again`] brings it back
    /// (see the type's docs for what Tansu does after a SIGTERM).
    pub async fn stop_keeping_storage(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(grace, child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}
