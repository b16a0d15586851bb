//! The Kubernetes manifests in `k8s/`, checked offline:
//!
//! - every overlay renders with `kubectl kustomize` and the output validates
//!   with `kubernetes-validate` against a fixed Kubernetes version (schemas
//!   ship with the tool; `scripts/setup.sh` installs it);
//! - the dev overlay runs its own single-node KRaft Apache Kafka (a
//!   StatefulSet with a volume claim template, a headless and a client
//!   Service), and its broker and processor bootstrap from that Service;
//! - the prod overlay declares every Kafka topic of the code
//!   (`proto/src/topics.rs`) as a Strimzi `KafkaTopic` with the partitions
//!   and replication of its configs, `min.insync.replicas=2`, compacted where
//!   the code reads the topic as a table, and `docs/kubernetes.md` gives the
//!   same topics as `kafka-topics.sh` commands;
//! - the broker replicas: prod runs three or more with `RollingUpdate`, a
//!   PodDisruptionBudget and an HPA on CPU; dev replaces its one replica by a
//!   ready new one before the old stops;
//! - the manifests match the binary: the containers' environment variables
//!   are ones `edgeloop broker` / `edgeloop processor` read, the probes and
//!   the Prometheus annotations name the port the metrics endpoint listens
//!   on, and the real `edgeloop broker` and `edgeloop processor`, started
//!   with the containers' args and environment and the files of the rendered
//!   ConfigMaps and Secrets, answer the probes: `/healthz` 200 at once,
//!   `/readyz` 200 once Kafka answers, against an Apache Kafka that the
//!   test starts from the harness's jars (local addresses stand in for
//!   in-cluster ones): for dev, one node configured with the server
//!   properties the overlay's StatefulSet gives its image, each of which
//!   Kafka must take; for prod, three nodes with the topics its KafkaTopics
//!   declare.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_kafka::local::{LocalKafka, LocalKafkaOptions};
use edgeloop_tests::{free_addr, kafka_install, wait_for, Component};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against: kubectl's
/// (v1.32) on the development machine.
const KUBERNETES_VERSION: &str = "1.32.0";

const OVERLAYS: &[&str] = &["dev", "prod"];

/// Kinds `kubernetes-validate` has no schema for, which may be rendered:
/// the optional ServiceMonitor component (a Prometheus Operator CRD) and the
/// prod overlay's Strimzi `KafkaTopic`s (checked by
/// [`the_prod_overlay_declares_every_edgeloop_topic`] instead).
const KINDS_WITHOUT_SCHEMA: &[&str] = &["ServiceMonitor", "KafkaTopic"];

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s")
}

/// `kubectl` (`KUBECTL` if set, else on PATH); a missing one fails the test
/// with how to install it.
fn kubectl() -> Result<PathBuf> {
    find_kubectl(std::env::var_os("KUBECTL"), std::env::var_os("PATH"))
}

fn find_kubectl(
    explicit: Option<std::ffi::OsString>,
    path: Option<std::ffi::OsString>,
) -> Result<PathBuf> {
    if let Some(bin) = explicit {
        return Ok(PathBuf::from(bin));
    }
    path.iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("kubectl"))
        .find(|p| p.is_file())
        .context(
            "kubectl is not installed (needed to render k8s/ with its built-in kustomize): \
             install kubectl v1.32 (https://kubernetes.io/docs/tasks/tools/, e.g. \
             `curl -LO https://dl.k8s.io/release/v1.32.4/bin/linux/amd64/kubectl && \
             install -m 0755 kubectl /usr/local/bin/kubectl`) or set KUBECTL",
        )
}

/// `kubectl kustomize DIR`.
fn render(dir: &Path) -> Result<String> {
    let out = Command::new(kubectl()?)
        .arg("kustomize")
        .arg(dir)
        .output()
        .context("running kubectl kustomize")?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {} failed: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Validates rendered manifests with `kubernetes-validate --strict`; fails
/// with the tool's output. A missing schema is accepted only for
/// [`KINDS_WITHOUT_SCHEMA`].
fn validate(what: &str, yaml: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join(format!("{what}.yaml"));
    std::fs::write(&file, yaml)?;
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "--quiet", "-k"])
        .arg(KUBERNETES_VERSION)
        .arg(&file)
        .output()
        .context("running python3 -m kubernetes_validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        !text.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not installed: run scripts/setup.sh \
         (python3 -m pip install kubernetes-validate==1.37.0)"
    );
    ensure!(
        out.status.success(),
        "kubernetes-validate refused {what} (Kubernetes {KUBERNETES_VERSION}):\n{text}"
    );
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let allowed = line.contains("Couldn't find schema for kind")
            && KINDS_WITHOUT_SCHEMA
                .iter()
                .any(|k| line.contains(&format!("kind {k} ")));
        ensure!(
            allowed,
            "kubernetes-validate warned about {what} (Kubernetes {KUBERNETES_VERSION}): {line}"
        );
    }
    Ok(())
}

/// The documents of a YAML stream, through PyYAML (a dependency of
/// kubernetes-validate) as JSON.
fn parse(yaml: &str) -> Result<Vec<Value>> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d], sys.stdout)",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running python3 (PyYAML) to parse the rendered manifests")?;
    child
        .stdin
        .take()
        .context("python3's stdin")?
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "parsing the rendered YAML failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// A relative path from `from` to `to` (both absolute): kustomize refuses
/// absolute paths to bases and components.
fn relative(from: &Path, to: &Path) -> PathBuf {
    let up = from.components().count().saturating_sub(1);
    let mut path: PathBuf = std::iter::repeat_n("..", up).collect();
    path.push(to.strip_prefix("/").unwrap_or(to));
    path
}

#[test]
fn every_overlay_renders_and_passes_kubernetes_validate() -> Result<()> {
    for overlay in OVERLAYS {
        let yaml = render(&k8s_dir().join("overlays").join(overlay))?;
        validate(overlay, &yaml)?;
        let docs = parse(&yaml)?;
        let own = match *overlay {
            "dev" => "StatefulSet",
            _ => "KafkaTopic",
        };
        for kind in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "PersistentVolumeClaim",
            own,
        ] {
            ensure!(
                docs.iter().any(|d| d["kind"] == kind),
                "overlay {overlay} renders no {kind}"
            );
        }
    }
    // The optional ServiceMonitor component on top of the prod overlay.
    let dir = tempfile::tempdir()?;
    let k8s = k8s_dir();
    let kustomization = format!(
        "resources:\n  - {}\ncomponents:\n  - {}\n",
        relative(dir.path(), &k8s.join("overlays/prod")).display(),
        relative(dir.path(), &k8s.join("components/servicemonitor")).display()
    );
    std::fs::write(dir.path().join("kustomization.yaml"), kustomization)?;
    let yaml = render(dir.path())?;
    validate("prod-with-servicemonitor", &yaml)?;
    let docs = parse(&yaml)?;
    let monitor = docs
        .iter()
        .find(|d| d["kind"] == "ServiceMonitor")
        .context("the servicemonitor component renders no ServiceMonitor")?;
    let selector = &monitor["spec"]["selector"]["matchLabels"];
    let port = &monitor["spec"]["endpoints"][0]["port"];
    for name in ["edgeloop-broker-metrics", "edgeloop-processor-metrics"] {
        let service = find(&docs, "Service", name)?;
        let labels = &service["metadata"]["labels"];
        let matches = selector
            .as_object()
            .context("ServiceMonitor selector")?
            .iter()
            .all(|(k, v)| &labels[k] == v);
        ensure!(matches, "the ServiceMonitor does not select Service {name}");
        let ports = service["spec"]["ports"].as_array().context("ports")?;
        ensure!(
            ports.iter().any(|p| &p["name"] == port),
            "Service {name} has no port named {port}"
        );
    }
    Ok(())
}

