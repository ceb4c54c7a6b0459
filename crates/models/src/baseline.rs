use serde::{Deserialize, Serialize};
use waterbear_features::{Feature as F, FeatureVector};

use crate::detector::{Detector, Reason, Reasons, Score, Signature};

/// Scales of the rule baseline: each is the amount of evidence that yields a risk of
/// `1 − 1/e ≈ 0.63` on its own. Serde with defaults, so a pipeline's TOML can tune any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// Critical SMART counter increments over the window.
    pub smart_rise_scale: f64,
    /// Disk latency z-score above which latency counts as evidence.
    pub latency_z_onset: f64,
    /// z-score span over which latency evidence grows from 0 to its maximum.
    pub latency_z_span: f64,
    /// Corrected ECC errors over the window.
    pub ecc_rise_scale: f64,
    /// Heartbeat gaps over the window.
    pub heartbeat_gap_scale: f64,
    /// Service crashes over the window.
    pub crash_scale: f64,
    /// Kernel events over the window.
    pub kernel_scale: f64,
    /// Temperature (EWMA, °C) where thermal evidence starts.
    pub temp_onset_c: f64,
    /// Degrees above the onset that give full thermal evidence.
    pub temp_span_c: f64,
    /// Heartbeat age (s) from which a host counts as unresponsive.
    pub unresponsive_after_s: f64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            smart_rise_scale: 8.0,
            latency_z_onset: 4.0,
            latency_z_span: 8.0,
            ecc_rise_scale: 150.0,
            heartbeat_gap_scale: 3.0,
            crash_scale: 3.0,
            kernel_scale: 3.0,
            temp_onset_c: 50.0,
            temp_span_c: 10.0,
            unresponsive_after_s: 600.0,
        }
    }
}

/// The detector that needs no training: SMART rules, robust z-scores and event counts,
/// one noisy-OR of evidence per failure signature; the score is the strongest signature.
#[derive(Debug, Clone, Default)]
pub struct RuleBaseline {
    cfg: BaselineConfig,
}

impl RuleBaseline {
    /// A baseline with the given scales.
    pub fn new(cfg: BaselineConfig) -> Self {
        Self { cfg }
    }
}

/// `1 − exp(−x / scale)`, 0 for `x ≤ 0`.
#[inline]
fn saturate(x: f64, scale: f64) -> f64 {
    if x <= 0.0 {
        0.0
    } else {
        1.0 - (-x / scale).exp()
    }
}

#[inline]
fn ramp(x: f64, onset: f64, span: f64) -> f64 {
    ((x - onset) / span).clamp(0.0, 1.0)
}

struct Evidence {
    p_not: f64,
    reasons: Reasons,
}

impl Evidence {
    #[inline]
    fn new() -> Self {
        Self {
            p_not: 1.0,
            reasons: Reasons::default(),
        }
    }

    #[inline]
    fn add(&mut self, fv: &FeatureVector, feature: F, p: f64) {
        if p > 0.0 {
            self.p_not *= 1.0 - p;
            self.reasons.push(Reason {
                feature,
                value: fv[feature],
                contribution: p,
            });
        }
    }

    #[inline]
    fn risk(&self) -> f64 {
        1.0 - self.p_not
    }
}

impl Detector for RuleBaseline {
    fn name(&self) -> &str {
        "rule-baseline"
    }

    fn version(&self) -> &str {
        "1"
    }

