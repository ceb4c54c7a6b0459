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

/// First bytes of a record in the binary layout. A JSON record starts with `{` or
/// whitespace, so one decoder reads both.
pub const BINARY_MAGIC: [u8; 4] = *b"WBHR";
/// Binary layout version this build writes and reads.
pub const BINARY_VERSION: u16 = 1;
/// Magic, version (u16 LE), CRC-32 of the body (u32 LE).
const BINARY_HEADER: usize = 10;

/// bincode's standard config (varint integers, f64 as 8 bytes) with a limit, so a
/// length prefix that claims more than a record may hold allocates nothing.
fn bincode_cfg() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

/// Writes one record in the binary layout, Firecracker style:
///
/// ```text
/// "WBHR" | version u16 LE | CRC-32 (IEEE) of the body u32 LE | body: bincode (standard) of the record
/// ```
///
/// About a third of the JSON's size and several times faster to decode
/// (`cargo bench -p waterbear-telemetry --bench decode`); the fields, their checks and
/// [`WIRE_VERSION`] in `v` are the same as the JSON's.
pub fn encode_binary<W: Write>(rec: &HostRecord, mut out: W) -> std::io::Result<()> {
    out.write_all(&encode_binary_to_vec(rec))
}

/// Encodes one record in the binary layout into a fresh buffer.
pub fn encode_binary_to_vec(rec: &HostRecord) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&BINARY_MAGIC);
    buf.extend_from_slice(&BINARY_VERSION.to_le_bytes());
    buf.extend_from_slice(&[0; 4]);
    // Writing into a Vec cannot fail and a HostRecord always serialises.
    bincode::encode_into_std_write(rec, &mut buf, bincode_cfg())
        .expect("serialising a HostRecord into memory cannot fail");
    let crc = crc32fast::hash(&buf[BINARY_HEADER..]);
    buf[6..BINARY_HEADER].copy_from_slice(&crc.to_le_bytes());
    buf
}

/// The two encodings [`decode`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WireFormat {
    /// One JSON object (the default: readable with any Kafka tool).
    #[default]
    Json,
    /// The binary layout of [`encode_binary`].
    Binary,
}

impl WireFormat {
    /// Encodes one record in this format.
    pub fn encode_to_vec(self, rec: &HostRecord) -> Vec<u8> {
        match self {
            Self::Json => encode_to_vec(rec),
            Self::Binary => encode_binary_to_vec(rec),
        }
    }
}

fn decode_binary(bytes: &[u8]) -> Result<HostRecord, ValidationError> {
    if bytes.len() < BINARY_HEADER {
        return Err(ValidationError::Malformed {
            message: format!(
                "binary record of {} bytes is shorter than its {BINARY_HEADER}-byte header",
                bytes.len()
            ),
        });
    }
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version != BINARY_VERSION {
        return Err(ValidationError::UnsupportedVersion {
            found: u64::from(version),
            supported: u32::from(BINARY_VERSION),
        });
    }
    let stored = u32::from_le_bytes(bytes[6..BINARY_HEADER].try_into().expect("4 bytes"));
    let body = &bytes[BINARY_HEADER..];
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(ValidationError::ChecksumMismatch { stored, computed });
    }
    let (rec, used): (HostRecord, usize) = bincode::decode_from_slice(body, bincode_cfg())
        .map_err(|e| ValidationError::Malformed {
            message: format!("binary record body: {e}"),
        })?;
    if used != body.len() {
        return Err(ValidationError::Malformed {
            message: format!(
                "binary record body: {} bytes after the record",
                body.len() - used
            ),
        });
    }
    rec.check()?;
    Ok(rec)
}

/// [`decode`] into `out`, reusing its strings and VM list: a binary record
/// (the streaming job's hot path) then allocates nothing once `out` has held a
/// record as large. The result and every error are [`decode`]'s (a record
/// the fast path refuses is decoded again by [`decode`] for its error, and a
/// proptest checks both agree); on an error `out` holds unspecified values.
pub fn decode_into(bytes: &[u8], out: &mut HostRecord) -> Result<(), ValidationError> {
    let fast = bytes.len() <= MAX_RECORD_BYTES
        && bytes.len() >= BINARY_HEADER
        && bytes.starts_with(&BINARY_MAGIC)
        && u16::from_le_bytes([bytes[4], bytes[5]]) == BINARY_VERSION
        && {
            let stored = u32::from_le_bytes(bytes[6..BINARY_HEADER].try_into().expect("4 bytes"));
            crc32fast::hash(&bytes[BINARY_HEADER..]) == stored
        }
        && read_into(&bytes[BINARY_HEADER..], out).is_ok();
    if fast && out.check().is_ok() {
        return Ok(());
    }
    *out = decode(bytes)?;
    Ok(())
}

