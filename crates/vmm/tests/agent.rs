//! The host agent binary on real /dev/kvm: commands, migration between two
//! agents, and the Tardigrade phases 1-3.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use waterbear_vmm::agent::{
    AgentClient, AgentError, KIND_REQUEST, KIND_RESPONSE, PROTOCOL, Request, Response, VmInfo,
};
use waterbear_vmm::{MigrateOptions, RunState};

const WAIT: Duration = Duration::from_secs(20);

struct AgentProc {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl AgentProc {
    fn spawn() -> Self {
        Self::spawn_with(&[])
    }

    fn spawn_with(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_wb-host-agent"))
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path())
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            _dir: dir,
        }
    }

    fn client(&self) -> AgentClient {
        let c = AgentClient::connect(self.addr).unwrap();
        c.set_timeout(Some(Duration::from_secs(60))).unwrap();
        c
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Ok(mut c) = AgentClient::connect(self.addr) {
            let _ = c.set_timeout(Some(Duration::from_secs(5)));
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

fn start(c: &mut AgentClient, name: &str, mib: u64, rate: u64) -> VmInfo {
    match c
        .call(&Request::StartVm {
            name: name.into(),
            mem_mib: mib,
            dirty_bytes_per_sec: rate,
        })
        .unwrap()
    {
        Response::Vm { vm } => vm,
        other => panic!("{other:?}"),
    }
}

/// Polls the agent (each poll is a round trip, not a sleep) until `pred`.
fn wait_vm(c: &mut AgentClient, name: &str, mut pred: impl FnMut(&VmInfo) -> bool) -> VmInfo {
    let deadline = Instant::now() + WAIT;
    loop {
        let vm = c.vm(name).unwrap();
        if pred(&vm) {
            return vm;
        }
        assert!(Instant::now() < deadline, "timed out waiting on {vm:?}");
        std::thread::yield_now();
    }
}

#[test]
fn commands_and_phases_1_and_2() {
    let agent = AgentProc::spawn();
    let mut c = agent.client();
    start(&mut c, "a", 16, 4_000_000);
    start(&mut c, "b", 16, 0);
    assert!(matches!(
        c.call(&Request::StartVm {
            name: "a".into(),
            mem_mib: 16,
            dirty_bytes_per_sec: 0
        }),
        Err(AgentError::Remote(_))
    ));
    assert_eq!(c.list().unwrap().len(), 2);
    let a = wait_vm(&mut c, "a", |v| v.ready && v.counter > 10);

    // Pause/resume and checksum of a paused VM.
    c.call(&Request::Pause { name: "a".into() }).unwrap();
    let Response::Checksum {
        crc: crc1, counter, ..
    } = c.call(&Request::Checksum { name: "a".into() }).unwrap()
    else {
        panic!()
    };
    let Response::Checksum { crc: crc2, .. } =
        c.call(&Request::Checksum { name: "a".into() }).unwrap()
    else {
        panic!()
    };
    assert_eq!(crc1, crc2, "a paused guest's memory must not change");
    assert!(counter >= a.counter);
    c.call(&Request::Resume { name: "a".into() }).unwrap();
    assert!(c.call(&Request::Checksum { name: "a".into() }).is_err());
    c.call(&Request::SetDirtyRate {
        name: "b".into(),
        dirty_bytes_per_sec: 8_192_000,
    })
    .unwrap();
    assert_eq!(c.vm("b").unwrap().pages_per_tick, 2);

    // Phase 1: services restart, VMs keep running without a pause.
    let before = c.vm("a").unwrap();
    let Response::ServicesRestarted { generation, .. } = c.call(&Request::RestartServices).unwrap()
    else {
        panic!()
    };
    assert_eq!(generation, 2);
    let mut fresh = agent.client(); // the new accept loop serves new clients
    let Response::Pong { generation: g, .. } = fresh.call(&Request::Ping).unwrap() else {
        panic!()
    };
    assert_eq!(g, 2);
    let after = wait_vm(&mut fresh, "a", |v| v.counter > before.counter + 5);
    assert_eq!(after.state, RunState::Running);
    assert!(after.exits > before.exits);

    // Phase 2: the diagnostics bundle.
    let dir = tempfile::tempdir().unwrap();
    let Response::Diagnostics { files } = c
        .call(&Request::Diagnostics {
            dir: dir.path().join("bundle"),
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(files.len(), 4);
    let vms: Vec<VmInfo> =
        serde_json::from_slice(&std::fs::read(dir.path().join("bundle/vms.json")).unwrap())
            .unwrap();
    assert_eq!(vms.len(), 2);
    let log: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bundle/log.json")).unwrap())
            .unwrap();
    assert!(log.to_string().contains("phase 1"));
    let metrics: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("bundle/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(metrics["service_restarts"], 1);
}

#[test]
fn corrupt_and_oversized_requests_get_typed_errors() {
    let agent = AgentProc::spawn();
    // Bad checksum.
    let mut s = TcpStream::connect(agent.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut frame = Vec::new();
    PROTOCOL
        .write_json(&mut frame, KIND_REQUEST, &Request::Ping)
        .unwrap();
    let n = frame.len();
    frame[n - 2] ^= 0x20;
    s.write_all(&frame).unwrap();
    let (kind, payload) = PROTOCOL.read_frame(&mut s).unwrap();
    assert_eq!(kind, KIND_RESPONSE);
    let resp: Response = serde_json::from_slice(&payload).unwrap();
    assert!(
        matches!(&resp, Response::Error { message } if message.contains("checksum")),
        "{resp:?}"
    );
    // The agent closes a connection whose framing it cannot trust.
    assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0);

    // Oversized.
    let mut s = TcpStream::connect(agent.addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut header = PROTOCOL.header(KIND_REQUEST, 4, 0).unwrap();
    header[8..12].copy_from_slice(&(PROTOCOL.max_payload + 1).to_le_bytes());
    s.write_all(&header).unwrap();
    let (_, payload) = PROTOCOL.read_frame(&mut s).unwrap();
    let resp: Response = serde_json::from_slice(&payload).unwrap();
    assert!(
        matches!(&resp, Response::Error { message } if message.contains("exceeds")),
        "{resp:?}"
    );

    // Still healthy.
    let Response::Pong { .. } = agent.client().call(&Request::Ping).unwrap() else {
        panic!()
    };
}

/// Migrates `name` (once it runs) to the agent at `to` with the memory CRC
/// verified; checks the report and returns it.
fn migrate_checked(
    ca: &mut AgentClient,
    name: &str,
    to: SocketAddr,
) -> waterbear_vmm::MigrationReport {
    let before = wait_vm(ca, name, |v| v.ready && v.counter > 20);
    let Response::Migrated { report } = ca
        .call(&Request::MigrateOut {
            name: name.into(),
            to: to.to_string(),
            options: MigrateOptions {
                verify_checksum: true,
                ..MigrateOptions::default()
            },
        })
        .unwrap()
    else {
        panic!()
    };
    assert!(report.checksum.is_some());
    assert!(report.counter_at_pause >= before.counter);
    report
}

#[test]
fn migration_between_two_agents() {
    let a = AgentProc::spawn();
    let b = AgentProc::spawn();
    let mut ca = a.client();
    let mut cb = b.client();
    start(&mut ca, "mig", 32, 50_000_000);
    let report = migrate_checked(&mut ca, "mig", b.addr);
    assert!(
        ca.list().unwrap().is_empty(),
        "source agent must drop the VM"
    );
    let on_b = wait_vm(&mut cb, "mig", |v| v.counter > report.counter_at_pause + 10);
    assert_eq!(on_b.state, RunState::Running);
}

#[test]
fn migration_into_memory_the_target_prepared() {
    let a = AgentProc::spawn();
    let b = AgentProc::spawn();
    let mut ca = a.client();
    let mut cb = b.client();
    let info = start(&mut ca, "prep", 32, 10_000_000);
    let prepare = Request::PrepareIncoming {
        name: "prep".into(),
        mem_bytes: info.mem_bytes,
    };
    let Response::Prepared { reused, .. } = cb.call(&prepare).unwrap() else {
        panic!()
    };
    assert!(!reused, "first prepare allocates");
    let Response::Prepared { reused, .. } = cb.call(&prepare).unwrap() else {
        panic!()
    };
    assert!(reused, "a repeated prepare (an executor retry) reuses it");
    let report = migrate_checked(&mut ca, "prep", b.addr);
    let on_b = wait_vm(&mut cb, "prep", |v| {
        v.counter > report.counter_at_pause + 10
    });
    assert_eq!(on_b.state, RunState::Running);
    // the migrated VM took the prepared memory out of the pool: preparing the
    // same name again allocates anew
    let Response::Prepared { reused, .. } = cb.call(&prepare).unwrap() else {
        panic!()
    };
    assert!(!reused, "the migration consumed the prepared memory");
}

/// Memory prepared for a migration that never comes (the executor rolled back or
/// picked another target) is released after the TTL, and preparing again allocates.
#[test]
fn unclaimed_prepared_memory_is_released_after_its_ttl() {
    let b = AgentProc::spawn_with(&["--prepared-ttl-ms", "1500"]);
    let mut cb = b.client();
    let prepare = Request::PrepareIncoming {
        name: "never".into(),
        mem_bytes: 64 << 20,
    };
    let Response::Prepared { reused, .. } = cb.call(&prepare).unwrap() else {
        panic!()
    };
    assert!(!reused);
    let held = |c: &mut AgentClient| {
        let Response::Pong { prepared, .. } = c.call(&Request::Ping).unwrap() else {
            panic!()
        };
        prepared
    };
    let t0 = Instant::now();
    let first = held(&mut cb);
    // unless this machine stalled for the whole TTL, the memory is still held
    if t0.elapsed() < Duration::from_millis(1000) {
        assert_eq!(first, vec!["never".to_string()]);
    }
    let end = Instant::now() + Duration::from_secs(30);
    while !held(&mut cb).is_empty() {
        assert!(Instant::now() < end, "prepared memory was never released");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(1000),
        "released before its TTL ({:?})",
        t0.elapsed()
    );
    let Response::Prepared { reused, .. } = cb.call(&prepare).unwrap() else {
        panic!()
    };
    assert!(!reused, "expired memory is not reused");
}

#[test]
fn phase3_memory_preserving_restart() {
    let agent = AgentProc::spawn();
    let mut c = agent.client();
    let Response::Pong { pid, .. } = c.call(&Request::Ping).unwrap() else {
        panic!()
    };
    for i in 0..4 {
        start(&mut c, &format!("vm{i}"), 16, 10_000_000);
    }
    // A fifth VM is paused beforehand: it must stay paused, memory intact.
    start(&mut c, "parked", 16, 10_000_000);
    wait_vm(&mut c, "parked", |v| v.ready && v.counter > 5);
    c.call(&Request::Pause {
        name: "parked".into(),
    })
    .unwrap();
    let Response::Checksum {
        crc: parked_crc,
        counter: parked_counter,
        ..
    } = c
        .call(&Request::Checksum {
            name: "parked".into(),
        })
        .unwrap()
    else {
        panic!()
    };
    for i in 0..4 {
        wait_vm(&mut c, &format!("vm{i}"), |v| v.ready && v.counter > 10);
    }

    let Response::Phase3 { report } = c
        .call(&Request::MemoryPreservingRestart { verify: true })
        .unwrap()
    else {
        panic!()
    };
    eprintln!("phase 3 report: {report:?}");
    assert_eq!(report.old_pid, pid);
    assert_eq!(report.new_pid, pid, "exec keeps the pid");
    assert_eq!(report.vms.len(), 5);
    for v in &report.vms {
        assert!(v.checksum_before.is_some());
        assert_eq!(v.checksum_before, v.checksum_after, "{}", v.name);
        assert_eq!(v.resumed, v.name != "parked");
    }
    assert!(report.freeze >= report.pause_all);

    // The successor serves the same connection and new ones.
    let Response::Pong { generation, .. } = c.call(&Request::Ping).unwrap() else {
        panic!()
    };
    assert_eq!(generation, 2);
    let mut fresh = agent.client();
    for v in &report.vms {
        if v.name == "parked" {
            continue;
        }
        let info = wait_vm(&mut fresh, &v.name, |i| i.counter > v.counter_before + 5);
        assert_eq!(info.state, RunState::Running);
    }
    let parked = fresh.vm("parked").unwrap();
    assert_eq!(parked.state, RunState::Paused);
    assert_eq!(parked.counter, parked_counter);
    let Response::Checksum { crc, .. } = fresh
        .call(&Request::Checksum {
            name: "parked".into(),
        })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(crc, parked_crc);
    fresh
        .call(&Request::Resume {
            name: "parked".into(),
        })
        .unwrap();
    wait_vm(&mut fresh, "parked", |v| v.counter > parked_counter + 5);

    // A successor can do it again (its own KVM fds and memfds move on).
    let Response::Phase3 { report } = fresh
        .call(&Request::MemoryPreservingRestart { verify: true })
        .unwrap()
    else {
        panic!()
    };
    assert_eq!(report.vms.len(), 5);
    for v in &report.vms {
        assert_eq!(v.checksum_before, v.checksum_after, "{}", v.name);
        assert!(v.resumed);
        wait_vm(&mut fresh, &v.name, |i| i.counter > v.counter_before + 5);
    }
}
