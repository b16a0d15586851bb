//! A bounded in-memory spool. It loses its contents when the process ends,
//! which is why the durable on-disk spool replaces it.

use std::collections::VecDeque;

use edgeloop_proto::v1::Reading;

use super::{Backlog, Spool, SpoolError};

pub struct MemorySpool {
    capacity: usize,
    /// seq of `readings[0]`.
    first_seq: u64,
    readings: VecDeque<Reading>,
    bytes: u64,
}

fn approx_bytes(r: &Reading) -> u64 {
    (16 + r.values.len() * 8 + r.true_label.len()) as u64
}

impl MemorySpool {
    pub fn new(capacity: usize) -> Self {
        MemorySpool {
            capacity,
            first_seq: 0,
            readings: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl Spool for MemorySpool {
    fn append(&mut self, readings: &mut Vec<Reading>) -> Result<usize, SpoolError> {
        let room = self.capacity.saturating_sub(self.readings.len());
        if room == 0 && !readings.is_empty() {
            return Err(SpoolError::Full {
                capacity: self.capacity,
            });
        }
        let take = room.min(readings.len());
        for r in readings.drain(..take) {
            self.bytes += approx_bytes(&r);
            self.readings.push_back(r);
        }
        Ok(take)
    }

    fn read(&self, from_seq: u64, max: usize) -> (u64, Vec<Reading>) {
        let from = from_seq.max(self.first_seq);
        let skip = (from - self.first_seq) as usize;
        let out: Vec<Reading> = self.readings.iter().skip(skip).take(max).cloned().collect();
        (from, out)
    }

    fn acknowledge(&mut self, committed_seq: u64) {
        while self.first_seq < committed_seq {
            match self.readings.pop_front() {
                Some(r) => {
                    self.bytes -= approx_bytes(&r);
                    self.first_seq += 1;
                }
                None => break,
            }
        }
    }

    fn next_seq(&self) -> u64 {
        self.first_seq + self.readings.len() as u64
    }

    fn first_unacked(&self) -> u64 {
        self.first_seq
    }

    fn backlog(&self) -> Backlog {
        Backlog {
            records: self.readings.len() as u64,
            bytes: self.bytes,
            oldest_ts_micros: self.readings.front().map(|r| r.ts_micros),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(ts: i64) -> Reading {
        Reading {
            ts_micros: ts,
            values: vec![ts as f64],
            true_label: String::new(),
        }
    }

    #[test]
    fn append_assigns_consecutive_seqs_and_ack_frees_below_the_watermark() {
        let mut s = MemorySpool::new(10);
        let mut batch: Vec<Reading> = (0..4).map(reading).collect();
        assert_eq!(s.append(&mut batch), Ok(4));
        assert_eq!(s.next_seq(), 4);
        let (first, got) = s.read(1, 2);
        assert_eq!(first, 1);
        assert_eq!(
            got.iter().map(|r| r.ts_micros).collect::<Vec<_>>(),
            vec![1, 2]
        );
        s.acknowledge(3);
        assert_eq!(s.first_unacked(), 3);
        assert_eq!(s.backlog().records, 1);
        // Reading below the watermark serves from the watermark.
        let (first, got) = s.read(0, 10);
        assert_eq!((first, got.len()), (3, 1));
        // An ack beyond what is held frees everything and no more.
        s.acknowledge(100);
        assert_eq!((s.first_unacked(), s.next_seq()), (4, 4));
    }

    #[test]
    fn full_spool_takes_what_fits_then_refuses() {
        let mut s = MemorySpool::new(3);
        let mut batch: Vec<Reading> = (0..5).map(reading).collect();
        assert_eq!(s.append(&mut batch), Ok(3));
        assert_eq!(batch.len(), 2);
        assert_eq!(s.append(&mut batch), Err(SpoolError::Full { capacity: 3 }));
        s.acknowledge(1);
        assert_eq!(s.append(&mut batch), Ok(1));
        assert_eq!(s.next_seq(), 4);
    }
}
