//! The durable executor on real guests (/dev/kvm): authentication, replay,
//! fencing, resume, rollback, Tardigrade phases and reboot.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::*;
use waterbear_executor::journal::Step;
use waterbear_executor::{
    Backoff, DurableExecutor, ExecError, Journal, JournalError, Key, Keyring, KvmBackend, KvmHost,
    KvmOptions, OpStatus, sign,
};
use waterbear_policy::{Action, Phase};

fn backend(hosts: &[(&str, &AgentProc)]) -> KvmBackend {
    let map: BTreeMap<String, KvmHost> = hosts
        .iter()
        .map(|(h, a)| {
            (
                (*h).to_owned(),
                KvmHost {
                    agent: a.addr.clone(),
                    vm_prefix: None,
                },
            )
        })
        .collect();
    let mut opts = KvmOptions::default();
    opts.migrate.verify_checksum = true;
    opts.settle_timeout = std::time::Duration::from_secs(10);
    KvmBackend::new(map, opts)
}

fn fast_backoff() -> Backoff {
    Backoff {
        base_ms: 10,
        factor: 2,
        cap_ms: 50,
        max_attempts: 3,
        jitter_seed: Some(7),
    }
}

#[test]
fn forged_replayed_and_stale_decisions_are_rejected() {
    let (a, b) = (AgentProc::spawn(), AgentProc::spawn());
    a.start_vm("vm-auth", 16, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path().join("j.redb")).unwrap());
    let mut ex = DurableExecutor::new(
        j.clone(),
        backend(&[("h1", &a), ("h2", &b)]),
        Keyring::new([key()]),
    )
    .unwrap();
    let good = signed("h1", 1, Action::LiveMigrate, 10_000);
    let all = |_: &str| true;
    let kind = |r: Result<_, ExecError>| match r {
        Err(ExecError::Rejected { kind, .. }) => kind,
        other => panic!("expected a rejection, got {other:?}"),
    };

    // forged: right key id, wrong secret
    let forger = Key::new("k1", *b"not the real key but long enough").unwrap();
    let forged = sign(&good.decision, &forger);
    assert_eq!(kind(ex.execute(&forged, 10_000, 60_000, &all)), "bad_mac");
    // tampered after signing
    let mut tampered = good.clone();
    tampered.decision.host_id = "h2".into();
    assert_eq!(kind(ex.execute(&tampered, 10_000, 60_000, &all)), "bad_mac");
    // unknown key
    let other = sign(&good.decision, &Key::new("k2", *SECRET).unwrap());
    assert_eq!(
        kind(ex.execute(&other, 10_000, 60_000, &all)),
        "unknown_key"
    );
    // too old for the window
    assert_eq!(kind(ex.execute(&good, 100_000, 60_000, &all)), "stale");
    // nothing happened to the VM, no operation exists
    assert!(a.find("vm-auth").is_some() && b.find("vm-auth").is_none());
    assert!(j.ops().unwrap().is_empty());

    // the genuine one runs
    let rep = ex.execute(&good, 10_000, 60_000, &all).unwrap();
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(rep.report.as_ref().unwrap().vms_moved, 1);
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-auth"), 1);
    // the same decision again: the recorded report, nothing done
    assert_eq!(ex.execute(&good, 10_000, 60_000, &all).unwrap(), rep);
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-auth"), 1);
    // same id, different content, validly signed: a replay
    let mut altered = good.decision.clone();
    altered.why = "something else".into();
    let replay = sign(&altered, &key());
    assert_eq!(kind(ex.execute(&replay, 10_000, 60_000, &all)), "replayed");

    let kinds: Vec<String> = j
        .rejections()
        .unwrap()
        .into_iter()
        .map(|r| r.kind)
        .collect();
    assert_eq!(
        kinds,
        ["bad_mac", "bad_mac", "unknown_key", "stale", "replayed"]
    );
    assert_eq!(j.ops().unwrap().len(), 1);
    assert!(j.audit(true).unwrap().is_empty());
}

