//! The chaos soak, short: `edgeloop chaos` runs a whole stack of child
//! processes (Apache Kafka, broker, processor, four agents behind link proxies),
//! kills and restarts each kind of part and cuts links for a while, then
//! checks its invariants. This test asserts them from its JSON report,
//! recounts them from the data set and the spools with the test harness's
//! own reader, and shows that the check fails on a tampered data set.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use edgeloop_tests::{identity_counts, parquet_files, read_losses, read_rows};
use serde_json::Value;

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

/// Runs `edgeloop chaos ARGS --json`; returns the exit success, the parsed
/// report and the progress written on stderr.
async fn chaos(args: &[&str], limit: Duration) -> Result<(bool, Value, String)> {
    let child = tokio::process::Command::new(edgeloop_bin())
        .arg("chaos")
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting edgeloop chaos")?;
    let out = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .with_context(|| format!("edgeloop chaos did not finish within {limit:?}"))??;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let report: Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "edgeloop chaos printed no JSON report; stdout: {}; stderr: {stderr}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok((out.status.success(), report, stderr))
}

fn count(report: &Value, key: &str) -> Result<u64> {
    report[key]
        .as_u64()
        .with_context(|| format!("report has no count {key}: {report}"))
}

/// What a failed soak shows: its report, its progress lines, and the last
/// 40 lines of each of `logs` (paths under the run's directory).
fn failure_context(dir: &Path, report: &Value, stderr: &str, logs: &[&str]) -> String {
    let mut out = format!("report: {report:#}\nprogress:\n{stderr}");
    for name in logs {
        let text = std::fs::read_to_string(dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        out.push_str(&format!("\n{name} (tail):\n{tail}"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_lands_every_fsynced_reading_once_or_reports_it_lost() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("run");
    let (ok, report, stderr) = chaos(
        &[
            "--duration",
            "90s",
            "--devices",
            "4",
            "--seed",
            "20261130",
            "--fill-cut",
            "25s",
            "--data-dir",
            &dir.to_string_lossy(),
        ],
        Duration::from_secs(15 * 60),
    )
    .await?;
    // On failure: the tails of the processor's, Kafka's and the broker's
    // logs (the run's directory goes with the test), which say where a stall
    // was or why a part exited.
    let context = || {
        failure_context(
            &dir,
            &report,
            &stderr,
            &["logs/processor.log", "kafka/kafka.log", "logs/broker.log"],
        )
    };
    ensure!(ok, "edgeloop chaos failed; {}", context());
    ensure!(report["passed"] == Value::Bool(true), "{}", context());
    for key in [
        "duplicated",
        "lost_unexplained",
        "still_spooled",
        "unexpected_rows",
        "pending_loss_reports",
        "spool_problems",
        "undrained_devices",
    ] {
        ensure!(count(&report, key)? == 0, "{key} is not 0; {}", context());
    }
    // Every kind of fault was injected, and the small spool did evict.
    for fault in [
        "kill_broker",
        "kill_processor",
        "kill_kafka",
        "kill_agent",
        "cut_link",
        "fill_spool",
        "kill_cloud",
    ] {
        ensure!(
            report["faults"][fault].as_u64().unwrap_or(0) >= 1,
            "no {fault} injected; {}",
            context()
        );
    }
    let offered = count(&report, "offered")?;
    let landed = count(&report, "landed")?;
    let reported = count(&report, "lost_and_reported")?;
    ensure!(
        reported > 0,
        "device 0's full spool reported no loss; {}",
        context()
    );
    ensure!(offered == landed + reported, "{}", context());
    ensure!(landed > offered / 2, "{}", context());

    // The same verdict, recounted with the harness's reader from the data
    // set and each device's spool.
    let rows = read_rows(&dir.join("parquet"))?;
    let losses = read_losses(&dir.join("parquet"))?;
    let counts = identity_counts(&rows);
    ensure!(
        counts.values().all(|n| *n == 1),
        "a (device_id, seq) is duplicated"
    );
    ensure!(
        counts.len() as u64 == landed,
        "{} distinct rows, report says {landed}",
        counts.len()
    );
    let mut recounted = 0u64;
    let mut per_device: HashMap<String, u64> = HashMap::new();
    for entry in std::fs::read_dir(dir.join("spool"))? {
        let spool = entry?.path();
        let device = spool
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("spool directory without a name")?;
        let found = edgeloop_agent::spool::inspect::inspect(&spool)?;
        let next_seq = found
            .segments
            .iter()
            .map(|s| s.first_seq + s.records)
            .max()
            .unwrap_or(0);
        ensure!(
            found.acked == Some(next_seq),
            "{device}: spool not drained: {found}"
        );
        for seq in 0..next_seq as i64 {
            let landed = counts.contains_key(&(device.clone(), seq));
            let explained = losses
                .iter()
                .any(|l| l.device_id == device && l.first_seq <= seq && seq < l.end_seq);
            ensure!(
                landed || explained,
                "{device} seq {seq} is neither in readings nor in losses"
            );
        }
        per_device.insert(device, next_seq);
        recounted += next_seq;
    }
    ensure!(
        recounted == offered,
        "spools hold {recounted} readings, report says {offered}"
    );
    ensure!(per_device.len() == 4, "{per_device:?}");

    // The check can fail: a copied file is a duplicate, a missing file an
    // unexplained loss.
    let files = parquet_files(&dir.join("parquet"))?;
    let victim = files.first().context("no Parquet file")?.clone();
    let copy = victim.with_file_name("part-99999-00000000000000000000.parquet");
    std::fs::copy(&victim, &copy)?;
    let (ok, tampered, _) = chaos(
        &["--verify-only", "--data-dir", &dir.to_string_lossy()],
        Duration::from_secs(120),
    )
    .await?;
    ensure!(!ok, "a copied Parquet file passed: {tampered:#}");
    ensure!(count(&tampered, "duplicated")? > 0, "{tampered:#}");
    std::fs::remove_file(&copy)?;
    std::fs::remove_file(&victim)?;
    let (ok, tampered, _) = chaos(
        &["--verify-only", "--data-dir", &dir.to_string_lossy()],
        Duration::from_secs(120),
    )
    .await?;
    ensure!(!ok, "a deleted Parquet file passed: {tampered:#}");
    ensure!(count(&tampered, "lost_unexplained")? > 0, "{tampered:#}");
    ensure!(count(&tampered, "duplicated")? == 0, "{tampered:#}");
    Ok(())
}

/// Two broker replicas, every device linked to both: `kill_broker` kills one
/// (its devices move to the other through mqtt.fallback_servers) and
/// `roll_brokers` restarts both in turn; nothing is lost unexplained or
/// written twice. Faults come closer together than in the soak above, so
/// that all eight kinds are in within the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_soak_with_two_broker_replicas_killed_and_rolled_loses_nothing() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().join("run");
    let (ok, report, stderr) = chaos(
        &[
            "--duration",
            "100s",
            "--devices",
            "4",
            "--brokers",
            "2",
            "--seed",
            "20261206",
            "--min-gap",
            "1s",
            "--max-gap",
            "3s",
            "--max-down",
            "2s",
            "--fill-cut",
            "10s",
            "--data-dir",
            &dir.to_string_lossy(),
        ],
        Duration::from_secs(15 * 60),
    )
    .await?;
    let context = || {
        failure_context(
            &dir,
            &report,
            &stderr,
            &["logs/broker-0.log", "logs/broker-1.log"],
        )
    };
    ensure!(ok && report["passed"] == Value::Bool(true), "{}", context());
    for key in [
        "duplicated",
        "lost_unexplained",
        "still_spooled",
        "unexpected_rows",
        "undrained_devices",
    ] {
        ensure!(count(&report, key)? == 0, "{key} is not 0; {}", context());
    }
    ensure!(count(&report, "brokers")? == 2, "{}", context());
    for fault in ["kill_broker", "roll_brokers", "kill_cloud"] {
        ensure!(
            report["faults"][fault].as_u64().unwrap_or(0) >= 1,
            "no {fault} injected; {}",
            context()
        );
    }
    // A killed replica is named in the fault log.
    let killed_replica = report["fault_log"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|e| e["fault"] == "kill_broker" && e["broker"].is_u64());
    ensure!(
        killed_replica,
        "no kill_broker names its replica; {}",
        context()
    );
    ensure!(count(&report, "landed")? > 0, "{}", context());
    Ok(())
}

#[tokio::test]
async fn chaos_refuses_a_work_directory_that_is_not_empty() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::fs::write(tmp.path().join("leftover"), "x")?;
    let out = tokio::process::Command::new(edgeloop_bin())
        .args(["chaos", "--data-dir"])
        .arg(tmp.path())
        .output()
        .await?;
    ensure!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        stderr.contains("is not empty") && stderr.contains(&*tmp.path().to_string_lossy()),
        "{stderr}"
    );
    ensure!(!Path::new(&tmp.path().join("kafka")).exists());
    Ok(())
}
