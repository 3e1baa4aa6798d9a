//! The background fetch of the rest of the image: a node setting, off by
//! default. After the prefetch list, every blob is fetched in stored
//! order, in large requests, as a pull would bring it, so that later reads
//! of any file are local.
//!
//! Lazy loading wins while a workload reads a part of the image; one that
//! reads most of it pays a round trip for every miss and a window for
//! every jump, and over a link with a long round trip comes close to a
//! plain pull. Fetching the rest in the background wins those and loses
//! the others (bench/coldstart.md, the row `skiff mount, background fetch
//! on`, one run; off -> on): over 100 Mbit/s with 20 ms RTT, reading every
//! file 11.5 -> 10.7 s and random reads across 1,500 files 15.4 -> 11.4 s,
//! but `import numpy, pandas` 6.5 -> 9.6 s (117 MB over the link instead
//! of 50: its misses wait behind the background's transfers), one large
//! file 22.4 -> 28.4 s (the other layers come beside it) and `python3 -c
//! pass` 1.7 -> 3.5 s; over 1 Gbit/s with 1 ms only the random reads
//! gain. So it stays off by default. Starting it per blob once the mount
//! had fetched half of that blob still fired for the import (it takes 54%
//! of the fixture's package layer); at 60% it spared the import but came
//! too late to help the others (one run each over 100 Mbit/s + 20 ms:
//! every file 11.6 s, random reads 13.5 s).
//!
//! It takes its share of the link beside the workload: while a read,
//! readahead or list prefetch has a request in flight it keeps one request
//! of [`BACKGROUND_REQUEST`] of its own in flight, and
//! [`BACKGROUND_REQUESTS`] when it is alone (a link with a long round trip
//! needs several to fill it); an optional cap (`rate`, bytes per second)
//! bounds it on a node whose link other work needs. The version before
//! this one waited for 100 ms without any other fetch before each request
//! of 512 KiB, and so barely ran beside a workload (one run each over
//! 100 Mbit/s + 20 ms: every file 11.6 s, random reads 13.6 s, the import
//! 7.0 s).
//! It stops for good when its next request would take the disk cache past
//! its low watermark, counting what its requests in flight will bring (it
//! would only evict what other images use), and at unmount. Without a
//! disk cache it does not run: there would be nowhere to keep what it
//! fetches. Its requests are bounded by the mount's in-flight budget like
//! every other load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::chunk::{plan_runs, stored_bytes, ChunkRequest};
use crate::fetch::PREFETCH_MAX_GAP;
use crate::image::Image;
use crate::metrics::Metrics;
use crate::source::ChunkSource;
use crate::workers::lock;

/// Fetching the rest of the image in the background; see the module
/// documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackgroundFetch {
    /// Bytes per second at most (0: no cap beyond its share of the link).
    pub rate: u64,
}

impl BackgroundFetch {
    /// Parses the setting: `off`, `on` (no rate cap) or a rate in bytes
    /// per second (`12m`: 12 MiB/s, about 100 Mbit/s; see
    /// [`parse_size`](crate::disk::parse_size)).
    pub fn parse(s: &str) -> Result<Option<BackgroundFetch>, String> {
        match s.trim() {
            "off" | "false" | "no" => Ok(None),
            "on" | "true" | "yes" => Ok(Some(BackgroundFetch { rate: 0 })),
            rate => match crate::disk::parse_size(rate) {
                Ok(0) => Err(format!(
                    "background fetch rate '{rate}' is 0: say 'off' to turn it off"
                )),
                Ok(rate) => Ok(Some(BackgroundFetch { rate })),
                Err(e) => Err(format!(
                    "background fetch: expected off, on or a rate in bytes per second (12m), got '{rate}': {e}"
                )),
            },
        }
    }
}

/// Stored bytes per request of the background fetch: 84 ms at 100 Mbit/s,
/// so that a read that arrives meanwhile waits little behind it.
pub const BACKGROUND_REQUEST: u64 = 1 << 20;
/// Requests of the background fetch in flight while no other fetch is.
pub const BACKGROUND_REQUESTS: usize = 3;
/// How often a capped fetch looks at the time and at `stop`.
const POLL: Duration = Duration::from_millis(20);
/// How often a waiting request looks again at whether others fetch.
const YIELD_POLL: Duration = Duration::from_millis(2);

