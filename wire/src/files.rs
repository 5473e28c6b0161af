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

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

/// Version of the file protocol; see the module docs. 2: [`Response::Opened`]
/// carries the content of small files opened for reading. 3: writes through
/// one handle run in the order they were sent (the sidecar answers writes,
/// appends included, before they are done).
pub const FILES_VERSION: u16 = 3;

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
}

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The length prefix is over [`MAX_FRAME`]: the stream cannot be trusted
    /// any more and must be closed.
    #[error("frame of {0} bytes is larger than the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    /// A whole frame arrived (and was consumed) but its body is malformed.
    /// With the id known, the server answers EPROTO and goes on.
    #[error("malformed frame (request id {id:?}): {reason}")]
    Malformed { id: Option<u64>, reason: &'static str },
}

/// A message that travels in frames.
pub trait Message: Sized {
    /// Appends the body, except a bulk payload that ends it (the data of a
    /// read or a write), which it returns for the caller to append.
    fn encode_body(&self, out: &mut BytesMut) -> Option<&Bytes>;
    fn decode_body(body: &mut Bytes) -> Result<Self, &'static str>;
}

/// Appends one frame carrying `msg` under `id`.
pub fn encode<M: Message>(id: u64, msg: &M, out: &mut BytesMut) {
    if let Some(payload) = encode_head(id, msg, out) {
        out.put_slice(payload);
    }
}

/// Appends the frame carrying `msg` under `id` without its bulk payload,
/// which it returns: written to the stream right after `out`, it completes
/// the frame. Megabytes of data then reach the stream without first being
/// copied into `out`.
pub fn encode_head<'m, M: Message>(id: u64, msg: &'m M, out: &mut BytesMut) -> Option<&'m Bytes> {
    let start = out.len();
    out.put_u32(0);
    out.put_u64(id);
    let payload = msg.encode_body(out);
    let len = out.len() - start - 4 + payload.map_or(0, Bytes::len);
    out[start..start + 4].copy_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    payload
}

/// Takes one frame off the front of `buf`: `Ok(None)` while it is incomplete.
pub fn decode<M: Message>(buf: &mut BytesMut) -> Result<Option<(u64, M)>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len > MAX_FRAME {
        return Err(DecodeError::TooLarge(len));
    }
    if buf.len() < 4 + len {
        buf.reserve(4 + len - buf.len());
        return Ok(None);
    }
    buf.advance(4);
    let mut body = buf.split_to(len).freeze();
    if body.len() < 8 {
        return Err(DecodeError::Malformed { id: None, reason: "frame shorter than its id" });
    }
    let id = body.get_u64();
    let msg = M::decode_body(&mut body).map_err(|reason| DecodeError::Malformed { id: Some(id), reason })?;
    if body.has_remaining() {
        return Err(DecodeError::Malformed { id: Some(id), reason: "trailing bytes" });
    }
    Ok(Some((id, msg)))
}

// ---- field encoding -------------------------------------------------------

const TRUNCATED: &str = "truncated field";

