//! The waterbear streaming job on Kafka, in two stages around
//! [`waterbear_stream::run`] (see `docs/streaming.md`):
//!
//! * [`Scorer`] (stage 1, input `telemetry` keyed by host): decode + validate
//!   (invalid records go to the DLQ with the error kind and message), features,
//!   detector; emits the scores to the `scores` topic keyed by CLUSTER, as one
//!   binary [`ScoreBatch`] per (input partition, cluster) and transaction
//!   (at most [`MAX_SCORES_PER_BATCH`] scores each). Per-host state (feature
//!   `HostState` and the validator's last timestamp/counters) is persisted
//!   through the per-key state topic.
//! * [`Decider`] (stage 2, input `scores` keyed by cluster, so one writer per
//!   cluster): runs the `Policy` over the cluster's scores and produces
//!   serde_json `Decision`s to `alerts` keyed by host. Its state is the
//!   cluster's policy snapshot (plain serde data), restored as it was.

pub mod archive;
mod batch;
pub mod cli;
mod config;
pub mod decider;
pub mod scorer;
pub mod simulate;

pub use archive::{
    ArchiveConfig, ArchiveError, ArchiveMetrics, ArchiveParams, ArchiveStats, Archiver,
};
pub use batch::{
    HostScore, MAX_SCORES_PER_BATCH, SCORE_BATCH_MAGIC, SCORE_BATCH_MAX_BYTES, SCORE_BATCH_VERSION,
    ScoreBatch, ScoreBatchError, ScoreBatchWriter,
};
pub use config::{JobConfig, JobConfigError, JobSection, Role};
pub use decider::Decider;
pub use scorer::Scorer;
pub use simulate::{SimulateError, SimulateOptions, simulate};

use waterbear_stream::{Metrics, run_with_metrics};

/// Why the job stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// A stream loop (scorer or decider).
    #[error(transparent)]
    Stream(#[from] waterbear_stream::StreamError),
    /// The archiver.
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    /// The archiver's thread panicked.
    #[error("archive thread: {0}")]
    ArchiveTask(String),
}

/// Header with the validation error kind on DLQ records (the message is in
/// `dlq.reason`, as `kind: message`).
pub const DLQ_KIND_HEADER: &str = "dlq.kind";

/// Runs the job's role(s) until `shutdown` completes (SIGTERM/SIGINT in the
/// binary). With [`Role::Both`] the scorer and the decider run as two
/// exactly-once loops in this process.
pub async fn run_job<S>(cfg: JobConfig, role: Role, shutdown: S) -> Result<(), JobError>
where
    S: std::future::Future<Output = ()> + Send + 'static,
{
    run_job_with_metrics(cfg, role, shutdown, Metrics::new(), Metrics::new()).await
}

/// [`run_job`] with caller-provided metrics for the scorer and the decider
/// (the benchmark reads them in-process).
pub async fn run_job_with_metrics<S>(
    cfg: JobConfig,
    role: Role,
    shutdown: S,
    scorer_metrics: Metrics,
    decider_metrics: Metrics,
) -> Result<(), JobError>
where
    S: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::watch::channel(false);
    let tx = std::sync::Arc::new(tx);
    let stop = tx.clone();
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop.send(true);
    });
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let scorer_params = cfg.scorer_params();
    let decider_params = cfg.decider_params(role == Role::Both);
    // The decider's topics first: the scores topic must exist before the
    // scorer produces to it.
    if cfg.stream.topics.create {
        waterbear_stream::ensure_topics(&decider_params).await?;
        waterbear_stream::ensure_topics(&scorer_params).await?;
    }
    // The archive runs beside the scorer (it reads the same telemetry topic).
    let archiver = match (&cfg.archive, role) {
        (Some(ap), Role::Scorer | Role::Both) => {
            let left = archive::remove_leftovers(&ap.dir)?;
            if left > 0 {
                tracing::info!(
                    files = left,
                    "removed unfinished archive files of an earlier run"
                );
            }
            let a = Archiver::new(&cfg.params, ap.clone())?
                .with_metrics(ArchiveMetrics::new(&scorer_metrics.registry));
            let (rxa, txa) = (rx.clone(), tx.clone());
            Some(tokio::task::spawn_blocking(move || {
                let r = a.run(|| *rxa.borrow());
                if let Err(e) = &r {
                    tracing::error!(error = %e, "archiver failed; stopping the job");
                    let _ = txa.send(true);
                }
                r
            }))
        }
        _ => None,
    };
    match role {
        Role::Scorer => {
            let s = run_with_metrics(scorer_params, cfg.scorer(), wait(rx), scorer_metrics).await?;
            tracing::info!(?s, "scorer stopped");
        }
        Role::Decider => {
            let s =
                run_with_metrics(decider_params, cfg.decider(), wait(rx), decider_metrics).await?;
            tracing::info!(?s, "decider stopped");
        }
        Role::Both => {
            // If one loop fails, stop the other too (the process exits non-zero).
            let (ta, tb) = (tx.clone(), tx.clone());
            let (scorer, decider, rxa) = (cfg.scorer(), cfg.decider(), rx.clone());
            let a = async move {
                let r = run_with_metrics(scorer_params, scorer, wait(rxa), scorer_metrics).await;
                if r.is_err() {
                    let _ = ta.send(true);
                }
                r
            };
            let b = async move {
                let r = run_with_metrics(decider_params, decider, wait(rx), decider_metrics).await;
                if r.is_err() {
                    let _ = tb.send(true);
                }
                r
            };
            let (a, b) = tokio::join!(a, b);
            tracing::info!(scorer = ?a, decider = ?b, "stopped");
            a?;
            b?;
        }
    }
    if let Some(h) = archiver {
        let _ = tx.send(true);
        let stats = h
            .await
            .map_err(|e| JobError::ArchiveTask(e.to_string()))??;
        tracing::info!(?stats, "archive stopped");
    }
    Ok(())
}
