//! Stage 1: telemetry (keyed by host) -> validated -> features -> detector ->
//! [`HostScore`]s, sent as one [`crate::ScoreBatch`] per (input partition,
//! cluster) and transaction, keyed by cluster.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use waterbear_features::{FeatureParams, FeatureVector, HostState};
use waterbear_models::{Detector, Score};
use waterbear_stream::{Output, Record, Topic, Transform};
use waterbear_telemetry::{HostRecord, LastAccepted, ValidationError, check_host, decode_into};

use crate::DLQ_KIND_HEADER;
use crate::batch::{HostScore, MAX_SCORES_PER_BATCH, ScoreBatchWriter};

/// Persisted per host (state topic, key = host id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
struct HostSnapshot {
    features: HostState,
    last: Option<LastAccepted>,
}

/// First bytes of a binary host state record.
pub const HOST_STATE_MAGIC: [u8; 4] = *b"WBHS";
/// Binary host state layout this build writes and reads.
pub const HOST_STATE_VERSION: u16 = 1;
/// Largest host state this build decodes (the largest window, 10,000
/// records, of values that all need the 10-byte escape is ~1.0 MB, under it).
pub const HOST_STATE_MAX_BYTES: usize = 1 << 20;
const HOST_STATE_HEADER: usize = 10;

fn state_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<HOST_STATE_MAX_BYTES>()
}

/// Why a host state record was refused.
#[derive(Debug, thiserror::Error)]
pub enum HostStateError {
    /// Over [`HOST_STATE_MAX_BYTES`].
    #[error("host state of {0} bytes is over the {HOST_STATE_MAX_BYTES}-byte cap")]
    TooLarge(usize),
    /// Shorter than the binary header.
    #[error("host state of {0} bytes is shorter than its {HOST_STATE_HEADER}-byte header")]
    Truncated(usize),
    /// A binary layout this build does not read.
    #[error("host state version {0}, this build reads version {HOST_STATE_VERSION}")]
    Version(u16),
    /// The body does not match its checksum.
    #[error("host state checksum {computed:08x} does not match the stored {stored:08x}")]
    Checksum {
        /// CRC-32 in the header.
        stored: u32,
        /// CRC-32 of the body.
        computed: u32,
    },
    /// The body does not decode.
    #[error("host state body: {0}")]
    Body(String),
    /// Neither the binary layout nor JSON (the layout of earlier builds).
    #[error("host state JSON: {0}")]
    Json(String),
}

