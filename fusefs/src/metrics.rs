//! Counters of the daemon, and their export.
//!
//! Every counter is a relaxed atomic, so the read path never takes a lock to
//! count. [`Metrics::snapshot`] copies them for the exit summary line;
//! [`render_prometheus`] writes them in the Prometheus text exposition
//! format (version 0.0.4), and [`MetricsServer`] answers `GET /metrics` with
//! that text on a local unix socket (mode 0600): one accept thread, one
//! request per connection, HTTP/1.0 style. Nothing here can block a FUSE
//! thread: the server reads the atomics like anyone else.
//!
//! Fetch latency is a fixed-bucket histogram (one atomic per bucket plus a
//! sum in microseconds), the shape Prometheus expects for `_bucket`, `_sum`
//! and `_count`.

use std::fmt::{self, Write as _};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use skiff_registry::FetchStats;

/// Upper bounds (seconds) of the fetch latency histogram buckets; `+Inf` is implicit.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A latency histogram with the buckets of [`LATENCY_BUCKETS`].
#[derive(Debug, Default)]
pub struct Histogram {
    /// Non-cumulative counts: `buckets[i]` counts observations in
    /// `(LATENCY_BUCKETS[i-1], LATENCY_BUCKETS[i]]`; the last one is `+Inf`.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the observations in microseconds.
    sum_us: AtomicU64,
}

impl Histogram {
    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// Cumulative counts per bucket (the last is the total), and the sum in seconds.
    pub fn cumulative(&self) -> (Vec<u64>, f64) {
        let mut acc = 0;
        let counts = self
            .buckets
            .iter()
            .map(|b| {
                acc += b.load(Ordering::Relaxed);
                acc
            })
            .collect();
        (counts, self.sum_us.load(Ordering::Relaxed) as f64 / 1e6)
    }
}

/// Live counters, shared by the filesystem threads.
#[derive(Debug, Default)]
pub struct Metrics {
    /// `read` requests served (successfully or not).
    pub reads: AtomicU64,
    /// File bytes returned by `read`.
    pub bytes_read: AtomicU64,
    /// `read` requests answered with an error.
    pub read_errors: AtomicU64,
    /// Chunks fetched from the blob store (cache misses that did the work).
    pub chunks_fetched: AtomicU64,
    /// Of those, chunks fetched ahead of any reader and left in the disk
    /// cache as they came, to be verified when read.
    pub chunks_unverified: AtomicU64,
    /// Stored bytes fetched from the blob store, gaps of merged requests included.
    pub bytes_fetched: AtomicU64,
    /// Range requests made to the blob store (one per merged run).
    pub fetch_requests: AtomicU64,
    /// Range requests that failed (after the store's own retries).
    pub fetch_errors: AtomicU64,
    /// Range requests in progress now.
    pub fetch_in_flight: AtomicU64,
    /// Latency of range requests.
    pub fetch_latency: Histogram,
    /// The fetch window of a read that misses, in stored bytes now (it
    /// adapts over a network; see `crate::window`).
    pub fetch_window_bytes: AtomicU64,
    /// Chunk lookups answered by the memory cache (including waits on a
    /// fetch another thread was already doing).
    pub cache_hits: AtomicU64,
    /// Chunk lookups the memory cache could not answer.
    pub cache_misses: AtomicU64,
    /// Memory misses answered by the disk cache.
    pub disk_hits: AtomicU64,
    /// Memory misses the disk cache could not answer either.
    pub disk_misses: AtomicU64,
    /// Disk cache files that failed verification (deleted, refetched).
    pub disk_corrupt: AtomicU64,
    /// Chunks that could not be fetched or failed verification.
    pub chunk_errors: AtomicU64,
    /// Chunks read ahead of a sequential reader.
    pub readahead_chunks: AtomicU64,
    /// Chunks the prefetch list asked for (not already local).
    pub prefetch_planned: AtomicU64,
    /// Of those, chunks fetched and verified so far.
    pub prefetch_done: AtomicU64,
    /// Of those, chunks whose fetch failed.
    pub prefetch_failed: AtomicU64,
    /// Set once prefetch has gone through its whole list.
    pub prefetch_finished: AtomicBool,
    /// Chunks the background fetch of the rest asked for.
    pub background_planned: AtomicU64,
    /// Of those, chunks fetched and verified.
    pub background_done: AtomicU64,
    /// Set once the background fetch has ended (done, stopped at the low
    /// watermark, or stopped at unmount).
    pub background_finished: AtomicBool,
}

