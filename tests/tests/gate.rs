//! The broker's gate against real clients: rumqttc (Rust) and paho-mqtt
//! (Python, a client this project did not write), MQTT 3.1.1 and 5, plain
//! TCP and TLS with a CA the test makes; Kafka is a real Apache Kafka.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_kafka::local::LocalKafka;
use edgeloop_proto::v1::ReadingBatch;
use edgeloop_proto::{topics, Message as _};
use edgeloop_tests::{
    batch, free_addr, http_get, metric, read_topic, start_kafka, wait_for, Component,
};
use rdkafka::message::Headers;
use rdkafka::Message;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_edgeloop");
const PAHO: &str = include_str!("paho_client.py");

/// `edgeloop broker add-device ID`: the password it prints.
fn add_device(credentials: &Path, id: &str) -> Result<String> {
    let out = std::process::Command::new(BIN)
        .args(["broker", "add-device", id, "--credentials"])
        .arg(credentials)
        .output()?;
    ensure!(out.status.success(), "add-device: {:?}", out);
    let password = String::from_utf8(out.stdout)?.trim().to_string();
    ensure!(password.len() >= 32, "password {password:?}");
    Ok(password)
}

/// `add-device` as a script runs it, the built binary itself: with `--json`,
/// stdout is one JSON object and nothing else (prose and logs go to stderr),
/// its password verifies against the credentials file; `--password-file`
/// makes a file of mode 0600 holding a password that verifies, and refuses,
/// naming it, to replace an existing one.
#[test]
fn add_device_gives_a_script_json_on_stdout_or_a_private_password_file() -> Result<()> {
    use edgeloop_broker::gate::credentials::CredentialsFile;
    let dir = tempfile::tempdir()?;
    let credentials = dir.path().join("credentials.toml");
    let verifies = |id: &str, password: &str| -> Result<bool> {
        let file = CredentialsFile::read(&credentials)?;
        let c = file
            .credentials
            .iter()
            .find(|c| c.id == id)
            .context(id.to_string())?;
        Ok(c.verify(password.as_bytes()))
    };
    let run = |args: &[&str]| -> Result<std::process::Output> {
        Ok(std::process::Command::new(BIN)
            .args(["broker", "add-device"])
            .args(args)
            .arg("--credentials")
            .arg(&credentials)
            .output()?)
    };

    let out = run(&["dev-a", "--json"])?;
    ensure!(out.status.success(), "add-device --json: {out:?}");
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "stdout is one JSON value: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let device = &value["devices"][0];
    ensure!(device["id"] == "dev-a", "{value}");
    let password = device["password"].as_str().context("a password")?;
    ensure!(verifies("dev-a", password)?, "the JSON's password verifies");

    let file = dir.path().join("dev-b.password");
    let out = run(&["dev-b", "--password-file", file.to_str().context("UTF-8")?])?;
    ensure!(out.status.success(), "add-device --password-file: {out:?}");
    ensure!(out.stdout.is_empty(), "nothing on stdout: {out:?}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        ensure!(mode == 0o600, "mode {mode:o}");
    }
    let written = std::fs::read_to_string(&file)?;
    ensure!(
        verifies("dev-b", written.trim())?,
        "the file's password verifies"
    );

    let out = run(&["dev-c", "--password-file", file.to_str().context("UTF-8")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success(),
        "an existing file is refused: {out:?}"
    );
    ensure!(stderr.contains(file.to_str().context("UTF-8")?), "{stderr}");
    ensure!(
        std::fs::read_to_string(&file)? == written,
        "the file is unchanged"
    );
    let file_now = CredentialsFile::read(&credentials)?;
    ensure!(
        !file_now.credentials.iter().any(|c| c.id == "dev-c"),
        "dev-c was not added"
    );
    Ok(())
}

async fn start_broker(
    dir: &Path,
    kafka: &LocalKafka,
    mqtt: SocketAddr,
    extra: &[&str],
) -> Result<Component> {
    let listen = mqtt.to_string();
    let bootstrap = kafka.bootstrap();
    let mut args = vec!["broker", "--listen", &listen, "--kafka", &bootstrap];
    args.extend_from_slice(extra);
    let mut broker = Component::start(Path::new(BIN), "broker", &args, dir)?;
    wait_for(Duration::from_secs(60), "the MQTT listener", || {
        let running = broker.check_running();
        async move {
            running?;
            Ok(tokio::net::TcpStream::connect(mqtt).await.ok().map(|_| ()))
        }
    })
    .await?;
    Ok(broker)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Runs the paho client with `spec`; its JSON report.
fn paho(spec: serde_json::Value) -> Result<serde_json::Value> {
    let out = std::process::Command::new("python3")
        .args(["-c", PAHO, &spec.to_string()])
        .output()
        .context("python3 (scripts/setup.sh installs paho-mqtt)")?;
    ensure!(
        out.status.success(),
        "paho: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// Connects with rumqttc (MQTT 3.1.1); the CONNACK outcome.
async fn rumqttc_connect(
    mqtt: SocketAddr,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<(AsyncClient, rumqttc::EventLoop), ConnectionError> {
    let mut options = MqttOptions::new(client_id, mqtt.ip().to_string(), mqtt.port());
    options.set_keep_alive(Duration::from_secs(5));
    if let Some((u, p)) = credentials {
        options.set_credentials(u, p);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    loop {
        match eventloop.poll().await? {
            Event::Incoming(Packet::ConnAck(_)) => return Ok((client, eventloop)),
            _ => continue,
        }
    }
}

async fn refused_with(
    mqtt: SocketAddr,
    client_id: &str,
    credentials: Option<(&str, &str)>,
) -> Result<ConnectReturnCode> {
    match tokio::time::timeout(
        Duration::from_secs(10),
        rumqttc_connect(mqtt, client_id, credentials),
    )
    .await?
    {
        Err(ConnectionError::ConnectionRefused(code)) => Ok(code),
        Ok(_) => bail!("{client_id} {credentials:?} was let in"),
        Err(e) => bail!("{client_id}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_are_held_to_their_own_identity_and_topics() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let credentials = dir.path().join("credentials.toml");
    let pass_a = add_device(&credentials, "dev-a")?;
    let pass_b = add_device(&credentials, "dev-b")?;
    let mqtt = free_addr()?;
    let cred_arg = credentials.to_string_lossy().into_owned();
    let ops = free_addr()?.to_string();
    let mut broker = start_broker(
        dir.path(),
        &kafka,
        mqtt,
        &["--credentials", &cred_arg, "--metrics-listen", &ops],
    )
    .await?;

    // Identity: wrong password, someone else's client id, no credential.
    assert_eq!(
        refused_with(mqtt, "dev-a", Some(("dev-a", &pass_b))).await?,
        ConnectReturnCode::BadUserNamePassword
    );
    assert_eq!(
        refused_with(mqtt, "dev-b", Some(("dev-a", &pass_a))).await?,
        ConnectReturnCode::BadClientId
    );
    assert_eq!(
        refused_with(mqtt, "dev-a", None).await?,
        ConnectReturnCode::NotAuthorized
    );
    // A device added while the broker runs can connect at once.
    let pass_c = add_device(&credentials, "dev-c")?;
    let connected = tokio::time::timeout(
        Duration::from_secs(10),
        rumqttc_connect(mqtt, "dev-c", Some(("dev-c", &pass_c))),
    )
    .await?;
    ensure!(connected.is_ok(), "dev-c: {:?}", connected.err());

    // MQTT 5 (paho): refusals come back as reason codes; the allowed
    // publish and filters go through.
    let host = mqtt.ip().to_string();
    let v5 = paho(serde_json::json!({
        "host": host, "port": mqtt.port(), "protocol": 5,
        "client_id": "dev-a", "username": "dev-a", "password": pass_a,
        "steps": [
            ["publish", "telemetry/dev-b", hex(&batch("dev-b", 0, 5))],
            ["publish", "models/anomaly/int8", "00"],
            ["subscribe", ["ack/dev-a", "ack/dev-b", "models/#"]],
            ["publish", "telemetry/dev-a", hex(&batch("dev-a", 0, 5))],
        ],
    }))?;
    assert_eq!(v5["connack"], "Success", "{v5}");
    assert_eq!(v5["steps"][0], "Not authorized", "{v5}");
    assert_eq!(v5["steps"][1], "Not authorized", "{v5}");
    assert_eq!(v5["steps"][2], serde_json::json!([1, 0x87, 1]), "{v5}");
    assert_eq!(v5["steps"][3], "Success", "{v5}");
    // MQTT 3.1.1 (paho): a refused filter gets 0x80; a refused publish
    // closes the connection (3.1.1 has no code to refuse it with).
    let v4 = paho(serde_json::json!({
        "host": host, "port": mqtt.port(), "protocol": 4,
        "client_id": "dev-a", "username": "dev-a", "password": pass_a,
        "steps": [
            ["subscribe", ["ack/dev-a", "ack/dev-b"]],
            ["subscribe", ["ack/dev-a", "models/#"]],
            ["publish", "telemetry/dev-a", hex(&batch("dev-a", 5, 5))],
            ["publish", "telemetry/dev-b", hex(&batch("dev-b", 5, 5))],
        ],
    }))?;
    assert_eq!(v4["connack"], "Success", "{v4}");
    assert_eq!(v4["steps"][0], serde_json::json!([1, 0x80]), "{v4}");
    assert_eq!(v4["steps"][1], serde_json::json!([1, 1]), "{v4}");
    assert_eq!(v4["steps"][2], "Success", "{v4}");
    assert_eq!(v4["steps"][3], "disconnected", "{v4}");
    // rumqttc (3.1.1) as dev-b, publishing as dev-a: disconnected.
    let (client, mut eventloop) = rumqttc_connect(mqtt, "dev-b", Some(("dev-b", &pass_b)))
        .await
        .context("dev-b connects")?;
    client
        .publish(
            "telemetry/dev-a",
            QoS::AtLeastOnce,
            false,
            batch("dev-a", 1000, 5),
        )
        .await?;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return false,
                Ok(_) => continue,
                Err(_) => return true,
            }
        }
    })
    .await?;
    ensure!(
        closed,
        "dev-b's publish to telemetry/dev-a was acknowledged"
    );

    // The gate let through exactly dev-a's two allowed publishes and the
    // bridge took both; the refusals were counted.
    let counters = wait_for(Duration::from_secs(30), "the bridge's counters", || {
        let ops = ops.clone();
        async move {
            let m = http_get(ops.parse()?, "/metrics").await?;
            let get = |name: &str| metric(&m, name).unwrap_or(-1.0);
            let c = [
                get("edgeloop_gate_publishes_telemetry_total"),
                get("edgeloop_bridge_batches_received_total"),
                get("edgeloop_bridge_batches_in_kafka_total"),
                get("edgeloop_gate_acl_refused_publishes_total"),
                get("edgeloop_gate_acl_refused_subscriptions_total"),
            ];
            Ok((c[2] >= 2.0).then_some(c))
        }
    })
    .await?;
    assert_eq!(
        counters,
        [2.0, 2.0, 2.0, 4.0, 2.0],
        "telemetry let through, taken, in Kafka; publishes and filters refused"
    );
    // Nothing that was refused reached Kafka: every record there is dev-a's,
    // under its own topic, and both of its batches are there (seqs 0..10).
    let records = read_topic(&kafka, topics::KAFKA_READINGS)?;
    ensure!(
        records.len() == 2,
        "{} records in Kafka, not 2",
        records.len()
    );
    let mut seqs = BTreeSet::new();
    for r in &records {
        ensure!(
            r.key() == Some(&b"dev-a"[..]),
            "a record keyed {:?}",
            r.key()
        );
        // The headers a Kafka user filters on, from the topic's device.
        let headers: std::collections::HashMap<String, String> = r
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let value = String::from_utf8_lossy(h.value.unwrap_or_default());
                        (h.key.to_string(), value.into_owned())
                    })
                    .collect()
            })
            .unwrap_or_default();
        ensure!(
            headers.get("device_id").map(String::as_str) == Some("dev-a")
                && headers.get("schema").map(String::as_str) == Some("edgeloop.v1.ReadingBatch")
                && headers.get("content-type").map(String::as_str)
                    == Some("application/x-protobuf"),
            "a record's headers: {headers:?}"
        );
        let b = ReadingBatch::decode(r.payload().unwrap_or_default())?;
        ensure!(b.device_id == "dev-a", "{}", b.device_id);
        ensure!(
            headers.get("profile") == Some(&b.profile) || b.profile.is_empty(),
            "profile header {:?}, batch {:?}",
            headers.get("profile"),
            b.profile
        );
        seqs.extend(b.first_seq..b.end_seq());
    }
    ensure!(seqs == (0..10).collect::<BTreeSet<u64>>(), "{seqs:?}");
    // The refusals were counted and logged with the identity.
    broker.check_running()?;
    let log = std::fs::read_to_string(&broker.log)?;
    ensure!(
        log.contains("publish refused by ACL") && log.contains("device dev-b"),
        "{}",
        broker.tail_log()
    );
    Ok(())
}

