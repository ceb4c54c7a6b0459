//! Model artifacts: a versioned JSON document that carries the model and everything
//! needed to use it honestly (feature schema, feature parameters, data range, threshold,
//! validation figures, training config). Pure: no I/O beyond `Read` / `Write`.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_features::{Feature, FeatureConfig, FeatureParams, schema_hash};

/// Value of [`Artifact::format`].
pub const ARTIFACT_FORMAT: &str = "waterbear-model";
/// Version of the artifact layout this build reads and writes.
pub const ARTIFACT_VERSION: u32 = 1;

/// Why an artifact was refused.
#[derive(Debug, Error)]
pub enum ArtifactError {
    /// Not JSON, or not the layout of this version.
    #[error("artifact does not parse: {0}")]
    Parse(#[from] serde_json::Error),
    /// Reading or writing failed.
    #[error("artifact I/O: {0}")]
    Io(#[from] std::io::Error),
    /// Not a waterbear model, or a layout version this build does not know.
    #[error(
        "artifact format {format:?} version {version} is not {ARTIFACT_FORMAT:?} version {ARTIFACT_VERSION}"
    )]
    Format {
        /// The `format` field.
        format: String,
        /// The `format_version` field.
        version: u32,
    },
    /// The artifact names a feature this build does not compute.
    #[error("artifact uses feature {0:?}, which this build does not define")]
    UnknownFeature(String),
    /// The feature schema (names, order, definitions version) differs from this build's.
    #[error(
        "feature schema mismatch: artifact was trained on schema {found}, this build computes {expected}"
    )]
    SchemaMismatch {
        /// Hash of the artifact's feature names under this build's definitions.
        expected: String,
        /// Hash recorded in the artifact.
        found: String,
    },
    /// The recorded feature parameters are out of range.
    #[error("artifact feature params: {0}")]
    Params(#[from] waterbear_features::ParamError),
    /// The model body is inconsistent (a tree pointing outside itself, wrong widths, …).
    #[error("artifact model is malformed: {0}")]
    Malformed(String),
    /// The artifact holds another kind of model than the caller needs.
    #[error("artifact holds a {found} model, expected {expected}")]
    WrongKind {
        /// What the caller needs.
        expected: &'static str,
        /// What the artifact holds.
        found: &'static str,
    },
}

/// The time range and size of the data a model was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRange {
    /// Data set file or directory name (no absolute path).
    pub source: String,
    /// First day / row used, as text (`2018-01-01`, or `train split`).
    pub from: String,
    /// Last day / row used.
    pub to: String,
    /// Training rows.
    pub rows: u64,
    /// Positive training rows (0 for unsupervised models).
    pub positives: u64,
}

/// Figures measured on the validation period (never used to pick anything).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Validation {
    /// The period or split, as text.
    pub period: String,
    /// Metric name to value (`fdr`, `far`, `median_lead_days`, `raw_f1`, …).
    pub metrics: BTreeMap<String, f64>,
}

/// One binary decision tree, flattened: node `0` is the root; a node is a leaf when
/// `left[i] == 0`. Internal nodes send `x[feature[i]] < split[i]` left (linfa's rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    /// Feature index per node (0 for leaves).
    pub feature: Vec<u32>,
    /// Split value per node (0 for leaves).
    pub split: Vec<f64>,
    /// Left child per node, 0 for leaves.
    pub left: Vec<u32>,
    /// Right child per node, 0 for leaves.
    pub right: Vec<u32>,
    /// Share of positive training rows reaching the node (the prediction at leaves).
    pub value: Vec<f64>,
}

impl Tree {
    /// The leaf value `x` falls in.
    #[inline]
    pub fn predict(&self, x: &[f64]) -> f64 {
        let mut i = 0usize;
        loop {
            let l = self.left[i];
            if l == 0 {
                return self.value[i];
            }
            i = if x[self.feature[i] as usize] < self.split[i] {
                l as usize
            } else {
                self.right[i] as usize
            };
        }
    }

