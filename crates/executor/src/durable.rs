//! [`DurableExecutor`]: authenticated, journaled, fenced, retried execution.

use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;

use crate::auth::{self, AuthError, Keyring, SignedDecision};
use crate::backoff::Backoff;
use crate::journal::{Begin, Journal, JournalError, OpRecord, OpStatus, Rejection, Step};
use crate::oplog::OpLog;
use crate::{Backend, BackendError, ExecutionReport, OpReport};

/// Why the durable executor did not (finish) an operation.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ExecError {
    /// The decision was refused (recorded in the journal's rejections).
    #[error("decision {op_id} rejected ({kind}): {detail}")]
    Rejected {
        /// Decision id as claimed.
        op_id: String,
        /// `bad_mac`, `unknown_key`, `malformed_mac`, `stale`, `replayed`.
        kind: &'static str,
        /// Detail.
        detail: String,
    },
    /// The journal refused or failed (a stale epoch lands here: another
    /// executor took over and this one must stop).
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// The operation could neither finish nor roll back (e.g. an agent is
    /// unreachable); it stays in progress for the next executor.
    #[error("operation {op_id} unresolved: {detail}")]
    Unresolved {
        /// Operation.
        op_id: String,
        /// Why.
        detail: String,
    },
}

impl ExecError {
    /// Whether this is a fencing refusal (the executor should exit).
    pub fn is_stale_epoch(&self) -> bool {
        matches!(self, ExecError::Journal(JournalError::StaleEpoch { .. }))
    }
}

fn auth_kind(e: &AuthError) -> &'static str {
    match e {
        AuthError::UnknownKey(_) => "unknown_key",
        AuthError::MalformedMac => "malformed_mac",
        AuthError::BadMac { .. } => "bad_mac",
        AuthError::Stale { .. } => "stale",
        AuthError::WeakKey(_) | AuthError::MalformedKey => "bad_key",
    }
}

type Crash = Box<dyn Fn(&str)>;

/// Executes signed decisions durably over a backend.
///
/// * Verifies the MAC and the freshness window; refuses a decision whose id is
///   already journaled with different content (a replay); a decision seen
///   again with the same content returns the recorded report (or resumes the
///   unfinished operation).
/// * Holds an epoch taken from the journal at construction: once a newer
///   executor takes one, every step this one tries to record is refused.
/// * Retries a failed attempt after [`Backoff::delay`] until `max_attempts`
///   (counted across restarts), then rolls back.
pub struct DurableExecutor<B: Backend> {
    journal: Arc<Journal>,
    backend: B,
    keys: Keyring,
    epoch: u64,
    /// Retry schedule.
    pub backoff: Backoff,
    crash_after: Option<String>,
    crash: Option<Crash>,
}

impl<B: Backend> DurableExecutor<B> {
    /// An executor over `backend`; takes a new epoch from `journal`, and hands
    /// the backend the hosts the journal has out of rotation.
    pub fn new(journal: Arc<Journal>, backend: B, keys: Keyring) -> Result<Self, ExecError> {
        let epoch = journal.acquire_epoch()?;
        let mut ex = Self {
            journal,
            backend,
            keys,
            epoch,
            backoff: Backoff::default(),
            crash_after: None,
            crash: None,
        };
        ex.sync_rotation()?;
        Ok(ex)
    }

    /// Hands the backend the journal's out-of-rotation hosts (the journal is
    /// the truth: an operator may return a host from another process).
    fn sync_rotation(&mut self) -> Result<(), ExecError> {
        let out = self.journal.out_of_rotation()?;
        self.backend.set_out_of_rotation(out.into_keys().collect());
        Ok(())
    }

    /// Returns `host` to rotation (e.g. after a repair), journaled with
    /// `reason`; whether it was out. Migrations may target it again.
    pub fn return_to_rotation(&mut self, host: &str, reason: &str) -> Result<bool, ExecError> {
        let was_out = self.journal.return_to_rotation(host, reason)?;
        self.sync_rotation()?;
        if was_out {
            tracing::info!(host, reason, "returned to rotation");
        }
        Ok(was_out)
    }