/// A CA, a server certificate for 127.0.0.1 and client certificates, as PEM
/// files under `dir`.
fn make_pki(dir: &Path, clients: &[&str]) -> Result<()> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "edgeloop test CA");
    let ca_key = KeyPair::generate()?;
    let ca = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca.pem())?;
    let server_key = KeyPair::generate()?;
    let mut server_params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
    server_params
        .distinguished_name
        .push(DnType::CommonName, "edgeloop broker");
    let server = server_params.signed_by(&server_key, &ca, &ca_key)?;
    std::fs::write(dir.join("server.pem"), server.pem())?;
    std::fs::write(dir.join("server.key"), server_key.serialize_pem())?;
    for id in clients {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, *id);
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        std::fs::write(dir.join(format!("{id}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{id}.key")), key.serialize_pem())?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_certificates_name_the_device_and_plain_tcp_to_the_tls_port_fails() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let pki = dir.path();
    make_pki(pki, &["dev-t"])?;
    let kafka = start_kafka(dir.path()).await?;
    let credentials = dir.path().join("credentials.toml");
    let pass_a = add_device(&credentials, "dev-a")?;
    let (mqtt, tls) = (free_addr()?, free_addr()?);
    let p = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let (cred, tls_s, cert, key, ca) = (
        p("credentials.toml"),
        tls.to_string(),
        p("server.pem"),
        p("server.key"),
        p("ca.pem"),
    );
    let mut broker = start_broker(
        dir.path(),
        &kafka,
        mqtt,
        &[
            "--credentials",
            &cred,
            "--tls-listen",
            &tls_s,
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-client-ca",
            &ca,
        ],
    )
    .await?;
    let host = "127.0.0.1";
    let with_cert = serde_json::json!({"ca": ca, "cert": p("dev-t.pem"), "key": p("dev-t.key")});
    // The certificate is the credential: no password.
    let by_cert = paho(serde_json::json!({
        "host": host, "port": tls.port(), "protocol": 4, "client_id": "dev-t",
        "tls": with_cert,
        "steps": [["publish", "telemetry/dev-t", hex(&batch("dev-t", 0, 3))],
                  ["subscribe", ["ack/dev-a"]]],
    }))?;
    assert_eq!(by_cert["connack"], "Success", "{by_cert}");
    assert_eq!(by_cert["steps"][0], "Success", "{by_cert}");
    assert_eq!(by_cert["steps"][1], serde_json::json!([0x80]), "{by_cert}");
    // The certificate names dev-t; the client id says otherwise.
    let mismatch = paho(serde_json::json!({
        "host": host, "port": tls.port(), "protocol": 5, "client_id": "dev-a",
        "tls": with_cert, "steps": [],
    }))?;
    assert_eq!(mismatch["connack"], "Not authorized", "{mismatch}");
    // No client certificate: a password over TLS.
    let by_password = paho(serde_json::json!({
        "host": host, "port": tls.port(), "protocol": 5, "client_id": "dev-a",
        "username": "dev-a", "password": pass_a, "tls": {"ca": ca},
        "steps": [["publish", "telemetry/dev-a", hex(&batch("dev-a", 0, 3))]],
    }))?;
    assert_eq!(by_password["connack"], "Success", "{by_password}");
    assert_eq!(by_password["steps"][0], "Success", "{by_password}");
    // Plain MQTT to the TLS port fails, and promptly.
    let plain = tokio::time::timeout(
        Duration::from_secs(15),
        rumqttc_connect(tls, "dev-a", Some(("dev-a", &pass_a))),
    )
    .await
    .context("plain TCP to the TLS port hung")?;
    ensure!(plain.is_err(), "plain TCP to the TLS port connected");
    // TLS to the plain port fails too.
    let crossed = paho(serde_json::json!({
        "host": host, "port": mqtt.port(), "protocol": 4, "client_id": "dev-a",
        "username": "dev-a", "password": pass_a, "tls": {"ca": ca}, "steps": [],
    }))?;
    ensure!(
        crossed.get("error").is_some() || crossed["connack"].is_null(),
        "{crossed}"
    );
    broker.check_running()?;
    let keys: BTreeSet<Vec<u8>> =
        wait_for(Duration::from_secs(30), "both devices in Kafka", || {
            let records = read_topic(&kafka, topics::KAFKA_READINGS);
            async move {
                let keys: BTreeSet<Vec<u8>> = records?
                    .iter()
                    .filter_map(|r| r.key().map(<[u8]>::to_vec))
                    .collect();
                Ok((keys.len() >= 2).then_some(keys))
            }
        })
        .await?;
    assert_eq!(keys, BTreeSet::from([b"dev-a".to_vec(), b"dev-t".to_vec()]));
    Ok(())
}

