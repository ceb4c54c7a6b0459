//! `waterbear demo --kvm`: the simulated demo with real VMs behind a few of its
//! hosts.
//!
//! Host agents run as child processes on 127.0.0.1 (ephemeral ports, data dirs
//! under the output directory). Up to `max_hosts` simulated hosts that get a
//! decision (the first ones, preferring a new kind of first action) are each
//! given `vms_per_host` small guests on one agent (round robin); from then on every decision on such a host is also signed and
//! carried out for real by a [`DurableExecutor`] over a [`KvmBackend`] (live
//! migration to another agent, Tardigrade phases, reboot), journaled in
//! `kvm_journal.redb`. The simulated executor keeps the fleet accounting; the
//! real figures go to `kvm_summary.json` / `kvm_summary.md` and
//! `kvm_outcomes.ndjson`. Phase 3 restarts a whole agent, so it also freezes
//! the guests of other hosts sharing that agent.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use thiserror::Error;
use waterbear_executor::{
    DurableExecutor, ExecutionReport, Journal, Key, Keyring, KvmBackend, KvmHost, KvmOptions, sign,
};
use waterbear_policy::{Action, Decision, Phase};
use waterbear_vmm::agent::VmInfo;
use waterbear_vmm::{AgentClient, Request, RunState};

use crate::demo::{DecisionHook, DemoError, DemoOptions, DemoSummary, run_demo_with};

/// Settings of the real half of the demo.
#[derive(Debug, Clone)]
pub struct KvmDemoOptions {
    /// Executable with a `host-agent` subcommand (the `waterbear` binary).
    pub agent_exe: PathBuf,
    /// Host agents to start.
    pub agents: usize,
    /// Simulated hosts given real VMs.
    pub max_hosts: usize,
    /// Guests per mapped host.
    pub vms_per_host: usize,
    /// Guest memory, MiB.
    pub vm_mib: u64,
    /// Guest dirty rate, bytes/s.
    pub dirty_bytes_per_sec: u64,
}

impl KvmDemoOptions {
    /// Defaults: 3 agents, 4 hosts of 2 guests of 32 MiB dirtying 4 MB/s.
    pub fn new(agent_exe: PathBuf) -> Self {
        Self {
            agent_exe,
            agents: 3,
            max_hosts: 4,
            vms_per_host: 2,
            vm_mib: 32,
            dirty_bytes_per_sec: 4 << 20,
        }
    }
}

/// Why the KVM demo could not run.
#[derive(Debug, Error)]
pub enum KvmDemoError {
    /// The simulated part failed.
    #[error(transparent)]
    Demo(#[from] DemoError),
    /// A host agent could not be started or driven.
    #[error("host agent: {0}")]
    Agent(String),
    /// The journal could not be opened.
    #[error(transparent)]
    Journal(#[from] waterbear_executor::JournalError),
    /// The executor refused to start.
    #[error(transparent)]
    Exec(#[from] waterbear_executor::ExecError),
    /// Writing an output failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// What the real VMs went through.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct KvmSummary {
    /// Agents started.
    pub agents: usize,
    /// Simulated hosts given real VMs.
    pub hosts: Vec<String>,
    /// Guests started.
    pub vms: usize,
    /// Real operations by action.
    pub operations: BTreeMap<String, u64>,
    /// Real operations that rolled back or were refused.
    pub failed: u64,
    /// VMs live-migrated.
    pub migrations: u32,
    /// Migration downtimes, ms (sorted).
    pub downtimes_ms: Vec<f64>,
    /// Bytes sent by migrations.
    pub migration_bytes: u64,
    /// Phase-3 freezes, ms.
    pub phase3_freezes_ms: Vec<f64>,
    /// Phase-1 service restarts, ms.
    pub phase1_ms: Vec<f64>,
    /// VMs restarted by reboots.
    pub reboot_interruptions: u32,
    /// Wall time spent in real operations, s.
    pub real_ops_s: f64,
    /// At the end: guests running exactly once across all agents.
    pub vms_running_once: usize,
    /// Journal audit problems (expected: none).
    pub journal_problems: Vec<String>,
    /// The journal.
    pub journal: String,
}

/// Median of sorted values.
fn median(xs: &[f64]) -> Option<f64> {
    let n = xs.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(xs[n / 2]),
        _ => Some((xs[n / 2 - 1] + xs[n / 2]) / 2.0),
    }
}

impl fmt::Display for KvmSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "## real VMs (KVM): {} agents, {} guests behind simulated hosts {}\n",
            self.agents,
            self.vms,
            self.hosts.join(", ")
        )?;
        writeln!(f, "| real operation | count |")?;
        writeln!(f, "|---|---:|")?;
        for (a, n) in &self.operations {
            writeln!(f, "| {a} | {n} |")?;
        }
        writeln!(f, "| failed / rolled back | {} |\n", self.failed)?;
        let ms = |v: Option<f64>| v.map_or("-".to_owned(), |x| format!("{x:.2}"));
        writeln!(
            f,
            "Live migrations: {} VMs, {:.1} MiB sent, downtime median {} ms, max {} ms.",
            self.migrations,
            self.migration_bytes as f64 / (1 << 20) as f64,
            ms(median(&self.downtimes_ms)),
            ms(self.downtimes_ms.last().copied())
        )?;
        writeln!(
            f,
            "Tardigrade phase 3: {} runs, freeze median {} ms, max {} ms; phase 1: {} runs, median {} ms.",
            self.phase3_freezes_ms.len(),
            ms(median(&self.phase3_freezes_ms)),
            ms(self.phase3_freezes_ms.last().copied()),
            self.phase1_ms.len(),
            ms(median(&self.phase1_ms))
        )?;
        writeln!(
            f,
            "Reboots restarted {} guests. Real operations took {:.2} s of wall time.",
            self.reboot_interruptions, self.real_ops_s
        )?;
        write!(
            f,
            "At the end {}/{} guests run exactly once; journal {} ({} problems).",
            self.vms_running_once,
            self.vms,
            self.journal,
            self.journal_problems.len()
        )
    }
}