#[test]
fn stale_executor_is_fenced_and_the_new_one_resumes() {
    let (a, b) = (AgentProc::spawn(), AgentProc::spawn());
    a.start_vm("vm-fence", 32, 4 << 20);
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path().join("j.redb")).unwrap());
    let all = |_: &str| true;

    // Executor 1 is overtaken right after it prepared the target: another
    // executor starts (takes a newer epoch) at that moment.
    let mut ex1 = DurableExecutor::new(
        j.clone(),
        backend(&[("h1", &a), ("h2", &b)]),
        Keyring::new([key()]),
    )
    .unwrap();
    assert_eq!(ex1.epoch(), 1);
    let j2 = j.clone();
    ex1.set_crash_point(Some("target_prepared".into()), move |_| {
        j2.acquire_epoch().unwrap();
    });
    let d = signed("h1", 1, Action::LiveMigrate, 5_000);
    let err = ex1.execute(&d, 5_000, 60_000, &all).unwrap_err();
    assert!(err.is_stale_epoch(), "{err:?}");
    // it could not start the migration: the VM is untouched on the source
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-fence"), 0);
    let op = j.op(&d.decision.id).unwrap().unwrap();
    assert_eq!(
        op.step_names(),
        ["accepted", "target_chosen", "target_prepared"]
    );
    let rej = j.rejections().unwrap();
    assert_eq!(rej.len(), 1);
    assert_eq!((rej[0].kind.as_str(), rej[0].epoch), ("stale_epoch", 1));
    // nor can it start anything new
    let d2 = signed("h2", 1, Action::Reboot, 5_000);
    assert!(matches!(
        ex1.execute(&d2, 5_000, 60_000, &all),
        Err(ExecError::Journal(JournalError::StaleEpoch {
            ours: 1,
            current: 2,
            ..
        }))
    ));
    assert_eq!(j.rejections().unwrap().len(), 2);

    // A new executor resumes the operation from its last step.
    let mut ex3 = DurableExecutor::new(
        j.clone(),
        backend(&[("h1", &a), ("h2", &b)]),
        Keyring::new([key()]),
    )
    .unwrap();
    assert_eq!(ex3.epoch(), 3);
    let done = ex3.resume_unfinished(&all).unwrap();
    assert_eq!(done.len(), 1);
    let rep = done.into_iter().next().unwrap().unwrap();
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-fence"), 1);
    let op = j.op(&d.decision.id).unwrap().unwrap();
    assert_eq!(op.status(), OpStatus::Done);
    assert_eq!(
        op.step_names(),
        [
            "accepted",
            "target_chosen",
            "target_prepared",
            "migration_started",
            "committed",
            "source_cleared",
            "marked_out",
            "done"
        ]
    );
    let epochs: Vec<u64> = op.steps.iter().map(|s| s.epoch).collect();
    assert_eq!(epochs, [1, 1, 1, 3, 3, 3, 3, 3]);
    let measured = rep.report.unwrap().measured.unwrap();
    assert_eq!(measured.migrations, 1);
    assert!(measured.downtime_max_ms > 0.0 && measured.bytes_sent >= 32 << 20);
    match &op.steps[4].step {
        Step::Committed {
            measured: Some(m), ..
        } => assert!(m.checksum.is_some()),
        other => panic!("{other:?}"),
    }
    assert!(j.audit(true).unwrap().is_empty());

    // h1 is out of rotation, and a restarted executor knows it from the journal
    // (so it never picks h1 as a migration target again) ...
    assert!(ex3.backend().out_of_rotation().contains("h1"));
    drop(ex3);
    let mut ex4 = DurableExecutor::new(
        j.clone(),
        backend(&[("h1", &a), ("h2", &b)]),
        Keyring::new([key()]),
    )
    .unwrap();
    let out: Vec<&String> = ex4.backend().out_of_rotation().iter().collect();
    assert_eq!(out, ["h1"]);
    // ... until it is returned, behind the executor's back (as
    // `wb-executor return-host` does from another process): the next
    // decision sees it back, and h1 is the only possible target
    assert!(j.return_to_rotation("h1", "repaired").unwrap());
    assert!(
        ex4.backend().out_of_rotation().contains("h1"),
        "not yet synced"
    );
    let sd = signed("h2", 90, Action::LiveMigrate, 9_000);
    let rep = ex4.execute(&sd, 9_000, 60_000, &all).unwrap();
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-fence"), 0);
    let out: Vec<&String> = ex4.backend().out_of_rotation().iter().collect();
    assert_eq!(out, ["h2"], "h1 back in (and the target), h2 drained");
    assert!(!ex4.return_to_rotation("h1", "again").unwrap());
}

