use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Policy settings as written in a pipeline's TOML (`[policy]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Score at or above which a record counts as evidence, in (0, 1].
    pub enter_threshold: f64,
    /// Score below which an open incident closes, in [0, enter_threshold).
    pub exit_threshold: f64,
    /// Consecutive records of evidence that raise an incident, >= 1.
    pub evidence_records: u32,
    /// Hosts of one fault domain that may be under mitigation at once, >= 1.
    pub max_per_fault_domain: u32,
    /// Quiet time on a host after an action ended before the next one, ms (>= 0).
    pub cooldown_ms: i64,
    /// An action with no reported outcome after this long counts as failed, ms (> 0).
    pub action_timeout_ms: i64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            enter_threshold: 0.7,
            exit_threshold: 0.3,
            evidence_records: 3,
            max_per_fault_domain: 1,
            cooldown_ms: 2 * 3_600_000,
            action_timeout_ms: 2 * 3_600_000,
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

impl PolicyConfig {
    /// Validates every field; the error names the first bad one.
    pub fn check(self) -> Result<PolicyParams, ConfigError> {
        let bad = |field, value: String, expected| {
            Err(ConfigError {
                field,
                value,
                expected,
            })
        };
        if !(self.enter_threshold > 0.0 && self.enter_threshold <= 1.0) {
            return bad(
                "enter_threshold",
                self.enter_threshold.to_string(),
                "a number in (0, 1]",
            );
        }
        if !(self.exit_threshold >= 0.0 && self.exit_threshold < self.enter_threshold) {
            return bad(
                "exit_threshold",
                self.exit_threshold.to_string(),
                "a number in [0, enter_threshold)",
            );
        }
        if self.evidence_records == 0 {
            return bad("evidence_records", "0".into(), "an integer >= 1");
        }
        if self.max_per_fault_domain == 0 {
            return bad("max_per_fault_domain", "0".into(), "an integer >= 1");
        }
        if self.cooldown_ms < 0 {
            return bad(
                "cooldown_ms",
                self.cooldown_ms.to_string(),
                "a duration >= 0",
            );
        }
        if self.action_timeout_ms <= 0 {
            return bad(
                "action_timeout_ms",
                self.action_timeout_ms.to_string(),
                "a duration > 0",
            );
        }
        Ok(PolicyParams(self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let cases = [
            (
                "enter_threshold",
                PolicyConfig {
                    enter_threshold: 0.0,
                    ..Default::default()
                },
            ),
            (
                "exit_threshold",
                PolicyConfig {
                    exit_threshold: 0.9,
                    ..Default::default()
                },
            ),
            (
                "evidence_records",
                PolicyConfig {
                    evidence_records: 0,
                    ..Default::default()
                },
            ),
            (
                "max_per_fault_domain",
                PolicyConfig {
                    max_per_fault_domain: 0,
                    ..Default::default()
                },
            ),
            (
                "cooldown_ms",
                PolicyConfig {
                    cooldown_ms: -1,
                    ..Default::default()
                },
            ),
            (
                "action_timeout_ms",
                PolicyConfig {
                    action_timeout_ms: 0,
                    ..Default::default()
                },
            ),
        ];
        for (field, cfg) in cases {
            let err = cfg.check().unwrap_err();
            assert_eq!(err.field, field);
            assert!(err.to_string().starts_with(&format!("policy.{field} = ")));
        }
    }
}
