//! The agent's transports on `AGENT_TRANSPORT_PORT`: TCP streams (hello, then
//! WireGuard frames; what a port-forward carries) and plain UDP datagrams.
//! A stream is admitted only when it arrives on the pod's loopback, where a
//! kubelet's port-forward lands; anyone else on the pod network is closed
//! on at once, before the agent says anything. The agent says its hello
//! after the sidecar's, once it has admitted the sidecar's key. A swapped or outbound-only
//! agent locks to the first admitted sidecar's key; an intercept agent
//! serves each key with its own instance ([`Instances`]). Every new stream
//! from a key becomes the route for its replies, so a redialled stream
//! takes over without ending the session. UDP (a swap's only) needs no
//! such check: before a key is admitted every datagram is dropped, and
//! after it WireGuard answers only that key.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tpd_tunnel::Route;
use tpd_tunnel::io as wio;
use tpd_tunnel::udp::TunnelUdp;
use tpd_wire::hello::{Hello, Role};

use crate::instance::{Instance, Instances};

/// Queue of datagrams waiting for one stream's writer.
const STREAM_QUEUE: usize = 4096;

pub async fn serve_streams(listener: TcpListener, instances: Arc<Instances>) {
    loop {
        match listener.accept().await {
            Ok((sock, addr)) => {
                if !arrived_on_loopback(&sock, addr) {
                    // Dropped unread: the peer sees a close (or a reset), nothing else.
                    tracing::debug!(%addr, "refused a transport stream from outside the pod");
                    continue;
                }
                let instances = instances.clone();
                tokio::spawn(async move {
                    match serve_stream(sock, &instances).await {
                        Ok(()) => tracing::info!(%addr, "transport stream closed"),
                        Err(e) => tracing::warn!(%addr, "transport stream closed: {e:#}"),
                    }
                });
            }
            Err(e) => tracing::warn!("accepting a transport stream: {e}"),
        }
    }
}

/// Whether a connection came over the pod's loopback. The port itself
/// listens on every address: the readiness probe dials the pod IP, and UDP
/// shares the address.
pub fn arrived_on_loopback(sock: &TcpStream, peer: SocketAddr) -> bool {
    sock.local_addr().is_ok_and(|local| admitted(local.ip(), peer.ip()))
}

/// The admission rule: both ends on loopback (an IPv4-mapped IPv6 address
/// counts as the IPv4 one).
fn admitted(local: IpAddr, peer: IpAddr) -> bool {
    local.to_canonical().is_loopback() && peer.to_canonical().is_loopback()
}

async fn serve_stream(sock: TcpStream, instances: &Arc<Instances>) -> anyhow::Result<()> {
    sock.set_nodelay(true)?;
    let (mut rd, mut wr) = sock.into_split();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let hello = wio::read_hello(&mut rd, &mut buf).await?;
    anyhow::ensure!(hello.role == Role::Sidecar, "the peer introduced itself as {:?}, not a sidecar", hello.role);
    // Held until the stream ends: an intercept agent counts its sessions' streams.
    let admitted = instances.admit(hello.public_key)?;
    // Said only now that the key is admitted: a sidecar on the UDP transport
    // sends its first handshake as soon as it has this hello, and over UDP
    // that handshake can overtake the sidecar's own hello on the stream (the
    // port-forward crosses the API server); sent earlier, it met an unknown
    // key, was dropped, and WireGuard tried again only 5 s later.
    wr.write_all(&Hello { role: Role::Agent, public_key: instances.public_key() }.encode()).await?;
    let (wg, window) = (&admitted.instance.wg, &admitted.instance.window);
    tracing::info!("transport stream up");

    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let writer = tokio::spawn(wio::write_frames(wr, rx));
    let route = Route::Stream(tx);
    wg.set_route(route.clone());
    let read = wio::read_frames(&mut rd, buf, |d| {
        window.set_lossy(false);
        wg.receive(None, d, &route);
    })
    .await;
    writer.abort();
    Ok(read?)
}

/// A swap's UDP transport, to its one instance.
pub async fn serve_udp(udp: Arc<TunnelUdp>, instance: Arc<Instance>) {
    let sender = udp.sender();
    udp.read_each(|datagram, from| {
        instance.window.set_lossy(true);
        instance.wg.receive(Some(from.ip()), datagram, &Route::Udp(sender.clone(), from));
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_loopback_connections_are_admitted() {
        assert!(admitted(ip("127.0.0.1"), ip("127.0.0.1")));
        assert!(admitted(ip("::1"), ip("::1")));
        assert!(admitted(ip("::ffff:127.0.0.1"), ip("::ffff:127.0.0.1")));
        // Another pod, or the node, dialling the pod IP.
        assert!(!admitted(ip("10.244.1.7"), ip("10.244.2.9")));
        assert!(!admitted(ip("::ffff:10.244.1.7"), ip("::ffff:10.244.2.9")));
        // The pod dialling its own IP is not a port-forward either.
        assert!(!admitted(ip("10.244.1.7"), ip("10.244.1.7")));
        assert!(!admitted(ip("127.0.0.1"), ip("10.244.2.9")));
    }

    /// Over the loopback the agent introduces itself, after the sidecar did
    /// (never before: see `serve_stream`); the stream is served.
    #[tokio::test]
    async fn a_loopback_stream_gets_the_agents_hello_after_its_own() {
        use tokio::io::AsyncReadExt;
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let instances = Instances::per_key(crate::instance::test_shared());
        let server = tokio::spawn(serve_streams(listener, instances.clone()));
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let mut hello = [0u8; tpd_wire::hello::LEN];
        let early = tokio::time::timeout(std::time::Duration::from_millis(200), conn.read(&mut hello)).await;
        assert!(early.is_err(), "the agent spoke before the sidecar's hello: {early:?}");
        conn.write_all(&Hello { role: Role::Sidecar, public_key: [7; 32] }.encode()).await.unwrap();
        conn.read_exact(&mut hello).await.unwrap();
        assert_eq!(Hello::decode(&hello).unwrap().map(|h| h.public_key), Some(instances.public_key()));
        server.abort();
    }

    /// A sidecar's side of a transport stream: says its hello with `key`,
    /// reads the agent's (none if refused), and reports whether the agent kept the
    /// stream open (admitted) or closed it (refused).
    async fn kept_open(port: u16, key: [u8; 32]) -> bool {
        use tokio::io::AsyncReadExt;
        let mut conn = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        conn.write_all(&Hello { role: Role::Sidecar, public_key: key }.encode()).await.unwrap();
        let mut hello = [0u8; tpd_wire::hello::LEN];
        if conn.read_exact(&mut hello).await.is_err() {
            return false;
        }
        let mut byte = [0u8];
        let read = tokio::time::timeout(std::time::Duration::from_millis(300), conn.read(&mut byte)).await;
        // Refused: the agent closes (end of stream, or a reset). Admitted: it waits for frames.
        read.is_err()
    }

    #[tokio::test]
    async fn a_swap_refuses_a_second_key_an_intercept_agent_serves_it() {
        let shared = crate::instance::test_shared();
        let swap = Instances::single(&shared, Instance::start(&shared));
        let intercept = Instances::per_key(crate::instance::test_shared());
        for (instances, second_admitted) in [(swap, false), (intercept, true)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let server = tokio::spawn(serve_streams(listener, instances.clone()));
            assert!(kept_open(port, [1; 32]).await, "the first sidecar");
            assert_eq!(kept_open(port, [2; 32]).await, second_admitted, "a second sidecar");
            server.abort();
        }
    }
}
