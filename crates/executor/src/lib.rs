//! The recovery executor: turns [`Decision`]s into operations on a fleet [`Backend`]
//! and reports what happened ([`ExecutionReport`]), which the caller feeds back to the
//! policy as an [`Outcome`].
//!
//! Executing is idempotent per decision id: a decision seen again (a retry, a replay)
//! returns the first report and does nothing. [`SimBackend`] acts on the simulated
//! fleet of `waterbear-sim`; [`KvmBackend`] drives real host agents.
//!
//! Two executors:
//! * [`Executor`]: in memory, for the simulated fleet (demo, benchmarks).
//! * [`DurableExecutor`]: for real operations. It verifies each
//!   [`SignedDecision`] ([`auth`]), records every step of every operation in a
//!   [`Journal`] (redb), holds a fencing epoch so a stale executor cannot act,
//!   retries failed attempts with [`Backoff`], rolls back when it gives up, and
//!   resumes unfinished operations after a crash from their last recorded step.
//!
//! [`ExecutionReport`] is what is published (the `outcomes` topic in streaming
//! mode); its JSON form is kept stable: fields are only ever added, with serde
//! defaults, so older records still parse.
//!
//! ```
//! use waterbear_executor::{Executor, SimBackend};
//! use waterbear_sim::{Fleet, SimConfig};
//!
//! let fleet = Fleet::new(SimConfig { hosts: 10, ..SimConfig::default() }.check().unwrap());
//! let mut exec = Executor::new(SimBackend::new(fleet));
//! assert_eq!(exec.executed(), 0);
//! ```

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_policy::{Action, Decision, Outcome, Phase};
use waterbear_sim::{Fleet, SimError};

pub mod auth;
pub mod backoff;
mod durable;
pub mod journal;
pub mod kvm;
mod oplog;

pub use auth::{Key, Keyring, SignedDecision, sign, verify};
pub use backoff::Backoff;
pub use durable::{DurableExecutor, ExecError};
pub use journal::{Journal, JournalError, OpRecord, OpStatus, OutOfRotation, Step};
pub use kvm::{KvmBackend, KvmHost, KvmOptions};
pub use oplog::OpLog;

/// Why a backend operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BackendError {
    /// The simulated fleet refused.
    #[error("simulated fleet: {0}")]
    Sim(#[from] SimError),
    /// The backend cannot do this action.
    #[error("action {0} is not supported by this backend")]
    Unsupported(&'static str),
    /// Recording a step failed (e.g. a stale epoch): the operation must stop.
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The host is not mapped to an agent.
    #[error("host {0} has no agent")]
    UnknownHost(String),
    /// No host may receive the VMs.
    #[error("no target host for VMs of {0}")]
    NoTarget(String),
    /// A host agent failed or refused.
    #[error("agent {addr} while {step}: {detail}")]
    Agent {
        /// Agent address.
        addr: String,
        /// What was being done.
        step: &'static str,
        /// The cause.
        detail: String,
    },
    /// A host agent refused the command: it has seen a newer executor epoch.
    /// The operation must stop (like a stale epoch in the journal).
    #[error("agent {addr} refused epoch {epoch}: {detail}")]
    Fenced {
        /// Agent address.
        addr: String,
        /// This executor's epoch.
        epoch: u64,
        /// The agent's message.
        detail: String,
    },
    /// A condition did not hold before its deadline.
    #[error("timed out while {0}")]
    Timeout(String),
    /// A VM runs on neither source nor target (a migration whose commit was
    /// uncertain); needs an operator.
    #[error("VM {vm} runs on neither {from} nor {target}")]
    VmLost {
        /// VM name.
        vm: String,
        /// Source agent.
        from: String,
        /// Target agent.
        target: String,
    },
    /// A shadow-mode decision reached the executor; it is logged, never executed.
    #[error("shadow decision: logged, not executed")]
    Shadow,
}

/// What one operation did on the fleet.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpReport {
    /// VMs live-migrated away.
    pub vms_moved: u32,
    /// Guest memory moved, MiB.
    pub mem_moved_mib: u64,
    /// VMs paused with memory kept (Tardigrade phase 3).
    pub vms_frozen: u32,
    /// VMs interrupted (reboot).
    pub vms_interrupted: u32,
    /// Whether the operation cleared the host's fault (where the backend knows).
    pub healed: Option<bool>,
    /// How long the operation takes, ms (measured, or modelled by a simulated backend).
    pub duration_ms: i64,
    /// Figures measured on real VMs (absent for a simulated backend).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measured: Option<Measured>,
}

