use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use waterbear_telemetry::HostRecord;

use crate::params::FeatureParams;
use crate::primitives::{EwMoments, Ewma, RingSums};
use crate::schema::{Feature as F, FeatureVector};

/// Windowed quantities: five SMART rises, two ECC rises, heartbeat gaps, crashes, kernel.
const K: usize = 10;
const MS_PER_HOUR: f64 = 3_600_000.0;

/// Dense index of a host inside a [`FeatureSet`], assigned in order of first sight.
pub type HostIdx = u32;

/// Everything the features of one host depend on. Plain data: it serialises, so a
/// streaming job can checkpoint it and restore it on another instance. Two
/// encodings: serde (JSON, readable) and bincode (compact: the window's counts
/// as varints, see [`RingSums`]; the streaming job's state records).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct HostState {
    n: u64,
    last_ts_ms: i64,
    /// SMART 5, 187, 188, 197, 198, ECC corrected, ECC uncorrected.
    last_counters: [u64; 7],
    /// Timestamp of the last rise of each critical SMART counter.
    last_rise_ms: [Option<i64>; 5],
    #[serde(deserialize_with = "crate::primitives::checked_ring")]
    window: RingSums<K>,
    temp: Ewma,
    cpu: Ewma,
    latency: Ewma,
    mem: Ewma,
    cpu_base: EwMoments,
    latency_base: EwMoments,
    iops_base: EwMoments,
}

impl HostState {
    /// A host that has sent nothing yet.
    pub fn new(params: &FeatureParams) -> Self {
        Self {
            n: 0,
            last_ts_ms: 0,
            last_counters: [0; 7],
            last_rise_ms: [None; 5],
            window: RingSums::new(params.window),
            temp: Ewma::new(),
            cpu: Ewma::new(),
            latency: Ewma::new(),
            mem: Ewma::new(),
            cpu_base: EwMoments::default(),
            latency_base: EwMoments::default(),
            iops_base: EwMoments::default(),
        }
    }

    /// Starts loading this host's state into the cache: the struct and the
    /// window row the next [`Self::update`] reads. With thousands of hosts
    /// the state is not in the core's cache when a record arrives; fetching
    /// its lines at once is cheaper than missing them one by one as the
    /// update reaches them. A hint only: results are the same without it.
    #[inline]
    pub fn prefetch(&self) {
        crate::primitives::prefetch(self);
        crate::primitives::prefetch(self.window.next_row());
    }

    /// As [`Self::prefetch`], for all of the window: before the state is
    /// encoded (which reads every row).
    #[inline]
    pub fn prefetch_all(&self) {
        crate::primitives::prefetch(self);
        crate::primitives::prefetch(self.window.rows());
    }

    /// Records seen.
    pub fn records(&self) -> u64 {
        self.n
    }

    /// Timestamp of the last record seen.
    pub fn last_ts_ms(&self) -> i64 {
        self.last_ts_ms
    }

