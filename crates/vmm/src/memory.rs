//! Guest memory backed by a `memfd`.
//!
//! The memfd is what lets guest RAM outlive the VMM process: phase 3 of the
//! host agent passes it across `exec`, the successor maps it again and the
//! guest finds its memory untouched.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;

use crate::guest::PAGE_SIZE;

/// Errors while creating or mapping guest memory; each names the failing step.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("guest memory size {size} is not a multiple of the page size or out of range")]
    BadSize { size: u64 },
    #[error("memfd_create failed: {0}")]
    MemfdCreate(#[source] io::Error),
    #[error("sizing the memfd to {size} bytes failed: {source}")]
    Truncate { size: u64, source: io::Error },
    #[error("fstat on the memory fd failed: {0}")]
    Stat(#[source] io::Error),
    #[error("memory fd holds {actual} bytes, expected {expected}")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("mmap of {size} bytes failed: {source}")]
    Mmap { size: u64, source: io::Error },
    #[error("populating guest memory failed: {0}")]
    Populate(#[source] io::Error),
    #[error("changing FD_CLOEXEC on the memory fd failed: {0}")]
    Cloexec(#[source] io::Error),
}

/// A shared mapping of a memfd holding guest RAM (GPA 0 .. size).
#[derive(Debug)]
pub struct GuestMemory {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    size: u64,
}

// SAFETY: the mapping is plain shared memory owned by this struct for its whole
// lifetime; it is never remapped, and every access goes through raw pointers
// or short-lived slices whose concurrent modification by the guest is an
// accepted property of guest RAM (readers tolerate torn data; migration resends
// pages the dirty log reports).
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`; the struct has no interior state besides the mapping.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Creates `size` bytes of zeroed guest memory in a new memfd.
    pub fn new(name: &str, size: u64) -> Result<Self, MemoryError> {
        if size == 0 || size % PAGE_SIZE != 0 || size > usize::MAX as u64 {
            return Err(MemoryError::BadSize { size });
        }
        let cname = std::ffi::CString::new(format!("wb-guest-{name}").replace('\0', "_"))
            .unwrap_or_else(|_| c"wb-guest".to_owned());
        // SAFETY: `cname` is a valid NUL-terminated string; the return value is checked.
        let raw = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(MemoryError::MemfdCreate(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let file = File::from(fd);
        file.set_len(size)
            .map_err(|source| MemoryError::Truncate { size, source })?;
        Self::map(OwnedFd::from(file), size)
    }

    /// Maps an existing memory fd (e.g. one inherited across `exec`).
    pub fn from_fd(fd: OwnedFd, size: u64) -> Result<Self, MemoryError> {
        let file = File::from(fd);
        let actual = file.metadata().map_err(MemoryError::Stat)?.len();
        if actual != size {
            return Err(MemoryError::SizeMismatch {
                expected: size,
                actual,
            });
        }
        Self::map(OwnedFd::from(file), size)
    }

    fn map(fd: OwnedFd, size: u64) -> Result<Self, MemoryError> {
        // SAFETY: mapping a fresh region (addr NULL) of a memfd we own, shared
        // and read/write; the result is checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_NORESERVE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Mmap {
                size,
                source: io::Error::last_os_error(),
            });
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(MemoryError::Mmap {
            size,
            source: io::Error::other("mmap returned NULL"),
        })?;
        Ok(Self { fd, ptr, size })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of guest pages.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Host address of GPA 0 (for KVM_SET_USER_MEMORY_REGION).
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    /// The memfd.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Drops this process's page-table entries for guest RAM without touching
    /// its contents (they live in the memfd). Tearing down a process's page
    /// tables costs time proportional to the mapped pages, so phase 3 calls
    /// this while the guests still run, keeping the teardown inside `exec`
    /// (within the freeze) small; guests refault what they touch next.
    pub fn drop_host_mappings(&self) -> Result<(), MemoryError> {
        // SAFETY: advising on exactly our own live shared mapping;
        // MADV_DONTNEED on a shared file mapping only drops PTEs, the memfd
        // keeps the data.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.size as usize,
                libc::MADV_DONTNEED,
            )
        };
        if rc != 0 {
            return Err(MemoryError::Mmap {
                size: self.size,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Allocates and maps every page of guest RAM now (zeroed, writable), so
    /// later writes neither fault nor wait for the kernel to allocate and
    /// clear a page. A migration target does this before the pages arrive,
    /// as QEMU's destination does with preallocated RAM.
    ///
    /// Uses `MADV_POPULATE_WRITE` (Linux 5.14+) and falls back to
    /// `fallocate` on the memfd (allocates and clears the pages but leaves
    /// the page-table entries to the first touch) on older kernels.
    pub fn populate(&self) -> Result<(), MemoryError> {
        // SAFETY: advising on exactly our own live shared mapping;
        // MADV_POPULATE_WRITE only faults pages in as if written with their
        // current contents (zero for fresh memfd pages), it changes no data.
        let rc = unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast(),
                self.size as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(MemoryError::Populate(err));
        }
        // SAFETY: fallocate on the memfd we own, within its size; mode 0
        // only allocates blocks that are not allocated yet (keeps data).
        let rc = unsafe { libc::fallocate(self.fd.as_raw_fd(), 0, 0, self.size as libc::off_t) };
        if rc != 0 {
            return Err(MemoryError::Populate(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Keeps (or stops keeping) the memfd open across `exec`.
    pub fn set_inherit_on_exec(&self, inherit: bool) -> Result<(), MemoryError> {
        set_cloexec(self.fd.as_raw_fd(), !inherit).map_err(MemoryError::Cloexec)
    }

    /// A byte slice over `[gpa, gpa+len)`; panics when out of range.
    ///
    /// The guest may write these bytes concurrently while it runs: callers use
    /// the slice only to hand bytes to the kernel (socket writes) or to hash a
    /// paused guest.
    pub fn slice(&self, gpa: u64, len: usize) -> &[u8] {
        assert!(
            self.in_range(gpa, len as u64),
            "gpa {gpa:#x}+{len} out of range"
        );
        // SAFETY: the range lies inside the live mapping (checked above).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(gpa as usize), len) }
    }

    /// A mutable byte slice over `[gpa, gpa+len)`; panics when out of range.
    ///
    /// Only for memory of a VM whose vCPU is not running (migration target,
    /// restore): the caller guarantees nobody else writes it meanwhile.
    #[allow(clippy::mut_from_ref)]
    pub fn slice_mut(&self, gpa: u64, len: usize) -> &mut [u8] {
        assert!(
            self.in_range(gpa, len as u64),
            "gpa {gpa:#x}+{len} out of range"
        );
        // SAFETY: in range of the live mapping; exclusivity is the caller's
        // documented obligation (VM not running, single writer).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(gpa as usize), len) }
    }

    /// True when `[gpa, gpa+len)` lies inside guest memory.
    pub fn in_range(&self, gpa: u64, len: u64) -> bool {
        gpa.checked_add(len).is_some_and(|end| end <= self.size)
    }

    /// Reads a little-endian u32 at `gpa` (volatile: the guest may change it).
    pub fn read_u32(&self, gpa: u64) -> u32 {
        assert!(self.in_range(gpa, 4) && gpa % 4 == 0);
        // SAFETY: aligned and in range of the live mapping.
        unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(gpa as usize).cast::<u32>()) }
    }

    /// Writes a little-endian u32 at `gpa` (volatile: the guest may read it).
    pub fn write_u32(&self, gpa: u64, value: u32) {
        assert!(self.in_range(gpa, 4) && gpa % 4 == 0);
        // SAFETY: aligned and in range of the live mapping.
        unsafe {
            std::ptr::write_volatile(self.ptr.as_ptr().add(gpa as usize).cast::<u32>(), value)
        }
    }

    /// CRC32 of all of guest memory. Only meaningful while the guest is paused.
    pub fn checksum(&self) -> u32 {
        let mut hasher = crc32fast::Hasher::new();
        let chunk = 1 << 20;
        let mut gpa = 0;
        while gpa < self.size {
            let len = chunk.min(self.size - gpa) as usize;
            hasher.update(self.slice(gpa, len));
            gpa += len as u64;
        }
        hasher.finalize()
    }
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly the region mapped in `map`; no slices
        // outlive `self` because they borrow it.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.size as usize);
        }
    }
}

/// Sets or clears FD_CLOEXEC on `fd`.
pub fn set_cloexec(fd: RawFd, cloexec: bool) -> io::Result<()> {
    // SAFETY: F_GETFD on an fd number; failure is reported via the return value.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if cloexec {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: F_SETFD with a flag word derived from the current one.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfd_memory_is_shared_through_the_fd() {
        let mem = GuestMemory::new("t", 64 * 1024).unwrap();
        mem.write_u32(0x1000, 0xdead_beef);
        let before = mem.checksum();
        // SAFETY: dup of a valid fd owned by `mem`.
        let dup = unsafe { libc::dup(mem.raw_fd()) };
        assert!(dup >= 0);
        // SAFETY: `dup` is a fresh fd we own.
        let other = GuestMemory::from_fd(unsafe { OwnedFd::from_raw_fd(dup) }, 64 * 1024).unwrap();
        assert_eq!(other.read_u32(0x1000), 0xdead_beef);
        assert_eq!(other.checksum(), before);
        drop(mem);
        assert_eq!(other.read_u32(0x1000), 0xdead_beef);
        // Populating keeps the contents.
        other.populate().unwrap();
        assert_eq!(other.read_u32(0x1000), 0xdead_beef);
        assert_eq!(other.checksum(), before);
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(matches!(
            GuestMemory::new("t", 4097),
            Err(MemoryError::BadSize { .. })
        ));
        let mem = GuestMemory::new("t", 8192).unwrap();
        // SAFETY: dup of a valid fd owned by `mem`.
        let dup = unsafe { OwnedFd::from_raw_fd(libc::dup(mem.raw_fd())) };
        assert!(matches!(
            GuestMemory::from_fd(dup, 4096),
            Err(MemoryError::SizeMismatch { .. })
        ));
    }
}
