//! Test support shared by the Kafka integration tests of `waterbear-stream`
//! and `waterbear-streamjob`: they run against the real broker at
//! `KAFKA_BOOTSTRAP` (start one with `scripts/with-kafka.sh`). Topic setup,
//! producers, a transactional feeder that survives broker restarts, a
//! read_committed collector, and job-process control (SIGKILL, SIGTERM with a
//! deadline). Dev-dependency only; not published.

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};

pub fn bootstrap() -> String {
    match std::env::var("KAFKA_BOOTSTRAP") {
        Ok(b) if !b.trim().is_empty() => b,
        _ => panic!(
            "KAFKA_BOOTSTRAP is not set. These integration tests need a real Kafka broker: \
             run them as `scripts/with-kafka.sh cargo test -p waterbear-stream` \
             (starts a throwaway broker), or set KAFKA_BOOTSTRAP=host:port of an existing cluster."
        ),
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn")),
        )
        .with_test_writer()
        .try_init();
}

/// Creates the input topic up front (so producers don't race the job).
pub fn create_topic(topic: &str, partitions: i32) {
    // On its own thread: callable from sync and async tests alike.
    let topic = topic.to_string();
    std::thread::spawn(move || create_topic_blocking(&topic, partitions))
        .join()
        .unwrap();
}

fn create_topic_blocking(topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<_> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let res = rt
        .block_on(admin.create_topics(
            &[NewTopic::new(topic, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        ))
        .unwrap();
    for r in res {
        match r {
            Ok(_) | Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err(e) => panic!("create topic: {e:?}"),
        }
    }
}

pub fn producer() -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("enable.idempotence", "true")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "300000")
        .create()
        .unwrap()
}

pub fn produce(
    p: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>,
    topic: &str,
    recs: &[(Vec<u8>, Vec<u8>)],
) {
    for (k, v) in recs {
        let mut rec = BaseRecord::to(topic).key(&k[..]).payload(&v[..]);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((e, r)) => {
                    assert!(
                        matches!(
                            e,
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull
                            )
                        ),
                        "produce: {e}"
                    );
                    rec = r;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
    }
}

pub fn flush(p: &ThreadedProducer<rdkafka::producer::DefaultProducerContext>) {
    p.flush(Duration::from_secs(120))
        .expect("flush input producer");
}

#[derive(Debug, Clone)]
pub struct Rec {
    pub partition: i32,
    pub offset: i64,
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// A read_committed reader of a whole topic that accumulates records.
pub struct Collector {
    consumer: BaseConsumer<waterbear_stream::job::QuietEof>,
    topic: String,
    pub recs: Vec<Rec>,
}

impl Collector {
    pub fn new(topic: &str, partitions: i32) -> Self {
        let consumer: BaseConsumer<_> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap())
            .set("group.id", format!("collector-{topic}"))
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("fetch.wait.max.ms", "20")
            .create_with_context(waterbear_stream::job::QuietEof)
            .unwrap();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).unwrap();
        Self {
            consumer,
            topic: topic.to_string(),
            recs: Vec::new(),
        }
    }

    /// Polls for up to `d`, returns how many records arrived.
    pub fn poll_for(&mut self, d: Duration) -> usize {
        let end = Instant::now() + d;
        let before = self.recs.len();
        while Instant::now() < end {
            match self.consumer.poll(Duration::from_millis(20)) {
                Some(Ok(m)) => {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default();
                    self.recs.push(Rec {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().unwrap_or_default().to_vec(),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        headers,
                    });
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | None => {}
                Some(Err(e)) => eprintln!("collector {}: {e}", self.topic),
            }
        }
        self.recs.len() - before
    }

    /// Polls until at least `n` records or the deadline (panics then).
    pub fn wait_for(&mut self, n: usize, deadline: Duration, what: &str) {
        self.wait_for_items(n, |r| r.len(), deadline, what);
    }

    /// Polls until `count(records so far) >= n` (e.g. items inside batched
    /// records) or the deadline (panics then).
    pub fn wait_for_items(
        &mut self,
        n: usize,
        count: impl Fn(&[Rec]) -> usize,
        deadline: Duration,
        what: &str,
    ) {
        let end = Instant::now() + deadline;
        loop {
            let have = count(&self.recs);
            if have >= n {
                return;
            }
            assert!(
                Instant::now() < end,
                "{what}: only {have} of {n} in {} after {deadline:?}",
                self.topic
            );
            self.poll_for(Duration::from_millis(100));
        }
    }

    /// Reads on until every partition is at its end (read_committed end =
    /// last stable offset), to catch duplicates after the expected count.
    pub fn drain(&mut self) {
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            self.poll_for(Duration::from_millis(200));
            let mut at_end = true;
            let positions = self.consumer.position().unwrap();
            for el in positions.elements() {
                let (_, hi) = self
                    .consumer
                    .fetch_watermarks(&self.topic, el.partition(), Duration::from_secs(10))
                    .unwrap();
                let pos = match el.offset() {
                    Offset::Offset(o) => o,
                    _ => 0,
                };
                // Control records (commit markers) occupy offsets: the
                // position can legitimately stop one short of hi.
                if hi - pos > 1 {
                    at_end = false;
                }
            }
            if at_end {
                self.poll_for(Duration::from_millis(300));
                return;
            }
            assert!(
                Instant::now() < end,
                "collector {} did not reach the end",
                self.topic
            );
        }
    }
}

