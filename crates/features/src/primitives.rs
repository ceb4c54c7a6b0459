//! The building blocks of every feature; offline code reuses them where polars cannot
//! express a definition directly.

use serde::{Deserialize, Serialize};

/// Exponentially weighted moving average, `m_0 = x_0`, `m_i = (1−α)·m_{i−1} + α·x_i`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Ewma {
    value: f64,
    primed: bool,
}

impl Default for Ewma {
    fn default() -> Self {
        Self::new()
    }
}

impl Ewma {
    /// An average that has seen nothing.
    pub const fn new() -> Self {
        Self {
            value: 0.0,
            primed: false,
        }
    }

    /// Folds in `x` with weight `alpha` and returns the new average.
    #[inline]
    pub fn update(&mut self, x: f64, alpha: f64) -> f64 {
        self.value = if self.primed {
            (1.0 - alpha) * self.value + alpha * x
        } else {
            x
        };
        self.primed = true;
        self.value
    }

    /// The current average (0 before the first update).
    pub fn value(&self) -> f64 {
        self.value
    }

    /// Whether it has seen a value.
    pub fn is_primed(&self) -> bool {
        self.primed
    }
}

/// Slow exponentially weighted mean and second moment of a series, for z-scores.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EwMoments {
    mean: Ewma,
    sq: Ewma,
    n: u64,
}

impl EwMoments {
    /// Scores `x` against the moments so far (see [`zscore`]), then folds it in.
    #[inline]
    pub fn score_then_update(
        &mut self,
        x: f64,
        alpha: f64,
        warmup: u64,
        floor: f64,
        clip: f64,
    ) -> f64 {
        let z = if self.n < warmup {
            0.0
        } else {
            zscore(x, self.mean.value(), self.sq.value(), floor, clip)
        };
        self.mean.update(x, alpha);
        self.sq.update(x * x, alpha);
        self.n += 1;
        z
    }

    /// Mean so far.
    pub fn mean(&self) -> f64 {
        self.mean.value()
    }

    /// Variance so far (`E[x²] − E[x]²`, clamped at 0).
    pub fn variance(&self) -> f64 {
        (self.sq.value() - self.mean.value() * self.mean.value()).max(0.0)
    }
}

/// `clip((x − μ) / max(√max(q − μ², 0), floor), −clip, clip)`.
#[inline]
pub fn zscore(x: f64, mean: f64, mean_sq: f64, floor: f64, clip: f64) -> f64 {
    let sd = (mean_sq - mean * mean).max(0.0).sqrt().max(floor);
    ((x - mean) / sd).clamp(-clip, clip)
}

/// Sums of `K` quantities over the last `W` records, O(1) per record.
///
/// Values are stored as given; sums are kept exact for integer-valued inputs (all the
/// windowed quantities of [`crate::Feature`] are counts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RingSums<const K: usize> {
    #[serde(with = "ring_serde")]
    ring: Vec<[f64; K]>,
    pos: usize,
    len: usize,
    #[serde(with = "arr_serde")]
    sums: [f64; K],
}

impl<const K: usize> RingSums<K> {
    /// Sums over the last `window` records; `window` must be at least 1.
    pub fn new(window: usize) -> Self {
        let window = window.max(1);
        Self {
            ring: vec![[0.0; K]; window],
            pos: 0,
            len: 0,
            sums: [0.0; K],
        }
    }

    /// Adds this record's values (dropping the oldest when the window is full) and
    /// returns the sums over the window.
    #[inline]
    pub fn push(&mut self, values: [f64; K]) -> &[f64; K] {
        let full = self.len == self.ring.len();
        let slot = &mut self.ring[self.pos];
        if full {
            for (sum, old) in self.sums.iter_mut().zip(slot.iter()) {
                *sum -= old;
            }
        } else {
            self.len += 1;
        }
        for (sum, new) in self.sums.iter_mut().zip(values.iter()) {
            *sum += new;
        }
        *slot = values;
        self.pos += 1;
        if self.pos == self.ring.len() {
            self.pos = 0;
        }
        &self.sums
    }

