use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{
    Float64Builder, Int64Builder, ListBuilder, StringBuilder, StructBuilder, UInt32Builder,
    UInt64Builder,
};
use arrow_array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray, UInt32Array};
use arrow_schema::{DataType, Field, Schema};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use thiserror::Error;
use waterbear_telemetry::{HostRecord, arrow_schema};

use crate::fleet::FailureTruth;

/// Errors writing telemetry or ground truth.
#[derive(Debug, Error)]
pub enum IoError {
    /// Creating, writing or syncing the file failed.
    #[error("{step} {path}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Building or writing an Arrow batch failed.
    #[error("writing parquet {path}: {source}")]
    Parquet {
        /// The file.
        path: String,
        /// The cause.
        source: parquet::errors::ParquetError,
    },
    /// Building an Arrow batch failed.
    #[error("building an arrow batch for {path}: {source}")]
    Arrow {
        /// The file.
        path: String,
        /// The cause.
        source: arrow_schema::ArrowError,
    },
}

/// Writes [`HostRecord`]s to Parquet with the telemetry crate's Arrow schema, in row
/// groups of `batch` records, so memory stays bounded however long the run.
pub struct TelemetryWriter {
    path: String,
    writer: ArrowWriter<File>,
    pending: Vec<HostRecord>,
    batch: usize,
    rows: u64,
}

impl TelemetryWriter {
    /// Creates (truncates) `path`.
    pub fn create(path: &Path, batch: usize) -> Result<Self, IoError> {
        let p = path.display().to_string();
        let file = File::create(path).map_err(|source| IoError::Io {
            step: "creating",
            path: p.clone(),
            source,
        })?;
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build();
        let writer = ArrowWriter::try_new(file, Arc::new(arrow_schema()), Some(props)).map_err(
            |source| IoError::Parquet {
                path: p.clone(),
                source,
            },
        )?;
        Ok(Self {
            path: p,
            writer,
            pending: Vec::with_capacity(batch),
            batch: batch.max(1),
            rows: 0,
        })
    }

    /// Buffers records, writing a row group whenever `batch` are pending.
    pub fn write(&mut self, records: &[HostRecord]) -> Result<(), IoError> {
        for r in records {
            self.pending.push(r.clone());
            if self.pending.len() >= self.batch {
                self.flush_batch()?;
            }
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), IoError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let batch = to_batch(&self.pending).map_err(|source| IoError::Arrow {
            path: self.path.clone(),
            source,
        })?;
        self.writer
            .write(&batch)
            .map_err(|source| IoError::Parquet {
                path: self.path.clone(),
                source,
            })?;
        self.rows += self.pending.len() as u64;
        self.pending.clear();
        Ok(())
    }

    /// Writes what is pending, the footer, and syncs the file; returns rows written.
    pub fn finish(mut self) -> Result<u64, IoError> {
        self.flush_batch()?;
        let file = self
            .writer
            .into_inner()
            .map_err(|source| IoError::Parquet {
                path: self.path.clone(),
                source,
            })?;
        file.sync_all().map_err(|source| IoError::Io {
            step: "syncing",
            path: self.path.clone(),
            source,
        })?;
        Ok(self.rows)
    }
}

/// One Arrow batch of records, columns as [`arrow_schema`].
pub fn to_batch(records: &[HostRecord]) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let schema = Arc::new(arrow_schema());
    let n = records.len();
    let u32s = |f: &dyn Fn(&HostRecord) -> u32| -> ArrayRef {
        let mut b = UInt32Builder::with_capacity(n);
        records.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish())
    };
    let u64s = |f: &dyn Fn(&HostRecord) -> u64| -> ArrayRef {
        let mut b = UInt64Builder::with_capacity(n);
        records.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish())
    };
    let f64s = |f: &dyn Fn(&HostRecord) -> f64| -> ArrayRef {
        let mut b = Float64Builder::with_capacity(n);
        records.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish())
    };
    let strs = |f: &dyn Fn(&HostRecord) -> &str| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 8);
        records.iter().for_each(|r| b.append_value(f(r)));
        Arc::new(b.finish())
    };
    let mut ts = Int64Builder::with_capacity(n);
    records.iter().for_each(|r| ts.append_value(r.ts_ms));
    let vm_fields = match schema.field_with_name("vms")?.data_type() {
        DataType::List(item) => match item.data_type() {
            DataType::Struct(fields) => fields.clone(),
            other => {
                return Err(arrow_schema::ArrowError::SchemaError(format!(
                    "vms item is {other}"
                )));
            }
        },
        other => {
            return Err(arrow_schema::ArrowError::SchemaError(format!(
                "vms is {other}"
            )));
        }
    };
    let item = Field::new("item", DataType::Struct(vm_fields.clone()), false);
    let mut vms =
        ListBuilder::new(StructBuilder::from_fields(vm_fields, 0)).with_field(Arc::new(item));
    for r in records {
        let sb = vms.values();
        for vm in &r.vms {
            sb.field_builder::<StringBuilder>(0)
                .expect("id is utf8")
                .append_value(&vm.id);
            sb.field_builder::<UInt32Builder>(1)
                .expect("mem_mib is u32")
                .append_value(vm.mem_mib);
            sb.append(true);
        }
        vms.append(true);
    }
    let columns: Vec<ArrayRef> = vec![
        u32s(&|r| r.v),
        strs(&|r| &r.host_id),
        Arc::new(ts.finish()),
        strs(&|r| &r.region),
        strs(&|r| &r.cluster),
        strs(&|r| &r.rack),
        u32s(&|r| r.fault_domain),
        u32s(&|r| r.update_domain),
        f64s(&|r| r.cpu_util),
        f64s(&|r| r.mem_util),
        f64s(&|r| r.disk_read_iops),
        f64s(&|r| r.disk_write_iops),
        f64s(&|r| r.disk_latency_ms),
        u64s(&|r| r.smart_5_raw),
        u64s(&|r| r.smart_9_raw),
        u64s(&|r| r.smart_187_raw),
        u64s(&|r| r.smart_188_raw),
        u64s(&|r| r.smart_194_raw),
        u64s(&|r| r.smart_197_raw),
        u64s(&|r| r.smart_198_raw),
        u64s(&|r| r.ecc_corrected),
        u64s(&|r| r.ecc_uncorrected),
        f64s(&|r| r.heartbeat_age_s),
        u32s(&|r| r.kernel_events),
        u32s(&|r| r.service_crashes),
        Arc::new(vms.finish()),
    ];
    RecordBatch::try_new(schema, columns)
}

