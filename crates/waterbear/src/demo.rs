//! `waterbear demo`: a simulated fleet streamed through features → detector → policy →
//! executor in one process, compared with reactive healing on the same fleet.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use thiserror::Error;
use waterbear_executor::{Executor, SimBackend};
use waterbear_pipeline::{Pipeline, PipelineError};
use waterbear_policy::{Action, BudgetKind, Decision};
use waterbear_sim::{FailureMode, Fleet, TelemetryWriter};

use crate::config::DemoConfig;

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Fleet and pipeline settings.
    pub config: DemoConfig,
    /// Where the outputs go (created if missing).
    pub out_dir: PathBuf,
    /// Show a progress bar.
    pub progress: bool,
    /// Trained disk model scored next to the rules (see [`DemoConfig::model_artifact`]).
    pub model: Option<waterbear_models::Artifact>,
}

/// Why the demo could not run.
#[derive(Debug, Error)]
pub enum DemoError {
    /// A `[sim]` setting is invalid.
    #[error(transparent)]
    Sim(#[from] waterbear_sim::ConfigError),
    /// A `[features]` or `[policy]` setting is invalid.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Writing telemetry or ground truth failed.
    #[error(transparent)]
    Output(#[from] waterbear_sim::IoError),
    /// Writing decisions or the summary failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// One failure mode's line in the summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModeRow {
    /// Failures injected with this mode that were due within the simulated period.
    pub injected: u32,
    /// Of those, how many got a mitigation before the failure time.
    pub predicted: u32,
    /// Of those, how many interrupted no VM (healed, or the host was drained first).
    pub averted: u32,
    /// Median lead time of the predicted ones: failure time − first decision, hours.
    pub median_lead_h: Option<f64>,
}

/// What the demo measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct DemoSummary {
    /// Hosts simulated.
    pub hosts: usize,
    /// Fleet time simulated, days.
    pub days: f64,
    /// VMs in the fleet at the start.
    pub vms: usize,
    /// Telemetry records streamed.
    pub records: u64,
    /// Records rejected by validation (each written to the dead-letter file).
    pub rejected: u64,
    /// Failures by mode.
    pub failures: BTreeMap<String, ModeRow>,
    /// Decisions by action.
    pub actions: BTreeMap<String, u64>,
    /// Actions that failed in the executor.
    pub failed_actions: u64,
    /// Actions on hosts that had no failure coming.
    pub false_positive_actions: u64,
    /// Records on which an action was due but the fault-domain budget was full.
    pub deferred_by_budget: u64,
    /// Most hosts of one fault domain under mitigation at once.
    pub max_in_flight_per_fault_domain: u32,
    /// The configured budget.
    pub budget_per_fault_domain: u32,
    /// VMs interrupted with waterbear acting (failures it did not avert, plus reboots).
    pub vm_interruptions: u64,
    /// Of those, by reboots waterbear chose.
    pub vm_interruptions_by_reboots: u64,
    /// VMs briefly frozen by Tardigrade phase 3 (memory kept, no interruption).
    pub vm_freezes: u64,
    /// VMs interrupted on the same fleet with reactive healing only.
    pub reactive_vm_interruptions: u64,
    /// Wall time of the run, seconds.
    pub wall_s: f64,
    /// Records per second of wall time (simulation and output included).
    pub records_per_s: f64,
    /// Where the outputs are.
    pub out_dir: String,
}

impl DemoSummary {
    /// Failures of one mode.
    pub fn mode(&self, mode: FailureMode) -> ModeRow {
        self.failures
            .get(mode.as_str())
            .cloned()
            .unwrap_or_default()
    }
}

fn median(xs: &mut [f64]) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    Some(if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    })
}

struct Ndjson {
    path: String,
    w: BufWriter<File>,
}

