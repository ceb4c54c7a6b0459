//! Configuration: [`StreamConfig`] is what `pipelines/streaming.toml` says;
//! [`StreamConfig::validate`] turns it into [`StreamParams`], the checked
//! values the job runs with.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// Errors from loading or validating the configuration. Messages name the
/// offending field, e.g. `partitions.telemetry must be >= 1`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// File that could not be read.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The TOML did not parse or had unknown/missing fields.
    #[error("parsing {path}: {message}")]
    Parse {
        /// File (or `<string>`) that did not parse.
        path: String,
        /// What the parser said (includes the field path).
        message: String,
    },
    /// A field had an invalid value.
    #[error("{field} {message}")]
    Invalid {
        /// Dotted path of the field, e.g. `partitions.telemetry`.
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Top-level sections of `pipelines/streaming.toml` that belong to the
/// waterbear job (`crates/streamjob`), which reads the same file; see
/// [`StreamConfig::from_toml_str_skipping`].
pub const JOB_SECTIONS: &[&str] = &["job", "archive", "features", "baseline", "policy"];

/// The `[kafka]`, `[topics]`, `[partitions]`, `[batch]` and `[metrics]`
/// sections of `pipelines/streaming.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamConfig {
    /// How to reach Kafka and how the clients behave.
    pub kafka: KafkaConfig,
    /// Topic names.
    pub topics: TopicsConfig,
    /// Partition counts used when creating missing topics.
    pub partitions: PartitionsConfig,
    /// Transaction batching.
    #[serde(default)]
    pub batch: BatchConfig,
    /// Prometheus endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[kafka]`: connection, group and transaction settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated (`host:port,host:port`). The
    /// `KAFKA_BOOTSTRAP` environment variable overrides it when
    /// [`StreamConfig::apply_env`] is called (the binaries do).
    pub brokers: String,
    /// Consumer group id shared by all instances of the job.
    pub group_id: String,
    /// Prefix of the transactional id; each instance uses
    /// `<prefix>-<instance_id>`.
    pub transactional_id_prefix: String,
    /// This instance's id: must be unique among live instances and stable
    /// across restarts of the same instance (e.g. a StatefulSet pod name), so
    /// that a restarted instance fences its predecessor's open transaction at
    /// once. Empty = taken from `WATERBEAR_INSTANCE_ID`, else `HOSTNAME`.
    #[serde(default)]
    pub instance_id: String,
    /// Use static group membership (`group.instance.id` = instance id): a
    /// restarted instance gets its partitions back without a rebalance.
    #[serde(default = "default_true")]
    pub static_membership: bool,
    /// Consumer group session timeout: how long a dead instance keeps its
    /// partitions before another instance takes them over.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Transaction timeout: how long an instance that died mid-transaction
    /// and never comes back blocks read_committed readers of its outputs.
    #[serde(default = "default_transaction_timeout_ms")]
    pub transaction_timeout_ms: u64,
    /// Raw librdkafka settings applied to every client (consumer, producer,
    /// admin), e.g. `"security.protocol" = "SASL_SSL"`, `"ssl.ca.location"`,
    /// `"sasl.mechanisms"`, `"sasl.username"`, `"sasl.password"`.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
    /// Raw librdkafka settings for the consumers only (fetch sizes, ...).
    #[serde(default)]
    pub consumer: BTreeMap<String, String>,
    /// Raw librdkafka settings for the producer only (linger.ms,
    /// compression.type, batch.size, ...).
    #[serde(default)]
    pub producer: BTreeMap<String, String>,
}

/// `[topics]`: topic names.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Input topic (host telemetry).
    pub telemetry: String,
    /// Output topic for [`crate::Topic::Alerts`].
    pub alerts: String,
    /// Dead-letter topic for [`crate::Topic::Dlq`]: records the transform
    /// rejected, with the original bytes and a reason header.
    pub dlq: String,
    /// Compacted topic holding per-key transform state, one partition per
    /// input partition, written in the same transaction as the outputs.
    pub state: String,
    /// Create missing topics at start-up.
    #[serde(default = "default_true")]
    pub create: bool,
    /// Replication factor for topics created at start-up.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
}

