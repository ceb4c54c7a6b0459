//! Live migration on real /dev/kvm over loopback TCP.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use waterbear_vmm::guest::{self, PAGE_SIZE};
use waterbear_vmm::migration::{self, PROTOCOL, kind};
use waterbear_vmm::wire::FrameError;
use waterbear_vmm::{
    GuestMemory, IncomingOptions, MigrateOptions, MigrationError, Vm, VmConfig, VmError,
    migrate_in, migrate_out,
};

const WAIT: Duration = Duration::from_secs(20);

/// What a target thread returns.
type TargetThread = thread::JoinHandle<Result<(Vm, waterbear_vmm::IncomingReport), MigrationError>>;

/// A target thread receiving one migration on a fresh loopback port.
fn spawn_target(opts: IncomingOptions) -> (std::net::SocketAddr, TargetThread) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let target = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        migrate_in(stream, &opts)
    });
    (addr, target)
}

/// Every region page must hold what the guest program writes there: either
/// the prefill pattern (own address, marker) or a tick's pattern (a counter
/// value not above the current one, own address).
fn check_guest_pattern(mem: &GuestMemory, counter: u32) {
    let end = mem.read_u32(guest::CFG_GPA + guest::CFG_REGION_END) as u64;
    let mut gpa = guest::REGION_START;
    let (mut prefill, mut ticked) = (0u64, 0u64);
    while gpa < end {
        let w0 = mem.read_u32(gpa);
        let w1 = mem.read_u32(gpa + 4);
        if w0 == gpa as u32 && w1 == 0x5742_5047 {
            prefill += 1;
        } else {
            assert_eq!(w1, gpa as u32, "page {gpa:#x} lost its address word");
            assert!(
                w0 >= 1 && w0 <= counter,
                "page {gpa:#x} holds counter {w0} > {counter}"
            );
            ticked += 1;
        }
        gpa += PAGE_SIZE;
    }
    assert!(prefill + ticked > 0);
}

fn migrate_at_rate(rate: u64) {
    migrate_with(rate, IncomingOptions::default());
}

fn migrate_with(rate: u64, in_opts: IncomingOptions) {
    let src = Vm::boot(VmConfig::new(format!("src-{rate}"), 32, rate)).unwrap();
    src.wait_until(WAIT, |s| s.ready && s.counter >= 20)
        .unwrap();

    let (addr, target) = spawn_target(in_opts);
    let opts = MigrateOptions {
        verify_checksum: true,
        ..MigrateOptions::default()
    };
    let report = migrate_out(&src, addr, &opts).unwrap();
    let (dst, incoming) = target.join().unwrap().unwrap();

    assert!(report.checksum.is_some());
    assert_eq!(incoming.checksum, report.checksum);
    assert!(report.pages_sent >= 32 * 256, "{report:?}");
    assert!(report.bytes_sent >= 32 << 20);
    assert!(report.rounds >= 1);

    // The source is fenced for good.
    assert!(src.is_fenced());
    assert!(matches!(src.resume(), Err(VmError::Fenced)));

    // The guest continues on the target from exactly where it stopped, and
    // its first tick there happened after its last tick on the source.
    let st = dst
        .wait_until(WAIT, |s| s.counter >= report.counter_at_pause + 10)
        .unwrap();
    let (src_last_at, src_last) = src.status().last_progress.unwrap();
    let (dst_first_at, dst_first) = st.first_progress.unwrap();
    assert_eq!(src_last, report.counter_at_pause);
    assert_eq!(
        dst_first,
        src_last + 1,
        "counter must continue without gap or repeat"
    );
    assert!(
        dst_first_at > src_last_at,
        "the VM ran on both sides at once"
    );

    dst.pause().unwrap();
    check_guest_pattern(dst.memory(), dst.status().counter);
}

#[test]
fn migrates_idle_guest() {
    migrate_at_rate(0);
}

#[test]
fn migrates_moderately_dirtying_guest() {
    migrate_at_rate(50_000_000);
}

#[test]
fn migrates_heavily_dirtying_guest() {
    migrate_at_rate(500_000_000);
}

/// Target memory allocated and populated before the source connects.
fn prepared_memory(mib: u64) -> Arc<GuestMemory> {
    let mem = GuestMemory::new("prepared", mib << 20).unwrap();
    mem.populate().unwrap();
    Arc::new(mem)
}