    /// The sums over the window.
    pub fn sums(&self) -> &[f64; K] {
        &self.sums
    }
}

mod arr_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, const K: usize>(v: &[f64; K], s: S) -> Result<S::Ok, S::Error> {
        v.as_slice().serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const K: usize>(
        d: D,
    ) -> Result<[f64; K], D::Error> {
        let v = Vec::<f64>::deserialize(d)?;
        v.try_into().map_err(|v: Vec<f64>| {
            serde::de::Error::invalid_length(v.len(), &"one sum per windowed quantity")
        })
    }
}

mod ring_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer, const K: usize>(
        v: &[[f64; K]],
        s: S,
    ) -> Result<S::Ok, S::Error> {
        let flat: Vec<&[f64]> = v.iter().map(|r| r.as_slice()).collect();
        flat.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, const K: usize>(
        d: D,
    ) -> Result<Vec<[f64; K]>, D::Error> {
        let rows = Vec::<Vec<f64>>::deserialize(d)?;
        rows.into_iter()
            .map(|r| {
                r.try_into().map_err(|r: Vec<f64>| {
                    serde::de::Error::invalid_length(r.len(), &"one value per windowed quantity")
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn ring_sums_match_naive_window(window in 1usize..20, xs in proptest::collection::vec(0u32..1000, 0..200)) {
            let mut ring = RingSums::<2>::new(window);
            for i in 0..xs.len() {
                let got = *ring.push([f64::from(xs[i]), 1.0]);
                let lo = (i + 1).saturating_sub(window);
                let want: f64 = xs[lo..=i].iter().map(|&x| f64::from(x)).sum();
                prop_assert_eq!(got[0], want);
                prop_assert_eq!(got[1], (i + 1 - lo) as f64);
            }
        }

        #[test]
        fn ewma_matches_closed_form(alpha in 0.01f64..1.0, xs in proptest::collection::vec(-1e3f64..1e3, 1..100)) {
            let mut e = Ewma::new();
            for &x in &xs { e.update(x, alpha); }
            // closed form of the adjust=false recursion
            let n = xs.len();
            let mut want = (1.0 - alpha).powi((n - 1) as i32) * xs[0];
            for (i, &x) in xs.iter().enumerate().skip(1) {
                want += alpha * (1.0 - alpha).powi((n - 1 - i) as i32) * x;
            }
            prop_assert!((e.value() - want).abs() <= 1e-9 * (1.0 + want.abs()), "{} vs {}", e.value(), want);
        }

        #[test]
        fn moments_track_mean_and_variance(alpha in 0.01f64..0.5, xs in proptest::collection::vec(-100f64..100.0, 2..100)) {
            let mut m = EwMoments::default();
            let mut mean = Ewma::new();
            let mut sq = Ewma::new();
            for &x in &xs {
                let z = m.score_then_update(x, alpha, 0, 1e-3, 1e9);
                let want = zscore(x, mean.value(), sq.value(), 1e-3, 1e9);
                prop_assert!((z - want).abs() <= 1e-9 * (1.0 + want.abs()));
                mean.update(x, alpha);
                sq.update(x * x, alpha);
            }
            prop_assert!(m.variance() >= 0.0);
        }
    }

    #[test]
    fn zscore_respects_floor_and_clip() {
        assert_eq!(zscore(5.0, 5.0, 25.0, 0.5, 10.0), 0.0);
        assert_eq!(zscore(6.0, 5.0, 25.0, 0.5, 10.0), 2.0);
        assert_eq!(zscore(100.0, 5.0, 25.0, 0.5, 10.0), 10.0);
    }

    #[test]
    fn ring_serde_round_trips() {
        let mut r = RingSums::<3>::new(4);
        for i in 0..6 {
            r.push([f64::from(i), 1.0, 2.0]);
        }
        let back: RingSums<3> = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.sums(), &[2.0 + 3.0 + 4.0 + 5.0, 4.0, 8.0]);
        assert!(serde_json::from_str::<RingSums<2>>(&serde_json::to_string(&r).unwrap()).is_err());
    }
}
