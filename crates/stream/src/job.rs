//! The exactly-once consume-transform-produce loop.
//!
//! One consumer (group member) and one transactional producer per instance.
//! Records are processed in batches; each batch is one Kafka transaction
//! holding the batch's outputs, the state of every key the batch touched
//! (compacted state topic, partition = input partition) and the input offsets
//! (`send_offsets_to_transaction` with the consumer's group metadata, so a
//! zombie from an older group generation is fenced). On any transaction
//! failure the transaction is aborted and the job rewinds: in-memory state of
//! all assigned partitions is dropped and restored from the state topic, and
//! the consumer seeks back to the committed offsets. On a rebalance the open
//! transaction is aborted before partitions are revoked, and state of newly
//! assigned partitions is restored before their first record is processed.
//!
//! The loop runs on a dedicated blocking thread (librdkafka's transactional
//! calls are blocking); [`run`] is the async entry point.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DefaultProducerContext, Producer, PurgeConfig, ThreadedProducer,
};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use smallvec::SmallVec;
use tracing::{debug, error, info, warn};

use crate::config::StreamParams;
use crate::fetch::FetchQueue;
use crate::metrics::{Metrics, serve_metrics};
use crate::transform::{Output, Record, Topic, Transform};

/// Errors that stop the job.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// A Kafka client could not be created or a setup call failed.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// Topic setup failed (e.g. the state topic's partition count differs).
    #[error("{0}")]
    Setup(String),
    /// The metrics endpoint could not bind.
    #[error("metrics endpoint: {0}")]
    Io(#[from] std::io::Error),
    /// The job thread panicked.
    #[error("job thread panicked: {0}")]
    Panic(String),
}

/// Totals of one [`run`], for logs and tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunSummary {
    /// Input records whose transaction committed.
    pub records_in: u64,
    /// Outputs (all topics, not state) whose transaction committed.
    pub records_out: u64,
    /// DLQ outputs whose transaction committed.
    pub dlq: u64,
    /// Transactions committed.
    pub committed: u64,
    /// Transactions aborted.
    pub aborted: u64,
}

/// Header names the job adds to DLQ records.
pub const DLQ_SOURCE_TOPIC: &str = "dlq.source.topic";
/// See [`DLQ_SOURCE_TOPIC`].
pub const DLQ_SOURCE_PARTITION: &str = "dlq.source.partition";
/// See [`DLQ_SOURCE_TOPIC`].
pub const DLQ_SOURCE_OFFSET: &str = "dlq.source.offset";

/// Runs the job until `shutdown` completes (then finishes and commits the
/// open batch) or a non-recoverable error occurs. Creates missing topics
/// first when `params.create_topics`, and serves `/metrics` when
/// `params.metrics_listen` is set.
pub async fn run<T, S>(
    params: StreamParams,
    transform: T,
    shutdown: S,
) -> Result<RunSummary, StreamError>
where
    T: Transform + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    run_with_metrics(params, transform, shutdown, Metrics::new()).await
}

/// [`run`] with caller-provided metrics (to read them in-process).
pub async fn run_with_metrics<T, S>(
    params: StreamParams,
    transform: T,
    shutdown: S,
    metrics: Metrics,
) -> Result<RunSummary, StreamError>
where
    T: Transform + 'static,
    S: Future<Output = ()> + Send + 'static,
{
    if params.create_topics {
        crate::admin::ensure_topics(&params).await?;
    }
    let metrics_task = match params.metrics_listen {
        Some(addr) => Some(serve_metrics(addr, metrics.clone()).await?.1),
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    let signal_task = tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested: finishing the open batch");
        stop2.store(true, Ordering::SeqCst);
    });
    let result =
        tokio::task::spawn_blocking(move || Job::new(params, transform, metrics, stop)?.run_loop())
            .await;
    signal_task.abort();
    if let Some(t) = metrics_task {
        t.abort();
    }
    match result {
        Ok(r) => r,
        Err(e) => Err(StreamError::Panic(e.to_string())),
    }
}

/// Completes on SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM"),
        _ = tokio::signal::ctrl_c() => info!("SIGINT"),
    }
}

pub(crate) fn base_config(p: &StreamParams) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &p.brokers)
        .set("enable.sparse.connections", SPARSE_CONNECTIONS);
    for (k, v) in &p.extra {
        c.set(k, v);
    }
    c
}

/// librdkafka's `enable.sparse.connections` for every client of the job
/// (overridable in `[kafka.extra]`). With sparse connections (the default)
/// a new client connects to its bootstrap address, learns the brokers from
/// the first metadata, drops the bootstrap connection, and may open the next
/// connection only 50 ms later (`reconnect.backoff.ms` / 2). Every client a
/// start or a rebalance creates paid that: the restore reader ~50 ms, and a
/// transactional producer whose coordinator lookup fell into that gap found
/// no broker up and asked again only on a 500 ms timer, which about half of
/// the producers created together did. Connecting to all brokers at once
/// took `init_transactions` from 55-510 ms to 5-15 ms
/// (docs/benchmarks-stream.md, "Fourteenth measurement"). The job's clients
/// talk to most brokers anyway (partition leaders, group and transaction
/// coordinators).
pub const SPARSE_CONNECTIONS: &str = "false";

/// librdkafka's `fetch.queue.backoff.ms` for every consumer of the job
/// (overridable in `[kafka.consumer]`). Its default, 1000 ms, postpones a
/// partition's next fetch by a whole second each time the local queue is over
/// `queued.min.messages`: a loop that drains its queue faster than that then
/// waits in empty polls, and did so for half its time at full load
/// (docs/benchmarks-stream.md, "Seventh measurement").
pub const FETCH_QUEUE_BACKOFF_MS: &str = "10";

/// `heartbeat.interval.ms` for a consumer with session timeout `session`: a
/// quarter of it, at most 500 ms. A member learns that its group is
/// rebalancing only from a heartbeat's answer, so with librdkafka's 3 s
/// default a loop that joins late (the second scorer loop at start, a restarted
/// instance) waited up to 3 s for the others to give up partitions, while they
/// carried its share alone: 2.3 s of a 6.8 s benchmark run on one loop
/// (docs/benchmarks-stream.md, "Thirteenth measurement"). A heartbeat is a
/// small request to the group coordinator; two a second per member is cheap.
fn heartbeat_ms(session: Duration) -> u128 {
    (session.as_millis() / 4).clamp(100, 500)
}

