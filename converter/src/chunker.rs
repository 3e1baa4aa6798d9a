//! Cutting file contents into chunks: fixed size or content-defined (FastCDC).
//!
//! Content-defined chunking puts cut points where the content says, so an
//! insertion early in a file moves only the chunks around it and the rest
//! still deduplicate against an earlier version of the image. Fixed-size
//! chunks are cheaper to compute and line up with page-cache readahead.
//!
//! The FastCDC cut points come from the `fastcdc` crate's 2020 algorithm, pinned
//! to an exact version in the workspace manifest: cut points are part of the
//! output (they decide chunk digests), so a crate upgrade that moved them would
//! silently break deduplication against earlier images. A golden test below
//! pins them.
//!
//! [`Chunker::for_each_chunk`] streams a reader through one reusable buffer: it
//! keeps at least `max` bytes ahead of the current chunk start (or the rest of
//! the file), which is exactly what the slice-based cutter needs to find the
//! same cut points it would find on the whole file at once.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use fastcdc::v2020::FastCDC;

/// How file contents are cut into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Chunking {
    /// Chunks of exactly `size` bytes (the last one of a file shorter).
    Fixed {
        /// Chunk size in bytes.
        size: u32,
    },
    /// Content-defined chunks (FastCDC 2020) between `min` and `max` bytes.
    FastCdc {
        /// Smallest chunk (except a file's last).
        min: u32,
        /// Average chunk size the cutter aims at.
        avg: u32,
        /// Largest chunk.
        max: u32,
    },
}

impl Default for Chunking {
    fn default() -> Self {
        // Chosen by measurement on the fixture image (see bench/convert.md):
        // 128 KiB on average compresses below the source's gzip at zstd level
        // 4, while a chunk stays small enough that a cold read of a few pages
        // of a large file fetches little more than it needs.
        Chunking::FastCdc {
            min: 32 << 10,
            avg: 128 << 10,
            max: 512 << 10,
        }
    }
}

impl Chunking {
    /// Content-defined chunking around an average size, with min = avg/4 and
    /// max = avg*4 (the FastCDC paper's ratios).
    pub fn fastcdc(avg: u32) -> Result<Self, String> {
        let c = Chunking::FastCdc {
            min: avg / 4,
            avg,
            max: avg.saturating_mul(4),
        };
        c.validate()?;
        Ok(c)
    }

    /// Checks the sizes against what the cutter and the format accept.
    pub fn validate(&self) -> Result<(), String> {
        use fastcdc::v2020::{AVERAGE_MAX, AVERAGE_MIN, MAXIMUM_MAX, MINIMUM_MAX, MINIMUM_MIN};
        match *self {
            Chunking::Fixed { size } => {
                if !(4096..=skiff_format::MAX_CHUNK_SIZE).contains(&size) {
                    return Err(format!(
                        "fixed chunk size {size} is out of range 4 KiB..=16 MiB"
                    ));
                }
            }
            Chunking::FastCdc { min, avg, max } => {
                let ok = (MINIMUM_MIN..=MINIMUM_MAX).contains(&min)
                    && (AVERAGE_MIN..=AVERAGE_MAX).contains(&avg)
                    && (4096..=MAXIMUM_MAX.min(skiff_format::MAX_CHUNK_SIZE)).contains(&max)
                    && min <= avg
                    && avg <= max;
                if !ok {
                    return Err(format!(
                        "FastCDC sizes min {min} / avg {avg} / max {max} are out of range \
                         (min 64..=1 MiB, avg 256..=4 MiB, max 4 KiB..=16 MiB, min <= avg <= max)"
                    ));
                }
            }
        }
        Ok(())
    }

    /// The smallest chunk this policy produces, except a file's last.
    pub fn min_size(&self) -> u32 {
        match *self {
            Chunking::Fixed { size } => size,
            Chunking::FastCdc { min, .. } => min,
        }
    }

    /// The largest chunk this policy produces.
    pub fn max_size(&self) -> u32 {
        match *self {
            Chunking::Fixed { size } => size,
            Chunking::FastCdc { max, .. } => max,
        }
    }