#[test]
fn migrates_into_prepared_memory() {
    migrate_with(
        50_000_000,
        IncomingOptions {
            memory: Some(prepared_memory(32)),
            ..IncomingOptions::default()
        },
    );
}

#[test]
fn migrates_into_populated_memory_and_ignores_prepared_memory_of_another_size() {
    migrate_with(
        500_000_000,
        IncomingOptions {
            memory: Some(prepared_memory(16)),
            populate: true,
            ..IncomingOptions::default()
        },
    );
}

#[test]
fn source_resumes_when_target_drops_before_commit() {
    let src = Vm::boot(VmConfig::new("drop", 16, 20_000_000)).unwrap();
    src.wait_until(WAIT, |s| s.ready).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A target that acknowledges HELLO, swallows frames until STATE, then
    // hangs up without PREPARED.
    let fake = thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (k, _) = PROTOCOL.read_frame(&mut s).unwrap();
        assert_eq!(k, kind::HELLO);
        PROTOCOL
            .write_frame(&mut s, kind::HELLO_ACK, &[br#"{"ok":true,"error":null}"#])
            .unwrap();
        loop {
            // Read frames without checking them: a PAGES_LIVE frame of the
            // running guest may legitimately fail its checksum.
            let header = PROTOCOL.read_header(&mut s).unwrap();
            let mut payload = vec![0u8; header.len as usize];
            std::io::Read::read_exact(&mut s, &mut payload).unwrap();
            let k = header.kind;
            if k == kind::ROUND_END {
                PROTOCOL
                    .write_frame(&mut s, kind::ROUND_ACK, &[&payload])
                    .unwrap();
            }
            if k == kind::STATE {
                break;
            }
        }
    });
    let err = migrate_out(&src, addr, &MigrateOptions::default()).unwrap_err();
    fake.join().unwrap();
    assert!(
        matches!(
            err,
            MigrationError::Frame {
                step: "reading PREPARED",
                ..
            }
        ),
        "{err}"
    );
    assert!(!src.is_fenced());
    let c = src.status().counter;
    src.wait_until(WAIT, |s| s.counter >= c + 5)
        .expect("source resumed after an uncommitted migration");
}

fn incoming_error(bytes: Vec<u8>) -> MigrationError {
    let (addr, target) = spawn_target(IncomingOptions::default());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&bytes).unwrap();
    let _ = s.shutdown(std::net::Shutdown::Write);
    let res = target.join().unwrap();
    // Keep the socket open until the target has finished reading.
    drop(s);
    res.expect_err("corrupt stream accepted")
}

fn hello(mem_mib: u64) -> Vec<u8> {
    let mut buf = Vec::new();
    let body = serde_json::json!({ "config": VmConfig::new("corrupt", mem_mib, 0) });
    PROTOCOL.write_json(&mut buf, kind::HELLO, &body).unwrap();
    buf
}

#[test]
fn corrupted_and_oversized_frames_are_rejected() {
    // Bad CRC on a page frame.
    let mut bytes = hello(16);
    let mut frame = Vec::new();
    let page = vec![0xabu8; PAGE_SIZE as usize];
    PROTOCOL
        .write_frame(&mut frame, kind::PAGES, &[&0x20000u64.to_le_bytes(), &page])
        .unwrap();
    let n = frame.len();
    frame[n - 1] ^= 0xff;
    bytes.extend_from_slice(&frame);
    let err = incoming_error(bytes);
    assert!(
        matches!(
            err,
            MigrationError::Frame {
                source: FrameError::ChecksumMismatch { .. },
                ..
            }
        ),
        "{err}"
    );

    // Oversized frame header.
    let mut bytes = hello(16);
    let mut header = PROTOCOL.header(kind::PAGES, 16, 0).unwrap();
    header[8..12].copy_from_slice(&(PROTOCOL.max_payload + 1).to_le_bytes());
    bytes.extend_from_slice(&header);
    let err = incoming_error(bytes);
    assert!(
        matches!(
            err,
            MigrationError::Frame {
                source: FrameError::TooLarge { .. },
                ..
            }
        ),
        "{err}"
    );

    // Pages outside guest memory.
    let mut bytes = hello(16);
    PROTOCOL
        .write_frame(
            &mut bytes,
            kind::PAGES,
            &[&(64u64 << 20).to_le_bytes(), &page],
        )
        .unwrap();
    let err = incoming_error(bytes);
    assert!(matches!(err, MigrationError::BadPages { .. }), "{err}");

    // Wrong magic / version.
    let mut bytes = hello(16);
    bytes[0] ^= 0x55;
    let err = incoming_error(bytes);
    assert!(
        matches!(
            err,
            MigrationError::Frame {
                source: FrameError::BadMagic { .. },
                ..
            }
        ),
        "{err}"
    );
    let mut bytes = hello(16);
    bytes[4] = 0x7f;
    let err = incoming_error(bytes);
    assert!(
        matches!(
            err,
            MigrationError::Frame {
                source: FrameError::UnsupportedVersion { .. },
                ..
            }
        ),
        "{err}"
    );

    // A stream that ends before COMMIT never starts the VM.
    let bytes = hello(16);
    let err = incoming_error(bytes);
    assert!(matches!(err, MigrationError::Frame { .. }), "{err}");
    let _ = migration::dirty_runs(&[], 1);
}

