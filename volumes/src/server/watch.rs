//! Changes to the directories a client has looked into, pushed to it as
//! [`Response::Changed`] so that its caches can keep names, attributes and
//! missing names long and still drop them when they change.
//!
//! Each connection has one inotify instance. Before a request that teaches
//! the client about a directory's entries is served (a stat, a listing, an
//! open, a create), that directory gets a watch, so a change made after the
//! answer was read from disk is always reported. inotify sees every change
//! made through this kernel: by the pod's own containers on a shared
//! volume, by this agent for the client. It does not see changes another
//! machine makes to a network file system (NFS, CephFS): those reach the
//! client when its cache lifetime ends. Watches go with the connection.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;
use tpd_wire::files::{PUSHED, Request, Response};

use super::MountTable;

/// Most directories one connection watches; later ones are served without
/// (their changes show when the client's cache lifetime ends).
const MAX_WATCHES: usize = 8192;
/// Watches count against the node's `fs.inotify.max_user_watches` for the
/// agent's uid, which it shares with every process of that uid on the node
/// (root's include the kubelet's and the container runtime's): the agent
/// takes at most this fraction of it, so it never starves them.
const SHARE_OF_NODE: usize = 8;
/// What a connection watches when the node's limit cannot be read.
const UNKNOWN_NODE_WATCHES: usize = 1024;

/// Most directories one connection watches on this node.
fn max_watches() -> usize {
    let node = std::fs::read_to_string("/proc/sys/fs/inotify/max_user_watches").ok();
    watches_for(node.and_then(|n| n.trim().parse().ok()))
}

fn watches_for(node_limit: Option<usize>) -> usize {
    node_limit.map_or(UNKNOWN_NODE_WATCHES, |n| n / SHARE_OF_NODE).min(MAX_WATCHES)
}

/// What a watch reports: entries made, removed, renamed, written or changed.
fn mask() -> WatchFlags {
    WatchFlags::CREATE
        | WatchFlags::DELETE
        | WatchFlags::MOVED_FROM
        | WatchFlags::MOVED_TO
        | WatchFlags::MODIFY
        | WatchFlags::ATTRIB
        | WatchFlags::CLOSE_WRITE
        | WatchFlags::DELETE_SELF
        | WatchFlags::MOVE_SELF
        | WatchFlags::ONLYDIR
}

#[derive(Debug, Default)]
struct Dirs {
    by_wd: HashMap<i32, (u16, Vec<u8>)>,
    watched: HashSet<(u16, Vec<u8>)>,
}

/// One connection's watches.
#[derive(Debug)]
pub struct Watcher {
    fd: AsyncFd<OwnedFd>,
    dirs: Mutex<Dirs>,
    /// [`max_watches`], read once per connection.
    max: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Watcher {
    pub fn new() -> std::io::Result<Arc<Watcher>> {
        let fd = inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK)?;
        // SAFETY: an OwnedFd is open and stays the same descriptor until
        // the AsyncFd, which owns it, is dropped.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)?;
        Ok(Arc::new(Watcher { fd, dirs: Mutex::default(), max: max_watches() }))
    }

    /// Watches the directories `req` teaches the client about, before it is served.
    pub fn before(&self, table: &MountTable, req: &Request) {
        match req {
            Request::ReadDir { mount, path, .. } => self.watch(table, *mount, path, false),
            Request::Stat { mount, path }
            | Request::Open { mount, path, .. }
            | Request::Create { mount, path, .. }
            | Request::Mkdir { mount, path, .. }
            | Request::Symlink { mount, path, .. } => self.watch(table, *mount, path, true),
            _ => {}
        }
    }

    /// Watches directory `path` of `mount` (with `parent`, the one holding it), once.
    fn watch(&self, table: &MountTable, mount: u16, path: &[u8], parent: bool) {
        let dir = match (parent, path.iter().rposition(|b| *b == b'/')) {
            (false, _) => path,
            (true, Some(slash)) => &path[..slash],
            (true, None) => &[][..],
        };
        let key = (mount, dir.to_vec());
        let mut dirs = lock(&self.dirs);
        if dirs.watched.contains(&key) || dirs.watched.len() >= self.max {
            return;
        }
        // Resolved confined, then watched through its descriptor.
        let Ok(fd) = super::ops::dir_of(table, mount, dir, false) else { return };
        match inotify::add_watch(self.fd.get_ref(), format!("/proc/self/fd/{}", fd.as_raw_fd()), mask()) {
            Ok(wd) => {
                dirs.by_wd.insert(wd, key.clone());
                dirs.watched.insert(key);
            }
            Err(e) => tracing::debug!(error = %e, "cannot watch a directory; its changes show when caches expire"),
        }
    }

    /// Sends a [`Response::Changed`] for each change seen, until aborted
    /// (with the connection) or `tx` closes.
    pub async fn run(self: Arc<Self>, tx: mpsc::Sender<(u64, Response)>) {
        let mut buf = vec![std::mem::MaybeUninit::uninit(); 64 << 10];
        loop {
            let Ok(mut guard) = self.fd.readable().await else { return };
            let changes = self.drain(&mut buf);
            guard.clear_ready();
            for (mount, dir, name) in changes {
                if tx.send((PUSHED, Response::Changed { mount, dir, name })).await.is_err() {
                    return;
                }
            }
        }
    }

    /// The changes read so far, each once.
    fn drain(&self, buf: &mut [std::mem::MaybeUninit<u8>]) -> Vec<(u16, Vec<u8>, Vec<u8>)> {
        let mut reader = inotify::Reader::new(self.fd.get_ref().as_fd(), buf);
        let mut seen = HashSet::new();
        let mut changes = Vec::new();
        let mut dirs = lock(&self.dirs);
        while let Ok(event) = reader.next() {
            let flags = event.events();
            if flags.contains(ReadFlags::QUEUE_OVERFLOW) {
                // Changes were lost: every directory may have changed.
                changes.extend(dirs.watched.iter().map(|(mount, dir)| (*mount, dir.clone(), Vec::new())));
                continue;
            }
            if flags.contains(ReadFlags::IGNORED) {
                if let Some(key) = dirs.by_wd.remove(&event.wd()) {
                    dirs.watched.remove(&key);
                }
                continue;
            }
            let Some((mount, dir)) = dirs.by_wd.get(&event.wd()) else { continue };
            let name = event.file_name().map(|n| n.to_bytes().to_vec()).unwrap_or_default();
            let change = (*mount, dir.clone(), name);
            if seen.insert(change.clone()) {
                changes.push(change);
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_takes_an_eighth_of_the_nodes_watches_at_most_8192() {
        assert_eq!(watches_for(Some(8192)), 1024, "the old default limit: most stays for the node");
        assert_eq!(watches_for(Some(1_048_576)), 8192);
        assert_eq!(watches_for(None), 1024);
    }
}
