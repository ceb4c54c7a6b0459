use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::record::HostRecord;

/// Limits of the stateful checks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// How far a record's timestamp may be ahead of "now" (clock skew), ms.
    pub max_future_skew_ms: i64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_future_skew_ms: 5 * 60 * 1000,
        }
    }
}

/// A host's last accepted record, as far as the stateful checks need it. Plain
/// serde data, so a streaming job can persist it per host.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
pub struct LastAccepted {
    /// Timestamp, ms.
    pub ts_ms: i64,
    /// Cumulative counters in [`HostRecord::counters`] order.
    pub counters: [u64; 7],
}

/// The checks of [`Validator::check`] for one host, with its state passed in:
/// the static checks, a timestamp too far ahead of `now_ms` (skipped when `None`),
/// a timestamp that does not advance past `last`, counters going backwards.
/// Returns what to remember for the host on success.
pub fn check_host(
    rec: &HostRecord,
    last: Option<&LastAccepted>,
    now_ms: Option<i64>,
    max_future_skew_ms: i64,
) -> Result<LastAccepted, ValidationError> {
    rec.check()?;
    if let Some(now_ms) = now_ms {
        let ahead_ms = rec.ts_ms.saturating_sub(now_ms);
        if ahead_ms > max_future_skew_ms {
            return Err(ValidationError::FutureTimestamp {
                ts_ms: rec.ts_ms,
                now_ms,
                ahead_ms,
                max_skew_ms: max_future_skew_ms,
            });
        }
    }
    let counters = rec.counters();
    if let Some(last) = last {
        if rec.ts_ms <= last.ts_ms {
            return Err(ValidationError::OutOfOrder {
                ts_ms: rec.ts_ms,
                previous_ts_ms: last.ts_ms,
            });
        }
        for (i, (name, value)) in counters.iter().enumerate() {
            if *value < last.counters[i] {
                return Err(ValidationError::CounterWentBackwards {
                    field: (*name).to_owned(),
                    previous: last.counters[i],
                    current: *value,
                });
            }
        }
    }
    Ok(LastAccepted {
        ts_ms: rec.ts_ms,
        counters: counters.map(|(_, v)| v),
    })
}

/// Checks that need the host's previous accepted record: timestamps too far in the
/// future, timestamps that do not advance, cumulative counters that go backwards.
///
/// Pure: "now" is an argument. A rejected record does not change the state, so the next
/// good record is compared with the last good one.
#[derive(Debug, Default, Clone)]
pub struct Validator {
    limits: Limits,
    last: HashMap<String, LastAccepted>,
}

impl Validator {
    /// A validator with the given limits.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            last: HashMap::new(),
        }
    }

    /// Runs the static checks ([`HostRecord::check`]) and the stateful ones; on success
    /// remembers this record as the host's latest.
    pub fn check(&mut self, rec: &HostRecord, now_ms: i64) -> Result<(), ValidationError> {
        let snapshot = check_host(
            rec,
            self.last.get(rec.host_id.as_str()),
            Some(now_ms),
            self.limits.max_future_skew_ms,
        )?;
        match self.last.get_mut(rec.host_id.as_str()) {
            Some(slot) => *slot = snapshot,
            None => {
                self.last.insert(rec.host_id.clone(), snapshot);
            }
        }
        Ok(())
    }

    /// Forgets a host (e.g. after it was re-imaged and its counters reset).
    pub fn forget(&mut self, host_id: &str) {
        self.last.remove(host_id);
    }

    /// Number of hosts seen.
    pub fn hosts(&self) -> usize {
        self.last.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_000_000;

    #[test]
    fn future_timestamp_is_rejected_beyond_skew() {
        let mut v = Validator::default();
        let rec = HostRecord::example("h", T0 + 5 * 60 * 1000 + 1);
        let err = v.check(&rec, T0).unwrap_err();
        assert_eq!(err.kind(), "future_timestamp");
        // exactly at the skew limit is fine
        let rec = HostRecord::example("h", T0 + 5 * 60 * 1000);
        v.check(&rec, T0).unwrap();
    }

    #[test]
    fn counters_going_backwards_are_rejected_and_do_not_poison_state() {
        let mut v = Validator::default();
        let mut a = HostRecord::example("h", T0);
        a.ecc_corrected = 10;
        v.check(&a, T0).unwrap();
        let mut b = a.clone();
        b.ts_ms += 1000;
        b.ecc_corrected = 9;
        assert_eq!(
            v.check(&b, T0 + 1000).unwrap_err(),
            ValidationError::CounterWentBackwards {
                field: "ecc_corrected".into(),
                previous: 10,
                current: 9
            }
        );
        let mut c = a.clone();
        c.ts_ms += 2000;
        c.ecc_corrected = 10;
        v.check(&c, T0 + 2000).unwrap();
    }

    #[test]
    fn duplicate_or_reordered_timestamps_are_rejected() {
        let mut v = Validator::default();
        let a = HostRecord::example("h", T0);
        v.check(&a, T0).unwrap();
        assert_eq!(v.check(&a, T0).unwrap_err().kind(), "out_of_order");
        let other = HostRecord::example("other", T0);
        v.check(&other, T0).unwrap();
        assert_eq!(v.hosts(), 2);
        v.forget("h");
        v.check(&a, T0).unwrap();
    }
}
