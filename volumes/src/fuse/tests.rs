//! The FUSE client against the agent's real file service over loopback TCP,
//! with real FUSE mounts (these tests need root and /dev/fuse).

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tpd_wire::files::{self, Request, VolumeMount};

use super::{MountConfig, MountHandle, mount_all};
use crate::server as agent_files;

/// A pod-side tree (what the agent serves) and the local mounts of it.
/// Fields drop in order: unmount before the directories go.
pub struct Mounted {
    pub handle: Option<MountHandle>,
    /// Requests that reached the agent, by kind.
    pub requests: Requests,
    /// Plays the agent's replacement: see [`Mounted::replace_agent`].
    agent: Agent,
    pub shutdown: CancellationToken,
    pub local: tempfile::TempDir,
    pub pod: tempfile::TempDir,
}

impl Mounted {
    pub fn rw(&self) -> PathBuf {
        self.local.path().join("0-data")
    }
    pub fn ro(&self) -> PathBuf {
        self.local.path().join("1-config")
    }
    pub fn pod_rw(&self) -> PathBuf {
        self.pod.path().join("data")
    }
}

/// Serves `pod/data` (read-write) and `pod/config` (read-only) on a loopback
/// port and mounts them under `local`, with the cache on.
pub async fn mount_fixture() -> Mounted {
    mount_fixture_with(true).await
}

/// [`mount_fixture`] with `--volume-cache` on or off.
pub async fn mount_fixture_with(cache: bool) -> Mounted {
    let pod = tempfile::tempdir().expect("tempdir");
    let local = tempfile::tempdir().expect("tempdir");
    for d in ["data", "config", "outside"] {
        std::fs::create_dir(pod.path().join(d)).expect("mkdir");
    }
    std::fs::write(pod.path().join("config/app.yaml"), "level: debug\n").expect("write");
    std::fs::write(pod.path().join("outside/secret"), "pod secret").expect("write");
    let vm = |name: &str, read_only| VolumeMount {
        name: name.into(),
        mount_path: pod.path().join(name).to_string_lossy().into_owned(),
        read_only,
        sub_path: None,
    };
    let table = Arc::new(agent_files::MountTable::new(vec![vm("data", false), vm("config", true)]));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let server = listener.local_addr().expect("addr");
    let requests = Requests::default();
    let counted = requests.clone();
    let agent = Agent::default();
    let serving = agent.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            let Some(alive) = serving.current() else { continue };
            let _ = s.set_nodelay(true);
            let (client, agent) = tokio::io::duplex(4 * files::MAX_FRAME);
            // Each connection has handles of its own, as each agent process does.
            tokio::spawn(agent_files::serve_connection(agent, table.clone()));
            let relay = counting_relay(s, client, counted.clone());
            tokio::spawn(async move {
                tokio::select! { () = relay => {}, () = alive.cancelled() => {} }
            });
        }
    });
    let shutdown = CancellationToken::new();
    let cfg = MountConfig {
        retry_for: RETRY_FOR,
        agents: Some(agent.replaced.subscribe()),
        cache,
        ..MountConfig::new(server, local.path().to_path_buf())
    };
    let handle = mount_all(cfg, shutdown.clone()).await.expect("mount");
    Mounted { handle: Some(handle), requests, agent, shutdown, local, pod }
}

/// How long the fixture's mounts wait for a lost agent before EIO.
const RETRY_FOR: std::time::Duration = std::time::Duration::from_secs(3);