    /// Adds each split's change of value along `x`'s path to `contrib[feature]`
    /// (Saabas attribution) and returns the leaf value.
    #[inline]
    pub fn explain(&self, x: &[f64], contrib: &mut [f64]) -> f64 {
        let mut i = 0usize;
        while self.left[i] != 0 {
            let f = self.feature[i] as usize;
            let next = if x[f] < self.split[i] {
                self.left[i] as usize
            } else {
                self.right[i] as usize
            };
            contrib[f] += self.value[next] - self.value[i];
            i = next;
        }
        self.value[i]
    }

    /// The leaf index `x` falls in.
    pub fn leaf(&self, x: &[f64]) -> usize {
        let mut i = 0usize;
        while self.left[i] != 0 {
            i = if x[self.feature[i] as usize] < self.split[i] {
                self.left[i] as usize
            } else {
                self.right[i] as usize
            };
        }
        i
    }

    fn check(&self, width: usize) -> Result<(), String> {
        let n = self.feature.len();
        if n == 0
            || [
                self.split.len(),
                self.left.len(),
                self.right.len(),
                self.value.len(),
            ]
            .iter()
            .any(|&m| m != n)
        {
            return Err("tree arrays differ in length or are empty".into());
        }
        for i in 0..n {
            let (l, r) = (self.left[i] as usize, self.right[i] as usize);
            if l != 0 {
                // children come after their parent: no cycles
                if l <= i || r <= i || l >= n || r >= n {
                    return Err(format!("node {i} has children {l}/{r} outside the tree"));
                }
                if self.feature[i] as usize >= width {
                    return Err(format!(
                        "node {i} splits on feature {} of {width}",
                        self.feature[i]
                    ));
                }
            } else if r != 0 {
                return Err(format!("leaf {i} has a right child"));
            }
            if !(0.0..=1.0).contains(&self.value[i]) {
                return Err(format!(
                    "node {i} has value {} outside [0, 1]",
                    self.value[i]
                ));
            }
        }
        Ok(())
    }
}

/// A bagged forest of trees; the score is the mean leaf value, in [0, 1].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forest {
    /// The trees.
    pub trees: Vec<Tree>,
    /// Impurity-based importance per feature (sums to 1), for reports.
    pub importance: Vec<f64>,
}

impl Forest {
    /// Mean leaf value over the trees.
    #[inline]
    pub fn score(&self, x: &[f64]) -> f64 {
        if self.trees.is_empty() {
            return 0.0;
        }
        self.trees.iter().map(|t| t.predict(x)).sum::<f64>() / self.trees.len() as f64
    }
}

/// Per-machine model of the SMD detector: z-scores against the train split (and, with
/// [`SmdModel::drift`], against the stream's own past levels), combined as the mean of the
/// `top_k` largest |z|, smoothed by an EWMA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineModel {
    /// Machine name (`machine-1-2`).
    pub machine: String,
    /// Train mean per metric.
    pub mean: Vec<f64>,
    /// Train standard deviation per metric, floored.
    pub sd: Vec<f64>,
    /// Train median per metric: the drift references before the stream has a past
    /// (empty without drift references).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub median: Vec<f64>,
    /// Metrics almost constant in train (unfloored sd below [`DriftRefs::low_sd`]):
    /// they also get the fast reference (empty without drift references).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub low: Vec<bool>,
    /// Alarm threshold on the smoothed score (from train scores only).
    pub threshold: f64,
}

/// Drift references of the SMD detector: a metric's deviation is its distance to the
/// *closest* of the train mean and the stream's own past levels (median of all earlier
/// rows, median of the last `slow_rows`; for metrics almost constant in train also of
/// the last `fast_rows`), so a lasting level shift stops alarming while an anomaly of a
/// few hours still stands out. References are refreshed every `block_rows` rows from
/// rows before the block: row `t` never sees rows `>= t`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriftRefs {
    /// Refresh period of the references, rows (>= 1). Before the stream has this many
    /// rows, the references are the train median.
    pub block_rows: usize,
    /// Window of the slow rolling median, rows (>= 1).
    pub slow_rows: usize,
    /// Window of the fast rolling median (near-constant metrics only), rows (>= 1).
    pub fast_rows: usize,
    /// Train sd (unfloored) below which a metric counts as near-constant.
    pub low_sd: f64,
}

