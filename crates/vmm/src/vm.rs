//! One KVM virtual machine: one vCPU on its own thread, memfd-backed RAM,
//! pause/resume, vCPU state save/restore and the dirty-page log.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, Msrs, kvm_debugregs, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_run, kvm_segment, kvm_sregs, kvm_userspace_memory_region,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::guest::{self, PAGE_SIZE};
use crate::memory::{GuestMemory, MemoryError};

/// How long control operations wait for the vCPU thread before giving up.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// MSRs saved with the vCPU state: the TSC (so guest time continues), the
/// SYSENTER triple and PAT. The guest program uses none of the others, and it
/// runs without an in-kernel irqchip, so there is no LAPIC state to carry.
const SAVED_MSRS: [u32; 5] = [0x10, 0x174, 0x175, 0x176, 0x277];

/// What a VM is made of; plain data, carried in snapshots and migrations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// Name for humans and logs (also names the memfd).
    pub name: String,
    /// Guest RAM in bytes (multiple of 4 KiB, `MIN_MEM_BYTES..=MAX_MEM_BYTES`).
    pub mem_bytes: u64,
    /// Pages the guest dirties per tick (see [`guest`]); tunable at run time.
    pub pages_per_tick: u32,
    /// Tick length in microseconds; 0 means the guest is never held (free run).
    pub tick_us: u32,
}

impl VmConfig {
    /// A VM of `mem_mib` MiB dirtying `dirty_bytes_per_sec` with 1 ms ticks.
    pub fn new(name: impl Into<String>, mem_mib: u64, dirty_bytes_per_sec: u64) -> Self {
        let tick_us = 1000;
        Self {
            name: name.into(),
            mem_bytes: mem_mib << 20,
            pages_per_tick: guest::pages_per_tick_for_rate(dirty_bytes_per_sec, tick_us),
            tick_us,
        }
    }

    /// Checks the sizes the guest program can handle.
    pub fn validate(&self) -> Result<(), VmError> {
        if self.mem_bytes < guest::MIN_MEM_BYTES
            || self.mem_bytes > guest::MAX_MEM_BYTES
            || self.mem_bytes % PAGE_SIZE != 0
        {
            return Err(VmError::BadConfig(format!(
                "mem_bytes {} must be a multiple of 4 KiB in {}..={}",
                self.mem_bytes,
                guest::MIN_MEM_BYTES,
                guest::MAX_MEM_BYTES
            )));
        }
        Ok(())
    }
}

/// Architectural vCPU state: everything needed to continue the guest in a
/// fresh VM on the same kind of host. Plain serde data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The legacy 4 KiB `KVM_GET_XSAVE` region (x87/SSE/AVX state).
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub msrs: Vec<kvm_msr_entry>,
}

/// Errors of VM operations; `step` names the KVM call that failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("bad VM config: {0}")]
    BadConfig(String),
    #[error("guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("KVM {step} failed: {source}")]
    Kvm {
        step: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("spawning the vCPU thread failed: {0}")]
    SpawnVcpu(#[source] std::io::Error),
    #[error("installing the vCPU kick signal handler failed: {0}")]
    Signal(#[source] std::io::Error),
    #[error("vCPU did not reach {what} within {timeout:?}")]
    Timeout {
        what: &'static str,
        timeout: Duration,
    },
    #[error("operation needs a paused VM, but it is {0:?}")]
    NotPaused(RunState),
    #[error("VM was migrated away or fenced; it must never run here again")]
    Fenced,
    #[error("the guest stopped: {0}")]
    GuestFailed(String),
}

fn kvm_err(step: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { step, source }
}

/// Run state of a VM as the control side sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// The vCPU thread is parked; the vCPU state is stable and can be saved.
    Paused,
    /// The vCPU runs the guest.
    Running,
    /// A pause was requested and the vCPU thread has not parked yet.
    Pausing,
    /// The vCPU thread ended (stop, guest failure or fence).
    Stopped,
}