/// What a real operation measured. Figures of steps done by an executor that
/// crashed before seeing their result are missing (counted in `unmeasured`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Measured {
    /// Wall time of the operation as this executor saw it, ms.
    pub wall_ms: f64,
    /// Live migrations with a report.
    pub migrations: u32,
    /// Live migrations confirmed by querying the agents (report lost in a crash).
    pub unmeasured: u32,
    /// Longest migration downtime (source pause to STARTED), ms.
    pub downtime_max_ms: f64,
    /// Sum of migration downtimes, ms.
    pub downtime_total_ms: f64,
    /// Bytes sent by the migrations.
    pub bytes_sent: u64,
    /// Tardigrade phase-3 freeze (first pause to last resume), ms.
    pub freeze_ms: Option<f64>,
    /// Agent-measured duration of a phase 1/2, ms.
    pub phase_ms: Option<f64>,
}

/// A fleet the executor can act on. Every method acts on one host.
///
/// A backend whose operations take several steps overrides [`Backend::run`]
/// (and [`Backend::rollback`]) to record each step through the [`OpLog`] and to
/// continue from the last recorded step when an operation is resumed.
pub trait Backend {
    /// Runs `action` on `host`, recording steps in `op`. The default ignores
    /// `op` and calls the one-shot methods.
    fn run(
        &mut self,
        op: &mut OpLog<'_>,
        action: Action,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        let _ = op;
        match action {
            Action::LiveMigrate => self.live_migrate(host, accept),
            Action::Tardigrade { phase } => self.tardigrade(host, phase),
            Action::Reboot => self.reboot(host),
            Action::OutOfRotation => self.take_out(host, accept),
        }
    }

    /// Puts every VM `op` touched back into a single running copy (on the source,
    /// or on its target when it already committed), recording each resolution.
    /// The default has nothing to undo.
    fn rollback(&mut self, op: &mut OpLog<'_>, host: &str) -> Result<(), BackendError> {
        let _ = (op, host);
        Ok(())
    }