/// The SMD detector's settings and machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmdModel {
    /// How many of the largest |z| are averaged.
    pub top_k: usize,
    /// Weight of the newest raw score in the EWMA smoothing, (0, 1].
    pub smooth_alpha: f64,
    /// Drift references (none: z against the train mean only, the v1 detector).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<DriftRefs>,
    /// One model per machine.
    pub machines: Vec<MachineModel>,
}

impl SmdModel {
    /// The model of `machine`, if trained.
    pub fn machine(&self, machine: &str) -> Option<&MachineModel> {
        self.machines.iter().find(|m| m.machine == machine)
    }
}

/// Mean of the `top_k` largest values of `buf` (reordered in place).
fn top_k_mean(buf: &mut [f64], top_k: usize) -> f64 {
    if buf.is_empty() {
        return 0.0;
    }
    let n = buf.len();
    let k = top_k.clamp(1, n);
    buf.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
    buf[n - k..].iter().sum::<f64>() / k as f64
}

impl MachineModel {
    /// The unsmoothed score of one row against the train split alone: mean of the
    /// `top_k` largest |z|.
    pub fn raw_score(&self, row: &[f64], top_k: usize, buf: &mut Vec<f64>) -> f64 {
        buf.clear();
        buf.extend(
            row.iter()
                .zip(self.mean.iter().zip(&self.sd))
                .map(|(x, (m, s))| ((x - m) / s).abs()),
        );
        top_k_mean(buf, top_k)
    }
}

/// Median of `v` (reordered in place), numpy's convention: the mean of the two middle
/// values of an even count.
fn median_in_place(v: &mut [f64]) -> f64 {
    let n = v.len();
    debug_assert!(n > 0);
    let (lower, mid, _) = v.select_nth_unstable_by(n / 2, |a, b| a.total_cmp(b));
    let hi = *mid;
    if n % 2 == 1 {
        hi
    } else {
        let lo = lower.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo + hi) / 2.0
    }
}

/// An `f64` ordered by `total_cmp`, for the heaps of [`RunningMedian`].
#[derive(Debug, Clone, Copy, PartialEq)]
struct Ordered(f64);

impl Eq for Ordered {}

impl PartialOrd for Ordered {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ordered {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// Exact median of every value pushed so far: two heaps, O(log n) a push.
#[derive(Debug, Clone, Default)]
struct RunningMedian {
    /// The smaller half (max-heap); holds the extra value of an odd count.
    low: std::collections::BinaryHeap<Ordered>,
    /// The larger half (min-heap).
    high: std::collections::BinaryHeap<std::cmp::Reverse<Ordered>>,
}

impl RunningMedian {
    fn push(&mut self, x: f64) {
        match self.low.peek() {
            Some(top) if x > top.0 => self.high.push(std::cmp::Reverse(Ordered(x))),
            _ => self.low.push(Ordered(x)),
        }
        if self.low.len() > self.high.len() + 1 {
            let v = self.low.pop().expect("non-empty");
            self.high.push(std::cmp::Reverse(v));
        } else if self.high.len() > self.low.len() {
            let std::cmp::Reverse(v) = self.high.pop().expect("non-empty");
            self.low.push(v);
        }
    }

    fn median(&self) -> Option<f64> {
        let lo = self.low.peek()?.0;
        if self.low.len() > self.high.len() {
            Some(lo)
        } else {
            let hi = self.high.peek().map_or(lo, |h| h.0.0);
            Some((lo + hi) / 2.0)
        }
    }
}

/// The drift references of one stream (see [`DriftRefs`]).
#[derive(Debug, Clone)]
struct DriftState {
    cfg: DriftRefs,
    /// Rows seen.
    rows: usize,
    /// Per metric: median of all rows seen.
    expanding: Vec<RunningMedian>,
    /// Per metric: the last `max(slow_rows, fast_rows)` values, oldest first.
    recent: Vec<std::collections::VecDeque<f64>>,
    /// References in force for the current block, per metric.
    expanding_ref: Vec<f64>,
    slow_ref: Vec<f64>,
    fast_ref: Vec<f64>,
    scratch: Vec<f64>,
}

impl DriftState {
    fn new(cfg: DriftRefs, median: &[f64]) -> Self {
        let n = median.len();
        Self {
            cfg,
            rows: 0,
            expanding: vec![RunningMedian::default(); n],
            recent: vec![std::collections::VecDeque::new(); n],
            expanding_ref: median.to_vec(),
            slow_ref: median.to_vec(),
            fast_ref: median.to_vec(),
            scratch: Vec::new(),
        }
    }

