//! Training and evaluating the disk-failure forest on Backblaze data.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use linfa::prelude::*;
use linfa::{Dataset, ParamGuard};
use ndarray::{Array1, Array2};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use waterbear_features::{Feature, FeatureParams, SMART_FEATURES};

use crate::bb::{self, BbData, BbMetrics, FeatureTable};
use crate::config::{BbParams, TrainConfig, resolve_data};
use crate::dates::{Day, fmt_day, parse_day};
use crate::forest::ForestParams;
use crate::report;
use crate::{Timings, TrainError};
use waterbear_models::{
    ARTIFACT_FORMAT, ARTIFACT_VERSION, Artifact, DataRange, Forest, ModelBody, Validation,
};

/// The committed disk model used when no `--model` is given.
pub const DEFAULT_DISK_MODEL: &str = "models/disk-bb-v2.json";

/// Finds a committed model file: as given, else relative to the workspace root.
pub fn locate_model(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if p.exists() {
        return p;
    }
    let alt = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path);
    if alt.exists() { alt } else { p }
}

/// Reads and checks an artifact file.
pub fn load_artifact(path: &Path) -> Result<Artifact, TrainError> {
    let f = std::fs::File::open(path).map_err(TrainError::io(path))?;
    Ok(Artifact::read(std::io::BufReader::new(f))?)
}

/// The default features of the forest: [`SMART_FEATURES`] without `dt_hours` and
/// `records_seen`, which describe the observation window rather than the drive.
pub fn default_disk_features() -> Vec<Feature> {
    SMART_FEATURES
        .iter()
        .copied()
        .filter(|f| !matches!(f, Feature::DtHours | Feature::RecordsSeen))
        .collect()
}

/// Scores every row of `data` (0 for rows without features) with `forest` over
/// `features`.
pub fn score_rows(
    data: &BbData,
    table: &FeatureTable,
    features: &[Feature],
    forest: &Forest,
) -> Vec<f64> {
    score_rows_between(data, table, features, forest, Day::MIN, Day::MAX)
}

/// Like [`score_rows`], for the rows dated `from..=to` only (the others score 0).
pub fn score_rows_between(
    data: &BbData,
    table: &FeatureTable,
    features: &[Feature],
    forest: &Forest,
    from: Day,
    to: Day,
) -> Vec<f64> {
    let cols: Vec<&[f64]> = features
        .iter()
        .map(|&f| table.col(f).expect("a SMART feature"))
        .collect();
    let mut scores = vec![0.0; data.len()];
    let n = table.len();
    let mut part = vec![0.0; n];
    let mid = n / 2;
    let (a, b) = part.split_at_mut(mid);
    std::thread::scope(|s| {
        for (chunk, start) in [(a, 0usize), (b, mid)] {
            let cols = &cols;
            s.spawn(move || {
                let mut x = vec![0.0; cols.len()];
                for (j, out) in chunk.iter_mut().enumerate() {
                    let day = data.date[table.rows[start + j] as usize];
                    if day < from || day > to {
                        continue;
                    }
                    for (v, c) in x.iter_mut().zip(cols.iter()) {
                        *v = c[start + j];
                    }
                    *out = forest.score(&x);
                }
            });
        }
    });
    for (j, &r) in table.rows.iter().enumerate() {
        scores[r as usize] = part[j];
    }
    scores
}