/// Point-in-time view of a VM.
#[derive(Debug, Clone)]
pub struct VmStatus {
    pub state: RunState,
    /// Last counter value the guest reported.
    pub counter: u32,
    /// The guest finished its prefill pass.
    pub ready: bool,
    /// VM exits handled so far.
    pub exits: u64,
    /// When this VM instance first saw a progress report, and its counter.
    pub first_progress: Option<(Instant, u32)>,
    /// When this VM instance last saw a progress report, and its counter.
    pub last_progress: Option<(Instant, u32)>,
    /// Guest failure, if the vCPU thread stopped because of one.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

struct Ctl {
    request: Request,
    parked: bool,
    exited: bool,
    status: VmStatus,
}

struct Shared {
    ctl: Mutex<Ctl>,
    /// The vCPU thread waits here (pacing, parked).
    vcpu_cv: Condvar,
    /// Control-side waiters (pause ack, progress) wait here.
    status_cv: Condvar,
    vcpu: Mutex<VcpuFd>,
    mem: Arc<GuestMemory>,
    tick: Option<Duration>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Ctl> {
        self.ctl.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running (or paused) VM.
pub struct Vm {
    config: VmConfig,
    _kvm: Kvm,
    vm_fd: VmFd,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pthread: libc::pthread_t,
    fenced: AtomicBool,
    dirty_logging: AtomicBool,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Vm {
    /// Creates a VM with fresh memory and the guest program loaded, paused at
    /// its first instruction. Call [`Vm::resume`] to run it.
    pub fn new(config: VmConfig) -> Result<Self, VmError> {
        config.validate()?;
        let mem = GuestMemory::new(&config.name, config.mem_bytes)?;
        load_guest(&mem, &config);
        let vm = Self::build(config, Arc::new(mem))?;
        {
            let vcpu = vm.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
            set_boot_state(&vcpu)?;
        }
        Ok(vm)
    }

    /// Creates and starts a VM.
    pub fn boot(config: VmConfig) -> Result<Self, VmError> {
        let vm = Self::new(config)?;
        vm.resume()?;
        Ok(vm)
    }

    /// Creates a paused VM over existing guest memory (a memfd inherited from a
    /// previous process, a migration target's or a snapshot's) and loads
    /// `state` into its vCPU. Call [`Vm::resume`] to continue the guest.
    pub fn restore(
        config: VmConfig,
        mem: Arc<GuestMemory>,
        state: &VcpuState,
    ) -> Result<Self, VmError> {
        let vm = Self::with_memory(config, mem)?;
        vm.load_vcpu_state(state)?;
        Ok(vm)
    }

    /// Creates a paused VM over existing memory without touching the vCPU
    /// (a migration target fills memory first and loads the state last).
    pub fn with_memory(config: VmConfig, mem: Arc<GuestMemory>) -> Result<Self, VmError> {
        config.validate()?;
        if mem.size() != config.mem_bytes {
            return Err(VmError::BadConfig(format!(
                "memory is {} bytes, config says {}",
                mem.size(),
                config.mem_bytes
            )));
        }
        Self::build(config, mem)
    }

    fn build(config: VmConfig, mem: Arc<GuestMemory>) -> Result<Self, VmError> {
        install_kick_handler()?;
        let kvm = Kvm::new().map_err(kvm_err("open /dev/kvm"))?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        set_memory_region(&vm_fd, &mem, false)?;
        let vcpu = vm_fd.create_vcpu(0).map_err(kvm_err("KVM_CREATE_VCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;

        let counter = mem.read_u32(guest::CFG_GPA + guest::CFG_COUNTER);
        let ready = mem.read_u32(guest::CFG_GPA + guest::CFG_READY) != 0;
        let shared = Arc::new(Shared {
            ctl: Mutex::new(Ctl {
                request: Request::Pause,
                parked: false,
                exited: false,
                status: VmStatus {
                    state: RunState::Pausing,
                    counter,
                    ready,
                    exits: 0,
                    first_progress: None,
                    last_progress: None,
                    error: None,
                },
            }),
            vcpu_cv: Condvar::new(),
            status_cv: Condvar::new(),
            vcpu: Mutex::new(vcpu),
            mem,
            tick: (config.tick_us > 0).then(|| Duration::from_micros(u64::from(config.tick_us))),
        });
        let thread_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu-{}", config.name))
            .spawn(move || vcpu_thread(&thread_shared))
            .map_err(VmError::SpawnVcpu)?;
        let pthread = std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle);
        let vm = Self {
            config,
            _kvm: kvm,
            vm_fd,
            shared,
            thread: Mutex::new(Some(handle)),
            pthread,
            fenced: AtomicBool::new(false),
            dirty_logging: AtomicBool::new(false),
        };
        vm.wait_parked()?;
        Ok(vm)
    }

    /// The VM's config (with the current `pages_per_tick`).
    pub fn config(&self) -> VmConfig {
        let mut c = self.config.clone();
        c.pages_per_tick = self.pages_per_tick();
        c
    }

    /// Guest memory.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.shared.mem
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        self.shared.lock().status.clone()
    }

    /// Guest pages dirtied per tick.
    pub fn pages_per_tick(&self) -> u32 {
        self.shared
            .mem
            .read_u32(guest::CFG_GPA + guest::CFG_PAGES_PER_TICK)
    }

    /// Tunes the guest's dirty rate (the guest reads this word every tick).
    pub fn set_pages_per_tick(&self, pages: u32) {
        self.shared
            .mem
            .write_u32(guest::CFG_GPA + guest::CFG_PAGES_PER_TICK, pages);
    }

    /// Pauses the vCPU and waits until its thread has parked with the vCPU
    /// state stable (pending port I/O completed). Idempotent.
    pub fn pause(&self) -> Result<(), VmError> {
        self.request_pause()?;
        self.wait_parked()
    }

    /// Asks the vCPU to pause and kicks it, without waiting. Pair with
    /// [`Vm::wait_paused`]; lets a caller pause many VMs with overlapping
    /// latencies.
    pub fn request_pause(&self) -> Result<(), VmError> {
        {
            let mut ctl = self.shared.lock();
            if ctl.exited {
                return Err(self.stopped_error(&ctl));
            }
            if ctl.parked {
                return Ok(());
            }
            ctl.request = Request::Pause;
            ctl.status.state = RunState::Pausing;
        }
        self.shared.vcpu_cv.notify_all();
        self.kick();
        Ok(())
    }

    /// Waits until a requested pause has taken effect.
    pub fn wait_paused(&self) -> Result<(), VmError> {
        self.wait_parked()
    }

    /// Lets the vCPU run. Refused on a fenced (migrated-away) VM.
    pub fn resume(&self) -> Result<(), VmError> {
        if self.fenced.load(Ordering::SeqCst) {
            return Err(VmError::Fenced);
        }
        let mut ctl = self.shared.lock();
        if ctl.exited {
            return Err(self.stopped_error(&ctl));
        }
        ctl.request = Request::Run;
        ctl.parked = false;
        ctl.status.state = RunState::Running;
        drop(ctl);
        self.shared.vcpu_cv.notify_all();
        Ok(())
    }

    /// Marks the VM as never to run again here (its guest now lives
    /// elsewhere) and stops its vCPU thread. Later `resume` calls fail.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
        self.stop();
    }

    /// True once [`Vm::fence`] was called.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    /// Stops the vCPU thread for good and joins it.
    pub fn stop(&self) {
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(handle) = handle else { return };
        {
            let mut ctl = self.shared.lock();
            ctl.request = Request::Stop;
        }
        self.shared.vcpu_cv.notify_all();
        // The thread is alive (not joined yet), so its pthread_t is valid.
        self.kick_thread();
        let _ = handle.join();
    }

    fn kick(&self) {
        if self
            .thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
        {
            self.kick_thread();
        }
    }

    fn kick_thread(&self) {
        // SAFETY: `pthread` belongs to the vCPU thread, which has not been
        // joined yet (callers check), so the id is valid; the signal has a
        // handler installed, so it cannot terminate the process.
        unsafe {
            libc::pthread_kill(self.pthread, kick_signal());
        }
    }

    fn stopped_error(&self, ctl: &Ctl) -> VmError {
        if self.fenced.load(Ordering::SeqCst) {
            VmError::Fenced
        } else {
            VmError::GuestFailed(ctl.status.error.clone().unwrap_or_else(|| "stopped".into()))
        }
    }

    fn wait_parked(&self) -> Result<(), VmError> {
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let mut ctl = self.shared.lock();
        while !ctl.parked {
            if ctl.exited {
                return Err(self.stopped_error(&ctl));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Timeout {
                    what: "the parked state",
                    timeout: CONTROL_TIMEOUT,
                });
            }
            let (guard, waited) = self
                .shared
                .status_cv
                .wait_timeout(ctl, (deadline - now).min(Duration::from_millis(2)))
                .unwrap_or_else(|e| e.into_inner());
            ctl = guard;
            if waited.timed_out() && !ctl.parked && ctl.request == Request::Pause {
                // Belt and braces: kick again in case a kick was absorbed
                // somewhere we did not foresee.
                drop(ctl);
                self.shared.vcpu_cv.notify_all();
                self.kick();
                ctl = self.shared.lock();
            }
        }
        Ok(())
    }

    /// Waits until `pred(status)` holds, or `timeout` passes.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&VmStatus) -> bool,
    ) -> Result<VmStatus, VmError> {
        let deadline = Instant::now() + timeout;
        let mut ctl = self.shared.lock();
        loop {
            if pred(&ctl.status) {
                return Ok(ctl.status.clone());
            }
            if ctl.exited {
                return Err(self.stopped_error(&ctl));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(VmError::Timeout {
                    what: "the awaited guest condition",
                    timeout,
                });
            }
            ctl = self
                .shared
                .status_cv
                .wait_timeout(ctl, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn require_parked(&self) -> Result<(), VmError> {
        let ctl = self.shared.lock();
        if ctl.parked {
            Ok(())
        } else {
            Err(VmError::NotPaused(ctl.status.state))
        }
    }

    /// Saves the vCPU state. The VM must be paused.
    pub fn save_vcpu_state(&self) -> Result<VcpuState, VmError> {
        self.require_parked()?;
        let vcpu = self.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let mut msrs = Msrs::from_entries(
            &SAVED_MSRS
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect::<Vec<_>>(),
        )
        .map_err(|_| VmError::BadConfig("MSR list too long".into()))?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm_err("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?,
            xsave: vcpu
                .get_xsave()
                .map_err(kvm_err("KVM_GET_XSAVE"))?
                .region
                .to_vec(),
            xcrs: vcpu.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?,
            debugregs: vcpu
                .get_debug_regs()
                .map_err(kvm_err("KVM_GET_DEBUGREGS"))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?,
            msrs: msrs.as_slice()[..n].to_vec(),
        })
    }

    /// Loads a vCPU state. The VM must be paused.
    pub fn load_vcpu_state(&self, state: &VcpuState) -> Result<(), VmError> {
        self.require_parked()?;
        let vcpu = self.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        vcpu.set_sregs(&state.sregs)
            .map_err(kvm_err("KVM_SET_SREGS"))?;
        vcpu.set_regs(&state.regs)
            .map_err(kvm_err("KVM_SET_REGS"))?;
        let mut xsave = kvm_xsave::default();
        if state.xsave.len() != xsave.region.len() {
            return Err(VmError::BadConfig(format!(
                "xsave region has {} words, expected {}",
                state.xsave.len(),
                xsave.region.len()
            )));
        }
        xsave.region.copy_from_slice(&state.xsave);
        // SAFETY: `xsave` is the legacy 4 KiB KVM_GET_XSAVE layout; this
        // process never asks for dynamic xfeature permission
        // (ARCH_REQ_XCOMP_GUEST_PERM), so KVM reads no more than that struct.
        unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
        vcpu.set_xcrs(&state.xcrs)
            .map_err(kvm_err("KVM_SET_XCRS"))?;
        vcpu.set_debug_regs(&state.debugregs)
            .map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
        vcpu.set_mp_state(state.mp_state)
            .map_err(kvm_err("KVM_SET_MP_STATE"))?;
        vcpu.set_vcpu_events(&state.events)
            .map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
        let msrs = Msrs::from_entries(&state.msrs)
            .map_err(|_| VmError::BadConfig("MSR list too long".into()))?;
        vcpu.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
        drop(vcpu);
        let counter = self
            .shared
            .mem
            .read_u32(guest::CFG_GPA + guest::CFG_COUNTER);
        let ready = self.shared.mem.read_u32(guest::CFG_GPA + guest::CFG_READY) != 0;
        let mut ctl = self.shared.lock();
        ctl.status.counter = counter;
        ctl.status.ready = ready;
        Ok(())
    }

    /// Keeps (or stops keeping) this VM's KVM fds (VM and vCPU) open across
    /// `exec`. Phase 3 uses it to move the kernel-side VM teardown (memslot
    /// and MMU freeing, SRCU grace periods) out of the freeze window: the
    /// successor closes the old fds after it has resumed the guests. The
    /// fds are useless to the successor otherwise (KVM binds a VM to the mm
    /// that created it).
    pub fn kvm_fds_inherit_on_exec(
        &self,
        inherit: bool,
    ) -> std::io::Result<Vec<std::os::fd::RawFd>> {
        use std::os::fd::AsRawFd;
        let vcpu = self.shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let fds = vec![self.vm_fd.as_raw_fd(), vcpu.as_raw_fd()];
        for &fd in &fds {
            crate::memory::set_cloexec(fd, !inherit)?;
        }
        Ok(fds)
    }

    /// Turns on KVM's dirty-page log for guest RAM and clears it, so the next
    /// [`Vm::dirty_bitmap`] reports pages written from now on.
    pub fn start_dirty_log(&self) -> Result<(), VmError> {
        set_memory_region(&self.vm_fd, &self.shared.mem, true)?;
        self.dirty_logging.store(true, Ordering::SeqCst);
        self.dirty_bitmap()?;
        Ok(())
    }

    /// Turns the dirty-page log off again.
    pub fn stop_dirty_log(&self) -> Result<(), VmError> {
        if self.dirty_logging.swap(false, Ordering::SeqCst) {
            set_memory_region(&self.vm_fd, &self.shared.mem, false)?;
        }
        Ok(())
    }

    /// Fetches and clears the dirty bitmap (bit `i` = guest page `i`).
    pub fn dirty_bitmap(&self) -> Result<Vec<u64>, VmError> {
        self.vm_fd
            .get_dirty_log(0, self.shared.mem.size() as usize)
            .map_err(kvm_err("KVM_GET_DIRTY_LOG"))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn set_memory_region(vm_fd: &VmFd, mem: &GuestMemory, log_dirty: bool) -> Result<(), VmError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: if log_dirty {
            KVM_MEM_LOG_DIRTY_PAGES
        } else {
            0
        },
        guest_phys_addr: 0,
        memory_size: mem.size(),
        userspace_addr: mem.host_addr(),
    };
    // SAFETY: the region describes the live mapping owned by `mem`, which the
    // VM keeps alive (via its Arc) for as long as the VM fd exists.
    unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))
}

/// Writes the program and the config block into fresh guest memory.
fn load_guest(mem: &GuestMemory, config: &VmConfig) {
    mem.slice_mut(guest::CODE_GPA, guest::PROGRAM.len())
        .copy_from_slice(&guest::PROGRAM);
    let cfg = guest::CFG_GPA;
    mem.write_u32(cfg + guest::CFG_MAGIC, guest::CFG_MAGIC_VALUE);
    mem.write_u32(cfg + guest::CFG_PAGES_PER_TICK, config.pages_per_tick);
    mem.write_u32(cfg + guest::CFG_REGION_START, guest::REGION_START as u32);
    mem.write_u32(cfg + guest::CFG_REGION_END, config.mem_bytes as u32);
    mem.write_u32(cfg + guest::CFG_COUNTER, 0);
    mem.write_u32(cfg + guest::CFG_READY, 0);
}

/// 32-bit protected mode, flat segments, paging off, at the program entry.
fn set_boot_state(vcpu: &VcpuFd) -> Result<(), VmError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let flat = |selector: u16, type_: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: 1,
        s: 1,
        l: 0,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(0x08, 0b1011); // code: execute/read, accessed
    let data = flat(0x10, 0b0011); // data: read/write, accessed
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.cr0 |= 1; // PE
    sregs.cr0 &= !(1 << 31); // PG off
    vcpu.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rip: guest::CODE_GPA,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))
}

