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
//! reports drops its directory's. Pure: time comes in as an argument.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tpd_wire::files::{Attr, DirEntry};

use super::cache::Lifetimes;

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

/// When a directory was listed, and its entries' attributes by name.
type Listing = (Instant, HashMap<Vec<u8>, Attr>);

#[derive(Debug)]
pub struct Listings {
    lifetimes: Lifetimes,
    dirs: HashMap<Vec<u8>, Listing>,
    misses: HashMap<Vec<u8>, (Instant, u32)>,
}

impl Listings {
    pub fn new(lifetimes: Lifetimes) -> Self {
        Listings { lifetimes, dirs: HashMap::new(), misses: HashMap::new() }
    }

    pub fn lookup(&mut self, dir: &[u8], name: &[u8], now: Instant) -> Lookup {
        let ttl = self.lifetimes.entry;
        if ttl.is_zero() {
            return Lookup::Ask;
        }
        if let Some((at, attrs)) = self.dirs.get(dir) {
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

    /// Keeps a listing fetched at `at`.
    pub fn store(&mut self, dir: Vec<u8>, entries: &[DirEntry], at: Instant) {
        let attrs = entries.iter().map(|e| (e.name.clone(), e.attr)).collect();
        self.dirs.insert(dir, (at, attrs));
    }

    /// Forgets every listing: something changed through the mount.
    pub fn clear(&mut self) {
        self.dirs.clear();
    }

    /// Forgets `dir`'s listing: the agent reported a change in it.
    pub fn forget(&mut self, dir: &[u8]) {
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
        l.store(b"d".to_vec(), &[entry("a", 1), entry("c", 3)], t0);
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
        l.store(b"d".to_vec(), &[entry("a", 1)], t0);
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
        l.store(b"e".to_vec(), &[entry("x", 1)], t0);
        l.clear();
        assert_eq!(l.lookup(b"e", b"x", t0), Lookup::Ask);
    }
}
