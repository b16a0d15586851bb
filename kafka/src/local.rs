//! Apache Kafka on one machine: a KRaft cluster of one node (broker and
//! controller in one JVM) or of several, each node a child process started
//! from the jars `scripts/setup.sh` installs (Maven coordinates pinned in
//! `kafka/pom.xml`). `edgeloop up`, `edgeloop bench --local`, `edgeloop
//! chaos` and the end-to-end tests use it when no Kafka is given.
//!
//! Layout under the directory it is given (`DIR/kafka/` for `edgeloop up`):
//! for one node, `server.properties`, `log4j2.properties`, `data/` (the log
//! directory, formatted on the first start) and `kafka.log` (everything the
//! JVM prints, appended across restarts); for several nodes the same in
//! `node-1/`, `node-2/`, …
//!
//! A node is stopped with SIGTERM (Kafka's clean shutdown: it writes its
//! clean-shutdown marker and exits) and killed with SIGKILL as a crash
//! would; either way the next start recovers its log. The storage is
//! formatted only when `data/meta.properties` is missing, so a restart keeps
//! what the node held and its cluster id.

use std::ffi::OsString;
use std::io::{Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The Apache Kafka release `kafka/pom.xml` pins.
pub const KAFKA_VERSION: &str = "4.4.0";
/// The oldest Java that runs a Kafka 4 broker.
pub const MIN_JAVA: u32 = 17;
/// The jar whose presence says the install is complete.
const MARKER_JAR: &str = "kafka_2.13-4.4.0.jar";
/// What a node logs once it serves clients (`KafkaRaftServer.startup`).
const STARTED: &str = "Kafka Server started";

#[derive(Debug, thiserror::Error)]
pub enum LocalKafkaError {
    #[error(
        "Java {MIN_JAVA} or newer is needed to run Apache Kafka {KAFKA_VERSION}, and {0}; install a JDK (Debian: apt-get install openjdk-17-jre-headless) or set JAVA_HOME"
    )]
    NoJava(String),
    #[error(
        "Java {MIN_JAVA} or newer is needed to run Apache Kafka {KAFKA_VERSION}; {java} is Java {found}: install a newer JDK or point JAVA_HOME at one"
    )]
    OldJava { java: PathBuf, found: u32 },
    #[error(
        "Apache Kafka {KAFKA_VERSION} is not installed in {libs} (no {MARKER_JAR}): run scripts/setup.sh, or set EDGELOOP_KAFKA_LIBS to the folder of its jars"
    )]
    NotInstalled { libs: PathBuf },
    #[error("could not set up {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not start {java}: {source}")]
    Spawn {
        java: PathBuf,
        source: std::io::Error,
    },
    #[error("formatting the Kafka storage {dir} failed ({status}); see {log}")]
    Format {
        dir: PathBuf,
        status: String,
        log: PathBuf,
    },
    #[error(
        "{addr} is already in use: another Kafka (an earlier run's, still running?) or another program listens there; stop it or choose another address"
    )]
    InUse { addr: SocketAddr },
    #[error("Kafka node {node} exited at start-up ({status}); the end of {log}:\n{tail}")]
    Exited {
        node: u32,
        status: String,
        log: PathBuf,
        tail: String,
    },
    #[error("Kafka node {node} did not start within {waited:?}; see {log}")]
    Timeout {
        node: u32,
        waited: Duration,
        log: PathBuf,
    },
}

type Result<T> = std::result::Result<T, LocalKafkaError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> LocalKafkaError + '_ {
    move |source| LocalKafkaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where Java and Kafka's jars are.
#[derive(Debug, Clone)]
pub struct KafkaInstall {
    pub java: PathBuf,
    /// The folder of Kafka's jars (its classpath is `libs/*`).
    pub libs: PathBuf,
}

