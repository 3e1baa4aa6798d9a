//! Threads and budgets shared by the read path and the background work.
//!
//! - [`Pool`]: long-lived threads running queued jobs from a bounded queue.
//!   The daemon has three: the *read pool*, which takes FUSE reads that need
//!   the network off the FUSE workers (see [`crate::fs`]; a mount of local
//!   blobs has none), readahead and prefetch.
//! - [`run_parallel`]: runs the independent parts of one load (range
//!   requests, decodes) on a few scoped threads.
//! - [`ByteBudget`]: the bytes of chunk data a mount may hold in flight at
//!   once (fetched runs and the chunks decoded from them), shared by reads,
//!   readahead and prefetch. Every load takes its share before its first
//!   request and gives it back when its buffers are gone, so this, not the
//!   number of threads, bounds fetch memory.

use std::collections::VecDeque;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Instant;

/// Locks `m`, ignoring poison: every structure behind these locks is left
/// consistent by each critical section.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job for a [`Pool`].
pub(crate) type Job = Box<dyn FnOnce() + Send>;

/// A few threads running queued jobs; a full queue refuses new ones.
///
/// Memory: at most `queue` jobs wait, each a boxed closure (for a read: its
/// `ReplyData` and chunk records, well under a KiB).
pub(crate) struct Pool {
    tx: Mutex<Option<SyncSender<Job>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pool {
    /// `threads` threads named `name-N`, at most `queue` jobs waiting.
    pub(crate) fn new(name: &str, threads: usize, queue: usize) -> Pool {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::new();
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("{name}-{i}"))
                .spawn(move || loop {
                    let job = lock(&rx).recv();
                    match job {
                        Ok(job) => job(),
                        Err(_) => break,
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => tracing::warn!("cannot start a {name} thread: {e}"),
            }
        }
        Pool {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(handles),
        }
    }

    /// Queues `job`; gives it back if the queue is full or the pool stopped.
    pub(crate) fn try_submit(&self, job: Job) -> Result<(), Job> {
        match lock(&self.tx).as_ref() {
            Some(tx) => tx.try_send(job).map_err(|e| match e {
                mpsc::TrySendError::Full(j) | mpsc::TrySendError::Disconnected(j) => j,
            }),
            None => Err(job),
        }
    }

    /// Runs what is queued and stops the threads.
    pub(crate) fn shutdown(&self) {
        drop(lock(&self.tx).take());
        for h in lock(&self.threads).drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Applies `f` to every task on at most `threads` scoped threads (inline
/// when there is one task or one thread), returning the results in task
/// order; `None` only where `f` panicked.
///
/// Starting the threads costs about what decoding 100 KiB does
/// (`benches/load.rs`, 2 CPUs, 38 KiB chunks: 2 chunks 191-199 us on
/// two threads against 109-119 us inline, 4 chunks 251-258 against
/// 227-229, 27 chunks 947-1,140 against 1,484-1,563), yet neither way of
/// saving it changed a workload (alternated runs, caches dropped): loads
/// of under 64 KiB of decoding per thread done inline left `import numpy,
/// pandas` (median 0.96 s, daemon CPU 0.38 s) and 20,000 small files read
/// in random order (3.1-3.6 s) as they were; the caller working as one of
/// the threads cut the daemon's CPU (import 0.38 -> 0.33 s) but made the
/// random small-file reads slower (3.42-3.64 s against 3.13-3.29 s, 3
/// runs each).
pub(crate) fn run_parallel<T: Send, R: Send>(
    tasks: Vec<T>,
    threads: usize,
    f: impl Fn(T) -> R + Sync,
) -> Vec<Option<R>> {
    let n = tasks.len();
    if n <= 1 || threads <= 1 {
        return tasks.into_iter().map(|t| Some(f(t))).collect();
    }
    let queue: Mutex<VecDeque<(usize, T)>> = Mutex::new(tasks.into_iter().enumerate().collect());
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads.min(n) {
            s.spawn(|| loop {
                let next = lock(&queue).pop_front();
                let Some((i, t)) = next else { break };
                let r = f(t);
                if let Some(slot) = lock(&results).get_mut(i) {
                    *slot = Some(r);
                }
            });
        }
    });
    results.into_inner().unwrap_or_else(|p| p.into_inner())
}

/// Bytes of chunk data in flight, bounded; see the module documentation.
#[derive(Debug)]
pub struct ByteBudget {
    total: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

/// A share of a [`ByteBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct Permit<'a> {
    budget: &'a ByteBudget,
    bytes: u64,
}

impl ByteBudget {
    /// A budget of `total` bytes (at least 1).
    pub fn new(total: u64) -> ByteBudget {
        ByteBudget {
            total: total.max(1),
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Bytes in use now.
    pub fn in_use(&self) -> u64 {
        *lock(&self.used)
    }

    /// Takes `bytes` (at most the whole budget: a load larger than it runs
    /// alone), waiting for others to give theirs back until `deadline`
    /// (forever when `None`); `None` if the deadline passed first.
    pub(crate) fn acquire(&self, bytes: u64, deadline: Option<Instant>) -> Option<Permit<'_>> {
        let want = bytes.clamp(1, self.total);
        let mut used = lock(&self.used);
        while *used + want > self.total {
            used = match deadline {
                None => self.freed.wait(used).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    self.freed
                        .wait_timeout(used, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
            };
        }
        *used += want;
        Some(Permit {
            budget: self,
            bytes: want,
        })
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut used = lock(&self.budget.used);
        *used = used.saturating_sub(self.bytes);
        drop(used);
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn budget_bounds_and_times_out() {
        let b = ByteBudget::new(100);
        let a = b.acquire(60, None);
        assert!(a.is_some());
        let t = Instant::now();
        assert!(b.acquire(60, Some(t + Duration::from_millis(50))).is_none());
        // Larger than the whole budget: clamped, runs alone once free.
        drop(a);
        let big = b.acquire(1000, Some(Instant::now() + Duration::from_secs(1)));
        assert_eq!(b.in_use(), 100);
        drop(big);
        assert_eq!(b.in_use(), 0);
    }
}
