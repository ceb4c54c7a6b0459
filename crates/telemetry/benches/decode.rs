//! Wire decoding per record: `cargo bench -p waterbear-telemetry --bench decode`.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use waterbear_telemetry::{HostRecord, decode, decode_into, encode_binary_to_vec, encode_to_vec};

fn bench(c: &mut Criterion) {
    let bytes = encode_to_vec(&HostRecord::example("host-00042", 1_767_225_600_000));
    let mut g = c.benchmark_group("wire");
    g.throughput(Throughput::Elements(1));
    g.bench_function("decode_valid", |b| {
        b.iter(|| decode(std::hint::black_box(&bytes)).unwrap())
    });
    let bin = encode_binary_to_vec(&HostRecord::example("host-00042", 1_767_225_600_000));
    g.bench_function("decode_binary_valid", |b| {
        b.iter(|| decode(std::hint::black_box(&bin)).unwrap())
    });
    // the scorer's path: into one record whose buffers are reused
    let mut out = HostRecord::default();
    g.bench_function("decode_binary_into_valid", |b| {
        b.iter(|| decode_into(std::hint::black_box(&bin), &mut out).unwrap())
    });
    g.bench_function("decode_path_tracking", |b| {
        b.iter(|| {
            let mut de = serde_json::Deserializer::from_slice(std::hint::black_box(&bytes));
            let r: HostRecord = serde_path_to_error::deserialize(&mut de).unwrap();
            r
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
