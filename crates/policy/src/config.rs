use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_models::Signature;

/// Horizons of the hazard-to-time-to-failure mapping, hours, per failure signature.
///
/// A detector score `p` of signature `s` is read as "probability that the host fails
/// within `H_s`". Under a constant hazard `λ`, `p = 1 − exp(−λ·H_s)`, so
/// `λ = −ln(1 − p) / H_s` and the expected time to failure is
/// `TTF = 1/λ = H_s / −ln(1 − p)` (a score of 0.63 predicts failure in `H_s`, 0.95 in
/// `H_s / 3`). The defaults follow the precursor lead times seen in the simulator and
/// in SMART histories: disks degrade over days, memory over a day, agents over hours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtfHorizons {
    /// Disk wear-out, hours (> 0).
    pub disk_h: f64,
    /// Memory (ECC), hours (> 0).
    pub memory_h: f64,
    /// Host agent, hours (> 0).
    pub host_agent_h: f64,
    /// Kernel, hours (> 0).
    pub kernel_h: f64,
    /// Thermal, hours (> 0).
    pub thermal_h: f64,
    /// No particular signature, hours (> 0).
    pub other_h: f64,
}

impl Default for TtfHorizons {
    fn default() -> Self {
        Self {
            disk_h: 72.0,
            memory_h: 24.0,
            host_agent_h: 8.0,
            kernel_h: 12.0,
            thermal_h: 4.0,
            other_h: 24.0,
        }
    }
}

impl TtfHorizons {
    /// Predicted time to failure, ms, for a score of `sig` (0 for unresponsive hosts:
    /// they are failing now; `i64::MAX` for a score of 0).
    pub fn ttf_ms(&self, sig: Signature, score: f64) -> i64 {
        let h = match sig {
            Signature::Disk => self.disk_h,
            Signature::Memory => self.memory_h,
            Signature::HostAgent => self.host_agent_h,
            Signature::Kernel => self.kernel_h,
            Signature::Thermal => self.thermal_h,
            Signature::None => self.other_h,
            Signature::Unresponsive => return 0,
        };
        let hazard = -(1.0 - score.clamp(0.0, 1.0 - 1e-12)).ln();
        if hazard <= 0.0 {
            return i64::MAX;
        }
        (h / hazard * 3_600_000.0).min(i64::MAX as f64 / 2.0) as i64
    }
}

