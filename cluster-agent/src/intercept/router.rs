//! The router on one of the agent's listening ports, in front of the real
//! container's `remote` port. What a connection's first bytes say decides
//! how it is served:
//! - an HTTP/1 request line: the agent serves HTTP/1.1 itself and routes
//!   each request: the first live route that matches sends it to its
//!   session, anything else goes to the real container on the pod's
//!   loopback. An `Upgrade` (WebSocket, `h2c`) that gets `101` joins the two
//!   upgraded connections.
//! - HTTP/2's connection preface (prior knowledge, as gRPC speaks in a
//!   cluster): the agent serves HTTP/2 and routes each stream the same way,
//!   over one multiplexed HTTP/2 connection per destination.
//! - TLS, or anything else: spliced to the real container as it is; TLS
//!   hides the requests, so it cannot be routed (said once per port).
//!
//! Bodies, trailers included, stream both ways as frames.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response, StatusCode, Version, header};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

use super::reach::Connector;
use super::registry::{Registry, Target};
use crate::neighbours::dial_loopback;
use crate::services::BoxConn;

/// How long a connection may stay silent before its first bytes: clients
/// speak first on an HTTP port, but may open a connection well ahead.
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest method token looked at; longer is not HTTP/1.
const MAX_METHOD: usize = 32;
/// What a client with prior knowledge of HTTP/2 sends first (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A TLS record's first byte when it carries a handshake (a ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;
/// Idle upstream HTTP/1 connections kept per destination.
const POOL_MAX: usize = 8;

type Body = BoxBody<Bytes, hyper::Error>;

