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
use crate::batch::{HostScore, ScoreBatch};

/// Version of the decider's per-cluster state encoding.
const STATE_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ClusterState {
    version: u32,
    /// Host ids, in policy index order.
    hosts: Vec<String>,
    policy: PolicySnapshot,
}

/// foldhash: the host index is looked up once per score.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

struct ClusterSlot {
    partition: i32,
    policy: Policy,
    index: FastMap<String, HostIdx>,
    hosts: Vec<String>,
}

impl ClusterSlot {
    /// Runs one host's score through the cluster's policy.
    fn decide(&mut self, cluster: &str, model: &str, s: &HostScore<'_>) -> Option<Decision> {
        let idx = match self.index.get(s.host) {
            Some(&i) => i,
            None => {
                let i = self.hosts.len() as HostIdx;
                self.index.insert(s.host.to_owned(), i);
                self.hosts.push(s.host.to_owned());
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
            host_id: s.host,
            cluster,
            rack: s.rack,
            fault_domain: s.fd,
            update_domain: s.ud,
            availability_sets: &[],
            vm_count: s.vms,
            vm_mem_mib: s.vm_mem_mib,
        };
        self.policy.observe(idx, &info, s.ts, &score, model)
    }
}

/// The stage-2 transform.
pub struct Decider {
    params: PolicyParams,
    clusters: FastMap<Vec<u8>, ClusterSlot>,
    decisions: u64,
    /// The memory of the last batch's scores, for the next batch.
    scores: Vec<HostScore<'static>>,
}

impl Decider {
    /// A decider.
    pub fn new(params: PolicyParams) -> Self {
        Self {
            params,
            clusters: FastMap::default(),
            decisions: 0,
            scores: Vec::new(),
        }
    }

    /// Decisions emitted (not counting replays).
    pub fn decisions(&self) -> u64 {
        self.decisions
    }

    /// The cluster's slot (its key copied only the first time).
    fn slot(&mut self, partition: i32, cluster: &str) -> &mut ClusterSlot {
        if !self.clusters.contains_key(cluster.as_bytes()) {
            self.clusters.insert(
                cluster.as_bytes().to_vec(),
                ClusterSlot {
                    partition,
                    policy: Policy::new(self.params.clone()),
                    index: FastMap::default(),
                    hosts: Vec::new(),
                },
            );
        }
        let slot = self
            .clusters
            .get_mut(cluster.as_bytes())
            .expect("inserted above");
        slot.partition = partition;
        slot
    }

    /// Runs one host's score through its cluster's policy.
    pub fn decide(
        &mut self,
        partition: i32,
        cluster: &str,
        model: &str,
        s: &HostScore<'_>,
    ) -> Option<Decision> {
        let d = self.slot(partition, cluster).decide(cluster, model, s);
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
        let b = match ScoreBatch::decode_reusing(r.payload, std::mem::take(&mut self.scores)) {
            Ok(b) => b,
            Err(e) => return vec![dlq(r, "bad_score_batch", e.to_string())],
        };
        if r.key != Some(b.cluster.as_bytes()) {
            return vec![dlq(
                r,
                "key_mismatch",
                format!("score batch key is not its cluster {:?}", b.cluster),
            )];
        }
        // One cluster per batch: its slot is looked up once.
        let slot = self.slot(r.partition, b.cluster);
        let out: Vec<Output> = b
            .scores
            .iter()
            .filter_map(|s| slot.decide(b.cluster, b.model, s))
            .map(|d| {
                Output::alert(
                    d.host_id.as_bytes().to_vec(),
                    serde_json::to_vec(&d).expect("decisions serialise"),
                )
            })
            .collect();
        self.decisions += out.len() as u64;
        self.scores = b.into_buffer();
        out
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
        let mk = |host: &'static str, ts: i64, score: f64| HostScore {
            host,
            fd: 1,
            ud: 0,
            vms: 3,
            rack: "r",
            vm_mem_mib: 3 * 4096,
            ts,
            score,
            sig: Signature::Disk,
            reasons: Default::default(),
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
            if let Some(d) = a.decide(0, "c", "m", s) {
                ids_a.push(d);
            }
        }
        // a second decider: first part, persist, restore into a third, rest
        let mut b = Decider::new(params.clone());
        let mut ids_b = Vec::new();
        for s in first {
            if let Some(d) = b.decide(0, "c", "m", s) {
                ids_b.push(d);
            }
        }
        let st = b.state(b"c").unwrap();
        let mut c = Decider::new(params);
        c.restore(0, b"c", &st);
        for s in second {
            if let Some(d) = c.decide(0, "c", "m", s) {
                ids_b.push(d);
            }
        }
        assert!(!ids_a.is_empty());
        assert_eq!(ids_a, ids_b);
    }

    #[test]
    fn bad_batches_go_to_the_dlq_with_their_kind() {
        let params = waterbear_policy::PolicyConfig::default().check().unwrap();
        let mut d = Decider::new(params);
        let rec = |key: &'static [u8], payload: &'static [u8]| Record {
            partition: 0,
            offset: 7,
            timestamp_ms: None,
            key: Some(key),
            payload,
        };
        let kind = |o: &Output| {
            o.headers
                .iter()
                .find(|(k, _)| k == DLQ_KIND_HEADER)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let out = d.process(&rec(b"c", br#"{"host":"h1","cluster":"c"}"#));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, waterbear_stream::Topic::Dlq);
        assert_eq!(kind(&out[0]).as_deref(), Some("bad_score_batch"));

        let mut w = crate::batch::ScoreBatchWriter::default();
        w.push(&HostScore {
            host: "h1",
            fd: 0,
            ud: 0,
            vms: 1,
            rack: "r",
            vm_mem_mib: 1,
            ts: 0,
            score: 0.1,
            sig: Signature::None,
            reasons: Default::default(),
        });
        let good: &'static [u8] = Box::leak(w.finish("c", "m").into_boxed_slice());
        let out = d.process(&rec(b"other", good));
        assert_eq!(kind(&out[0]).as_deref(), Some("key_mismatch"));
        assert!(
            d.process(&rec(b"c", good)).is_empty(),
            "a quiet score decides nothing"
        );
        assert_eq!(d.clusters.len(), 1);
    }
}
