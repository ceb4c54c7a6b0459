//! Pipeline configs (`pipelines/train-*.toml`): serde structs that reject unknown fields,
//! validated into checked parameters whose errors name the field.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use waterbear_features::{FeatureConfig, FeatureParams};
use waterbear_models::DriftRefs;

use crate::TrainError;
use crate::dates::{Day, parse_day};

/// A pipeline TOML as written. Exactly one of `[backblaze]` and `[smd]` must be present.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    /// Model name, the artifact's `name` (`disk-bb`, `smd`).
    pub name: String,
    /// Model version, the artifact's `version`.
    pub version: String,
    /// Where the artifact is written (`models/disk-bb-<version>.json`).
    pub model_out: PathBuf,
    /// Directory under which each run writes `<name>-<version>/report.md` and PNGs.
    #[serde(default = "default_reports")]
    pub reports_dir: PathBuf,
    /// Feature parameters (the same table the streaming job reads).
    #[serde(default)]
    pub features: FeatureConfig,
    /// Disk-failure training on Backblaze data.
    pub backblaze: Option<BackblazeSection>,
    /// Server anomaly detection on SMD data.
    pub smd: Option<SmdSection>,
}

fn default_reports() -> PathBuf {
    PathBuf::from("reports")
}

/// `[backblaze]`: data, periods and forest settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackblazeSection {
    /// Backblaze-format parquet (relative paths under `../shared/` are also looked up
    /// in the parents' `shared/`).
    pub data: PathBuf,
    /// First day of training data (`YYYY-MM-DD`).
    pub train_from: String,
    /// Last day of the training period: labels must be known by then.
    pub train_to: String,
    /// First day of the threshold-calibration period inside the training period: a
    /// model fitted on labels known the day before scores it, and the threshold is the
    /// one that meets `target_far` there.
    pub calib_from: String,
    /// Validation period (reported only; never used to choose anything).
    pub valid_from: String,
    /// Last day of validation.
    pub valid_to: String,
    /// Failure horizon in days (a drive-day is positive when the drive fails 1..=H
    /// days later).
    #[serde(default = "default_horizon")]
    pub horizon_days: u32,
    /// Trees in the forest (1..=500).
    pub trees: usize,
    /// Maximum tree depth (1..=30).
    pub max_depth: usize,
    /// Minimum (unweighted) rows in a leaf (>= 1).
    pub min_leaf: f32,
    /// Share of the training rows each tree's bootstrap sample draws, (0, 1].
    pub bootstrap_proportion: f64,
    /// Share of the features each tree sees, (0, 1].
    pub feature_proportion: f64,
    /// Healthy drive-days sampled for training (all positives are kept), >= 100.
    pub negatives: usize,
    /// Random seed.
    pub seed: u64,
    /// Drive-level false-alarm rate the threshold aims at on the calibration period, (0, 1).
    pub target_far: f64,
    /// Features the forest uses (names of `SMART_FEATURES`); empty = all of them but
    /// `dt_hours` and `records_seen`.
    #[serde(default)]
    pub features: Vec<String>,
}

fn default_horizon() -> u32 {
    10
}

/// `[smd]`: data and detector settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmdSection {
    /// Directory of `<machine>_{train,test}.parquet`.
    pub data: PathBuf,
    /// Machines to train (empty = every machine with both splits).
    #[serde(default)]
    pub machines: Vec<String>,
    /// How many of the largest per-metric |z| are averaged into the score (>= 1).
    pub top_k: usize,
    /// Smallest standard deviation of a metric (> 0; metrics are scaled to [0, 1]).
    pub sd_floor: f64,
    /// Weight of the newest raw score in the score's EWMA, (0, 1].
    pub smooth_alpha: f64,
    /// Quantile of the train scores used as threshold, (0, 1].
    pub train_quantile: f64,
    /// Factor applied to that quantile (> 0).
    pub threshold_scale: f64,
    /// `[smd.drift]`: drift references (absent: z against the train split only, the v1
    /// detector); see [`DriftRefs`].
    #[serde(default)]
    pub drift: Option<DriftRefs>,
}

/// Checked Backblaze settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BbParams {
    /// Data file.
    pub data: PathBuf,
    /// Periods, as days since the epoch.
    pub train_from: Day,
    /// Last training day.
    pub train_to: Day,
    /// First calibration day.
    pub calib_from: Day,
    /// Validation start.
    pub valid_from: Day,
    /// Validation end.
    pub valid_to: Day,
    /// The rest, as written.
    pub section: BackblazeSection,
}