/// Whether the broker closes `stream` within 10 s.
async fn closed(stream: &mut tokio::net::TcpStream) -> Result<bool> {
    let mut buf = [0u8; 256];
    let outcome = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await;
    Ok(outcome.unwrap_or(false))
}

fn raw_connect(client_id: &str) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 30];
    body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
    body.extend_from_slice(client_id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_packets_close_their_connection_and_others_carry_on() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let mqtt = free_addr()?;
    let mut broker = start_broker(dir.path(), &kafka, mqtt, &["--allow-anonymous"]).await?;
    let (good, mut eventloop) = rumqttc_connect(mqtt, "good-1", None)
        .await
        .context("good-1")?;

    let attacks: Vec<(&str, Vec<Vec<u8>>)> = vec![
        (
            "a remaining length of five bytes",
            vec![vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f]],
        ),
        (
            "a PUBLISH before CONNECT",
            vec![vec![0x30, 0x03, 0x00, 0x01, b'a']],
        ),
        (
            "CONNECT for MQTT 3.1",
            vec![{
                let mut p = raw_connect("raw-1");
                p[8] = 3;
                p
            }],
        ),
        (
            "a 2 MiB PUBLISH (over the 1 MiB payload limit)",
            vec![
                raw_connect("raw-2"),
                vec![0x30, 0x80, 0x80, 0x80, 0x01, 0x00, 0x01, b'a'],
            ],
        ),
        (
            "a SUBSCRIBE with no filter",
            vec![raw_connect("raw-3"), vec![0x82, 0x02, 0x00, 0x01]],
        ),
        (
            "a PUBLISH whose topic runs past its packet",
            vec![raw_connect("raw-4"), vec![0x30, 0x03, 0x00, 0x09, b'a']],
        ),
        (
            "random bytes",
            vec![(0..4096u32)
                .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
                .collect()],
        ),
    ];
    for (what, packets) in attacks {
        let mut stream = tokio::net::TcpStream::connect(mqtt).await?;
        for p in packets {
            // The broker may close before everything is written.
            let _ = stream.write_all(&p).await;
        }
        ensure!(
            closed(&mut stream).await?,
            "{what}: the connection stayed open"
        );
    }
    broker.check_running()?;
    // The well-behaved client was never disturbed.
    good.publish(
        "telemetry/good-1",
        QoS::AtLeastOnce,
        false,
        batch("good-1", 0, 1),
    )
    .await?;
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await?;
    ensure!(acked.is_ok(), "good-1: {acked:?}");
    Ok(())
}

