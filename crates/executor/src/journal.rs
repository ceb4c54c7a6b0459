//! The durable journal: every step of every operation, fencing epochs and
//! rejected commands, in an embedded [`redb`] database (each write is one
//! transaction, committed with redb's default durability: fsynced before
//! `commit` returns).
//!
//! Tables:
//! * `meta` (`&str -> u64`): `epoch`, the highest epoch handed out; `seq`, the
//!   last event number.
//! * `ops` (`&str -> JSON OpRecord`): one record per operation, keyed by
//!   decision id, holding the signed decision and every [`StepRecord`].
//! * `events` (`u64 -> JSON Event`): append-only log of every step and every
//!   rejection, in commit order.
//! * `rejections` (`u64 -> JSON Rejection`): refused decisions and commands.
//!
//! Every step is checked against the state machine ([`check_step`]) and the
//! fencing epoch inside the same write transaction that records it, so a step
//! is either recorded in order by the current epoch holder or not at all.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_policy::{Action, Phase};

use crate::auth::SignedDecision;
use crate::{ExecutionReport, OpReport};

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const OPS: TableDefinition<&str, &[u8]> = TableDefinition::new("ops");
const EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const REJECTIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("rejections");
/// Hosts out of rotation: host id -> [`OutOfRotation`]. Written with the
/// `marked_out` step that takes a host out (one transaction), removed by
/// [`Journal::return_to_rotation`].
const ROTATION: TableDefinition<&str, &[u8]> = TableDefinition::new("out_of_rotation");

/// One step of an operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// The decision passed authentication and freshness; the operation exists.
    Accepted,
    /// Migration of `vm`: a target was picked.
    TargetChosen {
        /// VM name.
        vm: String,
        /// Target host id.
        target_host: String,
        /// Target agent address.
        target_addr: String,
    },
    /// Migration of `vm`: the target answered and can take it.
    TargetPrepared {
        /// VM name.
        vm: String,
    },
    /// Migration of `vm`: about to ask the source to migrate (recorded before
    /// the request, so a crash after it means "maybe in flight").
    MigrationStarted {
        /// VM name.
        vm: String,
    },
    /// Migration of `vm`: the target runs it (the source fenced its copy).
    Committed {
        /// VM name.
        vm: String,
        /// Measured figures, when this executor saw the migration's report
        /// (absent when reconciled after a crash).
        #[serde(default)]
        measured: Option<MigrationFigures>,
    },
    /// Migration of `vm`: checked that the source no longer lists it.
    SourceCleared {
        /// VM name.
        vm: String,
    },
    /// Rollback of `vm`: checked that it runs on the source.
    SourceResumed {
        /// VM name.
        vm: String,
    },
    /// The host was taken out of rotation.
    MarkedOut,
    /// A Tardigrade phase was requested; `generation` is the agent's before it.
    PhaseStarted {
        /// Which phase.
        phase: Phase,
        /// Agent generation before the request (phases 1 and 3 increase it).
        generation: u64,
    },
    /// The phase finished.
    PhaseCompleted {
        /// Which phase.
        phase: Phase,
        /// Phase-3 freeze (first pause to last resume), µs, when measured.
        #[serde(default)]
        freeze_us: Option<u64>,
        /// Phase duration as the agent measured it, µs, when known.
        #[serde(default)]
        took_us: Option<u64>,
    },
    /// Reboot: `vm` was stopped (with what is needed to start it again).
    VmStopped {
        /// VM name.
        vm: String,
        /// Its memory, MiB.
        mem_mib: u64,
        /// Its dirty rate, bytes/s.
        dirty_bytes_per_sec: u64,
    },
    /// Reboot: `vm` runs again.
    VmStarted {
        /// VM name.
        vm: String,
    },
    /// An attempt failed; the next one follows after `retry_in_ms` (none if this
    /// was the last).
    AttemptFailed {
        /// 1-based attempt number.
        attempt: u32,
        /// Why.
        error: String,
        /// Backoff before the next attempt.
        retry_in_ms: Option<u64>,
    },
    /// Terminal: the operation succeeded.
    Done {
        /// What it did.
        report: OpReport,
    },
    /// Terminal: the operation gave up; every VM it touched runs on the source
    /// (or, having committed, on its target).
    RolledBack {
        /// Why.
        reason: String,
    },
}

/// What one real migration measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationFigures {
    /// Connect to STARTED, µs.
    pub total_us: u64,
    /// Source pause to STARTED received, µs.
    pub downtime_us: u64,
    /// Bytes written to the migration stream.
    pub bytes_sent: u64,
    /// Guest memory, bytes.
    pub mem_bytes: u64,
    /// Memory CRC both sides agreed on (when verification was asked for).
    pub checksum: Option<u32>,
}

impl Step {
    /// Stable short name (also the crash-point name of the step).
    pub fn name(&self) -> &'static str {
        match self {
            Step::Accepted => "accepted",
            Step::TargetChosen { .. } => "target_chosen",
            Step::TargetPrepared { .. } => "target_prepared",
            Step::MigrationStarted { .. } => "migration_started",
            Step::Committed { .. } => "committed",
            Step::SourceCleared { .. } => "source_cleared",
            Step::SourceResumed { .. } => "source_resumed",
            Step::MarkedOut => "marked_out",
            Step::PhaseStarted { .. } => "phase_started",
            Step::PhaseCompleted { .. } => "phase_completed",
            Step::VmStopped { .. } => "vm_stopped",
            Step::VmStarted { .. } => "vm_started",
            Step::AttemptFailed { .. } => "attempt_failed",
            Step::Done { .. } => "done",
            Step::RolledBack { .. } => "rolled_back",
        }
    }

    /// Whether the operation ends here.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Step::Done { .. } | Step::RolledBack { .. })
    }

    pub(crate) fn vm(&self) -> Option<&str> {
        match self {
            Step::TargetChosen { vm, .. }
            | Step::TargetPrepared { vm }
            | Step::MigrationStarted { vm }
            | Step::Committed { vm, .. }
            | Step::SourceCleared { vm }
            | Step::SourceResumed { vm } => Some(vm),
            _ => None,
        }
    }
}

