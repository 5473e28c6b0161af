//! The intercept port: `Register` streams from the CLI (over the pod's
//! loopback, where a port-forward lands) and `Relay` streams from the
//! workload's other agents (over the pod network), told apart by their
//! preamble.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tpd_tunnel::io as wio;
use tpd_wire::control;
use tpd_wire::intercept::{Kind, RelayHeader, Request};

use super::registry::{RegisterStream, Registry};
use crate::instance::Instances;
use crate::transport::arrived_on_loopback;

/// The relay's answer: the developer's side accepted, the stream is its connection.
pub const RELAY_ACCEPTED: u8 = 1;
pub const RELAY_REFUSED: u8 = 0;

pub async fn serve(listener: TcpListener, registry: Arc<Registry>, instances: Arc<Instances>) {
    loop {
        let (sock, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("accepting on the intercept port: {e}");
                continue;
            }
        };
        let (registry, instances) = (registry.clone(), instances.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_stream(sock, peer, &registry, &instances).await {
                tracing::debug!(%peer, "intercept port stream closed: {e}");
            }
        });
    }
}

/// Whether a stream of `kind` may be served, by where it came from: a
/// registration changes where the workload's traffic goes, so only the
/// pod's loopback (a port-forward, as for the transport) may open one; a
/// relay proves itself with the session's token.
fn may_open(kind: Kind, over_loopback: bool) -> bool {
    match kind {
        Kind::Register => over_loopback,
        _ => true,
    }
}

async fn serve_stream(
    mut sock: TcpStream,
    peer: SocketAddr,
    registry: &Registry,
    instances: &Instances,
) -> io::Result<()> {
    let over_loopback = arrived_on_loopback(&sock, peer);
    let mut buf = BytesMut::new();
    let kind = wio::read_preamble_of(&mut sock, &mut buf, &[Kind::Register, Kind::Relay]).await?;
    if !may_open(kind, over_loopback) {
        // Closed with nothing said.
        tracing::debug!(%peer, "refused a registration from outside the pod");
        return Ok(());
    }
    match kind {
        Kind::Register => serve_register(sock, buf, registry).await,
        _ => serve_relay(sock, buf, registry, instances).await,
    }
}

/// One request, one reply, until the CLI closes. Closing does not remove
/// the session's routes: a port-forward that blips must not cost the
/// developer their traffic; the lease ends them if the CLI is gone.
async fn serve_register(sock: TcpStream, mut buf: BytesMut, registry: &Registry) -> io::Result<()> {
    let (mut rd, mut wr) = sock.into_split();
    let mut stream = RegisterStream::default();
    let mut out = BytesMut::new();
    while let Some(request) = wio::read_message::<_, Request>(&mut rd, &mut buf).await? {
        let reply = stream.handle(registry, request);
        if let tpd_wire::intercept::Reply::Refused { message } = &reply {
            tracing::info!("refused a registration: {message}");
        }
        control::encode(&reply, &mut out).map_err(io::Error::other)?;
        wr.write_all(&out).await?;
        out.clear();
    }
    Ok(())
}

/// Carries one connection to the session's developer app, through its
/// tunnel on this agent, when the header's token is the session's.
async fn serve_relay(
    mut sock: TcpStream,
    mut buf: BytesMut,
    registry: &Registry,
    instances: &Instances,
) -> io::Result<()> {
    let header: RelayHeader = tokio::time::timeout(wio::HANDSHAKE_TIMEOUT, wio::read_message(&mut sock, &mut buf))
        .await
        .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??
        .ok_or(io::ErrorKind::UnexpectedEof)?;
    let instance = registry
        .relay_allowed(&header.session, &header.token, header.port)
        .then(|| instances.by_session(&header.session))
        .flatten();
    let app = match instance {
        Some(instance) => instance.inbound.dial(header.port).await,
        None => Err(io::Error::new(io::ErrorKind::PermissionDenied, "no such session here, or not its token")),
    };
    let mut app = match app {
        Ok(app) => app,
        Err(e) => {
            tracing::debug!(session = header.session, "relay refused: {e}");
            return sock.write_all(&[RELAY_REFUSED]).await;
        }
    };
    sock.write_all(&[RELAY_ACCEPTED]).await?;
    // The relaying agent waits for the answer before sending; anything early is the client's.
    app.write_all(&buf).await?;
    tokio::io::copy_bidirectional(&mut sock, &mut app).await.map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::instance::test_shared;
    use crate::intercept::testing;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tpd_wire::intercept::{Filter, Reply, Route};
    use tpd_wire::preamble;

    #[test]
    fn only_the_pods_loopback_may_register_anyone_may_relay() {
        assert!(may_open(Kind::Register, true));
        assert!(!may_open(Kind::Register, false));
        assert!(may_open(Kind::Relay, false));
        assert!(may_open(Kind::Relay, true));
    }

    async fn agent() -> (SocketAddr, Arc<Registry>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let registry = Arc::new(Registry::new([8080], Duration::from_secs(15)));
        tokio::spawn(serve(listener, registry.clone(), Instances::per_key(test_shared())));
        (addr, registry)
    }

    /// The CLI's side: preamble, then requests, each answered.
    #[tokio::test]
    async fn a_registration_over_the_loopback_is_answered() {
        let (addr, registry) = agent().await;
        let mut conn = TcpStream::connect(addr).await.unwrap();
        let mut out = BytesMut::from(&preamble::encode(Kind::Register)[..]);
        let routes = vec![Route {
            port: 8080,
            filter: Filter { path_prefix: Some("/a".into()), ..Filter::default() },
            mirror: None,
        }];
        let register = testing::register("s", "t", addr, routes);
        for request in [register, Request::Renew] {
            control::encode(&request, &mut out).unwrap();
        }
        conn.write_all(&out).await.unwrap();
        let mut buf = BytesMut::new();
        for _ in 0..2 {
            let reply: Reply = wio::read_message(&mut conn, &mut buf).await.unwrap().unwrap();
            assert!(reply.is_ok(), "{reply:?}");
        }
        assert!(registry.relay_allowed("s", "t", 8080));
        // Closing the stream keeps the routes: the lease decides.
        drop(conn);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(registry.relay_allowed("s", "t", 8080));
    }

    /// A pod that connects directly with a wrong token gets 0 and nothing else.
    #[tokio::test]
    async fn a_relay_with_a_wrong_token_gets_a_zero() {
        let (addr, registry) = agent().await;
        let mut stream = RegisterStream::default();
        let register = testing::register("s", "secret", addr, vec![testing::every_request(8080)]);
        assert!(stream.handle(&registry, register).is_ok());
        for token in ["guess", "secret"] {
            // With the right token the session has no tunnel on this agent: 0 too.
            let mut conn = TcpStream::connect(addr).await.unwrap();
            let mut out = BytesMut::from(&preamble::encode(Kind::Relay)[..]);
            let header = RelayHeader { session: "s".into(), token: token.into(), port: 8080 };
            control::encode(&header, &mut out).unwrap();
            conn.write_all(&out).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut answer)).await.unwrap().unwrap();
            assert_eq!(answer, [RELAY_REFUSED], "token {token}");
        }
    }
}
