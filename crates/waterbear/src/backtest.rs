//! `waterbear backtest`: replays recorded traces through policy variants and two
//! baselines, and reports VM interruptions per 100 VMs per year, mitigations, wasted
//! mitigations and budget use — the trade-off curve of the policy.
//!
//! Traces:
//! - **sim**: the simulator's fleet recorded with no mitigation (the reactive world),
//!   with its ground truth of failures (time and mode).
//! - **backblaze**: SMART histories of real drives (one drive = one host, one record a
//!   day, a few VMs each), failures from Backblaze's `failure` column.
//!
//! Each variant replays the trace through the real pipeline (features → detector →
//! policy). Its decisions act counterfactually: an evacuation before the failure time
//! saves the host's VMs, a Tardigrade phase or reboot that clears the failure's mode
//! (the simulator's rules) saves them too, a reboot interrupts them; a mitigated host's
//! later records leave the replay (the trace cannot show what a repaired host would
//! have sent). A mitigation is **wasted** when its host had no failure coming (in the
//! trace's truth, including failures planned past its end).
//!
//! Baselines: **reactive** (heal after failure: every failure interrupts its VMs) and
//! the **static SMART rule** (Backblaze's: any of SMART 5/187/188/197/198 raw > 0 →
//! migrate, with no budgets).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::{Date32Type, Int64Type};
use arrow_array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;
use thiserror::Error;
use waterbear_features::FeatureConfig;
use waterbear_models::BaselineConfig;
use waterbear_pipeline::{Pipeline, PipelineConfig, PipelineError};
use waterbear_policy::{Action, BudgetKind, Decision, Outcome, Phase, PolicyConfig};
use waterbear_sim::{FailureMode, Fleet, SimConfig};
use waterbear_telemetry::{HostRecord, VmInfo, WIRE_VERSION};

const DAY_MS: i64 = 86_400_000;

/// Why a backtest could not run.
#[derive(Debug, Error)]
pub enum BacktestError {
    /// Bad settings.
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    /// Bad simulator settings.
    #[error(transparent)]
    Sim(#[from] waterbear_sim::ConfigError),
    /// Reading or writing a file.
    #[error("{step} {path}: {msg}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: String,
        /// The cause.
        msg: String,
    },
}

fn io_err(step: &'static str, path: &Path, e: impl std::fmt::Display) -> BacktestError {
    BacktestError::Io {
        step,
        path: path.display().to_string(),
        msg: e.to_string(),
    }
}

/// How to run the backtest.
#[derive(Debug, Clone)]
pub struct BacktestOptions {
    /// Output directory (table, JSON, plot, decisions).
    pub out_dir: PathBuf,
    /// The simulated fleet to record (None: skip the sim trace).
    pub sim: Option<SimConfig>,
    /// Backblaze SMART sample (None: skip).
    pub backblaze: Option<PathBuf>,
    /// Draw the trade-off plot.
    pub plot: bool,
}

/// One failure to judge against.
#[derive(Debug, Clone)]
struct Failure {
    fail_ms: i64,
    mode: FailureMode,
}

/// Streams a trace's records, in time order, to a sink.
type Replayer = dyn Fn(&mut dyn FnMut(&HostRecord));

/// A recorded trace: records in time order, and the truth about failures.
struct Trace {
    name: &'static str,
    records: Box<Replayer>,
    /// Hosts with a failure coming (within the trace or past its end).
    failing: HashMap<String, Failure>,
    end_ms: i64,
    days: f64,
    vms: u64,
    pipeline: PipelineConfig,
}

/// One line of the trade-off table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Trace.
    pub trace: String,
    /// Variant or baseline.
    pub variant: String,
    /// VMs interrupted.
    pub interruptions: u64,
    /// Per 100 VMs per year.
    pub interruptions_per_100_vm_years: f64,
    /// Change against reactive healing, % (negative is fewer).
    pub vs_reactive_pct: f64,
    /// Failures in the trace.
    pub failures: u32,
    /// Of those, averted.
    pub averted: u32,
    /// Mitigations performed (decisions acted on).
    pub mitigations: u64,
    /// Of those, on hosts that would not have failed.
    pub wasted: u64,
    /// Wasted share, %.
    pub wasted_pct: f64,
    /// Most hosts of one fault domain under mitigation at once / its limit.
    pub max_fd_in_use: String,
    /// Records on which a budget, the rate limit or capacity made an action wait.
    pub deferred: u64,
    /// Evacuations started.
    pub evacuations: u64,
    /// Infrastructure incidents and circuit-breaker trips.
    pub guards: String,
}