/// Training rows (feature-row indices) and labels known at `end`, from `from` on: all
/// positives plus `negatives` sampled healthy rows.
fn sample_rows(
    data: &BbData,
    table: &FeatureTable,
    from: Day,
    end: Day,
    horizon: u32,
    negatives: usize,
    seed: u64,
) -> (Vec<usize>, Vec<usize>) {
    let labels = bb::labels_known_at(data, end, horizon);
    let mut pos = Vec::new();
    let mut neg = Vec::new();
    for (j, &r) in table.rows.iter().enumerate() {
        let r = r as usize;
        if data.date[r] < from {
            continue;
        }
        match labels[r] {
            Some(true) => pos.push(j),
            Some(false) => neg.push(j),
            None => {}
        }
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let take = negatives.min(neg.len());
    let mut picked: Vec<usize> = rand::seq::index::sample(&mut rng, neg.len(), take)
        .into_iter()
        .map(|i| neg[i])
        .collect();
    picked.sort_unstable();
    let mut rows = pos.clone();
    let mut y = vec![1usize; pos.len()];
    rows.extend(picked);
    y.resize(rows.len(), 0);
    (rows, y)
}

fn matrix(table: &FeatureTable, features: &[Feature], rows: &[usize]) -> Array2<f64> {
    let cols: Vec<&[f64]> = features
        .iter()
        .map(|&f| table.col(f).expect("SMART feature"))
        .collect();
    Array2::from_shape_fn((rows.len(), cols.len()), |(i, k)| cols[k][rows[i]])
}

fn fit(
    data: &BbData,
    table: &FeatureTable,
    features: &[Feature],
    p: &BbParams,
    end: Day,
    progress: bool,
) -> Result<(Forest, usize, usize), TrainError> {
    let s = &p.section;
    let (rows, y) = sample_rows(
        data,
        table,
        p.train_from,
        end,
        s.horizon_days,
        s.negatives,
        s.seed,
    );
    let positives = y.iter().filter(|&&c| c == 1).count();
    if positives == 0 {
        return Err(TrainError::Data(format!(
            "no failure with a known label in {}..{}",
            fmt_day(p.train_from),
            fmt_day(end)
        )));
    }
    let x = matrix(table, features, &rows);
    let forest = ForestParams::default()
        .trees(s.trees)
        .max_depth(s.max_depth)
        .min_leaf(s.min_leaf)
        .bootstrap_proportion(s.bootstrap_proportion)
        .feature_proportion(s.feature_proportion)
        .seed(s.seed)
        .progress(progress)
        .check()?
        .fit(&Dataset::new(x, Array1::from(y)))?;
    Ok((forest, rows.len(), positives))
}

/// One line of a Backblaze report.
#[derive(Debug, Clone, PartialEq)]
pub struct BbRow {
    /// Rule or model.
    pub name: String,
    /// Period, as text.
    pub period: String,
    /// The figures.
    pub metrics: BbMetrics,
}

/// What `train` on Backblaze and `evaluate backblaze` print.
#[derive(Debug, Clone)]
pub struct BbReport {
    /// Data file.
    pub data: PathBuf,
    /// Model name and version.
    pub model: String,
    /// Alarm threshold of the model.
    pub threshold: f64,
    /// How it was chosen.
    pub threshold_rule: String,
    /// Rules and model per period.
    pub rows: Vec<BbRow>,
    /// Wall time of each step, seconds.
    pub timings: Timings,
    /// Where the Markdown report went.
    pub report_dir: Option<PathBuf>,
}

impl fmt::Display for BbReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "data: {}", self.data.display())?;
        writeln!(
            f,
            "model: {} (threshold {:.6}: {})",
            self.model, self.threshold, self.threshold_rule
        )?;
        writeln!(
            f,
            "{:<40} {:<24} {:>6} {:>7} {:>9} {:>7} {:>7}",
            "alarms", "period", "FDR", "FAR", "med.lead", "failed", "healthy"
        )?;
        for r in &self.rows {
            let lead = r
                .metrics
                .median_lead
                .map_or("-".to_string(), |l| format!("{l}"));
            writeln!(
                f,
                "{:<40} {:<24} {:>6.3} {:>7.4} {:>9} {:>7} {:>7}",
                r.name,
                r.period,
                r.metrics.fdr,
                r.metrics.far,
                lead,
                r.metrics.failed,
                r.metrics.healthy
            )?;
        }
        write!(f, "{}", self.timings)?;
        if let Some(d) = &self.report_dir {
            writeln!(f, "report: {}", d.join("report.md").display())?;
        }
        Ok(())
    }
}

/// Rule names as in `bb_eval.py`.
pub const RULE_LEVEL: &str = "any critical counter > 0";
/// See [`RULE_LEVEL`].
pub const RULE_ROSE: &str = "any critical counter rose";

fn period(a: Day, b: Day) -> String {
    format!("{}..{}", fmt_day(a), fmt_day(b))
}