/// `[partitions]`: partition counts for topics created at start-up. The state
/// topic always has as many partitions as the telemetry topic.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionsConfig {
    /// Partitions of the telemetry (input) topic and of the state topic.
    pub telemetry: i32,
    /// Partitions of the alerts topic.
    pub alerts: i32,
    /// Partitions of the DLQ topic.
    pub dlq: i32,
}

/// `[batch]`: how many records go into one transaction.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    /// Commit after this many input records.
    #[serde(default = "default_max_records")]
    pub max_records: usize,
    /// Commit at the latest this long after the transaction's first record.
    #[serde(default = "default_max_ms")]
    pub max_ms: u64,
    /// Commit an open transaction once no record has arrived for this long,
    /// instead of waiting out `max_ms`: when the input runs dry (the end of a
    /// backlog, a quiet partition, the decider between two score batches)
    /// the last records' outputs become visible this much after them. Must be
    /// < `max_ms`; 0 turns it off.
    #[serde(default)]
    pub idle_ms: u64,
    /// Timeout for transaction calls (init/commit/abort/send offsets) before
    /// the attempt is abandoned and retried or aborted.
    #[serde(default = "default_txn_call_timeout_ms")]
    pub txn_call_timeout_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_max_records(),
            max_ms: default_max_ms(),
            idle_ms: 0,
            txn_call_timeout_ms: default_txn_call_timeout_ms(),
        }
    }
}

/// `[metrics]`: Prometheus `/metrics` endpoint.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `/metrics` on, e.g. `127.0.0.1:9464`; empty = off.
    #[serde(default)]
    pub listen: String,
}

fn default_true() -> bool {
    true
}
fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_transaction_timeout_ms() -> u64 {
    10_000
}
fn default_replication() -> i32 {
    1
}
fn default_max_records() -> usize {
    10_000
}
fn default_max_ms() -> u64 {
    100
}
fn default_txn_call_timeout_ms() -> u64 {
    10_000
}

/// librdkafka settings the job manages itself; setting them through the raw
/// maps would break the delivery guarantees.
const MANAGED_KEYS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "group.instance.id",
    "transactional.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "isolation.level",
    "enable.idempotence",
    "transaction.timeout.ms",
    "session.timeout.ms",
    "enable.partition.eof",
];

/// Checked configuration the job runs with.
#[derive(Debug, Clone)]
pub struct StreamParams {
    /// Bootstrap servers.
    pub brokers: String,
    /// Consumer group id.
    pub group_id: String,
    /// `<prefix>-<instance_id>`.
    pub transactional_id: String,
    /// This instance's id.
    pub instance_id: String,
    /// Use `group.instance.id`.
    pub static_membership: bool,
    /// Consumer session timeout.
    pub session_timeout: Duration,
    /// Producer transaction timeout.
    pub transaction_timeout: Duration,
    /// Settings for every client.
    pub extra: BTreeMap<String, String>,
    /// Settings for consumers.
    pub consumer: BTreeMap<String, String>,
    /// Settings for the producer.
    pub producer: BTreeMap<String, String>,
    /// Input topic.
    pub telemetry_topic: String,
    /// Alerts topic.
    pub alerts_topic: String,
    /// DLQ topic.
    pub dlq_topic: String,
    /// State topic.
    pub state_topic: String,
    /// Create missing topics.
    pub create_topics: bool,
    /// Replication factor of created topics.
    pub replication_factor: i32,
    /// Partitions of telemetry and state.
    pub telemetry_partitions: i32,
    /// Partitions of alerts.
    pub alerts_partitions: i32,
    /// Partitions of DLQ.
    pub dlq_partitions: i32,
    /// Records per transaction.
    pub batch_max_records: usize,
    /// Time per transaction.
    pub batch_max_time: Duration,
    /// Input silence after which an open transaction is committed.
    pub batch_idle: Option<Duration>,
    /// Timeout of one transaction call.
    pub txn_call_timeout: Duration,
    /// Metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
}

impl StreamConfig {
    /// Reads and parses a TOML file (unknown fields are errors).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Like [`StreamConfig::from_toml_str`] for a file that also holds other
    /// components' top-level sections, named in `skip` (which are dropped
    /// unread), e.g. [`JOB_SECTIONS`] of `pipelines/streaming.toml`. Every
    /// other unknown field is still an error.
    pub fn from_toml_str_skipping(
        text: &str,
        origin: &str,
        skip: &[&str],
    ) -> Result<Self, ConfigError> {
        let perr = |message: String| ConfigError::Parse {
            path: origin.to_string(),
            message,
        };
        let mut table: toml::Table = toml::from_str(text).map_err(|e| perr(e.to_string()))?;
        for k in skip {
            table.remove(*k);
        }
        table
            .try_into()
            .map_err(|e: toml::de::Error| perr(e.to_string()))
    }

