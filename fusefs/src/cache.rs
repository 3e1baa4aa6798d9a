//! The memory cache of decompressed, verified chunks, and single flight.
//!
//! [`MemoryCache`] is keyed by chunk digest, so identical chunks of two
//! files share one entry, and bounded by bytes (quick_cache, sharded, a
//! lock per shard held only for a lookup or an insert, never across a
//! fetch: there is no global lock on the read path).
//!
//! It is also how concurrent misses of one chunk do the work once. A miss
//! hands the thread a placeholder *guard* for the chunk (quick_cache's
//! `get_value_or_guard`): that thread now owns loading it ([`Owned`]), and
//! every other thread that wants it parks on the guard and receives the
//! value when the owner fills it. The value reaches those waiters even when
//! the cache does not keep it (a chunk larger than a shard, or a cache of
//! one byte when the memory cache is off), so single flight does not depend
//! on the cache's size. A waiter waits only until its own deadline
//! ([`MemoryCache::wait`]): a reader whose budget is spent gets an error,
//! not the tail of someone else's fetch. A guard dropped without a value
//! (the load failed) wakes one waiter, which then owns the load: an error is
//! never cached.

use std::sync::Arc;
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, GuardResult, PlaceholderGuard};
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};
use skiff_format::Digest;

/// Decompressed, verified chunk data, shared by the cache and readers.
pub type ChunkData = Arc<Vec<u8>>;

/// Weighs a cached chunk by its length (plus a little for the entry itself,
/// so that a cache of empty chunks is still bounded).
#[derive(Clone, Copy, Debug, Default)]
pub struct ByteWeighter;

impl Weighter<Digest, ChunkData> for ByteWeighter {
    fn weight(&self, _key: &Digest, val: &ChunkData) -> u64 {
        val.len() as u64 + 64
    }
}

/// Hands the buffers of evicted chunks to [`crate::buffers`] (those no
/// reader still holds), after the cache's lock is released.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Recycle;

impl Lifecycle<Digest, ChunkData> for Recycle {
    type RequestState = Vec<ChunkData>;

    fn begin_request(&self) -> Self::RequestState {
        Vec::new()
    }

    fn on_evict(&self, state: &mut Self::RequestState, _key: Digest, val: ChunkData) {
        state.push(val);
    }

    fn end_request(&self, state: Self::RequestState) {
        state.into_iter().for_each(crate::buffers::recycle);
    }
}

type Guard<'a> = PlaceholderGuard<'a, Digest, ChunkData, ByteWeighter, DefaultHashBuilder, Recycle>;

/// A chunk this thread has to produce (at position `pos` of the caller's
/// request list), and its guard in the memory cache (`None` when the cache
/// could not give one).
pub(crate) struct Owned<'a> {
    pub(crate) pos: usize,
    guard: Option<Guard<'a>>,
}

impl<'a> Owned<'a> {
    /// A chunk to load with no guard: nobody waits for it.
    pub(crate) fn unguarded(pos: usize) -> Owned<'a> {
        Owned { pos, guard: None }
    }

    /// Hands `data` to the cache and to every thread waiting for it.
    pub(crate) fn fill(self, data: &ChunkData) {
        if let Some(g) = self.guard {
            // A chunk larger than a cache shard is not kept; its waiters
            // still get it.
            let _ = g.insert(data.clone());
        }
    }
}

/// What a lookup found.
pub(crate) enum Lookup<'a> {
    /// The data.
    Hit(ChunkData),
    /// A miss: the caller owns the load now.
    Miss(Owned<'a>),
    /// Another thread is loading it (for [`MemoryCache::lookup`]), or the
    /// deadline passed while waiting for it (for [`MemoryCache::wait`]).
    Busy,
}

/// Byte-bounded memory cache of decompressed chunks; see the module
/// documentation.
pub struct MemoryCache {
    cache: Cache<Digest, ChunkData, ByteWeighter, DefaultHashBuilder, Recycle>,
}

