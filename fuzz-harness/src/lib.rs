//! The entry points Skiff's fuzz targets feed arbitrary bytes to.
//!
//! Each function here takes one input of arbitrary bytes and drives the real
//! parsers and decoders with it, the way hostile data reaches them in
//! production: the bootstrap reader, the converter's layer reader
//! (gzip/zstd/plain sniffing, tar dialects, merging into the tree), the
//! manifest, config and index parsers (OCI layouts and `docker save`
//! archives), and the chunk decoder with the fetch path above it. The rule
//! is the same everywhere: *errors are fine, panics are bugs*. Where an input
//! is accepted, the functions also check what must then hold (a converted
//! layer gives a bootstrap that validates and chunks that decode; a decoded
//! chunk has its digest) and panic, with a message, when it does not: a
//! panic here is a bug in the product, never in the input.
//!
//! Three callers share them, so that a crash found once is replayed forever
//! through the very same code:
//! - the cargo-fuzz targets in `fuzz/fuzz_targets/` (run by `scripts/fuzz`);
//! - `tests/regressions.rs`, which replays every file under
//!   `fuzz/regressions/<target>/` and every generated seed on stable Rust;
//! - `tests/arbitrary_bytes.rs`, property tests of random and mutated inputs
//!   that run in the ordinary `cargo test`.
//!
//! # Layout
//! - [`bootstrap`]: [`bootstrap::bootstrap`], the bootstrap reader and every
//!   accessor of it.
//! - [`layer`]: [`layer::layer`], one layer (any compression) converted on
//!   top of a fixed base layer, then the output checked.
//! - [`manifest`]: [`manifest::manifest`], image manifests, configs, indexes
//!   and `docker save` archives.
//! - [`chunk`]: [`chunk::chunk`], chunk records and stored bytes through the
//!   decoder, the range planner and a real [`skiff_fusefs::ChunkSource`].
//! - [`seeds`]: the seed inputs of every target, made with the product's own
//!   writers (the `skiff-fuzz-seeds` binary writes them to a directory).

pub mod bootstrap;
pub mod chunk;
pub mod layer;
pub mod manifest;
pub mod seeds;

/// The fuzz targets, by name: the names of `fuzz/fuzz_targets/*.rs`, of the
/// directories under `fuzz/regressions/` and of the seed sets.
pub const TARGETS: [&str; 4] = ["bootstrap", "layer", "manifest", "chunk"];

/// What one input did: for each entry point it went through, in order,
/// whether the input was accepted (`Ok`) or rejected with an error message.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// (entry point, result) in the order they ran.
    pub steps: Vec<(&'static str, Result<(), String>)>,
}

impl Outcome {
    fn push<T, E: std::fmt::Display>(&mut self, step: &'static str, r: &Result<T, E>) {
        self.steps
            .push((step, r.as_ref().map(|_| ()).map_err(|e| e.to_string())));
    }

    /// Whether entry point `step` ran and accepted the input.
    pub fn accepted(&self, step: &str) -> bool {
        self.steps.iter().any(|(s, r)| *s == step && r.is_ok())
    }
}

/// Runs target `name` on `data`; `None` if there is no such target.
pub fn run(name: &str, data: &[u8]) -> Option<Outcome> {
    Some(match name {
        "bootstrap" => bootstrap::bootstrap(data),
        "layer" => layer::layer(data),
        "manifest" => manifest::manifest(data),
        "chunk" => chunk::chunk(data),
        _ => return None,
    })
}
