//! `waterbear train`, `waterbear evaluate backblaze|smd` and `waterbear detect`: thin
//! wrappers over the `waterbear-train` library.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use waterbear_train::{BbEvalOptions, SmdEvalOptions, TrainConfig};

/// `waterbear train`.
#[derive(Args)]
pub struct TrainArgs {
    /// Pipeline file, e.g. pipelines/train-backblaze.toml or pipelines/train-smd.toml.
    #[arg(long)]
    config: PathBuf,
    /// Hide progress bars.
    #[arg(long)]
    quiet: bool,
}

/// `waterbear evaluate`.
#[derive(Subcommand)]
pub enum EvaluateCmd {
    /// Disk-failure prediction on a Backblaze-format Parquet file (FDR, FAR, lead time).
    Backblaze {
        /// Backblaze-format Parquet; default: ../shared's file, else the sample in data/.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Model artifact; default: the committed one in models/.
        #[arg(long)]
        model: Option<PathBuf>,
        /// First day of the test period (YYYY-MM-DD).
        #[arg(long)]
        from: Option<String>,
        /// Last day of the test period (YYYY-MM-DD).
        #[arg(long)]
        to: Option<String>,
        /// Write `serial_number, date, alarm, score` for every drive-day here (Parquet).
        #[arg(long)]
        alarms_out: Option<PathBuf>,
        /// Where the Markdown report and plots go.
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
    /// Server anomaly detection on a directory of SMD-format files (P/R/F1, raw and point-adjusted).
    Smd {
        /// Directory of machine-*_train/test.parquet; default: ../shared's, else data/smd-sample.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Model artifact; default: the committed one in models/.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Write `machine, t, label, pred, score` for every test row here (Parquet).
        #[arg(long)]
        predictions_out: Option<PathBuf>,
        /// Where the Markdown report and plots go.
        #[arg(long)]
        report_dir: Option<PathBuf>,
    },
}

/// `waterbear detect`.
#[derive(Args)]
pub struct DetectArgs {
    /// Input CSV with columns `timestamp,value`.
    #[arg(long)]
    csv: PathBuf,
    /// Output CSV with columns `timestamp,value,anomaly_score`.
    #[arg(long)]
    out: PathBuf,
}

/// Runs `waterbear train`.
pub fn train(args: TrainArgs) -> Result<()> {
    let cfg = TrainConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    println!(
        "{}",
        waterbear_train::train(&cfg, !args.quiet).context("training failed")?
    );
    Ok(())
}

/// Runs `waterbear evaluate …`.
pub fn evaluate(cmd: EvaluateCmd) -> Result<()> {
    match cmd {
        EvaluateCmd::Backblaze {
            data,
            model,
            from,
            to,
            alarms_out,
            report_dir,
        } => {
            let r = waterbear_train::evaluate_backblaze(&BbEvalOptions {
                data,
                model,
                from,
                to,
                alarms_out,
                report_dir,
            })
            .context("backblaze evaluation failed")?;
            println!("{r}");
        }
        EvaluateCmd::Smd {
            data,
            model,
            predictions_out,
            report_dir,
        } => {
            let r = waterbear_train::evaluate_smd(&SmdEvalOptions {
                data,
                model,
                predictions_out,
                report_dir,
            })
            .context("smd evaluation failed")?;
            println!("{r}");
        }
    }
    Ok(())
}

/// Runs `waterbear detect`.
pub fn detect(args: DetectArgs) -> Result<()> {
    let n = waterbear_train::detect_csv(&args.csv, &args.out).context("detect failed")?;
    println!("scored {n} rows into {}", args.out.display());
    Ok(())
}
