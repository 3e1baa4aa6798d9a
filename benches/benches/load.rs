//! One load on the mount's read path: the chunks of a 1 MiB window of a
//! local blob (the reads of a file that a reader walks through), each read
//! from the blob file, decoded and verified, through [`ChunkSource`] as a
//! FUSE read does it. With the memory cache off, every iteration loads
//! every chunk again. `parallel` decodes the load's chunks on one scoped
//! thread per CPU (what a mount does), `one_thread` on the calling thread
//! alone; the difference is what the parallel decode buys, net of starting
//! its threads for every load: a loss for the smallest loads, a gain for
//! the window (see `run_parallel` in fusefs/src/workers.rs for what that
//! did and did not change end to end).
#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use skiff_benches::{compressible_data, stored_chunk};
use skiff_format::Digest;
use skiff_fusefs::{Backend, ChunkRequest, ChunkSource, SourceOptions};
use skiff_registry::LocalBlobStore;

/// Chunks of about the large-file chunking's average (32 KiB target).
const CHUNK: usize = 38 << 10;
/// Chunks of the largest load: a 1 MiB window.
const CHUNKS: usize = 27;
/// Loads measured, in chunks: small reads (a page fault, a short file)
/// and the 1 MiB window.
const SIZES: [usize; 3] = [2, 4, CHUNKS];

fn bench_load(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let blobs = dir.path().join("blobs").join("sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let mut blob = Vec::new();
    let mut infos = Vec::new();
    for i in 0..CHUNKS {
        let data = compressible_data(CHUNK, i as u64 + 1);
        let (stored, info) = stored_chunk(&data, 4, blob.len() as u64).unwrap();
        infos.push(info);
        blob.extend_from_slice(&stored);
    }
    let digest = Digest::of(&blob);
    std::fs::write(blobs.join(digest.to_hex()), &blob).unwrap();
    let reqs: Vec<ChunkRequest> = infos
        .into_iter()
        .enumerate()
        .map(|(i, info)| ChunkRequest {
            index: i as u32,
            info,
            blob: digest,
        })
        .collect();

    let mut g = c.benchmark_group("load_local_window");
    let per_cpu = SourceOptions::default().decode_threads;
    for (name, decode_threads) in [("parallel", per_cpu), ("one_thread", 1)] {
        let store = LocalBlobStore::new(dir.path()).unwrap();
        let opts = SourceOptions {
            memory_bytes: 0,
            decode_threads,
            ..SourceOptions::default()
        };
        let source = ChunkSource::new(Backend::new(Arc::new(store)), None, opts, Arc::default());
        for n in SIZES {
            let reqs = &reqs[..n];
            g.throughput(Throughput::Bytes((CHUNK * n) as u64));
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| black_box(source.get_many(reqs).unwrap().len()))
            });
        }
    }
    g.finish();
}

criterion_group!(benches, bench_load);
criterion_main!(benches);