/// Mode bits of `path` (0 if it cannot be read).
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).map_or(0, |m| m.permissions().mode() & 0o777)
}

/// `edgeloop up` serves the broker's /metrics, /healthz and /readyz (as
/// `edgeloop broker --metrics-listen` does), and the fleet's passwords and
/// the broker's credentials are readable by their owner only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edgeloop_up_serves_the_brokers_metrics_and_keeps_device_passwords_private() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let data = dir.path().join("run");
    let (mqtt, metrics, control) = (free_addr()?, free_addr()?, free_addr()?);
    let args = [
        "up",
        "--devices",
        "2",
        "--kafka",
        &kafka.bootstrap(),
        "--data-dir",
        data.to_str().context("path")?,
        "--mqtt-listen",
        &mqtt.to_string(),
        "--broker-metrics-listen",
        &metrics.to_string(),
        "--control-listen",
        &control.to_string(),
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Component::start(Path::new(BIN), "up", &args, dir.path())?;
    let telemetry = wait_for(Duration::from_secs(120), "the broker's /metrics", || {
        let running = up.check_running();
        async move {
            running?;
            let Ok(m) = http_get(metrics, "/metrics").await else {
                return Ok(None);
            };
            Ok(metric(&m, "edgeloop_gate_publishes_telemetry_total").filter(|n| *n > 0.0))
        }
    })
    .await?;
    ensure!(telemetry > 0.0);
    // Ready: Kafka answers and every rumqttd listener logs devices in.
    let ready = http_get(metrics, "/readyz").await?;
    ensure!(
        ready.split_whitespace().nth(1) == Some("200"),
        "/readyz: {ready}"
    );
    for secret in ["fleet/passwords.toml", "broker/credentials.toml"] {
        let path = data.join(secret);
        assert_eq!(mode(&path), 0o600, "{}", path.display());
    }
    up.terminate(Duration::from_secs(60)).await?;
    Ok(())
}

