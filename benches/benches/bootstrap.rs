//! Bootstrap lookups on a synthetic 100,000-file bootstrap: what every FUSE
//! `lookup` and path resolution costs (binary search over mapped records).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use skiff_benches::{dir_name, file_name, synthetic_tree, XorShift};
use skiff_format::{write_bootstrap, Bootstrap};

const FILES: usize = 100_000;
const PER_DIR: usize = 1_000;

fn bench_bootstrap(c: &mut Criterion) {
    let (tree, paths) = synthetic_tree(FILES, PER_DIR);
    let buf = write_bootstrap(&tree).expect("write_bootstrap");
    let boot = Bootstrap::parse(&buf).expect("parse");
    let root = boot.root();
    let dirs: Vec<_> = (0..FILES / PER_DIR)
        .map(|d| boot.lookup(root, &dir_name(d)).unwrap().unwrap())
        .collect();
    // A fixed random order of probes, so that caches see a realistic spread.
    let mut rng = XorShift::new(42);
    let probes: Vec<usize> = (0..4096)
        .map(|_| rng.below(FILES as u64) as usize)
        .collect();

    let mut g = c.benchmark_group("bootstrap_100k");
    g.throughput(Throughput::Elements(probes.len() as u64));
    g.bench_function("lookup", |b| {
        b.iter(|| {
            for &i in &probes {
                let dir = dirs[i / PER_DIR];
                black_box(boot.lookup(dir, &file_name(i)).unwrap());
            }
        })
    });
    g.bench_function("lookup_miss", |b| {
        b.iter(|| {
            for &i in &probes {
                let dir = dirs[i / PER_DIR];
                black_box(boot.lookup(dir, b"no-such-file").unwrap());
            }
        })
    });
    g.bench_function("resolve_path", |b| {
        b.iter(|| {
            for &i in &probes {
                black_box(boot.resolve_path(&paths[i]).unwrap());
            }
        })
    });
    g.finish();

    let mut g = c.benchmark_group("bootstrap_100k_open");
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.sample_size(20);
    // What a mount pays before serving: parse = header, table and every
    // section CRC.
    g.bench_function("parse", |b| {
        b.iter(|| black_box(Bootstrap::parse(black_box(&buf)).unwrap().inode_count()))
    });
    g.bench_function("write_bootstrap", |b| {
        b.iter_batched(
            || tree.clone(),
            |t| black_box(write_bootstrap(&t).unwrap().len()),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench_bootstrap);
criterion_main!(benches);
