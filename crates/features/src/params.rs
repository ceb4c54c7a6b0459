use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Feature parameters as written in a pipeline's TOML (`[features]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeatureConfig {
    /// Records in the rolling window (`W`), 1..=10000.
    pub window: usize,
    /// Weight of the newest value in fast EWMAs, in (0, 1].
    pub fast_alpha: f64,
    /// Weight of the newest value in the slow baselines used by z-scores, in (0, 1].
    pub slow_alpha: f64,
    /// Records of a host before its z-scores count (they are 0 before).
    pub warmup: u64,
    /// Heartbeat age above which a record counts as a heartbeat gap, seconds (> 0).
    pub heartbeat_gap_s: f64,
    /// "Hours since rise" when a counter never rose, and its upper bound (> 0).
    pub hours_cap: f64,
    /// Smallest standard deviation of CPU utilisation in z-scores (> 0).
    pub z_floor_cpu: f64,
    /// Smallest standard deviation of disk latency in z-scores, ms (> 0).
    pub z_floor_latency_ms: f64,
    /// Smallest standard deviation of total IOPS in z-scores (> 0).
    pub z_floor_iops: f64,
    /// z-scores are clipped to `[-z_clip, z_clip]` (> 0).
    pub z_clip: f64,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        Self {
            window: 36,
            fast_alpha: 0.3,
            slow_alpha: 0.02,
            warmup: 12,
            heartbeat_gap_s: 60.0,
            hours_cap: 10_000.0,
            z_floor_cpu: 0.02,
            z_floor_latency_ms: 0.5,
            z_floor_iops: 20.0,
            z_clip: 50.0,
        }
    }
}

/// A field of [`FeatureConfig`] that is out of its range.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("features.{field} = {value} is invalid: {expected}")]
pub struct ParamError {
    /// The field, as written in TOML.
    pub field: &'static str,
    /// Its value, as text.
    pub value: String,
    /// What it must be.
    pub expected: &'static str,
}

/// Checked feature parameters (the linfa "param guard" pattern: only
/// [`FeatureConfig::check`] makes one).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FeatureParams(FeatureConfig);

impl Default for FeatureParams {
    fn default() -> Self {
        FeatureConfig::default()
            .check()
            .expect("the default feature config is valid")
    }
}

impl std::ops::Deref for FeatureParams {
    type Target = FeatureConfig;
    fn deref(&self) -> &FeatureConfig {
        &self.0
    }
}

impl FeatureConfig {
    /// Validates every field; the error names the first bad one.
    pub fn check(self) -> Result<FeatureParams, ParamError> {
        let bad = |field, value: String, expected| {
            Err(ParamError {
                field,
                value,
                expected,
            })
        };
        if !(1..=10_000).contains(&self.window) {
            return bad("window", self.window.to_string(), "an integer in 1..=10000");
        }
        for (field, v) in [
            ("fast_alpha", self.fast_alpha),
            ("slow_alpha", self.slow_alpha),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return bad(field, v.to_string(), "a number in (0, 1]");
            }
        }
        for (field, v) in [
            ("heartbeat_gap_s", self.heartbeat_gap_s),
            ("hours_cap", self.hours_cap),
            ("z_floor_cpu", self.z_floor_cpu),
            ("z_floor_latency_ms", self.z_floor_latency_ms),
            ("z_floor_iops", self.z_floor_iops),
            ("z_clip", self.z_clip),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return bad(field, v.to_string(), "a finite number above 0");
            }
        }
        Ok(FeatureParams(self))
    }
}

impl FeatureConfig {
    /// Every field as `(name, value as text)`, in TOML order.
    fn fields(&self) -> [(&'static str, String); 10] {
        [
            ("window", self.window.to_string()),
            ("fast_alpha", format!("{:?}", self.fast_alpha)),
            ("slow_alpha", format!("{:?}", self.slow_alpha)),
            ("warmup", self.warmup.to_string()),
            ("heartbeat_gap_s", format!("{:?}", self.heartbeat_gap_s)),
            ("hours_cap", format!("{:?}", self.hours_cap)),
            ("z_floor_cpu", format!("{:?}", self.z_floor_cpu)),
            (
                "z_floor_latency_ms",
                format!("{:?}", self.z_floor_latency_ms),
            ),
            ("z_floor_iops", format!("{:?}", self.z_floor_iops)),
            ("z_clip", format!("{:?}", self.z_clip)),
        ]
    }

    /// The fields whose values differ, as `(field, self's value, other's value)` in
    /// TOML order (exact: `0.3` and `0.30000000000000004` differ).
    pub fn differences(&self, other: &FeatureConfig) -> Vec<(&'static str, String, String)> {
        self.fields()
            .into_iter()
            .zip(other.fields())
            .filter(|(a, b)| a.1 != b.1)
            .map(|(a, b)| (a.0, a.1, b.1))
            .collect()
    }
}

impl FeatureParams {
    /// The raw config these parameters came from.
    pub fn config(&self) -> &FeatureConfig {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bad_field_is_named() {
        let cases: Vec<(&str, FeatureConfig)> = vec![
            (
                "window",
                FeatureConfig {
                    window: 0,
                    ..Default::default()
                },
            ),
            (
                "fast_alpha",
                FeatureConfig {
                    fast_alpha: 0.0,
                    ..Default::default()
                },
            ),
            (
                "slow_alpha",
                FeatureConfig {
                    slow_alpha: 1.5,
                    ..Default::default()
                },
            ),
            (
                "hours_cap",
                FeatureConfig {
                    hours_cap: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "z_clip",
                FeatureConfig {
                    z_clip: -1.0,
                    ..Default::default()
                },
            ),
        ];
        for (field, cfg) in cases {
            let err = cfg.check().unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().starts_with(&format!("features.{field} = ")));
        }
        assert!(FeatureConfig::default().check().is_ok());
    }

    #[test]
    fn differences_name_each_field_that_differs() {
        let a = FeatureConfig::default();
        assert!(a.differences(&a.clone()).is_empty());
        let b = FeatureConfig {
            window: 14,
            z_clip: 50.000000001,
            ..Default::default()
        };
        let d = a.differences(&b);
        let names: Vec<&str> = d.iter().map(|x| x.0).collect();
        assert_eq!(names, ["window", "z_clip"]);
        assert_eq!((d[0].1.as_str(), d[0].2.as_str()), ("36", "14"));
    }
}
