//! Per-row outputs in the layouts the reference scripts read.

use std::path::Path;

use polars::prelude::*;

use crate::TrainError;
use crate::bb::BbData;

fn write_parquet(path: &Path, df: &mut DataFrame) -> Result<(), TrainError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(TrainError::io(dir))?;
    }
    let f = std::fs::File::create(path).map_err(TrainError::io(path))?;
    ParquetWriter::new(f)
        .finish(df)
        .map_err(TrainError::polars(format!("writing {}", path.display())))?;
    Ok(())
}

/// Writes `serial_number, date, alarm, score` for every drive-day (`bb_eval.py`'s
/// ALARMS layout).
pub fn write_alarms(
    path: &Path,
    data: &BbData,
    alarms: &[bool],
    scores: &[f64],
) -> Result<(), TrainError> {
    let n = data.len();
    let serial = StringChunked::from_iter_values(
        "serial_number".into(),
        data.drive
            .iter()
            .map(|&d| data.serials[d as usize].as_str()),
    );
    let date = Int32Chunked::from_vec("date".into(), data.date.clone())
        .into_series()
        .cast(&DataType::Date)
        .map_err(TrainError::polars("date column"))?;
    let alarm = BooleanChunked::from_slice("alarm".into(), alarms);
    let score = Float64Chunked::from_slice("score".into(), scores);
    let mut df = DataFrame::new(
        n,
        vec![
            serial.into_series().into(),
            date.into(),
            alarm.into_series().into(),
            score.into_series().into(),
        ],
    )
    .map_err(TrainError::polars("alarms frame"))?;
    write_parquet(path, &mut df)
}

/// One scored test row of SMD.
#[derive(Debug, Clone, PartialEq)]
pub struct SmdRow {
    /// Machine.
    pub machine: String,
    /// Row index.
    pub t: i64,
    /// Ground truth.
    pub label: i32,
    /// Prediction.
    pub pred: i32,
    /// Score.
    pub score: f64,
}

/// Writes `machine, t, label, pred, score` (`smd_eval.py`'s layout).
pub fn write_predictions(path: &Path, rows: &[SmdRow]) -> Result<(), TrainError> {
    let machine =
        StringChunked::from_iter_values("machine".into(), rows.iter().map(|r| r.machine.as_str()));
    let t = Int64Chunked::from_vec("t".into(), rows.iter().map(|r| r.t).collect());
    let label = Int32Chunked::from_vec("label".into(), rows.iter().map(|r| r.label).collect());
    let pred = Int32Chunked::from_vec("pred".into(), rows.iter().map(|r| r.pred).collect());
    let score = Float64Chunked::from_vec("score".into(), rows.iter().map(|r| r.score).collect());
    let mut df = DataFrame::new(
        rows.len(),
        vec![
            machine.into_series().into(),
            t.into_series().into(),
            label.into_series().into(),
            pred.into_series().into(),
            score.into_series().into(),
        ],
    )
    .map_err(TrainError::polars("predictions frame"))?;
    write_parquet(path, &mut df)
}
