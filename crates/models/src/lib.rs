//! Detectors for waterbear: a [`FeatureVector`] in, a [`Score`] out — a failure risk in
//! `[0, 1]`, the failure [`Signature`] it points at, and the [`Reason`]s (features) that
//! drove it.
//!
//! - [`RuleBaseline`] needs no training: SMART rules plus robust z-scores and event
//!   counts, so the pipeline works before any model exists.
//! - Trained models loaded from artifacts in `models/` implement the same [`Detector`]
//!   trait; [`MaxOf`] combines several, and [`host_detector`] builds the rules plus a
//!   trained disk model, refusing one whose features differ from the pipeline's.
//!
//! Pure logic: no I/O, no clocks, no threads.
//!
//! ```
//! use waterbear_features::{Feature, FeatureVector};
//! use waterbear_models::{Detector, RuleBaseline, Signature};
//!
//! let det = RuleBaseline::default();
//! let mut fv = FeatureVector::default();
//! assert!(det.score(&fv).value < 0.1);
//! fv[Feature::SmartCritRiseW] = 24.0; // two dozen sectors went bad in the window
//! fv[Feature::Smart5RiseW] = 24.0;
//! let s = det.score(&fv);
//! assert!(s.value > 0.9);
//! assert_eq!(s.signature, Signature::Disk);
//! assert_eq!(s.reasons.iter().next().unwrap().feature, Feature::SmartCritRiseW);
//! ```

mod artifact;
mod baseline;
mod detector;
mod host;
mod trained;

pub use artifact::{
    ARTIFACT_FORMAT, ARTIFACT_VERSION, Artifact, ArtifactError, DataRange, DriftRefs, Forest,
    MachineModel, ModelBody, SmdModel, SmdScorer, Tree, Validation,
};

pub use baseline::{BaselineConfig, RuleBaseline};
pub use detector::{Detector, MaxOf, Reason, Reasons, Score, Signature};
pub use host::{Calibrated, HostModelError, host_detector};
pub use trained::TrainedForest;
