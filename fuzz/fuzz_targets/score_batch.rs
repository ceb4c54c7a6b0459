//! Fuzzes the scores topic's decoder (`ScoreBatch`, stage 1 -> stage 2 of the
//! stream job): any bytes must give a batch or a typed error, never a panic, and
//! every batch it accepts must re-encode to one that decodes to the same scores.
//! Run with `cargo +nightly fuzz run score_batch` from the repo root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waterbear_streamjob::{ScoreBatch, ScoreBatchWriter};

fuzz_target!(|data: &[u8]| {
    if let Ok(b) = ScoreBatch::decode(data) {
        let mut w = ScoreBatchWriter::default();
        for s in &b.scores {
            w.push(s);
        }
        let bytes = w.finish(b.cluster, b.model);
        let again = ScoreBatch::decode(&bytes).expect("a decoded batch re-encodes to a valid one");
        assert_eq!(again.cluster, b.cluster);
        assert_eq!(again.model, b.model);
        assert_eq!(again.scores.len(), b.scores.len());
        for (x, y) in again.scores.iter().zip(&b.scores) {
            // bit-exact floats, NaN included
            assert_eq!(x.score.to_bits(), y.score.to_bits());
            assert_eq!((x.host, x.rack, x.ts, x.sig), (y.host, y.rack, y.ts, y.sig));
        }
    }
});