/// The background fetch of the rest, until every blob is done, the disk
/// cache is at its low watermark, or `stop`; returns the stored bytes it
/// asked for and why it ended.
pub(crate) fn fetch_rest(
    image: &Image,
    source: &ChunkSource,
    bg: BackgroundFetch,
    stop: &AtomicBool,
) -> (u64, &'static str) {
    let (tx, rx) = mpsc::sync_channel::<Vec<ChunkRequest>>(BACKGROUND_REQUESTS);
    let rx = Mutex::new(rx);
    // Requests of this fetch in flight, to tell them from everyone else's.
    let mine = AtomicU64::new(0);
    // Stored bytes handed to the fetching threads and not yet fetched
    // (then they are in the disk cache's queue, which a flush counts).
    let handed = AtomicU64::new(0);
    let m = source.metrics();
    std::thread::scope(|s| {
        for k in 0..BACKGROUND_REQUESTS {
            let (rx, mine, handed) = (&rx, &mine, &handed);
            s.spawn(move || loop {
                let Ok(reqs) = lock(rx).recv() else { break };
                let bytes = stored_bytes(&reqs);
                // Beyond the first, wait while others fetch: one request
                // is this fetch's share of a busy link.
                while k > 0
                    && !stop.load(Ordering::Relaxed)
                    && m.fetch_in_flight.load(Ordering::Relaxed) > mine.load(Ordering::Relaxed)
                {
                    std::thread::sleep(YIELD_POLL);
                }
                if !stop.load(Ordering::Relaxed) {
                    mine.fetch_add(1, Ordering::Relaxed);
                    let (ok, _) = source.prefetch(&reqs);
                    mine.fetch_sub(1, Ordering::Relaxed);
                    Metrics::add(&m.background_done, ok);
                }
                // After the chunks are queued for the disk cache (see
                // `plan_rest`).
                handed.fetch_sub(bytes, Ordering::Release);
            });
        }
        let out = plan_rest(image, source, bg, stop, &tx, &handed);
        drop(tx);
        out
    })
}

/// Walks every blob in stored order and hands requests of what is not
/// local to `tx`.
fn plan_rest(
    image: &Image,
    source: &ChunkSource,
    bg: BackgroundFetch,
    stop: &AtomicBool,
    tx: &mpsc::SyncSender<Vec<ChunkRequest>>,
    handed: &AtomicU64,
) -> (u64, &'static str) {
    let m = source.metrics();
    let b = image.bootstrap();
    let start = Instant::now();
    let mut fetched = 0u64;
    for blob in 0..b.blob_count() {
        let Ok(info) = b.blob(blob) else { continue };
        let mut at = 0u64;
        while at < info.size {
            if stop.load(Ordering::Relaxed) {
                return (fetched, "stopped at unmount");
            }
            let to = at.saturating_add(BACKGROUND_REQUEST).min(info.size);
            let mut local = source.local_check();
            let mut reqs: Vec<ChunkRequest> = image
                .chunks_in_blob(blob, at, to)
                .into_iter()
                .map(|(index, c)| ChunkRequest {
                    index,
                    info: c,
                    blob: info.digest,
                })
                .filter(|r| !local.is_local(r))
                .collect();
            at = to;
            if reqs.is_empty() {
                continue;
            }
            // Only what fits under the disk cache's low watermark, with
            // what the fetching threads have still to bring.
            if let Some(disk) = source.disk() {
                // `handed` before the flush: a fetching thread stops
                // counting its request there only after it has queued its
                // chunks for the disk cache, so whatever left `handed`
                // before this load is written by the flush and counted in
                // the stats. Read after the flush, a request that ended in
                // between was in neither, and the cache went past its low
                // watermark (and evicted) by that much.
                let in_flight = handed.load(Ordering::Acquire);
                disk.flush();
                let s = disk.stats();
                let mut room = s.low.saturating_sub(s.bytes).saturating_sub(in_flight);
                let fit = reqs
                    .iter()
                    .take_while(|r| {
                        let size = u64::from(r.info.compressed_size);
                        let ok = size <= room;
                        room = room.saturating_sub(size);
                        ok
                    })
                    .count();
                if fit == 0 {
                    return (fetched, "stopped: the disk cache is at its low watermark");
                }
                reqs.truncate(fit);
            }
            let bytes = stored_bytes(&reqs);
            Metrics::add(&m.background_planned, reqs.len() as u64);
            // Local chunks in the middle split the stretch into runs.
            for run in plan_runs(&reqs, BACKGROUND_REQUEST, PREFETCH_MAX_GAP) {
                let part: Vec<ChunkRequest> = run
                    .members
                    .iter()
                    .filter_map(|&i| reqs.get(i).copied())
                    .collect();
                handed.fetch_add(stored_bytes(&part), Ordering::Relaxed);
                if tx.send(part).is_err() {
                    return (fetched, "stopped: its fetching threads are gone");
                }
            }
            fetched = fetched.saturating_add(bytes);
            // The cap: wait until the average rate is back under it.
            if bg.rate > 0 {
                let due = Duration::from_secs_f64(fetched as f64 / bg.rate as f64);
                if let Some(wait) = due.checked_sub(start.elapsed()) {
                    let until = Instant::now() + wait;
                    while Instant::now() < until {
                        if stop.load(Ordering::Relaxed) {
                            return (fetched, "stopped at unmount");
                        }
                        std::thread::sleep(POLL.min(until - Instant::now()));
                    }
                }
            }
        }
    }
    (fetched, "finished")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_setting_is_off_on_or_a_rate() {
        assert_eq!(BackgroundFetch::parse("off"), Ok(None));
        assert_eq!(BackgroundFetch::parse(" no "), Ok(None));
        assert_eq!(
            BackgroundFetch::parse("on"),
            Ok(Some(BackgroundFetch { rate: 0 }))
        );
        assert_eq!(
            BackgroundFetch::parse("12m"),
            Ok(Some(BackgroundFetch { rate: 12 << 20 }))
        );
        let e = BackgroundFetch::parse("0").unwrap_err();
        assert!(e.contains("'off'"), "{e}");
        let e = BackgroundFetch::parse("fast").unwrap_err();
        assert!(e.contains("'fast'"), "{e}");
    }
}
