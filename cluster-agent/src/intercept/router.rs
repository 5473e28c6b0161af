//! The router on one of the agent's listening ports, in front of the real
//! container's `remote` port. A connection whose first bytes are not an
//! HTTP/1 request line is spliced to the real container as it is. Otherwise
//! the agent serves HTTP/1.1 itself and routes each request: the first live
//! route that matches sends it to its session, anything else goes to the
//! real container on the pod's loopback. Bodies stream both ways; an
//! `Upgrade` (WebSocket) that gets `101` joins the two upgraded connections.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
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
/// Idle upstream connections kept per destination.
const POOL_MAX: usize = 8;

type Body = BoxBody<Bytes, hyper::Error>;

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
    pool: Mutex<HashMap<Upstream, Vec<SendRequest<Incoming>>>>,
    /// Requests routed to each session, for the debug log.
    counts: Mutex<HashMap<String, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl<C: Connector> Router<C> {
    pub fn new(remote: u16, registry: Arc<Registry>, sessions: C) -> Arc<Self> {
        Arc::new(Router { remote, registry, sessions, pool: Mutex::default(), counts: Mutex::default() })
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
        let http = matches!(classify(&head), Some(FirstBytes::Http1));
        let client = Prefixed { head, at: 0, inner: sock };
        if !http {
            return self.splice_raw(client).await;
        }
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| this.clone().handle(req));
        // Header names as the client wrote them, to the upstream as they were.
        let served = hyper::server::conn::http1::Builder::new()
            .preserve_header_case(true)
            .serve_connection(TokioIo::new(client), service)
            .with_upgrades();
        if let Err(e) = served.await {
            tracing::debug!(port = self.remote, "HTTP connection ended: {e}");
        }
    }

    /// Not HTTP/1: to the real container, byte for byte.
    async fn splice_raw(&self, mut client: Prefixed<TcpStream>) {
        match dial_loopback(self.remote).await {
            Ok(mut real) => drop(tokio::io::copy_bidirectional(&mut client, &mut real).await),
            Err(e) => tracing::debug!(port = self.remote, "the real container refused a connection: {e}"),
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
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
    /// one) on an idle connection or a new one, and returns the response as
    /// it arrives (its body streams on).
    async fn forward(&self, target: Option<&Target>, mut req: Request<Incoming>) -> io::Result<Response<Body>> {
        let upstream = target.map_or(Upstream::Real, |t| Upstream::Session(t.session.clone()));
        let upgrade = req.headers().contains_key(header::UPGRADE).then(|| hyper::upgrade::on(&mut req));
        let (sender, mut resp) = match self.idle(&upstream) {
            // An idle connection may have been closed by the other end meanwhile:
            // then the request comes back unsent and goes on a new one.
            Some(mut idle) => match idle.try_send_request(req).await {
                Ok(resp) => (idle, resp),
                Err(mut e) => match e.take_message() {
                    Some(req) => self.send_new(&upstream, target, req).await?,
                    None => return Err(io::Error::other(e.into_error())),
                },
            },
            None => self.send_new(&upstream, target, req).await?,
        };
        match upgrade {
            Some(client_side) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                let upstream_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(join_upgraded(client_side, upstream_side));
            }
            // Not pooled: after an upgrade was asked for, whether the
            // connection is still HTTP is the server's say.
            Some(_) => {}
            None => self.keep(&upstream, sender),
        }
        Ok(resp.map(BodyExt::boxed))
    }

    /// Opens a connection to `upstream` and sends `req` on it.
    async fn send_new(
        &self,
        upstream: &Upstream,
        target: Option<&Target>,
        req: Request<Incoming>,
    ) -> io::Result<(SendRequest<Incoming>, Response<Incoming>)> {
        let conn: BoxConn = match target {
            Some(target) => self.sessions.connect(target, self.remote).await?,
            None => Box::new(dial_loopback(self.remote).await?),
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .preserve_header_case(true)
            .handshake(TokioIo::new(conn))
            .await
            .map_err(io::Error::other)?;
        let port = self.remote;
        let to = upstream.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!(port, ?to, "upstream connection ended: {e}");
            }
        });
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        Ok((sender, resp))
    }

    /// An idle connection to `upstream`, dropping the closed ones met
    /// (and the destination, when none is left: a session that ended).
    fn idle(&self, upstream: &Upstream) -> Option<SendRequest<Incoming>> {
        let mut pool = lock(&self.pool);
        let conns = pool.get_mut(upstream)?;
        conns.retain(|c| !c.is_closed());
        if conns.is_empty() {
            pool.remove(upstream);
            return None;
        }
        let ready = conns.iter().position(SendRequest::is_ready)?;
        Some(conns.swap_remove(ready))
    }

    /// Keeps the connection for the next request once its response is
    /// done (until then it is busy, and [`Router::idle`] passes it over).
    fn keep(&self, upstream: &Upstream, sender: SendRequest<Incoming>) {
        let mut pool = lock(&self.pool);
        let conns = pool.entry(upstream.clone()).or_default();
        conns.retain(|c| !c.is_closed());
        // Past the bound, dropping the handle closes the connection once its response is done.
        if conns.len() < POOL_MAX {
            conns.push(sender);
        }
    }
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
    /// Anything else, HTTP/2 with prior knowledge included (`PRI * HTTP/2.0`).
    Other,
}

