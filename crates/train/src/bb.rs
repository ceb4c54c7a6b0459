//! Backblaze SMART data: loading, the polars feature pipeline, labels, the reference
//! rules and the protocol's evaluation (`../shared/specs/backblaze-protocol.md`).

// Rows index several parallel columns (drive, date, failure, counters, alarms).
#![allow(clippy::needless_range_loop)]

use std::path::Path;

use polars::prelude::*;
use waterbear_features::{Feature, FeatureParams, SMART_FEATURES};

use crate::TrainError;
use crate::dates::Day;

/// Columns of a Backblaze-format parquet this crate reads.
pub const BB_COLUMNS: [&str; 10] = [
    "serial_number",
    "date",
    "failure",
    "smart_5_raw",
    "smart_9_raw",
    "smart_187_raw",
    "smart_188_raw",
    "smart_194_raw",
    "smart_197_raw",
    "smart_198_raw",
];

/// The critical counters of Backblaze's rule, in the order of [`SMART_FEATURES`].
pub const CRIT: [&str; 5] = [
    "smart_5_raw",
    "smart_187_raw",
    "smart_188_raw",
    "smart_197_raw",
    "smart_198_raw",
];

/// The SMART columns the features read (crit, power-on hours, temperature).
const SMART_USED: [&str; 7] = [
    "smart_5_raw",
    "smart_187_raw",
    "smart_188_raw",
    "smart_197_raw",
    "smart_198_raw",
    "smart_9_raw",
    "smart_194_raw",
];

const SERIAL: &str = "serial_number";

/// A Backblaze file, sorted by drive then day, as plain columns.
#[derive(Debug, Clone)]
pub struct BbData {
    /// Serial numbers of the drives, sorted; `drive[i]` indexes it.
    pub serials: Vec<String>,
    /// Drive of each row.
    pub drive: Vec<u32>,
    /// Day of each row (days since the epoch).
    pub date: Vec<Day>,
    /// `failure == 1` of each row.
    pub failure: Vec<bool>,
    /// The five critical counters as read (nulls kept), for the reference rules.
    pub crit: [Vec<Option<i64>>; 5],
    /// The sorted frame (the columns above and the rest), for the feature pipeline.
    pub frame: DataFrame,
}

impl BbData {
    /// Rows.
    pub fn len(&self) -> usize {
        self.date.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.date.is_empty()
    }

    /// First and last day.
    pub fn span(&self) -> (Day, Day) {
        let lo = self.date.iter().copied().min().unwrap_or(0);
        let hi = self.date.iter().copied().max().unwrap_or(0);
        (lo, hi)
    }
}

