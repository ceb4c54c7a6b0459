//! The detector that scores host telemetry: the rule baseline, plus a trained disk
//! model when one is given, with the model's alarm threshold mapped onto the policy's
//! risk scale.

use thiserror::Error;
use waterbear_features::{FeatureParams, FeatureVector};

use crate::artifact::{Artifact, ArtifactError};
use crate::baseline::{BaselineConfig, RuleBaseline};
use crate::detector::{Detector, MaxOf, Score};
use crate::trained::TrainedForest;

/// Why a model cannot score a pipeline's host telemetry.
#[derive(Debug, Error)]
pub enum HostModelError {
    /// The artifact itself was refused (format, feature schema, kind, body).
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    /// The model's inputs were computed with other feature parameters than the
    /// pipeline's: its scores would mean something else.
    #[error(
        "the model was trained with features.{field} = {model}, this pipeline computes features.{field} = {pipeline}: set it to {model} in [features] or train a model with the pipeline's features"
    )]
    FeatureParams {
        /// The first differing `[features]` field.
        field: &'static str,
        /// The model's value.
        model: String,
        /// The pipeline's value.
        pipeline: String,
    },
    /// The risk the model's threshold maps to is not in (0, 1).
    #[error("alarm risk {0} must be in (0, 1)")]
    AlarmRisk(f64),
    /// The model's own threshold is not in (0, 1), so it cannot be mapped.
    #[error("model threshold {0} must be in (0, 1)")]
    Threshold(f64),
}

/// A detector whose score is re-scaled piecewise-linearly so that its own alarm
/// threshold lands on `alarm_risk` (the policy's enter threshold): a score below the
/// threshold stays below the policy's line, one above it crosses it. Order is kept,
/// 0 stays 0 and 1 stays 1.
#[derive(Debug, Clone)]
pub struct Calibrated<D> {
    inner: D,
    threshold: f64,
    alarm_risk: f64,
}

impl<D: Detector> Calibrated<D> {
    /// Maps `inner`'s `threshold` to `alarm_risk`; both must be in (0, 1).
    pub fn new(inner: D, threshold: f64, alarm_risk: f64) -> Result<Self, HostModelError> {
        if !(threshold > 0.0 && threshold < 1.0) {
            return Err(HostModelError::Threshold(threshold));
        }
        if !(alarm_risk > 0.0 && alarm_risk < 1.0) {
            return Err(HostModelError::AlarmRisk(alarm_risk));
        }
        Ok(Self {
            inner,
            threshold,
            alarm_risk,
        })
    }

    /// The risk a raw score of the inner detector maps to.
    pub fn risk(&self, raw: f64) -> f64 {
        let (t, a) = (self.threshold, self.alarm_risk);
        let r = if raw < t {
            a * raw / t
        } else {
            a + (1.0 - a) * (raw - t) / (1.0 - t)
        };
        r.clamp(0.0, 1.0)
    }
}

impl<D: Detector> Detector for Calibrated<D> {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn version(&self) -> &str {
        self.inner.version()
    }

    fn score(&self, fv: &FeatureVector) -> Score {
        let mut s = self.inner.score(fv);
        s.value = self.risk(s.value);
        s
    }
}

