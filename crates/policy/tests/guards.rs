//! One test per rule and guard of the policy, through its public inputs.

mod common;

use common::*;
use waterbear_models::Signature;
use waterbear_policy::{
    Action, BudgetKind, CommandKind, Input, NoticeKind, ObserveInput, Outcome, Output,
    PolicyConfig, Scope, TtfHorizons,
};

#[test]
fn needs_consecutive_evidence_and_records_the_window() {
    let mut r = replay(PolicyConfig::default());
    let s = |t: i64| if t == 20 * MIN { 0.5 } else { 0.9 };
    let out = decisions(drive(&mut r, "a", 0, 0, 60 * MIN, s, Signature::Disk));
    assert_eq!(out.len(), 1);
    let d = &out[0];
    assert_eq!(d.action, Action::LiveMigrate);
    assert_eq!(d.rule, "ladder");
    // the dip at 20 min reset the streak: records at 30, 40, 50 min
    assert_eq!(d.ts_ms, 50 * MIN);
    assert_eq!(
        (d.window.first_ts_ms, d.window.last_ts_ms, d.window.records),
        (30 * MIN, 50 * MIN, 3)
    );
    assert!(d.why.contains("disk risk 0.90"), "{}", d.why);
    assert!(d.ttf_ms.unwrap() > 0 && d.evacuation_ms.unwrap() > 0);
    // targets: healthy spares with room, 4 VMs spread over them
    assert_eq!(d.targets.iter().map(|t| t.vms).sum::<u32>(), 4);
    assert!(d.targets.iter().all(|t| t.host_id.starts_with("spare-")));
    // alternatives name every other ladder step with a reason
    assert_eq!(d.alternatives.len(), 5, "{:?}", d.alternatives);
    assert!(d.alternatives.iter().all(|a| !a.rejected.is_empty()));
}

#[test]
fn fault_domain_update_domain_and_availability_set_budgets() {
    for (kind, cfg) in [
        (BudgetKind::FaultDomain, PolicyConfig::default()),
        (
            BudgetKind::UpdateDomain,
            PolicyConfig {
                max_per_fault_domain: 5,
                max_per_update_domain: 1,
                ..Default::default()
            },
        ),
        (
            BudgetKind::AvailabilitySet,
            PolicyConfig {
                max_per_fault_domain: 5,
                max_per_update_domain: 5,
                max_per_availability_set: 1,
                ..Default::default()
            },
        ),
    ] {
        let mut r = replay(cfg);
        let mut got = Vec::new();
        for i in 0..3 {
            let t = i * 10 * MIN;
            for s in 0..3u32 {
                r.step(&obs(&format!("spare-{s}"), 10 + s, t, 0.0, Signature::None));
            }
            for h in ["a", "b"] {
                let mut o = obs(h, 7, t, 0.9, Signature::Disk);
                if let Input::Observe(x) = &mut o {
                    x.availability_sets = vec![3];
                }
                got.extend(decisions(r.step(&o)));
            }
        }
        assert_eq!(got.len(), 1, "{kind:?}: one host acts, the other waits");
        assert_eq!(r.policy.stats().deferred_budget, 1, "{kind:?}");
        let full: Vec<_> = r
            .policy
            .budget_usage()
            .filter(|b| b.used >= b.limit)
            .map(|b| b.kind)
            .collect();
        assert!(full.contains(&kind), "{kind:?}: {full:?}");
        // freeing the budget lets the other host act
        r.step(&Input::Report {
            id: got[0].id.clone(),
            outcome: Outcome::Failed {
                reason: "test".into(),
            },
            ts_ms: 31 * MIN,
        });
        let d = decisions(r.step(&obs("b", 7, 40 * MIN, 0.9, Signature::Disk)));
        assert_eq!(d.len(), 1, "{kind:?}");
    }
}

