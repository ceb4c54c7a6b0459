use std::io::Write;

use serde::Deserialize;

use crate::error::ValidationError;
use crate::record::HostRecord;

/// The wire format version this build writes and reads.
pub const WIRE_VERSION: u32 = 1;

/// Largest encoded record accepted, bytes. A host with the maximum number of VMs and
/// long identifiers stays well below it; anything larger is a bug or an attack.
pub const MAX_RECORD_BYTES: usize = 64 * 1024;

/// JSON Schema (draft 2020-12) of wire version 1; the file lives in the crate's `schema/`.
pub const JSON_SCHEMA_V1: &str = include_str!("../schema/host-record.v1.schema.json");

/// Writes one record as a single line of JSON (no trailing newline).
pub fn encode<W: Write>(rec: &HostRecord, out: W) -> std::io::Result<()> {
    serde_json::to_writer(out, rec).map_err(std::io::Error::other)
}

/// Encodes one record into a fresh buffer.
pub fn encode_to_vec(rec: &HostRecord) -> Vec<u8> {
    let mut buf = Vec::with_capacity(640);
    // Writing into a Vec cannot fail and a HostRecord always serialises.
    encode(rec, &mut buf).expect("serialising a HostRecord into memory cannot fail");
    buf
}

/// Decodes and statically validates one record.
///
/// Order of checks: size, JSON syntax and shape, version, fields, values
/// ([`HostRecord::check`]). Stateful checks are [`crate::Validator`]'s.
pub fn decode(bytes: &[u8]) -> Result<HostRecord, ValidationError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(ValidationError::Oversized {
            size: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    // serde also accepts a struct written as a JSON array; the wire format does not.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(ValidationError::Malformed {
            message: "a record must be a JSON object".into(),
        });
    }
    // Fast path: plain serde_json. Only a record that fails is parsed again with
    // path tracking, to name the failing field (it takes 2.8 us per record against
    // 1.5 us: `cargo bench -p waterbear-telemetry --bench decode`).
    if let Ok(rec) = serde_json::from_slice::<HostRecord>(bytes) {
        rec.check()?;
        return Ok(rec);
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let rec: HostRecord = match serde_path_to_error::deserialize(&mut de) {
        Ok(rec) => rec,
        Err(err) => return Err(classify(bytes, err)),
    };
    if let Err(err) = de.end() {
        return Err(ValidationError::Malformed {
            message: err.to_string(),
        });
    }
    rec.check()?;
    Ok(rec)
}

#[derive(Deserialize)]
struct VersionProbe {
    v: Option<serde_json::Value>,
}

/// Maps a serde error to the most specific [`ValidationError`].
fn classify(bytes: &[u8], err: serde_path_to_error::Error<serde_json::Error>) -> ValidationError {
    // A record of another version fails for another reason first (its fields differ),
    // so look at `v` before anything else.
    if let Ok(VersionProbe { v: Some(v) }) = serde_json::from_slice::<VersionProbe>(bytes) {
        match v.as_u64() {
            Some(n) if n == u64::from(WIRE_VERSION) => {}
            Some(n) => {
                return ValidationError::UnsupportedVersion {
                    found: n,
                    supported: WIRE_VERSION,
                };
            }
            None => {}
        }
    }
    let path = err.path().to_string();
    let inner = err.into_inner();
    let msg = inner.to_string();
    let field_at = |name: &str| {
        if path == "." || path.is_empty() {
            name.to_owned()
        } else {
            format!("{path}.{name}")
        }
    };
    use serde_json::error::Category;
    match inner.classify() {
        Category::Syntax | Category::Eof | Category::Io => {
            if msg.starts_with("number out of range") {
                ValidationError::NonFinite { field: path }
            } else {
                ValidationError::Malformed { message: msg }
            }
        }
        Category::Data => {
            if let Some(name) = backticked(&msg, "missing field `") {
                // serde reports a missing field at the path of its parent
                let field = if path == "." { name } else { field_at(&name) };
                ValidationError::MissingField { field }
            } else if let Some(name) = backticked(&msg, "unknown field `") {
                let parent = path.rsplit_once('.').map(|(p, _)| p).unwrap_or("");
                let field = if parent.is_empty() || parent == "." {
                    name
                } else {
                    format!("{parent}.{name}")
                };
                ValidationError::UnknownField { field }
            } else if let Some(value) = backticked(&msg, "invalid value: integer `-") {
                ValidationError::Negative {
                    field: path,
                    value: format!("-{value}"),
                }
            } else if path == "." {
                ValidationError::Malformed { message: msg }
            } else {
                ValidationError::WrongType {
                    field: path,
                    message: msg,
                }
            }
        }
    }
}

