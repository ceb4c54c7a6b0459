//! waterbear's VMM: the only crate that talks to KVM.
//!
//! * [`vm`]: one VM with one vCPU thread running the [`guest`] program over
//!   memfd-backed RAM ([`memory`]); pause/resume, vCPU state, dirty log.
//! * [`snapshot`]: snapshot files (magic, version, CRCs, size caps, fsync).
//! * [`migration`]: pre-copy live migration over TCP with a commit handshake.
//! * [`agent`]: the host agent (command protocol, Tardigrade phases 1-3).
//! * [`bench`]: measurement helpers used by the `migrate` bench.

pub mod agent;
pub mod bench;
pub mod guest;
pub mod memory;
pub mod vm;
pub mod wire;

pub use memory::{GuestMemory, MemoryError};
pub use vm::{RunState, VcpuState, Vm, VmConfig, VmError, VmStatus};
pub mod migration;
pub mod snapshot;

pub use agent::{
    AgentClient, AgentConfig, AgentError, DEFAULT_PREPARED_TTL, HostAgentArgs, Request, Response,
    run_host_agent,
};
pub use migration::{
    IncomingOptions, IncomingReport, MigrateOptions, MigrationError, MigrationReport, migrate_in,
    migrate_out, migrate_over,
};
pub use snapshot::{SnapshotError, read_snapshot, restore_snapshot, write_snapshot};
