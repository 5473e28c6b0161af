//! How long the mounts keep what they learnt, and how the agent's change
//! reports make them drop it (`--volume-cache`).
//!
//! With the cache on (the default), the kernel keeps names, attributes and
//! missing names (negative entries) for [`CACHE_TTL`](super::attr::CACHE_TTL), and a directory's
//! listing answers lookups in it as long. That is safe because the agent
//! watches every directory the mounts have looked into and reports each
//! change ([`tpd_wire::files::Response::Changed`]); the [`Invalidator`]
//! then drops the kernel's entry and attributes (FUSE's
//! `notify_inval_entry`/`notify_inval_inode`) and the listing, so a change
//! shows one trip from the agent after inotify saw it. `CACHE_TTL` only
//! bounds what inotify cannot see (another machine writing to a network
//! file system, directories past the agent's watch limit, a connection
//! that was re-established). With the cache off the kernel keeps nothing:
//! every lookup and stat asks the agent.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

use fuser::{INodeNo, Notifier};

use super::client::Change;
use super::heads::Heads;
use super::listing::Listings;
use super::lock;
use super::path::{join, split};

/// Finds the kernel's inode numbers of mount-relative paths.
pub trait InodeOf: Send + Sync {
    fn inode_of(&self, path: &[u8]) -> Option<u64>;
}

/// Drops what one mount keeps of a changed entry.
pub struct Invalidator {
    pub inodes: Arc<dyn InodeOf>,
    pub listings: Arc<Mutex<Listings>>,
    pub heads: Arc<Mutex<Heads>>,
}

impl Invalidator {
    /// Entry `name` of `dir` changed (`name` empty: `dir` itself). Blocks
    /// while the kernel holds the directory locked: run it on a thread of
    /// its own, never on FUSE's or the runtime's.
    pub fn changed(&self, notifier: &Notifier, dir: &[u8], name: &[u8]) {
        let (dir, name) = if name.is_empty() { split(dir) } else { (dir, name) };
        lock(&self.listings).forget(dir);
        lock(&self.heads).changed();
        let path = join(dir, name);
        lock(&self.listings).forget(&path);
        // Errors only say the kernel did not hold that entry or inode.
        if let Some(parent) = self.inodes.inode_of(dir) {
            let _ = notifier.inval_entry(INodeNo(parent), OsStr::from_bytes(name));
        }
        if let Some(ino) = self.inodes.inode_of(&path) {
            // Attributes only (offset -1): pages are not kept across opens.
            let _ = notifier.inval_inode(INodeNo(ino), -1, 0);
        }
    }
}

/// Applies the agent's change reports to the mounts (indexed by mount
/// number) until the client is gone. Runs on a thread of its own: a FUSE
/// invalidation waits for the kernel's lock on the directory, which a
/// lookup in flight holds until it is answered.
pub fn apply(changes: Receiver<Change>, mounts: &[(Invalidator, Notifier)]) {
    for (mount, dir, name) in changes {
        if let Some((invalidator, notifier)) = mounts.get(usize::from(mount)) {
            invalidator.changed(notifier, &dir, &name);
        }
    }
}
