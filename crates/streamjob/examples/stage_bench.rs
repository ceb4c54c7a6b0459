//! The job's own CPU per record, without Kafka: the scorer and decider
//! transforms driven the way `waterbear_stream`'s loop drives them (process
//! every record, flush and write the state of every touched key per
//! transaction, the decider on the flushed score batches), single-threaded,
//! timed part by part. `job_bench` measures the same work end to end on a
//! broker; this one says which part of the job's CPU is which.
//!
//! ```sh
//! cargo run --release -p waterbear-streamjob --example stage_bench -- --hosts 5000 --steps 200
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use clap::Parser;
use waterbear_sim::{Fleet, SimConfig};
use waterbear_stream::{Record, Transform};
use waterbear_streamjob::JobConfig;
use waterbear_telemetry::{HostRecord, decode, encode_binary_to_vec};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Hosts of the simulated fleet.
    #[arg(long, default_value_t = 5000)]
    hosts: usize,
    /// Fleet steps (one record per host each) after the warm-up.
    #[arg(long, default_value_t = 200)]
    steps: usize,
    /// Fleet steps that fill the hosts' windows before timing.
    #[arg(long, default_value_t = 40)]
    warmup_steps: usize,
    /// Input partitions (records go to `hash(host) % partitions`).
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Records per transaction (state of every touched host written at its
    /// end). The default gives each host ~15 records a transaction, as in the
    /// job at ~300k records/s (two loops, 2,500 hosts and ~37k records each
    /// per 250 ms transaction).
    #[arg(long, default_value_t = 75_000)]
    txn_records: usize,
    /// Passes over the same records, each with a fresh scorer and decider;
    /// every figure is the best pass's (this host's speed varies by tens of
    /// percent from one second to the next).
    #[arg(long, default_value_t = 5)]
    repeat: usize,
    /// Job config (features, detector, policy, scores topic).
    #[arg(long, default_value = "pipelines/streaming.toml")]
    config: String,
}

fn partition_of(host: &str, n: i32) -> i32 {
    // Any stable spread will do here; Kafka's murmur2 is not needed.
    let h = host
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    (h % n as u32) as i32
}

struct Encoded {
    partition: i32,
    ts: i64,
    key: Vec<u8>,
    payload: Vec<u8>,
}

fn encoded(fleet: &mut Fleet, hosts: usize, steps: usize, partitions: i32) -> Vec<Encoded> {
    let mut out = Vec::with_capacity(hosts * steps);
    let mut step: Vec<HostRecord> = Vec::new();
    for _ in 0..steps {
        fleet.step(&mut step);
        for r in &step {
            out.push(Encoded {
                partition: partition_of(&r.host_id, partitions),
                ts: r.ts_ms,
                key: r.host_id.as_bytes().to_vec(),
                payload: encode_binary_to_vec(r),
            });
        }
    }
    out
}

fn record(e: &Encoded) -> Record<'_> {
    Record {
        partition: e.partition,
        offset: 0,
        timestamp_ms: Some(e.ts),
        key: Some(&e.key),
        payload: &e.payload,
    }
}

#[derive(Default, Clone, Copy)]
struct Times {
    decode: Duration,
    process: Duration,
    flush: Duration,
    state: Duration,
    state_bytes: usize,
    states: usize,
    decide: Duration,
    decider_state: Duration,
    batches: usize,
    batch_bytes: usize,
}

impl Times {
    fn min(&self, o: &Self) -> Self {
        Self {
            decode: self.decode.min(o.decode),
            process: self.process.min(o.process),
            flush: self.flush.min(o.flush),
            state: self.state.min(o.state),
            decide: self.decide.min(o.decide),
            decider_state: self.decider_state.min(o.decider_state),
            ..*self
        }
    }
}

fn per(d: Duration, n: usize) -> f64 {
    d.as_secs_f64() * 1e9 / n as f64
}