    /// Arms a crash point (testing): `crash(point)` is called once `point`
    /// (a [`Step::name`], or `migration_in_flight`) is reached.
    pub fn set_crash_point(&mut self, point: Option<String>, crash: impl Fn(&str) + 'static) {
        self.crash_after = point;
        self.crash = Some(Box::new(crash));
    }

    /// This executor's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The journal.
    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    fn reject(&self, op_id: &str, kind: &'static str, detail: String) -> ExecError {
        let rec = Rejection {
            op_id: op_id.to_owned(),
            kind: kind.into(),
            detail: detail.clone(),
            epoch: self.epoch,
            unix_ms: 0,
        };
        if let Err(e) = self.journal.reject(rec) {
            return e.into();
        }
        tracing::warn!(op_id, kind, %detail, "decision rejected");
        ExecError::Rejected {
            op_id: op_id.to_owned(),
            kind,
            detail,
        }
    }

    /// Executes a signed decision. `now_ms` is the executor's notion of the
    /// current time on the decision's clock; decisions further than
    /// `freshness_ms` from it are refused.
    pub fn execute(
        &mut self,
        signed: &SignedDecision,
        now_ms: i64,
        freshness_ms: i64,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<ExecutionReport, ExecError> {
        let id = signed.decision.id.clone();
        if let Err(e) = auth::verify(signed, &self.keys) {
            return Err(self.reject(&id, auth_kind(&e), e.to_string()));
        }
        if let Err(e) = auth::check_fresh(&signed.decision, now_ms, freshness_ms) {
            return Err(self.reject(&id, auth_kind(&e), e.to_string()));
        }
        let digest = auth::content_digest(&signed.decision);
        let rec = match self.journal.begin(self.epoch, signed, &digest)? {
            Begin::New(rec) => rec,
            Begin::Existing(rec) if rec.digest != digest => {
                return Err(self.reject(
                    &id,
                    "replayed",
                    format!(
                        "id already journaled with different content (digest {} vs {})",
                        &rec.digest[..12],
                        &digest[..12]
                    ),
                ));
            }
            Begin::Existing(rec) => match (rec.status(), rec.report.clone()) {
                (OpStatus::InProgress, _) | (_, None) => rec,
                (_, Some(report)) => return Ok(report),
            },
        };
        self.sync_rotation()?;
        if rec.steps.len() == 1 && self.crash_after.as_deref() == Some("accepted") {
            if let Some(crash) = &self.crash {
                crash("accepted");
            }
        }
        self.drive(rec, accept)
    }

    /// Resumes every unfinished operation of the journal (after a crash), in
    /// id order. Each is re-verified (the journal is not trusted more than the
    /// wire); one that fails verification is rolled back.
    pub fn resume_unfinished(
        &mut self,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<Result<ExecutionReport, ExecError>>, ExecError> {
        self.sync_rotation()?;
        let mut out = Vec::new();
        for rec in self.journal.unfinished()? {
            if let Err(e) = auth::verify(&rec.signed, &self.keys) {
                let err = self.reject(&rec.op_id, auth_kind(&e), e.to_string());
                out.push(Err(err));
                continue;
            }
            tracing::info!(op_id = %rec.op_id, last = ?rec.steps.last().map(|s| s.step.name()), "resuming");
            let r = self.drive(rec, accept);
            if let Err(e) = &r {
                if e.is_stale_epoch() {
                    return Err(e.clone());
                }
            }
            out.push(r);
        }
        Ok(out)
    }

    /// An agent refused our epoch: record it and stop, like a journal refusal.
    fn fenced_by_agent(&self, op_id: &str, addr: &str, epoch: u64, detail: String) -> ExecError {
        let rejection = Rejection {
            op_id: op_id.to_owned(),
            kind: "stale_epoch".into(),
            detail: format!("refused by agent {addr}: {detail}"),
            epoch,
            unix_ms: 0,
        };
        if let Err(e) = self.journal.reject(rejection) {
            return e.into();
        }
        // the agent says "stale epoch E < HIGHEST: ..."
        let current = detail
            .split("< ")
            .nth(1)
            .and_then(|r| r.split(':').next())
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(epoch + 1);
        ExecError::Journal(JournalError::StaleEpoch {
            op_id: op_id.to_owned(),
            step: "agent command",
            ours: epoch,
            current,
        })
    }

    fn report(rec: &OpRecord, op: Option<OpReport>, error: Option<String>) -> ExecutionReport {
        let d = &rec.signed.decision;
        ExecutionReport {
            decision_id: d.id.clone(),
            host_id: d.host_id.clone(),
            action: d.action,
            started_ms: d.ts_ms,
            finished_ms: d.ts_ms + op.as_ref().map_or(0, |o| o.duration_ms),
            report: op,
            error,
        }
    }

    fn drive(
        &mut self,
        rec: OpRecord,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<ExecutionReport, ExecError> {
        let d = rec.signed.decision.clone();
        let mut attempt = rec.attempts_failed();
        let steps: Vec<Step> = rec.steps.iter().map(|s| s.step.clone()).collect();
        let noop = |_: &str| {};
        let crash: &dyn Fn(&str) = self.crash.as_deref().unwrap_or(&noop);
        let mut op = OpLog::journaled(&self.journal, self.epoch, &d.id, steps)
            .with_crash(self.crash_after.as_deref(), crash);
        let last_error = loop {
            attempt += 1;
            match self.backend.run(&mut op, d.action, &d.host_id, accept) {
                Ok(rep) => {
                    let report = Self::report(&rec, Some(rep.clone()), None);
                    self.journal.finish(
                        &d.id,
                        self.epoch,
                        Step::Done { report: rep },
                        report.clone(),
                    )?;
                    op.point("done");
                    return Ok(report);
                }
                Err(BackendError::Journal(e)) => return Err(e.into()),
                Err(BackendError::Fenced {
                    addr,
                    epoch,
                    detail,
                }) => return Err(self.fenced_by_agent(&d.id, &addr, epoch, detail)),
                Err(e) => {
                    let retry = self.backoff.delay_ms(attempt);
                    tracing::warn!(op_id = %d.id, attempt, error = %e, ?retry, "attempt failed");
                    op.step(Step::AttemptFailed {
                        attempt,
                        error: e.to_string(),
                        retry_in_ms: retry,
                    })
                    .map_err(journal_only)?;
                    match retry {
                        Some(ms) => std::thread::sleep(Duration::from_millis(ms)),
                        None => break e.to_string(),
                    }
                }
            }
        };
        match self.backend.rollback(&mut op, &d.host_id) {
            Ok(()) => {}
            Err(BackendError::Journal(e)) => return Err(e.into()),
            Err(BackendError::Fenced {
                addr,
                epoch,
                detail,
            }) => return Err(self.fenced_by_agent(&d.id, &addr, epoch, detail)),
            Err(e) => {
                return Err(ExecError::Unresolved {
                    op_id: d.id.clone(),
                    detail: format!("gave up ({last_error}) and rollback failed: {e}"),
                });
            }
        }
        let reason = format!("gave up after {attempt} attempts: {last_error}");
        let report = Self::report(&rec, None, Some(reason.clone()));
        self.journal.finish(
            &d.id,
            self.epoch,
            Step::RolledBack { reason },
            report.clone(),
        )?;
        op.point("rolled_back");
        Ok(report)
    }
}

fn journal_only(e: BackendError) -> ExecError {
    match e {
        BackendError::Journal(j) => j.into(),
        other => ExecError::Unresolved {
            op_id: String::new(),
            detail: other.to_string(),
        },
    }
}
