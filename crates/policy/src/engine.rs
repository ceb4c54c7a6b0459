use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use waterbear_features::HostIdx;
use waterbear_models::{Score, Signature};

use crate::config::PolicyParams;
use crate::decision::{
    Action, Alternative, Command, CommandKind, Decision, Notice, NoticeKind, Outcome, Phase,
    ReasonRecord, Scope, Target, Window, decision_id, notice_id,
};

/// What the policy needs to know about the host of a record.
#[derive(Debug, Clone, Copy)]
pub struct HostInfo<'a> {
    /// Host id.
    pub host_id: &'a str,
    /// Cluster.
    pub cluster: &'a str,
    /// Rack (the unit of the common-cause guard).
    pub rack: &'a str,
    /// Fault domain inside the cluster.
    pub fault_domain: u32,
    /// Update domain inside the cluster.
    pub update_domain: u32,
    /// Availability sets whose VMs the host carries. Empty: the host is counted in one
    /// cluster-wide set (what the pipeline passes, as telemetry has no VM placement).
    pub availability_sets: &'a [u32],
    /// VMs on the host now.
    pub vm_count: u32,
    /// Guest memory of those VMs, MiB (sets the evacuation time).
    pub vm_mem_mib: u64,
}

/// A disruption budget's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetKind {
    /// Fault domain of a cluster.
    FaultDomain,
    /// Update domain of a cluster.
    UpdateDomain,
    /// Availability set of a cluster (`u32::MAX`: the cluster-wide set).
    AvailabilitySet,
}

/// One disruption budget and how much of it is in use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BudgetUse<'a> {
    /// Kind.
    pub kind: BudgetKind,
    /// Cluster.
    pub cluster: &'a str,
    /// Fault domain, update domain or availability set.
    pub id: u32,
    /// Hosts under mitigation in it now.
    pub used: u32,
    /// Its limit.
    pub limit: u32,
}

