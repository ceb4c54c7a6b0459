//! End-to-end tests against a real Kafka broker (`KAFKA_BOOTSTRAP`).
//! Run: `scripts/with-kafka.sh cargo test -p waterbear-stream`.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rand::Rng;
use waterbear_stream::{DLQ_REASON_HEADER, Metrics, run_with_metrics};

/// (1) N records in -> exactly the expected outputs, with the library API
/// in-process; graceful shutdown commits and returns the totals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_records_in_exact_outputs_out() {
    init_tracing();
    let names = Names::new("exact");
    let parts = 3;
    create_topic(&names.telemetry, parts);
    let ins = inputs("", 3000, 37);
    let p = producer();
    produce(&p, &names.telemetry, &ins);
    flush(&p);

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = Metrics::new();
    let job = tokio::spawn(run_with_metrics(
        names.params(parts, "solo"),
        waterbear_stream::echo::EchoUpper::new(),
        async {
            let _ = rx.await;
        },
        metrics.clone(),
    ));
    let alerts = names.alerts.clone();
    let outs = tokio::task::spawn_blocking(move || {
        let mut c = Collector::new(&alerts, parts);
        c.wait_for(3000, Duration::from_secs(90), "outputs");
        c.drain();
        c.recs
    })
    .await
    .unwrap();
    assert_exactly_once(&expected(&ins), &outs);

    tx.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.records_in, 3000);
    assert_eq!(summary.records_out, 3000);
    assert_eq!(summary.dlq, 0);
    let text = metrics.render();
    assert!(
        text.contains("waterbear_stream_records_in_total 3000"),
        "{text}"
    );
    assert!(
        text.contains("waterbear_stream_batch_latency_seconds_bucket"),
        "{text}"
    );
    // The records were in the topic before the job started: they came in
    // batches (`FetchQueue`), not one poll each.
    let (fills, taken) = (
        metrics.fetch_records.get_sample_count(),
        metrics.fetch_records.get_sample_sum(),
    );
    assert!(
        fills > 0 && taken / fills as f64 > 4.0,
        "{taken} records in {fills} fills"
    );
}

/// `batch.idle_ms`: a transaction is committed once no record has come for
/// that long, not only `batch.max_ms` after its first record. With max_ms 8 s
/// and idle_ms 50 ms, every transaction must be committed well under 8 s
/// after its first record (the job's own `batch_latency` histogram), and the
/// outputs arrive. Without the idle commit each would take at least 8 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_input_commits_the_open_transaction() {
    init_tracing();
    let names = Names::new("idle");
    let parts = 2;
    create_topic(&names.telemetry, parts);
    let text = names
        .config_toml(parts, 500, 8000)
        .replace("max_ms = 8000", "max_ms = 8000\nidle_ms = 50");
    let mut c = waterbear_stream::StreamConfig::from_toml_str(&text, "test").unwrap();
    c.kafka.instance_id = "solo".into();
    let params = c.validate().unwrap();
    assert_eq!(params.batch_idle, Some(Duration::from_millis(50)));

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let metrics = Metrics::new();
    let job = tokio::spawn(run_with_metrics(
        params,
        waterbear_stream::echo::EchoUpper::new(),
        async {
            let _ = rx.await;
        },
        metrics.clone(),
    ));
    // Two bursts, the second after the first's outputs are out: two
    // transactions at least, each closed by the silence after its burst.
    let p = producer();
    let alerts = names.alerts.clone();
    let mut c = tokio::task::spawn_blocking(move || Collector::new(&alerts, parts))
        .await
        .unwrap();
    let mut all = Vec::new();
    for burst in 0..2 {
        let ins = inputs(&format!("b{burst}"), 40, 7);
        produce(&p, &names.telemetry, &ins);
        flush(&p);
        all.extend(ins);
        let n = all.len();
        c = tokio::task::spawn_blocking(move || {
            c.wait_for(n, Duration::from_secs(60), "outputs");
            c
        })
        .await
        .unwrap();
    }
    let outs = tokio::task::spawn_blocking(move || {
        c.drain();
        c.recs
    })
    .await
    .unwrap();
    assert_exactly_once(&expected(&all), &outs);
    tx.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // Every transaction in the histogram's buckets up to 5 s (of 8 s).
    let h = prometheus::core::Metric::metric(&metrics.batch_latency);
    let h = h.get_histogram();
    let total = h.get_sample_count();
    assert!(total >= 2, "{total} transactions");
    let within_5s = h
        .get_bucket()
        .iter()
        .find(|b| b.upper_bound() == 5.0)
        .map(|b| b.cumulative_count())
        .unwrap();
    assert_eq!(
        within_5s,
        total,
        "some transactions were closed by batch.max_ms (8 s), not by the idle input; {} s in all",
        h.get_sample_sum()
    );
}

