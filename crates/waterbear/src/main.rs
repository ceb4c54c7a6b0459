//! `waterbear`: keeps VMs alive through host failures before they happen.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use waterbear::{DemoConfig, DemoOptions, run_demo};

#[derive(Parser)]
#[command(
    name = "waterbear",
    version,
    about = "Predict host failures and move VMs out of harm's way."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a fleet and run the whole pipeline on it in one process (no Kafka).
    Demo {
        /// Pipeline file; default: the embedded pipelines/demo.toml.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Output directory.
        #[arg(long, default_value = "out/demo")]
        out: PathBuf,
        /// Override sim.hosts.
        #[arg(long)]
        hosts: Option<usize>,
        /// Override sim.days.
        #[arg(long)]
        days: Option<f64>,
        /// Override sim.seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run a host agent owning the KVM VMs of this host.
    HostAgent(waterbear_vmm::HostAgentArgs),
    /// Run the streaming job on Kafka (scorer and/or decider; docs/streaming.md).
    Stream(waterbear_streamjob::cli::StreamArgs),
    /// Feed simulated telemetry to Kafka (--to-kafka) and/or an NDJSON file (--to-file).
    Simulate(waterbear_streamjob::cli::SimulateArgs),
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo {
            config,
            out,
            hosts,
            days,
            seed,
            no_progress,
        } => {
            let mut cfg = match &config {
                Some(p) => DemoConfig::load(p)?,
                None => DemoConfig::embedded(),
            };
            if let Some(h) = hosts {
                cfg.sim.hosts = h;
            }
            if let Some(d) = days {
                cfg.sim.days = d;
            }
            if let Some(s) = seed {
                cfg.sim.seed = s;
            }
            tracing::info!(
                hosts = cfg.sim.hosts,
                days = cfg.sim.days,
                seed = cfg.sim.seed,
                "demo starting"
            );
            let summary = run_demo(&DemoOptions {
                config: cfg,
                out_dir: out,
                progress: !no_progress,
            })
            .context("demo failed")?;
            println!("{summary}");
            Ok(())
        }
        Command::HostAgent(args) => {
            waterbear_vmm::run_host_agent(args.into_config()).context("host agent failed")?;
            Ok(())
        }
        Command::Stream(args) => {
            waterbear_streamjob::cli::stream(args).context("stream job failed")?;
            Ok(())
        }
        Command::Simulate(args) => {
            let n = waterbear_streamjob::cli::simulate(args).context("simulate failed")?;
            println!("{n} records");
            Ok(())
        }
    }
}
