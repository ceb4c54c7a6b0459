//! A seeded, deterministic fleet simulator.
//!
//! [`Fleet`] holds N hosts spread over clusters, racks, fault domains and update
//! domains, each running VMs. Every host has a realistic baseline (diurnal CPU and IO,
//! noise, the odd harmless SMART or ECC blip) and some hosts carry an injected
//! [`FailureMode`] with precursors that build up before the failure time: disk wear
//! (SMART 5/197/187 growth, then IO latency, over days), memory (corrected-ECC bursts
//! before an uncorrectable error), host-agent hangs (heartbeat gaps, crash loops),
//! kernel trouble, thermal throttling, correlated rack incidents, and sudden failures
//! with no precursor at all, so nothing can catch everything.
//!
//! The fleet reacts to mitigations ([`Fleet::evacuate`], [`Fleet::tardigrade`],
//! [`Fleet::reboot`], [`Fleet::take_out`]) and counts the VM interruptions that
//! failures and reboots cause. Same [`SimConfig`] and seed, same telemetry.
//!
//! ```
//! use waterbear_sim::{Fleet, SimConfig};
//!
//! let cfg = SimConfig { hosts: 20, days: 0.5, ..SimConfig::default() };
//! let mut fleet = Fleet::new(cfg.check().unwrap());
//! let mut records = Vec::new();
//! let mut n = 0;
//! while !fleet.done() {
//!     fleet.step(&mut records);
//!     n += records.len();
//! }
//! assert!(n > 20 * 60);
//! ```

mod config;
mod fleet;
mod io;

pub use config::{ConfigError, FailureMix, SimConfig, SimParams};
pub use fleet::{
    EvacuationReport, FailureMode, FailureTruth, Fleet, HealReport, HostView, SimError, VmMove,
};
pub use io::{IoError, TelemetryWriter, write_truth_ndjson, write_truth_parquet};