impl HostSnapshot {
    /// The state record: `"WBHS" | version u16 LE | CRC-32 of the body u32 LE |
    /// bincode (standard) body`. The feature window's counts take one byte
    /// each (see `waterbear_features::RingSums`): about a fifth of the JSON's
    /// bytes, and no float formatting (JSON was ~0.45 µs a record in
    /// `stage_bench`).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(640);
        out.extend_from_slice(&HOST_STATE_MAGIC);
        out.extend_from_slice(&HOST_STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        bincode::encode_into_std_write(self, &mut out, state_cfg())
            .expect("encoding into a Vec cannot fail");
        let crc = crc32fast::hash(&out[HOST_STATE_HEADER..]);
        out[6..HOST_STATE_HEADER].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads either layout: binary (by its magic) or the JSON that builds
    /// before it wrote, so an upgrade restores the old states.
    fn decode(bytes: &[u8]) -> Result<Self, HostStateError> {
        if bytes.len() > HOST_STATE_MAX_BYTES {
            return Err(HostStateError::TooLarge(bytes.len()));
        }
        if !bytes.starts_with(&HOST_STATE_MAGIC) {
            return serde_json::from_slice(bytes).map_err(|e| HostStateError::Json(e.to_string()));
        }
        if bytes.len() < HOST_STATE_HEADER {
            return Err(HostStateError::Truncated(bytes.len()));
        }
        let version = u16::from_le_bytes([bytes[4], bytes[5]]);
        if version != HOST_STATE_VERSION {
            return Err(HostStateError::Version(version));
        }
        let stored = u32::from_le_bytes(bytes[6..HOST_STATE_HEADER].try_into().expect("4 bytes"));
        let body = &bytes[HOST_STATE_HEADER..];
        let computed = crc32fast::hash(body);
        if stored != computed {
            return Err(HostStateError::Checksum { stored, computed });
        }
        let (snap, used): (Self, usize) = bincode::decode_from_slice(body, state_cfg())
            .map_err(|e| HostStateError::Body(e.to_string()))?;
        if used != body.len() {
            return Err(HostStateError::Body(format!(
                "{} bytes after the state",
                body.len() - used
            )));
        }
        Ok(snap)
    }
}

type HostKey = SmallVec<[u8; 24]>;
type FastHash = foldhash::fast::RandomState;

/// Most payload buffers the scorer keeps for reuse: more than the batches of
/// one transaction in the benchmarks (about 25 per loop).
const SPARE_BUFFERS: usize = 256;
/// Largest buffer kept for reuse (a full batch of 2,000 scores is ~100 KiB).
const SPARE_BUFFER_BYTES: usize = 1 << 20;

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
    /// Keys up to 24 bytes sit in the bucket next to their slot: with 5,000
    /// hosts the heap bytes of a `Vec` key were a cache miss of their own
    /// (the key compare was ~4 % of the job's CPU).
    hosts: HashMap<HostKey, Box<Slot>, foldhash::fast::RandomState>,
    fv: FeatureVector,
    /// Scores not yet sent, per input partition and cluster (dropped with the
    /// partition: after an abort their inputs are replayed).
    /// Hashed, not ordered: the ordered maps' string compares were ~1.5 % of
    /// the job's CPU; [`Transform::flush`] sorts the few batches instead.
    pending: HashMap<i32, HashMap<String, ScoreBatchWriter, FastHash>, FastHash>,
    /// The record being scored, decoded into the same strings and VM list
    /// each time (allocation and free of ~10 strings a record were ~15 % of
    /// the scorer's CPU in `stage_bench`).
    scratch: HostRecord,
    /// Buffers of sent batches and of dropped writers, filled again by the
    /// next batches. Freed and allocated anew, each batch's ~100 KiB came from
    /// fresh pages the kernel had to zero: ~7 % of the job's CPU end to end.
    spare: Vec<Vec<u8>>,
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
            pending: HashMap::default(),
            scratch: HostRecord::default(),
            spare: Vec::new(),
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
        let params = &self.params;
        if let Some(slot) = self.hosts.get_mut(rec.host_id.as_bytes()) {
            // One lookup for a known host (its state was prefetched in
            // `process_into`, before the decode).
            let last = check_host(
                rec,
                slot.snap.last.as_ref(),
                now_ms,
                self.max_future_skew_ms,
            )?;
            slot.partition = partition;
            slot.snap.last = Some(last);
            slot.snap.features.update(rec, params, &mut self.fv);
            return Ok(self.detector.score(&self.fv));
        }
        let last = check_host(rec, None, now_ms, self.max_future_skew_ms)?;
        let mut snap = HostSnapshot {
            features: HostState::new(params),
            last: Some(last),
        };
        snap.features.update(rec, params, &mut self.fv);
        self.hosts.insert(
            HostKey::from_slice(rec.host_id.as_bytes()),
            Box::new(Slot { partition, snap }),
        );
        Ok(self.detector.score(&self.fv))
    }

    /// The output record of a batch: `w`'s scores, in a spare buffer.
    fn batch_output(
        spare: &mut Vec<Vec<u8>>,
        scores_topic: &str,
        model: &str,
        cluster: &str,
        w: &mut ScoreBatchWriter,
    ) -> Output {
        let mut payload = spare.pop().unwrap_or_default();
        w.finish_into(cluster, model, &mut payload);
        Output {
            topic: Topic::Named(scores_topic.to_owned()),
            key: cluster.as_bytes().to_vec(),
            payload,
            headers: Vec::new(),
        }
    }

    /// Keeps `buf` for a later batch, unless enough are kept or it is large.
    fn keep(&mut self, buf: Vec<u8>) {
        if self.spare.len() < SPARE_BUFFERS
            && buf.capacity() > 0
            && buf.capacity() <= SPARE_BUFFER_BYTES
        {
            self.spare.push(buf);
        }
    }

    /// Payload buffers held for reuse.
    pub fn spare_buffers(&self) -> usize {
        self.spare.len()
    }

    /// Adds a score to its batch; returns the batch's record once it is full.
    fn push(&mut self, partition: i32, rec: &HostRecord, score: &Score) -> Option<Output> {
        let clusters = self.pending.entry(partition).or_default();
        let w = match clusters.get_mut(rec.cluster.as_str()) {
            Some(w) => w,
            None => clusters.entry(rec.cluster.clone()).or_insert_with(|| {
                ScoreBatchWriter::with_buffer(self.spare.pop().unwrap_or_default())
            }),
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
        Some(Self::batch_output(
            &mut self.spare,
            &self.scores_topic,
            &self.model,
            &rec.cluster,
            w,
        ))
    }
}

