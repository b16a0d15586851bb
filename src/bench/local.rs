//! `edgeloop bench --local DIR`: the whole stack on this machine, each part
//! its own process so that its CPU and memory can be told apart: a
//! single-node Apache Kafka (KRaft), `edgeloop broker` (MQTT broker, gate and Kafka bridge;
//! one or several replicas) and `edgeloop processor`, on free loopback
//! ports, with their data and logs under DIR.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use edgeloop_kafka::local::{KafkaInstall, LocalKafka, LocalKafkaOptions};
use tokio::process::{Child, Command};

pub struct LocalStack {
    pub kafka: LocalKafka,
    /// The broker replicas, with their MQTT and metrics addresses.
    pub brokers: Vec<Child>,
    pub processor: Child,
    pub mqtt: Vec<SocketAddr>,
    pub broker_metrics: Vec<SocketAddr>,
    /// Replicas killed on purpose (`bench --kill-broker-after`): not a failure.
    pub killed: Vec<bool>,
    pub processor_metrics: SocketAddr,
    pub parquet_root: PathBuf,
    pub credentials: PathBuf,
}

/// Options of the local stack.
pub struct LocalOptions {
    pub dir: PathBuf,
    /// The Kafka JVM's maximum heap.
    pub kafka_heap: String,
    pub channels: Vec<String>,
    pub file_max_age: Duration,
    /// Whether the shipped labelling rules apply (they name the default
    /// simulator channels).
    pub rules: bool,
    /// Broker replicas.
    pub brokers: usize,
}

/// The name of broker replica `i` of `n`: its log file and its process in
/// the report (`broker` alone, `broker-0`, `broker-1`, … for several).
pub fn broker_name(i: usize, n: usize) -> String {
    if n == 1 {
        "broker".into()
    } else {
        format!("broker-{i}")
    }
}

fn free_addr() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?)
}

fn spawn(name: &str, args: &[String], dir: &Path) -> Result<Child> {
    let exe = std::env::current_exe().context("finding the edgeloop binary")?;
    let log = dir.join(format!("logs/{name}.log"));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    // EDGELOOP_BENCH_WRAP_{BROKER,PROCESSOR}: a profiler or `env VAR=…` to
    // start the part under (see `--local`); every broker replica's.
    let kind = name.split('-').next().unwrap_or(name);
    let wrap = std::env::var(format!("EDGELOOP_BENCH_WRAP_{}", kind.to_uppercase())).ok();
    let mut cmd = match wrap.as_deref().map(str::split_whitespace) {
        Some(mut words) => {
            let mut c = Command::new(words.next().unwrap_or("env"));
            c.args(words).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    cmd.args(args)
        .env("EDGELOOP_LOG", "info")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {} {name}", exe.display()))
}

impl LocalStack {
    pub async fn start(opts: &LocalOptions) -> Result<LocalStack> {
        let dir = std::path::absolute(&opts.dir)
            .with_context(|| format!("resolving {}", opts.dir.display()))?;
        for sub in ["kafka", "logs", "broker"] {
            std::fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let install = KafkaInstall::locate(|k| std::env::var_os(k))?;
        let kafka_opts = LocalKafkaOptions {
            max_heap: opts.kafka_heap.clone(),
            ..LocalKafkaOptions::single(&dir.join("kafka"))
        };
        let kafka = LocalKafka::start(&install, &kafka_opts)
            .await
            .context("starting Kafka")?;
        let bootstrap = kafka.bootstrap();
        eprintln!(
            "Apache Kafka (one KRaft node) on {bootstrap}, log in {}",
            dir.join("kafka/kafka.log").display()
        );

        let processor_metrics = free_addr()?;
        let credentials = dir.join("broker/credentials.toml");
        if !credentials.exists() {
            edgeloop_broker::gate::credentials::CredentialsFile::default().write(&credentials)?;
        }
        let s = |v: &str| v.to_string();
        let n = opts.brokers.max(1);
        let (mut brokers, mut mqtt, mut broker_metrics) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..n {
            let name = broker_name(i, n);
            let (listen, metrics) = (free_addr()?, free_addr()?);
            let mut broker = spawn(
                &name,
                &[
                    s("broker"),
                    s("--listen"),
                    listen.to_string(),
                    s("--kafka"),
                    bootstrap.clone(),
                    s("--credentials"),
                    credentials.display().to_string(),
                    s("--metrics-listen"),
                    metrics.to_string(),
                    s("--replica-id"),
                    format!("bench-{name}"),
                ],
                &dir,
            )?;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::net::TcpStream::connect(listen).await.is_err() {
                if let Some(status) = broker.try_wait()? {
                    bail!(
                        "{name} exited ({status}) during start-up; see {}",
                        dir.join(format!("logs/{name}.log")).display()
                    );
                }
                if tokio::time::Instant::now() > deadline {
                    bail!("{name}'s MQTT listener {listen} did not open within 60 s");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            eprintln!("MQTT broker {name} on {listen}, metrics on {metrics}");
            brokers.push(broker);
            mqtt.push(listen);
            broker_metrics.push(metrics);
        }

        let parquet_root = dir.join("parquet");
        let mut args = vec![
            s("processor"),
            s("--kafka"),
            bootstrap,
            s("--parquet-root"),
            parquet_root.display().to_string(),
            s("--group-id"),
            s("edgeloop-bench"),
            s("--instance-id"),
            s("edgeloop-bench-0"),
            s("--metrics-listen"),
            processor_metrics.to_string(),
            s("--max-age"),
            humantime::format_duration(opts.file_max_age).to_string(),
            s("--channels"),
            opts.channels.join(","),
        ];
        if opts.rules {
            let rules = dir.join("rules.toml");
            if !rules.exists() {
                std::fs::write(&rules, include_str!("../../config/rules.example.toml"))
                    .with_context(|| format!("writing {}", rules.display()))?;
            }
            args.extend([s("--rules"), rules.display().to_string()]);
        }
        let processor = spawn("processor", &args, &dir)?;
        eprintln!(
            "Stream processor writing Parquet under {}, metrics on {processor_metrics}",
            parquet_root.display()
        );
        Ok(LocalStack {
            kafka,
            killed: vec![false; brokers.len()],
            brokers,
            processor,
            mqtt,
            broker_metrics,
            processor_metrics,
            parquet_root,
            credentials,
        })
    }

    /// Fails if a broker replica or the processor has exited.
    pub fn check_running(&mut self) -> Result<()> {
        let n = self.brokers.len();
        for (i, broker) in self.brokers.iter_mut().enumerate() {
            if self.killed[i] {
                continue;
            }
            if let Some(status) = broker.try_wait()? {
                let name = broker_name(i, n);
                bail!("{name} exited ({status}); see its log under logs/{name}.log");
            }
        }
        if let Some(status) = self.processor.try_wait()? {
            bail!("the processor exited ({status}); see its log under logs/processor.log");
        }
        Ok(())
    }

    /// SIGKILL of broker replica `i`, which stays down.
    pub async fn kill_broker(&mut self, i: usize) {
        self.killed[i] = true;
        let _ = self.brokers[i].kill().await;
    }

    pub async fn stop(mut self) {
        for broker in &mut self.brokers {
            let _ = broker.kill().await;
        }
        let _ = self.processor.kill().await;
        self.kafka.stop(Duration::from_secs(30)).await;
    }
}
