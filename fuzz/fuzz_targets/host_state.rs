//! Fuzzes the scorer's host state restore (the state topic's records, binary
//! `"WBHS"` or the JSON of earlier builds): any bytes must be restored or skipped,
//! and a host restored from them must score its next record or refuse it with a
//! typed error, never panic. Half the inputs get a valid header and checksum
//! put in front, so the fuzzer reaches the body decoder.
//! Run with `cargo +nightly fuzz run host_state` from the repo root.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use waterbear_features::FeatureParams;
use waterbear_models::RuleBaseline;
use waterbear_stream::{Record, Transform};
use waterbear_streamjob::{HOST_STATE_MAGIC, HOST_STATE_VERSION, Scorer};
use waterbear_telemetry::{HostRecord, encode_binary_to_vec};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let state = if mode & 1 == 1 {
        let mut s = HOST_STATE_MAGIC.to_vec();
        s.extend_from_slice(&HOST_STATE_VERSION.to_le_bytes());
        s.extend_from_slice(&crc32fast::hash(rest).to_le_bytes());
        s.extend_from_slice(rest);
        s
    } else {
        rest.to_vec()
    };
    let mut scorer = Scorer::new(
        FeatureParams::default(),
        Arc::new(RuleBaseline::default()),
        "scores".into(),
        300_000,
    );
    scorer.restore(0, b"h1", &state);
    for ts in [1_700_000_000_000i64, 1_700_000_600_000] {
        let rec = HostRecord::example("h1", ts);
        let payload = encode_binary_to_vec(&rec);
        let _ = scorer.process(&Record {
            partition: 0,
            offset: 0,
            timestamp_ms: Some(ts),
            key: Some(b"h1"),
            payload: &payload,
        });
    }
    let _ = scorer.flush();
});
