//! Chunk encoding and decoding, including what a hostile blob can send.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;

use proptest::prelude::*;
use skiff_format::chunk::LastFrame;
use skiff_format::{
    decode_chunk, decode_chunk_into, decode_chunk_owned, decode_frame, encode_chunk,
    slice_of_frame, ChunkHash, ChunkInfo, Digest, FormatError, SharedFrame, MAX_CHUNK_SIZE,
};

fn noise(len: usize, mut seed: u64) -> Vec<u8> {
    (0..len)
        .map(|_| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed as u8
        })
        .collect()
}

fn info_for(data: &[u8], stored: &[u8], compressed: bool) -> ChunkInfo {
    ChunkInfo {
        digest: ChunkHash::Blake3.digest(data),
        hash: ChunkHash::Blake3,
        blob_index: 0,
        compressed,
        compressed_offset: 0,
        compressed_size: stored.len() as u32,
        uncompressed_size: data.len() as u32,
        frame: None,
    }
}

#[test]
fn compressible_round_trip() {
    let data = b"hello skiff ".repeat(1000);
    let (stored, compressed) = encode_chunk(&data, 3).unwrap();
    assert!(compressed);
    assert!(stored.len() < data.len() / 10);
    // Content size is in the frame header.
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&stored).unwrap(),
        Some(data.len() as u64)
    );
    let info = info_for(&data, &stored, true);
    assert_eq!(decode_chunk(&info, &stored).unwrap(), data);
    // Deterministic.
    assert_eq!(encode_chunk(&data, 3).unwrap(), (stored, true));
}

#[test]
fn incompressible_is_stored_raw() {
    let data = noise(100_000, 42);
    let (stored, compressed) = encode_chunk(&data, 19).unwrap();
    assert!(!compressed);
    assert_eq!(stored, data);
    let info = info_for(&data, &stored, false);
    let mut out = vec![1, 2, 3];
    decode_chunk_into(&info, &stored, &mut out).unwrap();
    assert_eq!(out, data);
}

#[test]
fn owned_decoding_checks_what_it_hands_back() {
    // Raw: the buffer comes back as the data, not copied, once verified.
    let data = noise(100_000, 43);
    let info = info_for(&data, &data, false);
    let stored = data.clone();
    let at = stored.as_ptr();
    let out = decode_chunk_owned(&info, stored).unwrap();
    assert_eq!(out, data);
    assert_eq!(out.as_ptr(), at);
    let mut bad = data.clone();
    bad[5] ^= 0x10;
    assert!(matches!(
        decode_chunk_owned(&info, bad),
        Err(FormatError::ChunkDigestMismatch { .. })
    ));
    assert!(matches!(
        decode_chunk_owned(&info, data[1..].to_vec()),
        Err(FormatError::ChunkLength { .. })
    ));
    // Compressed: decoded and verified as `decode_chunk` does.
    let text = b"owned skiff ".repeat(500);
    let (stored, compressed) = encode_chunk(&text, 3).unwrap();
    assert!(compressed);
    let info = info_for(&text, &stored, true);
    assert_eq!(decode_chunk_owned(&info, stored.clone()).unwrap(), text);
    let mut wrong = info;
    wrong.digest = Digest::of(b"other");
    assert!(matches!(
        decode_chunk_owned(&wrong, stored),
        Err(FormatError::ChunkDigestMismatch { .. })
    ));
}

#[test]
fn marginal_savings_are_stored_raw() {
    // Half noise, half zeros compresses by ~50%: compressed. Almost all
    // noise saves < 1/32: raw.
    let mut data = noise(64 * 1024, 7);
    data.extend(vec![0u8; 64 * 1024]);
    assert!(encode_chunk(&data, 3).unwrap().1);
    let mut data = noise(64 * 1024, 7);
    data.extend(vec![0u8; 1024]);
    assert!(!encode_chunk(&data, 3).unwrap().1);
}

#[test]
fn sizes_out_of_range_are_refused() {
    assert!(encode_chunk(&[], 3).is_err());
    assert!(encode_chunk(&vec![0; MAX_CHUNK_SIZE as usize + 1], 1).is_err());
    assert!(encode_chunk(&vec![0; MAX_CHUNK_SIZE as usize], 1).is_ok());
}

