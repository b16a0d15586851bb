//! The gRPC control API (docs/control-api.md) against real components: a
//! Apache Kafka, `edgeloop broker` and `edgeloop processor` as
//! child processes, devices run in-process; called with the generated tonic
//! clients and with `edgeloop ctl … --json`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_agent::config::SourceConfig;
use edgeloop_agent::source::simulator::SimulatorConfig;
use edgeloop_agent::{AgentConfig, AgentStats};
use edgeloop_kafka::local::LocalKafka;
use edgeloop_processor::control::{pb, Bearer};
use edgeloop_proto::v1::ModelUpdate;
use edgeloop_proto::{signing, topics, Message as _};
use edgeloop_tests::{free_addr, produce, read_topic, start_kafka, wait_for, Component};
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const TOKEN: &str = "test-token-0123456789";

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

type Authed = InterceptedService<Channel, Bearer>;

fn bearer(token: Option<&str>) -> Bearer {
    Bearer::new(token).unwrap_or_default()
}

async fn channel(addr: std::net::SocketAddr) -> Result<Channel> {
    wait_for(
        Duration::from_secs(60),
        "the control API to listen",
        || async move {
            Ok(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                    .ok(),
            )
        },
    )
    .await
}

async fn start_broker(dir: &Path, kafka: &LocalKafka) -> Result<(Component, std::net::SocketAddr)> {
    let mqtt = free_addr()?;
    let (listen, bootstrap) = (mqtt.to_string(), kafka.bootstrap());
    let mut broker = Component::start(
        &edgeloop_bin(),
        "broker",
        &[
            "broker",
            "--listen",
            &listen,
            "--kafka",
            &bootstrap,
            "--allow-anonymous",
        ],
        dir,
    )?;
    wait_for(Duration::from_secs(60), "the MQTT listener", || {
        let running = broker.check_running();
        async move {
            running?;
            Ok(tokio::net::TcpStream::connect(mqtt).await.ok().map(|_| ()))
        }
    })
    .await?;
    Ok((broker, mqtt))
}

/// `edgeloop processor` with the control API on a free port; `config` is a
/// TOML file or none. The token comes from the environment, as in Kubernetes.
fn start_processor(
    dir: &Path,
    kafka: &LocalKafka,
    control: std::net::SocketAddr,
    extra: &[&str],
) -> Result<Component> {
    let bootstrap = kafka.bootstrap();
    let parquet = dir.join("parquet").to_string_lossy().into_owned();
    let control = control.to_string();
    let group = format!("control-test-{}", std::process::id());
    let mut args = vec![
        "processor",
        "--kafka",
        &bootstrap,
        "--group-id",
        &group,
        "--parquet-root",
        &parquet,
        "--max-age",
        "1s",
        "--control-listen",
        &control,
    ];
    args.extend_from_slice(extra);
    Component::start_with_env(
        &edgeloop_bin(),
        "processor",
        &args,
        &[("EDGELOOP_CONTROL_TOKEN".into(), TOKEN.into())],
        dir,
    )
}

