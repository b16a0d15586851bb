//! `edgeloop report`: the command around `edgeloop_processor::report`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use edgeloop_processor::report::{build_with_decisions, Summary};

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// Data directory of an `edgeloop up` run: reads DIR/parquet and writes
    /// DIR/report.svg unless --parquet-root / --out say otherwise.
    #[arg(long, env = "EDGELOOP_DATA_DIR", default_value = "data")]
    data_dir: PathBuf,
    /// Root of the Parquet data set (default: DATA_DIR/parquet).
    #[arg(long, env = "EDGELOOP_PARQUET_ROOT")]
    parquet_root: Option<PathBuf>,
    /// The trainer's directory, whose decisions.jsonl (the quality gate's
    /// decisions with their metrics) the models panel draws (default:
    /// DATA_DIR/trainer; the processor's `trainer.dir`).
    #[arg(long, env = "EDGELOOP_TRAINER_DIR")]
    trainer_dir: Option<PathBuf>,
    /// Where to write the SVG (default: DATA_DIR/report.svg; `-` for stdout).
    #[arg(long, short)]
    out: Option<PathBuf>,
}

/// Draws the report of the data set at `parquet_root` and the gate's
/// decision log `decisions` into `out`, written to a temporary name and
/// renamed, so a viewer never sees half a file.
pub fn write(parquet_root: &Path, decisions: Option<&Path>, out: &Path) -> Result<Summary> {
    let report = build_with_decisions(parquet_root, decisions)?;
    if out == Path::new("-") {
        print!("{}", report.svg);
        return Ok(report.summary);
    }
    let name = out
        .file_name()
        .with_context(|| format!("{}: not a file name", out.display()))?;
    let tmp = out.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    std::fs::write(&tmp, &report.svg).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, out).with_context(|| format!("writing {}", out.display()))?;
    Ok(report.summary)
}

pub fn run(args: ReportArgs) -> Result<()> {
    let root = args
        .parquet_root
        .unwrap_or_else(|| args.data_dir.join("parquet"));
    let out = args.out.unwrap_or_else(|| args.data_dir.join("report.svg"));
    let decisions = args
        .trainer_dir
        .unwrap_or_else(|| args.data_dir.join("trainer"))
        .join("decisions.jsonl");
    let summary = write(&root, Some(&decisions), &out)?;
    for (path, reason) in &summary.skipped {
        eprintln!("left out {}: {reason}", path.display());
    }
    if out != Path::new("-") {
        println!(
            "{}: {} readings from {} devices, {} labelled, {} lost and reported, {} rules, {} gate decisions ({} published), {} devices ran a model",
            out.display(),
            summary.readings,
            summary.devices,
            summary.labelled,
            summary.lost_readings,
            summary.rules,
            summary.decisions,
            summary.published,
            summary.devices_with_model
        );
    }
    Ok(())
}
