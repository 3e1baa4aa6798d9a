//! Fuzz target `chunk`: arbitrary chunk records and stored bytes through the chunk decoder,
//! the range planner and a chunk source: see `skiff_fuzz::chunk`.
//! Errors are fine; panics are bugs. Run with `scripts/fuzz chunk`; a crash
//! becomes a file under `fuzz/regressions/chunk/` (docs/fuzzing.md).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = skiff_fuzz::chunk::chunk(data);
});
