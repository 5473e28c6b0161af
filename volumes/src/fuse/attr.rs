//! The file protocol's attributes as the kernel sees them, and how long it
//! keeps them ([`Lifetimes`]; how the agent's reports end that early: see
//! `cache`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};
use tpd_wire::files::{self, Attr, TimeSet, Timespec};

/// How long names, attributes and missing names are kept with the cache on.
pub const CACHE_TTL: Duration = Duration::from_secs(30);

/// What the mounts keep, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Names and attributes (the kernel's entry and attribute timeouts, and
    /// listings answering lookups); zero keeps nothing.
    pub entry: Duration,
    /// Whether a missing name is kept as long (a negative entry).
    pub negative: bool,
}

impl Lifetimes {
    /// `--volume-cache=on` or `off`.
    pub fn new(cache: bool) -> Self {
        if cache {
            Lifetimes { entry: CACHE_TTL, negative: true }
        } else {
            Lifetimes { entry: Duration::ZERO, negative: false }
        }
    }
}

fn time(t: Timespec) -> SystemTime {
    let nanos = Duration::new(t.sec.unsigned_abs(), t.nsec);
    if t.sec >= 0 {
        UNIX_EPOCH + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(t.sec.unsigned_abs()) + Duration::from_nanos(t.nsec.into())
    }
}

pub fn timeset(t: TimeOrNow) -> TimeSet {
    match t {
        TimeOrNow::Now => TimeSet::Now,
        TimeOrNow::SpecificTime(s) => TimeSet::At(match s.duration_since(UNIX_EPOCH) {
            Ok(d) => Timespec { sec: i64::try_from(d.as_secs()).unwrap_or(i64::MAX), nsec: d.subsec_nanos() },
            Err(e) => {
                let d = e.duration();
                Timespec {
                    sec: -i64::try_from(d.as_secs()).unwrap_or(i64::MAX) - 1,
                    nsec: 1_000_000_000 - d.subsec_nanos().max(1),
                }
            }
        }),
    }
}

pub fn kind(mode: u32) -> FileType {
    match mode & 0o170000 {
        0o040000 => FileType::Directory,
        0o120000 => FileType::Symlink,
        0o010000 => FileType::NamedPipe,
        0o020000 => FileType::CharDevice,
        0o060000 => FileType::BlockDevice,
        0o140000 => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

pub fn file_attr(ino: u64, a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: a.size,
        blocks: a.blocks,
        atime: time(a.atime),
        mtime: time(a.mtime),
        ctime: time(a.ctime),
        crtime: time(a.ctime),
        kind: kind(a.mode),
        perm: (a.mode & 0o7777) as u16,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev as u32,
        // The preferred I/O size is what one request carries, as NFS
        // reports its wsize: `cp` and others size their buffers by it, and
        // every write waits for its answer from the pod, so 128 KiB writes
        // (what a 4 KiB block size gets from `cp`) paid 8 round trips per MiB.
        blksize: files::MAX_IO,
        flags: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_keeps_nothing_and_on_keeps_missing_names() {
        assert_eq!(Lifetimes::new(false), Lifetimes { entry: Duration::ZERO, negative: false });
        assert_eq!(Lifetimes::new(true), Lifetimes { entry: CACHE_TTL, negative: true });
    }
}
