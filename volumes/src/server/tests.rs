//! The file server driven in memory: a real directory tree, the real codec
//! over a duplex pipe, the checks a client would make.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tpd_wire::files::{self, FILES_VERSION, Request, Response, VolumeMount};

use super::{MountTable, serve_connection};

const ENOENT: i32 = 2;
const EACCES: i32 = 13;
const EEXIST: i32 = 17;
const ENOTDIR: i32 = 20;
const ELOOP: i32 = 40;
const EROFS: i32 = 30;
const ENOTEMPTY: i32 = 39;

struct Client {
    io: DuplexStream,
    buf: BytesMut,
    next: u64,
}

impl Client {
    async fn call(&mut self, req: Request) -> Response {
        self.next += 1;
        let mut out = BytesMut::new();
        files::encode(self.next, &req, &mut out);
        self.io.write_all(&out).await.expect("write");
        self.recv(self.next).await
    }

    async fn recv(&mut self, want: u64) -> Response {
        let (id, resp) = self.next_answer().await;
        assert_eq!(id, want);
        resp
    }

    /// The next answer, whichever request it is for; change reports
    /// pushed meanwhile are skipped.
    async fn next_answer(&mut self) -> (u64, Response) {
        loop {
            match self.next_message().await {
                (files::PUSHED, Response::Changed { .. }) => continue,
                answer => return answer,
            }
        }
    }

    /// The next message from the server, pushed ones included.
    async fn next_message(&mut self) -> (u64, Response) {
        loop {
            if let Some(answer) = files::decode::<Response>(&mut self.buf).expect("decodable") {
                return answer;
            }
            assert!(self.io.read_buf(&mut self.buf).await.expect("read") > 0, "server closed");
        }
    }
}

/// A tree with a writable and a read-only mount, and an outside directory
/// that symlinks in the mounts point at.
struct Fixture {
    _dir: tempfile::TempDir,
    outside: std::path::PathBuf,
    rw: std::path::PathBuf,
}

fn fixture() -> (Fixture, Arc<MountTable>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (rw, ro, outside) = (dir.path().join("rw"), dir.path().join("ro"), dir.path().join("outside"));
    for d in [&rw, &ro, &outside] {
        std::fs::create_dir(d).expect("mkdir");
    }
    std::fs::write(outside.join("secret"), "outside").expect("write");
    std::fs::write(rw.join("hello"), "hello world").expect("write");
    std::fs::create_dir(rw.join("sub")).expect("mkdir");
    std::fs::write(rw.join("sub/inner"), "x").expect("write");
    std::os::unix::fs::symlink(&outside, rw.join("abs-dir")).expect("symlink");
    std::os::unix::fs::symlink("../outside/secret", rw.join("rel-escape")).expect("symlink");
    std::os::unix::fs::symlink("sub/inner", rw.join("inside")).expect("symlink");
    std::fs::write(ro.join("config"), "key=value").expect("write");
    let mount = |name: &str, path: &std::path::Path, read_only| VolumeMount {
        name: name.into(),
        mount_path: path.to_string_lossy().into_owned(),
        read_only,
        sub_path: None,
    };
    let table = MountTable::new(vec![mount("rw", &rw, false), mount("ro", &ro, true)]);
    (Fixture { _dir: dir, outside, rw }, Arc::new(table))
}

async fn connect(table: Arc<MountTable>) -> Client {
    let (a, b) = tokio::io::duplex(1 << 20);
    tokio::spawn(serve_connection(b, table));
    let mut c = Client { io: a, buf: BytesMut::new(), next: 0 };
    match c.call(Request::Hello { version: FILES_VERSION }).await {
        Response::Welcome { version, mounts } => {
            assert_eq!(version, FILES_VERSION);
            assert_eq!(mounts.len(), 2);
            assert!(mounts[1].read_only);
        }
        other => panic!("expected welcome, got {other:?}"),
    }
    c
}