    /// Refreshes the references at a block start (from rows before it).
    fn refresh(&mut self) {
        let block = self.cfg.block_rows.max(1);
        if self.rows < block || self.rows % block != 0 {
            return;
        }
        for j in 0..self.recent.len() {
            if let Some(m) = self.expanding[j].median() {
                self.expanding_ref[j] = m;
            }
            let recent = &self.recent[j];
            for (w, out) in [
                (self.cfg.slow_rows, &mut self.slow_ref[j]),
                (self.cfg.fast_rows, &mut self.fast_ref[j]),
            ] {
                let w = w.min(recent.len());
                if w == 0 {
                    continue;
                }
                self.scratch.clear();
                self.scratch.extend(recent.range(recent.len() - w..));
                *out = median_in_place(&mut self.scratch);
            }
        }
    }

    /// Records a row after it was scored.
    fn observe(&mut self, row: &[f64]) {
        let keep = self.cfg.slow_rows.max(self.cfg.fast_rows).max(1);
        for (j, &x) in row.iter().enumerate().take(self.recent.len()) {
            self.expanding[j].push(x);
            let r = &mut self.recent[j];
            if r.len() == keep {
                r.pop_front();
            }
            r.push_back(x);
        }
        self.rows += 1;
    }
}

/// Online scorer of one machine's rows: row `t`'s score uses rows `<= t` only.
#[derive(Debug, Clone)]
pub struct SmdScorer<'a> {
    model: &'a MachineModel,
    top_k: usize,
    alpha: f64,
    ewma: Option<f64>,
    buf: Vec<f64>,
    drift: Option<DriftState>,
}

impl<'a> SmdScorer<'a> {
    /// A scorer that has seen nothing.
    pub fn new(smd: &SmdModel, model: &'a MachineModel) -> Self {
        let drift = smd.drift.map(|cfg| {
            // An artifact without medians falls back on the train mean.
            let base = if model.median.len() == model.mean.len() {
                &model.median
            } else {
                &model.mean
            };
            DriftState::new(cfg, base)
        });
        Self {
            model,
            top_k: smd.top_k,
            alpha: smd.smooth_alpha,
            ewma: None,
            buf: Vec::with_capacity(model.mean.len()),
            drift,
        }
    }

    fn raw(&mut self, row: &[f64]) -> f64 {
        let m = self.model;
        let Some(d) = self.drift.as_mut() else {
            return m.raw_score(row, self.top_k, &mut self.buf);
        };
        d.refresh();
        self.buf.clear();
        for (j, &x) in row.iter().enumerate().take(m.mean.len()) {
            let mut dev = (x - m.mean[j])
                .abs()
                .min((x - d.expanding_ref[j]).abs())
                .min((x - d.slow_ref[j]).abs());
            if m.low.get(j).copied().unwrap_or(false) {
                dev = dev.min((x - d.fast_ref[j]).abs());
            }
            self.buf.push(dev / m.sd[j]);
        }
        d.observe(row);
        top_k_mean(&mut self.buf, self.top_k)
    }

    /// Scores the next row (smoothed).
    pub fn push(&mut self, row: &[f64]) -> f64 {
        let s = self.raw(row);
        let m = match self.ewma {
            Some(m) => (1.0 - self.alpha) * m + self.alpha * s,
            None => s,
        };
        self.ewma = Some(m);
        m
    }
}

#[cfg(test)]
mod smd_tests {
    use super::*;
    use proptest::prelude::*;

    /// numpy's median of a slice, by sorting a copy.
    fn naive_median(v: &[f64]) -> f64 {
        let mut s = v.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }

