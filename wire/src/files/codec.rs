//! The frame codec of the file protocol: [`encode`], [`encode_head`] and
//! [`decode`], and each message's fields in a frame's body.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::*;

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
pub(super) const ATTR_LEN: usize = 88;

impl Attr {
    pub(super) fn encode(&self, out: &mut BytesMut) {
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

pub(super) mod kind {
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
    pub const CHANGED: u8 = 10;
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
            Changed { mount, dir, name } => {
                out.put_u8(kind::CHANGED);
                out.put_u16(*mount);
                put_bytes(out, dir);
                put_bytes(out, name);
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
            kind::CHANGED => Changed { mount: get_u16(b)?, dir: get_vec(b)?, name: get_vec(b)? },
            _ => return Err("unknown response kind"),
        })
    }
}