/// The consumer settings of the stream loops (group, read_committed, manual
/// commits, security passthrough, `[kafka.consumer]`), for other consumers
/// of the same topics.
pub fn consumer_config(p: &StreamParams) -> ClientConfig {
    let mut c = base_config(p);
    c.set("group.id", &p.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set(
            "session.timeout.ms",
            p.session_timeout.as_millis().to_string(),
        )
        .set(
            "heartbeat.interval.ms",
            heartbeat_ms(p.session_timeout).to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .set("enable.partition.eof", "false")
        .set("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS);
    if p.static_membership {
        c.set("group.instance.id", &p.instance_id);
    }
    for (k, v) in &p.consumer {
        c.set(k, v);
    }
    c
}

fn producer_config(p: &StreamParams) -> ClientConfig {
    let mut c = base_config(p);
    c.set("transactional.id", &p.transactional_id)
        .set("enable.idempotence", "true")
        .set(
            "transaction.timeout.ms",
            p.transaction_timeout.as_millis().to_string(),
        );
    for (k, v) in &p.producer {
        c.set(k, v);
    }
    c
}

type TxnProducer = ThreadedProducer<DefaultProducerContext>;

/// How to react to a failed transactional call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recovery {
    /// Call again (timeouts, coordinator moving).
    Retry,
    /// Abort the transaction and rewind.
    Abort,
    /// The producer is unusable (fenced or fatal): recreate it, then rewind.
    Recreate,
}

fn classify(e: &KafkaError) -> Recovery {
    match e {
        KafkaError::Transaction(r) if r.is_fatal() => Recovery::Recreate,
        KafkaError::Transaction(r) if r.txn_requires_abort() => Recovery::Abort,
        KafkaError::Transaction(r) if r.is_retriable() => Recovery::Retry,
        KafkaError::Transaction(r) if r.code() == RDKafkaErrorCode::Fenced => Recovery::Recreate,
        KafkaError::Transaction(r) if r.code() == RDKafkaErrorCode::State => Recovery::Recreate,
        _ => Recovery::Abort,
    }
}

#[derive(Default)]
struct Batch {
    open: bool,
    started: Option<Instant>,
    oldest_ts_ms: Option<i64>,
    offsets: HashMap<i32, i64, foldhash::fast::RandomState>,
    /// Keys touched in this batch, per input partition. Keys up to 24 bytes
    /// (host ids) sit inside the set's buckets: one cache miss less per
    /// record than a `Vec`'s heap bytes.
    dirty: HashMap<i32, HashSet<SmallVec<[u8; 24]>, foldhash::fast::RandomState>>,
    records: u64,
    alerts: u64,
    other: u64,
    dlq: u64,
}

impl Batch {
    /// An empty batch that keeps the memory of `self`'s maps: each
    /// partition's set of dirty keys grows to thousands of keys in every
    /// transaction, and growing it from nothing again was ~1.5 % of the
    /// job's CPU.
    fn reset(mut self) -> Self {
        self.offsets.clear();
        for keys in self.dirty.values_mut() {
            keys.clear();
        }
        Self {
            offsets: self.offsets,
            dirty: self.dirty,
            ..Self::default()
        }
    }
}

struct Inner<T> {
    transform: T,
    producer: Option<TxnProducer>,
    batch: Batch,
    assigned: BTreeSet<i32>,
    /// Set when state and positions must be reloaded before processing more.
    needs_rewind: bool,
    summary: RunSummary,
}

struct Shared<T> {
    params: StreamParams,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    inner: Mutex<Inner<T>>,
    progress: Arc<Progress>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, Inner<T>> {
        // A panic while holding the lock is a bug; the state is still the
        // best we have and will be rewound if a transaction fails.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Ctx<T> {
    shared: Arc<Shared<T>>,
    /// This consumer's [`FetchQueue`]: the loop fills it, the post-rebalance
    /// callback routes newly assigned partitions to it. [`GroupConsumer`]
    /// drops it before the consumer.
    fetch: Mutex<Option<FetchQueue>>,
}

impl<T> Ctx<T> {
    fn fetch(&self) -> MutexGuard<'_, Option<FetchQueue>> {
        self.fetch.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl<T: Transform> Ctx<T> {
    /// Routes `parts` of the input topic to this consumer's batch queue.
    fn route(&self, c: &BaseConsumer<Self>, parts: &[i32]) {
        if let Some(q) = self.fetch().as_ref() {
            let unknown = q.route(c, &self.shared.params.telemetry_topic, parts);
            if !unknown.is_empty() {
                warn!(
                    ?unknown,
                    "partitions not routed to the batch queue; they are polled one by one"
                );
            }
        }
    }
}

/// The group consumer and its [`FetchQueue`] (in the consumer's context),
/// which must go first: a queue outliving its client is used after free.
struct GroupConsumer<T: Transform>(BaseConsumer<Ctx<T>>);

impl<T: Transform> GroupConsumer<T> {
    fn new(shared: &Arc<Shared<T>>) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer<Ctx<T>> =
            consumer_config(&shared.params).create_with_context(Ctx {
                shared: shared.clone(),
                fetch: Mutex::new(None),
            })?;
        let queue = FetchQueue::new(&consumer, FETCH_BATCH);
        *consumer.context().fetch() = Some(queue);
        consumer.subscribe(&[&shared.params.telemetry_topic])?;
        Ok(Self(consumer))
    }
}

impl<T: Transform> std::ops::Deref for GroupConsumer<T> {
    type Target = BaseConsumer<Ctx<T>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl<T: Transform> Drop for GroupConsumer<T> {
    fn drop(&mut self) {
        drop(self.0.context().fetch().take());
    }
}

/// Closes (drops) a group consumer, waiting at most `wait` for it.
/// rust-rdkafka's close polls until librdkafka says the consumer left the
/// group, without a deadline; a close that began while the consumer was
/// still joining its group was seen never to end (a job that got SIGTERM
/// 10 ms after subscribing did not exit). Everything the job owes is
/// committed before the close, so a close left behind loses nothing: the
/// group drops the member after its session timeout, or at once when an
/// instance with the same `group.instance.id` joins.
fn close_bounded<T: Transform + 'static>(c: GroupConsumer<T>, wait: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    let closing = std::thread::Builder::new()
        .name("consumer-close".into())
        .spawn(move || {
            drop(c);
            let _ = tx.send(());
        });
    if closing.is_err() {
        // The consumer went down with the closure: closed on this thread.
        warn!("no thread for the consumer's close; it was closed without a deadline");
        return;
    }
    if rx.recv_timeout(wait).is_err() {
        warn!(
            ?wait,
            "the consumer's close did not finish; leaving it behind (nothing is owed: the last transaction is committed)"
        );
    }
}

/// How long [`close_bounded`] waits for a consumer's close.
const CLOSE_WAIT: Duration = Duration::from_secs(10);

/// Records taken from the consumer in one call (see [`FetchQueue`]).
const FETCH_BATCH: usize = 1024;

/// The longest the loop waits for records before it serves the consumer
/// queue (rebalances, errors) again.
const EVENT_WAIT: Duration = Duration::from_millis(10);

/// How often the loop routes its assigned partitions to the batch queue
/// again. librdkafka ends a partition's routing when its fetcher stops, and
/// the stop of a revoked partition may complete after the partition was
/// assigned again and routed; its records then wait in the partition's own
/// queue until routed again (they keep their order: routing moves them).
const ROUTE_EVERY: Duration = Duration::from_millis(250);

impl<T: Transform> ClientContext for Ctx<T> {
    fn stats(&self, s: Statistics) {
        let p = &self.shared.params;
        if let Some(topic) = s.topics.get(&p.telemetry_topic) {
            for (id, part) in &topic.partitions {
                if *id < 0 || part.fetch_state == "none" || part.fetch_state == "stopped" {
                    continue;
                }
                let end = if part.ls_offset >= 0 {
                    part.ls_offset
                } else {
                    part.hi_offset
                };
                // Position: last record handed to the job, else the committed
                // offset, else the log start (nothing consumed yet).
                let pos = [part.app_offset, part.committed_offset, part.lo_offset]
                    .into_iter()
                    .find(|o| *o >= 0);
                if let (true, Some(pos)) = (end >= 0, pos) {
                    self.shared
                        .metrics
                        .consumer_lag
                        .with_label_values(&[&id.to_string()])
                        .set((end - pos).max(0));
                }
            }
        }
    }
}

impl<T: Transform> ConsumerContext for Ctx<T> {
    fn pre_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            // Before `assign` starts the fetchers: a partition routed once
            // never hands its records to the consumer queue (see `fetch`).
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            self.route(c, &parts);
        }
        if let Rebalance::Revoke(tpl) = rebalance {
            let shared = &self.shared;
            shared.metrics.rebalances.inc();
            let mut inner = shared.lock();
            let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
            info!(?parts, "partitions revoked");
            let aborted = inner.batch.open;
            if aborted {
                // Offsets of revoked partitions must not be committed by us
                // any more: drop the whole batch; the new owner replays it.
                abort_open(shared, &mut inner, "rebalance");
            }
            for p in &parts {
                inner.transform.forget_partition(*p);
                if inner.assigned.remove(p) {
                    // a delta, not a set: several loops may share the metrics
                    shared.metrics.assigned_partitions.dec();
                }
                let _ = shared
                    .metrics
                    .consumer_lag
                    .remove_label_values(&[&p.to_string()]);
            }
            // With incremental (cooperative) rebalancing some partitions stay:
            // the aborted batch touched their state and positions too.
            if aborted && !inner.assigned.is_empty() {
                inner.needs_rewind = true;
            }
        }
    }

    fn post_rebalance(&self, c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let shared = &self.shared;
                let parts: Vec<i32> = tpl.elements().iter().map(|e| e.partition()).collect();
                info!(?parts, "partitions assigned");
                // Again: a fetcher of the last assignment that stopped only
                // now has cleared the routing (the loop also routes again
                // every `ROUTE_EVERY`).
                self.route(c, &parts);
                let mut inner = shared.lock();
                for p in &parts {
                    inner.transform.forget_partition(*p);
                    if inner.assigned.insert(*p) {
                        shared.metrics.assigned_partitions.inc();
                    }
                }
                // Restore before the first record of these partitions is
                // handed out (that happens only in a later poll).
                if let Err(e) = restore_state(shared, &mut inner, &parts) {
                    warn!(error = %e, "state restore failed; will retry before processing");
                    inner.needs_rewind = true;
                }
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => warn!(error = %e, "rebalance error"),
        }
    }
}