impl KafkaInstall {
    /// Finds Java (`JAVA_HOME/bin/java`, else `java` on `PATH`) and the jars
    /// (`EDGELOOP_KAFKA_LIBS`, else [`default_libs_dir`]) from the
    /// environment the caller passes in as a lookup (this crate does not read
    /// the process environment), and checks that the Java is new enough.
    pub fn locate(var: impl Fn(&str) -> Option<OsString>) -> Result<KafkaInstall> {
        let java = match var("JAVA_HOME").filter(|h| !h.is_empty()) {
            Some(home) => {
                let java = PathBuf::from(home).join("bin/java");
                if !java.is_file() {
                    return Err(LocalKafkaError::NoJava(format!(
                        "JAVA_HOME has no {}",
                        java.display()
                    )));
                }
                java
            }
            None => var("PATH")
                .and_then(|paths| {
                    std::env::split_paths(&paths)
                        .map(|p| p.join("java"))
                        .find(|p| p.is_file())
                })
                .ok_or_else(|| LocalKafkaError::NoJava("no java is on PATH".into()))?,
        };
        let found = java_major(&java)?;
        if found < MIN_JAVA {
            return Err(LocalKafkaError::OldJava { java, found });
        }
        let libs = var("EDGELOOP_KAFKA_LIBS")
            .filter(|l| !l.is_empty())
            .map(PathBuf::from)
            .or_else(|| default_libs_dir(&var))
            .ok_or_else(|| LocalKafkaError::NotInstalled {
                libs: PathBuf::from("~/.cache/edgeloop/kafka-4.4.0/libs (no HOME)"),
            })?;
        if !libs.join(MARKER_JAR).is_file() {
            return Err(LocalKafkaError::NotInstalled { libs });
        }
        Ok(KafkaInstall { java, libs })
    }

    fn classpath(&self) -> String {
        format!("{}/*", self.libs.display())
    }
}

/// Where `scripts/setup.sh` installs the jars:
/// `${XDG_CACHE_HOME:-$HOME/.cache}/edgeloop/kafka-4.4.0/libs`.
pub fn default_libs_dir(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let cache = var("XDG_CACHE_HOME")
        .filter(|c| !c.is_empty())
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join(format!("edgeloop/kafka-{KAFKA_VERSION}/libs")))
}

/// The major version `java -version` reports (`"17.0.15"` → 17, `"1.8.0"` → 8).
fn java_major(java: &Path) -> Result<u32> {
    let out = std::process::Command::new(java)
        .arg("-version")
        .output()
        .map_err(|e| LocalKafkaError::NoJava(format!("{} does not run: {e}", java.display())))?;
    let text = String::from_utf8_lossy(&out.stderr);
    parse_java_major(&text).ok_or_else(|| {
        LocalKafkaError::NoJava(format!(
            "{} -version printed no version: {}",
            java.display(),
            text.trim()
        ))
    })
}

