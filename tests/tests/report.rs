//! `edgeloop report`: the picture of the loop, from a real run's data.
//!
//! `edgeloop up` runs the whole loop (Apache Kafka, broker, processor, a simulated
//! fleet) for a few seconds and writes DIR/report.svg at its end; resvg (a
//! real SVG renderer, installed by scripts/setup.sh) must render it, and it
//! must show what the data set holds. A corrupt Parquet file is then left
//! out and named, not fatal.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use edgeloop_tests::read_rows;

fn edgeloop_bin() -> PathBuf {
    std::env::var_os("EDGELOOP_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_edgeloop")))
}

fn run(cmd: &mut Command) -> Result<(String, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    ensure!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    Ok((stdout, stderr))
}

/// Renders `svg` to PNG with resvg; fails on anything resvg finds wrong
/// with the document (missing fonts aside: a machine may have none).
fn render(svg: &Path) -> Result<Vec<u8>> {
    let png = svg.with_extension("png");
    let (_, stderr) = run(Command::new("resvg").arg(svg).arg(&png))
        .context("rendering with resvg (pip package resvg-cli, installed by scripts/setup.sh)")?;
    let complaints: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("font-family"))
        .collect();
    ensure!(complaints.is_empty(), "resvg complained: {complaints:#?}");
    let bytes = std::fs::read(&png)?;
    ensure!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    // Width and height from the IHDR chunk.
    let w = u32::from_be_bytes(bytes[16..20].try_into()?);
    let h = u32::from_be_bytes(bytes[20..24].try_into()?);
    ensure!(w >= 800 && h >= 600, "a {w}x{h} picture");
    Ok(bytes)
}

/// The text of every `<text>` element, read by Python's XML parser (which
/// also proves the document well-formed).
fn texts(svg: &Path) -> Result<Vec<String>> {
    let script = "import sys, xml.etree.ElementTree as ET\n\
                  root = ET.parse(sys.argv[1]).getroot()\n\
                  assert root.tag == '{http://www.w3.org/2000/svg}svg', root.tag\n\
                  for t in root.iter('{http://www.w3.org/2000/svg}text'):\n    print(t.text)\n";
    let (out, _) = run(Command::new("python3").args(["-c", script]).arg(svg))?;
    Ok(out.lines().map(str::to_string).collect())
}

#[test]
fn up_draws_a_report_of_its_run_and_a_corrupt_file_is_left_out_and_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("run");
    let (stdout, _) = run(Command::new(edgeloop_bin()).args([
        "up",
        "--duration",
        "12s",
        "--devices",
        "4",
        "--data-dir",
        data.to_str().context("path")?,
    ]))?;
    let svg = data.join("report.svg");
    ensure!(
        stdout.contains(&format!("report: {}", svg.display())),
        "up did not say it wrote the report:\n{stdout}"
    );
    render(&svg)?;
    let text = texts(&svg)?;
    let root = data.join("parquet");
    let rows = read_rows(&root)?;
    ensure!(!rows.is_empty(), "the run wrote no readings");
    let heading = format!("{} readings from 4 devices", rows.len());
    ensure!(
        text.iter().any(|t| t.starts_with(&heading)),
        "no \"{heading}\" in {text:#?}"
    );
    for device in ["device-0000", "device-0001", "device-0002", "device-0003"] {
        ensure!(
            text.iter().any(|t| t == device),
            "{device} has no row in the report"
        );
    }
    for panel in [
        "Readings per device",
        "Labels over time",
        "Labelling rules",
        "Losses reported by devices",
    ] {
        ensure!(text.iter().any(|t| t == panel), "no panel {panel:?}");
    }
    ensure!(
        text.iter().any(|t| t.starts_with("all_in_band → normal")),
        "the rules panel lacks all_in_band"
    );

    // A corrupt file in the data set: left out, named, and the rest drawn.
    let readings = std::fs::read_dir(root.join("readings"))?
        .flatten()
        .next()
        .context("no date partition")?
        .path();
    let bad = readings.join("part-99999-00000000000000000000.parquet");
    std::fs::write(&bad, b"PAR1 this is not parquet")?;
    let out = dir.path().join("again.svg");
    let (stdout, stderr) = run(Command::new(edgeloop_bin()).args([
        "report",
        "--parquet-root",
        root.to_str().context("path")?,
        "--out",
        out.to_str().context("path")?,
    ]))?;
    ensure!(
        stderr.contains(&format!("left out {}", bad.display())),
        "the corrupt file is not named: {stderr}"
    );
    ensure!(
        stdout.contains(&format!("{} readings from 4 devices", rows.len())),
        "{stdout}"
    );
    render(&out)?;
    ensure!(
        texts(&out)?
            .iter()
            .any(|t| t.starts_with("1 file(s) could not be read")),
        "the report does not say a file was left out"
    );

    // Not a data set: a clear error.
    let out = Command::new(edgeloop_bin())
        .args(["report", "--data-dir"])
        .arg(dir.path().join("nothing"))
        .output()?;
    ensure!(!out.status.success(), "a missing data set was accepted");
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("has no readings table"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
