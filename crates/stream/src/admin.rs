//! Topic creation at start-up.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::RDKafkaErrorCode;
use tracing::info;

use crate::config::StreamParams;
use crate::job::{StreamError, base_config};

/// Creates the telemetry, alerts, DLQ and (compacted) state topics if they
/// are missing, with the configured partition counts, and checks that the
/// state topic has exactly as many partitions as the telemetry topic (state
/// of input partition `p` lives in state partition `p`).
pub async fn ensure_topics(p: &StreamParams) -> Result<(), StreamError> {
    let admin: AdminClient<DefaultClientContext> = base_config(p).create()?;
    let r = create_and_check(&admin, p).await;
    // Dropping an `AdminClient` joins its polling thread, which polls with a
    // 100 ms timeout: done here, every start-up waited ~0.1 s per call on a
    // runtime worker. The client is idle by now, so let a blocking thread
    // wait for it.
    drop(tokio::task::spawn_blocking(move || drop(admin)));
    r
}

async fn create_and_check(
    admin: &AdminClient<DefaultClientContext>,
    p: &StreamParams,
) -> Result<(), StreamError> {
    let repl = || TopicReplication::Fixed(p.replication_factor);
    let topics = [
        NewTopic::new(&p.telemetry_topic, p.telemetry_partitions, repl()),
        NewTopic::new(&p.alerts_topic, p.alerts_partitions, repl()),
        NewTopic::new(&p.dlq_topic, p.dlq_partitions, repl()),
        NewTopic::new(&p.state_topic, p.telemetry_partitions, repl())
            .set("cleanup.policy", "compact")
            .set("min.compaction.lag.ms", "0")
            .set("segment.ms", "600000"),
    ];
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in admin.create_topics(&topics, &opts).await? {
        match r {
            Ok(name) => info!(topic = %name, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => {
                return Err(StreamError::Setup(format!("creating topic {name}: {code}")));
            }
        }
    }
    let telemetry = partition_count(admin, &p.telemetry_topic)?;
    let state = partition_count(admin, &p.state_topic)?;
    if telemetry != state {
        return Err(StreamError::Setup(format!(
            "state topic {} has {state} partitions but telemetry topic {} has {telemetry}; they must match",
            p.state_topic, p.telemetry_topic
        )));
    }
    Ok(())
}

fn partition_count(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<usize, StreamError> {
    // Metadata may lag a just-created topic for a moment: wait on the
    // condition (partitions visible) with a deadline.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let md = admin
            .inner()
            .fetch_metadata(Some(topic), Duration::from_secs(10))?;
        if let Some(t) = md.topics().iter().find(|t| t.name() == topic)
            && t.error().is_none()
            && !t.partitions().is_empty()
        {
            return Ok(t.partitions().len());
        }
        if std::time::Instant::now() > deadline {
            return Err(StreamError::Setup(format!(
                "topic {topic} not visible in metadata after 30s"
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
