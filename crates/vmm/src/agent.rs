//! The host agent: owns the VMs of one host and serves commands on a TCP
//! socket, including the Tardigrade recovery phases.
//!
//! Protocol: frames of [`wire`] with magic `WBAG`, version 1, payload cap
//! 4 MiB; kind 1 carries a JSON [`Request`], kind 2 a JSON [`Response`]. A
//! [`Request::ReceiveMigration`] hands the connection over to the migration
//! protocol ([`crate::migration`]).
//!
//! Phases:
//! 1. [`Request::RestartServices`]: stop and restart the accept loop and the
//!    housekeeping worker; VMs keep running throughout.
//! 2. [`Request::Diagnostics`]: write VM states, metrics and the event log as
//!    JSON files (fsynced) into a directory.
//! 3. [`Request::MemoryPreservingRestart`]: pause every VM, save vCPU state,
//!    clear `FD_CLOEXEC` on the guest memfds, the listening socket and the
//!    requesting connection, write a state file, and `exec` the agent binary
//!    again with `--resume-state FILE`. The successor maps the same memfds,
//!    restores each vCPU into a fresh KVM VM, resumes the VMs that were
//!    running, and answers the request on the inherited connection with the
//!    freeze time (first pause to last resume, CLOCK_MONOTONIC).

use std::collections::{BTreeMap, VecDeque};
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::memory::{GuestMemory, set_cloexec};
use crate::migration::{self, IncomingOptions, MigrateOptions, MigrationError, MigrationReport};
use crate::vm::{RunState, VcpuState, Vm, VmConfig, VmError};
use crate::wire::{self, FrameError, Protocol};

/// The agent command protocol: magic `WBAG`, version 1, payloads up to 4 MiB.
pub const PROTOCOL: Protocol = Protocol {
    magic: u32::from_le_bytes(*b"WBAG"),
    version: 1,
    max_payload: 4 << 20,
};
/// Frame kind of a request.
pub const KIND_REQUEST: u16 = 1;
/// Frame kind of a response.
pub const KIND_RESPONSE: u16 = 2;

const STATE_MAGIC: &str = "waterbear-phase3-state";
const STATE_VERSION: u32 = 1;
const LOG_CAPACITY: usize = 2000;

/// How to run an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Address to listen on (port 0 picks one; the agent prints it).
    pub listen: SocketAddr,
    /// Where phase-3 state files live.
    pub data_dir: PathBuf,
    /// Set only in a phase-3 successor: the state file to resume from.
    pub resume_state: Option<PathBuf>,
    /// Command line to exec for phase 3; `--resume-state FILE` is appended.
    /// Defaults to this process's own arguments without `--resume-state`.
    pub exec_args: Option<Vec<OsString>>,
    /// Print `listening on ADDR` to stdout once bound.
    pub announce: bool,
    /// How long memory prepared for an incoming VM ([`Request::PrepareIncoming`]) is
    /// kept when no migration claims it (e.g. the executor rolled back or chose another
    /// target); then it is released.
    pub prepared_ttl: Duration,
}

/// Default of [`AgentConfig::prepared_ttl`]: a migration normally follows its
/// preparation within seconds.
pub const DEFAULT_PREPARED_TTL: Duration = Duration::from_secs(600);

/// Command-line arguments of the agent, for `wb-host-agent` and for the main
/// binary's `waterbear host-agent` subcommand (flatten this struct; it must
/// accept `--resume-state`, which phase 3 passes to its successor).
#[derive(Debug, Clone, clap::Args)]
pub struct HostAgentArgs {
    /// Address to listen on, e.g. 127.0.0.1:7070.
    #[arg(long)]
    pub listen: SocketAddr,
    /// Directory for phase-3 state files.
    #[arg(long, default_value = "/tmp/waterbear-host-agent")]
    pub data_dir: PathBuf,
    /// Internal: resume from a phase-3 state file.
    #[arg(long, hide = true)]
    pub resume_state: Option<PathBuf>,
    /// Milliseconds memory prepared for an incoming VM is kept if no migration
    /// claims it.
    #[arg(long, default_value_t = DEFAULT_PREPARED_TTL.as_millis() as u64)]
    pub prepared_ttl_ms: u64,
}

impl HostAgentArgs {
    /// The agent config these arguments describe.
    pub fn into_config(self) -> AgentConfig {
        AgentConfig {
            listen: self.listen,
            data_dir: self.data_dir,
            resume_state: self.resume_state,
            exec_args: None,
            announce: true,
            prepared_ttl: Duration::from_millis(self.prepared_ttl_ms),
        }
    }
}

/// A command to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Ping,
    StartVm {
        name: String,
        mem_mib: u64,
        dirty_bytes_per_sec: u64,
    },
    List,
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    StopVm {
        name: String,
    },
    SetDirtyRate {
        name: String,
        dirty_bytes_per_sec: u64,
    },
    /// Memory CRC of a paused VM.
    Checksum {
        name: String,
    },
    MigrateOut {
        name: String,
        to: String,
        options: MigrateOptions,
    },
    /// The connection switches to the migration protocol (sent by a source agent).
    ReceiveMigration,
    /// Allocate and populate guest memory for VM `name` (`mem_bytes`) before
    /// it migrates in, as a destination started ahead of the migration holds
    /// it: the incoming migration of that VM then writes into memory that is
    /// already mapped (measured: allocating and clearing ~600 ms per GiB here,
    /// otherwise paid during the migration). Idempotent per name and size.
    PrepareIncoming {
        name: String,
        mem_bytes: u64,
    },
    /// Tardigrade phase 1.
    RestartServices,
    /// Tardigrade phase 2.
    Diagnostics {
        dir: PathBuf,
    },
    /// Tardigrade phase 3. With `verify`, memory CRCs are taken before exec
    /// and checked after re-attach (inside the freeze).
    MemoryPreservingRestart {
        verify: bool,
    },
    Shutdown,
    /// `request` on behalf of an executor holding fencing epoch `epoch`:
    /// refused when an executor with a higher epoch has been seen (the
    /// highest is kept in `DATA_DIR/epoch`, fsynced, so it survives restarts).
    Fenced {
        epoch: u64,
        request: Box<Request>,
    },
}