    /// Folds in one record (the host's next, in time order) and writes its features.
    #[inline]
    pub fn update(&mut self, rec: &HostRecord, p: &FeatureParams, out: &mut FeatureVector) {
        let first = self.n == 0;
        let counters = [
            rec.smart_5_raw,
            rec.smart_187_raw,
            rec.smart_188_raw,
            rec.smart_197_raw,
            rec.smart_198_raw,
            rec.ecc_corrected,
            rec.ecc_uncorrected,
        ];
        let mut delta = [0.0f64; 7];
        if !first {
            for i in 0..7 {
                delta[i] = counters[i] as f64 - self.last_counters[i] as f64;
            }
        }
        let dt_hours = if first {
            0.0
        } else {
            // saturating here and below: a restored state (checksummed, but
            // written by anyone) may hold any timestamp and count
            rec.ts_ms.saturating_sub(self.last_ts_ms) as f64 / MS_PER_HOUR
        };
        for (d, last) in delta.iter().zip(self.last_rise_ms.iter_mut()) {
            if *d > 0.0 {
                *last = Some(rec.ts_ms);
            }
        }
        let gap = if rec.heartbeat_age_s > p.heartbeat_gap_s {
            1.0
        } else {
            0.0
        };
        let sums = *self.window.push([
            delta[0].max(0.0),
            delta[1].max(0.0),
            delta[2].max(0.0),
            delta[3].max(0.0),
            delta[4].max(0.0),
            delta[5].max(0.0),
            delta[6].max(0.0),
            gap,
            f64::from(rec.service_crashes),
            f64::from(rec.kernel_events),
        ]);
        self.n = self.n.saturating_add(1);

        let crit = [
            (
                F::Smart5,
                F::Smart5Delta,
                F::Smart5RiseW,
                F::Smart5HoursSinceRise,
            ),
            (
                F::Smart187,
                F::Smart187Delta,
                F::Smart187RiseW,
                F::Smart187HoursSinceRise,
            ),
            (
                F::Smart188,
                F::Smart188Delta,
                F::Smart188RiseW,
                F::Smart188HoursSinceRise,
            ),
            (
                F::Smart197,
                F::Smart197Delta,
                F::Smart197RiseW,
                F::Smart197HoursSinceRise,
            ),
            (
                F::Smart198,
                F::Smart198Delta,
                F::Smart198RiseW,
                F::Smart198HoursSinceRise,
            ),
        ];
        let mut any = 0.0;
        let mut rose = 0.0;
        let mut rise_total = 0.0;
        for (i, (level, d, rw, since)) in crit.into_iter().enumerate() {
            out[level] = counters[i] as f64;
            out[d] = delta[i];
            out[rw] = sums[i];
            out[since] = match self.last_rise_ms[i] {
                Some(t) => (rec.ts_ms.saturating_sub(t) as f64 / MS_PER_HOUR).min(p.hours_cap),
                None => p.hours_cap,
            };
            if counters[i] > 0 {
                any = 1.0;
            }
            if delta[i] > 0.0 {
                rose = 1.0;
            }
            rise_total += sums[i];
        }
        out[F::SmartCritAny] = any;
        out[F::SmartCritRose] = rose;
        out[F::SmartCritRiseW] = rise_total;
        out[F::PowerOnHours] = rec.smart_9_raw as f64;
        out[F::TempEwma] = self.temp.update(rec.smart_194_raw as f64, p.fast_alpha);

        out[F::EccCorrectedDelta] = delta[5];
        out[F::EccCorrectedRiseW] = sums[5];
        out[F::EccCorrectedRateH] = if dt_hours > 0.0 {
            delta[5] / dt_hours
        } else {
            0.0
        };
        out[F::EccUncorrected] = counters[6] as f64;
        out[F::EccUncorrectedDelta] = delta[6];
        out[F::EccUncorrectedRiseW] = sums[6];

        out[F::HeartbeatAgeS] = rec.heartbeat_age_s;
        out[F::HeartbeatGapsW] = sums[7];
        out[F::ServiceCrashesW] = sums[8];
        out[F::KernelEventsW] = sums[9];

        let warm = p.warmup;
        out[F::CpuUtilEwma] = self.cpu.update(rec.cpu_util, p.fast_alpha);
        out[F::CpuUtilZ] = self.cpu_base.score_then_update(
            rec.cpu_util,
            p.slow_alpha,
            warm,
            p.z_floor_cpu,
            p.z_clip,
        );
        out[F::DiskLatencyEwma] = self.latency.update(rec.disk_latency_ms, p.fast_alpha);
        out[F::DiskLatencyZ] = self.latency_base.score_then_update(
            rec.disk_latency_ms,
            p.slow_alpha,
            warm,
            p.z_floor_latency_ms,
            p.z_clip,
        );
        out[F::DiskIopsZ] = self.iops_base.score_then_update(
            rec.disk_read_iops + rec.disk_write_iops,
            p.slow_alpha,
            warm,
            p.z_floor_iops,
            p.z_clip,
        );
        out[F::MemUtilEwma] = self.mem.update(rec.mem_util, p.fast_alpha);
        out[F::DtHours] = dt_hours;
        out[F::RecordsSeen] = self.n as f64;

        self.last_counters = counters;
        self.last_ts_ms = rec.ts_ms;
    }
}

/// The features of a whole fleet: host ids interned to dense indices, one
/// [`HostState`] each.
#[derive(Debug, Clone)]
pub struct FeatureSet {
    params: FeatureParams,
    index: HashMap<String, HostIdx>,
    ids: Vec<String>,
    states: Vec<HostState>,
}

