//! `waterbear`: keeps VMs alive through host failures before they happen.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use waterbear::{DemoConfig, DemoOptions, run_demo};

mod train_cmd;

/// mimalloc: the streaming job frees and allocates a few small strings per
/// record (docs/benchmarks-stream.md measured it against glibc's malloc).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
        /// Override `model`: "builtin", "none" or a model file.
        #[arg(long)]
        model: Option<String>,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
        /// Also carry out the decisions on a few hosts on real KVM guests
        /// (host agents started as child processes; needs /dev/kvm).
        #[arg(long)]
        kvm: bool,
        /// With --kvm: simulated hosts given real guests.
        #[arg(long, default_value_t = 4)]
        kvm_hosts: usize,
    },
    /// Run a host agent owning the KVM VMs of this host.
    HostAgent(waterbear_vmm::HostAgentArgs),
    /// Train a model from history (polars + linfa) and write a versioned artifact.
    Train(train_cmd::TrainArgs),
    /// Evaluate models on real data with the published protocols.
    Evaluate {
        #[command(subcommand)]
        what: train_cmd::EvaluateCmd,
    },
    /// Score a `timestamp,value` CSV online: writes `timestamp,value,anomaly_score`.
    Detect(train_cmd::DetectArgs),
    /// Run the streaming job on Kafka (scorer and/or decider; docs/streaming.md).
    Stream(waterbear_streamjob::cli::StreamArgs),
    /// Feed simulated telemetry to Kafka (--to-kafka) and/or an NDJSON file (--to-file).
    Simulate(waterbear_streamjob::cli::SimulateArgs),
    /// Print the chain behind one decision of a demo or backtest run.
    Explain {
        /// Decision (or policy record) id.
        id: String,
        /// Run directory (decisions.ndjson, outcomes.ndjson, policy_records.ndjson).
        #[arg(long, default_value = "out/demo")]
        run: PathBuf,
    },
    /// Replay recorded traces through policy variants and baselines; print the trade-off.
    Backtest(BacktestArgs),
}

#[derive(clap::Args)]
struct BacktestArgs {
    /// Output directory.
    #[arg(long, default_value = "out/backtest")]
    out: PathBuf,
    /// Simulated hosts (0: skip the sim trace).
    #[arg(long, default_value_t = 500)]
    hosts: usize,
    /// Simulated days.
    #[arg(long, default_value_t = 30.0)]
    days: f64,
    /// Simulator seed.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Backblaze sample; default: data/backblaze-sample.parquet if present, else
    /// data/backblaze-policy-sample.parquet.
    #[arg(long)]
    backblaze: Option<PathBuf>,
    /// Skip the Backblaze trace.
    #[arg(long)]
    no_backblaze: bool,
    /// Write a Backblaze sample from this full drive-day file to --backblaze (or the
    /// default path) and exit.
    #[arg(long)]
    make_sample_from: Option<PathBuf>,
    /// Healthy drives in a made sample (every failed drive is kept).
    #[arg(long, default_value_t = 1500)]
    sample_healthy: usize,
    /// Skip the PNG plot.
    #[arg(long)]
    no_plot: bool,
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
            model,
            no_progress,
            kvm,
            kvm_hosts,
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
            if let Some(m) = model {
                cfg.model = m;
            }
            tracing::info!(
                hosts = cfg.sim.hosts,
                days = cfg.sim.days,
                seed = cfg.sim.seed,
                "demo starting"
            );
            let model = cfg.model_artifact()?;
            tracing::info!(
                model = model
                    .as_ref()
                    .map(|a| format!("{}@{}", a.name, a.version))
                    .unwrap_or_else(|| "none (rules only)".into()),
                "demo detector"
            );
            let opts = DemoOptions {
                config: cfg,
                out_dir: out,
                progress: !no_progress,
                model,
            };
            if kvm {
                let mut k = waterbear::KvmDemoOptions::new(
                    std::env::current_exe().context("locating this executable")?,
                );
                k.max_hosts = kvm_hosts;
                let (summary, real) =
                    waterbear::run_kvm_demo(&opts, &k).context("demo --kvm failed")?;
                println!("{summary}\n\n{real}");
                return Ok(());
            }
            let summary = run_demo(&opts).context("demo failed")?;
            println!("{summary}");
            Ok(())
        }
        Command::Train(args) => train_cmd::train(args),
        Command::Evaluate { what } => train_cmd::evaluate(what),
        Command::Detect(args) => train_cmd::detect(args),
        Command::Explain { id, run } => {
            print!(
                "{}",
                waterbear::explain(&run, &id).context("explain failed")?
            );
            Ok(())
        }
        Command::Backtest(a) => backtest(a),
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

fn backtest(a: BacktestArgs) -> Result<()> {
    let bb = a.backblaze.clone().unwrap_or_else(|| {
        let shared = PathBuf::from("data/backblaze-sample.parquet");
        if shared.exists() {
            shared
        } else {
            PathBuf::from("data/backblaze-policy-sample.parquet")
        }
    });
    if let Some(src) = &a.make_sample_from {
        let n = waterbear::make_backblaze_sample(src, &bb, a.sample_healthy)
            .context("making the Backblaze sample")?;
        println!("wrote {n} drive-days to {}", bb.display());
        return Ok(());
    }
    let sim = (a.hosts > 0).then(|| waterbear_sim::SimConfig {
        hosts: a.hosts,
        days: a.days,
        seed: a.seed,
        ..Default::default()
    });
    let backblaze = if a.no_backblaze {
        None
    } else if bb.exists() {
        Some(bb)
    } else {
        tracing::warn!(path = %bb.display(), "no Backblaze sample: skipping that trace");
        None
    };
    let report = waterbear::run_backtest(&waterbear::BacktestOptions {
        out_dir: a.out,
        sim,
        backblaze,
        plot: !a.no_plot,
    })
    .context("backtest failed")?;
    println!("{}", report.to_markdown());
    println!("Outputs: {}", report.out_dir);
    Ok(())
}