/// Trains the disk forest of a `[backblaze]` pipeline, writes the artifact and report.
pub(crate) fn train_backblaze(
    cfg: &TrainConfig,
    p: &BbParams,
    progress: bool,
) -> Result<(BbReport, Artifact), TrainError> {
    let mut timings = Timings::default();
    let t0 = Instant::now();
    let s = &p.section;
    let data = bb::load_backblaze(&p.data)?;
    timings.push("load parquet", t0.elapsed());
    let t = Instant::now();
    let table = bb::build_features(&data, &cfg.features)?;
    timings.push("features (polars)", t.elapsed());

    let features: Vec<Feature> = if s.features.is_empty() {
        default_disk_features()
    } else {
        s.features
            .iter()
            .map(|n| {
                *SMART_FEATURES
                    .iter()
                    .find(|f| f.name() == n)
                    .expect("checked")
            })
            .collect()
    };
    // 1. threshold: a forest fitted on labels known the day before calibration scores
    //    the calibration period; the threshold meets target_far there.
    let t = Instant::now();
    let (cal_forest, _, _) = fit(&data, &table, &features, p, p.calib_from - 1, progress)?;
    // only the calibration period's rows are read below
    let cal_scores = score_rows_between(
        &data,
        &table,
        &features,
        &cal_forest,
        p.calib_from,
        p.train_to,
    );
    let threshold =
        bb::threshold_for_far(&data, &cal_scores, p.calib_from, p.train_to, s.target_far);
    let cal = bb::evaluate_alarms(
        &data,
        &cal_scores
            .iter()
            .map(|&x| x >= threshold)
            .collect::<Vec<_>>(),
        p.calib_from,
        p.train_to,
        s.horizon_days,
    );
    timings.push("fit + calibrate threshold", t.elapsed());
    // 2. the shipped forest: labels known at train_to
    let t = Instant::now();
    let (forest, n_rows, n_pos) = fit(&data, &table, &features, p, p.train_to, progress)?;
    timings.push("fit final forest", t.elapsed());
    let t = Instant::now();
    let scores = score_rows(&data, &table, &features, &forest);
    let alarms: Vec<bool> = scores.iter().map(|&x| x >= threshold).collect();
    let valid = bb::evaluate_alarms(&data, &alarms, p.valid_from, p.valid_to, s.horizon_days);
    let (level, rose) = bb::rule_alarms(&data);
    let vp = period(p.valid_from, p.valid_to);
    let mut rows = vec![
        BbRow {
            name: RULE_LEVEL.into(),
            period: vp.clone(),
            metrics: bb::evaluate_alarms(&data, &level, p.valid_from, p.valid_to, s.horizon_days),
        },
        BbRow {
            name: RULE_ROSE.into(),
            period: vp.clone(),
            metrics: bb::evaluate_alarms(&data, &rose, p.valid_from, p.valid_to, s.horizon_days),
        },
        BbRow {
            name: format!("{} (calibration)", cfg.file.name),
            period: period(p.calib_from, p.train_to),
            metrics: cal,
        },
        BbRow {
            name: cfg.file.name.clone(),
            period: vp.clone(),
            metrics: valid.clone(),
        },
    ];
    rows.rotate_left(0);
    timings.push("score + evaluate", t.elapsed());

    let names: Vec<&str> = features.iter().map(|f| f.name()).collect();
    let threshold_rule = format!(
        "drive-level FAR <= {} on {} for a forest fitted on labels known by {}",
        s.target_far,
        period(p.calib_from, p.train_to),
        fmt_day(p.calib_from - 1)
    );
    let mut metrics = std::collections::BTreeMap::new();
    metrics.insert("fdr".to_string(), valid.fdr);
    metrics.insert("far".to_string(), valid.far);
    metrics.insert("failed".to_string(), valid.failed as f64);
    metrics.insert("healthy".to_string(), valid.healthy as f64);
    if let Some(l) = valid.median_lead {
        metrics.insert("median_lead_days".to_string(), l);
    }
    let artifact = Artifact {
        format: ARTIFACT_FORMAT.into(),
        format_version: ARTIFACT_VERSION,
        name: cfg.file.name.clone(),
        version: cfg.file.version.clone(),
        schema_hash: waterbear_features::schema_hash(&names),
        feature_names: names.iter().map(|s| s.to_string()).collect(),
        feature_params: cfg.features.config().clone(),
        training_data: DataRange {
            source: file_name(&p.data),
            from: fmt_day(p.train_from),
            to: fmt_day(p.train_to),
            rows: n_rows as u64,
            positives: n_pos as u64,
        },
        threshold,
        threshold_rule: threshold_rule.clone(),
        validation: Validation {
            period: vp,
            metrics,
        },
        training_config: serde_json::to_value(&cfg.file).unwrap_or(serde_json::Value::Null),
        model: ModelBody::DiskForest(forest),
    };
    write_artifact(&cfg.file.model_out, &artifact)?;
    timings.total(t0.elapsed());
    let mut rep = BbReport {
        data: p.data.clone(),
        model: format!("{} {}", artifact.name, artifact.version),
        threshold,
        threshold_rule,
        rows,
        timings,
        report_dir: None,
    };
    let dir = cfg
        .file
        .reports_dir
        .join(format!("train-{}-{}", artifact.name, artifact.version));
    report::bb_report(
        &dir,
        "Training",
        &rep,
        &artifact,
        &data,
        &scores,
        p.valid_from,
        p.valid_to,
        s.horizon_days,
    )?;
    rep.report_dir = Some(dir);
    Ok((rep, artifact))
}

pub(crate) fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |f| f.to_string_lossy().into_owned(),
    )
}

pub(crate) fn write_artifact(path: &Path, a: &Artifact) -> Result<(), TrainError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    let f = std::fs::File::create(path).map_err(TrainError::io(path))?;
    a.write(std::io::BufWriter::new(f))?;
    Ok(())
}