#[test]
fn evacuation_rate_limit_is_a_token_bucket_over_fleet_time() {
    let mut r = replay(PolicyConfig {
        evacuations_per_hour: 1.0,
        evacuation_burst: 1,
        stale_after_ms: 2 * HOUR,
        evidence_records: 1,
        probation_evidence_records: 1,
        ..Default::default()
    });
    for s in 0..3u32 {
        r.step(&obs(&format!("spare-{s}"), 10 + s, 0, 0.0, Signature::None));
    }
    assert_eq!(
        decisions(r.step(&obs("a", 0, 0, 0.9, Signature::Disk))).len(),
        1
    );
    assert!(decisions(r.step(&obs("b", 1, 0, 0.9, Signature::Disk))).is_empty());
    assert_eq!(r.policy.stats().deferred_rate, 1);
    // half an hour later: half a token
    for s in 0..3u32 {
        r.step(&obs(
            &format!("spare-{s}"),
            10 + s,
            30 * MIN,
            0.0,
            Signature::None,
        ));
    }
    assert!(decisions(r.step(&obs("b", 1, 30 * MIN, 0.9, Signature::Disk))).is_empty());
    for s in 0..3u32 {
        r.step(&obs(
            &format!("spare-{s}"),
            10 + s,
            61 * MIN,
            0.0,
            Signature::None,
        ));
    }
    let o = r.step(&obs("b", 1, 61 * MIN, 0.9, Signature::Disk));
    assert_eq!(decisions(o).len(), 1, "{:?}", r.policy.stats());
}

#[test]
fn targets_are_healthy_hosts_with_room_in_other_fault_domains() {
    let mut r = replay(PolicyConfig {
        evidence_records: 1,
        host_vm_capacity: 6,
        ..Default::default()
    });
    let mut put =
        |host: &str, fd: u32, score: f64, vms: u32| r.step(&obs_at(host, "c", fd, score, vms));
    put("same-fd", 0, 0.0, 0); // same fault domain: last resort
    put("full", 1, 0.0, 6); // no room
    put("risky", 2, 0.5, 0); // scores above the exit threshold
    put("ok-1", 3, 0.0, 4); // room for 2
    put("ok-2", 4, 0.0, 5); // room for 1
    let d = decisions(put("src", 0, 0.95, 5)).remove(0);
    let mut t: Vec<(String, u32)> = d
        .targets
        .iter()
        .map(|t| (t.host_id.clone(), t.vms))
        .collect();
    t.sort();
    // 5 VMs: 3 fit outside fault domain 0, the other 2 go to the same-domain host
    assert_eq!(
        t,
        [
            ("ok-1".into(), 2),
            ("ok-2".into(), 1),
            ("same-fd".into(), 2)
        ]
    );
    // a second evacuation finds the reserved room gone
    let mut r2 = r.clone();
    let out = r2.step(&Input::Observe(ObserveInput {
        host_id: "src2".into(),
        cluster: "c".into(),
        rack: "r9".into(),
        fault_domain: 9,
        update_domain: 1,
        availability_sets: vec![1],
        vm_count: 6,
        vm_mem_mib: 1,
        ts_ms: 0,
        score: 0.95,
        signature: Signature::Disk,
    }));
    assert!(decisions(out).is_empty());
    assert_eq!(r2.policy.stats().deferred_capacity, 1);
}

#[test]
fn targets_stay_in_the_source_cluster() {
    let mut r = replay(PolicyConfig {
        evidence_records: 1,
        host_vm_capacity: 6,
        ..Default::default()
    });
    let mut put = |host: &str, cluster: &str, fd: u32, score: f64, vms: u32| {
        r.step(&obs_at(host, cluster, fd, score, vms))
    };
    // an empty host in another cluster (first in index order, least loaded)
    put("other-cluster", "d", 1, 0.0, 0);
    put("same-cluster", "c", 1, 0.0, 3);
    let d = decisions(put("src", "c", 0, 0.95, 3)).remove(0);
    let t: Vec<&str> = d.targets.iter().map(|t| t.host_id.as_str()).collect();
    assert_eq!(t, ["same-cluster"]);
    // no room left in the cluster: deferred, not moved to the other cluster
    let out = put("src2", "c", 2, 0.95, 6);
    assert!(decisions(out).is_empty());
    assert_eq!(r.policy.stats().deferred_capacity, 1);
}

