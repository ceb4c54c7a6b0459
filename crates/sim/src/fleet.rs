use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Poisson};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use waterbear_telemetry::{HostRecord, VmInfo, WIRE_VERSION};

use crate::config::SimParams;

const MS_PER_HOUR: f64 = 3_600_000.0;
const MS_PER_DAY: i64 = 86_400_000;

/// How an injected failure shows itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureMode {
    /// Disk wear-out: SMART 5/197/187 grow for days, IO latency rises at the end.
    Disk,
    /// Corrected-ECC bursts, then an uncorrectable error crashes the host.
    Memory,
    /// Heartbeat gaps and service crash loops, then the agent hangs.
    HostAgent,
    /// Kernel warnings, then a panic.
    Kernel,
    /// Temperature climbs and the CPU throttles, then the host shuts down.
    Thermal,
    /// No precursor.
    Sudden,
    /// A rack's cooling fails: most of its hosts overheat together.
    RackIncident,
}

impl FailureMode {
    /// Every mode, for tables.
    pub const ALL: [FailureMode; 7] = [
        FailureMode::Disk,
        FailureMode::Memory,
        FailureMode::HostAgent,
        FailureMode::Kernel,
        FailureMode::Thermal,
        FailureMode::Sudden,
        FailureMode::RackIncident,
    ];

    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureMode::Disk => "disk",
            FailureMode::Memory => "memory",
            FailureMode::HostAgent => "host_agent",
            FailureMode::Kernel => "kernel",
            FailureMode::Thermal => "thermal",
            FailureMode::Sudden => "sudden",
            FailureMode::RackIncident => "rack_incident",
        }
    }
}

/// Ground truth of one injected failure, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailureTruth {
    /// Host.
    pub host_id: String,
    /// Rack of the host.
    pub rack: String,
    /// Fault domain of the host.
    pub fault_domain: u32,
    /// Mode.
    pub mode: FailureMode,
    /// When precursors start, ms (equal to `fail_ms` for sudden failures).
    pub onset_ms: i64,
    /// When the host fails unless healed, ms.
    pub fail_ms: i64,
    /// Faint precursors (a hard case).
    pub faint: bool,
    /// Whether the failure happened (false if healed first or past the horizon).
    pub occurred: bool,
    /// The mitigation that healed the fault, if one did.
    pub healed_by: Option<String>,
    /// VMs on the host when it failed: each one interrupted.
    pub vms_interrupted: u32,
}

/// Errors of fleet operations.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SimError {
    /// No such host.
    #[error("unknown host `{0}`")]
    UnknownHost(String),
    /// The host is down or out of rotation.
    #[error("host `{0}` is not in service")]
    NotInService(String),
    /// Not every VM found a target.
    #[error("host `{host}`: {stranded} VMs found no migration target")]
    NoCapacity {
        /// Host.
        host: String,
        /// VMs left behind.
        stranded: usize,
    },
}

/// One VM moved by a live migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmMove {
    /// VM.
    pub vm_id: String,
    /// Its memory, MiB.
    pub mem_mib: u32,
    /// Target host.
    pub to: String,
}

/// What an evacuation did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct EvacuationReport {
    /// VMs moved, with their targets.
    pub moves: Vec<VmMove>,
}

/// What a Tardigrade phase or a reboot did.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HealReport {
    /// Whether it cleared the host's fault.
    pub healed: bool,
    /// VMs paused briefly with memory kept (phase 3).
    pub vms_frozen: u32,
    /// VMs interrupted (reboot).
    pub vms_interrupted: u32,
}

/// Read-only facts about a host.
#[derive(Debug, Clone, PartialEq)]
pub struct HostView<'a> {
    /// Host id.
    pub host_id: &'a str,
    /// Fault domain.
    pub fault_domain: u32,
    /// VMs on it.
    pub vms: usize,
    /// Running and in rotation.
    pub in_service: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    InService,
    Failed,
    OutOfRotation,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Noise {
    None,
    StableSectors,
    ChronicEcc,
    PendingFlap,
    SectorBurst { at_tick: u64 },
}