// ---------------------------------------------------------------------------
// vCPU thread and kick signal

thread_local! {
    /// The `kvm_run` page of the vCPU this thread runs, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work: one volatile store. Setting immediate_exit
    // makes a KVM_RUN that is about to start (or restart) return EINTR, which
    // closes the race between checking the pause flag and entering the guest.
    let _ = KVM_RUN.try_with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is the mmapped kvm_run of the VcpuFd this
            // thread owns (via its Arc) for as long as the pointer is set.
            unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*run).immediate_exit), 1) };
        }
    });
    std::sync::atomic::fence(Ordering::SeqCst);
}

fn install_kick_handler() -> Result<(), VmError> {
    static ONCE: Once = Once::new();
    static mut RESULT: i32 = 0;
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value
        // that is filled in before use.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = kick_handler as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO; // no SA_RESTART: KVM_RUN must see EINTR
        // SAFETY: installing a handler that only does a volatile store for a
        // real-time signal this crate owns; `act` is fully initialised.
        let rc = unsafe { libc::sigaction(kick_signal(), &act, std::ptr::null_mut()) };
        if rc != 0 {
            // SAFETY: written once inside call_once, read only after it.
            unsafe { RESULT = std::io::Error::last_os_error().raw_os_error().unwrap_or(-1) };
        }
    });
    // SAFETY: read after call_once completed; never written again.
    let rc = unsafe { RESULT };
    if rc != 0 {
        return Err(VmError::Signal(std::io::Error::from_raw_os_error(rc)));
    }
    Ok(())
}

