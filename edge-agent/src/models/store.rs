//! The model store on the device's disk.
//!
//! ```text
//! {dir}/{task}.update         the whole encoded ModelUpdate last applied for
//!                             the task (verified again at every start-up)
//! {dir}/{task}.update.tmp     a write in progress; removed at start-up
//! {dir}/quarantine/{file}.{unix micros}
//!                             a stored model that did not verify or load at
//!                             start-up: moved here, never deleted
//! ```
//!
//! A model is written to the temporary name, fsynced, renamed over
//! `{task}.update`, and the directory is fsynced: after a power cut the file
//! is the old model or the new one, never a mix.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

const SUFFIX: &str = ".update";
const TMP_SUFFIX: &str = ".update.tmp";

/// The file of `task`'s model in `dir`.
pub fn path_of(dir: &Path, task: &str) -> PathBuf {
    dir.join(format!("{task}{SUFFIX}"))
}

/// Writes `bytes` as `task`'s model, atomically and durably.
pub fn write_atomically(dir: &Path, task: &str, bytes: &[u8]) -> std::io::Result<()> {
    fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{task}{TMP_SUFFIX}"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path_of(dir, task))?;
    fs::File::open(dir)?.sync_all()
}

/// One file found in the store at start-up.
#[derive(Debug)]
pub enum Stored {
    Update {
        task: String,
        path: PathBuf,
        bytes: Vec<u8>,
    },
    Unreadable {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// Every `{task}.update` of `dir` (created if missing), in name order;
/// leftover temporary files of an interrupted write are removed (they were
/// never applied).
pub fn load_all(dir: &Path) -> std::io::Result<Vec<Stored>> {
    fs::create_dir_all(dir)?;
    let mut names = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if !entry.file_type()?.is_file() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(TMP_SUFFIX) {
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!(path = %entry.path().display(), error = %e, "could not remove an interrupted model write");
            }
        } else if let Some(task) = name.strip_suffix(SUFFIX) {
            names.push((task.to_string(), entry.path()));
        }
    }
    names.sort();
    Ok(names
        .into_iter()
        .map(|(task, path)| match fs::read(&path) {
            Ok(bytes) => Stored::Update { task, path, bytes },
            Err(error) => Stored::Unreadable { path, error },
        })
        .collect())
}

/// Moves `path` to `{dir}/quarantine/{file name}.{unix micros}`; returns
/// the new path.
pub fn quarantine(dir: &Path, path: &Path) -> std::io::Result<PathBuf> {
    let qdir = dir.join("quarantine");
    fs::create_dir_all(&qdir)?;
    let micros = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    let name = path
        .file_name()
        .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
    let to = qdir.join(format!("{name}.{micros}"));
    fs::rename(path, &to)?;
    fs::File::open(dir)?.sync_all()?;
    Ok(to)
}