/// One recorded step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Epoch of the executor that recorded it.
    pub epoch: u64,
    /// Wall clock at commit, ms since the Unix epoch.
    pub unix_ms: i64,
    /// The step.
    #[serde(flatten)]
    pub step: Step,
}

/// Where an operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// Not finished: a (new) executor resumes it.
    InProgress,
    /// Finished successfully.
    Done,
    /// Gave up, rolled back.
    RolledBack,
}

/// One operation (one decision) with its whole history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpRecord {
    /// Decision id.
    pub op_id: String,
    /// The signed decision that started it.
    pub signed: SignedDecision,
    /// [`crate::auth::content_digest`] of the decision.
    pub digest: String,
    /// Every step, in order.
    pub steps: Vec<StepRecord>,
    /// Set when the operation ended: what is published on the outcomes topic.
    pub report: Option<ExecutionReport>,
}

/// Where a VM of a migration stands, derived from the steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmPhase {
    /// No step yet.
    None,
    /// Target picked.
    TargetChosen {
        /// Target host id.
        host: String,
        /// Target agent address.
        addr: String,
    },
    /// Target answered.
    Prepared {
        /// Target host id.
        host: String,
        /// Target agent address.
        addr: String,
    },
    /// The migration request may be in flight.
    Started {
        /// Target host id.
        host: String,
        /// Target agent address.
        addr: String,
    },
    /// Runs on the target.
    Committed {
        /// Target agent address.
        addr: String,
    },
    /// Migration finished.
    Cleared,
    /// Rolled back: runs on the source.
    Resumed,
}

impl OpRecord {
    /// Status from the last step.
    pub fn status(&self) -> OpStatus {
        match self.steps.last().map(|s| &s.step) {
            Some(Step::Done { .. }) => OpStatus::Done,
            Some(Step::RolledBack { .. }) => OpStatus::RolledBack,
            _ => OpStatus::InProgress,
        }
    }

    /// The action.
    pub fn action(&self) -> Action {
        self.signed.decision.action
    }

    /// Failed attempts so far.
    pub fn attempts_failed(&self) -> u32 {
        self.steps
            .iter()
            .filter(|s| matches!(s.step, Step::AttemptFailed { .. }))
            .count() as u32
    }

    /// Names of the steps, in order.
    pub fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(|s| s.step.name()).collect()
    }

    /// Where `vm` stands in this operation.
    pub fn vm_phase(&self, vm: &str) -> VmPhase {
        vm_phase(self.steps.iter().map(|s| &s.step), vm)
    }

    /// VMs this operation has touched, in first-touched order.
    pub fn vms(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for s in &self.steps {
            if let Some(vm) = s.step.vm() {
                if !out.iter().any(|v| v == vm) {
                    out.push(vm.to_owned());
                }
            }
        }
        out
    }
}

pub(crate) fn vm_phase<'a>(steps: impl Iterator<Item = &'a Step>, vm: &str) -> VmPhase {
    let mut p = VmPhase::None;
    for s in steps {
        if s.vm() != Some(vm) {
            continue;
        }
        p = match (s, p) {
            (
                Step::TargetChosen {
                    target_host,
                    target_addr,
                    ..
                },
                _,
            ) => VmPhase::TargetChosen {
                host: target_host.clone(),
                addr: target_addr.clone(),
            },
            (Step::TargetPrepared { .. }, VmPhase::TargetChosen { host, addr }) => {
                VmPhase::Prepared { host, addr }
            }
            (Step::MigrationStarted { .. }, VmPhase::Prepared { host, addr }) => {
                VmPhase::Started { host, addr }
            }
            (Step::Committed { .. }, VmPhase::Started { addr, .. }) => VmPhase::Committed { addr },
            (Step::SourceCleared { .. }, _) => VmPhase::Cleared,
            (Step::SourceResumed { .. }, _) => VmPhase::Resumed,
            (_, p) => p,
        };
    }
    p
}

/// Why a step is not allowed after the steps before it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{step} not allowed: {reason}")]
pub struct TransitionError {
    /// The refused step's name.
    pub step: &'static str,
    /// Why.
    pub reason: String,
}

