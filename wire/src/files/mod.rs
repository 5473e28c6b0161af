//! The file protocol of the volume bridge: the sidecar's FUSE client asks, the
//! agent's file server answers, over one TCP stream inside the tunnel
//! (`names::AGENT_TUNNEL_IP:AGENT_FILES_PORT`).
//!
//! Every message is a frame: a big-endian `u32` length, then a `u64` request
//! id, a one-byte kind and the kind's fields. Requests are pipelined: the
//! client sends many without waiting and the server answers each with the
//! same id, in any order. The first request on a stream is [`Request::Hello`]
//! carrying [`FILES_VERSION`]; a server of another version answers
//! [`Response::Error`] with [`EPROTO`] and closes, so an old agent and a new
//! sidecar fail with a clear "version mismatch" instead of misreading bytes.
//!
//! Paths are relative to one of the served mounts (named by its index in
//! [`Response::Welcome`]) and are raw bytes split on `/`; [`components`]
//! refuses `.`, `..`, empty components and NUL, and the server never follows
//! a symlink while resolving them. Error replies carry Linux errno values
//! (both ends are Linux).
//!
//! The codec is pure: [`encode`] appends a frame to a buffer and [`decode`]
//! takes one off, returning `Ok(None)` until a whole frame is there;
//! [`encode_head`] leaves a read's or a write's data out of the frame, for
//! `tpd-volumes`' writer, which sends it from where it is.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Version of the file protocol; see the module docs. 2: [`Response::Opened`]
/// carries the content of small files opened for reading. 3: writes through
/// one handle run in the order they were sent (the sidecar answers writes,
/// appends included, before they are done). 4: the server pushes
/// [`Response::Changed`] for changes it sees in the directories the client
/// has used.
pub const FILES_VERSION: u16 = 4;

/// The request id of a message the server sends unasked
/// ([`Response::Changed`]); the client numbers its requests from 1.
pub const PUSHED: u64 = 0;

/// Largest read or write one request carries (the FUSE client's `max_write`
/// and `max_read`): large requests keep sequential IO at wire speed.
pub const MAX_IO: u32 = 1 << 20;

/// Largest frame either side accepts: one full [`MAX_IO`] payload plus room
/// for a directory page. A larger length prefix closes the stream.
pub const MAX_FRAME: usize = 4 << 20;

/// Largest file whose whole content the server sends with
/// [`Response::Opened`] when it is opened for reading only: opening and
/// reading a small file then costs one round trip instead of two.
pub const OPEN_DATA_MAX: u32 = 128 << 10;

/// Most entries the server puts in one [`Response::Entries`] page.
pub const MAX_DIR_PAGE: usize = 4096;

/// Linux errno values used by the protocol itself.
pub const EPROTO: i32 = 71;
pub const EINVAL: i32 = 22;
pub const EACCES: i32 = 13;

/// Where, inside the sidecar container, each volume is FUSE-mounted (one
/// directory per volume, named by [`mount_dir_name`]). The CLI bind-mounts a
/// host directory here with rshared propagation, so the mounts reach the
/// developer's container.
pub const SIDECAR_VOLUMES_DIR: &str = "/tpd/volumes";

/// The directory name volume number `index` (its place in the mount list)
/// gets under [`SIDECAR_VOLUMES_DIR`]: unique per index, since two mounts may
/// share a volume through subPaths, and readable.
pub fn mount_dir_name(index: usize, volume_name: &str) -> String {
    let clean: String =
        volume_name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    format!("{index}-{clean}")
}

/// One volume mount of the swapped container, as tpd passes it to the agent
/// in `names::agent_env::MOUNTS` (a JSON list of these, Kubernetes' field
/// names) and as the CLI uses it to place the mount in the local container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeMount {
    /// The pod volume's name.
    pub name: String,
    /// Where the container sees it (the agent serves this directory).
    pub mount_path: String,
    #[serde(default)]
    pub read_only: bool,
    /// Kubernetes' subPath; the kubelet already mounted only that part at
    /// `mount_path`, so it is informational for the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_path: Option<String>,
}

/// Parses the value of `names::agent_env::MOUNTS`.
pub fn parse_mounts(json: &str) -> Result<Vec<VolumeMount>, serde_json::Error> {
    serde_json::from_str(json)
}

/// Builds the value of `names::agent_env::MOUNTS`.
pub fn mounts_env_value(mounts: &[VolumeMount]) -> String {
    // Serialising plain strings and bools cannot fail.
    serde_json::to_string(mounts).unwrap_or_else(|_| "[]".to_owned())
}

/// A path inside a mount that breaks the protocol's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path component is empty, '.' or '..'")]
    BadComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is absolute")]
    Absolute,
}