#[test]
fn the_rules_configmap_is_the_example_rules_file() -> Result<()> {
    let example = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.example.toml"),
    )?;
    for overlay in OVERLAYS {
        let docs = parse(&render(&k8s_dir().join("overlays").join(overlay))?)?;
        let rules = docs
            .iter()
            .find(|d| {
                d["kind"] == "ConfigMap"
                    && d["metadata"]["name"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("edgeloop-rules"))
            })
            .context("no edgeloop-rules ConfigMap")?;
        ensure!(
            rules["data"]["rules.toml"].as_str() == Some(example.as_str()),
            "overlay {overlay}: the rules ConfigMap differs from config/rules.example.toml \
             (k8s/base/config/rules.toml is its copy)"
        );
    }
    Ok(())
}

#[test]
fn the_dev_overlay_configs_differ_from_the_base_only_in_replication_factor() -> Result<()> {
    let k8s = k8s_dir();
    let without_replication = |path: PathBuf| -> Result<String> {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        Ok(text
            .lines()
            .filter(|l| !l.starts_with("replication_factor"))
            .collect::<Vec<_>>()
            .join("\n"))
    };
    for file in ["broker.toml", "processor.toml"] {
        let base = without_replication(k8s.join("base/config").join(file))?;
        let dev = without_replication(k8s.join("overlays/dev").join(file))?;
        ensure!(
            base == dev,
            "k8s/overlays/dev/{file} differs from k8s/base/config/{file} in more than \
             replication_factor: keep them in step"
        );
    }
    Ok(())
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .with_context(|| format!("no {kind} {name} in the rendered manifests"))
}

fn str_of<'a>(v: &'a Value, what: &str) -> Result<&'a str> {
    v.as_str()
        .with_context(|| format!("{what} is not a string"))
}

/// The environment variables `edgeloop SUBCOMMAND` reads (`[env: …]` in its help).
fn env_vars_read_by(subcommand: &str) -> Result<Vec<String>> {
    let out = Command::new(edgeloop_bin())
        .args([subcommand, "--help"])
        .env_clear()
        .output()?;
    ensure!(out.status.success(), "edgeloop {subcommand} --help failed");
    let help = String::from_utf8(out.stdout)?;
    Ok(help
        .split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_string)
        .collect())
}

/// The number behind a container port given by number or by name.
fn container_port(container: &Value, port: &Value) -> Result<u16> {
    if let Some(n) = port.as_u64() {
        return Ok(u16::try_from(n)?);
    }
    let name = str_of(port, "port")?;
    let ports = container["ports"].as_array().context("container ports")?;
    let found = ports
        .iter()
        .find(|p| p["name"] == name)
        .with_context(|| format!("no container port named {name}"))?;
    Ok(u16::try_from(
        found["containerPort"].as_u64().context("containerPort")?,
    )?)
}

fn port_of(addr: &str) -> Result<u16> {
    Ok(addr.parse::<SocketAddr>()?.port())
}

/// One component of the rendered manifests, ready to start locally.
struct Pod {
    name: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    /// (path, port) of every probe, port mapped to the local address.
    probes: Vec<(String, String, SocketAddr)>,
    grace: Duration,
}

/// Checks the Deployment `name` against the binary and turns it into a
/// local process description: in-cluster addresses become local ones,
/// mounted ConfigMaps and Secrets become files under `root`.
fn pod(
    docs: &[Value],
    name: &str,
    subcommand: &str,
    metrics_env: &str,
    kafka: &str,
    root: &Path,
) -> Result<Pod> {
    let deployment = find(docs, "Deployment", name)?;
    let spec = &deployment["spec"]["template"]["spec"];
    let containers = spec["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1, "{name}: one container expected");
    let container = &containers[0];
    let args: Vec<String> = container["args"]
        .as_array()
        .context("container args")?
        .iter()
        .map(|a| str_of(a, "arg").map(str::to_string))
        .collect::<Result<_>>()?;
    ensure!(
        args.first().map(String::as_str) == Some(subcommand),
        "{name}: args {args:?} do not start with {subcommand}"
    );

    // Volumes: each mount's files, under root/<volume>.
    let mut mounts: Vec<(String, PathBuf)> = Vec::new();
    for mount in container["volumeMounts"].as_array().into_iter().flatten() {
        let volume_name = str_of(&mount["name"], "volumeMount name")?;
        let volume = spec["volumes"]
            .as_array()
            .context("volumes")?
            .iter()
            .find(|v| v["name"] == volume_name)
            .with_context(|| format!("{name}: no volume {volume_name}"))?;
        let local = root.join(name).join(volume_name);
        std::fs::create_dir_all(&local)?;
        if let Some(cm) = volume["configMap"]["name"].as_str() {
            let map = find(docs, "ConfigMap", cm)?;
            for (key, value) in map["data"].as_object().context("ConfigMap data")? {
                std::fs::write(local.join(key), str_of(value, key)?)?;
            }
        } else if let Some(secret) = volume["secret"]["secretName"].as_str() {
            let secret = find(docs, "Secret", secret)?;
            if secret["type"] == "kubernetes.io/tls" {
                // The committed key pair is a placeholder (never a real
                // secret); a self-signed one stands in for what the
                // operator puts there.
                let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
                std::fs::write(local.join("tls.crt"), cert.cert.pem())?;
                std::fs::write(local.join("tls.key"), cert.key_pair.serialize_pem())?;
            } else {
                for (key, value) in secret["data"].as_object().context("Secret data")? {
                    let bytes = base64_decode(str_of(value, key)?)?;
                    std::fs::write(local.join(key), bytes)?;
                }
            }
        } else {
            ensure!(
                volume.get("persistentVolumeClaim").is_some() || volume.get("emptyDir").is_some(),
                "{name}: volume {volume_name} of an unexpected kind"
            );
        }
        mounts.push((str_of(&mount["mountPath"], "mountPath")?.to_string(), local));
    }

    // Environment: only variables the binary reads; local addresses.
    let known = env_vars_read_by(subcommand)?;
    let mut ports: HashMap<u16, SocketAddr> = HashMap::new();
    let mut env = Vec::new();
    for var in container["env"].as_array().context("container env")? {
        let key = str_of(&var["name"], "env name")?;
        ensure!(
            known.iter().any(|k| k == key),
            "{name}: env {key} is not read by `edgeloop {subcommand}` (it reads {known:?})"
        );
        let value = if let Some(field) = var["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            ensure!(field == "metadata.name", "{name}: env {key} from {field}");
            format!("{name}-7d9f8b6c5-x2k4p")
        } else {
            str_of(&var["value"], key)?.to_string()
        };
        let value = if key == "EDGELOOP_KAFKA_BOOTSTRAP" {
            kafka.to_string()
        } else if let Some(port) = value.strip_prefix("0.0.0.0:") {
            let port: u16 = port.parse()?;
            let local = match ports.get(&port) {
                Some(a) => *a,
                None => free_addr()?,
            };
            ports.insert(port, local);
            local.to_string()
        } else if value.starts_with('/') {
            let (mount, local) = mounts
                .iter()
                .find(|(m, _)| value == *m || value.starts_with(&format!("{m}/")))
                .with_context(|| format!("{name}: env {key}={value} is not in a mounted volume"))?;
            let file = local.join(value[mount.len()..].trim_start_matches('/'));
            ensure!(
                file.exists(),
                "{name}: env {key}={value}: the volume mounted at {mount} has no such file"
            );
            file.to_string_lossy().into_owned()
        } else {
            value
        };
        env.push((key.to_string(), value));
    }

    // The metrics endpoint, the probes and the scrape annotation agree.
    let metrics = env
        .iter()
        .find(|(k, _)| k == metrics_env)
        .with_context(|| format!("{name}: {metrics_env} is not set: no /healthz, /readyz"))?;
    let metrics_port = ports
        .iter()
        .find(|(_, local)| local.to_string() == metrics.1)
        .map(|(p, _)| *p)
        .with_context(|| format!("{name}: {metrics_env} does not listen on 0.0.0.0"))?;
    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    ensure!(
        annotations["prometheus.io/scrape"] == "true"
            && annotations["prometheus.io/port"]
                .as_str()
                .and_then(|p| p.parse::<u16>().ok())
                == Some(metrics_port)
            && annotations["prometheus.io/path"] == "/metrics",
        "{name}: prometheus.io annotations {annotations} do not name port {metrics_port} /metrics"
    );
    let mut probes = Vec::new();
    for kind in ["livenessProbe", "readinessProbe", "startupProbe"] {
        let probe = &container[kind]["httpGet"];
        if probe.is_null() {
            ensure!(kind == "startupProbe", "{name}: no {kind}");
            continue;
        }
        let path = str_of(&probe["path"], "probe path")?;
        let port = container_port(container, &probe["port"])?;
        ensure!(
            port == metrics_port,
            "{name}: {kind} on port {port}, the metrics endpoint on {metrics_port}"
        );
        let want = if kind == "readinessProbe" {
            "/readyz"
        } else {
            "/healthz"
        };
        ensure!(path == want, "{name}: {kind} on {path}, expected {want}");
        let local = *ports.get(&port).context("probe port")?;
        probes.push((kind.to_string(), path.to_string(), local));
    }
    // Every 0.0.0.0 port the process listens on is a container port.
    for port in ports.keys() {
        let declared = container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|p| p["containerPort"].as_u64() == Some(u64::from(*port)));
        ensure!(declared, "{name}: listens on {port}, not a container port");
    }
    let grace = spec["terminationGracePeriodSeconds"].as_u64().unwrap_or(30);
    Ok(Pod {
        name: name.to_string(),
        args,
        env,
        probes,
        grace: Duration::from_secs(grace),
    })
}

