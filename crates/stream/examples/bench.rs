//! Throughput/latency benchmark of the streaming loop against a real broker.
//!
//! ```text
//! scripts/with-kafka.sh cargo run --release -p waterbear-stream --example bench -- --records 2000000
//! ```
//! Phases (each on fresh, uniquely named topics/groups):
//! 1. produce M records (fixed-size payloads) into the input topic;
//! 2. consume-only ceiling: a bare rdkafka consumer (read_committed, same
//!    fetch settings as the job) reads all M records, once a record per
//!    `poll` and once in batches (`FetchQueue`, as the job reads); the ratio
//!    is to the higher of the two;
//! 3. end to end: the job (`run_with_metrics`, trivial stateless transform,
//!    exactly-once transactions) consumes the M records and produces M
//!    outputs; rate = M / time until its last transaction committed;
//! 4. latency: a paced producer (`--rate` records/s for `--latency-secs`)
//!    stamps each payload with its send time; a read_committed reader of the
//!    outputs computes send -> output visible (committed) latency.
//!
//! Uses the tuning of `pipelines/streaming.toml` unless overridden with
//! `--producer k=v`, `--consumer k=v`, `--batch-records`, `--batch-ms`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use waterbear_stream::echo::EchoUpper;
use waterbear_stream::{Metrics, StreamConfig, run_with_metrics};