impl Metrics {
    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Subtracts `n` from the gauge `counter`.
    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    /// A consistent-enough copy of the counters.
    pub fn snapshot(&self) -> MetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MetricsSnapshot {
            reads: get(&self.reads),
            bytes_read: get(&self.bytes_read),
            read_errors: get(&self.read_errors),
            chunks_fetched: get(&self.chunks_fetched),
            bytes_fetched: get(&self.bytes_fetched),
            fetch_requests: get(&self.fetch_requests),
            fetch_errors: get(&self.fetch_errors),
            cache_hits: get(&self.cache_hits),
            cache_misses: get(&self.cache_misses),
            disk_hits: get(&self.disk_hits),
            disk_misses: get(&self.disk_misses),
            disk_corrupt: get(&self.disk_corrupt),
            chunk_errors: get(&self.chunk_errors),
            readahead_chunks: get(&self.readahead_chunks),
            prefetch_planned: get(&self.prefetch_planned),
            prefetch_done: get(&self.prefetch_done),
            background_done: get(&self.background_done),
            store: None,
        }
    }
}

/// The counters of [`Metrics`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// See [`Metrics::reads`].
    pub reads: u64,
    /// See [`Metrics::bytes_read`].
    pub bytes_read: u64,
    /// See [`Metrics::read_errors`].
    pub read_errors: u64,
    /// See [`Metrics::chunks_fetched`].
    pub chunks_fetched: u64,
    /// See [`Metrics::bytes_fetched`].
    pub bytes_fetched: u64,
    /// See [`Metrics::fetch_requests`].
    pub fetch_requests: u64,
    /// See [`Metrics::fetch_errors`].
    pub fetch_errors: u64,
    /// See [`Metrics::cache_hits`].
    pub cache_hits: u64,
    /// See [`Metrics::cache_misses`].
    pub cache_misses: u64,
    /// See [`Metrics::disk_hits`].
    pub disk_hits: u64,
    /// See [`Metrics::disk_misses`].
    pub disk_misses: u64,
    /// See [`Metrics::disk_corrupt`].
    pub disk_corrupt: u64,
    /// See [`Metrics::chunk_errors`].
    pub chunk_errors: u64,
    /// See [`Metrics::readahead_chunks`].
    pub readahead_chunks: u64,
    /// See [`Metrics::prefetch_planned`].
    pub prefetch_planned: u64,
    /// See [`Metrics::prefetch_done`].
    pub prefetch_done: u64,
    /// See [`Metrics::background_done`].
    pub background_done: u64,
    /// The blob store's own counters (requests, retries, errors), when it
    /// keeps any (a registry store does).
    pub store: Option<FetchStats>,
}

impl fmt::Display for MetricsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "reads={} bytes_read={} read_errors={} fetch_requests={} chunks_fetched={} bytes_fetched={} fetch_errors={} \
             mem_hits={} mem_misses={} disk_hits={} disk_misses={} disk_corrupt={} chunk_errors={} \
             readahead_chunks={} prefetch={}/{} background_chunks={}",
            self.reads,
            self.bytes_read,
            self.read_errors,
            self.fetch_requests,
            self.chunks_fetched,
            self.bytes_fetched,
            self.fetch_errors,
            self.cache_hits,
            self.cache_misses,
            self.disk_hits,
            self.disk_misses,
            self.disk_corrupt,
            self.chunk_errors,
            self.readahead_chunks,
            self.prefetch_done,
            self.prefetch_planned,
            self.background_done,
        )?;
        if let Some(s) = &self.store {
            write!(
                f,
                " store_requests={} store_retries={} store_errors={}",
                s.requests, s.retries, s.errors
            )?;
        }
        Ok(())
    }
}

