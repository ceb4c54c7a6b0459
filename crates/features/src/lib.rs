//! Online features for waterbear: per-host state updated in O(1) per record.
//!
//! [`FeatureSet`] keeps one [`HostState`] per host and turns each
//! [`HostRecord`](waterbear_telemetry::HostRecord) into a [`FeatureVector`] of
//! [`N_FEATURES`] numbers, named by [`Feature`]. The offline trainer (crate `train`)
//! computes the same numbers over whole histories with polars; a test there proves the
//! two agree. So the definitions below are a contract: change them only together with
//! [`DEFINITIONS_VERSION`].
//!
//! # Definitions
//!
//! For one entity (a host, or a drive offline), records `i = 0, 1, …` in time order,
//! `t_i` the timestamp in hours (`ts_ms / 3_600_000`), parameters from [`FeatureParams`]
//! (`W` = `window`, `α_f` = `fast_alpha`, `α_s` = `slow_alpha`):
//!
//! - **delta** of a counter `C`: `Δ_i = C_i − C_{i−1}` (signed), and `Δ_0 = 0`.
//! - **rise over the window**: `R_i = Σ_{j=max(0,i−W+1)..=i} max(Δ_j, 0)`: the last `W`
//!   records, the current one included.
//! - **hours since rise**: `min(cap, t_i − t_k)` for the last `k ≤ i` with `Δ_k > 0`;
//!   `cap` (= `hours_cap`) when the counter never rose.
//! - **EWMA**: `m_0 = x_0`, `m_i = (1 − α)·m_{i−1} + α·x_i` (polars `ewm_mean` with
//!   `adjust = false`).
//! - **z-score against the entity's own baseline**: with `μ` the slow EWMA of `x` and
//!   `q` the slow EWMA of `x²`, both *up to the previous record*:
//!   `z_i = clip((x_i − μ_{i−1}) / max(√max(q_{i−1} − μ_{i−1}², 0), floor), −z_clip, z_clip)`,
//!   and `z_i = 0` while `i < warmup`.
//! - **window count / sum**: `Σ` over the last `W` records of an indicator or an event
//!   count.
//! - **rate per hour**: `Δ_i / (t_i − t_{i−1})`, `0` when no time passed or `i = 0`.
//!
//! Each [`Feature`]'s doc says which definition it applies to which field.
//!
//! ```
//! use waterbear_features::{Feature, FeatureParams, FeatureSet};
//! use waterbear_telemetry::HostRecord;
//!
//! let mut set = FeatureSet::new(FeatureParams::default());
//! let mut rec = HostRecord::example("h1", 0);
//! set.update(&rec);
//! rec.ts_ms += 600_000;
//! rec.smart_5_raw += 8; // eight sectors reallocated in ten minutes
//! let (_, fv) = set.update(&rec);
//! assert_eq!(fv[Feature::Smart5Delta], 8.0);
//! assert_eq!(fv[Feature::Smart5HoursSinceRise], 0.0);
//! assert_eq!(fv[Feature::SmartCritRose], 1.0);
//! ```

mod host;
mod params;
mod primitives;
mod schema;

pub use host::{FeatureSet, HostIdx, HostState};
pub use params::{FeatureConfig, FeatureParams, ParamError};
pub use primitives::{EwMoments, Ewma, RingSums, zscore};
pub use schema::{
    DEFINITIONS_VERSION, FEATURE_NAMES, Feature, FeatureVector, N_FEATURES, SMART_FEATURES,
    schema_hash,
};
