//! [`KvmBackend`]: the executor's operations on real VMs through host agents
//! ([`waterbear_vmm::AgentClient`]).
//!
//! A fleet host id maps to an agent address ([`KvmHost`]); with a `vm_prefix`
//! the host owns only the agent's VMs whose names start with it (several
//! simulated hosts can share one agent). Hosts without a prefix are whole
//! agents and are the only migration targets.
//!
//! Every operation is a sequence of journaled steps; run again on an
//! operation that stopped half-way (a crash, a failed attempt), it continues
//! from the last recorded step and reconciles with what the agents report:
//!
//! * live migration, per VM: `target_chosen` (fewest VMs among accepted
//!   reachable agents) -> `target_prepared` (target answers, no VM of that
//!   name) -> `migration_started` (recorded *before* the request) ->
//!   `committed` (the source's report, or, after a crash, the target lists the
//!   VM and the source does not) -> `source_cleared` (checked on both). A
//!   repeated `migrate_out` is safe: the source agent serialises migrations,
//!   so it waits for one still in flight and then answers "no VM named ...".
//! * Tardigrade: `phase_started {generation}` -> `phase_completed`. Phases 1
//!   and 3 raise the agent's generation, so a resumed operation can tell a
//!   phase that already happened from one that never started.
//! * reboot: per VM `vm_stopped` (recorded before the stop) -> `vm_started`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use waterbear_policy::{Action, Phase};
use waterbear_vmm::agent::{KIND_REQUEST, PROTOCOL, VmInfo};
use waterbear_vmm::{AgentClient, AgentError, MigrateOptions, Request, Response, RunState};

use crate::journal::{MigrationFigures, Step, VmPhase};
use crate::oplog::OpLog;
use crate::{Backend, BackendError, Measured, OpReport};

/// One fleet host backed by a host agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvmHost {
    /// Agent address, e.g. `127.0.0.1:7070`.
    pub agent: String,
    /// Only VMs whose names start with this belong to the host (`None`: all VMs
    /// of the agent; such hosts are migration targets).
    pub vm_prefix: Option<String>,
}

/// Settings of the KVM backend.
#[derive(Debug, Clone)]
pub struct KvmOptions {
    /// Live-migration settings passed to the source agent.
    pub migrate: MigrateOptions,
    /// Read timeout of one agent request (a migration or phase 3 included).
    pub call_timeout: Duration,
    /// Deadline of reconciliation waits (e.g. the target listing a committed VM).
    pub settle_timeout: Duration,
    /// Where agents write phase-2 diagnostics (one subdirectory per operation).
    pub diag_dir: PathBuf,
    /// Ask phase 3 to checksum guest memory across the restart.
    pub phase3_verify: bool,
}

impl Default for KvmOptions {
    fn default() -> Self {
        Self {
            migrate: MigrateOptions::default(),
            call_timeout: Duration::from_secs(120),
            settle_timeout: Duration::from_secs(20),
            diag_dir: std::env::temp_dir().join("waterbear-diagnostics"),
            phase3_verify: false,
        }
    }
}

/// Drives host agents.
#[derive(Debug, Clone)]
pub struct KvmBackend {
    hosts: BTreeMap<String, KvmHost>,
    /// Settings.
    pub opts: KvmOptions,
    out_of_rotation: BTreeSet<String>,
}

fn agent_err<'a>(
    addr: &'a str,
    step: &'static str,
) -> impl FnOnce(AgentError) -> BackendError + 'a {
    move |e| BackendError::Agent {
        addr: addr.to_owned(),
        step,
        detail: e.to_string(),
    }
}

fn unexpected(addr: &str, step: &'static str, r: &Response) -> BackendError {
    BackendError::Agent {
        addr: addr.to_owned(),
        step,
        detail: format!("unexpected response {r:?}"),
    }
}

/// Wraps a command in the executor's fencing epoch (journaled operations;
/// one-shot calls, epoch 0, go unwrapped).
fn fenced(op: &OpLog<'_>, req: Request) -> Request {
    match op.epoch() {
        0 => req,
        epoch => Request::Fenced {
            epoch,
            request: Box::new(req),
        },
    }
}

