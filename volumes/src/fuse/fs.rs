//! One FUSE filesystem per remote volume, answering the kernel from the
//! agent's file service.
//!
//! The kernel's requests are never answered on fuser's thread: each becomes
//! a task that sends a protocol request and replies when the answer comes,
//! so one reader thread keeps many requests in flight (readahead, parallel
//! lookups, several processes) over the one connection.
//!
//! Inode numbers are ours: each mount-relative path seen gets one for the
//! session (the agent's inode numbers would not be unique across mounts and
//! cannot be turned back into paths). The table only grows with the paths a
//! session touches; renames move the numbers with the files.
//!
//! Caching: names, attributes and (with the cache on) missing names are
//! kept by the kernel for the mount's [`Lifetimes`], until the agent reports
//! a change (see `cache`); file data is not kept across opens (no FOPEN_KEEP_CACHE), so
//! reopening a file shows the pod's latest content, and within an open the
//! kernel drops cached pages when it sees the size or mtime change
//! (FUSE_AUTO_INVAL_DATA). A small file's content comes with its open and
//! answers its reads for at most `heads::HEAD_TTL`, and not at
//! all with the cache off. Writes are
//! answered once sent and any other request waits until they are done (see
//! `writes`). Closing a file opened read-only costs no round trip: its open
//! says FOPEN_NOFLUSH, and a release is answered at once, its request
//! queued first so that the agent closes the file before serving anything
//! later; closing a file opened for writing waits for its writes, so
//! `close` reports their errors.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use fuser::{
    Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry,
    ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};
use tokio::runtime::Handle;
use tpd_wire::files::{self, DirEntry, Request as Req, Response, SetAttr};

use super::attr::Lifetimes;
use super::attr::{file_attr, kind, timeset};
use super::cache::{InodeOf, Invalidator};
use super::client::FileClient;
use super::heads::Heads;
use super::listing::{Listings, Lookup};
use super::lock;
use super::path::join;
use super::writes::{self, WriteBehind};

const ROOT: u64 = 1;
const EIO: i32 = 5;
const ENOENT: i32 = 2;

/// Mount-relative paths by inode number, and back.
#[derive(Debug)]
struct Inodes {
    paths: HashMap<u64, Vec<u8>>,
    inos: HashMap<Vec<u8>, u64>,
    next: u64,
}

impl Inodes {
    fn new() -> Self {
        Inodes { paths: HashMap::from([(ROOT, Vec::new())]), inos: HashMap::from([(Vec::new(), ROOT)]), next: ROOT + 1 }
    }

    fn ino(&mut self, path: &[u8]) -> u64 {
        if let Some(i) = self.inos.get(path) {
            return *i;
        }
        let i = self.next;
        self.next += 1;
        self.paths.insert(i, path.to_vec());
        self.inos.insert(path.to_vec(), i);
        i
    }

    /// Moves `from` and everything below it to `to`.
    fn rename(&mut self, from: &[u8], to: &[u8]) {
        let below = |p: &[u8], root: &[u8]| p == root || (p.starts_with(root) && p.get(root.len()) == Some(&b'/'));
        let stale: Vec<Vec<u8>> = self.inos.keys().filter(|p| below(p, to)).cloned().collect();
        for p in stale {
            if let Some(i) = self.inos.remove(&p) {
                self.paths.remove(&i);
            }
        }
        let moved: Vec<Vec<u8>> = self.inos.keys().filter(|p| below(p, from)).cloned().collect();
        for old in moved {
            let mut new = to.to_vec();
            new.extend_from_slice(&old[from.len()..]);
            if let Some(i) = self.inos.remove(&old) {
                self.paths.insert(i, new.clone());
                self.inos.insert(new, i);
            }
        }
    }
}

impl InodeOf for Mutex<Inodes> {
    fn inode_of(&self, path: &[u8]) -> Option<u64> {
        lock(self).inos.get(path).copied()
    }
}