    /// The detector written the obvious way (as the Python research script does):
    /// references recomputed from whole slices of the past at every block start.
    fn naive_scores(smd: &SmdModel, m: &MachineModel, rows: &[Vec<f64>]) -> Vec<f64> {
        let d = smd.drift.expect("drift");
        let cols = m.mean.len();
        let (mut e, mut s, mut f) = (m.median.clone(), m.median.clone(), m.median.clone());
        let mut out = Vec::new();
        let mut acc: Option<f64> = None;
        for (t, row) in rows.iter().enumerate() {
            if t % d.block_rows == 0 && t >= d.block_rows {
                for j in 0..cols {
                    let col: Vec<f64> = rows[..t].iter().map(|r| r[j]).collect();
                    e[j] = naive_median(&col);
                    s[j] = naive_median(&col[t.saturating_sub(d.slow_rows)..]);
                    f[j] = naive_median(&col[t.saturating_sub(d.fast_rows)..]);
                }
            }
            let mut z: Vec<f64> = (0..cols)
                .map(|j| {
                    let x = row[j];
                    let mut dev = (x - m.mean[j])
                        .abs()
                        .min((x - e[j]).abs())
                        .min((x - s[j]).abs());
                    if m.low[j] {
                        dev = dev.min((x - f[j]).abs());
                    }
                    dev / m.sd[j]
                })
                .collect();
            z.sort_by(|a, b| b.total_cmp(a));
            let k = smd.top_k.min(cols);
            let raw = z[..k].iter().sum::<f64>() / k as f64;
            let v = match acc {
                Some(a) => smd.smooth_alpha * raw + (1.0 - smd.smooth_alpha) * a,
                None => raw,
            };
            acc = Some(v);
            out.push(v);
        }
        out
    }

    fn model(cols: usize, low: Vec<bool>) -> (SmdModel, MachineModel) {
        let m = MachineModel {
            machine: "m".into(),
            mean: (0..cols).map(|j| 0.1 * j as f64).collect(),
            sd: vec![0.05; cols],
            median: (0..cols).map(|j| 0.1 * j as f64 + 0.01).collect(),
            low,
            threshold: 1.0,
        };
        let smd = SmdModel {
            top_k: 2,
            smooth_alpha: 0.3,
            drift: Some(DriftRefs {
                block_rows: 4,
                slow_rows: 9,
                fast_rows: 3,
                low_sd: 0.01,
            }),
            machines: vec![],
        };
        (smd, m)
    }

    proptest! {
        #[test]
        fn drift_scorer_matches_the_naive_reference(
            rows in prop::collection::vec(prop::collection::vec(0.0f64..1.0, 3), 1..60),
            low in prop::collection::vec(any::<bool>(), 3),
        ) {
            let (smd, m) = model(3, low);
            let mut sc = SmdScorer::new(&smd, &m);
            let got: Vec<f64> = rows.iter().map(|r| sc.push(r)).collect();
            let want = naive_scores(&smd, &m, &rows);
            for (g, w) in got.iter().zip(&want) {
                prop_assert!((g - w).abs() < 1e-12, "{g} vs {w}");
            }
        }

        #[test]
        fn running_median_is_the_median(v in prop::collection::vec(-1e6f64..1e6, 1..200)) {
            let mut rm = RunningMedian::default();
            for (i, &x) in v.iter().enumerate() {
                rm.push(x);
                prop_assert_eq!(rm.median(), Some(naive_median(&v[..=i])));
            }
        }
    }

    #[test]
    fn a_lasting_level_shift_stops_alarming_but_a_short_spike_does_not() {
        let (smd, m) = model(3, vec![false; 3]);
        let mut sc = SmdScorer::new(&smd, &m);
        let base = [0.0, 0.1, 0.2];
        let shifted = [0.5, 0.6, 0.7];
        let mut last = 0.0;
        for t in 0..200 {
            let row = if t < 20 { base } else { shifted };
            last = sc.push(&row);
        }
        // long after the shift the stream's own medians absorbed it
        assert!(last < 1e-9, "shift still scores {last}");
        // a two-row spike on top of the new level scores high
        let spike = [0.9, 1.0, 1.1];
        let s1 = sc.push(&spike);
        let s2 = sc.push(&spike);
        assert!(s2 > s1 && s1 > 1.0, "spike scores {s1} {s2}");
        // and the v1 detector (no drift references) never forgets the shift
        let v1 = SmdModel {
            drift: None,
            ..smd.clone()
        };
        let mut sc1 = SmdScorer::new(&v1, &m);
        let mut last1 = 0.0;
        for _ in 0..200 {
            last1 = sc1.push(&shifted);
        }
        assert!(last1 > 5.0, "v1 absorbed the shift: {last1}");
    }
}

/// What an artifact holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ModelBody {
    /// Disk failure forest over `feature_names` (waterbear features).
    DiskForest(Forest),
    /// SMD per-machine z-score detector over `feature_names` (SMD metrics).
    SmdZscore(SmdModel),
}

