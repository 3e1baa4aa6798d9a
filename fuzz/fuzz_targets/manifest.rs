//! Fuzz target `manifest`: arbitrary bytes as image manifests, configs, indexes and `docker
//! save` archives: see `skiff_fuzz::manifest`.
//! Errors are fine; panics are bugs. Run with `scripts/fuzz manifest`; a crash
//! becomes a file under `fuzz/regressions/manifest/` (docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = skiff_fuzz::manifest::manifest(data);
});
