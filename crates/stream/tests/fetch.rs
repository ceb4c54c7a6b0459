//! The batch queue ([`FetchQueue`]) against a real Kafka broker
//! (`KAFKA_BOOTSTRAP`). Run: `scripts/with-kafka.sh cargo test -p waterbear-stream --test fetch`.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use waterbear_stream::FetchQueue;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// What one partition handed out: (offset, key, value, timestamp).
type Seen = BTreeMap<i32, Vec<(i64, Vec<u8>, Vec<u8>, Option<i64>)>>;

/// Reads until `n` records came: the consumer queue without waiting, then
/// one fill of `q` (routing `routed` again every 250 ms, as the job does).
/// Returns what came each way and the largest fill.
fn read(
    c: &BaseConsumer,
    q: &mut FetchQueue,
    topic: &str,
    routed: &[i32],
    n: usize,
) -> (Seen, Seen, usize) {
    let (mut batched, mut polled) = (Seen::new(), Seen::new());
    let mut largest = 0;
    let total = |s: &Seen| s.values().map(Vec::len).sum::<usize>();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last_route = Instant::now();
    while total(&batched) + total(&polled) < n {
        assert!(
            Instant::now() < deadline,
            "{} batched and {} polled of {n}",
            total(&batched),
            total(&polled)
        );
        if last_route.elapsed() >= Duration::from_millis(250) {
            q.route(c, topic, routed);
            last_route = Instant::now();
        }
        while let Some(m) = c.poll(Duration::ZERO) {
            let m = m.expect("no consumer error");
            polled.entry(m.partition()).or_default().push((
                m.offset(),
                m.key().unwrap().to_vec(),
                m.payload().unwrap().to_vec(),
                m.timestamp().to_millis(),
            ));
        }
        let got = q.fill(Duration::from_millis(10));
        assert_eq!(q.messages().count(), got);
        largest = largest.max(got);
        for m in q.messages() {
            let r = m.record().expect("no consumer error");
            batched.entry(r.partition).or_default().push((
                r.offset,
                r.key.unwrap().to_vec(),
                r.payload.to_vec(),
                r.timestamp_ms,
            ));
        }
    }
    (batched, polled, largest)
}

/// Records of routed partitions come out of `fill` in batches of at most the
/// capacity; a partition that is not routed keeps coming out of `poll`.
/// Every record comes once, in offset order, with its key, value and
/// timestamp.
#[test]
fn the_fetch_queue_hands_out_every_record_once_in_order_and_in_batches() {
    init_tracing();
    let names = Names::new("fetchq");
    let parts = 3;
    let n = 3000;
    create_topic(&names.telemetry, parts);
    let ins = inputs("", n, 11);
    let before = now_ms();
    let p = producer();
    produce(&p, &names.telemetry, &ins);
    flush(&p);
    let after = now_ms();

    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap())
        .set("group.id", &names.group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for part in 0..parts {
        tpl.add_partition_offset(&names.telemetry, part, Offset::Beginning)
            .unwrap();
    }
    c.assign(&tpl).unwrap();
    let cap = 64;
    let mut q = FetchQueue::new(&c, cap);
    assert_eq!(q.route(&c, &names.telemetry, &[0, 1]), Vec::<i32>::new());

    let (batched, polled, largest) = read(&c, &mut q, &names.telemetry, &[0, 1], n);
    assert!(
        largest <= cap,
        "{largest} records in one fill of capacity {cap}"
    );
    assert_eq!(batched.keys().copied().collect::<Vec<_>>(), vec![0, 1]);
    assert_eq!(polled.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert!(largest > 1, "records came one at a time");

    let mut seen: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (part, recs) in batched.iter().chain(polled.iter()) {
        let offsets: Vec<i64> = recs.iter().map(|r| r.0).collect();
        let expect: Vec<i64> = (0..recs.len() as i64).collect();
        assert_eq!(
            offsets, expect,
            "partition {part}: every offset once, in order"
        );
        for (_, k, v, ts) in recs {
            let ts = ts.expect("a timestamp");
            assert!(
                (before..=after).contains(&ts),
                "timestamp {ts} outside [{before}, {after}]"
            );
            seen.push((k.clone(), v.clone()));
        }
    }
    seen.sort();
    let mut sent = ins.clone();
    sent.sort();
    assert_eq!(seen, sent, "every record's key and value, once");

    // Assigned again after an unassign, as after a rebalance: routed before
    // the assign (and again every 250 ms in `read`, as the job does, in case
    // a fetcher's stop completes late and ends the routing), the routed
    // partitions' new records come out of `fill` again, from where the
    // first round ended.
    c.unassign().unwrap();
    let more = inputs("again-", 600, 11);
    produce(&p, &names.telemetry, &more);
    flush(&p);
    let mut tpl = TopicPartitionList::new();
    for part in 0..parts {
        let next = batched.get(&part).or(polled.get(&part)).map_or(0, Vec::len);
        tpl.add_partition_offset(&names.telemetry, part, Offset::Offset(next as i64))
            .unwrap();
    }
    assert_eq!(q.route(&c, &names.telemetry, &[0, 1]), Vec::<i32>::new());
    c.assign(&tpl).unwrap();
    let (batched2, polled2, _) = read(&c, &mut q, &names.telemetry, &[0, 1], more.len());
    assert!(
        polled2.keys().all(|&p| p == 2),
        "only partition 2 is polled"
    );
    let mut seen2: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    for (part, recs) in batched2.iter().chain(polled2.iter()) {
        let first = batched.get(part).or(polled.get(part)).map_or(0, Vec::len) as i64;
        let offsets: Vec<i64> = recs.iter().map(|r| r.0).collect();
        let expect: Vec<i64> = (first..first + recs.len() as i64).collect();
        assert_eq!(
            offsets, expect,
            "partition {part}: on from the first round, in order"
        );
        seen2.extend(recs.iter().map(|(_, k, v, _)| (k.clone(), v.clone())));
    }
    seen2.sort();
    let mut sent2 = more.clone();
    sent2.sort();
    assert_eq!(seen2, sent2, "every new record once");
    // The queue goes before its consumer.
    drop(q);
}
