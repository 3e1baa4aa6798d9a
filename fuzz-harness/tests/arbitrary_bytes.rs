//! Property tests on stable Rust: arbitrary bytes, and seeds with random
//! damage, through the same entry points as the fuzz targets. Errors are
//! fine; a panic (a failed invariant or a crash in the product) fails the
//! test, and proptest shrinks the input for the report.
//!
//! These are the fuzz targets' poor cousins, not their replacement: a few
//! hundred cases each, so that `cargo test` stays fast. `scripts/fuzz`
//! runs the coverage-guided fuzzer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use proptest::prelude::*;
use skiff_fuzz::run;
use skiff_fuzz::seeds::seeds;

/// One way to damage an input.
#[derive(Debug, Clone)]
enum Damage {
    /// XOR the byte at (position modulo length) with a non-zero mask.
    Flip(usize, u8),
    /// Cut the input at (position modulo length + 1).
    Truncate(usize),
    /// Insert bytes at (position modulo length + 1).
    Insert(usize, Vec<u8>),
    /// Overwrite up to 8 bytes at (position modulo length) with one value.
    Fill(usize, u8),
}

fn damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        4 => (any::<usize>(), 1..=255u8).prop_map(|(p, m)| Damage::Flip(p, m)),
        1 => any::<usize>().prop_map(Damage::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Damage::Insert(p, b)),
        2 => (any::<usize>(), prop_oneof![Just(0u8), Just(0xff), Just(b'9'), any::<u8>()])
            .prop_map(|(p, v)| Damage::Fill(p, v)),
    ]
}

fn apply(mut data: Vec<u8>, damages: &[Damage]) -> Vec<u8> {
    for d in damages {
        let len = data.len();
        match d {
            Damage::Flip(p, m) if len > 0 => data[p % len] ^= m,
            Damage::Truncate(p) => data.truncate(p % (len + 1)),
            Damage::Insert(p, b) => {
                let at = p % (len + 1);
                data.splice(at..at, b.iter().copied());
            }
            Damage::Fill(p, v) if len > 0 => {
                let at = p % len;
                let end = (at + 8).min(len);
                data[at..end].fill(*v);
            }
            _ => {}
        }
    }
    data
}

/// A seed of `target` with 1..8 random damages.
fn damaged_seed(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let all = seeds(target, None);
    assert!(!all.is_empty(), "no seeds for {target}");
    (0..all.len(), prop::collection::vec(damage(), 1..8))
        .prop_map(move |(i, d)| apply(all[i].1.clone(), &d))
}

fn arbitrary() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..2048)
}

fn check(target: &str, data: &[u8]) {
    run(target, data).expect("a known target");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn layer_arbitrary_bytes(data in arbitrary()) {
        check("layer", &data);
    }

    #[test]
    fn layer_damaged_seeds(data in damaged_seed("layer")) {
        check("layer", &data);
    }

    #[test]
    fn manifest_arbitrary_bytes(data in arbitrary()) {
        check("manifest", &data);
    }

    #[test]
    fn manifest_damaged_seeds(data in damaged_seed("manifest")) {
        check("manifest", &data);
    }

    #[test]
    fn chunk_arbitrary_bytes(data in arbitrary()) {
        check("chunk", &data);
    }

    #[test]
    fn chunk_damaged_seeds(data in damaged_seed("chunk")) {
        check("chunk", &data);
    }

    #[test]
    fn bootstrap_damaged_seeds(data in damaged_seed("bootstrap")) {
        check("bootstrap", &data);
    }
}
