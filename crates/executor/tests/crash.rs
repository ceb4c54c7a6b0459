//! The executor as a separate process, killed with SIGKILL at every step of
//! a live migration of a real guest, then restarted without the crash point:
//! the migration completes (or rolls back), the VM runs on exactly one host
//! and keeps running, and the journal is consistent.

mod common;

use std::io::Write;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};

use common::*;
use waterbear_executor::journal::Step;
use waterbear_executor::{Journal, OpStatus};
use waterbear_policy::Action;

const POINTS: [&str; 9] = [
    "accepted",
    "target_chosen",
    "target_prepared",
    "migration_started",
    "migration_in_flight",
    "committed",
    "source_cleared",
    "marked_out",
    "done",
];

fn write_decision(
    dir: &std::path::Path,
    i: usize,
    sd: &waterbear_executor::SignedDecision,
) -> std::path::PathBuf {
    let path = dir.join(format!("d{i}.ndjson"));
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(f, "{}", serde_json::to_string(sd).unwrap()).unwrap();
    path
}

fn run(
    dir: &std::path::Path,
    agents: &[(&str, &AgentProc)],
    decisions: &std::path::Path,
    now_ms: i64,
    crash_after: Option<&str>,
) -> Output {
    command(dir, agents, decisions, now_ms, crash_after)
        .output()
        .unwrap()
}

fn command(
    dir: &std::path::Path,
    agents: &[(&str, &AgentProc)],
    decisions: &std::path::Path,
    now_ms: i64,
    crash_after: Option<&str>,
) -> Command {
    let mut cmd = Command::new(EXE);
    cmd.arg("run")
        .arg("--journal")
        .arg(dir.join("journal.redb"))
        .arg("--key-file")
        .arg(dir.join("key.hex"))
        .arg("--decisions")
        .arg(decisions)
        .args(["--now-ms", &now_ms.to_string(), "--verify-checksum"]);
    for (h, a) in agents {
        cmd.arg("--agent").arg(format!("{h}={}", a.addr));
    }
    if let Some(p) = crash_after {
        cmd.args(["--crash-after", p]);
    }
    cmd
}

