//! CPU and memory of the stack's processes, from /proc (Linux): CPU time of
//! the process and of each of its threads (grouped by thread name, so the
//! bridge's librdkafka threads, rumqttd's and tokio's show apart), and the
//! resident set size.

use std::collections::BTreeMap;
use std::path::Path;

/// Clock ticks per second of /proc's CPU times (`getconf CLK_TCK`): 100 on
/// every Linux architecture this runs on.
const TICKS_PER_SECOND: f64 = 100.0;

#[derive(Debug, Clone, Default)]
pub struct ProcSample {
    /// utime + stime, in seconds.
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    /// CPU seconds per thread-name group.
    pub threads: BTreeMap<String, f64>,
}

/// `(comm, utime + stime in seconds)` from the text of a /proc stat file.
fn parse_stat(text: &str) -> Option<(String, f64)> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let comm = text.get(open + 1..close)?.to_string();
    // After the comm: state is field 3 of stat(5); utime and stime are
    // fields 14 and 15.
    let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / TICKS_PER_SECOND))
}

/// A thread name without its trailing number (`rdk:broker3` → `rdk:broker`),
/// so that pools of threads add up.
fn thread_group(comm: &str) -> String {
    let trimmed = comm.trim_end_matches(|c: char| c.is_ascii_digit() || c == '#' || c == '-');
    if trimmed.is_empty() {
        comm.to_string()
    } else {
        trimmed.to_string()
    }
}

fn rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A sample of process `pid`, or `None` if it is gone (or not Linux).
pub fn sample(pid: u32) -> Option<ProcSample> {
    let dir = Path::new("/proc").join(pid.to_string());
    let (_, cpu_seconds) = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let rss_kib = rss_kib(&std::fs::read_to_string(dir.join("status")).ok()?).unwrap_or(0);
    let mut threads = BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(dir.join("task")) {
        for task in tasks.flatten() {
            if let Some((comm, secs)) = std::fs::read_to_string(task.path().join("stat"))
                .ok()
                .and_then(|t| parse_stat(&t))
            {
                *threads.entry(thread_group(&comm)).or_insert(0.0) += secs;
            }
        }
    }
    Some(ProcSample {
        cpu_seconds,
        rss_kib,
        threads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_spaces_in_the_name_parse() {
        let line = "1234 (rdk:broker 1) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        let (comm, secs) = parse_stat(line).unwrap();
        assert_eq!(comm, "rdk:broker 1");
        assert!((secs - 3.0).abs() < 1e-9);
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn thread_pools_group_by_name_and_rss_is_read_from_status() {
        assert_eq!(thread_group("rdk:broker12"), "rdk:broker");
        assert_eq!(thread_group("tokio-runtime-w"), "tokio-runtime-w");
        assert_eq!(thread_group("1234"), "1234");
        assert_eq!(rss_kib("Name:\tx\nVmRSS:\t   5120 kB\n"), Some(5120));
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = sample(std::process::id()).unwrap();
        assert!(s.rss_kib > 0);
        assert!(!s.threads.is_empty());
    }
}