/// The value of the environment variable `key` of `container`, if it has a
/// plain `value`.
fn env_of<'a>(container: &'a Value, key: &str) -> Option<&'a str> {
    container["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == key)?["value"]
        .as_str()
}

/// The TOML file `file` of the rendered ConfigMap whose name starts with
/// `prefix` (kustomize appends a hash).
fn config_toml(docs: &[Value], prefix: &str, file: &str) -> Result<toml::Value> {
    let map = docs
        .iter()
        .find(|d| {
            d["kind"] == "ConfigMap"
                && d["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with(prefix))
        })
        .with_context(|| format!("no ConfigMap {prefix}"))?;
    let text = str_of(&map["data"][file], file)?;
    toml::from_str(text).with_context(|| format!("ConfigMap {prefix}: {file}"))
}

/// `[kafka] key` of the broker's and the processor's rendered configs,
/// which must agree.
fn kafka_setting(docs: &[Value], key: &str) -> Result<i64> {
    let mut values = Vec::new();
    for (map, file) in [
        ("edgeloop-broker-config", "broker.toml"),
        ("edgeloop-processor-config", "processor.toml"),
    ] {
        let config = config_toml(docs, map, file)?;
        let value = config
            .get("kafka")
            .and_then(|k| k.get(key))
            .and_then(toml::Value::as_integer)
            .with_context(|| format!("{file}: no kafka.{key}"))?;
        values.push(value);
    }
    ensure!(
        values.windows(2).all(|w| w[0] == w[1]),
        "broker.toml and processor.toml disagree on kafka.{key}: {values:?}"
    );
    Ok(values[0])
}

/// Bytes of a JVM size such as `768m`, `1g`, `1048576k`.
fn jvm_bytes(size: &str) -> Result<u64> {
    let (digits, unit) = size.split_at(size.trim_end_matches(char::is_alphabetic).len());
    let n: u64 = digits.parse().with_context(|| format!("JVM size {size}"))?;
    let scale = match unit.to_ascii_lowercase().as_str() {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => bail!("JVM size {size}: unknown unit {unit}"),
    };
    Ok(n * scale)
}

/// Bytes of a Kubernetes memory quantity in binary units (`1536Mi`, `2Gi`).
fn memory_bytes(quantity: &str) -> Result<u64> {
    for (suffix, scale) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = quantity.strip_suffix(suffix) {
            return Ok(n.parse::<u64>()? * scale);
        }
    }
    bail!("memory quantity {quantity}: use Ki, Mi or Gi")
}

/// A `NAME://host:port` listener list as (name, host, port).
fn listeners(list: &str) -> Result<Vec<(String, String, u16)>> {
    list.split(',')
        .map(|l| {
            let (name, addr) = l
                .split_once("://")
                .with_context(|| format!("listener {l}: no NAME://"))?;
            let (host, port) = addr
                .rsplit_once(':')
                .with_context(|| format!("listener {l}: no port"))?;
            Ok((name.to_string(), host.to_string(), port.parse()?))
        })
        .collect()
}

/// The rendered Service that `host` (`svc`, `svc.namespace`, or
/// `svc.namespace.svc[.cluster.local]`) names from a pod in `namespace`.
fn service_named_by<'a>(docs: &'a [Value], host: &str, namespace: &str) -> Result<&'a Value> {
    let mut labels = host.split('.');
    let name = labels.next().context("empty host")?;
    let ns = labels.next().unwrap_or(namespace);
    docs.iter()
        .find(|d| {
            d["kind"] == "Service"
                && d["metadata"]["name"] == name
                && d["metadata"]["namespace"] == ns
        })
        .with_context(|| format!("{host}: no Service {name} in namespace {ns} in the manifests"))
}

/// Whether the Service's selector selects pods labelled `labels`.
fn selects(service: &Value, labels: &Value) -> bool {
    service["spec"]["selector"]
        .as_object()
        .is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| &labels[k] == v))
}

/// How many pods `value` (an int or a percentage of `replicas`, rounded up as
/// Kubernetes rounds maxUnavailable and maxSurge for a rolling update)
/// stands for.
fn pods_of(value: &Value, replicas: u64) -> Result<u64> {
    if let Some(n) = value.as_u64() {
        return Ok(n);
    }
    let percent: u64 = str_of(value, "int or percentage")?
        .strip_suffix('%')
        .context("a percentage ends with %")?
        .parse()?;
    Ok((replicas * percent).div_ceil(100))
}