impl ModelBody {
    /// Short name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::DiskForest(_) => "disk_forest",
            Self::SmdZscore(_) => "smd_zscore",
        }
    }
}

/// A trained model and its provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// Always [`ARTIFACT_FORMAT`].
    pub format: String,
    /// Always [`ARTIFACT_VERSION`] for artifacts this build writes.
    pub format_version: u32,
    /// Model name (`disk-bb`, `smd`).
    pub name: String,
    /// Model version (`2018h1-1`).
    pub version: String,
    /// Names of the model's input features, in input order.
    pub feature_names: Vec<String>,
    /// [`schema_hash`] of `feature_names` under the definitions version it was built with.
    pub schema_hash: String,
    /// Feature parameters the inputs were computed with.
    pub feature_params: FeatureConfig,
    /// The training data.
    pub training_data: DataRange,
    /// Alarm threshold on the score (for SMD: per machine, in the body; this is unused).
    pub threshold: f64,
    /// How the threshold was chosen, in words.
    pub threshold_rule: String,
    /// Figures on the validation period.
    pub validation: Validation,
    /// The training config, as parsed from the pipeline TOML.
    pub training_config: serde_json::Value,
    /// The model.
    pub model: ModelBody,
}

impl Artifact {
    /// Parses and checks an artifact: format and version, feature schema, parameters,
    /// and the model body's consistency.
    pub fn read(r: impl Read) -> Result<Self, ArtifactError> {
        let a: Artifact = serde_json::from_reader(r)?;
        a.check()?;
        Ok(a)
    }

    /// Parses from a string (see [`Artifact::read`]).
    pub fn from_json(s: &str) -> Result<Self, ArtifactError> {
        Self::read(s.as_bytes())
    }

    /// Writes pretty JSON.
    pub fn write(&self, mut w: impl Write) -> Result<(), ArtifactError> {
        serde_json::to_writer(&mut w, self)?;
        w.write_all(b"\n")?;
        Ok(())
    }

    /// The checked feature parameters.
    pub fn params(&self) -> Result<FeatureParams, ArtifactError> {
        Ok(self.feature_params.clone().check()?)
    }

    /// The artifact's inputs as waterbear [`Feature`]s (disk models).
    pub fn features(&self) -> Result<Vec<Feature>, ArtifactError> {
        self.feature_names
            .iter()
            .map(|n| {
                Feature::ALL
                    .iter()
                    .copied()
                    .find(|f| f.name() == n)
                    .ok_or_else(|| ArtifactError::UnknownFeature(n.clone()))
            })
            .collect()
    }

