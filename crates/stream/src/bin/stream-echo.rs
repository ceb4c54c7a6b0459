//! Runs the streaming job with the reference `EchoUpper` transform.
//!
//! ```text
//! stream-echo --config pipelines/streaming.toml [--instance-id a] [--stateless]
//! ```
//! `KAFKA_BOOTSTRAP` overrides `kafka.brokers`. SIGTERM/SIGINT: finish and
//! commit the open batch, then exit 0. Used by the integration tests (which
//! SIGKILL it) and as a template for the real job binary.

use std::path::PathBuf;

use clap::Parser;
use waterbear_stream::echo::EchoUpper;
use waterbear_stream::{JOB_SECTIONS, StreamConfig, run, shutdown_signal};

#[derive(Parser)]
struct Args {
    /// Streaming config (TOML).
    #[arg(long, default_value = "pipelines/streaming.toml")]
    config: PathBuf,
    /// Overrides `kafka.instance_id`.
    #[arg(long)]
    instance_id: Option<String>,
    /// Use the stateless echo (no per-key counter, no state writes).
    #[arg(long)]
    stateless: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    // The file may also carry the waterbear job's sections: not ours.
    let text = std::fs::read_to_string(&args.config)?;
    let mut cfg = StreamConfig::from_toml_str_skipping(
        &text,
        &args.config.display().to_string(),
        JOB_SECTIONS,
    )?;
    cfg.apply_env();
    if let Some(id) = args.instance_id {
        cfg.kafka.instance_id = id;
    }
    let params = cfg.validate()?;
    let transform = if args.stateless {
        EchoUpper::stateless()
    } else {
        EchoUpper::new()
    };
    let summary = run(params, transform, shutdown_signal()).await?;
    tracing::info!(?summary, "exiting");
    Ok(())
}