#[test]
fn corruption_is_detected() {
    let data = b"some chunk data, repeated. ".repeat(500);
    let (stored, _) = encode_chunk(&data, 3).unwrap();
    let info = info_for(&data, &stored, true);
    for i in (0..stored.len()).step_by(7) {
        let mut bad = stored.clone();
        bad[i] ^= 0x10;
        assert!(
            decode_chunk(&info, &bad).is_err(),
            "flip at {i} not detected"
        );
    }
    // Raw: a flipped byte fails the digest.
    let raw_info = info_for(&data, &data, false);
    let mut bad = data.clone();
    bad[100] ^= 1;
    assert!(matches!(
        decode_chunk(&raw_info, &bad),
        Err(FormatError::ChunkDigestMismatch { .. })
    ));
    // Wrong digest.
    let mut wrong = info;
    wrong.digest = Digest::of(b"other");
    let mut out = Vec::new();
    match decode_chunk_into(&wrong, &stored, &mut out) {
        Err(FormatError::ChunkDigestMismatch {
            hash,
            expected,
            actual,
        }) => {
            assert_eq!(hash, ChunkHash::Blake3);
            assert_eq!(expected, wrong.digest);
            assert_eq!(actual, ChunkHash::Blake3.digest(&data));
        }
        other => panic!("{other:?}"),
    }
    assert!(out.is_empty());
}

#[test]
fn each_hash_verifies_its_own_digests_only() {
    let data = b"a chunk of an image converted before format 1.4\n".repeat(50);
    let (stored, compressed) = encode_chunk(&data, 3).unwrap();
    // A 1.0-1.3 image: SHA-256 digests.
    let sha = ChunkInfo {
        digest: Digest::of(&data),
        hash: ChunkHash::Sha256,
        ..info_for(&data, &stored, compressed)
    };
    assert_eq!(decode_chunk(&sha, &stored).unwrap(), data);
    // The same digest read as BLAKE3 (or the reverse) verifies nothing.
    let crossed = ChunkInfo {
        hash: ChunkHash::Blake3,
        ..sha
    };
    let err = decode_chunk(&crossed, &stored).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("expected blake3:{}", sha.digest.to_hex())),
        "{err}"
    );
    let crossed = ChunkInfo {
        hash: ChunkHash::Sha256,
        ..info_for(&data, &stored, compressed)
    };
    assert!(matches!(
        decode_chunk(&crossed, &stored),
        Err(FormatError::ChunkDigestMismatch { .. })
    ));
}

#[test]
fn wrong_sizes_are_detected() {
    let data = b"0123456789".repeat(100);
    let (stored, _) = encode_chunk(&data, 3).unwrap();
    let info = info_for(&data, &stored, true);
    // Short or long fetch.
    assert!(matches!(
        decode_chunk(&info, &stored[..stored.len() - 1]),
        Err(FormatError::ChunkLength {
            field: "compressed_size",
            ..
        })
    ));
    let mut longer = stored.clone();
    longer.push(0);
    assert!(decode_chunk(&info, &longer).is_err());
    // The record lies about the uncompressed size.
    for size in [
        data.len() as u32 - 1,
        data.len() as u32 + 1,
        0,
        MAX_CHUNK_SIZE + 1,
    ] {
        let mut lie = info;
        lie.uncompressed_size = size;
        assert!(decode_chunk(&lie, &stored).is_err(), "size {size}");
    }
    // Two frames where one is expected.
    let mut two = stored.clone();
    two.extend_from_slice(&stored);
    let mut two_info = info;
    two_info.compressed_size = two.len() as u32;
    assert!(matches!(
        decode_chunk(&two_info, &two),
        Err(FormatError::Decompress(_))
    ));
    // Raw data flagged as compressed, compressed data flagged as raw.
    let raw_as_zstd = info_for(&data, &data, true);
    assert!(decode_chunk(&raw_as_zstd, &data).is_err());
    let mut zstd_as_raw = info;
    zstd_as_raw.compressed = false;
    assert!(decode_chunk(&zstd_as_raw, &stored).is_err());
}

