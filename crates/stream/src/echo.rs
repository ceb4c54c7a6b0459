//! `EchoUpper`: a small reference [`Transform`] used by the tests, the
//! example job binary and the benchmark. It upper-cases UTF-8 payloads,
//! appends a per-key running count (its state), and sends payloads that are
//! not UTF-8 to the DLQ.

use std::collections::HashMap;

use crate::{Output, Record, Transform};

/// Upper-cases payloads; output payload is `UPPER|n` where `n` counts the
/// records of that key so far (1-based), output key = input key.
#[derive(Debug, Default)]
pub struct EchoUpper {
    counts: HashMap<Vec<u8>, (i32, u64)>,
    stateless: bool,
}

impl EchoUpper {
    /// Stateful echo (per-key counter persisted through the state topic).
    pub fn new() -> Self {
        Self::default()
    }

    /// Stateless echo: output payload is just `UPPER` and nothing is
    /// persisted (for the throughput benchmark's trivial transform).
    pub fn stateless() -> Self {
        Self {
            counts: HashMap::new(),
            stateless: true,
        }
    }

    /// Number of keys held in memory.
    pub fn keys(&self) -> usize {
        self.counts.len()
    }
}

impl Transform for EchoUpper {
    fn process(&mut self, r: &Record<'_>) -> Vec<Output> {
        let key = r.key.unwrap_or_default();
        let text = match std::str::from_utf8(r.payload) {
            Ok(t) => t,
            Err(e) => {
                return vec![Output::dlq(
                    r.key,
                    r.payload,
                    format!("payload is not UTF-8: {e}"),
                )];
            }
        };
        if self.stateless {
            return vec![Output::alert(key, text.to_uppercase())];
        }
        let entry = self.counts.entry(key.to_vec()).or_insert((r.partition, 0));
        entry.0 = r.partition;
        entry.1 += 1;
        vec![Output::alert(
            key,
            format!("{}|{}", text.to_uppercase(), entry.1),
        )]
    }

    fn state(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.counts
            .get(key)
            .map(|(_, n)| n.to_string().into_bytes())
    }

    fn restore(&mut self, partition: i32, key: &[u8], state: &[u8]) {
        match std::str::from_utf8(state)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        {
            Some(n) => {
                self.counts.insert(key.to_vec(), (partition, n));
            }
            None => tracing::warn!(partition, "ignoring unreadable state for a key"),
        }
    }

    fn forget_partition(&mut self, partition: i32) {
        self.counts.retain(|_, (p, _)| *p != partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Topic;

    fn rec<'a>(key: &'a [u8], payload: &'a [u8]) -> Record<'a> {
        Record {
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: Some(key),
            payload,
        }
    }

    #[test]
    fn counts_per_key_and_restores() {
        let mut t = EchoUpper::new();
        assert_eq!(t.process(&rec(b"k", b"ab"))[0].payload, b"AB|1");
        assert_eq!(t.process(&rec(b"k", b"cd"))[0].payload, b"CD|2");
        let s = t.state(b"k").unwrap();
        let mut u = EchoUpper::new();
        u.restore(0, b"k", &s);
        assert_eq!(u.process(&rec(b"k", b"x"))[0].payload, b"X|3");
        u.forget_partition(0);
        assert_eq!(u.keys(), 0);
    }

    #[test]
    fn non_utf8_goes_to_dlq_with_original_bytes() {
        let mut t = EchoUpper::new();
        let out = t.process(&rec(b"k", &[0xff, 0xfe]));
        assert_eq!(out[0].topic, Topic::Dlq);
        assert_eq!(out[0].payload, vec![0xff, 0xfe]);
        assert_eq!(out[0].headers[0].0, crate::DLQ_REASON_HEADER);
        assert_eq!(t.keys(), 0);
    }
}