/// A named policy setting.
#[derive(Debug, Clone)]
pub struct Variant {
    /// Name in the table.
    pub name: String,
    /// The policy.
    pub policy: PolicyConfig,
}

/// The variants of the curve: enter threshold × evidence records.
pub fn default_variants(base: &PolicyConfig) -> Vec<Variant> {
    let mut v = Vec::new();
    for (thr, ev) in [
        (0.2, 1),
        (0.35, 1),
        (0.5, 1),
        (0.5, 3),
        (0.6, 2),
        (0.7, 1),
        (0.7, 3),
        (0.8, 3),
        (0.9, 3),
        (0.95, 6),
    ] {
        v.push(Variant {
            name: format!("policy thr={thr} ev={ev}"),
            policy: PolicyConfig {
                enter_threshold: thr,
                exit_threshold: (thr * 0.4f64).min(0.3),
                evidence_records: ev,
                probation_enter_threshold: (thr * 0.75f64).min(base.probation_enter_threshold),
                probation_evidence_records: 1,
                ..base.clone()
            },
        });
    }
    v
}

fn modes_healed(a: Action) -> &'static [FailureMode] {
    match a {
        Action::Tardigrade {
            phase: Phase::RecycleServices,
        } => &[FailureMode::HostAgent],
        Action::Tardigrade {
            phase: Phase::MemoryPreservingReset,
        } => &[
            FailureMode::HostAgent,
            FailureMode::Kernel,
            FailureMode::Memory,
        ],
        Action::Reboot => &[FailureMode::HostAgent, FailureMode::Kernel],
        _ => &[],
    }
}

/// Counterfactual ledger of one replay.
#[derive(Default)]
struct Ledger {
    /// Host → time it left the replay (evacuated or healed) and whether it was saved.
    gone: HashMap<String, i64>,
    saved: HashSet<String>,
    last_vms: HashMap<String, u32>,
    reboot_interruptions: u64,
    mitigations: u64,
    wasted: u64,
}

impl Ledger {
    fn interruptions(&self, t: &Trace) -> (u64, u32, u32) {
        let mut lost = self.reboot_interruptions;
        let (mut n, mut averted) = (0, 0);
        for (h, f) in &t.failing {
            if f.fail_ms >= t.end_ms {
                continue;
            }
            n += 1;
            if self.saved.contains(h) {
                averted += 1;
            } else {
                lost += u64::from(self.last_vms.get(h).copied().unwrap_or(0));
            }
        }
        (lost, n, averted)
    }
}

fn per_100_vm_years(lost: u64, t: &Trace) -> f64 {
    lost as f64 / t.vms.max(1) as f64 * 100.0 * 365.0 / t.days
}

