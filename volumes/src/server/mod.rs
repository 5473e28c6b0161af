//! The file service of the volume bridge: serves the swapped container's
//! volume mounts (`names::agent_env::MOUNTS`) over the file protocol
//! (`tpd_wire::files`) to the sidecar's FUSE client, inside the tunnel.
//!
//! One connection carries many requests at once: the reader decodes frames
//! and runs each request on the blocking pool, the writer sends answers as
//! they finish, tagged with the request's id. At most [`IN_FLIGHT`] requests
//! run at a time per connection, which bounds memory (each holds at most one
//! 1 MiB buffer) and pushes back on a client that sends faster. Writes
//! through one handle run one after another in the order they arrived
//! (since protocol version 3): the sidecar answers writes before they are
//! done, and appends must land in the order they were written. A release
//! (closing a handle) is done before the next request is read, since the
//! sidecar answers closes at once too.

mod ops;
mod watch;

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use bytes::BytesMut;
use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tpd_wire::files::{self, DecodeError, FILES_VERSION, MountInfo, Request, Response, VolumeMount};
use tpd_wire::names;

pub use ops::Handles;

/// Requests one connection runs at the same time.
const IN_FLIGHT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error("{} is not a valid mount list", names::agent_env::MOUNTS)]
    Env(#[source] serde_json::Error),
    #[error("reading or writing the file-service stream")]
    Io(#[from] std::io::Error),
    #[error("undecodable file-protocol frame")]
    Decode(#[from] DecodeError),
    #[error(
        "file protocol version mismatch: this agent speaks {FILES_VERSION}, the sidecar {0}; use the same tpd version for both"
    )]
    VersionMismatch(u16),
    #[error("the first file-protocol message was not a hello")]
    NoHello,
}

/// One served mount: what Kubernetes mounted, and a descriptor of its root
/// that every request's path is resolved from.
#[derive(Debug)]
struct Served {
    mount: VolumeMount,
    /// `None` when the directory could not be opened; its requests get the
    /// error it failed with.
    root: Result<OwnedFd, Errno>,
}

/// The mounts this agent serves, in the order the client indexes them.
#[derive(Debug)]
pub struct MountTable {
    mounts: Vec<Served>,
}

impl MountTable {
    /// Opens the root of each mount. A mount whose directory is missing is
    /// kept (its index must not shift) and answers its open error.
    pub fn new(mounts: Vec<VolumeMount>) -> Self {
        let mounts = mounts
            .into_iter()
            .map(|mount| {
                let root = rustix::fs::open(mount.mount_path.as_str(), OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty());
                if let Err(e) = &root {
                    tracing::warn!(path = %mount.mount_path, error = %e, "cannot open volume mount; serving it as an error");
                }
                Served { mount, root }
            })
            .collect();
        MountTable { mounts }
    }

    /// Reads `names::agent_env::MOUNTS`; unset means no volumes.
    pub fn from_env() -> Result<Self, FilesError> {
        match std::env::var(names::agent_env::MOUNTS) {
            Ok(json) => files::parse_mounts(&json).map(Self::new).map_err(FilesError::Env),
            Err(_) => Ok(Self::new(Vec::new())),
        }
    }

    fn served(&self, mount: u16) -> Result<&Served, Errno> {
        self.mounts.get(usize::from(mount)).ok_or(Errno::NOENT)
    }

    fn root(&self, mount: u16) -> Result<&OwnedFd, Errno> {
        self.served(mount)?.root.as_ref().map_err(|e| *e)
    }

    fn read_only(&self, mount: u16) -> Result<bool, Errno> {
        Ok(self.served(mount)?.mount.read_only)
    }

    fn welcome(&self) -> Response {
        let mounts = self
            .mounts
            .iter()
            .map(|s| MountInfo { name: s.mount.name.clone(), read_only: s.mount.read_only })
            .collect();
        Response::Welcome { version: FILES_VERSION, mounts }
    }
}

/// Serves one file-protocol connection until the client closes it. Every
/// file it opened is closed when this returns.
pub async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    mounts: Arc<MountTable>,
) -> Result<(), FilesError> {
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<(u64, Response)>(IN_FLIGHT * 2);
    let writer = tokio::spawn(write_responses(wr, rx));
    let watcher = watch::Watcher::new()
        .inspect_err(|e| tracing::warn!(error = %e, "no inotify: the client's caches will not hear of changes"))
        .ok();
    let pushing = watcher.clone().map(|w| tokio::spawn(w.run(tx.clone())));
    let result = read_requests(&mut rd, mounts, watcher, tx).await;
    if let Some(p) = pushing {
        p.abort();
    }
    // The reader dropped its sender; the writer ends once in-flight answers are out.
    let written = writer.await.map_err(std::io::Error::other)?;
    result.and(written.map_err(FilesError::Io))
}

