//! Block checksums (format 1.2): a bootstrap opened lazily reads only the
//! blocks it is asked about, still catches every damaged byte on the first
//! read of its block, and agrees with an eager open on everything else.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{exercise, Builder};
use skiff_format::blocks::CRC_BLOCK_SIZE;
use skiff_format::layout::{SECTION_BLOCK_CRCS, SECTION_INODES};
use skiff_format::{reseal, BlockMarks, Bootstrap, FormatError, InodeId};

/// A bootstrap of several blocks: 4,000 files with long names in 40
/// directories (about 600 KB: INODES alone spans four blocks).
fn large() -> Vec<u8> {
    let mut b = Builder::new();
    for d in 0..40 {
        let dir = b.dir(0, format!("dir-{d:02}").as_bytes());
        for f in 0..100 {
            let name = format!("file-{f:03}-{}", "x".repeat(40));
            b.file(dir, name.as_bytes(), &[1000 + f]);
        }
    }
    b.write()
}

fn section(buf: &[u8], kind: u32) -> (usize, usize) {
    let b = Bootstrap::parse(buf).unwrap();
    let e = b.sections().iter().find(|e| e.kind.get() == kind).unwrap();
    (e.offset.get() as usize, e.length.get() as usize)
}

#[test]
fn the_writer_adds_block_crcs_as_the_last_section() {
    let buf = large();
    assert_eq!(&buf[10..12], &4u16.to_le_bytes(), "minor version 1.4");
    let (offset, length) = section(&buf, SECTION_BLOCK_CRCS);
    let b = Bootstrap::parse(&buf).unwrap();
    let table_end = 64 + 32 * b.sections().len();
    assert_eq!(length, (offset - table_end).div_ceil(CRC_BLOCK_SIZE) * 4);
    assert!(
        buf.len() - (offset + length) < 8,
        "nothing after it but padding"
    );
    assert!(length >= 4 * 8, "a bootstrap of {} bytes", buf.len());
}

#[test]
fn a_lazy_open_reads_a_few_blocks_and_then_only_what_is_asked() {
    let buf = large();
    let marks = BlockMarks::for_len(buf.len());
    let b = Bootstrap::parse_lazy(&buf, &marks).unwrap();
    assert!(b.is_lazy());
    // The root inode's block, nothing else.
    assert_eq!(marks.checked(), 1, "{marks:?}");
    let dir = b.lookup(b.root(), b"dir-39").unwrap().unwrap();
    let file = b.dir_entries(dir).unwrap().last().unwrap().unwrap();
    assert!(b.inode(file.inode).unwrap().size() > 0);
    let after_lookup = marks.checked();
    assert!(after_lookup > 1 && after_lookup < 8, "{marks:?}");
    // The whole walk agrees with an eager open and checks everything.
    b.validate().unwrap();
    let eager = Bootstrap::parse(&buf).unwrap();
    assert_eq!(b.to_tree().unwrap(), eager.to_tree().unwrap());
    let (offset, _) = section(&buf, SECTION_BLOCK_CRCS);
    let table_end = 64 + 32 * eager.sections().len();
    b.check_all_blocks().unwrap();
    assert_eq!(
        marks.checked(),
        (offset - table_end).div_ceil(CRC_BLOCK_SIZE)
    );
}

/// Blocks the hint of the test below was given, as (address, length).
static HINTED: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());

fn record_hint(bytes: &[u8]) {
    HINTED
        .lock()
        .unwrap()
        .push((bytes.as_ptr() as usize, bytes.len()));
}

#[test]
fn the_hint_is_given_each_whole_block_once_before_its_first_check() {
    let buf = large();
    let marks = BlockMarks::for_len(buf.len()).with_hint(record_hint);
    let b = Bootstrap::parse_lazy(&buf, &marks).unwrap();
    let dir = b.lookup(b.root(), b"dir-39").unwrap().unwrap();
    b.dir_entries(dir).unwrap().last().unwrap().unwrap();
    b.check_all_blocks().unwrap();
    b.validate().unwrap();
    let hinted = HINTED.lock().unwrap().clone();
    assert_eq!(hinted.len(), marks.checked(), "one hint per checked block");
    let (offset, _) = section(&buf, SECTION_BLOCK_CRCS);
    let table_end = 64 + 32 * b.sections().len();
    let base = buf.as_ptr() as usize;
    let mut starts: Vec<usize> = hinted.iter().map(|(a, _)| a - base).collect();
    starts.sort_unstable();
    let expected: Vec<usize> = (table_end..offset).step_by(CRC_BLOCK_SIZE).collect();
    assert_eq!(starts, expected, "every block, each once, from its start");
    for (a, len) in hinted {
        let end = (a - base + CRC_BLOCK_SIZE).min(offset);
        assert_eq!(len, end - (a - base), "the whole block");
    }
}

