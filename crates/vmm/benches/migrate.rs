//! `cargo bench -p waterbear-vmm --bench migrate`: live-migration, phase-3 and
//! loopback-TCP figures on this machine (prints a Markdown table).
//!
//! `WB_BENCH_SIZES=256,1024` (MiB), `WB_BENCH_RATES=0,50,500` (MB/s) and
//! `WB_BENCH_REPS=3` override the defaults. `WB_BENCH_TARGET=prepared`
//! (default: target memory allocated and populated before the source
//! connects), `populate` (populated after HELLO, inside the total) or `lazy`
//! (faulted page by page) picks how the target gets its memory;
//! `WB_BENCH_NO_PHASE3=1` skips the phase-3 runs; `WB_BENCH_CHUNK=pages`
//! overrides `MigrateOptions::chunk_pages`.

use std::path::Path;
use std::time::Duration;

use waterbear_vmm::MigrateOptions;
use waterbear_vmm::bench::{TargetMemory, bench_loopback_tcp, bench_migrate, bench_phase3};

fn list(var: &str, default: &[u64]) -> Vec<u64> {
    std::env::var(var)
        .ok()
        .map(|v| v.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing
    // and expects a quick run.
    let quick = !std::env::args().any(|a| a == "--bench");
    let sizes = list("WB_BENCH_SIZES", if quick { &[64] } else { &[256, 1024] });
    let rates = list("WB_BENCH_RATES", &[0, 50, 500]);
    let target = std::env::var("WB_BENCH_TARGET")
        .ok()
        .map(|t| TargetMemory::parse(&t).expect("WB_BENCH_TARGET: prepared, populate or lazy"))
        .unwrap_or(TargetMemory::Prepared);
    let mut opts = MigrateOptions::default();
    if let Some(chunk) = list("WB_BENCH_CHUNK", &[]).first() {
        opts.chunk_pages = *chunk as u32;
    }
    let skip_phase3 = std::env::var_os("WB_BENCH_NO_PHASE3").is_some();
    let reps = list("WB_BENCH_REPS", &[if quick { 1 } else { 3 }])[0].max(1) as usize;

    let tcp: Vec<f64> = (0..reps.max(3))
        .map(|_| bench_loopback_tcp(if quick { 256 << 20 } else { 4 << 30 }).expect("loopback"))
        .collect();
    let tcp = median(tcp);
    println!(
        "loopback TCP (1 MiB writes, median of {}): {:.0} MB/s\n",
        reps.max(3),
        tcp / 1e6
    );

    println!("target memory: {target:?}\n");
    println!(
        "| guest | dirty rate | total ms | downtime ms | sent MiB | rounds | final pages | eff. MB/s | eff./TCP |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for &mib in &sizes {
        for &rate in &rates {
            let mut runs = Vec::new();
            for _ in 0..reps {
                runs.push(bench_migrate(mib, rate * 1_000_000, &opts, target).expect("migration"));
            }
            runs.sort_by_key(|r| r.downtime);
            let r = &runs[runs.len() / 2];
            let total = median(runs.iter().map(|r| ms(r.total)).collect());
            let bw = median(runs.iter().map(|r| r.effective_bandwidth).collect());
            println!(
                "| {mib} MiB | {rate} MB/s | {total:.1} | {:.2} (min {:.2}, max {:.2}) | {:.0} | {} | {} | {:.0} | {:.2} |",
                ms(r.downtime),
                ms(runs[0].downtime),
                ms(runs[runs.len() - 1].downtime),
                r.bytes_sent as f64 / (1 << 20) as f64,
                r.rounds,
                r.final_pages,
                bw / 1e6,
                bw / tcp,
            );
            eprintln!(
                "    breakdown of the median-downtime run: {:?}",
                r.breakdown
            );
        }
    }

    if skip_phase3 {
        return;
    }
    let exe = Path::new(env!("CARGO_BIN_EXE_wb-host-agent"));
    let p3_mib = if quick { 16 } else { 256 };
    let mut freezes = Vec::new();
    println!("\nphase 3, 4 VMs x {p3_mib} MiB at 50 MB/s each:");
    for _ in 0..reps.max(3) {
        let r = bench_phase3(exe, 4, p3_mib, 50_000_000).expect("phase 3");
        println!(
            "  freeze {:.2} ms (pause all {:.3} ms, pause->exec {:.2} ms, pause->successor start {:.2} ms, restore {:.2} ms)",
            ms(r.freeze),
            ms(r.pause_all),
            ms(r.until_exec),
            ms(r.until_successor),
            ms(r.restore_all)
        );
        freezes.push(ms(r.freeze));
    }
    println!("phase 3 freeze median: {:.2} ms", median(freezes));
}
