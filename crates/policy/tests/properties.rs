//! Properties of the policy over arbitrary input sequences: no disruption budget or
//! rate limit is exceeded, no action lands on a host in cooldown, with an action in
//! flight, or in a paused scope, no migration target is unhealthy or over capacity,
//! and replaying the same inputs gives the same outputs.

mod common;

use common::MIN;
use proptest::prelude::*;
use waterbear_models::Signature;
use waterbear_policy::{
    Action, Command, CommandKind, Input, ObserveInput, Outcome, Output, Policy, PolicyConfig,
    PolicySnapshot, Replay, Scope,
};

const HOSTS: u8 = 12;
const CAP: u32 = 8;

#[derive(Debug, Clone)]
enum Ev {
    Rec {
        host: u8,
        v: f64,
        sig: u8,
        vms: u32,
        dt: i64,
    },
    Report {
        pick: u8,
        ok: bool,
        dt: i64,
    },
    Pause {
        scope: u8,
        resume: bool,
    },
    Force {
        host: u8,
        action: u8,
    },
}

fn ev() -> impl Strategy<Value = Ev> {
    prop_oneof![
        12 => (0..HOSTS, prop_oneof![3 => 0.0f64..0.3, 2 => 0.3f64..1.0], 0u8..7, 0u32..=CAP, 0i64..12 * MIN)
            .prop_map(|(host, v, sig, vms, dt)| Ev::Rec { host, v, sig, vms, dt }),
        3 => (any::<u8>(), any::<bool>(), 0i64..30 * MIN).prop_map(|(pick, ok, dt)| Ev::Report { pick, ok, dt }),
        1 => (0u8..8, any::<bool>()).prop_map(|(scope, resume)| Ev::Pause { scope, resume }),
        1 => (0..HOSTS, 0u8..6).prop_map(|(host, action)| Ev::Force { host, action }),
    ]
}

fn scope_of(i: u8) -> Scope {
    match i {
        0..=2 => Scope::Host {
            host_id: format!("h{i}"),
        },
        3..=5 => Scope::FaultDomain {
            cluster: "c".into(),
            fault_domain: u32::from(i - 3),
        },
        6 => Scope::Cluster {
            cluster: "c".into(),
        },
        _ => Scope::Fleet,
    }
}

fn fd(h: u8) -> u32 {
    u32::from(h % 3)
}
fn ud(h: u8) -> u32 {
    u32::from(h % 2)
}
fn aset(h: u8) -> u32 {
    u32::from(h % 4)
}

fn paused(scopes: &[Scope], h: u8) -> bool {
    scopes.iter().any(|s| match s {
        Scope::Host { host_id } => *host_id == format!("h{h}"),
        Scope::FaultDomain { fault_domain, .. } => *fault_domain == fd(h),
        Scope::Cluster { .. } | Scope::Fleet => true,
    })
}

struct Open {
    id: String,
    host: u8,
    since: i64,
    action: Action,
    targets: Vec<(u8, u32)>,
}

fn run(k: u32, cooldown: i64, evs: &[Ev]) -> Result<Vec<Output>, TestCaseError> {
    run_cut(k, cooldown, evs, None)
}