/// The operation state machine: may `next` follow `prev`? Pure.
///
/// * `accepted` first and only first; nothing after `done`/`rolled_back`.
/// * Per VM: `target_chosen` -> `target_prepared` -> `migration_started` ->
///   `committed` -> `source_cleared`; `target_chosen` again (a new target after
///   a failed attempt) only before `committed`; `source_resumed` (rollback)
///   only before `committed`.
/// * `phase_completed` needs a `phase_started` of that phase not yet
///   completed; `vm_started` needs a `vm_stopped` of that VM.
/// * `done` needs every touched VM cleared or resumed; `rolled_back` needs no
///   VM left between `migration_started` and `source_cleared` (each must be
///   resolved first: committed and cleared, or resumed on the source).
pub fn check_step(prev: &[Step], next: &Step) -> Result<(), TransitionError> {
    let err = |reason: String| {
        Err(TransitionError {
            step: next.name(),
            reason,
        })
    };
    match (prev.first(), next) {
        (None, Step::Accepted) => return Ok(()),
        (None, _) => return err("the first step must be accepted".into()),
        (Some(_), Step::Accepted) => return err("accepted twice".into()),
        _ => {}
    }
    if let Some(last) = prev.last().filter(|s| s.is_terminal()) {
        return err(format!("the operation already ended ({})", last.name()));
    }
    let phase = |vm: &str| vm_phase(prev.iter(), vm);
    match next {
        Step::TargetChosen { vm, .. } | Step::SourceResumed { vm } => match phase(vm) {
            VmPhase::Committed { .. } | VmPhase::Cleared | VmPhase::Resumed => {
                err(format!("VM {vm} is already {:?}", phase(vm)))
            }
            _ => Ok(()),
        },
        Step::TargetPrepared { vm } => match phase(vm) {
            VmPhase::TargetChosen { .. } => Ok(()),
            p => err(format!("VM {vm} is {p:?}, not target_chosen")),
        },
        Step::MigrationStarted { vm } => match phase(vm) {
            VmPhase::Prepared { .. } => Ok(()),
            p => err(format!("VM {vm} is {p:?}, not target_prepared")),
        },
        Step::Committed { vm, .. } => match phase(vm) {
            VmPhase::Started { .. } => Ok(()),
            p => err(format!("VM {vm} is {p:?}, not migration_started")),
        },
        Step::SourceCleared { vm } => match phase(vm) {
            VmPhase::Committed { .. } => Ok(()),
            p => err(format!("VM {vm} is {p:?}, not committed")),
        },
        Step::PhaseCompleted { phase: ph, .. } => {
            // the latest event of this phase must be its start
            let last = prev.iter().rev().find_map(|s| match s {
                Step::PhaseStarted { phase, .. } if phase == ph => Some(true),
                Step::PhaseCompleted { phase, .. } if phase == ph => Some(false),
                _ => None,
            });
            match last {
                Some(true) => Ok(()),
                Some(false) => err(format!("{ph:?} already completed")),
                None => err(format!("no phase_started for {ph:?}")),
            }
        }
        Step::VmStarted { vm } => {
            if prev
                .iter()
                .any(|s| matches!(s, Step::VmStopped { vm: v, .. } if v == vm))
            {
                Ok(())
            } else {
                err(format!("VM {vm} was not stopped"))
            }
        }
        Step::Done { .. } | Step::RolledBack { .. } => {
            let mut vms: Vec<&str> = prev.iter().filter_map(Step::vm).collect();
            vms.sort_unstable();
            vms.dedup();
            for vm in vms {
                let p = phase(vm);
                let open = match next {
                    Step::Done { .. } => !matches!(p, VmPhase::Cleared | VmPhase::Resumed),
                    _ => matches!(p, VmPhase::Started { .. } | VmPhase::Committed { .. }),
                };
                if open {
                    return err(format!("VM {vm} is unresolved ({p:?})"));
                }
            }
            Ok(())
        }
        Step::Accepted => unreachable!("handled above"),
        Step::MarkedOut
        | Step::PhaseStarted { .. }
        | Step::VmStopped { .. }
        | Step::AttemptFailed { .. } => Ok(()),
    }
}

/// A refused decision or command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    /// Decision id (as claimed).
    pub op_id: String,
    /// Why, as a short kind: `bad_mac`, `unknown_key`, `stale`, `replayed`,
    /// `stale_epoch`, `illegal_step`.
    pub kind: String,
    /// Detail.
    pub detail: String,
    /// Epoch of the executor that sent it.
    pub epoch: u64,
    /// Wall clock, ms since the Unix epoch.
    pub unix_ms: i64,
}

/// One entry of the append-only event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step was recorded.
    Step {
        /// Sequence number.
        seq: u64,
        /// Operation.
        op_id: String,
        /// The step record.
        record: StepRecord,
    },
    /// A command was refused.
    Rejected {
        /// Sequence number.
        seq: u64,
        /// The rejection.
        rejection: Rejection,
    },
    /// An epoch was handed out.
    Epoch {
        /// Sequence number.
        seq: u64,
        /// The new epoch.
        epoch: u64,
    },
    /// An operator returned a host to rotation ([`Journal::return_to_rotation`]).
    ReturnedToRotation {
        /// Sequence number.
        seq: u64,
        /// The host.
        host: String,
        /// The operation that had taken it out.
        taken_out_by: String,
        /// Why (free text, e.g. the repair ticket).
        reason: String,
        /// Wall clock, ms since the epoch.
        unix_ms: i64,
    },
}

/// Why a host is out of rotation: the operation whose `marked_out` step took
/// it out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutOfRotation {
    /// The operation.
    pub op_id: String,
    /// When its `marked_out` step was recorded, ms since the epoch.
    pub unix_ms: i64,
}

