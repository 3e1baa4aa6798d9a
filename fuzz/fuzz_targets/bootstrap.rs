//! Fuzz target `bootstrap`: arbitrary bytes as a bootstrap, as they are and resealed (every CRC
//! recomputed): see `skiff_fuzz::bootstrap`.
//! Errors are fine; panics are bugs. Run with `scripts/fuzz bootstrap`; a crash
//! becomes a file under `fuzz/regressions/bootstrap/` (docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = skiff_fuzz::bootstrap::bootstrap(data);
});
