use serde::{Deserialize, Serialize};

use crate::error::ValidationError;
use crate::wire::WIRE_VERSION;

/// Longest host, VM, region, cluster or rack identifier, in bytes.
pub(crate) const MAX_ID_LEN: usize = 128;
/// Most VMs one record may list.
pub(crate) const MAX_VMS: usize = 512;

/// One telemetry sample of one host for one interval.
///
/// Counters named `*_raw`, `ecc_*` are cumulative (they only grow); `kernel_events` and
/// `service_crashes` count events *in this interval*. Rates and utilisations are
/// instantaneous readings at `ts_ms`.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// Wire format version; always [`WIRE_VERSION`] for records this build writes.
    pub v: u32,
    /// Host identifier, unique in the fleet.
    pub host_id: String,
    /// Sample time, milliseconds since the Unix epoch (UTC).
    pub ts_ms: i64,
    /// Region name.
    pub region: String,
    /// Cluster name (a cluster is the unit a policy instance owns).
    pub cluster: String,
    /// Rack name.
    pub rack: String,
    /// Fault domain index inside the cluster (shared power / network).
    pub fault_domain: u32,
    /// Update domain index inside the cluster (rolled together during updates).
    pub update_domain: u32,
    /// CPU utilisation, 0..=1.
    pub cpu_util: f64,
    /// Memory utilisation, 0..=1.
    pub mem_util: f64,
    /// Disk reads per second.
    pub disk_read_iops: f64,
    /// Disk writes per second.
    pub disk_write_iops: f64,
    /// Mean disk IO latency over the interval, milliseconds.
    pub disk_latency_ms: f64,
    /// SMART 5: reallocated sectors count.
    pub smart_5_raw: u64,
    /// SMART 9: power-on hours.
    pub smart_9_raw: u64,
    /// SMART 187: reported uncorrectable errors.
    pub smart_187_raw: u64,
    /// SMART 188: command timeouts.
    pub smart_188_raw: u64,
    /// SMART 194: temperature, degrees Celsius (a reading, not a counter).
    pub smart_194_raw: u64,
    /// SMART 197: current pending sectors (a gauge that usually grows).
    pub smart_197_raw: u64,
    /// SMART 198: offline uncorrectable sectors.
    pub smart_198_raw: u64,
    /// Corrected memory ECC errors since boot.
    pub ecc_corrected: u64,
    /// Uncorrected memory ECC errors since boot.
    pub ecc_uncorrected: u64,
    /// Seconds since the host agent's last heartbeat.
    pub heartbeat_age_s: f64,
    /// Kernel warnings / oopses in this interval.
    pub kernel_events: u32,
    /// Host service crashes in this interval.
    pub service_crashes: u32,
    /// VMs running on the host.
    pub vms: Vec<VmInfo>,
}

/// A VM running on a host.
#[derive(
    Debug, Clone, Default, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode,
)]
#[serde(deny_unknown_fields)]
pub struct VmInfo {
    /// VM identifier, unique in the fleet.
    pub id: String,
    /// Guest memory size, MiB.
    pub mem_mib: u32,
}

/// The SMART counters that Backblaze's rule treats as failure signs: 5, 187, 188, 197, 198.
pub const CRITICAL_SMART: [&str; 5] = [
    "smart_5_raw",
    "smart_187_raw",
    "smart_188_raw",
    "smart_197_raw",
    "smart_198_raw",
];

impl HostRecord {
    /// A plausible healthy record, for docs and tests.
    pub fn example(host_id: &str, ts_ms: i64) -> Self {
        Self {
            v: WIRE_VERSION,
            host_id: host_id.to_owned(),
            ts_ms,
            region: "eu-west".into(),
            cluster: "c01".into(),
            rack: "r03".into(),
            fault_domain: 1,
            update_domain: 2,
            cpu_util: 0.42,
            mem_util: 0.61,
            disk_read_iops: 850.0,
            disk_write_iops: 420.0,
            disk_latency_ms: 3.2,
            smart_5_raw: 0,
            smart_9_raw: 17_520,
            smart_187_raw: 0,
            smart_188_raw: 0,
            smart_194_raw: 34,
            smart_197_raw: 0,
            smart_198_raw: 0,
            ecc_corrected: 3,
            ecc_uncorrected: 0,
            heartbeat_age_s: 4.0,
            kernel_events: 0,
            service_crashes: 0,
            vms: vec![
                VmInfo {
                    id: format!("{host_id}-vm0"),
                    mem_mib: 4096,
                },
                VmInfo {
                    id: format!("{host_id}-vm1"),
                    mem_mib: 8192,
                },
            ],
        }
    }

