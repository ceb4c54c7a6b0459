//! Stand-in CLI for the `waterbear` binary's `train`, `evaluate` and `detect`
//! subcommands (the lead moves these into the main binary).
//!
//! ```text
//! cargo run --release -p waterbear-train --example wbtrain -- train --config pipelines/train-backblaze.toml
//! cargo run --release -p waterbear-train --example wbtrain -- evaluate backblaze [--data P] [--model P] [--from D --to D] [--alarms-out P] [--report-dir D]
//! cargo run --release -p waterbear-train --example wbtrain -- evaluate smd [--data DIR] [--model P] [--predictions-out P] [--report-dir D]
//! cargo run --release -p waterbear-train --example wbtrain -- detect IN.csv OUT.csv
//! ```

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use waterbear_train::{BbEvalOptions, SmdEvalOptions, TrainConfig};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train from a pipeline TOML.
    Train {
        #[arg(long)]
        config: PathBuf,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
    },
    /// Evaluate on real data.
    Evaluate {
        #[command(subcommand)]
        what: Eval,
    },
    /// Score a timestamp,value CSV.
    Detect { input: PathBuf, output: PathBuf },
}

#[derive(Subcommand)]
enum Eval {
    /// Disk failures on a Backblaze-format parquet.
    Backblaze {
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
        #[arg(long)]
        alarms_out: Option<PathBuf>,
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
    /// Server anomalies on a directory of SMD-format files.
    Smd {
        #[arg(long)]
        data: Option<PathBuf>,
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        predictions_out: Option<PathBuf>,
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Train { config, quiet } => {
            let cfg = TrainConfig::load(&config)?;
            println!("{}", waterbear_train::train(&cfg, !quiet)?);
        }
        Cmd::Evaluate {
            what:
                Eval::Backblaze {
                    data,
                    model,
                    from,
                    to,
                    alarms_out,
                    report_dir,
                },
        } => {
            let r = waterbear_train::evaluate_backblaze(&BbEvalOptions {
                data,
                model,
                from,
                to,
                alarms_out,
                report_dir,
            })?;
            println!("{r}");
        }
        Cmd::Evaluate {
            what:
                Eval::Smd {
                    data,
                    model,
                    predictions_out,
                    report_dir,
                },
        } => {
            let r = waterbear_train::evaluate_smd(&SmdEvalOptions {
                data,
                model,
                predictions_out,
                report_dir,
            })?;
            println!("{r}");
        }
        Cmd::Detect { input, output } => {
            let n = waterbear_train::detect_csv(&input, &output)?;
            println!("scored {n} rows into {}", output.display());
        }
    }
    Ok(())
}
