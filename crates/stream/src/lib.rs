//! Kafka plumbing of waterbear: an exactly-once consume-transform-produce
//! loop around a synchronous [`Transform`], with per-key state recovered
//! from a compacted state topic, a DLQ, Prometheus metrics and graceful
//! shutdown. See `docs/streaming.md`.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use waterbear_stream::{StreamConfig, run, shutdown_signal, echo::EchoUpper};
//! let mut cfg = StreamConfig::from_file("pipelines/streaming.toml")?;
//! cfg.apply_env(); // KAFKA_BOOTSTRAP, WATERBEAR_INSTANCE_ID
//! let params = cfg.validate()?;
//! let summary = run(params, EchoUpper::new(), shutdown_signal()).await?;
//! # Ok(()) }
//! ```

pub mod admin;
pub mod config;
pub mod echo;
pub mod fetch;
mod heap;
pub mod job;
pub mod metrics;
pub mod transform;

pub use admin::ensure_topics;
pub use config::{ConfigError, JOB_SECTIONS, StreamConfig, StreamParams};
pub use fetch::{FetchQueue, Fetched};
pub use heap::{C_HEAP_MMAP_THRESHOLD, C_HEAP_TRIM_THRESHOLD, job_runtime, keep_c_heap_mapped};
pub use job::{
    FETCH_QUEUE_BACKOFF_MS, RunSummary, StreamError, consumer_config, run, run_with_metrics,
    shutdown_signal,
};
pub use metrics::{Metrics, serve_metrics};
pub use transform::{DLQ_REASON_HEADER, Output, Record, Topic, Transform};