    /// Live-migrates every VM off `host` to hosts `accept` allows, then takes it out
    /// of rotation.
    fn live_migrate(
        &mut self,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError>;
    /// Runs a Tardigrade phase.
    fn tardigrade(&mut self, host: &str, phase: Phase) -> Result<OpReport, BackendError>;
    /// Reboots the host.
    fn reboot(&mut self, host: &str) -> Result<OpReport, BackendError>;
    /// Takes the host out of rotation (draining it first).
    fn take_out(
        &mut self,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        self.live_migrate(host, accept)
    }

    /// The hosts out of rotation, as the journal has them
    /// ([`Journal::out_of_rotation`]): a backend that picks migration targets
    /// never picks one of them. [`DurableExecutor`] calls it when it starts,
    /// before every decision and after [`DurableExecutor::return_to_rotation`];
    /// the default has no targets to pick.
    fn set_out_of_rotation(&mut self, hosts: std::collections::BTreeSet<String>) {
        let _ = hosts;
    }
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExecutionReport {
    /// The decision.
    pub decision_id: String,
    /// Its host.
    pub host_id: String,
    /// Its action.
    pub action: Action,
    /// When it was executed (the decision's time), ms.
    pub started_ms: i64,
    /// When it finished, ms.
    pub finished_ms: i64,
    /// What it did, if it succeeded.
    pub report: Option<OpReport>,
    /// Why it failed, if it did.
    pub error: Option<String>,
}

impl ExecutionReport {
    /// The outcome to feed back to the policy.
    pub fn outcome(&self) -> Outcome {
        match &self.error {
            None => Outcome::Succeeded,
            Some(reason) => Outcome::Failed {
                reason: reason.clone(),
            },
        }
    }
}

/// Executes decisions once each against a backend.
pub struct Executor<B: Backend> {
    backend: B,
    done: HashMap<String, ExecutionReport>,
}

impl<B: Backend> Executor<B> {
    /// An executor over `backend`.
    pub fn new(backend: B) -> Self {
        Self {
            backend,
            done: HashMap::new(),
        }
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (e.g. to step a simulated fleet).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Decisions executed so far.
    pub fn executed(&self) -> usize {
        self.done.len()
    }

    /// Executes `d` (once: a repeated id returns the first report unchanged).
    /// VMs go to the decision's proposed targets when it has some, else to hosts
    /// `accept` allows. A shadow decision is never executed: it fails with a reason.
    pub fn execute(&mut self, d: &Decision, accept: &dyn Fn(&str) -> bool) -> ExecutionReport {
        if let Some(r) = self.done.get(&d.id) {
            return r.clone();
        }
        let planned = |h: &str| d.targets.iter().any(|t| t.host_id == h);
        let accept: &dyn Fn(&str) -> bool = if d.targets.is_empty() {
            accept
        } else {
            &planned
        };
        let res = if d.shadow {
            Err(BackendError::Shadow)
        } else {
            match d.action {
                Action::LiveMigrate => self.backend.live_migrate(&d.host_id, accept),
                Action::Tardigrade { phase } => self.backend.tardigrade(&d.host_id, phase),
                Action::Reboot => self.backend.reboot(&d.host_id),
                Action::OutOfRotation => self.backend.take_out(&d.host_id, accept),
            }
        };
        let report = match res {
            Ok(op) => ExecutionReport {
                decision_id: d.id.clone(),
                host_id: d.host_id.clone(),
                action: d.action,
                started_ms: d.ts_ms,
                finished_ms: d.ts_ms + op.duration_ms,
                report: Some(op),
                error: None,
            },
            Err(e) => ExecutionReport {
                decision_id: d.id.clone(),
                host_id: d.host_id.clone(),
                action: d.action,
                started_ms: d.ts_ms,
                finished_ms: d.ts_ms,
                report: None,
                error: Some(e.to_string()),
            },
        };
        self.done.insert(d.id.clone(), report.clone());
        report
    }
}

/// Acts on a simulated [`Fleet`]. Durations are modelled: live migration moves guest
/// memory at `migrate_mib_per_s` plus a fixed cost per VM; phase 1 takes 30 s, phase 3
/// freezes VMs for 2 s within a 90 s reset, a reboot takes 5 minutes.
pub struct SimBackend {
    fleet: Fleet,
    /// Live-migration bandwidth, MiB/s.
    pub migrate_mib_per_s: f64,
}

impl SimBackend {
    /// Wraps a fleet.
    pub fn new(fleet: Fleet) -> Self {
        Self {
            fleet,
            migrate_mib_per_s: 1000.0,
        }
    }

    /// The fleet.
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The fleet, mutably.
    pub fn fleet_mut(&mut self) -> &mut Fleet {
        &mut self.fleet
    }

    /// Unwraps the fleet.
    pub fn into_fleet(self) -> Fleet {
        self.fleet
    }
}

impl Backend for SimBackend {
    fn live_migrate(
        &mut self,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        let rep = self.fleet.evacuate(host, accept)?;
        let mib: u64 = rep.moves.iter().map(|m| u64::from(m.mem_mib)).sum();
        Ok(OpReport {
            vms_moved: rep.moves.len() as u32,
            mem_moved_mib: mib,
            duration_ms: (mib as f64 / self.migrate_mib_per_s * 1000.0) as i64
                + 2_000 * rep.moves.len() as i64,
            ..OpReport::default()
        })
    }

    fn tardigrade(&mut self, host: &str, phase: Phase) -> Result<OpReport, BackendError> {
        let (n, duration_ms) = match phase {
            Phase::RecycleServices => (1, 30_000),
            Phase::Diagnostics => (2, 60_000),
            Phase::MemoryPreservingReset => (3, 90_000),
        };
        let rep = self.fleet.tardigrade(host, n)?;
        Ok(OpReport {
            vms_frozen: rep.vms_frozen,
            healed: Some(rep.healed),
            duration_ms,
            ..OpReport::default()
        })
    }

    fn reboot(&mut self, host: &str) -> Result<OpReport, BackendError> {
        let rep = self.fleet.reboot(host)?;
        Ok(OpReport {
            vms_interrupted: rep.vms_interrupted,
            healed: Some(rep.healed),
            duration_ms: 300_000,
            ..OpReport::default()
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use waterbear_models::Signature;
    use waterbear_sim::SimConfig;

    pub(crate) fn decision(host: &str, action: Action, id: &str) -> Decision {
        Decision {
            id: id.into(),
            host_id: host.into(),
            cluster: "c00".into(),
            fault_domain: 0,
            update_domain: 0,
            incident: 1,
            generation: 0,
            action,
            ts_ms: 1000,
            score: 0.9,
            signature: Signature::Disk,
            reasons: vec![],
            model: "m".into(),
            why: "test".into(),
            rule: "ladder".into(),
            window: Default::default(),
            ttf_ms: None,
            evacuation_ms: None,
            targets: vec![],
            alternatives: vec![],
            commands: vec![],
            shadow: false,
            features: None,
        }
    }

    /// A simulated fleet of `hosts` hosts with the default settings.
    fn sim_fleet(hosts: usize) -> Fleet {
        Fleet::new(
            SimConfig {
                hosts,
                ..SimConfig::default()
            }
            .check()
            .unwrap(),
        )
    }

    #[test]
    fn executes_each_decision_once() {
        let fleet = sim_fleet(20);
        let vms = fleet.host("host-00003").unwrap().vms as u32;
        let mut exec = Executor::new(SimBackend::new(fleet));
        let d = decision("host-00003", Action::LiveMigrate, "d1");
        let first = exec.execute(&d, &|_| true);
        assert_eq!(first.outcome(), Outcome::Succeeded);
        assert_eq!(first.report.as_ref().unwrap().vms_moved, vms);
        assert!(first.finished_ms > first.started_ms);
        // the host is now out of rotation; a replay must not try again (it would fail)
        assert_eq!(exec.execute(&d, &|_| true), first);
        assert_eq!(exec.executed(), 1);
        // a new decision on the drained host fails with a reason
        let again = exec.execute(&decision("host-00003", Action::Reboot, "d2"), &|_| true);
        assert!(
            matches!(again.outcome(), Outcome::Failed { reason } if reason.contains("not in service"))
        );
    }

    /// `ExecutionReport` is published (outcomes topic): v1 JSON must still parse
    /// and the field names must not change.
    #[test]
    fn execution_report_json_is_stable() {
        let v1 = r#"{"decision_id":"d1","host_id":"h1","action":{"kind":"live_migrate"},"started_ms":1,"finished_ms":2,"report":{"vms_moved":3,"mem_moved_mib":4,"vms_frozen":0,"vms_interrupted":0,"healed":null,"duration_ms":1},"error":null}"#;
        let r: ExecutionReport = serde_json::from_str(v1).unwrap();
        assert_eq!(r.report.as_ref().unwrap().measured, None);
        // without measurements the JSON is byte-for-byte the v1 form
        assert_eq!(serde_json::to_string(&r).unwrap(), v1);
        let mut m = r.clone();
        m.report.as_mut().unwrap().measured = Some(Measured {
            migrations: 1,
            downtime_max_ms: 1.5,
            ..Measured::default()
        });
        let json = serde_json::to_string(&m).unwrap();
        assert!(
            json.contains(r#""measured":{"wall_ms":0.0,"migrations":1,"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ExecutionReport>(&json).unwrap(), m);
        // a partial measured object parses (every field has a default)
        let partial = v1.replace(
            r#""duration_ms":1}"#,
            r#""duration_ms":1,"measured":{"freeze_ms":2.0}}"#,
        );
        let p: ExecutionReport = serde_json::from_str(&partial).unwrap();
        assert_eq!(p.report.unwrap().measured.unwrap().freeze_ms, Some(2.0));
    }

    #[test]
    fn honours_targets_and_never_executes_shadow_decisions() {
        let fleet = sim_fleet(20);
        let mut exec = Executor::new(SimBackend::new(fleet));
        let mut d = decision("host-00003", Action::LiveMigrate, "d1");
        d.targets = vec![waterbear_policy::Target {
            host_id: "host-00017".into(),
            vms: 16,
        }];
        let r = exec.execute(&d, &|_| true);
        let fleet = exec.backend().fleet();
        assert!(!fleet.host("host-00003").unwrap().in_service);
        assert!(r.report.unwrap().vms_moved > 0);
        let mut s = decision("host-00004", Action::Reboot, "d2");
        s.shadow = true;
        let r = exec.execute(&s, &|_| true);
        assert!(matches!(r.outcome(), Outcome::Failed { reason } if reason.contains("shadow")));
        assert_eq!(exec.backend().fleet().interruptions(), 0);
    }

    #[test]
    fn reboot_interrupts_and_phase3_freezes() {
        let fleet = sim_fleet(5);
        let vms = fleet.host("host-00001").unwrap().vms as u32;
        let mut exec = Executor::new(SimBackend::new(fleet));
        let r = exec.execute(&decision("host-00001", Action::Reboot, "a"), &|_| true);
        assert_eq!(r.report.unwrap().vms_interrupted, vms);
        let t = exec.execute(
            &decision(
                "host-00001",
                Action::Tardigrade {
                    phase: Phase::MemoryPreservingReset,
                },
                "b",
            ),
            &|_| true,
        );
        let rep = t.report.unwrap();
        assert_eq!((rep.vms_frozen, rep.vms_interrupted), (vms, 0));
        assert_eq!(exec.backend().fleet().interruptions(), u64::from(vms));
    }
}