/// Writes the ground truth as NDJSON (one failure per line) and syncs the file.
pub fn write_truth_ndjson(path: &Path, truth: &[FailureTruth]) -> Result<(), IoError> {
    let p = path.display().to_string();
    let io = |step| {
        let p = p.clone();
        move |source| IoError::Io {
            step,
            path: p,
            source,
        }
    };
    let file = File::create(path).map_err(io("creating"))?;
    let mut w = BufWriter::new(file);
    for t in truth {
        serde_json::to_writer(&mut w, t).map_err(|e| IoError::Io {
            step: "writing",
            path: p.clone(),
            source: e.into(),
        })?;
        w.write_all(b"\n").map_err(io("writing"))?;
    }
    let file = w.into_inner().map_err(|e| IoError::Io {
        step: "flushing",
        path: p.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("syncing"))
}

/// Writes the ground truth as Parquet and syncs the file.
pub fn write_truth_parquet(path: &Path, truth: &[FailureTruth]) -> Result<(), IoError> {
    let p = path.display().to_string();
    let schema = Arc::new(Schema::new(vec![
        Field::new("host_id", DataType::Utf8, false),
        Field::new("rack", DataType::Utf8, false),
        Field::new("fault_domain", DataType::UInt32, false),
        Field::new("mode", DataType::Utf8, false),
        Field::new("onset_ms", DataType::Int64, false),
        Field::new("fail_ms", DataType::Int64, false),
        Field::new("faint", DataType::Boolean, false),
        Field::new("occurred", DataType::Boolean, false),
        Field::new("healed_by", DataType::Utf8, true),
        Field::new("vms_interrupted", DataType::UInt32, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            truth.iter().map(|t| t.host_id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            truth.iter().map(|t| t.rack.as_str()),
        )),
        Arc::new(UInt32Array::from_iter_values(
            truth.iter().map(|t| t.fault_domain),
        )),
        Arc::new(StringArray::from_iter_values(
            truth.iter().map(|t| t.mode.as_str()),
        )),
        Arc::new(Int64Array::from_iter_values(
            truth.iter().map(|t| t.onset_ms),
        )),
        Arc::new(Int64Array::from_iter_values(
            truth.iter().map(|t| t.fail_ms),
        )),
        Arc::new(BooleanArray::from(
            truth.iter().map(|t| t.faint).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            truth.iter().map(|t| t.occurred).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            truth
                .iter()
                .map(|t| t.healed_by.clone())
                .collect::<Vec<_>>(),
        )),
        Arc::new(UInt32Array::from_iter_values(
            truth.iter().map(|t| t.vms_interrupted),
        )),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).map_err(|source| IoError::Arrow {
        path: p.clone(),
        source,
    })?;
    let file = File::create(path).map_err(|source| IoError::Io {
        step: "creating",
        path: p.clone(),
        source,
    })?;
    let mut w = ArrowWriter::try_new(file, schema, None).map_err(|source| IoError::Parquet {
        path: p.clone(),
        source,
    })?;
    w.write(&batch).map_err(|source| IoError::Parquet {
        path: p.clone(),
        source,
    })?;
    let file = w.into_inner().map_err(|source| IoError::Parquet {
        path: p.clone(),
        source,
    })?;
    file.sync_all().map_err(|source| IoError::Io {
        step: "syncing",
        path: p,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    #[test]
    fn telemetry_parquet_round_trips_row_count_and_values() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.parquet");
        let mut w = TelemetryWriter::create(&path, 3).unwrap();
        let recs: Vec<HostRecord> = (0..10)
            .map(|i| HostRecord::example(&format!("h{i}"), i * 1000))
            .collect();
        w.write(&recs).unwrap();
        assert_eq!(w.finish().unwrap(), 10);
        let reader = ParquetRecordBatchReaderBuilder::try_new(File::open(&path).unwrap())
            .unwrap()
            .build()
            .unwrap();
        let batches: Vec<RecordBatch> = reader.map(|b| b.unwrap()).collect();
        assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 10);
        let b = &batches[0];
        assert_eq!(b.schema().fields().len(), arrow_schema().fields().len());
        let ids = b
            .column_by_name("host_id")
            .unwrap()
            .as_any()
            .downcast_ref::<StringArray>()
            .unwrap();
        assert_eq!(ids.value(1), "h1");
        let vms = b
            .column_by_name("vms")
            .unwrap()
            .as_any()
            .downcast_ref::<arrow_array::ListArray>()
            .unwrap();
        assert_eq!(vms.value(0).len(), 2);
    }
}