/// As [`run`]; with `cut`, the policy is snapshotted to JSON before event `cut` and a
/// new one restored from that text carries on (what a restarted job does).
fn run_cut(
    k: u32,
    cooldown: i64,
    evs: &[Ev],
    cut: Option<usize>,
) -> Result<Vec<Output>, TestCaseError> {
    let cfg = PolicyConfig {
        max_per_fault_domain: k,
        max_per_update_domain: k + 1,
        max_per_availability_set: k,
        evacuations_per_hour: 2.0,
        evacuation_burst: 2,
        cooldown_ms: cooldown,
        evidence_records: 2,
        host_vm_capacity: CAP,
        // records of a host arrive every ~an hour here and 12 hosts are few: keep the
        // circuit breaker (tested on its own) from silencing most runs
        stale_after_ms: 24 * 3_600_000,
        max_hot_share: 0.6,
        max_hot_share_jump: 0.5,
        ..Default::default()
    };
    let p = cfg.clone().check().unwrap();
    let (rate, burst, exit, timeout) = (
        p.evacuations_per_hour,
        f64::from(p.evacuation_burst),
        p.exit_threshold,
        p.action_timeout_ms,
    );
    let mut r = Replay::new(Policy::new(p), "m@1");
    let mut t = 0i64;
    let mut open: Vec<Open> = Vec::new();
    let mut cooldown_until = [i64::MIN; HOSTS as usize];
    let mut last_score = [0.0f64; HOSTS as usize];
    let mut last_vms = [0u32; HOSTS as usize];
    let mut retired = [false; HOSTS as usize];
    let mut pauses: Vec<Scope> = Vec::new();
    let mut evac_times: Vec<i64> = Vec::new();
    let mut outputs = Vec::new();
    let mut n_cmd = 0;
    for (i, e) in evs.iter().enumerate() {
        if cut == Some(i) {
            let text = serde_json::to_string(&r.policy.snapshot_view()).unwrap();
            assert_eq!(text, serde_json::to_string(&r.policy.snapshot()).unwrap());
            let snap: PolicySnapshot = serde_json::from_str(&text).unwrap();
            r.policy = Policy::from_snapshot(r.policy.params().clone(), snap).unwrap();
        }
        match *e {
            Ev::Rec {
                host,
                v,
                sig,
                vms,
                dt,
            } => {
                t += dt;
                // reference timeouts: an open action past its timeout ends at this record
                open.retain(|o| {
                    if o.host == host && t - o.since > timeout {
                        cooldown_until[host as usize] = t + cooldown;
                        false
                    } else {
                        true
                    }
                });
                last_score[host as usize] = v;
                last_vms[host as usize] = vms;
                let out = r.step(&Input::Observe(ObserveInput {
                    host_id: format!("h{host}"),
                    cluster: "c".into(),
                    rack: format!("r{}", fd(host)),
                    fault_domain: fd(host),
                    update_domain: ud(host),
                    availability_sets: vec![aset(host)],
                    vm_count: vms,
                    vm_mem_mib: u64::from(vms) * 4096,
                    ts_ms: t,
                    score: v,
                    signature: Signature::ALL[sig as usize],
                }));
                for o in &out {
                    let Output::Decision(d) = o else { continue };
                    prop_assert_eq!(&d.host_id, &format!("h{host}"));
                    prop_assert!(!retired[host as usize], "action on a drained host");
                    prop_assert!(t >= cooldown_until[host as usize], "action during cooldown");
                    prop_assert!(
                        !open.iter().any(|o| o.host == host),
                        "second action in flight"
                    );
                    prop_assert!(!paused(&pauses, host), "action in a paused scope");
                    let mut targets = Vec::new();
                    for tg in &d.targets {
                        let th: u8 = tg.host_id[1..].parse().unwrap();
                        prop_assert!(th != host);
                        prop_assert!(!retired[th as usize], "target drained");
                        prop_assert!(last_score[th as usize] < exit, "target at risk");
                        prop_assert!(
                            !open.iter().any(|o| o.host == th),
                            "target under mitigation"
                        );
                        prop_assert!(!paused(&pauses, th), "target paused");
                        targets.push((th, tg.vms));
                    }
                    if matches!(d.action, Action::LiveMigrate | Action::OutOfRotation) {
                        let moved: u32 = targets.iter().map(|x| x.1).sum();
                        prop_assert_eq!(moved, vms, "every VM has a target");
                        evac_times.push(t);
                    }
                    open.push(Open {
                        id: d.id.clone(),
                        host,
                        since: t,
                        action: d.action,
                        targets,
                    });
                    // capacity: what this decision's targets hold plus what is promised
                    // to them (an earlier promise may be overtaken by VMs arriving from
                    // elsewhere; the policy cannot see those coming)
                    let chosen: Vec<u8> =
                        open.last().unwrap().targets.iter().map(|x| x.0).collect();
                    for th in chosen {
                        let promised: u32 = open
                            .iter()
                            .flat_map(|o| o.targets.iter())
                            .filter(|x| x.0 == th)
                            .map(|x| x.1)
                            .sum();
                        if promised > 0 {
                            prop_assert!(
                                last_vms[th as usize] + promised <= CAP,
                                "h{th} over capacity"
                            );
                        }
                    }
                }
                for (name, key, limit) in [
                    ("fault domain", fd as fn(u8) -> u32, k),
                    ("update domain", ud, k + 1),
                    ("availability set", aset, k),
                ] {
                    for id in 0..4 {
                        let n = open.iter().filter(|o| key(o.host) == id).count() as u32;
                        prop_assert!(n <= limit, "{name} {id}: {n} > {limit}");
                    }
                }
                // token bucket: over any span, at most burst + rate x span evacuations
                for (i, &a) in evac_times.iter().enumerate() {
                    for (j, &b) in evac_times.iter().enumerate().skip(i) {
                        let n = (j - i + 1) as f64;
                        let allowed = burst + rate * (b - a) as f64 / 3_600_000.0;
                        prop_assert!(n <= allowed + 1e-9, "{n} evacuations in {} ms", b - a);
                    }
                }
                outputs.extend(out);
            }
            Ev::Report { pick, ok, dt } => {
                t += dt;
                if !open.is_empty() {
                    let o = open.remove(pick as usize % open.len());
                    let outcome = if ok {
                        Outcome::Succeeded
                    } else {
                        Outcome::Failed {
                            reason: "test".into(),
                        }
                    };
                    prop_assert!(r.policy.report(&o.id, outcome, t), "known id");
                    cooldown_until[o.host as usize] = t + cooldown;
                    if ok && matches!(o.action, Action::LiveMigrate | Action::OutOfRotation) {
                        retired[o.host as usize] = true;
                    }
                }
            }
            Ev::Pause { scope, resume } => {
                n_cmd += 1;
                let s = scope_of(scope);
                let kind = if resume {
                    pauses.retain(|x| *x != s);
                    CommandKind::Resume { scope: s }
                } else {
                    pauses.push(s.clone());
                    CommandKind::Pause { scope: s }
                };
                outputs.extend(r.step(&Input::Command {
                    command: Command {
                        id: format!("op-{n_cmd}"),
                        ts_ms: t,
                        kind,
                    },
                }));
            }
            Ev::Force { host, action } => {
                n_cmd += 1;
                outputs.extend(r.step(&Input::Command {
                    command: Command {
                        id: format!("op-{n_cmd}"),
                        ts_ms: t,
                        kind: CommandKind::Force {
                            host_id: format!("h{host}"),
                            action: waterbear_policy::LADDER[action as usize],
                        },
                    },
                }));
            }
        }
        let used: u32 = r
            .policy
            .budget_usage()
            .filter(|b| b.kind == waterbear_policy::BudgetKind::FaultDomain)
            .map(|b| b.used)
            .sum();
        prop_assert_eq!(used as usize, open.len(), "budget accounting");
    }
    Ok(outputs)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn safety_holds_and_replays_agree(
        k in 1u32..3,
        cooldown in 0i64..90 * MIN,
        evs in proptest::collection::vec(ev(), 0..400),
    ) {
        let a = run(k, cooldown, &evs)?;
        let b = run(k, cooldown, &evs)?;
        prop_assert_eq!(a, b);
    }

    /// A policy restored from a JSON snapshot at any point carries on exactly as the
    /// one that never stopped.
    #[test]
    fn snapshot_restore_is_exact(
        k in 1u32..3,
        cooldown in 0i64..90 * MIN,
        evs in proptest::collection::vec(ev(), 1..400),
        cut in any::<proptest::sample::Index>(),
    ) {
        let a = run(k, cooldown, &evs)?;
        let b = run_cut(k, cooldown, &evs, Some(cut.index(evs.len())))?;
        prop_assert_eq!(a, b);
    }
}

