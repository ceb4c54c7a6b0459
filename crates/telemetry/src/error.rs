use thiserror::Error;

/// Why a telemetry record was rejected. Every variant names the offending field where
/// there is one, so a dead-letter entry says exactly what to fix at the source.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ValidationError {
    /// The encoded record is larger than the wire format allows.
    #[error("record is {size} bytes, more than the limit of {limit}")]
    Oversized {
        /// Size of the encoded record.
        size: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// Not JSON, or JSON of the wrong shape (e.g. an array where an object belongs).
    #[error("malformed record: {message}")]
    Malformed {
        /// The parser's message, with line and column.
        message: String,
    },
    /// The `v` field names a wire version this build does not read.
    #[error("unsupported wire version {found} (this build reads version {supported})")]
    UnsupportedVersion {
        /// Version found in the record.
        found: u64,
        /// Version this build reads.
        supported: u32,
    },
    /// A binary record whose body does not match its checksum (damaged in transit or
    /// at the source).
    #[error("binary record checksum {computed:#010x} does not match the stored {stored:#010x}")]
    ChecksumMismatch {
        /// CRC-32 stored in the header.
        stored: u32,
        /// CRC-32 of the body as received.
        computed: u32,
    },
    /// A required field is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// Field path.
        field: String,
    },
    /// A field that the schema does not define.
    #[error("unknown field `{field}`")]
    UnknownField {
        /// Field path.
        field: String,
    },
    /// A field holds a value of the wrong type.
    #[error("field `{field}` has the wrong type: {message}")]
    WrongType {
        /// Field path.
        field: String,
        /// What the parser expected.
        message: String,
    },
    /// NaN or infinity (or a number too large for a float).
    #[error("field `{field}` is not a finite number")]
    NonFinite {
        /// Field path.
        field: String,
    },
    /// A negative value in a field that cannot be negative.
    #[error("field `{field}` is negative ({value})")]
    Negative {
        /// Field path.
        field: String,
        /// The value, as text.
        value: String,
    },
    /// A value outside the field's range.
    #[error("field `{field}` = {value} is outside [{min}, {max}]")]
    OutOfRange {
        /// Field path.
        field: String,
        /// The value.
        value: f64,
        /// Lowest allowed value.
        min: f64,
        /// Highest allowed value.
        max: f64,
    },
    /// An identifier that must not be empty is empty (or too long).
    #[error("field `{field}` must be 1..={max_len} bytes long, got {len}")]
    BadIdentifier {
        /// Field path.
        field: String,
        /// Its length.
        len: usize,
        /// Longest allowed.
        max_len: usize,
    },
    /// A list holds more entries than allowed.
    #[error("field `{field}` has {count} entries, more than the limit of {limit}")]
    TooMany {
        /// Field path.
        field: String,
        /// Entries found.
        count: usize,
        /// The limit.
        limit: usize,
    },
    /// A cumulative counter is lower than in the host's previous record.
    #[error("counter `{field}` went backwards from {previous} to {current}")]
    CounterWentBackwards {
        /// Counter name.
        field: String,
        /// Value in the previous record.
        previous: u64,
        /// Value now.
        current: u64,
    },
    /// The timestamp is further in the future than the allowed clock skew.
    #[error(
        "timestamp {ts_ms} is {ahead_ms} ms ahead of now ({now_ms}); at most {max_skew_ms} allowed"
    )]
    FutureTimestamp {
        /// Record timestamp (ms since the Unix epoch).
        ts_ms: i64,
        /// The caller's "now".
        now_ms: i64,
        /// How far ahead it is.
        ahead_ms: i64,
        /// Allowed skew.
        max_skew_ms: i64,
    },
    /// The timestamp is not after the host's previous record (duplicate or reordered).
    #[error("timestamp {ts_ms} is not after the host's previous record at {previous_ts_ms}")]
    OutOfOrder {
        /// Record timestamp.
        ts_ms: i64,
        /// Timestamp of the previous accepted record of the host.
        previous_ts_ms: i64,
    },
}

impl ValidationError {
    /// A short stable code for metrics labels and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Oversized { .. } => "oversized",
            Self::Malformed { .. } => "malformed",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::ChecksumMismatch { .. } => "checksum",
            Self::MissingField { .. } => "missing_field",
            Self::UnknownField { .. } => "unknown_field",
            Self::WrongType { .. } => "wrong_type",
            Self::NonFinite { .. } => "non_finite",
            Self::Negative { .. } => "negative",
            Self::OutOfRange { .. } => "out_of_range",
            Self::BadIdentifier { .. } => "bad_identifier",
            Self::TooMany { .. } => "too_many",
            Self::CounterWentBackwards { .. } => "counter_backwards",
            Self::FutureTimestamp { .. } => "future_timestamp",
            Self::OutOfOrder { .. } => "out_of_order",
        }
    }
}
