//! The polars pipeline and the online `FeatureSet` agree on every SMART feature.
// Rows index several parallel columns.
#![allow(clippy::needless_range_loop)]

mod common;

use polars::prelude::*;
use waterbear_features::{FeatureConfig, FeatureParams, FeatureSet, SMART_FEATURES};
use waterbear_telemetry::HostRecord;
use waterbear_train::{BbData, MS_PER_DAY, build_features, load_backblaze};

/// Feeds the rows through `FeatureSet::update` (nulls forward-filled within the drive,
/// rows before a drive's first complete reading skipped, as the pipeline documents) and
/// compares with the polars table.
fn assert_agree(data: &BbData, params: &FeatureParams) -> usize {
    let table = build_features(data, params).unwrap();
    let smart = [
        "smart_5_raw",
        "smart_187_raw",
        "smart_188_raw",
        "smart_197_raw",
        "smart_198_raw",
        "smart_9_raw",
        "smart_194_raw",
    ];
    let cols: Vec<Vec<Option<i64>>> = smart
        .iter()
        .map(|c| {
            data.frame
                .column(c)
                .unwrap()
                .i64()
                .unwrap()
                .iter()
                .collect()
        })
        .collect();
    let mut set = FeatureSet::new(params.clone());
    let mut last: Vec<Option<i64>> = vec![None; 7];
    let mut j = 0usize;
    let mut checked = 0usize;
    for i in 0..data.len() {
        if i == 0 || data.drive[i] != data.drive[i - 1] {
            last = vec![None; 7];
        }
        for k in 0..7 {
            if let Some(v) = cols[k][i] {
                last[k] = Some(v);
            }
        }
        if last.iter().any(Option::is_none) {
            assert!(
                table.rows.get(j).is_none_or(|&r| r as usize != i),
                "row {i} has no complete reading yet but got features"
            );
            continue;
        }
        let v: Vec<u64> = last
            .iter()
            .map(|x| u64::try_from(x.unwrap()).unwrap())
            .collect();
        let mut rec = HostRecord::example(
            &data.serials[data.drive[i] as usize],
            i64::from(data.date[i]) * MS_PER_DAY,
        );
        rec.smart_5_raw = v[0];
        rec.smart_187_raw = v[1];
        rec.smart_188_raw = v[2];
        rec.smart_197_raw = v[3];
        rec.smart_198_raw = v[4];
        rec.smart_9_raw = v[5];
        rec.smart_194_raw = v[6];
        let (_, fv) = set.update(&rec);
        assert_eq!(
            table.rows[j] as usize, i,
            "feature row {j} belongs to row {i}"
        );
        for (k, f) in SMART_FEATURES.iter().enumerate() {
            let (got, want) = (table.cols[k][j], fv[*f]);
            assert!(
                (got - want).abs() <= 1e-9 * (1.0 + want.abs()),
                "{} on {} day {}: polars {got} vs online {want}",
                f.name(),
                data.serials[data.drive[i] as usize],
                data.date[i]
            );
        }
        j += 1;
        checked += 1;
    }
    assert_eq!(j, table.len());
    checked
}

#[test]
fn synthetic_rows_with_nulls_gaps_and_falls_agree() {
    // drive a: gaps, a null in the middle, counters rising and 197 falling;
    // drive b: starts with nulls (no features until its first complete reading).
    let serial = ["a", "a", "a", "a", "a", "a", "b", "b", "b", "b"];
    let date = [
        17532, 17533, 17536, 17537, 17540, 17541, 17532, 17533, 17534, 17535,
    ];
    let s5 = [
        Some(0i64),
        Some(0),
        Some(8),
        None,
        Some(8),
        Some(9),
        None,
        Some(1),
        Some(1),
        Some(3),
    ];
    let s197 = [
        Some(0i64),
        Some(16),
        Some(8),
        Some(8),
        Some(0),
        Some(24),
        None,
        None,
        Some(2),
        Some(2),
    ];
    let s194 = [
        Some(30i64),
        Some(31),
        None,
        Some(35),
        Some(36),
        Some(29),
        None,
        Some(40),
        Some(41),
        Some(44),
    ];
    let zero = [Some(0i64); 10];
    let poh = [
        Some(100i64),
        Some(124),
        Some(196),
        Some(220),
        Some(292),
        Some(316),
        Some(5),
        Some(29),
        Some(53),
        Some(77),
    ];
    let df = df!(
        "serial_number" => serial,
        "date" => date,
        "failure" => [0i8; 10],
        "smart_5_raw" => s5,
        "smart_9_raw" => poh,
        "smart_187_raw" => zero,
        "smart_188_raw" => [Some(0i64), Some(1), Some(1), Some(2), Some(2), Some(2), Some(0), Some(0), Some(0), Some(0)],
        "smart_194_raw" => s194,
        "smart_197_raw" => s197,
        "smart_198_raw" => zero,
    )
    .unwrap();
    let df = df
        .lazy()
        .with_column(col("date").cast(DataType::Date))
        .sort(["serial_number", "date"], Default::default())
        .with_row_index("row", None)
        .collect()
        .unwrap();
    let data = waterbear_train_from_frame(df);
    for window in [1, 2, 3, 14] {
        let p = FeatureConfig {
            window,
            hours_cap: 100.0,
            ..Default::default()
        }
        .check()
        .unwrap();
        assert_eq!(
            assert_agree(&data, &p),
            8,
            "drive b's first row has no reading"
        );
    }
}

fn waterbear_train_from_frame(df: DataFrame) -> BbData {
    // write and re-read through the public loader, as real files are read
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x.parquet");
    let mut df = df.drop("row").unwrap();
    ParquetWriter::new(std::fs::File::create(&p).unwrap())
        .finish(&mut df)
        .unwrap();
    load_backblaze(&p).unwrap()
}

#[test]
fn sample_file_agrees_on_every_smart_feature() {
    let data = load_backblaze(&common::sample_bb()).unwrap();
    let p = FeatureConfig {
        window: 14,
        ..Default::default()
    }
    .check()
    .unwrap();
    let n = assert_agree(&data, &p);
    assert!(n > 100_000, "{n} rows checked");
    // the sample holds the drives with null SMART rows: they were forward-filled
    assert!(data.crit[0].iter().any(Option::is_none));
}