fn take<const N: usize>(b: &mut Bytes) -> Result<[u8; N], &'static str> {
    if b.remaining() < N {
        return Err(TRUNCATED);
    }
    let mut a = [0u8; N];
    b.copy_to_slice(&mut a);
    Ok(a)
}
fn get_u8(b: &mut Bytes) -> Result<u8, &'static str> {
    take::<1>(b).map(|a| a[0])
}
fn get_u16(b: &mut Bytes) -> Result<u16, &'static str> {
    take(b).map(u16::from_be_bytes)
}
fn get_u32(b: &mut Bytes) -> Result<u32, &'static str> {
    take(b).map(u32::from_be_bytes)
}
fn get_u64(b: &mut Bytes) -> Result<u64, &'static str> {
    take(b).map(u64::from_be_bytes)
}
fn get_i64(b: &mut Bytes) -> Result<i64, &'static str> {
    take(b).map(i64::from_be_bytes)
}
fn get_bool(b: &mut Bytes) -> Result<bool, &'static str> {
    match get_u8(b)? {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err("bad bool"),
    }
}
/// A `u32`-length-prefixed byte string, shared with the frame (no copy).
fn get_bytes(b: &mut Bytes) -> Result<Bytes, &'static str> {
    let len = get_u32(b)? as usize;
    if b.remaining() < len {
        return Err(TRUNCATED);
    }
    Ok(b.split_to(len))
}
fn get_vec(b: &mut Bytes) -> Result<Vec<u8>, &'static str> {
    get_bytes(b).map(|x| x.to_vec())
}
fn put_bytes(out: &mut BytesMut, v: &[u8]) {
    put_len(out, v);
    out.put_slice(v);
}
fn put_len(out: &mut BytesMut, v: &[u8]) {
    out.put_u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
}
/// The length of a bulk payload, which [`encode_head`] leaves to its caller.
fn put_payload<'m>(out: &mut BytesMut, v: &'m Bytes) -> Option<&'m Bytes> {
    put_len(out, v);
    Some(v)
}
fn get_opt<T>(b: &mut Bytes, f: impl FnOnce(&mut Bytes) -> Result<T, &'static str>) -> Result<Option<T>, &'static str> {
    if get_bool(b)? { f(b).map(Some) } else { Ok(None) }
}
fn put_opt<T>(out: &mut BytesMut, v: &Option<T>, f: impl FnOnce(&mut BytesMut, &T)) {
    out.put_u8(u8::from(v.is_some()));
    if let Some(v) = v {
        f(out, v);
    }
}
fn get_ts(b: &mut Bytes) -> Result<Timespec, &'static str> {
    let sec = get_i64(b)?;
    let nsec = get_u32(b)?;
    if nsec >= 1_000_000_000 {
        return Err("nanoseconds out of range");
    }
    Ok(Timespec { sec, nsec })
}
fn put_ts(out: &mut BytesMut, t: &Timespec) {
    out.put_i64(t.sec);
    out.put_u32(t.nsec);
}
fn get_timeset(b: &mut Bytes) -> Result<TimeSet, &'static str> {
    if get_bool(b)? { Ok(TimeSet::Now) } else { get_ts(b).map(TimeSet::At) }
}
fn put_timeset(out: &mut BytesMut, t: &TimeSet) {
    match t {
        TimeSet::Now => out.put_u8(1),
        TimeSet::At(ts) => {
            out.put_u8(0);
            put_ts(out, ts);
        }
    }
}

/// Bytes of an encoded [`Attr`].
const ATTR_LEN: usize = 88;

impl Attr {
    fn encode(&self, out: &mut BytesMut) {
        out.put_u64(self.ino);
        out.put_u32(self.mode);
        out.put_u32(self.nlink);
        out.put_u32(self.uid);
        out.put_u32(self.gid);
        out.put_u64(self.rdev);
        out.put_u64(self.size);
        out.put_u64(self.blocks);
        out.put_u32(self.blksize);
        put_ts(out, &self.atime);
        put_ts(out, &self.mtime);
        put_ts(out, &self.ctime);
    }
    fn decode(b: &mut Bytes) -> Result<Self, &'static str> {
        Ok(Attr {
            ino: get_u64(b)?,
            mode: get_u32(b)?,
            nlink: get_u32(b)?,
            uid: get_u32(b)?,
            gid: get_u32(b)?,
            rdev: get_u64(b)?,
            size: get_u64(b)?,
            blocks: get_u64(b)?,
            blksize: get_u32(b)?,
            atime: get_ts(b)?,
            mtime: get_ts(b)?,
            ctime: get_ts(b)?,
        })
    }
}

impl SetAttr {
    fn encode(&self, out: &mut BytesMut) {
        put_opt(out, &self.mode, |o, v| o.put_u32(*v));
        put_opt(out, &self.uid, |o, v| o.put_u32(*v));
        put_opt(out, &self.gid, |o, v| o.put_u32(*v));
        put_opt(out, &self.size, |o, v| o.put_u64(*v));
        put_opt(out, &self.atime, put_timeset);
        put_opt(out, &self.mtime, put_timeset);
    }
    fn decode(b: &mut Bytes) -> Result<Self, &'static str> {
        Ok(SetAttr {
            mode: get_opt(b, get_u32)?,
            uid: get_opt(b, get_u32)?,
            gid: get_opt(b, get_u32)?,
            size: get_opt(b, get_u64)?,
            atime: get_opt(b, get_timeset)?,
            mtime: get_opt(b, get_timeset)?,
        })
    }
}

