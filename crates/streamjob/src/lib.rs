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
pub use scorer::{
    HOST_STATE_MAGIC, HOST_STATE_MAX_BYTES, HOST_STATE_VERSION, HostStateError, Scorer,
};
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
    /// A loop's task panicked or was cancelled.
    #[error("job task: {0}")]
    Task(String),
}

/// Runs one exactly-once loop as a task until `rx` says stop; a failed loop
/// tells the others to stop through `fail`.
fn spawn_loop<T: waterbear_stream::Transform + 'static>(
    params: waterbear_stream::StreamParams,
    transform: T,
    metrics: Metrics,
    mut rx: tokio::sync::watch::Receiver<bool>,
    fail: std::sync::Arc<tokio::sync::watch::Sender<bool>>,
) -> tokio::task::JoinHandle<Result<waterbear_stream::RunSummary, waterbear_stream::StreamError>> {
    tokio::spawn(async move {
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let r = run_with_metrics(params, transform, stop, metrics).await;
        if r.is_err() {
            let _ = fail.send(true);
        }
        r
    })
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
    let mut decider_params = cfg.decider_params(role == Role::Both);
    // Every topic of both stages exists before any loop starts (the scores
    // topic before the scorer produces to it), so the loops need not check
    // again: each check costs a round of admin requests at start-up.
    if cfg.stream.topics.create {
        let scorer_params = cfg.scorer_params();
        tokio::try_join!(
            waterbear_stream::ensure_topics(&decider_params),
            waterbear_stream::ensure_topics(&scorer_params),
        )?;
    }
    decider_params.create_topics = false;
    // The archive runs beside the scorer (it reads the same telemetry topic).
    let archiver = match (&cfg.archive, role) {
        (Some(ap), Role::Scorer | Role::Both) => {
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
    // Every loop runs as its own task; if one fails, all stop (the process
    // exits non-zero).
    let mut loops = Vec::new();
    if matches!(role, Role::Scorer | Role::Both) {
        for i in 0..cfg.job.scorer_loops {
            let mut p = cfg.scorer_loop_params(i);
            p.create_topics = false;
            let h = spawn_loop(
                p,
                cfg.scorer(),
                scorer_metrics.clone(),
                rx.clone(),
                tx.clone(),
            );
            loops.push(("scorer", h));
        }
    }
    if matches!(role, Role::Decider | Role::Both) {
        let h = spawn_loop(
            decider_params,
            cfg.decider(),
            decider_metrics,
            rx.clone(),
            tx.clone(),
        );
        loops.push(("decider", h));
    }
    let mut first_err = None;
    for (what, h) in loops {
        match h.await {
            Ok(Ok(s)) => tracing::info!(loop_ = what, summary = ?s, "stopped"),
            Ok(Err(e)) => {
                tracing::error!(loop_ = what, error = %e, "failed");
                first_err.get_or_insert(JobError::Stream(e));
            }
            Err(e) => {
                first_err.get_or_insert(JobError::Task(format!("{what}: {e}")));
            }
        }
    }
    if let Some(e) = first_err {
        if let Some(h) = archiver {
            let _ = tx.send(true);
            let _ = h.await;
        }
        return Err(e);
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