#[derive(Debug, Clone)]
struct SimHost {
    id: String,
    cluster: String,
    rack: String,
    rack_idx: usize,
    fd: u32,
    ud: u32,
    rng: ChaCha8Rng,
    vms: Vec<VmInfo>,
    cpu_base: f64,
    cpu_amp: f64,
    phase: f64,
    iops_base: f64,
    lat_base: f64,
    mem_base: f64,
    temp_base: f64,
    s5: u64,
    s9: f64,
    s187: u64,
    s188: u64,
    s197: u64,
    s198: u64,
    ecc_c: u64,
    ecc_u: u64,
    fault: Option<usize>,
    healed: bool,
    life: Life,
    noise: Noise,
}

/// The simulated fleet. See the crate docs.
#[derive(Debug, Clone)]
pub struct Fleet {
    p: SimParams,
    hosts: Vec<SimHost>,
    truth: Vec<FailureTruth>,
    tick: u64,
    ticks: u64,
    interruptions: u64,
    reboot_interruptions: u64,
    unit: Normal<f64>,
}

fn poisson(rng: &mut ChaCha8Rng, lambda: f64) -> u64 {
    if lambda <= 0.0 {
        return 0;
    }
    if lambda < 0.05 {
        return u64::from(rng.gen_bool(lambda));
    }
    match Poisson::new(lambda) {
        Ok(d) => {
            let x: f64 = d.sample(rng);
            x as u64
        }
        Err(_) => 0,
    }
}

impl Fleet {
    /// Builds the fleet and plans every failure up front (seeded).
    pub fn new(p: SimParams) -> Self {
        let mut plan = ChaCha8Rng::seed_from_u64(p.seed);
        let horizon_ms = (p.days * MS_PER_DAY as f64) as i64;
        let ticks = ((horizon_ms / 1000) / p.interval_s).max(1) as u64;
        let racks = p.hosts.div_ceil(p.hosts_per_rack);
        let mut vm_counter = 0u64;
        let mut hosts = Vec::with_capacity(p.hosts);
        for i in 0..p.hosts {
            let rack_idx = i / p.hosts_per_rack;
            let cluster_idx = i / p.hosts_per_cluster;
            let n_vms = plan.gen_range(p.min_vms..=p.max_vms);
            let vms = (0..n_vms)
                .map(|_| {
                    vm_counter += 1;
                    VmInfo {
                        id: format!("vm-{vm_counter:06}"),
                        mem_mib: [2048, 4096, 8192, 16384][plan.gen_range(0..4)],
                    }
                })
                .collect();
            let noise = if plan.gen_bool(p.noisy_fraction) {
                match plan.gen_range(0..10) {
                    0..=2 => Noise::StableSectors,
                    3..=5 => Noise::ChronicEcc,
                    6..=8 => Noise::PendingFlap,
                    _ => Noise::SectorBurst {
                        at_tick: plan.gen_range(0..ticks),
                    },
                }
            } else {
                Noise::None
            };
            let s5 = if noise == Noise::StableSectors {
                plan.gen_range(8..64)
            } else {
                0
            };
            hosts.push(SimHost {
                id: format!("host-{i:05}"),
                cluster: format!("c{cluster_idx:02}"),
                rack: format!("r{rack_idx:03}"),
                rack_idx,
                fd: (rack_idx as u32) % p.fault_domains,
                ud: (i as u32) % p.update_domains,
                rng: ChaCha8Rng::seed_from_u64(
                    p.seed ^ (0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i as u64 + 1)),
                ),
                vms,
                cpu_base: plan.gen_range(0.2..0.55),
                cpu_amp: plan.gen_range(0.05..0.2),
                phase: plan.gen_range(0.0..std::f64::consts::TAU),
                iops_base: plan.gen_range(200.0..2000.0),
                lat_base: plan.gen_range(1.0..6.0),
                mem_base: plan.gen_range(0.3..0.8),
                temp_base: plan.gen_range(26.0..36.0),
                s5,
                s9: plan.gen_range(1_000.0..40_000.0),
                s187: 0,
                s188: 0,
                s197: 0,
                s198: 0,
                ecc_c: 0,
                ecc_u: 0,
                fault: None,
                healed: false,
                life: Life::InService,
                noise,
            });
        }

