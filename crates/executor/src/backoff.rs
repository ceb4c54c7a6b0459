//! Retry schedule: exponential backoff with a cap and optional seeded jitter.
//! Pure: the same settings give the same schedule on any machine.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Exponential backoff: attempt `n` (1-based) failed, wait
/// `min(cap, base * factor^(n-1))`, scaled into `[d/2, d]` by a deterministic
/// jitter when `jitter_seed` is set. At most `max_attempts` attempts are made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Backoff {
    /// First delay, ms.
    pub base_ms: u64,
    /// Growth per attempt (>= 1).
    pub factor: u32,
    /// Largest delay, ms.
    pub cap_ms: u64,
    /// Attempts before giving up (>= 1).
    pub max_attempts: u32,
    /// Seed of the jitter; `None` for no jitter.
    pub jitter_seed: Option<u64>,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base_ms: 200,
            factor: 2,
            cap_ms: 10_000,
            max_attempts: 6,
            jitter_seed: None,
        }
    }
}

/// SplitMix64: a tiny, well-mixed, deterministic hash.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl Backoff {
    /// Delay after failed attempt `attempt` (1-based), ms; `None` once
    /// `attempt >= max_attempts` (no further attempt).
    pub fn delay_ms(&self, attempt: u32) -> Option<u64> {
        if attempt == 0 || attempt >= self.max_attempts {
            return None;
        }
        let factor = u64::from(self.factor.max(1));
        let mut d = self.base_ms.min(self.cap_ms);
        for _ in 1..attempt {
            d = d.saturating_mul(factor).min(self.cap_ms);
            if d == self.cap_ms {
                break;
            }
        }
        Some(match self.jitter_seed {
            None => d,
            Some(seed) => {
                let half = d / 2;
                let span = d - half + 1;
                half + splitmix64(seed ^ u64::from(attempt).wrapping_mul(0x2545_f491_4f6c_dd1d))
                    % span
            }
        })
    }

    /// [`Backoff::delay_ms`] as a duration.
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        self.delay_ms(attempt).map(Duration::from_millis)
    }

    /// Every delay of the schedule, in order.
    pub fn schedule(&self) -> Vec<u64> {
        (1..self.max_attempts)
            .map_while(|a| self.delay_ms(a))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubles_up_to_the_cap() {
        let b = Backoff {
            base_ms: 100,
            factor: 2,
            cap_ms: 1000,
            max_attempts: 7,
            jitter_seed: None,
        };
        assert_eq!(b.schedule(), vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(b.delay_ms(7), None);
        assert_eq!(b.delay_ms(0), None);
    }

    proptest! {
        #[test]
        fn schedule_is_bounded_monotone_and_deterministic(
            base in 0u64..10_000, factor in 1u32..10, cap in 0u64..1_000_000,
            max_attempts in 1u32..40, seed in proptest::option::of(any::<u64>()),
        ) {
            let b = Backoff { base_ms: base, factor, cap_ms: cap, max_attempts, jitter_seed: seed };
            let s = b.schedule();
            prop_assert_eq!(s.len() as u32, max_attempts - 1);
            prop_assert_eq!(&s, &b.clone().schedule());
            let plain = Backoff { jitter_seed: None, ..b.clone() };
            let p = plain.schedule();
            for w in p.windows(2) {
                prop_assert!(w[0] <= w[1]);
            }
            for (j, d) in s.iter().zip(&p) {
                prop_assert!(*j <= *d && *j >= d / 2, "jittered {} outside [{}/2, {}]", j, d, d);
                prop_assert!(*d <= cap);
            }
        }
    }
}
