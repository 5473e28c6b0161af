//! The router on one of the agent's listening ports, in front of the real
//! container's `remote` port. What a connection's first bytes say decides
//! how it is served:
//! - an HTTP/1 request line: the agent serves HTTP/1.1 itself and routes
//!   each request: the first live route that matches sends it to its
//!   session, anything else goes to the real container on the pod's
//!   loopback. An `Upgrade` (WebSocket) that gets `101` joins the two
//!   upgraded connections; an `Upgrade: h2c` is declined (the request goes
//!   on without it), so its connection stays HTTP/1.1 and every request on
//!   it is routed on its own.
//! - HTTP/2's connection preface (prior knowledge, as gRPC speaks in a
//!   cluster): the agent serves HTTP/2 and routes each stream the same way,
//!   over one multiplexed HTTP/2 connection per destination.
//! - TLS, or anything else: spliced to the real container as it is; TLS
//!   hides the requests, so it cannot be routed (said once per port, and
//!   to the sessions in their replies).
//!
//! Bodies, trailers included, stream both ways as frames. A request that a
//! mirroring route matches is copied on the way ([`super::mirror`]).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response, StatusCode, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tpd_wire::intercept::Mirror;

use super::mirror::{self, Copies, Duplicate, Tee};
use super::reach::Connector;
use super::registry::{Copied, Registry, Target};
use crate::neighbours::dial_loopback;
use crate::services::BoxConn;
use sniff::{FirstBytes, Prefixed, classify, first_bytes};

mod sniff;

/// Idle upstream HTTP/1 connections kept per destination.
const POOL_MAX: usize = 8;

type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP/2 connection to one destination, which the streams of one
/// client connection to it share (HTTP/2 multiplexes them); locked while
/// it is being opened, so that the streams arriving meanwhile wait for
/// that one connection.
type Shared = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Body>>>>;

/// A client connection's HTTP/2 connections, one per destination. Each
/// client connection has its own, so its streams share a flow-control
/// window and a limit on concurrent streams upstream only with each other,
/// as they do on the client's own connection: a client that stops reading
/// never stalls another's streams.
type H2Upstreams = Mutex<HashMap<Upstream, Shared>>;

/// Where a request goes: the real container, or a session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Upstream {
    Real,
    Session(String),
}