/// The broker replicas (issue 22): prod runs three or more, replaced one at a
/// time, kept two-of-three through a drain, scaled on CPU, named by pod, and
/// reached through one Service; dev's single replica is replaced by a ready
/// new one before the old stops.
#[test]
fn each_overlay_runs_broker_replicas_that_update_and_drain_one_at_a_time() -> Result<()> {
    for overlay in OVERLAYS {
        let docs = parse(&render(&k8s_dir().join("overlays").join(overlay))?)?;
        let deployment = find(&docs, "Deployment", "edgeloop-broker")?;
        let spec = &deployment["spec"];
        let replicas = spec["replicas"].as_u64().unwrap_or(1);
        let strategy = &spec["strategy"];
        ensure!(
            strategy["type"] == "RollingUpdate",
            "{overlay}: the broker is replaced with {}, not RollingUpdate",
            strategy["type"]
        );
        let unavailable = pods_of(&strategy["rollingUpdate"]["maxUnavailable"], replicas)?;
        let surge = pods_of(&strategy["rollingUpdate"]["maxSurge"], replicas)?;
        let pod_labels = &spec["template"]["metadata"]["labels"];
        let container = &spec["template"]["spec"]["containers"][0];
        let replica_id = container["env"]
            .as_array()
            .context("broker env")?
            .iter()
            .find(|e| e["name"] == "EDGELOOP_BROKER_REPLICA_ID")
            .with_context(|| format!("{overlay}: the broker's replica_id is not set"))?;
        ensure!(
            replica_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name",
            "{overlay}: EDGELOOP_BROKER_REPLICA_ID must be the pod's name: {replica_id}"
        );
        ensure!(
            container["readinessProbe"]["httpGet"]["path"] == "/readyz",
            "{overlay}: the broker's readiness is not /readyz"
        );
        ensure!(
            selects(find(&docs, "Service", "edgeloop-broker")?, pod_labels),
            "{overlay}: Service edgeloop-broker does not select the broker pods"
        );
        let budget = find(&docs, "PodDisruptionBudget", "edgeloop-broker")?;
        let budget_labels = &budget["spec"]["selector"]["matchLabels"];
        ensure!(
            budget_labels
                .as_object()
                .is_some_and(|l| !l.is_empty() && l.iter().all(|(k, v)| &pod_labels[k] == v)),
            "{overlay}: the broker's PodDisruptionBudget does not select its pods"
        );
        let evictable = match budget["spec"].get("maxUnavailable") {
            Some(max) => pods_of(max, replicas)?,
            None => replicas.saturating_sub(pods_of(&budget["spec"]["minAvailable"], replicas)?),
        };
        match *overlay {
            "dev" => ensure!(
                replicas == 1 && unavailable == 0 && surge == 1 && evictable == 1,
                "dev: one broker, replaced by a ready new one before the old stops (maxSurge 1, \
                 maxUnavailable 0), a drain not blocked: replicas {replicas}, maxSurge {surge}, \
                 maxUnavailable {unavailable}, evictable {evictable}"
            ),
            _ => {
                ensure!(
                    replicas >= 3 && unavailable == 1 && surge >= 1 && evictable == 1,
                    "{overlay}: three or more brokers, one at a time unavailable in an update and \
                     in a drain: replicas {replicas}, maxSurge {surge}, maxUnavailable \
                     {unavailable}, evictable {evictable}"
                );
                let hpa = find(&docs, "HorizontalPodAutoscaler", "edgeloop-broker")?;
                let target = &hpa["spec"]["scaleTargetRef"];
                ensure!(
                    target["kind"] == "Deployment" && target["name"] == "edgeloop-broker",
                    "{overlay}: the HPA scales {target}, not the broker Deployment"
                );
                let min = hpa["spec"]["minReplicas"].as_u64().unwrap_or(1);
                let max = hpa["spec"]["maxReplicas"].as_u64().unwrap_or(0);
                ensure!(
                    min >= 3 && min == replicas && max > min,
                    "{overlay}: the HPA's range {min}..={max} must start at the Deployment's \
                     {replicas} replicas (at least three) and allow more"
                );
                let on_cpu = hpa["spec"]["metrics"].as_array().is_some_and(|m| {
                    m.iter()
                        .any(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu")
                });
                ensure!(on_cpu, "{overlay}: the broker's HPA does not scale on CPU");
                ensure!(
                    !container["resources"]["requests"]["cpu"].is_null(),
                    "{overlay}: an HPA on CPU utilisation needs the broker's CPU request"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn the_dev_overlay_runs_a_single_node_kraft_kafka_statefulset() -> Result<()> {
    let docs = parse(&render(&k8s_dir().join("overlays/dev"))?)?;
    let sets: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "StatefulSet").collect();
    ensure!(
        sets.len() == 1,
        "dev: one StatefulSet (Kafka) expected, found {}",
        sets.len()
    );
    let kafka = sets[0];
    let name = str_of(&kafka["metadata"]["name"], "StatefulSet name")?;
    let namespace = str_of(&kafka["metadata"]["namespace"], "StatefulSet namespace")?;
    let spec = &kafka["spec"];
    ensure!(
        spec["replicas"].as_u64() == Some(1),
        "dev: the Kafka StatefulSet must have one replica (its topics have one)"
    );
    let pod = &spec["template"]["spec"];
    let containers = pod["containers"].as_array().context("containers")?;
    ensure!(containers.len() == 1, "dev Kafka: one container expected");
    let container = &containers[0];
    // The release the harness and `edgeloop up` run (kafka/pom.xml).
    let image = format!("apache/kafka:{}", edgeloop_kafka::local::KAFKA_VERSION);
    ensure!(
        container["image"] == image.as_str(),
        "dev Kafka: image {}, expected {image}",
        container["image"]
    );
    // Every KAFKA_* variable becomes a server property in the image,
    // including those Kubernetes adds for the Service named kafka.
    ensure!(
        pod["enableServiceLinks"] == false,
        "dev Kafka: enableServiceLinks must be false (Kubernetes would add KAFKA_PORT, \
         KAFKA_SERVICE_HOST... which the image turns into server properties)"
    );
    let env =
        |key: &str| env_of(container, key).with_context(|| format!("dev Kafka: {key} not set"));

    // KRaft, one node that is broker and controller.
    let mut roles: Vec<&str> = env("KAFKA_PROCESS_ROLES")?.split(',').collect();
    roles.sort_unstable();
    ensure!(
        roles == ["broker", "controller"],
        "dev Kafka: KAFKA_PROCESS_ROLES {roles:?}"
    );
    let node_id = env("KAFKA_NODE_ID")?;
    let voters = env("KAFKA_CONTROLLER_QUORUM_VOTERS")?;
    ensure!(
        !voters.contains(',') && voters.split('@').next() == Some(node_id),
        "dev Kafka: the quorum {voters} must be this node alone (KAFKA_NODE_ID {node_id})"
    );
    let cluster_id = env("CLUSTER_ID")?;
    ensure!(
        cluster_id.len() == 22
            && cluster_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
        "dev Kafka: CLUSTER_ID {cluster_id} is not a Kafka Uuid (22 characters of URL-safe base64)"
    );

    // Listeners: named in the protocol map; the controller listener is the
    // voters' port; the broker advertises the pod's name under the headless
    // Service on its client port.
    let listen = listeners(env("KAFKA_LISTENERS")?)?;
    let protocols = env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP")?;
    for (listener, _, _) in &listen {
        ensure!(
            protocols
                .split(',')
                .any(|p| p.split(':').next() == Some(listener.as_str())),
            "dev Kafka: listener {listener} is not in KAFKA_LISTENER_SECURITY_PROTOCOL_MAP {protocols}"
        );
    }
    let controller_name = env("KAFKA_CONTROLLER_LISTENER_NAMES")?;
    let controller = listen
        .iter()
        .find(|(n, _, _)| n == controller_name)
        .with_context(|| format!("dev Kafka: no listener {controller_name}"))?;
    ensure!(
        voters.ends_with(&format!(":{}", controller.2)),
        "dev Kafka: the quorum {voters} is not on the controller listener's port {}",
        controller.2
    );
    let advertised = listeners(env("KAFKA_ADVERTISED_LISTENERS")?)?;
    ensure!(
        advertised.len() == 1,
        "dev Kafka: one advertised listener expected"
    );
    let (client_name, client_host, client_port) = &advertised[0];
    ensure!(
        listen
            .iter()
            .any(|(n, _, p)| n == client_name && p == client_port),
        "dev Kafka: advertised {client_name} on {client_port}, not a listener"
    );
    let headless_name = str_of(&spec["serviceName"], "StatefulSet serviceName")?;
    ensure!(
        *client_host == format!("$(POD_NAME).{headless_name}.$(POD_NAMESPACE).svc"),
        "dev Kafka: advertises {client_host}, not the pod's name under {headless_name}"
    );
    let vars: Vec<&str> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    let position = |k: &str| vars.iter().position(|v| *v == k);
    for (var, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let defined = container["env"]
            .as_array()
            .context("env")?
            .iter()
            .any(|e| e["name"] == var && e["valueFrom"]["fieldRef"]["fieldPath"] == field);
        ensure!(
            defined && position(var) < position("KAFKA_ADVERTISED_LISTENERS"),
            "dev Kafka: {var} must come from {field} before KAFKA_ADVERTISED_LISTENERS uses it"
        );
    }
    let client_port_name = container["ports"]
        .as_array()
        .context("container ports")?
        .iter()
        .find(|p| p["containerPort"].as_u64() == Some(u64::from(*client_port)))
        .with_context(|| format!("dev Kafka: {client_port} is not a container port"))?["name"]
        .clone();

    // The headless Service gives the pod its name, also before it is ready.
    let labels = &spec["template"]["metadata"]["labels"];
    let headless = find(&docs, "Service", headless_name)?;
    ensure!(
        headless["spec"]["clusterIP"] == "None"
            && headless["spec"]["publishNotReadyAddresses"] == true
            && selects(headless, labels),
        "dev Kafka: Service {headless_name} must be headless, publish not-ready addresses \
         and select the Kafka pod"
    );

    // Storage: a volume claim template mounted where the log dirs are.
    let templates = spec["volumeClaimTemplates"]
        .as_array()
        .context("dev Kafka: no volumeClaimTemplates")?;
    ensure!(
        templates.len() == 1,
        "dev Kafka: one volume claim template expected"
    );
    let claim = &templates[0];
    let claim_name = str_of(&claim["metadata"]["name"], "claim name")?;
    ensure!(
        claim["spec"]["accessModes"] == serde_json::json!(["ReadWriteOnce"])
            && claim["spec"]["resources"]["requests"]["storage"].is_string(),
        "dev Kafka: the claim {claim_name} needs ReadWriteOnce and a storage request"
    );
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == claim_name)
        .with_context(|| format!("dev Kafka: the claim {claim_name} is not mounted"))?;
    let mount_path = str_of(&mount["mountPath"], "mountPath")?;
    for dir in env("KAFKA_LOG_DIRS")?.split(',') {
        ensure!(
            dir.starts_with(&format!("{}/", mount_path.trim_end_matches('/'))),
            "dev Kafka: log dir {dir} is not in a directory of the volume at {mount_path} \
             (the volume's root may hold lost+found)"
        );
    }

    // One node: internal topics with one replica.
    for (key, want) in [
        ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1"),
        ("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1"),
        ("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1"),
    ] {
        ensure!(env(key)? == want, "dev Kafka: {key} must be {want}");
    }
    ensure!(
        kafka_setting(&docs, "replication_factor")? == 1,
        "dev: edgeloop's topics must have one replica on a one-node Kafka"
    );

    // A laptop: heap at most 1 GiB, under the memory limit.
    let heap = env("KAFKA_HEAP_OPTS")?;
    let xmx = heap
        .split_whitespace()
        .find_map(|o| o.strip_prefix("-Xmx"))
        .with_context(|| format!("dev Kafka: KAFKA_HEAP_OPTS {heap} sets no -Xmx"))?;
    let xmx = jvm_bytes(xmx)?;
    ensure!(
        xmx <= 1 << 30,
        "dev Kafka: heap {xmx} bytes, more than 1 GiB"
    );
    let limit = memory_bytes(str_of(
        &container["resources"]["limits"]["memory"],
        "dev Kafka memory limit",
    )?)?;
    ensure!(
        limit >= xmx + (256 << 20),
        "dev Kafka: a memory limit of {limit} bytes leaves no room beside a {xmx}-byte heap"
    );
    ensure!(
        container["resources"]["requests"]["cpu"].is_string()
            && container["resources"]["requests"]["memory"].is_string(),
        "dev Kafka: no resource requests"
    );

    // Probes on the client listener.
    for kind in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let port = &container[kind]["tcpSocket"]["port"];
        ensure!(
            *port == client_port_name || port.as_u64() == Some(u64::from(*client_port)),
            "dev Kafka: {kind} must check the client listener ({client_port})"
        );
    }

    // The broker and the processor bootstrap from the client Service, which
    // selects the Kafka pod and targets its client listener.
    for deployment in ["edgeloop-broker", "edgeloop-processor"] {
        let container =
            &find(&docs, "Deployment", deployment)?["spec"]["template"]["spec"]["containers"][0];
        let bootstrap = env_of(container, "EDGELOOP_KAFKA_BOOTSTRAP")
            .with_context(|| format!("{deployment}: EDGELOOP_KAFKA_BOOTSTRAP not set"))?;
        let (host, port) = bootstrap
            .rsplit_once(':')
            .with_context(|| format!("{deployment}: bootstrap {bootstrap} has no port"))?;
        let service = service_named_by(&docs, host, namespace)?;
        ensure!(
            selects(service, labels),
            "{deployment}: bootstrap {bootstrap}: its Service does not select the pods of {name}"
        );
        let port: u16 = port.parse()?;
        let service_port = service["spec"]["ports"]
            .as_array()
            .context("Service ports")?
            .iter()
            .find(|p| p["port"].as_u64() == Some(u64::from(port)))
            .with_context(|| {
                format!("{deployment}: bootstrap {bootstrap}: no such Service port")
            })?;
        let target = container_port(
            &spec["template"]["spec"]["containers"][0],
            &service_port["targetPort"],
        )?;
        ensure!(
            target == *client_port,
            "{deployment}: bootstrap {bootstrap} reaches Kafka's port {target}, not its client \
             listener {client_port}"
        );
    }
    Ok(())
}

/// Every Kafka topic constant of `proto/src/topics.rs` with whether it is
/// compacted, from the `cleanup` column of that file's topic table; the
/// names are checked against the compiled constants.
fn edgeloop_topics() -> Result<Vec<(String, bool)>> {
    use edgeloop_proto::topics;
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/src/topics.rs");
    let source = std::fs::read_to_string(&path)?;
    let mut found = Vec::new();
    for line in source.lines() {
        let Some(rest) = line.strip_prefix("pub const KAFKA_") else {
            continue;
        };
        let name = rest
            .split('"')
            .nth(1)
            .with_context(|| format!("topics.rs: {line}"))?;
        let row = source
            .lines()
            .find(|l| l.starts_with(&format!("//! | `{name}` |")))
            .with_context(|| format!("topics.rs: {name} is not in the module's topic table"))?;
        let cleanup = row
            .trim_end_matches('|')
            .rsplit('|')
            .next()
            .map(str::trim)
            .with_context(|| format!("topics.rs: {row}"))?;
        ensure!(
            cleanup == "compact" || cleanup == "delete",
            "topics.rs: {name}: cleanup {cleanup:?}"
        );
        found.push((name.to_string(), cleanup == "compact"));
    }
    let mut names: Vec<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut compiled = [
        topics::KAFKA_READINGS,
        topics::KAFKA_STATUS,
        topics::KAFKA_MODELS,
        topics::KAFKA_PINS,
        topics::KAFKA_ACKS,
        topics::KAFKA_SESSIONS,
        topics::KAFKA_DEADLETTER,
    ];
    compiled.sort_unstable();
    ensure!(
        names == compiled,
        "topics.rs declares {names:?}, the compiled constants are {compiled:?}"
    );
    Ok(found)
}

/// The `kafka-topics.sh ... --create` commands of `docs/kubernetes.md`,
/// continuation lines joined, as their words.
fn documented_topic_commands() -> Result<Vec<Vec<String>>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/kubernetes.md");
    let text = std::fs::read_to_string(&path)?;
    Ok(text
        .replace("\\\n", " ")
        .lines()
        .filter(|l| l.contains("kafka-topics.sh") && l.contains("--create"))
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect())
}

#[test]
fn the_prod_overlay_declares_every_edgeloop_topic() -> Result<()> {
    let docs = parse(&render(&k8s_dir().join("overlays/prod"))?)?;
    let partitions = kafka_setting(&docs, "partitions")?;
    let replication = kafka_setting(&docs, "replication_factor")?;
    ensure!(
        replication == 3,
        "prod: edgeloop's topics should have three replicas, not {replication}"
    );
    // Strimzi's bootstrap Service is <cluster>-kafka-bootstrap in the
    // cluster's namespace, where its Topic Operator watches KafkaTopics.
    let processor = &find(&docs, "Deployment", "edgeloop-processor")?["spec"]["template"]["spec"]
        ["containers"][0];
    let bootstrap = env_of(processor, "EDGELOOP_KAFKA_BOOTSTRAP")
        .context("prod processor: EDGELOOP_KAFKA_BOOTSTRAP not set")?;
    let host = bootstrap.split([',', ':']).next().unwrap_or_default();
    let mut labels = host.split('.');
    let cluster = labels
        .next()
        .and_then(|s| s.strip_suffix("-kafka-bootstrap"))
        .with_context(|| {
            format!("prod: bootstrap {bootstrap} is not a Strimzi bootstrap Service")
        })?;
    let kafka_namespace = labels
        .next()
        .with_context(|| format!("prod: bootstrap {bootstrap} names no namespace"))?;

    let declared: Vec<&Value> = docs.iter().filter(|d| d["kind"] == "KafkaTopic").collect();
    let topics = edgeloop_topics()?;
    for topic in &declared {
        let name = topic["spec"]["topicName"]
            .as_str()
            .or(topic["metadata"]["name"].as_str())
            .context("KafkaTopic without a name")?;
        ensure!(
            topics.iter().any(|(t, _)| t == name),
            "prod: KafkaTopic {name} is not a topic of proto/src/topics.rs"
        );
    }
    let commands = documented_topic_commands()?;
    for (name, compacted) in &topics {
        let of_topic: Vec<&&Value> = declared
            .iter()
            .filter(|t| t["spec"]["topicName"] == name.as_str())
            .collect();
        ensure!(
            of_topic.len() == 1,
            "prod: {} KafkaTopics for {name} (spec.topicName), one expected",
            of_topic.len()
        );
        let topic = of_topic[0];
        ensure!(
            topic["apiVersion"] == "kafka.strimzi.io/v1beta2",
            "prod: KafkaTopic {name}: apiVersion {}",
            topic["apiVersion"]
        );
        ensure!(
            topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
                && topic["metadata"]["namespace"] == kafka_namespace,
            "prod: KafkaTopic {name} is for cluster {} in namespace {}, but the bootstrap \
             {bootstrap} is Strimzi cluster {cluster} in {kafka_namespace}",
            topic["metadata"]["labels"]["strimzi.io/cluster"],
            topic["metadata"]["namespace"]
        );
        let spec = &topic["spec"];
        ensure!(
            spec["partitions"].as_i64() == Some(partitions)
                && spec["replicas"].as_i64() == Some(replication),
            "prod: KafkaTopic {name}: {} partitions and {} replicas, the configs say {partitions} \
             and {replication}",
            spec["partitions"],
            spec["replicas"]
        );
        let config = &spec["config"];
        let setting = |key: &str| match &config[key] {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        ensure!(
            setting("min.insync.replicas").as_deref() == Some("2"),
            "prod: KafkaTopic {name}: min.insync.replicas must be 2"
        );
        let policy = setting("cleanup.policy").unwrap_or_else(|| "delete".into());
        ensure!(
            policy.contains("compact") == *compacted,
            "prod: KafkaTopic {name}: cleanup.policy {policy}, but topics.rs says {}",
            if *compacted { "compact" } else { "delete" }
        );
        // A compacted topic really compacts: the settings edgeloop gives the
        // compacted topics it creates (kafka.compacted_topic_config).
        let compaction = edgeloop_kafka::default_compacted_topic_config();
        if *compacted {
            for (key, value) in &compaction {
                ensure!(
                    setting(key).as_deref() == Some(value.as_str()),
                    "prod: KafkaTopic {name}: {key} must be {value} (kafka.compacted_topic_config), \
                     not {:?}",
                    setting(key)
                );
            }
        }

        // The same topic as a kafka-topics.sh command in docs/kubernetes.md.
        let command = commands
            .iter()
            .find(|c| c.windows(2).any(|w| w[0] == "--topic" && w[1] == *name))
            .with_context(|| {
                format!("docs/kubernetes.md: no `kafka-topics.sh --create --topic {name}` command")
            })?;
        let arg = |flag: &str| {
            command
                .windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].as_str())
                .collect::<Vec<_>>()
        };
        ensure!(
            arg("--partitions") == [partitions.to_string()]
                && arg("--replication-factor") == [replication.to_string()],
            "docs/kubernetes.md: the command for {name} must create {partitions} partitions and \
             {replication} replicas: {}",
            command.join(" ")
        );
        let configs = arg("--config");
        if *compacted {
            for (key, value) in &compaction {
                let want = format!("{key}={value}");
                ensure!(
                    configs.contains(&want.as_str()),
                    "docs/kubernetes.md: the command for {name} must set {want}: {}",
                    command.join(" ")
                );
            }
        }
        ensure!(
            configs.contains(&"min.insync.replicas=2")
                && configs.contains(&"cleanup.policy=compact") == *compacted,
            "docs/kubernetes.md: the command for {name} must set min.insync.replicas=2{}: {}",
            if *compacted {
                " and cleanup.policy=compact"
            } else {
                ", and not compact it"
            },
            command.join(" ")
        );
    }
    ensure!(
        commands.len() == topics.len(),
        "docs/kubernetes.md has {} kafka-topics.sh --create commands for {} topics",
        commands.len(),
        topics.len()
    );
    Ok(())
}

#[test]
fn nothing_in_the_kubernetes_files_mentions_the_old_kafka_stand_in() -> Result<()> {
    // Spelled in two halves so that this file does not match itself.
    let needle = format!("{}{}", "tan", "su");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = vec![
        root.join("docs/kubernetes.md"),
        root.join("tests/tests/k8s.rs"),
    ];
    let mut dirs = vec![k8s_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(path);
            }
        }
    }
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
        if let Some((n, line)) = text
            .lines()
            .enumerate()
            .find(|(_, l)| l.to_lowercase().contains(&needle))
        {
            bail!("{}:{}: {line}", file.display(), n + 1);
        }
    }
    for overlay in OVERLAYS {
        let yaml = render(&k8s_dir().join("overlays").join(overlay))?;
        ensure!(
            !yaml.to_lowercase().contains(&needle),
            "the rendered {overlay} overlay mentions {needle}"
        );
    }
    Ok(())
}

fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, base64; sys.stdout.buffer.write(base64.b64decode(sys.argv[1]))",
            s,
        ])
        .output()?;
    ensure!(out.status.success(), "base64 decoding failed");
    Ok(out.stdout)
}

/// The status code of a plain HTTP GET, or `None` if nothing answered.
async fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.ok()?;
    socket
        .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

/// The control API Service targets the port the processor's
/// EDGELOOP_CONTROL_LISTEN serves, and the processor answers a gRPC call
/// there with the token from the mounted Secret.
async fn check_control_api(docs: &[Value], processor: &Pod) -> Result<()> {
    use edgeloop_processor::control::pb;
    let container = &find(docs, "Deployment", "edgeloop-processor")?["spec"]["template"]["spec"]
        ["containers"][0];
    let service = find(docs, "Service", "edgeloop-processor-control")?;
    let target = container_port(container, &service["spec"]["ports"][0]["targetPort"])?;
    let listen = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .find(|e| e["name"] == "EDGELOOP_CONTROL_LISTEN")
        .context("processor: EDGELOOP_CONTROL_LISTEN not set")?;
    ensure!(
        port_of(str_of(&listen["value"], "EDGELOOP_CONTROL_LISTEN")?)? == target,
        "Service edgeloop-processor-control targets {target}, but EDGELOOP_CONTROL_LISTEN is {}",
        listen["value"]
    );
    let env = |key: &str| {
        processor
            .env
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .with_context(|| format!("processor: {key} not set"))
    };
    let token = std::fs::read_to_string(env("EDGELOOP_CONTROL_TOKEN_FILE")?)?;
    let header: tonic::metadata::MetadataValue<_> = format!("Bearer {}", token.trim()).parse()?;
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        env("EDGELOOP_CONTROL_LISTEN")?
    ))?
    .connect()
    .await?;
    let mut health = pb::health_client::HealthClient::with_interceptor(
        channel,
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", header.clone());
            Ok(r)
        },
    );
    health.get_health(pb::GetHealthRequest {}).await?;
    Ok(())
}

