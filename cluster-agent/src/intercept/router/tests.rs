//! The router through real sockets: fake apps on the loopback stand for the
//! real container and the sessions' apps, clients speak HTTP/1.1 and HTTP/2.

use super::sniff::H2_PREFACE;
use super::*;
use crate::intercept::registry::RegisterStream;
use crate::intercept::testing;
use http_body_util::channel::Channel;
use hyper::body::Frame;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tpd_wire::intercept::{
    Filter, MIRROR_HEADER, MIRROR_TRUNCATED_HEADER, Reply, Request as Registration, Route, Traffic,
};

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
                        hyper::server::conn::http1::Builder::new().serve_connection(io, service).with_upgrades().await
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
    testing::register(
        who,
        &format!("{who}-token"),
        "127.0.0.1:1".parse().unwrap(),
        vec![Route { port, filter, mirror: None }],
    )
}

/// A router in front of `real`, with alice and bob reachable and carol
/// registered but not, serving on its address.
async fn started(real: u16) -> (Arc<Router<Fake>>, std::net::SocketAddr) {
    let registry = Arc::new(Registry::new([real], Duration::from_secs(15)));
    for who in ["alice", "bob", "carol"] {
        assert!(RegisterStream::default().handle(&registry, registration(who, real)).is_ok());
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

/// Concurrent streams of one client connection to a session open one
/// connection to it; another client connection's streams open their own;
/// once the session ended, its requests go to the real container.
#[tokio::test]
async fn the_streams_of_one_client_connection_share_an_upstream_connection_and_another_client_gets_its_own() {
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
    // Another client's streams have a connection of their own.
    let other = h2_client(addr).await;
    let resp = within(other.clone().send_request(get("/other", Some("alice")))).await.unwrap();
    assert_eq!(resp.headers()["x-app"], "alice");
    assert_eq!(router.sessions.dials.load(Ordering::Relaxed), 2, "one connection per client connection");

    // Shown its token, a new stream may end the session.
    let mut stream = RegisterStream::default();
    assert!(stream.handle(&router.registry, registration("alice", real)).is_ok());
    assert!(stream.handle(&router.registry, Registration::Unregister).is_ok());
    let resp = within(conn.clone().send_request(get("/", Some("alice")))).await.unwrap();
    assert_eq!(resp.headers()["x-app"], "real", "the session's requests go to the real container");
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

/// A WebSocket upgrade: the upgrade request's route takes the whole
/// connection, and after the `101` its bytes (here HTTP/2's preface, as
/// the client's next) go there raw.
#[tokio::test]
async fn an_upgrade_joins_both_connections_after_101() {
    let real = fake_app("real").await;
    let addr = router(real).await;
    let websocket = "Connection: upgrade\r\nUpgrade: websocket\r\n";
    for (dev, name) in [("alice", "alice"), ("nobody", "real")] {
        {
            let (protocol, upgrade) = ("websocket", websocket);
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

/// An `Upgrade: h2c` is declined: the answer is the route's own, in
/// HTTP/1.1, and every later request of the connection is routed on its own.
#[tokio::test]
async fn an_h2c_upgrade_is_declined_so_each_request_is_routed_on_its_own() {
    let real = fake_app("real").await;
    let addr = router(real).await;
    let mut sock = TcpStream::connect(addr).await.unwrap();
    let ask = |path: &str, dev: &str, extra: &str| {
        format!("GET {path} HTTP/1.1\r\nHost: app\r\nx-dev: {dev}\r\n{extra}\r\n").into_bytes()
    };
    let h2c = "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n";
    for (path, dev, extra, want) in [
        ("/a", "alice", h2c, "alice /a"),
        ("/b", "nobody", "", "real /b"),
        ("/c", "bob", h2c, "bob /c"),
        ("/d", "alice", "", "alice /d"),
    ] {
        sock.write_all(&ask(path, dev, extra)).await.unwrap();
        let head = read_head(&mut sock).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let mut body = vec![0u8; want.len()];
        within(sock.read_exact(&mut body)).await.unwrap();
        assert_eq!(String::from_utf8(body).unwrap(), want);
    }
    // What the upstream got: no trace of the upgrade (a fake app would have said 101).
    let mut headers = header::HeaderMap::new();
    headers.insert(header::CONNECTION, header::HeaderValue::from_static("keep-alive, Upgrade, HTTP2-Settings"));
    headers.insert(header::UPGRADE, header::HeaderValue::from_static("h2c, websocket"));
    headers.insert("http2-settings", header::HeaderValue::from_static("AAMA"));
    decline_h2c(&mut headers);
    assert_eq!(headers[header::UPGRADE], "websocket");
    assert_eq!(headers[header::CONNECTION], "keep-alive, upgrade");
    assert!(!headers.contains_key("http2-settings"));
}

/// What is logged at warn on this thread (the test's runtime has one)
/// while the guard lives.
fn warnings() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
    let logged = Arc::new(Mutex::new(Vec::new()));
    let into = logged.clone();
    let subscriber =
        tracing_subscriber::fmt().with_max_level(tracing::Level::WARN).with_writer(move || Log(into.clone())).finish();
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

/// What reached a recording app: path, body, and the copy's truncation mark.
type Seen = (String, Bytes, Option<String>);

/// An app that records every request (all must be copies) and answers it;
/// with `hang`, it never answers (an app stopped in a debugger).
async fn recording_app(seen: mpsc::UnboundedSender<Seen>, hang: bool) -> u16 {
    serve_both(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            assert_eq!(req.headers()[MIRROR_HEADER], "1", "only copies reach a mirroring session");
            let path = req.uri().path().to_owned();
            let cut = req.headers().get(MIRROR_TRUNCATED_HEADER).map(|v| v.to_str().unwrap().to_owned());
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let _ = seen.send((path, body, cut));
            if hang {
                std::future::pending::<()>().await;
            }
            Ok::<_, Infallible>(text(StatusCode::OK, "thrown away".into()))
        }
    })
    .await
}

/// A router in front of `real` where `who` mirrors every request (bodies up
/// to 8 bytes), reached at `app` (unreachable without); the stream that
/// registered it, to read its figures with.
async fn mirrored(real: u16, who: &str, app: Option<u16>) -> (Arc<Router<Fake>>, RegisterStream, SocketAddr) {
    let registry = Arc::new(Registry::new([real], Duration::from_secs(15)));
    let route = Route { port: real, filter: Filter::default(), mirror: Some(Mirror { body_limit: 8 }) };
    let mut stream = RegisterStream::default();
    let registration = testing::register(who, "token", "127.0.0.1:1".parse().unwrap(), vec![route]);
    assert!(stream.handle(&registry, registration).is_ok());
    let apps = app.map(|port| (who.to_owned(), port)).into_iter().collect();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let router = Router::new(real, registry, Fake { apps, dials: Default::default() });
    tokio::spawn(router.clone().serve(listener));
    (router, stream, addr)
}

/// Asks for the session's figures until `done` holds (bounded by [`WAIT`]).
async fn figures_until(router: &Router<Fake>, stream: &mut RegisterStream, done: impl Fn(&Traffic) -> bool) -> Traffic {
    within(async {
        loop {
            match stream.handle(&router.registry, Registration::Renew) {
                Reply::Ok { traffic } if done(&traffic) => return traffic,
                Reply::Ok { .. } => tokio::time::sleep(Duration::from_millis(20)).await,
                Reply::Refused { message } => panic!("{message}"),
            }
        }
    })
    .await
}

fn post(uri: &str, body: &'static str) -> Request<http_body_util::Full<Bytes>> {
    let req = Request::post(uri).header(header::HOST, "app.default.svc");
    req.body(http_body_util::Full::new(Bytes::from_static(body.as_bytes()))).unwrap()
}

#[tokio::test]
async fn the_real_app_answers_and_the_mirroring_session_gets_a_copy_of_each_request() {
    let real = fake_app("real").await;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let (router, mut stream, addr) = mirrored(real, "alice", Some(recording_app(tx, false).await)).await;
    for h2 in [false, true] {
        let mut conn = Client::connect(addr, h2).await;
        for i in 0..5 {
            let resp = within(conn.send(post(&format!("/{i}"), "short"))).await.unwrap();
            assert_eq!(within(body_text(resp)).await, format!("real /{i}"), "h2: {h2}");
        }
        // A body past the limit reaches the real app whole, and the copy cut and marked.
        let resp = within(conn.send(post("/echo", "0123456789abcdef"))).await.unwrap();
        assert_eq!(within(body_text(resp)).await, "0123456789abcdef");
        let mut copies: Vec<Seen> = Vec::new();
        while copies.len() < 6 {
            copies.push(within(seen.recv()).await.unwrap());
        }
        copies.sort();
        let short = |i: usize| (format!("/{i}"), Bytes::from_static(b"short"), None);
        let mut want: Vec<Seen> = (0..5).map(short).collect();
        want.push(("/echo".into(), Bytes::from_static(b"01234567"), Some("8".into())));
        want.sort();
        assert_eq!(copies, want, "h2: {h2}");
    }
    let figures = figures_until(&router, &mut stream, |t| t.mirrored == 12).await;
    assert_eq!((figures.last_minute, figures.dropped), (12, 0));
}

#[tokio::test]
async fn copies_for_a_session_that_is_gone_or_stuck_are_dropped_and_counted_never_the_requests() {
    let real = fake_app("real").await;
    // Gone: its app cannot be reached.
    let (router, mut stream, addr) = mirrored(real, "carol", None).await;
    let mut conn = Client::connect(addr, false).await;
    for i in 0..20 {
        let resp = within(conn.send(get(&format!("/{i}"), None))).await.unwrap();
        assert_eq!(within(body_text(resp)).await, format!("real /{i}"));
    }
    let figures = figures_until(&router, &mut stream, |t| t.dropped == 20).await;
    assert_eq!(figures.mirrored, 0);
    // Stuck: its app takes copies and never answers. The copies in flight
    // and the queue fill up; every later copy is dropped at once, and the
    // real app still answers every request.
    let (tx, _seen) = mpsc::unbounded_channel();
    let (router, mut stream, addr) = mirrored(real, "dave", Some(recording_app(tx, true).await)).await;
    let burst = mirror::IN_FLIGHT + mirror::QUEUE + 20;
    let mut conn = Client::connect(addr, true).await;
    for i in 0..burst {
        let resp = within(conn.send(get(&format!("/{i}"), None))).await.unwrap();
        assert_eq!(within(body_text(resp)).await, format!("real /{i}"));
    }
    let figures = figures_until(&router, &mut stream, |t| t.dropped >= 20).await;
    assert_eq!(figures.mirrored, 0);
}