fn replay_policy(
    t: &Trace,
    v: &Variant,
    out_dir: &Path,
) -> Result<(Row, Vec<Decision>), BacktestError> {
    let mut cfg = t.pipeline.clone();
    cfg.policy = v.policy.clone();
    let mut p = Pipeline::from_config(cfg)?;
    let mut l = Ledger::default();
    let mut pending: Vec<(i64, String)> = Vec::new();
    let mut decisions = Vec::new();
    let mut max_fd = 0u32;
    let bandwidth = v.policy.migrate_mib_per_s;
    (t.records)(&mut |rec: &HostRecord| {
        if l.gone.contains_key(&rec.host_id) {
            return;
        }
        if !pending.is_empty() && pending.iter().any(|x| x.0 <= rec.ts_ms) {
            pending.retain(|(done, id)| {
                if *done <= rec.ts_ms {
                    p.report(id, Outcome::Succeeded, *done);
                    false
                } else {
                    true
                }
            });
        }
        l.last_vms.insert(rec.host_id.clone(), rec.vms.len() as u32);
        let step = p.process_valid(rec);
        let Some(d) = step.decision else { return };
        l.mitigations += 1;
        let failure = t.failing.get(&d.host_id);
        if failure.is_none() {
            l.wasted += 1;
        }
        let vms = rec.vms.len() as u32;
        let duration = match d.action {
            Action::LiveMigrate | Action::OutOfRotation => {
                let mib: u64 = rec.vms.iter().map(|v| u64::from(v.mem_mib)).sum();
                (mib as f64 / bandwidth * 1000.0) as i64 + 2_000 * i64::from(vms)
            }
            Action::Reboot => 300_000,
            _ => 90_000,
        };
        if d.action == Action::Reboot {
            l.reboot_interruptions += u64::from(vms);
        }
        let in_time = failure.is_some_and(|f| d.ts_ms < f.fail_ms);
        let heals = failure.is_some_and(|f| modes_healed(d.action).contains(&f.mode));
        match d.action {
            Action::LiveMigrate | Action::OutOfRotation => {
                l.gone.insert(d.host_id.clone(), d.ts_ms);
                if in_time {
                    l.saved.insert(d.host_id.clone());
                }
            }
            _ if in_time && heals => {
                l.gone.insert(d.host_id.clone(), d.ts_ms);
                l.saved.insert(d.host_id.clone());
            }
            _ => {}
        }
        let fd = p
            .policy()
            .budget_usage()
            .filter(|b| b.kind == BudgetKind::FaultDomain)
            .map(|b| b.used)
            .max()
            .unwrap_or(0);
        max_fd = max_fd.max(fd);
        pending.push((d.ts_ms + duration, d.id.clone()));
        decisions.push(d);
    });
    let _ = out_dir;
    let (lost, n, averted) = l.interruptions(t);
    let s = p.policy().stats();
    Ok((
        Row {
            trace: t.name.into(),
            variant: v.name.clone(),
            interruptions: lost,
            interruptions_per_100_vm_years: per_100_vm_years(lost, t),
            vs_reactive_pct: 0.0,
            failures: n,
            averted,
            mitigations: l.mitigations,
            wasted: l.wasted,
            wasted_pct: 100.0 * l.wasted as f64 / l.mitigations.max(1) as f64,
            max_fd_in_use: format!("{max_fd}/{}", v.policy.max_per_fault_domain),
            deferred: s.deferred_budget + s.deferred_rate + s.deferred_capacity,
            evacuations: s.evacuations,
            guards: format!("{}/{}", s.infrastructure_incidents, s.breaker_trips),
        },
        decisions,
    ))
}

fn baseline_rows(t: &Trace) -> (Row, Row) {
    // reactive: nobody acts
    let mut l = Ledger::default();
    let mut smart = Ledger::default();
    let mut flagged: HashSet<String> = HashSet::new();
    (t.records)(&mut |rec: &HostRecord| {
        l.last_vms.insert(rec.host_id.clone(), rec.vms.len() as u32);
        if !flagged.contains(&rec.host_id) {
            smart
                .last_vms
                .insert(rec.host_id.clone(), rec.vms.len() as u32);
            let bad = rec.smart_5_raw > 0
                || rec.smart_187_raw > 0
                || rec.smart_188_raw > 0
                || rec.smart_197_raw > 0
                || rec.smart_198_raw > 0;
            if bad {
                flagged.insert(rec.host_id.clone());
                smart.mitigations += 1;
                match t.failing.get(&rec.host_id) {
                    Some(f) if rec.ts_ms < f.fail_ms => {
                        smart.saved.insert(rec.host_id.clone());
                    }
                    Some(_) => {}
                    None => smart.wasted += 1,
                }
            }
        }
    });
    let row = |name: &str, l: &Ledger| {
        let (lost, n, averted) = l.interruptions(t);
        Row {
            trace: t.name.into(),
            variant: name.into(),
            interruptions: lost,
            interruptions_per_100_vm_years: per_100_vm_years(lost, t),
            vs_reactive_pct: 0.0,
            failures: n,
            averted,
            mitigations: l.mitigations,
            wasted: l.wasted,
            wasted_pct: 100.0 * l.wasted as f64 / l.mitigations.max(1) as f64,
            max_fd_in_use: "-".into(),
            deferred: 0,
            evacuations: l.mitigations,
            guards: "-".into(),
        }
    };
    (
        row("reactive healing only", &l),
        row("static SMART rule (5/187/188/197/198 > 0)", &smart),
    )
}