/// Options of `evaluate backblaze`.
#[derive(Debug, Clone, Default)]
pub struct BbEvalOptions {
    /// Backblaze-format parquet (default: the shared H1 2018 file).
    pub data: Option<PathBuf>,
    /// Model artifact (default: [`DEFAULT_DISK_MODEL`]).
    pub model: Option<PathBuf>,
    /// First day evaluated (default: the file's first day).
    pub from: Option<String>,
    /// Last day evaluated (default: the file's last day).
    pub to: Option<String>,
    /// Write `serial_number, date, alarm, score` of every drive-day here.
    pub alarms_out: Option<PathBuf>,
    /// Write `report.md` and PNGs under this directory.
    pub report_dir: Option<PathBuf>,
}

/// The shared Backblaze file.
pub const SHARED_BB: &str = "../shared/data/backblaze/st4000dm000_2018H1.parquet";

/// Evaluates the two reference rules and a trained model on a Backblaze-format file.
pub fn evaluate_backblaze(opts: &BbEvalOptions) -> Result<BbReport, TrainError> {
    let mut timings = Timings::default();
    let t0 = Instant::now();
    let data_path = resolve_data(opts.data.as_deref().unwrap_or(Path::new(SHARED_BB)));
    let model_path = opts
        .model
        .clone()
        .unwrap_or_else(|| locate_model(DEFAULT_DISK_MODEL));
    let artifact = load_artifact(&model_path)?;
    let forest = artifact.forest()?;
    let features = artifact.features()?;
    let params: FeatureParams = artifact.params()?;
    let horizon = artifact
        .training_config
        .pointer("/backblaze/horizon_days")
        .and_then(serde_json::Value::as_u64)
        .unwrap_or(10) as u32;
    let data = bb::load_backblaze(&data_path)?;
    if data.is_empty() {
        return Err(TrainError::Data(format!(
            "{} has no rows",
            data_path.display()
        )));
    }
    timings.push("load parquet", t0.elapsed());
    let t = Instant::now();
    let table = bb::build_features(&data, &params)?;
    timings.push("features (polars)", t.elapsed());
    let t = Instant::now();
    let scores = score_rows(&data, &table, &features, forest);
    let alarms: Vec<bool> = scores.iter().map(|&x| x >= artifact.threshold).collect();
    let (level, rose) = bb::rule_alarms(&data);
    let (lo, hi) = data.span();
    let day = |s: &Option<String>, d: Day, field: &str| -> Result<Day, TrainError> {
        match s {
            Some(s) => parse_day(s).ok_or_else(|| TrainError::Config {
                path: "evaluate backblaze".into(),
                message: format!("{field} = {s:?} is not a date YYYY-MM-DD"),
            }),
            None => Ok(d),
        }
    };
    let from = day(&opts.from, lo, "from")?;
    let to = day(&opts.to, hi, "to")?;
    let mut periods = vec![(from, to)];
    // the artifact's validation period, when it lies inside the data and differs
    if let Some((a, b)) = artifact.validation.period.split_once("..")
        && let (Some(a), Some(b)) = (parse_day(a), parse_day(b))
        && a >= lo
        && b <= hi
        && (a, b) != (from, to)
    {
        periods.push((a, b));
    }
    let name = format!("{} {}", artifact.name, artifact.version);
    let mut rows = Vec::new();
    for &(a, b) in &periods {
        for (n, al) in [
            (RULE_LEVEL.to_string(), &level),
            (RULE_ROSE.to_string(), &rose),
            (name.clone(), &alarms),
        ] {
            rows.push(BbRow {
                name: n,
                period: period(a, b),
                metrics: bb::evaluate_alarms(&data, al, a, b, horizon),
            });
        }
    }
    timings.push("score + evaluate", t.elapsed());
    if let Some(out) = &opts.alarms_out {
        let t = Instant::now();
        crate::output::write_alarms(out, &data, &alarms, &scores)?;
        timings.push("write alarms", t.elapsed());
    }
    timings.total(t0.elapsed());
    let mut rep = BbReport {
        data: data_path,
        model: name,
        threshold: artifact.threshold,
        threshold_rule: artifact.threshold_rule.clone(),
        rows,
        timings,
        report_dir: None,
    };
    if let Some(dir) = &opts.report_dir {
        let (a, b) = *periods.last().expect("one period");
        report::bb_report(
            dir,
            "Evaluation",
            &rep,
            &artifact,
            &data,
            &scores,
            a,
            b,
            horizon,
        )?;
        rep.report_dir = Some(dir.clone());
    }
    Ok(rep)
}
