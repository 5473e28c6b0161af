//! The client end of the file protocol: one TCP connection to the agent's file
//! service, shared by every FUSE mount, with many requests in flight.
//!
//! Callers get a future per request; a writer task numbers requests and
//! batches them into as few writes as are ready, a reader task routes each
//! answer to its caller by id. When the connection ends, every waiting and
//! later request fails with EIO (the FUSE mounts then answer EIO too, and
//! the sidecar's supervisor decides what to do).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tpd_wire::files::{self, DirEntry, FILES_VERSION, MountInfo, Request, Response};

use super::FuseError;

const EIO: i32 = 5;

type Waiter = oneshot::Sender<Response>;

/// Requests waiting for their answer; `None` once the connection is gone.
type Pending = Arc<Mutex<Option<HashMap<u64, Waiter>>>>;

#[derive(Debug, Clone)]
pub struct FileClient {
    tx: mpsc::UnboundedSender<(Request, Waiter)>,
}

impl FileClient {
    /// Starts the connection's tasks on `stream` and says hello; returns the
    /// mounts the agent serves.
    pub async fn start<S>(stream: S) -> Result<(Self, Vec<MountInfo>), FuseError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_requests(wr, rx, pending.clone()));
        tokio::spawn(read_responses(rd, pending));
        let client = FileClient { tx };
        match client.call(Request::Hello { version: FILES_VERSION }).await {
            Response::Welcome { version: FILES_VERSION, mounts } => Ok((client, mounts)),
            Response::Welcome { version, .. } => Err(FuseError::VersionMismatch(Some(version))),
            Response::Error(files::EPROTO) => Err(FuseError::VersionMismatch(None)),
            other => Err(FuseError::Protocol(format!("unexpected answer to hello: {other:?}"))),
        }
    }

    /// Sends one request and waits for its answer.
    pub async fn call(&self, req: Request) -> Response {
        self.send(req).await
    }

    /// Queues one request now, ahead of any sent later; the future waits
    /// for its answer.
    pub fn send(&self, req: Request) -> impl Future<Output = Response> + Send + 'static {
        let (done, answer) = oneshot::channel();
        let queued = self.tx.send((req, done)).is_ok();
        async move {
            if !queued {
                return Response::Error(EIO);
            }
            answer.await.unwrap_or(Response::Error(EIO))
        }
    }

    /// Lists a whole directory with attributes, page by page.
    pub async fn list(&self, mount: u16, path: Vec<u8>) -> Result<Vec<DirEntry>, i32> {
        let mut all = Vec::new();
        let mut cursor = 0;
        loop {
            match self.call(Request::ReadDir { mount, path: path.clone(), cursor }).await {
                Response::Entries { entries, next } => {
                    all.extend(entries);
                    match next {
                        Some(n) if n > cursor => cursor = n,
                        _ => return Ok(all),
                    }
                }
                Response::Error(e) => return Err(e),
                _ => return Err(EIO),
            }
        }
    }
}

async fn write_requests<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<(Request, Waiter)>,
    pending: Pending,
) {
    let mut next_id = 0u64;
    let mut out = BytesMut::with_capacity(64 * 1024);
    while let Some(call) = rx.recv().await {
        let Some(first) = register(&pending, &mut next_id, call) else { continue };
        let more = || std::iter::from_fn(|| rx.try_recv().ok()).find_map(|c| register(&pending, &mut next_id, c));
        if let Err(e) = files::write_batch(&mut wr, &mut out, first, more).await {
            tracing::warn!(error = %e, "file connection write failed");
            fail_all(&pending);
            return;
        }
    }
    let _ = wr.shutdown().await;
}

/// Numbers a request and registers its waiter; `None` (and EIO to the
/// waiter) once the connection is gone.
fn register(pending: &Pending, next_id: &mut u64, (req, done): (Request, Waiter)) -> Option<(u64, Request)> {
    *next_id += 1;
    match pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        Some(map) => {
            map.insert(*next_id, done);
            Some((*next_id, req))
        }
        None => {
            let _ = done.send(Response::Error(EIO));
            None
        }
    }
}

async fn read_responses<R: AsyncRead + Unpin>(mut rd: R, pending: Pending) {
    let mut buf = BytesMut::with_capacity(2 * files::MAX_IO as usize);
    loop {
        match files::decode::<Response>(&mut buf) {
            Ok(Some((id, resp))) => {
                let waiter = pending.lock().unwrap_or_else(|e| e.into_inner()).as_mut().and_then(|m| m.remove(&id));
                if let Some(w) = waiter {
                    let _ = w.send(resp);
                }
            }
            Ok(None) => match rd.read_buf(&mut buf).await {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "file connection read failed");
                    break;
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "agent sent an undecodable file answer; closing");
                break;
            }
        }
    }
    fail_all(&pending);
}

/// Ends the connection for everyone: waiting requests get EIO, later ones too.
fn fail_all(pending: &Pending) {
    if let Some(map) = pending.lock().unwrap_or_else(|e| e.into_inner()).take() {
        for (_, w) in map {
            let _ = w.send(Response::Error(EIO));
        }
    }
}