        // plan failures: a share of hosts, mode by the mix, time in the last part of the horizon
        let mut truth = Vec::new();
        let mix = &p.failure_mix;
        let weights = [
            (FailureMode::Disk, mix.disk),
            (FailureMode::Memory, mix.memory),
            (FailureMode::HostAgent, mix.host_agent),
            (FailureMode::Kernel, mix.kernel),
            (FailureMode::Thermal, mix.thermal),
            (FailureMode::Sudden, mix.sudden),
        ];
        let total: f64 = weights.iter().map(|w| w.1).sum();
        let start = p.start_ms;
        let earliest = start + (horizon_ms as f64 * 0.25) as i64;
        let h = |x: f64| (x * MS_PER_HOUR) as i64;
        for i in 0..p.hosts {
            if total <= 0.0 || !plan.gen_bool(p.failure_fraction) {
                continue;
            }
            let mut r = plan.gen_range(0.0..total);
            let mut mode = FailureMode::Sudden;
            for (m, w) in weights {
                if r < w {
                    mode = m;
                    break;
                }
                r -= w;
            }
            let fail_ms = plan.gen_range(earliest..start + horizon_ms + horizon_ms / 4);
            let lead = match mode {
                FailureMode::Disk => h(plan.gen_range(24.0..96.0)),
                FailureMode::Memory => h(plan.gen_range(6.0..36.0)),
                FailureMode::HostAgent => h(plan.gen_range(3.0..12.0)),
                FailureMode::Kernel => h(plan.gen_range(3.0..24.0)),
                FailureMode::Thermal => h(plan.gen_range(2.0..8.0)),
                FailureMode::Sudden | FailureMode::RackIncident => 0,
            };
            let faint =
                matches!(mode, FailureMode::Disk | FailureMode::Memory) && plan.gen_bool(0.2);
            hosts[i].fault = Some(truth.len());
            hosts[i].noise = Noise::None;
            truth.push(FailureTruth {
                host_id: hosts[i].id.clone(),
                rack: hosts[i].rack.clone(),
                fault_domain: hosts[i].fd,
                mode,
                onset_ms: fail_ms - lead,
                fail_ms,
                faint,
                occurred: false,
                healed_by: None,
                vms_interrupted: 0,
            });
        }
        for _ in 0..p.rack_incidents {
            let rack = plan.gen_range(0..racks);
            let fail_ms = plan.gen_range(earliest..start + horizon_ms);
            let lead = h(plan.gen_range(2.0..6.0));
            for host in hosts.iter_mut().filter(|h| h.rack_idx == rack) {
                if host.fault.is_some() || !plan.gen_bool(0.7) {
                    continue;
                }
                let jitter = plan.gen_range(-h(0.5)..h(0.5));
                host.fault = Some(truth.len());
                host.noise = Noise::None;
                truth.push(FailureTruth {
                    host_id: host.id.clone(),
                    rack: host.rack.clone(),
                    fault_domain: host.fd,
                    mode: FailureMode::RackIncident,
                    onset_ms: fail_ms - lead + jitter,
                    fail_ms: fail_ms + jitter,
                    faint: false,
                    occurred: false,
                    healed_by: None,
                    vms_interrupted: 0,
                });
            }
        }
        Self {
            p,
            hosts,
            truth,
            tick: 0,
            ticks,
            interruptions: 0,
            reboot_interruptions: 0,
            unit: Normal::new(0.0, 1.0).expect("unit normal"),
        }
    }

    /// The settings.
    pub fn params(&self) -> &SimParams {
        &self.p
    }

    /// Fleet time of the next step, ms.
    pub fn now_ms(&self) -> i64 {
        self.p.start_ms + self.tick as i64 * self.p.interval_s * 1000
    }

    /// Steps taken so far and in all.
    pub fn progress(&self) -> (u64, u64) {
        (self.tick, self.ticks)
    }

    /// Whether the horizon is reached.
    pub fn done(&self) -> bool {
        self.tick >= self.ticks
    }

    /// Ground truth of the injected failures, with what became of each so far.
    pub fn truth(&self) -> &[FailureTruth] {
        &self.truth
    }

    /// VMs interrupted so far, by failures and by reboots.
    pub fn interruptions(&self) -> u64 {
        self.interruptions
    }

    /// VMs interrupted by reboots (part of [`Fleet::interruptions`]).
    pub fn reboot_interruptions(&self) -> u64 {
        self.reboot_interruptions
    }

    /// VMs in the fleet.
    pub fn vm_count(&self) -> usize {
        self.hosts.iter().map(|h| h.vms.len()).sum()
    }

    /// Facts about a host.
    pub fn host(&self, host_id: &str) -> Option<HostView<'_>> {
        self.find(host_id).ok().map(|i| {
            let h = &self.hosts[i];
            HostView {
                host_id: &h.id,
                fault_domain: h.fd,
                vms: h.vms.len(),
                in_service: h.life == Life::InService,
            }
        })
    }

    fn find(&self, host_id: &str) -> Result<usize, SimError> {
        // ids are host-NNNNN in index order
        host_id
            .strip_prefix("host-")
            .and_then(|n| n.parse::<usize>().ok())
            .filter(|&i| i < self.hosts.len() && self.hosts[i].id == host_id)
            .ok_or_else(|| SimError::UnknownHost(host_id.to_owned()))
    }

    fn in_service(&self, host_id: &str) -> Result<usize, SimError> {
        let i = self.find(host_id)?;
        if self.hosts[i].life != Life::InService {
            return Err(SimError::NotInService(host_id.to_owned()));
        }
        Ok(i)
    }

    /// Emits this step's records (into `out`, cleared first), lets due failures happen,
    /// and advances time by one interval.
    pub fn step(&mut self, out: &mut Vec<HostRecord>) {
        out.clear();
        if self.done() {
            return;
        }
        let now = self.now_ms();
        for i in 0..self.hosts.len() {
            if let Some(f) = self.hosts[i].fault {
                let t = &self.truth[f];
                if !self.hosts[i].healed
                    && !t.occurred
                    && now >= t.fail_ms
                    && self.hosts[i].life != Life::Failed
                {
                    self.fail_host(i, f);
                }
            }
            if self.hosts[i].life == Life::InService {
                let rec = self.record(i, now);
                out.push(rec);
            }
        }
        self.tick += 1;
    }

    fn fail_host(&mut self, i: usize, f: usize) {
        let vms = std::mem::take(&mut self.hosts[i].vms);
        let n = vms.len() as u32;
        self.truth[f].occurred = true;
        self.truth[f].vms_interrupted = n;
        self.interruptions += u64::from(n);
        if self.hosts[i].life == Life::InService {
            self.hosts[i].life = Life::Failed;
        }
        // Service Healing: the interrupted VMs restart on healthy hosts
        let src_fd = self.hosts[i].fd;
        for vm in vms {
            if let Some(t) = self.pick_target(i, src_fd, &|_| true) {
                self.hosts[t].vms.push(vm);
            }
        }
    }

    fn pick_target(&self, src: usize, src_fd: u32, accept: &dyn Fn(&str) -> bool) -> Option<usize> {
        let cap = self.p.vm_capacity as usize;
        let mut best: Option<(bool, usize, usize)> = None;
        for (j, h) in self.hosts.iter().enumerate() {
            if j == src || h.life != Life::InService || h.vms.len() >= cap || !accept(&h.id) {
                continue;
            }
            // prefer another fault domain, then the least loaded, then the lowest index
            let key = (h.fd == src_fd, h.vms.len(), j);
            if best.is_none_or(|b| key < b) {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }

    /// Live-migrates every VM off `host_id` to in-service hosts with room that `accept`
    /// allows (another fault domain preferred), then takes the host out of rotation.
    /// VMs are not interrupted. If some VMs find no target the host stays in service
    /// with them and the error says how many.
    pub fn evacuate(
        &mut self,
        host_id: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<EvacuationReport, SimError> {
        let i = self.in_service(host_id)?;
        let src_fd = self.hosts[i].fd;
        let mut report = EvacuationReport::default();
        while let Some(vm) = self.hosts[i].vms.last().cloned() {
            let Some(t) = self.pick_target(i, src_fd, accept) else {
                return Err(SimError::NoCapacity {
                    host: host_id.to_owned(),
                    stranded: self.hosts[i].vms.len(),
                });
            };
            self.hosts[i].vms.pop();
            report.moves.push(VmMove {
                vm_id: vm.id.clone(),
                mem_mib: vm.mem_mib,
                to: self.hosts[t].id.clone(),
            });
            self.hosts[t].vms.push(vm);
        }
        self.hosts[i].life = Life::OutOfRotation;
        Ok(report)
    }

    fn heal_if(&mut self, i: usize, modes: &[FailureMode], by: &str) -> bool {
        let Some(f) = self.hosts[i].fault else {
            return false;
        };
        if self.hosts[i].healed || self.truth[f].occurred || !modes.contains(&self.truth[f].mode) {
            return false;
        }
        self.hosts[i].healed = true;
        self.truth[f].healed_by = Some(by.to_owned());
        true
    }

    /// Runs a Tardigrade phase (1, 2 or 3) on a host. Phase 1 clears host-agent faults;
    /// phase 3 (memory-preserving reset, VMs frozen briefly) clears host-agent, kernel
    /// and memory faults (bad pages retired); phase 2 only collects diagnostics.
    pub fn tardigrade(&mut self, host_id: &str, phase: u8) -> Result<HealReport, SimError> {
        let i = self.in_service(host_id)?;
        let (healed, frozen) = match phase {
            1 => (
                self.heal_if(i, &[FailureMode::HostAgent], "tardigrade_phase1"),
                0,
            ),
            3 => (
                self.heal_if(
                    i,
                    &[
                        FailureMode::HostAgent,
                        FailureMode::Kernel,
                        FailureMode::Memory,
                    ],
                    "tardigrade_phase3",
                ),
                self.hosts[i].vms.len() as u32,
            ),
            _ => (false, 0),
        };
        Ok(HealReport {
            healed,
            vms_frozen: frozen,
            vms_interrupted: 0,
        })
    }

    /// Reboots a host: its VMs are interrupted (they restart in place); host-agent and
    /// kernel faults clear.
    pub fn reboot(&mut self, host_id: &str) -> Result<HealReport, SimError> {
        let i = self.in_service(host_id)?;
        let n = self.hosts[i].vms.len() as u32;
        self.interruptions += u64::from(n);
        self.reboot_interruptions += u64::from(n);
        let healed = self.heal_if(i, &[FailureMode::HostAgent, FailureMode::Kernel], "reboot");
        Ok(HealReport {
            healed,
            vms_frozen: 0,
            vms_interrupted: n,
        })
    }

    /// Takes a host out of rotation for repair: VMs are live-migrated first (as
    /// [`Fleet::evacuate`]).
    pub fn take_out(
        &mut self,
        host_id: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<EvacuationReport, SimError> {
        self.evacuate(host_id, accept)
    }

    /// Lets every failure still planned within the horizon happen (for hosts out of
    /// rotation: with no VMs on them) — call at the end to settle the ground truth.
    pub fn settle(&mut self) {
        let end = self.p.start_ms + self.ticks as i64 * self.p.interval_s * 1000;
        for i in 0..self.hosts.len() {
            if let Some(f) = self.hosts[i].fault {
                let t = &self.truth[f];
                if !self.hosts[i].healed
                    && !t.occurred
                    && t.fail_ms < end
                    && self.hosts[i].life != Life::Failed
                {
                    self.fail_host(i, f);
                }
            }
        }
    }

    fn record(&mut self, i: usize, now: i64) -> HostRecord {
        let interval_h = self.p.interval_s as f64 / 3600.0;
        let tick = self.tick;
        let unit = self.unit;
        let (mode, x, faint) = match self.hosts[i].fault {
            Some(f) if !self.hosts[i].healed => {
                let t = &self.truth[f];
                let x = if now < t.onset_ms || t.fail_ms <= t.onset_ms {
                    -1.0
                } else {
                    ((now - t.onset_ms) as f64 / (t.fail_ms - t.onset_ms) as f64).min(1.0)
                };
                (Some(t.mode), x, t.faint)
            }
            _ => (None, -1.0, false),
        };
        let h = &mut self.hosts[i];
        let r = &mut h.rng;
        let mut n = || unit.sample(r);
        let hour = (now as f64 / MS_PER_HOUR) % 24.0;
        let diurnal = (std::f64::consts::TAU * hour / 24.0 + h.phase).sin();
        let mut cpu = (h.cpu_base + h.cpu_amp * diurnal + 0.03 * n()).clamp(0.01, 0.99);
        let mem = (h.mem_base + 0.01 * n()).clamp(0.0, 1.0);
        let mut lat = h.lat_base * (1.0 + 0.5 * cpu) * (0.08 * n()).exp();
        let read = h.iops_base * (0.4 + cpu) * (0.1 * n()).exp();
        let write = 0.5 * read * (0.1 * n()).exp();
        let mut temp = h.temp_base + 10.0 * cpu + 0.7 * n();
        let r = &mut h.rng;
        let mut heartbeat = r.gen_range(0.0..15.0);
        let mut kernel = u32::from(r.gen_bool(0.001));
        let mut crashes = u32::from(r.gen_bool(0.001));
        if r.gen_bool(0.002) {
            heartbeat = r.gen_range(70.0..150.0);
        }
        // harmless background: a sector reallocated about every 20 days per host
        if r.gen_bool((interval_h / (20.0 * 24.0)).min(1.0)) {
            h.s5 += 1;
        }
        match h.noise {
            Noise::None | Noise::StableSectors => {}
            Noise::ChronicEcc => {
                h.ecc_c += poisson(r, 0.4);
                if r.gen_bool(0.003) {
                    h.ecc_c += r.gen_range(20..100);
                }
            }
            Noise::PendingFlap => {
                if r.gen_bool(0.01) {
                    h.s197 += r.gen_range(1..4);
                } else if h.s197 > 0 && r.gen_bool(0.05) {
                    h.s197 -= 1;
                }
            }
            Noise::SectorBurst { at_tick } => {
                if tick == at_tick {
                    h.s5 += r.gen_range(5..16);
                }
            }
        }
        if x >= 0.0 {
            let k = if faint { 0.1 } else { 1.0 };
            match mode {
                Some(FailureMode::Disk) => {
                    h.s5 += poisson(r, k * (0.05 + 2.5 * x * x));
                    h.s197 += poisson(r, k * 1.5 * x * x);
                    h.s187 += poisson(r, k * 0.3 * x * x * x);
                    h.s188 += poisson(r, k * 0.05 * x);
                    h.s198 += poisson(r, k * 0.2 * x * x * x);
                    if !faint {
                        lat *= 1.0 + 3.0 * x * x * x;
                    }
                }
                Some(FailureMode::Memory) => {
                    h.ecc_c += poisson(r, k * (0.5 + 40.0 * x * x));
                    if x > 0.97 && !faint {
                        h.ecc_u += poisson(r, 0.3);
                    }
                }
                Some(FailureMode::HostAgent) => {
                    if r.gen_bool((0.03 + 0.5 * x).min(1.0)) {
                        heartbeat = r.gen_range(65.0..300.0);
                    }
                    crashes += poisson(r, 0.02 + 0.8 * x) as u32;
                    if x > 0.9 {
                        heartbeat = 600.0 + 3600.0 * (x - 0.9);
                    }
                }
                Some(FailureMode::Kernel) => {
                    kernel += poisson(r, 0.02 + 1.2 * x * x) as u32;
                }
                Some(FailureMode::Thermal) | Some(FailureMode::RackIncident) => {
                    temp += 40.0 * x;
                    cpu *= 1.0 - 0.5 * x;
                    lat *= 1.0 + x;
                }
                Some(FailureMode::Sudden) | None => {}
            }
        }
        h.s9 += interval_h;
        HostRecord {
            v: WIRE_VERSION,
            host_id: h.id.clone(),
            ts_ms: now,
            region: "eu-west".into(),
            cluster: h.cluster.clone(),
            rack: h.rack.clone(),
            fault_domain: h.fd,
            update_domain: h.ud,
            cpu_util: cpu,
            mem_util: mem,
            disk_read_iops: read,
            disk_write_iops: write,
            disk_latency_ms: lat,
            smart_5_raw: h.s5,
            smart_9_raw: h.s9 as u64,
            smart_187_raw: h.s187,
            smart_188_raw: h.s188,
            smart_194_raw: temp.round().max(0.0) as u64,
            smart_197_raw: h.s197,
            smart_198_raw: h.s198,
            ecc_corrected: h.ecc_c,
            ecc_uncorrected: h.ecc_u,
            heartbeat_age_s: heartbeat,
            kernel_events: kernel,
            service_crashes: crashes,
            vms: h.vms.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimConfig;
    use waterbear_telemetry::Validator;

    fn small() -> SimParams {
        SimConfig {
            hosts: 60,
            days: 3.0,
            failure_fraction: 0.3,
            ..SimConfig::default()
        }
        .check()
        .unwrap()
    }

    fn run(p: SimParams) -> (Vec<HostRecord>, Fleet) {
        let mut fleet = Fleet::new(p);
        let mut all = Vec::new();
        let mut buf = Vec::new();
        while !fleet.done() {
            fleet.step(&mut buf);
            all.append(&mut buf);
        }
        (all, fleet)
    }

    #[test]
    fn same_seed_same_telemetry_other_seed_differs() {
        let (a, _) = run(small());
        let (b, _) = run(small());
        assert_eq!(a, b);
        let (c, _) = run(SimConfig {
            seed: 7,
            ..(*small()).clone()
        }
        .check()
        .unwrap());
        assert_ne!(a, c);
    }

    #[test]
    fn every_record_is_valid_and_counters_never_go_backwards() {
        let (recs, _) = run(small());
        let mut v = Validator::default();
        for r in &recs {
            // pending sectors (197) may fall: they are a gauge; the validator only guards cumulative ones
            v.check(r, r.ts_ms)
                .unwrap_or_else(|e| panic!("{e} in {r:?}"));
        }
    }

    #[test]
    fn failures_happen_and_interrupt_their_vms_without_mitigation() {
        let (_, mut fleet) = run(small());
        fleet.settle();
        let occurred: Vec<&FailureTruth> = fleet.truth().iter().filter(|t| t.occurred).collect();
        assert!(occurred.len() >= 5, "{} failures", occurred.len());
        let lost: u64 = occurred.iter().map(|t| u64::from(t.vms_interrupted)).sum();
        assert_eq!(lost, fleet.interruptions());
        assert!(
            occurred
                .iter()
                .all(|t| t.vms_interrupted > 0 || t.fail_ms >= 0)
        );
    }

    #[test]
    fn disk_precursors_show_before_the_failure() {
        let p = SimConfig {
            hosts: 40,
            days: 6.0,
            failure_fraction: 1.0,
            failure_mix: crate::FailureMix {
                disk: 1.0,
                memory: 0.0,
                host_agent: 0.0,
                kernel: 0.0,
                thermal: 0.0,
                sudden: 0.0,
            },
            rack_incidents: 0,
            ..SimConfig::default()
        }
        .check()
        .unwrap();
        let (recs, fleet) = run(p);
        let mut grew = 0;
        let mut total = 0;
        for t in fleet
            .truth()
            .iter()
            .filter(|t| !t.faint && t.fail_ms < fleet.now_ms())
        {
            total += 1;
            let before: Vec<&HostRecord> = recs
                .iter()
                .filter(|r| r.host_id == t.host_id && r.ts_ms < t.fail_ms)
                .collect();
            let at_onset = before
                .iter()
                .rfind(|r| r.ts_ms <= t.onset_ms)
                .map_or(0, |r| r.smart_5_raw);
            let last = before.last().map_or(0, |r| r.smart_5_raw);
            if last >= at_onset + 10 {
                grew += 1;
            }
        }
        assert!(total > 10);
        assert!(
            grew * 10 >= total * 9,
            "{grew}/{total} strong disk failures showed SMART 5 growth"
        );
    }

    #[test]
    fn evacuation_moves_vms_to_other_fault_domains_and_averts_interruptions() {
        let mut fleet = Fleet::new(small());
        let mut buf = Vec::new();
        fleet.step(&mut buf);
        let victim = fleet
            .truth()
            .iter()
            .find(|t| t.mode != FailureMode::Sudden)
            .unwrap()
            .host_id
            .clone();
        let vms_before = fleet.vm_count();
        let n = fleet.host(&victim).unwrap().vms;
        let fd = fleet.host(&victim).unwrap().fault_domain;
        let rep = fleet.evacuate(&victim, &|_| true).unwrap();
        assert_eq!(rep.moves.len(), n);
        for m in &rep.moves {
            assert_ne!(fleet.host(&m.to).unwrap().fault_domain, fd);
        }
        assert_eq!(fleet.vm_count(), vms_before);
        assert!(!fleet.host(&victim).unwrap().in_service);
        assert_eq!(
            fleet.evacuate(&victim, &|_| true).unwrap_err(),
            SimError::NotInService(victim.clone())
        );
        while !fleet.done() {
            fleet.step(&mut buf);
            assert!(buf.iter().all(|r| r.host_id != victim));
        }
        fleet.settle();
        let t = fleet.truth().iter().find(|t| t.host_id == victim).unwrap();
        assert_eq!(t.vms_interrupted, 0);
    }

    #[test]
    fn tardigrade_heals_only_what_it_can() {
        let p = SimConfig {
            hosts: 30,
            failure_fraction: 1.0,
            failure_mix: crate::FailureMix {
                disk: 1.0,
                memory: 1.0,
                host_agent: 1.0,
                kernel: 0.0,
                thermal: 0.0,
                sudden: 0.0,
            },
            ..SimConfig::default()
        }
        .check()
        .unwrap();
        let mut fleet = Fleet::new(p);
        let truth = fleet.truth().to_vec();
        for t in truth.iter().filter(|t| t.mode != FailureMode::RackIncident) {
            let rep1 = fleet.tardigrade(&t.host_id, 1).unwrap();
            assert_eq!(
                rep1.healed,
                t.mode == FailureMode::HostAgent,
                "{:?}",
                t.mode
            );
            let rep3 = fleet.tardigrade(&t.host_id, 3).unwrap();
            assert_eq!(rep3.healed, t.mode == FailureMode::Memory, "{:?}", t.mode);
        }
        assert_eq!(fleet.interruptions(), 0);
        assert_eq!(
            fleet.tardigrade("nope", 1).unwrap_err(),
            SimError::UnknownHost("nope".into())
        );
    }
}