impl FeatureSet {
    /// An empty set.
    pub fn new(params: FeatureParams) -> Self {
        Self {
            params,
            index: HashMap::new(),
            ids: Vec::new(),
            states: Vec::new(),
        }
    }

    /// The parameters in use.
    pub fn params(&self) -> &FeatureParams {
        &self.params
    }

    /// The index of `host_id`, registering it on first sight.
    pub fn intern(&mut self, host_id: &str) -> HostIdx {
        if let Some(&i) = self.index.get(host_id) {
            return i;
        }
        let i = HostIdx::try_from(self.ids.len()).expect("fewer than 2^32 hosts");
        self.index.insert(host_id.to_owned(), i);
        self.ids.push(host_id.to_owned());
        self.states.push(HostState::new(&self.params));
        i
    }

    /// Folds in a record and returns its host's index and features.
    #[inline]
    pub fn update(&mut self, rec: &HostRecord) -> (HostIdx, FeatureVector) {
        let mut out = FeatureVector::default();
        let i = self.update_into(rec, &mut out);
        (i, out)
    }

    /// Like [`FeatureSet::update`], writing into `out`.
    #[inline]
    pub fn update_into(&mut self, rec: &HostRecord, out: &mut FeatureVector) -> HostIdx {
        let i = self.intern(&rec.host_id);
        self.states[i as usize].update(rec, &self.params, out);
        i
    }

    /// Host id of an index.
    pub fn host_id(&self, i: HostIdx) -> &str {
        &self.ids[i as usize]
    }

    /// Index of a host id, if seen.
    pub fn get(&self, host_id: &str) -> Option<HostIdx> {
        self.index.get(host_id).copied()
    }

    /// Number of hosts seen.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether no host has been seen.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// A host's state, for checkpoints.
    pub fn state(&self, host_id: &str) -> Option<&HostState> {
        self.get(host_id).map(|i| &self.states[i as usize])
    }