/// The agent's password comes from a file (or the environment), never
/// from its command line, where every local user would see it in `ps`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_password_on_the_command_line_is_refused_before_anything_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let spool = dir.path().join("spool");
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BIN)
            .args(["agent", "--device-id", "dev-a", "--password", "hunter2"])
            .args(["--mqtt", "127.0.0.1:9", "--limit", "1", "--spool-dir"])
            .arg(&spool)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("the agent ran instead of refusing --password")??;
    ensure!(!out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("--password-file"), "{stderr}");
    ensure!(!spool.exists(), "the agent started (its spool exists)");
    Ok(())
}

/// An agent given `--password-file` logs in with it and its readings are
/// acknowledged; the password is nowhere on its command line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_logs_in_with_the_password_in_its_password_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let credentials = dir.path().join("credentials.toml");
    let password = add_device(&credentials, "dev-a")?;
    let file = dir.path().join("dev-a.password");
    std::fs::write(&file, format!("{password}\n"))?;
    let mqtt = free_addr()?;
    let cred_arg = credentials.to_string_lossy().into_owned();
    let mut broker = start_broker(dir.path(), &kafka, mqtt, &["--credentials", &cred_arg]).await?;
    let (spool, file_arg, mqtt_arg) = (
        dir.path().join("spool").to_string_lossy().into_owned(),
        file.to_string_lossy().into_owned(),
        mqtt.to_string(),
    );
    let args = [
        "agent",
        "--device-id",
        "dev-a",
        "--password-file",
        &file_arg,
        "--mqtt",
        &mqtt_arg,
        "--rate",
        "100",
        "--limit",
        "50",
        "--spool-dir",
        &spool,
    ];
    let mut agent = Component::start(Path::new(BIN), "agent", &args, dir.path())?;
    let pid = agent.pid().context("agent pid")?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    ensure!(
        !String::from_utf8_lossy(&cmdline).contains(&password),
        "the password is on the agent's command line"
    );
    wait_for(
        Duration::from_secs(120),
        "the agent's 50 readings acknowledged",
        || {
            let exited = agent.check_running().is_err();
            let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
            async move {
                if log.contains("all acknowledged") {
                    return Ok(Some(()));
                }
                ensure!(!exited, "the agent exited: {log}");
                Ok(None)
            }
        },
    )
    .await?;
    broker.check_running()?;
    Ok(())
}

