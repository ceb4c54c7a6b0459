//! Pre-copy live migration over a byte stream (TCP).
//!
//! Source                                   Target
//! ------                                   ------
//! HELLO {config}                      ->   creates VM (paused) over fresh or
//!                                          prepared memfd memory
//!                                     <-   HELLO_ACK
//! start dirty log; round 0: all pages ->   writes pages into guest RAM
//!   (PAGES_LIVE, straight from RAM),
//!   ROUND_END                         <-   ROUND_ACK {resend: torn frames}
//! rounds 1..: dirty + resend pages    ->
//!   (PAGES_LIVE from a snapshot), ROUND_END
//! (until the dirty set fits the downtime budget or the round limit)
//! pause; final dirty pages (PAGES);
//! STATE                               ->   refuses if any page is unverified;
//!                                          loads vCPU state, checks memory CRC
//!                                     <-   PREPARED {ok}
//! fence source (never resumes); COMMIT ->  resumes the guest
//!                                     <-   STARTED
//!
//! The target only runs the guest after a complete, CRC-valid COMMIT, and the
//! source fences the VM before sending COMMIT, so the guest never runs on both
//! hosts. A failure before COMMIT resumes the source; a failure after it
//! leaves the source fenced ([`MigrationError::CommitUncertain`]): losing
//! availability is preferred to running twice.

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::guest::{self, PAGE_SIZE};
use crate::memory::{GuestMemory, MemoryError};
use crate::vm::{VcpuState, Vm, VmConfig, VmError};
use crate::wire::{self, FrameError, Protocol};

/// The migration wire protocol: magic `WBMG`, version 2, payloads up to 8 MiB.
///
/// Version 2 added `PAGES_LIVE` and the `resend` list of `ROUND_ACK`.
pub const PROTOCOL: Protocol = Protocol {
    magic: u32::from_le_bytes(*b"WBMG"),
    version: 2,
    max_payload: 8 << 20,
};

/// Frame kinds of the migration protocol.
pub mod kind {
    pub const HELLO: u16 = 1;
    pub const HELLO_ACK: u16 = 2;
    /// Payload: GPA (u64 LE) followed by whole pages. A checksum mismatch
    /// aborts the migration.
    pub const PAGES: u16 = 3;
    pub const ROUND_END: u16 = 4;
    pub const STATE: u16 = 5;
    pub const PREPARED: u16 = 6;
    pub const COMMIT: u16 = 7;
    pub const STARTED: u16 = 8;
    pub const ABORT: u16 = 9;
    /// Target has applied everything up to a ROUND_END; lists the pages whose
    /// `PAGES_LIVE` frames failed their checksum (to be sent again).
    pub const ROUND_ACK: u16 = 10;
    /// Same payload as `PAGES`, sent straight from the memory of a running
    /// guest, which may rewrite a page between the checksum and the send
    /// (the dirty log sends such a page again). On a checksum mismatch the
    /// target keeps the pages marked unverified and lists them in its next
    /// ROUND_ACK; it refuses STATE while any page is unverified, so no page
    /// reaches a running guest without a matching checksum.
    pub const PAGES_LIVE: u16 = 11;
}

/// Small-trait view of what migration needs from a VM (in the style of Cloud
/// Hypervisor's `Pausable`/`Migratable`); [`Vm`] implements it.
pub trait Migratable {
    fn config(&self) -> VmConfig;
    fn memory(&self) -> &GuestMemory;
    fn pause(&self) -> Result<(), VmError>;
    fn resume(&self) -> Result<(), VmError>;
    fn start_dirty_log(&self) -> Result<(), VmError>;
    fn dirty_log(&self) -> Result<Vec<u64>, VmError>;
    fn stop_dirty_log(&self) -> Result<(), VmError>;
    fn vcpu_state(&self) -> Result<VcpuState, VmError>;
    /// Called once the target has started: the VM must never run here again.
    fn fence(&self);
    /// Called when a migration was abandoned before commit.
    fn abandon_migration(&self) -> Result<(), VmError> {
        self.stop_dirty_log()?;
        self.resume()
    }
}