impl Ndjson {
    fn create(path: &Path) -> Result<Self, DemoError> {
        let p = path.display().to_string();
        let f = File::create(path).map_err(|source| DemoError::Io {
            step: "creating",
            path: p.clone(),
            source,
        })?;
        Ok(Self {
            path: p,
            w: BufWriter::new(f),
        })
    }

    fn write<T: Serialize>(&mut self, v: &T) -> Result<(), DemoError> {
        let err = |source| DemoError::Io {
            step: "writing",
            path: self.path.clone(),
            source,
        };
        serde_json::to_writer(&mut self.w, v).map_err(|e| err(e.into()))?;
        self.w.write_all(b"\n").map_err(err)
    }

    fn finish(self) -> Result<(), DemoError> {
        let path = self.path;
        let f = self.w.into_inner().map_err(|e| DemoError::Io {
            step: "flushing",
            path: path.clone(),
            source: e.into_error(),
        })?;
        f.sync_all().map_err(|source| DemoError::Io {
            step: "syncing",
            path,
            source,
        })
    }
}

#[derive(Serialize)]
struct DeadLetter<'a> {
    reason: &'a str,
    error: String,
    record: &'a waterbear_telemetry::HostRecord,
}

/// Runs the demo and writes under `out_dir`: `telemetry.parquet`, `truth.ndjson`,
/// `truth.parquet`, `decisions.ndjson`, `outcomes.ndjson`, `dead_letter.ndjson`,
/// `policy_records.ndjson` (infrastructure incidents, circuit breaker, commands),
/// `summary.json` and `summary.md`.
pub fn run_demo(opts: &DemoOptions) -> Result<DemoSummary, DemoError> {
    run_demo_with(opts, None)
}

/// Sees every decision after the simulated executor carried it out (e.g. to
/// repeat it on real VMs: `waterbear demo --kvm`).
pub(crate) trait DecisionHook {
    /// `report` is the simulated outcome of `d`.
    fn on_decision(&mut self, d: &Decision, report: &waterbear_executor::ExecutionReport);
}