impl StatFs {
    fn encode(&self, out: &mut BytesMut) {
        for v in [self.blocks, self.bfree, self.bavail, self.files, self.ffree] {
            out.put_u64(v);
        }
        for v in [self.bsize, self.namelen, self.frsize] {
            out.put_u32(v);
        }
    }
    fn decode(b: &mut Bytes) -> Result<Self, &'static str> {
        Ok(StatFs {
            blocks: get_u64(b)?,
            bfree: get_u64(b)?,
            bavail: get_u64(b)?,
            files: get_u64(b)?,
            ffree: get_u64(b)?,
            bsize: get_u32(b)?,
            namelen: get_u32(b)?,
            frsize: get_u32(b)?,
        })
    }
}

/// Reads a list count and checks it against the bytes left, so a forged
/// count cannot make the decoder allocate gigabytes.
fn get_count(b: &mut Bytes, min_item: usize) -> Result<usize, &'static str> {
    let n = get_u32(b)? as usize;
    if n.saturating_mul(min_item) > b.remaining() {
        return Err("list longer than its frame");
    }
    Ok(n)
}

mod kind {
    pub const HELLO: u8 = 0;
    pub const STAT: u8 = 1;
    pub const READDIR: u8 = 2;
    pub const OPEN: u8 = 3;
    pub const CREATE: u8 = 4;
    pub const READ: u8 = 5;
    pub const WRITE: u8 = 6;
    pub const RELEASE: u8 = 7;
    pub const FSYNC: u8 = 8;
    pub const SETATTR: u8 = 9;
    pub const MKDIR: u8 = 10;
    pub const UNLINK: u8 = 11;
    pub const RMDIR: u8 = 12;
    pub const RENAME: u8 = 13;
    pub const SYMLINK: u8 = 14;
    pub const READLINK: u8 = 15;
    pub const STATFS: u8 = 16;

    pub const WELCOME: u8 = 0;
    pub const OK: u8 = 1;
    pub const ATTR: u8 = 2;
    pub const ENTRIES: u8 = 3;
    pub const OPENED: u8 = 4;
    pub const DATA: u8 = 5;
    pub const WRITTEN: u8 = 6;
    pub const LINK: u8 = 7;
    pub const STATFS_R: u8 = 8;
    pub const ERROR: u8 = 9;
}

impl Message for Request {
    fn encode_body(&self, out: &mut BytesMut) -> Option<&Bytes> {
        use Request::*;
        match self {
            Hello { version } => {
                out.put_u8(kind::HELLO);
                out.put_u16(*version);
            }
            Stat { mount, path } => mount_path(out, kind::STAT, *mount, path),
            ReadDir { mount, path, cursor } => {
                mount_path(out, kind::READDIR, *mount, path);
                out.put_u64(*cursor);
            }
            Open { mount, path, flags } => {
                mount_path(out, kind::OPEN, *mount, path);
                out.put_u32(*flags);
            }
            Create { mount, path, mode, flags } => {
                mount_path(out, kind::CREATE, *mount, path);
                out.put_u32(*mode);
                out.put_u32(*flags);
            }
            Read { handle, offset, size } => {
                out.put_u8(kind::READ);
                out.put_u64(*handle);
                out.put_u64(*offset);
                out.put_u32(*size);
            }
            Write { handle, offset, data } => {
                out.put_u8(kind::WRITE);
                out.put_u64(*handle);
                out.put_u64(*offset);
                return put_payload(out, data);
            }
            Release { handle } => {
                out.put_u8(kind::RELEASE);
                out.put_u64(*handle);
            }
            Fsync { handle } => {
                out.put_u8(kind::FSYNC);
                out.put_u64(*handle);
            }
            SetAttr { mount, path, handle, set } => {
                mount_path(out, kind::SETATTR, *mount, path);
                put_opt(out, handle, |o, h| o.put_u64(*h));
                set.encode(out);
            }
            Mkdir { mount, path, mode } => {
                mount_path(out, kind::MKDIR, *mount, path);
                out.put_u32(*mode);
            }
            Unlink { mount, path } => mount_path(out, kind::UNLINK, *mount, path),
            Rmdir { mount, path } => mount_path(out, kind::RMDIR, *mount, path),
            Rename { mount, from, to, flags } => {
                mount_path(out, kind::RENAME, *mount, from);
                put_bytes(out, to);
                out.put_u32(*flags);
            }
            Symlink { mount, path, target } => {
                mount_path(out, kind::SYMLINK, *mount, path);
                put_bytes(out, target);
            }
            Readlink { mount, path } => mount_path(out, kind::READLINK, *mount, path),
            Statfs { mount } => {
                out.put_u8(kind::STATFS);
                out.put_u16(*mount);
            }
        }
        None
    }

