use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Share of injected failures per mode; normalised at use, all must be >= 0.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailureMix {
    /// Disk wear-out with SMART precursors over days.
    pub disk: f64,
    /// Memory: corrected-ECC bursts, then an uncorrectable error.
    pub memory: f64,
    /// Host agent: heartbeat gaps and crash loops, then a hang.
    pub host_agent: f64,
    /// Kernel warnings, then a panic.
    pub kernel: f64,
    /// Thermal throttling, then a shutdown.
    pub thermal: f64,
    /// No precursor at all.
    pub sudden: f64,
}

impl Default for FailureMix {
    fn default() -> Self {
        Self {
            disk: 0.35,
            memory: 0.2,
            host_agent: 0.15,
            kernel: 0.1,
            thermal: 0.05,
            sudden: 0.15,
        }
    }
}

/// Simulator settings (`[sim]` in a pipeline TOML).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimConfig {
    /// Hosts in the fleet, 1..=1_000_000.
    pub hosts: usize,
    /// Fleet time to simulate, days (> 0).
    pub days: f64,
    /// Telemetry interval, seconds (>= 1).
    pub interval_s: i64,
    /// Seed of every random choice.
    pub seed: u64,
    /// Start of fleet time, ms since the Unix epoch.
    pub start_ms: i64,
    /// Hosts per cluster (>= 1).
    pub hosts_per_cluster: usize,
    /// Hosts per rack (>= 1).
    pub hosts_per_rack: usize,
    /// Fault domains per cluster (>= 1); a rack belongs to one.
    pub fault_domains: u32,
    /// Update domains per cluster (>= 1).
    pub update_domains: u32,
    /// Fewest VMs on a host at start.
    pub min_vms: u32,
    /// Most VMs on a host at start (>= min_vms).
    pub max_vms: u32,
    /// Most VMs a host can take (>= max_vms).
    pub vm_capacity: u32,
    /// Share of hosts that get an injected failure, in [0, 1].
    pub failure_fraction: f64,
    /// Modes of injected failures.
    pub failure_mix: FailureMix,
    /// Correlated rack incidents (cooling failures that hit most hosts of one rack).
    pub rack_incidents: u32,
    /// Share of healthy hosts with harmless but noisy SMART or ECC counters, in [0, 1].
    pub noisy_fraction: f64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            hosts: 500,
            days: 7.0,
            interval_s: 600,
            seed: 42,
            start_ms: 1_767_225_600_000, // 2026-01-01T00:00:00Z
            hosts_per_cluster: 250,
            hosts_per_rack: 20,
            fault_domains: 5,
            update_domains: 5,
            min_vms: 2,
            max_vms: 8,
            vm_capacity: 16,
            failure_fraction: 0.08,
            failure_mix: FailureMix::default(),
            rack_incidents: 1,
            noisy_fraction: 0.08,
        }
    }
}

/// A [`SimConfig`] field out of range; the message names the field.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("sim.{field} = {value} is invalid: {expected}")]
pub struct ConfigError {
    /// Field name as written in TOML.
    pub field: &'static str,
    /// Its value.
    pub value: String,
    /// What it must be.
    pub expected: &'static str,
}

/// Checked simulator settings.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SimParams(pub(crate) SimConfig);

impl std::ops::Deref for SimParams {
    type Target = SimConfig;
    fn deref(&self) -> &SimConfig {
        &self.0
    }
}

impl SimConfig {
    /// Validates every field; the error names the first bad one.
    pub fn check(self) -> Result<SimParams, ConfigError> {
        fn bad<T>(
            field: &'static str,
            value: impl ToString,
            expected: &'static str,
        ) -> Result<T, ConfigError> {
            Err(ConfigError {
                field,
                value: value.to_string(),
                expected,
            })
        }
        if !(1..=1_000_000).contains(&self.hosts) {
            return bad("hosts", self.hosts, "an integer in 1..=1000000");
        }
        if !(self.days.is_finite() && self.days > 0.0 && self.days <= 3650.0) {
            return bad("days", self.days, "a number in (0, 3650]");
        }
        if self.interval_s < 1 {
            return bad("interval_s", self.interval_s, "an integer >= 1");
        }
        if self.hosts_per_cluster == 0 {
            return bad("hosts_per_cluster", 0, "an integer >= 1");
        }
        if self.hosts_per_rack == 0 {
            return bad("hosts_per_rack", 0, "an integer >= 1");
        }
        if self.fault_domains == 0 {
            return bad("fault_domains", 0, "an integer >= 1");
        }
        if self.update_domains == 0 {
            return bad("update_domains", 0, "an integer >= 1");
        }
        if self.max_vms < self.min_vms {
            return bad("max_vms", self.max_vms, "an integer >= min_vms");
        }
        if self.vm_capacity < self.max_vms || self.vm_capacity == 0 {
            return bad(
                "vm_capacity",
                self.vm_capacity,
                "an integer >= max_vms and >= 1",
            );
        }
        if !(0.0..=1.0).contains(&self.failure_fraction) {
            return bad(
                "failure_fraction",
                self.failure_fraction,
                "a number in [0, 1]",
            );
        }
        if !(0.0..=1.0).contains(&self.noisy_fraction) {
            return bad("noisy_fraction", self.noisy_fraction, "a number in [0, 1]");
        }
        let m = &self.failure_mix;
        let parts = [
            ("failure_mix.disk", m.disk),
            ("failure_mix.memory", m.memory),
            ("failure_mix.host_agent", m.host_agent),
            ("failure_mix.kernel", m.kernel),
            ("failure_mix.thermal", m.thermal),
            ("failure_mix.sudden", m.sudden),
        ];
        for (field, v) in parts {
            if !(v.is_finite() && v >= 0.0) {
                return bad(field, v, "a finite number >= 0");
            }
        }
        if parts.iter().map(|p| p.1).sum::<f64>() <= 0.0 && self.failure_fraction > 0.0 {
            return bad("failure_mix", "all zero", "at least one share above 0");
        }
        Ok(SimParams(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                "hosts",
                SimConfig {
                    hosts: 0,
                    ..Default::default()
                },
            ),
            (
                "days",
                SimConfig {
                    days: f64::NAN,
                    ..Default::default()
                },
            ),
            (
                "max_vms",
                SimConfig {
                    min_vms: 5,
                    max_vms: 2,
                    ..Default::default()
                },
            ),
            (
                "failure_fraction",
                SimConfig {
                    failure_fraction: 2.0,
                    ..Default::default()
                },
            ),
            (
                "failure_mix.kernel",
                SimConfig {
                    failure_mix: FailureMix {
                        kernel: -1.0,
                        ..Default::default()
                    },
                    ..Default::default()
                },
            ),
        ];
        for (field, cfg) in cases {
            assert_eq!(cfg.check().unwrap_err().field, field);
        }
    }
}
