//! A reader that checks the SHA-256 and length of what it streams.
//!
//! The check happens when the inner reader reaches end of file: only then is
//! the whole content known. A stream that runs past the expected size fails
//! at once, so a lying size cannot make a caller read an unbounded file.
//! After a failure every further `read` fails again, so a caller that retries
//! cannot mistake the stream for a good one.

use std::io::{self, Read};

use sha2::{Digest as _, Sha256};
use skiff_format::Digest;

/// Streams `inner`, hashing it, and fails with `InvalidData` at EOF if the
/// content is not what was expected.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Sha256,
    count: u64,
    expected_digest: Option<Digest>,
    expected_size: Option<u64>,
    what: String,
    state: State,
}

#[derive(Clone, PartialEq, Eq)]
enum State {
    Reading,
    Verified,
    Failed(String),
}

impl<R: Read> VerifyingReader<R> {
    /// Wraps `inner`. `what` names the content in error messages, e.g.
    /// `layer 0 (sha256:...) of oci:/img:tag`. A `None` expectation is not
    /// checked.
    pub fn new(
        inner: R,
        expected_digest: Option<Digest>,
        expected_size: Option<u64>,
        what: String,
    ) -> Self {
        VerifyingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
            expected_digest,
            expected_size,
            what,
            state: State::Reading,
        }
    }

    fn fail(&mut self, message: String) -> io::Error {
        self.state = State::Failed(message.clone());
        io::Error::new(io::ErrorKind::InvalidData, message)
    }

    fn finish(&mut self) -> io::Result<()> {
        if let Some(size) = self.expected_size {
            if self.count != size {
                let msg = format!(
                    "{}: size mismatch: manifest says {size} bytes, content is {} bytes",
                    self.what, self.count
                );
                return Err(self.fail(msg));
            }
        }
        let actual = Digest(std::mem::take(&mut self.hasher).finalize().into());
        if let Some(expected) = self.expected_digest {
            if actual != expected {
                let msg = format!(
                    "{}: digest mismatch: manifest says {expected}, content is {actual}",
                    self.what
                );
                return Err(self.fail(msg));
            }
        }
        self.state = State::Verified;
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &self.state {
            State::Verified => return Ok(0),
            State::Failed(m) => return Err(io::Error::new(io::ErrorKind::InvalidData, m.clone())),
            State::Reading => {}
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", self.what))),
        };
        if n == 0 {
            self.finish()?;
            return Ok(0);
        }
        let data = buf.get(..n).unwrap_or(buf);
        self.hasher.update(data);
        self.count += n as u64;
        if let Some(size) = self.expected_size {
            if self.count > size {
                let msg = format!(
                    "{}: size mismatch: manifest says {size} bytes, content is longer",
                    self.what
                );
                return Err(self.fail(msg));
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(r: &mut impl Read) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        r.read_to_end(&mut v)?;
        Ok(v)
    }

    #[test]
    fn good_content_passes() -> io::Result<()> {
        let data = b"hello world".to_vec();
        let mut r = VerifyingReader::new(
            data.as_slice(),
            Some(Digest::of(&data)),
            Some(data.len() as u64),
            "x".into(),
        );
        assert_eq!(read_all(&mut r)?, data);
        assert_eq!(r.read(&mut [0u8; 4])?, 0);
        Ok(())
    }

    #[test]
    fn mismatches_fail() {
        let data = b"hello world".to_vec();
        let mut r = VerifyingReader::new(
            data.as_slice(),
            Some(Digest::of(b"other")),
            None,
            "blob".into(),
        );
        let err = read_all(&mut r).err();
        assert_eq!(
            err.as_ref().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData)
        );
        assert!(err
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("digest mismatch"));
        // Stays failed.
        assert!(r.read(&mut [0u8; 4]).is_err());

        let mut short = VerifyingReader::new(data.as_slice(), None, Some(100), "b".into());
        assert!(read_all(&mut short).is_err());
        let mut long = VerifyingReader::new(data.as_slice(), None, Some(3), "b".into());
        assert!(read_all(&mut long).is_err());
    }
}