/// (3) Bad records -> DLQ with reason header and the original bytes; the
/// job keeps running and processes the good records after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_go_to_dlq_and_job_keeps_running() {
    init_tracing();
    let names = Names::new("dlq");
    let parts = 2;
    create_topic(&names.telemetry, parts);
    let mut all = Vec::new();
    let mut good = Vec::new();
    let mut bad = Vec::new();
    for i in 0..400 {
        let k = format!("k{}", i % 7).into_bytes();
        if i % 10 == 3 {
            let v = vec![0xff, 0xfe, i as u8, 0x80];
            bad.push((k.clone(), v.clone()));
            all.push((k, v));
        } else {
            let v = format!("ok-{i}").into_bytes();
            good.push((k.clone(), v.clone()));
            all.push((k, v));
        }
    }
    let p = producer();
    produce(&p, &names.telemetry, &all);
    flush(&p);

    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let job = tokio::spawn(waterbear_stream::run(
        names.params(parts, "solo"),
        waterbear_stream::echo::EchoUpper::new(),
        async {
            let _ = rx.await;
        },
    ));
    let (alerts, dlq, tel) = (
        names.alerts.clone(),
        names.dlq.clone(),
        names.telemetry.clone(),
    );
    let (good_n, bad_n) = (good.len(), bad.len());
    let (outs, dead) = tokio::task::spawn_blocking(move || {
        let mut c = Collector::new(&alerts, parts);
        let mut d = Collector::new(&dlq, 1);
        c.wait_for(good_n, Duration::from_secs(90), "alerts");
        d.wait_for(bad_n, Duration::from_secs(30), "dlq");
        c.drain();
        d.drain();
        (c.recs, d.recs)
    })
    .await
    .unwrap();
    assert_exactly_once(&expected(&good), &outs);
    assert_eq!(
        dead.len(),
        bad.len(),
        "every bad record exactly once in the DLQ"
    );
    let mut got: Vec<(Vec<u8>, Vec<u8>)> = dead
        .iter()
        .map(|r| (r.key.clone(), r.payload.clone()))
        .collect();
    let mut want = bad.clone();
    got.sort();
    want.sort();
    assert_eq!(got, want, "DLQ holds the original bytes and keys");
    for r in &dead {
        let h = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| String::from_utf8_lossy(v).to_string())
        };
        assert!(
            h(DLQ_REASON_HEADER).unwrap().contains("not UTF-8"),
            "{:?}",
            r.headers
        );
        assert_eq!(h("dlq.source.topic").as_deref(), Some(tel.as_str()));
        assert!(h("dlq.source.offset").unwrap().parse::<i64>().is_ok());
    }
    tx.send(()).unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), job)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(summary.dlq, bad.len() as u64);
}