fn sim_trace(sim: SimConfig) -> Result<Trace, BacktestError> {
    let params = sim.clone().check()?;
    let fleet = Fleet::new(params.clone());
    let end_ms = params.start_ms + (params.days * DAY_MS as f64) as i64;
    let failing = fleet
        .truth()
        .iter()
        .map(|t| {
            (
                t.host_id.clone(),
                Failure {
                    fail_ms: t.fail_ms,
                    mode: t.mode,
                },
            )
        })
        .collect();
    let vms = fleet.vm_count() as u64;
    let days = params.days;
    Ok(Trace {
        name: "sim",
        records: Box::new(move |f: &mut dyn FnMut(&HostRecord)| {
            let mut fleet = Fleet::new(params.clone());
            let mut buf = Vec::new();
            while !fleet.done() {
                fleet.step(&mut buf);
                for r in &buf {
                    f(r);
                }
            }
        }),
        failing,
        end_ms,
        days,
        vms,
        pipeline: PipelineConfig::default(),
    })
}

/// Drive-days of a Backblaze sample: (serial, day, failure, SMART 5, 9, 187, 188, 194,
/// 197, 198), sorted by day then serial.
type DriveDay = (String, i32, bool, [i64; 7]);

const SMART_COLS: [&str; 7] = [
    "smart_5_raw",
    "smart_9_raw",
    "smart_187_raw",
    "smart_188_raw",
    "smart_194_raw",
    "smart_197_raw",
    "smart_198_raw",
];

fn read_backblaze(path: &Path) -> Result<Vec<DriveDay>, BacktestError> {
    let file = File::open(path).map_err(|e| io_err("opening", path, e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| io_err("reading", path, e))?
        .with_batch_size(65_536)
        .build()
        .map_err(|e| io_err("reading", path, e))?;
    let mut rows = Vec::new();
    for batch in reader {
        let b = batch.map_err(|e| io_err("reading", path, e))?;
        let col = |name: &str, to: &DataType| -> Result<ArrayRef, BacktestError> {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| io_err("reading", path, format!("no column {name}")))?;
            arrow_cast::cast(c, to).map_err(|e| io_err("reading", path, format!("{name}: {e}")))
        };
        let serial = col("serial_number", &DataType::Utf8)?;
        let serial = serial.as_string::<i32>();
        let date = col("date", &DataType::Date32)?;
        let date = date.as_primitive::<Date32Type>();
        let failure = col("failure", &DataType::Int64)?;
        let failure = failure.as_primitive::<Int64Type>();
        let smart: Vec<ArrayRef> = SMART_COLS
            .iter()
            .map(|c| col(c, &DataType::Int64))
            .collect::<Result<_, _>>()?;
        for i in 0..b.num_rows() {
            let mut v = [-1i64; 7];
            for (k, a) in smart.iter().enumerate() {
                let a = a.as_primitive::<Int64Type>();
                if a.is_valid(i) {
                    v[k] = a.value(i);
                }
            }
            rows.push((
                serial.value(i).to_owned(),
                date.value(i),
                failure.is_valid(i) && failure.value(i) == 1,
                v,
            ));
        }
    }
    rows.sort_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)));
    Ok(rows)
}

fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in s.as_bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Writes a small sample of a Backblaze drive-day file: every drive that failed and
/// `healthy` drives that did not (chosen by a hash of the serial), only the columns
/// the backtest reads.
pub fn make_backblaze_sample(src: &Path, dst: &Path, healthy: usize) -> Result<u64, BacktestError> {
    let rows = read_backblaze(src)?;
    let failed: HashSet<&str> = rows.iter().filter(|r| r.2).map(|r| r.0.as_str()).collect();
    let mut others: Vec<&str> = rows
        .iter()
        .map(|r| r.0.as_str())
        .filter(|s| !failed.contains(s))
        .collect::<HashSet<_>>()
        .into_iter()
        .collect();
    others.sort_by_key(|s| (fnv(s), *s));
    let keep: HashSet<&str> = failed
        .iter()
        .copied()
        .chain(others.into_iter().take(healthy))
        .collect();
    let kept: Vec<&DriveDay> = rows
        .iter()
        .filter(|r| keep.contains(r.0.as_str()))
        .collect();
    let mut fields = vec![
        Field::new("serial_number", DataType::Utf8, false),
        Field::new("date", DataType::Date32, false),
        Field::new("failure", DataType::Int64, false),
    ];
    fields.extend(
        SMART_COLS
            .iter()
            .map(|c| Field::new(*c, DataType::Int64, true)),
    );
    let schema = Arc::new(Schema::new(fields));
    let mut cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            kept.iter().map(|r| r.0.as_str()),
        )),
        Arc::new(arrow_array::Date32Array::from_iter_values(
            kept.iter().map(|r| r.1),
        )),
        Arc::new(Int64Array::from_iter_values(
            kept.iter().map(|r| i64::from(r.2)),
        )),
    ];
    for k in 0..SMART_COLS.len() {
        cols.push(Arc::new(Int64Array::from_iter(
            kept.iter().map(|r| (r.3[k] >= 0).then_some(r.3[k])),
        )));
    }
    let batch =
        RecordBatch::try_new(schema.clone(), cols).map_err(|e| io_err("writing", dst, e))?;
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io_err("creating", dir, e))?;
    }
    let f = File::create(dst).map_err(|e| io_err("creating", dst, e))?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w =
        ArrowWriter::try_new(f, schema, Some(props)).map_err(|e| io_err("writing", dst, e))?;
    w.write(&batch).map_err(|e| io_err("writing", dst, e))?;
    w.close().map_err(|e| io_err("writing", dst, e))?;
    Ok(kept.len() as u64)
}