/// Runs `edgeloop ctl --addr ADDR ARGS… --json` with the token in the
/// environment (or none) and parses what it prints.
async fn ctl_json(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    args: &[&str],
) -> Result<serde_json::Value> {
    let mut command = tokio::process::Command::new(edgeloop_bin());
    command
        .arg("ctl")
        .arg("--addr")
        .arg(addr.to_string())
        .args(args)
        .arg("--json")
        .env_remove("EDGELOOP_CONTROL_TOKEN");
    if let Some(t) = token {
        command.env("EDGELOOP_CONTROL_TOKEN", t);
    }
    let out = command.output().await?;
    ensure!(
        out.status.success(),
        "edgeloop ctl {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "edgeloop ctl {args:?} printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

fn agent(dir: &Path, mqtt: std::net::SocketAddr, limit: u64) -> AgentConfig {
    let mut config = AgentConfig {
        device_id: "unused".into(),
        profile: "int8".into(),
        ..AgentConfig::default()
    };
    config.spool.dir = dir.join("spool");
    config.spool.sync_interval = Duration::from_millis(20);
    config.mqtt.host = mqtt.ip().to_string();
    config.mqtt.port = mqtt.port();
    config.uplink.batch_size = 50;
    config.uplink.linger = Duration::from_millis(50);
    config.uplink.status_interval = Duration::from_millis(500);
    config.source = SourceConfig::Simulator(SimulatorConfig {
        seed: 7,
        limit: Some(limit),
        rate_hz: 1_000.0,
        anomaly_rate: 0.02,
        ..SimulatorConfig::default()
    });
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_lists_the_fleet_rules_and_health_after_a_run_and_refuses_bad_tokens(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let (_broker, mqtt) = start_broker(dir.path(), &kafka).await?;
    let control = free_addr()?;
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/rules.example.toml");
    let rules = rules.to_string_lossy().into_owned();
    let mut processor = start_processor(dir.path(), &kafka, control, &["--rules", &rules])?;
    let channel = channel(control).await?;

    // Three devices, 300 readings each, all acknowledged.
    let (devices, per_device) = (3usize, 300u64);
    let reports = tokio::time::timeout(
        Duration::from_secs(120),
        edgeloop_agent::run_fleet(
            agent(dir.path(), mqtt, per_device),
            "dev",
            devices,
            CancellationToken::new(),
            Arc::new(AgentStats::default()),
        ),
    )
    .await
    .context("the fleet did not finish")??;
    ensure!(
        reports.iter().all(|r| r.committed_seq == per_device),
        "{reports:?}"
    );

    // Fleet: every device, with its last status (the clean stop: offline,
    // nothing in the spool) and the readings the processor consumed.
    let mut fleet: pb::fleet_client::FleetClient<Authed> =
        pb::fleet_client::FleetClient::with_interceptor(channel.clone(), bearer(Some(TOKEN)));
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_micros() as i64
        - 600_000_000;
    let listed = wait_for(
        Duration::from_secs(60),
        "every device's final status",
        || {
            let mut fleet = fleet.clone();
            async move {
                let r = fleet
                    .list_devices(pb::ListDevicesRequest::default())
                    .await?
                    .into_inner();
                let done = r.devices.len() == devices
                    && r.devices.iter().all(|d| {
                        d.has_status
                            && !d.online
                            && d.next_seq == per_device
                            && d.readings_seen >= per_device
                    });
                Ok(done.then_some(r))
            }
        },
    )
    .await
    .with_context(|| processor.tail_log())?;
    let ids: Vec<&str> = listed
        .devices
        .iter()
        .map(|d| d.device_id.as_str())
        .collect();
    ensure!(
        ids == ["dev-0000", "dev-0001", "dev-0002"],
        "devices: {ids:?}"
    );
    for d in &listed.devices {
        ensure!(d.profile == "int8", "{d:?}");
        // backlog_bytes is what the spool holds on disk, which may include
        // acknowledged readings of a segment not yet deleted.
        ensure!(d.backlog_records == 0 && d.oldest_unacked_ms == 0, "{d:?}");
        ensure!(d.lost_readings == 0 && d.loss_reports_seen == 0, "{d:?}");
        ensure!(
            d.last_seen_micros > started,
            "last seen is not recent: {d:?}"
        );
        ensure!(
            d.last_seen_micros >= d.last_reading_ts_micros && d.last_reading_ts_micros > 0,
            "{d:?}"
        );
    }
    let one = fleet
        .get_device(pb::GetDeviceRequest {
            device_id: "dev-0001".into(),
        })
        .await?
        .into_inner();
    ensure!(
        one.device_id == "dev-0001" && one.next_seq == per_device,
        "{one:?}"
    );
    let missing = fleet
        .get_device(pb::GetDeviceRequest {
            device_id: "nobody".into(),
        })
        .await
        .expect_err("an unknown device");
    ensure!(missing.code() == tonic::Code::NotFound, "{missing:?}");

    // Labelling: the example rules are in force; each rule saw every
    // reading once the files are closed (they close after 1 s).
    let labelling = pb::labelling_client::LabellingClient::with_interceptor(
        channel.clone(),
        bearer(Some(TOKEN)),
    );
    let total = devices as u64 * per_device;
    let rules = wait_for(
        Duration::from_secs(60),
        "rule statistics of every reading",
        || {
            let mut labelling = labelling.clone();
            async move {
                let r = labelling
                    .get_rules(pb::GetRulesRequest {})
                    .await?
                    .into_inner();
                let done =
                    !r.statistics.is_empty() && r.statistics.iter().all(|s| s.readings == total);
                Ok(done.then_some(r))
            }
        },
    )
    .await?;
    ensure!(rules.rules_version == "sim-v1", "{rules:?}");
    ensure!(rules.rules.len() >= 5 && rules.reloads == 1, "{rules:?}");
    ensure!(
        rules.statistics.len() == rules.rules.len(),
        "one statistics row per rule: {rules:?}"
    );
    for s in &rules.statistics {
        ensure!(s.votes <= s.readings && s.agreements <= s.votes, "{s:?}");
        ensure!(
            (s.coverage - s.votes as f64 / s.readings as f64).abs() < 1e-12,
            "{s:?}"
        );
    }
    ensure!(
        rules.statistics.iter().any(|s| s.votes > 0),
        "no rule voted on 2% anomalies: {rules:?}"
    );

    // Health: Kafka answers, both feeds caught up, rules in force.
    let health =
        pb::health_client::HealthClient::with_interceptor(channel.clone(), bearer(Some(TOKEN)));
    let h = wait_for(Duration::from_secs(30), "a ready processor", || {
        let mut health = health.clone();
        async move {
            let h = health
                .get_health(pb::GetHealthRequest {})
                .await?
                .into_inner();
            Ok(h.ready.then_some(h))
        }
    })
    .await?;
    let names: Vec<&str> = h.components.iter().map(|c| c.name.as_str()).collect();
    ensure!(
        names
            == [
                "kafka",
                "processor",
                "labeller",
                "status_feed",
                "models_feed",
                "pins_feed"
            ],
        "{h:?}"
    );

    // Without a token, or with another one: UNAUTHENTICATED, on every service.
    for token in [None, Some("not-the-token-0123456789")] {
        let mut fleet =
            pb::fleet_client::FleetClient::with_interceptor(channel.clone(), bearer(token));
        let refused = fleet
            .list_devices(pb::ListDevicesRequest::default())
            .await
            .expect_err("refused");
        ensure!(
            refused.code() == tonic::Code::Unauthenticated,
            "{refused:?}"
        );
        let mut health =
            pb::health_client::HealthClient::with_interceptor(channel.clone(), bearer(token));
        let refused = health
            .get_health(pb::GetHealthRequest {})
            .await
            .expect_err("refused");
        ensure!(
            refused.code() == tonic::Code::Unauthenticated,
            "{refused:?}"
        );
    }

    // Server reflection answers without a token and lists the services
    // (what grpcurl uses).
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
            channel.clone(),
        );
    use tonic_reflection::pb::v1::{
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let mut answers = reflection
        .server_reflection_info(futures::stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }]))
        .await?
        .into_inner();
    let Some(answer) = answers.message().await? else {
        bail!("reflection sent no answer");
    };
    let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
        bail!("not a list of services: {answer:?}");
    };
    let mut services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    services.sort();
    for s in [
        "edgeloop.control.v1.Fleet",
        "edgeloop.control.v1.Health",
        "edgeloop.control.v1.Labelling",
        "edgeloop.control.v1.Models",
    ] {
        ensure!(services.iter().any(|x| x == s), "{s} not in {services:?}");
    }

    // The same through `edgeloop ctl --json`.
    let json = ctl_json(control, Some(TOKEN), &["devices"]).await?;
    let devices_json = json["devices"].as_array().context("devices")?;
    ensure!(devices_json.len() == devices, "{json}");
    ensure!(devices_json[0]["device_id"] == "dev-0000", "{json}");
    ensure!(
        devices_json[2]["next_seq"].as_u64() == Some(per_device),
        "{json}"
    );
    let json = ctl_json(control, Some(TOKEN), &["rules"]).await?;
    ensure!(json["rules_version"] == "sim-v1", "{json}");
    let json = ctl_json(control, Some(TOKEN), &["health"]).await?;
    ensure!(json["ready"] == true, "{json}");
    let refused = ctl_json(control, None, &["devices"]).await;
    let message = format!("{:#}", refused.expect_err("no token: refused"));
    ensure!(message.contains("Unauthenticated"), "{message}");
    processor.check_running()?;
    Ok(())
}