    /// The cumulative counters, by field name, in a fixed order. Used to check that they
    /// never go backwards. SMART 197 (pending sectors) is a gauge and not listed: it
    /// falls when pending sectors are remapped or rewritten.
    pub fn counters(&self) -> [(&'static str, u64); 7] {
        [
            ("smart_5_raw", self.smart_5_raw),
            ("smart_9_raw", self.smart_9_raw),
            ("smart_187_raw", self.smart_187_raw),
            ("smart_188_raw", self.smart_188_raw),
            ("smart_198_raw", self.smart_198_raw),
            ("ecc_corrected", self.ecc_corrected),
            ("ecc_uncorrected", self.ecc_uncorrected),
        ]
    }

    /// Checks that need nothing but the record itself: version, identifiers, finite and
    /// in-range numbers, list sizes. [`crate::decode`] runs this; call it yourself on
    /// records built in memory.
    pub fn check(&self) -> Result<(), ValidationError> {
        if self.v != WIRE_VERSION {
            return Err(ValidationError::UnsupportedVersion {
                found: u64::from(self.v),
                supported: WIRE_VERSION,
            });
        }
        for (field, value) in [
            ("host_id", &self.host_id),
            ("region", &self.region),
            ("cluster", &self.cluster),
            ("rack", &self.rack),
        ] {
            check_id(field, value)?;
        }
        if self.ts_ms < 0 {
            return Err(ValidationError::Negative {
                field: "ts_ms".into(),
                value: self.ts_ms.to_string(),
            });
        }
        check_range("cpu_util", self.cpu_util, 0.0, 1.0)?;
        check_range("mem_util", self.mem_util, 0.0, 1.0)?;
        check_range("disk_read_iops", self.disk_read_iops, 0.0, 1e7)?;
        check_range("disk_write_iops", self.disk_write_iops, 0.0, 1e7)?;
        check_range("disk_latency_ms", self.disk_latency_ms, 0.0, 1e6)?;
        check_range("heartbeat_age_s", self.heartbeat_age_s, 0.0, 1e9)?;
        if self.vms.len() > MAX_VMS {
            return Err(ValidationError::TooMany {
                field: "vms".into(),
                count: self.vms.len(),
                limit: MAX_VMS,
            });
        }
        for (i, vm) in self.vms.iter().enumerate() {
            // The field name is formatted only for an error: this runs for
            // every VM of every record.
            if !id_ok(&vm.id) {
                check_id(&format!("vms[{i}].id"), &vm.id)?;
            }
        }
        Ok(())
    }
}

fn id_ok(value: &str) -> bool {
    !value.is_empty() && value.len() <= MAX_ID_LEN
}

fn check_id(field: &str, value: &str) -> Result<(), ValidationError> {
    if !id_ok(value) {
        return Err(ValidationError::BadIdentifier {
            field: field.to_owned(),
            len: value.len(),
            max_len: MAX_ID_LEN,
        });
    }
    Ok(())
}

fn check_range(field: &str, value: f64, min: f64, max: f64) -> Result<(), ValidationError> {
    if !value.is_finite() {
        return Err(ValidationError::NonFinite {
            field: field.to_owned(),
        });
    }
    if value < 0.0 && min >= 0.0 {
        return Err(ValidationError::Negative {
            field: field.to_owned(),
            value: value.to_string(),
        });
    }
    if value < min || value > max {
        return Err(ValidationError::OutOfRange {
            field: field.to_owned(),
            value,
            min,
            max,
        });
    }
    Ok(())
}
