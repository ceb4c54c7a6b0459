//! The waterbear policy: failure risk in, safe mitigations out.
//!
//! For every scored record [`Policy::observe`] applies, in order:
//! 1. **Evidence with hysteresis**: a host raises an incident after
//!    `evidence_records` consecutive scores at or above `enter_threshold`; the incident
//!    closes (the host healed) when a score falls below `exit_threshold` and nothing is
//!    in flight. A host that healed or came back from repair is on **probation** for
//!    `probation_ms`: a lower threshold and fewer records raise its next incident.
//! 2. **Escalation ladder** as in Tardigrade: phase 1 (recycle services) → phase 2
//!    (diagnostics) → phase 3 (memory-preserving reset) → live migration → reboot → out
//!    of rotation. Each signature enters at its own step ([`ladder_entry`]: host agent at
//!    phase 1, memory and kernel at phase 3, disk and thermal at live migration,
//!    unresponsive at reboot). After a healing step the next one waits `heal_check_ms`
//!    for the score to fall under `exit_threshold`; it is taken only if it did not.
//! 3. **Time**: the score maps to a predicted time to failure ([`TtfHorizons`], a
//!    constant-hazard reading), compared with the evacuation time (guest memory over
//!    bandwidth minus dirty rate, plus a per-VM cost). When waiting for evidence, or
//!    for a slow ladder step, would not fit, the policy acts early (`urgent_ttf`),
//!    jumps to live migration (`time_jump`), or takes phase 3 when migration itself is
//!    too slow (`faster_mitigation`).
//! 4. **Safety**: at most k hosts under mitigation per fault domain, update domain and
//!    availability set; a fleet-wide token bucket on evacuations; migration targets only
//!    among healthy hosts of the same cluster with room, another fault domain first; cooldowns; action
//!    timeouts; operator pauses (host, fault domain, cluster, fleet) and overrides
//!    (force, forbid) as recorded [`Command`]s.
//! 5. **Guards**: the common-cause guard turns many hosts of one rack degrading within a
//!    window into one `infrastructure_incident` [`Notice`] (no per-host drains there, no
//!    evacuations into its fault domain); the circuit breaker stops all new actions
//!    (and says so in a notice) when telemetry is stale or missing for a large share of
//!    hosts, or the share of hosts at risk jumps.
//! 6. **Shadow mode** (`shadow = true`): decisions are made and logged with
//!    `shadow: true`, never executed, to be scored later against what happened.
//!
//! Every [`Decision`] has a deterministic id (host, incident, action, generation) and
//! records the telemetry window, score and reasons, model, rule fired, predicted time
//! to failure and evacuation, targets, alternatives rejected with why, and the commands
//! that shaped it. Pure: time is an argument of every input, there is no I/O, no clock
//! and no randomness; [`Replay`] drives it from serialisable [`Input`]s.
//!
//! ```
//! use waterbear_models::{Score, Signature, Reasons};
//! use waterbear_policy::{HostInfo, Policy, PolicyConfig, Action, Outcome};
//!
//! let mut policy = Policy::new(PolicyConfig::default().check().unwrap());
//! let host = HostInfo {
//!     host_id: "h1", cluster: "c1", rack: "r1", fault_domain: 0, update_domain: 0,
//!     availability_sets: &[], vm_count: 3, vm_mem_mib: 12_288,
//! };
//! // a healthy host in another fault domain, with room for the VMs
//! let spare = HostInfo { host_id: "h2", rack: "r2", fault_domain: 1, vm_count: 1, ..host };
//! let risky = Score { value: 0.95, signature: Signature::Disk, reasons: Reasons::default() };
//! let mut decision = None;
//! for i in 0..3 {
//!     policy.observe(1, &spare, i * 600_000, &Score::ZERO, "rule-baseline@1");
//!     decision = policy.observe(0, &host, i * 600_000, &risky, "rule-baseline@1");
//! }
//! let d = decision.expect("three records of evidence raise an incident");
//! assert_eq!(d.action, Action::LiveMigrate);
//! assert_eq!(d.targets[0].host_id, "h2");
//! policy.report(&d.id, Outcome::Succeeded, 3 * 600_000);
//! ```

mod config;
mod decision;
mod engine;
mod replay;

pub use config::{ConfigError, PolicyConfig, PolicyParams, TtfHorizons};
pub use decision::{
    Action, Alternative, Command, CommandKind, Decision, Notice, NoticeKind, Outcome, Phase,
    ReasonRecord, Scope, Target, Window, decision_id, notice_id,
};
pub use engine::{
    BudgetKind, BudgetUse, HostInfo, LADDER, Policy, PolicySnapshot, PolicyStats, SNAPSHOT_VERSION,
    SnapshotError, ladder_entry,
};
pub use replay::{Input, ObserveInput, Output, Replay};
