use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_features::FeatureConfig;
use waterbear_models::{Artifact, ArtifactError, BaselineConfig};
use waterbear_pipeline::PipelineConfig;
use waterbear_policy::PolicyConfig;
use waterbear_sim::SimConfig;

/// `pipelines/demo.toml`, built into the binary so `waterbear demo` needs no files.
pub const EMBEDDED_DEMO_CONFIG: &str = include_str!("../../../pipelines/demo.toml");

/// The committed disk model (`models/disk-bb-v2.json`, trained on the shared Backblaze
/// data), built into the binary for `model = "builtin"`.
pub const BUILTIN_DISK_MODEL: &str = include_str!("../../../models/disk-bb-v2.json");

/// The demo's pipeline file: a simulated fleet and the per-record pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
    /// Trained disk model scored next to the rule baseline: `"builtin"` (the committed
    /// `models/disk-bb-v2.json`, built into the binary), `"none"` (the rules alone) or
    /// a model file. Empty means `"none"`.
    pub model: String,
    /// The simulated fleet.
    pub sim: SimConfig,
    /// Online features.
    pub features: FeatureConfig,
    /// The rule baseline detector.
    pub baseline: BaselineConfig,
    /// The policy.
    pub policy: PolicyConfig,
}

/// A pipeline file that could not be read or parsed.
#[derive(Debug, Error)]
pub enum ConfigLoadError {
    /// `model` names a file that cannot be read or is not a model artifact.
    #[error("model = {path:?}: {source}")]
    Model {
        /// The `model` value.
        path: String,
        /// The cause.
        source: waterbear_models::ArtifactError,
    },
    /// Reading the file failed.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// TOML syntax or an unknown / mistyped field (the message names it).
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// The cause.
        source: toml::de::Error,
    },
}

impl DemoConfig {
    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigLoadError> {
        toml::from_str(text).map_err(|source| ConfigLoadError::Parse {
            path: origin.to_owned(),
            source,
        })
    }

    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Self, ConfigLoadError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigLoadError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text, &p)
    }

    /// The embedded default.
    pub fn embedded() -> Self {
        Self::parse(EMBEDDED_DEMO_CONFIG, "pipelines/demo.toml")
            .expect("the embedded demo config parses")
    }

    /// The model artifact `model` names (`None` for the rules alone).
    pub fn model_artifact(&self) -> Result<Option<Artifact>, ConfigLoadError> {
        let err = |source| ConfigLoadError::Model {
            path: self.model.clone(),
            source,
        };
        match self.model.as_str() {
            "" | "none" => Ok(None),
            "builtin" => Artifact::from_json(BUILTIN_DISK_MODEL)
                .map(Some)
                .map_err(err),
            path => {
                let f = std::fs::File::open(path).map_err(|e| err(ArtifactError::Io(e)))?;
                Artifact::read(std::io::BufReader::new(f))
                    .map(Some)
                    .map_err(err)
            }
        }
    }

    /// The per-record pipeline part.
    pub fn pipeline(&self) -> PipelineConfig {
        PipelineConfig {
            features: self.features.clone(),
            baseline: self.baseline.clone(),
            policy: self.policy.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_config_parses_and_validates() {
        let c = DemoConfig::embedded();
        assert_eq!(c.sim.hosts, 500);
        c.sim.clone().check().unwrap();
        c.features.clone().check().unwrap();
        c.policy.clone().check().unwrap();
        assert_eq!(c.model, "builtin");
        let a = c.model_artifact().unwrap().expect("the builtin model");
        assert_eq!((a.name.as_str(), a.version.as_str()), ("disk-bb", "v2"));
        // the demo's features are the model's, so the pipeline accepts it
        waterbear_pipeline::Pipeline::with_model(c.pipeline(), Some(&a)).unwrap();
    }

    #[test]
    fn model_choices() {
        let mut c = DemoConfig::embedded();
        c.model = "none".into();
        assert!(c.model_artifact().unwrap().is_none());
        c.model = "/nonexistent/model.json".into();
        let e = c.model_artifact().unwrap_err().to_string();
        assert!(e.starts_with("model = \"/nonexistent/model.json\""), "{e}");
        c.model = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/smd-v1.json").into();
        let a = c.model_artifact().unwrap().unwrap();
        // an SMD model is an artifact, but not one that can score hosts
        assert!(waterbear_pipeline::Pipeline::with_model(c.pipeline(), Some(&a)).is_err());
    }

    #[test]
    fn unknown_fields_are_named_with_their_section() {
        let err = DemoConfig::parse("[sim]\nhost = 3\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `host`"), "{err}");
        assert!(err.starts_with("x.toml"), "{err}");
        let err = DemoConfig::parse("[polcy]\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `polcy`"), "{err}");
    }
}
