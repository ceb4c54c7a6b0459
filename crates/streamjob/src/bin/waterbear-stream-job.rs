//! The streaming job alone (same as `waterbear stream` / `waterbear simulate`),
//! used by the integration tests, which SIGKILL it.

use clap::{Parser, Subcommand};
use waterbear_streamjob::cli::{SimulateArgs, StreamArgs};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the streaming job.
    Stream(StreamArgs),
    /// Feed simulated telemetry to Kafka and/or a file.
    Simulate(SimulateArgs),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,librdkafka=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Stream(a) => waterbear_streamjob::cli::stream(a)?,
        Command::Simulate(a) => {
            let n = waterbear_streamjob::cli::simulate(a)?;
            println!("{n} records");
        }
    }
    Ok(())
}
