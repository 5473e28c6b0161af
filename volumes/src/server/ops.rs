//! The file operations behind each request, confined to the served mounts.
//!
//! Confinement does not rely on checking path strings against a prefix: every
//! request's path is split by [`files::components`] (no `.`, `..`, empty or
//! NUL), then walked one directory at a time with `openat(O_NOFOLLOW |
//! O_DIRECTORY)` from a descriptor of the mount's root, and the last component
//! is used with `*at` calls that do not follow symlinks. A symlink anywhere in
//! the path therefore fails instead of leading out of the mount, even if the
//! pod swaps a directory for a symlink while we work. Symlinks themselves are
//! only shown (readlink) or made when they stay inside their mount.
//!
//! These functions block on the filesystem; the connection loop runs them on
//! tokio's blocking pool, except the one-syscall ones (stat, readlink,
//! release) that it answers in place.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use rustix::fs::{AtFlags, Mode, OFlags, RenameFlags, Stat, Timespec as RTimespec, Timestamps};
use rustix::io::Errno;
use tpd_wire::files::{
    self, Attr, DirEntry, MAX_DIR_PAGE, MAX_IO, Request, Response, SetAttr, StatFs, TimeSet, Timespec,
};

use super::MountTable;

type OpResult = Result<Response, Errno>;

/// Files a connection has open, by the handle the client was given.
#[derive(Debug, Default)]
pub struct Handles {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Arc<File>>>,
}