async fn start_and_probe(pod: &Pod, dir: &Path) -> Result<Component> {
    let args: Vec<&str> = pod.args.iter().map(String::as_str).collect();
    let mut component =
        Component::start_with_env(&edgeloop_bin(), &pod.name, &args, &pod.env, dir)?;
    for (kind, path, addr) in &pod.probes {
        // Liveness answers at once; readiness once Kafka answers and (the
        // broker) the acks and models are restored and MQTT listens.
        let limit = if path == "/healthz" { 30 } else { 120 };
        let what = format!("{} {kind} GET {path} on {addr} to answer 200", pod.name);
        let running = &mut component;
        wait_for(Duration::from_secs(limit), &what, || {
            let alive = running.check_running();
            async move {
                alive?;
                Ok((http_status(*addr, path).await == Some(200)).then_some(()))
            }
        })
        .await
        .with_context(|| component.tail_log())?;
    }
    Ok(component)
}

/// Environment variables the `apache/kafka` image does not turn into server
/// properties (`ExcludeServerPropsEnv` of `kafka.docker.KafkaDockerWrapper`).
const IMAGE_NON_PROPERTY_ENV: &[&str] = &[
    "KAFKA_VERSION",
    "KAFKA_HEAP_OPTS",
    "KAFKA_LOG4J_OPTS",
    "KAFKA_OPTS",
    "KAFKA_JMX_OPTS",
    "KAFKA_JVM_PERFORMANCE_OPTS",
    "KAFKA_GC_LOG_OPTS",
    "KAFKA_LOG4J_ROOT_LOGLEVEL",
    "KAFKA_LOG4J_LOGGERS",
    "KAFKA_TOOLS_LOG4J_LOGLEVEL",
    "KAFKA_JMX_HOSTNAME",
];

