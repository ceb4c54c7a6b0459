//! Helpers for the integration tests of the waterbear job: they run against
//! the real broker at `KAFKA_BOOTSTRAP` (start one with
//! `scripts/with-kafka.sh`). The broker-side helpers are shared with the
//! stream tests (`waterbear-kafka-testkit`); here: names, configs, the job
//! binary, and the in-process pipeline to compare with.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub use waterbear_kafka_testkit::*;

use waterbear_pipeline::{Pipeline, PipelineConfig};
use waterbear_policy::Decision;
use waterbear_telemetry::{HostRecord, encode_to_vec};

/// Unique names for one test's job.
pub struct JobNames {
    pub id: String,
    pub telemetry: String,
    pub scores: String,
    pub alerts: String,
    pub dlq: String,
}

impl JobNames {
    pub fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let id = format!("{test}-{}-{}", std::process::id(), nanos % 1_000_000_000);
        Self {
            telemetry: format!("t-{id}"),
            scores: format!("sc-{id}"),
            alerts: format!("a-{id}"),
            dlq: format!("d-{id}"),
            id,
        }
    }

    /// A job config: `partitions` for telemetry and scores, extra TOML appended.
    pub fn write_config(&self, dir: &Path, partitions: i32, extra: &str) -> PathBuf {
        let text = format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "g-{id}"
transactional_id_prefix = "tx-{id}"
instance_id = "default"
static_membership = true
session_timeout_ms = 6000
transaction_timeout_ms = 10000
[kafka.consumer]
"fetch.wait.max.ms" = "20"
[kafka.producer]
"linger.ms" = "2"

[topics]
telemetry = "{t}"
alerts = "{a}"
dlq = "{d}"
state = "s-{id}"
create = true
replication_factor = 1

[partitions]
telemetry = {partitions}
alerts = {partitions}
dlq = 1

[batch]
max_records = 500
max_ms = 50
idle_ms = 10
txn_call_timeout_ms = 5000

[job]
scores_topic = "{sc}"
scores_partitions = {partitions}
decider_state_topic = "ds-{id}"
{extra}
"#,
            brokers = bootstrap(),
            id = self.id,
            t = self.telemetry,
            a = self.alerts,
            d = self.dlq,
            sc = self.scores,
        );
        let path = dir.join(format!("{}.toml", self.id));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Spawns `waterbear-stream-job stream --role both`.
pub fn spawn_job(config: &Path, instance: &str, log: &Path) -> JobProc {
    JobProc::spawn(
        Command::new(env!("CARGO_BIN_EXE_waterbear-stream-job"))
            .arg("stream")
            .arg("--config")
            .arg(config)
            .arg("--instance-id")
            .arg(instance)
            .env("RUST_LOG", "info,librdkafka=warn"),
        log,
    )
}

/// A small simulated fleet with plenty of failures.
pub fn sim_config(hosts: usize, days: f64, seed: u64) -> waterbear_sim::SimConfig {
    waterbear_sim::SimConfig {
        hosts,
        days,
        seed,
        hosts_per_cluster: 20,
        hosts_per_rack: 5,
        fault_domains: 2,
        failure_fraction: 0.3,
        ..Default::default()
    }
}

/// Wire records keyed by host id.
pub fn wire(recs: &[HostRecord]) -> Vec<(Vec<u8>, Vec<u8>)> {
    recs.iter()
        .map(|r| (r.host_id.as_bytes().to_vec(), encode_to_vec(r)))
        .collect()
}

/// The decisions of the in-process pipeline on the same records.
///
/// The in-process pipeline attaches the host's whole feature vector to each
/// decision (for `waterbear explain`); the job's decider only has the score
/// record (score, signature, reasons), so that field is cleared here and
/// everything else must match.
pub fn pipeline_decisions(recs: &[HostRecord], cfg: PipelineConfig) -> Vec<Decision> {
    pipeline_decisions_with(recs, cfg, None)
}

/// [`pipeline_decisions`] with a trained model next to the rules.
pub fn pipeline_decisions_with(
    recs: &[HostRecord],
    cfg: PipelineConfig,
    model: Option<&waterbear_models::Artifact>,
) -> Vec<Decision> {
    let mut p = Pipeline::with_model(cfg, model).unwrap();
    recs.iter()
        .filter_map(|r| p.process(r, i64::MAX / 2).ok().and_then(|s| s.decision))
        .map(|mut d| {
            d.features = None;
            d
        })
        .collect()
}

/// Host scores inside the score batches of `recs` (the scores topic).
pub fn scores_in(recs: &[Rec]) -> usize {
    recs.iter()
        .map(|r| {
            waterbear_streamjob::ScoreBatch::decode(&r.payload)
                .expect("a score batch")
                .scores
                .len()
        })
        .sum()
}

/// Parses alerts; panics on an id seen twice with different content; returns
/// (distinct decisions by id, total records).
pub fn decisions_by_id(recs: &[Rec]) -> (BTreeMap<String, Decision>, usize) {
    let mut m: BTreeMap<String, Decision> = BTreeMap::new();
    for r in recs {
        let d: Decision = serde_json::from_slice(&r.payload).expect("alert is a Decision");
        assert_eq!(r.key, d.host_id.as_bytes(), "alert key is the host id");
        if let Some(prev) = m.get(&d.id) {
            assert_eq!(prev, &d, "decision {} twice with different content", d.id);
        }
        m.insert(d.id.clone(), d);
    }
    (m, recs.len())
}

/// Occurrences of `pattern` in the job log.
pub fn log_count(log: &Path, pattern: &str) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .matches(pattern)
        .count()
}

/// Waits until the job log has at least `n` lines with `pattern`.
pub fn wait_log(log: &Path, pattern: &str, n: usize, deadline: Duration) {
    let end = Instant::now() + deadline;
    while log_count(log, pattern) < n {
        assert!(
            Instant::now() < end,
            "{pattern:?} not {n} times in {} after {deadline:?}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Spawns the job and waits until both its loops have a transactional
/// producer (so a SIGTERM is handled, not fatal).
pub fn spawn_ready(config: &Path, instance: &str, log: &Path) -> JobProc {
    let before = log_count(log, "transactional producer ready");
    let job = spawn_job(config, instance, log);
    wait_log(
        log,
        "transactional producer ready",
        before + 2,
        Duration::from_secs(60),
    );
    job
}