/// Aborts the open transaction (retrying retriable errors, recreating the
/// producer if it is unusable) and clears the batch. Does not rewind.
fn abort_open<T>(shared: &Shared<T>, inner: &mut Inner<T>, why: &str) {
    shared.progress.set(Phase::Rewind);
    let timeout = shared.params.txn_call_timeout;
    warn!(why, records = inner.batch.records, "aborting transaction");
    // Bounded by the transaction timeout: after it the coordinator aborts on
    // its own, and a fresh producer (same transactional id) fences the rest.
    let end = Instant::now() + shared.params.transaction_timeout;
    let mut attempts = 0u32;
    while let Some(producer) = inner.producer.as_ref() {
        match producer.abort_transaction(timeout) {
            Ok(()) => break,
            Err(e) => {
                attempts += 1;
                match classify(&e) {
                    Recovery::Retry | Recovery::Abort
                        if Instant::now() < end && !shared.stop.load(Ordering::Relaxed) =>
                    {
                        warn!(error = %e, attempts, "abort_transaction failed, retrying");
                        std::thread::sleep(backoff(attempts));
                    }
                    _ => {
                        warn!(error = %e, "abort_transaction failed; recreating the producer");
                        drop_producer(inner);
                        break;
                    }
                }
            }
        }
    }
    inner.batch = Batch::default();
    inner.summary.aborted += 1;
    shared
        .metrics
        .transactions
        .with_label_values(&["aborted"])
        .inc();
}

/// Drops the producer without waiting for its queue (its transaction is
/// being abandoned); the next loop iteration creates a new one.
fn drop_producer<T>(inner: &mut Inner<T>) {
    if let Some(p) = inner.producer.take() {
        p.purge(PurgeConfig::default().queue().inflight());
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis((50u64 << attempt.min(5)).min(2000))
}

/// The last state of every key read from the state topic, in order of first
/// sight: what compaction would leave. Restore decodes each key once
/// instead of once per commit that wrote it (an uncompacted state topic of
/// 5,000 hosts held ~9 records a key; the decider's cluster states, JSON
/// with a policy replay, were the slowest part of a restart).
#[derive(Default)]
struct LatestByKey {
    index: HashMap<(i32, Vec<u8>), usize, foldhash::fast::RandomState>,
    states: Vec<(i32, Vec<u8>, Vec<u8>)>,
    read: u64,
}

impl LatestByKey {
    /// A record of the state topic; one without a payload (a tombstone) is
    /// skipped, as restore always did.
    fn push(&mut self, partition: i32, key: &[u8], state: Option<&[u8]>) {
        let Some(state) = state else { return };
        self.read += 1;
        match self.index.entry((partition, key.to_vec())) {
            std::collections::hash_map::Entry::Occupied(e) => {
                let s = &mut self.states[*e.get()].2;
                s.clear();
                s.extend_from_slice(state);
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                self.states
                    .push((partition, e.key().1.clone(), state.to_vec()));
                e.insert(self.states.len() - 1);
            }
        }
    }
}

/// Reads the state topic partitions `parts` from the beginning up to the end
/// (read_committed, so up to the last stable offset), then gives the
/// transform each key's last state (see [`LatestByKey`]).
fn restore_state<T: Transform>(
    shared: &Shared<T>,
    inner: &mut Inner<T>,
    parts: &[i32],
) -> Result<(), KafkaError> {
    if parts.is_empty() {
        return Ok(());
    }
    let p = &shared.params;
    let t0 = Instant::now();
    let mut cfg = base_config(p);
    cfg.set("group.id", format!("{}-restore", p.group_id))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true");
    for (k, v) in &p.consumer {
        cfg.set(k, v);
    }
    // A bulk read that must not wait on empty partitions (default 500 ms).
    cfg.set("fetch.wait.max.ms", "10");
    let consumer: BaseConsumer<QuietEof> = cfg.create_with_context(QuietEof)?;
    let mut tpl = TopicPartitionList::new();
    for &part in parts {
        tpl.add_partition_offset(&p.state_topic, part, Offset::Beginning)?;
    }
    // Learn the partition leaders first: assigning with unknown leaders
    // makes librdkafka retry the BEGINNING offset lookup on a fixed 500 ms
    // timer, which was most of the restore time.
    consumer.fetch_metadata(Some(&p.state_topic), p.txn_call_timeout)?;
    consumer.assign(&tpl)?;
    let mut pending: BTreeSet<i32> = parts.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut latest = LatestByKey::default();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut));
        }
        if shared.stop.load(Ordering::Relaxed) {
            return Err(KafkaError::Global(RDKafkaErrorCode::OperationTimedOut));
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                if let Some(k) = m.key() {
                    latest.push(m.partition(), k, m.payload());
                }
            }
            Some(Err(KafkaError::PartitionEOF(part))) => {
                pending.remove(&part);
            }
            Some(Err(e)) => debug!(error = %e, "restore consumer"),
            None => {}
        }
    }
    let keys = latest.states.len();
    for (partition, key, state) in &latest.states {
        inner.transform.restore(*partition, key, state);
    }
    let took = t0.elapsed();
    shared.metrics.restore_seconds.observe(took.as_secs_f64());
    info!(
        ?parts,
        records = latest.read,
        keys,
        ms = took.as_millis() as u64,
        "state restored"
    );
    // Closing a consumer takes ~0.1 s (librdkafka's threads wind down), and
    // the loop waits for the restore before it processes again: let another
    // thread close it. The reader never joined its group and committed
    // nothing, so its close has nothing left to do for the job.
    std::thread::spawn(move || drop(consumer));
    Ok(())
}

/// Context for readers with `enable.partition.eof`: librdkafka also reports
/// each EOF as a global error event, which is not an error.
pub struct QuietEof;

impl ClientContext for QuietEof {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(&error, KafkaError::Global(RDKafkaErrorCode::PartitionEOF)) {
            return;
        }
        error!("librdkafka: {error}: {reason}");
    }
}

impl ConsumerContext for QuietEof {}

struct Job<T: Transform + 'static> {
    shared: Arc<Shared<T>>,
    consumer: GroupConsumer<T>,
    started: Instant,
    watch: StallWatch,
}