/// Three clones of one device logging in at once, again and again (two
/// auto-reconnecting copies of a device do this by accident), through a
/// standalone broker: afterwards every device still logs in, whichever
/// rumqttd listener the gate gives it, and the broker is ready. (rumqttd's
/// takeover panicked under a lock of its listener: half the devices then
/// got "server unavailable".)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clones_of_a_device_logging_in_at_once_leave_the_broker_logging_in_every_device(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let credentials = dir.path().join("credentials.toml");
    let pass_a = add_device(&credentials, "dev-a")?;
    let pass_b = add_device(&credentials, "dev-b")?;
    let (mqtt, ops) = (free_addr()?, free_addr()?);
    let (cred_arg, ops_arg) = (credentials.to_string_lossy().into_owned(), ops.to_string());
    let mut broker = start_broker(
        dir.path(),
        &kafka,
        mqtt,
        &["--credentials", &cred_arg, "--metrics-listen", &ops_arg],
    )
    .await?;
    let mut open = Vec::new();
    for _ in 0..30 {
        let clones: Vec<_> = (0..3)
            .map(|_| {
                let pass = pass_a.clone();
                tokio::spawn(async move {
                    tokio::time::timeout(
                        Duration::from_secs(10),
                        rumqttc_connect(mqtt, "dev-a", Some(("dev-a", &pass))),
                    )
                    .await
                })
            })
            .collect();
        let mut round = Vec::new();
        for c in clones {
            if let Ok(Ok(Ok(connected))) = c.await {
                round.push(connected);
            }
        }
        open = round;
    }
    drop(open);
    for i in 0..8 {
        let connected = tokio::time::timeout(
            Duration::from_secs(10),
            rumqttc_connect(mqtt, "dev-b", Some(("dev-b", &pass_b))),
        )
        .await
        .with_context(|| format!("dev-b's log-in {i} hung"))?;
        ensure!(
            connected.is_ok(),
            "dev-b's log-in {i}: {:?}",
            connected.err()
        );
    }
    broker.check_running()?;
    let ready = http_get(ops, "/readyz").await?;
    ensure!(
        ready.split_whitespace().nth(1) == Some("200"),
        "/readyz: {ready}"
    );
    Ok(())
}