fn backblaze_trace(path: &Path) -> Result<Trace, BacktestError> {
    let rows = Arc::new(read_backblaze(path)?);
    let mut failing = HashMap::new();
    let mut serials: Vec<&str> = Vec::new();
    let mut first_day = i32::MAX;
    let mut last_day = i32::MIN;
    let mut seen = HashSet::new();
    for r in rows.iter() {
        first_day = first_day.min(r.1);
        last_day = last_day.max(r.1);
        if seen.insert(r.0.as_str()) {
            serials.push(r.0.as_str());
        }
        if r.2 {
            failing.insert(
                format!("bb-{}", r.0),
                Failure {
                    // the failure is reported on that day's record: acting on it is too late
                    fail_ms: i64::from(r.1) * DAY_MS,
                    mode: FailureMode::Disk,
                },
            );
        }
    }
    let vms_of = |s: &str| 2 + (fnv(s) % 7) as u32;
    let vms: u64 = serials.iter().map(|s| u64::from(vms_of(s))).sum();
    let days = f64::from(last_day - first_day + 1);
    let end_ms = (i64::from(last_day) + 1) * DAY_MS;
    // daily records: features over 30 days, the breaker's clock in days
    let mut cfg = PipelineConfig {
        features: FeatureConfig {
            window: 30,
            warmup: 5,
            ..FeatureConfig::default()
        },
        baseline: BaselineConfig::default(),
        policy: PolicyConfig::default(),
    };
    cfg.features.hours_cap = cfg.features.hours_cap.max(48.0);
    Ok(Trace {
        name: "backblaze",
        records: Box::new(move |f: &mut dyn FnMut(&HostRecord)| {
            let mut index: HashMap<&str, usize> = HashMap::new();
            let mut last: HashMap<&str, [u64; 7]> = HashMap::new();
            for r in rows.iter() {
                let n = index.len();
                let i = *index.entry(r.0.as_str()).or_insert(n);
                let prev = last.entry(r.0.as_str()).or_insert([0; 7]);
                let mut v = *prev;
                for (slot, &raw) in v.iter_mut().zip(&r.3) {
                    if raw >= 0 {
                        *slot = raw as u64;
                    }
                }
                // cumulative counters never go backwards (a null or a reset keeps the last)
                for k in [0, 1, 2, 3, 6] {
                    v[k] = v[k].max(prev[k]);
                }
                *prev = v;
                let nvm = vms_of(&r.0);
                let rack = i / 20;
                let rec = HostRecord {
                    v: WIRE_VERSION,
                    host_id: format!("bb-{}", r.0),
                    ts_ms: i64::from(r.1) * DAY_MS,
                    region: "backblaze".into(),
                    cluster: format!("bb{}", i / 1000),
                    rack: format!("r{rack:04}"),
                    fault_domain: (rack % 5) as u32,
                    update_domain: (i % 5) as u32,
                    cpu_util: 0.4,
                    mem_util: 0.5,
                    disk_read_iops: 500.0,
                    disk_write_iops: 250.0,
                    disk_latency_ms: 4.0,
                    smart_5_raw: v[0],
                    smart_9_raw: v[1],
                    smart_187_raw: v[2],
                    smart_188_raw: v[3],
                    smart_194_raw: v[4],
                    smart_197_raw: v[5],
                    smart_198_raw: v[6],
                    ecc_corrected: 0,
                    ecc_uncorrected: 0,
                    heartbeat_age_s: 5.0,
                    kernel_events: 0,
                    service_crashes: 0,
                    vms: (0..nvm)
                        .map(|k| VmInfo {
                            id: format!("bb-{}-vm{k}", r.0),
                            mem_mib: 4096,
                        })
                        .collect(),
                };
                f(&rec);
            }
        }),
        failing,
        end_ms,
        days,
        vms,
        pipeline: cfg,
    })
}

/// Policy settings that suit a trace's record interval.
fn base_policy(trace: &str) -> PolicyConfig {
    match trace {
        // one record a day: staleness and breaker checks in days, escalation in days
        "backblaze" => PolicyConfig {
            stale_after_ms: 3 * DAY_MS,
            breaker_check_ms: DAY_MS,
            cooldown_ms: DAY_MS,
            heal_check_ms: DAY_MS,
            action_timeout_ms: DAY_MS,
            // Backblaze's pods: 60 drives; allow a few concurrent drains per domain
            max_per_fault_domain: 3,
            max_per_update_domain: 3,
            max_per_availability_set: 10,
            evacuations_per_hour: 2.0,
            evacuation_burst: 20,
            ..PolicyConfig::default()
        },
        _ => PolicyConfig::default(),
    }
}

/// What the backtest measured.
#[derive(Debug, Clone, Serialize)]
pub struct BacktestReport {
    /// Every row.
    pub rows: Vec<Row>,
    /// Shadow-mode scoring of the default policy on each trace.
    pub shadow: Vec<ShadowScore>,
    /// Where the outputs are.
    pub out_dir: String,
}

/// A shadow policy's decisions scored against what really happened.
#[derive(Debug, Clone, Serialize)]
pub struct ShadowScore {
    /// Trace.
    pub trace: String,
    /// Shadow decisions logged.
    pub decisions: u64,
    /// Hosts they named.
    pub hosts: u64,
    /// Of those, hosts that did fail later (true positives).
    pub hosts_failing: u64,
    /// Failures in the trace that a shadow decision preceded.
    pub failures_foreseen: u64,
    /// Failures in the trace.
    pub failures: u64,
    /// Median lead time of the foreseen failures, hours.
    pub median_lead_h: Option<f64>,
}

