//! The learning loop end to end, on `edgeloop up` (issue 6 and issue 7's
//! "pin and roll back a model and see the devices apply it"):
//!
//! 1. devices start with no model; labels accumulate; a first model per
//!    profile (`mcu8` int8, `gateway` f32) is trained, gated, signed and
//!    published to `edgeloop.models`, and every device reports it applied
//!    (its `DeviceStatus`, read through the control API);
//! 2. a rules change (a new `version` in DIR/rules.toml) leads to a retrain
//!    and a new published version;
//! 3. pinning version 1 of `anomaly/mcu8` through the control API republishes
//!    it as a new, higher version; every `mcu8` device applies it, and the
//!    trainer publishes nothing more for that lane while the pin stands;
//! 4. after a SIGTERM, the data set shows the devices' own predictions with
//!    model versions that never go down, the pinned version last on every
//!    `mcu8` device, and the processor's parity check found no mismatch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use edgeloop_processor::control::{pb, Bearer};
use edgeloop_tests::{free_addr, wait_for, Component};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

const DEVICES: usize = 6;
const TASK: &str = "anomaly";

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

/// The trainer's gate decisions so far (`DIR/trainer/decisions.jsonl`).
fn decisions(data: &Path) -> Result<Vec<serde_json::Value>> {
    let path = data.join("trainer/decisions.jsonl");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).context("reading decisions.jsonl"),
    };
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).with_context(|| format!("decision line {l}")))
        .collect()
}

