//! Server anomaly detection on SMD (`../shared/specs/smd-protocol.md`): per-machine
//! z-scores against the train split, combined and smoothed online, thresholded at a
//! quantile of the train scores (no test labels), with raw and point-adjusted metrics.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use linfa::prelude::*;
use linfa::{DatasetBase, ParamGuard};
use ndarray::Array2;
use polars::prelude::*;

use crate::config::{SmdParams, TrainConfig, resolve_data};
use crate::disk::{file_name, load_artifact, locate_model, write_artifact};
use crate::output::SmdRow;
use crate::{Timings, TrainError, report};
use waterbear_models::{
    ARTIFACT_FORMAT, ARTIFACT_VERSION, Artifact, DataRange, DriftRefs, MachineModel, ModelBody,
    SmdModel, SmdScorer, Validation,
};

/// The committed SMD model used when no `--model` is given.
pub const DEFAULT_SMD_MODEL: &str = "models/smd-v2.json";
/// The shared SMD directory.
pub const SHARED_SMD: &str = "../shared/data/smd";
/// Metric columns.
pub fn metric_names() -> Vec<String> {
    (0..38).map(|i| format!("m{i:02}")).collect()
}

/// One machine's split: rows × 38 metrics, plus `t` and (test) labels.
#[derive(Debug, Clone)]
pub struct Split {
    /// Row indices.
    pub t: Vec<i64>,
    /// Metrics, row-major.
    pub x: Array2<f64>,
    /// Labels (test split only).
    pub label: Option<Vec<i32>>,
}

