//! Host telemetry for waterbear: one [`HostRecord`] per host per interval.
//!
//! This crate sits at the bottom of the workspace. It defines
//! - the record type and its fields ([`HostRecord`], [`VmInfo`]),
//! - the versioned JSON wire format ([`decode`], [`encode`], [`WIRE_VERSION`]); the JSON
//!   Schema of version 1 is `schema/host-record.v1.schema.json`, also exported as
//!   [`JSON_SCHEMA_V1`],
//! - validation with one typed error per bad case ([`ValidationError`]): static checks in
//!   [`decode`] / [`HostRecord::check`], and checks that need the host's previous record
//!   (counters going backwards, time going backwards) in [`Validator`],
//! - the Arrow schema of a batch of records ([`arrow_schema`]).
//!
//! Nothing here reads a clock: "now" is always an argument.
//!
//! ```
//! use waterbear_telemetry::{decode, encode_to_vec, HostRecord, Validator};
//!
//! let rec = HostRecord::example("host-0001", 1_700_000_000_000);
//! let bytes = encode_to_vec(&rec);
//! let back = decode(&bytes).expect("a valid record decodes");
//! assert_eq!(back, rec);
//!
//! let mut v = Validator::default();
//! v.check(&back, 1_700_000_000_000).expect("first record of a host is fine");
//! let mut older = back.clone();
//! older.ecc_corrected -= 1; // a counter went backwards
//! older.ts_ms += 60_000;
//! assert!(v.check(&older, 1_700_000_060_000).is_err());
//! ```

mod arrow;
mod error;
mod record;
mod validate;
mod wire;

pub use arrow::arrow_schema;
pub use error::ValidationError;
pub use record::{CRITICAL_SMART, HostRecord, VmInfo};
pub use validate::{LastAccepted, Limits, Validator, check_host};
pub use wire::{
    BINARY_MAGIC, BINARY_VERSION, JSON_SCHEMA_V1, MAX_RECORD_BYTES, WIRE_VERSION, WireFormat,
    decode, decode_into, encode, encode_binary, encode_binary_to_vec, encode_to_vec,
};
