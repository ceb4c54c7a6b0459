//! Features + detector + policy per record, on a simulated fleet's telemetry.
//! `cargo bench -p waterbear-pipeline --bench per_record`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use waterbear_pipeline::{Pipeline, PipelineConfig};
use waterbear_sim::{Fleet, SimConfig};
use waterbear_telemetry::HostRecord;

fn records() -> Vec<HostRecord> {
    let cfg = SimConfig {
        hosts: 500,
        days: 2.0,
        failure_fraction: 0.2,
        ..SimConfig::default()
    };
    let mut fleet = Fleet::new(cfg.check().expect("valid sim config"));
    let mut all = Vec::new();
    let mut buf = Vec::new();
    while !fleet.done() {
        fleet.step(&mut buf);
        all.append(&mut buf);
    }
    all
}

fn bench(c: &mut Criterion) {
    let recs = records();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(recs.len() as u64));
    g.sample_size(10);
    g.bench_function("features+detector+policy", |b| {
        b.iter(|| {
            let mut p = Pipeline::from_config(PipelineConfig::default()).expect("default config");
            let mut decisions = 0usize;
            for r in &recs {
                decisions += usize::from(p.process_valid(r).decision.is_some());
            }
            decisions
        })
    });
    g.bench_function("validate+features+detector+policy", |b| {
        b.iter(|| {
            let mut p = Pipeline::from_config(PipelineConfig::default()).expect("default config");
            let mut decisions = 0usize;
            for r in &recs {
                if let Ok(step) = p.process(r, r.ts_ms) {
                    decisions += usize::from(step.decision.is_some());
                }
            }
            decisions
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
