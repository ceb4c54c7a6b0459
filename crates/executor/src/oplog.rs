//! [`OpLog`]: a backend's handle on the operation it is running.

use crate::BackendError;
use crate::journal::{Journal, Step, VmPhase};

/// The steps of one operation so far, and the way to record the next one.
/// Backed by the [`Journal`] under the executor's epoch (each step is durable
/// before `step` returns), or ephemeral (in memory, for one-shot calls).
///
/// A crash point can be armed (tests): after the step of that name is recorded
/// (or at a named point such as `migration_in_flight`), `crash` is called.
pub struct OpLog<'a> {
    journal: Option<&'a Journal>,
    epoch: u64,
    op_id: String,
    steps: Vec<Step>,
    crash_after: Option<&'a str>,
    crash: Option<&'a dyn Fn(&str)>,
}

impl std::fmt::Debug for OpLog<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpLog")
            .field("op_id", &self.op_id)
            .field("epoch", &self.epoch)
            .field("steps", &self.steps)
            .finish_non_exhaustive()
    }
}

impl<'a> OpLog<'a> {
    /// An in-memory log (nothing durable): for one-shot backend calls.
    pub fn ephemeral(op_id: impl Into<String>) -> Self {
        Self {
            journal: None,
            epoch: 0,
            op_id: op_id.into(),
            steps: vec![Step::Accepted],
            crash_after: None,
            crash: None,
        }
    }

    /// A log over `journal`, continuing after `steps` (already recorded).
    pub fn journaled(journal: &'a Journal, epoch: u64, op_id: &str, steps: Vec<Step>) -> Self {
        Self {
            journal: Some(journal),
            epoch,
            op_id: op_id.to_owned(),
            steps,
            crash_after: None,
            crash: None,
        }
    }

    /// Arms a crash point: `crash(point)` runs when `point` is reached.
    pub fn with_crash(mut self, crash_after: Option<&'a str>, crash: &'a dyn Fn(&str)) -> Self {
        self.crash_after = crash_after;
        self.crash = Some(crash);
        self
    }

    /// The operation id.
    pub fn op_id(&self) -> &str {
        &self.op_id
    }

    /// The epoch steps are recorded under.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Steps so far.
    pub fn steps(&self) -> &[Step] {
        &self.steps
    }

    /// Records `step` (durably, if journaled), then passes its crash point.
    pub fn step(&mut self, step: Step) -> Result<(), BackendError> {
        if let Some(j) = self.journal {
            j.record(&self.op_id, self.epoch, step.clone())?;
        } else {
            let prev = &self.steps;
            crate::journal::check_step(prev, &step).map_err(|source| {
                crate::JournalError::IllegalStep {
                    op_id: self.op_id.clone(),
                    source,
                }
            })?;
        }
        let name = step.name();
        self.steps.push(step);
        self.point(name);
        Ok(())
    }

    /// Whether the crash point `point` is armed.
    pub fn armed(&self, point: &str) -> bool {
        self.crash_after == Some(point)
    }

    /// Passes the crash point `point` (crashes if it is armed).
    pub fn point(&self, point: &str) {
        if self.armed(point) {
            if let Some(crash) = self.crash {
                crash(point);
            }
        }
    }

    /// Where `vm` stands in this operation.
    pub fn vm_phase(&self, vm: &str) -> VmPhase {
        crate::journal::vm_phase(self.steps.iter(), vm)
    }

    /// VMs touched so far, first-touched first.
    pub fn vms(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.steps {
            if let Some(vm) = s.vm() {
                if !out.iter().any(|v| v == vm) {
                    out.push(vm.to_owned());
                }
            }
        }
        out
    }

    /// Whether a step of this name was recorded.
    pub fn has(&self, name: &str) -> bool {
        self.steps.iter().any(|s| s.name() == name)
    }
}