/// The FUSE side of one remote volume.
#[derive(Debug)]
pub struct VolumeFs {
    mount: u16,
    client: FileClient,
    rt: Handle,
    inodes: Arc<Mutex<Inodes>>,
    /// Directory listings fetched at the first readdir of an opendir.
    dirs: Arc<Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>>,
    /// Recent listings that answer lookups (see `listing`).
    listings: Arc<Mutex<Listings>>,
    /// Small files' content that came with their open; shared by every
    /// mount of the connection, since two may show one volume (subPaths).
    heads: Arc<Mutex<Heads>>,
    writes: Arc<WriteBehind>,
    next_dir: AtomicU64,
    lifetimes: Lifetimes,
}

impl VolumeFs {
    pub fn new(mount: u16, client: FileClient, heads: Arc<Mutex<Heads>>, rt: Handle, lifetimes: Lifetimes) -> Self {
        VolumeFs {
            lifetimes,
            mount,
            client,
            rt,
            inodes: Arc::new(Mutex::new(Inodes::new())),
            dirs: Arc::new(Mutex::new(HashMap::new())),
            listings: Arc::new(Mutex::new(Listings::new(lifetimes))),
            heads,
            writes: Arc::default(),
            next_dir: AtomicU64::new(1),
        }
    }

    /// What drops this mount's cached entries when the agent reports a change.
    pub fn invalidator(&self) -> Invalidator {
        Invalidator { inodes: self.inodes.clone(), listings: self.listings.clone(), heads: self.heads.clone() }
    }

    fn path(&self, ino: INodeNo) -> Result<Vec<u8>, Errno> {
        lock(&self.inodes).paths.get(&ino.0).cloned().ok_or(Errno::ESTALE)
    }

    fn child(&self, parent: INodeNo, name: &OsStr) -> Result<Vec<u8>, Errno> {
        Ok(join(&self.path(parent)?, name.as_bytes()))
    }

    /// Runs `f` on the runtime with the client once the writes answered so
    /// far are done; replies happen inside it.
    fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(FileClient, Arc<Mutex<Inodes>>) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let (writes, run) = (self.writes.clone(), f(self.client.clone(), self.inodes.clone()));
        self.rt.spawn(async move {
            writes.settled().await;
            run.await;
        });
    }

    /// Asks for something whose answer is an entry (lookup, mkdir, symlink).
    fn entry(&self, path: Vec<u8>, req: Req, reply: ReplyEntry) {
        let (lifetimes, listings) = (self.lifetimes, self.listings.clone());
        let generation = lock(&listings).generation();
        self.spawn(move |c, inodes| async move {
            let answer = c.call(req).await;
            // An answer that may predate a change reported meanwhile is not kept.
            let lifetimes = Lifetimes { entry: lock(&listings).lifetime_since(generation), ..lifetimes };
            answer_entry(answer, &path, &inodes, lifetimes, reply)
        });
    }

    /// A lookup or readdir was answered from `dir`'s listing: if that
    /// listing was fetched ahead, its subdirectories are fetched ahead now.
    fn used(&self, dir: &[u8]) {
        // Bound first: `prefetch` locks the listings again.
        let first = lock(&self.listings).first_use(dir);
        if let Some(entries) = first {
            prefetch(&self.client, &self.listings, &self.rt, self.mount, dir, &entries);
        }
    }

    /// Something is about to change through this mount: listings and kept
    /// content go stale.
    fn changing(&self) {
        lock(&self.listings).clear();
        lock(&self.heads).changed();
    }

    /// Sends a request that changes file content, and marks kept content
    /// stale again once it is done (see `heads`).
    fn changing_content<F>(&self, req: Req, answer: F)
    where
        F: FnOnce(Response, &Mutex<Inodes>) + Send + 'static,
    {
        self.changing();
        let heads = self.heads.clone();
        self.spawn(move |c, inodes| async move {
            let resp = c.call(req).await;
            lock(&heads).changed();
            answer(resp, &inodes);
        });
    }

    fn empty(&self, req: Req, reply: ReplyEmpty) {
        self.spawn(move |c, _| async move {
            match c.call(req).await {
                Response::Ok => reply.ok(),
                other => reply.error(errno(other)),
            }
        });
    }
}

