//! A spool directory whose one segment holds arbitrary bytes: opening it (the
//! recovery the agent runs at start) must never panic nor fail, and must leave
//! a spool that reads back.
#![no_main]

use edgeloop_agent::spool::disk::{DiskSpool, DiskSpoolConfig};
use edgeloop_agent::spool::Spool;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile_dir() else { return };
    let segments = dir.join("segments");
    if std::fs::create_dir_all(&segments).is_err() {
        return;
    }
    let _ = std::fs::write(segments.join("00000000000000000000.seg"), data);
    let config = DiskSpoolConfig {
        dir: dir.clone(),
        ..DiskSpoolConfig::default()
    };
    let mut spool =
        DiskSpool::open(config, vec!["v".into()]).expect("recovery never fails on bad bytes");
    let mut at = 0;
    while let Ok(Some(chunk)) = spool.read(at, 1000) {
        at = match chunk {
            edgeloop_agent::spool::Chunk::Readings {
                first_seq,
                readings,
                ..
            } => first_seq + readings.len() as u64,
            edgeloop_agent::spool::Chunk::Lost(l) => l.end_seq,
        };
    }
    drop(spool);
    let _ = std::fs::remove_dir_all(&dir);
});

fn tempfile_dir() -> std::io::Result<std::path::PathBuf> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "edgeloop-fuzz-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
