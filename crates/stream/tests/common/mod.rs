//! Helpers for the integration tests: they run against the real broker at
//! `KAFKA_BOOTSTRAP` (start one with `scripts/with-kafka.sh`). The broker-side
//! helpers are shared with the streamjob tests (`waterbear-kafka-testkit`);
//! here: names, configs and the echo job of this crate.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

pub use waterbear_kafka_testkit::*;

/// Unique names so tests can share one broker.
pub struct Names {
    pub group: String,
    pub telemetry: String,
    pub alerts: String,
    pub dlq: String,
    pub state: String,
    pub txn_prefix: String,
}

impl Names {
    pub fn new(test: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let id = format!("{test}-{}-{}", std::process::id(), nanos % 1_000_000_000);
        Self {
            group: format!("g-{id}"),
            telemetry: format!("t-{id}"),
            alerts: format!("a-{id}"),
            dlq: format!("d-{id}"),
            state: format!("s-{id}"),
            txn_prefix: format!("tx-{id}"),
        }
    }

    /// A streaming.toml for these names.
    pub fn config_toml(
        &self,
        partitions: i32,
        batch_max_records: usize,
        batch_max_ms: u64,
    ) -> String {
        format!(
            r#"
[kafka]
brokers = "{brokers}"
group_id = "{group}"
transactional_id_prefix = "{txn}"
instance_id = "default"
static_membership = true
session_timeout_ms = 6000
transaction_timeout_ms = 10000
[kafka.extra]
[kafka.consumer]
"fetch.wait.max.ms" = "20"
[kafka.producer]
"linger.ms" = "2"

[topics]
telemetry = "{t}"
alerts = "{a}"
dlq = "{d}"
state = "{s}"
create = true
replication_factor = 1

[partitions]
telemetry = {partitions}
alerts = {partitions}
dlq = 1

[batch]
max_records = {batch_max_records}
max_ms = {batch_max_ms}
txn_call_timeout_ms = 5000
"#,
            brokers = bootstrap(),
            group = self.group,
            txn = self.txn_prefix,
            t = self.telemetry,
            a = self.alerts,
            d = self.dlq,
            s = self.state,
        )
    }

    pub fn write_config(
        &self,
        dir: &Path,
        partitions: i32,
        batch_max_records: usize,
        batch_max_ms: u64,
    ) -> PathBuf {
        let path = dir.join(format!("{}.toml", self.group));
        std::fs::write(
            &path,
            self.config_toml(partitions, batch_max_records, batch_max_ms),
        )
        .unwrap();
        path
    }

    pub fn params(&self, partitions: i32, instance: &str) -> waterbear_stream::StreamParams {
        let mut c = waterbear_stream::StreamConfig::from_toml_str(
            &self.config_toml(partitions, 500, 50),
            "test",
        )
        .unwrap();
        c.kafka.instance_id = instance.to_string();
        c.validate().unwrap()
    }
}

/// Input records: `n` records over `keys` keys, payload `rec-<key>-<i>`.
pub fn inputs(prefix: &str, n: usize, keys: usize) -> Vec<(Vec<u8>, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let k = format!("{prefix}k{}", i % keys);
            (k.clone().into_bytes(), format!("rec-{k}-{i}").into_bytes())
        })
        .collect()
}

/// Expected EchoUpper outputs per key, in order.
pub fn expected(inputs: &[(Vec<u8>, Vec<u8>)]) -> BTreeMap<Vec<u8>, Vec<Vec<u8>>> {
    let mut m: BTreeMap<Vec<u8>, Vec<Vec<u8>>> = BTreeMap::new();
    for (k, v) in inputs {
        let e = m.entry(k.clone()).or_default();
        let n = e.len() + 1;
        e.push(
            format!(
                "{}|{n}",
                String::from_utf8(v.clone()).unwrap().to_uppercase()
            )
            .into_bytes(),
        );
    }
    m
}

/// Asserts outputs are exactly the expected ones: per key, in order, no
/// loss, no duplicates.
pub fn assert_exactly_once(expected: &BTreeMap<Vec<u8>, Vec<Vec<u8>>>, outputs: &[Rec]) {
    type Placed = (i32, i64, Vec<u8>); // partition, offset, payload
    let mut got: BTreeMap<Vec<u8>, Vec<Placed>> = BTreeMap::new();
    for r in outputs {
        got.entry(r.key.clone())
            .or_default()
            .push((r.partition, r.offset, r.payload.clone()));
    }
    let exp_keys: BTreeSet<_> = expected.keys().collect();
    let got_keys: BTreeSet<_> = got.keys().collect();
    assert_eq!(exp_keys, got_keys, "output keys differ from input keys");
    let mut problems = Vec::new();
    for (k, exp) in expected {
        let mut g = got.remove(k).unwrap_or_default();
        g.sort_by_key(|(p, o, _)| (*p, *o));
        let g: Vec<Vec<u8>> = g.into_iter().map(|(_, _, v)| v).collect();
        if &g != exp {
            let first_diff = exp.iter().zip(&g).position(|(a, b)| a != b);
            problems.push(format!(
                "key {}: expected {} outputs, got {}; first difference at {:?}: expected {:?} got {:?}",
                String::from_utf8_lossy(k),
                exp.len(),
                g.len(),
                first_diff,
                first_diff.map(|i| String::from_utf8_lossy(&exp[i]).to_string()),
                first_diff.map(|i| String::from_utf8_lossy(&g[i]).to_string()),
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "{} keys wrong:\n{}",
        problems.len(),
        problems[..problems.len().min(10)].join("\n")
    );
}

/// Spawns the example job binary.
pub fn spawn_job(config: &Path, instance: &str, log: &Path) -> JobProc {
    JobProc::spawn(
        Command::new(env!("CARGO_BIN_EXE_stream-echo"))
            .arg("--config")
            .arg(config)
            .arg("--instance-id")
            .arg(instance)
            .env("RUST_LOG", "info,librdkafka=warn"),
        log,
    )
}
