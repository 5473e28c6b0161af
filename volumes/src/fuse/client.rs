//! The client end of the file protocol: one TCP connection to the agent's file
//! service, shared by every FUSE mount, with many requests in flight, and
//! redialled when it is lost.
//!
//! A [`Connection`] numbers requests and batches them into as few writes as
//! are ready (a writer task); a reader task routes each answer to its caller
//! by id. When it ends, every waiting request learns that it was lost.
//!
//! The [`FileClient`] keeps one connection up for the mounts' life. When the
//! connection ends, or the agent is replaced (a new agent pod: the old
//! connection would hang until TCP gave up), it dials again; requests that
//! were lost or arrive meanwhile wait for the new connection and are sent
//! again, and a program sees EIO only when no connection came back within
//! the configured time. Handles are the client's own numbers: each maps to
//! the agent's handle on the connection that opened it, and a handle from
//! an earlier connection is opened again by its path (without O_CREAT,
//! O_EXCL, O_TRUNC) before it is used on the new one.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tpd_wire::files::{self, DirEntry, FILES_VERSION, MountInfo, Request, Response};

use super::FuseError;

const EIO: i32 = 5;
const O_CREAT: u32 = 0o100;
const O_EXCL: u32 = 0o200;
const O_TRUNC: u32 = 0o1000;

/// How long a redial waits at most between tries.
const REDIAL_MAX: Duration = Duration::from_secs(1);

/// A change the agent reported ([`Response::Changed`]): `(mount, dir, name)`.
pub type Change = (u16, Vec<u8>, Vec<u8>);

/// An answer, or `None` when the connection was lost before it came.
type Waiter = oneshot::Sender<Option<Response>>;

/// Requests waiting for their answer; `None` once the connection is gone.
type Pending = Arc<Mutex<Option<HashMap<u64, Waiter>>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One connection to the file service.
#[derive(Debug, Clone)]
struct Connection {
    tx: mpsc::UnboundedSender<(Request, Waiter)>,
    /// Cancelled when the connection ends, for whatever reason.
    ended: CancellationToken,
}

impl Connection {
    /// Starts the connection's tasks on `stream` and says hello; returns the
    /// mounts the agent serves.
    async fn start<S>(stream: S, changes: std_mpsc::Sender<Change>) -> Result<(Self, Vec<MountInfo>), FuseError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
        let ended = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_requests(wr, rx, pending.clone(), ended.clone()));
        tokio::spawn(read_responses(rd, pending, changes, ended.clone()));
        let conn = Connection { tx, ended };
        match conn.send(Request::Hello { version: FILES_VERSION }).await {
            Some(Response::Welcome { version: FILES_VERSION, mounts }) => Ok((conn, mounts)),
            Some(Response::Welcome { version, .. }) => Err(FuseError::VersionMismatch(Some(version))),
            Some(Response::Error(files::EPROTO)) => Err(FuseError::VersionMismatch(None)),
            Some(other) => Err(FuseError::Protocol(format!("unexpected answer to hello: {other:?}"))),
            None => Err(FuseError::Protocol("the agent closed the file connection during hello".into())),
        }
    }

    /// Queues one request now, ahead of any sent later.
    fn send(&self, req: Request) -> impl Future<Output = Option<Response>> + Send + 'static + use<> {
        let (done, answer) = oneshot::channel();
        let queued = self.tx.send((req, done)).is_ok();
        async move {
            if !queued {
                return None;
            }
            answer.await.ok().flatten()
        }
    }

    fn is_live(&self) -> bool {
        !self.ended.is_cancelled()
    }
}

async fn write_requests<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::UnboundedReceiver<(Request, Waiter)>,
    pending: Pending,
    ended: CancellationToken,
) {
    let mut next_id = 0u64;
    let mut out = BytesMut::with_capacity(64 * 1024);
    loop {
        let call = tokio::select! {
            c = rx.recv() => c,
            () = ended.cancelled() => break,
        };
        let Some(call) = call else { break };
        let Some(first) = register(&pending, &mut next_id, call) else { continue };
        let more = || std::iter::from_fn(|| rx.try_recv().ok()).find_map(|c| register(&pending, &mut next_id, c));
        if let Err(e) = crate::frames::write_batch(&mut wr, &mut out, first, more).await {
            tracing::info!(error = %e, "file connection write failed");
            break;
        }
    }
    fail_all(&pending, &ended);
    let _ = wr.shutdown().await;
}

