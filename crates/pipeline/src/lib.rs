//! The per-record pipeline of waterbear, as pure logic:
//! [`Validator`](waterbear_telemetry::Validator) → [`FeatureSet`] →
//! [`Detector`] → [`Policy`].
//!
//! The demo, the streaming job and the benchmarks all drive this one type, so they make
//! the same decisions from the same records.
//!
//! ```
//! use waterbear_pipeline::{Pipeline, PipelineConfig};
//! use waterbear_telemetry::HostRecord;
//!
//! let mut p = Pipeline::from_config(PipelineConfig::default()).unwrap();
//! let step = p.process(&HostRecord::example("h1", 0), 0).unwrap();
//! assert!(step.decision.is_none());
//! // a bad record is rejected with a typed error, and changes nothing
//! let mut bad = HostRecord::example("h1", 600_000);
//! bad.cpu_util = f64::NAN;
//! assert_eq!(p.process(&bad, 600_000).unwrap_err().kind(), "non_finite");
//! ```

use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_features::{Feature, FeatureConfig, FeatureSet, FeatureVector, HostIdx, ParamError};
use waterbear_models::{
    Artifact, BaselineConfig, Detector, HostModelError, RuleBaseline, Score, host_detector,
};
use waterbear_policy::{
    Command, ConfigError, Decision, HostInfo, Notice, Outcome, Policy, PolicyConfig,
};
use waterbear_telemetry::{HostRecord, Limits, ValidationError, Validator};

/// Settings of the per-record pipeline (`[features]`, `[baseline]`, `[policy]` in a
/// pipeline TOML).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// Online features.
    pub features: FeatureConfig,
    /// The rule baseline detector.
    pub baseline: BaselineConfig,
    /// The policy.
    pub policy: PolicyConfig,
}