/// Splits a mount-relative path into its components; the empty path is the
/// mount's root. Refuses anything that could name a file outside the mount.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, PathError> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    if path[0] == b'/' {
        return Err(PathError::Absolute);
    }
    if path.contains(&0) {
        return Err(PathError::Nul);
    }
    path.split(|b| *b == b'/')
        .map(|c| match c {
            b"" | b"." | b".." => Err(PathError::BadComponent),
            c => Ok(c),
        })
        .collect()
}

/// Whether a symlink with `target`, stored in the directory `dir` (mount
/// relative components), stays inside the mount. Absolute targets never do.
pub fn symlink_stays_inside(dir: &[&[u8]], target: &[u8]) -> bool {
    if target.is_empty() || target[0] == b'/' || target.contains(&0) {
        return false;
    }
    let mut depth = dir.len();
    for c in target.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => depth += 1,
        }
    }
    true
}

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timespec {
    pub sec: i64,
    pub nsec: u32,
}

/// A file's attributes, as `lstat` gives them (`mode` includes the type bits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Attr {
    pub ino: u64,
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub blocks: u64,
    pub blksize: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub ctime: Timespec,
}

/// A time to set: the server's "now" or a given instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSet {
    Now,
    At(Timespec),
}

/// Which attributes a [`Request::SetAttr`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeSet>,
    pub mtime: Option<TimeSet>,
}

/// `statvfs` of a mount.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatFs {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
    pub namelen: u32,
    pub frsize: u32,
}

/// A served mount as the client learns it from [`Response::Welcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    pub name: String,
    pub read_only: bool,
}

/// One directory entry with its attributes (a "readdirplus" entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// What the client asks. `mount` indexes the Welcome's mount list; `path`
/// is mount-relative (see [`components`]); `handle` is one the server gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Hello {
        version: u16,
    },
    Stat {
        mount: u16,
        path: Vec<u8>,
    },
    /// A page of entries starting at `cursor` (0 for the first page).
    ReadDir {
        mount: u16,
        path: Vec<u8>,
        cursor: u64,
    },
    /// `flags` are Linux open(2) flags; O_CREAT/O_NOFOLLOW are the server's.
    Open {
        mount: u16,
        path: Vec<u8>,
        flags: u32,
    },
    Create {
        mount: u16,
        path: Vec<u8>,
        mode: u32,
        flags: u32,
    },
    Read {
        handle: u64,
        offset: u64,
        size: u32,
    },
    Write {
        handle: u64,
        offset: u64,
        data: Bytes,
    },
    Release {
        handle: u64,
    },
    Fsync {
        handle: u64,
    },
    /// Changes attributes, through `handle` when the file is open.
    SetAttr {
        mount: u16,
        path: Vec<u8>,
        handle: Option<u64>,
        set: SetAttr,
    },
    Mkdir {
        mount: u16,
        path: Vec<u8>,
        mode: u32,
    },
    Unlink {
        mount: u16,
        path: Vec<u8>,
    },
    Rmdir {
        mount: u16,
        path: Vec<u8>,
    },
    /// `flags` are renameat2 flags (RENAME_NOREPLACE, RENAME_EXCHANGE).
    Rename {
        mount: u16,
        from: Vec<u8>,
        to: Vec<u8>,
        flags: u32,
    },
    Symlink {
        mount: u16,
        path: Vec<u8>,
        target: Vec<u8>,
    },
    Readlink {
        mount: u16,
        path: Vec<u8>,
    },
    Statfs {
        mount: u16,
    },
}

/// What the server answers, under the request's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Welcome {
        version: u16,
        mounts: Vec<MountInfo>,
    },
    Ok,
    Attr(Attr),
    /// `next` is the cursor of the following page, `None` at the end.
    Entries {
        entries: Vec<DirEntry>,
        next: Option<u64>,
    },
    /// `data`, when present, is the file's whole content as read right after
    /// opening it (a regular file of at most [`OPEN_DATA_MAX`] bytes opened
    /// read-only).
    Opened {
        handle: u64,
        attr: Attr,
        data: Option<Bytes>,
    },
    Data(Bytes),
    Written(u32),
    Link(Vec<u8>),
    Statfs(StatFs),
    /// A Linux errno value.
    Error(i32),
    /// Sent unasked, under id [`PUSHED`]: entry `name` of directory `dir`
    /// (mount-relative; `name` empty for the directory itself) was
    /// created, removed, renamed, written or had its attributes changed,
    /// by anyone (the server watches each directory the client has looked
    /// into, with inotify). The client drops what it keeps of it.
    Changed {
        mount: u16,
        dir: Vec<u8>,
        name: Vec<u8>,
    },
}

mod codec;
#[cfg(test)]
mod tests;

pub use codec::{DecodeError, Message, decode, encode, encode_head};
