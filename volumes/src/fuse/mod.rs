//! The remote volumes, FUSE-mounted in the sidecar.
//!
//! Once the tunnel is up, [`mount_all`] connects to the agent's file service
//! (a plain TCP connection that the sidecar's TUN carries), learns the served
//! mounts and mounts each at `SIDECAR_VOLUMES_DIR/<index>-<name>`. That
//! directory is a host directory bind-mounted with rshared propagation, so
//! the mounts appear on the host and, through rslave binds, in the
//! developer's container (see the CLI's `mounts.rs` and docs/volumes.md).
//!
//! The mount is made with mount(2) directly (fuser's pure-Rust path, possible
//! because the sidecar has SYS_ADMIN and /dev/fuse), so the scratch image
//! needs no fusermount. Unmounting is lazy (MNT_DETACH) and happens when the
//! shutdown token fires, when the [`MountHandle`] is dropped, and, for
//! leftovers of a sidecar that was SIGKILLed, at the next start or from
//! [`release`] (`tpd-sidecar release-volumes`), which the CLI's cleanup runs
//! in a helper container.

mod attr;
mod cache;
#[cfg(test)]
mod cache_tests;
mod client;
mod fs;
mod heads;
mod listing;
mod path;
mod readahead;
#[cfg(test)]
mod tests;
mod writes;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, Session, SessionACL};
use tokio_util::sync::CancellationToken;
use tpd_wire::{files, names};

use attr::Lifetimes;
pub use client::FileClient;
use fs::VolumeFs;
#[cfg(test)]
use heads::HEAD_TTL;
use heads::Heads;
pub use readahead::READ_AHEAD_KB;

#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("cannot reach the agent's file service at {addr}; is the tunnel up?")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's file service did not answer within {0:?}")]
    Timeout(Duration),
    #[error("file protocol version mismatch (agent speaks {0:?}, this sidecar {v}); run the same tpd version for both", v = files::FILES_VERSION)]
    VersionMismatch(Option<u16>),
    #[error("file protocol error: {0}")]
    Protocol(String),
    #[error("cannot FUSE-mount volume {name} at {path}: does the sidecar have SYS_ADMIN and /dev/fuse?")]
    Mount {
        name: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where to find the agent and where to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// The agent's file service; [`MountConfig::in_tunnel`] uses its tunnel address.
    pub server: SocketAddr,
    /// The directory holding one mount point per volume.
    pub root: PathBuf,
    /// How long a request waits for a lost connection to the agent to come
    /// back before the program gets EIO.
    pub retry_for: Duration,
    /// Changes when the agent is replaced (the sidecar's transport sees a
    /// new agent key): the file connection is dialled anew at once.
    pub agents: Option<tokio::sync::watch::Receiver<u64>>,
    /// `--volume-cache`: keep names, attributes and missing names until the
    /// agent reports a change (see `cache`); off, the kernel keeps nothing.
    pub cache: bool,
}

/// How long requests wait for the agent by default (`--volume-timeout`).
pub const RETRY_FOR: Duration = Duration::from_secs(30);

impl MountConfig {
    /// `server`'s volumes under `root`, waiting [`RETRY_FOR`] for a lost connection.
    pub fn new(server: SocketAddr, root: PathBuf) -> Self {
        MountConfig { server, root, retry_for: RETRY_FOR, agents: None, cache: true }
    }

    /// The agent's file service inside the tunnel, mounts under `SIDECAR_VOLUMES_DIR`.
    pub fn in_tunnel() -> Self {
        let server = SocketAddr::from((names::AGENT_TUNNEL_IP, names::AGENT_FILES_PORT));
        MountConfig::new(server, PathBuf::from(files::SIDECAR_VOLUMES_DIR))
    }
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// The mounted volumes; unmounted on [`MountHandle::unmount`], on drop and
/// when the shutdown token given to [`mount_all`] fires.
#[derive(Debug)]
pub struct MountHandle {
    sessions: Arc<Mutex<Vec<(PathBuf, BackgroundSession)>>>,
    client: FileClient,
}

impl MountHandle {
    /// Where each volume is mounted, in the agent's order.
    pub fn paths(&self) -> Vec<PathBuf> {
        lock(&self.sessions).iter().map(|(p, _)| p.clone()).collect()
    }

    /// Unmounts every volume off the async runtime (the e2e tests' mount
    /// fixture awaits it; the sidecar relies on Drop).
    pub async fn unmount(self) {
        self.report();
        let sessions = std::mem::take(&mut *lock(&self.sessions));
        let _ = tokio::task::spawn_blocking(move || unmount_sessions(sessions)).await;
    }