/// The detector for host telemetry: the rule baseline alone, or — with a disk model
/// artifact — the higher of the rules and the model (mapped so that the model's alarm
/// threshold is `alarm_risk`, normally the policy's `enter_threshold`).
///
/// Refuses an artifact that is not a disk forest, whose feature schema differs from
/// this build's, or whose feature parameters differ from the pipeline's `features`.
pub fn host_detector(
    baseline: BaselineConfig,
    model: Option<&Artifact>,
    features: &FeatureParams,
    alarm_risk: f64,
) -> Result<Box<dyn Detector>, HostModelError> {
    let rules = RuleBaseline::new(baseline);
    let Some(a) = model else {
        return Ok(Box::new(rules));
    };
    let forest = TrainedForest::from_artifact(a)?;
    if let Some((field, model, pipeline)) = forest
        .feature_params()
        .config()
        .differences(features.config())
        .into_iter()
        .next()
    {
        return Err(HostModelError::FeatureParams {
            field,
            model,
            pipeline,
        });
    }
    let threshold = forest.threshold();
    let disk = Calibrated::new(forest, threshold, alarm_risk)?;
    Ok(Box::new(MaxOf::new(vec![Box::new(rules), Box::new(disk)])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::test_artifact;
    use crate::artifact::{ModelBody, SmdModel};
    use crate::detector::Signature;
    use waterbear_features::{Feature, FeatureConfig};

    fn artifact(params: FeatureConfig, body: ModelBody) -> Artifact {
        let mut a = test_artifact(&["smart_5", "smart_197_rise_w"]);
        a.version = "9".into();
        a.threshold = 0.4;
        a.feature_params = params;
        a.model = body;
        a
    }

    /// smart_197_rise_w >= 1 -> 0.8, else 0.02
    fn forest() -> ModelBody {
        test_artifact(&["smart_5", "smart_197_rise_w"]).model
    }

    #[test]
    fn calibration_maps_the_threshold_onto_the_alarm_risk_and_keeps_order() {
        let a = artifact(FeatureConfig::default(), forest());
        let c = Calibrated::new(TrainedForest::from_artifact(&a).unwrap(), 0.4, 0.7).unwrap();
        assert_eq!(c.risk(0.0), 0.0);
        assert!((c.risk(0.4) - 0.7).abs() < 1e-12);
        assert!(c.risk(0.399) < 0.7);
        assert_eq!(c.risk(1.0), 1.0);
        let mut prev = -1.0;
        for i in 0..=1000 {
            let r = c.risk(f64::from(i) / 1000.0);
            assert!(r >= prev, "monotone at {i}");
            prev = r;
        }
        for (t, a) in [
            (0.0, 0.7),
            (1.0, 0.7),
            (0.4, 0.0),
            (0.4, 1.0),
            (f64::NAN, 0.5),
        ] {
            assert!(
                Calibrated::new(
                    TrainedForest::from_artifact(&artifact(FeatureConfig::default(), forest()))
                        .unwrap(),
                    t,
                    a
                )
                .is_err(),
                "{t} {a}"
            );
        }
    }

    #[test]
    fn without_a_model_the_rules_score_and_with_one_the_model_can_alarm() {
        let fp = FeatureConfig::default().check().unwrap();
        let rules = host_detector(BaselineConfig::default(), None, &fp, 0.7).unwrap();
        assert_eq!(rules.name(), "rule-baseline");
        let a = artifact(FeatureConfig::default(), forest());
        let det = host_detector(BaselineConfig::default(), Some(&a), &fp, 0.7).unwrap();
        assert_eq!(det.name(), "rule-baseline+disk-test");
        assert!(det.version().contains("disk-test@9"));
        let mut fv = FeatureVector::default();
        fv[Feature::Smart197RiseW] = 1.0; // one pending sector: the rules stay low
        assert!(rules.score(&fv).value < 0.7);
        let s = det.score(&fv);
        // 0.8 on a forest whose threshold is 0.4 -> 0.7 + 0.3 * 0.4 / 0.6
        assert!((s.value - 0.9).abs() < 1e-12, "{}", s.value);
        assert_eq!(s.signature, Signature::Disk);
    }

    #[test]
    fn refuses_other_feature_params_naming_the_field() {
        let fp = FeatureConfig::default().check().unwrap();
        let a = artifact(
            FeatureConfig {
                window: 14,
                ..Default::default()
            },
            forest(),
        );
        let e = host_detector(BaselineConfig::default(), Some(&a), &fp, 0.7)
            .err()
            .unwrap();
        assert!(
            matches!(&e, HostModelError::FeatureParams { field: "window", model, pipeline } if model == "14" && pipeline == "36"),
            "{e}"
        );
        assert!(e.to_string().contains("features.window = 14"), "{e}");
    }

    #[test]
    fn refuses_a_model_of_another_kind_or_schema() {
        let fp = FeatureConfig::default().check().unwrap();
        let smd = artifact(
            FeatureConfig::default(),
            ModelBody::SmdZscore(SmdModel {
                top_k: 1,
                smooth_alpha: 0.5,
                drift: None,
                machines: vec![],
            }),
        );
        assert!(matches!(
            host_detector(BaselineConfig::default(), Some(&smd), &fp, 0.7),
            Err(HostModelError::Artifact(ArtifactError::WrongKind { .. }))
        ));
        let mut other = artifact(FeatureConfig::default(), forest());
        other.schema_hash = "0000000000000000".into();
        let json = serde_json::to_string(&other).unwrap();
        assert!(matches!(
            Artifact::read(json.as_bytes()),
            Err(ArtifactError::SchemaMismatch { .. })
        ));
    }
}