/// Liveness of the group consumer. librdkafka can stop fetching assigned
/// partitions after a broker restart while reporting no error (known upstream:
/// confluentinc/librdkafka#5153, fede1024/rust-rdkafka#597; the fix there is a
/// new client). A consumer that hands out nothing for [`stall_after`] while an
/// assigned partition has records beyond its position is replaced.
struct StallWatch {
    /// When the consumer last handed out a record (or was created).
    last_record: Instant,
    /// When the positions were last compared with the watermarks.
    last_check: Instant,
    /// Partitions and high watermarks at the last replacement: if a new
    /// consumer is stuck at the same place, what is left cannot be read (e.g.
    /// an aborted transaction at the end of the log) and replacing it again
    /// would not help.
    replaced_at: Option<Vec<(i32, i64)>>,
}

impl StallWatch {
    fn new() -> Self {
        Self::at(Instant::now())
    }

    fn at(now: Instant) -> Self {
        Self {
            last_record: now,
            last_check: now,
            replaced_at: None,
        }
    }

    /// Whether to compare positions with watermarks now: nothing handed out
    /// for `after`, and no comparison within `after` either. With `idle`
    /// (nothing assigned, or a rewind pending) the consumer counts as live.
    fn check_due(&mut self, now: Instant, after: Duration, idle: bool) -> bool {
        if idle {
            self.last_record = now;
            return false;
        }
        if now - self.last_record < after || now - self.last_check < after {
            return false;
        }
        self.last_check = now;
        true
    }

    /// The verdict on `parts` = (partition, position, high watermark): the
    /// partitions (with their high watermarks) that have records beyond the
    /// position, if the consumer must be replaced for them. A transaction's
    /// commit marker takes an offset, so one short of the high watermark is
    /// the end. Not again for the same place as the last replacement.
    fn stalled(&mut self, parts: &[(i32, i64, i64)]) -> Option<Vec<(i32, i64)>> {
        let behind: Vec<(i32, i64)> = parts
            .iter()
            .filter(|(_, at, hi)| hi - at > 1)
            .map(|&(part, _, hi)| (part, hi))
            .collect();
        if behind.is_empty() || self.replaced_at.as_ref() == Some(&behind) {
            return None;
        }
        self.replaced_at = Some(behind.clone());
        Some(behind)
    }
}

/// How long a consumer may hand out nothing while records wait before it is
/// taken as wedged: twice the transaction timeout (an input transaction left
/// open holds back read_committed readers at most that long), at least 20 s.
fn stall_after(p: &StreamParams) -> Duration {
    (p.transaction_timeout * 2).max(Duration::from_secs(20))
}

/// What a loop is doing, for [`Progress`]'s watchdog.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    /// In `poll` (rebalance callbacks and state restore run inside it).
    Poll = 0,
    /// Processing a polled record.
    Process = 1,
    /// Writing the touched keys' state.
    CommitState = 2,
    /// `send_offsets_to_transaction`.
    CommitOffsets = 3,
    /// Waiting for the outputs' delivery reports.
    CommitDelivery = 4,
    /// `commit_transaction`.
    CommitTransaction = 5,
    /// Aborting or rewinding to the last committed transaction.
    Rewind = 6,
    /// Creating a producer (`init_transactions`) or replacing the consumer.
    Reconnect = 7,
    /// The loop has ended.
    Done = 8,
}

impl Phase {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Poll,
            1 => Self::Process,
            2 => Self::CommitState,
            3 => Self::CommitOffsets,
            4 => Self::CommitDelivery,
            5 => Self::CommitTransaction,
            6 => Self::Rewind,
            7 => Self::Reconnect,
            _ => Self::Done,
        }
    }
}

/// Where a loop is and since when, so a loop that hangs says where. CI saw
/// the broker-restart test stop after one transaction past the restart (two
/// runs in weeks, 2026-11-25 and 2026-12-04) with nothing in the job's log
/// after a state restore: a call that never returned, or a consumer that
/// fetched nothing while the stall check could not read its watermarks. The
/// watchdog names the phase the next time.
struct Progress {
    phase: AtomicU8,
    /// Milliseconds since `origin` when `phase` was entered.
    since_ms: AtomicU64,
    origin: Instant,
}

/// A loop in one phase for this long is reported (once a minute while it
/// stays there). Every phase but a broker outage's retries ends far sooner.
const STUCK_AFTER: Duration = Duration::from_secs(30);

impl Progress {
    fn new() -> Self {
        Self {
            phase: AtomicU8::new(Phase::Poll as u8),
            since_ms: AtomicU64::new(0),
            origin: Instant::now(),
        }
    }

    fn set(&self, phase: Phase) {
        self.set_at(phase, Instant::now());
    }

    /// As [`Self::set`] with a clock read the caller already has: the loop
    /// goes from poll to process and back for every record, and the clock
    /// is a measurable share of it.
    fn set_at(&self, phase: Phase, now: Instant) {
        if self.phase.load(Ordering::Relaxed) != phase as u8 {
            let ms = now.saturating_duration_since(self.origin).as_millis() as u64;
            self.since_ms.store(ms, Ordering::Relaxed);
            self.phase.store(phase as u8, Ordering::Relaxed);
        }
    }

    /// The phase and how long the loop has been in it, at `now`.
    fn stuck(&self, now: Instant) -> (Phase, Duration) {
        let phase = Phase::from_u8(self.phase.load(Ordering::Relaxed));
        let since = Duration::from_millis(self.since_ms.load(Ordering::Relaxed));
        (
            phase,
            now.saturating_duration_since(self.origin)
                .saturating_sub(since),
        )
    }

