//! The Kubernetes manifests in `k8s/`, checked offline:
//!
//! - every overlay renders with `kubectl kustomize` and the output validates
//!   with `kubernetes-validate` against a fixed Kubernetes version (schemas
//!   ship with the tool; `scripts/setup.sh` installs it);
//! - the manifests match the binary: the containers' environment variables
//!   are ones `edgeloop broker` / `edgeloop processor` read, the probes and
//!   the Prometheus annotations name the port the metrics endpoint listens
//!   on, and the real `edgeloop broker` and `edgeloop processor`, started
//!   with the containers' args and environment and the files of the rendered
//!   ConfigMaps and Secrets, answer the probes: `/healthz` 200 at once,
//!   `/readyz` 200 once Kafka answers (a Tansu started for the test stands in
//!   for the cluster's Kafka, local addresses for in-cluster ones).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_tests::{free_addr, start_kafka, wait_for, Component};
use serde_json::Value;

/// The Kubernetes version the manifests are validated against: kubectl's
/// (v1.32) on the development machine.
const KUBERNETES_VERSION: &str = "1.32.0";

const OVERLAYS: &[&str] = &["dev", "prod"];

/// Kinds `kubernetes-validate` has no schema for, which may be rendered:
/// the optional ServiceMonitor component (a Prometheus Operator CRD).
const KINDS_WITHOUT_SCHEMA: &[&str] = &["ServiceMonitor"];

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
        for kind in [
            "Deployment",
            "Service",
            "PodDisruptionBudget",
            "PersistentVolumeClaim",
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

async fn overlay_starts_the_real_components(overlay: &str) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let docs = parse(&render(&k8s_dir().join("overlays").join(overlay))?)?;
    let kafka = start_kafka(dir.path()).await?;
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
