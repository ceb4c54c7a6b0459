//! Measurement helpers behind `cargo bench -p waterbear-vmm --bench migrate`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::agent::{AgentClient, AgentError, Phase3Report, Request, Response};
use crate::memory::GuestMemory;
use crate::migration::{IncomingOptions, MigrateOptions, MigrationError, migrate_in, migrate_out};
use crate::vm::{Vm, VmConfig, VmError};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("VM: {0}")]
    Vm(#[from] VmError),
    #[error("migration: {0}")]
    Migration(#[from] MigrationError),
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

/// One migration measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateFigures {
    pub mem_mib: u64,
    pub dirty_bytes_per_sec: u64,
    pub total: Duration,
    pub downtime: Duration,
    pub bytes_sent: u64,
    pub rounds: u32,
    pub final_pages: u64,
    pub converged: bool,
    /// bytes_sent / total, bytes per second.
    pub effective_bandwidth: f64,
    pub breakdown: crate::migration::Breakdown,
}

/// How the benchmark's target gets its guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetMemory {
    /// Allocated and populated before the source connects (outside the
    /// measured total), like a destination started with the guest's size.
    Prepared,
    /// Allocated and populated after HELLO (inside the handshake).
    PopulateOnHello,
    /// Allocated after HELLO, each page faulted in by its first write.
    Lazy,
}

impl TargetMemory {
    /// Parses `prepared`, `populate` or `lazy`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "prepared" => Some(Self::Prepared),
            "populate" => Some(Self::PopulateOnHello),
            "lazy" => Some(Self::Lazy),
            _ => None,
        }
    }
}

/// Boots a `mem_mib` guest dirtying `dirty_bytes_per_sec`, waits for its
/// prefill pass, migrates it to a second in-process VMM over loopback TCP and
/// reports the figures.
pub fn bench_migrate(
    mem_mib: u64,
    dirty_bytes_per_sec: u64,
    opts: &MigrateOptions,
    target_memory: TargetMemory,
) -> Result<MigrateFigures, BenchError> {
    let src = Vm::boot(VmConfig::new("bench-src", mem_mib, dirty_bytes_per_sec))?;
    let c = src
        .wait_until(Duration::from_secs(120), |s| s.ready)?
        .counter;
    // Let the dirtying reach its steady state.
    src.wait_until(Duration::from_secs(30), |s| s.counter >= c + 100)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let target = std::thread::spawn(move || -> Result<Vm, BenchError> {
        let mut in_opts = IncomingOptions::default();
        match target_memory {
            TargetMemory::Prepared => {
                let mem = GuestMemory::new("bench-dst", mem_mib << 20).map_err(VmError::from)?;
                mem.populate().map_err(VmError::from)?;
                in_opts.memory = Some(Arc::new(mem));
            }
            TargetMemory::PopulateOnHello => in_opts.populate = true,
            TargetMemory::Lazy => in_opts.populate = false,
        }
        let _ = ready_tx.send(());
        let (stream, _) = listener.accept()?;
        Ok(migrate_in(stream, &in_opts)?.0)
    });
    // The source connects only once the target is ready (its preparation
    // is not part of the migration's total).
    let _ = ready_rx.recv();
    let report = migrate_out(&src, addr, opts);
    let dst = target
        .join()
        .map_err(|_| BenchError::Other("target thread panicked".into()))?;
    let dst = dst?;
    let report = report?;
    dst.wait_until(Duration::from_secs(10), |s| {
        s.counter > report.counter_at_pause
    })?;
    Ok(MigrateFigures {
        mem_mib,
        dirty_bytes_per_sec,
        total: report.total,
        downtime: report.downtime,
        bytes_sent: report.bytes_sent,
        rounds: report.rounds,
        final_pages: report.final_pages,
        converged: report.converged,
        effective_bandwidth: report.bytes_sent as f64 / report.total.as_secs_f64(),
        breakdown: report.breakdown,
    })
}

/// Loopback TCP throughput (bytes/s) of a plain Rust sender/receiver pair
/// moving `bytes` in 1 MiB writes.
pub fn bench_loopback_tcp(bytes: u64) -> Result<f64, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr: SocketAddr = listener.local_addr()?;
    let receiver = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let buf = vec![0x5au8; 1 << 20];
    let start = Instant::now();
    let mut s = TcpStream::connect(addr)?;
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&buf)?;
        sent += buf.len() as u64;
    }
    drop(s);
    let got = receiver
        .join()
        .map_err(|_| BenchError::Other("receiver panicked".into()))??;
    let secs = start.elapsed().as_secs_f64();
    if got != sent {
        return Err(BenchError::Other(format!("sent {sent}, received {got}")));
    }
    Ok(sent as f64 / secs)
}

/// Spawns the agent binary at `agent_exe`, starts `vms` guests of `mem_mib`
/// dirtying `dirty_bytes_per_sec`, runs phase 3 (without checksum
/// verification, which would sit inside the freeze) and returns its report.
pub fn bench_phase3(
    agent_exe: &Path,
    vms: usize,
    mem_mib: u64,
    dirty_bytes_per_sec: u64,
) -> Result<Phase3Report, BenchError> {
    let dir = std::env::temp_dir().join(format!("wb-bench-phase3-{}", std::process::id()));
    let mut child = Command::new(agent_exe)
        .args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(&dir)
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<Phase3Report, BenchError> {
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| BenchError::Other("no stdout".into()))?;
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line)?;
        let addr: SocketAddr = line
            .trim()
            .strip_prefix("listening on ")
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| BenchError::Other(format!("bad agent banner {line:?}")))?;
        let mut c = AgentClient::connect(addr)?;
        c.set_timeout(Some(Duration::from_secs(60)))?;
        for i in 0..vms {
            c.call(&Request::StartVm {
                name: format!("vm{i}"),
                mem_mib,
                dirty_bytes_per_sec,
            })?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !c.list()?.iter().all(|v| v.ready && v.counter > 50) {
            if Instant::now() > deadline {
                return Err(BenchError::Other("guests never got ready".into()));
            }
            std::thread::yield_now();
        }
        let resp = c.call(&Request::MemoryPreservingRestart { verify: false })?;
        let _ = c.call(&Request::Shutdown);
        match resp {
            Response::Phase3 { report } => Ok(report),
            other => Err(BenchError::Other(format!("unexpected {other:?}"))),
        }
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}
