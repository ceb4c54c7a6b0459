//! The waterbear streaming job (scorer + decider) against a real broker:
//! `scripts/with-kafka.sh cargo test -p waterbear-streamjob`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use waterbear_pipeline::PipelineConfig;
use waterbear_streamjob::simulate::sim_records;
use waterbear_telemetry::{HostRecord, decode, encode_binary_to_vec, encode_to_vec};

/// (1) N simulated records in -> exactly the in-process pipeline's decisions
/// (ids and contents), read_committed. One partition per stage, so the
/// decider sees the records in the simulator's order, as the pipeline does.
/// Both score with the committed disk model next to the rules (`job.model`).
#[test]
fn decisions_match_the_in_process_pipeline() {
    init_tracing();
    let names = JobNames::new("match");
    let recs = sim_records(sim_config(40, 2.0, 7)).unwrap();
    let model_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/disk-bb-v2.json");
    let model = waterbear_models::Artifact::read(std::fs::File::open(model_path).unwrap()).unwrap();
    let expected = pipeline_decisions_with(&recs, PipelineConfig::default(), Some(&model));
    assert!(
        expected.iter().all(|d| d.model.contains("disk-bb@v2")),
        "the pipeline scores with the model"
    );
    assert!(
        expected.len() >= 3,
        "sim gives too few decisions: {}",
        expected.len()
    );
    create_topic(&names.telemetry, 1);
    let mut feeder = TxnFeeder::new(&format!("feed-{}", names.id));
    for chunk in wire(&recs).chunks(2000) {
        feeder.send_chunk(&names.telemetry, chunk);
    }
    let dir = tmpdir();
    let cfg = names.write_config(&dir, 1, &format!("model = {model_path:?}"));
    let log = dir.join(format!("{}.log", names.id));
    let t0 = Instant::now();
    let mut job = spawn_job(&cfg, "m0", &log);
    let mut alerts = Collector::new(&names.alerts, 1);
    alerts.wait_for(expected.len(), Duration::from_secs(120), "alerts");
    eprintln!(
        "{} records -> {} decisions in {:?}",
        recs.len(),
        expected.len(),
        t0.elapsed()
    );
    let st = sigterm_and_wait(&mut job, Duration::from_secs(60));
    assert!(st.success(), "job exit {st} (log {})", log.display());
    alerts.drain();
    let (got, total) = decisions_by_id(&alerts.recs);
    assert_eq!(total, expected.len(), "no duplicates");
    assert_eq!(got.len(), expected.len(), "distinct ids");
    // Same decisions, and in the same order within each cluster (the decider
    // sees a cluster's scores in input order; clusters' batches interleave).
    let per_cluster = |ds: Vec<waterbear_policy::Decision>| {
        let mut m: std::collections::BTreeMap<String, Vec<_>> = Default::default();
        for d in ds {
            m.entry(d.cluster.clone()).or_default().push(d);
        }
        m
    };
    let got: Vec<waterbear_policy::Decision> = alerts
        .recs
        .iter()
        .map(|r| serde_json::from_slice(&r.payload).unwrap())
        .collect();
    assert_eq!(got.len(), expected.len());
    assert_eq!(per_cluster(got), per_cluster(expected));
}