impl MemoryCache {
    /// A cache holding at most `bytes` of chunk data (0: keeps nothing, but
    /// single flight still works).
    pub fn new(bytes: u64) -> MemoryCache {
        // quick_cache wants an estimate of the item count; 64 KiB is the
        // default average chunk size.
        let items = usize::try_from(bytes / 65536).unwrap_or(usize::MAX).max(16);
        // quick_cache admits new entries into a "cold" part of each shard
        // (3% by default) and promotes them when read again. Readahead and
        // fetch windows insert chunks that nobody has read yet; in a 3%
        // part they were evicted before their reader came (a cold 2 GiB read
        // fetched 1.6x the blob). Half the cache for new entries, and a
        // shard per 8 MiB, keep a window's chunks until they are read.
        let shards = usize::try_from(bytes >> 23)
            .unwrap_or(usize::MAX)
            .clamp(1, 16)
            .next_power_of_two();
        let cache = OptionsBuilder::new()
            .estimated_items_capacity(items)
            .weight_capacity(bytes.max(1))
            .hot_allocation(0.5)
            .shards(shards)
            .build()
            .map(|o| Cache::with_options(o, ByteWeighter, DefaultHashBuilder::default(), Recycle))
            .unwrap_or_else(|_| {
                Cache::with(
                    items,
                    bytes.max(1),
                    ByteWeighter,
                    DefaultHashBuilder::default(),
                    Recycle,
                )
            });
        MemoryCache { cache }
    }

    /// Bytes held (decompressed data plus per-entry overhead).
    pub fn weight(&self) -> u64 {
        self.cache.weight()
    }

    /// Chunks held.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Whether chunk `digest` is held.
    pub fn contains(&self, digest: &Digest) -> bool {
        self.cache.contains_key(digest)
    }

    /// The data of `digest` if held, without taking a guard.
    pub(crate) fn peek(&self, digest: &Digest) -> Option<ChunkData> {
        self.cache.get(digest)
    }

    /// Keeps `data` (verified) for `digest`, outside of any load.
    pub(crate) fn insert(&self, digest: Digest, data: ChunkData) {
        self.cache.insert(digest, data);
    }

    /// Looks `digest` up without waiting: a hit, a guard (the caller owns
    /// the load), or [`Lookup::Busy`] when another thread is loading it.
    pub(crate) fn lookup(&self, digest: &Digest, pos: usize) -> Lookup<'_> {
        self.wait_for(digest, pos, Some(Duration::ZERO))
    }

    /// Looks `digest` up, waiting for another thread's load until
    /// `deadline` (forever when `None`); [`Lookup::Busy`] when it passed.
    pub(crate) fn wait(
        &self,
        digest: &Digest,
        pos: usize,
        deadline: Option<Instant>,
    ) -> Lookup<'_> {
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        self.wait_for(digest, pos, timeout)
    }

    fn wait_for(&self, digest: &Digest, pos: usize, timeout: Option<Duration>) -> Lookup<'_> {
        match self.cache.get_value_or_guard(digest, timeout) {
            GuardResult::Value(v) => Lookup::Hit(v),
            GuardResult::Guard(g) => Lookup::Miss(Owned {
                pos,
                guard: Some(g),
            }),
            GuardResult::Timeout => Lookup::Busy,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waiters_get_the_value_even_when_it_is_not_kept() {
        // Memory cache off: nothing is kept, single flight still holds.
        let cache = MemoryCache::new(0);
        let d = Digest::of(b"x");
        let Lookup::Miss(owned) = cache.lookup(&d, 0) else {
            panic!("first lookup must own the load")
        };
        std::thread::scope(|s| {
            let waiter = s.spawn(|| match cache.wait(&d, 0, None) {
                Lookup::Hit(v) => v.len(),
                _ => usize::MAX,
            });
            // Busy for a lookup that does not wait.
            assert!(matches!(cache.lookup(&d, 0), Lookup::Busy));
            std::thread::sleep(Duration::from_millis(50));
            owned.fill(&Arc::new(vec![7u8; 1 << 20]));
            assert_eq!(waiter.join().unwrap_or(0), 1 << 20);
        });
        assert!(!cache.contains(&d));
    }

    #[test]
    fn a_waiter_respects_its_deadline() {
        let cache = MemoryCache::new(1 << 20);
        let d = Digest::of(b"y");
        let Lookup::Miss(_owned) = cache.lookup(&d, 0) else {
            panic!("first lookup must own the load")
        };
        let t = Instant::now();
        let got = cache.wait(&d, 0, Some(t + Duration::from_millis(100)));
        assert!(matches!(got, Lookup::Busy));
        assert!(t.elapsed() >= Duration::from_millis(100));
    }
}
