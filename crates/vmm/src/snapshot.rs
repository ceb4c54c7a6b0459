//! Snapshot files: a paused VM's config + vCPU state + all of guest memory.
//!
//! Layout (little endian):
//!
//! | bytes   | field                                         |
//! |---------|-----------------------------------------------|
//! | 0..8    | magic `WBVMSNAP`                              |
//! | 8..12   | format version                                |
//! | 12..16  | reserved (0)                                  |
//! | 16..24  | state length (JSON, capped)                   |
//! | 24..32  | memory length (capped by `MAX_MEM_BYTES`)     |
//! | 32..36  | CRC32 of the state                            |
//! | 36..40  | CRC32 of the memory                           |
//! | 40..44  | CRC32 of bytes 0..40                          |
//! | 44..48  | reserved (0)                                  |
//!
//! then the state, then the memory. Files are written to a temporary name,
//! fsynced, renamed, and the directory fsynced, so a snapshot that exists is
//! complete. Nothing is used before every length and checksum was checked.

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::guest;
use crate::memory::{GuestMemory, MemoryError};
use crate::vm::{VcpuState, Vm, VmConfig, VmError};

/// File magic.
pub const SNAPSHOT_MAGIC: [u8; 8] = *b"WBVMSNAP";
/// Format version this build writes and reads.
pub const SNAPSHOT_VERSION: u32 = 1;
/// Cap on the JSON state section.
pub const MAX_STATE_BYTES: u64 = 1 << 20;
const HEADER_LEN: usize = 48;

/// The non-memory part of a snapshot.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotState {
    pub config: VmConfig,
    pub vcpu: VcpuState,
}

/// Errors of snapshot writing/reading; each variant names the failing step.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot i/o while {step}: {source}")]
    Io {
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("not a snapshot file (bad magic)")]
    BadMagic,
    #[error("unsupported snapshot version {found} (this build reads {SNAPSHOT_VERSION})")]
    UnsupportedVersion { found: u32 },
    #[error("snapshot header checksum mismatch")]
    HeaderChecksum,
    #[error("snapshot {section} section of {len} bytes exceeds the cap of {max}")]
    TooLarge {
        section: &'static str,
        len: u64,
        max: u64,
    },
    #[error("snapshot {section} checksum mismatch")]
    Checksum { section: &'static str },
    #[error("snapshot memory is {found} bytes but the config says {expected}")]
    SizeMismatch { expected: u64, found: u64 },
    #[error("decoding snapshot state: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("saving or restoring the VM: {0}")]
    Vm(#[from] VmError),
    #[error("allocating guest memory: {0}")]
    Memory(#[from] MemoryError),
}

fn io_step(step: &'static str) -> impl FnOnce(io::Error) -> SnapshotError {
    move |source| SnapshotError::Io { step, source }
}

/// Writes a snapshot of a paused VM to `path` (atomically: temp file, fsync,
/// rename, directory fsync). Returns the memory checksum it recorded.
pub fn write_snapshot(vm: &Vm, path: &Path) -> Result<u32, SnapshotError> {
    let state = SnapshotState {
        config: vm.config(),
        vcpu: vm.save_vcpu_state()?,
    };
    let state_bytes = serde_json::to_vec(&state)?;
    if state_bytes.len() as u64 > MAX_STATE_BYTES {
        return Err(SnapshotError::TooLarge {
            section: "state",
            len: state_bytes.len() as u64,
            max: MAX_STATE_BYTES,
        });
    }
    let mem = vm.memory();
    let mem_crc = mem.checksum();
    let mut header = [0u8; HEADER_LEN];
    header[0..8].copy_from_slice(&SNAPSHOT_MAGIC);
    header[8..12].copy_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&(state_bytes.len() as u64).to_le_bytes());
    header[24..32].copy_from_slice(&mem.size().to_le_bytes());
    header[32..36].copy_from_slice(&crc32fast::hash(&state_bytes).to_le_bytes());
    header[36..40].copy_from_slice(&mem_crc.to_le_bytes());
    let hcrc = crc32fast::hash(&header[0..40]);
    header[40..44].copy_from_slice(&hcrc.to_le_bytes());

    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).map_err(io_step("creating the temporary file"))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    w.write_all(&header)
        .map_err(io_step("writing the header"))?;
    w.write_all(&state_bytes)
        .map_err(io_step("writing the state"))?;
    let chunk = 1 << 20;
    let mut gpa = 0;
    while gpa < mem.size() {
        let len = chunk.min(mem.size() - gpa) as usize;
        w.write_all(mem.slice(gpa, len))
            .map_err(io_step("writing memory"))?;
        gpa += len as u64;
    }
    let file = w.into_inner().map_err(|e| SnapshotError::Io {
        step: "flushing",
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_step("fsync of the snapshot"))?;
    drop(file);
    fs::rename(&tmp, path).map_err(io_step("renaming into place"))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_step("fsync of the directory"))?;
    }
    Ok(mem_crc)
}

