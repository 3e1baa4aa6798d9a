//! Acceptance, property-based: random trees (directories, files whose
//! contents repeat across files so that chunks deduplicate, symlinks, hard
//! links, a few devices and fifos) written as one to three layers with a
//! random split, whiteouts and opaque markers of earlier paths, and random
//! compression; converted, checked, unpacked, and compared in every field
//! with a reference extraction of the same layers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::OnceLock;

use common::*;
use proptest::prelude::*;

/// File contents shared by all cases: repeats across files and layers give
/// whole-file and partial (one changed byte) deduplication, and a file with
/// long zero runs gives holes.
fn contents() -> &'static [Vec<u8>] {
    static CONTENTS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CONTENTS.get_or_init(|| {
        let mut rng = Rng(42);
        let random = rng.bytes(150_000);
        let mut changed = random.clone();
        changed[75_000] ^= 0x55;
        let mut holes = rng.text(10_000);
        holes.resize(300_000, 0);
        holes.extend_from_slice(&rng.text(5_000));
        vec![
            Vec::new(),
            b"hello\n".to_vec(),
            rng.text(40_000),
            random,
            changed,
            holes,
        ]
    })
}

const NAMES: &[&str] = &["a", "b", "c", "dir", "file.txt", "sp ace", "ü", "a.b"];
const TARGETS: &[&str] = &["a", "../b", "/etc/passwd", "dir/file.txt", "./c", "x"];
const FILE_MODES: &[u32] = &[0o644, 0o755, 0o600, 0o4755, 0o2750, 0o444, 0o640];
const DIR_MODES: &[u32] = &[0o755, 0o700, 0o1777, 0o750, 0o555];

/// One random step, interpreted against the reference tree when the layer
/// is built (so that hard links and whiteouts name paths that exist).
#[derive(Clone, Debug)]
struct Step {
    kind: u8,
    path: (u8, u8, u8, u8),
    pick: u16,
    mode: u8,
    owner: u8,
    time: u32,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0u8..20,
        (1u8..4, 0u8..8, 0u8..8, 0u8..8),
        any::<u16>(),
        any::<u8>(),
        0u8..4,
        any::<u32>(),
    )
        .prop_map(|(kind, path, pick, mode, owner, time)| Step {
            kind,
            path,
            pick,
            mode,
            owner,
            time,
        })
}

fn path_of(s: &Step) -> Vec<u8> {
    let (depth, a, b, c) = s.path;
    let parts = [a, b, c];
    parts[..depth as usize]
        .iter()
        .map(|&i| NAMES[i as usize])
        .collect::<Vec<_>>()
        .join("/")
        .into_bytes()
}

fn attr_of(s: &Step, modes: &[u32]) -> Attr {
    let nsec = if s.time % 3 == 0 {
        0
    } else {
        s.time % 1_000_000_000
    };
    Attr {
        mode: modes[s.mode as usize % modes.len()],
        uid: [0, 1, 1000, 3_000_000][s.owner as usize],
        gid: [0, 5, 1000, 65_534][s.owner as usize],
        mtime: (1_500_000_000 + i64::from(s.time % 100_000_000), nsec),
        xattrs: Default::default(),
    }
}

fn join(p: &[Vec<u8>]) -> Vec<u8> {
    p.join(&b'/')
}

/// Turns the random steps of each layer into layer ops, tracking the
/// reference tree as it goes.
fn build(layers: &[(Vec<Step>, u8)]) -> Vec<(Vec<Op>, Comp)> {
    let mut tree = RefTree::new();
    let mut out = Vec::new();
    for (steps, comp) in layers {
        tree.begin_layer();
        let mut ops = Vec::new();
        for s in steps {
            let path = path_of(s);
            let file = || {
                let content = contents()[s.pick as usize % contents().len()].clone();
                Op::Entry(Entry::new(
                    path.clone(),
                    Kind::File(content),
                    attr_of(s, FILE_MODES),
                ))
            };
            let op = match s.kind {
                0..=6 => file(),
                7..=9 => Op::Entry(Entry::new(path.clone(), Kind::Dir, attr_of(s, DIR_MODES))),
                10 | 11 => Op::Entry(Entry::new(
                    path.clone(),
                    Kind::Symlink(TARGETS[s.pick as usize % TARGETS.len()].into()),
                    attr_of(s, &[0o777]),
                )),
                12 | 13 => {
                    let files = tree.files();
                    if files.is_empty() {
                        file()
                    } else {
                        let target = join(&files[s.pick as usize % files.len()]);
                        Op::Entry(Entry::hardlink(path.clone(), target))
                    }
                }
                14 | 15 => {
                    let all = tree.all_paths();
                    if all.is_empty() {
                        file()
                    } else {
                        whiteout(join(&all[s.pick as usize % all.len()]))
                    }
                }
                16 => {
                    let dirs = tree.dirs();
                    opaque(join(&dirs[s.pick as usize % dirs.len()]))
                }
                17 => Op::Entry(Entry::new(path.clone(), Kind::Fifo, attr_of(s, FILE_MODES))),
                18 => Op::Entry(Entry::new(
                    path.clone(),
                    Kind::Char(1, u32::from(s.pick % 16)),
                    attr_of(s, FILE_MODES),
                )),
                _ => Op::Entry(Entry::new(
                    path.clone(),
                    Kind::Block(7, u32::from(s.pick % 8)),
                    attr_of(s, FILE_MODES),
                )),
            };
            tree.apply(&op);
            ops.push(op);
        }
        let comp = [Comp::Tar, Comp::Gzip, Comp::Zstd][*comp as usize % 3];
        out.push((ops, comp));
    }
    out
}

fn layers() -> impl Strategy<Value = Vec<(Vec<Step>, u8)>> {
    prop::collection::vec((prop::collection::vec(step(), 1..25), 0u8..3), 1..=3)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        max_shrink_iters: 200,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_layers_unpack_like_the_reference(spec in layers()) {
        require_root("random trees with owners and device nodes");
        let layers = build(&spec);
        let work = scratch("random");
        let files = write_layer_files(&work.path().join("layers"), &layers);
        let layout = work.path().join("layout");
        let result = convert_layers(&files, &layout, "t", options());
        let result = match result {
            Ok(r) => r,
            Err(e) => panic!("conversion failed: {e}\n{}", describe(&layers)),
        };
        prop_assert_eq!(result.stats.layers as usize, layers.len());
        let actual = work.path().join("unpacked");
        check_and_unpack(&layout, "t", &actual);
        let expected = work.path().join("expected");
        reference(&layers).materialize(&expected);
        let a = dump_all(&expected);
        let b = dump_all(&actual);
        if let Err(report) = skiff_tests::treedump::compare_named(&a, "expected", &b, "unpacked") {
            panic!("{report}\n{}", describe(&layers));
        }
    }
}