/// [`run_demo`] with a hook on every decision.
pub(crate) fn run_demo_with(
    opts: &DemoOptions,
    mut hook: Option<&mut dyn DecisionHook>,
) -> Result<DemoSummary, DemoError> {
    let started = Instant::now();
    let cfg = &opts.config;
    let sim = cfg.sim.clone().check()?;
    let mut pipeline = Pipeline::with_model(cfg.pipeline(), opts.model.as_ref())?;
    let out = &opts.out_dir;
    std::fs::create_dir_all(out).map_err(|source| DemoError::Io {
        step: "creating",
        path: out.display().to_string(),
        source,
    })?;

    let fleet = Fleet::new(sim.clone());
    let vms = fleet.vm_count();
    let mut reactive = Fleet::new(sim.clone());
    let mut exec = Executor::new(SimBackend::new(fleet));
    let mut telemetry = TelemetryWriter::create(&out.join("telemetry.parquet"), 65_536)?;
    let mut decisions_out = Ndjson::create(&out.join("decisions.ndjson"))?;
    let mut outcomes_out = Ndjson::create(&out.join("outcomes.ndjson"))?;
    let mut dead = Ndjson::create(&out.join("dead_letter.ndjson"))?;
    let mut notices_out = Ndjson::create(&out.join("policy_records.ndjson"))?;

    let (_, ticks) = exec.backend().fleet().progress();
    let bar = if opts.progress {
        ProgressBar::new(ticks)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} fleet time {msg} [{bar:40}] {pos}/{len} steps ({eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );

    let mut summary = DemoSummary {
        hosts: sim.hosts,
        days: sim.days,
        vms,
        budget_per_fault_domain: cfg.policy.max_per_fault_domain,
        out_dir: out.display().to_string(),
        ..DemoSummary::default()
    };
    let mut decisions: Vec<Decision> = Vec::new();
    let mut buf = Vec::new();
    let mut scratch = Vec::new();
    // outcomes reach the policy when fleet time passes the operation's end
    let mut pending: Vec<(i64, String, waterbear_policy::Outcome)> = Vec::new();
    while !exec.backend().fleet().done() {
        let now = exec.backend().fleet().now_ms();
        pending.retain(|(done_ms, id, outcome)| {
            if *done_ms <= now {
                pipeline.report(id, outcome.clone(), *done_ms);
                false
            } else {
                true
            }
        });
        exec.backend_mut().fleet_mut().step(&mut buf);
        reactive.step(&mut scratch);
        telemetry.write(&buf)?;
        for rec in &buf {
            summary.records += 1;
            let step = match pipeline.process(rec, rec.ts_ms) {
                Ok(step) => step,
                Err(e) => {
                    summary.rejected += 1;
                    dead.write(&DeadLetter {
                        reason: e.kind(),
                        error: e.to_string(),
                        record: rec,
                    })?;
                    continue;
                }
            };
            if pipeline.policy().has_notices() {
                for n in pipeline.take_notices() {
                    notices_out.write(&n)?;
                }
            }
            let Some(d) = step.decision else { continue };
            decisions_out.write(&d)?;
            let report = {
                let p = &pipeline;
                exec.execute(&d, &|h| p.is_healthy_target(h))
            };
            outcomes_out.write(&report)?;
            if let Some(h) = hook.as_mut() {
                h.on_decision(&d, &report);
            }
            if let Some(op) = &report.report {
                summary.vm_freezes += u64::from(op.vms_frozen);
            } else {
                summary.failed_actions += 1;
            }
            let in_use = pipeline
                .policy()
                .budget_usage()
                .filter(|b| b.kind == BudgetKind::FaultDomain)
                .map(|b| b.used)
                .max()
                .unwrap_or(0);
            summary.max_in_flight_per_fault_domain =
                summary.max_in_flight_per_fault_domain.max(in_use);
            pending.push((report.finished_ms, d.id.clone(), report.outcome()));
            *summary
                .actions
                .entry(d.action.as_str().to_owned())
                .or_default() += 1;
            decisions.push(d);
        }
        let (pos, _) = exec.backend().fleet().progress();
        bar.set_position(pos);
        if pos % 36 == 0 {
            bar.set_message(format!(
                "day {:.1}",
                pos as f64 * sim.interval_s as f64 / 86_400.0
            ));
        }
    }
    bar.finish_and_clear();
    let rows = telemetry.finish()?;
    debug_assert_eq!(rows, summary.records);
    decisions_out.finish()?;
    outcomes_out.finish()?;
    dead.finish()?;
    notices_out.finish()?;

    let mut fleet = exec.backend().fleet().clone();
    fleet.settle();
    reactive.settle();
    let end_ms = fleet.now_ms();
    waterbear_sim::write_truth_ndjson(&out.join("truth.ndjson"), fleet.truth())?;
    waterbear_sim::write_truth_parquet(&out.join("truth.parquet"), fleet.truth())?;

    // score the decisions against the ground truth
    let mut first_decision: HashMap<&str, Vec<i64>> = HashMap::new();
    for d in &decisions {
        first_decision
            .entry(d.host_id.as_str())
            .or_default()
            .push(d.ts_ms);
    }
    let failing: HashMap<&str, &waterbear_sim::FailureTruth> = fleet
        .truth()
        .iter()
        .map(|t| (t.host_id.as_str(), t))
        .collect();
    let mut leads: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for t in fleet.truth().iter().filter(|t| t.fail_ms < end_ms) {
        let row = summary
            .failures
            .entry(t.mode.as_str().to_owned())
            .or_default();
        row.injected += 1;
        let early = first_decision
            .get(t.host_id.as_str())
            .and_then(|ts| ts.iter().copied().filter(|&x| x < t.fail_ms).min());
        if let Some(first) = early {
            row.predicted += 1;
            leads
                .entry(t.mode.as_str().to_owned())
                .or_default()
                .push((t.fail_ms - first) as f64 / 3_600_000.0);
        }
        if t.vms_interrupted == 0 {
            row.averted += 1;
        }
    }
    for (mode, mut xs) in leads {
        if let Some(row) = summary.failures.get_mut(&mode) {
            row.median_lead_h = median(&mut xs);
        }
    }
    summary.false_positive_actions = decisions
        .iter()
        .filter(|d| !failing.contains_key(d.host_id.as_str()))
        .count() as u64;
    summary.deferred_by_budget = pipeline.policy().stats().deferred_budget;
    summary.vm_interruptions = fleet.interruptions();
    summary.vm_interruptions_by_reboots = fleet.reboot_interruptions();
    summary.reactive_vm_interruptions = reactive.interruptions();
    summary.wall_s = started.elapsed().as_secs_f64();
    summary.records_per_s = summary.records as f64 / summary.wall_s.max(1e-9);

    let write = |name: &str, text: String| {
        let path = out.join(name);
        std::fs::write(&path, text).map_err(|source| DemoError::Io {
            step: "writing",
            path: path.display().to_string(),
            source,
        })
    };
    write(
        "summary.json",
        serde_json::to_string_pretty(&summary).expect("summary serialises"),
    )?;
    write("summary.md", summary.to_string())?;
    Ok(summary)
}

impl fmt::Display for DemoSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "## waterbear demo: {} hosts, {} VMs, {:.1} days, {} records ({} rejected) in {:.1} s ({:.0} records/s)\n",
            self.hosts,
            self.vms,
            self.days,
            self.records,
            self.rejected,
            self.wall_s,
            self.records_per_s
        )?;
        writeln!(
            f,
            "| failure mode | injected | predicted | averted | median lead (h) |"
        )?;
        writeln!(f, "|---|---:|---:|---:|---:|")?;
        let mut tot = ModeRow::default();
        for mode in FailureMode::ALL {
            let r = self.mode(mode);
            tot.injected += r.injected;
            tot.predicted += r.predicted;
            tot.averted += r.averted;
            let lead = r
                .median_lead_h
                .map_or("-".to_owned(), |h| format!("{h:.1}"));
            writeln!(
                f,
                "| {} | {} | {} | {} | {} |",
                mode.as_str(),
                r.injected,
                r.predicted,
                r.averted,
                lead
            )?;
        }
        writeln!(
            f,
            "| **total** | {} | {} | {} | |\n",
            tot.injected, tot.predicted, tot.averted
        )?;
        writeln!(f, "| action | count |")?;
        writeln!(f, "|---|---:|")?;
        for a in Action::ALL {
            writeln!(
                f,
                "| {} | {} |",
                a.as_str(),
                self.actions.get(a.as_str()).copied().unwrap_or(0)
            )?;
        }
        writeln!(
            f,
            "| false-positive actions (host had no failure coming) | {} |",
            self.false_positive_actions
        )?;
        writeln!(
            f,
            "| actions that failed in the executor | {} |\n",
            self.failed_actions
        )?;
        writeln!(f, "| VM impact | waterbear | reactive healing only |")?;
        writeln!(f, "|---|---:|---:|")?;
        writeln!(
            f,
            "| VM interruptions | {} (of which {} by reboots) | {} |",
            self.vm_interruptions, self.vm_interruptions_by_reboots, self.reactive_vm_interruptions
        )?;
        writeln!(
            f,
            "| VMs frozen briefly (Tardigrade phase 3, memory kept) | {} | 0 |\n",
            self.vm_freezes
        )?;
        writeln!(
            f,
            "Budget: at most {} of {} allowed hosts per fault domain under mitigation at once; {} records waited for budget.",
            self.max_in_flight_per_fault_domain,
            self.budget_per_fault_domain,
            self.deferred_by_budget
        )?;
        write!(f, "Outputs: {}", self.out_dir)
    }
}