/// Machines with both splits in `dir`, sorted.
pub fn machines_in(dir: &Path) -> Result<Vec<String>, TrainError> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).map_err(TrainError::io(dir))? {
        let e = e.map_err(TrainError::io(dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(m) = name.strip_suffix("_train.parquet")
            && dir.join(format!("{m}_test.parquet")).exists()
        {
            out.push(m.to_string());
        }
    }
    out.sort();
    Ok(out)
}

/// Reads `<dir>/<machine>_<split>.parquet`, sorted by `t` (the test split's `label` too).
pub fn read_split(dir: &Path, machine: &str, split: &str) -> Result<Split, TrainError> {
    let path = dir.join(format!("{machine}_{split}.parquet"));
    if !path.exists() {
        return Err(TrainError::Io {
            path,
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let p = path.to_string_lossy().to_string();
    let names = metric_names();
    let mut sel: Vec<Expr> = vec![col("t").cast(DataType::Int64)];
    sel.extend(
        names
            .iter()
            .map(|n| col(n.as_str()).cast(DataType::Float64)),
    );
    if split == "test" {
        sel.push(col("label").cast(DataType::Int32));
    }
    let df = LazyFrame::scan_parquet(PlRefPath::new(p.as_str()), ScanArgsParquet::default())
        .and_then(|lf| {
            lf.select(sel)
                .sort(["t"], SortMultipleOptions::default())
                .collect()
        })
        .map_err(TrainError::polars(format!("reading {p}")))?;
    let n = df.height();
    let t: Vec<i64> = df
        .column("t")
        .and_then(|c| c.i64().cloned())
        .map_err(TrainError::polars("t"))?
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect();
    let mut x = Array2::zeros((n, names.len()));
    for (k, name) in names.iter().enumerate() {
        let c = df
            .column(name)
            .and_then(|c| c.f64().cloned())
            .map_err(TrainError::polars(name.clone()))?;
        // a missing reading repeats the last one (0 before any)
        let mut last = 0.0;
        for (i, v) in c.iter().enumerate() {
            if let Some(v) = v {
                last = v;
            }
            x[[i, k]] = last;
        }
    }
    let label = if split == "test" {
        Some(
            df.column("label")
                .and_then(|c| c.i32().cloned())
                .map_err(TrainError::polars("label"))?
                .iter()
                .map(|v| v.unwrap_or(0))
                .collect(),
        )
    } else {
        None
    };
    Ok(Split { t, x, label })
}

/// Detector settings (unchecked); see [`ZScoreValidParams`].
#[derive(Debug, Clone, PartialEq)]
pub struct ZScoreParams(ZScoreValidParams);

/// Checked detector settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ZScoreValidParams {
    /// Largest |z| averaged.
    pub top_k: usize,
    /// Smallest standard deviation.
    pub sd_floor: f64,
    /// EWMA weight of the newest raw score.
    pub smooth_alpha: f64,
    /// Quantile of train scores.
    pub train_quantile: f64,
    /// Factor on that quantile.
    pub threshold_scale: f64,
    /// Drift references (none: the v1 detector).
    pub drift: Option<DriftRefs>,
}

impl ZScoreParams {
    /// From a pipeline's `[smd]` section.
    pub fn from_section(s: &crate::config::SmdSection) -> Self {
        Self(ZScoreValidParams {
            top_k: s.top_k,
            sd_floor: s.sd_floor,
            smooth_alpha: s.smooth_alpha,
            train_quantile: s.train_quantile,
            threshold_scale: s.threshold_scale,
            drift: s.drift,
        })
    }
}

impl ParamGuard for ZScoreParams {
    type Checked = ZScoreValidParams;
    type Error = TrainError;
    fn check_ref(&self) -> Result<&ZScoreValidParams, TrainError> {
        let p = &self.0;
        let ok = p.top_k >= 1
            && p.sd_floor > 0.0
            && p.smooth_alpha > 0.0
            && p.smooth_alpha <= 1.0
            && p.train_quantile > 0.0
            && p.train_quantile <= 1.0
            && p.threshold_scale > 0.0
            && p.drift.is_none_or(|d| {
                d.block_rows >= 1 && d.slow_rows >= 1 && d.fast_rows >= 1 && d.low_sd >= 0.0
            });
        if ok {
            Ok(p)
        } else {
            Err(TrainError::Fit {
                what: "smd z-score detector",
                message: format!("invalid parameters {p:?}"),
            })
        }
    }
    fn check(self) -> Result<ZScoreValidParams, TrainError> {
        self.check_ref()?;
        Ok(self.0)
    }
}

impl Fit<Array2<f64>, (), TrainError> for ZScoreValidParams {
    type Object = MachineModel;

    /// Mean and floored standard deviation per metric of the train split (with drift
    /// references also the median and the near-constant metrics); threshold at
    /// `threshold_scale` × the `train_quantile` of the train split's own online, smoothed
    /// scores (the train split scored as a stream, drift references from its own past).
    fn fit(&self, ds: &DatasetBase<Array2<f64>, ()>) -> Result<MachineModel, TrainError> {
        let x = ds.records();
        if x.nrows() < 2 {
            return Err(TrainError::Fit {
                what: "smd z-score detector",
                message: "fewer than 2 train rows".into(),
            });
        }
        let n = x.nrows() as f64;
        let mean: Vec<f64> = x.columns().into_iter().map(|c| c.sum() / n).collect();
        let sd_raw: Vec<f64> = x
            .columns()
            .into_iter()
            .zip(&mean)
            .map(|(c, m)| (c.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / n).sqrt())
            .collect();
        let sd = sd_raw.iter().map(|s| s.max(self.sd_floor)).collect();
        let (median, low) = match self.drift {
            Some(d) => (
                x.columns()
                    .into_iter()
                    .map(|c| median(c.to_vec()))
                    .collect(),
                sd_raw.iter().map(|&s| s < d.low_sd).collect(),
            ),
            None => (Vec::new(), Vec::new()),
        };
        let mut model = MachineModel {
            machine: String::new(),
            mean,
            sd,
            median,
            low,
            threshold: 0.0,
        };
        let smd = SmdModel {
            top_k: self.top_k,
            smooth_alpha: self.smooth_alpha,
            drift: self.drift,
            machines: vec![],
        };
        let mut scores = score_split(&smd, &model, x);
        model.threshold = quantile(&mut scores, self.train_quantile) * self.threshold_scale;
        Ok(model)
    }
}

/// Online scores of a split's rows.
pub fn score_split(smd: &SmdModel, m: &MachineModel, x: &Array2<f64>) -> Vec<f64> {
    let mut s = SmdScorer::new(smd, m);
    x.rows()
        .into_iter()
        .map(|r| s.push(r.as_slice().expect("row-major")))
        .collect()
}

/// numpy's median (the mean of the two middle values of an even count).
fn median(mut v: Vec<f64>) -> f64 {
    quantile(&mut v, 0.5)
}

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    // linear interpolation (numpy's default)
    let pos = q * (v.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    v[lo] + (v[hi] - v[lo]) * (pos - lo as f64)
}

/// True/false positives and false negatives.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// True positives.
    pub tp: u64,
    /// False positives.
    pub fp: u64,
    /// False negatives.
    pub fn_: u64,
}

impl Counts {
    /// Counts of `pred` against `label`.
    pub fn of(label: &[i32], pred: &[i32]) -> Self {
        let mut c = Counts::default();
        for (&l, &p) in label.iter().zip(pred) {
            match (l == 1, p == 1) {
                (true, true) => c.tp += 1,
                (false, true) => c.fp += 1,
                (true, false) => c.fn_ += 1,
                _ => {}
            }
        }
        c
    }

    /// Precision, recall, F1 (0 when undefined), as `smd_eval.py`.
    pub fn prf(&self) -> (f64, f64, f64) {
        let (tp, fp, fn_) = (self.tp as f64, self.fp as f64, self.fn_ as f64);
        let p = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
        let r = if tp + fn_ > 0.0 { tp / (tp + fn_) } else { 0.0 };
        let f = if p + r > 0.0 {
            2.0 * p * r / (p + r)
        } else {
            0.0
        };
        (p, r, f)
    }

    fn add(&mut self, o: Counts) {
        self.tp += o.tp;
        self.fp += o.fp;
        self.fn_ += o.fn_;
    }
}

/// Point adjustment: a labelled segment with any predicted point counts as all predicted.
pub fn point_adjust(label: &[i32], pred: &[i32]) -> Vec<i32> {
    let mut adj = pred.to_vec();
    let n = label.len();
    let mut i = 0;
    while i < n {
        if label[i] == 1 {
            let mut j = i;
            while j < n && label[j] == 1 {
                j += 1;
            }
            if adj[i..j].contains(&1) {
                adj[i..j].iter_mut().for_each(|p| *p = 1);
            }
            i = j;
        } else {
            i += 1;
        }
    }
    adj
}

/// Best raw F1 over all thresholds (diagnosis only: it reads the labels).
pub fn best_f1(label: &[i32], score: &[f64]) -> f64 {
    let mut order: Vec<usize> = (0..label.len()).collect();
    // stable sort by descending score, like numpy's argsort(-score, kind="stable")
    order.sort_by(|&a, &b| score[b].total_cmp(&score[a]));
    let total: i64 = label.iter().map(|&l| i64::from(l)).sum();
    let (mut tp, mut fp) = (0i64, 0i64);
    let mut best = 0.0f64;
    for &i in &order {
        tp += i64::from(label[i]);
        fp += 1 - i64::from(label[i]);
        let fn_ = total - tp;
        best = best.max(2.0 * tp as f64 / (2 * tp + fp + fn_).max(1) as f64);
    }
    best
}

/// One machine's (or the total's) results.
#[derive(Debug, Clone, PartialEq)]
pub struct SmdLine {
    /// Machine or `TOTAL`.
    pub machine: String,
    /// Raw counts.
    pub raw: Counts,
    /// Point-adjusted counts.
    pub pa: Counts,
    /// Best raw F1 over thresholds (diagnosis), when per machine.
    pub best_raw_f1: Option<f64>,
}

/// What `evaluate smd` (and SMD training) prints.
#[derive(Debug, Clone)]
pub struct SmdReport {
    /// Data directory.
    pub data: PathBuf,
    /// Model.
    pub model: String,
    /// Per machine, then `TOTAL`.
    pub lines: Vec<SmdLine>,
    /// Wall times.
    pub timings: Timings,
    /// Where the report went.
    pub report_dir: Option<PathBuf>,
}

impl SmdReport {
    /// The `TOTAL` line.
    pub fn total(&self) -> &SmdLine {
        self.lines.last().expect("a total line")
    }
}

impl fmt::Display for SmdReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data: {}\nmodel: {}", self.data.display(), self.model)?;
        writeln!(
            f,
            "{:<14} {:>7} {:>7} {:>7}   {:>7} {:>7} {:>7}   {:>9}",
            "machine", "raw P", "raw R", "raw F1", "PA P", "PA R", "PA F1", "best F1*"
        )?;
        for l in &self.lines {
            let (p, r, f1) = l.raw.prf();
            let (pp, pr, pf) = l.pa.prf();
            let b = l.best_raw_f1.map_or("-".into(), |b| format!("{b:.4}"));
            writeln!(
                f,
                "{:<14} {p:>7.4} {r:>7.4} {f1:>7.4}   {pp:>7.4} {pr:>7.4} {pf:>7.4}   {b:>9}",
                l.machine
            )?;
        }
        writeln!(
            f,
            "* best raw F1 over all thresholds reads the test labels: diagnosis only"
        )?;
        write!(f, "{}", self.timings)?;
        if let Some(d) = &self.report_dir {
            writeln!(f, "report: {}", d.join("report.md").display())?;
        }
        Ok(())
    }
}