    /// Warns while the loop stays in one phase past [`STUCK_AFTER`]; ends
    /// with the loop.
    fn watch(self: Arc<Self>, id: String) {
        let spawned = std::thread::Builder::new()
            .name("loop-watchdog".into())
            .spawn(move || {
                let mut reported: Option<(u64, Instant)> = None;
                loop {
                    std::thread::sleep(Duration::from_secs(1));
                    let now = Instant::now();
                    let (phase, for_) = self.stuck(now);
                    if phase == Phase::Done {
                        return;
                    }
                    let entered = self.since_ms.load(Ordering::Relaxed);
                    let due = match reported {
                        Some((at, last)) if at == entered => now - last >= Duration::from_secs(60),
                        _ => true,
                    };
                    if for_ >= STUCK_AFTER && due {
                        warn!(instance = %id, ?phase, secs = for_.as_secs(), "loop stuck");
                        reported = Some((entered, now));
                    }
                }
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start the loop watchdog");
        }
    }
}

fn offset_in(tpl: &TopicPartitionList, topic: &str, part: i32) -> Option<i64> {
    match tpl.find_partition(topic, part)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

fn create_producer(p: &StreamParams, stop: &AtomicBool) -> Option<TxnProducer> {
    let mut attempt = 0u32;
    loop {
        if stop.load(Ordering::Relaxed) && attempt > 0 {
            return None;
        }
        attempt += 1;
        let producer: TxnProducer = match producer_config(p).create() {
            Ok(pr) => pr,
            Err(e) => {
                error!(error = %e, "creating producer");
                std::thread::sleep(backoff(attempt));
                continue;
            }
        };
        match producer.init_transactions(p.txn_call_timeout) {
            Ok(()) => {
                info!(transactional_id = %p.transactional_id, "transactional producer ready");
                return Some(producer);
            }
            Err(e) => {
                warn!(error = %e, attempt, "init_transactions failed, retrying");
                std::thread::sleep(backoff(attempt));
            }
        }
    }
}

impl<T: Transform + 'static> Job<T> {
    fn new(
        params: StreamParams,
        transform: T,
        metrics: Metrics,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, StreamError> {
        let started = Instant::now();
        let producer = create_producer(&params, &stop);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                transform,
                producer,
                batch: Batch::default(),
                assigned: BTreeSet::new(),
                needs_rewind: false,
                summary: RunSummary::default(),
            }),
            params,
            metrics,
            stop,
            progress: Arc::new(Progress::new()),
        });
        let consumer = GroupConsumer::new(&shared)?;
        info!(
            group = %shared.params.group_id,
            instance = %shared.params.instance_id,
            topic = %shared.params.telemetry_topic,
            "consumer subscribed"
        );
        Ok(Self {
            shared,
            consumer,
            started,
            watch: StallWatch::new(),
        })
    }

    fn run_loop(mut self) -> Result<RunSummary, StreamError> {
        let shared = self.shared.clone();
        /// Ends the watchdog however the loop ends.
        struct Finished(Arc<Progress>);
        impl Drop for Finished {
            fn drop(&mut self) {
                self.0.set(Phase::Done);
            }
        }
        shared
            .progress
            .clone()
            .watch(shared.params.transactional_id.clone());
        let _finished = Finished(shared.progress.clone());
        let p = &shared.params;
        // One clock read per batch of records: the clock was a measurable
        // share of the loop at a few hundred thousand records a second
        // (docs/benchmarks-stream.md). `now` is read after each fill; the
        // next wait uses it, a few microseconds stale.
        let mut now = Instant::now();
        let mut last_route = now;
        // When the last record came: an open transaction is committed after
        // `batch.idle_ms` without one.
        let mut last_input = now;
        loop {
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            let timeout = {
                let inner = shared.lock();
                match inner.batch.started {
                    Some(s) => {
                        let t = p
                            .batch_max_time
                            .saturating_sub(now.saturating_duration_since(s))
                            .min(Duration::from_millis(100));
                        match p.batch_idle {
                            Some(idle) => t.min(
                                idle.saturating_sub(now.saturating_duration_since(last_input)),
                            ),
                            None => t,
                        }
                    }
                    None => Duration::from_millis(100),
                }
            };
            if now.saturating_duration_since(last_route) >= ROUTE_EVERY {
                last_route = now;
                let parts: Vec<i32> = shared.lock().assigned.iter().copied().collect();
                self.consumer.context().route(&self.consumer, &parts);
            }
            shared.progress.set_at(Phase::Poll, now);
            // Rebalances, errors, statistics, and records of partitions not
            // routed to the batch queue (see `fetch`): without waiting.
            let polled = self.consumer.poll(Duration::ZERO);
            let mut fetch = self.consumer.context().fetch();
            let queue = fetch
                .as_mut()
                .expect("the fetch queue lives as long as its consumer");
            // Wait for records only when the consumer queue had nothing, and
            // not so long that a rebalance waits for it.
            let wait = if polled.is_some() {
                Duration::ZERO
            } else {
                timeout.min(EVENT_WAIT)
            };
            let fetched = queue.fill(wait);
            now = Instant::now();
            shared.progress.set_at(Phase::Process, now);
            let mut inner = shared.lock();
            if inner.producer.is_none() {
                shared.progress.set(Phase::Reconnect);
                inner.producer = create_producer(p, &shared.stop);
                if inner.producer.is_none() {
                    break; // stopping
                }
                inner.needs_rewind = true;
            }
            if inner.needs_rewind {
                // The records taken predate the rewind: drop them, the seek
                // makes them come again.
                drop(fetch);
                self.rewind(&mut inner);
                continue;
            }
            let mut check_consumer = fetched == 0;
            if fetched > 0 {
                self.watch.last_record = now;
                last_input = now;
                shared.metrics.fetch_records.observe(fetched as f64);
            }
            match polled {
                Some(Ok(m)) => {
                    self.watch.last_record = now;
                    last_input = now;
                    check_consumer = false;
                    let rec = Record {
                        partition: m.partition(),
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key(),
                        payload: m.payload().unwrap_or_default(),
                    };
                    if !self.step(&mut inner, &rec, now, last_input) {
                        continue;
                    }
                }
                Some(Err(e)) => {
                    debug!(error = %e, "consumer error");
                    check_consumer = true;
                }
                None => {}
            }
            for m in queue.messages() {
                // A failed transaction drops the rest: the rewind brings it
                // again.
                if inner.needs_rewind || inner.producer.is_none() {
                    break;
                }
                match m.record() {
                    Ok(rec) => {
                        if !self.step(&mut inner, &rec, now, last_input) {
                            break;
                        }
                    }
                    Err(e) => {
                        debug!(error = %e, "consumer error");
                        check_consumer = true;
                    }
                }
            }
            drop(fetch);
            if check_consumer {
                if let Some(why) = self.consumer_broken(&inner) {
                    drop(inner);
                    self.recreate_consumer(&why)?;
                    continue;
                }
            }
            if self.due(&inner, now, last_input) {
                self.commit(&mut inner);
            }
        }
        // Shutdown: commit what was processed, then leave.
        let summary = {
            let mut inner = shared.lock();
            if inner.batch.open && inner.producer.is_some() {
                self.commit(&mut inner);
            }
            inner.summary.clone()
        };
        info!(?summary, "stopped");
        close_bounded(self.consumer, CLOSE_WAIT);
        Ok(summary)
    }

    /// Why the consumer must be replaced, if it must: a fatal error (e.g. a
    /// static member fenced after a coordinator failover), or a stall (see
    /// [`StallWatch`]).
    fn consumer_broken(&mut self, inner: &Inner<T>) -> Option<String> {
        if let Some((code, reason)) = self.consumer.client().fatal_error() {
            return Some(format!("fatal error {code}: {reason}"));
        }
        self.consumer_stalled(inner)
    }

    /// Compares the positions of the assigned partitions with their high
    /// watermarks once the consumer has handed out nothing for
    /// [`stall_after`]; says why when records wait that it does not fetch.
    fn consumer_stalled(&mut self, inner: &Inner<T>) -> Option<String> {
        let p = &self.shared.params;
        let now = Instant::now();
        let idle = inner.assigned.is_empty() || inner.needs_rewind;
        if !self.watch.check_due(now, stall_after(p), idle) {
            return None;
        }
        let topic = p.telemetry_topic.as_str();
        let silent = now - self.watch.last_record;
        // A consumer that fetches nothing may not answer these either (it
        // shares the wedged connections): that is a stall too, not a reason
        // to say nothing. If the broker is down, the new consumer waits for
        // it like the old one; this runs at most once per stall time.
        let positions = match self.consumer.position() {
            Ok(p) => p,
            Err(e) => {
                return Some(format!(
                    "no record for {silent:?}, and the positions cannot be read: {e}"
                ));
            }
        };
        // Asked for only when a partition has no position yet.
        let mut committed: Option<Option<TopicPartitionList>> = None;
        let mut parts = Vec::new();
        for &part in &inner.assigned {
            let (lo, hi) = match self
                .consumer
                .fetch_watermarks(topic, part, p.txn_call_timeout)
            {
                Ok(w) => w,
                Err(e) => {
                    return Some(format!(
                        "no record for {silent:?}, and the high watermark of partition {part} cannot be read: {e}"
                    ));
                }
            };
            let at = offset_in(&positions, topic, part)
                .or_else(|| {
                    committed
                        .get_or_insert_with(|| self.consumer.committed(p.txn_call_timeout).ok())
                        .as_ref()
                        .and_then(|c| offset_in(c, topic, part))
                })
                .unwrap_or(lo);
            parts.push((part, at, hi));
        }
        let behind = self.watch.stalled(&parts)?;
        Some(format!(
            "no record for {silent:?} while partitions have records beyond the position (partition, high watermark): {behind:?}"
        ))
    }

    /// Replaces a consumer that is broken ([`Self::consumer_broken`]): abort
    /// the open transaction, forget all partitions, and join the group again
    /// with a new client.
    fn recreate_consumer(&mut self, why: &str) -> Result<(), StreamError> {
        let shared = self.shared.clone();
        shared.progress.set(Phase::Reconnect);
        warn!(why, "replacing the consumer");
        shared.metrics.consumer_replaced.inc();
        {
            let mut inner = shared.lock();
            if inner.batch.open {
                abort_open(&shared, &mut inner, "consumer fatal error");
            }
            let parts: Vec<i32> = inner.assigned.iter().copied().collect();
            for part in parts {
                inner.transform.forget_partition(part);
                shared.metrics.assigned_partitions.dec();
            }
            inner.assigned.clear();
            inner.needs_rewind = false;
        }
        let consumer = GroupConsumer::new(&shared)?;
        // The old client is closed without holding the lock: its close may
        // run the revoke callback.
        close_bounded(std::mem::replace(&mut self.consumer, consumer), CLOSE_WAIT);
        let now = Instant::now();
        self.watch.last_record = now;
        self.watch.last_check = now;
        Ok(())
    }

    /// Processes one record and commits when the batch is due; false when
    /// producing failed (the transaction failed and a rewind is due).
    fn step(
        &self,
        inner: &mut Inner<T>,
        rec: &Record<'_>,
        now: Instant,
        last_input: Instant,
    ) -> bool {
        // Records of a partition come in offset order (see `fetch`); one
        // that does not would make the batch commit a wrong offset.
        if let Some(&next) = inner.batch.offsets.get(&rec.partition) {
            if rec.offset < next {
                error!(
                    partition = rec.partition,
                    offset = rec.offset,
                    next,
                    "record out of order; aborting and rewinding"
                );
                abort_open(&self.shared, inner, "record out of order");
                inner.needs_rewind = true;
                return false;
            }
        }
        if let Err(e) = self.handle(inner, rec) {
            warn!(error = %e, "producing failed");
            self.fail(inner, &e);
            return false;
        }
        if self.due(inner, now, last_input) {
            self.commit(inner);
        }
        true
    }

    /// Whether the open batch must be committed now: full, old, or idle.
    fn due(&self, inner: &Inner<T>, now: Instant, last_input: Instant) -> bool {
        let p = &self.shared.params;
        inner.batch.open
            && (inner.batch.records as usize >= p.batch_max_records
                || inner
                    .batch
                    .started
                    .is_some_and(|s| now.saturating_duration_since(s) >= p.batch_max_time)
                || p.batch_idle
                    .is_some_and(|i| now.saturating_duration_since(last_input) >= i))
    }

    /// Processes one record inside the open (or a new) transaction.
    fn handle(&self, inner: &mut Inner<T>, rec: &Record<'_>) -> Result<(), KafkaError> {
        let p = &self.shared.params;
        if !inner.batch.open {
            inner
                .producer
                .as_ref()
                .expect("producer present")
                .begin_transaction()?;
            inner.batch.open = true;
            inner.batch.started = Some(Instant::now());
        }
        let outputs = match catch_unwind(AssertUnwindSafe(|| inner.transform.process(rec))) {
            Ok(o) => o,
            Err(panic) => {
                let msg = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                error!(partition = rec.partition, offset = rec.offset, %msg, "transform panicked; record to DLQ");
                vec![Output::dlq(
                    rec.key,
                    rec.payload,
                    format!("transform panicked: {msg}"),
                )]
            }
        };
        let producer = inner.producer.as_ref().expect("producer present");
        let (mut alerts, mut dlq, mut other) = (0u64, 0u64, 0u64);
        for o in outputs {
            let sent_as = match produce_output(producer, p, Some(rec), &o) {
                Ok(()) => o.topic.clone(),
                // A record the client refuses outright (too large, unknown
                // topic) would fail every replay: dead-letter the input
                // instead of aborting forever.
                Err(KafkaError::MessageProduction(code))
                    if o.topic != Topic::Dlq && rejects_record(code) =>
                {
                    warn!(partition = rec.partition, offset = rec.offset, %code, "output rejected; input to DLQ");
                    let d = Output::dlq(
                        rec.key,
                        rec.payload,
                        format!("output to {:?} rejected: {code}", o.topic),
                    );
                    produce_output(producer, p, Some(rec), &d)?;
                    Topic::Dlq
                }
                Err(e) => return Err(e),
            };
            match sent_as {
                Topic::Alerts => alerts += 1,
                Topic::Dlq => dlq += 1,
                Topic::Named(_) => other += 1,
            }
            // The producer copied the payload.
            inner.transform.recycle(o.payload);
        }
        let b = &mut inner.batch;
        b.alerts += alerts;
        b.dlq += dlq;
        b.other += other;
        b.records += 1;
        b.offsets.insert(rec.partition, rec.offset + 1);
        if let Some(k) = rec.key {
            // Allocate only for keys not yet marked dirty in this batch.
            let keys = b.dirty.entry(rec.partition).or_default();
            if !keys.contains(k) {
                keys.insert(SmallVec::from_slice(k));
            }
        }
        if let Some(ts) = rec.timestamp_ms {
            b.oldest_ts_ms = Some(b.oldest_ts_ms.map_or(ts, |o| o.min(ts)));
        }
        Ok(())
    }

    /// Writes state, sends offsets and commits; on failure aborts and rewinds.
    fn commit(&self, inner: &mut Inner<T>) {
        let shared = &self.shared;
        let p = &shared.params;
        let result = (|| -> Result<(), KafkaError> {
            shared.progress.set(Phase::CommitState);
            let t_state = Instant::now();
            let flushed = match catch_unwind(AssertUnwindSafe(|| inner.transform.flush())) {
                Ok(o) => o,
                Err(_) => {
                    // No single input to dead-letter: abort, so the batch is
                    // replayed rather than committed without its outputs.
                    error!("transform panicked in flush; aborting the transaction");
                    return Err(KafkaError::Global(RDKafkaErrorCode::Fail));
                }
            };
            let producer = inner.producer.as_ref().expect("producer present");
            for o in flushed {
                produce_output(producer, p, None, &o)?;
                let b = &mut inner.batch;
                match o.topic {
                    Topic::Alerts => b.alerts += 1,
                    Topic::Dlq => b.dlq += 1,
                    Topic::Named(_) => b.other += 1,
                }
                inner.transform.recycle(o.payload);
            }
            // Put back below: its memory is kept for the next batch.
            let dirty = std::mem::take(&mut inner.batch.dirty);
            for (part, keys) in &dirty {
                let mut keys = keys.iter().peekable();
                while let Some(key) = keys.next() {
                    if let Some(next) = keys.peek() {
                        inner.transform.prefetch_state(next);
                    }
                    if let Some(state) = inner.transform.state(key) {
                        send_blocking(
                            producer,
                            BaseRecord::to(&p.state_topic)
                                .partition(*part)
                                .key(&key[..])
                                .payload(&state[..]),
                        )?;
                    }
                }
            }
            inner.batch.dirty = dirty;
            let mut tpl = TopicPartitionList::with_capacity(inner.batch.offsets.len());
            for (&part, &off) in &inner.batch.offsets {
                tpl.add_partition_offset(&p.telemetry_topic, part, Offset::Offset(off))?;
            }
            let gm = self
                .consumer
                .group_metadata()
                .ok_or(KafkaError::Global(RDKafkaErrorCode::State))?;
            let t_offsets = Instant::now();
            shared.progress.set(Phase::CommitOffsets);
            retry_call(&shared.stop, p.transaction_timeout, || {
                producer.send_offsets_to_transaction(&tpl, &gm, p.txn_call_timeout)
            })?;
            let t_commit = Instant::now();
            // rdkafka's commit_transaction flushes first, but its flush waits
            // in 100 ms poll slices; the producer's own thread serves the
            // delivery reports, so wait for them here at a finer grain and
            // the flush inside commit_transaction finds nothing left to do.
            shared.progress.set(Phase::CommitDelivery);
            wait_delivered(producer, p.txn_call_timeout);
            shared.progress.set(Phase::CommitTransaction);
            retry_call(&shared.stop, p.transaction_timeout, || {
                producer.commit_transaction(p.txn_call_timeout)
            })?;
            let t_done = Instant::now();
            shared
                .metrics
                .commit_seconds
                .observe((t_done - t_state).as_secs_f64());
            debug!(
                state_ms = (t_offsets - t_state).as_secs_f64() * 1e3,
                offsets_ms = (t_commit - t_offsets).as_secs_f64() * 1e3,
                commit_ms = (t_done - t_commit).as_secs_f64() * 1e3,
                "commit timings"
            );
            Ok(())
        })();
        match result {
            Ok(()) => {
                let b = std::mem::take(&mut inner.batch);
                let m = &shared.metrics;
                m.records_in.inc_by(b.records);
                m.records_out
                    .with_label_values(&["alerts"])
                    .inc_by(b.alerts);
                m.records_out.with_label_values(&["dlq"]).inc_by(b.dlq);
                m.records_out.with_label_values(&["other"]).inc_by(b.other);
                m.dlq.inc_by(b.dlq);
                m.transactions.with_label_values(&["committed"]).inc();
                if let Some(s) = b.started {
                    m.batch_latency.observe(s.elapsed().as_secs_f64());
                }
                if let Some(ts) = b.oldest_ts_ms {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as i64)
                        .unwrap_or(ts);
                    m.record_latency
                        .observe((now_ms - ts).max(0) as f64 / 1000.0);
                }
                let records = b.records;
                let out = b.alerts + b.dlq + b.other;
                let dlq = b.dlq;
                inner.batch = b.reset();
                let s = &mut inner.summary;
                s.records_in += records;
                s.records_out += out;
                s.dlq += dlq;
                s.committed += 1;
                if s.committed == 1 {
                    // Start-up/recovery time: process start to first commit.
                    info!(
                        ms = self.started.elapsed().as_millis() as u64,
                        "first transaction committed"
                    );
                }
                debug!(records, "committed");
            }
            Err(e) => {
                warn!(error = %e, "commit failed");
                self.fail(inner, &e);
            }
        }
    }

    /// Recovers from a failed produce/commit: abort (or recreate the
    /// producer) and rewind.
    fn fail(&self, inner: &mut Inner<T>, e: &KafkaError) {
        // Recreate when the producer is unusable, and also when a call kept
        // timing out: a stuck coordinator connection does not heal by
        // retrying on the same client (seen after a broker restart).
        if matches!(classify(e), Recovery::Recreate | Recovery::Retry) {
            warn!(error = %e, "recreating the transactional producer");
            drop_producer(inner);
            inner.batch = Batch::default();
            inner.summary.aborted += 1;
            self.shared
                .metrics
                .transactions
                .with_label_values(&["aborted"])
                .inc();
        } else {
            abort_open(&self.shared, inner, "transaction failed");
        }
        inner.needs_rewind = true;
    }

    /// Reloads the state of all assigned partitions and seeks the consumer
    /// back to the committed offsets.
    fn rewind(&self, inner: &mut Inner<T>) {
        let shared = &self.shared;
        shared.progress.set(Phase::Rewind);
        let p = &shared.params;
        let parts: Vec<i32> = inner.assigned.iter().copied().collect();
        info!(?parts, "rewinding to the last committed transaction");
        for &part in &parts {
            inner.transform.forget_partition(part);
        }
        if let Err(e) = restore_state(shared, inner, &parts) {
            warn!(error = %e, "restore failed during rewind; retrying");
            std::thread::sleep(Duration::from_millis(500));
            return;
        }
        let committed = match self.consumer.committed(p.txn_call_timeout) {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "fetching committed offsets failed during rewind; retrying");
                std::thread::sleep(Duration::from_millis(500));
                return;
            }
        };
        for el in committed.elements() {
            if el.topic() != p.telemetry_topic || !inner.assigned.contains(&el.partition()) {
                continue;
            }
            let to = match el.offset() {
                Offset::Offset(o) => Offset::Offset(o),
                _ => Offset::Beginning,
            };
            if let Err(e) =
                self.consumer
                    .seek(&p.telemetry_topic, el.partition(), to, p.txn_call_timeout)
            {
                warn!(error = %e, partition = el.partition(), "seek failed during rewind; retrying");
                std::thread::sleep(Duration::from_millis(500));
                return;
            }
        }
        inner.needs_rewind = false;
        info!("rewound");
    }
}