    /// The value of the superblock's `chunk_size_hint` (docs/format.md).
    pub fn size_hint(&self) -> u64 {
        match *self {
            Chunking::Fixed { size } => u64::from(size),
            Chunking::FastCdc { avg, .. } => u64::from(avg) | (1 << 32),
        }
    }
}

impl fmt::Display for Chunking {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn k(n: u32) -> String {
            if n % 1024 == 0 {
                format!("{}k", n / 1024)
            } else {
                n.to_string()
            }
        }
        match *self {
            Chunking::Fixed { size } => write!(f, "fixed:{}", k(size)),
            Chunking::FastCdc { min, avg, max } => {
                write!(f, "fastcdc:{}/{}/{}", k(min), k(avg), k(max))
            }
        }
    }
}

fn parse_size(s: &str) -> Result<u32, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1024u64),
        Some((i, 'm' | 'M')) => (&s[..i], 1024 * 1024),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a size (examples: 65536, 64k, 1m)"))?;
    u32::try_from(n.saturating_mul(mult)).map_err(|_| format!("size '{s}' is too large"))
}

impl FromStr for Chunking {
    type Err = String;

    /// Parses `fixed:SIZE`, `fastcdc:AVG` or `fastcdc:MIN/AVG/MAX` (sizes like `64k`, `1m`).
    fn from_str(s: &str) -> Result<Self, String> {
        let (kind, sizes) = s
            .split_once(':')
            .ok_or_else(|| format!("chunking '{s}': expected fixed:SIZE or fastcdc:AVG[/..]"))?;
        let c = match kind {
            "fixed" => Chunking::Fixed {
                size: parse_size(sizes)?,
            },
            "fastcdc" | "cdc" => {
                let parts: Vec<&str> = sizes.split('/').collect();
                match parts.as_slice() {
                    [avg] => return Chunking::fastcdc(parse_size(avg)?),
                    [min, avg, max] => Chunking::FastCdc {
                        min: parse_size(min)?,
                        avg: parse_size(avg)?,
                        max: parse_size(max)?,
                    },
                    _ => {
                        return Err(format!(
                            "chunking '{s}': expected fastcdc:AVG or fastcdc:MIN/AVG/MAX"
                        ))
                    }
                }
            }
            other => {
                return Err(format!(
                    "unknown chunking '{other}': expected fixed or fastcdc"
                ))
            }
        };
        c.validate()?;
        Ok(c)
    }
}

/// Finer chunks for large files: a file of at least `from` bytes is cut
/// with `chunking` instead of the image's policy.
///
/// A small file is read whole, so its chunk size matters little; a large
/// one (a database, model weights, a JDK's modules file) is often read at
/// random places, and each read decodes and verifies whole chunks (zstd and
/// SHA-256 are 45% of the daemon's time in a random-read profile). Measured
/// here on the benchmark's 2 GiB file, cold: 4 KiB random reads cost 441 us
/// each with the default 128 KiB chunks, 340-420 us with 64 KiB, 250 us
/// with 32 KiB (kernel erofs: 153 us); the file stores 1%
/// smaller (finer chunks dedupe more) and cold sequential reads did not
/// change beyond noise. The fixture image grows 0.8% (few of its bytes are
/// in files of 4 MiB or more; with 1 MiB as the bound, 1.5%).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LargeFiles {
    /// Smallest file size the finer policy applies to.
    pub from: u64,
    /// The policy for those files.
    pub chunking: Chunking,
}

impl Default for LargeFiles {
    fn default() -> Self {
        LargeFiles {
            from: 4 << 20,
            chunking: Chunking::FastCdc {
                min: 8 << 10,
                avg: 32 << 10,
                max: 128 << 10,
            },
        }
    }
}

impl LargeFiles {
    /// The policy for a file of `size` bytes: this one's or `base`.
    pub fn policy_for(this: Option<&LargeFiles>, base: Chunking, size: u64) -> Chunking {
        match this {
            Some(l) if size >= l.from => l.chunking,
            _ => base,
        }
    }
}