    fn decode_body(b: &mut Bytes) -> Result<Self, &'static str> {
        use Request::*;
        let k = get_u8(b)?;
        if k == kind::HELLO {
            return Ok(Hello { version: get_u16(b)? });
        }
        if k == kind::READ || k == kind::WRITE || k == kind::RELEASE || k == kind::FSYNC {
            let handle = get_u64(b)?;
            return Ok(match k {
                kind::READ => Read { handle, offset: get_u64(b)?, size: get_u32(b)? },
                kind::WRITE => Write { handle, offset: get_u64(b)?, data: get_bytes(b)? },
                kind::RELEASE => Release { handle },
                _ => Fsync { handle },
            });
        }
        let mount = get_u16(b)?;
        if k == kind::STATFS {
            return Ok(Statfs { mount });
        }
        let path = get_vec(b)?;
        Ok(match k {
            kind::STAT => Stat { mount, path },
            kind::READDIR => ReadDir { mount, path, cursor: get_u64(b)? },
            kind::OPEN => Open { mount, path, flags: get_u32(b)? },
            kind::CREATE => Create { mount, path, mode: get_u32(b)?, flags: get_u32(b)? },
            kind::SETATTR => SetAttr { mount, path, handle: get_opt(b, get_u64)?, set: self::SetAttr::decode(b)? },
            kind::MKDIR => Mkdir { mount, path, mode: get_u32(b)? },
            kind::UNLINK => Unlink { mount, path },
            kind::RMDIR => Rmdir { mount, path },
            kind::RENAME => Rename { mount, from: path, to: get_vec(b)?, flags: get_u32(b)? },
            kind::SYMLINK => Symlink { mount, path, target: get_vec(b)? },
            kind::READLINK => Readlink { mount, path },
            _ => return Err("unknown request kind"),
        })
    }
}

fn mount_path(out: &mut BytesMut, k: u8, mount: u16, path: &[u8]) {
    out.put_u8(k);
    out.put_u16(mount);
    put_bytes(out, path);
}

impl Message for Response {
    fn encode_body(&self, out: &mut BytesMut) -> Option<&Bytes> {
        use Response::*;
        match self {
            Welcome { version, mounts } => {
                out.put_u8(kind::WELCOME);
                out.put_u16(*version);
                out.put_u32(u32::try_from(mounts.len()).unwrap_or(u32::MAX));
                for m in mounts {
                    put_bytes(out, m.name.as_bytes());
                    out.put_u8(u8::from(m.read_only));
                }
            }
            Ok => out.put_u8(kind::OK),
            Attr(a) => {
                out.put_u8(kind::ATTR);
                a.encode(out);
            }
            Entries { entries, next } => {
                out.put_u8(kind::ENTRIES);
                out.put_u32(u32::try_from(entries.len()).unwrap_or(u32::MAX));
                for e in entries {
                    put_bytes(out, &e.name);
                    e.attr.encode(out);
                }
                put_opt(out, next, |o, n| o.put_u64(*n));
            }
            Opened { handle, attr, data } => {
                out.put_u8(kind::OPENED);
                out.put_u64(*handle);
                attr.encode(out);
                put_opt(out, data, |o, d| put_bytes(o, d));
            }
            Data(d) => {
                out.put_u8(kind::DATA);
                return put_payload(out, d);
            }
            Written(n) => {
                out.put_u8(kind::WRITTEN);
                out.put_u32(*n);
            }
            Link(t) => {
                out.put_u8(kind::LINK);
                put_bytes(out, t);
            }
            Statfs(s) => {
                out.put_u8(kind::STATFS_R);
                s.encode(out);
            }
            Error(e) => {
                out.put_u8(kind::ERROR);
                out.put_i32(*e);
            }
        }
        None
    }