/// Gauges that live outside [`Metrics`] (cache sizes), read when rendering.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Bytes held by the memory cache.
    pub memory_bytes: u64,
    /// Chunks held by the memory cache.
    pub memory_chunks: u64,
    /// The disk cache's counters, when there is one.
    pub disk: Option<crate::disk::DiskStats>,
}

/// The counters in the Prometheus text exposition format (0.0.4).
pub fn render_prometheus(m: &Metrics, gauges: &Gauges, store: Option<&FetchStats>) -> String {
    let mut out = String::with_capacity(4096);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, v) in samples {
            if labels.is_empty() {
                let _ = writeln!(out, "{name} {v}");
            } else {
                let _ = writeln!(out, "{name}{{{labels}}} {v}");
            }
        }
    };
    metric(
        "skiff_reads_total",
        "counter",
        "FUSE read requests.",
        &[("", get(&m.reads))],
    );
    metric(
        "skiff_read_bytes_total",
        "counter",
        "File bytes returned by read.",
        &[("", get(&m.bytes_read))],
    );
    metric(
        "skiff_read_errors_total",
        "counter",
        "Read requests answered with an error.",
        &[("", get(&m.read_errors))],
    );
    metric(
        "skiff_fetch_requests_total",
        "counter",
        "Range requests to the blob store (merged runs of chunks).",
        &[("", get(&m.fetch_requests))],
    );
    metric(
        "skiff_fetch_bytes_total",
        "counter",
        "Stored bytes fetched from the blob store.",
        &[("", get(&m.bytes_fetched))],
    );
    metric(
        "skiff_fetch_chunks_total",
        "counter",
        "Chunks fetched from the blob store.",
        &[("", get(&m.chunks_fetched))],
    );
    metric(
        "skiff_fetch_chunks_unverified_total",
        "counter",
        "Chunks fetched ahead of any reader and written to the disk cache as they came, verified when read.",
        &[("", get(&m.chunks_unverified))],
    );
    metric(
        "skiff_fetch_errors_total",
        "counter",
        "Range requests that failed after the store's retries.",
        &[("", get(&m.fetch_errors))],
    );
    metric(
        "skiff_fetch_in_flight",
        "gauge",
        "Range requests in progress.",
        &[("", get(&m.fetch_in_flight))],
    );
    metric(
        "skiff_fetch_window_bytes",
        "gauge",
        "Stored bytes a read that misses fetches from its blob (it adapts to the link).",
        &[("", get(&m.fetch_window_bytes))],
    );
    metric(
        "skiff_chunk_errors_total",
        "counter",
        "Chunks that could not be fetched or failed verification.",
        &[("", get(&m.chunk_errors))],
    );
    metric(
        "skiff_cache_hits_total",
        "counter",
        "Chunk lookups answered by a cache.",
        &[
            ("cache=\"memory\"", get(&m.cache_hits)),
            ("cache=\"disk\"", get(&m.disk_hits)),
        ],
    );
    metric(
        "skiff_cache_misses_total",
        "counter",
        "Chunk lookups a cache could not answer.",
        &[
            ("cache=\"memory\"", get(&m.cache_misses)),
            ("cache=\"disk\"", get(&m.disk_misses)),
        ],
    );
    metric(
        "skiff_disk_cache_corrupt_total",
        "counter",
        "Disk cache files that failed verification (deleted and refetched).",
        &[("", get(&m.disk_corrupt))],
    );
    metric(
        "skiff_readahead_chunks_total",
        "counter",
        "Chunks read ahead of sequential readers.",
        &[("", get(&m.readahead_chunks))],
    );
    metric(
        "skiff_prefetch_chunks",
        "gauge",
        "Prefetch progress: chunks planned, done and failed.",
        &[
            ("state=\"planned\"", get(&m.prefetch_planned)),
            ("state=\"done\"", get(&m.prefetch_done)),
            ("state=\"failed\"", get(&m.prefetch_failed)),
        ],
    );
    metric(
        "skiff_background_fetch_chunks",
        "gauge",
        "Background fetch of the rest of the image: chunks planned and done.",
        &[
            ("state=\"planned\"", get(&m.background_planned)),
            ("state=\"done\"", get(&m.background_done)),
        ],
    );
    metric(
        "skiff_background_fetch_finished",
        "gauge",
        "1 once the background fetch of the rest has ended.",
        &[("", u64::from(m.background_finished.load(Ordering::Relaxed)))],
    );
    metric(
        "skiff_prefetch_finished",
        "gauge",
        "1 once prefetch went through its whole list.",
        &[("", u64::from(m.prefetch_finished.load(Ordering::Relaxed)))],
    );
    metric(
        "skiff_memory_cache_bytes",
        "gauge",
        "Bytes held by the memory cache of decompressed chunks.",
        &[("", gauges.memory_bytes)],
    );
    metric(
        "skiff_memory_cache_chunks",
        "gauge",
        "Chunks held by the memory cache.",
        &[("", gauges.memory_chunks)],
    );
    if let Some(d) = &gauges.disk {
        metric(
            "skiff_disk_cache_bytes",
            "gauge",
            "Bytes of stored chunks this daemon knows in the disk cache.",
            &[("", d.bytes)],
        );
        metric(
            "skiff_disk_cache_chunks",
            "gauge",
            "Chunks this daemon knows in the disk cache.",
            &[("", d.entries)],
        );
        metric(
            "skiff_disk_cache_limit_bytes",
            "gauge",
            "Bound of the disk cache (its high watermark).",
            &[("", d.limit)],
        );
        metric(
            "skiff_disk_cache_watermark_bytes",
            "gauge",
            "Watermarks of the disk cache: above high it evicts down to low.",
            &[("mark=\"high\"", d.limit), ("mark=\"low\"", d.low)],
        );
        metric(
            "skiff_disk_cache_evicted_bytes_total",
            "counter",
            "Bytes evicted from the disk cache.",
            &[("", d.evicted_bytes)],
        );
        metric(
            "skiff_disk_cache_writes_total",
            "counter",
            "Chunks written to the disk cache.",
            &[("", d.writes)],
        );
        metric(
            "skiff_disk_cache_write_errors_total",
            "counter",
            "Disk cache writes that failed (ENOSPC, ...); the data was still served.",
            &[("", d.write_errors)],
        );
        metric(
            "skiff_disk_cache_evictions_total",
            "counter",
            "Chunks evicted from the disk cache.",
            &[("", d.evictions)],
        );
    }
    if let Some(s) = store {
        metric(
            "skiff_store_requests_total",
            "counter",
            "HTTP requests made by the blob store (retries included).",
            &[("", s.requests)],
        );
        metric(
            "skiff_store_bytes_total",
            "counter",
            "Body bytes received by the blob store.",
            &[("", s.bytes)],
        );
        metric(
            "skiff_store_retries_total",
            "counter",
            "Blob store attempts that failed and were retried.",
            &[("", s.retries)],
        );
        metric(
            "skiff_store_errors_total",
            "counter",
            "Blob store operations that failed for good.",
            &[("", s.errors)],
        );
        metric(
            "skiff_store_in_flight",
            "gauge",
            "Blob store operations in progress.",
            &[("", s.in_flight)],
        );
    }
    let name = "skiff_fetch_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Latency of range requests to the blob store.\n# TYPE {name} histogram"
    );
    let (counts, sum) = m.fetch_latency.cumulative();
    for (i, c) in counts.iter().enumerate() {
        match LATENCY_BUCKETS.get(i) {
            Some(le) => {
                let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {c}");
            }
            None => {
                let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {c}");
            }
        }
    }
    let _ = writeln!(out, "{name}_sum {sum}");
    let _ = writeln!(out, "{name}_count {}", counts.last().copied().unwrap_or(0));
    out
}