fn p(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

async fn open(c: &mut Client, mount: u16, path: &str, flags: u32) -> Result<u64, i32> {
    match c.call(Request::Open { mount, path: p(path), flags }).await {
        Response::Opened { handle, .. } => Ok(handle),
        Response::Error(e) => Err(e),
        other => panic!("unexpected {other:?}"),
    }
}

fn errno(r: Response) -> i32 {
    match r {
        Response::Error(e) => e,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn reads_writes_and_lists() {
    let (fx, table) = fixture();
    let mut c = connect(table).await;
    let h = open(&mut c, 0, "hello", 0).await.expect("open");
    assert_eq!(c.call(Request::Read { handle: h, offset: 6, size: 100 }).await, Response::Data(Bytes::from("world")));
    assert_eq!(c.call(Request::Release { handle: h }).await, Response::Ok);

    let h = match c.call(Request::Create { mount: 0, path: p("sub/new"), mode: 0o640, flags: 2 }).await {
        Response::Opened { handle, attr, data } => {
            assert_eq!(attr.mode & 0o777, 0o640);
            assert_eq!(data, None, "nothing to send with a file made for writing");
            handle
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(c.call(Request::Write { handle: h, offset: 0, data: Bytes::from("data") }).await, Response::Written(4));
    assert_eq!(c.call(Request::Release { handle: h }).await, Response::Ok);
    assert_eq!(std::fs::read_to_string(fx.rw.join("sub/new")).expect("written"), "data");

    match c.call(Request::ReadDir { mount: 0, path: p(""), cursor: 0 }).await {
        Response::Entries { entries, next } => {
            assert_eq!(next, None);
            let mut names: Vec<_> = entries.iter().map(|e| String::from_utf8_lossy(&e.name).into_owned()).collect();
            names.sort();
            assert_eq!(names, ["abs-dir", "hello", "inside", "rel-escape", "sub"]);
            let hello = entries.iter().find(|e| e.name == b"hello").expect("hello");
            assert_eq!(hello.attr.size, 11);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(c.call(Request::Readlink { mount: 0, path: p("inside") }).await, Response::Link(p("sub/inner")));
}

#[tokio::test]
async fn small_files_opened_for_reading_come_with_their_content() {
    let (fx, table) = fixture();
    let big = vec![7u8; files::OPEN_DATA_MAX as usize + 1];
    std::fs::write(fx.rw.join("big"), &big).expect("write");
    let mut c = connect(table).await;
    let opened = |path: &str, flags| Request::Open { mount: 0, path: p(path), flags };
    match c.call(opened("hello", 0)).await {
        Response::Opened { data, .. } => assert_eq!(data, Some(Bytes::from("hello world"))),
        other => panic!("{other:?}"),
    }
    // Opened for writing, the content could change under the client: none.
    for (path, flags) in [("hello", 2), ("hello", 1), ("big", 0), ("sub", 0o200000)] {
        match c.call(opened(path, flags)).await {
            Response::Opened { data, .. } => assert_eq!(data, None, "{path} with flags {flags:o}"),
            other => panic!("{path}: {other:?}"),
        }
    }
    // The handle still reads past what came with the open.
    let h = open(&mut c, 0, "big", 0).await.expect("open");
    let tail = c.call(Request::Read { handle: h, offset: files::OPEN_DATA_MAX.into(), size: 10 }).await;
    assert_eq!(tail, Response::Data(Bytes::from(vec![7u8])));
}

#[tokio::test]
async fn refuses_traversal_and_escaping_symlinks() {
    let (fx, table) = fixture();
    let mut c = connect(table).await;
    for path in ["../outside/secret", "sub/../../outside/secret", "/etc/passwd", "sub//inner", "./hello"] {
        assert_eq!(errno(c.call(Request::Stat { mount: 0, path: p(path) }).await), EACCES, "{path}");
    }
    // A symlinked directory is never walked through.
    assert_eq!(errno(c.call(Request::Stat { mount: 0, path: p("abs-dir/secret") }).await), ENOTDIR);
    assert_eq!(open(&mut c, 0, "abs-dir/secret", 0).await, Err(ENOTDIR));
    // A symlink as the last component is never opened.
    assert_eq!(open(&mut c, 0, "rel-escape", 0).await, Err(ELOOP));
    // Escaping targets are not even shown, nor made.
    assert_eq!(errno(c.call(Request::Readlink { mount: 0, path: p("abs-dir") }).await), EACCES);
    assert_eq!(errno(c.call(Request::Readlink { mount: 0, path: p("rel-escape") }).await), EACCES);
    let made = Request::Symlink { mount: 0, path: p("evil"), target: p("/etc") };
    assert_eq!(errno(c.call(made).await), EACCES);
    let made = Request::Symlink { mount: 0, path: p("sub/evil"), target: p("../../outside") };
    assert_eq!(errno(c.call(made).await), EACCES);
    // Creating through a symlinked directory fails too, and writes nothing.
    let create = Request::Create { mount: 0, path: p("abs-dir/planted"), mode: 0o644, flags: 1 };
    assert_eq!(errno(c.call(create).await), ENOTDIR);
    assert!(!fx.outside.join("planted").exists());
    // An unknown mount index is just missing.
    assert_eq!(errno(c.call(Request::Stat { mount: 9, path: p("") }).await), ENOENT);
}

#[tokio::test]
async fn read_only_mounts_refuse_changes() {
    let (_fx, table) = fixture();
    let mut c = connect(table).await;
    assert!(open(&mut c, 1, "config", 0).await.is_ok());
    assert_eq!(open(&mut c, 1, "config", 1).await, Err(EROFS));
    assert_eq!(open(&mut c, 1, "config", 0o1000).await, Err(EROFS), "O_TRUNC");
    let writes = [
        Request::Create { mount: 1, path: p("new"), mode: 0o644, flags: 1 },
        Request::Mkdir { mount: 1, path: p("d"), mode: 0o755 },
        Request::Unlink { mount: 1, path: p("config") },
        Request::Rename { mount: 1, from: p("config"), to: p("c2"), flags: 0 },
        Request::Symlink { mount: 1, path: p("l"), target: p("config") },
        Request::SetAttr {
            mount: 1,
            path: p("config"),
            handle: None,
            set: files::SetAttr { mode: Some(0o600), ..Default::default() },
        },
    ];
    for w in writes {
        assert_eq!(errno(c.call(w.clone()).await), EROFS, "{w:?}");
    }
}

#[tokio::test]
async fn maps_errnos() {
    let (_fx, table) = fixture();
    let mut c = connect(table).await;
    assert_eq!(errno(c.call(Request::Stat { mount: 0, path: p("nope") }).await), ENOENT);
    assert_eq!(errno(c.call(Request::Mkdir { mount: 0, path: p("sub"), mode: 0o755 }).await), EEXIST);
    assert_eq!(errno(c.call(Request::Rmdir { mount: 0, path: p("sub") }).await), ENOTEMPTY);
    let excl = Request::Create { mount: 0, path: p("hello"), mode: 0o644, flags: 1 | 0o200 };
    assert_eq!(errno(c.call(excl).await), EEXIST);
    // Set size and mode through the path, then see them.
    let set = files::SetAttr { size: Some(3), mode: Some(0o600), ..Default::default() };
    match c.call(Request::SetAttr { mount: 0, path: p("hello"), handle: None, set }).await {
        Response::Attr(a) => assert_eq!((a.size, a.mode & 0o777), (3, 0o600)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.call(Request::Rename { mount: 0, from: p("hello"), to: p("sub/hello"), flags: 0 }).await,
        Response::Ok
    );
    assert_eq!(c.call(Request::Unlink { mount: 0, path: p("sub/hello") }).await, Response::Ok);
    assert_eq!(errno(c.call(Request::Read { handle: 999, offset: 0, size: 1 }).await), 9, "EBADF");
}

/// Whether this process has a descriptor open on `path`.
fn is_open(path: &std::path::Path) -> bool {
    let fds = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd");
    // A descriptor closed while we look has no link left: not ours.
    fds.flatten().filter_map(|fd| std::fs::read_link(fd.path()).ok()).any(|target| target == path)
}

/// A release must take effect before the next request of the connection is
/// served: the pod's space of a removed file is free only once its
/// descriptor is closed, and the client answered the close long before.
/// Here the one thread of the blocking pool is held busy, as a loaded
/// machine may leave it unscheduled, so nothing may wait for it.
#[test]
fn a_release_takes_effect_before_the_next_request_is_served() {
    let rt = tokio::runtime::Builder::new_current_thread().max_blocking_threads(1).enable_all().build().expect("rt");
    rt.block_on(async {
        let (fx, table) = fixture();
        let mut c = connect(table).await;
        let path = fx.rw.canonicalize().expect("canonical").join("hello");
        let h = open(&mut c, 0, "hello", 1).await.expect("open");
        assert!(is_open(&path), "the agent holds the opened file");
        let (gate, held) = std::sync::mpsc::channel::<()>();
        let busy = tokio::task::spawn_blocking(move || held.recv());
        // Release and the next request in one batch, as the sidecar sends
        // them when a program closes a file and goes on at once.
        let mut out = BytesMut::new();
        files::encode(c.next + 1, &Request::Release { handle: h }, &mut out);
        files::encode(c.next + 2, &Request::Stat { mount: 0, path: p("hello") }, &mut out);
        c.next += 2;
        c.io.write_all(&out).await.expect("write");
        let mut released = None;
        let stat = loop {
            match c.next_answer().await {
                (id, resp) if id == c.next => break resp,
                (_, resp) => released = Some(resp),
            }
        };
        assert!(matches!(stat, Response::Attr(_)), "{stat:?}");
        assert!(!is_open(&path), "the next request was answered before the release took effect");
        drop(gate);
        busy.await.expect("join").expect_err("gate dropped");
        let released = match released {
            Some(r) => r,
            None => c.recv(c.next - 1).await,
        };
        assert_eq!(released, Response::Ok);
    });
}

#[tokio::test]
async fn malformed_frames_get_eproto_and_the_stream_goes_on() {
    let (_fx, table) = fixture();
    let mut c = connect(table).await;
    // A frame with a valid id and an unknown kind.
    let mut raw = BytesMut::new();
    raw.extend_from_slice(&9u32.to_be_bytes());
    raw.extend_from_slice(&42u64.to_be_bytes());
    raw.extend_from_slice(&[0xee]);
    c.io.write_all(&raw).await.expect("write");
    assert_eq!(c.recv(42).await, Response::Error(files::EPROTO));
    assert!(matches!(c.call(Request::Stat { mount: 0, path: p("hello") }).await, Response::Attr(_)));
}

#[tokio::test]
async fn version_mismatch_is_refused() {
    let (_fx, table) = fixture();
    let (a, b) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(serve_connection(b, table));
    let mut c = Client { io: a, buf: BytesMut::new(), next: 0 };
    assert_eq!(c.call(Request::Hello { version: FILES_VERSION + 1 }).await, Response::Error(files::EPROTO));
    let err = server.await.expect("join").expect_err("mismatch");
    assert!(err.to_string().contains("version mismatch"), "{err}");
}