#[test]
fn escalation_waits_for_the_heal_check_then_climbs_the_ladder() {
    let mut r = replay(PolicyConfig {
        cooldown_ms: 10 * MIN,
        heal_check_ms: HOUR,
        ttf: TtfHorizons {
            host_agent_h: 1000.0,
            ..Default::default()
        },
        ..Default::default()
    });
    let out = decisions(drive(
        &mut r,
        "a",
        0,
        0,
        12 * HOUR,
        |_| 0.9,
        Signature::HostAgent,
    ));
    assert_eq!(
        action_names(&out),
        [
            "tardigrade_phase1",
            "tardigrade_phase2",
            "tardigrade_phase3",
            "live_migrate"
        ]
    );
    assert_eq!(
        out.iter().map(|d| d.generation).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    // phase 1 heals (or not) within the heal check: phase 2 waits for it; phase 2 only
    // collects diagnostics, so phase 3 follows after the cooldown alone
    let gap = |i: usize| out[i + 1].ts_ms - out[i].ts_ms;
    assert!(gap(0) >= MIN + HOUR, "{}", gap(0));
    assert!(gap(1) < HOUR, "{}", gap(1));
    assert!(gap(2) >= MIN + HOUR);
    let a = r.host_index("a");
    assert!(r.policy.is_retired(a));
}

#[test]
fn a_step_that_heals_closes_the_incident_and_puts_the_host_on_probation() {
    let mut r = replay(PolicyConfig {
        ttf: TtfHorizons {
            host_agent_h: 1000.0,
            ..Default::default()
        },
        ..Default::default()
    });
    // bad for 40 minutes, healed after phase 1
    let s = |t: i64| if t < 40 * MIN { 0.9 } else { 0.1 };
    let out = decisions(drive(&mut r, "a", 0, 0, 4 * HOUR, s, Signature::HostAgent));
    assert_eq!(action_names(&out), ["tardigrade_phase1"]);
    assert_eq!(r.policy.stats().healed, 1);
    // probation: one record at 0.55 (under the normal 0.7) raises the next incident,
    // once the cooldown has passed
    let out = decisions(drive(
        &mut r,
        "a",
        0,
        4 * HOUR,
        4 * HOUR + 10 * MIN,
        |_| 0.55,
        Signature::HostAgent,
    ));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].rule, "probation");
    assert_eq!(out[0].incident, 2);
    // after probation the normal rule is back
    let mut r2 = replay(PolicyConfig::default());
    let out = decisions(drive(
        &mut r2,
        "b",
        0,
        0,
        HOUR,
        |_| 0.55,
        Signature::HostAgent,
    ));
    assert!(out.is_empty());
}

#[test]
fn time_aware_choices() {
    // a short predicted time to failure skips the slow healing step
    let mut r = replay(PolicyConfig {
        ttf: TtfHorizons {
            host_agent_h: 1.0,
            ..Default::default()
        },
        ..Default::default()
    });
    let out = decisions(drive(
        &mut r,
        "a",
        0,
        0,
        HOUR,
        |_| 0.9,
        Signature::HostAgent,
    ));
    assert_eq!(action_names(&out), ["live_migrate"]);
    assert_eq!(out[0].rule, "time_jump");
    assert!(
        out[0]
            .alternatives
            .iter()
            .any(|a| a.action == "tardigrade_phase1" && a.rejected.contains("too slow"))
    );

    // migration slower than the time left: phase 3 keeps memory and is faster
    let mut r = replay(PolicyConfig {
        migrate_mib_per_s: 60.0,
        dirty_mib_per_s: 50.0,
        ttf: TtfHorizons {
            memory_h: 1.0,
            ..Default::default()
        },
        heal_check_ms: 0,
        ..Default::default()
    });
    let out = decisions(drive(&mut r, "a", 0, 0, HOUR, |_| 0.99, Signature::Memory));
    assert_eq!(out[0].action.as_str(), "tardigrade_phase3");
    // ... and the executor's bandwidth measurement changes the choice
    let mut r = replay(PolicyConfig {
        migrate_mib_per_s: 60.0,
        dirty_mib_per_s: 50.0,
        ttf: TtfHorizons {
            memory_h: 0.05,
            ..Default::default()
        },
        ..Default::default()
    });
    r.step(&Input::Bandwidth {
        mib_per_s: 10_000.0,
    });
    let out = decisions(drive(&mut r, "a", 0, 0, HOUR, |_| 0.99, Signature::Memory));
    assert_eq!(out[0].action, Action::LiveMigrate);
    assert_eq!(out[0].rule, "time_jump");

    // urgent: a disk close to failure acts on its first record of evidence
    let mut r = replay(PolicyConfig {
        ttf: TtfHorizons {
            disk_h: 0.2,
            ..Default::default()
        },
        ..Default::default()
    });
    let out = decisions(drive(&mut r, "a", 0, 0, HOUR, |_| 0.9, Signature::Disk));
    // (the first record gives no interval to judge by; the second one acts, not the third)
    assert_eq!(out[0].ts_ms, 10 * MIN);
    assert_eq!(out[0].rule, "urgent_ttf");
    assert!(out[0].alternatives.iter().any(|a| a.action == "wait"));
}

