//! `keep_c_heap_mapped`: a large block freed with glibc's `free` stays mapped
//! and resident, so the next fetch buffer does not fault in fresh pages.
//!
//! A binary of its own without the test harness: the settings are process
//! wide, and `M_ARENA_MAX` only binds threads that have no arena yet, so this
//! runs on the main thread before any other thread exists.

/// First argument of the child that shows glibc's defaults.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const DEFAULTS_CHILD: &str = "--c-heap-defaults-child";

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    use waterbear_stream::{C_HEAP_MMAP_THRESHOLD, keep_c_heap_mapped};

    // About the size of a fetch response for a few partitions. glibc decides
    // by the first large block of a process (its mmap threshold moves after
    // that), so each case runs on a fresh process's first large block.
    let len = 8 << 20;
    assert!(len < C_HEAP_MMAP_THRESHOLD);

    if std::env::args().nth(1).as_deref() == Some(DEFAULTS_CHILD) {
        // glibc's defaults: the block is mmapped and unmapped again by free.
        let r = touched_then_freed(len);
        println!("c_heap child: {r:?}");
        std::process::exit(if r == Err(libc::ENOMEM) { 0 } else { 1 });
    }

    assert!(keep_c_heap_mapped(), "mallopt refused a setting");
    let pages = touched_then_freed(len).expect("the freed block is still mapped");
    let whole = (len - 2 * page()) / page();
    assert!(
        pages >= whole,
        "{pages} of the block's {whole} whole pages are still resident after free"
    );

    // The same on a process that does not call it: the block is gone after
    // free (so the check above can fail). Skipped when the environment
    // already tunes malloc.
    let tuned = std::env::vars_os().any(|(k, _)| {
        let k = k.to_string_lossy();
        k == "GLIBC_TUNABLES" || k.starts_with("MALLOC_")
    });
    if tuned {
        println!("c_heap: malloc is tuned by the environment; not checking glibc's defaults");
    } else {
        let out = std::process::Command::new(std::env::current_exe().expect("own path"))
            .arg(DEFAULTS_CHILD)
            .output()
            .expect("run the defaults child");
        assert!(
            out.status.success(),
            "with glibc's defaults an 8 MiB block should be unmapped by free: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    println!("c_heap: ok ({pages} pages stayed resident)");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    assert!(!waterbear_stream::keep_c_heap_mapped());
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn page() -> usize {
    // SAFETY: sysconf only reads a system constant.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Allocates `len` bytes with glibc, writes every page, frees the block, and
/// counts the block's whole pages still resident (`mincore`), or returns the
/// errno when the range is no longer mapped.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn touched_then_freed(len: usize) -> Result<usize, i32> {
    let page = page();
    // SAFETY: a plain allocation of `len` bytes, checked for null below.
    let p = unsafe { libc::malloc(len) } as *mut u8;
    assert!(!p.is_null(), "malloc({len}) failed");
    // SAFETY: p points to `len` writable bytes just allocated.
    unsafe { std::ptr::write_bytes(p, 0xa5, len) };
    // The whole pages inside the block, skipping the chunk header's page.
    let start = (p as usize).next_multiple_of(page);
    let end = (p as usize + len) / page * page;
    // SAFETY: p came from malloc and is freed exactly once; only its address
    // is used afterwards, never dereferenced.
    unsafe { libc::free(p.cast()) };
    let n = (end - start) / page;
    let mut vec = vec![0u8; n];
    // SAFETY: start is page aligned, vec has one byte per page of the range;
    // mincore does not touch the range itself.
    let rc = unsafe { libc::mincore(start as *mut libc::c_void, end - start, vec.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    Ok(vec.iter().filter(|&&b| b & 1 == 1).count())
}
