//! Names and order of the features: the schema that model artifacts pin by hash.

/// Version of the definitions in the crate docs. Bump it whenever a definition changes,
/// so artifacts trained on the old definitions are refused.
pub const DEFINITIONS_VERSION: u32 = 1;

macro_rules! features {
    ($($var:ident => $name:literal: $doc:literal;)*) => {
        /// One feature: its position in a [`FeatureVector`] and its name.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(usize)]
        pub enum Feature {
            $(#[doc = $doc] $var,)*
        }

        impl Feature {
            /// Every feature, in vector order.
            pub const ALL: &'static [Feature] = &[$(Feature::$var),*];

            /// The feature's column name (also the offline column name).
            pub const fn name(self) -> &'static str {
                match self { $(Feature::$var => $name,)* }
            }

            /// Its definition in one line.
            pub const fn doc(self) -> &'static str {
                match self { $(Feature::$var => $doc,)* }
            }
        }

        /// Column names, in vector order.
        pub const FEATURE_NAMES: &[&str] = &[$($name),*];
    };
}

features! {
    Smart5 => "smart_5": "SMART 5 (reallocated sectors), raw level.";
    Smart5Delta => "smart_5_delta": "Delta of SMART 5.";
    Smart5RiseW => "smart_5_rise_w": "Rise of SMART 5 over the window.";
    Smart5HoursSinceRise => "smart_5_hours_since_rise": "Hours since SMART 5 last rose (cap if never).";
    Smart187 => "smart_187": "SMART 187 (reported uncorrectable), raw level.";
    Smart187Delta => "smart_187_delta": "Delta of SMART 187.";
    Smart187RiseW => "smart_187_rise_w": "Rise of SMART 187 over the window.";
    Smart187HoursSinceRise => "smart_187_hours_since_rise": "Hours since SMART 187 last rose.";
    Smart188 => "smart_188": "SMART 188 (command timeouts), raw level.";
    Smart188Delta => "smart_188_delta": "Delta of SMART 188.";
    Smart188RiseW => "smart_188_rise_w": "Rise of SMART 188 over the window.";
    Smart188HoursSinceRise => "smart_188_hours_since_rise": "Hours since SMART 188 last rose.";
    Smart197 => "smart_197": "SMART 197 (current pending sectors), raw level.";
    Smart197Delta => "smart_197_delta": "Delta of SMART 197.";
    Smart197RiseW => "smart_197_rise_w": "Rise of SMART 197 over the window.";
    Smart197HoursSinceRise => "smart_197_hours_since_rise": "Hours since SMART 197 last rose.";
    Smart198 => "smart_198": "SMART 198 (offline uncorrectable), raw level.";
    Smart198Delta => "smart_198_delta": "Delta of SMART 198.";
    Smart198RiseW => "smart_198_rise_w": "Rise of SMART 198 over the window.";
    Smart198HoursSinceRise => "smart_198_hours_since_rise": "Hours since SMART 198 last rose.";
    SmartCritAny => "smart_crit_any": "1 if any of SMART 5/187/188/197/198 is above 0, else 0.";
    SmartCritRose => "smart_crit_rose": "1 if any of SMART 5/187/188/197/198 has delta above 0, else 0.";
    SmartCritRiseW => "smart_crit_rise_w": "Sum of the five critical rises over the window.";
    PowerOnHours => "smart_9": "SMART 9 (power-on hours), raw level.";
    TempEwma => "smart_194_ewma": "Fast EWMA of SMART 194 (temperature).";
    EccCorrectedDelta => "ecc_corrected_delta": "Delta of corrected ECC errors.";
    EccCorrectedRiseW => "ecc_corrected_rise_w": "Rise of corrected ECC errors over the window.";
    EccCorrectedRateH => "ecc_corrected_rate_h": "Corrected ECC errors per hour (delta / hours since previous record).";
    EccUncorrected => "ecc_uncorrected": "Uncorrected ECC errors since boot, raw level.";
    EccUncorrectedDelta => "ecc_uncorrected_delta": "Delta of uncorrected ECC errors.";
    EccUncorrectedRiseW => "ecc_uncorrected_rise_w": "Rise of uncorrected ECC errors over the window.";
    HeartbeatAgeS => "heartbeat_age_s": "Seconds since the host agent's heartbeat, raw.";
    HeartbeatGapsW => "heartbeat_gaps_w": "Window count of records with heartbeat_age_s above heartbeat_gap_s.";
    ServiceCrashesW => "service_crashes_w": "Window sum of service crashes.";
    KernelEventsW => "kernel_events_w": "Window sum of kernel events.";
    CpuUtilEwma => "cpu_util_ewma": "Fast EWMA of CPU utilisation.";
    CpuUtilZ => "cpu_util_z": "z-score of CPU utilisation against the host's slow baseline (floor z_floor_cpu).";
    DiskLatencyEwma => "disk_latency_ms_ewma": "Fast EWMA of disk latency.";
    DiskLatencyZ => "disk_latency_ms_z": "z-score of disk latency (floor z_floor_latency_ms).";
    DiskIopsZ => "disk_iops_z": "z-score of read + write IOPS (floor z_floor_iops).";
    MemUtilEwma => "mem_util_ewma": "Fast EWMA of memory utilisation.";
    DtHours => "dt_hours": "Hours since the entity's previous record (0 for the first).";
    RecordsSeen => "records_seen": "Records of the entity seen so far, this one included.";
}

