//! The link to a remote blob store as the fetch path sees it: its round
//! trip and its rate, fitted to the timings of recent range requests.
//!
//! A request of `n` bytes takes about `rtt + n / rate` (the round trip,
//! with the server's own time per request, then the transfer). The
//! estimate is a Theil-Sen line through the last [`SAMPLES`] requests'
//! (bytes, seconds): its slope is the median of the slopes between every
//! two requests whose sizes differ by at least 16 KiB, its intercept the
//! median of what each request took beyond that slope. Requests of varied
//! sizes give both terms (a read's fetch is its chunks plus a window, from
//! tens of KiB to MiBs).
//!
//! Medians, not least squares: a registry's time per request has a long
//! tail (a cold disk under its storage, a busy moment), and one request
//! that waited 30 ms more than the others tilts a least-squares line enough
//! to move the rate several-fold when the sizes barely tell it. With the
//! registry on loopback behind 1 Gbit/s + 1 ms, least squares put what the
//! link moves in a round trip anywhere from 0.2 to 31 MB from one
//! evaluation to the next (about 1 MB is right: 7-10 ms per request at 125
//! MB/s), and the fetch window grew or shrank on that noise; the medians
//! stay within 1.0-2.8 MB once a few dozen requests are in (a first
//! estimate from eight can still be far off). Alternated runs of
//! `scripts/bench-coldstart`'s workloads (a mount each, caches dropped;
//! Theil-Sen against least squares, means): random reads across 1,500 files
//! 2.95 vs 3.20 s over 1 Gbit/s + 1 ms (6 runs each) and 11.6 vs 12.6 s
//! over 100 Mbit/s + 20 ms (2); `import numpy, pandas` over 100 Mbit/s + 20
//! ms 6.27 vs 6.43 s (4); `python3 -c pass` 0.447 vs 0.463 s (1 Gbit/s) and
//! 1.62 vs 1.64 s (100 Mbit/s); the import over 1 Gbit/s, every file and
//! the 256 MiB file unchanged.
//!
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
        // Sizes that barely differ cannot tell the round trip from the
        // rate: only pairs at least MIN_SPREAD apart give a slope.
        let mut slopes = Vec::with_capacity(s.len() * (s.len() - 1) / 2);
        for (i, &(b1, t1)) in s.iter().enumerate() {
            for &(b2, t2) in s.iter().skip(i + 1) {
                if (b2 - b1).abs() >= MIN_SPREAD {
                    slopes.push((t2 - t1) / (b2 - b1));
                }
            }
        }
        if slopes.len() < MIN_SAMPLES {
            return None;
        }
        let per_byte = median(&mut slopes)?;
        if !(per_byte.is_finite() && per_byte > 0.0) {
            return None;
        }
        let mut rest: Vec<f64> = s.iter().map(|&(b, t)| t - per_byte * b).collect();
        let rtt = median(&mut rest)?;
        (rtt > 0.0).then(|| Link {
            rtt,
            rate: 1.0 / per_byte,
        })
    }
}

/// Bytes by which two requests' sizes must differ for their timings to
/// give a slope.
const MIN_SPREAD: f64 = 16.0 * 1024.0;

/// The median of `v` (the upper one of an even count), reordering it;
/// `None` when it is empty.
fn median(v: &mut [f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mid = v.len() / 2;
    let (_, m, _) = v.select_nth_unstable_by(mid, f64::total_cmp);
    Some(*m)
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
    fn a_few_slow_requests_do_not_move_the_fit() {
        // 1 Gbit/s with 8 ms per request, sizes 32 KiB..1 MiB; one request
        // in eight waited 30 ms more (a cold disk under the registry).
        let link = LinkEstimate::default();
        for i in 0..SAMPLES as u64 {
            let bytes = 32 * 1024 * (1 + (i * 7) % 32);
            let slow = if i % 8 == 3 { 0.030 } else { 0.0 };
            link.record(bytes, 0.008 + bytes as f64 / 125e6 + slow);
        }
        let l = link.estimate().unwrap();
        assert!((l.rtt - 0.008).abs() < 1e-4, "{l:?}");
        assert!((l.rate - 125e6).abs() < 125e6 * 0.02, "{l:?}");
        // What a round trip is worth stays about 1 MB.
        let rt = l.bytes_per_round_trip();
        assert!((rt - 1e6).abs() < 0.05e6, "{rt}");
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
