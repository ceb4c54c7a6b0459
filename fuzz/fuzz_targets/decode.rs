//! Fuzzes the telemetry decoder: any bytes must give a record or a typed error, never a
//! panic, and every record it accepts must re-encode, in JSON and in the binary layout,
//! to something it accepts again; `decode_into` (reusing a record's buffers) agrees
//! with `decode` on every input.
//! Run with `cargo +nightly fuzz run decode` from the repo root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use waterbear_telemetry::{HostRecord, decode, decode_into, encode_binary_to_vec, encode_to_vec};

fuzz_target!(|data: &[u8]| {
    // the scorer's reusing decoder gives the same record or the same error
    let mut out = HostRecord::example("reused-buffer-host", 1);
    out.vms.truncate(1);
    assert_eq!(decode_into(data, &mut out).map(|()| out), decode(data));
    if let Ok(rec) = decode(data) {
        let again = decode(&encode_to_vec(&rec)).expect("a decoded record re-encodes to a valid one");
        assert_eq!(again, rec);
        let again = decode(&encode_binary_to_vec(&rec)).expect("binary re-encoding decodes");
        assert_eq!(again, rec);
    }
});