/// The fixture's agent: its connections live until it is replaced; while
/// it is down, new connections are closed at once. `replaced` plays the
/// sidecar's transport, which sees a new agent key.
#[derive(Debug, Clone)]
struct Agent {
    live: Arc<Mutex<Option<CancellationToken>>>,
    replaced: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Agent {
    fn default() -> Self {
        Agent { live: Arc::default(), replaced: Arc::new(tokio::sync::watch::Sender::new(0)) }
    }
}

impl Agent {
    /// The token of the live agent's connections, `None` while it is down.
    fn current(&self) -> Option<CancellationToken> {
        let mut slot = self.live.lock().expect("agent");
        let up = slot.as_ref().is_none_or(|t| !t.is_cancelled());
        up.then(|| slot.get_or_insert_with(CancellationToken::new).clone())
    }
}

impl Mounted {
    /// Ends every connection of the agent (its handles die with them) and,
    /// with `up`, lets the next connection in, as a replaced agent pod does.
    fn replace_agent(&self, up: bool) {
        let mut slot = self.agent.live.lock().expect("agent");
        if let Some(t) = slot.take() {
            t.cancel();
        }
        if !up {
            *slot = Some(CancellationToken::new());
            slot.as_ref().expect("set").cancel();
        }
        self.agent.replaced.send_modify(|n| *n += 1);
    }
}

/// How many requests of each kind the agent was sent.
#[derive(Debug, Clone, Default)]
pub struct Requests(Arc<Mutex<BTreeMap<&'static str, usize>>>);

impl Requests {
    /// The counts so far, and zero again.
    pub fn take(&self) -> BTreeMap<&'static str, usize> {
        std::mem::take(&mut *self.0.lock().expect("counts"))
    }
}

fn kind(r: &Request) -> &'static str {
    use Request::*;
    match r {
        Hello { .. } => "hello",
        Stat { .. } => "stat",
        ReadDir { .. } => "readdir",
        Open { .. } => "open",
        Create { .. } => "create",
        Read { .. } => "read",
        Write { .. } => "write",
        Release { .. } => "release",
        Fsync { .. } => "fsync",
        SetAttr { .. } => "setattr",
        Mkdir { .. } => "mkdir",
        Unlink { .. } => "unlink",
        Rmdir { .. } => "rmdir",
        Rename { .. } => "rename",
        Symlink { .. } => "symlink",
        Readlink { .. } => "readlink",
        Statfs { .. } => "statfs",
    }
}

/// Passes the client's frames on to the agent, counting them by kind, and
/// the agent's answers back unchanged.
/// Ends when either side does, closing the client's connection.
async fn counting_relay(client: TcpStream, agent: tokio::io::DuplexStream, requests: Requests) {
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_agent, mut to_agent) = tokio::io::split(agent);
    let answers = tokio::io::copy(&mut from_agent, &mut to_client);
    let requests = async move {
        let mut buf = BytesMut::new();
        loop {
            while let Ok(Some((id, req))) = files::decode::<Request>(&mut buf) {
                *requests.0.lock().expect("counts").entry(kind(&req)).or_default() += 1;
                let mut out = BytesMut::new();
                files::encode(id, &req, &mut out);
                if to_agent.write_all(&out).await.is_err() {
                    return;
                }
            }
            if from_client.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                return;
            }
        }
    };
    tokio::select! {
        _ = answers => {}
        () = requests => {}
    }
}

/// Runs blocking filesystem code off the runtime that serves the mount.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("join")
}

/// How soon a change made on the pod's side must show through a mount with
/// the cache on, over loopback: the agent's report, with room for a busy
/// test machine (docs/volumes.md: one trip from the agent).
pub const REPORTED: std::time::Duration = std::time::Duration::from_secs(2);