/// Why [`read_into`] stopped; the caller decodes the record again with
/// bincode for the error it reports, so this carries nothing.
#[derive(Debug)]
struct Refused;

/// A cursor over a record body that reads bincode's standard encoding
/// (little-endian varints, 8-byte floats) without bincode's decoder: its
/// byte-limit bookkeeping and per-field calls were most of the decode time.
/// It accepts what bincode accepts, non-minimal varints included, and
/// refuses the rest; `decode_into_agrees_with_decode` checks both on
/// damaged records.
struct Body<'a>(&'a [u8]);

impl<'a> Body<'a> {
    #[inline(always)]
    fn take(&mut self, n: usize) -> Result<&'a [u8], Refused> {
        let (head, tail) = self.0.split_at_checked(n).ok_or(Refused)?;
        self.0 = tail;
        Ok(head)
    }

    #[inline(always)]
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Refused> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// bincode's varint: one byte up to 250, else a marker (251: u16,
    /// 252: u32, 253: u64) and the value; `max_marker` is the widest
    /// marker the integer type takes.
    #[inline(always)]
    fn varint(&mut self, max_marker: u8) -> Result<u64, Refused> {
        let [b] = self.array::<1>()?;
        match b {
            0..=250 => Ok(u64::from(b)),
            251 => Ok(u64::from(u16::from_le_bytes(self.array()?))),
            252 if max_marker >= 252 => Ok(u64::from(u32::from_le_bytes(self.array()?))),
            253 if max_marker >= 253 => Ok(u64::from_le_bytes(self.array()?)),
            _ => Err(Refused),
        }
    }

    #[inline(always)]
    fn u32(&mut self) -> Result<u32, Refused> {
        // at most a u32 marker, so the value fits
        Ok(self.varint(252)? as u32)
    }

    #[inline(always)]
    fn u64(&mut self) -> Result<u64, Refused> {
        self.varint(253)
    }

    #[inline(always)]
    fn i64(&mut self) -> Result<i64, Refused> {
        // zigzag, as bincode
        let n = self.u64()?;
        Ok(if n % 2 == 0 {
            (n / 2) as i64
        } else {
            !(n / 2) as i64
        })
    }

    #[inline(always)]
    fn f64(&mut self) -> Result<f64, Refused> {
        Ok(f64::from_le_bytes(self.array()?))
    }

    /// A length-prefixed UTF-8 string into `into`, reusing its memory.
    #[inline(always)]
    fn text(&mut self, into: &mut String) -> Result<(), Refused> {
        let n = usize::try_from(self.u64()?).map_err(|_| Refused)?;
        let bytes = self.take(n)?;
        // Identifiers are ASCII: one word-wide check instead of the UTF-8
        // validator's call (`from_utf8` was ~3.5 % of the job's CPU).
        let s = if bytes.is_ascii() {
            // SAFETY: every byte is below 0x80, and a string of ASCII bytes is
            // valid UTF-8.
            unsafe { std::str::from_utf8_unchecked(bytes) }
        } else {
            std::str::from_utf8(bytes).map_err(|_| Refused)?
        };
        into.clear();
        into.push_str(s);
        Ok(())
    }
}

/// The body of a binary record into `out`, field by field in the order of
/// `HostRecord`'s derived `bincode::Decode` (the proptest
/// `decode_into_agrees_with_decode` fails if the two drift apart).
fn read_into(body: &[u8], out: &mut HostRecord) -> Result<(), Refused> {
    let mut d = Body(body);
    out.v = d.u32()?;
    d.text(&mut out.host_id)?;
    out.ts_ms = d.i64()?;
    d.text(&mut out.region)?;
    d.text(&mut out.cluster)?;
    d.text(&mut out.rack)?;
    out.fault_domain = d.u32()?;
    out.update_domain = d.u32()?;
    out.cpu_util = d.f64()?;
    out.mem_util = d.f64()?;
    out.disk_read_iops = d.f64()?;
    out.disk_write_iops = d.f64()?;
    out.disk_latency_ms = d.f64()?;
    out.smart_5_raw = d.u64()?;
    out.smart_9_raw = d.u64()?;
    out.smart_187_raw = d.u64()?;
    out.smart_188_raw = d.u64()?;
    out.smart_194_raw = d.u64()?;
    out.smart_197_raw = d.u64()?;
    out.smart_198_raw = d.u64()?;
    out.ecc_corrected = d.u64()?;
    out.ecc_uncorrected = d.u64()?;
    out.heartbeat_age_s = d.f64()?;
    out.kernel_events = d.u32()?;
    out.service_crashes = d.u32()?;
    let n = d.u64()?;
    // every VM takes at least two bytes: a longer list is a lie
    if n > (body.len() / 2) as u64 {
        return Err(Refused);
    }
    let n = n as usize;
    out.vms.truncate(n);
    for i in 0..n {
        if i == out.vms.len() {
            out.vms.push(crate::record::VmInfo::default());
        }
        let vm = &mut out.vms[i];
        d.text(&mut vm.id)?;
        vm.mem_mib = d.u32()?;
    }
    if !d.0.is_empty() {
        return Err(Refused);
    }
    Ok(())
}