impl Handles {
    fn insert(&self, file: File) -> u64 {
        let h = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.lock().insert(h, Arc::new(file));
        h
    }
    fn get(&self, h: u64) -> Result<Arc<File>, Errno> {
        self.lock().get(&h).cloned().ok_or(Errno::BADF)
    }
    fn remove(&self, h: u64) -> Result<(), Errno> {
        self.lock().remove(&h).map(drop).ok_or(Errno::BADF)
    }
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<File>>> {
        // A panic while holding the lock cannot leave the map half-changed.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Answers one request (never `Hello`, which the connection handles).
pub fn handle(table: &MountTable, handles: &Handles, req: Request) -> Response {
    dispatch(table, handles, req).unwrap_or_else(|e| Response::Error(e.raw_os_error()))
}

fn dispatch(table: &MountTable, handles: &Handles, req: Request) -> OpResult {
    use Request::*;
    match req {
        Hello { .. } => Err(Errno::PROTO),
        Stat { mount, path } => {
            let t = Target::resolve(table, mount, &path)?;
            Ok(Response::Attr(t.stat()?))
        }
        ReadDir { mount, path, cursor } => read_dir(&Target::resolve(table, mount, &path)?, cursor),
        Open { mount, path, flags } => {
            let t = Target::resolve(table, mount, &path)?;
            let flags = open_flags(flags, false);
            if writes(flags) {
                t.writable()?;
            }
            let file = File::from(t.open(flags, Mode::empty())?);
            let attr = attr(&rustix::fs::fstat(&file)?);
            let data = if writes(flags) { None } else { whole_if_small(&file, &attr)? };
            Ok(Response::Opened { handle: handles.insert(file), attr, data })
        }
        Create { mount, path, mode, flags } => {
            let t = Target::resolve(table, mount, &path)?;
            t.writable()?;
            let fd = t.open(open_flags(flags, true), Mode::from_raw_mode(mode))?;
            let attr = attr(&rustix::fs::fstat(&fd)?);
            Ok(Response::Opened { handle: handles.insert(File::from(fd)), attr, data: None })
        }
        Read { handle, offset, size } => read(&*handles.get(handle)?, offset, size),
        Write { handle, offset, data } => {
            let file = handles.get(handle)?;
            file.write_all_at(&data, offset).map_err(io_errno)?;
            Ok(Response::Written(u32::try_from(data.len()).unwrap_or(u32::MAX)))
        }
        Release { handle } => handles.remove(handle).map(|()| Response::Ok),
        Fsync { handle } => {
            rustix::fs::fsync(handles.get(handle)?.as_fd())?;
            Ok(Response::Ok)
        }
        SetAttr { mount, path, handle, set } => {
            let t = Target::resolve(table, mount, &path)?;
            t.writable()?;
            let open = handle.map(|h| handles.get(h)).transpose()?;
            set_attr(&t, open.as_deref(), &set)
        }
        Mkdir { mount, path, mode } => {
            let t = Target::resolve(table, mount, &path)?;
            t.writable()?;
            let name = t.name()?;
            rustix::fs::mkdirat(&t.dir, name, Mode::from_raw_mode(mode))?;
            Ok(Response::Attr(t.stat()?))
        }
        Unlink { mount, path } => remove(table, mount, &path, AtFlags::empty()),
        Rmdir { mount, path } => remove(table, mount, &path, AtFlags::REMOVEDIR),
        Rename { mount, from, to, flags } => {
            let (a, b) = (Target::resolve(table, mount, &from)?, Target::resolve(table, mount, &to)?);
            a.writable()?;
            let flags = RenameFlags::from_bits(flags).ok_or(Errno::INVAL)?;
            rustix::fs::renameat_with(&a.dir, a.name()?, &b.dir, b.name()?, flags)?;
            Ok(Response::Ok)
        }
        Symlink { mount, path, target } => {
            let t = Target::resolve(table, mount, &path)?;
            t.writable()?;
            if !files::symlink_stays_inside(&t.parent_components(), &target) {
                return Err(Errno::ACCESS);
            }
            rustix::fs::symlinkat(OsStr::from_bytes(&target), &t.dir, t.name()?)?;
            Ok(Response::Attr(t.stat()?))
        }
        Readlink { mount, path } => {
            let t = Target::resolve(table, mount, &path)?;
            let target = rustix::fs::readlinkat(&t.dir, t.name()?, Vec::new())?.into_bytes();
            // Shown only when it stays inside: the developer's kernel follows
            // it, and an escaping one would point at the developer's own files.
            if !files::symlink_stays_inside(&t.parent_components(), &target) {
                return Err(Errno::ACCESS);
            }
            Ok(Response::Link(target))
        }
        Statfs { mount } => {
            let s = rustix::fs::fstatvfs(table.root(mount)?)?;
            Ok(Response::Statfs(StatFs {
                blocks: s.f_blocks,
                bfree: s.f_bfree,
                bavail: s.f_bavail,
                files: s.f_files,
                ffree: s.f_ffree,
                bsize: u32::try_from(s.f_bsize).unwrap_or(4096),
                namelen: u32::try_from(s.f_namemax).unwrap_or(255),
                frsize: u32::try_from(s.f_frsize).unwrap_or(4096),
            }))
        }
    }
}

/// A resolved request path: the directory holding the last component (walked
/// without following symlinks) and that component, `None` for the mount root.
struct Target<'a> {
    dir: OwnedFd,
    name: Option<&'a [u8]>,
    parents: Vec<&'a [u8]>,
    read_only: bool,
}

impl<'a> Target<'a> {
    fn resolve(table: &MountTable, mount: u16, path: &'a [u8]) -> Result<Self, Errno> {
        let root = table.root(mount)?;
        let read_only = table.read_only(mount)?;
        let mut parts = files::components(path).map_err(|_| Errno::ACCESS)?;
        let name = parts.pop();
        let mut dir = rustix::io::dup(root)?;
        for c in &parts {
            dir = rustix::fs::openat(
                &dir,
                OsStr::from_bytes(c),
                OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| if e == Errno::LOOP { Errno::NOTDIR } else { e })?;
        }
        Ok(Target { dir, name, parents: parts, read_only })
    }

    fn writable(&self) -> Result<(), Errno> {
        if self.read_only { Err(Errno::ROFS) } else { Ok(()) }
    }

    /// The last component; operations that need one refuse the mount root.
    fn name(&self) -> Result<&'a OsStr, Errno> {
        self.name.map(OsStr::from_bytes).ok_or(Errno::BUSY)
    }