fn parse_java_major(version_output: &str) -> Option<u32> {
    let quoted = version_output.split('"').nth(1)?;
    let mut parts = quoted.split(['.', '-', '+', '_']);
    match parts.next()?.parse().ok()? {
        1 => parts.next()?.parse().ok(),
        major => Some(major),
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct LocalKafkaOptions {
    /// Everything the cluster writes goes under it (see the module docs).
    pub dir: PathBuf,
    /// KRaft nodes, each broker and controller (1, or 3 for a cluster that
    /// survives the loss of one).
    pub nodes: u32,
    /// The first node's client listener; `None`: a free loopback port.
    pub listen: Option<SocketAddr>,
    /// The first node's controller listener; `None`: the port after
    /// `listen` when that is set, else a free loopback port.
    pub controller_listen: Option<SocketAddr>,
    /// The JVM's maximum heap, e.g. `"1g"`, `"512m"`.
    pub max_heap: String,
    /// More `server.properties` lines, after edgeloop's own.
    pub properties: Vec<(String, String)>,
}

impl LocalKafkaOptions {
    /// One node under `dir` on a free port, heap up to 512 MiB.
    pub fn single(dir: &Path) -> LocalKafkaOptions {
        LocalKafkaOptions {
            dir: dir.to_path_buf(),
            nodes: 1,
            listen: None,
            controller_listen: None,
            max_heap: "512m".into(),
            properties: Vec::new(),
        }
    }
}

struct Node {
    id: u32,
    dir: PathBuf,
    client: SocketAddr,
    /// `None` while stopped.
    child: Option<Child>,
}

impl Node {
    fn log(&self) -> PathBuf {
        self.dir.join("kafka.log")
    }
}

/// A running local Kafka cluster; its nodes are killed when it is dropped.
pub struct LocalKafka {
    install: KafkaInstall,
    nodes: Vec<Node>,
    max_heap: String,
}

impl LocalKafka {
    /// Writes each node's configuration, formats storage that is not
    /// formatted yet, starts every node and waits until each serves clients.
    ///
    /// Ports it picks itself (no `listen` or `controller_listen` given) are
    /// free when picked but may be taken before the JVM binds them (by an
    /// outgoing connection's ephemeral port, on a busy machine): a node that
    /// then exits with "Address already in use" is started again on new
    /// ports, up to [`BIND_ATTEMPTS`] times. Addresses the caller gave are
    /// never changed; a taken one is an error.
    pub async fn start(install: &KafkaInstall, opts: &LocalKafkaOptions) -> Result<LocalKafka> {
        let chosen_here = opts.listen.is_none() && opts.controller_listen.is_none();
        let mut attempt = 1;
        loop {
            match LocalKafka::start_once(install, opts).await {
                Err(LocalKafkaError::Exited { tail, .. })
                    if chosen_here
                        && attempt < BIND_ATTEMPTS
                        && tail.contains("Address already in use") =>
                {
                    tracing::warn!(
                        attempt,
                        "a port picked for Kafka was taken before it bound it; trying new ports"
                    );
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    async fn start_once(install: &KafkaInstall, opts: &LocalKafkaOptions) -> Result<LocalKafka> {
        let count = opts.nodes.max(1);
        let mut addrs = Vec::new();
        for i in 0..count {
            let (client, controller) = match (i, opts.listen, opts.controller_listen) {
                (0, Some(a), Some(c)) => (a, c),
                (0, Some(a), None) => (a, SocketAddr::new(a.ip(), a.port().wrapping_add(1))),
                (0, None, Some(c)) => (free_addr(&opts.dir)?, c),
                _ => (free_addr(&opts.dir)?, free_addr(&opts.dir)?),
            };
            for addr in [client, controller] {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Err(LocalKafkaError::InUse { addr });
                }
            }
            addrs.push((client, controller));
        }
        let voters = addrs
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = cluster_id(&opts.dir)?;
        let mut nodes = Vec::new();
        for (i, (client, controller)) in addrs.into_iter().enumerate() {
            let id = i as u32 + 1;
            let dir = if count == 1 {
                opts.dir.clone()
            } else {
                opts.dir.join(format!("node-{id}"))
            };
            let dir = std::path::absolute(&dir).map_err(io(&dir))?;
            std::fs::create_dir_all(&dir).map_err(io(&dir))?;
            let props = server_properties(id, count, client, controller, &voters, &dir, opts);
            let path = dir.join("server.properties");
            std::fs::write(&path, props).map_err(io(&path))?;
            let path = dir.join("log4j2.properties");
            std::fs::write(&path, LOG4J2).map_err(io(&path))?;
            nodes.push(Node {
                id,
                dir,
                client,
                child: None,
            });
        }
        let mut kafka = LocalKafka {
            install: install.clone(),
            nodes,
            max_heap: opts.max_heap.clone(),
        };
        for node in &kafka.nodes {
            kafka.format(node, &cluster_id).await?;
        }
        kafka
            .start_nodes(&(0..kafka.nodes.len()).collect::<Vec<_>>())
            .await?;
        Ok(kafka)
    }

    /// `kafka.tools.StorageTool format`, unless the node's storage is
    /// formatted already (it has `meta.properties`).
    async fn format(&self, node: &Node, cluster_id: &str) -> Result<()> {
        if node.dir.join("data/meta.properties").exists() {
            return Ok(());
        }
        let log = node.log();
        let out = append(&log)?;
        let err = out.try_clone().map_err(io(&log))?;
        let status = Command::new(&self.install.java)
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                node.dir.join("log4j2.properties").display()
            ))
            .args(["-Xmx256m", "-cp", &self.install.classpath()])
            .args(["kafka.tools.StorageTool", "format", "-t", cluster_id, "-c"])
            .arg(node.dir.join("server.properties"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .status()
            .await
            .map_err(|source| LocalKafkaError::Spawn {
                java: self.install.java.clone(),
                source,
            })?;
        if !status.success() {
            return Err(LocalKafkaError::Format {
                dir: node.dir.join("data"),
                status: status.to_string(),
                log,
            });
        }
        Ok(())
    }

    /// Starts the given nodes (indices) that are not running, all at once
    /// (a KRaft quorum needs a majority up before any serves), and waits
    /// until each has logged that it serves clients.
    async fn start_nodes(&mut self, which: &[usize]) -> Result<()> {
        let mut waiting = Vec::new();
        for &i in which {
            let Some(node) = self.nodes.get(i) else {
                continue;
            };
            if node.child.is_some() {
                continue;
            }
            let log = node.log();
            let from = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
            let out = append(&log)?;
            let err = out.try_clone().map_err(io(&log))?;
            let mut command = Command::new(&self.install.java);
            // A process group of its own: a Ctrl-C meant for `edgeloop up`
            // does not stop Kafka before the bridge has flushed into it (the
            // owner stops it last, with SIGTERM).
            #[cfg(unix)]
            command.process_group(0);
            let child = command
                .arg(format!("-Xmx{}", self.max_heap))
                .args(JVM_FLAGS)
                .arg(format!(
                    "-Dlog4j2.configurationFile={}",
                    node.dir.join("log4j2.properties").display()
                ))
                .arg(format!("-Dkafka.logs.dir={}", node.dir.display()))
                .args(["-cp", &self.install.classpath(), "kafka.Kafka"])
                .arg(node.dir.join("server.properties"))
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .kill_on_drop(true)
                .spawn()
                .map_err(|source| LocalKafkaError::Spawn {
                    java: self.install.java.clone(),
                    source,
                })?;
            waiting.push((i, from));
            if let Some(node) = self.nodes.get_mut(i) {
                node.child = Some(child);
            }
        }
        let waited = Duration::from_secs(120);
        let deadline = tokio::time::Instant::now() + waited;
        while !waiting.is_empty() {
            let mut still = Vec::new();
            for (i, from) in waiting {
                let Some(node) = self.nodes.get_mut(i) else {
                    continue;
                };
                let log = node.log();
                if let Some(child) = node.child.as_mut() {
                    if let Ok(Some(status)) = child.try_wait() {
                        node.child = None;
                        return Err(LocalKafkaError::Exited {
                            node: node.id,
                            status: status.to_string(),
                            tail: tail(&log, from),
                            log,
                        });
                    }
                }
                if !logged_since(&log, from, STARTED) {
                    still.push((i, from));
                }
            }
            waiting = still;
            if let Some(&(i, _)) = waiting.first() {
                if tokio::time::Instant::now() >= deadline {
                    let node = &self.nodes[i.min(self.nodes.len() - 1)];
                    return Err(LocalKafkaError::Timeout {
                        node: node.id,
                        waited,
                        log: node.log(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// Bootstrap servers: every node's client listener.
    pub fn bootstrap(&self) -> String {
        self.nodes
            .iter()
            .map(|n| n.client.to_string())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The first node's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.nodes.first().and_then(|n| n.child.as_ref()?.id())
    }

    /// Process ids of the running nodes, by node id.
    pub fn pids(&self) -> Vec<(u32, u32)> {
        self.nodes
            .iter()
            .filter_map(|n| Some((n.id, n.child.as_ref()?.id()?)))
            .collect()
    }

    /// Node ids (1, 2, …).
    pub fn node_ids(&self) -> Vec<u32> {
        self.nodes.iter().map(|n| n.id).collect()
    }

    /// Where node `id` logs.
    pub fn log(&self, id: u32) -> Option<PathBuf> {
        self.nodes.iter().find(|n| n.id == id).map(Node::log)
    }

    /// The node that leads `partition` of `topic` now, from the cluster's
    /// metadata (`None` if no node answers or the partition has no leader).
    pub fn leader(&self, topic: &str, partition: i32) -> Option<u32> {
        use rdkafka::consumer::{BaseConsumer, Consumer};
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create()
            .ok()?;
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()?;
        let leader = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)?
            .partitions()
            .iter()
            .find(|p| p.id() == partition)?
            .leader();
        u32::try_from(leader).ok()
    }

    /// Whether node `id` is running (it has not been stopped or killed, and
    /// has not exited by itself).
    pub fn running(&mut self, id: u32) -> bool {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .and_then(|n| n.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Stops every node (SIGTERM, SIGKILL after `grace`).
    pub async fn stop(mut self, grace: Duration) {
        self.stop_keeping_storage(grace).await;
    }

    /// Kills every node (SIGKILL, as a crash would) and keeps the storage so
    /// that [`LocalKafka::start_again`] brings the cluster back.
    pub async fn kill_keeping_storage(&mut self) {
        for id in self.node_ids() {
            self.kill_node(id).await;
        }
    }

    /// Kills node `id` (SIGKILL); [`LocalKafka::start_node`] restarts it.
    pub async fn kill_node(&mut self, id: u32) {
        if let Some(mut child) = self
            .nodes
            .iter_mut()
            .find(|n| n.id == id)
            .and_then(|n| n.child.take())
        {
            let _ = child.kill().await;
        }
    }

    /// Starts node `id` again if it is not running, and waits until it serves.
    pub async fn start_node(&mut self, id: u32) -> Result<()> {
        let which: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].id == id)
            .collect();
        self.reap();
        self.start_nodes(&which).await
    }

    /// Starts every node that is not running, with the storage it had.
    pub async fn start_again(&mut self) -> Result<()> {
        self.reap();
        self.start_nodes(&(0..self.nodes.len()).collect::<Vec<_>>())
            .await
    }

    /// Forgets the nodes that exited by themselves.
    fn reap(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                if !matches!(child.try_wait(), Ok(None)) {
                    node.child = None;
                }
            }
        }
    }

    /// Stops every node cleanly (SIGTERM to all, then waits up to `grace`
    /// for each, SIGKILL after) and keeps the storage for
    /// [`LocalKafka::start_again`].
    pub async fn stop_keeping_storage(&mut self, grace: Duration) {
        let mut children: Vec<Child> = self
            .nodes
            .iter_mut()
            .filter_map(|n| n.child.take())
            .collect();
        for child in &children {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        for child in &mut children {
            if tokio::time::timeout_at(deadline, child.wait())
                .await
                .is_err()
            {
                let _ = child.kill().await;
            }
        }
    }
}

/// G1 with short pauses, as `kafka-run-class.sh` starts a broker.
const JVM_FLAGS: &[&str] = &[
    "-Xms128m",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
];

/// Everything to standard output, which goes to the node's `kafka.log`;
/// request logging quiet, as Kafka's own `log4j2.yaml` has it.
const LOG4J2: &str = "\
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.controller.name = org.apache.kafka.controller
logger.controller.level = INFO
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = INFO
";

fn server_properties(
    id: u32,
    count: u32,
    client: SocketAddr,
    controller: SocketAddr,
    voters: &str,
    dir: &Path,
    opts: &LocalKafkaOptions,
) -> String {
    // Internal topics replicated like the data when there are several
    // nodes; writes need two of three in sync, and an out-of-sync replica
    // never becomes leader.
    let rf = count.min(3);
    let min_isr = if count >= 3 { 2 } else { 1 };
    let mut lines = vec![
        "# Written by edgeloop (edgeloop_kafka::local) at every start; edits are lost.".to_string(),
        "process.roles=broker,controller".into(),
        format!("node.id={id}"),
        format!("controller.quorum.voters={voters}"),
        format!("listeners=PLAINTEXT://{client},CONTROLLER://{controller}"),
        format!("advertised.listeners=PLAINTEXT://{client}"),
        "inter.broker.listener.name=PLAINTEXT".into(),
        "controller.listener.names=CONTROLLER".into(),
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".into(),
        format!("log.dirs={}", dir.join("data").display()),
        "num.partitions=1".into(),
        format!("default.replication.factor={rf}"),
        format!("min.insync.replicas={min_isr}"),
        "unclean.leader.election.enable=false".into(),
        format!("offsets.topic.replication.factor={rf}"),
        "offsets.topic.num.partitions=4".into(),
        format!("transaction.state.log.replication.factor={rf}"),
        format!("transaction.state.log.min.isr={min_isr}"),
        "transaction.state.log.num.partitions=4".into(),
        format!("share.coordinator.state.topic.replication.factor={rf}"),
        format!("share.coordinator.state.topic.min.isr={min_isr}"),
        "group.initial.rebalance.delay.ms=0".into(),
        // A small machine: fewer threads than a server's defaults.
        "num.network.threads=2".into(),
        "num.io.threads=4".into(),
        "log.cleaner.threads=1".into(),
        // The cleaner looks for work every 2 s (15 s by default): compacted
        // topics shrink soon after a segment closes.
        "log.cleaner.backoff.ms=2000".into(),
    ];
    lines.extend(opts.properties.iter().map(|(k, v)| format!("{k}={v}")));
    lines.push(String::new());
    lines.join("\n")
}

/// The cluster id of the storage under `dir` (kept in `DIR/cluster.id` so
/// every node of a cluster, and every restart, formats with the same one),
/// made on the first start: 16 random bytes in URL-safe base64, as Kafka's
/// `Uuid` prints them.
fn cluster_id(dir: &Path) -> Result<String> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let path = dir.join("cluster.id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if id.len() == 22 {
            return Ok(id.to_string());
        }
    }
    use base64::Engine as _;
    let id = loop {
        let mut bytes: [u8; 16] = rand::random();
        // Kafka reserves the ids whose first eight bytes are zero.
        bytes[0] |= 1;
        let id = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        // As Kafka's `Uuid.randomUuid`: an id that starts with `-` reads as
        // an option on the storage tool's command line.
        if !id.starts_with('-') {
            break id;
        }
    };
    std::fs::write(&path, &id).map_err(io(&path))?;
    Ok(id)
}

/// Starts of a cluster on ports it picked itself, at most, when one was
/// taken before Kafka bound it ([`LocalKafka::start`]).
pub const BIND_ATTEMPTS: u32 = 3;

fn free_addr(dir: &Path) -> Result<SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(io(dir))
}

fn append(path: &Path) -> Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .map_err(io(path))
}

/// Whether `path` holds `needle` after byte `from`.
fn logged_since(path: &Path, from: u64, needle: &str) -> bool {
    read_from(path, from).is_some_and(|text| text.contains(needle))
}

fn read_from(path: &Path, from: u64) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    file.seek(SeekFrom::Start(from)).ok()?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The last 20 lines written to `path` after byte `from`.
fn tail(path: &Path, from: u64) -> String {
    let text = read_from(path, from).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn java_versions_are_read_from_what_java_version_prints() {
        let cases = [
            ("openjdk version \"17.0.15\" 2025-04-15", Some(17)),
            ("openjdk version \"25\" 2025-09-16", Some(25)),
            ("java version \"1.8.0_392\"", Some(8)),
            ("openjdk version \"11.0.2-ea\"", Some(11)),
            ("no version here", None),
        ];
        for (text, major) in cases {
            assert_eq!(parse_java_major(text), major, "{text}");
        }
    }

    #[test]
    fn a_missing_install_names_the_folder_and_the_setup_script() {
        let dir = std::env::temp_dir().join("edgeloop-no-kafka-here");
        let path = std::env::var_os("PATH");
        let var = |k: &str| match k {
            "EDGELOOP_KAFKA_LIBS" => Some(dir.clone().into_os_string()),
            "PATH" => path.clone(),
            _ => None,
        };
        match KafkaInstall::locate(var) {
            Err(e @ LocalKafkaError::NotInstalled { .. }) => {
                let text = e.to_string();
                assert!(text.contains("scripts/setup.sh"), "{text}");
                assert!(text.contains("edgeloop-no-kafka-here"), "{text}");
            }
            // A machine without Java says so first.
            Err(LocalKafkaError::NoJava(_)) => {}
            other => panic!("expected NotInstalled, got {other:?}"),
        }
    }

    #[test]
    fn no_java_is_named_with_the_version_needed() {
        let var = |k: &str| (k == "PATH").then(|| OsString::from("/nonexistent"));
        let err = KafkaInstall::locate(var).err().map(|e| e.to_string());
        let text = err.unwrap_or_default();
        assert!(text.contains("Java 17 or newer"), "{text}");
        assert!(text.contains("no java is on PATH"), "{text}");
    }

    #[test]
    fn default_libs_dir_follows_xdg_cache_home_then_home() {
        let xdg = |k: &str| match k {
            "XDG_CACHE_HOME" => Some(OsString::from("/c")),
            "HOME" => Some(OsString::from("/h")),
            _ => None,
        };
        assert_eq!(
            default_libs_dir(xdg),
            Some(PathBuf::from("/c/edgeloop/kafka-4.4.0/libs"))
        );
        let home = |k: &str| (k == "HOME").then(|| OsString::from("/h"));
        assert_eq!(
            default_libs_dir(home),
            Some(PathBuf::from("/h/.cache/edgeloop/kafka-4.4.0/libs"))
        );
    }
}
