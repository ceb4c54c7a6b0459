//! Stage 1: telemetry (keyed by host) -> validated -> features -> detector ->
//! [`ScoreRecord`] (keyed by cluster).

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use waterbear_features::{FeatureParams, FeatureVector, HostState};
use waterbear_models::{Detector, Reason, Signature};
use waterbear_stream::{Output, Record, Topic, Transform};
use waterbear_telemetry::{HostRecord, LastAccepted, ValidationError, check_host, decode};

use crate::DLQ_KIND_HEADER;

/// What stage 1 tells stage 2 about one accepted record (serde_json, short
/// field names; the score is an exact f64 round trip).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreRecord {
    /// Host id.
    pub host: String,
    /// Cluster (the record key on the scores topic).
    pub cluster: String,
    /// Fault domain.
    pub fd: u32,
    /// Update domain.
    pub ud: u32,
    /// VMs on the host.
    pub vms: u32,
    /// Rack of the host (the policy's common-cause guard groups by it).
    #[serde(default)]
    pub rack: String,
    /// Guest memory on the host, MiB (the policy's evacuation-time estimate).
    #[serde(default)]
    pub vm_mem_mib: u64,
    /// Record timestamp, ms.
    pub ts: i64,
    /// Risk in [0, 1].
    pub score: f64,
    /// Failure signature.
    pub sig: Signature,
    /// Strongest reasons first.
    pub reasons: Vec<Reason>,
    /// Detector name@version.
    pub model: String,
}

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
    hosts: HashMap<Vec<u8>, Slot>,
    fv: FeatureVector,
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
            hosts: HashMap::new(),
            fv: FeatureVector::default(),
        }
    }

    /// Hosts held in memory.
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Processes one decoded record (the in-process path of the tests).
    pub fn score(
        &mut self,
        partition: i32,
        rec: &HostRecord,
        now_ms: Option<i64>,
    ) -> Result<ScoreRecord, ValidationError> {
        let slot = self.hosts.get(rec.host_id.as_bytes());
        let last = check_host(
            rec,
            slot.and_then(|s| s.snap.last.as_ref()),
            now_ms,
            self.max_future_skew_ms,
        )?;
        let params = &self.params;
        let slot = self
            .hosts
            .entry(rec.host_id.as_bytes().to_vec())
            .or_insert_with(|| Slot {
                partition,
                snap: HostSnapshot {
                    features: HostState::new(params),
                    last: None,
                },
            });
        slot.partition = partition;
        slot.snap.last = Some(last);
        slot.snap.features.update(rec, params, &mut self.fv);
        let score = self.detector.score(&self.fv);
        Ok(ScoreRecord {
            host: rec.host_id.clone(),
            cluster: rec.cluster.clone(),
            fd: rec.fault_domain,
            ud: rec.update_domain,
            vms: rec.vms.len() as u32,
            rack: rec.rack.clone(),
            vm_mem_mib: rec.vms.iter().map(|v| u64::from(v.mem_mib)).sum(),
            ts: rec.ts_ms,
            score: score.value,
            sig: score.signature,
            reasons: score.reasons.iter().copied().collect(),
            model: self.model.clone(),
        })
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
            Ok(s) => {
                let payload = serde_json::to_vec(&s).expect("score records serialise");
                vec![Output {
                    topic: Topic::Named(self.scores_topic.clone()),
                    key: s.cluster.into_bytes(),
                    payload,
                    headers: Vec::new(),
                }]
            }
            Err(e) => vec![dlq(r, e.kind(), e.to_string())],
        }
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
        self.hosts.retain(|_, s| s.partition != partition);
    }
}