pub struct Router<C> {
    /// The real container's port this router stands in front of.
    remote: u16,
    registry: Arc<Registry>,
    sessions: C,
    /// Idle HTTP/1 client connections, by destination.
    pool: Mutex<HashMap<Upstream, Vec<http1::SendRequest<Body>>>>,
    /// The HTTP/2 connection to each destination that copies go on.
    copies_h2: H2Upstreams,
    /// Whether TLS was seen on this port: the warning is said once.
    tls_seen: AtomicBool,
    /// The queue of copies for each mirroring session, which its copier reads.
    copiers: Mutex<HashMap<String, mpsc::Sender<Duplicate>>>,
    /// Bytes of the bodies in those queues.
    queued_bytes: AtomicUsize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<C: Connector> Router<C> {
    pub fn new(remote: u16, registry: Arc<Registry>, sessions: C) -> Arc<Self> {
        Arc::new(Router {
            remote,
            registry,
            sessions,
            pool: Mutex::default(),
            copies_h2: Mutex::default(),
            tls_seen: AtomicBool::new(false),
            copiers: Mutex::default(),
            queued_bytes: AtomicUsize::new(0),
        })
    }

    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            match listener.accept().await {
                Ok((sock, _)) => {
                    let _ = sock.set_nodelay(true);
                    tokio::spawn(self.clone().connection(sock));
                }
                Err(e) => tracing::warn!(port = self.remote, "accepting a connection: {e}"),
            }
        }
    }

    async fn connection(self: Arc<Self>, mut sock: TcpStream) {
        let head = match first_bytes(&mut sock).await {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(e) => return tracing::debug!(port = self.remote, "connection closed before its first bytes: {e}"),
        };
        // A client that stopped sending before its first bytes decided is
        // passed to the real container as it is.
        let kind = classify(&head).unwrap_or(FirstBytes::Other);
        let client = TokioIo::new(Prefixed::new(head, sock));
        let this = self.clone();
        let h2 = Arc::new(H2Upstreams::default());
        let service = hyper::service::service_fn(move |req| this.clone().handle(req, h2.clone()));
        let served = match kind {
            // Header names as the client wrote them, to the upstream as they were.
            FirstBytes::Http1 => {
                hyper::server::conn::http1::Builder::new()
                    .preserve_header_case(true)
                    .serve_connection(client, service)
                    .with_upgrades()
                    .await
            }
            // Responses as the upstream sent them: no `date` added.
            FirstBytes::Http2 => {
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .auto_date_header(false)
                    .serve_connection(client, service)
                    .await
            }
            FirstBytes::Tls => {
                self.warn_tls();
                return self.splice_raw(client.into_inner()).await;
            }
            FirstBytes::Other => return self.splice_raw(client.into_inner()).await,
        };
        if let Err(e) = served {
            tracing::debug!(port = self.remote, "HTTP connection ended: {e}");
        }
    }

    /// TLS hides the requests from the router, so their session's filters
    /// cannot match: the intercept does not do there what its user expects.
    fn warn_tls(&self) {
        self.registry.saw_tls(self.remote);
        if !self.tls_seen.swap(true, Ordering::Relaxed) {
            let port = self.remote;
            tracing::warn!(port, "TLS on port {port}: its requests cannot be filtered and go to the real container");
        }
    }

    /// Not HTTP: to the real container, byte for byte.
    async fn splice_raw(&self, mut client: Prefixed<TcpStream>) {
        match dial_loopback(self.remote).await {
            Ok(mut real) => drop(tokio::io::copy_bidirectional(&mut client, &mut real).await),
            Err(e) => tracing::debug!(port = self.remote, "the real container refused a connection: {e}"),
        }
    }

    /// The response to `req`; an error only for an HTTP/2 stream that the
    /// upstream reset, which hyper then resets with the same reason.
    async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        h2: Arc<H2Upstreams>,
    ) -> Result<Response<Body>, io::Error> {
        decline_h2c(req.headers_mut());
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let headers = |name: &str| req.headers().get_all(name).iter().map(|v| v.as_bytes());
        let target = self.registry.route(self.remote, path, headers);
        // An upgraded connection is not a request to copy.
        let mirrors = match req.headers().contains_key(header::UPGRADE) {
            true => Vec::new(),
            false => self.registry.mirrors(self.remote, path, headers),
        };
        if let Some(target) = &target {
            tracing::debug!(session = target.session, port = self.remote, "a request to the session");
        }
        let req = self.copying(req, mirrors);
        let err = match self.forward(target.as_ref(), req, &h2).await {
            Ok(resp) => return Ok(resp),
            Err(e) => e,
        };
        if reset_by_upstream(&err) {
            tracing::debug!(port = self.remote, "the upstream reset a stream: {err}");
            return Err(err);
        }
        // Never the real container instead: the request was the session's.
        Ok(match target {
            Some(target) => {
                tracing::debug!(session = target.session, port = self.remote, "the intercept is not reachable: {err}");
                text(StatusCode::BAD_GATEWAY, format!("tpd: the intercept of {} is not reachable\n", target.holder))
            }
            None => {
                tracing::debug!(port = self.remote, "the real container did not answer: {err}");
                text(StatusCode::BAD_GATEWAY, format!("tpd: nothing answers on port {} in the pod\n", self.remote))
            }
        })
    }

    /// `req` as it goes upstream: its body copied on the way for each
    /// session in `mirrors`, whose copies are queued once it is sent.
    fn copying(self: &Arc<Self>, req: Request<Incoming>, mirrors: Vec<(Target, Mirror)>) -> Request<Body> {
        if mirrors.is_empty() {
            return req.map(BodyExt::boxed);
        }
        let (head, body) = req.into_parts();
        let copies = Copies::new(&head, mirrors);
        let limit = copies.body_limit();
        let this = self.clone();
        let tee = Tee::new(body, limit, move |kept| {
            if kept.is_done() {
                let (body, cut) = kept.into_parts();
                return this.queue(copies.made(&body, cut));
            }
            tokio::spawn(async move {
                let (body, cut) = kept.finish().await;
                this.queue(copies.made(&body, cut));
            });
        });
        Request::from_parts(head, BodyExt::boxed(tee))
    }

    /// Hands each copy to its session's copier; a full queue, or bodies
    /// queued past [`mirror::QUEUED_BYTES`], drop it.
    fn queue(self: &Arc<Self>, copies: Vec<Duplicate>) {
        for copy in copies {
            let (session, size) = (copy.target.session.clone(), copy.request.body().len());
            let room = self.queued_bytes.fetch_add(size, Ordering::Relaxed) + size <= mirror::QUEUED_BYTES;
            if !room || self.copier(&copy.target).try_send(copy).is_err() {
                self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
                self.registry.copied(&session, Copied::Dropped);
            }
        }
    }

    /// The next copy of a copier's queue (none after [`mirror::IDLE`]).
    async fn next_copy(&self, copies: &mut mpsc::Receiver<Duplicate>) -> Option<Duplicate> {
        let copy = tokio::time::timeout(mirror::IDLE, copies.recv()).await.ok().flatten()?;
        self.queued_bytes.fetch_sub(copy.request.body().len(), Ordering::Relaxed);
        Some(copy)
    }

    /// The queue of `target`'s copier, started when there is none.
    fn copier(self: &Arc<Self>, target: &Target) -> mpsc::Sender<Duplicate> {
        let mut copiers = lock(&self.copiers);
        copiers.retain(|_, queue| !queue.is_closed());
        let start = || {
            let (queue, copies) = mpsc::channel(mirror::QUEUE);
            tokio::spawn(self.clone().copy_to(target.session.clone(), copies));
            queue
        };
        copiers.entry(target.session.clone()).or_insert_with(start).clone()
    }

    /// Sends `session`'s copies, a few at a time, until the session ends
    /// or none came for a while; what is still queued then is dropped.
    async fn copy_to(self: Arc<Self>, session: String, mut copies: mpsc::Receiver<Duplicate>) {
        let in_flight = Arc::new(Semaphore::new(mirror::IN_FLIGHT));
        while let Some(copy) = self.next_copy(&mut copies).await {
            if !self.registry.is_live(&session) {
                break;
            }
            let Ok(permit) = in_flight.clone().acquire_owned().await else { break };
            let this = self.clone();
            tokio::spawn(async move {
                let (session, outcome) = this.send_copy(copy).await;
                this.registry.copied(&session, outcome);
                drop(permit);
            });
        }
        copies.close();
        while let Some(copy) = copies.recv().await {
            self.queued_bytes.fetch_sub(copy.request.body().len(), Ordering::Relaxed);
            self.registry.copied(&session, Copied::Dropped);
        }
    }

    /// Sends one copy and reads its answer to the end, which is thrown away.
    async fn send_copy(&self, copy: Duplicate) -> (String, Copied) {
        let Duplicate { target, request } = copy;
        let request = request.map(|b| http_body_util::Full::new(b).map_err(|never| match never {}).boxed());
        let answered = tokio::time::timeout(mirror::ANSWER_WITHIN, async {
            let resp = self.forward(Some(&target), request, &self.copies_h2).await?;
            resp.into_body().collect().await.map_err(io::Error::other)
        });
        let outcome = match answered.await {
            Ok(Ok(_)) => Copied::Answered,
            Ok(Err(e)) => {
                tracing::debug!(session = target.session, port = self.remote, "a copy was not answered: {e}");
                Copied::Dropped
            }
            Err(_) => Copied::Dropped,
        };
        (target.session, outcome)
    }

    /// Sends `req` to the session of `target` (the real container without
    /// one) in the client's HTTP version, and returns the response as it
    /// arrives (its body streams on).
    async fn forward(
        &self,
        target: Option<&Target>,
        req: Request<Body>,
        h2: &H2Upstreams,
    ) -> io::Result<Response<Body>> {
        let upstream = target.map_or(Upstream::Real, |t| Upstream::Session(t.session.clone()));
        match req.version() {
            Version::HTTP_2 => self.forward_http2((h2, &upstream), target, req).await,
            _ => self.forward_http1(&upstream, target, req).await,
        }
    }

    /// On an idle connection or a new one. An `Upgrade` answered `101`
    /// joins the client's connection to the upstream's, raw (`h2c` never
    /// gets here: see [`decline_h2c`]). An upstream that does not take the
    /// upgrade just answers the request, and the connection goes on as
    /// HTTP/1.1.
    async fn forward_http1(
        &self,
        upstream: &Upstream,
        target: Option<&Target>,
        mut req: Request<Body>,
    ) -> io::Result<Response<Body>> {
        let upgrade = req.headers().contains_key(header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
        let (sender, mut resp) = match self.idle(upstream) {
            // An idle connection may have been closed by the other end meanwhile:
            // then the request comes back unsent and goes on a new one.
            Some(mut idle) => match idle.try_send_request(req).await {
                Ok(resp) => (idle, resp),
                Err(e) => self.send_new(upstream, target, unsent(e)?).await?,
            },
            None => self.send_new(upstream, target, req).await?,
        };
        match upgrade {
            Some(client_side) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(join_upgraded(client_side, upstream_side));
            }
            // Not pooled: after an upgrade was asked for, whether the
            // connection is still HTTP is the server's say.
            Some(_) => {}
            None => self.keep(upstream, sender),
        }
        Ok(resp.map(BodyExt::boxed))
    }

    /// As a stream of the destination's connection in `h2`. Trailers (a gRPC
    /// status) come as the body's last frame; dropping the response or its
    /// body, as hyper does when the client resets its stream, resets the
    /// upstream's, and a reset from the upstream ends the client's body
    /// with an error, which resets the client's stream.
    async fn forward_http2(
        &self,
        (h2, upstream): (&H2Upstreams, &Upstream),
        target: Option<&Target>,
        mut req: Request<Body>,
    ) -> io::Result<Response<Body>> {
        if req.uri().authority().is_none() {
            // Without `:authority` the URI lost the `:scheme` too (a URI
            // cannot hold one alone), and hyper refuses to send an HTTP/2
            // request without both; sent as if from HTTP/1, it gets
            // `:scheme: http`, what a cleartext port carries.
            *req.version_mut() = Version::HTTP_11;
        }
        let mut shared = self.shared(h2, upstream, target).await?;
        let resp = match shared.try_send_request(req).await {
            Ok(resp) => resp,
            // The connection closed since it was looked up: the request
            // comes back unsent and goes on a new one.
            Err(e) => {
                let req = unsent(e)?;
                self.shared(h2, upstream, target).await?.send_request(req).await.map_err(io::Error::other)?
            }
        };
        Ok(resp.map(BodyExt::boxed))
    }

    /// A new connection to the session of `target`, or to the real
    /// container without one.
    async fn dial(&self, target: Option<&Target>) -> io::Result<BoxConn> {
        Ok(match target {
            Some(target) => self.sessions.connect(target, self.remote).await?,
            None => Box::new(dial_loopback(self.remote).await?),
        })
    }

    /// Runs an upstream connection's I/O until it ends.
    fn drive(&self, upstream: &Upstream, connection: impl Future<Output = hyper::Result<()>> + Send + 'static) {
        let port = self.remote;
        let to = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(port, ?to, "upstream connection ended: {e}");
            }
        });
    }

    /// Opens an HTTP/1 connection to `upstream` and sends `req` on it.
    async fn send_new(
        &self,
        upstream: &Upstream,
        target: Option<&Target>,
        req: Request<Body>,
    ) -> io::Result<(http1::SendRequest<Body>, Response<Incoming>)> {
        let conn = self.dial(target).await?;
        let (mut sender, connection) = http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(conn))
            .await
            .map_err(io::Error::other)?;
        self.drive(upstream, connection.with_upgrades());
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        Ok((sender, resp))
    }

    /// An idle connection to `upstream`, dropping the closed ones met
    /// (and the destination, when none is left: a session that ended).
    fn idle(&self, upstream: &Upstream) -> Option<http1::SendRequest<Body>> {
        let mut pool = lock(&self.pool);
        let conns = pool.get_mut(upstream)?;
        conns.retain(|c| !c.is_closed());
        if conns.is_empty() {
            pool.remove(upstream);
            return None;
        }
        let ready = conns.iter().position(http1::SendRequest::is_ready)?;
        Some(conns.swap_remove(ready))
    }

    /// Keeps the connection for the next request once its response is
    /// done (until then it is busy, and [`Router::idle`] passes it over).
    fn keep(&self, upstream: &Upstream, sender: http1::SendRequest<Body>) {
        let mut pool = lock(&self.pool);
        let conns = pool.entry(upstream.clone()).or_default();
        conns.retain(|c| !c.is_closed());
        // Past the bound, dropping the handle closes the connection once its response is done.
        if conns.len() < POOL_MAX {
            conns.push(sender);
        }
    }

    /// The HTTP/2 connection in `h2` to `upstream`, opened when there is
    /// none or it closed. A stream waits for the opening of another, and
    /// when that fails, tries once itself: each stream gets its own answer.
    async fn shared(
        &self,
        h2: &H2Upstreams,
        upstream: &Upstream,
        target: Option<&Target>,
    ) -> io::Result<http2::SendRequest<Body>> {
        let slot = {
            let mut shared = lock(h2);
            shared.retain(|to, slot| !self.unused(to, slot));
            shared.entry(upstream.clone()).or_default().clone()
        };
        let mut slot = slot.lock().await;
        if let Some(open) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(open.clone());
        }
        let conn = self.dial(target).await?;
        let (sender, connection) =
            http2::Builder::new(TokioExecutor::new()).handshake(TokioIo::new(conn)).await.map_err(io::Error::other)?;
        self.drive(upstream, connection);
        *slot = Some(sender.clone());
        Ok(sender)
    }

    /// Whether a shared connection can go: no stream is opening or looking
    /// it up (the map holds the only reference), and it is closed, never
    /// opened, or its session ended. Dropping the last handle lets hyper
    /// close the connection once its streams are done.
    fn unused(&self, to: &Upstream, slot: &Shared) -> bool {
        if Arc::strong_count(slot) > 1 {
            return false;
        }
        let Ok(conn) = slot.try_lock() else { return false };
        match (to, conn.as_ref()) {
            (_, None) => true,
            (_, Some(c)) if c.is_closed() => true,
            (Upstream::Session(session), Some(_)) => !self.registry.is_live(session),
            (Upstream::Real, Some(_)) => false,
        }
    }
}