/// Journal errors; each names the step that failed.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum JournalError {
    /// The database could not be opened or created.
    #[error("opening journal {path}: {detail}")]
    Open {
        /// The file.
        path: String,
        /// The cause.
        detail: String,
    },
    /// A storage operation failed.
    #[error("journal storage error while {step}: {detail}")]
    Storage {
        /// What was being done.
        step: &'static str,
        /// The cause.
        detail: String,
    },
    /// A stored record did not decode.
    #[error("journal record undecodable while {step}: {detail}")]
    Codec {
        /// What was being read.
        step: &'static str,
        /// The cause.
        detail: String,
    },
    /// The writer's epoch is older than the journal's: another executor took over.
    #[error(
        "stale epoch {ours} < {current} while recording {step} of {op_id}: another executor took over"
    )]
    StaleEpoch {
        /// Operation.
        op_id: String,
        /// Step being recorded.
        step: &'static str,
        /// The writer's epoch.
        ours: u64,
        /// The journal's epoch.
        current: u64,
    },
    /// The step does not follow the recorded ones.
    #[error("operation {op_id}: {source}")]
    IllegalStep {
        /// Operation.
        op_id: String,
        /// Why.
        source: TransitionError,
    },
    /// No such operation.
    #[error("no operation {0} in the journal")]
    NoSuchOp(String),
}

fn storage(step: &'static str) -> impl FnOnce(redb::Error) -> JournalError {
    move |e| JournalError::Storage {
        step,
        detail: e.to_string(),
    }
}

/// Maps any redb error type to [`JournalError::Storage`].
macro_rules! st {
    ($e:expr, $step:literal) => {
        $e.map_err(|e| storage($step)(e.into()))
    };
}

fn now_unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    step: &'static str,
) -> Result<T, JournalError> {
    serde_json::from_slice(bytes).map_err(|e| JournalError::Codec {
        step,
        detail: e.to_string(),
    })
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("journal records always serialise")
}

/// What [`Journal::begin`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Begin {
    /// A new operation was recorded (step `accepted`).
    New(OpRecord),
    /// The operation exists with the same content.
    Existing(OpRecord),
}