    /// Logs how many requests the mounts sent: the volume benchmarks read
    /// it for a workload's round trips.
    fn report(&self) {
        tracing::info!(requests = self.client.requests(), "file requests sent over the mounts' life");
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if !lock(&self.sessions).is_empty() {
            self.report();
        }
        unmount_sessions(std::mem::take(&mut *lock(&self.sessions)));
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Unmounts lazily (MNT_DETACH, propagated to the host and the developer's
/// container). The FUSE threads are not joined: one whose mount is still in
/// use somewhere ends when the process exits and its /dev/fuse closes.
fn unmount_sessions(sessions: Vec<(PathBuf, BackgroundSession)>) {
    for (path, session) in sessions {
        drop(session);
        tracing::debug!(path = %path.display(), "volume unmounted");
    }
}

/// Connects to the agent and mounts every volume it serves. Call it once the
/// tunnel is up; the mounts live until `shutdown` fires or the handle drops.
pub async fn mount_all(cfg: MountConfig, shutdown: CancellationToken) -> Result<MountHandle, FuseError> {
    let redial = client::Redial { server: cfg.server, retry_for: cfg.retry_for, agents: cfg.agents };
    let (client, mounts) = FileClient::connect(redial, CONNECT_TIMEOUT).await?;
    mount_with(client, &mounts, &cfg.root, Lifetimes::new(cfg.cache), shutdown).await
}

/// Mounts each of `mounts` under `root` through `client`, keeping entries
/// for `lifetimes`.
pub async fn mount_with(
    client: FileClient,
    mounts: &[files::MountInfo],
    root: &Path,
    lifetimes: Lifetimes,
    shutdown: CancellationToken,
) -> Result<MountHandle, FuseError> {
    unmount_under(root);
    let handle = MountHandle { sessions: Arc::new(Mutex::new(Vec::new())), client: client.clone() };
    let heads = Arc::new(Mutex::new(Heads::default()));
    let mut invalidators = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let path = root.join(files::mount_dir_name(i, &m.name));
        let index = u16::try_from(i).map_err(|_| FuseError::Protocol("too many mounts".into()))?;
        let fs = VolumeFs::new(index, client.clone(), heads.clone(), tokio::runtime::Handle::current(), lifetimes);
        let invalidator = fs.invalidator();
        let config = mount_config(m);
        let at = path.clone();
        // Mounting waits for the kernel's INIT: keep it off the async threads.
        let session = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&at)?;
            let session = Session::new(fs, &at, &config)?;
            let notifier = session.notifier();
            let session = session.spawn()?;
            readahead::widen(&at);
            Ok((session, notifier))
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r)
        .map_err(|source| FuseError::Mount { name: m.name.clone(), path: path.clone(), source })?;
        tracing::info!(volume = %m.name, path = %path.display(), read_only = m.read_only, "volume mounted");
        lock(&handle.sessions).push((path, session.0));
        invalidators.push((invalidator, session.1));
    }
    // With the cache off the kernel keeps nothing, so reports are dropped.
    if let Some(changes) = client.take_changes().filter(|_| !lifetimes.entry.is_zero()) {
        std::thread::Builder::new()
            .name("tpd-volumes-invalidate".into())
            .spawn(move || cache::apply(changes, &invalidators))
            .map_err(|source| FuseError::Mount { name: "(all)".into(), path: root.to_path_buf(), source })?;
    }
    let sessions = handle.sessions.clone();
    tokio::spawn(async move {
        shutdown.cancelled().await;
        let taken = std::mem::take(&mut *lock(&sessions));
        let _ = tokio::task::spawn_blocking(move || unmount_sessions(taken)).await;
    });
    Ok(handle)
}

fn mount_config(m: &files::MountInfo) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("tpd:{}", m.name)),
        MountOption::Subtype("tpd".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        if m.read_only { MountOption::RO } else { MountOption::RW },
    ];
    // The developer's container may run as any uid.
    config.acl = SessionACL::All;
    config
}

/// Lazily unmounts every mount below `root`: the dead FUSE mounts a killed
/// sidecar left (they stay, "transport endpoint is not connected", until
/// someone unmounts them). Run at start and by a cleanup helper that binds
/// the same host directory; with rshared propagation the host's copies go
/// too. Returns how many were unmounted.
pub fn unmount_under(root: &Path) -> usize {
    let Ok(table) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return 0;
    };
    let mut below: Vec<PathBuf> = mount_points_below(&table, root);
    // Deepest first, so nested mounts go before their parents.
    below.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    below
        .into_iter()
        .filter(|p| match rustix::mount::unmount(p, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => {
                tracing::info!(path = %p.display(), "removed a leftover volume mount");
                true
            }
            Err(e) => {
                tracing::warn!(path = %p.display(), error = %e, "cannot remove a leftover volume mount");
                false
            }
        })
        .count()
}

/// `tpd-sidecar release-volumes`: what the CLI's cleanup runs in a short
/// helper container (SYS_ADMIN, the session's volume directory bound
/// rshared at `root`) when a sidecar died without unmounting (SIGKILL, OOM,
/// `docker rm -f`): unmounts every leftover mount below `root`, which
/// propagates to the host, so the directory can be removed. Prints one line
/// and fails when a mount is still there afterwards.
pub fn release(root: &Path) -> std::process::ExitCode {
    let removed = unmount_under(root);
    let left =
        std::fs::read_to_string("/proc/self/mountinfo").map(|t| mount_points_below(&t, root)).unwrap_or_default();
    if left.is_empty() {
        println!("released {removed} volume mounts under {}", root.display());
        std::process::ExitCode::SUCCESS
    } else {
        let left: Vec<String> = left.iter().map(|p| p.display().to_string()).collect();
        println!("released {removed} volume mounts under {}; still mounted: {}", root.display(), left.join(", "));
        std::process::ExitCode::FAILURE
    }
}

/// Mount points strictly below `root` in a /proc/self/mountinfo text.
fn mount_points_below(mountinfo: &str, root: &Path) -> Vec<PathBuf> {
    mount_table(mountinfo).map(|(_, p)| p).filter(|p| p != root && p.starts_with(root)).collect()
}

/// The device (`major:minor`) of the mount at `point`; the last one wins,
/// as a later mount on the same point hides the earlier.
fn device_of(mountinfo: &str, point: &Path) -> Option<String> {
    mount_table(mountinfo).filter(|(_, p)| p == point).last().map(|(device, _)| device.to_string())
}

/// `(device, mount point)` of each line of a /proc/self/mountinfo text.
fn mount_table(mountinfo: &str) -> impl Iterator<Item = (&str, PathBuf)> {
    mountinfo.lines().filter_map(|l| {
        let mut fields = l.split(' ');
        let device = fields.nth(2)?;
        let point = fields.nth(1)?;
        Some((device, PathBuf::from(unescape_mountinfo(point))))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