    /// Installs a checkpointed state for a host (replacing what it had).
    pub fn restore(&mut self, host_id: &str, state: HostState) {
        let i = self.intern(host_id);
        self.states[i as usize] = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::params::FeatureConfig;
    use crate::primitives::zscore;
    use crate::schema::N_FEATURES;
    use proptest::prelude::*;

    /// Recomputes every feature of the last record from the whole history, directly from
    /// the definitions in the crate docs: O(n) per record, no shared state with the
    /// online code.
    fn naive(history: &[HostRecord], p: &FeatureParams) -> FeatureVector {
        let n = history.len();
        let i = n - 1;
        let rec = &history[i];
        let hours = |a: i64, b: i64| (a - b) as f64 / MS_PER_HOUR;
        let field = |r: &HostRecord, k: usize| -> f64 {
            [
                r.smart_5_raw,
                r.smart_187_raw,
                r.smart_188_raw,
                r.smart_197_raw,
                r.smart_198_raw,
                r.ecc_corrected,
                r.ecc_uncorrected,
            ][k] as f64
        };
        let delta = |j: usize, k: usize| {
            if j == 0 {
                0.0
            } else {
                field(&history[j], k) - field(&history[j - 1], k)
            }
        };
        let lo = (i + 1).saturating_sub(p.window);
        let rise = |k: usize| (lo..=i).map(|j| delta(j, k).max(0.0)).sum::<f64>();
        let wsum = |f: &dyn Fn(&HostRecord) -> f64| (lo..=i).map(|j| f(&history[j])).sum::<f64>();
        let ewma = |f: &dyn Fn(&HostRecord) -> f64, alpha: f64, upto: usize| {
            let mut m = f(&history[0]);
            for r in &history[1..=upto] {
                m = (1.0 - alpha) * m + alpha * f(r);
            }
            m
        };
        let z = |f: &dyn Fn(&HostRecord) -> f64, floor: f64| {
            if (i as u64) < p.warmup {
                return 0.0;
            }
            // before any record the baseline is all zeros
            let (mu, q) = if i == 0 {
                (0.0, 0.0)
            } else {
                (
                    ewma(f, p.slow_alpha, i - 1),
                    ewma(&|r| f(r) * f(r), p.slow_alpha, i - 1),
                )
            };
            zscore(f(rec), mu, q, floor, p.z_clip)
        };
        let mut out = FeatureVector::default();
        let groups = [
            (
                F::Smart5,
                F::Smart5Delta,
                F::Smart5RiseW,
                F::Smart5HoursSinceRise,
            ),
            (
                F::Smart187,
                F::Smart187Delta,
                F::Smart187RiseW,
                F::Smart187HoursSinceRise,
            ),
            (
                F::Smart188,
                F::Smart188Delta,
                F::Smart188RiseW,
                F::Smart188HoursSinceRise,
            ),
            (
                F::Smart197,
                F::Smart197Delta,
                F::Smart197RiseW,
                F::Smart197HoursSinceRise,
            ),
            (
                F::Smart198,
                F::Smart198Delta,
                F::Smart198RiseW,
                F::Smart198HoursSinceRise,
            ),
        ];
        for (k, (l, d, r, s)) in groups.into_iter().enumerate() {
            out[l] = field(rec, k);
            out[d] = delta(i, k);
            out[r] = rise(k);
            out[s] = match (0..=i).rev().find(|&j| delta(j, k) > 0.0) {
                Some(j) => hours(rec.ts_ms, history[j].ts_ms).min(p.hours_cap),
                None => p.hours_cap,
            };
        }
        out[F::SmartCritAny] = if (0..5).any(|k| field(rec, k) > 0.0) {
            1.0
        } else {
            0.0
        };
        out[F::SmartCritRose] = if (0..5).any(|k| delta(i, k) > 0.0) {
            1.0
        } else {
            0.0
        };
        out[F::SmartCritRiseW] = (0..5).map(rise).sum();
        out[F::PowerOnHours] = rec.smart_9_raw as f64;
        out[F::TempEwma] = ewma(&|r| r.smart_194_raw as f64, p.fast_alpha, i);
        out[F::EccCorrectedDelta] = delta(i, 5);
        out[F::EccCorrectedRiseW] = rise(5);
        let dt = if i == 0 {
            0.0
        } else {
            hours(rec.ts_ms, history[i - 1].ts_ms)
        };
        out[F::EccCorrectedRateH] = if dt > 0.0 { delta(i, 5) / dt } else { 0.0 };
        out[F::EccUncorrected] = field(rec, 6);
        out[F::EccUncorrectedDelta] = delta(i, 6);
        out[F::EccUncorrectedRiseW] = rise(6);
        out[F::HeartbeatAgeS] = rec.heartbeat_age_s;
        out[F::HeartbeatGapsW] = wsum(&|r| {
            if r.heartbeat_age_s > p.heartbeat_gap_s {
                1.0
            } else {
                0.0
            }
        });
        out[F::ServiceCrashesW] = wsum(&|r| f64::from(r.service_crashes));
        out[F::KernelEventsW] = wsum(&|r| f64::from(r.kernel_events));
        out[F::CpuUtilEwma] = ewma(&|r| r.cpu_util, p.fast_alpha, i);
        out[F::CpuUtilZ] = z(&|r| r.cpu_util, p.z_floor_cpu);
        out[F::DiskLatencyEwma] = ewma(&|r| r.disk_latency_ms, p.fast_alpha, i);
        out[F::DiskLatencyZ] = z(&|r| r.disk_latency_ms, p.z_floor_latency_ms);
        out[F::DiskIopsZ] = z(&|r| r.disk_read_iops + r.disk_write_iops, p.z_floor_iops);
        out[F::MemUtilEwma] = ewma(&|r| r.mem_util, p.fast_alpha, i);
        out[F::DtHours] = dt;
        out[F::RecordsSeen] = n as f64;
        out
    }

    #[derive(Debug, Clone)]
    struct Step {
        dt_s: i64,
        bumps: [u8; 7],
        cpu: f64,
        lat: f64,
        iops: f64,
        hb: f64,
        crashes: u8,
        kernel: u8,
        temp: u8,
    }

    fn step() -> impl Strategy<Value = Step> {
        (
            1i64..7200,
            proptest::array::uniform7(prop_oneof![6 => Just(0u8), 1 => 1u8..20]),
            0.0f64..1.0,
            0.0f64..200.0,
            0.0f64..5000.0,
            prop_oneof![4 => 0.0f64..30.0, 1 => 30.0f64..600.0],
            prop_oneof![5 => Just(0u8), 1 => 1u8..4],
            prop_oneof![5 => Just(0u8), 1 => 1u8..4],
            20u8..80,
        )
            .prop_map(
                |(dt_s, bumps, cpu, lat, iops, hb, crashes, kernel, temp)| Step {
                    dt_s,
                    bumps,
                    cpu,
                    lat,
                    iops,
                    hb,
                    crashes,
                    kernel,
                    temp,
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn online_features_match_naive_reference(
            window in 1usize..12,
            warmup in 0u64..6,
            steps in proptest::collection::vec(step(), 1..60),
        ) {
            let p = FeatureConfig { window, warmup, ..FeatureConfig::default() }.check().unwrap();
            let mut set = FeatureSet::new(p.clone());
            let mut history = Vec::new();
            let mut rec = HostRecord::example("h", 1_700_000_000_000);
            for s in &steps {
                rec.ts_ms += s.dt_s * 1000;
                rec.smart_5_raw += u64::from(s.bumps[0]);
                rec.smart_187_raw += u64::from(s.bumps[1]);
                rec.smart_188_raw += u64::from(s.bumps[2]);
                // 197 (pending sectors) may also fall
                rec.smart_197_raw = (rec.smart_197_raw + u64::from(s.bumps[3])).saturating_sub(u64::from(s.bumps[4] % 3));
                rec.smart_198_raw += u64::from(s.bumps[4]);
                rec.ecc_corrected += u64::from(s.bumps[5]) * 7;
                rec.ecc_uncorrected += u64::from(s.bumps[6] / 10);
                rec.cpu_util = s.cpu;
                rec.disk_latency_ms = s.lat;
                rec.disk_read_iops = s.iops;
                rec.disk_write_iops = s.iops / 2.0;
                rec.heartbeat_age_s = s.hb;
                rec.service_crashes = u32::from(s.crashes);
                rec.kernel_events = u32::from(s.kernel);
                rec.smart_194_raw = u64::from(s.temp);
                history.push(rec.clone());
                let (_, got) = set.update(&rec);
                let want = naive(&history, &p);
                for k in 0..N_FEATURES {
                    let (g, w) = (got.0[k], want.0[k]);
                    prop_assert!((g - w).abs() <= 1e-9 * (1.0 + w.abs()),
                        "feature {} at record {}: online {} vs naive {}", crate::FEATURE_NAMES[k], history.len(), g, w);
                }
            }
        }
    }

    #[test]
    fn state_checkpoint_resumes_identically() {
        let p = FeatureParams::default();
        let mut a = FeatureSet::new(p.clone());
        let mut rec = HostRecord::example("h", 0);
        for i in 0..50 {
            rec.ts_ms += 600_000;
            rec.smart_5_raw += i % 3;
            rec.cpu_util = (i as f64 * 0.37) % 1.0;
            a.update(&rec);
        }
        let json = serde_json::to_string(a.state("h").unwrap()).unwrap();
        let mut b = FeatureSet::new(p);
        b.restore("h", serde_json::from_str(&json).unwrap());
        for _ in 0..10 {
            rec.ts_ms += 600_000;
            rec.smart_5_raw += 1;
            assert_eq!(a.update(&rec).1, b.update(&rec).1);
        }
    }

    /// A restored state passes its checksum whatever it holds: extreme counts
    /// and timestamps must neither panic (overflow checks) nor wrap (release).
    #[test]
    fn extreme_restored_values_saturate() {
        let p = FeatureParams::default();
        let mut st = HostState::new(&p);
        let mut fv = FeatureVector::default();
        let rec = HostRecord::example("h", 1_000);
        st.update(&rec, &p, &mut fv);
        st.n = u64::MAX;
        st.last_ts_ms = i64::MIN;
        st.last_rise_ms = [Some(i64::MIN); 5];
        let mut next = rec.clone();
        next.ts_ms = i64::MAX / 2;
        st.update(&next, &p, &mut fv);
        assert_eq!(st.records(), u64::MAX, "wrapped to 0 would restart warm-up");
        assert!(fv[F::DtHours] > 0.0, "dt {}", fv[F::DtHours]);
        assert_eq!(fv[F::Smart5HoursSinceRise], p.hours_cap);
        assert_eq!(fv[F::RecordsSeen], u64::MAX as f64);
        assert!(fv.0.iter().all(|v| !v.is_nan()));
    }
}