/// The decisions so far, one line each, for a failure message.
fn summary(data: &Path) -> String {
    match decisions(data) {
        Ok(ds) => ds
            .iter()
            .map(|d| {
                format!(
                    "{} {}/{} {} v{} trigger {} rules {} · {}",
                    d["at"].as_str().unwrap_or_default(),
                    d["task"].as_str().unwrap_or_default(),
                    d["profile"].as_str().unwrap_or_default(),
                    d["decision"].as_str().unwrap_or_default(),
                    d["version"],
                    d["trigger"].as_str().unwrap_or_default(),
                    d["rules_versions"],
                    d["reason"].as_str().unwrap_or_default()
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(e) => format!("(decisions unreadable: {e})"),
    }
}

fn lane_of(d: &serde_json::Value) -> (String, String) {
    (
        d["task"].as_str().unwrap_or_default().to_string(),
        d["profile"].as_str().unwrap_or_default().to_string(),
    )
}

fn published(d: &serde_json::Value) -> bool {
    d["decision"] == "published"
}

type Authed = InterceptedService<Channel, Bearer>;

struct Control {
    fleet: pb::fleet_client::FleetClient<Authed>,
    models: pb::models_client::ModelsClient<Authed>,
}

async fn control(addr: std::net::SocketAddr, token: &str) -> Result<Control> {
    let channel = wait_for(
        Duration::from_secs(180),
        "the control API of edgeloop up",
        || async move {
            Ok(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
                    .connect()
                    .await
                    .ok(),
            )
        },
    )
    .await?;
    let bearer = Bearer::new(Some(token)).map_err(anyhow::Error::msg)?;
    Ok(Control {
        fleet: pb::fleet_client::FleetClient::with_interceptor(channel.clone(), bearer.clone()),
        models: pb::models_client::ModelsClient::with_interceptor(channel, bearer),
    })
}

/// Device id → (profile, applied version of TASK), from the control API.
async fn applied(c: &mut Control) -> Result<BTreeMap<String, (String, u64)>> {
    let devices = c
        .fleet
        .list_devices(pb::ListDevicesRequest::default())
        .await?
        .into_inner()
        .devices;
    Ok(devices
        .into_iter()
        .map(|d| {
            let v = d.applied_model_versions.get(TASK).copied().unwrap_or(0);
            (d.device_id, (d.profile, v))
        })
        .collect())
}

/// Waits until every device reports, for TASK, a version that `ok` accepts
/// for its profile.
async fn wait_applied(
    c: &mut Control,
    what: &str,
    ok: impl Fn(&str, u64) -> bool,
) -> Result<BTreeMap<String, (String, u64)>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let now = applied(c).await?;
        if now.len() == DEVICES && now.values().all(|(p, v)| ok(p, *v)) {
            return Ok(now);
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting for {what}; devices report {now:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// (device, seq, highest model version among its predictions) of every
/// reading, read back with DuckDB.
fn predictions(root: &Path) -> Result<Vec<(String, i64, Option<i64>)>> {
    let script = r#"
import sys, duckdb
rows = duckdb.sql(f"""
  SELECT device_id, seq, list_max(list_transform(predictions, lambda p: p.model_version))
  FROM read_parquet('{sys.argv[1]}/readings/**/*.parquet')
  ORDER BY device_id, seq
""").fetchall()
for d, s, v in rows:
    print(d, s, "-" if v is None else v)
"#;
    let out = Command::new("python3")
        .args(["-c", script])
        .arg(root)
        .output()
        .context("running python3 with duckdb")?;
    ensure!(
        out.status.success(),
        "duckdb failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            ensure!(f.len() == 3, "bad line {l}");
            Ok((
                f[0].to_string(),
                f[1].parse()?,
                if f[2] == "-" {
                    None
                } else {
                    Some(f[2].parse()?)
                },
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_are_trained_published_applied_retrained_on_new_rules_and_pinned() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("run");
    let (mqtt, kafka, controller, listen, metrics) = (
        free_addr()?,
        free_addr()?,
        free_addr()?,
        free_addr()?,
        free_addr()?,
    );
    let args = [
        "up",
        "--devices",
        &DEVICES.to_string(),
        "--rate",
        "30",
        "--data-dir",
        data.to_str().context("path")?,
        "--mqtt-listen",
        &mqtt.to_string(),
        "--kafka-listen",
        &kafka.to_string(),
        "--kafka-controller-listen",
        &controller.to_string(),
        "--control-listen",
        &listen.to_string(),
        "--broker-metrics-listen",
        &metrics.to_string(),
    ]
    .map(String::from);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut up = Component::start(&edgeloop_bin(), "up", &args, dir.path())?;

    // 1. A first model per profile, and every device applies it.
    let token_file = data.join("control.token");
    wait_for(Duration::from_secs(60), "DIR/control.token", || async {
        Ok(token_file.exists().then_some(()))
    })
    .await?;
    let token = std::fs::read_to_string(&token_file)?.trim().to_string();
    // Up to three minutes: on a loaded two-core machine Kafka, the broker's
    // start-up checks and the processor's topic set-up each take their time.
    let mut c = match control(listen, &token).await {
        Ok(c) => c,
        Err(e) => {
            up.check_running()?;
            anyhow::bail!("{e:#}; up's log ends:\n{}", up.tail_log());
        }
    };
    let lanes = [
        (TASK.to_string(), "mcu8".to_string()),
        (TASK.to_string(), "gateway".to_string()),
    ];
    let first = wait_for(
        Duration::from_secs(120),
        "a first published model for both profiles",
        || {
            let data = data.clone();
            let lanes = lanes.clone();
            async move {
                let ds = decisions(&data)?;
                let firsts: Vec<&serde_json::Value> = lanes
                    .iter()
                    .filter_map(|l| ds.iter().find(|d| &lane_of(d) == l && published(d)))
                    .collect();
                Ok((firsts.len() == lanes.len()).then(|| {
                    firsts
                        .iter()
                        .map(|d| (lane_of(d), (*d).clone()))
                        .collect::<BTreeMap<_, _>>()
                }))
            }
        },
    )
    .await;
    up.check_running()?;
    let first = first.with_context(|| format!("decisions:\n{}", summary(&data)))?;
    for (lane, d) in &first {
        ensure!(
            d["version"] == 1 && d["live_version"].is_null(),
            "{lane:?}: the first published model should be version 1 with no live model before it: {d}"
        );
    }
    let devices =
        wait_applied(&mut c, "every device to apply a first model", |_, v| v >= 1).await?;
    let profiles: BTreeMap<&str, usize> =
        devices.values().fold(BTreeMap::new(), |mut m, (p, _)| {
            *m.entry(p.as_str()).or_default() += 1;
            m
        });
    ensure!(
        profiles.get("mcu8").copied().unwrap_or(0) > 0
            && profiles.get("gateway").copied().unwrap_or(0) > 0,
        "the fleet should run both profiles: {profiles:?}"
    );

    // 2. A rules change: a new rules version, a retrain, a new version.
    let rules_file = data.join("rules.toml");
    let rules = std::fs::read_to_string(&rules_file)?;
    ensure!(
        rules.contains("version = \"sim-v1\""),
        "unexpected rules file"
    );
    let changed = rules
        .replace("version = \"sim-v1\"", "version = \"sim-v2\"")
        .replace("above = 25.8", "above = 25.6");
    let tmp = data.join("rules.toml.tmp");
    std::fs::write(&tmp, changed)?;
    std::fs::rename(&tmp, &rules_file)?;
    let retrained = wait_for(
        Duration::from_secs(120),
        "a model retrained on the new rules and published, for both profiles",
        || {
            let data = data.clone();
            let lanes = lanes.clone();
            async move {
                let ds = decisions(&data)?;
                let found: Vec<(u64, serde_json::Value)> = lanes
                    .iter()
                    .filter_map(|l| {
                        ds.iter().find(|d| {
                            &lane_of(d) == l
                                && published(d)
                                && d["trigger"] == "rules_changed"
                                && d["rules_versions"]
                                    .as_array()
                                    .is_some_and(|v| v.iter().all(|r| r == "sim-v2"))
                        })
                    })
                    .map(|d| (d["version"].as_u64().unwrap_or(0), d.clone()))
                    .collect();
                Ok((found.len() == lanes.len()).then_some(found))
            }
        },
    )
    .await;
    up.check_running()?;
    let retrained = retrained.with_context(|| {
        format!(
            "decisions:\n{}\nlog:\n{}",
            summary(&data),
            std::fs::read_to_string(&up.log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("rules") || l.contains("gate decision"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    })?;
    for (version, d) in retrained {
        ensure!(
            version >= 2,
            "a retrain after the rules change published {d}"
        );
    }

    // 3. Pin version 1 of anomaly/mcu8: republished as a new version, applied
    // by every mcu8 device; the trainer then holds that lane.
    let pinned = c
        .models
        .pin(pb::PinRequest {
            task: TASK.into(),
            profile: "mcu8".into(),
            version: 1,
        })
        .await?
        .into_inner();
    ensure!(pinned.republished, "pinning an old version republishes it");
    let p = pinned.pinned.context("the pinned version")?.version;
    let pinned_at = std::time::SystemTime::now();
    let held_from = decisions(&data)?.len();
    wait_applied(
        &mut c,
        &format!("every mcu8 device to apply the pinned version {p}"),
        |profile, v| profile != "mcu8" || v == p,
    )
    .await?;
    // At least one retrain of the pinned lane after the pin: not published.
    wait_for(
        Duration::from_secs(120),
        "a retrain of anomaly/mcu8 after the pin",
        || {
            let data = data.clone();
            async move {
                let ds = decisions(&data)?;
                Ok(ds[held_from.min(ds.len())..]
                    .iter()
                    .any(|d| lane_of(d) == (TASK.to_string(), "mcu8".to_string()))
                    .then_some(()))
            }
        },
    )
    .await?;
    // The devices keep running the pinned version.
    let after = applied(&mut c).await?;
    for (device, (profile, v)) in &after {
        ensure!(
            profile != "mcu8" || *v == p,
            "{device} ({profile}) runs {v}, not the pinned {p}"
        );
    }
    up.terminate(Duration::from_secs(120)).await?;
    ensure!(pinned_at.elapsed()? > Duration::ZERO);

    // The pinned lane published nothing after the pin.
    let ds = decisions(&data)?;
    for d in &ds[held_from.min(ds.len())..] {
        if lane_of(d) == (TASK.to_string(), "mcu8".to_string()) {
            ensure!(
                !published(d),
                "the trainer published while the lane was pinned: {d}"
            );
            ensure!(
                d["reason"].as_str().unwrap_or_default().contains("pinned"),
                "a held decision should say the lane is pinned: {d}"
            );
        }
    }

    // 4. The data set: every device's predictions, versions never going down,
    // the pinned one last on mcu8 devices.
    let rows = predictions(&data.join("parquet"))?;
    let mut last: BTreeMap<&str, (i64, i64)> = BTreeMap::new();
    for (device, seq, version) in &rows {
        let Some(v) = version else { continue };
        if let Some((s, prev)) = last.get(device.as_str()) {
            ensure!(
                v >= prev,
                "{device}: model version went down from {prev} (seq {s}) to {v} (seq {seq})"
            );
        }
        last.insert(device, (*seq, *v));
    }
    ensure!(
        last.len() == DEVICES,
        "only {} of {DEVICES} devices sent predictions: {last:?}",
        last.len()
    );
    for (device, (profile, _)) in &after {
        if profile == "mcu8" {
            let (_, v) = last
                .get(device.as_str())
                .context("device without predictions")?;
            ensure!(
                *v == p as i64,
                "{device}'s last prediction names v{v}, not the pinned v{p}"
            );
        }
    }
    // The picture of the run draws the gate's decisions and the versions
    // the devices ran.
    let svg = std::fs::read_to_string(data.join("report.svg")).context("DIR/report.svg")?;
    for absent in [
        "no gate decision yet",
        "no device has sent a prediction yet",
    ] {
        ensure!(!svg.contains(absent), "the report says {absent:?}");
    }
    ensure!(
        svg.contains(">v1<") && svg.contains(">darkest: v"),
        "the report shows neither the first published version nor the versions on devices"
    );
    // The processor recomputed a sample of predictions: no mismatch.
    let log = std::fs::read_to_string(&up.log)?;
    let parity = log
        .lines()
        .find(|l| l.starts_with("parity:"))
        .with_context(|| format!("no parity line in the output of up:\n{}", up.tail_log()))?;
    let numbers: Vec<u64> = parity
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    ensure!(
        numbers.len() >= 2 && numbers[0] > 0 && numbers[1] == 0,
        "parity: expected checks and no mismatch: {parity}"
    );
    Ok(())
}