/// Scores shadow decisions against the truth: which named hosts failed, which failures
/// were foreseen and how early.
fn score_shadow(t: &Trace, decisions: &[Decision]) -> ShadowScore {
    let mut first: BTreeMap<&str, i64> = BTreeMap::new();
    for d in decisions {
        let e = first.entry(d.host_id.as_str()).or_insert(d.ts_ms);
        *e = (*e).min(d.ts_ms);
    }
    let hosts_failing = first.keys().filter(|h| t.failing.contains_key(**h)).count() as u64;
    let mut leads = Vec::new();
    let mut failures = 0;
    for (h, f) in &t.failing {
        if f.fail_ms >= t.end_ms {
            continue;
        }
        failures += 1;
        match first.get(h.as_str()) {
            Some(&d) if d < f.fail_ms => leads.push((f.fail_ms - d) as f64 / 3_600_000.0),
            _ => {}
        }
    }
    leads.sort_by(f64::total_cmp);
    ShadowScore {
        trace: t.name.into(),
        decisions: decisions.len() as u64,
        hosts: first.len() as u64,
        hosts_failing,
        failures_foreseen: leads.len() as u64,
        failures,
        median_lead_h: (!leads.is_empty()).then(|| leads[leads.len() / 2]),
    }
}

/// Runs the backtest, writes `backtest.md`, `backtest.json`, `tradeoff.png` and the
/// default policy's decisions per trace (`<trace>/decisions.ndjson`: a run directory
/// for `waterbear explain <id> --run <out>/<trace>`).
pub fn run_backtest(opts: &BacktestOptions) -> Result<BacktestReport, BacktestError> {
    let out = &opts.out_dir;
    std::fs::create_dir_all(out).map_err(|e| io_err("creating", out, e))?;
    let mut traces = Vec::new();
    if let Some(sim) = &opts.sim {
        traces.push(sim_trace(sim.clone())?);
    }
    if let Some(bb) = &opts.backblaze {
        traces.push(backblaze_trace(bb)?);
    }
    let mut rows = Vec::new();
    let mut shadow = Vec::new();
    for t in &traces {
        let (reactive, smart) = baseline_rows(t);
        let base = reactive.interruptions_per_100_vm_years;
        let mut trace_rows = vec![reactive, smart];
        let base_policy = base_policy(t.name);
        for v in default_variants(&base_policy) {
            let (row, _) = replay_policy(t, &v, out)?;
            trace_rows.push(row);
        }
        // the default policy once more, for its decision records
        let (mut row, decisions) = replay_policy(
            t,
            &Variant {
                name: "policy (default settings)".into(),
                policy: base_policy.clone(),
            },
            out,
        )?;
        row.variant = "policy (default settings)".into();
        trace_rows.push(row);
        let run_dir = out.join(t.name);
        std::fs::create_dir_all(&run_dir).map_err(|e| io_err("creating", &run_dir, e))?;
        let path = run_dir.join("decisions.ndjson");
        let mut text = String::new();
        for d in &decisions {
            text.push_str(&serde_json::to_string(d).expect("decisions serialise"));
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| io_err("writing", &path, e))?;
        // shadow mode: the default policy deciding without acting, scored afterwards
        let (_, shadow_decisions) = replay_policy_shadow(t, &base_policy)?;
        shadow.push(score_shadow(t, &shadow_decisions));
        for r in &mut trace_rows {
            r.vs_reactive_pct = if base > 0.0 {
                100.0 * (r.interruptions_per_100_vm_years - base) / base
            } else {
                0.0
            };
        }
        rows.extend(trace_rows);
    }
    let report = BacktestReport {
        rows,
        shadow,
        out_dir: out.display().to_string(),
    };
    let md = report.to_markdown();
    std::fs::write(out.join("backtest.md"), &md).map_err(|e| io_err("writing", out, e))?;
    std::fs::write(
        out.join("backtest.json"),
        serde_json::to_string_pretty(&report).expect("report serialises"),
    )
    .map_err(|e| io_err("writing", out, e))?;
    if opts.plot {
        crate::plot::tradeoff(&out.join("tradeoff.png"), &report.rows)
            .map_err(|e| io_err("plotting", &out.join("tradeoff.png"), e))?;
    }
    Ok(report)
}