/// Checked SMD settings.
#[derive(Debug, Clone, PartialEq)]
pub struct SmdParams {
    /// Data directory.
    pub data: PathBuf,
    /// The section as written.
    pub section: SmdSection,
}

/// What a pipeline trains.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    /// Disk failures.
    Backblaze(BbParams),
    /// Server anomalies.
    Smd(SmdParams),
}

/// A checked pipeline: only [`TrainConfig::from_toml`] / [`PipelineFile::check`] make one.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The file as parsed (recorded in the artifact).
    pub file: PipelineFile,
    /// Checked feature parameters.
    pub features: FeatureParams,
    /// The task.
    pub task: Task,
}

fn bad(field: &str, value: impl std::fmt::Display, expected: &str) -> String {
    format!("{field} = {value} is invalid: {expected}")
}

impl PipelineFile {
    /// Validates every field; the error names the first bad one.
    pub fn check(self) -> Result<TrainConfig, String> {
        let features = self.features.clone().check().map_err(|e| e.to_string())?;
        if self.name.is_empty() || self.version.is_empty() {
            return Err(bad("name/version", "\"\"", "non-empty text"));
        }
        let task = match (&self.backblaze, &self.smd) {
            (Some(b), None) => Task::Backblaze(check_bb(b)?),
            (None, Some(s)) => Task::Smd(check_smd(s)?),
            _ => return Err("exactly one of [backblaze] and [smd] must be present".into()),
        };
        Ok(TrainConfig {
            file: self,
            features,
            task,
        })
    }
}

fn day(field: &str, s: &str) -> Result<Day, String> {
    parse_day(s).ok_or_else(|| bad(field, format!("{s:?}"), "a date YYYY-MM-DD"))
}

fn unit(field: &str, v: f64, open_low: bool) -> Result<(), String> {
    let ok = v.is_finite() && v <= 1.0 && if open_low { v > 0.0 } else { v >= 0.0 };
    if ok {
        Ok(())
    } else {
        Err(bad(field, v, "a number in (0, 1]"))
    }
}

fn check_bb(b: &BackblazeSection) -> Result<BbParams, String> {
    let train_from = day("backblaze.train_from", &b.train_from)?;
    let train_to = day("backblaze.train_to", &b.train_to)?;
    let calib_from = day("backblaze.calib_from", &b.calib_from)?;
    let valid_from = day("backblaze.valid_from", &b.valid_from)?;
    let valid_to = day("backblaze.valid_to", &b.valid_to)?;
    if !(train_from < calib_from && calib_from <= train_to) {
        return Err(bad(
            "backblaze.calib_from",
            &b.calib_from,
            "a day after train_from and not after train_to",
        ));
    }
    if !(train_to < valid_from && valid_from <= valid_to) {
        return Err(bad(
            "backblaze.valid_from",
            &b.valid_from,
            "a day after train_to and not after valid_to",
        ));
    }
    if !(1..=60).contains(&b.horizon_days) {
        return Err(bad("backblaze.horizon_days", b.horizon_days, "1..=60"));
    }
    if !(1..=500).contains(&b.trees) {
        return Err(bad("backblaze.trees", b.trees, "1..=500"));
    }
    if !(1..=30).contains(&b.max_depth) {
        return Err(bad("backblaze.max_depth", b.max_depth, "1..=30"));
    }
    if b.min_leaf.is_nan() || b.min_leaf < 1.0 {
        return Err(bad("backblaze.min_leaf", b.min_leaf, "at least 1"));
    }
    unit(
        "backblaze.bootstrap_proportion",
        b.bootstrap_proportion,
        true,
    )?;
    unit("backblaze.feature_proportion", b.feature_proportion, true)?;
    if b.negatives < 100 {
        return Err(bad("backblaze.negatives", b.negatives, "at least 100"));
    }
    if !(b.target_far > 0.0 && b.target_far < 1.0) {
        return Err(bad(
            "backblaze.target_far",
            b.target_far,
            "a number in (0, 1)",
        ));
    }
    for f in &b.features {
        if !waterbear_features::SMART_FEATURES
            .iter()
            .any(|s| s.name() == f)
        {
            return Err(bad(
                "backblaze.features",
                format!("{f:?}"),
                "names of SMART_FEATURES",
            ));
        }
    }
    Ok(BbParams {
        data: resolve_data(&b.data),
        train_from,
        train_to,
        calib_from,
        valid_from,
        valid_to,
        section: b.clone(),
    })
}