struct AgentChild {
    child: Child,
    addr: String,
    _out: BufReader<ChildStdout>,
}

impl AgentChild {
    fn spawn(exe: &Path, dir: &Path) -> Result<Self, KvmDemoError> {
        std::fs::create_dir_all(dir).map_err(|source| KvmDemoError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut child = Command::new(exe)
            .args(["host-agent", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| KvmDemoError::Agent(format!("spawning {}: {e}", exe.display())))?;
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line)
            .map_err(|e| KvmDemoError::Agent(format!("reading the agent's address: {e}")))?;
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| KvmDemoError::Agent(format!("unexpected first line {line:?}")))?
            .to_owned();
        Ok(Self {
            child,
            addr,
            _out: out,
        })
    }

    fn client(&self) -> Result<AgentClient, KvmDemoError> {
        let c = AgentClient::connect(&self.addr).map_err(|e| KvmDemoError::Agent(e.to_string()))?;
        c.set_timeout(Some(Duration::from_secs(60)))
            .map_err(|e| KvmDemoError::Agent(e.to_string()))?;
        Ok(c)
    }

    fn list(&self) -> Vec<VmInfo> {
        self.client()
            .and_then(|mut c| c.list().map_err(|e| KvmDemoError::Agent(e.to_string())))
            .unwrap_or_default()
    }
}

