//! Stage 1: telemetry (keyed by host) -> validated -> features -> detector ->
//! [`HostScore`]s, sent as one [`crate::ScoreBatch`] per (input partition,
//! cluster) and transaction, keyed by cluster.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use waterbear_features::{FeatureParams, FeatureVector, HostState};
use waterbear_models::{Detector, Score};
use waterbear_stream::{Output, Record, Topic, Transform};
use waterbear_telemetry::{HostRecord, LastAccepted, ValidationError, check_host, decode};

use crate::DLQ_KIND_HEADER;
use crate::batch::{HostScore, MAX_SCORES_PER_BATCH, ScoreBatchWriter};

/// Persisted per host (state topic, key = host id).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct HostSnapshot {
    features: HostState,
    last: Option<LastAccepted>,
}

struct Slot {
    partition: i32,
    snap: HostSnapshot,
}

/// The stage-1 transform.
pub struct Scorer {
    params: FeatureParams,
    detector: Arc<dyn Detector>,
    model: String,
    scores_topic: String,
    max_future_skew_ms: i64,
    /// By host key. foldhash: SipHash and its key compare were ~2 % of the
    /// loop; foldhash's per-map random seed still keeps keys unpredictable.
    hosts: HashMap<Vec<u8>, Slot, foldhash::fast::RandomState>,
    fv: FeatureVector,
    /// Scores not yet sent, per input partition and cluster (dropped with the
    /// partition: after an abort their inputs are replayed).
    pending: BTreeMap<i32, BTreeMap<String, ScoreBatchWriter>>,
}

fn dlq(r: &Record<'_>, kind: &str, message: String) -> Output {
    let mut o = Output::dlq(r.key, r.payload, format!("{kind}: {message}"));
    o.headers
        .push((DLQ_KIND_HEADER.to_string(), kind.as_bytes().to_vec()));
    o
}

impl Scorer {
    /// A scorer with `detector` (see [`waterbear_models::host_detector`]), whose
    /// inputs are computed with `params`.
    pub fn new(
        params: FeatureParams,
        detector: Arc<dyn Detector>,
        scores_topic: String,
        max_future_skew_ms: i64,
    ) -> Self {
        let model = format!("{}@{}", detector.name(), detector.version());
        Self {
            params,
            detector,
            model,
            scores_topic,
            max_future_skew_ms,
            hosts: HashMap::default(),
            fv: FeatureVector::default(),
            pending: BTreeMap::new(),
        }
    }

    /// Hosts held in memory.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Validates one decoded record against its host's history and scores it.
    pub fn score(
        &mut self,
        partition: i32,
        rec: &HostRecord,
        now_ms: Option<i64>,
    ) -> Result<Score, ValidationError> {
        let slot = self.hosts.get(rec.host_id.as_bytes());
        let known = slot.is_some();
        let last = check_host(
            rec,
            slot.and_then(|s| s.snap.last.as_ref()),
            now_ms,
            self.max_future_skew_ms,
        )?;
        let params = &self.params;
        // A known host is looked up without copying its id.
        if !known {
            self.hosts.insert(
                rec.host_id.as_bytes().to_vec(),
                Slot {
                    partition,
                    snap: HostSnapshot {
                        features: HostState::new(params),
                        last: None,
                    },
                },
            );
        }
        let slot = self
            .hosts
            .get_mut(rec.host_id.as_bytes())
            .expect("inserted above");
        slot.partition = partition;
        slot.snap.last = Some(last);
        slot.snap.features.update(rec, params, &mut self.fv);
        Ok(self.detector.score(&self.fv))
    }

    /// The output record of a batch.
    fn batch_output(&self, cluster: &str, w: &mut ScoreBatchWriter) -> Output {
        Output {
            topic: Topic::Named(self.scores_topic.clone()),
            key: cluster.as_bytes().to_vec(),
            payload: w.finish(cluster, &self.model),
            headers: Vec::new(),
        }
    }

    /// Adds a score to its batch; returns the batch's record once it is full.
    fn push(&mut self, partition: i32, rec: &HostRecord, score: &Score) -> Option<Output> {
        let clusters = self.pending.entry(partition).or_default();
        let w = match clusters.get_mut(rec.cluster.as_str()) {
            Some(w) => w,
            None => clusters.entry(rec.cluster.clone()).or_default(),
        };
        w.push(&HostScore {
            host: &rec.host_id,
            fd: rec.fault_domain,
            ud: rec.update_domain,
            vms: rec.vms.len() as u32,
            rack: &rec.rack,
            vm_mem_mib: rec.vms.iter().map(|v| u64::from(v.mem_mib)).sum(),
            ts: rec.ts_ms,
            score: score.value,
            sig: score.signature,
            reasons: score.reasons.iter().copied().collect(),
        });
        if w.len() < MAX_SCORES_PER_BATCH {
            return None;
        }
        let mut full = std::mem::take(w);
        Some(self.batch_output(&rec.cluster, &mut full))
    }
}

