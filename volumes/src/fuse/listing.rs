//! Answering lookups from a directory listing instead of one round trip each.
//!
//! A program that stats or opens many files of one directory (a build, a
//! test suite, `stat` over a config tree) makes the kernel look each name up.
//! After [`PREFETCH_AFTER`] lookups in the same directory within the
//! cache lifetime, the directory is listed once with attributes and the
//! next lookups are answered from that listing while it is younger than
//! the lifetime ([`Lifetimes::entry`]), the same staleness the kernel's own
//! entry cache allows. A name missing from the listing is missing for as
//! long when negative entries are kept, else it is still asked for. Any
//! change made through the mount drops every listing, a change the agent
//! reports drops its directory's.
//!
//! With the cache on, listings are also fetched ahead of use: when one is
//! fetched on demand or first used, the listings of its subdirectories
//! (at most [`PREFETCH_MAX`]) are asked for at once, in one round trip, so
//! a walk (`find`, a resolver going through `node_modules`) waits about
//! once per level instead of once per directory. A listing asked for
//! before a change that drops listings is not kept ([`Listings::generation`]).
//! Pure: time comes in as an argument.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tpd_wire::files::{Attr, DirEntry};

use super::attr::Lifetimes;
use super::path::join;

/// Lookups in one directory, within the attribute lifetime, after which it
/// is listed instead.
pub const PREFETCH_AFTER: u32 = 3;

#[derive(Debug, PartialEq)]
pub enum Lookup {
    /// Known from a fresh listing: trust it for the remaining lifetime.
    Hit(Attr, Duration),
    /// Not in a fresh listing: missing for the remaining lifetime.
    Missing(Duration),
    /// Ask the agent about this name.
    Ask,
    /// List the directory first, then answer from the listing.
    Fetch,
}

/// Most subdirectories of one listing listed ahead of use.
pub const PREFETCH_MAX: usize = 256;

/// A directory's entries, when they were listed, and whether they were
/// listed ahead of use and not used yet.
#[derive(Debug)]
struct Listing {
    at: Instant,
    entries: Arc<Vec<DirEntry>>,
    attrs: HashMap<Vec<u8>, Attr>,
    unused: bool,
}

#[derive(Debug)]
pub struct Listings {
    lifetimes: Lifetimes,
    dirs: HashMap<Vec<u8>, Listing>,
    misses: HashMap<Vec<u8>, (Instant, u32)>,
    /// Listings asked for ahead of use and not answered yet.
    pending: HashSet<Vec<u8>>,
    /// One more at every change that drops listings.
    generation: u64,
}

impl Listings {
    pub fn new(lifetimes: Lifetimes) -> Self {
        Listings { lifetimes, dirs: HashMap::new(), misses: HashMap::new(), pending: HashSet::new(), generation: 0 }
    }

    /// To pass to [`Listings::store`] with a listing asked for now.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How long an answer asked for at `generation` may be kept: nothing
    /// when something changed meanwhile (it may predate the change).
    pub fn lifetime_since(&self, generation: u64) -> Duration {
        if generation == self.generation { self.lifetimes.entry } else { Duration::ZERO }
    }

    /// `dir`'s fresh entries, for a readdir; the first use of a listing
    /// fetched ahead is reported by [`Listings::first_use`].
    /// With the lifetime it has left.
    pub fn entries(&self, dir: &[u8], now: Instant) -> Option<(Arc<Vec<DirEntry>>, Duration)> {
        let l = self.dirs.get(dir)?;
        let left = self.lifetimes.entry.checked_sub(now.saturating_duration_since(l.at)).filter(|d| !d.is_zero())?;
        Some((l.entries.clone(), left))
    }

    /// The entries of `dir`'s listing if it was fetched ahead and this is
    /// its first use: its own subdirectories are then worth fetching.
    pub fn first_use(&mut self, dir: &[u8]) -> Option<Arc<Vec<DirEntry>>> {
        let l = self.dirs.get_mut(dir).filter(|l| l.unused)?;
        l.unused = false;
        Some(l.entries.clone())
    }

    /// The subdirectories of `dir` (with `entries`) to list ahead now:
    /// not fresh, not asked for already; marked as asked for.
    pub fn ahead(&mut self, dir: &[u8], entries: &[DirEntry], now: Instant) -> Vec<Vec<u8>> {
        if self.lifetimes.entry.is_zero() {
            return Vec::new();
        }
        let subdirs = entries.iter().filter(|e| e.attr.mode & 0o170000 == 0o040000);
        let paths: Vec<Vec<u8>> = subdirs.map(|e| join(dir, &e.name)).take(PREFETCH_MAX).collect();
        paths.into_iter().filter(|p| self.entries(p, now).is_none() && self.pending.insert(p.clone())).collect()
    }

    /// A listing fetched ahead failed: it may be asked for again.
    pub fn failed(&mut self, dir: &[u8]) {
        self.pending.remove(dir);
    }

    pub fn lookup(&mut self, dir: &[u8], name: &[u8], now: Instant) -> Lookup {
        let ttl = self.lifetimes.entry;
        if ttl.is_zero() {
            return Lookup::Ask;
        }
        if let Some(Listing { at, attrs, .. }) = self.dirs.get(dir) {
            let age = now.saturating_duration_since(*at);
            if age < ttl {
                return match (attrs.get(name), self.lifetimes.negative) {
                    (Some(a), _) => Lookup::Hit(*a, ttl - age),
                    (None, true) => Lookup::Missing(ttl - age),
                    (None, false) => Lookup::Ask,
                };
            }
            self.dirs.remove(dir);
        }
        let seen = self.misses.entry(dir.to_vec()).or_insert((now, 0));
        if now.saturating_duration_since(seen.0) >= ttl {
            *seen = (now, 0);
        }
        seen.1 += 1;
        if seen.1 >= PREFETCH_AFTER {
            self.misses.remove(dir);
            Lookup::Fetch
        } else {
            Lookup::Ask
        }
    }