/// Decodes and statically validates one record, JSON or binary ([`encode_binary`]:
/// told apart by [`BINARY_MAGIC`]).
///
/// Order of checks: size; for JSON: syntax and shape, version, fields; for binary:
/// header, version, checksum, body; then values ([`HostRecord::check`]). Stateful
/// checks are [`crate::Validator`]'s.
pub fn decode(bytes: &[u8]) -> Result<HostRecord, ValidationError> {
    if bytes.len() > MAX_RECORD_BYTES {
        return Err(ValidationError::Oversized {
            size: bytes.len(),
            limit: MAX_RECORD_BYTES,
        });
    }
    if bytes.starts_with(&BINARY_MAGIC) {
        return decode_binary(bytes);
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

    #[test]
    fn binary_round_trip_and_size() {
        let rec = HostRecord::example("host-1", 1_700_000_000_000);
        let bin = encode_binary_to_vec(&rec);
        assert!(bin.starts_with(&BINARY_MAGIC));
        assert_eq!(decode(&bin).unwrap(), rec);
        let json = encode_to_vec(&rec);
        assert!(
            bin.len() * 2 < json.len(),
            "{} vs {}",
            bin.len(),
            json.len()
        );
        assert_eq!(WireFormat::Binary.encode_to_vec(&rec), bin);
        assert_eq!(WireFormat::Json.encode_to_vec(&rec), json);
        let mut via_writer = Vec::new();
        encode_binary(&rec, &mut via_writer).unwrap();
        assert_eq!(via_writer, bin);
    }

    /// `bytes` (a binary header and any body) with the header's CRC set to match the
    /// body, so the decoder gets past the checksum to what follows.
    fn with_matching_crc(mut bytes: Vec<u8>) -> Vec<u8> {
        let crc = crc32fast::hash(&bytes[BINARY_HEADER..]);
        bytes[6..BINARY_HEADER].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    #[test]
    fn binary_errors_are_typed() {
        let rec = HostRecord::example("host-1", 1_700_000_000_000);
        let bin = encode_binary_to_vec(&rec);
        // every single corrupted byte of the body is caught by the checksum
        for i in BINARY_HEADER..bin.len() {
            let mut bad = bin.clone();
            bad[i] ^= 0x5a;
            assert_eq!(decode(&bad).unwrap_err().kind(), "checksum", "byte {i}");
        }
        let mut v2 = bin.clone();
        v2[4] = 2;
        assert_eq!(
            decode(&v2).unwrap_err(),
            ValidationError::UnsupportedVersion {
                found: 2,
                supported: 1
            }
        );
        assert_eq!(decode(&bin[..7]).unwrap_err().kind(), "malformed");
        // a body cut short, with a checksum that matches it
        let cut = with_matching_crc(bin[..bin.len() - 5].to_vec());
        let e = decode(&cut).unwrap_err();
        assert!(matches!(e, ValidationError::Malformed { .. }), "{e:?}");
        // trailing bytes, checksum fixed up
        let mut long = bin.clone();
        long.extend_from_slice(&[0, 0]);
        let long = with_matching_crc(long);
        assert!(
            decode(&long)
                .unwrap_err()
                .to_string()
                .contains("2 bytes after the record")
        );
        // the value checks of the JSON path apply
        let mut r = rec.clone();
        r.cpu_util = 1.5;
        assert_eq!(
            decode(&encode_binary_to_vec(&r)).unwrap_err().kind(),
            "out_of_range"
        );
        r.cpu_util = f64::NAN;
        assert_eq!(
            decode(&encode_binary_to_vec(&r)).unwrap_err().kind(),
            "non_finite"
        );
    }

    proptest::proptest! {
        #[test]
        fn binary_decode_never_panics(tail in proptest::collection::vec(proptest::num::u8::ANY, 0..600), fix_crc in proptest::bool::ANY) {
            let mut bytes = BINARY_MAGIC.to_vec();
            bytes.extend_from_slice(&BINARY_VERSION.to_le_bytes());
            bytes.extend_from_slice(&[0; 4]);
            bytes.extend_from_slice(&tail);
            if fix_crc {
                bytes = with_matching_crc(bytes);
            }
            let _ = decode(&bytes);
        }

        #[test]
        fn binary_records_round_trip(cpu in 0.0f64..=1.0, lat in 0.0f64..1000.0, s5 in 0u64..u64::MAX, ts in 0i64..4_000_000_000_000, vms in 0usize..40, host in "[a-z][a-z0-9-]{0,30}") {
            let mut rec = HostRecord::example(&host, ts);
            rec.cpu_util = cpu;
            rec.disk_latency_ms = lat;
            rec.smart_5_raw = s5;
            rec.vms = (0..vms).map(|i| crate::VmInfo { id: format!("{host}-vm{i}"), mem_mib: 1024 + i as u32 }).collect();
            let bin = encode_binary_to_vec(&rec);
            // The derived codec writes the bytes that earlier builds wrote
            // through serde (binary version 1), so records already in a topic
            // still decode.
            let via_serde = bincode::serde::encode_to_vec(&rec, bincode_cfg()).unwrap();
            proptest::prop_assert_eq!(&bin[BINARY_HEADER..], &via_serde[..]);
            proptest::prop_assert_eq!(
                bincode::serde::decode_from_slice::<HostRecord, _>(&bin[BINARY_HEADER..], bincode_cfg()).unwrap().0,
                rec.clone()
            );
            proptest::prop_assert_eq!(decode(&bin).unwrap(), rec.clone());
            proptest::prop_assert_eq!(decode(&encode_to_vec(&rec)).unwrap(), rec);
        }
    }

    /// A record with every field drawn on its own, so two fields of one type
    /// read in swapped order differ; values may fail the checks.
    fn any_record() -> impl proptest::strategy::Strategy<Value = HostRecord> {
        use proptest::prelude::*;
        // mostly ASCII, as real ids are; some with multi-byte characters, so
        // the string reader's non-ASCII branch is taken too
        let ids = prop_oneof![4 => "[a-z0-9-]{1,12}", 1 => "[a-z0-9é€-]{1,12}"];
        let f = prop_oneof![9 => 0.0f64..=1.0, 1 => any::<f64>()];
        let v = prop_oneof![9 => Just(WIRE_VERSION), 1 => any::<u32>()];
        let ts = prop_oneof![9 => 0i64..4_000_000_000_000, 1 => any::<i64>()];
        (
            (
                v,
                ids.clone(),
                ts,
                ids.clone(),
                ids.clone(),
                "[a-z0-9-]{0,12}",
                any::<u32>(),
                any::<u32>(),
            ),
            (f.clone(), f.clone(), 0.0f64..1e4, 0.0f64..1e4, f),
            proptest::array::uniform9(any::<u64>()),
            (0.0f64..1e4, any::<u32>(), any::<u32>()),
            proptest::collection::vec((ids, any::<u32>()), 0..12),
        )
            .prop_map(
                |(
                    (v, host, ts, region, cluster, rack, fd, ud),
                    (cpu, mem, r, w, lat),
                    c,
                    (hb, ke, sc),
                    vms,
                )| HostRecord {
                    v,
                    host_id: host,
                    ts_ms: ts,
                    region,
                    cluster,
                    rack,
                    fault_domain: fd,
                    update_domain: ud,
                    cpu_util: cpu,
                    mem_util: mem,
                    disk_read_iops: r,
                    disk_write_iops: w,
                    disk_latency_ms: lat,
                    smart_5_raw: c[0],
                    smart_9_raw: c[1],
                    smart_187_raw: c[2],
                    smart_188_raw: c[3],
                    smart_194_raw: c[4],
                    smart_197_raw: c[5],
                    smart_198_raw: c[6],
                    ecc_corrected: c[7],
                    ecc_uncorrected: c[8],
                    heartbeat_age_s: hb,
                    kernel_events: ke,
                    service_crashes: sc,
                    vms: vms
                        .into_iter()
                        .map(|(id, mem_mib)| crate::VmInfo { id, mem_mib })
                        .collect(),
                },
            )
    }

    proptest::proptest! {
        #[test]
        fn decode_into_agrees_with_decode(
            rec in any_record(),
            before in any_record(),
            json in proptest::bool::ANY,
            flip in proptest::option::of((0usize..400, 1u8..=255)),
            fix_crc in proptest::bool::ANY,
        ) {
            let mut bytes = if json { encode_to_vec(&rec) } else { encode_binary_to_vec(&rec) };
            if let Some((at, x)) = flip {
                let at = at % bytes.len();
                bytes[at] ^= x;
                if fix_crc && !json && at >= BINARY_HEADER {
                    bytes = with_matching_crc(bytes);
                }
            }
            let mut out = before;
            let got = decode_into(&bytes, &mut out);
            match decode(&bytes) {
                Ok(want) => {
                    proptest::prop_assert_eq!(got, Ok(()));
                    proptest::prop_assert_eq!(out, want);
                }
                Err(e) => proptest::prop_assert_eq!(got, Err(e)),
            }
        }
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