    /// Applies environment overrides: `KAFKA_BOOTSTRAP` replaces
    /// `kafka.brokers`, `WATERBEAR_INSTANCE_ID` replaces an empty
    /// `kafka.instance_id`.
    pub fn apply_env(&mut self) {
        if let Ok(b) = std::env::var("KAFKA_BOOTSTRAP")
            && !b.trim().is_empty()
        {
            self.kafka.brokers = b;
        }
        if self.kafka.instance_id.is_empty()
            && let Ok(id) = std::env::var("WATERBEAR_INSTANCE_ID")
        {
            self.kafka.instance_id = id;
        }
    }

    /// Checks every field and returns the parameters the job runs with.
    pub fn validate(&self) -> Result<StreamParams, ConfigError> {
        let k = &self.kafka;
        if k.brokers.trim().is_empty() {
            return Err(invalid("kafka.brokers", "must not be empty"));
        }
        non_empty_id("kafka.group_id", &k.group_id)?;
        non_empty_id("kafka.transactional_id_prefix", &k.transactional_id_prefix)?;
        let instance_id = if k.instance_id.is_empty() {
            std::env::var("WATERBEAR_INSTANCE_ID")
                .or_else(|_| std::env::var("HOSTNAME"))
                .unwrap_or_default()
        } else {
            k.instance_id.clone()
        };
        non_empty_id(
            "kafka.instance_id (or WATERBEAR_INSTANCE_ID/HOSTNAME)",
            &instance_id,
        )?;
        if !(1_000..=3_600_000).contains(&k.session_timeout_ms) {
            return Err(invalid(
                "kafka.session_timeout_ms",
                "must be in 1000..=3600000",
            ));
        }
        if !(1_000..=900_000).contains(&k.transaction_timeout_ms) {
            return Err(invalid(
                "kafka.transaction_timeout_ms",
                "must be in 1000..=900000",
            ));
        }
        for (section, map) in [
            ("kafka.extra", &k.extra),
            ("kafka.consumer", &k.consumer),
            ("kafka.producer", &k.producer),
        ] {
            for key in map.keys() {
                if MANAGED_KEYS.contains(&key.as_str()) {
                    return Err(invalid(
                        format!("{section}.\"{key}\""),
                        "is managed by waterbear-stream and cannot be overridden",
                    ));
                }
            }
        }

        let t = &self.topics;
        for (field, name) in [
            ("topics.telemetry", &t.telemetry),
            ("topics.alerts", &t.alerts),
            ("topics.dlq", &t.dlq),
            ("topics.state", &t.state),
        ] {
            topic_name(field, name)?;
        }
        let names = [&t.telemetry, &t.alerts, &t.dlq, &t.state];
        for i in 0..names.len() {
            for j in i + 1..names.len() {
                if names[i] == names[j] {
                    return Err(invalid(
                        "topics",
                        format!("names must be distinct, '{}' is used twice", names[i]),
                    ));
                }
            }
        }
        if t.replication_factor < 1 {
            return Err(invalid("topics.replication_factor", "must be >= 1"));
        }

        let p = &self.partitions;
        for (field, n) in [
            ("partitions.telemetry", p.telemetry),
            ("partitions.alerts", p.alerts),
            ("partitions.dlq", p.dlq),
        ] {
            if n < 1 {
                return Err(invalid(field, "must be >= 1"));
            }
        }

        let b = &self.batch;
        if b.max_records < 1 {
            return Err(invalid("batch.max_records", "must be >= 1"));
        }
        if b.max_ms < 1 {
            return Err(invalid("batch.max_ms", "must be >= 1"));
        }
        if b.max_ms >= k.transaction_timeout_ms {
            return Err(invalid(
                "batch.max_ms",
                "must be < kafka.transaction_timeout_ms",
            ));
        }
        if b.idle_ms >= b.max_ms {
            return Err(invalid(
                "batch.idle_ms",
                "must be < batch.max_ms (0 turns it off)",
            ));
        }
        if b.txn_call_timeout_ms < 100 {
            return Err(invalid("batch.txn_call_timeout_ms", "must be >= 100"));
        }

        let metrics_listen = if self.metrics.listen.trim().is_empty() {
            None
        } else {
            Some(
                self.metrics
                    .listen
                    .trim()
                    .parse::<SocketAddr>()
                    .map_err(|e| {
                        invalid(
                            "metrics.listen",
                            format!("must be host:port with an IP host ({e})"),
                        )
                    })?,
            )
        };

        Ok(StreamParams {
            brokers: k.brokers.trim().to_string(),
            group_id: k.group_id.clone(),
            transactional_id: format!("{}-{}", k.transactional_id_prefix, instance_id),
            instance_id,
            static_membership: k.static_membership,
            session_timeout: Duration::from_millis(k.session_timeout_ms),
            transaction_timeout: Duration::from_millis(k.transaction_timeout_ms),
            extra: k.extra.clone(),
            consumer: k.consumer.clone(),
            producer: k.producer.clone(),
            telemetry_topic: t.telemetry.clone(),
            alerts_topic: t.alerts.clone(),
            dlq_topic: t.dlq.clone(),
            state_topic: t.state.clone(),
            create_topics: t.create,
            replication_factor: t.replication_factor,
            telemetry_partitions: p.telemetry,
            alerts_partitions: p.alerts,
            dlq_partitions: p.dlq,
            batch_max_records: b.max_records,
            batch_max_time: Duration::from_millis(b.max_ms),
            batch_idle: (b.idle_ms > 0).then(|| Duration::from_millis(b.idle_ms)),
            txn_call_timeout: Duration::from_millis(b.txn_call_timeout_ms),
            metrics_listen,
        })
    }
}