/// Numbers a request and registers its waiter; `None` (and "lost" to the
/// waiter) once the connection is gone.
fn register(pending: &Pending, next_id: &mut u64, (req, done): (Request, Waiter)) -> Option<(u64, Request)> {
    *next_id += 1;
    match lock(pending).as_mut() {
        Some(map) => {
            map.insert(*next_id, done);
            Some((*next_id, req))
        }
        None => {
            let _ = done.send(None);
            None
        }
    }
}

async fn read_responses<R: AsyncRead + Unpin>(
    mut rd: R,
    pending: Pending,
    changes: std_mpsc::Sender<Change>,
    ended: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(2 * files::MAX_IO as usize);
    loop {
        match files::decode::<Response>(&mut buf) {
            Ok(Some((files::PUSHED, Response::Changed { mount, dir, name }))) => {
                // Nobody listens when the mounts keep nothing (`--volume-cache=off`).
                let _ = changes.send((mount, dir, name));
            }
            Ok(Some((id, resp))) => {
                let waiter = lock(&pending).as_mut().and_then(|m| m.remove(&id));
                if let Some(w) = waiter {
                    let _ = w.send(Some(resp));
                }
            }
            Ok(None) => {
                let read = tokio::select! {
                    r = rd.read_buf(&mut buf) => r,
                    () = ended.cancelled() => break,
                };
                match read {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::info!(error = %e, "file connection read failed");
                        break;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent sent an undecodable file answer; closing");
                break;
            }
        }
    }
    fail_all(&pending, &ended);
}

/// Ends the connection for everyone: waiting requests and later ones are lost.
fn fail_all(pending: &Pending, ended: &CancellationToken) {
    ended.cancel();
    if let Some(map) = lock(pending).take() {
        for (_, w) in map {
            let _ = w.send(None);
        }
    }
}

/// A handle as the kernel knows it: the agent's handle on the connection
/// that opened it, and how to open it again on a later one.
#[derive(Debug, Clone)]
struct Handle {
    agent: u64,
    generation: u64,
    reopen: Request,
}

#[derive(Debug, Default)]
struct State {
    /// The live connection and its generation (one more per redial).
    conn: Option<(u64, Connection)>,
    handles: HashMap<u64, Handle>,
    next_handle: u64,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// The generation of the newest connection, for waiters.
    generation: watch::Sender<u64>,
    /// How long a request waits for a connection before it fails with EIO.
    retry_for: Duration,
    /// Requests sent so far (each once, however often it was resent): what
    /// the benchmarks count a workload's round trips by.
    sent: AtomicU64,
    /// Where every connection's reader puts the changes the agent reports,
    /// and their receiver until the mounts take it.
    changes: std_mpsc::Sender<Change>,
    changes_rx: Mutex<Option<std_mpsc::Receiver<Change>>>,
}

/// The mounts' client of the file service; cheap to clone.
#[derive(Debug, Clone)]
pub struct FileClient {
    shared: Arc<Shared>,
}

/// How the client reaches the file service again.
#[derive(Debug, Clone)]
pub struct Redial {
    pub server: SocketAddr,
    /// How long requests wait for a lost connection to come back.
    pub retry_for: Duration,
    /// Changes when the agent is replaced: the connection is dropped and dialled anew.
    pub agents: Option<watch::Receiver<u64>>,
}

impl FileClient {
    /// Dials the file service and says hello; returns the client and the
    /// mounts the agent serves. The client redials for as long as it lives.
    pub async fn connect(redial: Redial, timeout: Duration) -> Result<(Self, Vec<MountInfo>), FuseError> {
        let (changes, changes_rx) = std_mpsc::channel();
        let (conn, mounts) = tokio::time::timeout(timeout, dial(redial.server, changes.clone()))
            .await
            .map_err(|_| FuseError::Timeout(timeout))??;
        let shared = Arc::new(Shared {
            state: Mutex::new(State { conn: Some((0, conn.clone())), ..Default::default() }),
            generation: watch::Sender::new(0),
            retry_for: redial.retry_for,
            sent: AtomicU64::new(0),
            changes,
            changes_rx: Mutex::new(Some(changes_rx)),
        });
        tokio::spawn(keep_connected(Arc::downgrade(&shared), conn, redial, mounts.clone()));
        Ok((FileClient { shared }, mounts))
    }

    /// Sends one request and waits for its answer.
    pub async fn call(&self, req: Request) -> Response {
        self.send(req).await
    }

    /// Queues one request now, ahead of any sent later, when the connection
    /// is up; the future waits for its answer (sending it again on a new
    /// connection if this one is lost).
    pub fn send(&self, req: Request) -> impl Future<Output = Response> + Send + 'static {
        self.shared.sent.fetch_add(1, Ordering::Relaxed);
        let queued = self.queue(&req);
        let this = self.clone();
        async move {
            if let Some((generation, answer)) = queued
                && let Some(resp) = answer.await
            {
                return this.settle(&req, generation, resp);
            }
            this.retry(req).await
        }
    }

    /// Sends `req` on the live connection if its handle belongs to it.
    fn queue(&self, req: &Request) -> Option<(u64, impl Future<Output = Option<Response>> + Send + 'static + use<>)> {
        let state = lock(&self.shared.state);
        let (generation, conn) = state.conn.as_ref().filter(|(_, c)| c.is_live())?;
        let translated = translate(req, &state.handles, *generation)?;
        Some((*generation, conn.send(translated)))
    }

    /// Waits for a live connection (until the deadline), opens a handle of an
    /// earlier connection again, and sends; again if the connection is lost.
    async fn retry(&self, req: Request) -> Response {
        let deadline = Instant::now() + self.shared.retry_for;
        loop {
            let Some((generation, conn)) = self.live_connection(deadline).await else {
                tracing::warn!("no file connection to the agent within {:?}; answering EIO", self.shared.retry_for);
                return Response::Error(EIO);
            };
            if let Request::Release { handle } = req
                && self.is_stale(handle, generation)
            {
                // The agent that opened it is gone, and its handle with it.
                lock(&self.shared.state).handles.remove(&handle);
                return Response::Ok;
            }
            if let Err(resp) = self.reopen(&req, generation, &conn).await {
                match resp {
                    Some(r) => return r,
                    None => continue,
                }
            }
            let Some(translated) = translate(&req, &lock(&self.shared.state).handles, generation) else { continue };
            if let Some(resp) = conn.send(translated).await {
                return self.settle(&req, generation, resp);
            }
        }
    }

    /// The live connection, waiting for one until `deadline`.
    async fn live_connection(&self, deadline: Instant) -> Option<(u64, Connection)> {
        let mut changes = self.shared.generation.subscribe();
        loop {
            if let Some((g, c)) = lock(&self.shared.state).conn.as_ref().filter(|(_, c)| c.is_live()) {
                return Some((*g, c.clone()));
            }
            tokio::time::timeout_at(deadline.into(), changes.changed()).await.ok()?.ok()?;
        }
    }

    fn is_stale(&self, handle: u64, generation: u64) -> bool {
        lock(&self.shared.state).handles.get(&handle).is_some_and(|h| h.generation != generation)
    }

    /// Opens `req`'s handle again on `conn` if it belongs to an earlier
    /// connection. `Err(Some(answer))`: the open failed, that is the answer;
    /// `Err(None)`: the connection was lost meanwhile.
    async fn reopen(&self, req: &Request, generation: u64, conn: &Connection) -> Result<(), Option<Response>> {
        let Some(ours) = handle_of(req) else { return Ok(()) };
        let Some(stale) = lock(&self.shared.state).handles.get(&ours).filter(|h| h.generation != generation).cloned()
        else {
            return Ok(());
        };
        match conn.send(stale.reopen.clone()).await {
            Some(Response::Opened { handle, .. }) => {
                if let Some(h) = lock(&self.shared.state).handles.get_mut(&ours) {
                    h.agent = handle;
                    h.generation = generation;
                }
                tracing::debug!(handle = ours, "file opened again on the new connection");
                Ok(())
            }
            Some(Response::Error(e)) => Err(Some(Response::Error(e))),
            Some(_) => Err(Some(Response::Error(EIO))),
            None => Err(None),
        }
    }

    /// Turns the agent's answer into ours: a new handle gets a number of the
    /// client's own; a released one is forgotten.
    fn settle(&self, req: &Request, generation: u64, resp: Response) -> Response {
        let mut state = lock(&self.shared.state);
        match (req, resp) {
            (Request::Open { mount, path, flags } | Request::Create { mount, path, flags, .. }, resp) => {
                let Response::Opened { handle, attr, data } = resp else { return resp };
                state.next_handle += 1;
                let ours = state.next_handle;
                let flags = flags & !(O_CREAT | O_EXCL | O_TRUNC);
                let reopen = Request::Open { mount: *mount, path: path.clone(), flags };
                state.handles.insert(ours, Handle { agent: handle, generation, reopen });
                Response::Opened { handle: ours, attr, data }
            }
            (Request::Release { handle }, resp) => {
                state.handles.remove(handle);
                resp
            }
            (_, resp) => resp,
        }
    }

    /// The changes the agent reports, for whoever takes them first (the mounts).
    pub fn take_changes(&self) -> Option<std_mpsc::Receiver<Change>> {
        lock(&self.shared.changes_rx).take()
    }

    /// How many requests were sent so far.
    pub fn requests(&self) -> u64 {
        self.shared.sent.load(Ordering::Relaxed)
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

/// The handle a request works through, if any.
fn handle_of(req: &Request) -> Option<u64> {
    match req {
        Request::Read { handle, .. }
        | Request::Write { handle, .. }
        | Request::Release { handle }
        | Request::Fsync { handle } => Some(*handle),
        Request::SetAttr { handle, .. } => *handle,
        _ => None,
    }
}

/// `req` with our handle replaced by the agent's on connection
/// `generation`; `None` when the handle belongs to an earlier connection.
fn translate(req: &Request, handles: &HashMap<u64, Handle>, generation: u64) -> Option<Request> {
    let Some(ours) = handle_of(req) else { return Some(req.clone()) };
    let Some(h) = handles.get(&ours) else { return Some(req.clone()) };
    if h.generation != generation {
        return None;
    }
    let mut req = req.clone();
    match &mut req {
        Request::Read { handle, .. }
        | Request::Write { handle, .. }
        | Request::Release { handle }
        | Request::Fsync { handle } => *handle = h.agent,
        Request::SetAttr { handle, .. } => *handle = Some(h.agent),
        _ => {}
    }
    Some(req)
}

async fn dial(
    server: SocketAddr,
    changes: std_mpsc::Sender<Change>,
) -> Result<(Connection, Vec<MountInfo>), FuseError> {
    let stream = TcpStream::connect(server).await.map_err(|source| FuseError::Connect { addr: server, source })?;
    // Small requests (lookups, stats) must not wait for Nagle.
    let _ = stream.set_nodelay(true);
    Connection::start(stream, changes).await
}

/// Redials whenever the connection ends or the agent is replaced, until
/// the client is dropped.
async fn keep_connected(shared: Weak<Shared>, mut conn: Connection, mut redial: Redial, mounts: Vec<MountInfo>) {
    let mut generation = 0;
    loop {
        let replaced = async {
            match redial.agents.as_mut() {
                Some(agents) => agents.changed().await.is_ok(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = conn.ended.cancelled() => tracing::info!("the file connection to the agent ended; dialling again"),
            true = replaced => {
                tracing::info!("the agent was replaced; dialling its file service");
                conn.ended.cancel();
            }
        }
        let mut wait = Duration::from_millis(50);
        conn = loop {
            let Some(changes) = shared.upgrade().map(|s| s.changes.clone()) else { return };
            match tokio::time::timeout(Duration::from_secs(10), dial(redial.server, changes)).await {
                Ok(Ok((c, served))) if served == mounts => break c,
                Ok(Ok(_)) => tracing::warn!("the agent now serves other volumes than were mounted; dialling again"),
                Ok(Err(e)) => tracing::debug!("dialling the file service: {e}"),
                Err(_) => tracing::debug!("dialling the file service timed out"),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(REDIAL_MAX);
        };
        let Some(shared) = shared.upgrade() else { return };
        generation += 1;
        lock(&shared.state).conn = Some((generation, conn.clone()));
        shared.generation.send_replace(generation);
        tracing::info!("file connection to the agent is back");
    }
}
