//! `edgeloop bench` against a real stack the harness starts: Apache Kafka, `edgeloop
//! broker` and `edgeloop processor` as child processes. The tests check the
//! bench's JSON report for consistency with itself and with the Parquet data
//! set read back independently; they never check speed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgeloop_kafka::local::LocalKafka;
use edgeloop_tests::{free_addr, read_rows, start_kafka, wait_for, Component};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_edgeloop");

async fn start_broker(
    dir: &Path,
    kafka: &LocalKafka,
    mqtt: SocketAddr,
    auth: &[&str],
) -> Result<Component> {
    let (listen, bootstrap) = (mqtt.to_string(), kafka.bootstrap());
    let mut args = vec!["broker", "--listen", &listen, "--kafka", &bootstrap];
    args.extend_from_slice(auth);
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

/// Runs `edgeloop bench ARGS --json`; its parsed report.
async fn bench(args: &[&str]) -> Result<Value> {
    let out = tokio::process::Command::new(BIN)
        .arg("bench")
        .args(args)
        .arg("--json")
        .env("EDGELOOP_LOG", "warn")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "bench failed: {stderr}");
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("bench output is not JSON; stderr: {stderr}"))
}

fn u(v: &Value, path: &[&str]) -> Result<u64> {
    let mut v = v;
    for p in path {
        v = &v[*p];
    }
    v.as_u64()
        .with_context(|| format!("{} is not a count: {v}", path.join(".")))
}

