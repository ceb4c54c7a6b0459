//! Records taken from librdkafka in batches.
//!
//! `BaseConsumer::poll` hands out one record per call, and each call locks
//! librdkafka's queue, reads the clock several times and allocates an event
//! (`docs/benchmarks-stream.md`, the profile of the fourteenth measurement).
//! A [`FetchQueue`] is a queue of the consumer's own client that the
//! assigned partitions' fetch queues are forwarded to ([`FetchQueue::route`]);
//! [`FetchQueue::fill`] takes up to its capacity in one call
//! (`rd_kafka_consume_batch_queue`).
//!
//! Rebalances, errors and statistics stay on the consumer queue, so the
//! consumer's own `poll` (and with it the rebalance callbacks) keeps working:
//! call it between fills. librdkafka ends the forwarding when it stops
//! fetching a partition and does not restore it on the next assignment, so
//! every assignment must be routed again, before its first fetch (e.g. in
//! the post-rebalance callback: the first fetch needs two broker round
//! trips, offsets then records). A record fetched before its partition was
//! routed comes out of `poll` as before.
//!
//! This is the only module of the crate that calls librdkafka's C API.

use std::ffi::CString;
use std::marker::PhantomData;
use std::ptr::NonNull;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::transform::Record;

/// A queue of one consumer's client holding the records of the partitions
/// routed to it. Must be dropped before that consumer.
pub struct FetchQueue {
    queue: NonNull<rd::rd_kafka_queue_t>,
    /// Messages of the last [`Self::fill`], owned until the next fill.
    msgs: Vec<*mut rd::rd_kafka_message_t>,
    cap: usize,
}

// SAFETY: a librdkafka queue handle may be used from any thread (its
// operations take the queue's lock); the messages are owned by this value
// and only read through `&self`.
unsafe impl Send for FetchQueue {}

impl FetchQueue {
    /// A new, empty queue on `consumer`'s client, filled `cap` (at least
    /// one) records at a time.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>, cap: usize) -> Self {
        // SAFETY: the client handle is valid while `consumer` lives;
        // `rd_kafka_queue_new` returns a new queue owned by the caller (or
        // null on allocation failure, which `NonNull::new` refuses).
        let queue = unsafe { rd::rd_kafka_queue_new(consumer.client().native_ptr()) };
        let queue = NonNull::new(queue).expect("rd_kafka_queue_new returned null");
        let cap = cap.max(1);
        Self {
            queue,
            msgs: Vec::with_capacity(cap),
            cap,
        }
    }

    /// Forwards the fetch queues of `partitions` of `topic` to this queue;
    /// returns the partitions the client does not know (not forwarded: their
    /// records keep coming out of the consumer's `poll`).
    pub fn route<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        topic: &str,
        partitions: &[i32],
    ) -> Vec<i32> {
        let Ok(name) = CString::new(topic) else {
            return partitions.to_vec();
        };
        let mut unknown = Vec::new();
        for &p in partitions {
            // SAFETY: the client handle is valid while `consumer` lives and
            // `name` is a NUL-terminated string that outlives the call. The
            // partition queue returned is a new reference owned by us,
            // released right after forwarding; forwarding takes its own
            // reference to the destination.
            unsafe {
                let pq = rd::rd_kafka_queue_get_partition(
                    consumer.client().native_ptr(),
                    name.as_ptr(),
                    p,
                );
                if pq.is_null() {
                    unknown.push(p);
                    continue;
                }
                rd::rd_kafka_queue_forward(pq, self.queue.as_ptr());
                rd::rd_kafka_queue_destroy(pq);
            }
        }
        unknown
    }

    /// Releases the previous fill's messages, then waits up to `wait` for a
    /// record and takes it and every record already queued behind it, up to
    /// the capacity. Returns how many it took.
    pub fn fill(&mut self, wait: Duration) -> usize {
        self.release();
        let wait_ms = i32::try_from(wait.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `msgs` has room for `cap` pointers and librdkafka writes at
        // most the size passed (first 1, then `cap - 1` after it); the
        // count it returns (or -1 on error) says how many it wrote. The
        // messages written are owned by us until `rd_kafka_message_destroy`.
        unsafe {
            let buf = self.msgs.as_mut_ptr();
            let first = rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), wait_ms, buf, 1);
            if first <= 0 {
                return 0;
            }
            let rest =
                rd::rd_kafka_consume_batch_queue(self.queue.as_ptr(), 0, buf.add(1), self.cap - 1);
            self.msgs.set_len(1 + rest.max(0) as usize);
        }
        self.msgs.len()
    }

    /// The messages of the last [`Self::fill`], in queue order.
    pub fn messages(&self) -> impl Iterator<Item = Fetched<'_>> + '_ {
        self.msgs.iter().map(|&m| Fetched {
            // SAFETY: every pointer in `msgs` came from
            // `rd_kafka_consume_batch_queue` and is not destroyed before
            // `release`, which needs `&mut self`.
            msg: unsafe { &*m },
            _queue: PhantomData,
        })
    }

    /// Destroys the messages of the last fill.
    fn release(&mut self) {
        for m in self.msgs.drain(..) {
            // SAFETY: each message came from `rd_kafka_consume_batch_queue`
            // and is destroyed exactly once (drained).
            unsafe { rd::rd_kafka_message_destroy(m) };
        }
    }
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        self.release();
        // SAFETY: the queue was created by `rd_kafka_queue_new`, is
        // destroyed once, and its client still lives (the owner drops this
        // before the consumer). Partitions forwarded to it keep a reference
        // to the underlying queue until their forwarding ends.
        unsafe { rd::rd_kafka_queue_destroy(self.queue.as_ptr()) };
    }
}

/// One message of a [`FetchQueue::fill`].
pub struct Fetched<'a> {
    msg: &'a rd::rd_kafka_message_t,
    _queue: PhantomData<&'a FetchQueue>,
}

impl<'a> Fetched<'a> {
    /// The record, or the consumer error this message carries.
    pub fn record(&self) -> Result<Record<'a>, KafkaError> {
        let m = self.msg;
        if m.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
            let code: RDKafkaErrorCode = m.err.into();
            return Err(if code == RDKafkaErrorCode::PartitionEOF {
                KafkaError::PartitionEOF(m.partition)
            } else {
                KafkaError::MessageConsumption(code)
            });
        }
        let mut kind = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
        // SAFETY: `m` is a live message (see `FetchQueue::messages`); the
        // timestamp call only reads it.
        let ts = unsafe { rd::rd_kafka_message_timestamp(m, &mut kind) };
        let timestamp_ms =
            (kind != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE && ts >= 0)
                .then_some(ts);
        // SAFETY: librdkafka keeps `key_len` bytes at `key` (and `len` at
        // `payload`) until the message is destroyed, which `'a` prevents.
        let key = unsafe { bytes(m.key as *const u8, m.key_len) };
        // SAFETY: as for the key.
        let payload = unsafe { bytes(m.payload as *const u8, m.len) }.unwrap_or_default();
        Ok(Record {
            partition: m.partition,
            offset: m.offset,
            timestamp_ms,
            key,
            payload,
        })
    }
}

/// # Safety
/// `ptr` is null or points at `len` readable bytes that live for `'a`.
unsafe fn bytes<'a>(ptr: *const u8, len: usize) -> Option<&'a [u8]> {
    if ptr.is_null() {
        None
    } else {
        // SAFETY: the caller's promise.
        Some(unsafe { std::slice::from_raw_parts(ptr, len) })
    }
}
