//! The link to a remote blob store as the fetch path sees it: its round
//! trip and its rate, fitted to the timings of recent range requests.
//!
//! A request of `n` bytes takes about `rtt + n / rate` (the round trip,
//! with the server's own time per request, then the transfer). The
//! estimate is the least-squares line through the last [`SAMPLES`]
//! requests' (bytes, seconds): requests of varied sizes give both terms
//! (a read's fetch is its chunks plus a window, from tens of KiB to MiBs).
//! Requests that share the link with others look slower than the link is;
//! the fit then errs towards a slower link, which the fetch window reads
//! as "round trips are cheap", the cautious side. Local stores are not
//! sampled: their reads are system calls.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Requests the fit looks back over.
pub(crate) const SAMPLES: usize = 64;
/// Requests needed before there is an estimate.
const MIN_SAMPLES: usize = 8;

/// What the fit says about the link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Link {
    /// Seconds a request costs before its first byte.
    pub(crate) rtt: f64,
    /// Bytes per second once the bytes flow.
    pub(crate) rate: f64,
}

impl Link {
    /// The bytes the link moves in one round trip: what a request saved is
    /// worth, in bytes of transfer.
    pub(crate) fn bytes_per_round_trip(&self) -> f64 {
        self.rtt * self.rate
    }
}

/// Recent range requests: (bytes, seconds).
#[derive(Default)]
pub(crate) struct LinkEstimate {
    samples: Mutex<VecDeque<(f64, f64)>>,
}

impl LinkEstimate {
    /// Records a request of `bytes` that took `secs`.
    pub(crate) fn record(&self, bytes: u64, secs: f64) {
        if !(secs.is_finite() && secs > 0.0) {
            return;
        }
        let mut s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() == SAMPLES {
            s.pop_front();
        }
        s.push_back((bytes as f64, secs));
    }

    /// The link, once enough requests of different sizes were seen for
    /// the fit to make sense (a positive round trip and rate); else `None`.
    pub(crate) fn estimate(&self) -> Option<Link> {
        let s = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        if s.len() < MIN_SAMPLES {
            return None;
        }
        let n = s.len() as f64;
        let mean_b = s.iter().map(|&(b, _)| b).sum::<f64>() / n;
        let mean_t = s.iter().map(|&(_, t)| t).sum::<f64>() / n;
        let (mut cov, mut var) = (0.0, 0.0);
        for &(b, t) in s.iter() {
            cov += (b - mean_b) * (t - mean_t);
            var += (b - mean_b) * (b - mean_b);
        }
        // Sizes that barely differ cannot tell the round trip from the
        // rate: at least a 16 KiB spread.
        if var / n < (16.0 * 1024.0) * (16.0 * 1024.0) || cov <= 0.0 {
            return None;
        }
        let per_byte = cov / var;
        let rtt = mean_t - per_byte * mean_b;
        (rtt > 0.0).then(|| Link {
            rtt,
            rate: 1.0 / per_byte,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fit_finds_round_trip_and_rate_of_requests_of_varied_sizes() {
        let link = LinkEstimate::default();
        assert_eq!(link.estimate(), None, "no requests yet");
        // 20 ms round trip, 12.5 MB/s (100 Mbit/s).
        for i in 0..40u64 {
            let bytes = 64 * 1024 + (i % 8) * 128 * 1024;
            link.record(bytes, 0.020 + bytes as f64 / 12.5e6);
        }
        let l = link.estimate().unwrap();
        assert!((l.rtt - 0.020).abs() < 1e-6, "{l:?}");
        assert!((l.rate - 12.5e6).abs() < 1.0, "{l:?}");
        assert!((l.bytes_per_round_trip() - 250e3).abs() < 1.0);
    }

    #[test]
    fn requests_of_one_size_or_nonsense_timings_give_no_estimate() {
        let link = LinkEstimate::default();
        for _ in 0..20 {
            link.record(256 * 1024, 0.04);
        }
        assert_eq!(link.estimate(), None, "one size: no slope");
        let link = LinkEstimate::default();
        for i in 0..20u64 {
            // Larger requests faster: a busy moment, not a link.
            link.record(64 * 1024 * (i + 1), 0.1 / (i + 1) as f64);
        }
        assert_eq!(link.estimate(), None, "negative slope");
        link.record(1, f64::NAN);
        link.record(1, -1.0);
    }

    #[test]
    fn only_the_last_requests_count() {
        let link = LinkEstimate::default();
        for i in 0..SAMPLES as u64 {
            let bytes = 64 * 1024 * (1 + i % 4);
            link.record(bytes, 0.5 + bytes as f64 / 1e6);
        }
        for i in 0..SAMPLES as u64 {
            let bytes = 64 * 1024 * (1 + i % 4);
            link.record(bytes, 0.001 + bytes as f64 / 100e6);
        }
        let l = link.estimate().unwrap();
        assert!(
            (l.rtt - 0.001).abs() < 1e-6 && (l.rate - 100e6).abs() < 10.0,
            "{l:?}"
        );
    }
}