fn vcpu_thread(shared: &Shared) {
    {
        let mut vcpu = shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let run: *mut kvm_run = vcpu.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run));
    }
    let result = vcpu_loop(shared);
    KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    let mut ctl = shared.lock();
    ctl.exited = true;
    ctl.parked = false;
    ctl.status.state = RunState::Stopped;
    if let Err(e) = result {
        tracing::warn!(error = %e, "vCPU stopped");
        ctl.status.error = Some(e);
    }
    drop(ctl);
    shared.status_cv.notify_all();
}

/// Clears `immediate_exit` after a kick has been consumed.
fn clear_immediate_exit(vcpu: &mut VcpuFd) {
    vcpu.set_kvm_immediate_exit(0);
}

fn vcpu_loop(shared: &Shared) -> Result<(), String> {
    // An I/O exit leaves the OUT half-done until the next KVM_RUN; it must be
    // completed before the state is saved (KVM API: run with immediate_exit).
    let mut io_pending = false;
    let mut next_tick = Instant::now();
    loop {
        // Control point: honour pause/stop requests.
        {
            let mut ctl = shared.lock();
            if ctl.request != Request::Run {
                if io_pending {
                    drop(ctl);
                    let mut vcpu = shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
                    vcpu.set_kvm_immediate_exit(1);
                    match vcpu.run() {
                        Err(e) if e.errno() == libc::EINTR => {}
                        Ok(VcpuExit::Intr) => {}
                        Ok(other) => {
                            return Err(format!("unexpected exit completing I/O: {other:?}"));
                        }
                        Err(e) => return Err(format!("KVM_RUN completing I/O: {e}")),
                    }
                    clear_immediate_exit(&mut vcpu);
                    io_pending = false;
                    continue;
                }
                // The guest stores its counter before it reports it, so a pause
                // between the two leaves the report one behind: while parked,
                // the status shows what guest memory (the truth a snapshot or
                // a migration carries) holds.
                ctl.status.counter = shared.mem.read_u32(guest::CFG_GPA + guest::CFG_COUNTER);
                ctl.parked = true;
                if ctl.request == Request::Pause {
                    ctl.status.state = RunState::Paused;
                }
                shared.status_cv.notify_all();
                while ctl.request == Request::Pause {
                    ctl = shared.vcpu_cv.wait(ctl).unwrap_or_else(|e| e.into_inner());
                }
                if ctl.request == Request::Stop {
                    return Ok(());
                }
                ctl.parked = false;
                ctl.status.state = RunState::Running;
                next_tick = Instant::now();
            }
        }

        let mut vcpu = shared.vcpu.lock().unwrap_or_else(|e| e.into_inner());
        let exit = vcpu.run();
        let mut progress = None;
        match exit {
            Err(e) if e.errno() == libc::EINTR => {
                clear_immediate_exit(&mut vcpu);
                continue;
            }
            Err(e) => return Err(format!("KVM_RUN: {e}")),
            Ok(VcpuExit::Intr) => {
                clear_immediate_exit(&mut vcpu);
                continue;
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                io_pending = true;
                let mut word = [0u8; 4];
                let n = data.len().min(4);
                word[..n].copy_from_slice(&data[..n]);
                let value = u32::from_le_bytes(word);
                match port {
                    guest::PORT_PROGRESS => progress = Some(value),
                    guest::PORT_READY => {
                        drop(vcpu);
                        let mut ctl = shared.lock();
                        ctl.status.ready = true;
                        ctl.status.exits += 1;
                        drop(ctl);
                        shared.status_cv.notify_all();
                        continue;
                    }
                    _ => {}
                }
            }
            Ok(VcpuExit::IoIn(_, data)) => {
                io_pending = true;
                data.fill(0);
            }
            Ok(VcpuExit::Hlt) => return Err("guest halted".into()),
            Ok(VcpuExit::Shutdown) => return Err("guest shutdown (triple fault)".into()),
            Ok(other) => return Err(format!("unhandled VM exit {other:?}")),
        }
        drop(vcpu);

        let mut ctl = shared.lock();
        ctl.status.exits += 1;
        if let Some(counter) = progress {
            let now = Instant::now();
            ctl.status.counter = counter;
            ctl.status.last_progress = Some((now, counter));
            if ctl.status.first_progress.is_none() {
                ctl.status.first_progress = Some((now, counter));
            }
            shared.status_cv.notify_all();
            // Tick barrier: hold the guest until the next tick of the clock.
            if let Some(tick) = shared.tick {
                next_tick += tick;
                if now > next_tick + tick * 50 {
                    next_tick = now; // fell far behind: do not burst to catch up
                }
                while ctl.request == Request::Run {
                    let now = Instant::now();
                    if now >= next_tick {
                        break;
                    }
                    ctl = shared
                        .vcpu_cv
                        .wait_timeout(ctl, next_tick - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(name: &str, rate: u64) -> VmConfig {
        VmConfig::new(name, 16, rate)
    }

    #[test]
    fn guest_counts_and_pauses() {
        let vm = Vm::boot(small("count", 10_000_000)).unwrap();
        let st = vm
            .wait_until(Duration::from_secs(10), |s| s.ready && s.counter >= 20)
            .unwrap();
        assert!(st.ready);
        vm.pause().unwrap();
        let c1 = vm.status().counter;
        assert_eq!(vm.status().state, RunState::Paused);
        // Paused: the counter in guest memory matches the last report.
        assert_eq!(
            vm.memory().read_u32(guest::CFG_GPA + guest::CFG_COUNTER),
            c1
        );
        vm.resume().unwrap();
        vm.wait_until(Duration::from_secs(10), |s| s.counter >= c1 + 5)
            .unwrap();
    }

    #[test]
    fn state_moves_to_a_fresh_vm_sharing_memory() {
        let vm = Vm::boot(small("move", 4_000_000)).unwrap();
        vm.wait_until(Duration::from_secs(10), |s| s.counter >= 10)
            .unwrap();
        vm.pause().unwrap();
        let counter = vm.status().counter;
        let state = vm.save_vcpu_state().unwrap();
        let sum = vm.memory().checksum();
        let mem = Arc::clone(vm.memory());
        let config = vm.config();
        vm.fence();
        assert!(matches!(vm.resume(), Err(VmError::Fenced)));
        drop(vm);

        let vm2 = Vm::restore(config, mem, &state).unwrap();
        assert_eq!(vm2.memory().checksum(), sum);
        assert_eq!(vm2.status().counter, counter);
        vm2.resume().unwrap();
        let st = vm2
            .wait_until(Duration::from_secs(10), |s| s.first_progress.is_some())
            .unwrap();
        // the first report is the one the pause interrupted (the same value) or
        // the next tick: nothing lost, nothing counted twice
        let first = st.first_progress.unwrap().1;
        assert!(
            first == counter || first == counter + 1,
            "{first} after {counter}"
        );
    }

    #[test]
    fn dirty_log_sees_guest_writes() {
        let vm = Vm::boot(small("dirty", 40_000_000)).unwrap();
        vm.wait_until(Duration::from_secs(10), |s| s.ready).unwrap();
        vm.start_dirty_log().unwrap();
        let c = vm.status().counter;
        vm.wait_until(Duration::from_secs(10), |s| s.counter >= c + 10)
            .unwrap();
        let dirty: u32 = vm
            .dirty_bitmap()
            .unwrap()
            .iter()
            .map(|w| w.count_ones())
            .sum();
        // ~10 pages per tick over >= 10 ticks, plus the config page.
        assert!(dirty >= 50, "only {dirty} dirty pages");
        vm.stop_dirty_log().unwrap();
    }
}