fn check_smd(s: &SmdSection) -> Result<SmdParams, String> {
    if s.top_k == 0 || s.top_k > 38 {
        return Err(bad("smd.top_k", s.top_k, "1..=38"));
    }
    if !(s.sd_floor.is_finite() && s.sd_floor > 0.0) {
        return Err(bad("smd.sd_floor", s.sd_floor, "a finite number above 0"));
    }
    unit("smd.smooth_alpha", s.smooth_alpha, true)?;
    unit("smd.train_quantile", s.train_quantile, true)?;
    if !(s.threshold_scale.is_finite() && s.threshold_scale > 0.0) {
        return Err(bad(
            "smd.threshold_scale",
            s.threshold_scale,
            "a finite number above 0",
        ));
    }
    if let Some(d) = &s.drift {
        for (name, v) in [
            ("smd.drift.block_rows", d.block_rows),
            ("smd.drift.slow_rows", d.slow_rows),
            ("smd.drift.fast_rows", d.fast_rows),
        ] {
            if v == 0 {
                return Err(bad(name, v, "a whole number of rows >= 1"));
            }
        }
        if !(d.low_sd.is_finite() && d.low_sd >= 0.0) {
            return Err(bad("smd.drift.low_sd", d.low_sd, "a finite number >= 0"));
        }
    }
    Ok(SmdParams {
        data: resolve_data(&s.data),
        section: s.clone(),
    })
}

impl TrainConfig {
    /// Parses and checks a pipeline TOML; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, TrainError> {
        let err = |message: String| TrainError::Config {
            path: origin.to_string(),
            message,
        };
        let file: PipelineFile = toml::from_str(text).map_err(|e| err(e.to_string()))?;
        file.check().map_err(err)
    }

    /// Reads and checks a pipeline TOML file.
    pub fn load(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(TrainError::io(path))?;
        Self::from_toml(&text, &path.display().to_string())
    }
}

/// `path` if it exists; else, for a path under `../shared/`, the first `shared/` found in
/// the current directory's ancestors (worktrees sit deeper than the main checkout), or
/// under `$WATERBEAR_SHARED`.
pub fn resolve_data(path: &Path) -> PathBuf {
    if path.exists() {
        return path.to_path_buf();
    }
    let Ok(rest) = path.strip_prefix("../shared") else {
        return path.to_path_buf();
    };
    if let Some(root) = std::env::var_os("WATERBEAR_SHARED") {
        let p = PathBuf::from(root).join(rest);
        if p.exists() {
            return p;
        }
    }
    if let Ok(cwd) = std::env::current_dir() {
        for a in cwd.ancestors() {
            let p = a.join("shared").join(rest);
            if p.exists() {
                return p;
            }
        }
    }
    path.to_path_buf()
}

/// The `shared/` directory (see [`resolve_data`]), if any.
pub fn shared_dir() -> Option<PathBuf> {
    let p = resolve_data(Path::new("../shared"));
    p.is_dir().then_some(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BB: &str = r#"
name = "disk-bb"
version = "t"
model_out = "models/x.json"
[features]
window = 14
[backblaze]
data = "data/backblaze-sample.parquet"
train_from = "2018-01-01"
calib_from = "2018-03-01"
train_to = "2018-04-30"
valid_from = "2018-05-01"
valid_to = "2018-06-30"
trees = 10
max_depth = 6
min_leaf = 5
bootstrap_proportion = 0.5
feature_proportion = 0.6
negatives = 1000
seed = 1
target_far = 0.008
"#;

    #[test]
    fn parses_and_names_bad_fields() {
        let c = TrainConfig::from_toml(BB, "bb").unwrap();
        assert_eq!(c.features.window, 14);
        assert!(matches!(c.task, Task::Backblaze(_)));
        for (from, to, field) in [
            ("trees = 10", "trees = 0", "backblaze.trees"),
            (
                "target_far = 0.008",
                "target_far = 1.5",
                "backblaze.target_far",
            ),
            (
                "calib_from = \"2018-03-01\"",
                "calib_from = \"2018-13-01\"",
                "backblaze.calib_from",
            ),
            ("window = 14", "window = 0", "features.window"),
        ] {
            let e = TrainConfig::from_toml(&BB.replace(from, to), "bb").unwrap_err();
            assert!(e.to_string().contains(field), "{e}");
        }
        let e = TrainConfig::from_toml(&BB.replace("seed = 1", "seed = 1\nsede = 2"), "bb")
            .unwrap_err();
        assert!(e.to_string().contains("sede"), "{e}");
    }
}