impl Migratable for Vm {
    fn config(&self) -> VmConfig {
        Vm::config(self)
    }
    fn memory(&self) -> &GuestMemory {
        Vm::memory(self)
    }
    fn pause(&self) -> Result<(), VmError> {
        Vm::pause(self)
    }
    fn resume(&self) -> Result<(), VmError> {
        Vm::resume(self)
    }
    fn start_dirty_log(&self) -> Result<(), VmError> {
        Vm::start_dirty_log(self)
    }
    fn dirty_log(&self) -> Result<Vec<u64>, VmError> {
        self.dirty_bitmap()
    }
    fn stop_dirty_log(&self) -> Result<(), VmError> {
        Vm::stop_dirty_log(self)
    }
    fn vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.save_vcpu_state()
    }
    fn fence(&self) {
        Vm::fence(self)
    }
}

/// Tuning knobs of an outgoing migration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrateOptions {
    /// Pre-copy rounds after the first full pass before stop-and-copy is forced.
    pub max_rounds: u32,
    /// Stop-and-copy once the remaining dirty pages would take at most this
    /// long to send at the bandwidth measured so far.
    pub max_downtime: Duration,
    /// Hash all guest memory on both sides while paused and compare (adds
    /// downtime proportional to memory size; for tests).
    pub verify_checksum: bool,
    /// Largest run of pages sent in one frame.
    pub chunk_pages: u32,
    /// Read/write timeout on the stream.
    pub io_timeout: Duration,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            max_rounds: 30,
            max_downtime: Duration::from_millis(1),
            verify_checksum: false,
            chunk_pages: 256,
            io_timeout: Duration::from_secs(30),
        }
    }
}

/// What an outgoing migration measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MigrationReport {
    pub mem_bytes: u64,
    /// Connect to STARTED.
    pub total: Duration,
    /// Source pause to STARTED received (upper bound of the guest's blackout).
    pub downtime: Duration,
    /// Every byte written to the stream.
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pre-copy rounds including the first full pass (stop-and-copy not counted).
    pub rounds: u32,
    /// Pages sent while paused.
    pub final_pages: u64,
    /// The dirty set fell under the downtime budget before the round limit.
    pub converged: bool,
    /// Pages sent again because the target could not verify their
    /// `PAGES_LIVE` frame (the guest rewrote them mid-send).
    #[serde(default)]
    pub resent_pages: u64,
    /// Memory CRC both sides agreed on, when `verify_checksum` was set.
    pub checksum: Option<u32>,
    /// Guest counter at the pause.
    pub counter_at_pause: u32,
    /// Where the time went.
    pub breakdown: Breakdown,
}

/// Time spent in each step of an outgoing migration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Breakdown {
    /// HELLO until HELLO_ACK (target allocates memory, creates the VM).
    pub handshake: Duration,
    /// First full pass over memory.
    pub round0: Duration,
    /// Later pre-copy rounds.
    pub later_rounds: Duration,
    /// Pause request until the vCPU thread parked.
    pub pause: Duration,
    /// Final dirty log + pages + vCPU state written.
    pub final_copy: Duration,
    /// STATE sent until PREPARED received (target loads state, checks CRC).
    pub prepare: Duration,
    /// COMMIT sent until STARTED received.
    pub commit: Duration,
}

/// What an incoming migration measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IncomingReport {
    pub config: VmConfig,
    pub bytes_received: u64,
    pub pages_received: u64,
    pub checksum: Option<u32>,
}

