//! `skiff convert`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use skiff_converter::image::{
    convert_image_with_prefetch, ConvertRequest, ReuseOptions, SourceSpec,
};
use skiff_converter::{Chunking, ConvertOptions, LargeFiles};
use skiff_format::ChunkHash;
use skiff_registry::ImageRef;

use crate::progress::Bar;

/// Arguments of `skiff convert`.
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    skiff convert docker://reg/app:1 docker://reg/app:1-skiff\n  \
    skiff convert oci:./layout:app oci:./out:app\n  \
    skiff convert docker-archive:app.tar oci:./out:app\n  \
    skiff convert --layer base.tar.gz --layer app.tar oci:./out:app\n  \
    skiff convert --cache-dir /var/cache/skiff-convert docker://reg/app:2 docker://reg/app:2-skiff")]
pub struct ConvertArgs {
    /// SOURCE DEST, or just DEST with --layer. Images use skopeo's syntax:
    /// docker://REGISTRY/REPO[:TAG|@DIGEST] (a registry), oci:DIR[:TAG],
    /// docker-archive:FILE[:REF]. A multi-platform SOURCE (an index or a
    /// manifest list) gives an index of Skiff images, one per platform.
    /// From a registry to a registry, each Skiff image is also attached to
    /// its source manifest as an OCI referrer, so that `skiff mount` and
    /// the snapshotter find it from the original reference.
    #[arg(value_name = "IMAGE", num_args = 1..=2, required = true)]
    images: Vec<String>,
    /// A plain layer tar (tar, tar+gzip or tar+zstd), lowest first; repeat for more.
    #[arg(long = "layer", value_name = "FILE")]
    layers: Vec<PathBuf>,
    /// With --layer: an OCI image config JSON whose runtime settings to keep.
    #[arg(long, value_name = "FILE", requires = "layers")]
    config: Option<PathBuf>,
    /// Chunking: fastcdc:AVG, fastcdc:MIN/AVG/MAX or fixed:SIZE (sizes like 64k, 1m).
    #[arg(long, default_value_t = Chunking::default())]
    chunking: Chunking,
    /// Files of at least SIZE are cut with CHUNKING instead (random reads
    /// into large files then decode and verify less); `off` cuts every
    /// file with --chunking.
    #[arg(long, value_name = "SIZE:CHUNKING|off", default_value_t = LargeFilesArg(Some(LargeFiles::default())))]
    large_file_chunking: LargeFilesArg,
    /// zstd compression level of chunks (1-22).
    #[arg(long, default_value_t = ConvertOptions::default().level)]
    level: i32,
    /// Pack small files and file tails (chunks under half this size and
    /// under the chunker's minimum) into shared zstd frames of about this
    /// size (format 1.1); 0 gives every chunk its own frame (format 1.0
    /// readers can mount the result).
    #[arg(long, value_name = "SIZE", default_value = "64k", value_parser = parse_pack_size)]
    pack_size: u32,
    /// Compression threads (default: the number of CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// The hash of chunk digests: blake3 (format 1.4, about three times
    /// as fast to verify on every read) or sha256 (what images converted
    /// before 1.4 use: give it to share chunks with such a --chunk-dict,
    /// or for readers older than 1.4).
    #[arg(long, value_name = "blake3|sha256", default_value_t = ChunkHash::Blake3)]
    chunk_hash: ChunkHash,
    /// Store every layer's files in tar order. By default the files a
    /// container's start rarely reads (test suites, documentation, headers,
    /// Python sources beside their bytecode) go after the rest of their
    /// layer's blob (they wait, compressed, in a temporary file under
    /// TMPDIR until their layer ends), so that what a lazy mount fetches
    /// along with a read is more often what the workload reads next.
    #[arg(long)]
    tar_order: bool,
    /// An earlier Skiff image whose chunks are referenced instead of stored
    /// again; repeat for more.
    #[arg(long = "chunk-dict", value_name = "IMAGE")]
    chunk_dicts: Vec<String>,
    /// A local layer cache: a source layer converted before (same diff ID,
    /// same settings) is rebuilt from its record instead of being read,
    /// chunked and compressed again; every converted layer is kept there.
    /// Safe to share between concurrent conversions.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Convert every layer afresh: do not look layers up in the cache, the
    /// chunk dictionaries' layer records or the target repository's record
    /// tags (records are still written).
    #[arg(long)]
    no_layer_reuse: bool,
    /// Convert only this platform of a multi-platform source:
    /// os/arch[/variant] (default: every platform).
    #[arg(long)]
    platform: Option<String>,
    /// Do not attach the Skiff images to their source manifests as OCI
    /// referrers (the original image is never changed either way).
    #[arg(long)]
    no_referrer: bool,
    /// What to fetch first after mounting, in order, one entry per line: an
    /// absolute path (the whole file) or PATH<TAB>OFFSET<TAB>LENGTH (that
    /// stretch of it), as `skiff mount --record-access` writes them; stored
    /// in the image's prefetch tables. Paths not in the image are skipped
    /// with a warning.
    #[arg(long, value_name = "FILE")]
    prefetch_list: Option<PathBuf>,
    /// Print a machine-readable summary on stdout.
    #[arg(long)]
    json: bool,
    /// Never draw a progress bar.
    #[arg(long)]
    no_progress: bool,
}

