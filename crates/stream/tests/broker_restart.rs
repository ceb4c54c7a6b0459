//! (4) The broker is restarted mid-stream; the job recovers by itself and
//! nothing is lost or duplicated. A separate test binary because restarting
//! the shared broker would disturb the other tests (cargo runs test
//! binaries one after another).
//!
//! Needs the broker to be one started by `scripts/with-kafka.sh` (it
//! exports WATERBEAR_KAFKA_SCRIPT and KAFKA_PORT, used to restart it). With
//! an external cluster (KAFKA_BOOTSTRAP only) the test says so and passes.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

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
    let names = Names::new("restart");
    let parts = 3;
    create_topic(&names.telemetry, parts);
    let dir = tmpdir();
    let cfg = names.write_config(&dir, parts, 300, 50);
    let log = dir.join(format!("{}.log", names.group));
    let n = 12_000;
    let ins = inputs("", n, 50);
    let (first, second) = ins.split_at(n / 2);
    let mut feeder = TxnFeeder::new(&format!("{}-feeder", names.group));
    for chunk in first.chunks(500) {
        feeder.send_chunk(&names.telemetry, chunk);
    }

    let mut job = spawn_job(&cfg, "r0", &log);
    let mut c = Collector::new(&names.alerts, parts);
    c.wait_for(n / 4, Duration::from_secs(60), "before restart");
    // Keep producing while the broker goes down and comes back.
    let feeder = feeder.stream_in_background(
        &names.telemetry,
        second.to_vec(),
        250,
        Duration::from_millis(20),
    );
    let t0 = Instant::now();
    let st = Command::new(&script)
        .arg("restart")
        .status()
        .expect("run kafka.sh restart");
    assert!(st.success(), "kafka.sh restart failed");
    eprintln!(
        "broker restarted in {:?} at {} outputs",
        t0.elapsed(),
        c.recs.len()
    );
    feeder.join().unwrap();
    c.wait_for(n, Duration::from_secs(180), "after broker restart");
    let st = sigterm_and_wait(&mut job, Duration::from_secs(60));
    assert!(st.success(), "job exit status {st} (log {})", log.display());
    c.drain();
    assert_exactly_once(&expected(&ins), &c.recs);
}