/// Policy settings as written in a pipeline's TOML (`[policy]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Score at or above which a record counts as evidence, in (0, 1].
    pub enter_threshold: f64,
    /// Score below which an open incident closes (the host healed), in [0, enter_threshold).
    pub exit_threshold: f64,
    /// Consecutive records of evidence that raise an incident, >= 1.
    pub evidence_records: u32,
    /// Hosts of one fault domain (of one cluster) under mitigation at once, >= 1.
    pub max_per_fault_domain: u32,
    /// Hosts of one update domain (of one cluster) under mitigation at once, >= 1.
    pub max_per_update_domain: u32,
    /// Hosts carrying VMs of one availability set under mitigation at once, >= 1.
    /// A host that names no set (the pipeline's case: the telemetry carries no VM
    /// placement) belongs to one cluster-wide set, so this caps the cluster.
    pub max_per_availability_set: u32,
    /// Fleet-wide token bucket for evacuations (live migration, out of rotation):
    /// tokens added per hour of fleet time (> 0).
    pub evacuations_per_hour: f64,
    /// Size of that bucket: most evacuations started at once (>= 1).
    pub evacuation_burst: u32,
    /// Quiet time on a host after an action ended before the next one, ms (>= 0).
    pub cooldown_ms: i64,
    /// An action with no reported outcome after this long counts as failed, ms (> 0).
    pub action_timeout_ms: i64,
    /// After a healing step (Tardigrade phase 1 or 3, reboot) the next rung of the
    /// ladder waits this long for the score to fall under `exit_threshold`, ms (>= 0).
    pub heal_check_ms: i64,
    /// VMs a host can hold; migration targets are chosen below it (>= 1).
    pub host_vm_capacity: u32,
    /// Live-migration bandwidth, MiB/s (> 0); the executor's measurements update it
    /// through [`crate::Policy::set_migration_bandwidth`].
    pub migrate_mib_per_s: f64,
    /// Guest memory each VM dirties while it migrates, MiB/s (>= 0, < bandwidth).
    pub dirty_mib_per_s: f64,
    /// Fixed cost of migrating one VM (setup, switch-over), ms (>= 0).
    pub per_vm_migration_ms: i64,
    /// Hazard-to-time-to-failure horizons.
    pub ttf: TtfHorizons,
    /// Act early (skip the rest of the evidence, or jump the ladder to evacuation)
    /// when the predicted time to failure is under `urgency_factor` × the time the
    /// slower path needs, >= 1.
    pub urgency_factor: f64,
    /// Common-cause guard: hosts of one rack newly degraded within
    /// `common_cause_window_ms` that make an infrastructure incident (>= 2).
    pub common_cause_min_hosts: u32,
    /// ... and the share of the rack's hosts they must be, in (0, 1].
    pub common_cause_share: f64,
    /// Window of the common-cause guard, ms (> 0).
    pub common_cause_window_ms: i64,
    /// During an infrastructure incident, the share of the rack's hosts that may still
    /// be evacuated one by one (the worst first come first), in [0, 1): never the whole
    /// rack.
    pub common_cause_drain_share: f64,
    /// Circuit breaker: a host with no record for this long is missing, and a record
    /// this much older than the newest one seen is stale and not acted on, ms (> 0).
    pub stale_after_ms: i64,
    /// Circuit breaker: opens when more than this share of hosts is missing, in (0, 1].
    pub max_missing_share: f64,
    /// Circuit breaker: opens when more than this share of hosts scores at or above
    /// `enter_threshold`, in (0, 1].
    pub max_hot_share: f64,
    /// Circuit breaker: opens when the share of hosts at or above `enter_threshold`
    /// rises by more than this between two checks, in (0, 1].
    pub max_hot_share_jump: f64,
    /// Fleet time between two circuit-breaker checks, ms (> 0).
    pub breaker_check_ms: i64,
    /// Probation after a host healed or returned to service, ms (>= 0).
    pub probation_ms: i64,
    /// Enter threshold during probation, in (0, enter_threshold].
    pub probation_enter_threshold: f64,
    /// Evidence records needed during probation, in 1..=evidence_records.
    pub probation_evidence_records: u32,
    /// Shadow mode: decide and log, never act (decisions carry `shadow: true`, and the
    /// policy treats them as done at once).
    pub shadow: bool,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            enter_threshold: 0.7,
            exit_threshold: 0.3,
            evidence_records: 3,
            max_per_fault_domain: 1,
            max_per_update_domain: 2,
            max_per_availability_set: 4,
            evacuations_per_hour: 12.0,
            evacuation_burst: 6,
            cooldown_ms: 2 * 3_600_000,
            action_timeout_ms: 2 * 3_600_000,
            heal_check_ms: 3_600_000,
            host_vm_capacity: 16,
            migrate_mib_per_s: 1000.0,
            dirty_mib_per_s: 50.0,
            per_vm_migration_ms: 2_000,
            ttf: TtfHorizons::default(),
            urgency_factor: 2.0,
            common_cause_min_hosts: 4,
            common_cause_share: 0.2,
            common_cause_window_ms: 2 * 3_600_000,
            common_cause_drain_share: 0.25,
            stale_after_ms: 30 * 60_000,
            max_missing_share: 0.3,
            max_hot_share: 0.25,
            max_hot_share_jump: 0.1,
            breaker_check_ms: 10 * 60_000,
            probation_ms: 24 * 3_600_000,
            probation_enter_threshold: 0.5,
            probation_evidence_records: 1,
            shadow: false,
        }
    }
}

/// A [`PolicyConfig`] field out of range; the message names the field.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("policy.{field} = {value} is invalid: {expected}")]
pub struct ConfigError {
    /// Field name as written in TOML.
    pub field: &'static str,
    /// Its value, as text.
    pub value: String,
    /// What it must be.
    pub expected: &'static str,
}

/// Checked policy settings; only [`PolicyConfig::check`] makes them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyParams(PolicyConfig);

impl std::ops::Deref for PolicyParams {
    type Target = PolicyConfig;
    fn deref(&self) -> &PolicyConfig {
        &self.0
    }
}

impl Default for PolicyParams {
    fn default() -> Self {
        PolicyConfig::default()
            .check()
            .expect("the default policy config is valid")
    }
}

fn unit_open(x: f64) -> bool {
    x > 0.0 && x <= 1.0
}