/// Answers a lookup (or mkdir, symlink) of `path` with the agent's
/// `answer`; a missing name is kept as a negative entry when the lifetimes
/// say so (only a lookup can be answered ENOENT).
fn answer_entry(answer: Response, path: &[u8], inodes: &Mutex<Inodes>, lifetimes: Lifetimes, reply: ReplyEntry) {
    match answer {
        Response::Attr(a) => {
            let ino = lock(inodes).ino(path);
            reply.entry(&lifetimes.entry, &file_attr(ino, &a), Generation(0));
        }
        Response::Error(ENOENT) if lifetimes.negative => missing(&lifetimes.entry, reply),
        other => reply.error(errno(other)),
    }
}

/// A negative entry: the kernel answers ENOENT for the name for `ttl`
/// (inode number 0 is FUSE's "no such entry, but cache that").
fn missing(ttl: &std::time::Duration, reply: ReplyEntry) {
    reply.entry(ttl, &file_attr(0, &files::Attr::default()), Generation(0));
}

/// The errno for an unexpected answer.
fn errno(resp: Response) -> Errno {
    Errno::from_i32(raw_errno(resp))
}

fn raw_errno(resp: Response) -> i32 {
    match resp {
        Response::Error(e) => e,
        _ => EIO,
    }
}

