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

/// The telemetry behind a decision: the host's records from the first of the evidence
/// streak to the one that triggered it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Window {
    /// Time of the first record of the streak, ms.
    pub first_ts_ms: i64,
    /// Time of the triggering record, ms.
    pub last_ts_ms: i64,
    /// Records in the streak.
    pub records: u32,
}

/// An action the policy considered and did not take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alternative {
    /// The action (an [`Action`] name, or `wait`).
    pub action: String,
    /// Why it was rejected.
    pub rejected: String,
}

/// A migration target the policy proposes: a healthy host with room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// Target host.
    pub host_id: String,
    /// VMs it should receive.
    pub vms: u32,
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
    /// The rule that fired, e.g. `ladder`, `urgent_ttf`, `override_force`, `probation`.
    #[serde(default)]
    pub rule: String,
    /// The telemetry window of the evidence.
    #[serde(default)]
    pub window: Window,
    /// Predicted time to failure from the score, ms (see [`crate::TtfHorizons`]).
    #[serde(default)]
    pub ttf_ms: Option<i64>,
    /// Predicted time to evacuate the host, ms.
    #[serde(default)]
    pub evacuation_ms: Option<i64>,
    /// Migration targets, for actions that move VMs.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// Actions considered and rejected.
    #[serde(default)]
    pub alternatives: Vec<Alternative>,
    /// Operator commands (ids) that shaped the decision.
    #[serde(default)]
    pub commands: Vec<String>,
    /// Decided in shadow mode: logged, never executed.
    #[serde(default)]
    pub shadow: bool,
    /// Every feature of the triggering record, by name (filled in by the pipeline).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub features: Option<std::collections::BTreeMap<String, f64>>,
}

/// What a [`Notice`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NoticeKind {
    /// Many hosts of one rack degraded together: one incident for the infrastructure,
    /// no per-host drains there, no evacuations into its fault domain.
    InfrastructureIncident,
    /// That incident ended.
    InfrastructureIncidentClosed,
    /// The circuit breaker opened: no new actions until it closes.
    CircuitBreakerOpen,
    /// The circuit breaker closed.
    CircuitBreakerClosed,
    /// An operator command was applied.
    Command,
    /// An operator command was refused.
    CommandRejected,
}

impl NoticeKind {
    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::InfrastructureIncident => "infrastructure_incident",
            NoticeKind::InfrastructureIncidentClosed => "infrastructure_incident_closed",
            NoticeKind::CircuitBreakerOpen => "circuit_breaker_open",
            NoticeKind::CircuitBreakerClosed => "circuit_breaker_closed",
            NoticeKind::Command => "command",
            NoticeKind::CommandRejected => "command_rejected",
        }
    }
}

/// A policy record that is not a mitigation: incidents of the infrastructure, the
/// circuit breaker, operator commands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notice {
    /// Deterministic id (FNV-1a of kind, scope and time).
    pub id: String,
    /// What happened.
    pub kind: NoticeKind,
    /// When, ms.
    pub ts_ms: i64,
    /// What it is about: `fleet`, `cluster c00`, `rack c00/r003`, `host h1`, ...
    pub scope: String,
    /// Hosts involved.
    pub hosts: Vec<String>,
    /// Why, in one sentence.
    pub why: String,
    /// The operator command, for command notices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Command>,
}

/// Where a pause applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "scope")]
pub enum Scope {
    /// One host.
    Host {
        /// Host id.
        host_id: String,
    },
    /// One fault domain of a cluster.
    FaultDomain {
        /// Cluster.
        cluster: String,
        /// Fault domain.
        fault_domain: u32,
    },
    /// One cluster.
    Cluster {
        /// Cluster.
        cluster: String,
    },
    /// Everything.
    Fleet,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Host { host_id } => write!(f, "host {host_id}"),
            Scope::FaultDomain {
                cluster,
                fault_domain,
            } => write!(f, "fault domain {cluster}/{fault_domain}"),
            Scope::Cluster { cluster } => write!(f, "cluster {cluster}"),
            Scope::Fleet => f.write_str("fleet"),
        }
    }
}

/// What an operator command does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "command")]
pub enum CommandKind {
    /// No new actions in the scope until resumed (actions in flight finish).
    Pause {
        /// Where.
        #[serde(flatten)]
        scope: Scope,
    },
    /// Lifts a pause of exactly this scope.
    Resume {
        /// Where.
        #[serde(flatten)]
        scope: Scope,
    },
    /// Take `action` on the host at its next record, without waiting for evidence
    /// (budgets, pauses, cooldowns and the circuit breaker still apply).
    Force {
        /// Host.
        host_id: String,
        /// Action.
        action: Action,
    },
    /// Never take `action` on the host (the ladder skips it) until allowed again.
    Forbid {
        /// Host.
        host_id: String,
        /// Action.
        action: Action,
    },
    /// Lifts a [`CommandKind::Forbid`].
    Allow {
        /// Host.
        host_id: String,
        /// Action.
        action: Action,
    },
    /// The host is back from repair: in rotation again, on probation.
    ReturnToService {
        /// Host.
        host_id: String,
    },
}

/// An operator command: an explicit, recorded input with an id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Command {
    /// Caller-chosen id, quoted by the decisions it shapes.
    pub id: String,
    /// When it was given, ms.
    pub ts_ms: i64,
    /// What it does.
    #[serde(flatten)]
    pub kind: CommandKind,
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
    let mut h: u64 = FNV_OFFSET;
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

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// The id of a notice: 16 hex digits of FNV-1a over kind, scope and time, prefixed `n-`.
pub fn notice_id(kind: NoticeKind, scope: &str, ts_ms: i64) -> String {
    let mut h = FNV_OFFSET;
    for &b in kind
        .as_str()
        .as_bytes()
        .iter()
        .chain(&[0])
        .chain(scope.as_bytes())
        .chain(&[0])
        .chain(&ts_ms.to_le_bytes())
    {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("n-{h:016x}")
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