fn quantiles_are_ordered(q: &Value, what: &str) -> Result<()> {
    let f = |k: &str| q[k].as_f64().with_context(|| format!("{what}.{k}: {q}"));
    let (p50, p99, max) = (f("p50_ms")?, f("p99_ms")?, f("max_ms")?);
    ensure!(
        0.0 < p50 && p50 <= p99 && p99 <= max,
        "{what} quantiles out of order: {q}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_with_provisioned_credentials_reports_every_acknowledged_reading_landed_once(
) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let mqtt = free_addr()?;
    let credentials = dir.path().join("credentials.toml");
    std::fs::write(&credentials, "")?;
    let creds = credentials.to_string_lossy().into_owned();
    let broker = start_broker(dir.path(), &kafka, mqtt, &["--credentials", &creds]).await?;
    let parquet = dir.path().join("parquet");
    let metrics = free_addr()?;
    let (bootstrap, root, metrics_s) = (
        kafka.bootstrap(),
        parquet.to_string_lossy().into_owned(),
        metrics.to_string(),
    );
    let processor = Component::start(
        Path::new(BIN),
        "processor",
        &[
            "processor",
            "--kafka",
            &bootstrap,
            "--group-id",
            "bench-test",
            "--parquet-root",
            &root,
            "--max-age",
            "1s",
            "--metrics-listen",
            &metrics_s,
        ],
        dir.path(),
    )?;
    let spool = dir.path().join("spool").to_string_lossy().into_owned();
    let broker_pid = format!("broker={}", broker.pid().context("broker pid")?);
    let processor_pid = format!("processor={}", processor.pid().context("processor pid")?);
    let report = bench(&[
        "--mqtt",
        &mqtt.to_string(),
        "--devices",
        "20",
        "--rate",
        "50",
        "--batch-size",
        "10",
        "--duration",
        "4s",
        "--report-every",
        "1s",
        "--drain",
        "60s",
        "--prefix",
        "bt",
        "--spool-dir",
        &spool,
        "--provision-credentials",
        &creds,
        "--parquet-root",
        &root,
        "--processor-metrics",
        &metrics_s,
        "--pid",
        &broker_pid,
        "--pid",
        &processor_pid,
    ])
    .await?;

    // During the run: offered ≥ acknowledged ≥ landed, something acknowledged.
    let offered = u(&report, &["readings", "offered"])?;
    let acked = u(&report, &["readings", "acknowledged"])?;
    let landed = u(&report, &["readings", "landed"])?;
    ensure!(
        offered >= acked && acked >= landed && acked > 0,
        "run counts inconsistent: {}",
        report["readings"]
    );
    // After draining: everything offered was acknowledged and landed.
    let drained = &report["after_drain"];
    let (d_offered, d_acked, d_landed) = (
        u(&report, &["after_drain", "offered"])?,
        u(&report, &["after_drain", "acknowledged"])?,
        u(&report, &["after_drain", "landed"])?,
    );
    ensure!(
        d_offered >= offered && d_acked == d_offered && d_landed == d_acked,
        "after drain: {drained}"
    );
    ensure!(
        drained["all_acknowledged_landed"] == Value::Bool(true),
        "{drained}"
    );
    ensure!(
        u(&report, &["after_drain", "unacknowledged_left_in_spools"])? == 0,
        "{drained}"
    );
    // Latencies: one per acknowledged and per landed reading.
    let lat = &report["latency"];
    quantiles_are_ordered(&lat["reading_to_ack"], "reading_to_ack")?;
    quantiles_are_ordered(&lat["reading_to_parquet"], "reading_to_parquet")?;
    ensure!(u(lat, &["reading_to_ack", "count"])? == d_acked, "{lat}");
    ensure!(
        u(lat, &["reading_to_parquet", "count"])? == d_landed,
        "{lat}"
    );
    // Reading to Parquet includes reading to ack (Kafka holds it first).
    ensure!(
        lat["reading_to_parquet"]["p50_ms"].as_f64() >= lat["reading_to_ack"]["p50_ms"].as_f64(),
        "{lat}"
    );
    // The processes it was given, and its own.
    let procs = report["processes"].as_array().context("processes")?;
    for name in ["broker", "processor", "fleet"] {
        let p = procs
            .iter()
            .find(|p| p["name"] == name)
            .with_context(|| format!("no process {name}: {procs:?}"))?;
        ensure!(u(p, &["rss_kib_max"])? > 0, "{p}");
        ensure!(p["cpu_percent"].as_f64().is_some(), "{p}");
    }
    ensure!(
        !report["intervals"]
            .as_array()
            .context("intervals")?
            .is_empty(),
        "no progress intervals"
    );

    // The data set, read back independently: every seq of every bench
    // device exactly once, as many as the bench says landed.
    let rows = read_rows(&parquet)?;
    let mut per_device: HashMap<String, Vec<i64>> = HashMap::new();
    for r in rows.iter().filter(|r| r.device_id.starts_with("bt-")) {
        per_device
            .entry(r.device_id.clone())
            .or_default()
            .push(r.seq);
    }
    ensure!(
        per_device.len() == 20,
        "devices in Parquet: {}",
        per_device.len()
    );
    let mut total = 0;
    for (device, mut seqs) in per_device {
        seqs.sort_unstable();
        let n = seqs.len() as i64;
        ensure!(
            seqs.iter().copied().eq(0..n),
            "{device}: seqs are not 0..{n} exactly once"
        );
        total += n as u64;
    }
    ensure!(
        total == d_landed,
        "Parquet holds {total}, bench says {d_landed}"
    );
    drop(processor);
    drop(broker);
    kafka.stop(Duration::from_secs(5)).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bench_runs_anonymous_devices_against_a_broker_that_allows_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let kafka = start_kafka(dir.path()).await?;
    let mqtt = free_addr()?;
    let broker = start_broker(dir.path(), &kafka, mqtt, &["--allow-anonymous"]).await?;
    let report = bench(&[
        "--mqtt",
        &mqtt.to_string(),
        "--devices",
        "5",
        "--rate",
        "20",
        "--batch-size",
        "5",
        "--duration",
        "3s",
        "--report-every",
        "1s",
        "--drain",
        "30s",
    ])
    .await?;
    let offered = u(&report, &["after_drain", "offered"])?;
    ensure!(offered > 0, "{}", report["after_drain"]);
    ensure!(
        u(&report, &["after_drain", "acknowledged"])? == offered,
        "{}",
        report["after_drain"]
    );
    // No data set given: nothing claimed about it.
    ensure!(
        report["readings"]["landed"].is_null(),
        "{}",
        report["readings"]
    );
    ensure!(report["config"]["credentials"] == Value::Bool(false));
    drop(broker);
    kafka.stop(Duration::from_secs(5)).await;
    Ok(())
}