fn model(version: u64, artifact: &[u8], key: &signing::SigningKey) -> ModelUpdate {
    let mut update = ModelUpdate {
        task: "anomaly".into(),
        profile: "int8".into(),
        version,
        artifact: artifact.to_vec().into(),
        format: "edgeloop-int8-v1".into(),
        published_at_micros: 1_700_000_000_000_000 + version as i64,
        lineage_json: format!("{{\"test_version\":{version}}}"),
        ..Default::default()
    };
    signing::sign_update(&mut update, key);
    update
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_listed_from_kafka_and_rollback_and_pin_republish_signed_as_a_higher_version(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let (_broker, mqtt) = start_broker(dir.path(), &kafka).await?;

    // The key pair, from `edgeloop keys generate`.
    let keys = dir.path().join("keys");
    let out = tokio::process::Command::new(edgeloop_bin())
        .args(["keys", "generate", "--out"])
        .arg(&keys)
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let private = signing::parse_signing_key(&std::fs::read_to_string(keys.join("signing.key"))?)?;
    let public = signing::parse_verifying_key(&std::fs::read_to_string(keys.join("signing.pub"))?)?;
    ensure!(private.verifying_key() == public);

    let config = dir.path().join("processor.toml");
    std::fs::write(
        &config,
        format!(
            "[control]\nsigning_key_file = {:?}\n",
            keys.join("signing.key").to_string_lossy()
        ),
    )?;
    let control = free_addr()?;
    let config_arg = config.to_string_lossy().into_owned();
    let mut processor = start_processor(dir.path(), &kafka, control, &["--config", &config_arg])?;
    let channel = channel(control).await?;
    let mut models: pb::models_client::ModelsClient<Authed> =
        pb::models_client::ModelsClient::with_interceptor(channel.clone(), bearer(Some(TOKEN)));

    // The models feed has created and caught up with edgeloop.models.
    let health =
        pb::health_client::HealthClient::with_interceptor(channel.clone(), bearer(Some(TOKEN)));
    wait_for(Duration::from_secs(60), "the models feed", || {
        let mut health = health.clone();
        async move {
            let h = health
                .get_health(pb::GetHealthRequest {})
                .await?
                .into_inner();
            Ok(h.components
                .iter()
                .any(|c| c.name == "models_feed" && c.ok)
                .then_some(()))
        }
    })
    .await
    .with_context(|| processor.tail_log())?;

    let key = topics::model_key("anomaly", "int8");
    let v1 = model(1, b"model one", &private);
    let v2 = model(2, b"model two, worse", &private);
    produce(&kafka, topics::KAFKA_MODELS, &key, &v1.encode_to_vec()).await?;
    produce(&kafka, topics::KAFKA_MODELS, &key, &v2.encode_to_vec()).await?;

    let listed = wait_for(Duration::from_secs(30), "two model versions", || {
        let mut models = models.clone();
        async move {
            let r = models
                .list_models(pb::ListModelsRequest::default())
                .await?
                .into_inner();
            Ok((r.models.len() == 2).then_some(r))
        }
    })
    .await?;
    let versions: Vec<(u64, bool)> = listed.models.iter().map(|m| (m.version, m.live)).collect();
    ensure!(versions == [(1, false), (2, true)], "{listed:?}");
    for m in &listed.models {
        ensure!(m.sha256_ok && m.signed && m.signature == "valid", "{m:?}");
        ensure!(m.task == "anomaly" && m.profile == "int8", "{m:?}");
    }
    ensure!(
        listed.models[0].sha256 == signing::to_hex(&signing::sha256(b"model one")),
        "{listed:?}"
    );
    let shown = models
        .get_model(pb::GetModelRequest {
            task: "anomaly".into(),
            profile: "int8".into(),
            version: 1,
            include_artifact: true,
        })
        .await?
        .into_inner();
    ensure!(shown.artifact == b"model one", "{shown:?}");

    // Roll back to version 1: published as version 3, signed, in Kafka.
    let rolled = models
        .rollback(pb::RollbackRequest {
            task: "anomaly".into(),
            profile: "int8".into(),
            to_version: 1,
        })
        .await?
        .into_inner()
        .published
        .context("no published version")?;
    ensure!(rolled.version == 3 && rolled.live, "{rolled:?}");
    ensure!(rolled.signature == "valid", "{rolled:?}");
    let in_kafka: Vec<ModelUpdate> = read_topic(&kafka, topics::KAFKA_MODELS)?
        .iter()
        .filter_map(|m| rdkafka::Message::payload(m).and_then(|p| ModelUpdate::decode(p).ok()))
        .collect();
    let v3 = in_kafka
        .iter()
        .find(|u| u.version == 3)
        .context("version 3 is not in edgeloop.models")?;
    ensure!(v3.artifact.as_ref() == b"model one", "{v3:?}");
    signing::verify_update(v3, &public)?;
    let lineage: serde_json::Value = serde_json::from_str(&v3.lineage_json)?;
    ensure!(
        lineage["rollback"]["republishes_version"] == 1
            && lineage["rollback"]["replaces_version"] == 2,
        "{lineage}"
    );

    // The broker's bridge sends it to devices: retained on models/anomaly/int8.
    let mut options =
        rumqttc::MqttOptions::new("control-test-device", mqtt.ip().to_string(), mqtt.port());
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 10);
    client
        .subscribe(topics::models("anomaly", "int8"), rumqttc::QoS::AtLeastOnce)
        .await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let event = tokio::time::timeout_at(deadline, eventloop.poll())
            .await
            .context("no version 3 on models/anomaly/int8 within 30 s")?;
        if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event {
            let update = ModelUpdate::decode(p.payload.as_ref())?;
            if update.version == 3 {
                ensure!(update.artifact.as_ref() == b"model one");
                break;
            }
        }
    }

    // Rolling back to the live version, or to one that never was, is refused.
    let refused = models
        .rollback(pb::RollbackRequest {
            task: "anomaly".into(),
            profile: "int8".into(),
            to_version: 3,
        })
        .await
        .expect_err("already live");
    ensure!(
        refused.code() == tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    let refused = models
        .rollback(pb::RollbackRequest {
            task: "anomaly".into(),
            profile: "int8".into(),
            to_version: 9,
        })
        .await
        .expect_err("unknown version");
    ensure!(refused.code() == tonic::Code::NotFound, "{refused:?}");

    // Pin version 2 (below the live 3): republished as 4 and pinned, the
    // pin recorded in edgeloop.pins; then unpinned (a tombstone).
    let pinned = models
        .pin(pb::PinRequest {
            task: "anomaly".into(),
            profile: "int8".into(),
            version: 2,
        })
        .await?
        .into_inner();
    ensure!(pinned.republished, "{pinned:?}");
    let m = pinned.pinned.context("no pinned version")?;
    ensure!(m.version == 4 && m.live && m.pinned, "{m:?}");
    let pins: Vec<serde_json::Value> = read_topic(&kafka, topics::KAFKA_PINS)?
        .iter()
        .filter_map(|m| rdkafka::Message::payload(m).and_then(|p| serde_json::from_slice(p).ok()))
        .collect();
    ensure!(
        pins.len() == 1 && pins[0]["version"] == 4 && pins[0]["task"] == "anomaly",
        "{pins:?}"
    );

    // `edgeloop ctl models list --json` sees all four, 4 pinned.
    let json = ctl_json(control, Some(TOKEN), &["models", "list"]).await?;
    let versions: Vec<(u64, bool)> = json["models"]
        .as_array()
        .context("models")?
        .iter()
        .filter_map(|m| Some((m["version"].as_u64()?, m["pinned"].as_bool()?)))
        .collect();
    ensure!(
        versions == [(1, false), (2, false), (3, false), (4, true)],
        "{json}"
    );
    let json = ctl_json(
        control,
        Some(TOKEN),
        &["models", "unpin", "anomaly", "int8"],
    )
    .await?;
    ensure!(json["was_pinned"] == true, "{json}");
    // The registry follows edgeloop.pins: the unpin shows once it has read
    // the tombstone.
    let mut shown = None;
    for _ in 0..50 {
        let m = models
            .get_model(pb::GetModelRequest {
                task: "anomaly".into(),
                profile: "int8".into(),
                version: 0,
                include_artifact: false,
            })
            .await?
            .into_inner()
            .model
            .context("no model")?;
        let done = !m.pinned;
        shown = Some(m);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let shown = shown.context("no model")?;
    ensure!(shown.version == 4 && !shown.pinned, "{shown:?}");
    let records = read_topic(&kafka, topics::KAFKA_PINS)?;
    ensure!(
        records.len() == 2 && rdkafka::Message::payload(&records[1]).is_none(),
        "the unpin is not a tombstone in edgeloop.pins"
    );
    processor.check_running()?;
    Ok(())
}
