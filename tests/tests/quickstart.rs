//! docs/quickstart-own-data.md, run as a user would: every `sh` block of the
//! page, in order, in one shell, in an empty directory, with the `edgeloop`
//! under test first on `PATH`. Then what the page promises is checked: the
//! replayed files landed whole and labelled by the page's rules, the
//! devices ran a model, DuckDB read the data set, the report was drawn.
//!
//! The only change to the page's commands: `up`'s listen addresses are
//! moved to free ports through their environment variables, so the test
//! does not depend on 1883, 9470, 9465 and 19092 being free.
//!
//! docs/standalone-stack.md is run the same way, against an Apache Kafka the
//! test starts, after the quickstart's first block (which makes the CSVs).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use edgeloop_tests::read_rows;

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

/// The page's `sh` blocks, in order.
fn shell_blocks(page: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in page.lines() {
        match (&mut current, line.trim_end()) {
            (None, "```sh") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(block), _) => {
                block.push_str(line);
                block.push('\n');
            }
            (None, _) => {}
        }
    }
    blocks
}

fn free_addr() -> Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

#[test]
fn the_quickstart_for_own_data_runs_as_written() -> Result<()> {
    let page_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/quickstart-own-data.md");
    let page = std::fs::read_to_string(&page_path)?;
    let blocks = shell_blocks(&page);
    ensure!(
        blocks.len() >= 6,
        "only {} sh blocks in the page",
        blocks.len()
    );
    let script = format!("set -euo pipefail\n{}", blocks.join("\n"));

    let dir = tempfile::tempdir()?;
    let bin_dir = edgeloop_bin()
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    let path = std::env::join_paths(std::iter::once(bin_dir).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))?;
    // The Kafka controller takes the port after the client one.
    let kafka = loop {
        let a: std::net::SocketAddr = free_addr()?.parse()?;
        let next = std::net::SocketAddr::new(a.ip(), a.port() + 1);
        if std::net::TcpListener::bind(next).is_ok() {
            break a;
        }
    };
    let out = Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path)
        .env("EDGELOOP_KAFKA_LISTEN", kafka.to_string())
        .env("EDGELOOP_MQTT_LISTEN", free_addr()?)
        .env("EDGELOOP_CONTROL_LISTEN", free_addr()?)
        .env("EDGELOOP_BROKER_METRICS_LISTEN", free_addr()?)
        .env_remove("EDGELOOP_DATA_DIR")
        .output()
        .context("running the quickstart's commands with bash")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        out.status.success(),
        "the quickstart failed ({}):\n{stdout}\n{}",
        out.status,
        stderr
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("\n")
    );
    let work = dir.path().join("own-data");

    // Both runs: every reading of both files landed once, labelled.
    for data in ["data", "data-replay"] {
        let rows = read_rows(&work.join(data).join("parquet"))?;
        let mut per_device: BTreeMap<String, usize> = BTreeMap::new();
        let mut labels: HashMap<String, usize> = HashMap::new();
        for r in &rows {
            *per_device.entry(r.device_id.clone()).or_default() += 1;
            *labels
                .entry(r.label.clone().unwrap_or_else(|| "(none)".into()))
                .or_default() += 1;
            ensure!(
                r.rules_version.as_deref() == Some("press-v1"),
                "{data}: a row without the page's rules: {:?}",
                r.rules_version
            );
        }
        ensure!(
            per_device == BTreeMap::from([("press-a".into(), 6000), ("press-b".into(), 6000)]),
            "{data}: rows per device {per_device:?}"
        );
        let unique: std::collections::HashSet<(String, i64)> =
            rows.iter().map(|r| (r.device_id.clone(), r.seq)).collect();
        ensure!(unique.len() == rows.len(), "{data}: duplicate rows");
        // 30 of every 500 readings are over pressure (the page's awk).
        ensure!(
            labels.get("fault") == Some(&720) && labels.get("normal") == Some(&11_280),
            "{data}: labels {labels:?}"
        );
    }
    // The run said where things went, and the devices ran the models.
    let log = std::fs::read_to_string(work.join("up.log"))?;
    let line = |start: &str| {
        log.lines()
            .find(|l| l.starts_with(start))
            .map(str::to_string)
            .with_context(|| format!("no {start:?} line in up's output:\n{log}"))
    };
    ensure!(
        line("done:")?
            .contains("12000 readings taken by 2 devices, 12000 acknowledged, 12000 written"),
        "{}",
        line("done:")?
    );
    let models = line("models:")?;
    ensure!(
        models.contains("label/gateway") && models.contains("label/mcu8"),
        "{models}"
    );
    ensure!(
        models.contains("devices ran at exit: gateway label v"),
        "the devices ran no model: {models}"
    );
    // DuckDB's answer to the page's query: both labels of both devices,
    // and the devices' predictions agreeing with the rules.
    for device in ["press-a", "press-b"] {
        for label in ["fault", "normal"] {
            ensure!(
                stdout
                    .lines()
                    .any(|l| l.contains(device) && l.contains(label)),
                "DuckDB printed no {device} {label} row:\n{stdout}"
            );
        }
    }
    ensure!(
        stdout
            .lines()
            .any(|l| l.contains("│ label") && !l.contains("device_id")),
        "DuckDB printed no prediction row:\n{stdout}"
    );
    ensure!(
        work.join("data/report.svg").is_file(),
        "no report.svg:\n{stdout}"
    );
    Ok(())
}