/// One VM as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub name: String,
    pub state: RunState,
    pub counter: u32,
    pub ready: bool,
    pub mem_bytes: u64,
    pub pages_per_tick: u32,
    pub tick_us: u32,
    pub exits: u64,
}

/// Phase-3 outcome, measured by the successor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase3Report {
    pub old_pid: u32,
    pub new_pid: u32,
    pub vms: Vec<Phase3Vm>,
    /// First VM paused to last VM resumed.
    pub freeze: Duration,
    /// First pause to last pause.
    pub pause_all: Duration,
    /// Pause of the first VM until the state file was ready (before exec).
    pub until_exec: Duration,
    /// Pause of the first VM to the successor's first instruction of restore.
    pub until_successor: Duration,
    /// Successor: restoring all VMs (KVM VM creation, memory re-attach, state).
    pub restore_all: Duration,
}

/// One VM's phase-3 record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Phase3Vm {
    pub name: String,
    pub counter_before: u32,
    pub checksum_before: Option<u32>,
    pub checksum_after: Option<u32>,
    pub resumed: bool,
}

/// A response from the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Pong {
        pid: u32,
        generation: u64,
        /// Names of the VMs memory is prepared for (not yet claimed or expired).
        prepared: Vec<String>,
    },
    Vms {
        vms: Vec<VmInfo>,
    },
    Vm {
        vm: VmInfo,
    },
    Checksum {
        name: String,
        crc: u32,
        counter: u32,
    },
    Migrated {
        report: MigrationReport,
    },
    /// Memory for an incoming VM is ready; `reused`: it already was.
    Prepared {
        name: String,
        mem_bytes: u64,
        took: Duration,
        reused: bool,
    },
    ServicesRestarted {
        generation: u64,
        took: Duration,
    },
    Diagnostics {
        files: Vec<PathBuf>,
    },
    Phase3 {
        report: Phase3Report,
    },
    Error {
        message: String,
    },
}

/// Agent errors; variants name the failing step.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("i/o while {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("protocol error while {step}: {source}")]
    Frame {
        step: &'static str,
        #[source]
        source: FrameError,
    },
    #[error("VM {name}: {source}")]
    Vm {
        name: String,
        #[source]
        source: VmError,
    },
    #[error("migration: {0}")]
    Migration(#[from] MigrationError),
    #[error("no VM named {0}")]
    NoSuchVm(String),
    #[error("a VM named {0} already exists")]
    VmExists(String),
    #[error("phase 3 failed while {step}: {detail}")]
    Phase3 { step: &'static str, detail: String },
    #[error("agent answered with an error: {0}")]
    Remote(String),
    #[error("stale epoch {epoch} < {highest}: a newer executor has taken over")]
    StaleEpoch { epoch: u64, highest: u64 },
    #[error("unexpected response: {0:?}")]
    UnexpectedResponse(Box<Response>),
}

fn io_step(step: &'static str) -> impl FnOnce(io::Error) -> AgentError {
    move |source| AgentError::Io { step, source }
}

/// CLOCK_MONOTONIC in nanoseconds: comparable across `exec` on one host.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the valid timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------
// Client

/// A connection to an agent.
#[derive(Debug)]
pub struct AgentClient {
    stream: TcpStream,
}

impl AgentClient {
    /// Connects to an agent.
    pub fn connect(addr: impl std::net::ToSocketAddrs) -> Result<Self, AgentError> {
        let stream = TcpStream::connect(addr).map_err(io_step("connecting to the agent"))?;
        stream
            .set_nodelay(true)
            .map_err(io_step("setting TCP_NODELAY"))?;
        Ok(Self { stream })
    }

    /// Sets a read timeout for responses.
    pub fn set_timeout(&self, timeout: Option<Duration>) -> Result<(), AgentError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(io_step("setting the read timeout"))
    }

    /// Sends a request and reads its response; `Response::Error` becomes
    /// [`AgentError::Remote`].
    pub fn call(&mut self, req: &Request) -> Result<Response, AgentError> {
        PROTOCOL
            .write_json(&mut self.stream, KIND_REQUEST, req)
            .map_err(|source| AgentError::Frame {
                step: "sending a request",
                source,
            })?;
        let (kind, payload) =
            PROTOCOL
                .read_frame(&mut self.stream)
                .map_err(|source| AgentError::Frame {
                    step: "reading a response",
                    source,
                })?;
        if kind != KIND_RESPONSE {
            return Err(AgentError::Frame {
                step: "reading a response",
                source: FrameError::UnexpectedKind {
                    expected: "response".into(),
                    found: kind,
                },
            });
        }
        match wire::decode_json(&payload).map_err(|source| AgentError::Frame {
            step: "decoding a response",
            source,
        })? {
            Response::Error { message } => Err(AgentError::Remote(message)),
            other => Ok(other),
        }
    }

    /// Lists the agent's VMs.
    pub fn list(&mut self) -> Result<Vec<VmInfo>, AgentError> {
        match self.call(&Request::List)? {
            Response::Vms { vms } => Ok(vms),
            other => Err(AgentError::UnexpectedResponse(Box::new(other))),
        }
    }

    /// One VM's info.
    pub fn vm(&mut self, name: &str) -> Result<VmInfo, AgentError> {
        self.list()?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| AgentError::NoSuchVm(name.into()))
    }
}

