use std::path::Path;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_features::FeatureConfig;
use waterbear_models::BaselineConfig;
use waterbear_pipeline::PipelineConfig;
use waterbear_policy::PolicyConfig;
use waterbear_sim::SimConfig;

/// `pipelines/demo.toml`, built into the binary so `waterbear demo` needs no files.
pub const EMBEDDED_DEMO_CONFIG: &str = include_str!("../../../pipelines/demo.toml");

/// The demo's pipeline file: a simulated fleet and the per-record pipeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DemoConfig {
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