/// Renders the current exposition text; called once per scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// A `GET /metrics` responder on a unix socket, until dropped.
pub struct MetricsServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Listens on `path` (mode 0600; an old socket there is replaced) and
    /// answers every connection with `render()`.
    ///
    /// The socket is bound inside a fresh directory only its owner can
    /// enter, restricted to 0600, then renamed into place: nobody else can
    /// connect in between, whatever the umask.
    pub fn start(path: &Path, render: Render) -> std::io::Result<MetricsServer> {
        let listener = bind_private(path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("skiff-metrics".into())
            .spawn(move || serve(listener, render, stop2))?;
        Ok(MetricsServer {
            path: path.to_path_buf(),
            stop,
            thread: Some(thread),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds a unix socket at `path`, mode 0600, replacing an old socket there.
///
/// `bind` creates the socket with the mode the umask allows, and a later
/// `chmod` leaves a window in which anyone may connect. So the socket is
/// bound in a private directory (0700) beside `path`, restricted, and
/// renamed into place.
pub fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt as _;
    let private = path.with_file_name(format!(".s{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let result = UnixListener::bind(&tmp).and_then(|listener| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    match result {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // The private path is too long for a socket address: bind in
            // place and restrict it at once.
            let listener = UnixListener::bind(path)?;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
            Ok(listener)
        }
        other => other,
    }
}

/// Accepts connections (polling, so that the stop flag is seen) and answers each.
fn serve(listener: UnixListener, render: Render, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = answer(stream, &render) {
                    tracing::debug!("metrics socket: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                tracing::debug!("metrics socket accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}

/// Reads the request head (bounded, with a timeout) and writes the answer:
/// the exposition text for `GET /metrics` (or `GET /`), 404 otherwise.
fn answer(mut stream: UnixStream, render: &Render) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::with_capacity(256);
    let mut buf = [0u8; 512];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(buf.get(..n).unwrap_or_default());
        if head.len() > 8192 {
            break;
        }
    }
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let (status, body) = match (method, target) {
        (Some("GET"), Some("/metrics" | "/")) => ("200 OK", render()),
        _ => ("404 Not Found", "not found: try GET /metrics\n".to_string()),
    };
    let reply = format!(
        "HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(reply.as_bytes())?;
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(20));
        let (c, sum) = h.cumulative();
        assert_eq!(c[0], 1);
        assert_eq!(c[2], 2);
        assert_eq!(c[LATENCY_BUCKETS.len() - 1], 2);
        assert_eq!(*c.last().unwrap(), 3);
        assert!((sum - 20.0035).abs() < 1e-6);
    }

    #[test]
    fn exposition_text_is_well_formed() {
        let m = Metrics::default();
        Metrics::add(&m.fetch_requests, 3);
        m.fetch_latency.observe(Duration::from_millis(7));
        let text = render_prometheus(&m, &Gauges::default(), Some(&FetchStats::default()));
        for line in text.lines() {
            if line.starts_with('#') {
                assert!(
                    line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                    "{line}"
                );
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(name.starts_with("skiff_"), "{line}");
        }
        assert!(text.contains("skiff_fetch_requests_total 3\n"));
        assert!(text.contains("skiff_fetch_duration_seconds_bucket{le=\"0.01\"} 1\n"));
        assert!(text.contains("skiff_fetch_duration_seconds_count 1\n"));
    }

    #[test]
    fn socket_answers_get_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.sock");
        let server = MetricsServer::start(&path, Arc::new(|| "skiff_x 1\n".to_string())).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut s = UnixStream::connect(&path).unwrap();
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.0 200 OK\r\n"), "{reply}");
        assert!(reply.ends_with("\r\n\r\nskiff_x 1\n"), "{reply}");
        drop(server);
        assert!(!path.exists());
    }
}