/// The server properties the `apache/kafka` image writes from `container`'s
/// environment, as its `KafkaDockerWrapper` (Kafka 4) does: every
/// `KAFKA_*` variable but the JVM's, the first `KAFKA_` removed, lower case,
/// `_` → `.`, then `...` → `-` and `..` → `_`.
fn image_server_properties(container: &Value) -> Result<Vec<(String, String)>> {
    let mut properties = Vec::new();
    for var in container["env"].as_array().context("env")? {
        let key = str_of(&var["name"], "env name")?;
        if !key.starts_with("KAFKA_") || IMAGE_NON_PROPERTY_ENV.contains(&key) {
            continue;
        }
        let value = str_of(&var["value"], key)?;
        let property = key
            .replacen("KAFKA_", "", 1)
            .to_lowercase()
            .replace('_', ".")
            .replace("...", "-")
            .replace("..", "_");
        properties.push((property, value.to_string()));
    }
    Ok(properties)
}

/// Properties that place the node in its pod (its id, listeners, advertised
/// name, quorum, log directory): the harness's loopback node has its own.
/// The offline test checks them.
const POD_PLACEMENT_PROPERTIES: &[&str] = &[
    "node.id",
    "listeners",
    "advertised.listeners",
    "listener.security.protocol.map",
    "inter.broker.listener.name",
    "controller.listener.names",
    "controller.quorum.voters",
    "log.dirs",
];

/// Starts, from the harness's Apache Kafka jars, a Kafka configured as the
/// dev overlay's StatefulSet configures its container (the server
/// properties its image would write, the heap of `KAFKA_HEAP_OPTS`), but on
/// loopback ports and local storage; then checks that Kafka took every one
/// of those properties with its value (its `KafkaConfig values:` log): a
/// misspelt variable would be a property Kafka does not know, and silently
/// ignored.
async fn start_dev_overlay_kafka(docs: &[Value], dir: &Path) -> Result<LocalKafka> {
    let set = docs
        .iter()
        .find(|d| d["kind"] == "StatefulSet")
        .context("dev: no Kafka StatefulSet")?;
    let container = &set["spec"]["template"]["spec"]["containers"][0];
    let properties: Vec<(String, String)> = image_server_properties(container)?
        .into_iter()
        .filter(|(k, _)| !POD_PLACEMENT_PROPERTIES.contains(&k.as_str()))
        .collect();
    let heap = env_of(container, "KAFKA_HEAP_OPTS").context("dev Kafka: no KAFKA_HEAP_OPTS")?;
    let max_heap = heap
        .split_whitespace()
        .find_map(|o| o.strip_prefix("-Xmx"))
        .context("dev Kafka: no -Xmx")?;
    let options = LocalKafkaOptions {
        max_heap: max_heap.to_string(),
        properties: properties.clone(),
        ..LocalKafkaOptions::single(&dir.join("kafka"))
    };
    let kafka = LocalKafka::start(&kafka_install()?, &options).await?;
    let log_path = kafka.log(1).context("the local Kafka's log")?;
    let log = std::fs::read_to_string(&log_path)?;
    // `\tkey = value` lines; lists print as `[a, b]`.
    let taken: HashMap<&str, String> = log
        .lines()
        .filter_map(|l| l.strip_prefix('\t')?.split_once(" = "))
        .map(|(k, v)| {
            let v = v.trim();
            let v = v
                .strip_prefix('[')
                .and_then(|v| v.strip_suffix(']'))
                .map_or_else(|| v.to_string(), |list| list.replace(", ", ","));
            (k, v)
        })
        .collect();
    ensure!(
        !taken.is_empty(),
        "no `KafkaConfig values:` in {}: cannot check the dev overlay's properties",
        log_path.display()
    );
    for (key, value) in &properties {
        let got = taken.get(key.as_str()).with_context(|| {
            format!(
                "dev Kafka: {key} (from its environment) is not a property Kafka {} knows",
                edgeloop_kafka::local::KAFKA_VERSION
            )
        })?;
        ensure!(
            got == value,
            "dev Kafka: {key} = {value} in its environment, Kafka runs with {got}"
        );
    }
    Ok(kafka)
}