impl fmt::Display for LargeFiles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let from = if self.from % (1 << 20) == 0 {
            format!("{}m", self.from >> 20)
        } else if self.from % 1024 == 0 {
            format!("{}k", self.from >> 10)
        } else {
            self.from.to_string()
        };
        write!(f, "{from}:{}", self.chunking)
    }
}

impl FromStr for LargeFiles {
    type Err = String;

    /// Parses `SIZE:CHUNKING`, e.g. `4m:fastcdc:8k/32k/128k`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (from, chunking) = s.split_once(':').ok_or_else(|| {
            format!(
                "large-file chunking '{s}': expected SIZE:CHUNKING, e.g. 4m:fastcdc:8k/32k/128k"
            )
        })?;
        let from = u64::from(parse_size(from)?);
        if from == 0 {
            return Err(format!(
                "large-file chunking '{s}': the size must be above 0"
            ));
        }
        Ok(LargeFiles {
            from,
            chunking: chunking.parse()?,
        })
    }
}

/// Cuts streams into chunks with one reusable buffer.
pub struct Chunker {
    policy: Chunking,
    buf: Vec<u8>,
}

impl Chunker {
    /// A chunker for `policy` (which must have passed [`Chunking::validate`]).
    pub fn new(policy: Chunking) -> Self {
        // Room for a full chunk plus a lookahead of another max chunk, so
        // refills move data rarely.
        let cap = policy.max_size() as usize * 2;
        Chunker {
            policy,
            buf: vec![0; cap],
        }
    }

    /// Reads `reader` to its end and calls `f(offset, chunk)` for each chunk
    /// in order. Returns the number of bytes read.
    pub fn for_each_chunk<R, F, E>(&mut self, reader: &mut R, f: F) -> Result<u64, E>
    where
        R: Read + ?Sized,
        F: FnMut(u64, &[u8]) -> Result<(), E>,
        E: From<io::Error>,
    {
        self.for_each_chunk_as(self.policy, reader, f)
    }

