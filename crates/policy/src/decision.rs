use serde::{Deserialize, Serialize};
use waterbear_features::Feature;
use waterbear_models::Signature;

/// A Tardigrade phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Phase 1: recycle host services; VMs untouched.
    RecycleServices,
    /// Phase 2: collect diagnostics.
    Diagnostics,
    /// Phase 3: freeze VMs, keep their memory in RAM, reset the host OS, resume.
    MemoryPreservingReset,
}

/// A mitigation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Action {
    /// Live-migrate every VM off the host, then take it out for repair.
    LiveMigrate,
    /// A Tardigrade phase.
    Tardigrade {
        /// Which phase.
        phase: Phase,
    },
    /// Reboot the host (interrupts its VMs).
    Reboot,
    /// Take the host out of rotation for repair.
    OutOfRotation,
}

impl Action {
    /// Short stable name, e.g. `live_migrate`, `tardigrade_phase3`.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::LiveMigrate => "live_migrate",
            Action::Tardigrade {
                phase: Phase::RecycleServices,
            } => "tardigrade_phase1",
            Action::Tardigrade {
                phase: Phase::Diagnostics,
            } => "tardigrade_phase2",
            Action::Tardigrade {
                phase: Phase::MemoryPreservingReset,
            } => "tardigrade_phase3",
            Action::Reboot => "reboot",
            Action::OutOfRotation => "out_of_rotation",
        }
    }

    /// Every action, for tables.
    pub const ALL: [Action; 6] = [
        Action::LiveMigrate,
        Action::Tardigrade {
            phase: Phase::RecycleServices,
        },
        Action::Tardigrade {
            phase: Phase::Diagnostics,
        },
        Action::Tardigrade {
            phase: Phase::MemoryPreservingReset,
        },
        Action::Reboot,
        Action::OutOfRotation,
    ];
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One feature's part in the score behind a decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReasonRecord {
    /// Feature name.
    pub feature: Feature,
    /// Its value.
    pub value: f64,
    /// Its contribution to the score.
    pub contribution: f64,
}

/// A mitigation the policy chose, with everything needed to explain it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Deterministic id: [`decision_id`] of host, incident, action and generation.
    pub id: String,
    /// Host.
    pub host_id: String,
    /// Cluster of the host.
    pub cluster: String,
    /// Fault domain of the host.
    pub fault_domain: u32,
    /// Update domain of the host.
    pub update_domain: u32,
    /// Incident number on this host (1 for its first).
    pub incident: u64,
    /// Step of the escalation ladder inside the incident (0 for the first action).
    pub generation: u32,
    /// What to do.
    pub action: Action,
    /// Time of the record that triggered it, ms.
    pub ts_ms: i64,
    /// The score that triggered it.
    pub score: f64,
    /// The failure signature.
    pub signature: Signature,
    /// The features that drove the score.
    pub reasons: Vec<ReasonRecord>,
    /// Detector name and version.
    pub model: String,
    /// Why, in one sentence.
    pub why: String,
}

/// How an action ended, as reported by the executor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status")]
pub enum Outcome {
    /// It did what it should.
    Succeeded,
    /// It did not; the host stays in the incident and may escalate.
    Failed {
        /// Why.
        reason: String,
    },
}

/// The id of a decision: 16 hex digits of FNV-1a over its identity. The same inputs
/// give the same id on any machine, so replays and retries de-duplicate.
pub fn decision_id(host_id: &str, incident: u64, action: Action, generation: u32) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(host_id.as_bytes());
    eat(&[0]);
    eat(&incident.to_le_bytes());
    eat(action.as_str().as_bytes());
    eat(&[0]);
    eat(&generation.to_le_bytes());
    format!("{h:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let a = decision_id("h1", 1, Action::LiveMigrate, 0);
        assert_eq!(a, decision_id("h1", 1, Action::LiveMigrate, 0));
        assert_ne!(a, decision_id("h1", 2, Action::LiveMigrate, 0));
        assert_ne!(a, decision_id("h1", 1, Action::Reboot, 0));
        assert_ne!(a, decision_id("h1", 1, Action::LiveMigrate, 1));
        assert_ne!(a, decision_id("h2", 1, Action::LiveMigrate, 0));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn decisions_serialise_with_readable_actions() {
        let json = serde_json::to_string(&Action::Tardigrade {
            phase: Phase::MemoryPreservingReset,
        })
        .unwrap();
        assert_eq!(
            json,
            r#"{"kind":"tardigrade","phase":"memory_preserving_reset"}"#
        );
    }
}