/// `edgeloop` first on `PATH`.
fn path_with_edgeloop() -> Result<std::ffi::OsString> {
    let bin_dir = edgeloop_bin()
        .parent()
        .context("the binary's directory")?
        .to_path_buf();
    Ok(std::env::join_paths(std::iter::once(bin_dir).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stack_by_hand_runs_as_written() -> Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let quickstart = shell_blocks(&std::fs::read_to_string(
        root.join("docs/quickstart-own-data.md"),
    )?);
    let page = shell_blocks(&std::fs::read_to_string(
        root.join("docs/standalone-stack.md"),
    )?);
    ensure!(page.len() >= 7, "only {} sh blocks in the page", page.len());
    for port in [1883, 9464, 9465] {
        ensure!(
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port}, which the page uses, is taken on this machine"
        );
    }
    let dir = tempfile::tempdir()?;
    let kafka = edgeloop_tests::start_kafka(dir.path()).await?;
    // The quickstart's first block makes the CSVs in own-data/.
    // Whatever the page left running ends with the shell (a failed step
    // would otherwise leave the broker holding the output pipe).
    let script = format!(
        "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{}\n{}",
        quickstart[0],
        page.join("\n")
    );
    let out = tokio::process::Command::new("bash")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path_with_edgeloop()?)
        .env("KAFKA", kafka.bootstrap())
        .env("EDGELOOP_LOG", "info")
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(600), out)
        .await
        .context("the page's commands did not finish within 10 minutes")??;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(40).collect();
    ensure!(
        out.status.success(),
        "the page failed ({}):\n{stdout}\n{}",
        out.status,
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let stack = dir.path().join("own-data/stack");
    let rows = read_rows(&stack.join("parquet"))?;
    ensure!(rows.len() == 12_000, "{} rows in Parquet", rows.len());
    ensure!(
        rows.iter().all(|r| r.label.is_some()),
        "a row without a label"
    );
    // The processor's exit summary, and models the trainer published.
    ensure!(
        stderr.contains("parity:") && stderr.contains("label/gateway"),
        "no exit summary with the gateway model in the processor's log:\n{stderr}"
    );
    ensure!(
        stdout.contains("processor.toml: ok: processor config")
            && stdout.contains("rules_file rules.toml: 2 rules, version press-v1"),
        "edgeloop check did not pass the page's processor config:\n{stdout}"
    );
    Ok(())
}

#[test]
fn a_page_s_shell_blocks_are_found_in_order() {
    let page = "text\n```sh\necho a\n```\n```toml\nx = 1\n```\n```sh\necho b\necho c\n```\n";
    assert_eq!(shell_blocks(page), ["echo a\n", "echo b\necho c\n"]);
}