/// Maps an agent error, recognising an agent's epoch refusal.
fn agent_or_fenced<'a>(
    op: &OpLog<'_>,
    addr: &'a str,
    step: &'static str,
) -> impl FnOnce(AgentError) -> BackendError + 'a {
    let epoch = op.epoch();
    move |e| match e {
        AgentError::Remote(m) if m.starts_with("stale epoch") => BackendError::Fenced {
            addr: addr.to_owned(),
            epoch,
            detail: m,
        },
        e => agent_err(addr, step)(e),
    }
}

/// Polls `f` every 10 ms until it yields a value or `deadline` passes.
fn wait_for<T>(
    what: &str,
    deadline: Duration,
    mut f: impl FnMut() -> Result<Option<T>, BackendError>,
) -> Result<T, BackendError> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = f()? {
            return Ok(v);
        }
        if Instant::now() >= end {
            return Err(BackendError::Timeout(what.to_owned()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn dirty_rate(v: &VmInfo) -> u64 {
    if v.tick_us == 0 {
        return 0;
    }
    u64::from(v.pages_per_tick) * 4096 * 1_000_000 / u64::from(v.tick_us)
}

impl KvmBackend {
    /// A backend over `hosts` (fleet host id -> agent).
    pub fn new(hosts: BTreeMap<String, KvmHost>, opts: KvmOptions) -> Self {
        Self {
            hosts,
            opts,
            out_of_rotation: BTreeSet::new(),
        }
    }

    /// Whether `host` is backed by an agent.
    pub fn has_host(&self, host: &str) -> bool {
        self.hosts.contains_key(host)
    }

    /// Maps (or re-maps) a host.
    pub fn insert_host(&mut self, id: impl Into<String>, host: KvmHost) {
        self.hosts.insert(id.into(), host);
    }

    /// The host map.
    pub fn hosts(&self) -> &BTreeMap<String, KvmHost> {
        &self.hosts
    }

    /// Hosts taken out of rotation by this backend.
    pub fn out_of_rotation(&self) -> &BTreeSet<String> {
        &self.out_of_rotation
    }

    fn host(&self, id: &str) -> Result<&KvmHost, BackendError> {
        self.hosts
            .get(id)
            .ok_or_else(|| BackendError::UnknownHost(id.to_owned()))
    }

    fn client(&self, addr: &str) -> Result<AgentClient, BackendError> {
        let c = AgentClient::connect(addr).map_err(agent_err(addr, "connecting"))?;
        c.set_timeout(Some(self.opts.call_timeout))
            .map_err(agent_err(addr, "setting the timeout"))?;
        Ok(c)
    }

    fn list(&self, addr: &str) -> Result<Vec<VmInfo>, BackendError> {
        self.client(addr)?
            .list()
            .map_err(agent_err(addr, "listing VMs"))
    }

    /// The VMs of `host` (by prefix), as its agent lists them.
    pub fn host_vms(&self, host: &str) -> Result<Vec<VmInfo>, BackendError> {
        let h = self.host(host)?;
        Ok(self
            .list(&h.agent)?
            .into_iter()
            .filter(|v| h.vm_prefix.as_ref().is_none_or(|p| v.name.starts_with(p)))
            .collect())
    }

    fn generation(&self, addr: &str) -> Result<u64, BackendError> {
        match self
            .client(addr)?
            .call(&Request::Ping)
            .map_err(agent_err(addr, "pinging"))?
        {
            Response::Pong { generation, .. } => Ok(generation),
            other => Err(unexpected(addr, "pinging", &other)),
        }
    }

    /// Accepted, reachable whole-agent hosts other than the source's agent,
    /// fewest VMs first (ties by host id): deterministic.
    fn choose_target(
        &self,
        host: &str,
        src: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<(String, String), BackendError> {
        let mut best: Option<(usize, String, String)> = None;
        let mut seen = BTreeSet::new();
        for (id, h) in &self.hosts {
            if h.vm_prefix.is_some()
                || h.agent == src
                || self.out_of_rotation.contains(id)
                || !accept(id)
                || !seen.insert(h.agent.clone())
            {
                continue;
            }
            let Ok(vms) = self.list(&h.agent) else {
                continue;
            };
            let cand = (vms.len(), id.clone(), h.agent.clone());
            if best
                .as_ref()
                .is_none_or(|b| (cand.0, &cand.1) < (b.0, &b.1))
            {
                best = Some(cand);
            }
        }
        best.map(|(_, id, addr)| (id, addr))
            .ok_or_else(|| BackendError::NoTarget(host.to_owned()))
    }

    fn lists(&self, addr: &str, vm: &str) -> Result<Option<VmInfo>, BackendError> {
        Ok(self.list(addr)?.into_iter().find(|v| v.name == vm))
    }

    /// Drives one VM's migration to `source_cleared`, from wherever it stands.
    fn migrate_vm(
        &self,
        op: &mut OpLog<'_>,
        host: &str,
        src: &str,
        vm: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<(), BackendError> {
        loop {
            match op.vm_phase(vm) {
                VmPhase::Cleared | VmPhase::Resumed => return Ok(()),
                VmPhase::None => {
                    let (target_host, target_addr) = self.choose_target(host, src, accept)?;
                    op.step(Step::TargetChosen {
                        vm: vm.to_owned(),
                        target_host,
                        target_addr,
                    })?;
                }
                VmPhase::TargetChosen { addr, .. } => {
                    self.generation(&addr)?;
                    if self.lists(&addr, vm)?.is_some() {
                        return Err(BackendError::Agent {
                            addr,
                            step: "preparing the target",
                            detail: format!("it already has a VM named {vm}"),
                        });
                    }
                    // The target allocates and maps the guest's memory now, so
                    // the migration does not pay for it (idempotent on retry).
                    if let Some(info) = self.lists(src, vm)? {
                        let req = fenced(
                            op,
                            Request::PrepareIncoming {
                                name: vm.to_owned(),
                                mem_bytes: info.mem_bytes,
                            },
                        );
                        match self.client(&addr)?.call(&req) {
                            Ok(Response::Prepared { .. }) => {}
                            Ok(other) => {
                                return Err(unexpected(&addr, "preparing the target", &other));
                            }
                            Err(e) => {
                                return Err(BackendError::Agent {
                                    addr,
                                    step: "preparing the target",
                                    detail: e.to_string(),
                                });
                            }
                        }
                    }
                    op.step(Step::TargetPrepared { vm: vm.to_owned() })?;
                }
                VmPhase::Prepared { .. } => {
                    op.step(Step::MigrationStarted { vm: vm.to_owned() })?;
                }
                VmPhase::Started { addr, .. } => {
                    let req = fenced(
                        op,
                        Request::MigrateOut {
                            name: vm.to_owned(),
                            to: addr.clone(),
                            options: self.opts.migrate.clone(),
                        },
                    );
                    if op.armed("migration_in_flight") {
                        // Crash test: the request reaches the source agent,
                        // then the executor dies without reading the answer.
                        let mut s = TcpStream::connect(src).map_err(|e| BackendError::Agent {
                            addr: src.to_owned(),
                            step: "connecting",
                            detail: e.to_string(),
                        })?;
                        let _ = PROTOCOL.write_json(&mut s, KIND_REQUEST, &req);
                        op.point("migration_in_flight");
                    }
                    let measured = match self.client(src)?.call(&req) {
                        Ok(Response::Migrated { report }) => Some(MigrationFigures {
                            total_us: report.total.as_micros() as u64,
                            downtime_us: report.downtime.as_micros() as u64,
                            bytes_sent: report.bytes_sent,
                            mem_bytes: report.mem_bytes,
                            checksum: report.checksum,
                        }),
                        Ok(other) => return Err(unexpected(src, "migrating", &other)),
                        Err(AgentError::Remote(msg)) if msg.contains("no VM named") => {
                            // It left the source: an earlier request (before a
                            // crash) committed it, or the commit was uncertain.
                            if self.lists(&addr, vm)?.is_none() {
                                return Err(BackendError::VmLost {
                                    vm: vm.to_owned(),
                                    from: src.to_owned(),
                                    target: addr,
                                });
                            }
                            None
                        }
                        Err(e) => return Err(agent_or_fenced(op, src, "migrating")(e)),
                    };
                    op.step(Step::Committed {
                        vm: vm.to_owned(),
                        measured,
                    })?;
                }
                VmPhase::Committed { addr } => {
                    self.confirm_moved(src, &addr, vm)?;
                    op.step(Step::SourceCleared { vm: vm.to_owned() })?;
                }
            }
        }
    }

    /// Waits until the target lists `vm` running and the source does not.
    fn confirm_moved(&self, src: &str, target: &str, vm: &str) -> Result<(), BackendError> {
        wait_for(
            &format!("confirming VM {vm} runs on {target} only"),
            self.opts.settle_timeout,
            || {
                let on_target = self
                    .lists(target, vm)?
                    .is_some_and(|v| v.state == RunState::Running);
                let on_source = self.lists(src, vm)?.is_some();
                Ok((on_target && !on_source).then_some(()))
            },
        )
    }

    fn migrate_host(
        &mut self,
        op: &mut OpLog<'_>,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        let t0 = Instant::now();
        let src = self.host(host)?.agent.clone();
        let mut vms = op.vms();
        for v in self.host_vms(host)? {
            if v.state != RunState::Stopped && !vms.contains(&v.name) {
                vms.push(v.name);
            }
        }
        for vm in &vms {
            self.migrate_vm(op, host, &src, vm, accept)?;
        }
        Ok(migration_report(op, t0))
    }

    fn tardigrade_op(
        &mut self,
        op: &mut OpLog<'_>,
        host: &str,
        phase: Phase,
    ) -> Result<OpReport, BackendError> {
        let t0 = Instant::now();
        let addr = self.host(host)?.agent.clone();
        let started = op.steps().iter().find_map(|s| match s {
            Step::PhaseStarted {
                phase: p,
                generation,
            } if *p == phase => Some(*generation),
            _ => None,
        });
        let vms = self.host_vms(host)?.len() as u32;
        let completed = op.steps().iter().find_map(|s| match s {
            Step::PhaseCompleted {
                phase: p,
                freeze_us,
                took_us,
            } if *p == phase => Some((*freeze_us, *took_us)),
            _ => None,
        });
        if let Some((freeze_us, took_us)) = completed {
            // Resumed after the phase was recorded: report what was recorded.
            return Ok(phase_report(phase, vms, t0, freeze_us, took_us));
        }
        let already = match started {
            None => {
                let generation = self.generation(&addr)?;
                op.step(Step::PhaseStarted { phase, generation })?;
                false
            }
            // Resumed: phases 1 and 3 raise the generation when they happen.
            Some(g) => phase != Phase::Diagnostics && self.generation(&addr)? > g,
        };
        let (mut freeze_us, mut took_us) = (None, None);
        if !already {
            let req = fenced(
                op,
                match phase {
                    Phase::RecycleServices => Request::RestartServices,
                    Phase::Diagnostics => Request::Diagnostics {
                        dir: self.opts.diag_dir.join(op.op_id()),
                    },
                    Phase::MemoryPreservingReset => Request::MemoryPreservingRestart {
                        verify: self.opts.phase3_verify,
                    },
                },
            );
            if op.armed("phase_in_flight") {
                // Crash test: the agent gets the request, the executor dies.
                if let Ok(mut s) = TcpStream::connect(&addr) {
                    let _ = PROTOCOL.write_json(&mut s, KIND_REQUEST, &req);
                }
                op.point("phase_in_flight");
            }
            let mut c = self.client(&addr)?;
            match c
                .call(&req)
                .map_err(agent_or_fenced(op, &addr, "running a phase"))?
            {
                Response::ServicesRestarted { took, .. } => {
                    took_us = Some(took.as_micros() as u64);
                }
                Response::Diagnostics { .. } => {
                    took_us = Some(t0.elapsed().as_micros() as u64);
                }
                Response::Phase3 { report } => {
                    freeze_us = Some(report.freeze.as_micros() as u64);
                }
                other => return Err(unexpected(&addr, "running a phase", &other)),
            }
        }
        op.step(Step::PhaseCompleted {
            phase,
            freeze_us,
            took_us,
        })?;
        Ok(phase_report(phase, vms, t0, freeze_us, took_us))
    }

    fn reboot_op(&mut self, op: &mut OpLog<'_>, host: &str) -> Result<OpReport, BackendError> {
        let t0 = Instant::now();
        let addr = self.host(host)?.agent.clone();
        // VMs stopped by an earlier attempt but not started again come first.
        let mut todo: Vec<(String, u64, u64)> = Vec::new();
        for s in op.steps() {
            if let Step::VmStopped {
                vm,
                mem_mib,
                dirty_bytes_per_sec,
            } = s
            {
                if !op
                    .steps()
                    .iter()
                    .any(|t| matches!(t, Step::VmStarted { vm: v } if v == vm))
                {
                    todo.push((vm.clone(), *mem_mib, *dirty_bytes_per_sec));
                }
            }
        }
        let resumed = todo.len();
        for v in self.host_vms(host)? {
            let done = op
                .steps()
                .iter()
                .any(|t| matches!(t, Step::VmStarted { vm } if *vm == v.name));
            if !done && !todo.iter().any(|(n, ..)| *n == v.name) {
                todo.push((v.name.clone(), v.mem_bytes >> 20, dirty_rate(&v)));
            }
        }
        for (i, (vm, mem_mib, dirty)) in todo.iter().enumerate() {
            if i >= resumed {
                op.step(Step::VmStopped {
                    vm: vm.clone(),
                    mem_mib: *mem_mib,
                    dirty_bytes_per_sec: *dirty,
                })?;
            }
            let mut c = self.client(&addr)?;
            match c.call(&fenced(op, Request::StopVm { name: vm.clone() })) {
                Ok(_) => {}
                Err(AgentError::Remote(m)) if m.contains("no VM named") => {}
                Err(e) => return Err(agent_or_fenced(op, &addr, "stopping a VM")(e)),
            }
            let start = Request::StartVm {
                name: vm.clone(),
                mem_mib: *mem_mib,
                dirty_bytes_per_sec: *dirty,
            };
            if let Err(e) = c.call(&fenced(op, start)) {
                return Err(agent_or_fenced(op, &addr, "starting a VM")(e));
            }
            op.step(Step::VmStarted { vm: vm.clone() })?;
        }
        let interrupted = op
            .steps()
            .iter()
            .filter(|s| matches!(s, Step::VmStarted { .. }))
            .count() as u32;
        Ok(OpReport {
            vms_interrupted: interrupted,
            duration_ms: t0.elapsed().as_millis() as i64,
            measured: Some(Measured {
                wall_ms: t0.elapsed().as_secs_f64() * 1e3,
                ..Measured::default()
            }),
            ..OpReport::default()
        })
    }
}

fn phase_report(
    phase: Phase,
    vms: u32,
    t0: Instant,
    freeze_us: Option<u64>,
    took_us: Option<u64>,
) -> OpReport {
    let frozen = matches!(phase, Phase::MemoryPreservingReset);
    OpReport {
        vms_frozen: if frozen { vms } else { 0 },
        healed: None,
        duration_ms: t0.elapsed().as_millis() as i64,
        measured: Some(Measured {
            wall_ms: t0.elapsed().as_secs_f64() * 1e3,
            freeze_ms: freeze_us.map(|u| u as f64 / 1e3),
            phase_ms: took_us.map(|u| u as f64 / 1e3),
            ..Measured::default()
        }),
        ..OpReport::default()
    }
}

/// Sums the migration figures recorded in `op`.
fn migration_report(op: &OpLog<'_>, t0: Instant) -> OpReport {
    let mut m = Measured {
        wall_ms: t0.elapsed().as_secs_f64() * 1e3,
        ..Measured::default()
    };
    let mut moved = 0u32;
    let mut mem = 0u64;
    for s in op.steps() {
        if let Step::Committed { measured, .. } = s {
            moved += 1;
            match measured {
                Some(f) => {
                    m.migrations += 1;
                    let d = f.downtime_us as f64 / 1e3;
                    m.downtime_max_ms = m.downtime_max_ms.max(d);
                    m.downtime_total_ms += d;
                    m.bytes_sent += f.bytes_sent;
                    mem += f.mem_bytes;
                }
                None => m.unmeasured += 1,
            }
        }
    }
    OpReport {
        vms_moved: moved,
        mem_moved_mib: mem >> 20,
        duration_ms: m.wall_ms as i64,
        measured: Some(m),
        ..OpReport::default()
    }
}

impl Backend for KvmBackend {
    fn run(
        &mut self,
        op: &mut OpLog<'_>,
        action: Action,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        match action {
            Action::LiveMigrate | Action::OutOfRotation => {
                let rep = self.migrate_host(op, host, accept)?;
                if !op.has("marked_out") {
                    op.step(Step::MarkedOut)?;
                }
                self.out_of_rotation.insert(host.to_owned());
                Ok(rep)
            }
            Action::Tardigrade { phase } => self.tardigrade_op(op, host, phase),
            Action::Reboot => self.reboot_op(op, host),
        }
    }

    fn set_out_of_rotation(&mut self, hosts: BTreeSet<String>) {
        self.out_of_rotation = hosts;
    }

    fn rollback(&mut self, op: &mut OpLog<'_>, host: &str) -> Result<(), BackendError> {
        let src = self.host(host)?.agent.clone();
        for vm in op.vms() {
            match op.vm_phase(&vm) {
                VmPhase::None | VmPhase::Cleared | VmPhase::Resumed => {}
                VmPhase::Committed { addr } => {
                    self.confirm_moved(&src, &addr, &vm)?;
                    op.step(Step::SourceCleared { vm })?;
                }
                VmPhase::TargetChosen { .. } | VmPhase::Prepared { .. } => {
                    // The request was never sent: the VM must run on the source.
                    match self.lists(&src, &vm)? {
                        Some(v) if v.state == RunState::Paused => {
                            self.client(&src)?
                                .call(&fenced(op, Request::Resume { name: vm.clone() }))
                                .map_err(agent_or_fenced(op, &src, "resuming a VM"))?;
                        }
                        Some(_) => {}
                        None => {
                            return Err(BackendError::Agent {
                                addr: src,
                                step: "rolling back",
                                detail: format!("VM {vm} is not on its source"),
                            });
                        }
                    }
                    op.step(Step::SourceResumed { vm })?;
                }
                VmPhase::Started { addr, .. } => {
                    // Maybe sent. A failed migration resumes the VM on the
                    // source by itself; wait for one copy to be running, and
                    // never resume a paused source copy (a migration may still
                    // hold it).
                    let on_target = wait_for(
                        &format!("resolving VM {vm} between {src} and {addr}"),
                        self.opts.settle_timeout,
                        || {
                            // A running source copy is decisive: the source
                            // fences before COMMIT, so the target never ran it
                            // (and the target may be unreachable).
                            match self.lists(&src, &vm)? {
                                Some(s) if s.state == RunState::Running => return Ok(Some(false)),
                                Some(_) => return Ok(None),
                                None => {}
                            }
                            Ok(self
                                .lists(&addr, &vm)?
                                .filter(|t| t.state == RunState::Running)
                                .map(|_| true))
                        },
                    )?;
                    if on_target {
                        op.step(Step::Committed {
                            vm: vm.clone(),
                            measured: None,
                        })?;
                        op.step(Step::SourceCleared { vm })?;
                    } else {
                        op.step(Step::SourceResumed { vm })?;
                    }
                }
            }
        }
        Ok(())
    }

    fn live_migrate(
        &mut self,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        let mut op = OpLog::ephemeral("one-shot");
        self.run(&mut op, Action::LiveMigrate, host, accept)
    }

    fn tardigrade(&mut self, host: &str, phase: Phase) -> Result<OpReport, BackendError> {
        let mut op = OpLog::ephemeral("one-shot");
        self.run(&mut op, Action::Tardigrade { phase }, host, &|_| true)
    }

    fn reboot(&mut self, host: &str) -> Result<OpReport, BackendError> {
        let mut op = OpLog::ephemeral("one-shot");
        self.run(&mut op, Action::Reboot, host, &|_| true)
    }

    fn take_out(
        &mut self,
        host: &str,
        accept: &dyn Fn(&str) -> bool,
    ) -> Result<OpReport, BackendError> {
        let mut op = OpLog::ephemeral("one-shot");
        self.run(&mut op, Action::OutOfRotation, host, accept)
    }
}
