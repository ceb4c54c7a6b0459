use std::collections::HashMap;

use serde::Serialize;
use waterbear_features::HostIdx;
use waterbear_models::{Score, Signature};

use crate::config::PolicyParams;
use crate::decision::{Action, Decision, Outcome, Phase, ReasonRecord, decision_id};

/// What the policy needs to know about the host of a record.
#[derive(Debug, Clone, Copy)]
pub struct HostInfo<'a> {
    /// Host id.
    pub host_id: &'a str,
    /// Cluster.
    pub cluster: &'a str,
    /// Fault domain inside the cluster.
    pub fault_domain: u32,
    /// Update domain inside the cluster.
    pub update_domain: u32,
    /// VMs on the host now.
    pub vm_count: u32,
}

/// A fault domain of a cluster: the unit of the disruption budget.
pub type HostKey = (String, u32);

/// Counters of what the policy did and did not do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PolicyStats {
    /// Incidents raised.
    pub incidents: u64,
    /// Decisions emitted.
    pub decisions: u64,
    /// Records on which an action was due but the fault-domain budget was full.
    pub deferred_budget: u64,
    /// Records on which an action was due but the host was in cooldown.
    pub deferred_cooldown: u64,
    /// Actions that got no outcome in time.
    pub timeouts: u64,
    /// Actions reported failed.
    pub failed: u64,
}

#[derive(Debug, Clone)]
struct InFlight {
    id: String,
    action: Action,
    since_ms: i64,
    budget: usize,
}

#[derive(Debug, Clone, Default)]
struct HostPolicy {
    streak: u32,
    open: bool,
    incident: u64,
    generation: u32,
    rung: usize,
    ladder: Option<Signature>,
    in_flight: Option<InFlight>,
    cooldown_until_ms: i64,
    retired: bool,
}

/// The escalation ladder of a failure signature.
fn ladder(sig: Signature) -> &'static [Action] {
    const MIGRATE: &[Action] = &[Action::LiveMigrate, Action::OutOfRotation];
    const AGENT: &[Action] = &[
        Action::Tardigrade {
            phase: Phase::RecycleServices,
        },
        Action::Tardigrade {
            phase: Phase::MemoryPreservingReset,
        },
        Action::LiveMigrate,
    ];
    const MEMORY: &[Action] = &[
        Action::Tardigrade {
            phase: Phase::MemoryPreservingReset,
        },
        Action::LiveMigrate,
    ];
    const DEAD: &[Action] = &[Action::Reboot, Action::OutOfRotation];
    match sig {
        Signature::Disk | Signature::Thermal | Signature::None => MIGRATE,
        Signature::HostAgent => AGENT,
        Signature::Memory | Signature::Kernel => MEMORY,
        Signature::Unresponsive => DEAD,
    }
}

/// The policy engine: one per cluster (or per fleet), single writer.
#[derive(Debug, Clone)]
pub struct Policy {
    params: PolicyParams,
    hosts: Vec<HostPolicy>,
    budget_index: HashMap<HostKey, usize>,
    budget_used: Vec<u32>,
    budget_keys: Vec<HostKey>,
    by_decision: HashMap<String, HostIdx>,
    stats: PolicyStats,
}