/// What an open answers: a file opened for writing must hear of its close
/// (FUSE's flush), which reports the errors of its deferred writes.
fn open_flags(flags: OpenFlags) -> FopenFlags {
    if flags.0 & libc::O_ACCMODE == libc::O_RDONLY { FopenFlags::FOPEN_NOFLUSH } else { FopenFlags::empty() }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Large requests and a readahead window as large as one request keep
        // sequential IO at wire speed; failures only mean the kernel's limits.
        let _ = config.set_max_write(files::MAX_IO).or_else(|max| config.set_max_write(max));
        let _ = config.set_max_readahead(files::MAX_IO).or_else(|max| config.set_max_readahead(max));
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        for cap in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_AUTO_INVAL_DATA,
            InitFlags::FUSE_ASYNC_DIO,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let dir = match self.path(parent) {
            Ok(d) => d,
            Err(e) => return reply.error(e),
        };
        let path = join(&dir, name.as_bytes());
        let mount = self.mount;
        // Bound first: the guard must not live through the arms, which lock again.
        let found = lock(&self.listings).lookup(&dir, name.as_bytes(), Instant::now());
        match found {
            Lookup::Hit(attr, ttl) => {
                let ino = lock(&self.inodes).ino(&path);
                reply.entry(&ttl, &file_attr(ino, &attr), Generation(0));
                self.used(&dir);
            }
            Lookup::Missing(ttl) => {
                missing(&ttl, reply);
                self.used(&dir);
            }
            Lookup::Ask => self.entry(path.clone(), Req::Stat { mount, path }, reply),
            Lookup::Fetch => {
                let (listings, name, lifetimes) = (self.listings.clone(), name.as_bytes().to_vec(), self.lifetimes);
                self.spawn(move |c, inodes| async move {
                    let (at, generation) = (Instant::now(), lock(&listings).generation());
                    let (found, listed) = match c.list(mount, dir.clone()).await {
                        Ok(entries) => {
                            let found = entries.iter().find(|e| e.name == name).map(|e| e.attr);
                            let entries = Arc::new(entries);
                            lock(&listings).store(dir.clone(), entries.clone(), at, generation, false);
                            prefetch(&c, &listings, &Handle::current(), mount, &dir, &entries);
                            (found, true)
                        }
                        Err(_) => (None, false),
                    };
                    let lifetimes = Lifetimes { entry: lock(&listings).lifetime_since(generation), ..lifetimes };
                    let answer = match (found, listed) {
                        (Some(a), _) => Response::Attr(a),
                        // Listed just now without it: missing.
                        (None, true) => Response::Error(ENOENT),
                        (None, false) => c.call(Req::Stat { mount, path: path.clone() }).await,
                    };
                    answer_entry(answer, &path, &inodes, lifetimes, reply);
                });
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let path = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let (mount, ttl) = (self.mount, self.lifetimes.entry);
        self.spawn(move |c, _| async move {
            match c.call(Req::Stat { mount, path }).await {
                Response::Attr(a) => reply.attr(&ttl, &file_attr(ino.0, &a)),
                other => reply.error(errno(other)),
            }
        });
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.changing();
        let path = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let set = SetAttr { mode, uid, gid, size, atime: atime.map(timeset), mtime: mtime.map(timeset) };
        let req = Req::SetAttr { mount: self.mount, path, handle: fh.map(|h| h.0), set };
        let ttl = self.lifetimes.entry;
        self.changing_content(req, move |resp, _| match resp {
            Response::Attr(a) => reply.attr(&ttl, &file_attr(ino.0, &a)),
            other => reply.error(errno(other)),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let path = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let mount = self.mount;
        self.spawn(move |c, _| async move {
            match c.call(Req::Readlink { mount, path }).await {
                Response::Link(t) => reply.data(&t),
                other => reply.error(errno(other)),
            }
        });
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, mode: u32, umask: u32, reply: ReplyEntry) {
        self.changing();
        match self.child(parent, name) {
            Ok(path) => {
                let req = Req::Mkdir { mount: self.mount, path: path.clone(), mode: mode & !umask };
                self.entry(path, req, reply);
            }
            Err(e) => reply.error(e),
        }
    }

    fn symlink(&self, _req: &Request, parent: INodeNo, link_name: &OsStr, target: &Path, reply: ReplyEntry) {
        self.changing();
        match self.child(parent, link_name) {
            Ok(path) => {
                let target = target.as_os_str().as_bytes().to_vec();
                let req = Req::Symlink { mount: self.mount, path: path.clone(), target };
                self.entry(path, req, reply);
            }
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.changing();
        match self.child(parent, name) {
            Ok(path) => self.empty(Req::Unlink { mount: self.mount, path }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.changing();
        match self.child(parent, name) {
            Ok(path) => self.empty(Req::Rmdir { mount: self.mount, path }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.changing();
        let (from, to) = match (self.child(parent, name), self.child(newparent, newname)) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => return reply.error(e),
        };
        let req = Req::Rename { mount: self.mount, from: from.clone(), to: to.clone(), flags: flags.bits() };
        self.spawn(move |c, inodes| async move {
            match c.call(req).await {
                Response::Ok => {
                    lock(&inodes).rename(&from, &to);
                    reply.ok();
                }
                other => reply.error(errno(other)),
            }
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let path = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let req = Req::Open { mount: self.mount, path, flags: flags.0 as u32 };
        if flags.0 & libc::O_TRUNC != 0 {
            return self.changing_content(req, move |resp, _| match resp {
                Response::Opened { handle, .. } => reply.opened(FileHandle(handle), open_flags(flags)),
                other => reply.error(errno(other)),
            });
        }
        // With the cache off, reads go to the agent however recent the open.
        let heads = (!self.lifetimes.entry.is_zero()).then(|| self.heads.clone());
        let (generation, sent) = (lock(&self.heads).generation(), Instant::now());
        self.spawn(move |c, _| async move {
            match c.call(req).await {
                Response::Opened { handle, data, .. } => {
                    if let (Some(data), Some(heads)) = (data, heads) {
                        lock(&heads).store(handle, generation, sent, data);
                    }
                    reply.opened(FileHandle(handle), open_flags(flags));
                }
                other => reply.error(errno(other)),
            }
        });
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let path = match self.child(parent, name) {
            Ok(p) => p,
            Err(e) => return reply.error(e),
        };
        let req = Req::Create { mount: self.mount, path: path.clone(), mode: mode & !umask, flags: flags as u32 };
        let ttl = self.lifetimes.entry;
        self.changing_content(req, move |resp, inodes| match resp {
            Response::Opened { handle, attr, .. } => {
                let ino = lock(inodes).ino(&path);
                let fa = file_attr(ino, &attr);
                reply.created(&ttl, &fa, Generation(0), FileHandle(handle), FopenFlags::empty());
            }
            other => reply.error(errno(other)),
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(data) = lock(&self.heads).read(fh.0, offset, size, Instant::now()) {
            return reply.data(&data);
        }
        self.spawn(move |c, _| async move {
            match c.call(Req::Read { handle: fh.0, offset, size }).await {
                Response::Data(d) => reply.data(&d),
                other => reply.error(errno(other)),
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let req = Req::Write { handle: fh.0, offset, data: Bytes::copy_from_slice(data) };
        if !writes::deferrable(flags.0) {
            return self.changing_content(req, move |resp, _| match resp {
                Response::Written(n) => reply.written(n),
                other => reply.error(errno(other)),
            });
        }
        self.changing();
        let (client, heads, writes, len) = (self.client.clone(), self.heads.clone(), self.writes.clone(), data.len());
        self.rt.spawn(async move {
            let in_flight = writes.begin(ino.0, offset, len).await;
            if let Some(e) = writes.error(fh.0) {
                return reply.error(Errno::from_i32(e));
            }
            let answer = client.send(req);
            reply.written(u32::try_from(len).unwrap_or(u32::MAX));
            let resp = answer.await;
            lock(&heads).changed();
            if !matches!(resp, Response::Written(_)) {
                let e = raw_errno(resp);
                tracing::debug!(handle = fh.0, errno = e, "deferred write failed");
                writes.failed(fh.0, e);
            }
            drop(in_flight);
        });
    }

    /// Every close of a file opened for writing: reports what its deferred
    /// writes failed with, once they are done.
    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let writes = self.writes.clone();
        self.spawn(move |_, _| async move {
            match writes.error(fh.0) {
                Some(e) => reply.error(Errno::from_i32(e)),
                None => reply.ok(),
            }
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        // Nothing can fail that the closing process could act on: the agent
        // only closes its descriptor, so nobody waits for that. The request
        // is queued before the answer, so it reaches the agent ahead of
        // anything the program does next, and the agent closes before
        // serving that: a file removed after its close frees its space at
        // once. The handle's answered writes are queued before it already.
        lock(&self.heads).release(fh.0);
        let released = self.client.send(Req::Release { handle: fh.0 });
        reply.ok();
        let writes = self.writes.clone();
        self.rt.spawn(async move {
            if let Response::Error(e) = released.await {
                tracing::debug!(handle = fh.0, errno = e, "release failed");
            }
            // Its writes may still be recording their errors.
            writes.settled().await;
            writes.forget(fh.0);
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let writes = self.writes.clone();
        self.spawn(move |c, _| async move {
            let answer = match writes.error(fh.0) {
                Some(e) => Response::Error(e),
                None => c.call(Req::Fsync { handle: fh.0 }).await,
            };
            match answer {
                Response::Ok => reply.ok(),
                other => reply.error(errno(other)),
            }
        });
    }

    fn opendir(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(self.next_dir.fetch_add(1, Ordering::Relaxed)), FopenFlags::empty());
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        self.with_listing(ino, fh, offset, move |listing, inodes, dir, _| {
            let entries = match listing {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                let ino = lock(inodes).ino(&join(dir, &e.name));
                if reply.add(INodeNo(ino), i as u64 + 1, kind(e.attr.mode), OsStr::from_bytes(&e.name)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    /// Entries with their attributes, so `ls -l` and `find` need no lookup
    /// per file while the entries are cached.
    fn readdirplus(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        self.with_listing(ino, fh, offset, move |listing, inodes, dir, ttl| {
            let entries = match listing {
                Ok(l) => l,
                Err(e) => return reply.error(e),
            };
            for (i, e) in entries.iter().enumerate().skip(offset as usize) {
                let ino = lock(inodes).ino(&join(dir, &e.name));
                let attr = file_attr(ino, &e.attr);
                if reply.add(INodeNo(ino), i as u64 + 1, OsStr::from_bytes(&e.name), &ttl, &attr, Generation(0)) {
                    break;
                }
            }
            reply.ok();
        });
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        lock(&self.dirs).remove(&fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let mount = self.mount;
        self.spawn(move |c, _| async move {
            match c.call(Req::Statfs { mount }).await {
                Response::Statfs(s) => {
                    reply.statfs(s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize)
                }
                other => reply.error(errno(other)),
            }
        });
    }
}

impl VolumeFs {
    /// Hands `fill` the listing of this opendir and how long the kernel may
    /// keep its entries: at offset 0 a fresh listing kept or fetched ahead
    /// (the cache on), else fetched whole (with attributes, one round trip
    /// per page); kept for the following offsets until releasedir.
    fn with_listing<F>(&self, ino: INodeNo, fh: FileHandle, offset: u64, fill: F)
    where
        F: FnOnce(Result<Arc<Vec<DirEntry>>, Errno>, &Mutex<Inodes>, &[u8], Duration) + Send + 'static,
    {
        let dir = match self.path(ino) {
            Ok(p) => p,
            Err(e) => return fill(Err(e), &self.inodes, &[], Duration::ZERO),
        };
        let now = Instant::now();
        let cached = match offset {
            0 => lock(&self.listings).entries(&dir, now),
            _ => lock(&self.dirs).get(&fh.0).cloned().map(|l| (l, self.lifetimes.entry)),
        };
        // Listings we hold are answered on this thread.
        if let Some((listing, ttl)) = cached {
            lock(&self.dirs).insert(fh.0, listing.clone());
            self.used(&dir);
            return fill(Ok(listing), &self.inodes, &dir, ttl);
        }
        let (mount, dirs, listings) = (self.mount, self.dirs.clone(), self.listings.clone());
        self.spawn(move |c, inodes| async move {
            let (at, generation) = (Instant::now(), lock(&listings).generation());
            let listing = c.list(mount, dir.clone()).await.map(Arc::new).map_err(Errno::from_i32);
            if let Ok(l) = &listing {
                lock(&listings).store(dir.clone(), l.clone(), at, generation, false);
                lock(&dirs).insert(fh.0, l.clone());
                prefetch(&c, &listings, &Handle::current(), mount, &dir, l);
            }
            let ttl = lock(&listings).lifetime_since(generation);
            fill(listing, &inodes, &dir, ttl);
        });
    }
}

/// Lists the subdirectories of `dir` (with `entries`) ahead of use, all at
/// once, when the cache is on (see `listing`).
fn prefetch(
    client: &FileClient,
    listings: &Arc<Mutex<Listings>>,
    rt: &Handle,
    mount: u16,
    dir: &[u8],
    entries: &[DirEntry],
) {
    let now = Instant::now();
    let (paths, generation) = {
        let mut l = lock(listings);
        (l.ahead(dir, entries, now), l.generation())
    };
    for path in paths {
        let (client, listings) = (client.clone(), listings.clone());
        rt.spawn(async move {
            match client.list(mount, path.clone()).await {
                Ok(entries) => lock(&listings).store(path, Arc::new(entries), now, generation, true),
                Err(_) => lock(&listings).failed(&path),
            }
        });
    }
}
