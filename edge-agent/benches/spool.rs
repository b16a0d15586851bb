//! Spool append throughput, side by side with SQLite (WAL mode, rusqlite)
//! committing the same batches at the same durability interval, plus the
//! disk's fsync rate as the physical bound, and the resident memory of the
//! process while the spool grows.
//!
//! `cargo bench -p edgeloop-agent --bench spool -- [READINGS] [SPOOL_MIB]`
//! (defaults: 2,000,000 readings; then a fill of 1024 MiB for the memory figure).
//! Prints figures; asserts nothing.

// A benchmark program: an I/O failure ends it with the reason, like a test.
#![allow(clippy::expect_used)]

use std::fs::{self, File};
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use edgeloop_agent::source::simulator::{Simulator, SimulatorConfig};
use edgeloop_agent::spool::disk::{DiskSpool, DiskSpoolConfig};
use edgeloop_agent::spool::Spool;
use edgeloop_proto::v1::Reading;
use edgeloop_proto::Message;

const BATCH: usize = 100;

fn readings(n: usize) -> Vec<Reading> {
    let mut sim = Simulator::new(SimulatorConfig::default());
    (0..n)
        .map(|i| Reading {
            ts_micros: 1_800_000_000_000_000 + i as i64 * 100_000,
            values: sim.next_reading().values,
            true_label: String::new(),
            predictions: Vec::new(),
        })
        .collect()
}

fn rss_kib() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn fsync_rate(dir: &Path) -> f64 {
    let mut f = File::create(dir.join("fsync-probe")).expect("probe file");
    let block = [0u8; 4096];
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        f.write_all(&block).expect("write");
        f.sync_data().expect("fdatasync");
        n += 1;
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    total
}

fn bench_spool(dir: &Path, data: &[Reading], interval: Duration) -> (f64, f64, u64) {
    let config = DiskSpoolConfig {
        dir: dir.to_path_buf(),
        max_bytes: 64 << 30,
        sync_interval: interval,
        ..DiskSpoolConfig::default()
    };
    let mut spool = DiskSpool::open(
        config,
        vec!["temperature".into(), "humidity".into(), "vibration".into()],
    )
    .expect("open");
    let start = Instant::now();
    let mut last_sync = Instant::now();
    let mut syncs = 0;
    for chunk in data.chunks(BATCH) {
        let mut batch = chunk.to_vec();
        spool.append(&mut batch).expect("append");
        if last_sync.elapsed() >= interval || spool.wants_sync() {
            spool.sync().expect("sync");
            last_sync = Instant::now();
            syncs += 1;
        }
    }
    spool.sync().expect("sync");
    let secs = start.elapsed().as_secs_f64();
    let bytes = dir_bytes(dir);
    (
        data.len() as f64 / secs,
        bytes as f64 / secs / 1e6,
        syncs + 1,
    )
}

fn bench_sqlite(dir: &Path, data: &[Reading], interval: Duration) -> (f64, f64, u64) {
    let db = rusqlite::Connection::open(dir.join("spool.db")).expect("open sqlite");
    db.pragma_update(None, "journal_mode", "WAL").expect("wal");
    db.pragma_update(None, "synchronous", "FULL")
        .expect("synchronous");
    db.execute(
        "CREATE TABLE readings (seq INTEGER PRIMARY KEY, payload BLOB NOT NULL)",
        [],
    )
    .expect("create");
    let start = Instant::now();
    let mut last_commit = Instant::now();
    let mut commits = 0;
    let mut seq = 0i64;
    let mut pending = 0u64;
    let sync_bytes = DiskSpoolConfig::default().sync_bytes;
    db.execute_batch("BEGIN").expect("begin");
    for chunk in data.chunks(BATCH) {
        {
            let mut insert = db
                .prepare_cached("INSERT INTO readings (seq, payload) VALUES (?1, ?2)")
                .expect("prepare");
            for r in chunk {
                let payload = r.encode_to_vec();
                pending += payload.len() as u64 + 16;
                insert
                    .execute(rusqlite::params![seq, payload])
                    .expect("insert");
                seq += 1;
            }
        }
        // The spool's group-commit rule: every interval, or once sync_bytes wait.
        if last_commit.elapsed() >= interval || pending >= sync_bytes {
            db.execute_batch("COMMIT; BEGIN").expect("commit");
            last_commit = Instant::now();
            pending = 0;
            commits += 1;
        }
    }
    db.execute_batch("COMMIT").expect("commit");
    let secs = start.elapsed().as_secs_f64();
    let bytes = dir_bytes(dir);
    (
        data.len() as f64 / secs,
        bytes as f64 / secs / 1e6,
        commits + 1,
    )
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(2_000_000);
    let fill_mib: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let interval = DiskSpoolConfig::default().sync_interval;
    let base = std::env::var_os("EDGELOOP_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tempfile::tempdir_in(base).expect("tempdir");
    println!("spool benchmark: {n} readings of 3 channels, appended {BATCH} at a time, durability interval {interval:?}");
    println!(
        "disk: {:.0} fsyncs/s (4 KiB write + fdatasync, 2 s)",
        fsync_rate(dir.path())
    );
    let data = readings(n);
    let spool_dir = dir.path().join("edgeloop");
    let (r, mb, syncs) = bench_spool(&spool_dir, &data, interval);
    println!(
        "edgeloop spool: {r:>12.0} readings/s  {mb:>7.1} MB/s on disk  ({syncs} group commits)"
    );
    let sqlite_dir = dir.path().join("sqlite");
    fs::create_dir_all(&sqlite_dir).expect("mkdir");
    let (sr, smb, commits) = bench_sqlite(&sqlite_dir, &data, interval);
    println!("SQLite WAL:     {sr:>12.0} readings/s  {smb:>7.1} MB/s on disk  ({commits} commits, synchronous=FULL)");
    println!("ratio edgeloop / SQLite: {:.2}x", r / sr);
    drop(data);
    fs::remove_dir_all(&spool_dir).ok();
    fs::remove_dir_all(&sqlite_dir).ok();

    // Memory while the spool grows to fill_mib: the spool keeps an index per
    // segment, not per reading, so resident memory stays flat.
    let fill_dir = dir.path().join("fill");
    let config = DiskSpoolConfig {
        dir: fill_dir.clone(),
        max_bytes: (fill_mib + 64) << 20,
        ..DiskSpoolConfig::default()
    };
    let mut spool = DiskSpool::open(
        config,
        vec!["temperature".into(), "humidity".into(), "vibration".into()],
    )
    .expect("open");
    let chunk = readings(10_000);
    let rss_start = rss_kib();
    let mut peak = rss_start;
    let mut marks = Vec::new();
    let start = Instant::now();
    let mut next_mark = 128u64;
    while spool.backlog().bytes < fill_mib << 20 {
        let mut batch = chunk.clone();
        spool.append(&mut batch).expect("append");
        spool.sync().expect("sync");
        peak = peak.max(rss_kib());
        if spool.backlog().bytes >= next_mark << 20 {
            marks.push((next_mark, rss_kib()));
            next_mark *= 2;
        }
    }
    println!(
        "fill to {fill_mib} MiB ({} readings) in {:.1} s: resident memory {} KiB at start, peak {} KiB; at {}",
        spool.next_seq(),
        start.elapsed().as_secs_f64(),
        rss_start,
        peak,
        marks.iter().map(|(m, k)| format!("{m} MiB: {k} KiB")).collect::<Vec<_>>().join(", ")
    );
}