/// Runs `skiff convert`.
pub fn run(args: ConvertArgs) -> anyhow::Result<ExitCode> {
    let (source, dest) = match (args.layers.is_empty(), args.images.as_slice()) {
        (true, [src, dst]) => (
            SourceSpec::Image {
                reference: src
                    .parse::<ImageRef>()
                    .with_context(|| format!("source '{src}'"))?,
                platform: args.platform.clone(),
            },
            dst,
        ),
        (false, [dst]) => (
            SourceSpec::Layers {
                layers: args.layers.clone(),
                config: args.config.clone(),
            },
            dst,
        ),
        (true, [_]) => bail!("give SOURCE and DEST, or --layer FILE... and DEST"),
        (false, _) => bail!("with --layer, give only the destination image"),
        _ => bail!("expected SOURCE DEST"),
    };
    let dest: ImageRef = dest
        .parse()
        .with_context(|| format!("destination '{dest}'"))?;
    let chunk_dicts = args
        .chunk_dicts
        .iter()
        .map(|d| {
            d.parse::<ImageRef>()
                .with_context(|| format!("chunk dictionary '{d}'"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut options = ConvertOptions {
        chunking: args.chunking,
        large_files: args.large_file_chunking.0,
        level: args.level,
        pack_size: args.pack_size,
        chunk_hash: args.chunk_hash,
        cold_last: !args.tar_order,
        ..ConvertOptions::default()
    };
    if let Some(t) = args.threads {
        options.threads = t.max(1);
    }
    let show = !args.no_progress && !args.json && std::io::stderr().is_terminal();
    let request = ConvertRequest {
        source,
        dest: dest.clone(),
        chunk_dicts,
        options,
        progress: Some(Arc::new(Bar::new(show))),
        reuse: ReuseOptions {
            cache_dir: args.cache_dir.clone(),
            lookup: !args.no_layer_reuse,
        },
        referrer: !args.no_referrer,
    };
    let prefetch = match &args.prefetch_list {
        Some(p) => skiff_converter::prefetch::parse_prefetch_list(
            &std::fs::read_to_string(p)
                .with_context(|| format!("reading the prefetch list {}", p.display()))?,
        ),
        None => Vec::new(),
    };
    let result = convert_image_with_prefetch(request, prefetch)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        let s = &result.stats;
        if result.platforms.is_empty() {
            println!("converted to {dest} (manifest {})", result.manifest_digest);
        } else {
            println!(
                "converted to {dest} (index {}, {} platforms)",
                result.manifest_digest,
                result.platforms.len()
            );
            for p in &result.platforms {
                println!(
                    "  {}: manifest {} from {}, {} of {} layers reused, {} out",
                    p.platform,
                    p.manifest_digest,
                    p.source_manifest,
                    p.reuse.layers_reused,
                    p.reuse.layers.len(),
                    mb(p.stats.bytes_out)
                );
            }
            println!("  first platform:");
        }
        println!(
            "  layers {}: {} entries ({} files, {} hard links, {} whiteouts)",
            s.layers, s.entries, s.files, s.hard_links, s.whiteouts
        );
        println!(
            "  in:  {} of layers ({} compressed)",
            mb(s.bytes_in),
            mb(s.bytes_in_compressed)
        );
        println!(
            "  chunks: {} references, {} unique, {} from dictionaries; dedup ratio {:.3}; holes {}",
            s.chunks,
            s.unique_chunks,
            s.dict_chunks,
            s.dedup_ratio,
            mb(s.hole_bytes)
        );
        println!(
            "  out: {} data blobs + {} bootstrap ({} uncompressed) = {}",
            mb(s.blob_bytes),
            mb(s.bootstrap_layer_bytes),
            mb(s.bootstrap_bytes),
            mb(s.bytes_out)
        );
        let r = &result.reuse;
        println!(
            "  reuse: {} of {} layers reused, {} converted; {} chunks from dictionaries; \
             {} compressed ({} chunks)",
            r.layers_reused,
            r.layers.len(),
            r.layers_converted,
            r.dict_chunks,
            mb(r.bytes_compressed),
            r.chunks_compressed
        );
        for (i, l) in r.layers.iter().enumerate() {
            println!(
                "    layer {} {}: {}",
                i + 1,
                l.diff_id,
                l.reused_from
                    .as_deref()
                    .map_or("converted".to_string(), |f| format!("reused from {f}"))
            );
        }
        println!(
            "  pushed: {}; blobs already there {}, cross-mounted {}",
            mb(r.bytes_pushed),
            r.blobs_skipped,
            r.blobs_mounted
        );
        for r in &result.referrers {
            println!(
                "  referrer of {}{}: {} in {} (through {})",
                r.subject,
                if r.platform.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.platform)
                },
                r.manifest_digest,
                r.repository,
                r.via
            );
        }
        let secs = s.seconds.max(1e-9);
        println!(
            "  {:.2} s, {:.1} MB/s of uncompressed input",
            s.seconds,
            s.bytes_in as f64 / 1e6 / secs
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn mb(bytes: u64) -> String {
    format!("{:.1} MB", bytes as f64 / 1e6)
}

/// `--pack-size`: 0, or 4 KiB..=4 MiB (sizes like 64k).
fn parse_pack_size(s: &str) -> Result<u32, String> {
    let n = skiff_fusefs::disk::parse_size(s)?;
    if n != 0 && !(4096..=4 << 20).contains(&n) {
        return Err(format!("pack size {n} is not 0 or 4 KiB..=4 MiB"));
    }
    u32::try_from(n).map_err(|_| format!("pack size {n} is too large"))
}

/// `--large-file-chunking`: a policy, or `off`.
#[derive(Clone, Debug)]
struct LargeFilesArg(Option<LargeFiles>);

impl std::str::FromStr for LargeFilesArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "off" {
            return Ok(LargeFilesArg(None));
        }
        s.parse().map(|l| LargeFilesArg(Some(l)))
    }
}

impl std::fmt::Display for LargeFilesArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.0 {
            Some(l) => write!(f, "{l}"),
            None => f.write_str("off"),
        }
    }
}