/// The text between `prefix` and the next backtick, if `msg` starts with `prefix`.
fn backticked(msg: &str, prefix: &str) -> Option<String> {
    let rest = msg.strip_prefix(prefix)?;
    let end = rest.find('`')?;
    Some(rest[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn example_json() -> Value {
        serde_json::to_value(HostRecord::example("host-1", 1_700_000_000_000)).unwrap()
    }

    fn decode_value(v: &Value) -> Result<HostRecord, ValidationError> {
        decode(&serde_json::to_vec(v).unwrap())
    }

    #[test]
    fn round_trip() {
        let rec = HostRecord::example("host-1", 1_700_000_000_000);
        assert_eq!(decode(&encode_to_vec(&rec)).unwrap(), rec);
    }

    #[test]
    fn malformed_json() {
        for bad in [&b"{"[..], b"not json", b"[1,2]", b"", b"{\"v\":1}{}"] {
            let err = decode(bad).unwrap_err();
            assert!(
                matches!(
                    err,
                    ValidationError::Malformed { .. } | ValidationError::MissingField { .. }
                ),
                "{bad:?} -> {err:?}"
            );
        }
        assert_eq!(decode(b"{").unwrap_err().kind(), "malformed");
        assert_eq!(decode(b"[1,2]").unwrap_err().kind(), "malformed");
        let mut trailing = encode_to_vec(&HostRecord::example("h", 1));
        trailing.extend_from_slice(b" {}");
        assert_eq!(decode(&trailing).unwrap_err().kind(), "malformed");
    }

    #[test]
    fn missing_field_is_named() {
        let mut v = example_json();
        v.as_object_mut().unwrap().remove("smart_197_raw");
        assert_eq!(
            decode_value(&v).unwrap_err(),
            ValidationError::MissingField {
                field: "smart_197_raw".into()
            }
        );
        let mut v = example_json();
        v["vms"][1].as_object_mut().unwrap().remove("mem_mib");
        assert_eq!(
            decode_value(&v).unwrap_err(),
            ValidationError::MissingField {
                field: "vms[1].mem_mib".into()
            }
        );
    }

    #[test]
    fn unknown_field_is_named() {
        let mut v = example_json();
        v["gpu_util"] = json!(0.5);
        assert_eq!(
            decode_value(&v).unwrap_err(),
            ValidationError::UnknownField {
                field: "gpu_util".into()
            }
        );
        let mut v = example_json();
        v["vms"][0]["owner"] = json!("x");
        assert_eq!(
            decode_value(&v).unwrap_err(),
            ValidationError::UnknownField {
                field: "vms[0].owner".into()
            }
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let mut v = example_json();
        v["cpu_util"] = json!("high");
        let err = decode_value(&v).unwrap_err();
        assert!(
            matches!(&err, ValidationError::WrongType { field, .. } if field == "cpu_util"),
            "{err:?}"
        );
    }

    #[test]
    fn non_finite_numbers() {
        // JSON has no NaN; a literal NaN is a syntax error, an overflowing float is non-finite
        let text = String::from_utf8(encode_to_vec(&HostRecord::example("h", 1))).unwrap();
        let overflow = text.replace("\"cpu_util\":0.42", "\"cpu_util\":1e999");
        assert_eq!(
            decode(overflow.as_bytes()).unwrap_err(),
            ValidationError::NonFinite {
                field: "cpu_util".into()
            }
        );
        let nan = text.replace("\"cpu_util\":0.42", "\"cpu_util\":NaN");
        assert_eq!(decode(nan.as_bytes()).unwrap_err().kind(), "malformed");
        // records built in memory are checked too
        let mut rec = HostRecord::example("h", 1);
        rec.disk_latency_ms = f64::INFINITY;
        assert_eq!(
            rec.check().unwrap_err(),
            ValidationError::NonFinite {
                field: "disk_latency_ms".into()
            }
        );
        rec.disk_latency_ms = f64::NAN;
        assert_eq!(rec.check().unwrap_err().kind(), "non_finite");
    }

    #[test]
    fn negative_values() {
        let mut v = example_json();
        v["smart_5_raw"] = json!(-3);
        assert_eq!(
            decode_value(&v).unwrap_err(),
            ValidationError::Negative {
                field: "smart_5_raw".into(),
                value: "-3".into()
            }
        );
        let mut v = example_json();
        v["disk_read_iops"] = json!(-1.5);
        assert_eq!(decode_value(&v).unwrap_err().kind(), "negative");
        let mut v = example_json();
        v["ts_ms"] = json!(-1);
        assert_eq!(decode_value(&v).unwrap_err().kind(), "negative");
    }

    #[test]
    fn out_of_range_and_identifiers() {
        let mut v = example_json();
        v["cpu_util"] = json!(1.5);
        assert_eq!(decode_value(&v).unwrap_err().kind(), "out_of_range");
        let mut v = example_json();
        v["host_id"] = json!("");
        assert_eq!(decode_value(&v).unwrap_err().kind(), "bad_identifier");
    }

    #[test]
    fn unsupported_version() {
        let mut v = example_json();
        v["v"] = json!(2);
        v["new_field_of_v2"] = json!(true);
        assert_eq!(
            decode_value(&v).unwrap_err(),
            ValidationError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
    }

    #[test]
    fn oversized_records() {
        let mut rec = HostRecord::example("h", 1);
        rec.vms = (0..600)
            .map(|i| crate::VmInfo {
                id: format!("{:0>120}", i),
                mem_mib: 1,
            })
            .collect();
        let bytes = encode_to_vec(&rec);
        assert!(bytes.len() > MAX_RECORD_BYTES);
        assert_eq!(
            decode(&bytes).unwrap_err(),
            ValidationError::Oversized {
                size: bytes.len(),
                limit: MAX_RECORD_BYTES
            }
        );
        rec.vms = (0..600)
            .map(|i| crate::VmInfo {
                id: format!("v{i}"),
                mem_mib: 1,
            })
            .collect();
        assert_eq!(decode(&encode_to_vec(&rec)).unwrap_err().kind(), "too_many");
    }

    #[test]
    fn json_schema_lists_exactly_the_record_fields() {
        let schema: Value = serde_json::from_str(JSON_SCHEMA_V1).unwrap();
        let mut required: Vec<String> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        let mut props: Vec<String> = schema["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut fields: Vec<String> = example_json()
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        required.sort();
        props.sort();
        fields.sort();
        assert_eq!(required, fields);
        assert_eq!(props, fields);
        assert_eq!(schema["additionalProperties"], json!(false));
        let vm = &schema["properties"]["vms"]["items"];
        let mut vm_fields: Vec<String> = vm["required"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect();
        vm_fields.sort();
        assert_eq!(vm_fields, vec!["id".to_owned(), "mem_mib".to_owned()]);
    }

    proptest::proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn valid_records_round_trip(cpu in 0.0f64..=1.0, lat in 0.0f64..1000.0, s5 in 0u64..1_000_000, ts in 0i64..4_000_000_000_000) {
            let mut rec = HostRecord::example("h-prop", ts);
            rec.cpu_util = cpu;
            rec.disk_latency_ms = lat;
            rec.smart_5_raw = s5;
            proptest::prop_assert_eq!(decode(&encode_to_vec(&rec)).unwrap(), rec);
        }
    }
}