    fn parent_components(&self) -> Vec<&[u8]> {
        self.parents.clone()
    }

    fn stat(&self) -> Result<Attr, Errno> {
        let st = match self.name {
            Some(n) => rustix::fs::statat(&self.dir, OsStr::from_bytes(n), AtFlags::SYMLINK_NOFOLLOW)?,
            None => rustix::fs::fstat(&self.dir)?,
        };
        Ok(attr(&st))
    }

    /// Opens the target itself; `O_NOFOLLOW` is always added, so a symlink
    /// as last component fails with ELOOP.
    fn open(&self, flags: OFlags, mode: Mode) -> Result<OwnedFd, Errno> {
        let flags = flags | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        match self.name {
            Some(n) => rustix::fs::openat(&self.dir, OsStr::from_bytes(n), flags, mode),
            None => rustix::fs::openat(&self.dir, ".", flags, mode),
        }
    }
}

/// A descriptor (O_PATH) of the directory `path` names, or with `parent`
/// of the one holding it, resolved as every request's path is.
pub fn dir_of(table: &MountTable, mount: u16, path: &[u8], parent: bool) -> Result<OwnedFd, Errno> {
    let t = Target::resolve(table, mount, path)?;
    if parent || t.name.is_none() { Ok(t.dir) } else { t.open(OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) }
}

/// Keeps only the open(2) flags a client may choose.
fn open_flags(raw: u32, create: bool) -> OFlags {
    let allowed = OFlags::RWMODE | OFlags::APPEND | OFlags::TRUNC | OFlags::DIRECTORY | OFlags::SYNC | OFlags::DSYNC;
    let mut f = OFlags::from_bits_truncate(raw) & allowed;
    if create {
        f |= OFlags::CREATE | (OFlags::from_bits_truncate(raw) & OFlags::EXCL);
    }
    f
}

fn writes(f: OFlags) -> bool {
    f.contains(OFlags::WRONLY) || f.contains(OFlags::RDWR) || f.contains(OFlags::TRUNC)
}

fn read(file: &File, offset: u64, size: u32) -> OpResult {
    read_at(file, offset, size.min(MAX_IO) as usize).map(Response::Data)
}

/// Up to `size` bytes from `offset`, fewer only at the end of the file.
/// Read into spare capacity: zeroing a megabyte first cost as much as a
/// tenth of the agent's time on a sequential read.
fn read_at(file: &File, offset: u64, size: usize) -> Result<Bytes, Errno> {
    let mut buf = Vec::with_capacity(size);
    while buf.len() < size {
        let at = offset + buf.len() as u64;
        match rustix::io::pread(file, rustix::buffer::spare_capacity(&mut buf), at) {
            Ok(0) => break,
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Bytes::from(buf))
}

/// The whole content of a small regular file, for [`Response::Opened`]; a
/// file that grew since `attr` was taken is left to ordinary reads, because
/// the client takes what comes as complete.
fn whole_if_small(file: &File, attr: &Attr) -> Result<Option<Bytes>, Errno> {
    let regular = attr.mode & 0o170000 == 0o100000;
    if !regular || attr.size > u64::from(files::OPEN_DATA_MAX) {
        return Ok(None);
    }
    // One byte more than `attr` says tells whether it grew.
    let data = read_at(file, 0, attr.size as usize + 1)?;
    Ok((data.len() as u64 <= attr.size).then_some(data))
}

fn read_dir(t: &Target<'_>, cursor: u64) -> OpResult {
    let fd = t.open(OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let mut dir = rustix::fs::Dir::read_from(&fd)?;
    let mut entries = Vec::new();
    let mut index = 0u64;
    let mut next = None;
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." {
            continue;
        }
        if index >= cursor {
            if entries.len() == MAX_DIR_PAGE {
                next = Some(index);
                break;
            }
            // An entry removed between readdir and stat is simply left out.
            if let Ok(st) = rustix::fs::statat(&fd, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
                entries.push(DirEntry { name: name.to_vec(), attr: attr(&st) });
            }
        }
        index += 1;
    }
    Ok(Response::Entries { entries, next })
}