#[test]
fn common_cause_raises_one_infrastructure_incident_and_drains_nothing_there() {
    let mut r = replay(PolicyConfig {
        evidence_records: 2,
        common_cause_drain_share: 0.0,
        ..Default::default()
    });
    let host = |rack: u32, i: u32| format!("r{rack}-h{i}");
    let mut all = Vec::new();
    for step in 0..6i64 {
        let t = step * 10 * MIN;
        for rack in 0..6u32 {
            for i in 0..10u32 {
                // rack 0 overheats: 6 of its 10 hosts together from 10 min on
                let hot = rack == 0 && i < 6 && t >= 10 * MIN;
                // one independent disk failure in rack 1
                let disk = rack == 1 && i == 0;
                let (score, sig) = if hot {
                    (0.9, Signature::Thermal)
                } else if disk {
                    (0.9, Signature::Disk)
                } else {
                    (0.0, Signature::None)
                };
                let out = r.step(&Input::Observe(ObserveInput {
                    host_id: host(rack, i),
                    cluster: "c".into(),
                    rack: format!("rack{rack}"),
                    fault_domain: rack,
                    update_domain: i % 5,
                    availability_sets: vec![],
                    vm_count: 2,
                    vm_mem_mib: 8192,
                    ts_ms: t,
                    score,
                    signature: sig,
                }));
                all.extend(out);
            }
        }
    }
    let incidents: Vec<_> = notices(&all)
        .into_iter()
        .filter(|n| n.kind == NoticeKind::InfrastructureIncident)
        .collect();
    assert_eq!(incidents.len(), 1, "{incidents:?}");
    assert_eq!(incidents[0].scope, "rack c/rack0");
    assert!(incidents[0].hosts.len() >= 4);
    let ds = decisions(all);
    // no drain in rack 0; the disk host of rack 1 is evacuated, and not into fault domain 0
    assert!(ds.iter().all(|d| !d.host_id.starts_with("r0-")), "{ds:?}");
    let disk = ds
        .iter()
        .find(|d| d.host_id == "r1-h0")
        .expect("independent failure handled");
    assert!(
        disk.targets.iter().all(|t| !t.host_id.starts_with("r0-")),
        "{:?}",
        disk.targets
    );
    assert!(r.policy.stats().deferred_common_cause > 0);
}

#[test]
fn circuit_breaker_opens_on_a_score_jump_and_on_stale_telemetry() {
    let mut r = replay(PolicyConfig {
        evidence_records: 1,
        max_per_fault_domain: 20,
        max_per_update_domain: 20,
        max_per_availability_set: 20,
        ..Default::default()
    });
    let mut all = Vec::new();
    for step in 0..8i64 {
        let t = step * 10 * MIN;
        for i in 0..40u32 {
            // from 30 minutes to 50 minutes, half the fleet suddenly scores high (a bad model push)
            let bad = (30 * MIN..50 * MIN).contains(&t) && i % 2 == 0;
            all.extend(r.step(&obs(
                &format!("h{i}"),
                i % 5,
                t,
                if bad { 0.95 } else { 0.0 },
                Signature::Disk,
            )));
        }
    }
    assert!(has_notice(&all, NoticeKind::CircuitBreakerOpen));
    assert!(has_notice(&all, NoticeKind::CircuitBreakerClosed));
    let open = notices(&all)
        .into_iter()
        .find(|n| n.kind == NoticeKind::CircuitBreakerOpen)
        .unwrap()
        .clone();
    assert!(open.why.contains("jumped"), "{}", open.why);
    // with one record of evidence, the hosts that report first act before the jump
    // is large enough to see (10 points of 40 hosts: 4); the rest wait
    let n = decisions(all).len();
    assert!(n <= 4, "{n}");
    assert!(r.policy.stats().deferred_breaker > 0);

    // stale: the receiver's clock runs on and no record arrives
    let mut r = replay(PolicyConfig::default());
    r.step(&obs("a", 0, 0, 0.0, Signature::None));
    let out = r.step(&Input::Tick { now_ms: 2 * HOUR });
    assert!(has_notice(&out, NoticeKind::CircuitBreakerOpen), "{out:?}");
    assert!(r.policy.breaker_open());
    // records flow again: the next check closes it
    let mut out = r.step(&obs("a", 0, 2 * HOUR, 0.0, Signature::None));
    out.extend(r.step(&obs("a", 0, 2 * HOUR + 10 * MIN, 0.0, Signature::None)));
    assert!(
        has_notice(&out, NoticeKind::CircuitBreakerClosed),
        "{out:?}"
    );

    // missing: most hosts stop reporting
    let mut r = replay(PolicyConfig::default());
    let mut all = Vec::new();
    for step in 0..10i64 {
        let t = step * 10 * MIN;
        for i in 0..20u32 {
            if step < 3 || i < 5 {
                all.extend(r.step(&obs(&format!("h{i}"), 0, t, 0.0, Signature::None)));
            }
        }
    }
    let why: Vec<_> = notices(&all).iter().map(|n| n.why.clone()).collect();
    assert!(why.iter().any(|w| w.contains("sent nothing")), "{why:?}");
}

