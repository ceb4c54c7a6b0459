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

/// Per-machine model of the SMD detector: robust-ish z-scores against the train split,
/// combined as the mean of the `top_k` largest |z|, smoothed by an EWMA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineModel {
    /// Machine name (`machine-1-2`).
    pub machine: String,
    /// Train mean per metric.
    pub mean: Vec<f64>,
    /// Train standard deviation per metric, floored.
    pub sd: Vec<f64>,
    /// Alarm threshold on the smoothed score (from train scores only).
    pub threshold: f64,
}

/// The SMD detector's settings and machines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmdModel {
    /// How many of the largest |z| are averaged.
    pub top_k: usize,
    /// Weight of the newest raw score in the EWMA smoothing, (0, 1].
    pub smooth_alpha: f64,
    /// One model per machine.
    pub machines: Vec<MachineModel>,
}

impl SmdModel {
    /// The model of `machine`, if trained.
    pub fn machine(&self, machine: &str) -> Option<&MachineModel> {
        self.machines.iter().find(|m| m.machine == machine)
    }
}

impl MachineModel {
    /// The unsmoothed score of one row: mean of the `top_k` largest |z|.
    pub fn raw_score(&self, row: &[f64], top_k: usize, buf: &mut Vec<f64>) -> f64 {
        buf.clear();
        buf.extend(
            row.iter()
                .zip(self.mean.iter().zip(&self.sd))
                .map(|(x, (m, s))| ((x - m) / s).abs()),
        );
        let k = top_k.clamp(1, buf.len().max(1));
        if buf.is_empty() {
            return 0.0;
        }
        let n = buf.len();
        buf.select_nth_unstable_by(n - k, |a, b| a.total_cmp(b));
        buf[n - k..].iter().sum::<f64>() / k as f64
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
}

impl<'a> SmdScorer<'a> {
    /// A scorer that has seen nothing.
    pub fn new(smd: &SmdModel, model: &'a MachineModel) -> Self {
        Self {
            model,
            top_k: smd.top_k,
            alpha: smd.smooth_alpha,
            ewma: None,
            buf: Vec::with_capacity(model.mean.len()),
        }
    }

    /// Scores the next row (smoothed).
    pub fn push(&mut self, row: &[f64]) -> f64 {
        let s = self.model.raw_score(row, self.top_k, &mut self.buf);
        let m = match self.ewma {
            Some(m) => (1.0 - self.alpha) * m + self.alpha * s,
            None => s,
        };
        self.ewma = Some(m);
        m
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