#[test]
fn sigkill_at_every_step_of_a_migration() {
    let (a, b) = (AgentProc::spawn(), AgentProc::spawn());
    let agents = [("h1", &a), ("h2", &b)];
    a.start_vm("vm-crash", 32, 8 << 20);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.hex"), hex::encode(SECRET)).unwrap();

    let mut at = 0usize; // index of the agent holding the VM
    let mut ids = Vec::new();
    for (i, point) in POINTS.iter().enumerate() {
        let host = agents[at].0;
        let ts = 1_000 * (i as i64 + 1);
        let sd = signed(host, i as u64 + 1, Action::LiveMigrate, ts);
        ids.push(sd.decision.id.clone());
        let path = dir.path().join(format!("d{i}.ndjson"));
        let mut f = std::fs::File::create(&path).unwrap();
        writeln!(f, "{}", serde_json::to_string(&sd).unwrap()).unwrap();
        drop(f);

        let crashed = run(dir.path(), &agents, &path, ts, Some(point));
        assert_eq!(
            crashed.status.signal(),
            Some(libc::SIGKILL),
            "{point}: expected a SIGKILL, got {:?}\n{}",
            crashed.status,
            String::from_utf8_lossy(&crashed.stderr)
        );
        // the crash left an operation behind (or, at `done`, a finished one)
        {
            let j = Journal::open(dir.path().join("journal.redb")).unwrap();
            let op = j.op(&sd.decision.id).unwrap().unwrap();
            let last = op.steps.last().unwrap().step.name();
            let expect_last = if *point == "migration_in_flight" {
                "migration_started"
            } else {
                point
            };
            assert_eq!(last, expect_last, "{point}: steps {:?}", op.step_names());
            assert!(j.audit(false).unwrap().is_empty());
        }

        let rerun = run(dir.path(), &agents, &path, ts, None);
        assert!(
            rerun.status.success(),
            "{point}: restart failed\n{}",
            String::from_utf8_lossy(&rerun.stderr)
        );
        let now_at = runs_exactly_once(&[&a, &b], "vm-crash");
        let j = Journal::open(dir.path().join("journal.redb")).unwrap();
        let op = j.op(&sd.decision.id).unwrap().unwrap();
        match op.status() {
            OpStatus::Done => assert_ne!(now_at, at, "{point}: done but the VM did not move"),
            OpStatus::RolledBack => assert_eq!(now_at, at, "{point}: rolled back but moved"),
            OpStatus::InProgress => panic!("{point}: still in progress: {:?}", op.step_names()),
        }
        // A drained host stays out of rotation (durably: every executor
        // process starts from the journal) until the operator returns it;
        // the next round migrates back to it.
        let out: Vec<String> = j.out_of_rotation().unwrap().into_keys().collect();
        if op.status() == OpStatus::Done {
            assert_eq!(out, [host], "{point}");
            drop(j);
            let ret = Command::new(EXE)
                .args(["return-host", "--journal"])
                .arg(dir.path().join("journal.redb"))
                .args(["--reason", "repaired", host])
                .output()
                .unwrap();
            assert!(
                ret.status.success(),
                "{}",
                String::from_utf8_lossy(&ret.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&ret.stdout).trim(),
                format!("{host}: returned to rotation")
            );
        } else {
            assert!(out.is_empty(), "{point}: {out:?}");
            drop(j);
        }
        let j = Journal::open(dir.path().join("journal.redb")).unwrap();
        assert!(j.out_of_rotation().unwrap().is_empty());
        // the restarted executor printed the same report the journal holds
        let printed: waterbear_executor::ExecutionReport = serde_json::from_str(
            String::from_utf8_lossy(&rerun.stdout)
                .lines()
                .last()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(Some(printed), op.report);
        // where a migration report was seen, both sides agreed on the memory CRC
        for s in &op.steps {
            if let Step::Committed {
                measured: Some(m), ..
            } = &s.step
            {
                assert!(m.checksum.is_some(), "{point}: no checksum in {m:?}");
            }
        }
        let m = op
            .report
            .as_ref()
            .and_then(|r| r.report.as_ref())
            .and_then(|r| r.measured.clone());
        eprintln!(
            "{point}: {:?} -> {:?}; measured {m:?}",
            op.status(),
            op.step_names()
        );
        at = now_at;
    }

    let j = Journal::open(dir.path().join("journal.redb")).unwrap();
    assert_eq!(j.audit(true).unwrap(), Vec::<String>::new());
    assert_eq!(j.ops().unwrap().len(), POINTS.len());
    assert!(j.unfinished().unwrap().is_empty());
    // one epoch per process: a crashed and a restarted executor per point
    assert_eq!(j.current_epoch().unwrap(), 2 * POINTS.len() as u64);
    assert!(j.rejections().unwrap().is_empty());
}

/// Tardigrade phase 3 with the executor killed before, during and after the
/// agent's memory-preserving restart: the phase runs (at least once; a
/// repeat only costs another freeze), the guest keeps its memory and runs.
#[test]
fn sigkill_around_a_phase_3() {
    let a = AgentProc::spawn();
    let agents = [("h1", &a)];
    a.start_vm("vm-p3", 32, 4 << 20);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.hex"), hex::encode(SECRET)).unwrap();
    let pid = a.child.id();
    let p3 = Action::Tardigrade {
        phase: waterbear_policy::Phase::MemoryPreservingReset,
    };
    for (i, point) in [
        "accepted",
        "phase_started",
        "phase_in_flight",
        "phase_completed",
        "done",
    ]
    .iter()
    .enumerate()
    {
        let before = a.find("vm-p3").unwrap().counter;
        let sd = signed("h1", i as u64 + 1, p3, 1_000);
        let path = write_decision(dir.path(), i, &sd);
        let crashed = run(dir.path(), &agents, &path, 1_000, Some(point));
        assert_eq!(crashed.status.signal(), Some(libc::SIGKILL), "{point}");
        let rerun = run(dir.path(), &agents, &path, 1_000, None);
        assert!(
            rerun.status.success(),
            "{point}: {}",
            String::from_utf8_lossy(&rerun.stderr)
        );
        runs_exactly_once(&[&a], "vm-p3");
        // memory kept: the guest counter continued rather than restarting
        assert!(a.find("vm-p3").unwrap().counter > before, "{point}");
        let j = Journal::open(dir.path().join("journal.redb")).unwrap();
        let op = j.op(&sd.decision.id).unwrap().unwrap();
        assert_eq!(
            op.status(),
            OpStatus::Done,
            "{point}: {:?}",
            op.step_names()
        );
        let m = op.report.clone().unwrap().report.unwrap().measured.unwrap();
        eprintln!(
            "{point}: {:?}; freeze {:?} ms",
            op.step_names(),
            m.freeze_ms
        );
    }
    // phase 3 re-executes the agent in place: same process throughout
    assert_eq!(a.child.id(), pid);
    let j = Journal::open(dir.path().join("journal.redb")).unwrap();
    assert!(j.audit(true).unwrap().is_empty());
}

/// Two executor processes on one journal: the first is overtaken while
/// paused after preparing the target; the second resumes and completes the
/// migration; when the first wakes up, its next step is refused and recorded,
/// and it exits without touching the VM.
#[test]
fn an_overtaken_executor_process_is_fenced() {
    use std::io::{BufRead, BufReader};
    let (a, b) = (AgentProc::spawn(), AgentProc::spawn());
    let agents = [("h1", &a), ("h2", &b)];
    a.start_vm("vm-fence2", 16, 2 << 20);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("key.hex"), hex::encode(SECRET)).unwrap();
    let sd = signed("h1", 1, Action::LiveMigrate, 1_000);
    let path = write_decision(dir.path(), 0, &sd);

    let mut first = command(dir.path(), &agents, &path, 1_000, None)
        .args(["--pause-after", "target_prepared"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("paused after target_prepared") {
        line.clear();
        assert!(
            err.read_line(&mut line).unwrap() > 0,
            "first executor ended early"
        );
    }
    // the journal is open in both processes now (redb multi-writer mode)
    {
        let j = Journal::open(dir.path().join("journal.redb")).unwrap();
        assert_eq!(j.current_epoch().unwrap(), 1);
    }
    let second = run(dir.path(), &agents, &path, 1_000, None);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-fence2"), 1);

    writeln!(first.stdin.take().unwrap()).unwrap();
    let status = first.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    assert!(!status.success(), "the stale executor must fail");
    assert!(rest.contains("fenced"), "{rest}");
    // still exactly one copy, on the second executor's target
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-fence2"), 1);
    let j = Journal::open(dir.path().join("journal.redb")).unwrap();
    let rej = j.rejections().unwrap();
    assert_eq!(rej.len(), 1, "{rej:?}");
    assert_eq!((rej[0].kind.as_str(), rej[0].epoch), ("stale_epoch", 1));
    let op = j.op(&sd.decision.id).unwrap().unwrap();
    assert_eq!(op.status(), OpStatus::Done);
    let epochs: Vec<u64> = op.steps.iter().map(|s| s.epoch).collect();
    assert_eq!(epochs, [1, 1, 1, 2, 2, 2, 2, 2]);
    assert!(j.audit(true).unwrap().is_empty());
}