/// A pipeline setting out of range, or a model it cannot use.
#[derive(Debug, Error)]
pub enum PipelineError {
    /// In `[features]`.
    #[error(transparent)]
    Features(#[from] ParamError),
    /// In `[policy]`.
    #[error(transparent)]
    Policy(#[from] ConfigError),
    /// The trained model was refused (kind, schema, or other `[features]`).
    #[error("model: {0}")]
    Model(#[from] HostModelError),
}

/// What one accepted record produced.
#[derive(Debug, Clone)]
pub struct Step {
    /// The host's dense index.
    pub host: HostIdx,
    /// Its features.
    pub features: FeatureVector,
    /// The detector's score.
    pub score: Score,
    /// The decision, if the policy took one.
    pub decision: Option<Decision>,
}

/// Validate → features → detector → policy, for a whole fleet.
pub struct Pipeline {
    validator: Validator,
    features: FeatureSet,
    detector: Box<dyn Detector>,
    model: String,
    policy: Policy,
}

impl Pipeline {
    /// A pipeline with the rule baseline as its detector.
    pub fn from_config(cfg: PipelineConfig) -> Result<Self, PipelineError> {
        let detector = Box::new(RuleBaseline::new(cfg.baseline.clone()));
        Self::with_detector(cfg, detector)
    }

    /// A pipeline whose detector is the rule baseline plus, if given, a trained disk
    /// model, its alarm threshold mapped onto `policy.enter_threshold`
    /// ([`waterbear_models::host_detector`]).
    pub fn with_model(
        cfg: PipelineConfig,
        model: Option<&Artifact>,
    ) -> Result<Self, PipelineError> {
        let features = cfg.features.clone().check()?;
        let detector = host_detector(
            cfg.baseline.clone(),
            model,
            &features,
            cfg.policy.enter_threshold,
        )?;
        Self::with_detector(cfg, detector)
    }

    /// A pipeline with the given detector (e.g. a trained model, or several in
    /// [`waterbear_models::MaxOf`]).
    pub fn with_detector(
        cfg: PipelineConfig,
        detector: Box<dyn Detector>,
    ) -> Result<Self, PipelineError> {
        let features = FeatureSet::new(cfg.features.check()?);
        let policy = Policy::new(cfg.policy.check()?);
        let model = format!("{}@{}", detector.name(), detector.version());
        Ok(Self {
            validator: Validator::new(Limits::default()),
            features,
            detector,
            model,
            policy,
        })
    }

    /// Validates a record against the host's history (with `now_ms` as the receiver's
    /// clock), then runs it through the pipeline. A rejected record changes no state.
    pub fn process(&mut self, rec: &HostRecord, now_ms: i64) -> Result<Step, ValidationError> {
        self.validator.check(rec, now_ms)?;
        Ok(self.process_valid(rec))
    }

    /// Runs a record that is already known to be valid (the benchmark's path).
    #[inline]
    pub fn process_valid(&mut self, rec: &HostRecord) -> Step {
        let mut features = FeatureVector::default();
        let host = self.features.update_into(rec, &mut features);
        let score = self.detector.score(&features);
        let info = HostInfo {
            host_id: &rec.host_id,
            cluster: &rec.cluster,
            rack: &rec.rack,
            fault_domain: rec.fault_domain,
            update_domain: rec.update_domain,
            // telemetry carries no VM placement: one cluster-wide availability set
            availability_sets: &[],
            vm_count: rec.vms.len() as u32,
            vm_mem_mib: rec.vms.iter().map(|v| u64::from(v.mem_mib)).sum(),
        };
        let mut decision = self
            .policy
            .observe(host, &info, rec.ts_ms, &score, &self.model);
        if let Some(d) = &mut decision {
            d.features = Some(
                Feature::ALL
                    .iter()
                    .map(|&f| (f.name().to_owned(), features[f]))
                    .collect(),
            );
        }
        Step {
            host,
            features,
            score,
            decision,
        }
    }

    /// Feeds an executor's outcome back to the policy. False for unknown ids.
    pub fn report(&mut self, decision_id: &str, outcome: Outcome, ts_ms: i64) -> bool {
        self.policy.report(decision_id, outcome, ts_ms)
    }

    /// The policy (for stats, budgets and target health).
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The policy, mutably (for inputs other than records: the executor's bandwidth).
    pub fn policy_mut(&mut self) -> &mut Policy {
        &mut self.policy
    }

    /// Applies an operator command (pause, resume, force, forbid, return to service).
    pub fn command(&mut self, cmd: &Command) -> bool {
        self.policy.command(cmd)
    }

    /// The receiver's clock, for the circuit breaker's staleness check.
    pub fn tick(&mut self, now_ms: i64) {
        self.policy.tick(now_ms);
    }

    /// Policy notices (infrastructure incidents, circuit breaker, commands) since the
    /// last call.
    pub fn take_notices(&mut self) -> Vec<Notice> {
        self.policy.take_notices()
    }

    /// The features (for host lookups).
    pub fn features(&self) -> &FeatureSet {
        &self.features
    }

    /// Detector name@version recorded in decisions.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Whether `host_id` may receive migrated VMs: known to be healthy by the policy.
    pub fn is_healthy_target(&self, host_id: &str) -> bool {
        match self.features.get(host_id) {
            Some(i) => self.policy.is_healthy_target(i),
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_errors_name_the_section_and_field() {
        let cfg: PipelineConfig = toml::from_str("[policy]\nevidence_records = 0\n").unwrap();
        let err = Pipeline::from_config(cfg).err().unwrap();
        assert!(
            err.to_string().starts_with("policy.evidence_records"),
            "{err}"
        );
        let cfg: PipelineConfig = toml::from_str("[features]\nwindow = 0\n").unwrap();
        let err = Pipeline::from_config(cfg).err().unwrap();
        assert!(err.to_string().starts_with("features.window"), "{err}");
        let err = toml::from_str::<PipelineConfig>("[policy]\nenter = 0.5\n").unwrap_err();
        assert!(err.to_string().contains("unknown field `enter`"), "{err}");
    }

    #[test]
    fn rejected_records_do_not_change_state() {
        let mut p = Pipeline::from_config(PipelineConfig::default()).unwrap();
        let mut r = HostRecord::example("h", 0);
        p.process(&r, 0).unwrap();
        r.ts_ms = 600_000;
        r.ecc_corrected = 0; // backwards from 3
        assert_eq!(
            p.process(&r, 600_000).unwrap_err().kind(),
            "counter_backwards"
        );
        r.ecc_corrected = 3;
        let step = p.process(&r, 600_000).unwrap();
        assert_eq!(step.features[waterbear_features::Feature::RecordsSeen], 2.0);
    }
}