/// A lazy scan of a Backblaze-format parquet: the columns this crate needs, sorted by
/// drive and day, with a `row` index into that order.
pub fn scan_backblaze(path: &Path) -> Result<LazyFrame, TrainError> {
    let p = path.to_string_lossy().to_string();
    if !path.exists() {
        return Err(TrainError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let lf = LazyFrame::scan_parquet(PlRefPath::new(p.as_str()), ScanArgsParquet::default())
        .map_err(TrainError::polars(format!("scanning {p}")))?;
    let mut sel: Vec<Expr> = vec![
        col(SERIAL),
        col("date"),
        col("failure").cast(DataType::Int8),
    ];
    sel.extend(
        BB_COLUMNS[3..]
            .iter()
            .map(|c| col(*c).cast(DataType::Int64)),
    );
    Ok(lf
        .select(sel)
        .sort([SERIAL, "date"], SortMultipleOptions::default())
        .with_row_index("row", None))
}

/// Loads a Backblaze-format parquet (see [`scan_backblaze`]).
pub fn load_backblaze(path: &Path) -> Result<BbData, TrainError> {
    let frame = scan_backblaze(path)?
        .collect()
        .map_err(TrainError::polars(format!("reading {}", path.display())))?;
    from_frame(frame)
}

fn pe(ctx: &'static str) -> impl FnOnce(PolarsError) -> TrainError {
    TrainError::polars(ctx)
}

/// Builds [`BbData`] from a frame sorted by drive and day with the [`BB_COLUMNS`].
pub fn from_frame(frame: DataFrame) -> Result<BbData, TrainError> {
    let n = frame.height();
    let ser = frame.column(SERIAL).map_err(pe("serial_number"))?;
    let ser = ser.str().map_err(pe("serial_number"))?;
    let mut serials: Vec<String> = Vec::new();
    let mut drive = Vec::with_capacity(n);
    for s in ser.iter() {
        let s = s.ok_or_else(|| TrainError::Data("null serial_number".into()))?;
        if serials.last().map(String::as_str) != Some(s) {
            serials.push(s.to_string());
        }
        drive.push((serials.len() - 1) as u32);
    }
    let date_col = frame.column("date").map_err(pe("date"))?;
    let date: Vec<Day> = date_col
        .cast(&DataType::Int32)
        .map_err(pe("date"))?
        .i32()
        .map_err(pe("date"))?
        .iter()
        .map(|d| d.ok_or_else(|| TrainError::Data("null date".into())))
        .collect::<Result<_, _>>()?;
    let failure: Vec<bool> = frame
        .column("failure")
        .map_err(pe("failure"))?
        .i8()
        .map_err(pe("failure"))?
        .iter()
        .map(|f| f == Some(1))
        .collect();
    let mut crit: [Vec<Option<i64>>; 5] = Default::default();
    for (k, c) in CRIT.iter().enumerate() {
        crit[k] = frame
            .column(c)
            .map_err(pe("smart column"))?
            .i64()
            .map_err(pe("smart column"))?
            .iter()
            .collect();
    }
    Ok(BbData {
        serials,
        drive,
        date,
        failure,
        crit,
        frame,
    })
}

fn feat(f: Feature) -> &'static str {
    f.name()
}

/// Column the per-drive windows partition by: a dense integer drive id (grouping by it
/// is several times faster than by the serial string).
pub const DRIVE_KEY: &str = "drive";

fn over(e: Expr) -> Result<Expr, TrainError> {
    e.over([col(DRIVE_KEY)]).map_err(pe("window expression"))
}

// The frame is sorted by drive, so "within the drive" can be computed with global,
// vectorised expressions and a boundary mask instead of per-drive windows (`over`).

/// True on the first row of each drive.
fn drive_starts() -> Expr {
    col(DRIVE_KEY)
        .neq(col(DRIVE_KEY).shift(lit(1)))
        .fill_null(lit(true))
}

fn ffill_null(e: Expr) -> Expr {
    e.fill_null_with_strategy(FillNullStrategy::Forward(None))
}

/// `e - e.shift(1)` within the drive, 0 on its first row.
fn in_drive_diff(e: Expr) -> Expr {
    when(drive_starts())
        .then(lit(0.0))
        .otherwise(e.clone() - e.shift(lit(1)))
}

/// Forward fill within the drive: a value never crosses into the next drive.
fn ffill_in_drive(e: Expr) -> Expr {
    let source = ffill_null(
        when(e.clone().is_not_null())
            .then(col(DRIVE_KEY))
            .otherwise(lit(NULL).cast(DataType::UInt32)),
    );
    when(source.eq(col(DRIVE_KEY)))
        .then(ffill_null(e))
        .otherwise(lit(NULL))
}

/// Per critical SMART attribute ([`CRIT`] order): its (level, delta, rise in the
/// window, hours since the last rise) features, as [`SMART_FEATURES`] lists them.
fn smart_groups() -> Vec<(Feature, Feature, Feature, Feature)> {
    SMART_FEATURES[..4 * CRIT.len()]
        .chunks_exact(4)
        .map(|g| (g[0], g[1], g[2], g[3]))
        .collect()
}

/// The polars pipeline computing [`SMART_FEATURES`] per drive, with the definitions of
/// `waterbear_features` (`ts_ms = day * 86_400_000`).
///
/// Input: a frame sorted by `serial_number`, `date` (as [`scan_backblaze`] makes) with a
/// [`DRIVE_KEY`] column numbering the drives ([`build_features`] adds it).
/// Missing SMART values (nulls) are forward-filled within the drive (the last reading
/// stands, as the online job keeps its state when a field is absent); rows of a drive
/// before its first complete reading have no features and are dropped here (their
/// alarm is false and score 0 downstream). Output: `row` and the feature columns.
pub fn feature_pipeline(lf: LazyFrame, p: &FeatureParams) -> Result<LazyFrame, TrainError> {
    let cap = p.hours_cap;
    let mut ffill = Vec::new();
    for c in SMART_USED {
        ffill.push(ffill_in_drive(col(c)).alias(c));
    }
    let complete = SMART_USED
        .iter()
        .map(|c| col(*c).is_not_null())
        .reduce(|a, b| a.and(b))
        .expect("non-empty");
    let lf = lf.with_columns(ffill).filter(complete).with_column(
        (col("date").cast(DataType::Int64) * lit(24i64))
            .cast(DataType::Float64)
            .alias("_ts_h"),
    );

    let groups = smart_groups();
    let mut first = Vec::new();
    for (k, (level, delta, _, _)) in groups.iter().enumerate() {
        let c = col(CRIT[k]).cast(DataType::Float64);
        first.push(c.clone().alias(feat(*level)));
        first.push(in_drive_diff(c).alias(feat(*delta)));
    }
    let ts = col("_ts_h");
    first.push(in_drive_diff(ts.clone()).alias(feat(Feature::DtHours)));
    first.push(
        col("smart_9_raw")
            .cast(DataType::Float64)
            .alias(feat(Feature::PowerOnHours)),
    );
    first.push(
        over(
            col("smart_194_raw")
                .cast(DataType::Float64)
                .ewm_mean(EWMOptions {
                    alpha: p.fast_alpha,
                    adjust: false,
                    bias: false,
                    min_periods: 1,
                    ignore_nulls: false,
                }),
        )?
        .alias(feat(Feature::TempEwma)),
    );
    // rows of the drive so far: global row count minus the count at the drive's start
    let k = ts.clone().cum_count(false).cast(DataType::Int64);
    let k0 = ffill_null(
        when(drive_starts())
            .then(k.clone())
            .otherwise(lit(NULL).cast(DataType::Int64)),
    );
    first.push(
        (k - k0 + lit(1i64))
            .cast(DataType::Float64)
            .alias(feat(Feature::RecordsSeen)),
    );
    let lf = lf.with_columns(first);

    let mut second = Vec::new();
    for (_, delta, rise, since) in groups.iter() {
        let d = col(feat(*delta));
        let pos = when(d.clone().gt(lit(0.0)))
            .then(d.clone())
            .otherwise(lit(0.0));
        // Sum of the last `window` rows of the drive, from a global running sum:
        // S[i] - max(S[i - window], S[before the drive's first row]). The deltas are
        // counts (integer-valued f64), so the differences are exact; S never
        // decreases, so the max picks the drive's start when the window reaches past it.
        let run = pos.clone().cum_sum(false);
        let before = ffill_null(
            when(drive_starts())
                .then(run.clone() - pos)
                .otherwise(lit(NULL).cast(DataType::Float64)),
        );
        let lagged = run.clone().shift(lit(p.window as i64)).fill_null(lit(0.0));
        let base = when(lagged.clone().gt(before.clone()))
            .then(lagged)
            .otherwise(before);
        second.push((run - base).alias(feat(*rise)));
        let last = ffill_in_drive(
            when(d.gt(lit(0.0)))
                .then(ts.clone())
                .otherwise(lit(NULL).cast(DataType::Float64)),
        );
        let h = ts.clone() - last;
        second.push(
            when(h.clone().gt(lit(cap)))
                .then(lit(cap))
                .otherwise(h)
                .fill_null(lit(cap))
                .alias(feat(*since)),
        );
    }
    let levels: Vec<Expr> = groups.iter().map(|g| col(feat(g.0)).gt(lit(0.0))).collect();
    let deltas: Vec<Expr> = groups.iter().map(|g| col(feat(g.1)).gt(lit(0.0))).collect();
    second.push(
        any_horizontal(levels)
            .map_err(pe("crit any"))?
            .cast(DataType::Float64)
            .alias(feat(Feature::SmartCritAny)),
    );
    second.push(
        any_horizontal(deltas)
            .map_err(pe("crit rose"))?
            .cast(DataType::Float64)
            .alias(feat(Feature::SmartCritRose)),
    );
    let lf = lf.with_columns(second);
    let rises: Vec<Expr> = groups.iter().map(|g| col(feat(g.2))).collect();
    let lf = lf.with_column(
        rises
            .into_iter()
            .reduce(|a, b| a + b)
            .expect("five rises")
            .alias(feat(Feature::SmartCritRiseW)),
    );
    let mut out = vec![col("row")];
    out.extend(SMART_FEATURES.iter().map(|f| col(f.name())));
    Ok(lf.select(out))
}

/// The [`SMART_FEATURES`] of the rows that have them, column-major.
#[derive(Debug, Clone)]
pub struct FeatureTable {
    /// Row of [`BbData`] each feature row belongs to (increasing).
    pub rows: Vec<u32>,
    /// One column per feature of [`SMART_FEATURES`], in that order.
    pub cols: Vec<Vec<f64>>,
}

impl FeatureTable {
    /// The column of `f`.
    pub fn col(&self, f: Feature) -> Option<&[f64]> {
        SMART_FEATURES
            .iter()
            .position(|&g| g == f)
            .map(|i| self.cols[i].as_slice())
    }

    /// Feature rows.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Runs [`feature_pipeline`] over the loaded data.
pub fn build_features(data: &BbData, p: &FeatureParams) -> Result<FeatureTable, TrainError> {
    let mut frame = data.frame.clone();
    // The frame is sorted by drive, so the key is ascending: flagging it lets
    // polars form the window groups as contiguous slices instead of hashing.
    let mut key = Series::new(DRIVE_KEY.into(), data.drive.as_slice());
    debug_assert!(data.drive.windows(2).all(|w| w[0] <= w[1]));
    key.set_sorted_flag(polars::series::IsSorted::Ascending);
    frame
        .with_column(key.into_column())
        .map_err(pe("drive column"))?;
    let df = feature_pipeline(frame.lazy(), p)?
        .collect()
        .map_err(pe("building features"))?;
    let rows: Vec<u32> = df
        .column("row")
        .map_err(pe("row"))?
        .cast(&DataType::UInt32)
        .map_err(pe("row"))?
        .u32()
        .map_err(pe("row"))?
        .into_no_null_iter()
        .collect();
    let mut cols = Vec::with_capacity(SMART_FEATURES.len());
    for f in SMART_FEATURES {
        let c = df.column(f.name()).map_err(pe("feature column"))?;
        let c = c.f64().map_err(pe("feature column"))?;
        if c.null_count() > 0 {
            return Err(TrainError::Data(format!("feature {} has nulls", f.name())));
        }
        cols.push(c.into_no_null_iter().collect());
    }
    Ok(FeatureTable { rows, cols })
}

/// The two reference rules of the protocol, exactly as `bb_eval.py` computes them
/// (nulls count as 0 there, by the reference's definition): `(level, rose)` per row.
pub fn rule_alarms(data: &BbData) -> (Vec<bool>, Vec<bool>) {
    let n = data.len();
    let mut level = vec![false; n];
    let mut rose = vec![false; n];
    for i in 0..n {
        let same = i > 0 && data.drive[i - 1] == data.drive[i];
        for k in 0..5 {
            let c = data.crit[k][i].unwrap_or(0);
            let prev = if same {
                data.crit[k][i - 1].unwrap_or(0)
            } else {
                c
            };
            level[i] |= c > 0;
            rose[i] |= c - prev > 0;
        }
    }
    (level, rose)
}

/// Labels known at the end of day `end`: `Some(true)` when the drive fails 1..=`horizon`
/// days after the row, `Some(false)` when it is known not to, `None` when unknown at
/// `end` (no failure seen by `end` and fewer than `horizon` days left), after `end`, or
/// on/after the failure day. Only rows dated `<= end` are read: data after `end` cannot
/// change the result.
pub fn labels_known_at(data: &BbData, end: Day, horizon: u32) -> Vec<Option<bool>> {
    let h = horizon as i32;
    let mut fdate: Vec<Option<Day>> = vec![None; data.serials.len()];
    for i in 0..data.len() {
        if data.failure[i] && data.date[i] <= end {
            let d = &mut fdate[data.drive[i] as usize];
            *d = Some(d.map_or(data.date[i], |x: Day| x.min(data.date[i])));
        }
    }
    (0..data.len())
        .map(|i| {
            let d = data.date[i];
            if d > end {
                return None;
            }
            match fdate[data.drive[i] as usize] {
                Some(f) if d >= f => None,
                Some(f) => Some(f - d <= h),
                None if d + h <= end => Some(false),
                None => None,
            }
        })
        .collect()
}

/// The protocol's figures for one set of alarms over one period.
#[derive(Debug, Clone, PartialEq)]
pub struct BbMetrics {
    /// Drives failing in the period.
    pub failed: usize,
    /// Drives seen in the period that did not fail in it.
    pub healthy: usize,
    /// Failed drives with an alarm 1..=H days before failing.
    pub detected: usize,
    /// Healthy drives with at least one alarm in the period.
    pub false_alarmed: usize,
    /// `detected / failed`.
    pub fdr: f64,
    /// `false_alarmed / healthy`.
    pub far: f64,
    /// Median lead time of detected drives, days.
    pub median_lead: Option<f64>,
    /// Lead time of each detected drive, days.
    pub leads: Vec<i32>,
}

/// Evaluates per-row alarms over `[from, to]` exactly as `bb_eval.py` does (alarms
/// outside the period are ignored; FAR counts drives present in the period).
pub fn evaluate_alarms(
    data: &BbData,
    alarms: &[bool],
    from: Day,
    to: Day,
    horizon: u32,
) -> BbMetrics {
    let nd = data.serials.len();
    let h = horizon as i32;
    let mut fdate: Vec<Option<Day>> = vec![None; nd];
    let mut present = vec![false; nd];
    for i in 0..data.len() {
        let d = data.date[i];
        if d < from || d > to {
            continue;
        }
        let k = data.drive[i] as usize;
        present[k] = true;
        if data.failure[i] {
            fdate[k] = Some(fdate[k].map_or(d, |x: Day| x.min(d)));
        }
    }
    let mut first_hit: Vec<Option<Day>> = vec![None; nd];
    let mut false_alarm = vec![false; nd];
    for i in 0..data.len() {
        let d = data.date[i];
        if !alarms[i] || d < from || d > to {
            continue;
        }
        let k = data.drive[i] as usize;
        match fdate[k] {
            Some(f) => {
                if d < f && d >= f - h {
                    first_hit[k] = Some(first_hit[k].map_or(d, |x: Day| x.min(d)));
                }
            }
            None => false_alarm[k] = true,
        }
    }
    let failed = fdate.iter().filter(|f| f.is_some()).count();
    let healthy = (0..nd)
        .filter(|&k| present[k] && fdate[k].is_none())
        .count();
    let mut leads: Vec<i32> = (0..nd)
        .filter_map(|k| Some(fdate[k]? - first_hit[k]?))
        .collect();
    leads.sort_unstable();
    let false_alarmed = false_alarm.iter().filter(|&&b| b).count();
    BbMetrics {
        failed,
        healthy,
        detected: leads.len(),
        false_alarmed,
        fdr: leads.len() as f64 / failed.max(1) as f64,
        far: false_alarmed as f64 / healthy.max(1) as f64,
        median_lead: median(&leads),
        leads,
    }
}

fn median(sorted: &[i32]) -> Option<f64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    Some(if n % 2 == 1 {
        f64::from(sorted[n / 2])
    } else {
        (f64::from(sorted[n / 2 - 1]) + f64::from(sorted[n / 2])) / 2.0
    })
}

/// The smallest threshold whose drive-level false-alarm rate over `[from, to]` is at
/// most `target`: drives that fail in the period are left out, each other drive counts
/// once with its highest score; alarms are `score >= threshold`.
pub fn threshold_for_far(data: &BbData, scores: &[f64], from: Day, to: Day, target: f64) -> f64 {
    let nd = data.serials.len();
    let mut best = vec![f64::NEG_INFINITY; nd];
    let mut failed = vec![false; nd];
    for i in 0..data.len() {
        let d = data.date[i];
        if d < from || d > to {
            continue;
        }
        let k = data.drive[i] as usize;
        failed[k] |= data.failure[i];
        best[k] = best[k].max(scores[i]);
    }
    let mut maxes: Vec<f64> = (0..nd)
        .filter(|&k| !failed[k] && best[k].is_finite())
        .map(|k| best[k])
        .collect();
    maxes.sort_by(|a, b| b.total_cmp(a));
    let k = (target * maxes.len() as f64).floor() as usize;
    match maxes.get(k) {
        // strictly above the (k+1)-th highest: at most k drives alarm
        Some(&s) => next_up(s),
        None => 0.0,
    }
}

fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let b = x.to_bits();
    f64::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

/// Per-drive maxima over `[from, to]` for threshold sweeps: the highest score of each
/// healthy drive, and of each failed drive within its detection window
/// (`-inf` when it has no row there).
pub fn drive_maxima(
    data: &BbData,
    scores: &[f64],
    from: Day,
    to: Day,
    horizon: u32,
) -> (Vec<f64>, Vec<f64>) {
    let nd = data.serials.len();
    let mut fdate: Vec<Option<Day>> = vec![None; nd];
    let mut present = vec![false; nd];
    for i in 0..data.len() {
        let d = data.date[i];
        if d >= from && d <= to {
            let k = data.drive[i] as usize;
            present[k] = true;
            if data.failure[i] {
                fdate[k] = Some(fdate[k].map_or(d, |x: Day| x.min(d)));
            }
        }
    }
    let mut best = vec![f64::NEG_INFINITY; nd];
    for i in 0..data.len() {
        let d = data.date[i];
        if d < from || d > to {
            continue;
        }
        let k = data.drive[i] as usize;
        let counts = match fdate[k] {
            Some(f) => d < f && d >= f - horizon as i32,
            None => true,
        };
        if counts {
            best[k] = best[k].max(scores[i]);
        }
    }
    let healthy = (0..nd)
        .filter(|&k| present[k] && fdate[k].is_none())
        .map(|k| best[k])
        .collect();
    let failed = (0..nd)
        .filter(|&k| fdate[k].is_some())
        .map(|k| best[k])
        .collect();
    (healthy, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_groups_follow_the_crit_columns() {
        let g = smart_groups();
        assert_eq!(g.len(), CRIT.len());
        for (k, (level, delta, rise, since)) in g.iter().enumerate() {
            // CRIT[k] is "smart_<n>_raw"; its features are "smart_<n>", "smart_<n>_delta", ...
            let base = CRIT[k].trim_end_matches("_raw");
            assert_eq!(level.name(), base);
            assert_eq!(delta.name(), format!("{base}_delta"));
            assert_eq!(rise.name(), format!("{base}_rise_w"));
            assert_eq!(since.name(), format!("{base}_hours_since_rise"));
        }
    }
}
