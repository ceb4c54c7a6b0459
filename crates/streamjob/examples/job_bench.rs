//! Throughput and latency of the REAL waterbear job (scorer + decider, both
//! exactly-once loops in this process) against a broker, next to the
//! bare-consumer ceiling.
//!
//! ```text
//! scripts/with-kafka.sh cargo run --release -p waterbear-streamjob --example job_bench -- --records 1000000
//! ```
//! 1. produce: the simulator's telemetry (`--wire json|binary`, key = host id) into a
//!    fresh telemetry topic;
//! 2. ceiling: a bare read_committed consumer reads it all (and again after
//!    phase 3: the ratio to the higher of the two is the one to quote);
//! 3. end to end: the job (role both) from start until the scorer has
//!    committed every telemetry record and the decider every score batch the
//!    scorer committed (i.e. every telemetry record went through
//!    validate -> features -> detector -> scores topic -> policy, two
//!    transactions);
//!    With `--restart`, 3b. recovery: the job started again on the same group,
//!    timed until every partition is assigned and its state read back;
//! 4. latency: simulator records paced at `--rate` for `--latency-secs`;
//!    time from send to the record's score (stage 1) and to its decision
//!    (stage 2) being visible to a read_committed reader.
//!
//! Phases 2 and 3 also print the CPU they used, per record: this process's
//! (`/proc/self/stat`), the broker's (`KAFKA_PID`, else the pid file in
//! `KAFKA_RUN_DIR` that `scripts/kafka.sh` writes) and the whole machine's
//! (`/proc/stat`), so a ratio can be read as "how much more work per record".

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::Producer;
use rdkafka::{Offset, TopicPartitionList};
use waterbear_policy::Decision;
use waterbear_sim::{Fleet, SimConfig};
use waterbear_stream::{FetchQueue, Metrics};
use waterbear_streamjob::cli::Wire;
use waterbear_streamjob::simulate::{send, telemetry_producer};
use waterbear_streamjob::{JobConfig, Role, ScoreBatch, run_job_with_metrics};

/// As in the `waterbear` binary.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
struct Args {
    /// Records for the throughput phases (approximately: whole fleet steps).
    #[arg(long, default_value_t = 1_000_000)]
    records: usize,
    /// Hosts of the simulated fleet.
    #[arg(long, default_value_t = 10_000)]
    hosts: usize,
    /// Telemetry and scores partitions.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Paced rate of the latency phase.
    #[arg(long, default_value_t = 20_000)]
    rate: u64,
    /// Duration of the latency phase.
    #[arg(long, default_value_t = 10)]
    latency_secs: u64,
    /// Base config.
    #[arg(long, default_value = "pipelines/streaming.toml")]
    config: String,
    /// Telemetry encoding the producer writes.
    #[arg(long, value_enum, default_value_t = Wire::Json)]
    wire: Wire,
    /// Stages of the end-to-end phase: `both` (the job), or `scorer` alone
    /// (stage 1's own rate, for finding where the time goes). The latency
    /// phase always runs both: it times decisions.
    #[arg(long, value_enum, default_value_t = Role::Both)]
    role: Role,
    /// After the end-to-end phase, start the job again on its group and
    /// time the restart: group join and state restore (phase 3b).
    #[arg(long)]
    restart: bool,
}

/// CPU time used so far, in clock ticks (USER_HZ): this process, the broker
/// (when its pid is known) and the machine (busy, total over all cores).
#[derive(Clone, Copy, Default)]
struct CpuSample {
    this: u64,
    broker: Option<u64>,
    busy: u64,
    all: u64,
}