fn non_empty_id(field: &str, v: &str) -> Result<(), ConfigError> {
    if v.trim().is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if v.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(field, "must not contain whitespace"));
    }
    Ok(())
}

/// Kafka's own rule: 1..=249 chars of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn topic_name(field: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() || name.len() > 249 {
        return Err(invalid(field, "must be 1 to 249 characters"));
    }
    if name == "." || name == ".." {
        return Err(invalid(field, "must not be '.' or '..'"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(invalid(
            field,
            format!("has '{c}'; only [a-zA-Z0-9._-] are allowed"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE_TEXT: &str = include_str!("../../../pipelines/streaming.toml");

    fn example() -> StreamConfig {
        let mut c =
            StreamConfig::from_toml_str_skipping(EXAMPLE_TEXT, "streaming.toml", JOB_SECTIONS)
                .unwrap();
        c.kafka.instance_id = "test-0".into();
        c
    }

    #[test]
    fn shipped_config_validates() {
        let p = example().validate().unwrap();
        assert_eq!(p.telemetry_topic, "telemetry");
        assert_eq!(p.dlq_topic, "telemetry.dlq");
        assert_eq!(p.transactional_id, "waterbear-stream-test-0");
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = example();
        c.partitions.telemetry = 0;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "partitions.telemetry must be >= 1"
        );

        let mut c = example();
        c.topics.alerts = "bad topic".into();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("topics.alerts has ' '")
        );

        let mut c = example();
        c.kafka
            .extra
            .insert("enable.auto.commit".into(), "true".into());
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("kafka.extra.\"enable.auto.commit\" is managed")
        );

        let mut c = example();
        c.batch.idle_ms = c.batch.max_ms;
        assert_eq!(
            c.validate().unwrap_err().to_string(),
            "batch.idle_ms must be < batch.max_ms (0 turns it off)"
        );
        c.batch.idle_ms = 0;
        assert_eq!(c.validate().unwrap().batch_idle, None);
        c.batch.idle_ms = 1;
        assert_eq!(
            c.validate().unwrap().batch_idle,
            Some(Duration::from_millis(1))
        );

        let mut c = example();
        c.topics.dlq = c.topics.alerts.clone();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .starts_with("topics names must be distinct")
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let text = EXAMPLE_TEXT.replace("[batch]", "[batch]\nmax_recs = 3");
        let e = StreamConfig::from_toml_str(&text, "x")
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_recs"), "{e}");
    }
}