// ---------------------------------------------------------------------------
// Agent

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LogEntry {
    mono_ns: u64,
    pid: u32,
    message: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Metrics {
    requests: u64,
    vms_started: u64,
    migrations_out: u64,
    migrations_in: u64,
    service_restarts: u64,
    memory_preserving_restarts: u64,
    /// (mono_ns, total guest ticks across VMs) sampled by the housekeeping worker.
    samples: VecDeque<(u64, u64)>,
}

struct Service {
    stop: Arc<AtomicBool>,
    wake: Arc<Condvar>,
    handle: JoinHandle<()>,
}

struct Agent {
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    log: Mutex<VecDeque<LogEntry>>,
    metrics: Mutex<Metrics>,
    generation: AtomicU64,
    listener: TcpListener,
    local_addr: SocketAddr,
    config: AgentConfig,
    services: Mutex<Vec<Service>>,
    shutdown: (Mutex<bool>, Condvar),
    /// Serialises phase 3 and migrations (no two at once).
    big_op: Mutex<()>,
    /// Highest executor epoch seen (see [`Request::Fenced`]).
    epoch: Mutex<u64>,
    /// Memory prepared for incoming VMs, by name (see [`Request::PrepareIncoming`]),
    /// with when it was prepared.
    prepared: Mutex<BTreeMap<String, (Arc<GuestMemory>, Instant)>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Agent {
    fn event(&self, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(%message, "agent");
        let mut log = lock(&self.log);
        if log.len() >= LOG_CAPACITY {
            log.pop_front();
        }
        log.push_back(LogEntry {
            mono_ns: monotonic_ns(),
            pid: std::process::id(),
            message,
        });
    }

    fn vm(&self, name: &str) -> Result<Arc<Vm>, AgentError> {
        lock(&self.vms)
            .get(name)
            .cloned()
            .ok_or_else(|| AgentError::NoSuchVm(name.into()))
    }

    fn info(name: &str, vm: &Vm) -> VmInfo {
        let st = vm.status();
        let c = vm.config();
        VmInfo {
            name: name.into(),
            state: st.state,
            counter: st.counter,
            ready: st.ready,
            mem_bytes: c.mem_bytes,
            pages_per_tick: c.pages_per_tick,
            tick_us: c.tick_us,
            exits: st.exits,
        }
    }

    fn list(&self) -> Vec<VmInfo> {
        lock(&self.vms)
            .iter()
            .map(|(n, vm)| Self::info(n, vm))
            .collect()
    }

    fn start_services(self: &Arc<Self>) -> Result<(), AgentError> {
        let mut services = lock(&self.services);
        // Accept loop.
        let stop = Arc::new(AtomicBool::new(false));
        let listener = self
            .listener
            .try_clone()
            .map_err(io_step("cloning the listener"))?;
        let agent = Arc::clone(self);
        let stop2 = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("agent-accept".into())
            .spawn(move || accept_loop(&agent, &listener, &stop2))
            .map_err(io_step("spawning the accept loop"))?;
        services.push(Service {
            stop,
            wake: Arc::new(Condvar::new()),
            handle,
        });
        // Housekeeping worker: samples guest progress for diagnostics.
        let stop = Arc::new(AtomicBool::new(false));
        let wake = Arc::new(Condvar::new());
        let agent = Arc::clone(self);
        let (stop2, wake2) = (Arc::clone(&stop), Arc::clone(&wake));
        let handle = std::thread::Builder::new()
            .name("agent-housekeeping".into())
            .spawn(move || housekeeping(&agent, &stop2, &wake2))
            .map_err(io_step("spawning the housekeeping worker"))?;
        services.push(Service { stop, wake, handle });
        Ok(())
    }

    fn stop_services(&self) {
        let services: Vec<Service> = lock(&self.services).drain(..).collect();
        for s in &services {
            s.stop.store(true, Ordering::SeqCst);
            s.wake.notify_all();
        }
        // Wake a blocked accept() with a throw-away connection.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        for s in services {
            let _ = s.handle.join();
        }
    }

    /// Releases prepared memory that no migration claimed within the TTL.
    fn expire_prepared(&self, now: Instant) {
        let ttl = self.config.prepared_ttl;
        let mut expired = Vec::new();
        lock(&self.prepared).retain(|name, (_, at)| {
            let keep = now.saturating_duration_since(*at) < ttl;
            if !keep {
                expired.push(name.clone());
            }
            keep
        });
        for name in expired {
            self.event(format!(
                "released memory prepared for incoming VM {name}: not claimed within {} ms",
                ttl.as_millis()
            ));
        }
    }

    fn handle(self: &Arc<Self>, req: Request, conn: &TcpStream) -> Result<Response, AgentError> {
        lock(&self.metrics).requests += 1;
        self.expire_prepared(Instant::now());
        match req {
            Request::Ping => Ok(Response::Pong {
                pid: std::process::id(),
                generation: self.generation.load(Ordering::SeqCst),
                prepared: lock(&self.prepared).keys().cloned().collect(),
            }),
            Request::List => Ok(Response::Vms { vms: self.list() }),
            Request::StartVm {
                name,
                mem_mib,
                dirty_bytes_per_sec,
            } => {
                let mut vms = lock(&self.vms);
                if vms.contains_key(&name) {
                    return Err(AgentError::VmExists(name));
                }
                let vm = Vm::boot(VmConfig::new(name.clone(), mem_mib, dirty_bytes_per_sec))
                    .map_err(|source| AgentError::Vm {
                        name: name.clone(),
                        source,
                    })?;
                let info = Self::info(&name, &vm);
                vms.insert(name.clone(), Arc::new(vm));
                drop(vms);
                lock(&self.metrics).vms_started += 1;
                self.event(format!("started VM {name} ({mem_mib} MiB)"));
                Ok(Response::Vm { vm: info })
            }
            Request::Pause { name } => {
                let vm = self.vm(&name)?;
                vm.pause().map_err(|source| AgentError::Vm {
                    name: name.clone(),
                    source,
                })?;
                self.event(format!("paused VM {name}"));
                Ok(Response::Vm {
                    vm: Self::info(&name, &vm),
                })
            }
            Request::Resume { name } => {
                let vm = self.vm(&name)?;
                vm.resume().map_err(|source| AgentError::Vm {
                    name: name.clone(),
                    source,
                })?;
                self.event(format!("resumed VM {name}"));
                Ok(Response::Vm {
                    vm: Self::info(&name, &vm),
                })
            }
            Request::StopVm { name } => {
                let vm = lock(&self.vms)
                    .remove(&name)
                    .ok_or_else(|| AgentError::NoSuchVm(name.clone()))?;
                vm.stop();
                self.event(format!("stopped VM {name}"));
                Ok(Response::Ok)
            }
            Request::SetDirtyRate {
                name,
                dirty_bytes_per_sec,
            } => {
                let vm = self.vm(&name)?;
                let tick = vm.config().tick_us;
                vm.set_pages_per_tick(crate::guest::pages_per_tick_for_rate(
                    dirty_bytes_per_sec,
                    tick,
                ));
                Ok(Response::Vm {
                    vm: Self::info(&name, &vm),
                })
            }
            Request::Checksum { name } => {
                let vm = self.vm(&name)?;
                let st = vm.status();
                if st.state != RunState::Paused {
                    return Err(AgentError::Vm {
                        name,
                        source: VmError::NotPaused(st.state),
                    });
                }
                Ok(Response::Checksum {
                    name,
                    crc: vm.memory().checksum(),
                    counter: st.counter,
                })
            }
            Request::MigrateOut { name, to, options } => {
                let _big = lock(&self.big_op);
                let vm = self.vm(&name)?;
                let mut stream =
                    TcpStream::connect(&to).map_err(io_step("connecting to the target agent"))?;
                PROTOCOL
                    .write_json(&mut stream, KIND_REQUEST, &Request::ReceiveMigration)
                    .map_err(|source| AgentError::Frame {
                        step: "announcing the migration",
                        source,
                    })?;
                self.event(format!("migrating VM {name} to {to}"));
                let result = migration::migrate_over(vm.as_ref(), stream, &options);
                match result {
                    Ok(report) => {
                        lock(&self.vms).remove(&name);
                        lock(&self.metrics).migrations_out += 1;
                        self.event(format!(
                            "migrated VM {name} to {to}: total {:?}, downtime {:?}",
                            report.total, report.downtime
                        ));
                        Ok(Response::Migrated { report })
                    }
                    Err(e) => {
                        if vm.is_fenced() {
                            lock(&self.vms).remove(&name);
                        }
                        self.event(format!("migration of VM {name} to {to} failed: {e}"));
                        Err(e.into())
                    }
                }
            }
            Request::ReceiveMigration => {
                let stream = conn
                    .try_clone()
                    .map_err(io_step("cloning the connection"))?;
                let opts = IncomingOptions {
                    prepared: lock(&self.prepared)
                        .iter()
                        .map(|(name, (mem, _))| (name.clone(), Arc::clone(mem)))
                        .collect(),
                    ..IncomingOptions::default()
                };
                let (vm, report) = migration::migrate_in(stream, &opts)?;
                drop(opts);
                // The VM owns the prepared memory now: out of the pool.
                let used_prepared = {
                    let mut pool = lock(&self.prepared);
                    let hit = pool
                        .get(&report.config.name)
                        .is_some_and(|(m, _)| Arc::ptr_eq(m, vm.memory()));
                    if hit {
                        pool.remove(&report.config.name);
                    }
                    hit
                };
                let mut name = report.config.name.clone();
                let mut vms = lock(&self.vms);
                let mut n = 2;
                while vms.contains_key(&name) {
                    name = format!("{}-{n}", report.config.name);
                    n += 1;
                }
                vms.insert(name.clone(), Arc::new(vm));
                drop(vms);
                lock(&self.metrics).migrations_in += 1;
                self.event(format!(
                    "received VM {name} by migration{}",
                    if used_prepared {
                        " into prepared memory"
                    } else {
                        ""
                    }
                ));
                // The stream now belongs to the finished migration protocol.
                Err(AgentError::Io {
                    step: "migration finished",
                    source: io::Error::new(io::ErrorKind::ConnectionAborted, "handed over"),
                })
            }
            Request::PrepareIncoming { name, mem_bytes } => {
                let t = Instant::now();
                let mut pool = lock(&self.prepared);
                if let Some((_, at)) = pool.get_mut(&name).filter(|(m, _)| m.size() == mem_bytes) {
                    // an executor retry: the TTL starts again
                    *at = Instant::now();
                    return Ok(Response::Prepared {
                        name: name.clone(),
                        mem_bytes,
                        took: t.elapsed(),
                        reused: true,
                    });
                }
                let mem = GuestMemory::new(&name, mem_bytes)
                    .map_err(|e| AgentError::Remote(format!("preparing memory for {name}: {e}")))?;
                mem.populate().map_err(|e| {
                    AgentError::Remote(format!("populating memory for {name}: {e}"))
                })?;
                pool.insert(name.clone(), (Arc::new(mem), Instant::now()));
                drop(pool);
                self.event(format!("prepared {mem_bytes} bytes for incoming VM {name}"));
                Ok(Response::Prepared {
                    name: name.clone(),
                    mem_bytes,
                    took: t.elapsed(),
                    reused: false,
                })
            }
            Request::RestartServices => {
                let t = Instant::now();
                self.stop_services();
                self.start_services()?;
                let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
                lock(&self.metrics).service_restarts += 1;
                self.event(format!(
                    "phase 1: services restarted (generation {generation})"
                ));
                Ok(Response::ServicesRestarted {
                    generation,
                    took: t.elapsed(),
                })
            }
            Request::Diagnostics { dir } => {
                let files = self.write_diagnostics(&dir)?;
                self.event(format!("phase 2: diagnostics written to {}", dir.display()));
                Ok(Response::Diagnostics { files })
            }
            Request::MemoryPreservingRestart { verify } => {
                let _big = lock(&self.big_op);
                // Only returns on failure (after rolling back).
                let err = self.phase3(conn, verify);
                self.event(format!("phase 3 failed: {err}"));
                Err(err)
            }
            Request::Fenced { epoch, request } => {
                if matches!(*request, Request::Fenced { .. } | Request::ReceiveMigration) {
                    return Err(AgentError::Remote("this request cannot be fenced".into()));
                }
                {
                    let mut highest = lock(&self.epoch);
                    if epoch < *highest {
                        self.event(format!(
                            "refused {:?} from stale epoch {epoch} (highest {})",
                            request, *highest
                        ));
                        return Err(AgentError::StaleEpoch {
                            epoch,
                            highest: *highest,
                        });
                    }
                    if epoch > *highest {
                        write_synced(
                            &self.config.data_dir.join("epoch"),
                            epoch.to_string().as_bytes(),
                        )
                        .and_then(|()| File::open(&self.config.data_dir)?.sync_all())
                        .map_err(io_step("persisting the epoch"))?;
                        *highest = epoch;
                    }
                }
                self.handle(*request, conn)
            }
            Request::Shutdown => {
                let (m, cv) = &self.shutdown;
                *lock(m) = true;
                cv.notify_all();
                Ok(Response::Ok)
            }
        }
    }

    fn write_diagnostics(&self, dir: &Path) -> Result<Vec<PathBuf>, AgentError> {
        fs::create_dir_all(dir).map_err(io_step("creating the diagnostics directory"))?;
        let metrics = lock(&self.metrics).clone();
        let log: Vec<LogEntry> = lock(&self.log).iter().cloned().collect();
        let summary = serde_json::json!({
            "pid": std::process::id(),
            "generation": self.generation.load(Ordering::SeqCst),
            "listen": self.local_addr.to_string(),
            "mono_ns": monotonic_ns(),
        });
        let docs: [(&str, serde_json::Value); 4] = [
            (
                "vms.json",
                serde_json::to_value(self.list()).unwrap_or_default(),
            ),
            (
                "metrics.json",
                serde_json::to_value(metrics).unwrap_or_default(),
            ),
            ("log.json", serde_json::to_value(log).unwrap_or_default()),
            ("agent.json", summary),
        ];
        let mut files = Vec::new();
        for (name, value) in docs {
            let path = dir.join(name);
            write_synced(
                &path,
                &serde_json::to_vec_pretty(&value).unwrap_or_default(),
            )
            .map_err(io_step("writing a diagnostics file"))?;
            files.push(path);
        }
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_step("fsync of the diagnostics directory"))?;
        Ok(files)
    }

    /// Phase 3, old-process half. Returns only on failure, after resuming.
    fn phase3(self: &Arc<Self>, conn: &TcpStream, verify: bool) -> AgentError {
        let vms: Vec<(String, Arc<Vm>)> = lock(&self.vms)
            .iter()
            .map(|(n, v)| (n.clone(), Arc::clone(v)))
            .collect();
        // Preparation while the guests still run: shrink what exec must tear
        // down (see `GuestMemory::drop_host_mappings`).
        for (name, vm) in &vms {
            if let Err(e) = vm.memory().drop_host_mappings() {
                tracing::warn!(vm = %name, error = %e, "could not drop host mappings");
            }
        }
        let freeze_start_ns = monotonic_ns();
        let was_running: Vec<bool> = vms
            .iter()
            .map(|(_, vm)| vm.status().state == RunState::Running)
            .collect();
        let rollback = |err: AgentError| {
            for ((_, vm), running) in vms.iter().zip(&was_running) {
                let _ = vm.memory().set_inherit_on_exec(false);
                let _ = vm.kvm_fds_inherit_on_exec(false);
                if *running {
                    let _ = vm.resume();
                }
            }
            let _ = set_cloexec(self.listener.as_raw_fd(), true);
            let _ = set_cloexec(conn.as_raw_fd(), true);
            err
        };
        // Kick every vCPU first, then wait: the pauses overlap.
        for (name, vm) in &vms {
            if let Err(source) = vm.request_pause() {
                return rollback(AgentError::Vm {
                    name: name.clone(),
                    source,
                });
            }
        }
        for (name, vm) in &vms {
            if let Err(source) = vm.wait_paused() {
                return rollback(AgentError::Vm {
                    name: name.clone(),
                    source,
                });
            }
        }
        let paused_ns = monotonic_ns();
        let mut saved = Vec::new();
        for ((name, vm), running) in vms.iter().zip(&was_running) {
            let vcpu = match vm.save_vcpu_state() {
                Ok(s) => s,
                Err(source) => {
                    return rollback(AgentError::Vm {
                        name: name.clone(),
                        source,
                    });
                }
            };
            if let Err(e) = vm.memory().set_inherit_on_exec(true) {
                return rollback(AgentError::Phase3 {
                    step: "keeping the memfd across exec",
                    detail: e.to_string(),
                });
            }
            let old_kvm_fds = match vm.kvm_fds_inherit_on_exec(true) {
                Ok(fds) => fds,
                Err(e) => {
                    return rollback(AgentError::Phase3 {
                        step: "deferring KVM teardown past exec",
                        detail: e.to_string(),
                    });
                }
            };
            saved.push(SavedVm {
                name: name.clone(),
                config: vm.config(),
                vcpu,
                memfd: vm.memory().raw_fd(),
                running: *running,
                counter: vm.status().counter,
                checksum: verify.then(|| vm.memory().checksum()),
                old_kvm_fds,
            });
        }
        for fd in [self.listener.as_raw_fd(), conn.as_raw_fd()] {
            if let Err(e) = set_cloexec(fd, false) {
                return rollback(AgentError::Phase3 {
                    step: "keeping sockets across exec",
                    detail: e.to_string(),
                });
            }
        }
        let state = Phase3State {
            magic: STATE_MAGIC.into(),
            version: STATE_VERSION,
            old_pid: std::process::id(),
            freeze_start_ns,
            paused_ns,
            state_ready_ns: monotonic_ns(),
            listener_fd: self.listener.as_raw_fd(),
            client_fd: conn.as_raw_fd(),
            generation: self.generation.load(Ordering::SeqCst),
            vms: saved,
            log: lock(&self.log).iter().cloned().collect(),
            metrics: lock(&self.metrics).clone(),
        };
        // The state file lives in a memfd handed across exec: it only has to
        // survive the exec (guest RAM does not survive a reboot either), so
        // no disk write and no fsync sit inside the freeze.
        let state_fd = match write_state(&state) {
            Ok(fd) => fd,
            Err(e) => {
                return rollback(AgentError::Phase3 {
                    step: "writing the state file",
                    detail: e.to_string(),
                });
            }
        };
        let path = PathBuf::from(format!("/proc/self/fd/{}", state_fd.as_raw_fd()));
        let mut args = self
            .config
            .exec_args
            .clone()
            .unwrap_or_else(own_args_without_resume);
        let program = args
            .first()
            .cloned()
            .unwrap_or_else(|| "wb-host-agent".into());
        args.push("--resume-state".into());
        args.push(path.into_os_string());
        let err = std::process::Command::new("/proc/self/exe")
            .arg0(program)
            .args(&args[1..])
            .exec();
        drop(state_fd);
        rollback(AgentError::Phase3 {
            step: "exec of the successor",
            detail: err.to_string(),
        })
    }
}

