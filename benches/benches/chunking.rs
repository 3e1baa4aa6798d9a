//! Chunking + compression: the converter's per-byte work (FastCDC or fixed
//! cut points, then one zstd frame per chunk).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::io;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skiff_benches::compressible_data;
use skiff_converter::chunker::{Chunker, Chunking};
use skiff_format::encode_chunk;

const INPUT: usize = 16 << 20;

fn policies() -> Vec<(&'static str, Chunking)> {
    vec![
        ("fastcdc_128k", Chunking::default()),
        ("fixed_128k", Chunking::Fixed { size: 128 << 10 }),
        ("fixed_1m", Chunking::Fixed { size: 1 << 20 }),
    ]
}

fn bench_chunking(c: &mut Criterion) {
    let data = compressible_data(INPUT, 1);
    let mut g = c.benchmark_group("chunk_only");
    g.throughput(Throughput::Bytes(INPUT as u64));
    g.sample_size(20);
    for (name, policy) in policies() {
        let mut chunker = Chunker::new(policy);
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut n = 0u64;
                chunker
                    .for_each_chunk(&mut &data[..], |_, chunk| -> io::Result<()> {
                        n += chunk.len() as u64;
                        Ok(())
                    })
                    .unwrap();
                black_box(n)
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("chunk_and_compress");
    g.throughput(Throughput::Bytes(INPUT as u64));
    g.sample_size(10);
    for level in [3, 4, 9] {
        let mut chunker = Chunker::new(Chunking::default());
        g.bench_function(BenchmarkId::new("fastcdc_128k_zstd", level), |b| {
            b.iter(|| {
                let mut stored = 0usize;
                chunker
                    .for_each_chunk(&mut &data[..], |_, chunk| -> io::Result<()> {
                        let (s, _) = encode_chunk(chunk, level).map_err(io::Error::other)?;
                        stored += s.len();
                        Ok(())
                    })
                    .unwrap();
                black_box(stored)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_chunking);
criterion_main!(benches);