/// The durable journal.
pub struct Journal {
    db: Database,
    path: String,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

impl Journal {
    /// Opens (or creates) the journal at `path`. Several processes may open it
    /// at once (redb multi-writer mode; one write transaction at a time).
    pub fn open(path: impl AsRef<Path>) -> Result<Self, JournalError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let db = Database::builder()
            .set_concurrency_mode(redb::ConcurrencyMode::MultiWriter)
            .create(path)
            .map_err(|e| JournalError::Open {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
        let txn = st!(db.begin_write(), "beginning the table setup")?;
        {
            st!(txn.open_table(META), "creating the meta table")?;
            st!(txn.open_table(OPS), "creating the ops table")?;
            st!(txn.open_table(EVENTS), "creating the events table")?;
            st!(txn.open_table(REJECTIONS), "creating the rejections table")?;
            st!(txn.open_table(ROTATION), "creating the rotation table")?;
        }
        st!(txn.commit(), "committing the table setup")?;
        Ok(Self { db, path: shown })
    }

    /// The file.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Hands out a new epoch (one more than any before) and makes it the only
    /// one allowed to record steps.
    pub fn acquire_epoch(&self) -> Result<u64, JournalError> {
        let txn = st!(self.db.begin_write(), "beginning acquire_epoch")?;
        let epoch = {
            let mut meta = st!(txn.open_table(META), "opening meta for acquire_epoch")?;
            let cur = st!(meta.get("epoch"), "reading the epoch")?.map_or(0, |v| v.value());
            let epoch = cur + 1;
            st!(meta.insert("epoch", epoch), "writing the epoch")?;
            let seq = next_seq(&mut meta)?;
            let mut ev = st!(txn.open_table(EVENTS), "opening events for acquire_epoch")?;
            st!(
                ev.insert(seq, encode(&Event::Epoch { seq, epoch }).as_slice()),
                "logging the epoch"
            )?;
            epoch
        };
        st!(txn.commit(), "committing acquire_epoch")?;
        Ok(epoch)
    }

    /// The highest epoch handed out (0 if none).
    pub fn current_epoch(&self) -> Result<u64, JournalError> {
        let txn = st!(self.db.begin_read(), "beginning a read of the epoch")?;
        let meta = st!(txn.open_table(META), "opening meta")?;
        Ok(st!(meta.get("epoch"), "reading the epoch")?.map_or(0, |v| v.value()))
    }

    /// Records a new operation with step `accepted`, or returns the existing one
    /// when `signed`'s id is already there. The caller compares digests.
    pub fn begin(
        &self,
        epoch: u64,
        signed: &SignedDecision,
        digest: &str,
    ) -> Result<Begin, JournalError> {
        let op_id = signed.decision.id.as_str();
        if let Some(existing) = self.op(op_id)? {
            return Ok(Begin::Existing(existing));
        }
        let rec = OpRecord {
            op_id: op_id.to_owned(),
            signed: signed.clone(),
            digest: digest.to_owned(),
            steps: Vec::new(),
            report: None,
        };
        match self.write_step(epoch, op_id, Step::Accepted, Some(rec), None)? {
            (rec, true) => Ok(Begin::New(rec)),
            (rec, false) => Ok(Begin::Existing(rec)),
        }
    }

    /// Records `step` of `op_id` if `epoch` is current and the step follows
    /// the recorded ones; a stale epoch is refused and recorded as a rejection.
    pub fn record(&self, op_id: &str, epoch: u64, step: Step) -> Result<OpRecord, JournalError> {
        self.write_step(epoch, op_id, step, None, None)
            .map(|(r, _)| r)
    }

    /// Records a terminal step together with the report to publish.
    pub fn finish(
        &self,
        op_id: &str,
        epoch: u64,
        step: Step,
        report: ExecutionReport,
    ) -> Result<OpRecord, JournalError> {
        debug_assert!(step.is_terminal());
        self.write_step(epoch, op_id, step, None, Some(report))
            .map(|(r, _)| r)
    }

    /// One write transaction: epoch check, state-machine check, append.
    /// Returns the record and whether it was created.
    fn write_step(
        &self,
        epoch: u64,
        op_id: &str,
        step: Step,
        create: Option<OpRecord>,
        report: Option<ExecutionReport>,
    ) -> Result<(OpRecord, bool), JournalError> {
        let txn = st!(self.db.begin_write(), "beginning a step write")?;
        let unix_ms = now_unix_ms();
        let mut meta = st!(txn.open_table(META), "opening meta for a step")?;
        let current = st!(meta.get("epoch"), "reading the epoch")?.map_or(0, |v| v.value());
        if epoch < current {
            let rejection = Rejection {
                op_id: op_id.to_owned(),
                kind: "stale_epoch".into(),
                detail: format!("step {} with epoch {epoch} < {current}", step.name()),
                epoch,
                unix_ms,
            };
            log_rejection(&txn, &mut meta, &rejection)?;
            drop(meta);
            st!(txn.commit(), "committing a stale-epoch rejection")?;
            return Err(JournalError::StaleEpoch {
                op_id: op_id.to_owned(),
                step: step.name(),
                ours: epoch,
                current,
            });
        }
        let mut ops = st!(txn.open_table(OPS), "opening ops for a step")?;
        let existing: Option<OpRecord> = st!(ops.get(op_id), "reading the operation")?
            .map(|v| decode(v.value(), "decoding the operation"))
            .transpose()?;
        let (mut rec, created) = match (existing, create) {
            (Some(rec), Some(_)) => return Ok((rec, false)),
            (Some(rec), None) => (rec, false),
            (None, Some(rec)) => (rec, true),
            (None, None) => return Err(JournalError::NoSuchOp(op_id.to_owned())),
        };
        let prev: Vec<Step> = rec.steps.iter().map(|s| s.step.clone()).collect();
        if let Err(source) = check_step(&prev, &step) {
            return Err(JournalError::IllegalStep {
                op_id: op_id.to_owned(),
                source,
            });
        }
        if matches!(step, Step::MarkedOut) {
            // The host leaves rotation in the same transaction as the step.
            let mut rot = st!(txn.open_table(ROTATION), "opening rotation for a step")?;
            let why = OutOfRotation {
                op_id: op_id.to_owned(),
                unix_ms,
            };
            st!(
                rot.insert(
                    rec.signed.decision.host_id.as_str(),
                    encode(&why).as_slice()
                ),
                "taking the host out of rotation"
            )?;
        }
        let record = StepRecord {
            epoch,
            unix_ms,
            step,
        };
        rec.steps.push(record.clone());
        if report.is_some() {
            rec.report = report;
        }
        st!(
            ops.insert(op_id, encode(&rec).as_slice()),
            "writing the operation"
        )?;
        let seq = next_seq(&mut meta)?;
        let mut ev = st!(txn.open_table(EVENTS), "opening events for a step")?;
        st!(
            ev.insert(
                seq,
                encode(&Event::Step {
                    seq,
                    op_id: op_id.to_owned(),
                    record,
                })
                .as_slice()
            ),
            "logging the step"
        )?;
        drop((ops, ev, meta));
        st!(txn.commit(), "committing a step")?;
        Ok((rec, created))
    }

    /// The hosts out of rotation, by host id: each was taken out by a
    /// journaled `marked_out` step and not returned since. A restarted
    /// executor never picks one of them as a migration target.
    pub fn out_of_rotation(&self) -> Result<BTreeMap<String, OutOfRotation>, JournalError> {
        let txn = st!(self.db.begin_read(), "beginning a read of the rotation")?;
        let t = st!(txn.open_table(ROTATION), "opening rotation")?;
        let mut out = BTreeMap::new();
        for item in st!(t.iter(), "iterating the rotation")? {
            let (k, v) = st!(item, "reading a rotation entry")?;
            out.insert(
                k.value().to_owned(),
                decode(v.value(), "decoding a rotation entry")?,
            );
        }
        Ok(out)
    }

    /// Returns `host` to rotation (an operator's command, e.g. after a
    /// repair), logging who had taken it out and `reason` as an event.
    /// Returns whether it was out; returning a host in rotation changes
    /// nothing and logs nothing.
    pub fn return_to_rotation(&self, host: &str, reason: &str) -> Result<bool, JournalError> {
        let txn = st!(self.db.begin_write(), "beginning a return to rotation")?;
        {
            let mut rot = st!(txn.open_table(ROTATION), "opening rotation for a return")?;
            let removed: Option<OutOfRotation> = st!(
                rot.remove(host),
                "removing the host from the rotation table"
            )?
            .map(|v| decode(v.value(), "decoding a rotation entry"))
            .transpose()?;
            let Some(was) = removed else {
                return Ok(false);
            };
            let mut meta = st!(txn.open_table(META), "opening meta for a return")?;
            let seq = next_seq(&mut meta)?;
            let mut ev = st!(txn.open_table(EVENTS), "opening events for a return")?;
            let event = Event::ReturnedToRotation {
                seq,
                host: host.to_owned(),
                taken_out_by: was.op_id,
                reason: reason.to_owned(),
                unix_ms: now_unix_ms(),
            };
            st!(
                ev.insert(seq, encode(&event).as_slice()),
                "logging the return"
            )?;
        }
        st!(txn.commit(), "committing a return to rotation")?;
        Ok(true)
    }

    /// Records a refused decision or command.
    pub fn reject(&self, mut rejection: Rejection) -> Result<(), JournalError> {
        rejection.unix_ms = now_unix_ms();
        let txn = st!(self.db.begin_write(), "beginning a rejection write")?;
        {
            let mut meta = st!(txn.open_table(META), "opening meta for a rejection")?;
            log_rejection(&txn, &mut meta, &rejection)?;
        }
        st!(txn.commit(), "committing a rejection")
    }

    /// One operation.
    pub fn op(&self, op_id: &str) -> Result<Option<OpRecord>, JournalError> {
        let txn = st!(self.db.begin_read(), "beginning a read of an operation")?;
        let ops = st!(txn.open_table(OPS), "opening ops")?;
        st!(ops.get(op_id), "reading an operation")?
            .map(|v| decode(v.value(), "decoding an operation"))
            .transpose()
    }

    /// Every operation, by id.
    pub fn ops(&self) -> Result<Vec<OpRecord>, JournalError> {
        let txn = st!(self.db.begin_read(), "beginning a read of the operations")?;
        let ops = st!(txn.open_table(OPS), "opening ops")?;
        let mut out = Vec::new();
        for item in st!(ops.iter(), "iterating operations")? {
            let (_, v) = st!(item, "reading an operation")?;
            out.push(decode(v.value(), "decoding an operation")?);
        }
        Ok(out)
    }

    /// Operations not yet done or rolled back.
    pub fn unfinished(&self) -> Result<Vec<OpRecord>, JournalError> {
        Ok(self
            .ops()?
            .into_iter()
            .filter(|o| o.status() == OpStatus::InProgress)
            .collect())
    }

    /// Every rejection, in order.
    pub fn rejections(&self) -> Result<Vec<Rejection>, JournalError> {
        let txn = st!(self.db.begin_read(), "beginning a read of the rejections")?;
        let t = st!(txn.open_table(REJECTIONS), "opening rejections")?;
        let mut out = Vec::new();
        for item in st!(t.iter(), "iterating rejections")? {
            let (_, v) = st!(item, "reading a rejection")?;
            out.push(decode(v.value(), "decoding a rejection")?);
        }
        Ok(out)
    }

    /// The event log, in order.
    pub fn events(&self) -> Result<Vec<Event>, JournalError> {
        let txn = st!(self.db.begin_read(), "beginning a read of the events")?;
        let t = st!(txn.open_table(EVENTS), "opening events")?;
        let mut out = Vec::new();
        for item in st!(t.iter(), "iterating events")? {
            let (_, v) = st!(item, "reading an event")?;
            out.push(decode(v.value(), "decoding an event")?);
        }
        Ok(out)
    }

    /// Checks every operation against the state machine and its status;
    /// returns the problems found (empty when consistent). With `finished`,
    /// an operation still in progress is a problem too.
    pub fn audit(&self, finished: bool) -> Result<Vec<String>, JournalError> {
        let mut problems = Vec::new();
        for op in self.ops()? {
            let mut prev = Vec::new();
            for s in &op.steps {
                if let Err(e) = check_step(&prev, &s.step) {
                    problems.push(format!("{}: {e}", op.op_id));
                }
                prev.push(s.step.clone());
            }
            if op.steps.windows(2).any(|w| w[0].epoch > w[1].epoch) {
                problems.push(format!("{}: epochs go backwards", op.op_id));
            }
            match op.status() {
                OpStatus::InProgress if finished => {
                    problems.push(format!("{}: still in progress", op.op_id));
                }
                OpStatus::InProgress => {}
                _ if op.report.is_none() => {
                    problems.push(format!("{}: ended without a report", op.op_id));
                }
                _ => {}
            }
        }
        Ok(problems)
    }
}

fn next_seq(meta: &mut redb::Table<'_, &str, u64>) -> Result<u64, JournalError> {
    let seq = st!(meta.get("seq"), "reading the sequence")?.map_or(0, |v| v.value()) + 1;
    st!(meta.insert("seq", seq), "writing the sequence")?;
    Ok(seq)
}

fn log_rejection(
    txn: &redb::WriteTransaction,
    meta: &mut redb::Table<'_, &str, u64>,
    rejection: &Rejection,
) -> Result<(), JournalError> {
    let seq = next_seq(meta)?;
    let mut rej = st!(txn.open_table(REJECTIONS), "opening rejections")?;
    st!(
        rej.insert(seq, encode(rejection).as_slice()),
        "writing a rejection"
    )?;
    let mut ev = st!(txn.open_table(EVENTS), "opening events for a rejection")?;
    st!(
        ev.insert(
            seq,
            encode(&Event::Rejected {
                seq,
                rejection: rejection.clone(),
            })
            .as_slice()
        ),
        "logging a rejection"
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Key, content_digest, sign};
    use crate::tests::decision;
    use proptest::prelude::*;

    fn mig(vm: &str) -> Vec<Step> {
        vec![
            Step::TargetChosen {
                vm: vm.into(),
                target_host: "h2".into(),
                target_addr: "a2".into(),
            },
            Step::TargetPrepared { vm: vm.into() },
            Step::MigrationStarted { vm: vm.into() },
            Step::Committed {
                vm: vm.into(),
                measured: None,
            },
            Step::SourceCleared { vm: vm.into() },
        ]
    }

    fn done() -> Step {
        Step::Done {
            report: OpReport::default(),
        }
    }

    fn fold(steps: &[Step]) -> Result<(), TransitionError> {
        let mut prev = Vec::new();
        for s in steps {
            check_step(&prev, s)?;
            prev.push(s.clone());
        }
        Ok(())
    }

    #[test]
    fn the_migration_path_is_legal() {
        let mut s = vec![Step::Accepted];
        s.extend(mig("a"));
        s.extend(mig("b"));
        s.push(Step::MarkedOut);
        s.push(done());
        fold(&s).unwrap();
    }

    #[test]
    fn out_of_order_steps_are_refused() {
        let a = Step::Accepted;
        let m = mig("a");
        // no accepted first
        assert!(fold(&[m[0].clone()]).is_err());
        // skipping prepared
        assert!(fold(&[a.clone(), m[0].clone(), m[2].clone()]).is_err());
        // committing without starting
        assert!(fold(&[a.clone(), m[0].clone(), m[1].clone(), m[3].clone()]).is_err());
        // done with a VM in flight
        assert!(fold(&[a.clone(), m[0].clone(), m[1].clone(), m[2].clone(), done()]).is_err());
        // rolled back with a VM maybe in flight
        let rb = Step::RolledBack { reason: "x".into() };
        assert!(
            fold(&[
                a.clone(),
                m[0].clone(),
                m[1].clone(),
                m[2].clone(),
                rb.clone()
            ])
            .is_err()
        );
        // ... fine once it is resolved as resumed on the source
        fold(&[
            a.clone(),
            m[0].clone(),
            m[1].clone(),
            m[2].clone(),
            Step::SourceResumed { vm: "a".into() },
            rb.clone(),
        ])
        .unwrap();
        // no re-targeting after commit
        let mut s = vec![a.clone()];
        s.extend(m[..4].iter().cloned());
        s.push(m[0].clone());
        assert!(fold(&s).is_err());
        // nothing after the end
        assert!(fold(&[a.clone(), done(), Step::MarkedOut]).is_err());
        assert!(fold(&[a.clone(), a.clone()]).is_err());
        // phases and reboots
        assert!(
            fold(&[
                a.clone(),
                Step::PhaseCompleted {
                    phase: Phase::RecycleServices,
                    freeze_us: None,
                    took_us: None
                }
            ])
            .is_err()
        );
        assert!(fold(&[a.clone(), Step::VmStarted { vm: "x".into() }]).is_err());
        let started = Step::PhaseStarted {
            phase: Phase::MemoryPreservingReset,
            generation: 1,
        };
        let completed = Step::PhaseCompleted {
            phase: Phase::MemoryPreservingReset,
            freeze_us: None,
            took_us: None,
        };
        fold(&[a.clone(), started.clone(), completed.clone()]).unwrap();
        assert!(fold(&[a.clone(), started, completed.clone(), completed]).is_err());
    }

    fn any_step() -> impl Strategy<Value = Step> {
        let vm = prop_oneof![Just("a".to_string()), Just("b".to_string())];
        prop_oneof![
            Just(Step::Accepted),
            vm.clone().prop_map(|vm| Step::TargetChosen {
                vm,
                target_host: "h".into(),
                target_addr: "x".into()
            }),
            vm.clone().prop_map(|vm| Step::TargetPrepared { vm }),
            vm.clone().prop_map(|vm| Step::MigrationStarted { vm }),
            vm.clone()
                .prop_map(|vm| Step::Committed { vm, measured: None }),
            vm.clone().prop_map(|vm| Step::SourceCleared { vm }),
            vm.clone().prop_map(|vm| Step::SourceResumed { vm }),
            Just(Step::AttemptFailed {
                attempt: 1,
                error: "e".into(),
                retry_in_ms: None
            }),
            Just(Step::MarkedOut),
            Just(done()),
            Just(Step::RolledBack { reason: "r".into() }),
        ]
    }

    proptest! {
        /// Whatever is thrown at the state machine, the accepted prefix keeps
        /// its invariants: one accepted first, at most one terminal step (last),
        /// a VM never committed without being started, and never both
        /// committed and resumed.
        #[test]
        fn accepted_histories_keep_invariants(steps in proptest::collection::vec(any_step(), 0..40)) {
            let mut prev: Vec<Step> = Vec::new();
            for s in steps {
                if check_step(&prev, &s).is_ok() {
                    prev.push(s);
                }
            }
            if let Some(first) = prev.first() {
                prop_assert_eq!(first, &Step::Accepted);
            }
            prop_assert!(prev.iter().skip(1).all(|s| *s != Step::Accepted));
            let terminals = prev.iter().filter(|s| s.is_terminal()).count();
            prop_assert!(terminals <= 1);
            if terminals == 1 {
                prop_assert!(prev.last().unwrap().is_terminal());
            }
            for vm in ["a", "b"] {
                let idx = |name: &str| prev.iter().position(|s| s.vm() == Some(vm) && s.name() == name);
                if let Some(c) = idx("committed") {
                    let started = idx("migration_started").expect("committed needs started");
                    prop_assert!(started < c);
                    prop_assert!(idx("source_resumed").is_none_or(|r| r < c));
                    prop_assert!(prev[c..].iter().all(|s| !(s.vm() == Some(vm) && s.name() == "source_resumed")));
                }
                if prev.last().is_some_and(|s| s.name() == "done") && idx("target_chosen").is_some() {
                    let p = vm_phase(prev.iter(), vm);
                    prop_assert!(matches!(p, VmPhase::Cleared | VmPhase::Resumed));
                }
            }
        }
    }

    /// Measures one durable step (a redb write transaction with fsync):
    /// `cargo test -p waterbear-executor --lib -- --ignored --nocapture step_latency`.
    #[test]
    #[ignore = "measurement"]
    fn step_latency() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path().join("j.redb")).unwrap();
        let e = j.acquire_epoch().unwrap();
        let mut lat = Vec::new();
        for i in 0..200 {
            let (sd, digest) = signed(&format!("op{i}"));
            let t = std::time::Instant::now();
            j.begin(e, &sd, &digest).unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            let t = std::time::Instant::now();
            j.record(&format!("op{i}"), e, Step::MarkedOut).unwrap();
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
        lat.sort_by(f64::total_cmp);
        eprintln!(
            "journal step: median {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} steps, {} ops in the table at the end)",
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            lat[lat.len() - 1],
            lat.len(),
            j.ops().unwrap().len()
        );
    }