/// The highest executor epoch recorded in `data_dir` (0 if none).
fn read_epoch(data_dir: &Path) -> u64 {
    fs::read_to_string(data_dir.join("epoch"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

fn own_args_without_resume() -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip = false;
    for a in std::env::args_os() {
        if skip {
            skip = false;
            continue;
        }
        if a == "--resume-state" {
            skip = true;
            continue;
        }
        if a.to_string_lossy().starts_with("--resume-state=") {
            continue;
        }
        out.push(a);
    }
    out
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedVm {
    name: String,
    config: VmConfig,
    vcpu: VcpuState,
    memfd: RawFd,
    running: bool,
    counter: u32,
    checksum: Option<u32>,
    /// The predecessor's KVM VM/vCPU fds, closed by the successor after resume.
    old_kvm_fds: Vec<RawFd>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Phase3State {
    magic: String,
    version: u32,
    old_pid: u32,
    freeze_start_ns: u64,
    paused_ns: u64,
    state_ready_ns: u64,
    listener_fd: RawFd,
    client_fd: RawFd,
    generation: u64,
    vms: Vec<SavedVm>,
    log: Vec<LogEntry>,
    metrics: Metrics,
}

fn write_synced(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    fs::rename(&tmp, path)
}

/// Writes the state file into a new memfd that stays open across exec. The
/// file is `CRC32 (8 hex digits) \n JSON`.
fn write_state(state: &Phase3State) -> io::Result<OwnedFd> {
    let body = serde_json::to_vec(state).map_err(io::Error::other)?;
    let mut bytes = format!("{:08x}\n", crc32fast::hash(&body)).into_bytes();
    bytes.extend_from_slice(&body);
    // SAFETY: a valid NUL-terminated name and no flags (no CLOEXEC: the fd
    // must survive exec); the result is checked.
    let raw = unsafe { libc::memfd_create(c"wb-phase3-state".as_ptr(), 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh fd owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut file = File::from(fd);
    file.write_all(&bytes)?;
    Ok(OwnedFd::from(file))
}

fn read_state(path: &Path) -> Result<Phase3State, AgentError> {
    let bytes = fs::read(path).map_err(io_step("reading the phase-3 state file"))?;
    if bytes.len() > 64 << 20 || bytes.len() < 9 {
        return Err(AgentError::Phase3 {
            step: "reading the state file",
            detail: format!("implausible size {}", bytes.len()),
        });
    }
    let (head, body) = bytes.split_at(9);
    let want = std::str::from_utf8(&head[..8])
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok());
    if want != Some(crc32fast::hash(body)) {
        return Err(AgentError::Phase3 {
            step: "verifying the state file",
            detail: "checksum mismatch".into(),
        });
    }
    let state: Phase3State = serde_json::from_slice(body).map_err(|e| AgentError::Phase3 {
        step: "decoding the state file",
        detail: e.to_string(),
    })?;
    if state.magic != STATE_MAGIC || state.version != STATE_VERSION {
        return Err(AgentError::Phase3 {
            step: "verifying the state file",
            detail: format!("magic {:?} version {}", state.magic, state.version),
        });
    }
    Ok(state)
}

fn accept_loop(agent: &Arc<Agent>, listener: &TcpListener, stop: &AtomicBool) {
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else { continue };
        let agent = Arc::clone(agent);
        let _ = std::thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || serve_connection(&agent, conn));
    }
}

fn housekeeping(agent: &Arc<Agent>, stop: &AtomicBool, wake: &Condvar) {
    let gate = Mutex::new(());
    let mut guard = lock(&gate);
    while !stop.load(Ordering::SeqCst) {
        let ticks: u64 = lock(&agent.vms)
            .values()
            .map(|vm| u64::from(vm.status().counter))
            .sum();
        {
            let mut m = lock(&agent.metrics);
            if m.samples.len() >= 600 {
                m.samples.pop_front();
            }
            m.samples.push_back((monotonic_ns(), ticks));
        }
        guard = wake
            .wait_timeout(guard, Duration::from_millis(500))
            .unwrap_or_else(|e| e.into_inner())
            .0;
    }
}

fn serve_connection(agent: &Arc<Agent>, conn: TcpStream) {
    let _ = conn.set_nodelay(true);
    // Unbuffered on purpose: after a ReceiveMigration request the rest of
    // the stream belongs to the migration protocol, so no byte past the
    // request frame may be consumed here.
    let Ok(mut r) = conn.try_clone() else { return };
    loop {
        let req: Request = match PROTOCOL.read_frame(&mut r) {
            Ok((KIND_REQUEST, payload)) => match wire::decode_json(&payload) {
                Ok(req) => req,
                Err(e) => {
                    let _ = respond(
                        &conn,
                        &Response::Error {
                            message: e.to_string(),
                        },
                    );
                    continue;
                }
            },
            Ok((_, _)) => {
                let _ = respond(
                    &conn,
                    &Response::Error {
                        message: "expected a request frame".into(),
                    },
                );
                return;
            }
            Err(FrameError::Io(_)) => return,
            Err(e) => {
                // Corrupt framing: the stream cannot be resynchronised.
                let _ = respond(
                    &conn,
                    &Response::Error {
                        message: e.to_string(),
                    },
                );
                return;
            }
        };
        let is_migration = matches!(req, Request::ReceiveMigration);
        let resp = agent.handle(req, &conn);
        if is_migration {
            if let Err(AgentError::Migration(e)) = &resp {
                agent.event(format!("incoming migration failed: {e}"));
            }
            return;
        }
        let resp = resp.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
        });
        if respond(&conn, &resp).is_err() {
            return;
        }
    }
}

fn respond(mut conn: &TcpStream, resp: &Response) -> Result<(), FrameError> {
    PROTOCOL.write_json(&mut conn, KIND_RESPONSE, resp)
}

/// Runs a host agent until a `Shutdown` request; in a phase-3 successor
/// (`config.resume_state` set) it first re-attaches the VMs it inherited.
pub fn run_host_agent(config: AgentConfig) -> Result<(), AgentError> {
    let (listener, resumed) = match &config.resume_state {
        None => {
            let l = TcpListener::bind(config.listen).map_err(|source| AgentError::Bind {
                addr: config.listen,
                source,
            })?;
            (l, None)
        }
        Some(path) => {
            let t_successor = monotonic_ns();
            let state = read_state(path)?;
            if let Some(n) = path
                .to_str()
                .and_then(|p| p.strip_prefix("/proc/self/fd/"))
                .and_then(|n| n.parse::<RawFd>().ok())
            {
                // SAFETY: the predecessor passed this memfd (state file) to
                // us; it is read and no longer needed, so close it once.
                drop(unsafe { OwnedFd::from_raw_fd(n) });
            } else {
                let _ = fs::remove_file(path);
            }
            // SAFETY: the predecessor recorded this fd as its listening socket
            // and cleared FD_CLOEXEC on it; nothing else in this new process
            // owns it.
            let listener = unsafe { TcpListener::from_raw_fd(state.listener_fd) };
            let _ = set_cloexec(listener.as_raw_fd(), true);
            (listener, Some((state, t_successor)))
        }
    };
    let local_addr = listener
        .local_addr()
        .map_err(io_step("reading the bound address"))?;
    fs::create_dir_all(&config.data_dir).map_err(io_step("creating the data directory"))?;
    let agent = Arc::new(Agent {
        vms: Mutex::new(BTreeMap::new()),
        log: Mutex::new(VecDeque::new()),
        metrics: Mutex::new(Metrics::default()),
        generation: AtomicU64::new(1),
        listener,
        local_addr,
        config: config.clone(),
        services: Mutex::new(Vec::new()),
        shutdown: (Mutex::new(false), Condvar::new()),
        big_op: Mutex::new(()),
        epoch: Mutex::new(read_epoch(&config.data_dir)),
        prepared: Mutex::new(BTreeMap::new()),
    });

    if let Some((state, t_successor)) = resumed {
        resume_from_state(&agent, state, t_successor);
    } else {
        agent.event(format!("agent started on {local_addr}"));
    }
    agent.start_services()?;
    if config.announce {
        let mut out = io::stdout().lock();
        let _ = writeln!(out, "listening on {local_addr}");
        let _ = out.flush();
    }

    let (m, cv) = &agent.shutdown;
    let mut down = lock(m);
    while !*down {
        down = cv.wait(down).unwrap_or_else(|e| e.into_inner());
    }
    drop(down);
    agent.event("agent shutting down");
    agent.stop_services();
    for vm in lock(&agent.vms).values() {
        vm.stop();
    }
    Ok(())
}

/// Phase 3, successor half: re-attach memory, restore vCPUs, resume, report.
fn resume_from_state(agent: &Arc<Agent>, state: Phase3State, t_successor: u64) {
    // SAFETY: the predecessor cleared FD_CLOEXEC on the requesting connection
    // and recorded its number; this process now owns it exclusively.
    let client = unsafe { TcpStream::from_raw_fd(state.client_fd) };
    let _ = set_cloexec(client.as_raw_fd(), true);
    *lock(&agent.log) = state.log.into_iter().collect();
    {
        let mut m = state.metrics;
        m.memory_preserving_restarts += 1;
        *lock(&agent.metrics) = m;
    }
    agent
        .generation
        .store(state.generation + 1, Ordering::SeqCst);

    // Close the predecessor's KVM fds (kept open across exec so their kernel
    // teardown is not done inside exec) before creating the new VMs.
    // Closing them later, in the background while the restored guests ran,
    // stalled vCPUs for seconds on the development host (nested KVM), so
    // the teardown stays inside the freeze.
    let old_kvm_fds: Vec<OwnedFd> = state
        .vms
        .iter()
        .flat_map(|v| v.old_kvm_fds.iter().copied())
        // SAFETY: the predecessor cleared FD_CLOEXEC on these fds and recorded
        // them; this process owns them from here on and closes each once.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) })
        .collect();
    drop(old_kvm_fds);
    let t_restore = Instant::now();
    // Sequential on purpose: restoring in parallel threads showed no gain on
    // two cores.
    type Restored = (SavedVm, Result<Vm, String>, Option<u32>);
    let restore_one = |saved: SavedVm| -> Restored {
        // SAFETY: the predecessor kept this memfd open across exec for this VM
        // and recorded its number; ownership passes to this process here.
        let fd = unsafe { OwnedFd::from_raw_fd(saved.memfd) };
        let _ = set_cloexec(fd.as_raw_fd(), true);
        let result = GuestMemory::from_fd(fd, saved.config.mem_bytes)
            .map_err(|e| e.to_string())
            .and_then(|mem| {
                let mem = Arc::new(mem);
                let crc = saved.checksum.map(|_| mem.checksum());
                Vm::restore(saved.config.clone(), mem, &saved.vcpu)
                    .map(|vm| (vm, crc))
                    .map_err(|e| e.to_string())
            });
        match result {
            Ok((vm, crc)) => (saved, Ok(vm), crc),
            Err(e) => (saved, Err(e), None),
        }
    };
    let restored: Vec<Restored> = state.vms.into_iter().map(restore_one).collect();
    let restore_all = t_restore.elapsed();
    let mut records = Vec::new();
    let mut errors = Vec::new();
    for (saved, vm, crc) in restored {
        let mut resumed = false;
        match vm {
            Ok(vm) => {
                let crc_ok = saved.checksum.is_none() || saved.checksum == crc;
                if !crc_ok {
                    errors.push(format!(
                        "{}: memory checksum changed across exec",
                        saved.name
                    ));
                }
                if saved.running && crc_ok {
                    resumed = vm.resume().is_ok();
                }
                lock(&agent.vms).insert(saved.name.clone(), Arc::new(vm));
            }
            Err(e) => errors.push(format!("{}: {e}", saved.name)),
        }
        records.push(Phase3Vm {
            name: saved.name,
            counter_before: saved.counter,
            checksum_before: saved.checksum,
            checksum_after: crc,
            resumed,
        });
    }
    let end = monotonic_ns();
    let report = Phase3Report {
        old_pid: state.old_pid,
        new_pid: std::process::id(),
        vms: records,
        freeze: Duration::from_nanos(end.saturating_sub(state.freeze_start_ns)),
        pause_all: Duration::from_nanos(state.paused_ns.saturating_sub(state.freeze_start_ns)),
        until_exec: Duration::from_nanos(
            state.state_ready_ns.saturating_sub(state.freeze_start_ns),
        ),
        until_successor: Duration::from_nanos(t_successor.saturating_sub(state.freeze_start_ns)),
        restore_all,
    };
    agent.event(format!(
        "phase 3: resumed from pid {} in {:?} ({} VMs)",
        report.old_pid,
        report.freeze,
        report.vms.len()
    ));
    let resp = if errors.is_empty() {
        Response::Phase3 { report }
    } else {
        Response::Error {
            message: format!("phase 3 incomplete: {}", errors.join("; ")),
        }
    };
    let _ = respond(&client, &resp);
    // Keep serving the requester's connection.
    let agent = Arc::clone(agent);
    let _ = std::thread::Builder::new()
        .name("agent-conn".into())
        .spawn(move || serve_connection(&agent, client));
}
