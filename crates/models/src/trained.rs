//! Trained models as [`Detector`]s.

use waterbear_features::{Feature, FeatureParams, FeatureVector, N_FEATURES};

use crate::artifact::{Artifact, ArtifactError, Forest};
use crate::detector::{Detector, Reason, Reasons, Score, Signature};

/// The disk-failure forest of an artifact (`models/disk-bb-*.json`), scoring the
/// features it was trained on out of a full [`FeatureVector`].
///
/// The score is the forest's mean leaf probability; [`TrainedForest::threshold`] is the
/// artifact's alarm threshold on it (chosen for a target false-alarm rate). Reasons are
/// the features whose splits raised the probability most along the trees' paths.
#[derive(Debug, Clone)]
pub struct TrainedForest {
    name: String,
    version: String,
    features: Vec<Feature>,
    forest: Forest,
    threshold: f64,
    params: FeatureParams,
}

impl TrainedForest {
    /// Loads from an artifact; refuses other kinds and unknown feature schemas.
    pub fn from_artifact(a: &Artifact) -> Result<Self, ArtifactError> {
        let forest = a.forest()?.clone();
        Ok(Self {
            name: a.name.clone(),
            version: a.version.clone(),
            features: a.features()?,
            forest,
            threshold: a.threshold,
            params: a.params()?,
        })
    }

    /// Reads an artifact from `r` (see [`Artifact::read`]).
    pub fn read(r: impl std::io::Read) -> Result<Self, ArtifactError> {
        Self::from_artifact(&Artifact::read(r)?)
    }

    /// The alarm threshold on [`Score::value`].
    pub fn threshold(&self) -> f64 {
        self.threshold
    }

    /// The feature parameters the model's inputs must be computed with.
    pub fn feature_params(&self) -> &FeatureParams {
        &self.params
    }

    /// The model's inputs, in order.
    pub fn features(&self) -> &[Feature] {
        &self.features
    }
}

impl Detector for TrainedForest {
    fn name(&self) -> &str {
        &self.name
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn score(&self, fv: &FeatureVector) -> Score {
        let mut x = [0.0f64; N_FEATURES];
        for (v, &f) in x.iter_mut().zip(&self.features) {
            *v = fv[f];
        }
        let x = &x[..self.features.len()];
        let mut contrib = [0.0f64; N_FEATURES];
        let mut sum = 0.0;
        for t in &self.forest.trees {
            sum += t.explain(x, &mut contrib[..x.len()]);
        }
        let n = self.forest.trees.len().max(1) as f64;
        let value = (sum / n).clamp(0.0, 1.0);
        let mut reasons = Reasons::default();
        for (k, &f) in self.features.iter().enumerate() {
            reasons.push(Reason {
                feature: f,
                value: x[k],
                contribution: contrib[k] / n,
            });
        }
        Score {
            value,
            signature: if value > 0.0 {
                Signature::Disk
            } else {
                Signature::None
            },
            reasons,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn artifact(names: &[&str]) -> Artifact {
        crate::artifact::test_artifact(names)
    }

    #[test]
    fn selects_its_features_from_the_full_vector_and_explains() {
        let a = artifact(&["smart_5", "smart_197_rise_w"]);
        let mut buf = Vec::new();
        a.write(&mut buf).unwrap();
        let det = TrainedForest::read(buf.as_slice()).unwrap();
        assert_eq!(det.name(), "disk-test");
        assert_eq!(det.threshold(), 0.5);
        let mut fv = FeatureVector::default();
        assert_eq!(det.score(&fv).value, 0.02);
        fv[Feature::Smart197RiseW] = 3.0;
        let s = det.score(&fv);
        assert_eq!(s.value, 0.8);
        assert_eq!(s.signature, Signature::Disk);
        let r = s.reasons.iter().next().unwrap();
        assert_eq!(r.feature, Feature::Smart197RiseW);
        assert!((r.contribution - 0.7).abs() < 1e-12);
    }

    #[test]
    fn refuses_a_schema_from_other_definitions() {
        let mut a = artifact(&["smart_5", "smart_197_rise_w"]);
        a.schema_hash = "0123456789abcdef".into();
        let s = serde_json::to_string(&a).unwrap();
        assert!(matches!(
            TrainedForest::read(s.as_bytes()),
            Err(ArtifactError::SchemaMismatch { .. })
        ));
    }
}
