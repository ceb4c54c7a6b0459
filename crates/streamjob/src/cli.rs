//! Command-line entry points shared by `waterbear stream|simulate` and the
//! `waterbear-stream-job` binary.

use std::path::PathBuf;

use crate::{JobConfig, JobConfigError, Role, SimulateError, SimulateOptions};

/// `stream` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct StreamArgs {
    /// Streaming config (TOML).
    #[arg(long, default_value = "pipelines/streaming.toml")]
    pub config: PathBuf,
    /// Trained disk model (e.g. models/disk-bb-v2.json) scored next to the rule
    /// baseline; overrides `job.model`. Refused if its features differ from the job's.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Which stage(s) to run.
    #[arg(long, value_enum, default_value = "both")]
    pub role: Role,
    /// Overrides `kafka.instance_id`.
    #[arg(long)]
    pub instance_id: Option<String>,
}

/// `simulate` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// Streaming config (brokers, telemetry topic) for --to-kafka.
    #[arg(long, default_value = "pipelines/streaming.toml")]
    pub config: PathBuf,
    /// Produce to the telemetry topic.
    #[arg(long)]
    pub to_kafka: bool,
    /// Write NDJSON (one wire record per line) to this file.
    #[arg(long)]
    pub to_file: Option<PathBuf>,
    /// Records per second (token bucket); 0 = as fast as possible.
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Encoding of the records sent to Kafka: `json` (readable with any Kafka tool)
    /// or `binary` (a third of the size, faster to decode; docs/streaming.md). The
    /// job reads both.
    #[arg(long, value_enum, default_value_t = Wire::Json)]
    pub wire: Wire,
    /// Hosts.
    #[arg(long, default_value_t = 500)]
    pub hosts: usize,
    /// Days of fleet time.
    #[arg(long, default_value_t = 1.0)]
    pub days: f64,
    /// Seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// `--wire` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// JSON objects.
    Json,
    /// The binary layout (magic, version, CRC-32, bincode).
    Binary,
}

impl From<Wire> for waterbear_telemetry::WireFormat {
    fn from(w: Wire) -> Self {
        match w {
            Wire::Json => Self::Json,
            Wire::Binary => Self::Binary,
        }
    }
}

/// A CLI failure.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Config.
    #[error(transparent)]
    Config(#[from] JobConfigError),
    /// The job.
    #[error(transparent)]
    Stream(#[from] waterbear_stream::StreamError),
    /// The job.
    #[error(transparent)]
    Job(#[from] crate::JobError),
    /// Simulation.
    #[error(transparent)]
    Simulate(#[from] SimulateError),
    /// Runtime.
    #[error("tokio runtime: {0}")]
    Runtime(#[from] std::io::Error),
    /// Nothing to do.
    #[error("simulate needs --to-kafka and/or --to-file")]
    NoTarget,
}

/// Runs the job until SIGTERM/SIGINT.
pub fn stream(args: StreamArgs) -> Result<(), CliError> {
    let mut cfg = JobConfig::load(&args.config, args.instance_id.as_deref())?;
    if let Some(m) = &args.model {
        cfg = cfg.with_model(m, "--model")?;
    }
    tracing::info!(detector = %cfg.model_label(), "scoring with");
    let rt = waterbear_stream::job_runtime(cfg.job.keep_c_heap_mapped)?;
    rt.block_on(async {
        // Install the handlers now (not on the first poll of a future), so a
        // SIGTERM right after start-up still means "finish and commit".
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let shutdown = async move {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM"),
                _ = int.recv() => tracing::info!("SIGINT"),
            }
        };
        crate::run_job(cfg, args.role, shutdown).await?;
        Ok::<(), CliError>(())
    })?;
    Ok(())
}

/// Runs the simulation to Kafka and/or a file.
pub fn simulate(args: SimulateArgs) -> Result<u64, CliError> {
    if !args.to_kafka && args.to_file.is_none() {
        return Err(CliError::NoTarget);
    }
    let kafka = if args.to_kafka {
        let cfg = JobConfig::load(&args.config, Some("simulate"))?;
        let p = cfg.scorer_params();
        if cfg.stream.topics.create {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(waterbear_stream::ensure_topics(&p))?;
        }
        Some(p)
    } else {
        None
    };
    let sim = waterbear_sim::SimConfig {
        hosts: args.hosts,
        days: args.days,
        seed: args.seed,
        ..Default::default()
    };
    Ok(crate::simulate(&SimulateOptions {
        sim,
        kafka,
        file: args.to_file,
        rate: args.rate,
        wire: args.wire.into(),
    })?)
}