fn replay_policy_shadow(
    t: &Trace,
    base: &PolicyConfig,
) -> Result<((), Vec<Decision>), BacktestError> {
    let mut cfg = t.pipeline.clone();
    cfg.policy = PolicyConfig {
        shadow: true,
        ..base.clone()
    };
    let mut p = Pipeline::from_config(cfg)?;
    let mut decisions = Vec::new();
    (t.records)(&mut |rec: &HostRecord| {
        if let Some(d) = p.process_valid(rec).decision {
            debug_assert!(d.shadow);
            decisions.push(d);
        }
    });
    Ok(((), decisions))
}

impl BacktestReport {
    /// The table, as Markdown.
    pub fn to_markdown(&self) -> String {
        let mut o = String::new();
        let mut last = String::new();
        for r in &self.rows {
            if r.trace != last {
                last = r.trace.clone();
                let _ = writeln!(o, "\n### trace `{}`\n", r.trace);
                let _ = writeln!(
                    o,
                    "| variant | VM interruptions | per 100 VM-years | vs reactive | failures averted | mitigations | wasted | max FD in use | deferred | evacuations | infra incidents / breaker trips |"
                );
                let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            }
            let _ = writeln!(
                o,
                "| {} | {} | {:.1} | {:+.0}% | {}/{} | {} | {} ({:.1}%) | {} | {} | {} | {} |",
                r.variant,
                r.interruptions,
                r.interruptions_per_100_vm_years,
                r.vs_reactive_pct,
                r.averted,
                r.failures,
                r.mitigations,
                r.wasted,
                r.wasted_pct,
                r.max_fd_in_use,
                r.deferred,
                r.evacuations,
                r.guards
            );
        }
        if !self.shadow.is_empty() {
            let _ = writeln!(
                o,
                "\n### shadow mode (default policy, decisions logged, never acted on)\n"
            );
            let _ = writeln!(
                o,
                "| trace | decisions | hosts named | of which failed | failures foreseen | median lead (h) |"
            );
            let _ = writeln!(o, "|---|---:|---:|---:|---:|---:|");
            for s in &self.shadow {
                let _ = writeln!(
                    o,
                    "| {} | {} | {} | {} | {}/{} | {} |",
                    s.trace,
                    s.decisions,
                    s.hosts,
                    s.hosts_failing,
                    s.failures_foreseen,
                    s.failures,
                    s.median_lead_h.map_or("-".into(), |h| format!("{h:.1}"))
                );
            }
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_backtest_beats_reactive_and_its_decisions_explain() {
        let dir = tempfile::tempdir().unwrap();
        let bb = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../data/backblaze-policy-sample.parquet");
        let report = run_backtest(&BacktestOptions {
            out_dir: dir.path().to_path_buf(),
            sim: Some(SimConfig {
                hosts: 150,
                days: 6.0,
                seed: 3,
                failure_fraction: 0.15,
                ..SimConfig::default()
            }),
            backblaze: bb.exists().then_some(bb),
            plot: true,
        })
        .unwrap();
        let row = |trace: &str, v: &str| {
            report
                .rows
                .iter()
                .find(|r| r.trace == trace && r.variant.starts_with(v))
                .unwrap()
                .clone()
        };
        let reactive = row("sim", "reactive");
        let policy = row("sim", "policy (default");
        assert!(reactive.interruptions > 0);
        assert!(
            policy.interruptions * 2 <= reactive.interruptions,
            "{policy:?} vs {reactive:?}"
        );
        assert!(policy.wasted_pct < 10.0, "{policy:?}");
        assert!(dir.path().join("tradeoff.png").metadata().unwrap().len() > 10_000);
        assert!(report.to_markdown().contains("static SMART rule"));
        // every decision of the run explains
        let run = dir.path().join("sim");
        let text = std::fs::read_to_string(run.join("decisions.ndjson")).unwrap();
        let d: Decision = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        let e = crate::explain(&run, &d.id).unwrap();
        assert!(
            e.contains("telemetry window") && e.contains("alternatives considered"),
            "{e}"
        );
        assert!(e.contains(&d.model));
    }
}