impl Transform for Scorer {
    fn process(&mut self, r: &Record<'_>) -> Vec<Output> {
        let rec = match decode(r.payload) {
            Ok(rec) => rec,
            Err(e) => return vec![dlq(r, e.kind(), e.to_string())],
        };
        if r.key != Some(rec.host_id.as_bytes()) {
            return vec![dlq(
                r,
                "key_mismatch",
                format!(
                    "record key {:?} is not the host id {:?}",
                    String::from_utf8_lossy(r.key.unwrap_or_default()),
                    rec.host_id
                ),
            )];
        }
        match self.score(r.partition, &rec, r.timestamp_ms) {
            Ok(s) => self.push(r.partition, &rec, &s).into_iter().collect(),
            Err(e) => vec![dlq(r, e.kind(), e.to_string())],
        }
    }

    fn flush(&mut self) -> Vec<Output> {
        let pending = std::mem::take(&mut self.pending);
        let mut out = Vec::new();
        for (_, clusters) in pending {
            for (cluster, mut w) in clusters {
                if !w.is_empty() {
                    out.push(self.batch_output(&cluster, &mut w));
                }
            }
        }
        out
    }

    fn state(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.hosts
            .get(key)
            .map(|s| serde_json::to_vec(&s.snap).expect("host state serialises"))
    }

    fn restore(&mut self, partition: i32, key: &[u8], state: &[u8]) {
        match serde_json::from_slice::<HostSnapshot>(state) {
            Ok(snap) => {
                self.hosts.insert(key.to_vec(), Slot { partition, snap });
            }
            Err(e) => tracing::warn!(partition, error = %e, "ignoring unreadable host state"),
        }
    }

    fn forget_partition(&mut self, partition: i32) {
        self.pending.remove(&partition);
        self.hosts.retain(|_, s| s.partition != partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScoreBatch;
    use waterbear_models::RuleBaseline;
    use waterbear_telemetry::encode_to_vec;

    fn scorer() -> Scorer {
        Scorer::new(
            FeatureParams::default(),
            Arc::new(RuleBaseline::default()),
            "scores".into(),
            300_000,
        )
    }

    fn feed(s: &mut Scorer, partition: i32, rec: &HostRecord) -> Vec<Output> {
        let payload = encode_to_vec(rec);
        s.process(&Record {
            partition,
            offset: 0,
            timestamp_ms: Some(rec.ts_ms),
            key: Some(rec.host_id.as_bytes()),
            payload: &payload,
        })
    }

    #[test]
    fn scores_leave_as_one_batch_per_partition_and_cluster_in_input_order() {
        let mut s = scorer();
        let mut want: BTreeMap<(i32, String), Vec<(String, i64)>> = BTreeMap::new();
        for t in 0..5i64 {
            for (p, h, c) in [(0, "h1", "c01"), (0, "h2", "c02"), (1, "h3", "c01")] {
                let mut r = HostRecord::example(h, t * 600_000);
                r.cluster = c.into();
                assert!(feed(&mut s, p, &r).is_empty(), "held until flush");
                want.entry((p, c.into()))
                    .or_default()
                    .push((h.into(), r.ts_ms));
            }
        }
        let out = s.flush();
        assert_eq!(out.len(), 3);
        let mut got = Vec::new();
        for o in &out {
            let b = ScoreBatch::decode(&o.payload).unwrap();
            assert_eq!(o.key, b.cluster.as_bytes());
            assert_eq!(b.model, "rule-baseline@1");
            got.push(
                b.scores
                    .iter()
                    .map(|x| (x.host.to_owned(), x.ts))
                    .collect::<Vec<_>>(),
            );
        }
        assert_eq!(got, want.into_values().collect::<Vec<_>>());
        assert!(s.flush().is_empty(), "flush empties the batches");
    }

    #[test]
    fn a_full_batch_leaves_at_once_and_a_forgotten_partition_sends_nothing() {
        let mut s = scorer();
        let mut sent = 0;
        for i in 0..MAX_SCORES_PER_BATCH as i64 + 5 {
            let r = HostRecord::example(&format!("h{i}"), 0);
            let out = feed(&mut s, 0, &r);
            if !out.is_empty() {
                sent += ScoreBatch::decode(&out[0].payload).unwrap().scores.len();
            }
        }
        assert_eq!(sent, MAX_SCORES_PER_BATCH as usize);
        // an abort forgets the partition: its held scores are replayed, not sent
        s.forget_partition(0);
        assert!(s.flush().is_empty());
    }
}