    fn decode_body(b: &mut Bytes) -> Result<Self, &'static str> {
        use Response::*;
        std::result::Result::Ok(match get_u8(b)? {
            kind::WELCOME => {
                let version = get_u16(b)?;
                let n = get_count(b, 5)?;
                let mut mounts = Vec::with_capacity(n);
                for _ in 0..n {
                    let name = String::from_utf8(get_vec(b)?).map_err(|_| "mount name is not UTF-8")?;
                    mounts.push(MountInfo { name, read_only: get_bool(b)? });
                }
                Welcome { version, mounts }
            }
            kind::OK => Ok,
            kind::ATTR => Attr(self::Attr::decode(b)?),
            kind::ENTRIES => {
                let n = get_count(b, 4 + ATTR_LEN)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    entries.push(DirEntry { name: get_vec(b)?, attr: self::Attr::decode(b)? });
                }
                Entries { entries, next: get_opt(b, get_u64)? }
            }
            kind::OPENED => Opened { handle: get_u64(b)?, attr: self::Attr::decode(b)?, data: get_opt(b, get_bytes)? },
            kind::DATA => Data(get_bytes(b)?),
            kind::WRITTEN => Written(get_u32(b)?),
            kind::LINK => Link(get_vec(b)?),
            kind::STATFS_R => Statfs(self::StatFs::decode(b)?),
            kind::ERROR => Error(take(b).map(i32::from_be_bytes)?),
            _ => return Err("unknown response kind"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip<M: Message + PartialEq + Clone + std::fmt::Debug>(id: u64, m: &M) {
        let mut buf = BytesMut::new();
        encode(id, m, &mut buf);
        let mut head = BytesMut::new();
        let payload = encode_head(id, m, &mut head);
        head.extend_from_slice(payload.map_or(&[][..], |p| p));
        assert_eq!(head, buf, "the head and its payload make the whole frame");
        // Byte by byte: incomplete frames are "not yet", never errors.
        let whole = buf.clone();
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode::<M>(&mut part), Ok(None));
        }
        assert_eq!(decode::<M>(&mut buf), Ok(Some((id, m.clone()))));
        assert!(buf.is_empty());
    }