/// A device removed from the credentials file while connected is
/// disconnected by the broker at the next reload; another device carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_removed_from_the_credentials_is_disconnected_and_others_carry_on() -> Result<()> {
    use edgeloop_broker::gate::credentials::CredentialsFile;
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let credentials = dir.path().join("credentials.toml");
    let pass_a = add_device(&credentials, "dev-a")?;
    let pass_b = add_device(&credentials, "dev-b")?;
    let mqtt = free_addr()?;
    let cred_arg = credentials.to_string_lossy().into_owned();
    let _broker = start_broker(dir.path(), &kafka, mqtt, &["--credentials", &cred_arg]).await?;
    let (_a, mut events_a) = rumqttc_connect(mqtt, "dev-a", Some(("dev-a", &pass_a)))
        .await
        .context("dev-a connects")?;
    let (b, mut events_b) = rumqttc_connect(mqtt, "dev-b", Some(("dev-b", &pass_b)))
        .await
        .context("dev-b connects")?;
    let mut file = CredentialsFile::read(&credentials)?;
    file.credentials.retain(|c| c.id != "dev-a");
    file.write(&credentials)?;
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if events_a.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    ensure!(
        ended.is_ok(),
        "dev-a is still connected 30 s after its removal"
    );
    b.publish(
        "telemetry/dev-b",
        QoS::AtLeastOnce,
        false,
        batch("dev-b", 0, 3),
    )
    .await?;
    let acked = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events_b.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => return Ok(()),
                Ok(_) => continue,
                Err(e) => return Err(e),
            }
        }
    })
    .await?;
    ensure!(acked.is_ok(), "dev-b: {acked:?}");
    // dev-a cannot come back.
    assert_eq!(
        refused_with(mqtt, "dev-a", Some(("dev-a", &pass_a))).await?,
        ConnectReturnCode::BadUserNamePassword
    );
    Ok(())
}
