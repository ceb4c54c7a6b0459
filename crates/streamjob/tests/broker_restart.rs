//! (4) The broker is restarted mid-stream; the job (scorer + decider)
//! recovers by itself and every decision appears exactly once, identical to
//! the in-process pipeline's. Separate test binary: it restarts the shared
//! broker. Needs a broker started by `scripts/with-kafka.sh`
//! (WATERBEAR_KAFKA_SCRIPT); otherwise it says SKIPPED and passes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use waterbear_pipeline::PipelineConfig;
use waterbear_streamjob::simulate::sim_records;

#[test]
fn broker_restart_mid_stream_loses_nothing() {
    init_tracing();
    let _ = bootstrap();
    let Ok(script) = std::env::var("WATERBEAR_KAFKA_SCRIPT") else {
        eprintln!(
            "SKIPPED: broker restart needs a broker started by scripts/with-kafka.sh (WATERBEAR_KAFKA_SCRIPT unset)"
        );
        return;
    };
    let names = JobNames::new("brestart");
    let recs = sim_records(sim_config(40, 3.0, 13)).unwrap();
    let expected = pipeline_decisions(&recs, PipelineConfig::default());
    assert!(expected.len() >= 3);
    create_topic(&names.telemetry, 1);
    let dir = tmpdir();
    let cfg = names.write_config(&dir, 1, "");
    let log = dir.join(format!("{}.log", names.id));
    let input = wire(&recs);
    let (first, second) = input.split_at(input.len() / 3);
    let mut feeder = TxnFeeder::new(&format!("feed-{}", names.id));
    for chunk in first.chunks(1000) {
        feeder.send_chunk(&names.telemetry, chunk);
    }
    let mut job = spawn_ready(&cfg, "r0", &log);
    let mut scores = Collector::new(&names.scores, 1);
    scores.wait_for_items(
        first.len() / 2,
        scores_in,
        Duration::from_secs(60),
        "scores before restart",
    );
    let feeder = feeder.stream_in_background(
        &names.telemetry,
        second.to_vec(),
        500,
        Duration::from_millis(20),
    );
    let t0 = Instant::now();
    let st = Command::new(&script)
        .arg("restart")
        .status()
        .expect("run kafka.sh restart");
    assert!(st.success(), "kafka.sh restart failed");
    eprintln!("broker restarted in {:?}", t0.elapsed());
    feeder.join().unwrap();
    let mut alerts = Collector::new(&names.alerts, 1);
    alerts.wait_for(
        expected.len(),
        Duration::from_secs(180),
        "alerts after restart",
    );
    let st = sigterm_and_wait(&mut job, Duration::from_secs(60));
    assert!(st.success(), "job exit {st} (log {})", log.display());
    alerts.drain();
    let (got, total) = decisions_by_id(&alerts.recs);
    assert_eq!(total, expected.len(), "every decision exactly once");
    for d in &expected {
        assert_eq!(got.get(&d.id), Some(d), "decision {}", d.id);
    }
}