/// Produces one output; DLQ outputs get the source headers.
fn produce_output(
    producer: &TxnProducer,
    p: &StreamParams,
    rec: Option<&Record<'_>>,
    o: &Output,
) -> Result<(), KafkaError> {
    let topic = match &o.topic {
        Topic::Alerts => p.alerts_topic.as_str(),
        Topic::Dlq => p.dlq_topic.as_str(),
        Topic::Named(n) => n.as_str(),
    };
    let mut record = BaseRecord::to(topic)
        .key(&o.key[..])
        .payload(&o.payload[..]);
    let is_dlq = o.topic == Topic::Dlq;
    // Headers cost a C allocation per record: only when there are some.
    if !o.headers.is_empty() || is_dlq {
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len() + 3);
        for (k, v) in &o.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        if let (true, Some(rec)) = (is_dlq, rec) {
            let part = rec.partition.to_string();
            let off = rec.offset.to_string();
            headers = headers
                .insert(Header {
                    key: DLQ_SOURCE_TOPIC,
                    value: Some(&p.telemetry_topic),
                })
                .insert(Header {
                    key: DLQ_SOURCE_PARTITION,
                    value: Some(&part),
                })
                .insert(Header {
                    key: DLQ_SOURCE_OFFSET,
                    value: Some(&off),
                });
        }
        record = record.headers(headers);
    }
    send_blocking(producer, record)
}