#[test]
fn shadow_mode_decides_and_logs_without_holding_anything() {
    let mut r = replay(PolicyConfig {
        shadow: true,
        ..Default::default()
    });
    let out = decisions(drive(&mut r, "a", 0, 0, HOUR, |_| 0.9, Signature::Disk));
    assert_eq!(out.len(), 1);
    assert!(out[0].shadow);
    assert_eq!(r.policy.in_flight(), 0);
    assert!(r.policy.budget_usage().all(|b| b.used == 0));
}

#[test]
fn overrides_force_and_forbid_and_pauses_are_recorded() {
    let mut r = replay(PolicyConfig::default());
    // force an action on a quiet host
    drive(&mut r, "q", 0, 0, 10 * MIN, |_| 0.0, Signature::None);
    let out = r.step(&cmd(
        "op-1",
        5 * MIN,
        CommandKind::Force {
            host_id: "q".into(),
            action: Action::Reboot,
        },
    ));
    assert!(has_notice(&out, NoticeKind::Command));
    let ds = decisions(drive(
        &mut r,
        "q",
        0,
        10 * MIN,
        20 * MIN,
        |_| 0.0,
        Signature::None,
    ));
    assert_eq!(action_names(&ds), ["reboot"]);
    assert_eq!(ds[0].rule, "override_force");
    assert_eq!(ds[0].commands, ["op-1"]);

    // forbid live migration on a disk host: the ladder skips to the next step
    let mut r = replay(PolicyConfig::default());
    r.step(&cmd(
        "op-2",
        0,
        CommandKind::Forbid {
            host_id: "d".into(),
            action: Action::LiveMigrate,
        },
    ));
    let ds = decisions(drive(&mut r, "d", 0, 0, HOUR, |_| 0.9, Signature::Disk));
    assert_eq!(ds[0].action, Action::Reboot);
    assert!(ds[0].commands.contains(&"op-2".to_owned()));
    assert!(
        ds[0]
            .alternatives
            .iter()
            .any(|a| a.action == "live_migrate" && a.rejected.contains("op-2"))
    );

    // pause: nothing happens in the paused scope until it is resumed
    for scope in [
        Scope::Host {
            host_id: "p".into(),
        },
        Scope::FaultDomain {
            cluster: "c".into(),
            fault_domain: 0,
        },
        Scope::Cluster {
            cluster: "c".into(),
        },
        Scope::Fleet,
    ] {
        let mut r = replay(PolicyConfig::default());
        r.step(&cmd(
            "op-3",
            0,
            CommandKind::Pause {
                scope: scope.clone(),
            },
        ));
        let ds = decisions(drive(&mut r, "p", 0, 0, HOUR, |_| 0.9, Signature::Disk));
        assert!(ds.is_empty(), "{scope}");
        assert!(r.policy.stats().deferred_pause > 0);
        let out = r.step(&cmd(
            "op-4",
            HOUR,
            CommandKind::Resume {
                scope: scope.clone(),
            },
        ));
        assert!(has_notice(&out, NoticeKind::Command));
        let ds = decisions(drive(
            &mut r,
            "p",
            0,
            HOUR,
            2 * HOUR,
            |_| 0.9,
            Signature::Disk,
        ));
        assert_eq!(ds.len(), 1, "{scope}");
    }
    // a resume of a scope that is not paused is refused, and recorded
    let mut r = replay(PolicyConfig::default());
    let out = r.step(&cmd(
        "op-5",
        0,
        CommandKind::Resume {
            scope: Scope::Fleet,
        },
    ));
    assert!(has_notice(&out, NoticeKind::CommandRejected));
}

