//! Stage 2: scores (keyed by cluster, so one writer per cluster) -> the
//! [`Policy`] -> decisions (keyed by host) on `alerts`.
//!
//! State: per cluster, the log of the score records that changed the
//! policy's state (a score below the entry threshold for a host with nothing
//! going on is a no-op in `Policy::observe`, so it is not logged). Restore
//! replays the log into a fresh policy: the policy is pure, so this
//! reproduces its state exactly (incident numbers, streaks, in-flight
//! actions and budgets, cooldowns); the decisions the replay makes were
//! committed before and are discarded.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use waterbear_features::HostIdx;
use waterbear_models::{Reasons, Score, Signature};
use waterbear_policy::{Decision, HostInfo, Policy, PolicyParams};
use waterbear_stream::{Output, Record, Transform};

use crate::DLQ_KIND_HEADER;
use crate::scorer::ScoreRecord;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostEntry {
    id: String,
    fd: u32,
    ud: u32,
    #[serde(default)]
    rack: String,
    /// Latest guest memory on the host, MiB (replay uses the latest, not the historic, value).
    #[serde(default)]
    vm_mem_mib: u64,
}

/// (host index, ts, score, signature, vms)
type LogEntry = (HostIdx, i64, f64, Signature, u32);

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct ClusterLog {
    hosts: Vec<HostEntry>,
    log: Vec<LogEntry>,
    /// Entries dropped from the front because of `decider_log_max`.
    #[serde(default)]
    dropped: u64,
}

struct ClusterSlot {
    partition: i32,
    policy: Policy,
    index: HashMap<String, HostIdx>,
    state: ClusterLog,
}

/// The stage-2 transform.
pub struct Decider {
    params: PolicyParams,
    enter: f64,
    log_max: usize,
    clusters: HashMap<Vec<u8>, ClusterSlot>,
    decisions: u64,
}

impl Decider {
    /// A decider; `enter` is the policy's entry threshold.
    pub fn new(params: PolicyParams, enter: f64, log_max: usize) -> Self {
        Self {
            params,
            enter,
            log_max: log_max.max(1),
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
                state: ClusterLog::default(),
            });
        slot.partition = partition;
        slot
    }

    /// Runs one score record through its cluster's policy.
    pub fn decide(&mut self, partition: i32, s: &ScoreRecord) -> Option<Decision> {
        let enter = self.enter;
        let log_max = self.log_max;
        let slot = self.slot(partition, &s.cluster);
        let idx = match slot.index.get(&s.host) {
            Some(&i) => i,
            None => {
                let i = slot.state.hosts.len() as HostIdx;
                slot.index.insert(s.host.clone(), i);
                slot.state.hosts.push(HostEntry {
                    id: s.host.clone(),
                    fd: s.fd,
                    ud: s.ud,
                    rack: s.rack.clone(),
                    vm_mem_mib: s.vm_mem_mib,
                });
                i
            }
        };
        {
            let h = &mut slot.state.hosts[idx as usize];
            h.fd = s.fd;
            h.ud = s.ud;
            h.vm_mem_mib = s.vm_mem_mib;
            if h.rack != s.rack {
                h.rack = s.rack.clone();
            }
        }
        let relevant = !(s.score < enter && slot.policy.is_healthy_target(idx));
        if relevant {
            slot.state.log.push((idx, s.ts, s.score, s.sig, s.vms));
            if slot.state.log.len() > log_max {
                let n = slot.state.log.len() - log_max;
                slot.state.log.drain(..n);
                slot.state.dropped += n as u64;
                tracing::warn!(
                    cluster = %s.cluster,
                    dropped = slot.state.dropped,
                    "decider log over job.decider_log_max: oldest entries dropped (a later restore is approximate)"
                );
            }
        }
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
        self.clusters
            .get(key)
            .map(|c| serde_json::to_vec(&c.state).expect("cluster log serialises"))
    }

    fn restore(&mut self, partition: i32, key: &[u8], state: &[u8]) {
        let t0 = Instant::now();
        let log: ClusterLog = match serde_json::from_slice(state) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(partition, error = %e, "ignoring unreadable cluster state");
                return;
            }
        };
        let cluster = String::from_utf8_lossy(key).into_owned();
        let mut policy = Policy::new(self.params.clone());
        let mut index = HashMap::new();
        for (i, h) in log.hosts.iter().enumerate() {
            index.insert(h.id.clone(), i as HostIdx);
        }
        let mut replayed = 0u64;
        for &(idx, ts, value, sig, vms) in &log.log {
            let Some(h) = log.hosts.get(idx as usize) else {
                continue;
            };
            let info = HostInfo {
                host_id: &h.id,
                cluster: &cluster,
                rack: &h.rack,
                fault_domain: h.fd,
                update_domain: h.ud,
                availability_sets: &[],
                vm_count: vms,
                vm_mem_mib: h.vm_mem_mib,
            };
            let score = Score {
                value,
                signature: sig,
                reasons: Reasons::default(),
            };
            let _ = policy.observe(idx, &info, ts, &score, "");
            replayed += 1;
        }
        tracing::debug!(
            partition,
            cluster = %cluster,
            replayed,
            ms = t0.elapsed().as_secs_f64() * 1e3,
            "cluster policy rebuilt by replay"
        );
        self.clusters.insert(
            key.to_vec(),
            ClusterSlot {
                partition,
                policy,
                index,
                state: log,
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

    #[test]
    fn replay_reproduces_policy_state() {
        let params = waterbear_policy::PolicyConfig::default().check().unwrap();
        let enter = waterbear_policy::PolicyConfig::default().enter_threshold;
        let mut a = Decider::new(params.clone(), enter, 1_000_000);
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
        let mut b = Decider::new(params.clone(), enter, 1_000_000);
        let mut ids_b = Vec::new();
        for s in first {
            if let Some(d) = b.decide(0, s) {
                ids_b.push(d);
            }
        }
        let st = b.state(b"c").unwrap();
        let mut c = Decider::new(params, enter, 1_000_000);
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