    fn bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }
    fn ts() -> impl Strategy<Value = Timespec> {
        (any::<i64>(), 0u32..1_000_000_000).prop_map(|(sec, nsec)| Timespec { sec, nsec })
    }
    fn attr() -> impl Strategy<Value = Attr> {
        (any::<[u64; 4]>(), any::<[u32; 5]>(), ts(), ts(), ts()).prop_map(
            |([ino, rdev, size, blocks], [mode, nlink, uid, gid, blksize], atime, mtime, ctime)| Attr {
                ino,
                mode,
                nlink,
                uid,
                gid,
                rdev,
                size,
                blocks,
                blksize,
                atime,
                mtime,
                ctime,
            },
        )
    }
    fn timeset() -> impl Strategy<Value = TimeSet> {
        prop_oneof![Just(TimeSet::Now), ts().prop_map(TimeSet::At)]
    }
    fn setattr() -> impl Strategy<Value = SetAttr> {
        (
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u64>>(),
            proptest::option::of(timeset()),
            proptest::option::of(timeset()),
        )
            .prop_map(|(mode, uid, gid, size, atime, mtime)| SetAttr { mode, uid, gid, size, atime, mtime })
    }

    fn request() -> impl Strategy<Value = Request> {
        use Request::*;
        prop_oneof![
            any::<u16>().prop_map(|version| Hello { version }),
            (any::<u16>(), bytes()).prop_map(|(mount, path)| Stat { mount, path }),
            (any::<u16>(), bytes(), any::<u64>()).prop_map(|(mount, path, cursor)| ReadDir { mount, path, cursor }),
            (any::<u16>(), bytes(), any::<u32>()).prop_map(|(mount, path, flags)| Open { mount, path, flags }),
            (any::<u16>(), bytes(), any::<u32>(), any::<u32>()).prop_map(|(mount, path, mode, flags)| Create {
                mount,
                path,
                mode,
                flags
            }),
            (any::<u64>(), any::<u64>(), any::<u32>()).prop_map(|(handle, offset, size)| Read { handle, offset, size }),
            (any::<u64>(), any::<u64>(), bytes()).prop_map(|(handle, offset, d)| Write {
                handle,
                offset,
                data: Bytes::from(d)
            }),
            any::<u64>().prop_map(|handle| Release { handle }),
            any::<u64>().prop_map(|handle| Fsync { handle }),
            (any::<u16>(), bytes(), any::<Option<u64>>(), setattr()).prop_map(|(mount, path, handle, set)| SetAttr {
                mount,
                path,
                handle,
                set
            }),
            (any::<u16>(), bytes(), any::<u32>()).prop_map(|(mount, path, mode)| Mkdir { mount, path, mode }),
            (any::<u16>(), bytes()).prop_map(|(mount, path)| Unlink { mount, path }),
            (any::<u16>(), bytes()).prop_map(|(mount, path)| Rmdir { mount, path }),
            (any::<u16>(), bytes(), bytes(), any::<u32>())
                .prop_map(|(mount, from, to, flags)| { Rename { mount, from, to, flags } }),
            (any::<u16>(), bytes(), bytes()).prop_map(|(mount, path, target)| Symlink { mount, path, target }),
            (any::<u16>(), bytes()).prop_map(|(mount, path)| Readlink { mount, path }),
            any::<u16>().prop_map(|mount| Statfs { mount }),
        ]
    }

    fn response() -> impl Strategy<Value = Response> {
        use Response::*;
        prop_oneof![
            (any::<u16>(), proptest::collection::vec(("[a-z0-9-]{0,12}", any::<bool>()), 0..4)).prop_map(
                |(version, m)| Welcome {
                    version,
                    mounts: m.into_iter().map(|(name, read_only)| MountInfo { name, read_only }).collect()
                }
            ),
            Just(Ok),
            attr().prop_map(Attr),
            (proptest::collection::vec((bytes(), attr()), 0..5), any::<Option<u64>>()).prop_map(|(e, next)| Entries {
                entries: e.into_iter().map(|(name, attr)| DirEntry { name, attr }).collect(),
                next
            }),
            (any::<u64>(), attr(), proptest::option::of(bytes())).prop_map(|(handle, attr, data)| Opened {
                handle,
                attr,
                data: data.map(Bytes::from)
            }),
            bytes().prop_map(|d| Data(Bytes::from(d))),
            any::<u32>().prop_map(Written),
            bytes().prop_map(Link),
            (any::<[u64; 5]>(), any::<[u32; 3]>()).prop_map(
                |([blocks, bfree, bavail, files, ffree], [bsize, namelen, frsize])| {
                    Statfs(self::StatFs { blocks, bfree, bavail, files, ffree, bsize, namelen, frsize })
                }
            ),
            any::<i32>().prop_map(Error),
        ]
    }

    proptest! {
        #[test]
        fn requests_roundtrip(id in any::<u64>(), r in request()) {
            roundtrip(id, &r);
        }

        #[test]
        fn responses_roundtrip(id in any::<u64>(), r in response()) {
            roundtrip(id, &r);
        }

        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut a = BytesMut::from(&data[..]);
            let mut b = a.clone();
            while let Ok(Some(_)) = decode::<Request>(&mut a) {}
            while let Ok(Some(_)) = decode::<Response>(&mut b) {}
        }

        /// A valid frame with its body mutated still decodes or reports the
        /// request id, and always consumes exactly that frame.
        #[test]
        fn corrupted_bodies_are_contained(id in any::<u64>(), r in request(), at in any::<usize>(), byte in any::<u8>()) {
            let mut buf = BytesMut::new();
            encode(id, &r, &mut buf);
            let len = buf.len();
            let at = 12 + at % (len - 12).max(1);
            if at < len {
                buf[at] = byte;
            }
            encode(id + 1, &Request::Statfs { mount: 0 }, &mut buf);
            match decode::<Request>(&mut buf) {
                Ok(Some((got, _))) => prop_assert_eq!(got, id),
                Err(DecodeError::Malformed { id: got, .. }) => prop_assert_eq!(got, Some(id)),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
            prop_assert_eq!(decode::<Request>(&mut buf), Ok(Some((id + 1, Request::Statfs { mount: 0 }))));
        }

        #[test]
        fn components_never_yield_escapes(path in proptest::collection::vec(prop_oneof![Just(b'/'), Just(b'.'), Just(b'a'), Just(0u8)], 0..12)) {
            if let Ok(cs) = components(&path) {
                for c in cs {
                    prop_assert!(!c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/') && !c.contains(&0));
                }
            }
        }
    }

    #[test]
    fn oversized_length_is_fatal() {
        let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
        assert_eq!(decode::<Request>(&mut buf), Err(DecodeError::TooLarge(u32::MAX as usize)));
    }

    #[test]
    fn forged_list_count_does_not_allocate() {
        let mut body = BytesMut::new();
        body.put_u8(kind::ENTRIES);
        body.put_u32(u32::MAX);
        let mut frame = BytesMut::new();
        frame.put_u32(8 + body.len() as u32);
        frame.put_u64(7);
        frame.put_slice(&body);
        assert!(matches!(decode::<Response>(&mut frame), Err(DecodeError::Malformed { id: Some(7), .. })));
    }

    /// Each entry is a name's length and an [`Attr`] at least, so a count
    /// of 4-byte items let a 4 MiB frame allocate over 100 MiB of entries.
    #[test]
    fn entry_count_is_checked_against_whole_entries() {
        let mut frame = BytesMut::new();
        frame.put_u32(8 + 1 + 4 + 4000);
        frame.put_u64(7);
        frame.put_u8(kind::ENTRIES);
        frame.put_u32(1000);
        frame.put_bytes(0, 4000);
        let reason = "list longer than its frame";
        assert_eq!(decode::<Response>(&mut frame), Err(DecodeError::Malformed { id: Some(7), reason }));
    }

    #[test]
    fn attr_len_is_what_encode_writes() {
        let mut out = BytesMut::new();
        Attr::default().encode(&mut out);
        assert_eq!(out.len(), ATTR_LEN);
    }

    #[test]
    fn path_rules() {
        assert_eq!(components(b""), Ok(vec![]));
        assert_eq!(components(b"a/..data/b"), Ok(vec![&b"a"[..], b"..data", b"b"]));
        assert_eq!(components(b"a/../b"), Err(PathError::BadComponent));
        assert_eq!(components(b".."), Err(PathError::BadComponent));
        assert_eq!(components(b"a//b"), Err(PathError::BadComponent));
        assert_eq!(components(b"a/"), Err(PathError::BadComponent));
        assert_eq!(components(b"/etc"), Err(PathError::Absolute));
        assert_eq!(components(b"a\0b"), Err(PathError::Nul));
    }

    #[test]
    fn symlink_rules() {
        // What Kubernetes puts in configMap and secret volumes stays inside.
        assert!(symlink_stays_inside(&[], b"..data/key"));
        assert!(symlink_stays_inside(&[b"sub"], b"../x"));
        assert!(symlink_stays_inside(&[b"a", b"b"], b"./../../c"));
        assert!(!symlink_stays_inside(&[], b"../x"));
        assert!(!symlink_stays_inside(&[b"a"], b"../../x"));
        assert!(!symlink_stays_inside(&[b"a"], b"/etc/passwd"));
        assert!(!symlink_stays_inside(&[], b""));
    }

    #[test]
    fn mounts_env_roundtrip() {
        let json = r#"[{"name":"config","mountPath":"/etc/config","readOnly":true},
                       {"name":"data","mountPath":"/data","subPath":"x"}]"#;
        let mounts = parse_mounts(json).expect("valid");
        assert_eq!(mount_dir_name(0, &mounts[0].name), "0-config");
        assert_eq!(mount_dir_name(3, "a/b c"), "3-a_b_c");
        assert!(!mounts[1].read_only);
        assert_eq!(mounts[1].sub_path.as_deref(), Some("x"));
        assert_eq!(parse_mounts(&mounts_env_value(&mounts)).expect("valid"), mounts);
    }
}
