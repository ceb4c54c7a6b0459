//! Stage 2: scores (keyed by cluster, so one writer per cluster) -> the
//! [`Policy`] -> decisions (keyed by host) on `alerts`.
//!
//! State: per cluster, the [`PolicySnapshot`] of its policy plus the host
//! table (ids in index order), as JSON. Restore decodes it into a policy that
//! carries on exactly where the committed one was (incident numbers, streaks,
//! in-flight actions and budgets, cooldowns, rate-limit tokens, circuit
//! breaker), with no replay and no bound on history.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use waterbear_features::HostIdx;
use waterbear_models::{Reasons, Score};
use waterbear_policy::{Decision, HostInfo, Policy, PolicyParams, PolicySnapshot};
use waterbear_stream::{Output, Record, Transform};

use crate::DLQ_KIND_HEADER;
use crate::scorer::ScoreRecord;

/// Version of the decider's per-cluster state encoding.
const STATE_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterState {
    version: u32,
    /// Host ids, in policy index order.
    hosts: Vec<String>,
    policy: PolicySnapshot,
}

struct ClusterSlot {
    partition: i32,
    policy: Policy,
    index: HashMap<String, HostIdx>,
    hosts: Vec<String>,
}

/// The stage-2 transform.
pub struct Decider {
    params: PolicyParams,
    clusters: HashMap<Vec<u8>, ClusterSlot>,
    decisions: u64,
}

impl Decider {
    /// A decider.
    pub fn new(params: PolicyParams) -> Self {
        Self {
            params,
            clusters: HashMap::new(),
            decisions: 0,
        }
    }

    /// Decisions emitted (not counting replays).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    fn slot(&mut self, partition: i32, cluster: &str) -> &mut ClusterSlot {
        let params = &self.params;
        let slot = self
            .clusters
            .entry(cluster.as_bytes().to_vec())
            .or_insert_with(|| ClusterSlot {
                partition,
                policy: Policy::new(params.clone()),
                index: HashMap::new(),
                hosts: Vec::new(),
            });
        slot.partition = partition;
        slot
    }

    /// Runs one score record through its cluster's policy.
    pub fn decide(&mut self, partition: i32, s: &ScoreRecord) -> Option<Decision> {
        let slot = self.slot(partition, &s.cluster);
        let idx = match slot.index.get(&s.host) {
            Some(&i) => i,
            None => {
                let i = slot.hosts.len() as HostIdx;
                slot.index.insert(s.host.clone(), i);
                slot.hosts.push(s.host.clone());
                i
            }
        };
        let mut reasons = Reasons::default();
        for r in &s.reasons {
            reasons.push(*r);
        }
        let score = Score {
            value: s.score,
            signature: s.sig,
            reasons,
        };
        let info = HostInfo {
            host_id: &s.host,
            cluster: &s.cluster,
            rack: &s.rack,
            fault_domain: s.fd,
            update_domain: s.ud,
            availability_sets: &[],
            vm_count: s.vms,
            vm_mem_mib: s.vm_mem_mib,
        };
        let d = slot.policy.observe(idx, &info, s.ts, &score, &s.model);
        if d.is_some() {
            self.decisions += 1;
        }
        d
    }
}

fn dlq(r: &Record<'_>, kind: &str, message: String) -> Output {
    let mut o = Output::dlq(r.key, r.payload, format!("{kind}: {message}"));
    o.headers
        .push((DLQ_KIND_HEADER.to_string(), kind.as_bytes().to_vec()));
    o
}

impl Transform for Decider {
    fn process(&mut self, r: &Record<'_>) -> Vec<Output> {
        let s: ScoreRecord = match serde_json::from_slice(r.payload) {
            Ok(s) => s,
            Err(e) => return vec![dlq(r, "bad_score_record", e.to_string())],
        };
        if r.key != Some(s.cluster.as_bytes()) {
            return vec![dlq(
                r,
                "key_mismatch",
                format!("score record key is not its cluster {:?}", s.cluster),
            )];
        }
        match self.decide(r.partition, &s) {
            Some(d) => vec![Output::alert(
                d.host_id.as_bytes().to_vec(),
                serde_json::to_vec(&d).expect("decisions serialise"),
            )],
            None => Vec::new(),
        }
    }