#[test]
fn a_damaged_block_fails_its_first_read_and_every_later_one() {
    let buf = large();
    let last = Bootstrap::parse(&buf).unwrap().inode_count() - 1;
    let (inodes, _) = section(&buf, SECTION_INODES);
    // The last inode's mtime, three blocks past the root's.
    let mut bad = buf.clone();
    bad[inodes + 64 * last as usize + 24] ^= 0x20;
    let marks = BlockMarks::for_len(bad.len());
    let b = Bootstrap::parse_lazy(&bad, &marks).unwrap();
    // Records in other blocks still read.
    assert!(b.inode(InodeId(1)).is_ok());
    for _ in 0..2 {
        let err = b.inode(InodeId(last)).unwrap_err();
        assert!(
            matches!(err, FormatError::BlockChecksumMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
    }
    assert!(b.validate().is_err());
    assert!(b.check_all_blocks().is_err());
    // An eager open refuses it at once.
    assert!(Bootstrap::parse(&bad).is_err());
}

#[test]
fn every_flipped_byte_is_caught_lazily() {
    let buf = large();
    // Every 97th byte (all of them would take minutes): the header and
    // table (at open), every section and the CRCs themselves.
    for i in (0..buf.len()).step_by(97).chain([10, 100, buf.len() - 1]) {
        let mut bad = buf.clone();
        bad[i] ^= 0x01;
        let marks = BlockMarks::for_len(bad.len());
        let caught = match Bootstrap::parse_lazy(&bad, &marks) {
            Err(_) => true,
            Ok(b) => b.check_all_blocks().is_err(),
        };
        assert!(caught, "flip at byte {i} of {} not caught", buf.len());
    }
}

#[test]
fn block_crcs_that_do_not_fit_are_refused_at_open() {
    let buf = large();
    let (offset, _) = section(&buf, SECTION_BLOCK_CRCS);
    // A section table entry that claims one CRC fewer.
    let b = Bootstrap::parse(&buf).unwrap();
    let index = b
        .sections()
        .iter()
        .position(|e| e.kind.get() == SECTION_BLOCK_CRCS)
        .unwrap();
    let mut bad = buf.clone();
    let length_at = 64 + 32 * index + 16;
    let length = u64::from_le_bytes(bad[length_at..length_at + 8].try_into().unwrap());
    bad[length_at..length_at + 8].copy_from_slice(&(length - 8).to_le_bytes());
    // The two CRCs dropped become zero padding.
    let end = offset + length as usize;
    bad[end - 8..end].fill(0);
    reseal(&mut bad).unwrap();
    let marks = BlockMarks::for_len(bad.len());
    let err = Bootstrap::parse_lazy(&bad, &marks).unwrap_err();
    assert!(err.to_string().contains("BLOCK_CRCS holds"), "{err}");
    let err = Bootstrap::parse(&bad).unwrap_err();
    assert!(err.to_string().contains("BLOCK_CRCS holds"), "{err}");
}

#[test]
fn resealed_edits_pass_both_opens_alike() {
    // reseal recomputes block CRCs too, so edits reach the structural
    // checks in both modes.
    let mut buf = large();
    let (inodes, _) = section(&buf, SECTION_INODES);
    buf[inodes + 64 * 5 + 8] ^= 0x01; // an inode's mode bits
    reseal(&mut buf).unwrap();
    assert!(Bootstrap::parse(&buf).is_ok());
    let marks = BlockMarks::for_len(buf.len());
    let lazy = Bootstrap::parse_lazy(&buf, &marks).unwrap();
    lazy.check_all_blocks().unwrap();
    let _ = exercise(&buf);
}

#[test]
fn marks_too_small_fall_back_to_an_eager_open() {
    let buf = large();
    let marks = BlockMarks::for_len(0);
    let b = Bootstrap::parse_lazy(&buf, &marks).unwrap();
    assert!(!b.is_lazy());
    b.validate().unwrap();
}