#[test]
fn return_to_service_starts_probation() {
    let mut r = replay(PolicyConfig::default());
    let ds = decisions(drive(&mut r, "a", 0, 0, HOUR, |_| 0.9, Signature::Disk));
    assert_eq!(ds.len(), 1);
    let idx = r.host_index("a");
    assert!(r.policy.is_retired(idx));
    let out = r.step(&cmd(
        "op-9",
        10 * HOUR,
        CommandKind::ReturnToService {
            host_id: "a".into(),
        },
    ));
    assert!(has_notice(&out, NoticeKind::Command));
    assert!(!r.policy.is_retired(idx));
    let ds = decisions(drive(
        &mut r,
        "a",
        0,
        10 * HOUR,
        11 * HOUR,
        |_| 0.55,
        Signature::Disk,
    ));
    assert_eq!(ds.len(), 1);
    assert_eq!(ds[0].rule, "probation");
}

#[test]
fn timeouts_free_the_budget() {
    let mut r = replay(PolicyConfig::default());
    for s in 0..3u32 {
        r.step(&obs(&format!("spare-{s}"), 10 + s, 0, 0.0, Signature::None));
    }
    for t in 0..3 {
        r.step(&obs("a", 0, t * MIN, 0.9, Signature::Disk));
    }
    assert_eq!(r.policy.in_flight(), 1);
    let late = 3 * MIN + r.policy.params().action_timeout_ms + 1;
    r.step(&obs("a", 0, late, 0.9, Signature::Disk));
    assert_eq!(r.policy.stats().timeouts, 1);
    assert_eq!(r.policy.in_flight(), 0);
    assert!(r.policy.budget_usage().all(|b| b.used == 0));
}

#[test]
fn unresponsive_goes_reboot_then_out_of_rotation() {
    let mut r = replay(PolicyConfig {
        cooldown_ms: 0,
        heal_check_ms: 0,
        ..Default::default()
    });
    let ds = decisions(drive(
        &mut r,
        "a",
        0,
        0,
        3 * HOUR,
        |_| 0.99,
        Signature::Unresponsive,
    ));
    assert_eq!(action_names(&ds), ["reboot", "out_of_rotation"]);
    let _ = Output::Notice;
}

#[test]
fn common_cause_still_drains_a_bounded_share_of_the_rack() {
    let mut r = replay(PolicyConfig {
        evidence_records: 2,
        common_cause_drain_share: 0.25,
        max_per_fault_domain: 10,
        max_per_update_domain: 10,
        max_per_availability_set: 10,
        evacuation_burst: 10,
        ..Default::default()
    });
    let mut ds = Vec::new();
    for step in 0..12i64 {
        let t = step * 10 * MIN;
        for rack in 0..6u32 {
            for i in 0..10u32 {
                let hot = rack == 0 && i < 8 && t >= 10 * MIN;
                let out = r.step(&obs(
                    &format!("r{rack}-h{i}"),
                    rack,
                    t,
                    if hot { 0.9 } else { 0.0 },
                    if hot {
                        Signature::Thermal
                    } else {
                        Signature::None
                    },
                ));
                for o in &out {
                    if let Output::Decision(d) = o {
                        r.step(&Input::Report {
                            id: d.id.clone(),
                            outcome: Outcome::Succeeded,
                            ts_ms: t + MIN,
                        });
                    }
                }
                ds.extend(decisions(out));
            }
        }
    }
    // 8 of 10 hosts degraded; at most 25% of the rack (2 hosts) is drained
    assert_eq!(ds.len(), 2, "{:?}", action_names(&ds));
    assert!(ds.iter().all(|d| {
        d.alternatives
            .iter()
            .any(|a| a.rejected.contains("infrastructure incident"))
    }));
}
