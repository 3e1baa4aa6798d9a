//! Fuzz target `layer`: arbitrary bytes as a layer (tar, gzip or zstd) converted on top of a
//! base layer, the output then checked: see `skiff_fuzz::layer`.
//! Errors are fine; panics are bugs. Run with `scripts/fuzz layer`; a crash
//! becomes a file under `fuzz/regressions/layer/` (docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = skiff_fuzz::layer::layer(data);
});