impl Drop for AgentChild {
    fn drop(&mut self) {
        if let Ok(mut c) = self.client() {
            let _ = c.call(&Request::Shutdown);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Hook<'a> {
    opts: &'a KvmDemoOptions,
    agents: &'a [AgentChild],
    exec: DurableExecutor<KvmBackend>,
    key: Key,
    mapped: BTreeSet<String>,
    first_actions: BTreeSet<Action>,
    vm_names: Vec<String>,
    summary: KvmSummary,
    outcomes: std::io::BufWriter<std::fs::File>,
    error: Option<KvmDemoError>,
}

impl Hook<'_> {
    fn map_host(&mut self, host: &str) -> Result<(), KvmDemoError> {
        let i = self.mapped.len() % self.agents.len();
        let agent = &self.agents[i];
        let prefix = format!("{host}-");
        let mut c = agent.client()?;
        for j in 0..self.opts.vms_per_host {
            let name = format!("{prefix}vm{j}");
            c.call(&Request::StartVm {
                name: name.clone(),
                mem_mib: self.opts.vm_mib,
                dirty_bytes_per_sec: self.opts.dirty_bytes_per_sec,
            })
            .map_err(|e| KvmDemoError::Agent(format!("starting {name}: {e}")))?;
            self.vm_names.push(name);
        }
        // wait (with a deadline) for the guests to have filled their memory
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = agent
                .list()
                .iter()
                .filter(|v| v.name.starts_with(&prefix) && v.ready)
                .count();
            if ready == self.opts.vms_per_host {
                break;
            }
            if Instant::now() > deadline {
                return Err(KvmDemoError::Agent(format!("guests of {host} not ready")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.exec.backend_mut().insert_host(
            host,
            KvmHost {
                agent: agent.addr.clone(),
                vm_prefix: Some(prefix),
            },
        );
        self.mapped.insert(host.to_owned());
        self.summary.hosts.push(host.to_owned());
        self.summary.vms += self.opts.vms_per_host;
        Ok(())
    }

    fn real(&mut self, d: &Decision) -> Result<(), KvmDemoError> {
        if !self.mapped.contains(&d.host_id) {
            // Cover different first actions: an action not yet seen on a mapped
            // host always gets a host (while any are left); repeats leave room
            // for two more kinds.
            let new_kind = self.first_actions.insert(d.action);
            let room = if new_kind { 0 } else { 2 };
            if self.mapped.len() + room >= self.opts.max_hosts {
                if new_kind {
                    self.first_actions.remove(&d.action);
                }
                return Ok(());
            }
            self.map_host(&d.host_id)?;
        }
        let signed = sign(d, &self.key);
        let t = Instant::now();
        let res = self
            .exec
            .execute(&signed, d.ts_ms, 60_000, &|h| h.starts_with("kvm-agent-"));
        self.summary.real_ops_s += t.elapsed().as_secs_f64();
        *self
            .summary
            .operations
            .entry(d.action.as_str().to_owned())
            .or_default() += 1;
        let report = match res {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(decision = %d.id, error = %e, "real operation refused");
                self.summary.failed += 1;
                return Ok(());
            }
        };
        let _ = serde_json::to_writer(&mut self.outcomes, &report);
        let _ = self.outcomes.write_all(b"\n");
        let Some(op) = &report.report else {
            self.summary.failed += 1;
            return Ok(());
        };
        if let Some(m) = &op.measured {
            if m.migrations > 0 || m.unmeasured > 0 {
                self.summary.migrations += op.vms_moved;
                self.summary.migration_bytes += m.bytes_sent;
                if m.migrations > 0 {
                    self.summary.downtimes_ms.push(m.downtime_max_ms);
                }
            }
            if let Some(f) = m.freeze_ms {
                self.summary.phase3_freezes_ms.push(f);
            }
            if let (
                Action::Tardigrade {
                    phase: Phase::RecycleServices,
                },
                Some(p),
            ) = (d.action, m.phase_ms)
            {
                self.summary.phase1_ms.push(p);
            }
        }
        self.summary.reboot_interruptions += op.vms_interrupted;
        Ok(())
    }
}

impl DecisionHook for Hook<'_> {
    fn on_decision(&mut self, d: &Decision, _sim: &ExecutionReport) {
        if self.error.is_some() {
            return;
        }
        if let Err(e) = self.real(d) {
            self.error = Some(e);
        }
    }
}

/// Runs the demo with real VMs behind a few hosts.
pub fn run_kvm_demo(
    opts: &DemoOptions,
    kvm: &KvmDemoOptions,
) -> Result<(DemoSummary, KvmSummary), KvmDemoError> {
    let out = &opts.out_dir;
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| KvmDemoError::Io { path, source }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut agents = Vec::new();
    for i in 0..kvm.agents.max(2) {
        agents.push(AgentChild::spawn(
            &kvm.agent_exe,
            &out.join(format!("kvm-agents/agent-{i}")),
        )?);
    }
    let journal_path = out.join("kvm_journal.redb");
    let _ = std::fs::remove_file(&journal_path);
    let journal = Arc::new(Journal::open(&journal_path)?);
    let mut hosts = BTreeMap::new();
    for (i, a) in agents.iter().enumerate() {
        hosts.insert(
            format!("kvm-agent-{i}"),
            KvmHost {
                agent: a.addr.clone(),
                vm_prefix: None,
            },
        );
    }
    let kvm_opts = KvmOptions {
        diag_dir: out.join("kvm-diagnostics"),
        ..KvmOptions::default()
    };
    // A per-run demo key: the policy side signs, the executor verifies.
    let secret: Vec<u8> = (0..32u8)
        .map(|i| i.wrapping_mul(37) ^ (std::process::id() as u8))
        .collect();
    let key = Key::new("demo", secret).expect("32-byte key");
    let exec = DurableExecutor::new(
        journal.clone(),
        KvmBackend::new(hosts, kvm_opts),
        Keyring::new([key.clone()]),
    )?;
    let outcomes_path = out.join("kvm_outcomes.ndjson");
    let outcomes = std::fs::File::create(&outcomes_path).map_err(io(&outcomes_path))?;
    let mut hook = Hook {
        opts: kvm,
        agents: &agents,
        exec,
        key,
        mapped: BTreeSet::new(),
        first_actions: BTreeSet::new(),
        vm_names: Vec::new(),
        summary: KvmSummary {
            agents: agents.len(),
            journal: journal_path.display().to_string(),
            ..KvmSummary::default()
        },
        outcomes: std::io::BufWriter::new(outcomes),
        error: None,
    };
    let demo = run_demo_with(opts, Some(&mut hook))?;
    if let Some(e) = hook.error.take() {
        return Err(e);
    }
    hook.outcomes.flush().map_err(io(&outcomes_path))?;
    let mut s = hook.summary;
    s.downtimes_ms.sort_by(f64::total_cmp);
    s.phase3_freezes_ms.sort_by(f64::total_cmp);
    s.phase1_ms.sort_by(f64::total_cmp);
    let lists: Vec<Vec<VmInfo>> = agents.iter().map(AgentChild::list).collect();
    s.vms_running_once = hook
        .vm_names
        .iter()
        .filter(|n| {
            let copies: Vec<&VmInfo> = lists.iter().flatten().filter(|v| v.name == **n).collect();
            copies.len() == 1 && copies[0].state == RunState::Running
        })
        .count();
    s.journal_problems = journal.audit(true)?;
    for (name, text) in [
        (
            "kvm_summary.json",
            serde_json::to_string_pretty(&s).expect("summary serialises"),
        ),
        ("kvm_summary.md", s.to_string()),
    ] {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(io(&p))?;
    }
    drop(agents);
    Ok((demo, s))
}