#[test]
fn a_target_that_dies_makes_the_migration_roll_back() {
    let a = AgentProc::spawn();
    let b = std::sync::Mutex::new(AgentProc::spawn());
    a.start_vm("vm-rb", 16, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path().join("j.redb")).unwrap());
    let b_addr = b.lock().unwrap().addr.clone();
    let mut map = BTreeMap::new();
    map.insert(
        "h1".to_owned(),
        KvmHost {
            agent: a.addr.clone(),
            vm_prefix: None,
        },
    );
    map.insert(
        "h2".to_owned(),
        KvmHost {
            agent: b_addr,
            vm_prefix: None,
        },
    );
    let opts = KvmOptions {
        settle_timeout: std::time::Duration::from_secs(10),
        ..KvmOptions::default()
    };
    let mut ex =
        DurableExecutor::new(j.clone(), KvmBackend::new(map, opts), Keyring::new([key()])).unwrap();
    ex.backoff = fast_backoff();
    let b = Arc::new(b);
    let b2 = b.clone();
    ex.set_crash_point(Some("migration_started".into()), move |_| {
        b2.lock().unwrap().kill()
    });
    let d = signed("h1", 1, Action::LiveMigrate, 0);
    let rep = ex.execute(&d, 0, 60_000, &|_| true).unwrap();
    assert!(
        rep.error
            .as_deref()
            .is_some_and(|e| e.contains("gave up after 3 attempts")),
        "{rep:?}"
    );
    assert_eq!(runs_exactly_once(&[&a], "vm-rb"), 0);
    let op = j.op(&d.decision.id).unwrap().unwrap();
    assert_eq!(op.status(), OpStatus::RolledBack);
    let names = op.step_names();
    assert_eq!(names.iter().filter(|n| **n == "attempt_failed").count(), 3);
    assert_eq!(&names[names.len() - 2..], ["source_resumed", "rolled_back"]);
    assert!(j.audit(true).unwrap().is_empty());
}

#[test]
fn phases_1_and_3_and_reboot_on_real_guests() {
    let a = AgentProc::spawn();
    a.start_vm("vm-p", 32, 2 << 20);
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path().join("j.redb")).unwrap());
    let mut ex =
        DurableExecutor::new(j.clone(), backend(&[("h1", &a)]), Keyring::new([key()])).unwrap();
    let all = |_: &str| true;
    let p1 = Action::Tardigrade {
        phase: Phase::RecycleServices,
    };
    let rep = ex.execute(&signed("h1", 1, p1, 0), 0, 1000, &all).unwrap();
    let m = rep.report.unwrap().measured.unwrap();
    assert!(m.phase_ms.is_some(), "{m:?}");
    runs_exactly_once(&[&a], "vm-p");

    let before = a.find("vm-p").unwrap().counter;
    let p3 = Action::Tardigrade {
        phase: Phase::MemoryPreservingReset,
    };
    let rep = ex.execute(&signed("h1", 2, p3, 0), 0, 1000, &all).unwrap();
    let op = rep.report.unwrap();
    assert_eq!(op.vms_frozen, 1);
    let freeze = op.measured.unwrap().freeze_ms.unwrap();
    assert!(freeze > 0.0 && freeze < 5_000.0, "freeze {freeze} ms");
    // the guest continued, memory kept: the counter did not restart
    assert!(a.find("vm-p").unwrap().counter >= before);
    runs_exactly_once(&[&a], "vm-p");

    let rep = ex
        .execute(&signed("h1", 3, Action::Reboot, 0), 0, 1000, &all)
        .unwrap();
    assert_eq!(rep.report.unwrap().vms_interrupted, 1);
    runs_exactly_once(&[&a], "vm-p");
    assert!(j.audit(true).unwrap().is_empty());
    assert_eq!(j.ops().unwrap().len(), 3);
}