/// Client-side rejections that will recur on every replay of the record.
fn rejects_record(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::InvalidArgument
    )
}

/// Produces, waiting while the local queue is full (bounded memory).
fn send_blocking(
    producer: &TxnProducer,
    mut record: BaseRecord<'_, [u8], [u8]>,
) -> Result<(), KafkaError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Waits until every produced record is acknowledged (or `timeout`).
fn wait_delivered(producer: &TxnProducer, timeout: Duration) {
    let end = Instant::now() + timeout;
    while producer.in_flight_count() > 0 && Instant::now() < end {
        std::thread::sleep(Duration::from_micros(250));
    }
}

/// Calls a transactional API until it succeeds, fails non-retriably, or the
/// retries run out.
fn retry_call(
    stop: &AtomicBool,
    budget: Duration,
    mut f: impl FnMut() -> Result<(), KafkaError>,
) -> Result<(), KafkaError> {
    // Past the transaction timeout the coordinator has aborted the
    // transaction anyway: stop retrying and let the caller recreate.
    let end = Instant::now() + budget;
    let mut attempt = 0u32;
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e)
                if classify(&e) == Recovery::Retry
                    && Instant::now() < end
                    && !(stop.load(Ordering::Relaxed) && attempt > 3) =>
            {
                attempt += 1;
                warn!(error = %e, attempt, "retriable transaction error");
                std::thread::sleep(backoff(attempt));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_keeps_the_last_state_of_each_key_in_first_seen_order() {
        let mut l = LatestByKey::default();
        l.push(0, b"a", Some(b"a1"));
        l.push(1, b"a", Some(b"other partition"));
        l.push(0, b"b", Some(b"b1"));
        l.push(0, b"a", Some(b"a2, longer"));
        l.push(0, b"b", None); // a tombstone changes nothing
        l.push(0, b"a", Some(b"a3"));
        let got: Vec<(i32, &[u8], &[u8])> = l
            .states
            .iter()
            .map(|(p, k, v)| (*p, k.as_slice(), v.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                (0, &b"a"[..], &b"a3"[..]),
                (1, b"a", b"other partition"),
                (0, b"b", b"b1"),
            ]
        );
        assert_eq!(l.read, 5);
    }

    const AFTER: Duration = Duration::from_secs(20);

    fn params(consumer: &[(&str, &str)]) -> StreamParams {
        let mut text = include_str!("../../../pipelines/streaming.toml").to_owned();
        for (k, v) in consumer {
            text = text.replace(
                "[kafka.consumer]\n",
                &format!("[kafka.consumer]\n\"{k}\" = \"{v}\"\n"),
            );
        }
        let mut c =
            crate::StreamConfig::from_toml_str_skipping(&text, "t", crate::JOB_SECTIONS).unwrap();
        c.kafka.instance_id = "t-0".into();
        c.validate().unwrap()
    }

    #[test]
    fn heartbeats_come_often_enough_to_notice_a_rebalance_soon() {
        let ms = |s| heartbeat_ms(Duration::from_millis(s));
        assert_eq!(
            ms(10_000),
            500,
            "capped: rebalances are noticed within 0.5 s"
        );
        assert_eq!(ms(1_000), 250, "a quarter of a short session");
        assert_eq!(ms(200), 100, "floor");
        let c = consumer_config(&params(&[]));
        assert_eq!(c.get("heartbeat.interval.ms"), Some("500"));
        let c = consumer_config(&params(&[("heartbeat.interval.ms", "3000")]));
        assert_eq!(c.get("heartbeat.interval.ms"), Some("3000"), "config wins");
    }

    #[test]
    fn progress_names_the_phase_and_how_long_the_loop_has_been_in_it() {
        let p = Progress::new();
        p.set(Phase::CommitOffsets);
        let entered = Duration::from_millis(p.since_ms.load(Ordering::Relaxed));
        let later = p.origin + Duration::from_secs(40);
        assert_eq!(
            p.stuck(later),
            (Phase::CommitOffsets, Duration::from_secs(40) - entered)
        );
        // the same phase again keeps its start: a loop retrying one call
        // is still stuck in it
        p.set(Phase::CommitOffsets);
        assert_eq!(p.stuck(later).1, Duration::from_secs(40) - entered);
        p.set(Phase::Poll);
        assert_eq!(p.stuck(later).0, Phase::Poll);
        for phase in [
            Phase::Poll,
            Phase::Process,
            Phase::CommitState,
            Phase::CommitOffsets,
            Phase::CommitDelivery,
            Phase::CommitTransaction,
            Phase::Rewind,
            Phase::Reconnect,
            Phase::Done,
        ] {
            assert_eq!(Phase::from_u8(phase as u8), phase);
        }
    }

    #[test]
    fn every_client_connects_to_all_brokers_unless_the_config_says_otherwise() {
        let p = params(&[]);
        for (what, c) in [
            ("base", base_config(&p)),
            ("consumer", consumer_config(&p)),
            ("producer", producer_config(&p)),
        ] {
            assert_eq!(
                c.get("enable.sparse.connections"),
                Some(SPARSE_CONNECTIONS),
                "{what}"
            );
        }
        let mut p = params(&[]);
        p.extra
            .insert("enable.sparse.connections".into(), "true".into());
        assert_eq!(
            producer_config(&p).get("enable.sparse.connections"),
            Some("true"),
            "[kafka.extra] wins"
        );
    }

    #[test]
    fn a_reset_batch_is_empty_and_keeps_the_memory_of_its_key_sets() {
        let mut b = Batch {
            open: true,
            started: Some(Instant::now()),
            oldest_ts_ms: Some(5),
            records: 3,
            alerts: 1,
            other: 1,
            dlq: 1,
            ..Batch::default()
        };
        b.offsets.insert(0, 10);
        for i in 0..1000 {
            b.dirty
                .entry(i % 3)
                .or_default()
                .insert(SmallVec::from_slice(format!("h{i}").as_bytes()));
        }
        let capacity = |b: &Batch| {
            let mut c: Vec<(i32, usize)> =
                b.dirty.iter().map(|(&p, k)| (p, k.capacity())).collect();
            c.sort_unstable();
            c
        };
        let before = capacity(&b);
        let b = b.reset();
        assert!(!b.open && b.started.is_none() && b.oldest_ts_ms.is_none());
        assert_eq!((b.records, b.alerts, b.other, b.dlq), (0, 0, 0, 0));
        assert!(b.offsets.is_empty());
        assert!(b.dirty.values().all(|k| k.is_empty()), "no key left dirty");
        assert_eq!(capacity(&b), before);
        assert!(before.iter().all(|&(_, c)| c >= 333));
    }

    #[test]
    fn consumers_fetch_again_soon_unless_the_config_says_otherwise() {
        let c = consumer_config(&params(&[]));
        assert_eq!(
            c.get("fetch.queue.backoff.ms"),
            Some(FETCH_QUEUE_BACKOFF_MS)
        );
        assert_eq!(c.get("isolation.level"), Some("read_committed"));
        let c = consumer_config(&params(&[("fetch.queue.backoff.ms", "500")]));
        assert_eq!(c.get("fetch.queue.backoff.ms"), Some("500"));
    }

    #[test]
    fn the_stall_check_waits_for_silence_and_paces_itself() {
        let t0 = Instant::now();
        let mut w = StallWatch::at(t0);
        let s = Duration::from_secs;
        assert!(
            !w.check_due(t0 + s(19), AFTER, false),
            "not silent long enough"
        );
        assert!(w.check_due(t0 + s(20), AFTER, false));
        // the next comparison waits another `after`, however silent
        assert!(!w.check_due(t0 + s(39), AFTER, false));
        assert!(w.check_due(t0 + s(40), AFTER, false));
        // a record handed out restarts the silence
        w.last_record = t0 + s(50);
        assert!(!w.check_due(t0 + s(69), AFTER, false));
        assert!(w.check_due(t0 + s(70), AFTER, false));
        // with nothing assigned (or a rewind pending) the consumer is live
        assert!(!w.check_due(t0 + s(200), AFTER, true));
        assert_eq!(w.last_record, t0 + s(200));
        assert!(!w.check_due(t0 + s(219), AFTER, false));
    }

    #[test]
    fn a_consumer_is_stalled_only_with_records_beyond_its_position() {
        let mut w = StallWatch::at(Instant::now());
        // at the end, or one short of it (a commit marker): not stalled
        assert_eq!(w.stalled(&[(0, 100, 100), (1, 99, 100)]), None);
        assert_eq!(w.stalled(&[]), None);
        // two records beyond the position on partition 1
        assert_eq!(
            w.stalled(&[(0, 100, 100), (1, 98, 100)]),
            Some(vec![(1, 100)])
        );
        // a new consumer stuck at the same place is not replaced again (what
        // is left cannot be read, e.g. an aborted transaction at the end) ...
        assert_eq!(w.stalled(&[(0, 100, 100), (1, 98, 100)]), None);
        assert_eq!(w.stalled(&[(0, 100, 100), (1, 99, 100)]), None);
        // ... but it is once more records arrive behind it
        assert_eq!(
            w.stalled(&[(0, 100, 120), (1, 98, 100)]),
            Some(vec![(0, 120), (1, 100)])
        );
    }
}