/// Scores every test row of every machine the model knows and computes the metrics.
fn run_test(
    dir: &Path,
    smd: &SmdModel,
    machines: &[String],
) -> Result<(Vec<SmdLine>, Vec<SmdRow>), TrainError> {
    let mut lines = Vec::new();
    let mut rows = Vec::new();
    let mut raw_tot = Counts::default();
    let mut pa_tot = Counts::default();
    for m in machines {
        let model = smd
            .machine(m)
            .ok_or_else(|| TrainError::Data(format!("the model has no machine {m}")))?;
        let test = read_split(dir, m, "test")?;
        let label = test.label.clone().expect("test labels");
        let scores = score_split(smd, model, &test.x);
        let pred: Vec<i32> = scores
            .iter()
            .map(|&s| i32::from(s > model.threshold))
            .collect();
        let raw = Counts::of(&label, &pred);
        let pa = Counts::of(&label, &point_adjust(&label, &pred));
        raw_tot.add(raw);
        pa_tot.add(pa);
        lines.push(SmdLine {
            machine: m.clone(),
            raw,
            pa,
            best_raw_f1: Some(best_f1(&label, &scores)),
        });
        for i in 0..label.len() {
            rows.push(SmdRow {
                machine: m.clone(),
                t: test.t[i],
                label: label[i],
                pred: pred[i],
                score: scores[i],
            });
        }
    }
    lines.push(SmdLine {
        machine: "TOTAL".into(),
        raw: raw_tot,
        pa: pa_tot,
        best_raw_f1: None,
    });
    Ok((lines, rows))
}