/// (2) The job process is SIGKILLed at random points and restarted several
/// times: every expected output appears exactly once (read_committed), and
/// per-key state (the running count in each output) is never lost or
/// double-counted. The last run is stopped with SIGTERM and must exit 0.
#[test]
fn sigkill_restarts_lose_and_duplicate_nothing() {
    init_tracing();
    let names = Names::new("kill");
    let parts = 4;
    create_topic(&names.telemetry, parts);
    let dir = tmpdir();
    let cfg = names.write_config(&dir, parts, 300, 50);
    let log = dir.join(format!("{}.log", names.group));
    let n = 20_000;
    let ins = inputs("", n, 101);
    let p = producer();
    // Produce in the background while the job is being killed.
    let tel = names.telemetry.clone();
    let ins2 = ins.clone();
    let feeder = std::thread::spawn(move || {
        for chunk in ins2.chunks(1000) {
            produce(&p, &tel, chunk);
            flush(&p);
            std::thread::sleep(Duration::from_millis(30));
        }
    });

    let mut rng = rand::thread_rng();
    let mut c = Collector::new(&names.alerts, parts);
    let kills = 6;
    for round in 0..kills {
        let spawned = Instant::now();
        let before = c.recs.len();
        let mut child = spawn_job(&cfg, "k0", &log);
        // Recovery time: process start to its first committed output.
        while c.recs.len() == before && spawned.elapsed() < Duration::from_secs(60) {
            c.poll_for(Duration::from_millis(5));
        }
        eprintln!(
            "round {round}: restarted job's first committed output after {:?}",
            spawned.elapsed()
        );
        // Kill at a random point: once outputs have advanced by a random
        // amount (the job is then mid-way through a later transaction),
        // plus random jitter.
        let target = c.recs.len() + rng.gen_range(300..2500);
        let end = Instant::now() + Duration::from_secs(60);
        while c.recs.len() < target.min(n) && Instant::now() < end {
            c.poll_for(Duration::from_millis(20));
        }
        assert!(
            Instant::now() < end,
            "round {round}: no progress (log {})",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..150)));
        sigkill(&mut child);
        eprintln!("round {round}: killed at {} outputs", c.recs.len());
        if c.recs.len() >= n {
            break;
        }
    }
    feeder.join().unwrap();
    let mut child = spawn_job(&cfg, "k0", &log);
    c.wait_for(n, Duration::from_secs(120), "after restarts");
    let st = sigterm_and_wait(&mut child, Duration::from_secs(30));
    assert!(st.success(), "graceful shutdown exit status {st}");
    c.drain();
    assert_exactly_once(&expected(&ins), &c.recs);
}

/// (5) Two instances in one group; one is SIGKILLed; the other takes over
/// its partitions (after the session timeout) and nothing is lost or
/// duplicated.
#[test]
fn survivor_takes_over_partitions_of_killed_instance() {
    init_tracing();
    let names = Names::new("pair");
    let parts = 4;
    create_topic(&names.telemetry, parts);
    let dir = tmpdir();
    let cfg = names.write_config(&dir, parts, 200, 50);
    let log_a = dir.join(format!("{}-a.log", names.group));
    let log_b = dir.join(format!("{}-b.log", names.group));
    let ins = inputs("", 12_000, 64);
    let (first, second) = ins.split_at(6_000);
    let p = producer();

    let mut a = spawn_job(&cfg, "a", &log_a);
    let mut b = spawn_job(&cfg, "b", &log_b);
    let end = Instant::now() + Duration::from_secs(60);
    while group_members(&names.group) < 2 {
        assert!(
            Instant::now() < end,
            "both instances did not join the group"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    produce(&p, &names.telemetry, first);
    flush(&p);
    let mut c = Collector::new(&names.alerts, parts);
    c.wait_for(3_000, Duration::from_secs(60), "before kill");
    sigkill(&mut a);
    let killed = Instant::now();
    eprintln!("killed a at {} outputs", c.recs.len());
    produce(&p, &names.telemetry, second);
    flush(&p);
    c.wait_for(
        ins.len(),
        Duration::from_secs(120),
        "after kill (survivor b)",
    );
    eprintln!(
        "survivor produced every output {:?} after the kill",
        killed.elapsed()
    );
    c.drain();
    assert_exactly_once(&expected(&ins), &c.recs);
    let st = sigterm_and_wait(&mut b, Duration::from_secs(30));
    assert!(st.success());
    let log = std::fs::read_to_string(&log_b).unwrap();
    assert!(log.contains("partitions assigned"), "b log: {log}");
}