    #[inline]
    fn score(&self, fv: &FeatureVector) -> Score {
        let c = &self.cfg;
        let mut best = Score::ZERO;
        let mut consider = |sig: Signature, ev: Evidence| {
            let v = ev.risk();
            if v > best.value {
                best = Score {
                    value: v,
                    signature: sig,
                    reasons: ev.reasons,
                };
            }
        };

        let mut disk = Evidence::new();
        disk.add(
            fv,
            F::SmartCritRiseW,
            saturate(fv[F::SmartCritRiseW], c.smart_rise_scale),
        );
        disk.add(
            fv,
            F::DiskLatencyZ,
            0.6 * ramp(fv[F::DiskLatencyZ], c.latency_z_onset, c.latency_z_span),
        );
        disk.add(fv, F::SmartCritAny, 0.05 * fv[F::SmartCritAny]);
        consider(Signature::Disk, disk);

        let mut mem = Evidence::new();
        mem.add(
            fv,
            F::EccCorrectedRiseW,
            saturate(fv[F::EccCorrectedRiseW], c.ecc_rise_scale),
        );
        mem.add(
            fv,
            F::EccUncorrectedRiseW,
            if fv[F::EccUncorrectedRiseW] > 0.0 {
                0.9
            } else {
                0.0
            },
        );
        consider(Signature::Memory, mem);

        let mut agent = Evidence::new();
        agent.add(
            fv,
            F::HeartbeatGapsW,
            saturate(fv[F::HeartbeatGapsW], c.heartbeat_gap_scale),
        );
        agent.add(
            fv,
            F::ServiceCrashesW,
            saturate(fv[F::ServiceCrashesW], c.crash_scale),
        );
        consider(Signature::HostAgent, agent);

        let mut kernel = Evidence::new();
        kernel.add(
            fv,
            F::KernelEventsW,
            saturate(fv[F::KernelEventsW], c.kernel_scale),
        );
        consider(Signature::Kernel, kernel);

        let mut thermal = Evidence::new();
        thermal.add(
            fv,
            F::TempEwma,
            0.95 * ramp(fv[F::TempEwma], c.temp_onset_c, c.temp_span_c),
        );
        thermal.add(fv, F::CpuUtilZ, 0.3 * ramp(-fv[F::CpuUtilZ], 4.0, 8.0));
        consider(Signature::Thermal, thermal);

        let mut dead = Evidence::new();
        dead.add(
            fv,
            F::HeartbeatAgeS,
            if fv[F::HeartbeatAgeS] >= c.unresponsive_after_s {
                0.99
            } else {
                0.0
            },
        );
        consider(Signature::Unresponsive, dead);

        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(pairs: &[(F, f64)]) -> FeatureVector {
        let mut fv = FeatureVector::default();
        for &(f, v) in pairs {
            fv[f] = v;
        }
        fv
    }

    #[test]
    fn quiet_host_scores_low_even_with_old_reallocated_sectors() {
        let d = RuleBaseline::default();
        let s = d.score(&with(&[
            (F::Smart5, 12.0),
            (F::SmartCritAny, 1.0),
            (F::TempEwma, 38.0),
        ]));
        assert!(s.value < 0.1, "{s:?}");
    }

    #[test]
    fn each_signature_is_recognised() {
        let d = RuleBaseline::default();
        let cases = [
            (
                with(&[(F::SmartCritRiseW, 30.0), (F::DiskLatencyZ, 9.0)]),
                Signature::Disk,
            ),
            (with(&[(F::EccCorrectedRiseW, 600.0)]), Signature::Memory),
            (with(&[(F::EccUncorrectedRiseW, 1.0)]), Signature::Memory),
            (
                with(&[(F::HeartbeatGapsW, 6.0), (F::ServiceCrashesW, 4.0)]),
                Signature::HostAgent,
            ),
            (with(&[(F::KernelEventsW, 9.0)]), Signature::Kernel),
            (with(&[(F::TempEwma, 80.0)]), Signature::Thermal),
            (with(&[(F::HeartbeatAgeS, 900.0)]), Signature::Unresponsive),
        ];
        for (fv, sig) in cases {
            let s = d.score(&fv);
            assert_eq!(s.signature, sig, "{s:?}");
            assert!(s.value > 0.8, "{sig}: {}", s.value);
            assert!(!s.reasons.is_empty());
        }
    }

    proptest::proptest! {
        #[test]
        fn score_is_a_probability_and_monotone_in_smart_rises(a in 0.0f64..100.0, b in 0.0f64..100.0, lat in -50.0f64..50.0) {
            let d = RuleBaseline::default();
            let lo = d.score(&with(&[(F::SmartCritRiseW, a.min(b)), (F::DiskLatencyZ, lat)]));
            let hi = d.score(&with(&[(F::SmartCritRiseW, a.max(b)), (F::DiskLatencyZ, lat)]));
            proptest::prop_assert!((0.0..=1.0).contains(&lo.value) && (0.0..=1.0).contains(&hi.value));
            proptest::prop_assert!(hi.value >= lo.value);
        }
    }
}
