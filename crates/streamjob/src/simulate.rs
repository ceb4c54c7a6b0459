//! `waterbear simulate`: the simulator's telemetry to Kafka (key = host id,
//! value = the wire encoding) and/or an NDJSON file, rate-limited.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use waterbear_sim::{Fleet, SimConfig};
use waterbear_stream::StreamParams;
use waterbear_telemetry::{HostRecord, WireFormat, encode_to_vec};

/// What to simulate and where to send it.
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    /// Fleet settings (hosts, days, seed, ...).
    pub sim: SimConfig,
    /// Kafka target (brokers, telemetry topic, security settings).
    pub kafka: Option<StreamParams>,
    /// NDJSON file target.
    pub file: Option<PathBuf>,
    /// Records per second; 0 = as fast as possible.
    pub rate: u64,
    /// Encoding of the records sent to Kafka (the file is always NDJSON).
    pub wire: WireFormat,
}

/// A simulate failure.
#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    /// Bad fleet settings.
    #[error(transparent)]
    Sim(#[from] waterbear_sim::ConfigError),
    /// Kafka.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// File.
    #[error("writing telemetry file: {0}")]
    Io(#[from] std::io::Error),
}

/// The whole simulated telemetry, in order (for tests and file output).
pub fn sim_records(sim: SimConfig) -> Result<Vec<HostRecord>, SimulateError> {
    let mut fleet = Fleet::new(sim.check()?);
    let mut out = Vec::new();
    let mut step = Vec::new();
    while !fleet.done() {
        fleet.step(&mut step);
        out.append(&mut step);
    }
    Ok(out)
}

/// Token bucket: `rate` tokens/s, burst of 1/20 s worth.
struct Bucket {
    rate: f64,
    tokens: f64,
    burst: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Self {
        let rate = rate as f64;
        let burst = (rate / 20.0).max(1.0);
        Self {
            rate,
            tokens: burst,
            burst,
            last: Instant::now(),
        }
    }

    fn take(&mut self) {
        if self.rate <= 0.0 {
            return;
        }
        loop {
            let now = Instant::now();
            self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate)
                .min(self.burst);
            self.last = now;
            if self.tokens >= 1.0 {
                self.tokens -= 1.0;
                return;
            }
            std::thread::sleep(Duration::from_secs_f64((1.0 - self.tokens) / self.rate));
        }
    }
}

/// A producer for the telemetry topic (idempotent, so per-partition order holds).
pub fn telemetry_producer(p: &StreamParams) -> Result<BaseProducer, KafkaError> {
    let mut c = ClientConfig::new();
    for (k, v) in &p.extra {
        c.set(k, v);
    }
    c.set("bootstrap.servers", &p.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000");
    c.create()
}

/// Sends one record in `wire` format, waiting while the producer queue is full.
pub fn send(
    prod: &BaseProducer,
    topic: &str,
    rec: &HostRecord,
    wire: WireFormat,
) -> Result<(), KafkaError> {
    let bytes = wire.encode_to_vec(rec);
    send_raw(prod, topic, rec.host_id.as_bytes(), &bytes)
}

/// Sends raw bytes under `key`, waiting while the producer queue is full.
pub fn send_raw(
    prod: &BaseProducer,
    topic: &str,
    key: &[u8],
    bytes: &[u8],
) -> Result<(), KafkaError> {
    loop {
        match prod.send(BaseRecord::to(topic).key(key).payload(bytes)) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                prod.poll(Duration::from_millis(5));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Runs the simulation to the targets; returns the number of records.
pub fn simulate(opts: &SimulateOptions) -> Result<u64, SimulateError> {
    let mut fleet = Fleet::new(opts.sim.clone().check()?);
    let prod = match &opts.kafka {
        Some(p) => Some((telemetry_producer(p)?, p.telemetry_topic.clone())),
        None => None,
    };
    let mut file = match &opts.file {
        Some(path) => Some(std::io::BufWriter::new(std::fs::File::create(path)?)),
        None => None,
    };
    let mut bucket = Bucket::new(opts.rate);
    let mut step = Vec::new();
    let mut n = 0u64;
    let t0 = Instant::now();
    while !fleet.done() {
        fleet.step(&mut step);
        for rec in &step {
            bucket.take();
            if let Some((prod, topic)) = &prod {
                send(prod, topic, rec, opts.wire)?;
                if n % 1024 == 0 {
                    prod.poll(Duration::ZERO);
                }
            }
            if let Some(f) = &mut file {
                f.write_all(&encode_to_vec(rec))?;
                f.write_all(b"\n")?;
            }
            n += 1;
        }
    }
    if let Some((prod, _)) = &prod {
        prod.flush(Duration::from_secs(60))?;
    }
    if let Some(f) = &mut file {
        f.flush()?;
    }
    tracing::info!(
        records = n,
        secs = t0.elapsed().as_secs_f64(),
        "simulation sent"
    );
    Ok(n)
}
