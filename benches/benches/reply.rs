//! A read's reply from its decoded chunks ([`skiff_fusefs::assemble`]): a
//! 1 MiB read over the 27 chunks of about 38 KiB that cover it (each
//! chunk's part copied into a pooled buffer in file order), a read with a
//! hole in it, and a 128 KiB read inside one chunk (answered from the
//! cached chunk with no copy). The buffer goes back to the pool after each
//! reply, as after a FUSE reply.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skiff_benches::compressible_data;
use skiff_fusefs::{assemble, ChunkData};

/// Chunks of about the large-file chunking's average (32 KiB target).
const CHUNK: usize = 38 << 10;
/// Chunks of a 1 MiB read.
const CHUNKS: usize = 27;

fn bench_reply(c: &mut Criterion) {
    let datas: Vec<ChunkData> = (0..CHUNKS)
        .map(|i| Arc::new(compressible_data(CHUNK, i as u64 + 1)))
        .collect();
    let starts: Vec<u64> = (0..CHUNKS).map(|i| (i * CHUNK) as u64).collect();
    let read = 1u64 << 20;
    // The read starts inside the first chunk and ends inside the last.
    let offset = 4096u64;

    let mut g = c.benchmark_group("reply");
    g.throughput(Throughput::Bytes(read));
    g.bench_function(BenchmarkId::new("several_chunks", CHUNKS), |b| {
        b.iter(|| {
            let r = assemble(offset, offset + read, &starts, &datas).unwrap();
            black_box(r.as_slice().len());
            r.recycle();
        })
    });
    // Every other chunk missing: half the reply is zeros (a sparse file).
    let (hole_starts, hole_datas): (Vec<u64>, Vec<ChunkData>) = starts
        .iter()
        .zip(&datas)
        .step_by(2)
        .map(|(s, d)| (*s, d.clone()))
        .unzip();
    g.bench_function(BenchmarkId::new("with_holes", hole_datas.len()), |b| {
        b.iter(|| {
            let r = assemble(offset, offset + read, &hole_starts, &hole_datas).unwrap();
            black_box(r.as_slice().len());
            r.recycle();
        })
    });
    // A 128 KiB read inside one 1 MiB chunk.
    let big: ChunkData = Arc::new(compressible_data(1 << 20, 99));
    g.throughput(Throughput::Bytes(128 << 10));
    g.bench_function(BenchmarkId::new("inside_one_chunk", 1), |b| {
        b.iter(|| {
            let r = assemble(256 << 10, 384 << 10, &[0], std::slice::from_ref(&big)).unwrap();
            black_box(r.as_slice().len());
            r.recycle();
        })
    });
    g.finish();
}

criterion_group!(benches, bench_reply);
criterion_main!(benches);
