#![allow(dead_code)]

use waterbear_models::Signature;
use waterbear_policy::{
    Action, Command, CommandKind, Decision, Input, Notice, NoticeKind, ObserveInput, Outcome,
    Output, Policy, PolicyConfig, Replay, Scope,
};

pub const MIN: i64 = 60_000;
pub const HOUR: i64 = 3_600_000;

pub fn replay(cfg: PolicyConfig) -> Replay {
    Replay::new(Policy::new(cfg.check().expect("valid test config")), "m@1")
}

pub fn obs(host: &str, fd: u32, ts_ms: i64, score: f64, signature: Signature) -> Input {
    Input::Observe(ObserveInput {
        host_id: host.into(),
        cluster: "c".into(),
        rack: format!("r{fd}"),
        fault_domain: fd,
        update_domain: 0,
        availability_sets: vec![],
        vm_count: 4,
        vm_mem_mib: 16_384,
        ts_ms,
        score,
        signature,
    })
}

/// A disk-signature record at time 0 of `host` in `cluster`, fault domain `fd`
/// (rack `<cluster>-r<fd>`), with `vms` VMs of 4 GiB each.
pub fn obs_at(host: &str, cluster: &str, fd: u32, score: f64, vms: u32) -> Input {
    Input::Observe(ObserveInput {
        host_id: host.into(),
        cluster: cluster.into(),
        rack: format!("{cluster}-r{fd}"),
        fault_domain: fd,
        update_domain: 0,
        availability_sets: vec![],
        vm_count: vms,
        vm_mem_mib: 4096 * u64::from(vms),
        ts_ms: 0,
        score,
        signature: Signature::Disk,
    })
}

pub fn decisions(out: Vec<Output>) -> Vec<Decision> {
    out.into_iter()
        .filter_map(|o| match o {
            Output::Decision(d) => Some(d),
            Output::Notice(_) => None,
        })
        .collect()
}

pub fn notices(out: &[Output]) -> Vec<&Notice> {
    out.iter()
        .filter_map(|o| match o {
            Output::Notice(n) => Some(n),
            Output::Decision(_) => None,
        })
        .collect()
}

pub fn has_notice(out: &[Output], kind: NoticeKind) -> bool {
    notices(out).iter().any(|n| n.kind == kind)
}

/// Feeds `host` with `score` every 10 minutes from `from` to `to` (exclusive), with
/// quiet spare hosts `spare-0..3` in other fault domains reporting alongside; returns
/// everything produced, and reports every decision as succeeded after 1 minute.
pub fn drive(
    r: &mut Replay,
    host: &str,
    fd: u32,
    from: i64,
    to: i64,
    score: impl Fn(i64) -> f64,
    sig: Signature,
) -> Vec<Output> {
    let mut all = Vec::new();
    let mut t = from;
    while t < to {
        for s in 0..3u32 {
            all.extend(r.step(&obs(&format!("spare-{s}"), 10 + s, t, 0.0, Signature::None)));
        }
        let out = r.step(&obs(host, fd, t, score(t), sig));
        for o in &out {
            if let Output::Decision(d) = o {
                r.step(&Input::Report {
                    id: d.id.clone(),
                    outcome: Outcome::Succeeded,
                    ts_ms: t + MIN,
                });
            }
        }
        all.extend(out);
        t += 10 * MIN;
    }
    all
}

pub fn cmd(id: &str, ts_ms: i64, kind: CommandKind) -> Input {
    Input::Command {
        command: Command {
            id: id.into(),
            ts_ms,
            kind,
        },
    }
}

pub fn pause_host(id: &str, ts_ms: i64, host: &str) -> Input {
    cmd(
        id,
        ts_ms,
        CommandKind::Pause {
            scope: Scope::Host {
                host_id: host.into(),
            },
        },
    )
}

pub fn action_names(ds: &[Decision]) -> Vec<&'static str> {
    ds.iter().map(|d| d.action.as_str()).collect()
}

pub const P1: Action = Action::Tardigrade {
    phase: waterbear_policy::Phase::RecycleServices,
};
