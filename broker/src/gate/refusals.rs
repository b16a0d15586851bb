//! What the gate logs of a refusal, and how often.
//!
//! A client id, user name or topic comes from the client and may be 64 KiB
//! long: the log shows at most [`SHOWN_BYTES`] of it ([`shown`]), and never
//! a password. A client refused again and again (a misprovisioned device in
//! a reconnect loop, or someone guessing) must not fill the disk with the
//! same line: each source address may log [`BURST`] refusals at once and one
//! more every [`REFILL`]; the rest are counted (the gate's counters still
//! see every one) and the next line logged for that source says how many
//! were left out (`suppressed`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use std::time::Instant;

/// The longest part of a client-supplied string a log line shows.
pub const SHOWN_BYTES: usize = 64;

/// Refusal lines a source may log at once.
pub const BURST: u32 = 10;

/// A source earns one more refusal line this often.
pub const REFILL: Duration = Duration::from_secs(6);

/// Sources remembered at most; beyond, the oldest half is forgotten (a
/// forgotten source starts again with a full burst).
const MAX_SOURCES: usize = 10_000;

/// `s` for a log line: as it is up to [`SHOWN_BYTES`], otherwise its first
/// bytes (cut at a character boundary) and its length.
pub fn shown(s: &str) -> String {
    if s.len() <= SHOWN_BYTES {
        return s.to_string();
    }
    let mut end = SHOWN_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &s[..end], s.len())
}

/// [`shown`] of an optional string (`-` for none).
pub fn shown_opt(s: Option<&str>) -> String {
    s.map_or_else(|| "-".to_string(), shown)
}

struct Bucket {
    tokens: u32,
    refilled: Instant,
    suppressed: u64,
}

/// Per source address: whether a refusal may be logged now.
#[derive(Default)]
pub struct RefusalLog {
    sources: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RefusalLog {
    /// `Some(n)` if a refusal from `source` may be logged now, `n` being the
    /// refusals from it left out of the log since its last line; `None` if
    /// this one is left out.
    pub fn admit(&self, source: IpAddr) -> Option<u64> {
        self.admit_at(source, Instant::now())
    }

    /// [`RefusalLog::admit`] at `now`.
    pub fn admit_at(&self, source: IpAddr, now: Instant) -> Option<u64> {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.len() >= MAX_SOURCES && !sources.contains_key(&source) {
            let mut by_age: Vec<(Instant, IpAddr)> =
                sources.iter().map(|(ip, b)| (b.refilled, *ip)).collect();
            by_age.sort();
            for (_, ip) in by_age.iter().take(MAX_SOURCES / 2) {
                sources.remove(ip);
            }
        }
        let bucket = sources.entry(source).or_insert(Bucket {
            tokens: BURST,
            refilled: now,
            suppressed: 0,
        });
        let earned = now.duration_since(bucket.refilled).as_nanos() / REFILL.as_nanos();
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            bucket.tokens = bucket.tokens.saturating_add(earned).min(BURST);
            bucket.refilled += REFILL * earned.min(BURST);
            if bucket.tokens == BURST {
                bucket.refilled = now;
            }
        }
        if bucket.tokens == 0 {
            bucket.suppressed += 1;
            return None;
        }
        bucket.tokens -= 1;
        Some(std::mem::take(&mut bucket.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_client_strings_are_cut_at_a_character_boundary_with_their_length() {
        assert_eq!(shown("dev-1"), "dev-1");
        let long = "x".repeat(65_535);
        let s = shown(&long);
        assert!(s.len() < 100, "{s}");
        assert!(s.ends_with("… (65535 bytes)"), "{s}");
        // 'é' is two bytes: the cut never splits one.
        let accents = "é".repeat(100);
        assert!(shown(&accents).starts_with(&"é".repeat(32)));
        assert_eq!(shown_opt(None), "-");
    }

    #[test]
    fn a_source_logs_a_burst_then_one_refusal_per_refill_and_says_how_many_it_left_out() {
        let log = RefusalLog::default();
        let mut now = Instant::now();
        let a = IpAddr::from([10, 0, 0, 1]);
        let b = IpAddr::from([10, 0, 0, 2]);
        for _ in 0..BURST {
            assert_eq!(log.admit_at(a, now), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(log.admit_at(a, now), None);
        }
        // Another source is not held back by the first.
        assert_eq!(log.admit_at(b, now), Some(0));
        now += REFILL;
        assert_eq!(
            log.admit_at(a, now),
            Some(1000),
            "the next line counts the left-out ones"
        );
        assert_eq!(log.admit_at(a, now), None);
        // A long quiet spell earns a full burst again, not more.
        now += REFILL * 1000;
        for _ in 0..BURST {
            assert!(log.admit_at(a, now).is_some());
        }
        assert_eq!(log.admit_at(a, now), None);
    }
}