/// Takes `h2c` out of a request's `Upgrade` (with `HTTP2-Settings` and
/// their `Connection` tokens), as a server that does not speak it would:
/// the client goes on in HTTP/1.1 (RFC 9110 7.8). Were the upgrade joined
/// raw, every later stream of the connection would go where this request's
/// route sent it, whatever its own headers say; declined, each request is
/// routed on its own. (RFC 9113 deprecated the upgrade; gRPC and other
/// clients speak HTTP/2 with prior knowledge, routed per stream.)
fn decline_h2c(headers: &mut header::HeaderMap) {
    let tokens = |v: &header::HeaderValue| -> Vec<String> {
        v.to_str().unwrap_or_default().split(',').map(|t| t.trim().to_ascii_lowercase()).collect()
    };
    let asks_h2c = headers.get_all(header::UPGRADE).iter().any(|v| tokens(v).iter().any(|t| t == "h2c"));
    if !asks_h2c {
        return;
    }
    let others: Vec<String> =
        headers.get_all(header::UPGRADE).iter().flat_map(tokens).filter(|t| t != "h2c" && !t.is_empty()).collect();
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    let mut connection: Vec<String> = headers.get_all(header::CONNECTION).iter().flat_map(tokens).collect();
    connection.retain(|t| t != "http2-settings" && (t != "upgrade" || !others.is_empty()) && !t.is_empty());
    headers.remove(header::CONNECTION);
    for (name, values) in [(header::UPGRADE, others), (header::CONNECTION, connection)] {
        if let Ok(value) = header::HeaderValue::from_str(&values.join(", "))
            && !values.is_empty()
        {
            headers.insert(name, value);
        }
    }
}

/// The request back from a connection that could not take it, to go on
/// another; the error when it was sent (then it cannot be sent again).
fn unsent(mut e: TrySendError<Request<Body>>) -> io::Result<Request<Body>> {
    e.take_message().ok_or_else(|| io::Error::other(e.into_error()))
}

/// Whether the upstream reset the HTTP/2 stream that carried a request
/// (`REFUSED_STREAM`, `CANCEL`, ...) before its response head: the call was
/// the upstream's to end, and its client gets the same reset, not a 502.
fn reset_by_upstream(err: &io::Error) -> bool {
    let mut cause = err.get_ref().map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = cause {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_reset() && h2.is_remote();
        }
        cause = e.source();
    }
    false
}

/// Joins the client's and the upstream's connections once both are upgraded.
async fn join_upgraded(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (client, upstream) = match tokio::try_join!(client, upstream) {
        Ok(both) => both,
        Err(e) => return tracing::debug!("an upgrade did not complete: {e}"),
    };
    let (mut client, mut upstream) = (TokioIo::new(client), TokioIo::new(upstream));
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// A plain-text response from the agent itself.
fn text(status: StatusCode, body: String) -> Response<Body> {
    let body = http_body_util::Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed();
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}

#[cfg(test)]
mod tests;