#[test]
fn snapshot_of_another_version_is_refused() {
    let p = PolicyConfig::default().check().unwrap();
    let mut v = serde_json::to_value(Policy::new(p.clone()).snapshot()).unwrap();
    v["version"] = serde_json::json!(999);
    let snap: PolicySnapshot = serde_json::from_value(v).unwrap();
    let e = Policy::from_snapshot(p, snap).unwrap_err();
    assert!(e.to_string().contains("version 999"), "{e}");
}

#[test]
fn the_property_run_does_make_decisions() {
    // guard against a vacuous property: a plain sequence of risky records acts
    let mut evs = Vec::new();
    for i in 0..60u8 {
        evs.push(Ev::Rec {
            host: i % HOSTS,
            v: if matches!(i % HOSTS, 1 | 2) {
                0.95
            } else {
                0.0
            },
            sig: 1,
            vms: 2,
            dt: MIN,
        });
    }
    let out = run(1, 0, &evs).unwrap();
    // (fault domains 1 and 2: both act)
    let n = out
        .iter()
        .filter(|o| matches!(o, Output::Decision(_)))
        .count();
    assert!(n >= 2, "{n} decisions");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Not vacuous: random runs of risky records make decisions.
    #[test]
    fn random_runs_act(mut evs in proptest::collection::vec(ev(), 300..400)) {
        evs.retain(|e| !matches!(e, Ev::Pause { .. }));
        let out = run(2, 0, &evs)?;
        let n = out.iter().filter(|o| matches!(o, Output::Decision(_))).count();
        prop_assert!(n > 0);
    }
}