fn set_attr(t: &Target<'_>, open: Option<&File>, set: &SetAttr) -> OpResult {
    if let Some(size) = set.size {
        match open {
            Some(f) => rustix::fs::ftruncate(f, size)?,
            None => rustix::fs::ftruncate(t.open(OFlags::WRONLY, Mode::empty())?, size)?,
        }
    }
    if let Some(mode) = set.mode {
        chmod(t, open, mode)?;
    }
    if set.uid.is_some() || set.gid.is_some() {
        let (uid, gid) = (set.uid.map(rustix::fs::Uid::from_raw), set.gid.map(rustix::fs::Gid::from_raw));
        match t.name {
            Some(n) => rustix::fs::chownat(&t.dir, OsStr::from_bytes(n), uid, gid, AtFlags::SYMLINK_NOFOLLOW)?,
            None => rustix::fs::fchown(&t.dir, uid, gid)?,
        }
    }
    if set.atime.is_some() || set.mtime.is_some() {
        let ts = Timestamps { last_access: timestamp(set.atime), last_modification: timestamp(set.mtime) };
        match t.name {
            Some(n) => rustix::fs::utimensat(&t.dir, OsStr::from_bytes(n), &ts, AtFlags::SYMLINK_NOFOLLOW)?,
            None => rustix::fs::utimensat(&t.dir, ".", &ts, AtFlags::empty())?,
        }
    }
    Ok(Response::Attr(t.stat()?))
}

/// chmod without following a symlink: Linux's fchmodat cannot refuse one, so
/// the target is pinned with an `O_PATH | O_NOFOLLOW` descriptor first and
/// changed through its /proc/self/fd link.
fn chmod(t: &Target<'_>, open: Option<&File>, mode: u32) -> Result<(), Errno> {
    let mode = Mode::from_raw_mode(mode & 0o7777);
    if let Some(f) = open {
        return rustix::fs::fchmod(f, mode);
    }
    let pinned = t.open(OFlags::PATH, Mode::empty())?;
    if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(&pinned)?.st_mode) == rustix::fs::FileType::Symlink {
        return Err(Errno::OPNOTSUPP);
    }
    let link = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&pinned));
    rustix::fs::chmodat(rustix::fs::CWD, link.as_str(), mode, AtFlags::empty())
}

fn remove(table: &MountTable, mount: u16, path: &[u8], flags: AtFlags) -> OpResult {
    let t = Target::resolve(table, mount, path)?;
    t.writable()?;
    rustix::fs::unlinkat(&t.dir, t.name()?, flags)?;
    Ok(Response::Ok)
}

fn timestamp(t: Option<TimeSet>) -> RTimespec {
    match t {
        None => RTimespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
        Some(TimeSet::Now) => RTimespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        Some(TimeSet::At(ts)) => RTimespec { tv_sec: ts.sec, tv_nsec: ts.nsec.into() },
    }
}

fn ts(sec: i64, nsec: u64) -> Timespec {
    Timespec { sec, nsec: u32::try_from(nsec).unwrap_or(0) }
}

/// Converts `lstat` output to the wire's attributes.
pub fn attr(st: &Stat) -> Attr {
    Attr {
        ino: st.st_ino,
        mode: st.st_mode,
        nlink: u32::try_from(st.st_nlink).unwrap_or(u32::MAX),
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev,
        size: u64::try_from(st.st_size).unwrap_or(0),
        blocks: u64::try_from(st.st_blocks).unwrap_or(0),
        blksize: u32::try_from(st.st_blksize).unwrap_or(4096),
        atime: ts(st.st_atime, st.st_atime_nsec),
        mtime: ts(st.st_mtime, st.st_mtime_nsec),
        ctime: ts(st.st_ctime, st.st_ctime_nsec),
    }
}

fn io_errno(e: std::io::Error) -> Errno {
    e.raw_os_error().map_or(Errno::IO, Errno::from_raw_os_error)
}
