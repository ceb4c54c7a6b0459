use std::sync::Arc;

use arrow_schema::{DataType, Field, Fields, Schema};

/// The Arrow schema of a batch of [`crate::HostRecord`]s, column for field, in field
/// order. Counters are `UInt64`, readings `Float64`, `ts_ms` is `Int64` milliseconds,
/// `vms` a list of `{id, mem_mib}` structs.
pub fn arrow_schema() -> Schema {
    let vm = Fields::from(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("mem_mib", DataType::UInt32, false),
    ]);
    let mut fields = vec![
        Field::new("v", DataType::UInt32, false),
        Field::new("host_id", DataType::Utf8, false),
        Field::new("ts_ms", DataType::Int64, false),
        Field::new("region", DataType::Utf8, false),
        Field::new("cluster", DataType::Utf8, false),
        Field::new("rack", DataType::Utf8, false),
        Field::new("fault_domain", DataType::UInt32, false),
        Field::new("update_domain", DataType::UInt32, false),
    ];
    for f in [
        "cpu_util",
        "mem_util",
        "disk_read_iops",
        "disk_write_iops",
        "disk_latency_ms",
    ] {
        fields.push(Field::new(f, DataType::Float64, false));
    }
    for f in [
        "smart_5_raw",
        "smart_9_raw",
        "smart_187_raw",
        "smart_188_raw",
        "smart_194_raw",
        "smart_197_raw",
        "smart_198_raw",
        "ecc_corrected",
        "ecc_uncorrected",
    ] {
        fields.push(Field::new(f, DataType::UInt64, false));
    }
    fields.push(Field::new("heartbeat_age_s", DataType::Float64, false));
    fields.push(Field::new("kernel_events", DataType::UInt32, false));
    fields.push(Field::new("service_crashes", DataType::UInt32, false));
    fields.push(Field::new(
        "vms",
        DataType::List(Arc::new(Field::new("item", DataType::Struct(vm), false))),
        false,
    ));
    Schema::new(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrow_columns_follow_the_record_fields() {
        let rec = serde_json::to_value(crate::HostRecord::example("h", 0)).unwrap();
        let names: Vec<&str> = rec
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let schema = arrow_schema();
        let cols: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        let mut a = names.clone();
        let mut b = cols.clone();
        a.sort_unstable();
        b.sort_unstable();
        assert_eq!(a, b);
    }
}