impl Scorer {
    fn process_into(&mut self, r: &Record<'_>, rec: &mut HostRecord) -> Vec<Output> {
        // The record's key is its host id (checked below): start loading the
        // host's state now, so it arrives while the payload decodes.
        if let Some(slot) = r.key.and_then(|k| self.hosts.get(k)) {
            slot.snap.features.prefetch();
        }
        if let Err(e) = decode_into(r.payload, rec) {
            return vec![dlq(r, e.kind(), e.to_string())];
        }
        let rec = &*rec;
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
        match self.score(r.partition, rec, r.timestamp_ms) {
            Ok(s) => self.push(r.partition, rec, &s).into_iter().collect(),
            Err(e) => vec![dlq(r, e.kind(), e.to_string())],
        }
    }
}

impl Transform for Scorer {
    fn process(&mut self, r: &Record<'_>) -> Vec<Output> {
        let mut rec = std::mem::take(&mut self.scratch);
        let out = self.process_into(r, &mut rec);
        self.scratch = rec;
        out
    }

    fn flush(&mut self) -> Vec<Output> {
        // By partition, then cluster, so a replay sends the same records.
        let mut pending: Vec<(i32, String, ScoreBatchWriter)> = std::mem::take(&mut self.pending)
            .into_iter()
            .flat_map(|(p, clusters)| clusters.into_iter().map(move |(c, w)| (p, c, w)))
            .collect();
        pending.sort_unstable_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        let mut out = Vec::new();
        for (_, cluster, mut w) in pending {
            if !w.is_empty() {
                out.push(Self::batch_output(
                    &mut self.spare,
                    &self.scores_topic,
                    &self.model,
                    &cluster,
                    &mut w,
                ));
            }
            self.keep(w.into_buffer());
        }
        out
    }

    fn recycle(&mut self, payload: Vec<u8>) {
        self.keep(payload);
    }

    fn state(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.hosts.get(key).map(|s| s.snap.encode())
    }

    fn prefetch_state(&self, key: &[u8]) {
        if let Some(slot) = self.hosts.get(key) {
            slot.snap.features.prefetch_all();
        }
    }

    fn restore(&mut self, partition: i32, key: &[u8], state: &[u8]) {
        match HostSnapshot::decode(state) {
            Ok(snap) => {
                self.hosts
                    .insert(HostKey::from_slice(key), Box::new(Slot { partition, snap }));
            }
            Err(e) => tracing::warn!(partition, error = %e, "ignoring unreadable host state"),
        }
    }