fn pass(cfg: &JobConfig, warm: &[Encoded], timed: &[Encoded], txn_records: usize) -> Times {
    let mut scorer = cfg.scorer();
    let mut decider = cfg.decider();
    for e in warm {
        let _ = scorer.process(&record(e));
    }
    for o in scorer.flush() {
        let _ = decider.process(&Record {
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: Some(&o.key),
            payload: &o.payload,
        });
    }

    let mut t = Times::default();
    // decode alone, for reference
    let t0 = Instant::now();
    for e in timed {
        std::hint::black_box(decode(&e.payload).expect("valid"));
    }
    t.decode = t0.elapsed();

    let mut dirty: HashSet<Vec<u8>> = HashSet::new();
    let mut dirty_clusters: HashSet<Vec<u8>> = HashSet::new();
    for chunk in timed.chunks(txn_records) {
        let t0 = Instant::now();
        let mut batches = Vec::new();
        for e in chunk {
            batches.extend(scorer.process(&record(e)));
            if !dirty.contains(e.key.as_slice()) {
                dirty.insert(e.key.clone());
            }
        }
        t.process += t0.elapsed();
        let t0 = Instant::now();
        batches.extend(scorer.flush());
        t.flush += t0.elapsed();
        let t0 = Instant::now();
        // As the stream loop: each key's state asked for with the next
        // key's prefetch hint first.
        let keys: Vec<Vec<u8>> = dirty.drain().collect();
        let mut keys = keys.iter().peekable();
        while let Some(k) = keys.next() {
            if let Some(next) = keys.peek() {
                scorer.prefetch_state(next);
            }
            if let Some(s) = scorer.state(k) {
                t.state_bytes += s.len();
                t.states += 1;
            }
        }
        t.state += t0.elapsed();

        let t0 = Instant::now();
        for o in &batches {
            t.batches += 1;
            t.batch_bytes += o.payload.len();
            if !dirty_clusters.contains(o.key.as_slice()) {
                dirty_clusters.insert(o.key.clone());
            }
            std::hint::black_box(decider.process(&Record {
                partition: 0,
                offset: 0,
                timestamp_ms: None,
                key: Some(&o.key),
                payload: &o.payload,
            }));
        }
        t.decide += t0.elapsed();
        // As the stream loop: sent payloads go back to the scorer.
        let t0 = Instant::now();
        for o in batches {
            scorer.recycle(o.payload);
        }
        t.flush += t0.elapsed();
        let t0 = Instant::now();
        for k in dirty_clusters.drain() {
            std::hint::black_box(decider.state(&k));
        }
        t.decider_state += t0.elapsed();
    }
    t
}

fn main() {
    let args = Args::parse();
    let cfg = JobConfig::load(Path::new(&args.config), Some("stage-bench")).expect("job config");
    let days = ((args.warmup_steps + args.steps) as f64 / 144.0).max(0.01);
    let mut fleet = Fleet::new(
        SimConfig {
            hosts: args.hosts,
            days: days + 0.01,
            seed: 42,
            failure_fraction: 0.08,
            ..Default::default()
        }
        .check()
        .expect("sim config"),
    );
    let warm = encoded(&mut fleet, args.hosts, args.warmup_steps, args.partitions);
    let timed = encoded(&mut fleet, args.hosts, args.steps, args.partitions);
    let n = timed.len();
    let bytes: usize = timed.iter().map(|e| e.payload.len()).sum();
    println!(
        "stage_bench: {} hosts, {n} records timed ({} bytes each on average), {} records per transaction",
        args.hosts,
        bytes / n.max(1),
        args.txn_records
    );

    let mut best: Option<Times> = None;
    for _ in 0..args.repeat.max(1) {
        let t = pass(&cfg, &warm, &timed, args.txn_records);
        best = Some(match best {
            None => t,
            Some(b) => b.min(&t),
        });
    }
    let t = best.expect("at least one pass");
    let total = t.process + t.flush + t.state + t.decide + t.decider_state;
    println!(
        "decode alone:             {:>7.0} ns/record",
        per(t.decode, n)
    );
    println!(
        "scorer process:           {:>7.0} ns/record (decode, checks, features, detector, batching)",
        per(t.process, n)
    );
    println!(
        "scorer flush:             {:>7.0} ns/record",
        per(t.flush, n)
    );
    println!(
        "scorer state:             {:>7.0} ns/record ({} states of {} bytes on average, {:.0} bytes/record)",
        per(t.state, n),
        t.states,
        t.state_bytes / t.states.max(1),
        t.state_bytes as f64 / n as f64
    );
    println!(
        "decider:                  {:>7.0} ns/record ({} batches, {:.0} bytes/record)",
        per(t.decide, n),
        t.batches,
        t.batch_bytes as f64 / n as f64
    );
    println!(
        "decider state:            {:>7.0} ns/record",
        per(t.decider_state, n)
    );
    println!(
        "total (without Kafka):    {:>7.0} ns/record = {:.0} records/s on one core",
        per(total, n),
        n as f64 / total.as_secs_f64()
    );
}