impl Policy {
    /// A policy with nothing in flight.
    pub fn new(params: PolicyParams) -> Self {
        Self {
            params,
            hosts: Vec::new(),
            budget_index: HashMap::new(),
            budget_used: Vec::new(),
            budget_keys: Vec::new(),
            by_decision: HashMap::new(),
            stats: PolicyStats::default(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &PolicyParams {
        &self.params
    }

    /// Counters so far.
    pub fn stats(&self) -> &PolicyStats {
        &self.stats
    }

    /// Hosts under mitigation now, per fault domain.
    pub fn budget_usage(&self) -> impl Iterator<Item = (&HostKey, u32)> {
        self.budget_keys
            .iter()
            .zip(self.budget_used.iter().copied())
    }

    /// Decisions in flight (awaiting an outcome).
    pub fn in_flight(&self) -> usize {
        self.by_decision.len()
    }

    fn budget_slot(&mut self, cluster: &str, fd: u32) -> usize {
        // look up without allocating on the common path
        if let Some(&i) = self.budget_index.get(&(cluster.to_owned(), fd)) {
            return i;
        }
        let i = self.budget_used.len();
        self.budget_index.insert((cluster.to_owned(), fd), i);
        self.budget_used.push(0);
        self.budget_keys.push((cluster.to_owned(), fd));
        i
    }

    /// Takes one scored record of `host` (a dense index the caller assigns, stable for
    /// the host) at time `ts_ms` and returns the decision it triggers, if any.
    #[inline]
    pub fn observe(
        &mut self,
        host: HostIdx,
        info: &HostInfo<'_>,
        ts_ms: i64,
        score: &Score,
        model: &str,
    ) -> Option<Decision> {
        let h = host as usize;
        if h >= self.hosts.len() {
            self.hosts.resize_with(h + 1, HostPolicy::default);
        }
        let p = &self.params;
        let st = &mut self.hosts[h];
        // fast path: a quiet host with nothing going on
        if score.value < p.enter_threshold && !st.open && st.streak == 0 && st.in_flight.is_none() {
            return None;
        }
        if let Some(f) = &st.in_flight {
            if ts_ms - f.since_ms > p.action_timeout_ms {
                let f = st.in_flight.take().expect("checked above");
                self.budget_used[f.budget] -= 1;
                self.by_decision.remove(&f.id);
                self.stats.timeouts += 1;
                st.rung += 1;
                st.cooldown_until_ms = ts_ms + p.cooldown_ms;
            }
        }
        if st.retired {
            return None;
        }
        if score.value >= p.enter_threshold {
            st.streak = st.streak.saturating_add(1);
        } else {
            st.streak = 0;
        }
        if !st.open {
            if st.streak < p.evidence_records {
                return None;
            }
            st.open = true;
            st.incident += 1;
            st.generation = 0;
            st.rung = 0;
            st.ladder = Some(score.signature);
            self.stats.incidents += 1;
        } else if score.value < p.exit_threshold && st.in_flight.is_none() {
            st.open = false;
            st.ladder = None;
            return None;
        }
        if st.in_flight.is_some() || score.value < p.enter_threshold {
            return None;
        }
        if ts_ms < st.cooldown_until_ms {
            self.stats.deferred_cooldown += 1;
            return None;
        }
        // a host that stops answering needs the unresponsive ladder, whatever came before
        if score.signature == Signature::Unresponsive && st.ladder != Some(Signature::Unresponsive)
        {
            st.ladder = Some(Signature::Unresponsive);
            st.rung = 0;
        }
        let sig = st.ladder.unwrap_or(score.signature);
        let action = *ladder(sig).get(st.rung)?;
        let slot = self.budget_slot(info.cluster, info.fault_domain);
        let st = &mut self.hosts[h];
        if self.budget_used[slot] >= self.params.max_per_fault_domain {
            self.stats.deferred_budget += 1;
            return None;
        }
        let id = decision_id(info.host_id, st.incident, action, st.generation);
        let generation = st.generation;
        st.generation += 1;
        st.in_flight = Some(InFlight {
            id: id.clone(),
            action,
            since_ms: ts_ms,
            budget: slot,
        });
        self.budget_used[slot] += 1;
        self.by_decision.insert(id.clone(), host);
        self.stats.decisions += 1;
        let reasons: Vec<ReasonRecord> = score
            .reasons
            .iter()
            .map(|r| ReasonRecord {
                feature: r.feature,
                value: r.value,
                contribution: r.contribution,
            })
            .collect();
        let lead = reasons
            .first()
            .map(|r| format!("; strongest evidence {} = {}", r.feature, r.value))
            .unwrap_or_default();
        let why = format!(
            "{sig} risk {:.2} >= {:.2} for {} consecutive records (incident {}, step {} of the {sig} ladder){lead}; \
             fault domain {}/{} has {} of {} mitigations in use",
            score.value,
            self.params.enter_threshold,
            st.streak,
            st.incident,
            st.rung + 1,
            info.cluster,
            info.fault_domain,
            self.budget_used[slot] - 1,
            self.params.max_per_fault_domain,
        );
        Some(Decision {
            id,
            host_id: info.host_id.to_owned(),
            cluster: info.cluster.to_owned(),
            fault_domain: info.fault_domain,
            update_domain: info.update_domain,
            incident: st.incident,
            generation,
            action,
            ts_ms,
            score: score.value,
            signature: score.signature,
            reasons,
            model: model.to_owned(),
            why,
        })
    }

    /// Records the outcome of decision `id` at `ts_ms`: frees its budget, starts the
    /// host's cooldown, and moves the incident one rung up its ladder (a drained or
    /// retired host takes no more actions). Returns false for an unknown or already
    /// reported id, which changes nothing.
    pub fn report(&mut self, id: &str, outcome: Outcome, ts_ms: i64) -> bool {
        let Some(host) = self.by_decision.remove(id) else {
            return false;
        };
        let st = &mut self.hosts[host as usize];
        let Some(f) = st.in_flight.take() else {
            return false;
        };
        self.budget_used[f.budget] -= 1;
        st.cooldown_until_ms = ts_ms + self.params.cooldown_ms;
        st.rung += 1;
        match outcome {
            Outcome::Succeeded => {
                if matches!(f.action, Action::LiveMigrate | Action::OutOfRotation) {
                    st.retired = true;
                    st.open = false;
                }
            }
            Outcome::Failed { .. } => self.stats.failed += 1,
        }
        true
    }

    /// Whether the host has been drained or taken out of rotation.
    pub fn is_retired(&self, host: HostIdx) -> bool {
        self.hosts.get(host as usize).is_some_and(|h| h.retired)
    }

    /// Whether a host may be chosen as a migration target: known, not retired, no
    /// incident open and nothing in flight.
    pub fn is_healthy_target(&self, host: HostIdx) -> bool {
        match self.hosts.get(host as usize) {
            Some(h) => !h.retired && !h.open && h.in_flight.is_none() && h.streak == 0,
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PolicyConfig;
    use proptest::prelude::*;
    use waterbear_models::Reasons;

    fn score(v: f64, sig: Signature) -> Score {
        Score {
            value: v,
            signature: sig,
            reasons: Reasons::default(),
        }
    }

    fn info(host: &str, fd: u32) -> HostInfo<'_> {
        HostInfo {
            host_id: host,
            cluster: "c",
            fault_domain: fd,
            update_domain: 0,
            vm_count: 2,
        }
    }

    const MIN: i64 = 60_000;

    #[test]
    fn needs_consecutive_evidence() {
        let mut p = Policy::new(PolicyParams::default());
        let hi = score(0.9, Signature::Disk);
        let lo = score(0.5, Signature::Disk);
        assert!(p.observe(0, &info("a", 0), 0, &hi, "m").is_none());
        assert!(p.observe(0, &info("a", 0), MIN, &hi, "m").is_none());
        // a dip below the enter threshold resets the streak
        assert!(p.observe(0, &info("a", 0), 2 * MIN, &lo, "m").is_none());
        assert!(p.observe(0, &info("a", 0), 3 * MIN, &hi, "m").is_none());
        assert!(p.observe(0, &info("a", 0), 4 * MIN, &hi, "m").is_none());
        let d = p
            .observe(0, &info("a", 0), 5 * MIN, &hi, "m")
            .expect("third in a row");
        assert_eq!(d.action, Action::LiveMigrate);
        assert_eq!(d.incident, 1);
        assert!(d.why.contains("disk risk 0.90"));
    }

    #[test]
    fn fault_domain_budget_defers_second_host() {
        let mut p = Policy::new(PolicyParams::default());
        let hi = score(0.9, Signature::Disk);
        let mut first = None;
        for t in 0..3 {
            first = first.or(p.observe(0, &info("a", 7), t * MIN, &hi, "m"));
            assert!(p.observe(1, &info("b", 7), t * MIN, &hi, "m").is_none());
        }
        let first = first.expect("host a acts");
        assert_eq!(p.stats().deferred_budget, 1);
        // another fault domain is not affected
        for t in 0..2 {
            assert!(p.observe(2, &info("c", 8), t * MIN, &hi, "m").is_none());
        }
        assert!(p.observe(2, &info("c", 8), 2 * MIN, &hi, "m").is_some());
        assert!(p.report(&first.id, Outcome::Succeeded, 4 * MIN));
        assert!(
            !p.report(&first.id, Outcome::Succeeded, 4 * MIN),
            "second report is ignored"
        );
        let d = p
            .observe(1, &info("b", 7), 5 * MIN, &hi, "m")
            .expect("budget freed");
        assert_eq!(d.host_id, "b");
    }

    #[test]
    fn escalates_along_the_ladder_after_cooldown() {
        let params = PolicyConfig {
            cooldown_ms: 30 * MIN,
            ..Default::default()
        }
        .check()
        .unwrap();
        let mut p = Policy::new(params);
        let agent = score(0.9, Signature::HostAgent);
        let mut actions = Vec::new();
        let mut t = 0;
        while t < 600 * MIN {
            if let Some(d) = p.observe(0, &info("a", 0), t, &agent, "m") {
                actions.push((d.action, d.generation, t));
                p.report(&d.id, Outcome::Succeeded, t + MIN);
            }
            t += 10 * MIN;
        }
        let kinds: Vec<&str> = actions.iter().map(|a| a.0.as_str()).collect();
        assert_eq!(
            kinds,
            ["tardigrade_phase1", "tardigrade_phase3", "live_migrate"]
        );
        assert_eq!(actions.iter().map(|a| a.1).collect::<Vec<_>>(), [0, 1, 2]);
        // cooldown respected between actions
        for w in actions.windows(2) {
            assert!(w[1].2 >= w[0].2 + MIN + 30 * MIN);
        }
        assert!(p.is_retired(0));
    }

    #[test]
    fn unresponsive_goes_reboot_then_out_of_rotation() {
        let params = PolicyConfig {
            cooldown_ms: 0,
            ..Default::default()
        }
        .check()
        .unwrap();
        let mut p = Policy::new(params);
        let dead = score(0.99, Signature::Unresponsive);
        let mut kinds = Vec::new();
        for i in 0..20 {
            if let Some(d) = p.observe(0, &info("a", 0), i * MIN, &dead, "m") {
                kinds.push(d.action);
                p.report(&d.id, Outcome::Succeeded, i * MIN);
            }
        }
        assert_eq!(kinds, [Action::Reboot, Action::OutOfRotation]);
    }

    #[test]
    fn incident_closes_below_exit_and_a_new_one_gets_a_new_id() {
        let mut p = Policy::new(
            PolicyConfig {
                cooldown_ms: 0,
                ..Default::default()
            }
            .check()
            .unwrap(),
        );
        let hi = score(0.9, Signature::Memory);
        let mut ids = Vec::new();
        let mut t = 0;
        for _round in 0..2 {
            for _ in 0..3 {
                if let Some(d) = p.observe(0, &info("a", 0), t, &hi, "m") {
                    ids.push(d.id.clone());
                    p.report(&d.id, Outcome::Failed { reason: "x".into() }, t);
                }
                t += MIN;
            }
            assert!(
                p.observe(0, &info("a", 0), t, &score(0.1, Signature::None), "m")
                    .is_none()
            );
            t += MIN;
        }
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1]);
        assert_eq!(p.stats().incidents, 2);
        assert_eq!(p.stats().failed, 2);
    }

    #[test]
    fn timeouts_free_the_budget() {
        let mut p = Policy::new(PolicyParams::default());
        let hi = score(0.9, Signature::Disk);
        for t in 0..3 {
            p.observe(0, &info("a", 0), t * MIN, &hi, "m");
        }
        assert_eq!(p.in_flight(), 1);
        let late = 3 * MIN + p.params().action_timeout_ms + 1;
        p.observe(0, &info("a", 0), late, &hi, "m");
        assert_eq!(p.stats().timeouts, 1);
        assert_eq!(p.in_flight(), 0);
        assert!(p.budget_usage().all(|(_, used)| used == 0));
    }

    #[derive(Debug, Clone)]
    enum Ev {
        Rec { host: u8, v: f64, sig: u8, dt: i64 },
        Report { pick: u8, ok: bool, dt: i64 },
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            4 => (0u8..12, 0.0f64..1.0, 0u8..7, 0i64..20 * MIN).prop_map(|(host, v, sig, dt)| Ev::Rec { host, v, sig, dt }),
            1 => (any::<u8>(), any::<bool>(), 0i64..60 * MIN).prop_map(|(pick, ok, dt)| Ev::Report { pick, ok, dt }),
        ]
    }

    fn run(k: u32, cooldown: i64, evs: &[Ev]) -> Result<Vec<Decision>, TestCaseError> {
        let params = PolicyConfig {
            max_per_fault_domain: k,
            cooldown_ms: cooldown,
            evidence_records: 2,
            ..Default::default()
        }
        .check()
        .unwrap();
        let mut p = Policy::new(params);
        let names: Vec<String> = (0..12).map(|i| format!("h{i}")).collect();
        let mut t = 0i64;
        let mut open: Vec<(String, u8, i64)> = Vec::new(); // (id, host, since)
        let mut cooldown_until = [i64::MIN; 12];
        let mut out = Vec::new();
        for e in evs {
            match *e {
                Ev::Rec { host, v, sig, dt } => {
                    t += dt;
                    // reference model of timeouts: an open action past its timeout is gone
                    let timeout = p.params().action_timeout_ms;
                    open.retain(|(_, h, since)| {
                        if *h == host && t - since > timeout {
                            cooldown_until[*h as usize] = t + cooldown;
                            false
                        } else {
                            true
                        }
                    });
                    let fd = u32::from(host % 3);
                    let s = score(v, Signature::ALL[sig as usize]);
                    let inf = HostInfo {
                        host_id: &names[host as usize],
                        cluster: "c",
                        fault_domain: fd,
                        update_domain: 0,
                        vm_count: 1,
                    };
                    if let Some(d) = p.observe(u32::from(host), &inf, t, &s, "m") {
                        prop_assert!(t >= cooldown_until[host as usize], "action during cooldown");
                        prop_assert!(
                            !open.iter().any(|(_, h, _)| *h == host),
                            "second action in flight on one host"
                        );
                        open.push((d.id.clone(), host, t));
                        out.push(d);
                    }
                    for fdx in 0..3u32 {
                        let n = open
                            .iter()
                            .filter(|(_, h, _)| u32::from(*h % 3) == fdx)
                            .count() as u32;
                        prop_assert!(n <= k, "fault domain {fdx} has {n} > {k} under mitigation");
                    }
                    let used: u32 = p.budget_usage().map(|(_, u)| u).sum();
                    prop_assert_eq!(used as usize, open.len());
                }
                Ev::Report { pick, ok, dt } => {
                    t += dt;
                    if !open.is_empty() {
                        let (id, h, _) = open.remove(pick as usize % open.len());
                        let outcome = if ok {
                            Outcome::Succeeded
                        } else {
                            Outcome::Failed {
                                reason: "test".into(),
                            }
                        };
                        prop_assert!(p.report(&id, outcome, t));
                        cooldown_until[h as usize] = t + cooldown;
                    }
                }
            }
        }
        Ok(out)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn budgets_and_cooldowns_hold_and_replays_agree(k in 1u32..3, cooldown in 0i64..120 * MIN, evs in proptest::collection::vec(ev(), 0..300)) {
            let a = run(k, cooldown, &evs)?;
            let b = run(k, cooldown, &evs)?;
            prop_assert_eq!(a, b);
        }
    }
}