async fn read_requests<R: AsyncRead + Unpin>(
    rd: &mut R,
    mounts: Arc<MountTable>,
    watcher: Option<Arc<watch::Watcher>>,
    tx: mpsc::Sender<(u64, Response)>,
) -> Result<(), FilesError> {
    let handles = Arc::new(Handles::default());
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    // Per handle, what its latest write signals when done: the next write
    // through that handle waits for it.
    let mut last_write: HashMap<u64, oneshot::Receiver<()>> = HashMap::new();
    let mut buf = BytesMut::with_capacity(64 * 1024);
    let mut greeted = false;
    loop {
        let (id, req) = match files::decode::<Request>(&mut buf) {
            Ok(Some(frame)) => frame,
            Ok(None) => {
                if rd.read_buf(&mut buf).await? == 0 {
                    return Ok(());
                }
                continue;
            }
            Err(DecodeError::Malformed { id: Some(id), reason }) if greeted => {
                tracing::debug!(id, reason, "malformed file request");
                send(&tx, id, Response::Error(files::EPROTO)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !greeted {
            greet(&tx, &mounts, id, &req).await?;
            greeted = true;
            continue;
        }
        // Looking one name up is one syscall: answering it here saves two
        // thread hand-offs on the path every stat and open waits for.
        if let Some(w) = &watcher {
            w.before(&mounts, &req);
        }
        if matches!(req, Request::Stat { .. } | Request::Readlink { .. }) {
            send(&tx, id, ops::handle(&mounts, &handles, req)).await;
            continue;
        }
        // A release is done before the next request is read: the client
        // answered the close long before, and a program that then removes
        // the file and writes another must find its space free. It waits
        // for the handle's last write, which is normally done already (the
        // close of a file opened for writing waits for its writes).
        if let Request::Release { handle } = &req {
            if let Some(before) = last_write.remove(handle) {
                let _ = before.await;
            }
            send(&tx, id, ops::handle(&mounts, &handles, req)).await;
            continue;
        }
        let (after, done) = match &req {
            Request::Write { handle, .. } => {
                let (done, next) = oneshot::channel();
                (last_write.insert(*handle, next), Some(done))
            }
            _ => (None, None),
        };
        let permit = slots.clone().acquire_owned().await.map_err(std::io::Error::other)?;
        let (mounts, handles, tx) = (mounts.clone(), handles.clone(), tx.clone());
        tokio::spawn(async move {
            if let Some(before) = after {
                // Done or failed alike: only the order matters.
                let _ = before.await;
            }
            let resp = tokio::task::spawn_blocking(move || ops::handle(&mounts, &handles, req))
                .await
                .unwrap_or(Response::Error(files::EPROTO));
            drop(done);
            send(&tx, id, resp).await;
            drop(permit);
        });
    }
}

/// Answers the opening hello, or refuses the stream with EPROTO.
async fn greet(
    tx: &mpsc::Sender<(u64, Response)>,
    mounts: &MountTable,
    id: u64,
    req: &Request,
) -> Result<(), FilesError> {
    match req {
        Request::Hello { version } if *version == FILES_VERSION => {
            send(tx, id, mounts.welcome()).await;
            Ok(())
        }
        Request::Hello { version } => {
            send(tx, id, Response::Error(files::EPROTO)).await;
            Err(FilesError::VersionMismatch(*version))
        }
        _ => {
            send(tx, id, Response::Error(files::EPROTO)).await;
            Err(FilesError::NoHello)
        }
    }
}

async fn send(tx: &mpsc::Sender<(u64, Response)>, id: u64, resp: Response) {
    // A closed channel means the writer failed; the reader sees that too.
    let _ = tx.send((id, resp)).await;
}

/// Writes answers as they come, batching whatever is ready into one write;
/// the data of a read goes to the stream without a copy.
async fn write_responses<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<(u64, Response)>,
) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        crate::frames::write_batch(&mut wr, &mut out, first, || rx.try_recv().ok()).await?;
    }
    wr.shutdown().await
}

#[cfg(test)]
mod tests;