/// The HTTP/2 connection to one destination, which every stream to it
/// shares (HTTP/2 multiplexes them); locked while it is being opened, so
/// that the streams arriving meanwhile wait for that one connection. All
/// clients' streams to it then share its flow-control window and the
/// upstream's limit on concurrent streams (past it, streams wait).
type Shared = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>>;

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
    pool: Mutex<HashMap<Upstream, Vec<http1::SendRequest<Incoming>>>>,
    /// The HTTP/2 connection to each destination.
    shared: Mutex<HashMap<Upstream, Shared>>,
    /// Whether TLS was seen on this port: the warning is said once.
    tls_seen: AtomicBool,
    /// Requests routed to each session, for the debug log.
    counts: Mutex<HashMap<String, u64>>,
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
            shared: Mutex::default(),
            tls_seen: AtomicBool::new(false),
            counts: Mutex::default(),
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
        let service = hyper::service::service_fn(move |req| this.clone().handle(req));
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
    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, io::Error> {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let target =
            self.registry.route(self.remote, path, |name| req.headers().get_all(name).iter().map(|v| v.as_bytes()));
        if let Some(target) = &target {
            self.count(&target.session);
        }
        let err = match self.forward(target.as_ref(), req).await {
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

    fn count(&self, session: &str) {
        let mut counts = lock(&self.counts);
        let n = counts.entry(session.to_owned()).or_default();
        *n += 1;
        tracing::debug!(session, port = self.remote, requests = *n, "a request to the session");
    }

    /// Sends `req` to the session of `target` (the real container without
    /// one) in the client's HTTP version, and returns the response as it
    /// arrives (its body streams on).
    async fn forward(&self, target: Option<&Target>, req: Request<Incoming>) -> io::Result<Response<Body>> {
        let upstream = target.map_or(Upstream::Real, |t| Upstream::Session(t.session.clone()));
        match req.version() {
            Version::HTTP_2 => self.forward_http2(&upstream, target, req).await,
            _ => self.forward_http1(&upstream, target, req).await,
        }
    }

    /// On an idle connection or a new one. An `Upgrade` answered `101`
    /// joins the client's connection to the upstream's, raw. That includes
    /// `Upgrade: h2c` (RFC 7540 3.2): the route of the upgrade request
    /// decides where the whole connection goes, so every later HTTP/2
    /// stream on it follows that route whatever its own headers say (a
    /// limit; clients with prior knowledge, as gRPC's, are routed per
    /// stream). An upstream that does not take the upgrade just answers the
    /// request, and the connection goes on as HTTP/1.1.
    async fn forward_http1(
        &self,
        upstream: &Upstream,
        target: Option<&Target>,
        mut req: Request<Incoming>,
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

    /// As a stream of the destination's shared connection. Trailers (a gRPC
    /// status) come as the body's last frame; dropping the response or its
    /// body, as hyper does when the client resets its stream, resets the
    /// upstream's, and a reset from the upstream ends the client's body
    /// with an error, which resets the client's stream.
    async fn forward_http2(
        &self,
        upstream: &Upstream,
        target: Option<&Target>,
        mut req: Request<Incoming>,
    ) -> io::Result<Response<Body>> {
        if req.uri().authority().is_none() {
            // Without `:authority` the URI lost the `:scheme` too (a URI
            // cannot hold one alone), and hyper refuses to send an HTTP/2
            // request without both; sent as if from HTTP/1, it gets
            // `:scheme: http`, what a cleartext port carries.
            *req.version_mut() = Version::HTTP_11;
        }
        let mut shared = self.shared(upstream, target).await?;
        let resp = match shared.try_send_request(req).await {
            Ok(resp) => resp,
            // The connection closed since it was looked up: the request
            // comes back unsent and goes on a new one.
            Err(e) => {
                let req = unsent(e)?;
                self.shared(upstream, target).await?.send_request(req).await.map_err(io::Error::other)?
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
        req: Request<Incoming>,
    ) -> io::Result<(http1::SendRequest<Incoming>, Response<Incoming>)> {
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
    fn idle(&self, upstream: &Upstream) -> Option<http1::SendRequest<Incoming>> {
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
    fn keep(&self, upstream: &Upstream, sender: http1::SendRequest<Incoming>) {
        let mut pool = lock(&self.pool);
        let conns = pool.entry(upstream.clone()).or_default();
        conns.retain(|c| !c.is_closed());
        // Past the bound, dropping the handle closes the connection once its response is done.
        if conns.len() < POOL_MAX {
            conns.push(sender);
        }
    }

    /// The HTTP/2 connection to `upstream`, opened when there is none or
    /// it closed. A stream waits for the opening of another, and when that
    /// fails, tries once itself: each stream gets its own answer.
    async fn shared(&self, upstream: &Upstream, target: Option<&Target>) -> io::Result<http2::SendRequest<Incoming>> {
        let slot = {
            let mut shared = lock(&self.shared);
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

/// The request back from a connection that could not take it, to go on
/// another; the error when it was sent (then it cannot be sent again).
fn unsent(mut e: TrySendError<Request<Incoming>>) -> io::Result<Request<Incoming>> {
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

/// What a connection's first bytes say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstBytes {
    /// A method token and a space: an HTTP/1.x request line.
    Http1,
    /// HTTP/2's whole connection preface.
    Http2,
    /// A TLS handshake record (a type of 22 and a 3.x version).
    Tls,
    /// Anything else.
    Other,
}

/// `None` until the bytes so far decide.
fn classify(head: &[u8]) -> Option<FirstBytes> {
    // Only the whole preface is HTTP/2: `PRI` is no HTTP/1 method either.
    let n = head.len().min(H2_PREFACE.len());
    if head[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(FirstBytes::Http2);
    }
    match head {
        [TLS_HANDSHAKE] => return None,
        [TLS_HANDSHAKE, 3, ..] => return Some(FirstBytes::Tls),
        _ => {}
    }
    for (i, &b) in head.iter().enumerate() {
        if b == b' ' {
            let method = &head[..i];
            return Some(match !method.is_empty() && method != b"PRI" {
                true => FirstBytes::Http1,
                false => FirstBytes::Other,
            });
        }
        if !is_tchar(b) || i >= MAX_METHOD {
            return Some(FirstBytes::Other);
        }
    }
    None
}

/// A token character (RFC 9110), of which a method is made.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads until the first bytes decide what the connection is; `None` when
/// it closes before sending anything.
async fn first_bytes(sock: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut head = Vec::with_capacity(MAX_METHOD + 1);
    let read = async {
        while classify(&head).is_none() {
            if sock.read_buf(&mut head).await? == 0 {
                break;
            }
        }
        io::Result::Ok(())
    };
    tokio::time::timeout(FIRST_BYTES_TIMEOUT, read).await.map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
    Ok((!head.is_empty()).then_some(head))
}

/// A connection whose first bytes were already read: they are read again first.
struct Prefixed<S> {
    head: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S> Prefixed<S> {
    fn new(head: Vec<u8>, inner: S) -> Self {
        Prefixed { head, at: 0, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let rest = &self.head[self.at..];
        if rest.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = rest.len().min(buf.remaining());
        buf.put_slice(&rest[..n]);
        self.at += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::intercept::registry::RegisterStream;
    use crate::intercept::testing;
    use http_body_util::channel::Channel;
    use hyper::body::Frame;
    use std::convert::Infallible;
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;
    use tpd_wire::intercept::{Filter, Reply, Request as Registration, Route};

    /// Every wait in these tests is bounded by this.
    const WAIT: Duration = Duration::from_secs(10);

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("timed out")
    }

    /// Serves `service` on every connection to a new loopback listener, in
    /// HTTP/1.1 or HTTP/2 by what the client sends first (as the router
    /// tells them apart); returns the port.
    async fn serve_both<S, F, B, E>(service: S) -> u16
    where
        S: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
        F: Future<Output = Result<Response<B>, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut sock, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(service.clone());
                tokio::spawn(async move {
                    let Ok(Some(head)) = first_bytes(&mut sock).await else { return };
                    let h2 = classify(&head) == Some(FirstBytes::Http2);
                    let io = TokioIo::new(Prefixed::new(head, sock));
                    let _ = match h2 {
                        true => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await
                        }
                        false => {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .with_upgrades()
                                .await
                        }
                    };
                });
            }
        });
        port
    }

    /// An HTTP server (1.1 and 2) on the loopback that says who it is: an
    /// `x-app: NAME` header on every answer, `NAME PATH` for a request, the
    /// body streamed back on `/echo`, a `grpc-status: 0` trailer after the
    /// body on `/trailers`, and on an `Upgrade` a `101` for the protocol
    /// asked and then `NAME ` and every byte echoed.
    async fn fake_app(name: &'static str) -> u16 {
        serve_both(move |req| async move {
            let mut resp = answer(name, req);
            resp.headers_mut().insert("x-app", header::HeaderValue::from_static(name));
            Ok::<_, Infallible>(resp)
        })
        .await
    }

    fn answer(name: &'static str, mut req: Request<Incoming>) -> Response<Body> {
        if let Some(protocol) = req.headers().get(header::UPGRADE).cloned() {
            let upgraded = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(upgraded.await.unwrap());
                io.write_all(format!("{name} ").as_bytes()).await.unwrap();
                let (mut rd, mut wr) = tokio::io::split(io);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
            let mut resp = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert(header::UPGRADE, protocol);
            resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
            return resp;
        }
        let said = format!("{name} {}", req.uri().path_and_query().map_or("", |p| p.as_str()));
        match req.uri().path() {
            "/echo" => Response::new(req.into_body().boxed()),
            "/trailers" => {
                let mut trailers = header::HeaderMap::new();
                trailers.insert("grpc-status", header::HeaderValue::from_static("0"));
                let body = http_body_util::Full::new(Bytes::from(said))
                    .map_err(|never| match never {})
                    .with_trailers(async { Some(Ok(trailers)) });
                Response::new(body.boxed())
            }
            _ => text(StatusCode::OK, said),
        }
    }

    /// Reaches each session's fake app by the session's name; counts the
    /// connections it opens.
    struct Fake {
        apps: HashMap<String, u16>,
        dials: std::sync::atomic::AtomicUsize,
    }

    impl Connector for Fake {
        async fn connect(&self, target: &Target, _: u16) -> io::Result<BoxConn> {
            self.dials.fetch_add(1, Ordering::Relaxed);
            let port = self.apps.get(&target.session).ok_or(io::ErrorKind::ConnectionRefused)?;
            Ok(Box::new(TcpStream::connect(("127.0.0.1", *port)).await?))
        }
    }

    /// Session `who`'s registration: the requests to `port` with `x-dev: WHO`.
    fn registration(who: &str, port: u16) -> Registration {
        let filter = Filter { headers: [("x-dev".into(), who.into())].into(), ..Filter::default() };
        testing::register(who, &format!("{who}-token"), "127.0.0.1:1".parse().unwrap(), vec![Route { port, filter }])
    }

    /// A router in front of `real`, with alice and bob reachable and carol
    /// registered but not, serving on its address.
    async fn started(real: u16) -> (Arc<Router<Fake>>, std::net::SocketAddr) {
        let registry = Arc::new(Registry::new([real], Duration::from_secs(15)));
        for who in ["alice", "bob", "carol"] {
            assert_eq!(RegisterStream::default().handle(&registry, registration(who, real)), Reply::Ok);
        }
        let mut apps = HashMap::new();
        for who in ["alice", "bob"] {
            apps.insert(who.to_owned(), fake_app(who).await);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new(real, registry, Fake { apps, dials: Default::default() });
        tokio::spawn(router.clone().serve(listener));
        (router, addr)
    }

    async fn router(real: u16) -> std::net::SocketAddr {
        started(real).await.1
    }

    /// A client connection in either HTTP version, so that one test runs over both.
    enum Client<B> {
        Http1(http1::SendRequest<B>),
        Http2(http2::SendRequest<B>),
    }

    impl<B> Client<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        /// HTTP/2 with prior knowledge when `h2`.
        async fn connect(addr: std::net::SocketAddr, h2: bool) -> Self {
            let io = TokioIo::new(TcpStream::connect(addr).await.unwrap());
            if h2 {
                let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await.unwrap();
                tokio::spawn(conn);
                return Client::Http2(sender);
            }
            let (sender, conn) = http1::handshake(io).await.unwrap();
            tokio::spawn(conn);
            Client::Http1(sender)
        }

        /// Sends `req` when the connection can take it (HTTP/1: after the last response).
        async fn send(&mut self, req: Request<B>) -> hyper::Result<Response<Incoming>> {
            match self {
                Client::Http1(c) => {
                    c.ready().await?;
                    c.send_request(req).await
                }
                Client::Http2(c) => c.send_request(req).await,
            }
        }

        fn is_closed(&self) -> bool {
            match self {
                Client::Http1(c) => c.is_closed(),
                Client::Http2(c) => c.is_closed(),
            }
        }
    }

    /// An HTTP/2 client connection; its sender clones are streams of one connection.
    async fn h2_client<B>(addr: std::net::SocketAddr) -> http2::SendRequest<B>
    where
        B: hyper::body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match Client::connect(addr, true).await {
            Client::Http2(sender) => sender,
            Client::Http1(_) => unreachable!("asked for HTTP/2"),
        }
    }

    fn get(uri: &str, dev: Option<&str>) -> Request<http_body_util::Empty<Bytes>> {
        let mut req = Request::get(uri).header(header::HOST, "app.default.svc");
        if let Some(dev) = dev {
            req = req.header("x-dev", dev);
        }
        req.body(http_body_util::Empty::new()).unwrap()
    }

    async fn body_text(resp: Response<Incoming>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    /// Over HTTP/1.1 keep-alive and over HTTP/2 streams of one connection.
    #[tokio::test]
    async fn each_request_of_a_connection_goes_where_its_headers_say() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        for h2 in [false, true] {
            let mut conn = Client::connect(addr, h2).await;
            let devs = [Some("alice"), None, Some("bob"), Some("alice"), None, Some("bob")];
            for (i, dev) in devs.into_iter().enumerate() {
                let resp = within(conn.send(get(&format!("/{i}?q=1"), dev))).await.unwrap();
                assert_eq!(resp.status(), StatusCode::OK);
                let want = format!("{} /{i}?q=1", dev.unwrap_or("real"));
                assert_eq!(within(body_text(resp)).await, want, "h2: {h2}");
            }
            assert!(!conn.is_closed(), "one client connection served them all");
        }
    }

    /// gRPC's shape: the calls of one connection in flight together, each
    /// with its own metadata, each answered by its own upstream.
    #[tokio::test]
    async fn concurrent_streams_of_one_http2_connection_each_go_where_their_headers_say() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        let conn = h2_client(addr).await;
        let mut calls = Vec::new();
        for dev in [Some("alice"), None, Some("bob")] {
            let (tx, body) = Channel::<Bytes, Infallible>::new(1);
            let mut req = Request::post("http://app.default.svc/pkg.Echo/Say").body(body).unwrap();
            if let Some(dev) = dev {
                req.headers_mut().insert("x-dev", header::HeaderValue::from_str(dev).unwrap());
            }
            let mut sender = conn.clone();
            let resp = tokio::spawn(async move { sender.send_request(req).await });
            calls.push((dev.unwrap_or("real"), tx, resp));
        }
        // Every request body is still open: all three streams are in flight at once.
        let mut opened = Vec::new();
        for (name, tx, resp) in calls {
            let resp = within(resp).await.unwrap().unwrap();
            assert_eq!(resp.headers()["x-app"], name);
            opened.push((name, tx, resp));
        }
        for (name, tx, resp) in opened {
            drop(tx);
            assert_eq!(within(body_text(resp)).await, format!("{name} /pkg.Echo/Say"));
        }
    }

    #[tokio::test]
    async fn a_session_that_cannot_be_reached_gets_a_502_naming_its_holder() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        for h2 in [false, true] {
            let mut conn = Client::connect(addr, h2).await;
            let resp = within(conn.send(get("/", Some("carol")))).await.unwrap();
            assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
            assert_eq!(within(body_text(resp)).await, "tpd: the intercept of carol@laptop is not reachable\n");
            // The connection goes on serving.
            let resp = within(conn.send(get("/after", None))).await.unwrap();
            assert_eq!(within(body_text(resp)).await, "real /after", "h2: {h2}");
        }
    }

    /// Each chunk comes back before the next is sent: nothing buffers a
    /// whole body (over HTTP/2, the shape of a bidirectional gRPC stream).
    #[tokio::test]
    async fn bodies_stream_both_ways() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        for (h2, dev) in [(false, Some("alice")), (false, None), (true, Some("alice")), (true, None)] {
            let mut conn = Client::connect(addr, h2).await;
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
            let mut req = Request::post("/echo").header(header::HOST, "app").body(body).unwrap();
            if let Some(dev) = dev {
                req.headers_mut().insert("x-dev", header::HeaderValue::from_str(dev).unwrap());
            }
            let sent = tokio::spawn(async move { conn.send(req).await });
            within(tx.send_data(Bytes::from_static(b"one"))).await.unwrap();
            let mut resp = within(sent).await.unwrap().unwrap();
            for chunk in ["one", "two", "three"] {
                if chunk != "one" {
                    within(tx.send_data(Bytes::from(chunk))).await.unwrap();
                }
                let frame: Frame<Bytes> = within(resp.body_mut().frame()).await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap(), chunk.as_bytes(), "h2: {h2}, {dev:?}");
            }
            drop(tx);
            // (Over HTTP/2 the end may come as an empty DATA frame.)
            let rest = within(resp.into_body().collect()).await.unwrap().to_bytes();
            assert!(rest.is_empty(), "the body ends with the request's");
        }
    }

    /// A gRPC status is a trailer: it reaches the client after the body.
    #[tokio::test]
    async fn trailers_pass_through_http2() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        let mut conn = h2_client(addr).await;
        for dev in [Some("alice"), None] {
            let resp = within(conn.send_request(get("/trailers", dev))).await.unwrap();
            let all = within(resp.into_body().collect()).await.unwrap();
            let trailers = all.trailers().cloned().expect("trailers");
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(all.to_bytes(), format!("{} /trailers", dev.unwrap_or("real")).as_bytes());
        }
    }

    /// Concurrent streams to a session open one connection to it, which is
    /// let go once the session ended (when the router next looks its
    /// connections over).
    #[tokio::test]
    async fn streams_to_a_session_share_one_connection_while_it_lives() {
        let real = fake_app("real").await;
        let (router, addr) = started(real).await;
        let conn = h2_client(addr).await;
        let calls: Vec<_> = (0..5)
            .map(|i| {
                let mut sender = conn.clone();
                tokio::spawn(async move { sender.send_request(get(&format!("/{i}"), Some("alice"))).await })
            })
            .collect();
        for call in calls {
            let resp = within(call).await.unwrap().unwrap();
            assert_eq!(resp.headers()["x-app"], "alice");
        }
        assert_eq!(router.sessions.dials.load(Ordering::Relaxed), 1, "one connection for every stream");
        let alice = Upstream::Session("alice".into());
        assert!(lock(&router.shared).contains_key(&alice));

        // Shown its token, a new stream may end the session.
        let mut stream = RegisterStream::default();
        assert_eq!(stream.handle(&router.registry, registration("alice", real)), Reply::Ok);
        assert_eq!(stream.handle(&router.registry, Registration::Unregister), Reply::Ok);
        let resp = within(conn.clone().send_request(get("/", Some("alice")))).await.unwrap();
        assert_eq!(resp.headers()["x-app"], "real", "the session's requests go to the real container");
        assert!(!lock(&router.shared).contains_key(&alice), "the ended session's connection is let go");
    }

    /// Sends `event` when dropped: what the upstream saw of a stream.
    struct Report(mpsc::UnboundedSender<&'static str>, &'static str);

    impl Drop for Report {
        fn drop(&mut self) {
            let _ = self.0.send(self.1);
        }
    }

    /// An upstream that reports what its streams went through: `/long`
    /// answers a chunk every 10 ms until its response body is dropped (its
    /// stream reset); `/silent` never answers, until the request is dropped
    /// (reset); `/refuse` resets its stream with `REFUSED_STREAM` at once,
    /// `/fail` after its head.
    async fn streaming_upstream(events: mpsc::UnboundedSender<&'static str>) -> u16 {
        serve_both(move |req: Request<Incoming>| {
            let events = events.clone();
            async move {
                let (mut tx, body) = Channel::<Bytes, io::Error>::new(1);
                match req.uri().path() {
                    "/silent" => {
                        let _ = events.send("arrived");
                        let _dropped = Report(events, "silent dropped");
                        std::future::pending::<()>().await;
                    }
                    "/refuse" => return Err(h2::Error::from(h2::Reason::REFUSED_STREAM)),
                    // After the head has gone (hyper sends it when this returns).
                    "/fail" => drop(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        tx.abort(io::Error::other("failed"));
                    })),
                    _ => drop(tokio::spawn(async move {
                        let _dropped = Report(events, "long dropped");
                        for _ in 0..1000 {
                            if tx.send_data(Bytes::from_static(b"tick")).await.is_err() {
                                return;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    })),
                }
                Ok(Response::new(body))
            }
        })
        .await
    }

    /// A client that drops a call, waiting for its answer or in the middle
    /// of it, cancels the upstream's stream; an upstream that resets its
    /// stream, before or after its head, resets the client's; the
    /// connections on both sides go on serving.
    #[tokio::test]
    async fn a_reset_on_either_side_of_an_http2_stream_resets_the_other() {
        let (events_tx, mut events) = mpsc::unbounded_channel();
        let real = streaming_upstream(events_tx).await;
        let addr = router(real).await;
        let mut conn = h2_client(addr).await;

        let call = tokio::spawn(conn.send_request(get("/silent", None)));
        assert_eq!(within(events.recv()).await, Some("arrived"));
        call.abort();
        assert_eq!(within(events.recv()).await, Some("silent dropped"), "the upstream's stream was reset");

        let mut resp = within(conn.send_request(get("/long", None))).await.unwrap();
        let frame = within(resp.body_mut().frame()).await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), "tick");
        drop(resp);
        assert_eq!(within(events.recv()).await, Some("long dropped"), "the upstream's stream was reset");

        let mut resp = within(conn.send_request(get("/fail", None))).await.unwrap();
        let end = within(resp.body_mut().frame()).await.expect("an end");
        assert!(end.is_err(), "the upstream's reset reaches the client: {end:?}");

        let refused = within(conn.send_request(get("/refuse", None))).await.expect_err("a reset, not a 502");
        let reason = std::error::Error::source(&refused).and_then(|e| e.downcast_ref::<h2::Error>()?.reason());
        assert_eq!(reason, Some(h2::Reason::REFUSED_STREAM), "the same reset: {refused:?}");

        let resp = within(conn.send_request(get("/long", None))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "the client's connection is still up");
    }

    /// Reads from `sock` until the end of a response head.
    async fn read_head(sock: &mut TcpStream) -> String {
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut byte = [0u8];
            within(sock.read_exact(&mut byte)).await.unwrap();
            head.push(byte[0]);
            assert!(head.len() < 4096, "a response head that never ends");
        }
        String::from_utf8(head).unwrap()
    }

    /// A WebSocket's and an `h2c` upgrade alike: the upgrade request's
    /// route takes the whole connection, and after the `101` its bytes
    /// (here HTTP/2's preface, as the client's next) go there raw.
    #[tokio::test]
    async fn an_upgrade_joins_both_connections_after_101() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        let h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
        let websocket = "Connection: upgrade\r\nUpgrade: websocket\r\n";
        for (dev, name) in [("alice", "alice"), ("nobody", "real")] {
            for (protocol, upgrade) in [("websocket", websocket), ("h2c", h2c)] {
                let mut sock = TcpStream::connect(addr).await.unwrap();
                let req = format!("GET /ws HTTP/1.1\r\nHost: app\r\nx-dev: {dev}\r\n{upgrade}\r\n");
                sock.write_all(req.as_bytes()).await.unwrap();
                let head = read_head(&mut sock).await;
                assert!(head.starts_with("HTTP/1.1 101"), "{head}");
                assert!(head.to_ascii_lowercase().contains(&format!("upgrade: {protocol}\r\n")), "{head}");
                sock.write_all(H2_PREFACE).await.unwrap();
                let want = [format!("{name} ").as_bytes(), H2_PREFACE].concat();
                let mut got = vec![0u8; want.len()];
                within(sock.read_exact(&mut got)).await.unwrap();
                assert_eq!(got, want, "{protocol} for {dev}");
            }
        }
    }

    /// What is logged at warn on this thread (the test's runtime has one)
    /// while the guard lives.
    fn warnings() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        let logged = Arc::new(Mutex::new(Vec::new()));
        let into = logged.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_writer(move || Log(into.clone()))
            .finish();
        (logged, tracing::subscriber::set_default(subscriber))
    }

    struct Log(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Log {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    /// TLS (twice: the warning is said once), a `PRI` that is not HTTP/2's
    /// preface, anything else.
    #[tokio::test]
    async fn a_connection_that_is_not_http_is_spliced_to_the_real_container() {
        let (logged, _guard) = warnings();
        let real = testing::echo_server().await;
        let addr = router(real).await;
        let tls = &b"\x16\x03\x01\x02\x00 a TLS hello"[..];
        for first in [tls, tls, b"PRI / HTTP/1.1\r\n\r\n", b"SSH-2.0-x\r\n"] {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            // In two writes: the router decides on what it has, then passes the rest.
            sock.write_all(&first[..2]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            sock.write_all(&first[2..]).await.unwrap();
            let mut got = vec![0u8; first.len()];
            within(sock.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, first);
        }
        let logged = String::from_utf8(lock(&logged).clone()).unwrap();
        let warning = format!("TLS on port {real}: its requests cannot be filtered and go to the real container");
        assert_eq!(logged.matches(&warning).count(), 1, "{logged}");
    }

    /// The real container gets the request as the client sent it, header
    /// names' case included (this one answers with the head it read).
    #[tokio::test]
    async fn the_real_container_gets_the_request_as_sent() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let real = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let head = read_head(&mut sock).await;
            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{head}", head.len());
            sock.write_all(resp.as_bytes()).await.unwrap();
        });
        let addr = router(real).await;
        let mut sock = TcpStream::connect(addr).await.unwrap();
        let sent = "GET /case?a=1 HTTP/1.1\r\nHost: app.default.svc:8080\r\nX-Request-ID: Abc\r\n\r\n";
        sock.write_all(sent.as_bytes()).await.unwrap();
        let head = read_head(&mut sock).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let mut got = vec![0u8; sent.len()];
        within(sock.read_exact(&mut got)).await.unwrap();
        assert_eq!(String::from_utf8(got).unwrap(), sent);
    }

    #[test]
    fn first_bytes_tell_http1_http2_and_tls_from_the_rest() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(FirstBytes::Http1));
        assert_eq!(classify(b"PROPFIND "), Some(FirstBytes::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(classify(H2_PREFACE), Some(FirstBytes::Http2));
        assert_eq!(classify(&[H2_PREFACE, b"\x00\x00\x12\x04"].concat()), Some(FirstBytes::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None, "HTTP/2 only on the whole preface");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"), Some(FirstBytes::Other));
        assert_eq!(classify(b"PRI / HTTP/1.1"), Some(FirstBytes::Other));
        assert_eq!(classify(b"\x16"), None);
        assert_eq!(classify(b"\x16\x03\x01"), Some(FirstBytes::Tls));
        assert_eq!(classify(b"\x16\x00"), Some(FirstBytes::Other));
        assert_eq!(classify(b" GET"), Some(FirstBytes::Other));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(FirstBytes::Other));
        assert_eq!(classify(&[b'A'; 40]), Some(FirstBytes::Other));
    }
}
