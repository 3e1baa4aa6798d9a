//! Chunk decode + verify: what every first read of a chunk costs on the mount
//! (zstd frame checks, decompression into a bounded buffer, SHA-256), and
//! beside it the floor of this machine: zstd decompression alone (one
//! reused context) and SHA-256 alone.
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skiff_benches::{compressible_data, stored_chunk, XorShift};
use skiff_format::{decode_chunk, decode_chunk_into, ChunkHash};

fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode_chunk");
    for size in [4 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20] {
        let data = compressible_data(size, size as u64);
        let (stored, info) = stored_chunk(&data, 4, 0).unwrap();
        assert!(info.compressed);
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("zstd_verify", size), &stored, |b, s| {
            b.iter(|| black_box(decode_chunk(&info, s).unwrap().len()))
        });
        let mut out = Vec::with_capacity(size);
        g.bench_with_input(
            BenchmarkId::new("zstd_verify_into", size),
            &stored,
            |b, s| {
                b.iter(|| {
                    decode_chunk_into(&info, s, &mut out).unwrap();
                    black_box(out.len())
                })
            },
        );
        let mut dctx = zstd::bulk::Decompressor::new().unwrap();
        let mut buf = vec![0u8; size];
        g.bench_with_input(
            BenchmarkId::new("floor_zstd_only", size),
            &stored,
            |b, s| b.iter(|| black_box(dctx.decompress_to_buffer(s, &mut buf).unwrap())),
        );
        // Verification alone, under each chunk hash a bootstrap can name.
        for hash in [ChunkHash::Sha256, ChunkHash::Blake3] {
            g.bench_with_input(
                BenchmarkId::new(format!("floor_{hash}_only"), size),
                &data,
                |b, d| b.iter(|| black_box(hash.digest(d))),
            );
        }
    }
    // Incompressible data is stored raw: verify only.
    let mut rng = XorShift::new(9);
    let raw: Vec<u8> = (0..(128 << 10)).map(|_| rng.next_u64() as u8).collect();
    let (stored, info) = stored_chunk(&raw, 4, 0).unwrap();
    assert!(!info.compressed);
    g.throughput(Throughput::Bytes(raw.len() as u64));
    g.bench_function(BenchmarkId::new("raw_verify", raw.len()), |b| {
        b.iter(|| black_box(decode_chunk(&info, &stored).unwrap().len()))
    });
    g.finish();
}

criterion_group!(benches, bench_decode);
criterion_main!(benches);
