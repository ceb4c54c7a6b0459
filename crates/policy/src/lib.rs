//! The waterbear policy: failure risk in, safe mitigations out.
//!
//! For every scored record [`Policy::observe`] applies, in order:
//! 1. **Evidence with hysteresis**: a host raises an incident after
//!    `evidence_records` consecutive scores at or above `enter_threshold`; the incident
//!    closes when a score falls below `exit_threshold` and nothing is in flight.
//! 2. **Action by failure signature**, escalating inside one incident along a ladder:
//!    disk and thermal → live migration → out of rotation; host agent → Tardigrade
//!    phase 1 → phase 3 → live migration; memory and kernel → phase 3 → live migration;
//!    unresponsive → reboot → out of rotation.
//! 3. **Safety**: at most `max_per_fault_domain` hosts of one fault domain (of one
//!    cluster) under mitigation at once; no new action on a host in cooldown
//!    (`cooldown_ms` after its last action ended) or with an action in flight; an action
//!    with no outcome after `action_timeout_ms` is counted failed and frees its budget.
//!
//! Every [`Decision`] has a deterministic id (host, incident, action, generation) and
//! says why it was taken. Pure: time is an argument, there is no randomness.
//!
//! ```
//! use waterbear_models::{Score, Signature, Reasons};
//! use waterbear_policy::{HostInfo, Policy, PolicyConfig, Action, Outcome};
//!
//! let mut policy = Policy::new(PolicyConfig::default().check().unwrap());
//! let host = HostInfo { host_id: "h1", cluster: "c1", fault_domain: 0, update_domain: 0, vm_count: 3 };
//! let risky = Score { value: 0.95, signature: Signature::Disk, reasons: Reasons::default() };
//! let mut decision = None;
//! for i in 0..3 {
//!     decision = policy.observe(0, &host, i * 600_000, &risky, "rule-baseline@1");
//! }
//! let d = decision.expect("three records of evidence raise an incident");
//! assert_eq!(d.action, Action::LiveMigrate);
//! policy.report(&d.id, Outcome::Succeeded, 3 * 600_000);
//! ```

mod config;
mod decision;
mod engine;

pub use config::{ConfigError, PolicyConfig, PolicyParams};
pub use decision::{Action, Decision, Outcome, Phase, ReasonRecord, decision_id};
pub use engine::{HostInfo, HostKey, Policy, PolicyStats};