    fn state(&self, key: &[u8]) -> Option<Vec<u8>> {
        // Written as `ClusterState`, from borrowed parts (no copy of the policy).
        #[derive(Serialize)]
        struct View<'a, P: Serialize> {
            version: u32,
            hosts: &'a [String],
            policy: P,
        }
        self.clusters.get(key).map(|c| {
            let st = View {
                version: STATE_VERSION,
                hosts: &c.hosts,
                policy: c.policy.snapshot_view(),
            };
            serde_json::to_vec(&st).expect("cluster state serialises")
        })
    }

    fn restore(&mut self, partition: i32, key: &[u8], state: &[u8]) {
        let t0 = Instant::now();
        let cluster = String::from_utf8_lossy(key).into_owned();
        let st: ClusterState = match serde_json::from_slice(state) {
            Ok(st) => st,
            Err(e) => {
                tracing::error!(partition, cluster = %cluster, error = %e, "unreadable cluster state: the cluster starts from an empty policy");
                return;
            }
        };
        if st.version != STATE_VERSION {
            tracing::error!(partition, cluster = %cluster, found = st.version, expected = STATE_VERSION, "cluster state of another version: the cluster starts from an empty policy");
            return;
        }
        let policy = match Policy::from_snapshot(self.params.clone(), st.policy) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(partition, cluster = %cluster, error = %e, "cluster policy snapshot refused: the cluster starts from an empty policy");
                return;
            }
        };
        let index = st
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| (h.clone(), i as HostIdx))
            .collect();
        tracing::debug!(
            partition,
            cluster = %cluster,
            hosts = st.hosts.len(),
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "cluster policy restored from its snapshot"
        );
        self.clusters.insert(
            key.to_vec(),
            ClusterSlot {
                partition,
                policy,
                index,
                hosts: st.hosts,
            },
        );
    }

    fn forget_partition(&mut self, partition: i32) {
        self.clusters.retain(|_, c| c.partition != partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use waterbear_models::Signature;

    #[test]
    fn restore_reproduces_policy_state() {
        let params = waterbear_policy::PolicyConfig::default().check().unwrap();
        let mut a = Decider::new(params.clone());
        let mk = |host: &str, ts: i64, score: f64| ScoreRecord {
            host: host.into(),
            cluster: "c".into(),
            fd: 1,
            ud: 0,
            vms: 3,
            rack: "r".into(),
            vm_mem_mib: 3 * 4096,
            ts,
            score,
            sig: Signature::Disk,
            reasons: Vec::new(),
            model: "m".into(),
        };
        let mut all = Vec::new();
        for t in 0..200i64 {
            for h in ["h1", "h2", "h3"] {
                let s = if (h == "h1" && t > 20) || (h == "h2" && t > 60) {
                    0.95
                } else {
                    0.1
                };
                all.push(mk(h, t * 600_000, s));
            }
        }
        let (first, second) = all.split_at(300);
        let mut ids_a = Vec::new();
        for s in &all {
            if let Some(d) = a.decide(0, s) {
                ids_a.push(d);
            }
        }
        // a second decider: first part, persist, restore into a third, rest
        let mut b = Decider::new(params.clone());
        let mut ids_b = Vec::new();
        for s in first {
            if let Some(d) = b.decide(0, s) {
                ids_b.push(d);
            }
        }
        let st = b.state(b"c").unwrap();
        let mut c = Decider::new(params);
        c.restore(0, b"c", &st);
        for s in second {
            if let Some(d) = c.decide(0, s) {
                ids_b.push(d);
            }
        }
        assert!(!ids_a.is_empty());
        assert_eq!(ids_a, ids_b);
    }
}