/// A job process that is SIGKILLed when dropped (a failing test must not
/// leave it running), with the file its stderr (its log) goes to.
pub struct JobProc(pub Child, pub PathBuf);

impl JobProc {
    /// Spawns `cmd` with stderr appended to `log` and stdout discarded.
    pub fn spawn(cmd: &mut std::process::Command, log: &std::path::Path) -> Self {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        Self(child, log.to_path_buf())
    }
}

/// Lines of a job's log shown when a test fails while the job is alive.
const LOG_TAIL_LINES: usize = 80;

impl Drop for JobProc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
        // A failing test says why the job stalled: the job's own log is in a
        // temporary file that CI output would not show otherwise.
        if std::thread::panicking() {
            let text = match std::fs::read_to_string(&self.1) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("job log {} unreadable: {e}", self.1.display());
                    return;
                }
            };
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            eprintln!(
                "---- last {} lines of job log {} ----",
                lines.len() - from,
                self.1.display()
            );
            for l in &lines[from..] {
                eprintln!("{l}");
            }
            eprintln!("---- end of job log ----");
        }
    }
}

pub fn sigkill(job: &mut JobProc) {
    job.0.kill().unwrap(); // SIGKILL on unix
    job.0.wait().unwrap();
}

/// Produces input chunks exactly once even across a broker restart: each
/// chunk is one transaction; a failed chunk is aborted (invisible to the
/// read_committed job) and sent again, recreating the producer (same
/// transactional id, which fences the old one) when it is stuck.
pub struct TxnFeeder {
    id: String,
    producer: Option<ThreadedProducer<rdkafka::producer::DefaultProducerContext>>,
}

impl TxnFeeder {
    pub fn new(id: &str) -> Self {
        Self {
            id: id.to_string(),
            producer: None,
        }
    }

    fn producer(&mut self) -> &ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
        if self.producer.is_none() {
            let p: ThreadedProducer<_> = ClientConfig::new()
                .set("bootstrap.servers", bootstrap())
                .set("transactional.id", &self.id)
                .set("linger.ms", "5")
                .create()
                .unwrap();
            let end = Instant::now() + Duration::from_secs(120);
            while let Err(e) = p.init_transactions(Duration::from_secs(10)) {
                assert!(Instant::now() < end, "feeder init_transactions: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            self.producer = Some(p);
        }
        self.producer.as_ref().unwrap()
    }

    pub fn send_chunk(&mut self, topic: &str, recs: &[(Vec<u8>, Vec<u8>)]) {
        let end = Instant::now() + Duration::from_secs(180);
        loop {
            assert!(
                Instant::now() < end,
                "feeder could not deliver a chunk in 180s"
            );
            let p = self.producer();
            let attempt = (|| -> Result<(), rdkafka::error::KafkaError> {
                p.begin_transaction()?;
                produce(p, topic, recs);
                p.commit_transaction(Duration::from_secs(20))
            })();
            match attempt {
                Ok(()) => return,
                Err(e) => {
                    eprintln!("feeder: chunk failed ({e}); retrying with a fresh producer");
                    if let Some(p) = self.producer.take() {
                        let _ = p.abort_transaction(Duration::from_secs(5));
                        p.purge(rdkafka::producer::PurgeConfig::default().queue().inflight());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }
}

impl TxnFeeder {
    /// Sends `input` on a thread, one transaction of `chunk` records at a
    /// time with `pause` between them (a steady stream while the test kills
    /// or restarts things); join the handle to know everything was sent.
    pub fn stream_in_background(
        mut self,
        topic: &str,
        input: Vec<(Vec<u8>, Vec<u8>)>,
        chunk: usize,
        pause: Duration,
    ) -> std::thread::JoinHandle<()> {
        let topic = topic.to_string();
        std::thread::spawn(move || {
            for c in input.chunks(chunk) {
                self.send_chunk(&topic, c);
                std::thread::sleep(pause);
            }
        })
    }
}

pub fn sigterm_and_wait(job: &mut JobProc, deadline: Duration) -> std::process::ExitStatus {
    // SAFETY: plain kill(2) on a child pid we own.
    unsafe {
        libc::kill(job.0.id() as i32, libc::SIGTERM);
    }
    let end = Instant::now() + deadline;
    loop {
        if let Some(st) = job.0.try_wait().unwrap() {
            return st;
        }
        assert!(
            Instant::now() < end,
            "job did not exit within {deadline:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn tmpdir() -> PathBuf {
    let d = std::env::temp_dir().join(format!("waterbear-stream-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Members of a consumer group (by client/instance), via DescribeGroups.
pub fn group_members(group: &str) -> usize {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .create()
        .unwrap();
    match c.fetch_group_list(Some(group), Duration::from_secs(10)) {
        Ok(list) => list
            .groups()
            .iter()
            .filter(|g| g.name() == group)
            .map(|g| g.members().len())
            .sum(),
        Err(_) => 0,
    }
}