/// Reads and verifies a snapshot into fresh memfd-backed memory.
pub fn read_snapshot(path: &Path) -> Result<(SnapshotState, GuestMemory), SnapshotError> {
    let file = File::open(path).map_err(io_step("opening"))?;
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER_LEN];
    r.read_exact(&mut header)
        .map_err(io_step("reading the header"))?;
    if header[0..8] != SNAPSHOT_MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    let u32_at = |o: usize| u32::from_le_bytes(header[o..o + 4].try_into().unwrap_or([0; 4]));
    let u64_at = |o: usize| u64::from_le_bytes(header[o..o + 8].try_into().unwrap_or([0; 8]));
    if crc32fast::hash(&header[0..40]) != u32_at(40) {
        return Err(SnapshotError::HeaderChecksum);
    }
    let version = u32_at(8);
    if version != SNAPSHOT_VERSION {
        return Err(SnapshotError::UnsupportedVersion { found: version });
    }
    let state_len = u64_at(16);
    let mem_len = u64_at(24);
    if state_len > MAX_STATE_BYTES {
        return Err(SnapshotError::TooLarge {
            section: "state",
            len: state_len,
            max: MAX_STATE_BYTES,
        });
    }
    if mem_len > guest::MAX_MEM_BYTES {
        return Err(SnapshotError::TooLarge {
            section: "memory",
            len: mem_len,
            max: guest::MAX_MEM_BYTES,
        });
    }
    let mut state_bytes = vec![0u8; state_len as usize];
    r.read_exact(&mut state_bytes)
        .map_err(io_step("reading the state"))?;
    if crc32fast::hash(&state_bytes) != u32_at(32) {
        return Err(SnapshotError::Checksum { section: "state" });
    }
    let state: SnapshotState = serde_json::from_slice(&state_bytes)?;
    if state.config.mem_bytes != mem_len {
        return Err(SnapshotError::SizeMismatch {
            expected: state.config.mem_bytes,
            found: mem_len,
        });
    }
    state.config.validate()?;
    let mem = GuestMemory::new(&state.config.name, mem_len)?;
    r.read_exact(mem.slice_mut(0, mem_len as usize))
        .map_err(io_step("reading memory"))?;
    if mem.checksum() != u32_at(36) {
        return Err(SnapshotError::Checksum { section: "memory" });
    }
    Ok((state, mem))
}

/// Restores a snapshot into a fresh, paused VM.
pub fn restore_snapshot(path: &Path) -> Result<Vm, SnapshotError> {
    let (state, mem) = read_snapshot(path)?;
    Ok(Vm::restore(state.config, Arc::new(mem), &state.vcpu)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn snapshot_round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vm.snap");
        let vm = Vm::boot(VmConfig::new("snap", 16, 8_000_000)).unwrap();
        vm.wait_until(Duration::from_secs(10), |s| s.counter >= 10)
            .unwrap();
        vm.pause().unwrap();
        let counter = vm.status().counter;
        let crc = write_snapshot(&vm, &path).unwrap();
        vm.fence();

        let restored = restore_snapshot(&path).unwrap();
        assert_eq!(restored.memory().checksum(), crc);
        restored.resume().unwrap();
        let st = restored
            .wait_until(Duration::from_secs(10), |s| s.counter >= counter + 5)
            .unwrap();
        // The first report is the one the pause interrupted (the same value:
        // the guest had stored it but not yet reported it) or the next tick:
        // nothing lost, nothing counted twice (as in vm.rs's restore test).
        let first = st.first_progress.unwrap().1;
        assert!(
            first == counter || first == counter + 1,
            "{first} after {counter}"
        );

        // Flip one memory byte: the memory checksum catches it.
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 100;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_snapshot(&path),
            Err(SnapshotError::Checksum { section: "memory" })
        ));
        // Oversized state length: rejected by the header checksum first, and
        // by the cap if the header is re-signed.
        bytes[16..24].copy_from_slice(&(MAX_STATE_BYTES + 1).to_le_bytes());
        let hcrc = crc32fast::hash(&bytes[0..40]);
        bytes[40..44].copy_from_slice(&hcrc.to_le_bytes());
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            read_snapshot(&path),
            Err(SnapshotError::TooLarge {
                section: "state",
                ..
            })
        ));
        bytes[0] = b'X';
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(read_snapshot(&path), Err(SnapshotError::BadMagic)));
    }
}
