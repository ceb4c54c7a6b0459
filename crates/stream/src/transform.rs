//! What the streaming job does with each record: the [`Transform`] trait.

/// One input record as handed to [`Transform::process`].
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    /// Input partition (also the state partition of this record's key).
    pub partition: i32,
    /// Offset in the input partition.
    pub offset: i64,
    /// Kafka timestamp in ms since the epoch, if the record had one.
    pub timestamp_ms: Option<i64>,
    /// The record's key.
    pub key: Option<&'a [u8]>,
    /// The record's value (empty for a null value).
    pub payload: &'a [u8],
}

/// Where an [`Output`] goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Topic {
    /// The configured alerts topic (`topics.alerts`).
    Alerts,
    /// The configured dead-letter topic (`topics.dlq`). The job adds the
    /// headers `dlq.source.topic`, `dlq.source.partition` and
    /// `dlq.source.offset`.
    Dlq,
    /// Any other topic by name (must exist or be auto-created by the cluster).
    Named(String),
}

/// Header carrying the reason a record was sent to the DLQ.
pub const DLQ_REASON_HEADER: &str = "dlq.reason";

/// A record the transform wants produced, in the same transaction as the
/// input offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Destination.
    pub topic: Topic,
    /// Record key (the destination partition is chosen by hashing it).
    pub key: Vec<u8>,
    /// Record value.
    pub payload: Vec<u8>,
    /// Record headers.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl Output {
    /// An alert keyed by `key`.
    pub fn alert(key: impl Into<Vec<u8>>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            topic: Topic::Alerts,
            key: key.into(),
            payload: payload.into(),
            headers: Vec::new(),
        }
    }

    /// A dead letter: the original bytes and a `dlq.reason` header.
    pub fn dlq(key: Option<&[u8]>, original: &[u8], reason: impl Into<String>) -> Self {
        Self {
            topic: Topic::Dlq,
            key: key.unwrap_or_default().to_vec(),
            payload: original.to_vec(),
            headers: vec![(DLQ_REASON_HEADER.to_string(), reason.into().into_bytes())],
        }
    }
}

/// What the streaming job does with one input record. Pure and synchronous:
/// no I/O, no clocks that matter for the result, so that replaying the same
/// records from the same state gives the same outputs (the job replays after
/// an aborted transaction or a crash).
///
/// State model: per record key, within the record's input partition. After
/// each record the job remembers its key; when the transaction commits it
/// asks [`Transform::state`] for each remembered key and writes the answer
/// to the compacted state topic (partition = input partition) in the same
/// transaction as the outputs and input offsets. When partitions are
/// assigned, the job calls [`Transform::forget_partition`] and then
/// [`Transform::restore`] for every key of that partition's state before
/// the first record of it is processed. After an aborted transaction the
/// same happens for all assigned partitions, so in-memory state always
/// matches the committed input offsets.
pub trait Transform: Send {
    /// Processes one record; returns the records to produce.
    fn process(&mut self, record: &Record<'_>) -> Vec<Output>;

    /// Records to produce just before the transaction commits, after its last
    /// [`Transform::process`]: a transform that batches its outputs (many
    /// inputs, one output record) returns the rest of its batches here. They
    /// go out in the same transaction. After an aborted transaction the job
    /// calls [`Transform::forget_partition`] for every assigned partition: a
    /// batching transform drops what it held for them there, because those
    /// inputs are replayed.
    fn flush(&mut self) -> Vec<Output> {
        Vec::new()
    }

    /// Takes back the payload buffer of an output of [`Transform::process`] or
    /// [`Transform::flush`] once the producer has copied it, so a transform
    /// that writes large outputs can fill the same memory again instead of
    /// asking the allocator for fresh pages. The default drops it.
    fn recycle(&mut self, payload: Vec<u8>) {
        drop(payload);
    }

    /// Serialised state of `key` (a record key seen since the last commit),
    /// or `None` when the key has nothing to persist. Stateless transforms
    /// keep the default.
    fn state(&self, key: &[u8]) -> Option<Vec<u8>> {
        let _ = key;
        None
    }

    /// A hint that [`Transform::state`] of `key` is asked for next: a
    /// transform with much state may start loading it into the cache. The
    /// job calls it one key ahead while it writes the states of a
    /// transaction. It must not change anything [`Transform::state`] or
    /// [`Transform::process`] return.
    fn prefetch_state(&self, key: &[u8]) {
        let _ = key;
    }

    /// Loads the persisted state of `key` in `partition`: called once per
    /// key with its last state in the state topic (read to its end first,
    /// as compaction would leave it; tombstones are skipped). A state the
    /// transform cannot read leaves the key without state, not with an
    /// older one.
    fn restore(&mut self, partition: i32, key: &[u8], state: &[u8]) {
        let _ = (partition, key, state);
    }

    /// Drops all in-memory state of `partition` (revoked, or about to be
    /// restored after an abort).
    fn forget_partition(&mut self, partition: i32) {
        let _ = partition;
    }
}
