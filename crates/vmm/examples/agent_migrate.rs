//! Live migration between two host agents (in this process, on /dev/kvm),
//! with and without `PrepareIncoming` on the target first; prints total,
//! downtime, effective bandwidth and its ratio to loopback TCP.
//!
//! ```text
//! cargo run --release -p waterbear-vmm --example agent_migrate -- 1024 3
//! ```
//! Arguments: guest MiB (default 1024), repetitions (default 3). The guest
//! first dirties all of its memory (so every page is real data), then idles.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use waterbear_vmm::agent::{AgentClient, AgentConfig, Request, Response, run_host_agent};
use waterbear_vmm::bench::bench_loopback_tcp;
use waterbear_vmm::{MigrateOptions, RunState};

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn spawn_agent(tag: &str) -> SocketAddr {
    let addr = free_addr();
    let dir = std::env::temp_dir().join(format!("wb-agent-migrate-{tag}-{}", std::process::id()));
    let cfg = AgentConfig {
        listen: addr,
        data_dir: dir,
        resume_state: None,
        exec_args: None,
        announce: false,
        prepared_ttl: waterbear_vmm::DEFAULT_PREPARED_TTL,
    };
    std::thread::spawn(move || run_host_agent(cfg).expect("agent"));
    let end = Instant::now() + Duration::from_secs(10);
    while AgentClient::connect(addr).is_err() {
        assert!(Instant::now() < end, "agent at {addr} did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    addr
}

fn client(addr: SocketAddr) -> AgentClient {
    let c = AgentClient::connect(addr).unwrap();
    c.set_timeout(Some(Duration::from_secs(120))).unwrap();
    c
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).map_or(1024, |s| s.parse().expect("MiB"));
    let reps: usize = args.get(2).map_or(3, |s| s.parse().expect("repetitions"));
    let a = spawn_agent("a");
    let b = spawn_agent("b");
    let (mut ca, mut cb) = (client(a), client(b));
    println!("guest {mib} MiB, {reps} repetitions per case");
    println!("| case | run | total ms | downtime ms | eff. MB/s | loopback MB/s | ratio |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut n = 0;
    for prepared in [false, true] {
        for rep in 0..reps {
            n += 1;
            let name = format!("vm{n}");
            ca.call(&Request::StartVm {
                name: name.clone(),
                mem_mib: mib,
                dirty_bytes_per_sec: 2_000_000_000,
            })
            .unwrap();
            // dirty all memory once (the guest walks its pages), then idle
            let mem_bytes = mib << 20;
            let end = Instant::now() + Duration::from_secs(60);
            loop {
                let v = ca.vm(&name).unwrap();
                let walked = u64::from(v.counter) * u64::from(v.pages_per_tick) * 4096;
                if v.ready && walked >= mem_bytes {
                    break;
                }
                assert!(Instant::now() < end, "guest did not dirty its memory");
                std::thread::sleep(Duration::from_millis(50));
            }
            ca.call(&Request::SetDirtyRate {
                name: name.clone(),
                dirty_bytes_per_sec: 0,
            })
            .unwrap();
            if prepared {
                let r = cb
                    .call(&Request::PrepareIncoming {
                        name: name.clone(),
                        mem_bytes,
                    })
                    .unwrap();
                assert!(matches!(r, Response::Prepared { .. }), "{r:?}");
            }
            let loopback = bench_loopback_tcp(256 << 20).unwrap() / 1e6;
            let Response::Migrated { report } = ca
                .call(&Request::MigrateOut {
                    name: name.clone(),
                    to: b.to_string(),
                    options: MigrateOptions::default(),
                })
                .unwrap()
            else {
                panic!("migration failed")
            };
            let eff = report.bytes_sent as f64 / report.total.as_secs_f64() / 1e6;
            println!(
                "| {} | {} | {:.1} | {:.2} | {:.0} | {:.0} | {:.2} |",
                if prepared {
                    "prepared target"
                } else {
                    "lazy target"
                },
                rep + 1,
                report.total.as_secs_f64() * 1e3,
                report.downtime.as_secs_f64() * 1e3,
                eff,
                loopback,
                eff / loopback
            );
            let v = cb.vm(&name).unwrap();
            assert_eq!(v.state, RunState::Running);
            cb.call(&Request::StopVm { name }).unwrap();
        }
    }
    let _ = ca.call(&Request::Shutdown);
    let _ = cb.call(&Request::Shutdown);
}