/// Starts three loopback Kafka nodes (as a production cluster: internal
/// topics with three replicas, two in sync) and creates the topics the prod
/// overlay's KafkaTopics declare, as Strimzi's Topic Operator would, so the
/// broker and the processor start against topics that exist already.
async fn start_prod_like_kafka(docs: &[Value], dir: &Path) -> Result<LocalKafka> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let options = LocalKafkaOptions {
        nodes: 3,
        ..LocalKafkaOptions::single(&dir.join("kafka"))
    };
    let kafka = LocalKafka::start(&kafka_install()?, &options).await?;
    let mut topics = Vec::new();
    for topic in docs.iter().filter(|d| d["kind"] == "KafkaTopic") {
        let spec = &topic["spec"];
        let name = str_of(&spec["topicName"], "KafkaTopic topicName")?.to_string();
        let partitions = i32::try_from(spec["partitions"].as_i64().context("partitions")?)?;
        let replicas = i32::try_from(spec["replicas"].as_i64().context("replicas")?)?;
        let mut config = Vec::new();
        for (key, value) in spec["config"].as_object().into_iter().flatten() {
            let value = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            config.push((key.clone(), value));
        }
        topics.push((name, partitions, replicas, config));
    }
    ensure!(!topics.is_empty(), "prod: no KafkaTopics to create");
    let new_topics: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, partitions, replicas, config)| {
            config.iter().fold(
                NewTopic::new(name, *partitions, TopicReplication::Fixed(*replicas)),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka.bootstrap())
        .create()?;
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for result in admin.create_topics(new_topics.iter(), &options).await? {
        if let Err((topic, code)) = result {
            bail!("creating {topic} as its KafkaTopic declares it: {code}");
        }
    }
    Ok(kafka)
}

async fn overlay_starts_the_real_components(overlay: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let docs = parse(&render(&k8s_dir().join("overlays").join(overlay))?)?;
    // dev: the overlay's own Kafka as its StatefulSet configures it; prod: a
    // three-node cluster with the topics its KafkaTopics declare.
    let kafka = match overlay {
        "dev" => start_dev_overlay_kafka(&docs, dir.path()).await?,
        _ => start_prod_like_kafka(&docs, dir.path()).await?,
    };
    let volumes = dir.path().join("volumes");
    let broker = pod(
        &docs,
        "edgeloop-broker",
        "broker",
        "EDGELOOP_BROKER_METRICS_LISTEN",
        &kafka.bootstrap(),
        &volumes,
    )?;
    let processor = pod(
        &docs,
        "edgeloop-processor",
        "processor",
        "EDGELOOP_METRICS_LISTEN",
        &kafka.bootstrap(),
        &volumes,
    )?;

    // Replicas at most the readings topic's partitions.
    let replicas = find(&docs, "Deployment", "edgeloop-processor")?["spec"]["replicas"]
        .as_u64()
        .unwrap_or(1);
    let config = processor
        .env
        .iter()
        .find(|(k, _)| k == "EDGELOOP_PROCESSOR_CONFIG")
        .context("EDGELOOP_PROCESSOR_CONFIG is not set")?;
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(&config.1)?)?;
    let partitions = config
        .get("kafka")
        .and_then(|k| k.get("partitions"))
        .and_then(toml::Value::as_integer)
        .context("kafka.partitions in processor.toml")?;
    ensure!(
        i64::try_from(replicas)? <= partitions,
        "{overlay}: {replicas} processor replicas for {partitions} partitions"
    );
    // The processor's own shutdown deadline ends before the kubelet's
    // SIGKILL, so it exits on its own terms.
    let shutdown_grace = config
        .get("shutdown_grace")
        .and_then(toml::Value::as_str)
        .context("shutdown_grace in processor.toml")?;
    let shutdown_grace = humantime::parse_duration(shutdown_grace)?;
    ensure!(
        shutdown_grace < processor.grace,
        "{overlay}: the processor's shutdown_grace {shutdown_grace:?} is not under the pod's \
         terminationGracePeriodSeconds {:?}",
        processor.grace
    );

    // The broker's MQTT Service ports reach what it listens on.
    let container =
        &find(&docs, "Deployment", "edgeloop-broker")?["spec"]["template"]["spec"]["containers"][0];
    let service = find(&docs, "Service", "edgeloop-broker")?;
    for (port, env) in [
        (1883, "EDGELOOP_MQTT_LISTEN"),
        (8883, "EDGELOOP_MQTT_TLS_LISTEN"),
    ] {
        let p = service["spec"]["ports"]
            .as_array()
            .context("Service ports")?
            .iter()
            .find(|p| p["port"] == port)
            .with_context(|| format!("Service edgeloop-broker has no port {port}"))?;
        let target = container_port(container, &p["targetPort"])?;
        let listen = container["env"]
            .as_array()
            .context("env")?
            .iter()
            .find(|e| e["name"] == env)
            .with_context(|| format!("broker: {env} not set"))?;
        ensure!(
            port_of(str_of(&listen["value"], env)?)? == target,
            "Service port {port} targets {target}, but {env} is {}",
            listen["value"]
        );
    }

    let mut broker_process = start_and_probe(&broker, dir.path()).await?;
    let mut processor_process = start_and_probe(&processor, dir.path()).await?;
    check_control_api(&docs, &processor).await?;
    // SIGTERM, as the kubelet sends it: both stop cleanly within the pod's
    // terminationGracePeriodSeconds.
    processor_process.terminate(processor.grace).await?;
    broker_process.terminate(broker.grace).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_overlay_env_and_probes_match_the_real_broker_and_processor() -> Result<()> {
    overlay_starts_the_real_components("dev").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prod_overlay_env_and_probes_match_the_real_broker_and_processor() -> Result<()> {
    overlay_starts_the_real_components("prod").await
}

#[test]
fn without_kubectl_the_tests_fail_and_say_how_to_install_it() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let path = std::env::join_paths([empty.path()])?;
    let Err(e) = find_kubectl(None, Some(path)) else {
        bail!("found a kubectl in an empty directory");
    };
    ensure!(e.to_string().contains("install kubectl"), "{e}");
    Ok(())
}