/// Errors of a migration; variants name the failing step.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("connecting to the target: {0}")]
    Connect(#[source] io::Error),
    #[error("stream setup: {0}")]
    Socket(#[source] io::Error),
    #[error("wire error while {step}: {source}")]
    Frame {
        step: &'static str,
        #[source]
        source: FrameError,
    },
    #[error("VM error while {step}: {source}")]
    Vm {
        step: &'static str,
        #[source]
        source: VmError,
    },
    #[error("allocating target memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("target refused the migration: {0}")]
    TargetRejected(String),
    #[error("source aborted the migration: {0}")]
    SourceAborted(String),
    #[error("page frame out of range: gpa {gpa:#x} + {len} bytes")]
    BadPages { gpa: u64, len: u64 },
    #[error("{pages} pages never arrived with a matching checksum")]
    UnverifiedPages { pages: u64 },
    #[error("memory checksum mismatch: source {source_crc:#010x}, target {target_crc:#010x}")]
    ChecksumMismatch { source_crc: u32, target_crc: u32 },
    #[error("commit sent but the target's start was not confirmed ({0}); the source stays fenced")]
    CommitUncertain(String),
    #[error("the source never committed ({0}); the target VM was discarded without running")]
    NotCommitted(String),
}

fn frame_err(step: &'static str) -> impl FnOnce(FrameError) -> MigrationError {
    move |source| MigrationError::Frame { step, source }
}

fn vm_err(step: &'static str) -> impl FnOnce(VmError) -> MigrationError {
    move |source| MigrationError::Vm { step, source }
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    config: VmConfig,
}

#[derive(Debug, Serialize, Deserialize)]
struct Ack {
    ok: bool,
    error: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct RoundEnd {
    round: u32,
    pages: u64,
}

/// Most page runs one ROUND_ACK lists; pages beyond stay unverified and are
/// listed by a later ROUND_ACK (or make the target refuse STATE).
const MAX_RESEND_RUNS: usize = 65_536;

#[derive(Debug, Serialize, Deserialize)]
struct RoundAck {
    round: u32,
    pages: u64,
    /// (first page, page count) runs the target could not verify.
    #[serde(default)]
    resend: Vec<(u64, u64)>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FinalState {
    vcpu: VcpuState,
    pages_per_tick: u32,
    checksum: Option<u32>,
}

/// Counts bytes written through it.
struct Counting<W> {
    inner: W,
    bytes: u64,
}

impl<W: Write> Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.write_vectored(bufs)?;
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Connects to `addr` and migrates `vm` there.
pub fn migrate_out<M: Migratable>(
    vm: &M,
    addr: impl ToSocketAddrs,
    opts: &MigrateOptions,
) -> Result<MigrationReport, MigrationError> {
    let stream = TcpStream::connect(addr).map_err(MigrationError::Connect)?;
    migrate_over(vm, stream, opts)
}

fn configure(stream: &TcpStream, timeout: Duration) -> Result<(), MigrationError> {
    stream.set_nodelay(true).map_err(MigrationError::Socket)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(MigrationError::Socket)?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(MigrationError::Socket)?;
    Ok(())
}

/// Runs the source side over an already connected stream (e.g. one the host
/// agent opened and announced with its own protocol first).
pub fn migrate_over<M: Migratable>(
    vm: &M,
    stream: TcpStream,
    opts: &MigrateOptions,
) -> Result<MigrationReport, MigrationError> {
    let start = Instant::now();
    configure(&stream, opts.io_timeout)?;
    let reader_stream = stream.try_clone().map_err(MigrationError::Socket)?;
    let mut r = BufReader::new(reader_stream);
    let mut w = BufWriter::with_capacity(
        256 << 10,
        Counting {
            inner: stream,
            bytes: 0,
        },
    );
    let config = vm.config();
    let mem = vm.memory();

    PROTOCOL
        .write_json(
            &mut w,
            kind::HELLO,
            &Hello {
                config: config.clone(),
            },
        )
        .and_then(|()| w.flush().map_err(FrameError::from))
        .map_err(frame_err("sending HELLO"))?;
    let ack: Ack = read_json(&mut r, kind::HELLO_ACK).map_err(frame_err("reading HELLO_ACK"))?;
    let handshake = start.elapsed();
    if !ack.ok {
        return Err(MigrationError::TargetRejected(
            ack.error.unwrap_or_default(),
        ));
    }

    vm.start_dirty_log()
        .map_err(vm_err("starting the dirty log"))?;
    let result = precopy_and_commit(vm, mem, &mut r, &mut w, opts, start).map(|mut rep| {
        rep.breakdown.handshake = handshake;
        rep
    });
    if let Err(e) = &result {
        if !matches!(e, MigrationError::CommitUncertain(_)) {
            // Nothing was committed: the target never ran the guest.
            let _ = PROTOCOL.write_json(
                &mut w,
                kind::ABORT,
                &Ack {
                    ok: false,
                    error: Some(e.to_string()),
                },
            );
            let _ = w.flush();
            if let Err(re) = vm.abandon_migration() {
                tracing::error!(error = %re, "could not resume the source after a failed migration");
            }
        }
    }
    result
}

fn precopy_and_commit<M: Migratable, R: Read, W: Write>(
    vm: &M,
    mem: &GuestMemory,
    r: &mut R,
    w: &mut BufWriter<Counting<W>>,
    opts: &MigrateOptions,
    start: Instant,
) -> Result<MigrationReport, MigrationError> {
    let npages = mem.pages();
    let words = npages.div_ceil(64) as usize;
    let mut pages_sent = 0u64;

    // Round 0: everything.
    let all = full_bitmap(npages);
    let mut scratch = Vec::with_capacity(opts.chunk_pages as usize * PAGE_SIZE as usize);
    let t = Instant::now();
    pages_sent += send_pages(w, mem, &all, opts.chunk_pages, Source::Live)?;
    let mut resend = end_round(r, w, 0, npages)?;
    let mut breakdown = Breakdown {
        round0: t.elapsed(),
        ..Breakdown::default()
    };
    let mut bandwidth = npages as f64 * PAGE_SIZE as f64 / t.elapsed().as_secs_f64().max(1e-6);
    let t_later = Instant::now();
    let mut rounds = 1;
    let mut converged = false;

    let mut pending = vec![0u64; words];
    let mut resent_pages = 0u64;
    loop {
        let mut bitmap = vm.dirty_log().map_err(vm_err("reading the dirty log"))?;
        resent_pages += mark_runs(&mut bitmap, &resend);
        let dirty: u64 = bitmap.iter().map(|w| u64::from(w.count_ones())).sum();
        let est = Duration::from_secs_f64(dirty as f64 * PAGE_SIZE as f64 / bandwidth);
        // Pages the target could not verify go once more while the guest
        // runs (from a snapshot, so they cannot tear again) rather than
        // inside the downtime.
        if est <= opts.max_downtime && resend.is_empty() {
            converged = true;
            pending = bitmap;
            break;
        }
        if rounds > opts.max_rounds {
            pending = bitmap;
            break;
        }
        let t = Instant::now();
        let sent = send_pages(
            w,
            mem,
            &bitmap,
            opts.chunk_pages,
            Source::Snapshot(&mut scratch),
        )?;
        resend = end_round(r, w, rounds, sent)?;
        let secs = t.elapsed().as_secs_f64();
        if secs > 0.0 && sent > 64 {
            bandwidth = sent as f64 * PAGE_SIZE as f64 / secs;
        }
        pages_sent += sent;
        rounds += 1;
    }

    // Stop-and-copy.
    breakdown.later_rounds = t_later.elapsed();
    let paused_at = Instant::now();
    vm.pause().map_err(vm_err("pausing the source"))?;
    breakdown.pause = paused_at.elapsed();
    let last = vm
        .dirty_log()
        .map_err(vm_err("reading the final dirty log"))?;
    for (p, l) in pending.iter_mut().zip(&last) {
        *p |= l;
    }
    // The host writes the config page itself (dirty-rate tuning), which the
    // dirty log does not see: always resend it.
    let cfg_page = (guest::CFG_GPA / PAGE_SIZE) as usize;
    pending[cfg_page / 64] |= 1 << (cfg_page % 64);
    let final_pages = send_pages(w, mem, &pending, opts.chunk_pages, Source::Paused)?;
    pages_sent += final_pages;
    let vcpu = vm.vcpu_state().map_err(vm_err("saving the vCPU state"))?;
    let checksum = opts.verify_checksum.then(|| mem.checksum());
    let counter_at_pause = mem.read_u32(guest::CFG_GPA + guest::CFG_COUNTER);
    PROTOCOL
        .write_json(
            w,
            kind::STATE,
            &FinalState {
                vcpu,
                pages_per_tick: mem.read_u32(guest::CFG_GPA + guest::CFG_PAGES_PER_TICK),
                checksum,
            },
        )
        .and_then(|()| w.flush().map_err(FrameError::from))
        .map_err(frame_err("sending the vCPU state"))?;
    breakdown.final_copy = paused_at.elapsed() - breakdown.pause;
    let t = Instant::now();
    let prepared: Ack = read_json(r, kind::PREPARED).map_err(frame_err("reading PREPARED"))?;
    breakdown.prepare = t.elapsed();
    if !prepared.ok {
        return Err(MigrationError::TargetRejected(
            prepared.error.unwrap_or_default(),
        ));
    }

    // Point of no return: fence first, then commit.
    vm.fence();
    let t = Instant::now();
    PROTOCOL
        .write_frame(w, kind::COMMIT, &[])
        .and_then(|()| w.flush().map_err(FrameError::from))
        .map_err(|e| MigrationError::CommitUncertain(format!("sending COMMIT: {e}")))?;
    let _: Ack = read_json(r, kind::STARTED)
        .map_err(|e| MigrationError::CommitUncertain(format!("reading STARTED: {e}")))?;
    breakdown.commit = t.elapsed();
    let downtime = paused_at.elapsed();
    Ok(MigrationReport {
        mem_bytes: mem.size(),
        total: start.elapsed(),
        downtime,
        bytes_sent: w.get_ref().bytes,
        pages_sent,
        rounds,
        final_pages,
        converged,
        resent_pages,
        checksum,
        counter_at_pause,
        breakdown,
    })
}

/// Sets the bits of `runs` (first page, count) in `bitmap`, ignoring pages
/// beyond it; returns how many pages the runs named.
fn mark_runs(bitmap: &mut [u64], runs: &[(u64, u64)]) -> u64 {
    let mut named = 0;
    for &(first, count) in runs {
        named += count;
        let end = first.saturating_add(count).min(bitmap.len() as u64 * 64);
        for page in first..end {
            bitmap[(page / 64) as usize] |= 1 << (page % 64);
        }
    }
    named
}

/// Clears the bits of pages `first .. first+count` in `bitmap`.
fn clear_run(bitmap: &mut [u64], first: u64, count: u64) {
    for page in first..first + count {
        bitmap[(page / 64) as usize] &= !(1 << (page % 64));
    }
}

/// Number of set bits among pages `first .. first+count`.
fn count_bits(bitmap: &[u64], first: u64, count: u64) -> u64 {
    (first..first + count)
        .filter(|&p| bitmap[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .count() as u64
}

fn full_bitmap(npages: u64) -> Vec<u64> {
    let mut v = vec![u64::MAX; npages.div_ceil(64) as usize];
    let rem = npages % 64;
    if rem != 0 {
        if let Some(last) = v.last_mut() {
            *last = (1u64 << rem) - 1;
        }
    }
    v
}

/// Runs of set bits as (first page, page count), each at most `max` long.
pub fn dirty_runs(bitmap: &[u64], max: u32) -> Vec<(u64, u64)> {
    let mut runs = Vec::new();
    let mut cur: Option<(u64, u64)> = None;
    for (wi, &word) in bitmap.iter().enumerate() {
        if word == 0 {
            if let Some(run) = cur.take() {
                runs.push(run);
            }
            continue;
        }
        for bit in 0..64 {
            let page = wi as u64 * 64 + bit;
            if word & (1 << bit) != 0 {
                match &mut cur {
                    Some((s, n)) if *s + *n == page && *n < u64::from(max) => *n += 1,
                    _ => {
                        if let Some(run) = cur.take() {
                            runs.push(run);
                        }
                        cur = Some((page, 1));
                    }
                }
            } else if let Some(run) = cur.take() {
                runs.push(run);
            }
        }
    }
    runs.extend(cur);
    runs
}

/// How pages are read while sending.
enum Source<'a> {
    /// The guest runs, most pages are cold (first pass): send straight from
    /// guest memory as `PAGES_LIVE`, no copy. A page the guest rewrites
    /// between checksum and send fails the target's check; the target asks
    /// for it again.
    Live,
    /// The guest runs and these pages were just dirtied (later rounds): copy
    /// each run into `scratch` first, so the checksum covers exactly the
    /// bytes sent even if the guest writes again. Sent as `PAGES_LIVE`.
    Snapshot(&'a mut Vec<u8>),
    /// The guest is paused: send straight from guest memory as `PAGES`
    /// (every frame must verify).
    Paused,
}

fn send_pages<W: Write>(
    w: &mut W,
    mem: &GuestMemory,
    bitmap: &[u64],
    chunk_pages: u32,
    mut source: Source<'_>,
) -> Result<u64, MigrationError> {
    let mut sent = 0;
    for (first, count) in dirty_runs(bitmap, chunk_pages.max(1)) {
        let gpa = first * PAGE_SIZE;
        let len = count * PAGE_SIZE;
        if !mem.in_range(gpa, len) {
            continue;
        }
        let (frame_kind, data): (u16, &[u8]) = match &mut source {
            Source::Live => (kind::PAGES_LIVE, mem.slice(gpa, len as usize)),
            Source::Snapshot(scratch) => {
                scratch.clear();
                scratch.extend_from_slice(mem.slice(gpa, len as usize));
                (kind::PAGES_LIVE, scratch)
            }
            Source::Paused => (kind::PAGES, mem.slice(gpa, len as usize)),
        };
        PROTOCOL
            .write_frame(w, frame_kind, &[&gpa.to_le_bytes(), data])
            .map_err(frame_err("sending pages"))?;
        sent += count;
    }
    Ok(sent)
}

/// Ends a pre-copy round and waits until the target has applied it, so no
/// backlog sits in socket buffers when the guest is paused. Returns the page
/// runs the target asks to be sent again.
fn end_round<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    round: u32,
    pages: u64,
) -> Result<Vec<(u64, u64)>, MigrationError> {
    PROTOCOL
        .write_json(w, kind::ROUND_END, &RoundEnd { round, pages })
        .and_then(|()| w.flush().map_err(FrameError::from))
        .map_err(frame_err("ending a round"))?;
    let ack: RoundAck = read_json(r, kind::ROUND_ACK).map_err(frame_err("reading ROUND_ACK"))?;
    Ok(ack.resend)
}

fn read_json<R: Read, T: serde::de::DeserializeOwned>(
    r: &mut R,
    want: u16,
) -> Result<T, FrameError> {
    let (k, payload) = PROTOCOL.read_frame(r)?;
    if k == kind::ABORT && want != kind::ABORT {
        let ack: Ack = wire::decode_json(&payload)?;
        return Err(FrameError::Malformed(format!(
            "peer aborted: {}",
            ack.error.unwrap_or_default()
        )));
    }
    if k != want {
        return Err(FrameError::UnexpectedKind {
            expected: format!("{want}"),
            found: k,
        });
    }
    wire::decode_json(&payload)
}

/// Options of the receiving side.
#[derive(Debug, Clone)]
pub struct IncomingOptions {
    pub io_timeout: Duration,
    /// Name for the new VM (defaults to the source's).
    pub rename: Option<String>,
    /// Guest memory prepared before the source connected (fresh from
    /// [`GuestMemory::new`], typically already [`GuestMemory::populate`]d), as
    /// a destination started with the guest's memory size would hold it. Used
    /// when its size matches the source's; otherwise fresh memory is
    /// allocated after HELLO. Must not be shared with a running VM.
    pub memory: Option<Arc<GuestMemory>>,
    /// Populate freshly allocated memory (MADV_POPULATE_WRITE) before
    /// acknowledging HELLO, so incoming pages do not fault one by one. Off by
    /// default: measured on 2 cores it was no faster than faulting pages as
    /// they arrive, because allocating and clearing the pages costs the same
    /// either way, only preparing memory ahead (`memory`) takes it out of the
    /// migration.
    pub populate: bool,
    /// Memory prepared ahead for VMs expected by name (a host agent's
    /// `PrepareIncoming`); used like `memory` when the incoming VM's name
    /// matches and the size fits.
    pub prepared: BTreeMap<String, Arc<GuestMemory>>,
}

impl Default for IncomingOptions {
    fn default() -> Self {
        Self {
            io_timeout: Duration::from_secs(30),
            rename: None,
            memory: None,
            populate: false,
            prepared: BTreeMap::new(),
        }
    }
}

/// Guest memory for an incoming VM: the prepared one when it fits, else
/// fresh (and populated when asked).
fn incoming_memory(
    config: &VmConfig,
    opts: &IncomingOptions,
) -> Result<Arc<GuestMemory>, MigrationError> {
    if let Some(mem) = opts.memory.as_ref().or(opts.prepared.get(&config.name)) {
        if mem.size() == config.mem_bytes {
            return Ok(Arc::clone(mem));
        }
        tracing::warn!(
            prepared = mem.size(),
            wanted = config.mem_bytes,
            "prepared target memory has the wrong size; allocating fresh memory"
        );
    }
    let mem = GuestMemory::new(&config.name, config.mem_bytes)?;
    if opts.populate {
        mem.populate()?;
    }
    Ok(Arc::new(mem))
}

/// Receives a migration on `stream`; returns the running VM once committed.
pub fn migrate_in(
    stream: TcpStream,
    opts: &IncomingOptions,
) -> Result<(Vm, IncomingReport), MigrationError> {
    configure(&stream, opts.io_timeout)?;
    let mut w = BufWriter::new(stream.try_clone().map_err(MigrationError::Socket)?);
    let mut r = BufReader::with_capacity(64 << 10, stream);

    let hello: Hello = read_json(&mut r, kind::HELLO).map_err(frame_err("reading HELLO"))?;
    let mut config = hello.config;
    if let Some(name) = &opts.rename {
        config.name = name.clone();
    }
    let setup = config
        .validate()
        .map_err(vm_err("validating the config"))
        .and_then(|()| incoming_memory(&config, opts))
        .and_then(|mem| {
            Vm::with_memory(config.clone(), mem).map_err(vm_err("creating the target VM"))
        });
    let vm = match setup {
        Ok(vm) => vm,
        Err(e) => {
            let _ = PROTOCOL.write_json(
                &mut w,
                kind::HELLO_ACK,
                &Ack {
                    ok: false,
                    error: Some(e.to_string()),
                },
            );
            let _ = w.flush();
            return Err(e);
        }
    };
    PROTOCOL
        .write_json(
            &mut w,
            kind::HELLO_ACK,
            &Ack {
                ok: true,
                error: None,
            },
        )
        .and_then(|()| w.flush().map_err(FrameError::from))
        .map_err(frame_err("sending HELLO_ACK"))?;

    let mem = Arc::clone(vm.memory());
    let mut bytes_received = 0u64;
    let mut pages_received = 0u64;
    // Pages whose last frame failed its checksum (PAGES_LIVE only).
    let mut unverified = vec![0u64; mem.pages().div_ceil(64) as usize];
    let mut unverified_pages = 0u64;
    loop {
        let header = PROTOCOL
            .read_header(&mut r)
            .map_err(frame_err("reading a frame header"))?;
        bytes_received += wire::HEADER_LEN as u64 + u64::from(header.len);
        match header.kind {
            kind::PAGES | kind::PAGES_LIVE => {
                let len = u64::from(header.len);
                if len < 8 || (len - 8) % PAGE_SIZE != 0 {
                    return Err(MigrationError::BadPages { gpa: 0, len });
                }
                let mut gpa_bytes = [0u8; 8];
                r.read_exact(&mut gpa_bytes)
                    .map_err(|e| MigrationError::Frame {
                        step: "reading pages",
                        source: e.into(),
                    })?;
                let gpa = u64::from_le_bytes(gpa_bytes);
                let data_len = len - 8;
                if gpa % PAGE_SIZE != 0 || !mem.in_range(gpa, data_len) {
                    return Err(MigrationError::BadPages { gpa, len: data_len });
                }
                // The target vCPU has never run and is parked: writing its RAM
                // directly is safe. A bad CRC aborts the whole migration
                // (PAGES) or marks the pages unverified until a later frame
                // verifies (PAGES_LIVE); STATE is refused while any page is
                // unverified, so unverified bytes are never executed.
                let dst = mem.slice_mut(gpa, data_len as usize);
                r.read_exact(dst).map_err(|e| MigrationError::Frame {
                    step: "reading pages",
                    source: e.into(),
                })?;
                let first = gpa / PAGE_SIZE;
                let count = data_len / PAGE_SIZE;
                let before = if unverified_pages == 0 {
                    0
                } else {
                    count_bits(&unverified, first, count)
                };
                match wire::verify_crc(header.crc, &[&gpa_bytes, dst]) {
                    Ok(()) => {
                        if before > 0 {
                            clear_run(&mut unverified, first, count);
                            unverified_pages -= before;
                        }
                    }
                    Err(e) if header.kind == kind::PAGES => {
                        return Err(frame_err("verifying pages")(e));
                    }
                    Err(_) => {
                        mark_runs(&mut unverified, &[(first, count)]);
                        unverified_pages += count - before;
                    }
                }
                pages_received += count;
            }
            kind::ROUND_END => {
                let mut payload = vec![0u8; header.len as usize];
                r.read_exact(&mut payload)
                    .map_err(|e| MigrationError::Frame {
                        step: "reading ROUND_END",
                        source: e.into(),
                    })?;
                wire::verify_crc(header.crc, &[&payload])
                    .map_err(frame_err("verifying ROUND_END"))?;
                let round: RoundEnd =
                    wire::decode_json(&payload).map_err(frame_err("decoding ROUND_END"))?;
                let mut resend = Vec::new();
                if unverified_pages > 0 {
                    resend = dirty_runs(&unverified, u32::MAX);
                    resend.truncate(MAX_RESEND_RUNS);
                }
                let ack = RoundAck {
                    round: round.round,
                    pages: round.pages,
                    resend,
                };
                PROTOCOL
                    .write_json(&mut w, kind::ROUND_ACK, &ack)
                    .and_then(|()| w.flush().map_err(FrameError::from))
                    .map_err(frame_err("sending ROUND_ACK"))?;
            }
            kind::ABORT => {
                let mut payload = vec![0u8; header.len as usize];
                let _ = r.read_exact(&mut payload);
                let reason = wire::decode_json::<Ack>(&payload)
                    .ok()
                    .and_then(|a| a.error)
                    .unwrap_or_default();
                return Err(MigrationError::SourceAborted(reason));
            }
            kind::STATE => {
                let mut payload = vec![0u8; header.len as usize];
                r.read_exact(&mut payload)
                    .map_err(|e| MigrationError::Frame {
                        step: "reading STATE",
                        source: e.into(),
                    })?;
                wire::verify_crc(header.crc, &[&payload]).map_err(frame_err("verifying STATE"))?;
                let state: FinalState =
                    wire::decode_json(&payload).map_err(frame_err("decoding STATE"))?;
                let prepared = if unverified_pages > 0 {
                    Err(MigrationError::UnverifiedPages {
                        pages: unverified_pages,
                    })
                } else {
                    prepare(&vm, &mem, &state)
                };
                let ack = match &prepared {
                    Ok(()) => Ack {
                        ok: true,
                        error: None,
                    },
                    Err(e) => Ack {
                        ok: false,
                        error: Some(e.to_string()),
                    },
                };
                PROTOCOL
                    .write_json(&mut w, kind::PREPARED, &ack)
                    .and_then(|()| w.flush().map_err(FrameError::from))
                    .map_err(frame_err("sending PREPARED"))?;
                prepared?;
                // Wait for the commit; anything else discards the VM unrun.
                match PROTOCOL.read_frame(&mut r) {
                    Ok((kind::COMMIT, _)) => {}
                    Ok((k, _)) => {
                        return Err(MigrationError::NotCommitted(format!("got frame kind {k}")));
                    }
                    Err(e) => return Err(MigrationError::NotCommitted(e.to_string())),
                }
                vm.resume().map_err(vm_err("resuming the target"))?;
                PROTOCOL
                    .write_json(
                        &mut w,
                        kind::STARTED,
                        &Ack {
                            ok: true,
                            error: None,
                        },
                    )
                    .and_then(|()| w.flush().map_err(FrameError::from))
                    .map_err(|e| {
                        // The guest runs here now; the source is fenced anyway.
                        tracing::warn!(error = %e, "could not confirm STARTED to the source");
                        frame_err("sending STARTED")(e)
                    })
                    .ok();
                let report = IncomingReport {
                    config: vm.config(),
                    bytes_received,
                    pages_received,
                    checksum: state.checksum,
                };
                return Ok((vm, report));
            }
            other => {
                return Err(MigrationError::Frame {
                    step: "reading the stream",
                    source: FrameError::UnexpectedKind {
                        expected: "PAGES, PAGES_LIVE, ROUND_END, STATE or ABORT".into(),
                        found: other,
                    },
                });
            }
        }
    }
}

fn prepare(vm: &Vm, mem: &GuestMemory, state: &FinalState) -> Result<(), MigrationError> {
    if let Some(source_crc) = state.checksum {
        let target_crc = mem.checksum();
        if target_crc != source_crc {
            return Err(MigrationError::ChecksumMismatch {
                source_crc,
                target_crc,
            });
        }
    }
    vm.load_vcpu_state(&state.vcpu)
        .map_err(vm_err("loading the vCPU state"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_split_and_merge() {
        let mut bm = vec![0u64; 3];
        bm[0] = 0b1110_0001;
        bm[1] = 1 << 63;
        bm[2] = 1;
        assert_eq!(dirty_runs(&bm, 256), vec![(0, 1), (5, 3), (127, 2)]);
        assert_eq!(dirty_runs(&bm, 2), vec![(0, 1), (5, 2), (7, 1), (127, 2)]);
        let full = full_bitmap(130);
        assert_eq!(dirty_runs(&full, 1000), vec![(0, 130)]);
    }

    #[test]
    fn resend_runs_mark_and_clear() {
        let mut bm = vec![0u64; 3];
        assert_eq!(mark_runs(&mut bm, &[(62, 4), (190, 10)]), 14);
        // Pages past the bitmap are ignored.
        assert_eq!(dirty_runs(&bm, u32::MAX), vec![(62, 4), (190, 2)]);
        assert_eq!(count_bits(&bm, 60, 8), 4);
        clear_run(&mut bm, 63, 2);
        assert_eq!(dirty_runs(&bm, u32::MAX), vec![(62, 1), (65, 1), (190, 2)]);
        assert_eq!(count_bits(&bm, 0, 192), 4);
    }
}
