//! `skiff inspect`, `skiff check` and `skiff unpack`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use skiff_converter::{check, inspect, unpack};
use skiff_format::Bootstrap;
use skiff_registry::skiff::{describe_original, open_image_for, OriginalImage, SkiffImage};
use skiff_registry::{ImageRef, Platform, RegistryConfig};

/// Arguments of `skiff inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The image: oci:DIR[:TAG] or docker://REF. An ordinary (not
    /// converted) docker:// image: its referrers are listed, and the
    /// Skiff image attached to it is shown.
    image: String,
    /// A path in the image: show its attributes, entries or chunk map.
    path: Option<String>,
    /// The platform to pick from an index: os/arch[/variant] (default: this host's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `skiff check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The image: oci:DIR[:TAG] or docker://REF (an ordinary image: the
    /// Skiff image attached to it as a referrer).
    image: String,
    /// The platform to pick from an index: os/arch[/variant] (default: this host's).
    #[arg(long)]
    platform: Option<Platform>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// Arguments of `skiff unpack`.
#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The image: oci:DIR[:TAG] or docker://REF (an ordinary image: the
    /// Skiff image attached to it as a referrer).
    image: String,
    /// The directory to create (or an empty one).
    dir: PathBuf,
    /// The platform to pick from an index: os/arch[/variant] (default: this host's).
    #[arg(long)]
    platform: Option<Platform>,
}

fn registry_config(reference: &ImageRef) -> anyhow::Result<RegistryConfig> {
    Ok(match reference {
        ImageRef::Docker(_) => RegistryConfig::from_env()?,
        _ => RegistryConfig::default(),
    })
}

fn open(image: &str, platform: Option<&Platform>) -> anyhow::Result<SkiffImage> {
    let reference: ImageRef = image.parse().with_context(|| format!("image '{image}'"))?;
    let config = registry_config(&reference)?;
    open_image_for(&reference, &config, platform, None).with_context(|| format!("opening {image}"))
}

/// For an ordinary docker:// image: what its referrers are. `None` for
/// layouts and for references that name a Skiff image.
fn original(image: &str, platform: Option<&Platform>) -> anyhow::Result<Option<OriginalImage>> {
    let reference: ImageRef = image.parse().with_context(|| format!("image '{image}'"))?;
    let ImageRef::Docker(d) = &reference else {
        return Ok(None);
    };
    let info = describe_original(d, &registry_config(&reference)?, platform)
        .with_context(|| format!("resolving {image}"))?;
    Ok((!info.is_skiff).then_some(info))
}

/// Runs `skiff inspect`.
pub fn inspect(args: InspectArgs) -> anyhow::Result<ExitCode> {
    let original = match &args.path {
        None => original(&args.image, args.platform.as_ref())?,
        Some(_) => None,
    };
    if let Some(o) = &original {
        if !args.json {
            println!("original   {} (not a Skiff image)", o.manifest_digest);
            println!("referrers  {} (through {})", o.referrers.len(), o.via);
            for r in &o.referrers {
                println!(
                    "  {} {} {}",
                    r.digest,
                    r.artifact_type.as_deref().unwrap_or("(no artifactType)"),
                    if Some(r.digest) == o.skiff_referrer {
                        "<- Skiff mounts this one"
                    } else {
                        ""
                    }
                );
            }
        }
        if o.skiff_referrer.is_none() {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&o)?);
            } else {
                println!("Skiff would mount: none (no valid Skiff referrer)");
            }
            return Ok(ExitCode::SUCCESS);
        }
    }
    let image = open(&args.image, args.platform.as_ref())?;
    let b = Bootstrap::parse(&image.bootstrap).context("reading the bootstrap")?;
    match &args.path {
        None => {
            let s = inspect::summary(&b, image.bootstrap.len() as u64)?;
            if args.json {
                let v = serde_json::json!({
                    "image": args.image,
                    "manifest_digest": image.manifest_digest.to_string(),
                    "original": original,
                    "summary": s,
                });
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                println!("image      {}", args.image);
                println!("manifest   {}", image.manifest_digest);
                println!(
                    "bootstrap  {} bytes, {} inodes: {} files ({:.1} MB), {} dirs, {} symlinks, {} special",
                    s.bootstrap_bytes,
                    s.inodes,
                    s.regular_files,
                    s.file_bytes as f64 / 1e6,
                    s.directories,
                    s.symlinks,
                    s.special
                );
                println!(
                    "chunks     {} distinct, {:.1} MB uncompressed, {} digests",
                    s.chunks,
                    s.chunk_bytes as f64 / 1e6,
                    s.chunk_hash
                );
                for (i, blob) in s.blobs.iter().enumerate() {
                    println!(
                        "blob {i:<5} {} {:.1} MB stored, {:.1} MB data, {} chunks",
                        blob.digest,
                        blob.size as f64 / 1e6,
                        blob.uncompressed_size as f64 / 1e6,
                        blob.chunks
                    );
                }
            }
        }
        Some(path) => {
            let st = inspect::stat(&b, path)?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                println!(
                    "{}  {}  ino {}  mode {}  {}:{}  nlink {}  size {}  mtime {}.{:09}",
                    st.path,
                    st.kind,
                    st.ino,
                    st.mode,
                    st.uid,
                    st.gid,
                    st.nlink,
                    st.size,
                    st.mtime.0,
                    st.mtime.1
                );
                if st.rdev != (0, 0) {
                    println!("  rdev {}:{}", st.rdev.0, st.rdev.1);
                }
                if let Some(t) = &st.target {
                    println!("  -> {t}");
                }
                for (n, v) in &st.xattrs {
                    println!("  xattr {n} = {v}");
                }
                for (n, k) in &st.entries {
                    println!("  {k:<8} {n}");
                }
                for c in &st.chunks {
                    println!(
                        "  @{:<12} {:>8} B  chunk {:<7} blob {} +{:<12} {:>8} B {}  {}",
                        c.file_offset,
                        c.size,
                        c.chunk,
                        c.blob,
                        c.blob_offset,
                        c.stored_size,
                        if c.compressed { "zstd" } else { "raw " },
                        c.digest
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `skiff check`; exit code 1 when anything is wrong.
pub fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.image, args.platform.as_ref())?;
    let b = Bootstrap::parse(&image.bootstrap).context("bootstrap checksum or header")?;
    let report = check::check(&b, image.store.as_ref())?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for p in &report.problems {
            println!("FAULT {p}");
        }
        println!(
            "{}: {} blobs ({:.1} MB) and {} chunks verified, {} problems",
            args.image,
            report.blobs_checked,
            report.blob_bytes as f64 / 1e6,
            report.chunks_checked,
            report.problem_count
        );
    }
    Ok(if report.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Runs `skiff unpack`.
pub fn unpack(args: UnpackArgs) -> anyhow::Result<ExitCode> {
    let image = open(&args.image, args.platform.as_ref())?;
    let b = Bootstrap::parse(&image.bootstrap).context("reading the bootstrap")?;
    let stats = unpack::unpack(&b, image.store.as_ref(), &args.dir)?;
    println!(
        "unpacked {} into {}: {} paths, {} files, {:.1} MB{}",
        args.image,
        args.dir.display(),
        stats.paths,
        stats.files,
        stats.bytes as f64 / 1e6,
        if stats.ownership_restored {
            ""
        } else {
            " (not root: ownership not restored)"
        }
    );
    Ok(ExitCode::SUCCESS)
}