/// Trains the SMD detector of an `[smd]` pipeline, writes the artifact and a report.
pub(crate) fn train_smd(
    cfg: &TrainConfig,
    p: &SmdParams,
    progress: bool,
) -> Result<(SmdReport, Artifact), TrainError> {
    let t0 = Instant::now();
    let mut timings = Timings::default();
    let machines = if p.section.machines.is_empty() {
        machines_in(&p.data)?
    } else {
        p.section.machines.clone()
    };
    if machines.is_empty() {
        return Err(TrainError::Data(format!(
            "no <machine>_train/test.parquet in {}",
            p.data.display()
        )));
    }
    let params = ZScoreParams::from_section(&p.section).check()?;
    let bar = crate::progress_bar(progress, machines.len() as u64, "fitting machines");
    let mut models = Vec::new();
    let mut train_rows = 0u64;
    for m in &machines {
        let train = read_split(&p.data, m, "train")?;
        train_rows += train.x.nrows() as u64;
        let mut model = params.fit(&DatasetBase::new(train.x, ()))?;
        model.machine = m.clone();
        models.push(model);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let smd = SmdModel {
        top_k: params.top_k,
        smooth_alpha: params.smooth_alpha,
        drift: params.drift,
        machines: models,
    };
    timings.push("fit (train splits)", t0.elapsed());
    let t = Instant::now();
    let (lines, rows) = run_test(&p.data, &smd, &machines)?;
    timings.push("score test online + evaluate", t.elapsed());
    let names = metric_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let tot = lines.last().expect("total");
    let mut metrics = std::collections::BTreeMap::new();
    let (rp, rr, rf) = tot.raw.prf();
    let (pp, pr, pf) = tot.pa.prf();
    for (k, v) in [
        ("raw_p", rp),
        ("raw_r", rr),
        ("raw_f1", rf),
        ("pa_p", pp),
        ("pa_r", pr),
        ("pa_f1", pf),
    ] {
        metrics.insert(k.to_string(), v);
    }
    let artifact = Artifact {
        format: ARTIFACT_FORMAT.into(),
        format_version: ARTIFACT_VERSION,
        name: cfg.file.name.clone(),
        version: cfg.file.version.clone(),
        schema_hash: waterbear_features::schema_hash(&refs),
        feature_names: names.clone(),
        feature_params: cfg.features.config().clone(),
        training_data: DataRange {
            source: file_name(&p.data),
            from: "train split".into(),
            to: format!("{} machines", machines.len()),
            rows: train_rows,
            positives: 0,
        },
        threshold: 0.0,
        threshold_rule: format!(
            "per machine: {} x the {} quantile of the train split's scores (no test labels)",
            params.threshold_scale, params.train_quantile
        ),
        validation: Validation {
            period: "test splits".into(),
            metrics,
        },
        training_config: serde_json::to_value(&cfg.file).unwrap_or(serde_json::Value::Null),
        model: ModelBody::SmdZscore(smd),
    };
    write_artifact(&cfg.file.model_out, &artifact)?;
    timings.total(t0.elapsed());
    let dir = cfg
        .file
        .reports_dir
        .join(format!("train-{}-{}", artifact.name, artifact.version));
    let mut rep = SmdReport {
        data: p.data.clone(),
        model: format!("{} {}", artifact.name, artifact.version),
        lines,
        timings,
        report_dir: None,
    };
    report::smd_report(&dir, "Training", &rep, &rows)?;
    rep.report_dir = Some(dir);
    Ok((rep, artifact))
}

/// Options of `evaluate smd`.
#[derive(Debug, Clone, Default)]
pub struct SmdEvalOptions {
    /// Directory of SMD-format files (default: the shared SMD directory).
    pub data: Option<PathBuf>,
    /// Model artifact (default: [`DEFAULT_SMD_MODEL`]).
    pub model: Option<PathBuf>,
    /// Write `machine, t, label, pred, score` of every test row here.
    pub predictions_out: Option<PathBuf>,
    /// Write `report.md` and PNGs under this directory.
    pub report_dir: Option<PathBuf>,
}

/// Scores the test split of every machine in the data that the model knows.
pub fn evaluate_smd(opts: &SmdEvalOptions) -> Result<SmdReport, TrainError> {
    let t0 = Instant::now();
    let mut timings = Timings::default();
    let dir = resolve_data(opts.data.as_deref().unwrap_or(Path::new(SHARED_SMD)));
    let model_path = opts
        .model
        .clone()
        .unwrap_or_else(|| locate_model(DEFAULT_SMD_MODEL));
    let artifact = load_artifact(&model_path)?;
    let smd = artifact.smd()?;
    let machines: Vec<String> = machines_in(&dir)?
        .into_iter()
        .filter(|m| smd.machine(m).is_some())
        .collect();
    if machines.is_empty() {
        return Err(TrainError::Data(format!(
            "no machine of {} has a model in {}",
            dir.display(),
            model_path.display()
        )));
    }
    let (lines, rows) = run_test(&dir, smd, &machines)?;
    timings.push("score test online + evaluate", t0.elapsed());
    if let Some(out) = &opts.predictions_out {
        crate::output::write_predictions(out, &rows)?;
    }
    timings.total(t0.elapsed());
    let mut rep = SmdReport {
        data: dir,
        model: format!("{} {}", artifact.name, artifact.version),
        lines,
        timings,
        report_dir: None,
    };
    if let Some(d) = &opts.report_dir {
        report::smd_report(d, "Evaluation", &rep, &rows)?;
        rep.report_dir = Some(d.clone());
    }
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn point_adjust_fills_detected_segments_only() {
        let label = [0, 1, 1, 1, 0, 1, 1, 0];
        let pred = [1, 0, 1, 0, 0, 0, 0, 0];
        assert_eq!(point_adjust(&label, &pred), vec![1, 1, 1, 1, 0, 0, 0, 0]);
        let c = Counts::of(&label, &point_adjust(&label, &pred));
        assert_eq!(
            c,
            Counts {
                tp: 3,
                fp: 1,
                fn_: 2
            }
        );
    }

    #[test]
    fn best_f1_finds_the_separating_threshold() {
        assert_eq!(best_f1(&[0, 0, 1, 1], &[0.1, 0.2, 0.8, 0.9]), 1.0);
        assert!((best_f1(&[1, 0, 1, 0], &[0.9, 0.8, 0.1, 0.0]) - 0.8).abs() < 1e-12);
    }

    #[test]
    fn quantile_interpolates_like_numpy() {
        assert_eq!(quantile(&mut [3.0, 1.0, 2.0, 4.0], 0.5), 2.5);
        assert_eq!(quantile(&mut [1.0, 2.0], 1.0), 2.0);
    }
}