/// Number of features.
pub const N_FEATURES: usize = Feature::ALL.len();

/// The features computable from SMART snapshots alone (a drive's daily Backblaze row):
/// what the offline disk-failure trainer builds with polars.
pub const SMART_FEATURES: &[Feature] = &[
    Feature::Smart5,
    Feature::Smart5Delta,
    Feature::Smart5RiseW,
    Feature::Smart5HoursSinceRise,
    Feature::Smart187,
    Feature::Smart187Delta,
    Feature::Smart187RiseW,
    Feature::Smart187HoursSinceRise,
    Feature::Smart188,
    Feature::Smart188Delta,
    Feature::Smart188RiseW,
    Feature::Smart188HoursSinceRise,
    Feature::Smart197,
    Feature::Smart197Delta,
    Feature::Smart197RiseW,
    Feature::Smart197HoursSinceRise,
    Feature::Smart198,
    Feature::Smart198Delta,
    Feature::Smart198RiseW,
    Feature::Smart198HoursSinceRise,
    Feature::SmartCritAny,
    Feature::SmartCritRose,
    Feature::SmartCritRiseW,
    Feature::PowerOnHours,
    Feature::TempEwma,
    Feature::DtHours,
    Feature::RecordsSeen,
];

/// The features of one record, indexed by [`Feature`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureVector(pub [f64; N_FEATURES]);

impl Default for FeatureVector {
    fn default() -> Self {
        Self([0.0; N_FEATURES])
    }
}

impl std::ops::Index<Feature> for FeatureVector {
    type Output = f64;
    #[inline]
    fn index(&self, f: Feature) -> &f64 {
        &self.0[f as usize]
    }
}

impl std::ops::IndexMut<Feature> for FeatureVector {
    #[inline]
    fn index_mut(&mut self, f: Feature) -> &mut f64 {
        &mut self.0[f as usize]
    }
}

impl FeatureVector {
    /// The values of `features`, in that order.
    pub fn select(&self, features: &[Feature]) -> Vec<f64> {
        features.iter().map(|&f| self[f]).collect()
    }
}

/// A stable 64-bit FNV-1a hash of the definitions version and the given feature names in
/// order: what a model artifact records and the loader compares.
pub fn schema_hash(names: &[&str]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    eat(&DEFINITIONS_VERSION.to_le_bytes());
    for n in names {
        eat(n.as_bytes());
        eat(&[0]);
    }
    format!("{h:016x}")
}

impl Feature {
    /// The feature with this column name.
    pub fn from_name(name: &str) -> Option<Feature> {
        Feature::ALL.iter().copied().find(|f| f.name() == name)
    }
}

impl std::fmt::Display for Feature {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for Feature {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for Feature {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Feature::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown feature `{name}`")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_in_order() {
        let mut seen = std::collections::HashSet::new();
        for (i, f) in Feature::ALL.iter().enumerate() {
            assert_eq!(*f as usize, i);
            assert_eq!(FEATURE_NAMES[i], f.name());
            assert!(seen.insert(f.name()), "duplicate {}", f.name());
        }
    }

    #[test]
    fn schema_hash_depends_on_names_and_order() {
        let a = schema_hash(&["x", "y"]);
        assert_eq!(a, schema_hash(&["x", "y"]));
        assert_ne!(a, schema_hash(&["y", "x"]));
        assert_ne!(a, schema_hash(&["xy"]));
    }
}
