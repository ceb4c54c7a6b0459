//! The Parquet archive (`[archive]`) of the real job against a real broker:
//! SIGKILLed at random points and restarted, it ends with every valid
//! telemetry record in exactly one finished file, malformed records in none.

mod common;

use std::collections::BTreeSet;
use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use arrow_array::{Array, Int64Array, StringArray};
use common::*;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rand::Rng;
use waterbear_streamjob::simulate::sim_records;

/// (host, ts) of every row of every finished file, and the row count.
fn archived(dir: &Path) -> (BTreeSet<(String, i64)>, usize) {
    let mut keys = BTreeSet::new();
    let mut rows = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return (keys, 0);
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.extension().is_none_or(|x| x != "parquet") {
            continue;
        }
        // a finished file is complete: it must read (footer and all)
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&p).unwrap())
            .unwrap_or_else(|e| panic!("{} is not a whole Parquet file: {e}", p.display()))
            .build()
            .unwrap();
        for b in reader {
            let b = b.unwrap();
            let h = b
                .column_by_name("host_id")
                .unwrap()
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap()
                .clone();
            let t = b
                .column_by_name("ts_ms")
                .unwrap()
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .clone();
            for i in 0..h.len() {
                keys.insert((h.value(i).to_string(), t.value(i)));
            }
            rows += b.num_rows();
        }
    }
    (keys, rows)
}

#[test]
fn archive_survives_sigkill_with_every_record_exactly_once() {
    init_tracing();
    let names = JobNames::new("archive");
    let recs = sim_records(sim_config(30, 1.5, 17)).unwrap();
    let want: BTreeSet<(String, i64)> = recs.iter().map(|r| (r.host_id.clone(), r.ts_ms)).collect();
    assert_eq!(want.len(), recs.len(), "(host, ts) is unique in the input");
    create_topic(&names.telemetry, 2);
    let dir = tmpdir();
    let adir = dir.join(format!("archive-{}", names.id));
    let cfg = names.write_config(
        &dir,
        2,
        &format!(
            "[archive]\ndir = \"{}\"\nroll_records = 700\nroll_ms = 300\nrow_group = 200\n",
            adir.display()
        ),
    );
    let log = dir.join(format!("{}.log", names.id));
    let tel = names.telemetry.clone();
    let fid = format!("feed-{}", names.id);
    let mut input = wire(&recs);
    // malformed records in between: not archived, but their offsets pass
    for (i, bad) in [&b"not json"[..], b"{\"v\":1}", b"\xff\xfe"]
        .iter()
        .enumerate()
    {
        input.insert(100 + i * 997, (b"h-bad".to_vec(), bad.to_vec()));
    }
    let feeder =
        TxnFeeder::new(&fid).stream_in_background(&tel, input, 400, Duration::from_millis(80));
    let mut rng = rand::thread_rng();
    let mut job = spawn_job(&cfg, "a0", &log);
    for i in 0..4 {
        // a random kill point while the feeder streams (not a wait for a condition)
        let ms = rng.gen_range(600..2000);
        std::thread::sleep(Duration::from_millis(ms));
        sigkill(&mut job);
        eprintln!(
            "kill {i} after {ms} ms: {} rows archived",
            archived(&adir).1
        );
        job = spawn_ready(&cfg, "a0", &log);
    }
    // A second instance pointed at the same directory is refused before it
    // joins any group, so it cannot finish files over the first one's.
    let log2 = dir.join(format!("{}-second.log", names.id));
    let mut second = spawn_job(&cfg, "a1", &log2);
    let end = Instant::now() + Duration::from_secs(60);
    let st = loop {
        if let Some(st) = second.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            Instant::now() < end,
            "a second archiver on the same directory kept running (log {})",
            log2.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = std::fs::read_to_string(&log2).unwrap();
    assert!(!st.success(), "second instance exit {st}: {text}");
    assert!(
        text.contains("is in use by another running instance"),
        "{text}"
    );
    feeder.join().unwrap();
    // wait until every record is in a finished file
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let (keys, _) = archived(&adir);
        if keys.len() >= want.len() {
            break;
        }
        assert!(
            Instant::now() < end,
            "archive has {} of {} records after 120 s (log {})",
            keys.len(),
            want.len(),
            log.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let st = sigterm_and_wait(&mut job, Duration::from_secs(60));
    assert!(st.success(), "job exit {st} (log {})", log.display());
    let (keys, rows) = archived(&adir);
    assert_eq!(keys, want, "the archive holds exactly the valid records");
    assert_eq!(rows, want.len(), "and each once");
    let leftovers = std::fs::read_dir(&adir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    assert_eq!(leftovers, 0, "a clean stop leaves no unfinished file");
}