#[derive(Parser, Debug)]
struct Args {
    /// Records for the throughput phases.
    #[arg(long, default_value_t = 2_000_000)]
    records: usize,
    /// Payload size in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: usize,
    /// Input/output partitions.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Records per transaction (overrides the config).
    #[arg(long)]
    batch_records: Option<usize>,
    /// Max transaction duration in ms (overrides the config).
    #[arg(long)]
    batch_ms: Option<u64>,
    /// Extra producer setting k=v (repeatable).
    #[arg(long)]
    producer: Vec<String>,
    /// Extra consumer setting k=v (repeatable).
    #[arg(long)]
    consumer: Vec<String>,
    /// Use the stateful echo (per-key counter written to the state topic).
    #[arg(long)]
    stateful: bool,
    /// Paced rate for the latency phase (records/s).
    #[arg(long, default_value_t = 50_000)]
    rate: u64,
    /// Duration of the latency phase.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Base config file.
    #[arg(long, default_value = "pipelines/streaming.toml")]
    config: String,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn kv(s: &str) -> (String, String) {
    let (k, v) = s.split_once('=').expect("k=v");
    (k.to_string(), v.to_string())
}

fn config_for(args: &Args, tag: &str, bootstrap: &str) -> waterbear_stream::StreamParams {
    // The shipped file also holds the waterbear job's sections.
    let text = std::fs::read_to_string(&args.config).expect("config file");
    let mut c =
        StreamConfig::from_toml_str_skipping(&text, &args.config, waterbear_stream::JOB_SECTIONS)
            .expect("config");
    let id = format!("bench-{tag}-{}", now_us() % 1_000_000_000);
    c.kafka.brokers = bootstrap.to_string();
    c.kafka.group_id = format!("g-{id}");
    c.kafka.transactional_id_prefix = format!("tx-{id}");
    c.kafka.instance_id = "0".into();
    c.topics.telemetry = format!("in-{id}");
    c.topics.alerts = format!("out-{id}");
    c.topics.dlq = format!("dlq-{id}");
    c.topics.state = format!("state-{id}");
    c.partitions.telemetry = args.partitions;
    c.partitions.alerts = args.partitions;
    c.partitions.dlq = 1;
    c.metrics.listen = String::new();
    if let Some(n) = args.batch_records {
        c.batch.max_records = n;
    }
    if let Some(ms) = args.batch_ms {
        c.batch.max_ms = ms;
    }
    for s in &args.producer {
        let (k, v) = kv(s);
        c.kafka.producer.insert(k, v);
    }
    for s in &args.consumer {
        let (k, v) = kv(s);
        c.kafka.consumer.insert(k, v);
    }
    c.validate().expect("valid config")
}

fn input_producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .create()
        .expect("producer")
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, key: &[u8], payload: &[u8]) {
    let mut rec = BaseRecord::to(topic).key(key).payload(payload);
    loop {
        match p.send(rec) {
            Ok(()) => return,
            Err((_, r)) => {
                rec = r;
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }
}

fn reader(
    bootstrap: &str,
    topic: &str,
    partitions: i32,
    consumer_extra: &[(String, String)],
) -> BaseConsumer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", bootstrap)
        .set("group.id", format!("reader-{topic}"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        // As the job's consumers, so the ceiling is not held back by
        // librdkafka's 1 s default either.
        .set(
            "fetch.queue.backoff.ms",
            waterbear_stream::FETCH_QUEUE_BACKOFF_MS,
        );
    for (k, v) in consumer_extra {
        cfg.set(k, v);
    }
    let c: BaseConsumer = cfg.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

async fn ensure(params: &waterbear_stream::StreamParams) {
    waterbear_stream::ensure_topics(params)
        .await
        .expect("topics");
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() {
    // As `waterbear stream` does: librdkafka's buffers stay mapped
    // (waterbear_stream::keep_c_heap_mapped), in the ceiling passes too.
    waterbear_stream::job_runtime(true)
        .expect("tokio runtime")
        .block_on(bench());
}

async fn bench() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let args = Args::parse();
    let bootstrap =
        std::env::var("KAFKA_BOOTSTRAP").expect("set KAFKA_BOOTSTRAP or use scripts/with-kafka.sh");
    let m = args.records;
    println!(
        "bench: {m} records x {} B, {} keys, {} partitions, broker {bootstrap}",
        args.payload_bytes, args.keys, args.partitions
    );

    // Phase 1: produce.
    let params = config_for(&args, "tp", &bootstrap);
    println!(
        "job tuning: batch.max_records={} batch.max_ms={} producer={:?} consumer={:?}",
        params.batch_max_records,
        params.batch_max_time.as_millis(),
        params.producer,
        params.consumer
    );
    ensure(&params).await;
    let consumer_extra: Vec<(String, String)> = params
        .consumer
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let keys: Vec<Vec<u8>> = (0..args.keys)
        .map(|i| format!("host-{i:06}").into_bytes())
        .collect();
    let payload: Vec<u8> = (0..args.payload_bytes)
        .map(|i| b'a' + (i % 26) as u8)
        .collect();
    let p = input_producer(&bootstrap);
    let t0 = Instant::now();
    for i in 0..m {
        send(&p, &params.telemetry_topic, &keys[i % keys.len()], &payload);
    }
    p.flush(Duration::from_secs(300)).expect("flush");
    let produce_s = t0.elapsed().as_secs_f64();
    println!(
        "produce:            {:>10.0} records/s ({m} in {produce_s:.2}s)",
        m as f64 / produce_s
    );

    // Phase 2: consume-only ceiling.
    let c = reader(
        &bootstrap,
        &params.telemetry_topic,
        args.partitions,
        &consumer_extra,
    );
    let t0 = Instant::now();
    let mut n = 0usize;
    let mut first: Option<Instant> = None;
    while n < m {
        if let Some(Ok(_msg)) = c.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            n += 1;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "ceiling read stalled at {n}"
        );
    }
    let ceiling_s = t0.elapsed().as_secs_f64();
    let polled = m as f64 / ceiling_s;
    println!("consume-only (poll):  {polled:>10.0} records/s ({m} in {ceiling_s:.2}s)");
    drop(c);
    // Again in batches, as the job reads (`FetchQueue`); the ratio is to
    // the higher of the two.
    let c = reader(
        &bootstrap,
        &params.telemetry_topic,
        args.partitions,
        &consumer_extra,
    );
    let mut q = waterbear_stream::FetchQueue::new(&c, 1024);
    let parts: Vec<i32> = (0..args.partitions).collect();
    assert!(q.route(&c, &params.telemetry_topic, &parts).is_empty());
    let t0 = Instant::now();
    let mut n = 0usize;
    while n < m {
        let _ = c.poll(Duration::ZERO);
        q.fill(Duration::from_millis(10));
        n += q.messages().filter(|f| f.record().is_ok()).count();
        assert!(
            t0.elapsed() < Duration::from_secs(600),
            "batch ceiling read stalled at {n}"
        );
    }
    let batch_s = t0.elapsed().as_secs_f64();
    let batched = m as f64 / batch_s;
    println!("consume-only (batch): {batched:>10.0} records/s ({m} in {batch_s:.2}s)");
    drop(q);
    drop(c);
    let ceiling = polled.max(batched);

    // Phase 3: end to end through the job.
    let metrics = Metrics::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let transform = if args.stateful {
        EchoUpper::new()
    } else {
        EchoUpper::stateless()
    };
    let t0 = Instant::now();
    let job = tokio::spawn(run_with_metrics(
        params.clone(),
        transform,
        async {
            let _ = rx.await;
        },
        metrics.clone(),
    ));
    let mut first_commit: Option<(Instant, u64)> = None;
    loop {
        let done = metrics.records_in.get();
        if done > 0 && first_commit.is_none() {
            first_commit = Some((Instant::now(), done));
        }
        if done as usize >= m {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "job stalled at {done}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let e2e_s = t0.elapsed().as_secs_f64();
    let (fc_t, fc_n) = first_commit.unwrap();
    let steady = (m as u64 - fc_n) as f64 / fc_t.elapsed().as_secs_f64();
    let e2e = m as f64 / e2e_s;
    tx.send(()).unwrap();
    let summary = job.await.unwrap().expect("job");
    let txns = summary.committed;
    println!(
        "end-to-end (EOS):   {e2e:>10.0} records/s ({m} in {e2e_s:.2}s incl. group join+restore; steady state {steady:.0}/s; {txns} transactions)"
    );
    println!(
        "ratio e2e/ceiling:  {:>10.2} (steady state {:.2})",
        e2e / ceiling,
        steady / ceiling
    );

    // Phase 3b (stateful): restart the job on the same group and measure
    // how long restoring the whole state topic takes (recovery time).
    if args.stateful {
        let metrics = Metrics::new();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let t0 = Instant::now();
        let job = tokio::spawn(run_with_metrics(
            params.clone(),
            EchoUpper::new(),
            async {
                let _ = rx.await;
            },
            metrics.clone(),
        ));
        while metrics.restore_seconds.get_sample_count() == 0 {
            assert!(
                t0.elapsed() < Duration::from_secs(300),
                "restore did not finish"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let restore_s = metrics.restore_seconds.get_sample_sum();
        let to_restored = t0.elapsed().as_secs_f64();
        tx.send(()).unwrap();
        job.await.unwrap().expect("job");
        let c = reader(
            &bootstrap,
            &params.state_topic,
            args.partitions,
            &consumer_extra,
        );
        let mut state_records = 0i64;
        for part in 0..args.partitions {
            let (lo, hi) = c
                .fetch_watermarks(&params.state_topic, part, Duration::from_secs(10))
                .unwrap();
            state_records += hi - lo;
        }
        println!(
            "state restore:      {restore_s:.2}s for a state topic of ~{state_records} records (incl. txn markers) over {} partitions; job start -> restored {to_restored:.2}s",
            args.partitions
        );
    }

    // Phase 4: latency under a paced load.
    let lparams = config_for(&args, "lat", &bootstrap);
    ensure(&lparams).await;
    let metrics = Metrics::new();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let transform = if args.stateful {
        EchoUpper::new()
    } else {
        EchoUpper::stateless()
    };
    let job = tokio::spawn(run_with_metrics(
        lparams.clone(),
        transform,
        async {
            let _ = rx.await;
        },
        metrics.clone(),
    ));
    // Wait until the job has its partitions (restore done) before timing.
    let t0 = Instant::now();
    while metrics.assigned_partitions.get() < args.partitions as i64
        || metrics.restore_seconds.get_sample_count() == 0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "job did not get its partitions"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let total = (args.rate * args.latency_secs) as usize;
    let out_topic = lparams.alerts_topic.clone();
    let parts = args.partitions;
    let bs = bootstrap.clone();
    let extra = consumer_extra.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<()>();
    let collector = std::thread::spawn(move || {
        let c = reader(&bs, &out_topic, parts, &extra);
        // Warm-up: the first output (of one warm-up record) proves the whole
        // path is connected; only then does the timed, paced load start.
        loop {
            if let Some(Ok(_)) = c.poll(Duration::from_millis(50)) {
                break;
            }
        }
        ready_tx.send(()).unwrap();
        let mut lat = Vec::with_capacity(total);
        let end = Instant::now() + Duration::from_secs(120);
        while lat.len() < total && Instant::now() < end {
            if let Some(Ok(msg)) = c.poll(Duration::from_millis(50)) {
                let now = now_us();
                let p = msg.payload().unwrap_or_default();
                let ts: u64 = std::str::from_utf8(&p[..16]).unwrap().parse().unwrap();
                lat.push(now.saturating_sub(ts));
            }
        }
        lat
    });
    let p = input_producer(&bootstrap);
    let warm = format!("{:016}", now_us());
    send(&p, &lparams.telemetry_topic, b"warmup", warm.as_bytes());
    p.flush(Duration::from_secs(30)).unwrap();
    ready_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("warm-up output not seen");
    let pace_start = Instant::now();
    let mut buf = payload.clone();
    for i in 0..total {
        let due = pace_start + Duration::from_secs_f64(i as f64 / args.rate as f64);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let ts = format!("{:016}", now_us());
        buf[..16].copy_from_slice(ts.as_bytes());
        send(&p, &lparams.telemetry_topic, &keys[i % keys.len()], &buf);
    }
    p.flush(Duration::from_secs(60)).unwrap();
    let mut lat = collector.join().unwrap();
    tx.send(()).unwrap();
    job.await.unwrap().expect("job");
    lat.sort_unstable();
    println!(
        "latency @ {} rec/s: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} of {total} outputs seen; produce->committed output visible)",
        args.rate,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0),
        lat.len()
    );
}
