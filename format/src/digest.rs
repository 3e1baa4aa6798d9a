//! Digests: [`Digest`], a SHA-256 written the OCI way (`sha256:<hex>`), and
//! [`ChunkHash`], the function a bootstrap's chunk digests are made with
//! (SHA-256 up to format 1.3; BLAKE3 from 1.4, where the superblock says so).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use crate::FormatError;

/// A SHA-256 digest: of a chunk's uncompressed data, or of a blob as stored.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    /// The SHA-256 of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    /// The digest as 64 lowercase hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The digest in OCI descriptor form, `sha256:<hex>`.
    pub fn oci(&self) -> String {
        format!("sha256:{}", self.to_hex())
    }
}

/// The hash function of an image's chunk digests (CHUNKS `digest`). A blob's
/// digest is always SHA-256 (its OCI descriptor digest); a chunk's is what
/// the superblock names: BLAKE3 with [`crate::layout::FEATURE_BLAKE3_CHUNKS`]
/// (format 1.4), else SHA-256. Both give 32 bytes and are collision-resistant;
/// BLAKE3 hashes 3-4x as fast on this kind of machine, and every byte a mount
/// serves is hashed once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum ChunkHash {
    /// SHA-256 (formats 1.0-1.3, and 1.4 without the flag).
    #[default]
    Sha256,
    /// BLAKE3 with its default 32-byte output (format 1.4).
    Blake3,
}

impl ChunkHash {
    /// The digest of `data` under this function.
    pub fn digest(self, data: &[u8]) -> Digest {
        match self {
            ChunkHash::Sha256 => Digest::of(data),
            ChunkHash::Blake3 => Digest(*blake3::hash(data).as_bytes()),
        }
    }

    /// The function's name as the CLI and `inspect` spell it.
    pub fn name(self) -> &'static str {
        match self {
            ChunkHash::Sha256 => "sha256",
            ChunkHash::Blake3 => "blake3",
        }
    }

    /// `digest` written `<name>:<hex>`, for messages about a chunk.
    pub fn label(self, digest: &Digest) -> String {
        format!("{}:{}", self.name(), digest.to_hex())
    }
}

impl fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ChunkHash {
    type Err = FormatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sha256" => Ok(ChunkHash::Sha256),
            "blake3" => Ok(ChunkHash::Blake3),
            _ => Err(FormatError::BadChunkHash(s.to_owned())),
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.to_hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = FormatError;

    /// Accepts `sha256:<hex>` or bare hex. Only lowercase hex is accepted:
    /// the OCI image spec requires it, and accepting both would give one
    /// digest two spellings.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex_part = s.strip_prefix("sha256:").unwrap_or(s);
        let lowercase_hex = hex_part
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex_part.len() != 64 || !lowercase_hex {
            return Err(FormatError::BadDigest(s.to_owned()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut out)
            .map_err(|_| FormatError::BadDigest(s.to_owned()))?;
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_input_digest() {
        let d = Digest::of(b"");
        assert_eq!(
            d.oci(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(d.to_string(), d.oci());
        assert_eq!(format!("{d:?}"), d.oci());
    }

    #[test]
    fn chunk_hashes_differ_and_match_their_references() {
        assert_eq!(ChunkHash::Sha256.digest(b""), Digest::of(b""));
        // BLAKE3's published digest of the empty input.
        assert_eq!(
            ChunkHash::Blake3.digest(b"").to_hex(),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        assert_eq!(
            ChunkHash::Blake3.label(&Digest([0xab; 32])),
            format!("blake3:{}", "ab".repeat(32))
        );
        for h in [ChunkHash::Sha256, ChunkHash::Blake3] {
            assert_eq!(h.name().parse::<ChunkHash>().ok(), Some(h));
        }
        assert!("md5".parse::<ChunkHash>().is_err());
        assert!("BLAKE3".parse::<ChunkHash>().is_err());
    }

    #[test]
    fn parse_forms() {
        let d = Digest::of(b"x");
        assert_eq!(d.oci().parse::<Digest>().ok(), Some(d));
        assert_eq!(d.to_hex().parse::<Digest>().ok(), Some(d));
        assert!("sha256:".parse::<Digest>().is_err());
        assert!(d.to_hex().to_uppercase().parse::<Digest>().is_err());
        assert!(format!("sha512:{}", d.to_hex()).parse::<Digest>().is_err());
        assert!(format!("{}0", d.oci()).parse::<Digest>().is_err());
        assert!("sha256:é".parse::<Digest>().is_err());
    }

    #[test]
    fn serde_as_string() -> Result<(), serde_json::Error> {
        let d = Digest::of(b"y");
        let json = serde_json::to_string(&d)?;
        assert_eq!(json, format!("\"{}\"", d.oci()));
        let back: Digest = serde_json::from_str(&json)?;
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Digest>("\"nope\"").is_err());
        Ok(())
    }
}