    fn check(&self) -> Result<(), ArtifactError> {
        if self.format != ARTIFACT_FORMAT || self.format_version != ARTIFACT_VERSION {
            return Err(ArtifactError::Format {
                format: self.format.clone(),
                version: self.format_version,
            });
        }
        let names: Vec<&str> = self.feature_names.iter().map(String::as_str).collect();
        let expected = schema_hash(&names);
        if expected != self.schema_hash {
            return Err(ArtifactError::SchemaMismatch {
                expected,
                found: self.schema_hash.clone(),
            });
        }
        self.params()?;
        let width = self.feature_names.len();
        match &self.model {
            ModelBody::DiskForest(f) => {
                self.features()?;
                if f.trees.is_empty() {
                    return Err(ArtifactError::Malformed("forest has no trees".into()));
                }
                for (i, t) in f.trees.iter().enumerate() {
                    t.check(width)
                        .map_err(|e| ArtifactError::Malformed(format!("tree {i}: {e}")))?;
                }
            }
            ModelBody::SmdZscore(s) => {
                if !(s.smooth_alpha > 0.0 && s.smooth_alpha <= 1.0) || s.top_k == 0 {
                    return Err(ArtifactError::Malformed("smd top_k / smooth_alpha".into()));
                }
                for m in &s.machines {
                    if m.mean.len() != width
                        || m.sd.len() != width
                        || m.sd.iter().any(|&s| s <= 0.0)
                    {
                        return Err(ArtifactError::Malformed(format!(
                            "machine {} has {} means / {} sds for {width} metrics",
                            m.machine,
                            m.mean.len(),
                            m.sd.len()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// The forest, or [`ArtifactError::WrongKind`].
    pub fn forest(&self) -> Result<&Forest, ArtifactError> {
        match &self.model {
            ModelBody::DiskForest(f) => Ok(f),
            other => Err(ArtifactError::WrongKind {
                expected: "disk_forest",
                found: other.kind(),
            }),
        }
    }

    /// The SMD model, or [`ArtifactError::WrongKind`].
    pub fn smd(&self) -> Result<&SmdModel, ArtifactError> {
        match &self.model {
            ModelBody::SmdZscore(s) => Ok(s),
            other => Err(ArtifactError::WrongKind {
                expected: "smd_zscore",
                found: other.kind(),
            }),
        }
    }
}

/// A one-tree disk artifact for tests: splits on its second input at 1
/// (0.02 below, 0.8 at or above).
#[cfg(test)]
pub(crate) fn test_artifact(names: &[&str]) -> Artifact {
    use crate::artifact::{
        ARTIFACT_FORMAT, ARTIFACT_VERSION, DataRange, ModelBody, Tree, Validation,
    };
    use waterbear_features::{FeatureConfig, schema_hash};
    Artifact {
        format: ARTIFACT_FORMAT.into(),
        format_version: ARTIFACT_VERSION,
        name: "disk-test".into(),
        version: "1".into(),
        feature_names: names.iter().map(|s| s.to_string()).collect(),
        schema_hash: schema_hash(names),
        feature_params: FeatureConfig::default(),
        training_data: DataRange {
            source: "t".into(),
            from: "a".into(),
            to: "b".into(),
            rows: 1,
            positives: 1,
        },
        threshold: 0.5,
        threshold_rule: "t".into(),
        validation: Validation::default(),
        training_config: serde_json::Value::Null,
        model: ModelBody::DiskForest(Forest {
            trees: vec![Tree {
                feature: vec![1, 0, 0],
                split: vec![1.0, 0.0, 0.0],
                left: vec![1, 0, 0],
                right: vec![2, 0, 0],
                value: vec![0.1, 0.02, 0.8],
            }],
            importance: vec![0.0, 1.0],
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Artifact {
        test_artifact(&["smart_5", "smart_197_rise_w"])
    }

    #[test]
    fn round_trips_and_scores() {
        let a = tiny();
        let mut buf = Vec::new();
        a.write(&mut buf).unwrap();
        let b = Artifact::read(buf.as_slice()).unwrap();
        assert_eq!(a, b);
        let f = b.forest().unwrap();
        assert_eq!(f.score(&[0.0, 0.0]), 0.02);
        assert_eq!(f.score(&[0.0, 1.0]), 0.8);
        assert!(b.smd().is_err());
    }

    #[test]
    fn refuses_schema_mismatch_and_unknown_features() {
        let mut a = tiny();
        a.feature_names.swap(0, 1);
        let s = serde_json::to_string(&a).unwrap();
        assert!(matches!(
            Artifact::from_json(&s),
            Err(ArtifactError::SchemaMismatch { .. })
        ));
        let mut a = tiny();
        a.feature_names[0] = "smart_999".into();
        let refs: Vec<&str> = a.feature_names.iter().map(String::as_str).collect();
        a.schema_hash = schema_hash(&refs);
        let s = serde_json::to_string(&a).unwrap();
        assert!(matches!(
            Artifact::from_json(&s),
            Err(ArtifactError::UnknownFeature(n)) if n == "smart_999"
        ));
    }

    #[test]
    fn refuses_cyclic_tree() {
        let mut a = tiny();
        if let ModelBody::DiskForest(f) = &mut a.model {
            f.trees[0].left[0] = 0;
            f.trees[0].right[0] = 2;
        }
        let s = serde_json::to_string(&a).unwrap();
        assert!(matches!(
            Artifact::from_json(&s),
            Err(ArtifactError::Malformed(_))
        ));
    }
}