/// A fake source: HELLO, one `PAGES_LIVE` frame whose checksum does not
/// match (a page the guest rewrote mid-send), ROUND_END, then optionally a
/// verified resend of that page, then STATE. Returns the ROUND_ACK's resend
/// list, the PREPARED reply and the target's result.
fn torn_page_session(
    resend: bool,
) -> (
    serde_json::Value,
    serde_json::Value,
    Result<(Vm, waterbear_vmm::IncomingReport), MigrationError>,
) {
    let donor = Vm::boot(VmConfig::new("torn-donor", 16, 0)).unwrap();
    donor.wait_until(WAIT, |s| s.ready).unwrap();
    donor.pause().unwrap();
    let vcpu = donor.save_vcpu_state().unwrap();

    let (addr, target) = spawn_target(IncomingOptions::default());
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&hello(16)).unwrap();
    let (k, _) = PROTOCOL.read_frame(&mut s).unwrap();
    assert_eq!(k, kind::HELLO_ACK);

    let gpa = 0x20000u64;
    let page = vec![0xabu8; PAGE_SIZE as usize];
    let mut frame = Vec::new();
    PROTOCOL
        .write_frame(&mut frame, kind::PAGES_LIVE, &[&gpa.to_le_bytes(), &page])
        .unwrap();
    let n = frame.len();
    frame[n - 1] ^= 0xff;
    s.write_all(&frame).unwrap();
    PROTOCOL
        .write_json(
            &mut s,
            kind::ROUND_END,
            &serde_json::json!({ "round": 0, "pages": 1 }),
        )
        .unwrap();
    let (k, payload) = PROTOCOL.read_frame(&mut s).unwrap();
    assert_eq!(k, kind::ROUND_ACK);
    let ack: serde_json::Value = serde_json::from_slice(&payload).unwrap();

    if resend {
        PROTOCOL
            .write_frame(&mut s, kind::PAGES, &[&gpa.to_le_bytes(), &page])
            .unwrap();
    }
    let state = serde_json::json!({ "vcpu": vcpu, "pages_per_tick": 0, "checksum": null });
    PROTOCOL.write_json(&mut s, kind::STATE, &state).unwrap();
    let (k, payload) = PROTOCOL.read_frame(&mut s).unwrap();
    assert_eq!(k, kind::PREPARED);
    let prepared: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    // Never commit: the target must discard the VM unrun.
    drop(s);
    (ack["resend"].clone(), prepared, target.join().unwrap())
}

#[test]
fn torn_live_pages_are_resent_and_never_run_unverified() {
    // Not resent: listed in ROUND_ACK, and STATE is refused.
    let (resend, prepared, res) = torn_page_session(false);
    assert_eq!(resend, serde_json::json!([[0x20, 1]]));
    assert_eq!(prepared["ok"], false, "{prepared}");
    assert!(
        matches!(res, Err(MigrationError::UnverifiedPages { pages: 1 })),
        "{res:?}"
    );

    // Resent with a matching checksum: STATE is accepted (and without a
    // COMMIT the VM is still discarded).
    let (resend, prepared, res) = torn_page_session(true);
    assert_eq!(resend, serde_json::json!([[0x20, 1]]));
    assert_eq!(prepared["ok"], true, "{prepared}");
    assert!(
        matches!(res, Err(MigrationError::NotCommitted(_))),
        "{res:?}"
    );
}