    fn forget_partition(&mut self, partition: i32) {
        for (_, w) in self.pending.remove(&partition).unwrap_or_default() {
            self.keep(w.into_buffer());
        }
        self.hosts.retain(|_, s| s.partition != partition);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ScoreBatch;
    use std::collections::BTreeMap;
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

    fn scores_of(out: &[Output]) -> Vec<(String, i64, u64)> {
        out.iter()
            .flat_map(|o| {
                ScoreBatch::decode(&o.payload)
                    .unwrap()
                    .scores
                    .iter()
                    .map(|x| (x.host.to_owned(), x.ts, x.score.to_bits()))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// A host with a history: counters that rise, a crash, a heartbeat gap.
    fn history(host: &str, n: i64) -> Vec<HostRecord> {
        (0..n)
            .map(|t| {
                let mut r = HostRecord::example(host, t * 600_000);
                r.smart_5_raw = (t / 7) as u64;
                r.ecc_corrected = (t * t / 5) as u64;
                r.service_crashes = u32::from(t % 11 == 3);
                r.heartbeat_age_s = if t % 13 == 0 { 900.0 } else { 12.0 };
                r.cpu_util = 0.3 + 0.01 * (t % 17) as f64;
                r
            })
            .collect()
    }

    #[test]
    fn a_restored_host_scores_as_if_never_stopped_from_either_state_layout() {
        let recs = history("h1", 80);
        let mut straight = scorer();
        for r in &recs {
            feed(&mut straight, 0, r);
        }
        let want = scores_of(&straight.flush());

        let mut first = scorer();
        for r in &recs[..50] {
            feed(&mut first, 0, r);
        }
        let head = scores_of(&first.flush());
        let binary = first.state(b"h1").unwrap();
        assert!(binary.starts_with(&HOST_STATE_MAGIC));
        // the JSON layout of earlier builds
        let json = serde_json::to_vec(&first.hosts[b"h1".as_slice()].snap).unwrap();
        assert!(
            binary.len() * 3 < json.len(),
            "binary {} bytes, JSON {}",
            binary.len(),
            json.len()
        );
        for st in [&binary, &json] {
            let mut second = scorer();
            second.restore(0, b"h1", st);
            assert_eq!(second.hosts(), 1);
            for r in &recs[50..] {
                feed(&mut second, 0, r);
            }
            let mut got = head.clone();
            got.extend(scores_of(&second.flush()));
            assert_eq!(got, want);
            assert_eq!(second.state(b"h1"), straight.state(b"h1"));
        }
    }

    #[test]
    fn a_refused_record_leaves_the_host_state_as_it_was() {
        let mut s = scorer();
        // A new host whose first record is refused gets no state.
        let mut ahead = HostRecord::example("new", 0);
        ahead.ts_ms = 10 * 300_000;
        let out = s.process(&Record {
            partition: 0,
            offset: 0,
            timestamp_ms: Some(0),
            key: Some(b"new"),
            payload: &encode_to_vec(&ahead),
        });
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].topic, Topic::Dlq);
        assert_eq!(s.hosts(), 0);
        assert_eq!(s.state(b"new"), None);

        // A known host: a record older than its last, then one whose
        // counter went backwards, change nothing; the next good one scores
        // as if they had never come.
        let recs = history("h1", 30);
        let mut clean = scorer();
        for r in &recs {
            feed(&mut s, 0, r);
            feed(&mut clean, 0, r);
        }
        let before = s.state(b"h1").unwrap();
        let mut old = recs[10].clone();
        old.cpu_util = 0.99;
        let mut back = HostRecord::example("h1", 30 * 600_000);
        back.ecc_corrected = 0;
        for bad in [old, back] {
            let out = feed(&mut s, 0, &bad);
            assert_eq!(out.len(), 1);
            assert_eq!(out[0].topic, Topic::Dlq);
            assert_eq!(s.state(b"h1").unwrap(), before);
        }
        let next = history("h1", 31).pop().unwrap();
        feed(&mut s, 0, &next);
        feed(&mut clean, 0, &next);
        assert_eq!(scores_of(&s.flush()), scores_of(&clean.flush()));
        assert_eq!(s.state(b"h1"), clean.state(b"h1"));
    }

    #[test]
    fn a_damaged_host_state_is_refused_with_the_failing_step() {
        let mut s = scorer();
        for r in &history("h1", 40) {
            feed(&mut s, 0, r);
        }
        let good = s.state(b"h1").unwrap();
        assert!(HostSnapshot::decode(&good).is_ok());
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        assert!(matches!(
            HostSnapshot::decode(&flipped),
            Err(HostStateError::Checksum { .. })
        ));
        let mut v2 = good.clone();
        v2[4] = 2;
        assert!(matches!(
            HostSnapshot::decode(&v2),
            Err(HostStateError::Version(2))
        ));
        assert!(matches!(
            HostSnapshot::decode(&good[..8]),
            Err(HostStateError::Truncated(8))
        ));
        assert!(matches!(
            HostSnapshot::decode(b"{\"features\": 1}"),
            Err(HostStateError::Json(_))
        ));
        // a body cut short, with a checksum that matches what is left
        let mut cut = good[..good.len() - 5].to_vec();
        let crc = crc32fast::hash(&cut[HOST_STATE_HEADER..]);
        cut[6..HOST_STATE_HEADER].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(
            HostSnapshot::decode(&cut),
            Err(HostStateError::Body(_))
        ));
        // the JSON of earlier builds with a window that would panic at the next record
        let mut v = serde_json::to_value(&s.hosts[b"h1".as_slice()].snap).unwrap();
        v["features"]["window"]["ring"] = serde_json::json!([]);
        let e = HostSnapshot::decode(&serde_json::to_vec(&v).unwrap()).unwrap_err();
        assert!(
            matches!(e, HostStateError::Json(ref m) if m.contains("window 0")),
            "{e}"
        );
        // restore skips what it cannot read: the host starts fresh
        let mut fresh = scorer();
        fresh.restore(0, b"h1", &flipped);
        assert_eq!(fresh.hosts(), 0);
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
    fn sent_payloads_are_filled_again_with_the_same_bytes_as_fresh_ones() {
        let hosts: Vec<String> = (0..40).map(|i| format!("h{i}")).collect();
        let round = |s: &mut Scorer, t: i64| {
            for (i, h) in hosts.iter().enumerate() {
                let mut r = HostRecord::example(h, t * 600_000);
                r.cluster = format!("c{}", i % 3);
                r.cpu_util = 0.01 * ((t + i as i64) % 90) as f64;
                feed(s, (i % 2) as i32, &r);
            }
            s.flush()
        };
        let spare = |s: &Scorer| {
            let mut p: Vec<usize> = s.spare.iter().map(|b| b.as_ptr() as usize).collect();
            p.sort_unstable();
            p
        };
        let (mut recycling, mut plain) = (scorer(), scorer());
        let mut pool = Vec::new();
        for t in 0..9 {
            let a = round(&mut recycling, t);
            let b = round(&mut plain, t);
            assert_eq!(a.len(), 6, "two partitions x three clusters");
            assert_eq!(
                a.iter().map(|o| (&o.key, &o.payload)).collect::<Vec<_>>(),
                b.iter().map(|o| (&o.key, &o.payload)).collect::<Vec<_>>(),
                "round {t}"
            );
            // Once the buffers have grown, every batch goes into one of the
            // buffers held since (they are never freed, so a fresh
            // allocation cannot have the same address).
            if t > 2 {
                for o in &a {
                    assert!(
                        pool.binary_search(&(o.payload.as_ptr() as usize)).is_ok(),
                        "round {t}: a batch in a fresh buffer"
                    );
                }
            }
            for o in a {
                recycling.recycle(o.payload);
            }
            if t == 2 {
                pool = spare(&recycling);
            } else if t > 2 {
                assert_eq!(spare(&recycling), pool, "round {t}: the same buffers held");
            }
        }
        // Six batches out and one buffer more: in a flush, each writer's
        // buffer holds the payload of the next writer's batch.
        assert_eq!(pool.len(), 7);
        assert_eq!(
            plain.spare_buffers(),
            1,
            "without recycle, the last writer's"
        );
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