/// A frame that expands to far more than the record says must fail without
/// allocating what it expands to.
#[test]
fn zstd_bomb_is_refused() {
    let big: u64 = 1 << 30;
    for declare_size in [true, false] {
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        enc.include_contentsize(declare_size).unwrap();
        if declare_size {
            enc.set_pledged_src_size(Some(big)).unwrap();
        }
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(big >> 20) {
            enc.write_all(&zeros).unwrap();
        }
        let bomb = enc.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        let info = ChunkInfo {
            digest: Digest::of(&[0; 4096]),
            hash: ChunkHash::Sha256,
            blob_index: 0,
            compressed: true,
            compressed_offset: 0,
            compressed_size: bomb.len() as u32,
            uncompressed_size: 4096,
            frame: None,
        };
        let mut out = Vec::new();
        let err = decode_chunk_into(&info, &bomb, &mut out).unwrap_err();
        assert!(
            matches!(
                err,
                FormatError::ChunkLength { .. } | FormatError::Decompress(_)
            ),
            "{err}"
        );
        assert!(
            out.capacity() <= 1 << 16,
            "allocated {} bytes",
            out.capacity()
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn round_trip_any(data in prop::collection::vec(prop_oneof![Just(0u8), any::<u8>()], 1..20_000), level in 1i32..6) {
        let (stored, compressed) = encode_chunk(&data, level).unwrap();
        let info = info_for(&data, &stored, compressed);
        prop_assert_eq!(decode_chunk(&info, &stored).unwrap(), data);
    }

    #[test]
    fn garbage_never_panics(stored in prop::collection::vec(any::<u8>(), 1..4096), size in 1u32..100_000, compressed in any::<bool>()) {
        let info = ChunkInfo {
            digest: Digest::of(b""),
            hash: ChunkHash::Sha256,
            blob_index: 0,
            compressed,
            compressed_offset: 0,
            compressed_size: stored.len() as u32,
            uncompressed_size: size,
            frame: None,
        };
        prop_assert!(decode_chunk(&info, &stored).is_err());
    }
}

/// Three small files packed into one zstd frame, as the converter packs
/// them (format 1.1): each member's record and the frame's stored bytes.
fn packed() -> (Vec<Vec<u8>>, Vec<ChunkInfo>, Vec<u8>) {
    let files: Vec<Vec<u8>> = vec![
        b"first small file\n".repeat(40),
        b"second\n".repeat(300),
        b"#!/bin/sh\necho third\n".to_vec(),
    ];
    let frame: Vec<u8> = files.concat();
    let (stored, compressed) = encode_chunk(&frame, 3).unwrap();
    assert!(compressed);
    let mut offset = 0u32;
    let infos = files
        .iter()
        .map(|f| {
            let info = ChunkInfo {
                frame: Some(SharedFrame {
                    offset,
                    size: frame.len() as u32,
                }),
                uncompressed_size: f.len() as u32,
                ..info_for(f, &stored, true)
            };
            offset += f.len() as u32;
            info
        })
        .collect();
    (files, infos, stored)
}

#[test]
fn shared_frame_members_decode_and_verify_alone() {
    let (files, infos, stored) = packed();
    for (f, info) in files.iter().zip(&infos) {
        assert_eq!(&decode_chunk(info, &stored).unwrap(), f);
    }
    // One decode serves all members, each verified on its own.
    let frame = decode_frame(&infos[0], &stored).unwrap();
    assert_eq!(frame, files.concat());
    for (f, info) in files.iter().zip(&infos) {
        assert_eq!(slice_of_frame(info, &frame).unwrap(), &f[..]);
    }
    let mut last = LastFrame::new();
    assert!(!last.holds(&infos[1]));
    assert_eq!(last.decode(&infos[0], &stored).unwrap(), &files[0][..]);
    assert!(last.holds(&infos[1]));
    assert_eq!(last.chunk(&infos[2]).unwrap(), &files[2][..]);
}

#[test]
fn shared_frame_lies_are_errors() {
    let (files, infos, stored) = packed();
    // A member whose digest is another member's.
    let swapped = ChunkInfo {
        digest: infos[0].digest,
        ..infos[1]
    };
    assert!(matches!(
        decode_chunk(&swapped, &stored),
        Err(FormatError::ChunkDigestMismatch { .. })
    ));
    // A frame size the frame does not have: refused before decoding more.
    let mut short = infos[0];
    short.frame = Some(SharedFrame {
        offset: 0,
        size: files[0].len() as u32,
    });
    assert!(matches!(
        decode_chunk(&short, &stored),
        Err(FormatError::ChunkLength { .. })
    ));
    // A member that runs past the end of its frame.
    let mut past = infos[2];
    past.uncompressed_size += 1;
    assert!(decode_chunk(&past, &stored).is_err());
    // A shared frame stored raw is not a thing.
    let raw = ChunkInfo {
        compressed: false,
        ..infos[0]
    };
    assert!(decode_chunk(&raw, &stored).is_err());
    // The memo does not answer for another frame.
    let mut last = LastFrame::new();
    last.decode(&infos[0], &stored).unwrap();
    let elsewhere = ChunkInfo {
        compressed_offset: 7,
        ..infos[1]
    };
    assert!(!last.holds(&elsewhere));
    assert!(last.chunk(&elsewhere).is_err());
}

#[test]
fn encoding_reuses_a_context_without_changing_a_byte() {
    // The thread's encoder is reused across chunks and levels: each frame
    // must be what a fresh context gives (a conversion must give the same
    // bytes wherever and in whatever order it runs).
    let text: Vec<u8> = b"skiff chunk "
        .iter()
        .copied()
        .cycle()
        .take(200_000)
        .collect();
    let mixed: Vec<u8> = noise(50_000, 7)
        .into_iter()
        .chain(text.iter().copied().take(80_000))
        .collect();
    for (data, level) in [
        (&text, 4),
        (&mixed, 4),
        (&text, 19),
        (&mixed, 1),
        (&text, 4),
    ] {
        let (stored, compressed) = encode_chunk(data, level).unwrap();
        assert!(compressed);
        let fresh = zstd::bulk::compress(data, level).unwrap();
        assert_eq!(stored, fresh, "level {level}, {} bytes", data.len());
        let info = info_for(data, &stored, true);
        assert_eq!(decode_chunk(&info, &stored).unwrap(), *data);
    }
}