fn broker_pid() -> Option<u32> {
    if let Ok(p) = std::env::var("KAFKA_PID") {
        return p.trim().parse().ok();
    }
    let dir = std::env::var("KAFKA_RUN_DIR").ok()?;
    std::fs::read_to_string(format!("{dir}/kafka.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// utime + stime of a process (fields 14 and 15 of `/proc/PID/stat`, counted
/// after the parenthesised command name, which may contain spaces).
fn proc_ticks(pid: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `None` without a readable `/proc` (then no CPU line is printed rather
/// than zeros that look measured).
fn cpu_sample(broker: Option<u32>) -> Option<CpuSample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    let all: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some(CpuSample {
        this: proc_ticks("self")?,
        broker: broker.and_then(|p| proc_ticks(&p.to_string())),
        busy: all - idle,
        all,
    })
}

/// One line: CPU per record of a phase, split by who used it.
fn cpu_line(
    phase: &str,
    a: Option<CpuSample>,
    b: Option<CpuSample>,
    records: usize,
    secs: f64,
) -> String {
    let (Some(a), Some(b)) = (a, b) else {
        return format!("cpu {phase}: unavailable (no readable /proc)");
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let us = |ticks: u64| ticks as f64 / hz * 1e6 / records as f64;
    let broker = match (a.broker, b.broker) {
        (Some(x), Some(y)) => format!("{:.2}", us(y - x)),
        _ => "?".into(),
    };
    let other = match (a.broker, b.broker) {
        (Some(x), Some(y)) => format!(
            "{:.2}",
            us((b.busy - a.busy).saturating_sub(b.this - a.this + y - x))
        ),
        _ => "?".into(),
    };
    format!(
        "cpu {phase}: {:.2} core-us/record (this process {:.2}, broker {broker}, rest of the machine {other}); machine busy {:.0} % of {:.1} s",
        us(b.busy - a.busy),
        us(b.this - a.this),
        100.0 * (b.busy - a.busy) as f64 / (b.all - a.all).max(1) as f64,
        secs,
    )
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn job_config(args: &Args, tag: &str, bootstrap: &str) -> JobConfig {
    let mut c = JobConfig::load(args.config.as_ref(), Some("0")).expect("config");
    let id = format!("jb-{tag}-{}", now_us() % 1_000_000_000);
    let s = &mut c.stream;
    s.kafka.brokers = bootstrap.to_string();
    s.kafka.group_id = format!("g-{id}");
    s.kafka.transactional_id_prefix = format!("tx-{id}");
    s.topics.telemetry = format!("in-{id}");
    s.topics.alerts = format!("out-{id}");
    s.topics.dlq = format!("dlq-{id}");
    s.topics.state = format!("state-{id}");
    s.partitions.telemetry = args.partitions;
    s.partitions.alerts = args.partitions;
    s.partitions.dlq = 1;
    s.metrics.listen = String::new();
    c.job.scores_topic = format!("scores-{id}");
    c.job.scores_partitions = args.partitions;
    c.job.decider_state_topic = format!("dstate-{id}");
    c.params = c.stream.validate().expect("valid");
    c
}

/// The job (`role`) on its own task with fresh metrics; send on the channel
/// to stop it.
fn spawn_job(
    cfg: &JobConfig,
    role: Role,
) -> (
    Metrics,
    Metrics,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<Result<(), waterbear_streamjob::JobError>>,
) {
    let (sm, dm) = (Metrics::new(), Metrics::new());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let job = tokio::spawn(run_job_with_metrics(
        cfg.clone(),
        role,
        async {
            let _ = rx.await;
        },
        sm.clone(),
        dm.clone(),
    ));
    (sm, dm, tx, job)
}

fn reader(c: &JobConfig, topic: &str, partitions: i32) -> BaseConsumer {
    let mut cfg = ClientConfig::new();
    cfg.set("bootstrap.servers", &c.params.brokers)
        .set("group.id", format!("reader-{topic}"))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        // As the job's consumers, so the ceiling is not held back by
        // librdkafka's 1 s default either.
        .set(
            "fetch.queue.backoff.ms",
            waterbear_stream::FETCH_QUEUE_BACKOFF_MS,
        );
    for (k, v) in &c.params.consumer {
        cfg.set(k, v);
    }
    let cons: BaseConsumer = cfg.create().expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    cons.assign(&tpl).unwrap();
    cons
}

/// Phase 2 (and again after phase 3): a bare read_committed consumer reads
/// the `m` telemetry records, once a record per `poll` and once in batches
/// (a [`FetchQueue`], as the job reads); prints both rates and returns the
/// higher.
fn ceiling_pass(cfg: &JobConfig, partitions: i32, m: usize, bpid: Option<u32>, what: &str) -> f64 {
    let topic = &cfg.params.telemetry_topic;
    let c = reader(cfg, topic, partitions);
    let cpu0 = cpu_sample(bpid);
    let t0 = Instant::now();
    let mut n = 0;
    while n < m {
        if let Some(Ok(_)) = c.poll(Duration::from_millis(100)) {
            n += 1;
        }
        assert!(t0.elapsed() < Duration::from_secs(600));
    }
    let s = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_sample(bpid);
    let polled = m as f64 / s;
    println!("consume-only {what} (poll):  {polled:>9.0} records/s");
    println!("{}", cpu_line(&format!("{what} (poll)"), cpu0, cpu1, m, s));
    drop(c);

    let c = reader(cfg, topic, partitions);
    let mut q = FetchQueue::new(&c, 1024);
    let parts: Vec<i32> = (0..partitions).collect();
    assert!(
        q.route(&c, topic, &parts).is_empty(),
        "every partition routed"
    );
    let cpu0 = cpu_sample(bpid);
    let t0 = Instant::now();
    let mut n = 0;
    while n < m {
        // Serves the consumer queue (errors, statistics), as the job does.
        let _ = c.poll(Duration::ZERO);
        q.fill(Duration::from_millis(10));
        n += q.messages().filter(|f| f.record().is_ok()).count();
        assert!(t0.elapsed() < Duration::from_secs(600));
    }
    let s = t0.elapsed().as_secs_f64();
    let cpu1 = cpu_sample(bpid);
    let batched = m as f64 / s;
    println!("consume-only {what} (batch): {batched:>9.0} records/s");
    println!("{}", cpu_line(&format!("{what} (batch)"), cpu0, cpu1, m, s));
    drop(q);
    polled.max(batched)
}

fn percentile(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn sim(hosts: usize, records: usize, failure_fraction: f64, seed: u64) -> Fleet {
    let days = (records as f64 / hosts as f64 / 144.0).max(0.01);
    Fleet::new(
        SimConfig {
            hosts,
            days,
            seed,
            failure_fraction,
            ..Default::default()
        }
        .check()
        .expect("sim config"),
    )
}

async fn wait_assigned(m: &[&Metrics], parts: i64) {
    let t0 = Instant::now();
    while m
        .iter()
        .any(|m| m.assigned_partitions.get() < parts || m.restore_seconds.get_sample_count() == 0)
    {
        assert!(t0.elapsed() < Duration::from_secs(90), "no partitions");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
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

    // Phase 1: produce.
    let cfg = job_config(&args, "tp", &bootstrap);
    waterbear_stream::ensure_topics(&cfg.decider_params(true))
        .await
        .unwrap();
    waterbear_stream::ensure_topics(&cfg.scorer_params())
        .await
        .unwrap();
    let prod = telemetry_producer(&cfg.params).unwrap();
    let mut fleet = sim(args.hosts, args.records, 0.08, 42);
    let mut step = Vec::new();
    let mut m = 0usize;
    let t0 = Instant::now();
    while !fleet.done() && m < args.records {
        fleet.step(&mut step);
        for r in &step {
            send(&prod, &cfg.params.telemetry_topic, r, args.wire.into()).unwrap();
        }
        m += step.len();
    }
    prod.flush(Duration::from_secs(300)).unwrap();
    let s = t0.elapsed().as_secs_f64();
    println!(
        "bench: {m} simulated records ({} hosts), {} partitions, broker {bootstrap}",
        args.hosts, args.partitions
    );
    println!(
        "produce (incl. simulation): {:>9.0} records/s",
        m as f64 / s
    );

    // Phase 2: ceiling.
    let bpid = broker_pid();
    let ceiling = ceiling_pass(&cfg, args.partitions, m, bpid, "ceiling");
    // Phase 3: end to end.
    let cpu0 = cpu_sample(bpid);
    let t0 = Instant::now();
    let (sm, dm, tx, job) = spawn_job(&cfg, args.role);
    // Score batches are the scorer's committed "other" outputs.
    let batches = || sm.records_out.with_label_values(&["other"]).get();
    let decider = args.role != Role::Scorer;
    // Steady state: from the scorer's first committed transaction (group
    // joins and state restore excluded) to the end.
    let mut first: Option<(Instant, u64)> = None;
    // When the scorer had committed every record (the rest is the decider's
    // share of the last score batches).
    let mut scored: Option<Instant> = None;
    while (sm.records_in.get() as usize) < m || (decider && dm.records_in.get() < batches()) {
        if first.is_none() && sm.records_in.get() > 0 {
            first = Some((Instant::now(), sm.records_in.get()));
        }
        if scored.is_none() && sm.records_in.get() as usize >= m {
            scored = Some(Instant::now());
        }
        assert!(
            t0.elapsed() < Duration::from_secs(900),
            "stalled: scorer {} decider {} of {} batches",
            sm.records_in.get(),
            dm.records_in.get(),
            batches()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let t_end = Instant::now();
    let cpu1 = cpu_sample(bpid);
    let e2e_s = (t_end - t0).as_secs_f64();
    let e2e = m as f64 / e2e_s;
    tx.send(()).unwrap();
    job.await.unwrap().expect("job");
    println!(
        "end to end ({:?}, EOS): {e2e:>9.0} records/s ({m} in {e2e_s:.2}s incl. group joins; dlq {}; {} score batches)",
        args.role,
        sm.dlq.get(),
        batches()
    );
    println!("ratio e2e/ceiling:          {:>9.2}", e2e / ceiling);
    println!("{}", cpu_line("end to end", cpu0, cpu1, m, e2e_s));
    // The ceiling again: this host's speed drifts by tens of percent within
    // a minute, so a ratio is only as good as the ceiling next to it. The
    // ratio against the higher of the two is the one to quote.
    let after = ceiling_pass(&cfg, args.partitions, m, bpid, "ceiling after");
    let high = ceiling.max(after);
    println!("ratio e2e/higher ceiling:   {:>9.2}", e2e / high);
    if let Some((t1, n1)) = first {
        let steady = (m as u64 - n1) as f64 / (t_end - t1).as_secs_f64();
        println!(
            "steady state (from the first commit, {:.2}s after start): {steady:>9.0} records/s, ratio {:.2} (to the higher ceiling {:.2})",
            (t1 - t0).as_secs_f64(),
            steady / ceiling,
            steady / high
        );
    }
    // Replayed work shows here: an aborted transaction's records are read
    // and scored again, so a run with aborts or a late rebalance costs more
    // CPU a record than one without.
    let txns = |m: &Metrics, r: &str| m.transactions.with_label_values(&[r]).get();
    println!(
        "transactions: scorer {} committed, {} aborted, {} rebalances; decider {} committed, {} aborted, {} rebalances",
        txns(&sm, "committed"),
        txns(&sm, "aborted"),
        sm.rebalances.get(),
        txns(&dm, "committed"),
        txns(&dm, "aborted"),
        dm.rebalances.get()
    );
    if let Some(t2) = scored {
        println!(
            "scorer done {:.2}s after start, decider {:.2}s after the scorer",
            (t2 - t0).as_secs_f64(),
            (t_end - t2).as_secs_f64()
        );
    }

    // Phase 3b: recovery. The same job again on the same group and topics:
    // nothing is left to process, so this times what a restart costs before
    // the first record: group join, transactional ids fenced, and the state
    // topic that phase 3 wrote read back.
    if args.restart {
        let w = reader(&cfg, &cfg.stream.topics.state, 1);
        let states: i64 = (0..args.partitions)
            .map(|p| {
                let (lo, hi) = w
                    .fetch_watermarks(&cfg.stream.topics.state, p, Duration::from_secs(10))
                    .expect("state topic watermarks");
                hi - lo
            })
            .sum();
        drop(w);
        let t0 = Instant::now();
        let (sm, dm, tx, job) = spawn_job(&cfg, Role::Both);
        // Every loop restores once it has partitions (the gauge counts them
        // before their restore).
        let restored = |x: &Metrics, loops: usize| {
            x.assigned_partitions.get() == i64::from(args.partitions)
                && x.restore_seconds.get_sample_count()
                    >= loops.min(args.partitions as usize) as u64
        };
        while !(restored(&sm, cfg.job.scorer_loops) && restored(&dm, 1)) {
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "restart: no restore"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let ready = t0.elapsed().as_secs_f64();
        let (n, sum) = (
            sm.restore_seconds.get_sample_count(),
            sm.restore_seconds.get_sample_sum(),
        );
        tx.send(()).unwrap();
        job.await.unwrap().expect("job");
        println!(
            "restart: all partitions assigned and restored {ready:.2}s after start; scorer restore {:.3}s in {n} assignment(s) ({} hosts' state, {states} records in the state topic incl. transaction markers)",
            sum, args.hosts
        );
    }

    // Phase 4: latency.
    let cfg = job_config(&args, "lat", &bootstrap);
    let (sm, dm, tx, job) = spawn_job(&cfg, Role::Both);
    wait_assigned(&[&sm, &dm], args.partitions as i64).await;
    let sent: Arc<Mutex<HashMap<(String, i64), u64>>> = Arc::default();
    let total = (args.rate * args.latency_secs) as usize;
    let collectors: Vec<_> = [
        (cfg.job.scores_topic.clone(), true),
        (cfg.params.alerts_topic.clone(), false),
    ]
    .into_iter()
    .map(|(topic, is_scores)| {
        let sent = sent.clone();
        let cfg = cfg.clone();
        let parts = args.partitions;
        std::thread::spawn(move || {
            let c = reader(&cfg, &topic, parts);
            let mut lat = Vec::new();
            let end = Instant::now() + Duration::from_secs(args.latency_secs + 30);
            while Instant::now() < end && (!is_scores || lat.len() < total) {
                if let Some(Ok(msg)) = c.poll(Duration::from_millis(50)) {
                    let now = now_us();
                    let p = msg.payload().unwrap_or_default();
                    let keys: Vec<(String, i64)> = if is_scores {
                        let b = ScoreBatch::decode(p).unwrap();
                        b.scores.iter().map(|s| (s.host.to_owned(), s.ts)).collect()
                    } else {
                        let d: Decision = serde_json::from_slice(p).unwrap();
                        vec![(d.host_id, d.ts_ms)]
                    };
                    let sent = sent.lock().unwrap();
                    for k in &keys {
                        if let Some(t) = sent.get(k) {
                            lat.push(now.saturating_sub(*t));
                        }
                    }
                }
            }
            lat
        })
    })
    .collect();
    let prod = telemetry_producer(&cfg.params).unwrap();
    let hosts = (args.rate as usize / 10).max(100);
    let mut fleet = sim(hosts, total, 0.5, 7);
    let start = Instant::now();
    let mut i = 0usize;
    while !fleet.done() && i < total {
        fleet.step(&mut step);
        for r in &step {
            let due = start + Duration::from_secs_f64(i as f64 / args.rate as f64);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            sent.lock()
                .unwrap()
                .insert((r.host_id.clone(), r.ts_ms), now_us());
            send(&prod, &cfg.params.telemetry_topic, r, args.wire.into()).unwrap();
            i += 1;
        }
    }
    prod.flush(Duration::from_secs(60)).unwrap();
    let mut out = collectors.into_iter().map(|h| h.join().unwrap());
    let (mut ls, mut ld) = (out.next().unwrap(), out.next().unwrap());
    tx.send(()).unwrap();
    job.await.unwrap().expect("job");
    ls.sort_unstable();
    ld.sort_unstable();
    println!(
        "latency @ {} rec/s ({hosts} hosts): send -> score visible p50 {:.1} ms p99 {:.1} ms ({} of {i}); send -> decision visible p50 {:.1} ms p99 {:.1} ms ({} decisions)",
        args.rate,
        percentile(&ls, 0.5),
        percentile(&ls, 0.99),
        ls.len(),
        percentile(&ld, 0.5),
        percentile(&ld, 0.99),
        ld.len()
    );
}