impl PolicyConfig {
    /// Validates every field; the error names the first bad one.
    pub fn check(self) -> Result<PolicyParams, ConfigError> {
        fn bad(field: &'static str, value: impl ToString, expected: &'static str) -> ConfigError {
            ConfigError {
                field,
                value: value.to_string(),
                expected,
            }
        }
        let c = &self;
        let checks: [(bool, &'static str, String, &'static str); 29] = [
            (
                unit_open(c.enter_threshold),
                "enter_threshold",
                c.enter_threshold.to_string(),
                "a number in (0, 1]",
            ),
            (
                c.exit_threshold >= 0.0 && c.exit_threshold < c.enter_threshold,
                "exit_threshold",
                c.exit_threshold.to_string(),
                "a number in [0, enter_threshold)",
            ),
            (
                c.evidence_records >= 1,
                "evidence_records",
                c.evidence_records.to_string(),
                "an integer >= 1",
            ),
            (
                c.max_per_fault_domain >= 1,
                "max_per_fault_domain",
                c.max_per_fault_domain.to_string(),
                "an integer >= 1",
            ),
            (
                c.max_per_update_domain >= 1,
                "max_per_update_domain",
                c.max_per_update_domain.to_string(),
                "an integer >= 1",
            ),
            (
                c.max_per_availability_set >= 1,
                "max_per_availability_set",
                c.max_per_availability_set.to_string(),
                "an integer >= 1",
            ),
            (
                c.evacuations_per_hour.is_finite() && c.evacuations_per_hour > 0.0,
                "evacuations_per_hour",
                c.evacuations_per_hour.to_string(),
                "a number > 0",
            ),
            (
                c.evacuation_burst >= 1,
                "evacuation_burst",
                c.evacuation_burst.to_string(),
                "an integer >= 1",
            ),
            (
                c.cooldown_ms >= 0,
                "cooldown_ms",
                c.cooldown_ms.to_string(),
                "a duration >= 0",
            ),
            (
                c.action_timeout_ms > 0,
                "action_timeout_ms",
                c.action_timeout_ms.to_string(),
                "a duration > 0",
            ),
            (
                c.heal_check_ms >= 0,
                "heal_check_ms",
                c.heal_check_ms.to_string(),
                "a duration >= 0",
            ),
            (
                c.host_vm_capacity >= 1,
                "host_vm_capacity",
                c.host_vm_capacity.to_string(),
                "an integer >= 1",
            ),
            (
                c.migrate_mib_per_s.is_finite() && c.migrate_mib_per_s > 0.0,
                "migrate_mib_per_s",
                c.migrate_mib_per_s.to_string(),
                "a number > 0",
            ),
            (
                c.dirty_mib_per_s >= 0.0 && c.dirty_mib_per_s < c.migrate_mib_per_s,
                "dirty_mib_per_s",
                c.dirty_mib_per_s.to_string(),
                "a number in [0, migrate_mib_per_s)",
            ),
            (
                c.per_vm_migration_ms >= 0,
                "per_vm_migration_ms",
                c.per_vm_migration_ms.to_string(),
                "a duration >= 0",
            ),
            (
                c.ttf.disk_h.is_finite() && c.ttf.disk_h > 0.0,
                "ttf.disk_h",
                c.ttf.disk_h.to_string(),
                "a number > 0",
            ),
            (
                c.ttf.memory_h.is_finite() && c.ttf.memory_h > 0.0,
                "ttf.memory_h",
                c.ttf.memory_h.to_string(),
                "a number > 0",
            ),
            (
                c.ttf.host_agent_h.is_finite() && c.ttf.host_agent_h > 0.0,
                "ttf.host_agent_h",
                c.ttf.host_agent_h.to_string(),
                "a number > 0",
            ),
            (
                c.ttf.kernel_h.is_finite()
                    && c.ttf.kernel_h > 0.0
                    && c.ttf.thermal_h.is_finite()
                    && c.ttf.thermal_h > 0.0
                    && c.ttf.other_h.is_finite()
                    && c.ttf.other_h > 0.0,
                "ttf",
                format!(
                    "kernel_h {} thermal_h {} other_h {}",
                    c.ttf.kernel_h, c.ttf.thermal_h, c.ttf.other_h
                ),
                "every horizon a number > 0",
            ),
            (
                c.urgency_factor.is_finite() && c.urgency_factor >= 1.0,
                "urgency_factor",
                c.urgency_factor.to_string(),
                "a number >= 1",
            ),
            (
                c.common_cause_min_hosts >= 2,
                "common_cause_min_hosts",
                c.common_cause_min_hosts.to_string(),
                "an integer >= 2",
            ),
            (
                unit_open(c.common_cause_share),
                "common_cause_share",
                c.common_cause_share.to_string(),
                "a number in (0, 1]",
            ),
            (
                c.common_cause_window_ms > 0,
                "common_cause_window_ms",
                c.common_cause_window_ms.to_string(),
                "a duration > 0",
            ),
            (
                c.stale_after_ms > 0,
                "stale_after_ms",
                c.stale_after_ms.to_string(),
                "a duration > 0",
            ),
            (
                unit_open(c.max_missing_share),
                "max_missing_share",
                c.max_missing_share.to_string(),
                "a number in (0, 1]",
            ),
            (
                unit_open(c.max_hot_share),
                "max_hot_share",
                c.max_hot_share.to_string(),
                "a number in (0, 1]",
            ),
            (
                unit_open(c.max_hot_share_jump),
                "max_hot_share_jump",
                c.max_hot_share_jump.to_string(),
                "a number in (0, 1]",
            ),
            (
                c.breaker_check_ms > 0,
                "breaker_check_ms",
                c.breaker_check_ms.to_string(),
                "a duration > 0",
            ),
            (
                c.probation_ms >= 0,
                "probation_ms",
                c.probation_ms.to_string(),
                "a duration >= 0",
            ),
        ];
        for (ok, field, value, expected) in checks {
            if !ok {
                return Err(bad(field, value, expected));
            }
        }
        if !(c.common_cause_drain_share >= 0.0 && c.common_cause_drain_share < 1.0) {
            return Err(bad(
                "common_cause_drain_share",
                c.common_cause_drain_share,
                "a number in [0, 1)",
            ));
        }
        if !(c.probation_enter_threshold > 0.0 && c.probation_enter_threshold <= c.enter_threshold)
        {
            return Err(bad(
                "probation_enter_threshold",
                c.probation_enter_threshold,
                "a number in (0, enter_threshold]",
            ));
        }
        if !(1..=c.evidence_records).contains(&c.probation_evidence_records) {
            return Err(bad(
                "probation_evidence_records",
                c.probation_evidence_records,
                "an integer in 1..=evidence_records",
            ));
        }
        Ok(PolicyParams(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let d = PolicyConfig::default;
        let cases = [
            (
                "enter_threshold",
                PolicyConfig {
                    enter_threshold: 0.0,
                    ..d()
                },
            ),
            (
                "exit_threshold",
                PolicyConfig {
                    exit_threshold: 0.9,
                    ..d()
                },
            ),
            (
                "evidence_records",
                PolicyConfig {
                    evidence_records: 0,
                    ..d()
                },
            ),
            (
                "max_per_fault_domain",
                PolicyConfig {
                    max_per_fault_domain: 0,
                    ..d()
                },
            ),
            (
                "max_per_update_domain",
                PolicyConfig {
                    max_per_update_domain: 0,
                    ..d()
                },
            ),
            (
                "max_per_availability_set",
                PolicyConfig {
                    max_per_availability_set: 0,
                    ..d()
                },
            ),
            (
                "evacuations_per_hour",
                PolicyConfig {
                    evacuations_per_hour: f64::NAN,
                    ..d()
                },
            ),
            (
                "cooldown_ms",
                PolicyConfig {
                    cooldown_ms: -1,
                    ..d()
                },
            ),
            (
                "action_timeout_ms",
                PolicyConfig {
                    action_timeout_ms: 0,
                    ..d()
                },
            ),
            (
                "dirty_mib_per_s",
                PolicyConfig {
                    dirty_mib_per_s: 5000.0,
                    ..d()
                },
            ),
            (
                "ttf.disk_h",
                PolicyConfig {
                    ttf: TtfHorizons {
                        disk_h: 0.0,
                        ..Default::default()
                    },
                    ..d()
                },
            ),
            (
                "common_cause_min_hosts",
                PolicyConfig {
                    common_cause_min_hosts: 1,
                    ..d()
                },
            ),
            (
                "max_hot_share_jump",
                PolicyConfig {
                    max_hot_share_jump: 0.0,
                    ..d()
                },
            ),
            (
                "probation_enter_threshold",
                PolicyConfig {
                    probation_enter_threshold: 0.8,
                    ..d()
                },
            ),
            (
                "probation_evidence_records",
                PolicyConfig {
                    probation_evidence_records: 9,
                    ..d()
                },
            ),
        ];
        for (field, cfg) in cases {
            let err = cfg.check().unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().starts_with(&format!("policy.{field} = ")));
        }
    }

    #[test]
    fn ttf_mapping_is_documented_behaviour() {
        let t = TtfHorizons::default();
        let h = 3_600_000.0;
        // p = 1 - 1/e predicts failure in exactly the horizon
        let p = 1.0 - (-1.0f64).exp();
        assert!((t.ttf_ms(Signature::Disk, p) as f64 - 72.0 * h).abs() < 1000.0);
        // higher risk, sooner
        assert!(t.ttf_ms(Signature::Disk, 0.99) < t.ttf_ms(Signature::Disk, 0.7));
        assert_eq!(t.ttf_ms(Signature::Unresponsive, 0.5), 0);
        assert_eq!(t.ttf_ms(Signature::Disk, 0.0), i64::MAX);
        assert!(t.ttf_ms(Signature::Disk, 1.0) > 0);
    }
}