    /// Keeps a listing asked for at `at` and `generation` (`ahead`: not
    /// for a program waiting on it), unless something changed since.
    pub fn store(&mut self, dir: Vec<u8>, entries: Arc<Vec<DirEntry>>, at: Instant, generation: u64, ahead: bool) {
        self.pending.remove(&dir);
        if generation != self.generation {
            return;
        }
        let attrs = entries.iter().map(|e| (e.name.clone(), e.attr)).collect();
        self.dirs.insert(dir, Listing { at, entries, attrs, unused: ahead });
    }

    /// Forgets every listing: something changed through the mount.
    pub fn clear(&mut self) {
        self.generation += 1;
        self.dirs.clear();
    }

    /// Forgets `dir`'s listing: the agent reported a change in it.
    pub fn forget(&mut self, dir: &[u8]) {
        self.generation += 1;
        self.dirs.remove(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(1);

    fn listings(negative: bool) -> Listings {
        Listings::new(Lifetimes { entry: TTL, negative })
    }

    fn entry(name: &str, size: u64) -> DirEntry {
        DirEntry { name: name.as_bytes().to_vec(), attr: Attr { size, ..Default::default() } }
    }

    #[test]
    fn lists_after_repeated_lookups_and_answers_while_fresh() {
        let mut l = listings(false);
        let t0 = Instant::now();
        assert_eq!(l.lookup(b"d", b"a", t0), Lookup::Ask);
        assert_eq!(l.lookup(b"d", b"b", t0), Lookup::Ask);
        assert_eq!(l.lookup(b"d", b"c", t0), Lookup::Fetch);
        l.store(b"d".to_vec(), Arc::new(vec![entry("a", 1), entry("c", 3)]), t0, 0, false);
        let later = t0 + Duration::from_millis(400);
        match l.lookup(b"d", b"c", later) {
            Lookup::Hit(a, ttl) => assert_eq!((a.size, ttl), (3, TTL - Duration::from_millis(400))),
            other => panic!("{other:?}"),
        }
        assert_eq!(l.lookup(b"d", b"new", later), Lookup::Ask, "a name not listed may be new");
        assert_eq!(l.lookup(b"d", b"a", t0 + TTL), Lookup::Ask, "stale listings are not used");
    }

    #[test]
    fn missing_names_are_missing_while_the_listing_is_fresh_and_until_a_change() {
        let mut l = listings(true);
        let t0 = Instant::now();
        l.store(b"d".to_vec(), Arc::new(vec![entry("a", 1)]), t0, 0, false);
        let later = t0 + Duration::from_millis(300);
        assert_eq!(l.lookup(b"d", b"index.json", later), Lookup::Missing(TTL - Duration::from_millis(300)));
        l.forget(b"d");
        assert_eq!(l.lookup(b"d", b"index.json", later), Lookup::Ask, "a reported change drops the listing");
    }

    #[test]
    fn nothing_is_kept_when_the_cache_is_off() {
        let mut l = Listings::new(Lifetimes { entry: Duration::ZERO, negative: false });
        let t0 = Instant::now();
        for _ in 0..5 {
            assert_eq!(l.lookup(b"d", b"a", t0), Lookup::Ask);
        }
    }

    #[test]
    fn scattered_lookups_and_changes_do_not_prefetch_or_serve() {
        let mut l = listings(false);
        let t0 = Instant::now();
        for i in 0..6u32 {
            assert_eq!(l.lookup(b"d", b"a", t0 + TTL * i), Lookup::Ask, "one lookup per lifetime never lists");
        }
        l.store(b"e".to_vec(), Arc::new(vec![entry("x", 1)]), t0, 0, false);
        l.clear();
        assert_eq!(l.lookup(b"e", b"x", t0), Lookup::Ask);
    }

    fn dir(name: &str) -> DirEntry {
        DirEntry { name: name.as_bytes().to_vec(), attr: Attr { mode: 0o040755, ..Default::default() } }
    }

    #[test]
    fn subdirectories_are_fetched_ahead_once_and_reported_at_first_use() {
        let mut l = listings(true);
        let t0 = Instant::now();
        let root = vec![dir("a"), entry("f", 1), dir("b")];
        assert_eq!(l.ahead(b"", &root, t0), [b"a".to_vec(), b"b".to_vec()]);
        assert!(l.ahead(b"", &root, t0).is_empty(), "asked for already");
        let a = Arc::new(vec![dir("x")]);
        l.store(b"a".to_vec(), a.clone(), t0, l.generation(), true);
        assert_eq!(l.first_use(b"a"), Some(a));
        assert_eq!(l.first_use(b"a"), None, "only the first use");
        assert_eq!(l.ahead(b"a", &[dir("x")], t0), [b"a/x".to_vec()]);
    }

    #[test]
    fn a_listing_asked_for_before_a_change_is_not_kept() {
        let mut l = listings(true);
        let t0 = Instant::now();
        let asked = l.generation();
        l.forget(b"d");
        l.store(b"d".to_vec(), Arc::new(vec![entry("a", 1)]), t0, asked, false);
        assert!(l.entries(b"d", t0).is_none());
        assert_eq!(l.lifetime_since(asked), Duration::ZERO);
        assert_eq!(l.lifetime_since(l.generation()), TTL);
    }
}
