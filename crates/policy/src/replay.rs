//! Serializable policy inputs and outputs, and a driver that replays them: the format
//! of the fixture files (`crates/policy/fixtures/*.json`) and of recorded policy runs.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use waterbear_features::HostIdx;
use waterbear_models::{Reasons, Score, Signature};

use crate::decision::{Command, Decision, Notice, Outcome};
use crate::engine::{HostInfo, Policy};

/// One scored record, with its host's facts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserveInput {
    /// Host id.
    pub host_id: String,
    /// Cluster.
    #[serde(default = "default_cluster")]
    pub cluster: String,
    /// Rack.
    #[serde(default = "default_rack")]
    pub rack: String,
    /// Fault domain.
    #[serde(default)]
    pub fault_domain: u32,
    /// Update domain.
    #[serde(default)]
    pub update_domain: u32,
    /// Availability sets of its VMs (empty: the cluster-wide set).
    #[serde(default)]
    pub availability_sets: Vec<u32>,
    /// VMs on it.
    #[serde(default = "default_vms")]
    pub vm_count: u32,
    /// Their memory, MiB.
    #[serde(default = "default_mem")]
    pub vm_mem_mib: u64,
    /// Record time, ms.
    pub ts_ms: i64,
    /// Detector score.
    pub score: f64,
    /// Failure signature.
    #[serde(default = "default_sig")]
    pub signature: Signature,
}

fn default_cluster() -> String {
    "c".into()
}
fn default_rack() -> String {
    "r".into()
}
fn default_vms() -> u32 {
    4
}
fn default_mem() -> u64 {
    16_384
}
fn default_sig() -> Signature {
    Signature::Disk
}

/// An input of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "input")]
pub enum Input {
    /// A scored record.
    Observe(ObserveInput),
    /// An executor outcome.
    Report {
        /// Decision id.
        id: String,
        /// What happened.
        outcome: Outcome,
        /// When, ms.
        ts_ms: i64,
    },
    /// An operator command.
    Command {
        /// The command.
        command: Command,
    },
    /// The receiver's clock.
    Tick {
        /// Now, ms.
        now_ms: i64,
    },
    /// A live-migration bandwidth measured by the executor.
    Bandwidth {
        /// MiB/s.
        mib_per_s: f64,
    },
}

/// An output of the policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "output")]
pub enum Output {
    /// A mitigation.
    Decision(Decision),
    /// A notice.
    Notice(Notice),
}

/// Drives a [`Policy`] with [`Input`]s, assigning host indices by first appearance.
#[derive(Debug, Clone)]
pub struct Replay {
    /// The policy.
    pub policy: Policy,
    index: HashMap<String, HostIdx>,
    model: String,
}

impl Replay {
    /// A replay over `policy`; decisions name `model`.
    pub fn new(policy: Policy, model: &str) -> Self {
        Self {
            policy,
            index: HashMap::new(),
            model: model.to_owned(),
        }
    }

    /// The dense index of a host (assigned on first sight).
    pub fn host_index(&mut self, host_id: &str) -> HostIdx {
        let n = self.index.len() as HostIdx;
        *self.index.entry(host_id.to_owned()).or_insert(n)
    }

    /// Applies one input; returns what it produced, decisions first, then notices.
    pub fn step(&mut self, input: &Input) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Observe(o) => {
                let idx = self.host_index(&o.host_id);
                let info = HostInfo {
                    host_id: &o.host_id,
                    cluster: &o.cluster,
                    rack: &o.rack,
                    fault_domain: o.fault_domain,
                    update_domain: o.update_domain,
                    availability_sets: &o.availability_sets,
                    vm_count: o.vm_count,
                    vm_mem_mib: o.vm_mem_mib,
                };
                let score = Score {
                    value: o.score,
                    signature: o.signature,
                    reasons: Reasons::default(),
                };
                if let Some(d) = self
                    .policy
                    .observe(idx, &info, o.ts_ms, &score, &self.model)
                {
                    out.push(Output::Decision(d));
                }
            }
            Input::Report { id, outcome, ts_ms } => {
                self.policy.report(id, outcome.clone(), *ts_ms);
            }
            Input::Command { command } => {
                self.policy.command(command);
            }
            Input::Tick { now_ms } => self.policy.tick(*now_ms),
            Input::Bandwidth { mib_per_s } => self.policy.set_migration_bandwidth(*mib_per_s),
        }
        out.extend(self.policy.take_notices().into_iter().map(Output::Notice));
        out
    }
}