/// The window the journal cannot close: executor 1 recorded
/// `migration_started` (so its command is on its way) just as a newer
/// executor took over and reached the source agent. The agent, having seen
/// the newer epoch, refuses executor 1's migration; the refusal is recorded;
/// the newer executor then completes the operation.
#[test]
fn agents_refuse_a_stale_epoch_in_flight() {
    use waterbear_vmm::{AgentClient, Request};
    let (a, b) = (AgentProc::spawn(), AgentProc::spawn());
    a.start_vm("vm-agent-fence", 16, 1 << 20);
    let dir = tempfile::tempdir().unwrap();
    let j = Arc::new(Journal::open(dir.path().join("j.redb")).unwrap());
    let all = |_: &str| true;
    let mut ex1 = DurableExecutor::new(
        j.clone(),
        backend(&[("h1", &a), ("h2", &b)]),
        Keyring::new([key()]),
    )
    .unwrap();
    let (j2, a_addr) = (j.clone(), a.addr.clone());
    ex1.set_crash_point(Some("migration_started".into()), move |_| {
        let newer = j2.acquire_epoch().unwrap();
        let mut c = AgentClient::connect(&a_addr).unwrap();
        c.call(&Request::Fenced {
            epoch: newer,
            request: Box::new(Request::Ping),
        })
        .unwrap();
    });
    let d = signed("h1", 1, Action::LiveMigrate, 0);
    let err = ex1.execute(&d, 0, 60_000, &all).unwrap_err();
    assert!(
        matches!(
            err,
            ExecError::Journal(JournalError::StaleEpoch {
                ours: 1,
                current: 2,
                ..
            })
        ),
        "{err:?}"
    );
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-agent-fence"), 0);
    let rej = j.rejections().unwrap();
    assert_eq!(rej.len(), 1);
    assert!(rej[0].detail.contains("refused by agent"), "{rej:?}");
    assert_eq!(
        j.op(&d.decision.id).unwrap().unwrap().step_names(),
        [
            "accepted",
            "target_chosen",
            "target_prepared",
            "migration_started"
        ]
    );

    let mut ex3 = DurableExecutor::new(
        j.clone(),
        backend(&[("h1", &a), ("h2", &b)]),
        Keyring::new([key()]),
    )
    .unwrap();
    let rep = ex3.resume_unfinished(&all).unwrap().remove(0).unwrap();
    assert!(rep.error.is_none(), "{rep:?}");
    assert_eq!(runs_exactly_once(&[&a, &b], "vm-agent-fence"), 1);
    // the source agent now knows epoch 3: anything older is refused
    let mut c = AgentClient::connect(&a.addr).unwrap();
    let e = c
        .call(&Request::Fenced {
            epoch: 2,
            request: Box::new(Request::Ping),
        })
        .unwrap_err();
    assert!(e.to_string().contains("stale epoch 2 < 3"), "{e}");
    assert!(j.audit(true).unwrap().is_empty());
}

/// The highest epoch an agent has seen survives the agent's restart.
#[test]
fn an_agents_epoch_survives_its_restart() {
    use waterbear_vmm::Request;
    let data = tempfile::tempdir().unwrap();
    let fenced = |epoch| Request::Fenced {
        epoch,
        request: Box::new(Request::Ping),
    };
    {
        let a = AgentProc::spawn_with(data.path(), tempfile::tempdir().unwrap());
        a.client().call(&fenced(5)).unwrap();
        a.client().call(&fenced(5)).unwrap();
        assert!(a.client().call(&fenced(4)).is_err());
        // a fenced request cannot smuggle another one
        let nested = Request::Fenced {
            epoch: 9,
            request: Box::new(fenced(9)),
        };
        assert!(a.client().call(&nested).is_err());
    }
    let a = AgentProc::spawn_with(data.path(), tempfile::tempdir().unwrap());
    let e = a.client().call(&fenced(4)).unwrap_err();
    assert!(e.to_string().contains("stale epoch 4 < 5"), "{e}");
    a.client().call(&fenced(6)).unwrap();
}