/// `None` until the bytes so far decide.
fn classify(head: &[u8]) -> Option<FirstBytes> {
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
    use tokio::io::AsyncWriteExt;
    use tpd_wire::intercept::{Filter, Reply, Request as Registration, Route};

    /// Every wait in these tests is bounded by this.
    const WAIT: Duration = Duration::from_secs(10);

    async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(WAIT, f).await.expect("timed out")
    }

    /// An HTTP server on the loopback that says who it is: `NAME PATH` for
    /// a request, the body streamed back on `/echo`, and on an `Upgrade`
    /// a `101` and then `NAME ` and every byte echoed.
    async fn fake_app(name: &'static str) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (sock, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(answer(name, req))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(sock), service)
                        .with_upgrades(),
                );
            }
        });
        port
    }

    fn answer(name: &'static str, mut req: Request<Incoming>) -> Response<Body> {
        if req.headers().contains_key(header::UPGRADE) {
            let upgraded = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(upgraded.await.unwrap());
                io.write_all(format!("{name} ").as_bytes()).await.unwrap();
                let (mut rd, mut wr) = tokio::io::split(io);
                let _ = tokio::io::copy(&mut rd, &mut wr).await;
            });
            let mut resp = Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed());
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut().insert(header::UPGRADE, header::HeaderValue::from_static("websocket"));
            resp.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("upgrade"));
            return resp;
        }
        if req.uri().path() == "/echo" {
            return Response::new(req.into_body().boxed());
        }
        text(StatusCode::OK, format!("{name} {}", req.uri()))
    }

    /// Reaches each session's fake app by the session's name.
    struct Fake(HashMap<String, u16>);

    impl Connector for Fake {
        async fn connect(&self, target: &Target, _: u16) -> io::Result<BoxConn> {
            let port = self.0.get(&target.session).ok_or(io::ErrorKind::ConnectionRefused)?;
            Ok(Box::new(TcpStream::connect(("127.0.0.1", *port)).await?))
        }
    }

    fn registration(session: &str, dev: &str) -> Registration {
        Registration::Register {
            session: session.into(),
            token: format!("{session}-token"),
            holder: format!("{session}@laptop"),
            since: "2026-12-07T10:00:00Z".into(),
            home: "127.0.0.1:1".parse().unwrap(),
            routes: vec![Route {
                port: 0, // replaced below
                filter: Filter {
                    headers: [("x-dev".into(), dev.into())].into(),
                    path_prefix: None,
                    ..Filter::default()
                },
            }],
        }
    }

    /// A router in front of `real`, with alice and bob reachable and carol
    /// registered but not; returns the router's address.
    async fn router(real: u16) -> std::net::SocketAddr {
        let registry = Arc::new(Registry::new([real], Duration::from_secs(15)));
        for who in ["alice", "bob", "carol"] {
            let mut reg = registration(who, who);
            if let Registration::Register { routes, .. } = &mut reg {
                routes[0].port = real;
            }
            assert_eq!(RegisterStream::default().handle(&registry, reg), Reply::Ok);
        }
        let mut apps = HashMap::new();
        for who in ["alice", "bob"] {
            apps.insert(who.to_owned(), fake_app(who).await);
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(Router::new(real, registry, Fake(apps)).serve(listener));
        addr
    }

    async fn client<B>(addr: std::net::SocketAddr) -> SendRequest<B>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let sock = TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(sock)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    fn get(path: &str, dev: Option<&str>) -> Request<http_body_util::Empty<Bytes>> {
        let mut req = Request::get(path).header(header::HOST, "app.default.svc");
        if let Some(dev) = dev {
            req = req.header("x-dev", dev);
        }
        req.body(http_body_util::Empty::new()).unwrap()
    }

    async fn body_text(resp: Response<Incoming>) -> String {
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn each_request_of_a_keep_alive_connection_goes_where_its_headers_say() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        let mut conn = client(addr).await;
        for (i, dev) in [Some("alice"), None, Some("bob"), Some("alice"), None, Some("bob")].into_iter().enumerate() {
            within(conn.ready()).await.unwrap();
            let resp = within(conn.send_request(get(&format!("/{i}?q=1"), dev))).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let want = format!("{} /{i}?q=1", dev.unwrap_or("real"));
            assert_eq!(within(body_text(resp)).await, want);
        }
        assert!(!conn.is_closed(), "one client connection served them all");
    }

    #[tokio::test]
    async fn a_session_that_cannot_be_reached_gets_a_502_naming_its_holder() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        let mut conn = client(addr).await;
        let resp = within(conn.send_request(get("/", Some("carol")))).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(within(body_text(resp)).await, "tpd: the intercept of carol@laptop is not reachable\n");
        // The connection goes on serving.
        within(conn.ready()).await.unwrap();
        let resp = within(conn.send_request(get("/after", None))).await.unwrap();
        assert_eq!(within(body_text(resp)).await, "real /after");
    }

    /// Each chunk comes back before the next is sent: nothing buffers a whole body.
    #[tokio::test]
    async fn bodies_stream_both_ways() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        for dev in [Some("alice"), None] {
            let mut conn = client(addr).await;
            let (mut tx, body) = Channel::<Bytes, Infallible>::new(1);
            let mut req = Request::post("/echo").header(header::HOST, "app").body(body).unwrap();
            if let Some(dev) = dev {
                req.headers_mut().insert("x-dev", header::HeaderValue::from_str(dev).unwrap());
            }
            let sent = tokio::spawn(conn.send_request(req));
            within(tx.send_data(Bytes::from_static(b"one"))).await.unwrap();
            let mut resp = within(sent).await.unwrap().unwrap();
            for chunk in ["one", "two", "three"] {
                if chunk != "one" {
                    within(tx.send_data(Bytes::from(chunk))).await.unwrap();
                }
                let frame: Frame<Bytes> = within(resp.body_mut().frame()).await.unwrap().unwrap();
                assert_eq!(frame.into_data().unwrap(), chunk.as_bytes(), "{dev:?}");
            }
            drop(tx);
            assert!(within(resp.body_mut().frame()).await.is_none(), "the body ends with the request's");
        }
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

    #[tokio::test]
    async fn an_upgrade_joins_both_connections_after_101() {
        let real = fake_app("real").await;
        let addr = router(real).await;
        for (dev, name) in [("alice", "alice"), ("nobody", "real")] {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            let req = format!(
                "GET /ws HTTP/1.1\r\nHost: app\r\nx-dev: {dev}\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
            );
            sock.write_all(req.as_bytes()).await.unwrap();
            let head = read_head(&mut sock).await;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            sock.write_all(b"ping").await.unwrap();
            let want = format!("{name} ping");
            let mut got = vec![0u8; want.len()];
            within(sock.read_exact(&mut got)).await.unwrap();
            assert_eq!(String::from_utf8(got).unwrap(), want);
        }
    }

    #[tokio::test]
    async fn a_connection_that_is_not_http1_is_spliced_to_the_real_container() {
        let real = testing::echo_server().await;
        let addr = router(real).await;
        for first in [&b"\x16\x03\x01\x02\x00 a TLS hello"[..], b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", b"SSH-2.0-x\r\n"] {
            let mut sock = TcpStream::connect(addr).await.unwrap();
            // In two writes: the router decides on what it has, then passes the rest.
            sock.write_all(&first[..2]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            sock.write_all(&first[2..]).await.unwrap();
            let mut got = vec![0u8; first.len()];
            within(sock.read_exact(&mut got)).await.unwrap();
            assert_eq!(got, first);
        }
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
    fn first_bytes_tell_http1_from_the_rest() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(FirstBytes::Http1));
        assert_eq!(classify(b"PROPFIND "), Some(FirstBytes::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HTTP/2.0"), Some(FirstBytes::Other));
        assert_eq!(classify(b" GET"), Some(FirstBytes::Other));
        assert_eq!(classify(b"\x16\x03\x01"), Some(FirstBytes::Other));
        assert_eq!(classify(b"SSH-2.0-OpenSSH\r\n"), Some(FirstBytes::Other));
        assert_eq!(classify(&[b'A'; 40]), Some(FirstBytes::Other));
    }
}