/// Polls `f` until it gives something, for at most `bound`; panics after.
pub fn within<T>(bound: std::time::Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "not seen within {bound:?}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

pub fn errno(r: std::io::Result<impl std::fmt::Debug>) -> i32 {
    r.expect_err("should fail").raw_os_error().expect("errno")
}

fn is_mounted(p: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(p.to_str().expect("utf8")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn posix_operations_through_fuse() {
    let m = mount_fixture().await;
    let (rw, ro, pod) = (m.rw(), m.ro(), m.pod_rw());
    blocking(move || {
        // Read what the pod has; write and see it in the pod.
        assert_eq!(std::fs::read_to_string(ro.join("app.yaml")).expect("read"), "level: debug\n");
        std::fs::write(rw.join("local.txt"), "from laptop").expect("write");
        assert_eq!(std::fs::read_to_string(pod.join("local.txt")).expect("pod side"), "from laptop");
        std::fs::write(pod.join("remote.txt"), "from pod").expect("write");
        assert_eq!(std::fs::read_to_string(rw.join("remote.txt")).expect("local side"), "from pod");

        // Directories, rename, listings with attributes.
        std::fs::create_dir(rw.join("d")).expect("mkdir");
        std::fs::rename(rw.join("local.txt"), rw.join("d/moved.txt")).expect("rename");
        assert_eq!(std::fs::read_to_string(rw.join("d/moved.txt")).expect("read moved"), "from laptop");
        let mut names: Vec<String> = std::fs::read_dir(&rw)
            .expect("readdir")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf8"))
            .collect();
        names.sort();
        assert_eq!(names, ["d", "remote.txt"]);
        assert_eq!(errno(std::fs::remove_dir(rw.join("d"))), 39, "ENOTEMPTY");
        assert_eq!(errno(std::fs::create_dir(rw.join("d"))), 17, "EEXIST");
        assert_eq!(errno(std::fs::read(rw.join("nope"))), 2, "ENOENT");

        // Truncate, seek and write in the middle, chmod, times.
        let mut f = std::fs::OpenOptions::new().read(true).write(true).open(rw.join("remote.txt")).expect("open");
        f.set_len(4).expect("truncate");
        f.seek(SeekFrom::Start(2)).expect("seek");
        f.write_all(b"XYZ").expect("write");
        f.seek(SeekFrom::Start(0)).expect("seek");
        let mut s = String::new();
        f.read_to_string(&mut s).expect("read");
        assert_eq!(s, "frXYZ");
        std::fs::set_permissions(rw.join("remote.txt"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(std::fs::metadata(pod.join("remote.txt")).expect("stat").mode() & 0o777, 0o600);
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
        f.set_modified(t).expect("utimens");
        assert_eq!(std::fs::metadata(pod.join("remote.txt")).expect("stat").mtime(), 1_000_000_000);

        // Symlinks inside the mount work; ones leaving it are refused.
        std::os::unix::fs::symlink("d/moved.txt", rw.join("link")).expect("symlink");
        assert_eq!(std::fs::read_to_string(rw.join("link")).expect("follow"), "from laptop");
        assert_eq!(errno(std::os::unix::fs::symlink("/etc/passwd", rw.join("abs"))), 13, "EACCES");
        std::os::unix::fs::symlink("../outside/secret", pod.join("escape")).expect("pod-side symlink");
        assert_eq!(errno(std::fs::read_link(rw.join("escape"))), 13, "EACCES");
        assert_eq!(errno(std::fs::read(rw.join("escape"))), 13, "EACCES");

        // Read-only volumes refuse every change with EROFS.
        assert_eq!(errno(std::fs::write(ro.join("app.yaml"), "x")), 30);
        assert_eq!(errno(std::fs::write(ro.join("new"), "x")), 30);
        assert_eq!(errno(std::fs::create_dir(ro.join("d"))), 30);
        assert_eq!(errno(std::fs::remove_file(ro.join("app.yaml"))), 30);

        std::fs::remove_file(rw.join("link")).expect("unlink");
        std::fs::remove_file(rw.join("d/moved.txt")).expect("unlink");
        std::fs::remove_dir(rw.join("d")).expect("rmdir");
        assert!(!pod.join("d").exists());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn large_files_and_concurrent_readers() {
    let m = mount_fixture().await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    // The kernel reads ahead several requests, not its 128 KiB default.
    let device = super::device_of(&std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo"), &rw)
        .expect("the mount's device");
    let window = std::fs::read_to_string(format!("/sys/class/bdi/{device}/read_ahead_kb")).expect("read_ahead_kb");
    assert_eq!(window.trim(), super::READ_AHEAD_KB.to_string(), "readahead of {device}");
    blocking(move || {
        // 32 MiB of non-repeating bytes, written locally in odd-sized chunks.
        let data: Vec<u8> = (0..32u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let mut f = std::fs::File::create(rw.join("big")).expect("create");
        for chunk in data.chunks(3 << 19) {
            f.write_all(chunk).expect("write");
        }
        drop(f);
        assert!(std::fs::read(pod.join("big")).expect("pod read") == data, "pod sees the same bytes");
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let p = rw.join("big");
                std::thread::spawn(move || std::fs::read(p).expect("read"))
            })
            .collect();
        for r in readers {
            assert!(r.join().expect("reader") == data, "every reader sees the same bytes");
        }
    })
    .await;
}

#[test]
fn the_device_of_a_mount_point_is_read_from_mountinfo() {
    let table = "29 1 253:1 / / rw - ext4 /dev/vda rw\n\
                 64 42 0:59 / /tpd/volumes/0-my\\040data rw,nosuid - fuse tpd:my rw\n\
                 65 64 0:61 / /tpd/volumes/0-my\\040data rw - fuse tpd:my rw\n";
    assert_eq!(super::device_of(table, Path::new("/tpd/volumes/0-my data")).as_deref(), Some("0:61"), "the top mount");
    assert_eq!(super::device_of(table, Path::new("/")).as_deref(), Some("253:1"));
    assert_eq!(super::device_of(table, Path::new("/tpd/volumes")), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn unmounts_on_shutdown_and_drop() {
    let mut m = mount_fixture().await;
    let (rw, ro) = (m.rw(), m.ro());
    assert!(is_mounted(&rw) && is_mounted(&ro));
    m.shutdown.cancel();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while (is_mounted(&rw) || is_mounted(&ro)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(!is_mounted(&rw) && !is_mounted(&ro), "shutdown unmounts");

    let m2 = mount_fixture().await;
    let rw2 = m2.rw();
    assert!(is_mounted(&rw2));
    drop(m2);
    assert!(!is_mounted(&rw2), "drop unmounts");
    m.handle.take();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn lookups_from_listings_stay_correct() {
    let m = mount_fixture().await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    blocking(move || {
        std::fs::create_dir(pod.join("many")).expect("mkdir");
        for i in 0..20 {
            std::fs::write(pod.join(format!("many/f{i}")), vec![b'x'; i]).expect("write");
        }
        // Enough lookups in one directory that it is listed and answered locally.
        for i in 0..20 {
            assert_eq!(std::fs::metadata(rw.join(format!("many/f{i}"))).expect("stat").len(), i as u64);
        }
        // Names the listing does not have are found: made locally at once,
        // made in the pod once the agent reports them.
        std::fs::write(rw.join("many/new-local"), "l").expect("write");
        assert_eq!(std::fs::metadata(rw.join("many/new-local")).expect("stat").len(), 1);
        std::fs::write(pod.join("many/new-in-pod"), "p").expect("write");
        within(REPORTED, || std::fs::read_to_string(rw.join("many/new-in-pod")).ok().filter(|s| s == "p"));
        // A local change drops the listing at once; a pod-side one once reported.
        std::fs::write(rw.join("many/f3"), "changed locally").expect("write");
        assert_eq!(std::fs::metadata(rw.join("many/f3")).expect("stat").len(), 15);
        std::fs::write(pod.join("many/f4"), "changed in the pod").expect("write");
        within(REPORTED, || std::fs::read_to_string(rw.join("many/f4")).ok().filter(|s| s == "changed in the pod"));
        std::fs::remove_file(pod.join("many/f5")).expect("rm");
        within(REPORTED, || super::cache_tests::gone(&rw.join("many/f5")));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn a_small_file_costs_one_round_trip() {
    let m = mount_fixture().await;
    let (rw, pod, requests) = (m.rw(), m.pod_rw(), m.requests.clone());
    blocking(move || {
        std::fs::write(pod.join("small"), "0123456789").expect("write");
        std::fs::metadata(rw.join("small")).expect("stat");
        requests.take();
        // What `cat` does: open, read until end of file, close.
        assert_eq!(std::fs::read(rw.join("small")).expect("read"), b"0123456789");
        // Releases are sent after close returns: wait for that one to arrive.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
        while !seen.contains_key("release") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            for (k, n) in requests.take() {
                *seen.entry(k).or_default() += n;
            }
        }
        eprintln!("requests for one small file: {seen:?}");
        assert_eq!(seen, BTreeMap::from([("open", 1), ("release", 1)]), "the read is answered from the open");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn content_sent_with_an_open_is_never_staler_than_a_local_write() {
    let m = mount_fixture().await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    blocking(move || {
        std::fs::write(pod.join("f"), "version 1").expect("write");
        let mut reader = std::fs::File::open(rw.join("f")).expect("open");
        // Written through another handle after the reader's open: the reader sees it.
        let mut writer = std::fs::OpenOptions::new().write(true).open(rw.join("f")).expect("open for writing");
        writer.write_all(b"VERSION 2").expect("write");
        let mut s = String::new();
        reader.read_to_string(&mut s).expect("read");
        assert_eq!(s, "VERSION 2");
        // A handle opened for reading and writing reads what it wrote.
        let mut both = std::fs::OpenOptions::new().read(true).write(true).open(rw.join("f")).expect("open rw");
        both.write_all(b"v3").expect("write");
        both.seek(SeekFrom::Start(0)).expect("seek");
        let mut s = String::new();
        both.read_to_string(&mut s).expect("read");
        assert_eq!(s, "v3RSION 2");
        // A change made in the pod shows after a reopen.
        std::fs::write(pod.join("f"), "from the pod").expect("write");
        std::thread::sleep(super::HEAD_TTL + std::time::Duration::from_millis(200));
        assert_eq!(std::fs::read_to_string(rw.join("f")).expect("reopen"), "from the pod");
    })
    .await;
}

/// A tmpfs of `size` mounted at `dir` for one test; unmounted on drop, so a
/// failing test leaves no mount behind.
struct SmallVolume(PathBuf);

impl SmallVolume {
    fn mount(dir: PathBuf, size: &str) -> Self {
        std::fs::create_dir(&dir).expect("mkdir");
        let options = std::ffi::CString::new(format!("size={size}")).expect("options");
        rustix::mount::mount("tmpfs", &dir, "tmpfs", rustix::mount::MountFlags::empty(), options.as_c_str())
            .expect("mount tmpfs");
        SmallVolume(dir)
    }
}

impl Drop for SmallVolume {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
    }
}

/// What `close(2)` returned, which dropping a `File` throws away.
fn close(f: std::fs::File) -> std::io::Result<()> {
    use std::os::fd::IntoRawFd;
    // SAFETY: the descriptor was just taken from the File, so it is open and ours alone.
    match unsafe { libc::close(f.into_raw_fd()) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn a_failed_deferred_write_is_reported_by_close_and_fsync() {
    let m = mount_fixture().await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    let _full = SmallVolume::mount(pod.join("full"), "256k");
    blocking(move || {
        let mb = vec![7u8; 1 << 20];
        // The write is answered before the pod has run out of room; the
        // error must not be lost: it comes back at the latest from close.
        let mut f = std::fs::File::create(rw.join("full/a")).expect("create");
        if let Err(e) = f.write_all(&mb) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
        }
        assert_eq!(errno(close(f)), libc::ENOSPC, "close reports the failed write");
        std::fs::remove_file(pod.join("full/a")).expect("free the room");

        let mut f = std::fs::File::create(rw.join("full/b")).expect("create");
        let _ = f.write_all(&mb);
        assert_eq!(errno(f.sync_all()), libc::ENOSPC, "fsync reports the failed write");
        assert_eq!(errno(close(f)), libc::ENOSPC, "and so does close");

        // A file that fits is written whole, and its close succeeds.
        std::fs::remove_file(pod.join("full/b")).expect("free the room");
        let mut f = std::fs::File::create(rw.join("full/c")).expect("create");
        f.write_all(&mb[..100 << 10]).expect("write");
        close(f).expect("close");
        assert!(std::fs::read(pod.join("full/c")).expect("pod read") == mb[..100 << 10], "the file that fits");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn deferred_writes_land_in_order_and_are_seen_by_every_later_request() {
    let m = mount_fixture().await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    blocking(move || {
        use std::os::unix::fs::FileExt;
        // The same bytes rewritten many times: the pod keeps the last.
        let f = std::fs::File::create(rw.join("same")).expect("create");
        for i in 0..200u8 {
            f.write_all_at(&[i; 4096], 0).expect("write");
        }
        close(f).expect("close");
        let got = std::fs::read(pod.join("same")).expect("pod read");
        assert!(got == [199u8; 4096], "the pod has rewrite {:?} of 199", got.first());

        // Written through one handle and not yet closed: another open, a
        // stat and a listing all see the whole file.
        let data: Vec<u8> = (0..6u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 11) as u8).collect();
        let mut f = std::fs::File::create(rw.join("open")).expect("create");
        f.write_all(&data).expect("write");
        assert!(std::fs::read(rw.join("open")).expect("read through another open") == data, "another open");
        assert!(std::fs::read(pod.join("open")).expect("pod read after an open") == data, "the pod after an open");
        let listed = std::fs::read_dir(&rw)
            .expect("readdir")
            .map(|e| e.expect("entry"))
            .find(|e| e.file_name() == "open")
            .expect("listed");
        assert_eq!(listed.metadata().expect("stat").len(), data.len() as u64);
        close(f).expect("close");

        // Appends are deferred too, and land in the order written.
        let mut log = std::fs::OpenOptions::new().create(true).append(true).open(rw.join("log")).expect("open");
        for i in 0..500 {
            writeln!(log, "line {i}").expect("append");
        }
        close(log).expect("close");
        let want: String = (0..500).map(|i| format!("line {i}\n")).collect();
        let got = std::fs::read_to_string(pod.join("log")).expect("pod read");
        assert!(got == want, "appends out of order: {:?}", got.lines().take(20).collect::<Vec<_>>());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root and /dev/fuse; `cargo xtask test` runs it"]
async fn open_files_and_new_requests_survive_a_replaced_agent() {
    let m = mount_fixture().await;
    let (rw, pod) = (m.rw(), m.pod_rw());
    let data: Vec<u8> = (0..1u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(pod.join("kept"), &data).expect("pod write");
    let (reader, writer) = blocking({
        let rw = rw.clone();
        move || {
            let mut reader = std::fs::File::open(rw.join("kept")).expect("open");
            let mut first = vec![0u8; 4096];
            reader.read_exact(&mut first).expect("read before");
            let mut writer = std::fs::File::create(rw.join("written")).expect("create");
            writer.write_all(b"before ").expect("write before");
            (reader, writer)
        }
    })
    .await;

    m.replace_agent(true);
    let here = rw.clone();
    blocking(move || {
        // The open files go on through the new connection, where they are
        // opened again; the file written before and after is whole.
        let (mut reader, mut writer) = (reader, writer);
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).expect("read after the agent was replaced");
        assert!(rest == data[4096..], "the rest of an open file, read through the new agent");
        writer.write_all(b"after").expect("write after");
        close(writer).expect("close after");
        assert_eq!(std::fs::read(pod.join("written")).expect("pod read"), b"before after");
        std::fs::write(here.join("new"), "new").expect("a new file after the agent was replaced");
        assert_eq!(std::fs::read_to_string(pod.join("new")).expect("pod read"), "new");
    })
    .await;

    // With no agent coming back, a request fails with EIO after the deadline.
    m.replace_agent(false);
    let started = std::time::Instant::now();
    let gone = blocking(move || std::fs::metadata(rw.join("never-looked-up"))).await;
    assert_eq!(errno(gone), libc::EIO, "no agent within the deadline");
    assert!(started.elapsed() >= RETRY_FOR, "EIO came only after the deadline ({:?})", started.elapsed());
}