/// Counters of what the policy did and did not do.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStats {
    /// Incidents raised.
    pub incidents: u64,
    /// Decisions emitted.
    pub decisions: u64,
    /// Incidents closed because the score fell under the exit threshold after an action.
    pub healed: u64,
    /// Records on which an action was due but a fault-domain, update-domain or
    /// availability-set budget was full.
    pub deferred_budget: u64,
    /// ... but the fleet-wide evacuation rate limit had no token.
    pub deferred_rate: u64,
    /// ... but no healthy host had room for the VMs.
    pub deferred_capacity: u64,
    /// ... but the host was in cooldown.
    pub deferred_cooldown: u64,
    /// ... but the last step's heal check was still running.
    pub deferred_heal_check: u64,
    /// ... but the host's scope was paused.
    pub deferred_pause: u64,
    /// ... but the circuit breaker was open.
    pub deferred_breaker: u64,
    /// ... but the host's rack was in an infrastructure incident.
    pub deferred_common_cause: u64,
    /// Records too old to act on.
    pub stale_records: u64,
    /// Incidents raised early because the predicted time to failure was short.
    pub urgent: u64,
    /// Decisions that jumped the ladder for time, or took a faster mitigation.
    pub time_jumps: u64,
    /// Infrastructure incidents raised.
    pub infrastructure_incidents: u64,
    /// Times the circuit breaker opened.
    pub breaker_trips: u64,
    /// Actions that got no outcome in time.
    pub timeouts: u64,
    /// Actions reported failed.
    pub failed: u64,
    /// Most evacuations started within any hour of fleet time is bounded by the
    /// bucket; this counts the evacuations started.
    pub evacuations: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct InFlight {
    id: String,
    action: Action,
    since_ms: i64,
    reserved: Vec<(usize, u32)>,
    ladder_rung: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct HostPolicy {
    known: bool,
    id: String,
    cluster: u32,
    rack: u32,
    fd: u32,
    ud: u32,
    slots: Vec<usize>,
    vm_count: u32,
    mem_mib: u64,
    last_ts: i64,
    interval_ms: i64,
    last_score: f64,
    hot: bool,
    streak: u32,
    streak_start_ms: i64,
    open: bool,
    incident: u64,
    generation: u32,
    rung: usize,
    ladder: Signature,
    in_flight: Option<InFlight>,
    cooldown_until_ms: i64,
    heal_wait_until_ms: i64,
    probation_until_ms: i64,
    retired: bool,
    reserved_in: u32,
    forced: Option<(String, Action)>,
    forbidden: Vec<(String, Action)>,
}

impl Default for HostPolicy {
    fn default() -> Self {
        Self {
            known: false,
            id: String::new(),
            cluster: 0,
            rack: 0,
            fd: 0,
            ud: 0,
            slots: Vec::new(),
            vm_count: 0,
            mem_mib: 0,
            last_ts: i64::MIN,
            interval_ms: 0,
            last_score: 0.0,
            hot: false,
            streak: 0,
            streak_start_ms: 0,
            open: false,
            incident: 0,
            generation: 0,
            rung: 0,
            ladder: Signature::None,
            in_flight: None,
            cooldown_until_ms: i64::MIN,
            heal_wait_until_ms: i64::MIN,
            probation_until_ms: i64::MIN,
            retired: false,
            reserved_in: 0,
            forced: None,
            forbidden: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Rack {
    name: String,
    cluster: u32,
    fd: u32,
    hosts: u32,
    hot: Vec<(usize, i64)>,
    incident: Option<String>,
    drained: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Breaker {
    id: String,
    baseline_hot_share: f64,
}

/// The escalation ladder, as in Tardigrade: each step is tried only if the one before
/// did not heal the host.
pub const LADDER: [Action; 6] = [
    Action::Tardigrade {
        phase: Phase::RecycleServices,
    },
    Action::Tardigrade {
        phase: Phase::Diagnostics,
    },
    Action::Tardigrade {
        phase: Phase::MemoryPreservingReset,
    },
    Action::LiveMigrate,
    Action::Reboot,
    Action::OutOfRotation,
];
const LM: usize = 3;
const REBOOT: usize = 4;

/// Where a signature enters the ladder: host agent at phase 1, memory and kernel at
/// phase 3, disk, thermal and the unexplained at live migration (a reset does not
/// mend a disk), a host that does not answer at reboot (nothing can migrate off it).
pub fn ladder_entry(sig: Signature) -> usize {
    match sig {
        Signature::HostAgent => 0,
        Signature::Memory | Signature::Kernel => 2,
        Signature::Disk | Signature::Thermal | Signature::None => LM,
        Signature::Unresponsive => REBOOT,
    }
}

fn ladder_index(a: Action) -> usize {
    LADDER.iter().position(|&x| x == a).unwrap_or(LM)
}

/// Modelled duration of a step, ms (the heal check comes on top).
fn step_ms(a: Action) -> i64 {
    match a {
        Action::Tardigrade {
            phase: Phase::RecycleServices,
        } => 30_000,
        Action::Tardigrade {
            phase: Phase::Diagnostics,
        } => 60_000,
        Action::Tardigrade {
            phase: Phase::MemoryPreservingReset,
        } => 90_000,
        Action::Reboot => 300_000,
        Action::LiveMigrate | Action::OutOfRotation => 0,
    }
}

fn heals(a: Action) -> bool {
    matches!(
        a,
        Action::Tardigrade {
            phase: Phase::RecycleServices | Phase::MemoryPreservingReset
        } | Action::Reboot
    )
}

fn evacuates(a: Action) -> bool {
    matches!(a, Action::LiveMigrate | Action::OutOfRotation)
}

fn hours(ms: i64) -> f64 {
    ms as f64 / 3_600_000.0
}

/// The policy engine: one per fleet (or cluster), single writer. Pure: time is an
/// argument of every input, and the same inputs give the same outputs.
#[derive(Debug, Clone)]
pub struct Policy {
    params: PolicyParams,
    st: State,
}

/// Everything the policy remembers between inputs: plain serde data, so a
/// [`PolicySnapshot`] restores it exactly (no replay needed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct State {
    hosts: Vec<HostPolicy>,
    #[serde(with = "pairs")]
    by_name: HashMap<String, HostIdx>,
    clusters: Vec<String>,
    #[serde(with = "pairs")]
    cluster_index: HashMap<String, u32>,
    racks: Vec<Rack>,
    #[serde(with = "pairs")]
    rack_index: HashMap<(u32, String), u32>,
    #[serde(with = "pairs")]
    budget_index: HashMap<(BudgetKind, u32, u32), usize>,
    budget_keys: Vec<(BudgetKind, u32, u32)>,
    budget_used: Vec<u32>,
    #[serde(with = "pairs")]
    by_decision: HashMap<String, HostIdx>,
    #[serde(with = "pairs")]
    pending_overrides: HashMap<String, Vec<Command>>,
    pauses: Vec<(String, Scope)>,
    tokens: f64,
    tokens_ts: i64,
    bandwidth_mib_per_s: f64,
    newest_ts: i64,
    tick_now_ms: i64,
    next_check_ms: i64,
    hot_hosts: u32,
    last_reporting: u32,
    prev_hot_share: f64,
    breaker: Option<Breaker>,
    notices: Vec<Notice>,
    stats: PolicyStats,
}

/// Serialises a map as a list of pairs sorted by key: JSON maps need string keys, and
/// sorting makes the same state encode to the same bytes.
mod pairs {
    use std::collections::HashMap;
    use std::hash::Hash;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub(super) fn serialize<K, V, S>(m: &HashMap<K, V>, s: S) -> Result<S::Ok, S::Error>
    where
        K: Serialize + Ord,
        V: Serialize,
        S: Serializer,
    {
        let mut v: Vec<(&K, &V)> = m.iter().collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v.serialize(s)
    }

    pub(super) fn deserialize<'de, K, V, D>(d: D) -> Result<HashMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Eq + Hash,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        let v: Vec<(K, V)> = Vec::deserialize(d)?;
        Ok(v.into_iter().collect())
    }
}

/// Version of the [`PolicySnapshot`] encoding; bumped when [`Policy`]'s state changes shape.
pub const SNAPSHOT_VERSION: u32 = 1;

/// A policy's whole state as plain serde data (parameters excluded: they come from the
/// configuration). `Policy::from_snapshot(params, p.snapshot())` behaves exactly as `p`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicySnapshot {
    version: u32,
    state: State,
}

/// Why a snapshot could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// Written by another version of the policy.
    #[error("policy snapshot version {found}, this build reads {expected}")]
    Version {
        /// In the snapshot.
        found: u32,
        /// What this build writes.
        expected: u32,
    },
    /// Indices in the snapshot do not agree with each other.
    #[error("policy snapshot is inconsistent: {0}")]
    Inconsistent(&'static str),
}

impl Policy {
    /// A policy with nothing in flight.
    pub fn new(params: PolicyParams) -> Self {
        Self {
            st: State {
                tokens: f64::from(params.evacuation_burst),
                bandwidth_mib_per_s: params.migrate_mib_per_s,
                hosts: Vec::new(),
                by_name: HashMap::new(),
                clusters: Vec::new(),
                cluster_index: HashMap::new(),
                racks: Vec::new(),
                rack_index: HashMap::new(),
                budget_index: HashMap::new(),
                budget_keys: Vec::new(),
                budget_used: Vec::new(),
                by_decision: HashMap::new(),
                pending_overrides: HashMap::new(),
                pauses: Vec::new(),
                tokens_ts: i64::MIN,
                newest_ts: i64::MIN,
                tick_now_ms: i64::MIN,
                next_check_ms: i64::MIN,
                hot_hosts: 0,
                last_reporting: 0,
                prev_hot_share: 0.0,
                breaker: None,
                notices: Vec::new(),
                stats: PolicyStats::default(),
            },
            params,
        }
    }

    /// The whole state, to persist; see [`Policy::from_snapshot`].
    pub fn snapshot(&self) -> PolicySnapshot {
        PolicySnapshot {
            version: SNAPSHOT_VERSION,
            state: self.st.clone(),
        }
    }

    /// The state as [`Policy::snapshot`] serialises it, without copying it first
    /// (what a job persisting the state after every transaction wants); it
    /// deserialises as a [`PolicySnapshot`].
    pub fn snapshot_view(&self) -> impl Serialize + '_ {
        #[derive(Serialize)]
        struct View<'a> {
            version: u32,
            state: &'a State,
        }
        View {
            version: SNAPSHOT_VERSION,
            state: &self.st,
        }
    }

    /// A policy that continues exactly where the one that took `snap` was.
    pub fn from_snapshot(
        params: PolicyParams,
        snap: PolicySnapshot,
    ) -> Result<Self, SnapshotError> {
        if snap.version != SNAPSHOT_VERSION {
            return Err(SnapshotError::Version {
                found: snap.version,
                expected: SNAPSHOT_VERSION,
            });
        }
        let st = snap.state;
        if st.budget_keys.len() != st.budget_used.len()
            || st.budget_index.len() != st.budget_keys.len()
        {
            return Err(SnapshotError::Inconsistent(
                "budget tables differ in length",
            ));
        }
        if st.by_name.values().any(|&i| i as usize >= st.hosts.len()) {
            return Err(SnapshotError::Inconsistent("host index out of range"));
        }
        if st.cluster_index.len() != st.clusters.len() || st.rack_index.len() != st.racks.len() {
            return Err(SnapshotError::Inconsistent(
                "cluster or rack tables differ in length",
            ));
        }
        Ok(Self { params, st })
    }

    /// The parameters in use.
    pub fn params(&self) -> &PolicyParams {
        &self.params
    }

    /// Counters so far.
    pub fn stats(&self) -> &PolicyStats {
        &self.st.stats
    }

    /// Every disruption budget seen so far and its use now.
    pub fn budget_usage(&self) -> impl Iterator<Item = BudgetUse<'_>> {
        self.st
            .budget_keys
            .iter()
            .zip(self.st.budget_used.iter().copied())
            .map(|(&(kind, c, id), used)| BudgetUse {
                kind,
                cluster: &self.st.clusters[c as usize],
                id,
                used,
                limit: self.limit(kind),
            })
    }

    fn limit(&self, kind: BudgetKind) -> u32 {
        match kind {
            BudgetKind::FaultDomain => self.params.max_per_fault_domain,
            BudgetKind::UpdateDomain => self.params.max_per_update_domain,
            BudgetKind::AvailabilitySet => self.params.max_per_availability_set,
        }
    }

    /// Decisions in flight (awaiting an outcome).
    pub fn in_flight(&self) -> usize {
        self.st.by_decision.len()
    }

    /// Whether the circuit breaker is open (no new actions).
    pub fn breaker_open(&self) -> bool {
        self.st.breaker.is_some()
    }

    /// Takes the notices (infrastructure incidents, circuit breaker, commands) recorded
    /// since the last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        std::mem::take(&mut self.st.notices)
    }

    /// Whether notices are waiting (cheap; for the per-record path).
    pub fn has_notices(&self) -> bool {
        !self.st.notices.is_empty()
    }

    /// Sets the live-migration bandwidth from the executor's measurements, MiB/s
    /// (ignored unless finite and above the dirty rate).
    pub fn set_migration_bandwidth(&mut self, mib_per_s: f64) {
        if mib_per_s.is_finite() && mib_per_s > self.params.dirty_mib_per_s {
            self.st.bandwidth_mib_per_s = mib_per_s;
        }
    }

    /// Predicted time to evacuate `vms` VMs with `mem_mib` of guest memory, ms:
    /// pre-copy sends memory at `bandwidth − dirty rate` net, VM after VM, plus a fixed
    /// cost per VM.
    pub fn evacuation_ms(&self, vms: u32, mem_mib: u64) -> i64 {
        let net = self.st.bandwidth_mib_per_s - self.params.dirty_mib_per_s;
        (mem_mib as f64 / net * 1000.0) as i64 + self.params.per_vm_migration_ms * i64::from(vms)
    }

    fn intern_cluster(&mut self, name: &str) -> u32 {
        if let Some(&i) = self.st.cluster_index.get(name) {
            return i;
        }
        let i = self.st.clusters.len() as u32;
        self.st.clusters.push(name.to_owned());
        self.st.cluster_index.insert(name.to_owned(), i);
        i
    }

    fn budget_slot(&mut self, key: (BudgetKind, u32, u32)) -> usize {
        if let Some(&i) = self.st.budget_index.get(&key) {
            return i;
        }
        let i = self.st.budget_used.len();
        self.st.budget_index.insert(key, i);
        self.st.budget_used.push(0);
        self.st.budget_keys.push(key);
        i
    }

    #[cold]
    fn learn(&mut self, h: usize, info: &HostInfo<'_>) {
        if h >= self.st.hosts.len() {
            self.st.hosts.resize_with(h + 1, HostPolicy::default);
        }
        let c = self.intern_cluster(info.cluster);
        let rack_key = (c, info.rack.to_owned());
        let rack = match self.st.rack_index.get(&rack_key) {
            Some(&r) => r,
            None => {
                let r = self.st.racks.len() as u32;
                self.st.racks.push(Rack {
                    name: format!("{}/{}", info.cluster, info.rack),
                    cluster: c,
                    fd: info.fault_domain,
                    hosts: 0,
                    hot: Vec::new(),
                    incident: None,
                    drained: 0,
                });
                self.st.rack_index.insert(rack_key, r);
                r
            }
        };
        self.st.racks[rack as usize].hosts += 1;
        let mut slots = vec![
            self.budget_slot((BudgetKind::FaultDomain, c, info.fault_domain)),
            self.budget_slot((BudgetKind::UpdateDomain, c, info.update_domain)),
        ];
        if info.availability_sets.is_empty() {
            slots.push(self.budget_slot((BudgetKind::AvailabilitySet, c, u32::MAX)));
        } else {
            let mut sets = info.availability_sets.to_vec();
            sets.sort_unstable();
            sets.dedup();
            for s in sets {
                slots.push(self.budget_slot((BudgetKind::AvailabilitySet, c, s)));
            }
        }
        let st = &mut self.st.hosts[h];
        st.known = true;
        st.id = info.host_id.to_owned();
        st.cluster = c;
        st.rack = rack;
        st.fd = info.fault_domain;
        st.ud = info.update_domain;
        st.slots = slots;
        self.st
            .by_name
            .insert(info.host_id.to_owned(), h as HostIdx);
        if let Some(cmds) = self.st.pending_overrides.remove(info.host_id) {
            for cmd in cmds {
                self.apply_override(h, &cmd);
            }
        }
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
        if h >= self.st.hosts.len() || !self.st.hosts[h].known {
            self.learn(h, info);
        }
        let quiet_below = self.params.probation_enter_threshold;
        let st = &mut self.st.hosts[h];
        st.vm_count = info.vm_count;
        st.mem_mib = info.vm_mem_mib;
        if ts_ms > st.last_ts {
            if st.last_ts != i64::MIN {
                st.interval_ms = ts_ms - st.last_ts;
            }
            st.last_ts = ts_ms;
        }
        st.last_score = score.value;
        if ts_ms > self.st.newest_ts {
            self.st.newest_ts = ts_ms;
        }
        // fast path: a quiet host with nothing going on, and no check due
        if score.value < quiet_below
            && st.streak == 0
            && !st.open
            && st.in_flight.is_none()
            && st.forced.is_none()
            && ts_ms < self.st.next_check_ms
        {
            return None;
        }
        self.observe_slow(h, ts_ms, score, model)
    }

    fn expire(&mut self, h: usize, ts_ms: i64) {
        let timeout = self.params.action_timeout_ms;
        let late = self.st.hosts[h]
            .in_flight
            .as_ref()
            .is_some_and(|f| ts_ms - f.since_ms > timeout);
        if late {
            self.st.stats.timeouts += 1;
            self.finish(h, ts_ms, false);
        }
    }

    /// Ends the in-flight action of host `h` at `ts_ms`.
    fn finish(&mut self, h: usize, ts_ms: i64, succeeded: bool) {
        let Some(f) = self.st.hosts[h].in_flight.take() else {
            return;
        };
        self.st.by_decision.remove(&f.id);
        for &slot in &self.st.hosts[h].slots {
            self.st.budget_used[slot] -= 1;
        }
        for &(t, n) in &f.reserved {
            self.st.hosts[t].reserved_in -= n;
        }
        let p = &self.params;
        let st = &mut self.st.hosts[h];
        st.cooldown_until_ms = ts_ms.saturating_add(p.cooldown_ms);
        st.heal_wait_until_ms = if succeeded && heals(f.action) {
            ts_ms.saturating_add(p.heal_check_ms)
        } else {
            ts_ms
        };
        if let Some(r) = f.ladder_rung {
            st.rung = st.rung.max(r + 1);
        }
        if succeeded && evacuates(f.action) {
            st.retired = true;
            st.open = false;
            st.streak = 0;
            if st.hot {
                self.set_hot(h, false, ts_ms);
            }
        }
    }

    fn set_hot(&mut self, h: usize, hot: bool, ts_ms: i64) {
        let r = self.st.hosts[h].rack as usize;
        self.st.hosts[h].hot = hot;
        if hot {
            self.st.hot_hosts += 1;
            self.st.racks[r].hot.push((h, ts_ms));
            self.check_common_cause(r, ts_ms);
            if self.st.breaker.is_none() {
                let share = self.hot_share();
                let since = ts_ms - (self.st.next_check_ms - self.params.breaker_check_ms);
                if let Some(why) = self.jump_reason(share, since.max(0)) {
                    let baseline = self.st.prev_hot_share;
                    self.open_breaker(ts_ms, why, baseline);
                }
            }
        } else {
            self.st.hot_hosts -= 1;
            self.st.racks[r].hot.retain(|&(x, _)| x != h);
            let closing = if self.st.racks[r].hot.is_empty() {
                self.st.racks[r].incident.take()
            } else {
                None
            };
            if let Some(id) = closing {
                {
                    self.st.racks[r].drained = 0;
                    let rack = &self.st.racks[r];
                    let scope = format!("rack {}", rack.name);
                    self.st.notices.push(Notice {
                        id: notice_id(NoticeKind::InfrastructureIncidentClosed, &scope, ts_ms),
                        kind: NoticeKind::InfrastructureIncidentClosed,
                        ts_ms,
                        scope,
                        hosts: Vec::new(),
                        why: format!(
                            "no host of rack {} degraded any more (incident {id})",
                            rack.name
                        ),
                        command: None,
                    });
                }
            }
        }
    }

    /// Share of reporting hosts at or above the enter threshold, leaving out racks
    /// under an infrastructure incident (the common-cause guard has them).
    fn hot_share(&self) -> f64 {
        if self.st.last_reporting == 0 {
            return 0.0;
        }
        let in_incidents: usize = self
            .st
            .racks
            .iter()
            .filter(|r| r.incident.is_some())
            .map(|r| r.hot.len())
            .sum();
        let n = (self.st.hot_hosts as usize).saturating_sub(in_incidents);
        n as f64 / f64::from(self.st.last_reporting)
    }

    fn open_breaker(&mut self, ts_ms: i64, why: String, baseline_hot_share: f64) {
        let id = notice_id(NoticeKind::CircuitBreakerOpen, "fleet", ts_ms);
        self.st.breaker = Some(Breaker {
            id: id.clone(),
            baseline_hot_share,
        });
        self.st.stats.breaker_trips += 1;
        self.st.notices.push(Notice {
            id,
            kind: NoticeKind::CircuitBreakerOpen,
            ts_ms,
            scope: "fleet".into(),
            hosts: Vec::new(),
            why: format!("no new actions: {why}"),
            command: None,
        });
    }

    fn jump_reason(&self, hot_share: f64, over_ms: i64) -> Option<String> {
        let p = &self.params;
        (self.st.last_reporting >= 10 && hot_share - self.st.prev_hot_share > p.max_hot_share_jump).then(|| {
            format!(
                "the share of hosts scoring >= {:.2} jumped from {:.1}% to {:.1}% within {:.1} h (limit +{:.0} points): \
                 a model or telemetry fault is likelier than a fleet-wide failure",
                p.enter_threshold,
                100.0 * self.st.prev_hot_share,
                100.0 * hot_share,
                hours(over_ms),
                100.0 * p.max_hot_share_jump
            )
        })
    }

    fn check_common_cause(&mut self, r: usize, ts_ms: i64) {
        let p = &self.params;
        let rack = &self.st.racks[r];
        if rack.incident.is_some() {
            return;
        }
        let since = ts_ms - p.common_cause_window_ms;
        let n = rack.hot.iter().filter(|&&(_, t)| t >= since).count() as u32;
        if n < p.common_cause_min_hosts
            || f64::from(n) < p.common_cause_share * f64::from(rack.hosts)
        {
            return;
        }
        let mut hosts: Vec<String> = rack
            .hot
            .iter()
            .map(|&(x, _)| self.st.hosts[x].id.clone())
            .collect();
        hosts.sort();
        let scope = format!("rack {}", rack.name);
        let id = notice_id(NoticeKind::InfrastructureIncident, &scope, ts_ms);
        let why = format!(
            "{n} of {} hosts of rack {} (fault domain {}/{}) degraded within {:.1} h: a common cause \
             (cooling, power, network) is likelier than {n} independent failures. One incident for the \
             infrastructure team; no per-host drains in this rack, no evacuations into fault domain {}",
            rack.hosts,
            rack.name,
            self.st.clusters[rack.cluster as usize],
            rack.fd,
            hours(p.common_cause_window_ms),
            rack.fd,
        );
        self.st.racks[r].incident = Some(id.clone());
        self.st.stats.infrastructure_incidents += 1;
        self.st.notices.push(Notice {
            id,
            kind: NoticeKind::InfrastructureIncident,
            ts_ms,
            scope,
            hosts,
            why,
            command: None,
        });
    }

    fn periodic_check(&mut self, ts_ms: i64) {
        let p = &self.params;
        self.st.next_check_ms = ts_ms.saturating_add(p.breaker_check_ms);
        let horizon = ts_ms - p.stale_after_ms;
        let mut active = 0u32;
        let mut missing = 0u32;
        let mut gone_hot = Vec::new();
        for (i, st) in self.st.hosts.iter().enumerate() {
            if !st.known || st.retired {
                continue;
            }
            active += 1;
            if st.last_ts < horizon {
                missing += 1;
                if st.hot {
                    gone_hot.push(i);
                }
            }
        }
        for i in gone_hot {
            self.set_hot(i, false, ts_ms);
        }
        let p = &self.params;
        let reporting = active - missing;
        let missing_share = if active == 0 {
            0.0
        } else {
            f64::from(missing) / f64::from(active)
        };
        self.st.last_reporting = reporting;
        let hot_share = self.hot_share();
        let enough = reporting >= 10;
        let stale = self.st.tick_now_ms != i64::MIN
            && self.st.tick_now_ms - self.st.newest_ts > p.stale_after_ms;
        let reason = if stale {
            Some(format!(
                "telemetry is stale: the newest record is {:.1} h old",
                hours(self.st.tick_now_ms - self.st.newest_ts)
            ))
        } else if missing_share > p.max_missing_share {
            Some(format!(
                "{missing} of {active} hosts ({:.0}%) sent nothing for {:.1} h (limit {:.0}%)",
                100.0 * missing_share,
                hours(p.stale_after_ms),
                100.0 * p.max_missing_share
            ))
        } else if let Some(why) = self.jump_reason(hot_share, p.breaker_check_ms) {
            Some(why)
        } else if enough && hot_share > p.max_hot_share {
            Some(format!(
                "{:.1}% of hosts score >= {:.2} (limit {:.0}%)",
                100.0 * hot_share,
                p.enter_threshold,
                100.0 * p.max_hot_share
            ))
        } else {
            None
        };
        match (&self.st.breaker, reason) {
            (None, Some(why)) => {
                let baseline = self.st.prev_hot_share.min(hot_share);
                self.open_breaker(ts_ms, why, baseline);
            }
            // close once the distribution is back near where it was before the jump
            (Some(b), None)
                if hot_share <= b.baseline_hot_share + self.params.max_hot_share_jump / 2.0 =>
            {
                let opened = b.id.clone();
                self.st.breaker = None;
                self.st.notices.push(Notice {
                        id: notice_id(NoticeKind::CircuitBreakerClosed, "fleet", ts_ms),
                        kind: NoticeKind::CircuitBreakerClosed,
                        ts_ms,
                        scope: "fleet".into(),
                        hosts: Vec::new(),
                        why: format!(
                            "telemetry fresh and complete, {:.1}% of hosts at risk: acting again (opened by {opened})",
                            100.0 * hot_share
                        ),
                        command: None,
                    });
            }
            _ => {}
        }
        self.st.prev_hot_share = hot_share;
    }

    /// The receiver's clock, as an input: lets the circuit breaker see telemetry that
    /// stopped arriving altogether.
    pub fn tick(&mut self, now_ms: i64) {
        if now_ms > self.st.tick_now_ms {
            self.st.tick_now_ms = now_ms;
        }
        if self.st.tick_now_ms - self.st.newest_ts > self.params.stale_after_ms
            || now_ms >= self.st.next_check_ms
        {
            self.periodic_check(now_ms.max(self.st.newest_ts));
        }
    }

    fn paused_by(&self, h: usize) -> Option<&str> {
        let st = &self.st.hosts[h];
        self.st.pauses.iter().find_map(|(id, scope)| {
            let hit = match scope {
                Scope::Host { host_id } => *host_id == st.id,
                Scope::FaultDomain {
                    cluster,
                    fault_domain,
                } => *fault_domain == st.fd && *cluster == self.st.clusters[st.cluster as usize],
                Scope::Cluster { cluster } => *cluster == self.st.clusters[st.cluster as usize],
                Scope::Fleet => true,
            };
            hit.then_some(id.as_str())
        })
    }

    /// Fault domains (cluster, fd) holding a rack under an infrastructure incident.
    fn blocked_domains(&self) -> Vec<(u32, u32)> {
        self.st
            .racks
            .iter()
            .filter(|r| r.incident.is_some())
            .map(|r| (r.cluster, r.fd))
            .collect()
    }

    fn healthy(&self, j: usize, now: i64, blocked: &[(u32, u32)]) -> bool {
        let t = &self.st.hosts[j];
        t.known
            && !t.retired
            && !t.open
            && t.in_flight.is_none()
            && t.streak == 0
            && !t.hot
            && t.last_score < self.params.exit_threshold
            && now >= t.probation_until_ms
            && t.last_ts >= now - self.params.stale_after_ms
            && !blocked.contains(&(t.cluster, t.fd))
            && self.paused_by(j).is_none()
    }

    /// Proposes targets for `n` VMs of host `src`: healthy hosts with room, another
    /// fault domain first, then the least loaded, one VM each in turn.
    fn choose_targets(&self, src: usize, n: u32, now: i64) -> Option<Vec<(usize, u32)>> {
        let cap = self.params.host_vm_capacity;
        let s = &self.st.hosts[src];
        let blocked = self.blocked_domains();
        // Live migration stays inside the cluster (its network and storage); a
        // policy that sees several clusters must not pick across them, and so
        // decides exactly as one policy per cluster would.
        let mut cands: Vec<(bool, u32, usize)> = (0..self.st.hosts.len())
            .filter(|&j| j != src && self.st.hosts[j].cluster == s.cluster)
            .filter(|&j| self.st.hosts[j].vm_count + self.st.hosts[j].reserved_in < cap)
            .filter(|&j| self.healthy(j, now, &blocked))
            .map(|j| {
                let t = &self.st.hosts[j];
                (t.fd == s.fd, t.vm_count + t.reserved_in, j)
            })
            .collect();
        cands.sort_unstable();
        let room: u32 = cands.iter().map(|c| cap - c.1).sum();
        if room < n {
            return None;
        }
        let mut give = vec![0u32; cands.len()];
        let mut left = n;
        while left > 0 {
            for (k, c) in cands.iter().enumerate() {
                if left == 0 {
                    break;
                }
                if c.1 + give[k] < cap {
                    give[k] += 1;
                    left -= 1;
                }
            }
        }
        Some(
            cands
                .iter()
                .zip(give)
                .filter(|(_, g)| *g > 0)
                .map(|(c, g)| (c.2, g))
                .collect(),
        )
    }

    fn refill(&mut self, ts_ms: i64) {
        if self.st.tokens_ts == i64::MIN {
            self.st.tokens_ts = ts_ms;
        }
        if ts_ms > self.st.tokens_ts {
            let add = hours(ts_ms - self.st.tokens_ts) * self.params.evacuations_per_hour;
            self.st.tokens = (self.st.tokens + add).min(f64::from(self.params.evacuation_burst));
            self.st.tokens_ts = ts_ms;
        }
    }

    #[inline(never)]
    fn observe_slow(
        &mut self,
        h: usize,
        ts_ms: i64,
        score: &Score,
        model: &str,
    ) -> Option<Decision> {
        if ts_ms >= self.st.next_check_ms {
            self.periodic_check(ts_ms);
        }
        self.expire(h, ts_ms);
        let base_enter = self.params.enter_threshold;
        let hot_now = score.value >= base_enter;
        if hot_now != self.st.hosts[h].hot && !self.st.hosts[h].retired {
            self.set_hot(h, hot_now, ts_ms);
        }
        if self.st.hosts[h].retired {
            return None;
        }
        if ts_ms < self.st.newest_ts - self.params.stale_after_ms {
            self.st.stats.stale_records += 1;
            return None;
        }
        let p = &self.params;
        let st = &mut self.st.hosts[h];
        let probation = ts_ms < st.probation_until_ms;
        let (enter, need) = if probation {
            (p.probation_enter_threshold, p.probation_evidence_records)
        } else {
            (p.enter_threshold, p.evidence_records)
        };
        if score.value >= enter {
            if st.streak == 0 {
                st.streak_start_ms = ts_ms;
            }
            st.streak = st.streak.saturating_add(1);
        } else {
            st.streak = 0;
        }
        let forced = st.forced.clone();
        let ttf = p.ttf.ttf_ms(score.signature, score.value);
        let net = self.st.bandwidth_mib_per_s - p.dirty_mib_per_s;
        let evac = (st.mem_mib as f64 / net * 1000.0) as i64
            + p.per_vm_migration_ms * i64::from(st.vm_count);
        let mut rule = if probation { "probation" } else { "ladder" };
        let mut alternatives: Vec<Alternative> = Vec::new();
        if !st.open {
            let missing = need.saturating_sub(st.streak);
            let interval = st.interval_ms.max(1);
            let urgent = forced.is_none()
                && missing > 0
                && score.value >= enter
                && score.signature != Signature::Unresponsive
                && (ttf as f64)
                    < p.urgency_factor * (evac as f64 + f64::from(missing) * interval as f64);
            if forced.is_none() && missing > 0 && !urgent {
                return None;
            }
            st.open = true;
            st.incident += 1;
            st.generation = 0;
            st.ladder = score.signature;
            st.rung = ladder_entry(score.signature);
            st.heal_wait_until_ms = i64::MIN;
            self.st.stats.incidents += 1;
            if urgent {
                self.st.stats.urgent += 1;
                rule = "urgent_ttf";
                alternatives.push(Alternative {
                    action: "wait".into(),
                    rejected: format!(
                        "waiting for {missing} more record(s) of evidence (~{:.1} h) leaves too little of the \
                         predicted {:.1} h to failure",
                        hours(i64::from(missing) * interval),
                        hours(ttf)
                    ),
                });
            }
        } else if score.value < p.exit_threshold && st.in_flight.is_none() && forced.is_none() {
            st.open = false;
            if st.generation > 0 {
                st.probation_until_ms = ts_ms.saturating_add(p.probation_ms);
                self.st.stats.healed += 1;
            }
            return None;
        }
        if st.in_flight.is_some() || (forced.is_none() && score.value < enter) {
            return None;
        }
        if ts_ms < st.cooldown_until_ms {
            self.st.stats.deferred_cooldown += 1;
            return None;
        }
        if forced.is_none() && ts_ms < st.heal_wait_until_ms {
            self.st.stats.deferred_heal_check += 1;
            return None;
        }
        // a host that stops answering needs the reboot step, whatever came before
        if score.signature == Signature::Unresponsive && st.ladder != Signature::Unresponsive {
            st.ladder = Signature::Unresponsive;
            st.rung = st.rung.max(REBOOT);
        }
        let sig = st.ladder;
        let entry = ladder_entry(sig);
        let mut commands: Vec<String> = Vec::new();
        let is_forbidden = |a: Action| {
            st.forbidden
                .iter()
                .find(|(_, f)| *f == a)
                .map(|(id, _)| id.clone())
        };
        let (action, rung) = if let Some((cid, a)) = &forced {
            commands.push(cid.clone());
            rule = "override_force";
            (*a, None)
        } else {
            let mut r = st.rung;
            loop {
                let a = *LADDER.get(r)?;
                if let Some(cid) = is_forbidden(a) {
                    alternatives.push(Alternative {
                        action: a.as_str().into(),
                        rejected: format!("forbidden on this host by command {cid}"),
                    });
                    commands.push(cid);
                    r += 1;
                    continue;
                }
                break;
            }
            let mut a = LADDER[r];
            // time-aware: the slower path must fit in the predicted time to failure
            if sig != Signature::Unresponsive {
                if r < LM && !evacuates(a) {
                    let slow = step_ms(a) + p.heal_check_ms + evac;
                    if (ttf as f64) < p.urgency_factor * slow as f64
                        && evac < ttf
                        && is_forbidden(Action::LiveMigrate).is_none()
                    {
                        alternatives.push(Alternative {
                            action: a.as_str().into(),
                            rejected: format!(
                                "too slow: {} + heal check + evacuation take {:.2} h, predicted time to failure is {:.2} h",
                                a.as_str(),
                                hours(slow),
                                hours(ttf)
                            ),
                        });
                        a = Action::LiveMigrate;
                        r = LM;
                        rule = "time_jump";
                        self.st.stats.time_jumps += 1;
                    }
                } else if a == Action::LiveMigrate
                    && (ttf as f64) < evac as f64
                    && matches!(
                        sig,
                        Signature::Memory | Signature::Kernel | Signature::HostAgent
                    )
                    && st.rung <= 2
                {
                    let p3 = LADDER[2];
                    if is_forbidden(p3).is_none() {
                        alternatives.push(Alternative {
                            action: a.as_str().into(),
                            rejected: format!(
                                "evacuation takes {:.2} h, more than the predicted {:.2} h to failure",
                                hours(evac),
                                hours(ttf)
                            ),
                        });
                        a = p3;
                        r = 2;
                        rule = "faster_mitigation";
                        self.st.stats.time_jumps += 1;
                    }
                }
            }
            (a, Some(r))
        };
        for (i, &other) in LADDER.iter().enumerate() {
            if other == action || alternatives.iter().any(|x| x.action == other.as_str()) {
                continue;
            }
            let why = if i < entry {
                format!(
                    "{sig} failures enter the ladder at {}: {other} does not address them",
                    LADDER[entry]
                )
            } else if rung.is_some_and(|r| i < r) {
                "already tried in this incident without healing the host".to_owned()
            } else if sig == Signature::Unresponsive && i == LM {
                "the host does not answer: nothing can be migrated off it".to_owned()
            } else {
                format!("later step: taken only if {action} does not heal the host")
            };
            alternatives.push(Alternative {
                action: other.as_str().into(),
                rejected: why,
            });
        }
        // safety gates
        if self.st.breaker.is_some() {
            self.st.stats.deferred_breaker += 1;
            return None;
        }
        if self.paused_by(h).is_some() {
            self.st.stats.deferred_pause += 1;
            return None;
        }
        let st = &self.st.hosts[h];
        let rack = &self.st.racks[st.rack as usize];
        let mut drains_rack = false;
        if let Some(inc) = &rack.incident {
            let cap = (self.params.common_cause_drain_share * f64::from(rack.hosts)).floor() as u32;
            if evacuates(action) {
                if rack.drained >= cap {
                    self.st.stats.deferred_common_cause += 1;
                    return None;
                }
                drains_rack = true;
                alternatives.push(Alternative {
                    action: "wait".into(),
                    rejected: format!(
                        "rack {} is under infrastructure incident {inc}: draining {} of at most {cap} of its {} hosts",
                        rack.name,
                        rack.drained + 1,
                        rack.hosts
                    ),
                });
            }
        }
        for &slot in &st.slots {
            if self.st.budget_used[slot] >= self.limit(self.st.budget_keys[slot].0) {
                self.st.stats.deferred_budget += 1;
                return None;
            }
        }
        let mut reserved = Vec::new();
        if evacuates(action) {
            self.refill(ts_ms);
            if self.st.tokens < 1.0 {
                self.st.stats.deferred_rate += 1;
                return None;
            }
            if self.st.hosts[h].vm_count > 0 {
                match self.choose_targets(h, self.st.hosts[h].vm_count, ts_ms) {
                    Some(t) => reserved = t,
                    None => {
                        self.st.stats.deferred_capacity += 1;
                        return None;
                    }
                }
            }
            self.st.tokens -= 1.0;
            self.st.stats.evacuations += 1;
        }
        // act
        if drains_rack {
            let r = self.st.hosts[h].rack as usize;
            self.st.racks[r].drained += 1;
        }
        for &(t, n) in &reserved {
            self.st.hosts[t].reserved_in += n;
        }
        let targets: Vec<Target> = reserved
            .iter()
            .map(|&(t, n)| Target {
                host_id: self.st.hosts[t].id.clone(),
                vms: n,
            })
            .collect();
        let slots = self.st.hosts[h].slots.clone();
        for &slot in &slots {
            self.st.budget_used[slot] += 1;
        }
        let fd_use = self.st.budget_used[slots[0]];
        let p = &self.params;
        let st = &mut self.st.hosts[h];
        if forced.is_some() {
            st.forced = None;
            if !st.open {
                st.open = true;
                st.incident += 1;
                st.generation = 0;
                st.ladder = score.signature;
                st.rung = ladder_entry(score.signature);
                self.st.stats.incidents += 1;
            }
        }
        if let Some(r) = rung {
            st.rung = r;
        }
        let id = decision_id(&st.id, st.incident, action, st.generation);
        let generation = st.generation;
        st.generation += 1;
        st.in_flight = Some(InFlight {
            id: id.clone(),
            action,
            since_ms: ts_ms,
            reserved,
            ladder_rung: rung,
        });
        self.st.by_decision.insert(id.clone(), h as HostIdx);
        self.st.stats.decisions += 1;
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
        let window = if st.streak > 0 {
            Window {
                first_ts_ms: st.streak_start_ms,
                last_ts_ms: ts_ms,
                records: st.streak,
            }
        } else {
            Window {
                first_ts_ms: ts_ms,
                last_ts_ms: ts_ms,
                records: 1,
            }
        };
        let head = match rule {
            "override_force" => format!("{action} forced by command {}", commands[0]),
            "urgent_ttf" => format!(
                "{sig} risk {:.2} predicts failure in {:.1} h: acting after {} record(s) instead of {need}",
                score.value,
                hours(ttf),
                st.streak
            ),
            _ => format!(
                "{sig} risk {:.2} >= {enter:.2} for {} consecutive records{}",
                score.value,
                st.streak,
                if probation {
                    " (host on probation)"
                } else {
                    ""
                }
            ),
        };
        let cluster = self.st.clusters[st.cluster as usize].clone();
        let why = format!(
            "{head} (incident {}, step {} of the ladder: {action}){lead}; predicted time to failure {:.1} h, \
             evacuation {:.1} min; fault domain {}/{} has {} of {} mitigations in use",
            st.incident,
            ladder_index(action) + 1,
            hours(ttf.min(i64::MAX / 2)),
            evac as f64 / 60_000.0,
            cluster,
            st.fd,
            fd_use - 1,
            p.max_per_fault_domain,
        );
        let d = Decision {
            id: id.clone(),
            host_id: st.id.clone(),
            cluster,
            fault_domain: st.fd,
            update_domain: st.ud,
            incident: st.incident,
            generation,
            action,
            ts_ms,
            score: score.value,
            signature: score.signature,
            reasons,
            model: model.to_owned(),
            why,
            rule: rule.to_owned(),
            window,
            ttf_ms: (ttf < i64::MAX / 2).then_some(ttf),
            evacuation_ms: Some(evac),
            targets,
            alternatives,
            commands,
            shadow: p.shadow,
            features: None,
        };
        if p.shadow {
            // a shadow decision is never executed: count it done now
            self.finish(h, ts_ms, true);
        }
        Some(d)
    }

    /// Records the outcome of decision `id` at `ts_ms`: frees its budgets and target
    /// reservations, starts the host's cooldown, and moves the incident one rung up its
    /// ladder, to be taken only if the score has not fallen under the exit threshold
    /// within `heal_check_ms` (a drained host takes no more actions). Returns false for
    /// an unknown or already reported id, which changes nothing.
    pub fn report(&mut self, id: &str, outcome: Outcome, ts_ms: i64) -> bool {
        let Some(&host) = self.st.by_decision.get(id) else {
            return false;
        };
        let ok = matches!(outcome, Outcome::Succeeded);
        if !ok {
            self.st.stats.failed += 1;
        }
        self.finish(host as usize, ts_ms, ok);
        true
    }

    fn apply_override(&mut self, h: usize, cmd: &Command) {
        let st = &mut self.st.hosts[h];
        match &cmd.kind {
            CommandKind::Force { action, .. } => st.forced = Some((cmd.id.clone(), *action)),
            CommandKind::Forbid { action, .. } => {
                st.forbidden.retain(|(_, a)| a != action);
                st.forbidden.push((cmd.id.clone(), *action));
            }
            CommandKind::Allow { action, .. } => st.forbidden.retain(|(_, a)| a != action),
            _ => {}
        }
    }

    /// Applies an operator command (pause, resume, force, forbid, allow, return to
    /// service) and records it as a notice. Returns false, with a `command_rejected`
    /// notice, when it cannot apply (resume of a scope that is not paused, return to
    /// service of an unknown or active host).
    pub fn command(&mut self, cmd: &Command) -> bool {
        let scope;
        let applied: Result<String, String> = match &cmd.kind {
            CommandKind::Pause { scope: s } => {
                scope = s.to_string();
                self.st.pauses.push((cmd.id.clone(), s.clone()));
                Ok(format!("paused {s}: no new actions there until resumed"))
            }
            CommandKind::Resume { scope: s } => {
                scope = s.to_string();
                let before = self.st.pauses.len();
                self.st.pauses.retain(|(_, x)| x != s);
                if self.st.pauses.len() < before {
                    Ok(format!("resumed {s}"))
                } else {
                    Err(format!("{s} was not paused"))
                }
            }
            CommandKind::Force { host_id, action }
            | CommandKind::Forbid { host_id, action }
            | CommandKind::Allow { host_id, action } => {
                scope = format!("host {host_id}");
                match self.st.by_name.get(host_id.as_str()) {
                    Some(&h) => self.apply_override(h as usize, cmd),
                    None => self
                        .st
                        .pending_overrides
                        .entry(host_id.clone())
                        .or_default()
                        .push(cmd.clone()),
                }
                let verb = match cmd.kind {
                    CommandKind::Force { .. } => "force",
                    CommandKind::Forbid { .. } => "forbid",
                    _ => "allow",
                };
                Ok(format!("{verb} {action} on {host_id}"))
            }
            CommandKind::ReturnToService { host_id } => {
                scope = format!("host {host_id}");
                match self.st.by_name.get(host_id.as_str()).copied() {
                    Some(h) if self.st.hosts[h as usize].retired => {
                        let p = &self.params;
                        let st = &mut self.st.hosts[h as usize];
                        st.retired = false;
                        st.open = false;
                        st.streak = 0;
                        st.probation_until_ms = cmd.ts_ms.saturating_add(p.probation_ms);
                        Ok(format!(
                            "{host_id} back in service, on probation for {:.1} h",
                            hours(p.probation_ms)
                        ))
                    }
                    Some(_) => Err(format!("{host_id} is not out of service")),
                    None => Err(format!("unknown host {host_id}")),
                }
            }
        };
        let (kind, why, ok) = match applied {
            Ok(w) => (NoticeKind::Command, w, true),
            Err(w) => (NoticeKind::CommandRejected, w, false),
        };
        self.st.notices.push(Notice {
            id: cmd.id.clone(),
            kind,
            ts_ms: cmd.ts_ms,
            scope,
            hosts: Vec::new(),
            why,
            command: Some(cmd.clone()),
        });
        ok
    }

    /// Whether the host has been drained or taken out of rotation.
    pub fn is_retired(&self, host: HostIdx) -> bool {
        self.st.hosts.get(host as usize).is_some_and(|h| h.retired)
    }

    /// Whether a host may receive migrated VMs: known, healthy (no risk, no incident,
    /// nothing in flight, not on probation, reporting), not paused, and outside racks
    /// and fault domains under an infrastructure incident. Capacity is not checked here.
    pub fn is_healthy_target(&self, host: HostIdx) -> bool {
        let h = host as usize;
        h < self.st.hosts.len() && self.healthy(h, self.st.newest_ts, &self.blocked_domains())
    }
}