    /// [`Chunker::for_each_chunk`] with `policy` (which must have passed
    /// [`Chunking::validate`]) instead of the chunker's own.
    pub fn for_each_chunk_as<R, F, E>(
        &mut self,
        policy: Chunking,
        reader: &mut R,
        mut f: F,
    ) -> Result<u64, E>
    where
        R: Read + ?Sized,
        F: FnMut(u64, &[u8]) -> Result<(), E>,
        E: From<io::Error>,
    {
        let max = policy.max_size() as usize;
        if self.buf.len() < max * 2 {
            self.buf.resize(max * 2, 0);
        }
        let mut start = 0usize; // start of the current chunk in buf
        let mut filled = 0usize; // valid bytes in buf
        let mut eof = false;
        let mut offset = 0u64; // file offset of buf[start]
        loop {
            // Keep at least one max-sized chunk ahead unless the file ends first.
            if !eof && filled - start < max {
                if start > 0 {
                    self.buf.copy_within(start..filled, 0);
                    filled -= start;
                    start = 0;
                }
                while filled < self.buf.len() {
                    match reader.read(&mut self.buf[filled..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            let avail = filled - start;
            if avail == 0 {
                return Ok(offset);
            }
            let len = match policy {
                Chunking::Fixed { size } => avail.min(size as usize),
                Chunking::FastCdc { min, avg, max } => {
                    let window = &self.buf[start..filled];
                    let (_, end) = FastCDC::new(window, min, avg, max).cut(0, avail);
                    end.clamp(1, avail)
                }
            };
            f(offset, &self.buf[start..start + len])?;
            start += len;
            offset += len as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(n: usize, mut seed: u64) -> Vec<u8> {
        (0..n)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                (seed >> 24) as u8
            })
            .collect()
    }

    fn cuts(policy: Chunking, data: &[u8], read_size: usize) -> Vec<(u64, usize)> {
        struct Dribble<'a>(&'a [u8], usize);
        impl Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = self.0.len().min(buf.len()).min(self.1);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut out = Vec::new();
        let mut c = Chunker::new(policy);
        let total = c
            .for_each_chunk::<_, _, io::Error>(&mut Dribble(data, read_size), |off, chunk| {
                out.push((off, chunk.len()));
                Ok(())
            })
            .unwrap();
        assert_eq!(total, data.len() as u64);
        out
    }

    #[test]
    fn streaming_equals_whole_buffer_cutting() {
        let data = pseudo_random(3 << 20, 7);
        let policy = Chunking::fastcdc(64 << 10).unwrap();
        let Chunking::FastCdc { min, avg, max } = policy else {
            unreachable!()
        };
        let whole: Vec<(u64, usize)> = FastCDC::new(&data, min, avg, max)
            .map(|c| (c.offset as u64, c.length))
            .collect();
        assert_eq!(cuts(policy, &data, 1 << 20), whole);
        assert_eq!(cuts(policy, &data, 977), whole);
    }

    #[test]
    fn golden_cut_points_are_pinned() {
        // If this fails, the fastcdc crate moved its cut points: chunks of new
        // conversions would no longer deduplicate against older images.
        let data = pseudo_random(1 << 20, 42);
        let c = cuts(Chunking::fastcdc(64 << 10).unwrap(), &data, usize::MAX);
        let lens: Vec<usize> = c.iter().map(|x| x.1).collect();
        assert_eq!(lens.iter().sum::<usize>(), 1 << 20);
        let fingerprint: Vec<usize> = lens.iter().take(4).copied().collect();
        assert_eq!(fingerprint, GOLDEN_FIRST_CUTS, "all lengths: {lens:?}");
    }

    const GOLDEN_FIRST_CUTS: [usize; 4] = [40186, 174507, 43098, 47806];

    #[test]
    fn fixed_chunks_and_empty_input() {
        let data = pseudo_random(10_000, 1);
        let c = cuts(Chunking::Fixed { size: 4096 }, &data, 333);
        assert_eq!(c, vec![(0, 4096), (4096, 4096), (8192, 1808)]);
        assert!(cuts(Chunking::default(), &[], 10).is_empty());
    }

    #[test]
    fn parse_and_display() {
        let c: Chunking = "fastcdc:128k".parse().unwrap();
        assert_eq!(c, Chunking::default());
        assert_eq!(c.to_string(), "fastcdc:32k/128k/512k");
        assert_eq!(
            "fixed:1m".parse::<Chunking>().unwrap(),
            Chunking::Fixed { size: 1 << 20 }
        );
        assert!("fixed:12".parse::<Chunking>().is_err());
        assert!("lz:4".parse::<Chunking>().is_err());
        assert!("fastcdc:64k/16k/256k".parse::<Chunking>().is_err());
    }

    #[test]
    fn large_files_parse_display_and_choose() {
        let l = LargeFiles::default();
        assert_eq!(l.to_string(), "4m:fastcdc:8k/32k/128k");
        assert_eq!(l.to_string().parse::<LargeFiles>().unwrap(), l);
        assert!("0:fastcdc:32k".parse::<LargeFiles>().is_err());
        assert!("4m".parse::<LargeFiles>().is_err());
        assert!("4m:fastcdc:1/2/3".parse::<LargeFiles>().is_err());
        let base = Chunking::default();
        assert_eq!(LargeFiles::policy_for(Some(&l), base, (4 << 20) - 1), base);
        assert_eq!(LargeFiles::policy_for(Some(&l), base, 4 << 20), l.chunking);
        assert_eq!(LargeFiles::policy_for(None, base, 1 << 30), base);
    }

    #[test]
    fn one_chunker_cuts_with_either_policy_as_a_fresh_one_would() {
        // The buffer sized for the small policy grows for the larger one.
        let data = pseudo_random(3 << 20, 9);
        let small = LargeFiles::default().chunking;
        let mut c = Chunker::new(small);
        let mut both = Vec::new();
        for policy in [small, Chunking::default(), small] {
            let mut out = Vec::new();
            c.for_each_chunk_as::<_, _, io::Error>(policy, &mut &data[..], |off, chunk| {
                out.push((off, chunk.len()));
                Ok(())
            })
            .unwrap();
            assert_eq!(out, cuts(policy, &data, 1 << 16), "{policy}");
            both.push(out.len());
        }
        // 32 KiB against 128 KiB on average.
        assert!(both[0] > 2 * both[1], "{both:?}");
    }
}
