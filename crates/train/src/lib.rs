//! Offline training and evaluation of waterbear's detectors on real data.
//!
//! - **Disk failures** (Backblaze SMART, `../shared/specs/backblaze-protocol.md`): a polars
//!   lazy pipeline computes the `SMART_FEATURES` of `waterbear-features` per drive with
//!   the same definitions as the online `FeatureSet` (a test proves agreement to 1e-9);
//!   labels are "fails within 1..=10 days" and only known labels train; a bagged forest
//!   of linfa decision trees is fitted, its alarm threshold chosen on a calibration
//!   period inside the training period for a target false-alarm rate; [`evaluate_backblaze`]
//!   reproduces the protocol's rule baselines exactly and reports the model.
//! - **Server anomalies** (SMD, `../shared/specs/smd-protocol.md`): per-machine z-scores
//!   against the train split, top-k combined and smoothed online; the threshold is a
//!   quantile of train scores; [`evaluate_smd`] prints raw and point-adjusted P/R/F1.
//! - **Artifacts** ([`Artifact`]): versioned JSON with feature schema hash, parameters,
//!   data range, threshold, validation figures and training config.
//! - **Reports**: Markdown + PNG plots per run; **detect**: [`detect_csv`] scores any
//!   `timestamp,value` series online.
//!
//! ```
//! use waterbear_train::{TrainConfig, Task};
//!
//! let toml = r#"
//! name = "smd"
//! version = "doc"
//! model_out = "/tmp/smd-doc.json"
//! [smd]
//! data = "data/smd-sample"
//! top_k = 3
//! sd_floor = 0.02
//! smooth_alpha = 0.3
//! train_quantile = 0.995
//! threshold_scale = 1.0
//! "#;
//! let cfg = TrainConfig::from_toml(toml, "doc").unwrap();
//! assert!(matches!(cfg.task, Task::Smd(_)));
//! // a field out of range is named in the error
//! let bad = toml.replace("top_k = 3", "top_k = 0");
//! assert!(TrainConfig::from_toml(&bad, "doc").unwrap_err().to_string().contains("smd.top_k"));
//! ```

mod bb;
mod config;
mod dates;
mod detect;
mod disk;
mod error;
mod forest;
mod output;
mod report;
mod smd;

use std::fmt;
use std::time::Duration;

pub use bb::{
    BbData, BbMetrics, FeatureTable, build_features, evaluate_alarms, feature_pipeline,
    labels_known_at, load_backblaze, rule_alarms, scan_backblaze, threshold_for_far,
};
pub use config::{
    BackblazeSection, BbParams, PipelineFile, SmdParams, SmdSection, Task, TrainConfig,
    resolve_data, shared_dir,
};
pub use dates::{Day, MS_PER_DAY, fmt_day, parse_day};
pub use detect::{SeriesScorer, detect_csv, detect_stream};
pub use disk::{
    BbEvalOptions, BbReport, BbRow, DEFAULT_DISK_MODEL, RULE_LEVEL, RULE_ROSE, SHARED_BB,
    default_disk_features, evaluate_backblaze, load_artifact, locate_model, score_rows,
};
pub use error::TrainError;
pub use forest::{ForestParams, ForestValidParams};
pub use output::{SmdRow, write_alarms, write_predictions};
pub use smd::{
    Counts, DEFAULT_SMD_MODEL, SHARED_SMD, SmdEvalOptions, SmdLine, SmdReport, ZScoreParams,
    ZScoreValidParams, best_f1, evaluate_smd, point_adjust,
};
pub use waterbear_models::{
    ARTIFACT_FORMAT, ARTIFACT_VERSION, Artifact, ArtifactError, DataRange, Forest, MachineModel,
    ModelBody, SmdModel, SmdScorer, TrainedForest, Tree, Validation,
};

/// Wall time of each step of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Timings {
    /// Step name and seconds.
    pub steps: Vec<(String, f64)>,
    /// Whole run, seconds.
    pub total_s: f64,
}

impl Timings {
    pub(crate) fn push(&mut self, step: &str, d: Duration) {
        self.steps.push((step.to_string(), d.as_secs_f64()));
    }
    pub(crate) fn total(&mut self, d: Duration) {
        self.total_s = d.as_secs_f64();
    }
}

impl fmt::Display for Timings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (s, t) in &self.steps {
            writeln!(f, "  {s:<32} {t:>8.2} s")?;
        }
        writeln!(f, "  {:<32} {:>8.2} s", "total", self.total_s)
    }
}

pub(crate) fn progress_bar(on: bool, len: u64, what: &str) -> indicatif::ProgressBar {
    if !on {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(len);
    b.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{what} {{bar:30}} {{pos}}/{{len}} {{elapsed}}"
        ))
        .expect("valid template"),
    );
    b
}

/// What [`train`] returns.
#[derive(Debug, Clone)]
pub enum TrainReport {
    /// A disk-failure forest.
    Backblaze(BbReport),
    /// An SMD detector.
    Smd(SmdReport),
}

impl fmt::Display for TrainReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backblaze(r) => r.fmt(f),
            Self::Smd(r) => r.fmt(f),
        }
    }
}

/// Runs a pipeline: trains, writes the artifact to `model_out` and a report under
/// `reports_dir`, and returns the figures. `progress` shows progress bars.
pub fn train(config: &TrainConfig, progress: bool) -> Result<TrainReport, TrainError> {
    match &config.task {
        Task::Backblaze(p) => {
            disk::train_backblaze(config, p, progress).map(|(r, _)| TrainReport::Backblaze(r))
        }
        Task::Smd(p) => smd::train_smd(config, p, progress).map(|(r, _)| TrainReport::Smd(r)),
    }
}