/// (2) The job SIGKILLed at random points and restarted: every expected
/// decision appears exactly once with the pipeline's content.
#[test]
fn sigkill_and_restart_loses_and_duplicates_nothing() {
    init_tracing();
    let names = JobNames::new("kill");
    let recs = sim_records(sim_config(40, 2.0, 11)).unwrap();
    let expected = pipeline_decisions(&recs, PipelineConfig::default());
    assert!(expected.len() >= 3);
    create_topic(&names.telemetry, 1);
    let dir = tmpdir();
    let cfg = names.write_config(&dir, 1, "");
    let log = dir.join(format!("{}.log", names.id));
    let tel = names.telemetry.clone();
    let fid = format!("feed-{}", names.id);
    let input = wire(&recs);
    let feeder =
        TxnFeeder::new(&fid).stream_in_background(&tel, input, 500, Duration::from_millis(100));
    let mut rng = rand::thread_rng();
    let mut alerts = Collector::new(&names.alerts, 1);
    let mut job = spawn_job(&cfg, "k0", &log);
    for i in 0..5 {
        let ms = rng.gen_range(700..2500);
        alerts.poll_for(Duration::from_millis(ms));
        sigkill(&mut job);
        eprintln!(
            "kill {i} after {ms} ms, {} alerts so far",
            alerts.recs.len()
        );
        job = spawn_ready(&cfg, "k0", &log);
    }
    feeder.join().unwrap();
    alerts.wait_for(
        expected.len(),
        Duration::from_secs(120),
        "alerts after kills",
    );
    let st = sigterm_and_wait(&mut job, Duration::from_secs(60));
    assert!(st.success(), "job exit {st} (log {})", log.display());
    alerts.drain();
    let (got, total) = decisions_by_id(&alerts.recs);
    assert_eq!(total, expected.len(), "every decision exactly once");
    for d in &expected {
        assert_eq!(got.get(&d.id), Some(d), "decision {}", d.id);
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn json_edit(
    rec: &HostRecord,
    f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> Vec<u8> {
    let mut v: serde_json::Value = serde_json::from_slice(&encode_to_vec(rec)).unwrap();
    f(v.as_object_mut().unwrap());
    serde_json::to_vec(&v).unwrap()
}

/// (3) Malformed records of every kind -> DLQ with kind and reason, original
/// bytes; the job keeps running (the good records after them are scored).
#[test]
fn malformed_records_go_to_the_dlq() {
    init_tracing();
    let names = JobNames::new("dlq");
    create_topic(&names.telemetry, 1);
    let t0 = 1_767_225_600_000i64;
    let step = 600_000;
    let good = |i: i64| {
        let mut r = HostRecord::example("h1", t0 + i * step);
        r.ecc_corrected = 10 + i as u64;
        r
    };
    let key = b"h1".to_vec();
    let mut input: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut bad: Vec<(Vec<u8>, &str)> = Vec::new();
    let mut good_n = 0;
    for i in 0..3 {
        input.push((key.clone(), encode_to_vec(&good(i))));
        good_n += 1;
    }
    let base = good(3);
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"{not json".to_vec(), "malformed"),
        (
            json_edit(&base, |m| {
                m.remove("cpu_util");
            }),
            "missing_field",
        ),
        (
            json_edit(&base, |m| {
                m.insert("bogus".into(), 1.into());
            }),
            "unknown_field",
        ),
        (
            json_edit(&base, |m| {
                m.insert("disk_read_iops".into(), (-5.0).into());
            }),
            "negative",
        ),
        (
            String::from_utf8(encode_to_vec(&base))
                .unwrap()
                .replace("\"cpu_util\":0.42", "\"cpu_util\":1e999")
                .into_bytes(),
            "",
        ),
        (vec![b' '; 70 * 1024], "oversized"),
        (
            {
                // a binary record damaged after it was encoded
                let mut b = encode_binary_to_vec(&base);
                let last = b.len() - 1;
                b[last] ^= 0x01;
                b
            },
            "checksum",
        ),
        (
            encode_to_vec(&{
                let mut r = base.clone();
                r.ecc_corrected = 1;
                r
            }),
            "counter_backwards",
        ),
        (
            encode_to_vec(&HostRecord::example("h1", now_ms() + 86_400_000)),
            "future_timestamp",
        ),
        (encode_to_vec(&good(1)), "out_of_order"),
    ];
    for (bytes, kind) in cases {
        // stateless kinds must be what decode says
        let kind = if kind.is_empty() {
            decode(&bytes).unwrap_err().kind()
        } else {
            kind
        };
        input.push((key.clone(), bytes.clone()));
        bad.push((bytes, kind));
    }
    // a record whose key is not its host id
    input.push((b"other".to_vec(), encode_to_vec(&good(3))));
    bad.push((encode_to_vec(&good(3)), "key_mismatch"));
    // JSON and binary records mix in one topic
    for i in 3..6 {
        let bytes = if i == 4 {
            encode_binary_to_vec(&good(i))
        } else {
            encode_to_vec(&good(i))
        };
        input.push((key.clone(), bytes));
        good_n += 1;
    }
    let mut feeder = TxnFeeder::new(&format!("feed-{}", names.id));
    feeder.send_chunk(&names.telemetry, &input);
    let dir = tmpdir();
    let cfg = names.write_config(&dir, 1, "");
    let log = dir.join(format!("{}.log", names.id));
    let mut job = spawn_job(&cfg, "d0", &log);
    let mut dlq = Collector::new(&names.dlq, 1);
    let mut scores = Collector::new(&names.scores, 1);
    dlq.wait_for(bad.len(), Duration::from_secs(90), "dlq");
    scores.wait_for_items(
        good_n,
        scores_in,
        Duration::from_secs(30),
        "scores of the good records",
    );
    let st = sigterm_and_wait(&mut job, Duration::from_secs(60));
    assert!(st.success(), "job exit {st} (log {})", log.display());
    dlq.drain();
    scores.drain();
    assert_eq!(dlq.recs.len(), bad.len());
    assert_eq!(scores_in(&scores.recs), good_n);
    for (r, (bytes, kind)) in dlq.recs.iter().zip(&bad) {
        let h = |k: &str| {
            r.headers
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                .unwrap_or_default()
        };
        assert_eq!(&r.payload, bytes, "original bytes");
        assert_eq!(h("dlq.kind"), *kind);
        assert!(
            h("dlq.reason").starts_with(&format!("{kind}: ")),
            "{}",
            h("dlq.reason")
        );
        eprintln!(
            "dlq: {}",
            h("dlq.reason").chars().take(120).collect::<String>()
        );
    }
}

/// (5) Two instances in one group, each with two scorer loops, one SIGKILLed
/// and not restarted: the other takes over its partitions and nothing is lost. Budgets never bind here
/// (max_per_fault_domain large) so the decision ids do not depend on how the
/// scores of different partitions interleave.
/// A policy whose hosts do not influence each other: no budget, rate limit,
/// common-cause guard or circuit breaker binds, and no record counts as stale.
/// With several partitions the decider sees the hosts of a cluster in another
/// interleaving than the in-process pipeline, and this test replays two days
/// of fleet time in seconds, so a few seconds of takeover are hours of fleet
/// time: with the coupling guards on, which decisions are taken legitimately
/// depends on the interleaving (docs/streaming.md, "Ordering caveat"). The
/// property under test here is "nothing lost across a takeover".
const UNCOUPLED_POLICY: &str = "[policy]
max_per_fault_domain = 1000
max_per_update_domain = 1000
max_per_availability_set = 1000
evacuations_per_hour = 1000000.0
evacuation_burst = 1000000
common_cause_min_hosts = 1000000
stale_after_ms = 1000000000000
max_missing_share = 1.0
max_hot_share = 1.0
max_hot_share_jump = 1.0
";

#[test]
fn survivor_takes_over_from_a_killed_instance() {
    init_tracing();
    let names = JobNames::new("takeover");
    let recs = sim_records(sim_config(60, 2.0, 5)).unwrap();
    let pcfg: PipelineConfig = toml::from_str(UNCOUPLED_POLICY).unwrap();
    let expected = pipeline_decisions(&recs, pcfg);
    assert!(expected.len() >= 3);
    let parts = 3;
    create_topic(&names.telemetry, parts);
    let dir = tmpdir();
    // two scorer loops per instance: four scorer members for three partitions
    let cfg = names.write_config(
        &dir,
        parts,
        &format!("scorer_loops = 2\n{UNCOUPLED_POLICY}"),
    );
    let log = dir.join(format!("{}.log", names.id));
    let tel = names.telemetry.clone();
    let fid = format!("feed-{}", names.id);
    let input = wire(&recs);
    let feeder =
        TxnFeeder::new(&fid).stream_in_background(&tel, input, 1000, Duration::from_millis(100));
    let mut alerts = Collector::new(&names.alerts, parts);
    let mut a = spawn_job(&cfg, "a", &log);
    let mut b = spawn_job(&cfg, "b", &log);
    alerts.wait_for(1, Duration::from_secs(90), "first alert");
    alerts.poll_for(Duration::from_millis(1500));
    sigkill(&mut b);
    eprintln!("b killed at {} alerts", alerts.recs.len());
    feeder.join().unwrap();
    alerts.wait_for(
        expected.len(),
        Duration::from_secs(120),
        "alerts after takeover",
    );
    let st = sigterm_and_wait(&mut a, Duration::from_secs(60));
    assert!(st.success(), "job exit {st} (log {})", log.display());
    alerts.drain();
    let (got, total) = decisions_by_id(&alerts.recs);
    assert_eq!(total, expected.len(), "every decision exactly once");
    for d in &expected {
        assert!(got.contains_key(&d.id), "decision {} missing", d.id);
    }
}