    fn signed(id: &str) -> (SignedDecision, String) {
        let key = Key::new("k", *b"0123456789abcdef").unwrap();
        let d = decision("h1", Action::LiveMigrate, id);
        let digest = content_digest(&d);
        (sign(&d, &key), digest)
    }

    #[test]
    fn marked_out_hosts_stay_out_across_reopens_until_returned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let (sd, digest) = signed("op1");
        {
            let j = Journal::open(&path).unwrap();
            let e = j.acquire_epoch().unwrap();
            j.begin(e, &sd, &digest).unwrap();
            assert!(j.out_of_rotation().unwrap().is_empty());
            // steps before marked_out leave the host in rotation
            j.record("op1", e, mig("vm")[0].clone()).unwrap();
            assert!(j.out_of_rotation().unwrap().is_empty());
            // a refused marked_out (stale epoch) does not take it out either
            let e2 = j.acquire_epoch().unwrap();
            assert!(j.record("op1", e, Step::MarkedOut).is_err());
            assert!(j.out_of_rotation().unwrap().is_empty());
            j.record("op1", e2, Step::MarkedOut).unwrap();
        }
        let j = Journal::open(&path).unwrap();
        let out = j.out_of_rotation().unwrap();
        assert_eq!(out.keys().collect::<Vec<_>>(), ["h1"]);
        assert_eq!(out["h1"].op_id, "op1");
        // the operator returns it, once; the event names who had taken it out
        assert!(j.return_to_rotation("h1", "disk replaced").unwrap());
        assert!(!j.return_to_rotation("h1", "again").unwrap());
        assert!(!j.return_to_rotation("h9", "never out").unwrap());
        assert!(j.out_of_rotation().unwrap().is_empty());
        let returns: Vec<_> = j
            .events()
            .unwrap()
            .into_iter()
            .filter_map(|e| match e {
                Event::ReturnedToRotation {
                    host,
                    taken_out_by,
                    reason,
                    ..
                } => Some((host, taken_out_by, reason)),
                _ => None,
            })
            .collect();
        assert_eq!(
            returns,
            [(
                "h1".to_string(),
                "op1".to_string(),
                "disk replaced".to_string()
            )]
        );
        drop(j);
        assert!(
            Journal::open(&path)
                .unwrap()
                .out_of_rotation()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn records_survive_reopen_and_fence_stale_epochs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        let (sd, digest) = signed("op1");
        {
            let j = Journal::open(&path).unwrap();
            let e1 = j.acquire_epoch().unwrap();
            assert_eq!(e1, 1);
            assert!(matches!(j.begin(e1, &sd, &digest).unwrap(), Begin::New(_)));
            for s in mig("vm")[..2].iter().cloned() {
                j.record("op1", e1, s).unwrap();
            }
            // an illegal step is refused and not recorded
            assert!(matches!(
                j.record("op1", e1, mig("vm")[3].clone()),
                Err(JournalError::IllegalStep { .. })
            ));
        }
        let j = Journal::open(&path).unwrap();
        let op = j.op("op1").unwrap().unwrap();
        assert_eq!(
            op.step_names(),
            ["accepted", "target_chosen", "target_prepared"]
        );
        assert_eq!(j.unfinished().unwrap().len(), 1);
        assert_eq!(j.audit(false).unwrap(), Vec::<String>::new());
        assert_eq!(j.audit(true).unwrap().len(), 1);
        // a second executor takes over; the first one's step is refused and recorded
        let e2 = j.acquire_epoch().unwrap();
        assert_eq!(e2, 2);
        let err = j.record("op1", 1, mig("vm")[2].clone()).unwrap_err();
        assert!(matches!(
            err,
            JournalError::StaleEpoch {
                ours: 1,
                current: 2,
                ..
            }
        ));
        let rej = j.rejections().unwrap();
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].kind, "stale_epoch");
        assert_eq!(j.op("op1").unwrap().unwrap().steps.len(), 3);
        // the new one continues where the old one stopped
        for s in mig("vm")[2..].iter().cloned() {
            j.record("op1", e2, s).unwrap();
        }
        let op = j.op("op1").unwrap().unwrap();
        assert_eq!(op.vm_phase("vm"), VmPhase::Cleared);
        let rep = ExecutionReport {
            decision_id: "op1".into(),
            host_id: "h1".into(),
            action: Action::LiveMigrate,
            started_ms: 0,
            finished_ms: 1,
            report: Some(OpReport::default()),
            error: None,
        };
        j.finish("op1", e2, done(), rep.clone()).unwrap();
        let op = j.op("op1").unwrap().unwrap();
        assert_eq!(op.status(), OpStatus::Done);
        assert_eq!(op.report, Some(rep));
        assert_eq!(j.audit(true).unwrap(), Vec::<String>::new());
        // begin again finds it
        assert!(matches!(
            j.begin(e2, &sd, &digest).unwrap(),
            Begin::Existing(_)
        ));
        // events: 2 epochs, 7 steps incl. accepted/done, 1 rejection
        let ev = j.events().unwrap();
        assert_eq!(ev.len(), 2 + 7 + 1);
    }
}
