//! The sidecar's side of the transport: dial the stream, exchange hellos
//! (the agent's public key arrives here and only here), then carry
//! WireGuard frames over it, or over UDP with the stream held open. A
//! dropped stream is redialled with backoff; the WireGuard session, and the
//! TCP connections inside it, carry on over the new one.
//!
//! With a UDP fallback window, UDP is tried for the first handshake only:
//! if nothing comes back over UDP within the window, WireGuard moves onto
//! the hello stream (the agent reads frames on every stream) for the rest of
//! the session. [`Link::chosen`] says which one carries the session.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{mpsc, watch};
use tpd_tunnel::io as wio;
use tpd_tunnel::udp::{TunnelUdp, UdpSender};
use tpd_tunnel::{Endpoint as Wg, Route};
use tpd_wire::hello::{Hello, Role};
use tpd_wire::preamble;

use tpd_wire::sidecar::{Carrier, Endpoint, Transport};

const STREAM_QUEUE: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(3);
/// A stream that lived this long was healthy: the next redial starts fast again.
const HEALTHY: Duration = Duration::from_secs(5);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// What the transport tells the rest of the sidecar: which carrier was
/// chosen, when the agent was replaced, and the UDP socket's receive
/// buffer. One per session, shared by cloning.
#[derive(Debug, Clone)]
pub struct Link {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Set once, by whichever of UDP's first answer and the fallback window's end comes first.
    carrier: watch::Sender<Option<Carrier>>,
    /// Bumped each time the hello brings an agent key other than the last
    /// one: the agent pod was replaced (or its container restarted), and
    /// every connection inside the tunnel to the old agent is gone with it.
    agents: watch::Sender<u64>,
    /// The tunnel UDP socket's receive buffer, once bound.
    udp_receive_buffer: OnceLock<usize>,
}

impl Link {
    pub fn new() -> Self {
        let shared = Shared {
            carrier: watch::Sender::new(None),
            agents: watch::Sender::new(0),
            udp_receive_buffer: OnceLock::new(),
        };
        Link { shared: Arc::new(shared) }
    }

    /// Returns when the agent is replaced after this call: connections
    /// inside the tunnel (control, files) reconnect then instead of waiting
    /// for TCP to give up on an agent that no longer exists.
    pub async fn agent_replaced(&self) {
        // `self` holds the sender: it cannot close while this waits.
        let _ = self.agents().changed().await;
    }

    /// A receiver that sees each replacement of the agent from now on.
    pub fn agents(&self) -> watch::Receiver<u64> {
        self.shared.agents.subscribe()
    }

    /// The carrier of the session; `None` while a UDP fallback window is open.
    pub fn chosen(&self) -> Option<Carrier> {
        *self.shared.carrier.borrow()
    }

    /// Waits until the carrier is decided.
    pub async fn decided(&self) -> Carrier {
        let mut rx = self.shared.carrier.subscribe();
        let chosen = rx.wait_for(Option::is_some).await.map(|c| *c);
        chosen.ok().flatten().unwrap_or(Carrier::Stream)
    }

    /// The receive buffer of the tunnel's UDP socket, if the session may run
    /// over UDP; the control hello tells the agent, which sizes what each
    /// connection keeps in flight by it.
    pub fn udp_receive_buffer(&self) -> Option<usize> {
        self.shared.udp_receive_buffer.get().copied()
    }

    /// Decides the carrier unless it already is; true if this call decided it.
    fn choose(&self, which: Carrier) -> bool {
        self.shared.carrier.send_if_modified(|c| c.is_none() && c.replace(which).is_none())
    }

    fn agent_changed(&self) {
        self.shared.agents.send_modify(|n| *n += 1);
    }
}

/// The UDP path: the socket, the agent's address, and whether anything came back yet.
#[derive(Clone)]
struct Udp {
    sender: UdpSender,
    addr: SocketAddr,
    heard: watch::Receiver<bool>,
}

/// Fails only on what redialling cannot fix (a version mismatch).
/// `fallback`: for a UDP transport, how long the first handshake may wait
/// for an answer over UDP before WireGuard moves onto the hello stream.
pub async fn run(
    transport: Transport,
    hello_at: Endpoint,
    fallback: Option<Duration>,
    wg: Arc<Wg>,
    link: Link,
) -> anyhow::Result<()> {
    let udp = match &transport {
        Transport::Udp(addr) => {
            let any: SocketAddr =
                if addr.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
            let sock = TunnelUdp::bind(any).await?;
            let _ = link.shared.udp_receive_buffer.set(sock.receive_buffer());
            let (heard_tx, heard) = watch::channel(false);
            let sender = sock.sender();
            tokio::spawn(read_udp(sock, sender.clone(), *addr, heard_tx, wg.clone(), link.clone()));
            if fallback.is_none() {
                link.choose(Carrier::Udp);
            }
            Some(Udp { sender, addr: *addr, heard })
        }
        Transport::Stream(_) => {
            link.choose(Carrier::Stream);
            None
        }
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let started = Instant::now();
        match session(&hello_at, udp.clone(), fallback, &wg, &link).await {
            Ok(()) => tracing::warn!("transport stream closed; redialling"),
            Err(e) if is_fatal(&e) => return Err(e.into()),
            Err(e) => tracing::warn!("transport stream: {e}; redialling"),
        }
        wg.set_route(Route::None);
        if started.elapsed() > HEALTHY {
            backoff = BACKOFF_MIN;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

fn is_fatal(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<tpd_wire::hello::Error>())
        .is_some_and(|h| matches!(h, tpd_wire::hello::Error::Preamble(preamble::Error::VersionMismatch { .. })))
}

async fn dial(at: &Endpoint) -> io::Result<Box<dyn Stream>> {
    Ok(match at {
        Endpoint::Tcp(addr) => {
            let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("connecting to {addr}")))??;
            s.set_nodelay(true)?;
            Box::new(s)
        }
        Endpoint::Unix(path) => Box::new(
            UnixStream::connect(path)
                .await
                .map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", path.display())))?,
        ),
    })
}

/// One life of the stream: hello, then frames (or, for UDP, just held open).
async fn session(at: &Endpoint, udp: Option<Udp>, fallback: Option<Duration>, wg: &Wg, link: &Link) -> io::Result<()> {
    let stream = dial(at).await?;
    let (mut rd, mut wr) = tokio::io::split(stream);
    wr.write_all(&Hello { role: Role::Sidecar, public_key: wg.public_key() }.encode()).await?;
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let hello = wio::read_hello(&mut rd, &mut buf).await?;
    if hello.role != Role::Agent {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "the peer is not a tpd agent"));
    }
    if wg.set_peer(hello.public_key) {
        tracing::info!("new WireGuard session with the agent");
        link.agent_changed();
    }
    tracing::info!("transport stream up");
    let mut fell_back = false;
    if let Some(Udp { sender, addr, mut heard }) = udp.filter(|_| link.chosen() != Some(Carrier::Stream)) {
        wg.set_route(Route::Udp(sender, addr));
        wg.handshake();
        if let (Some(window), None) = (fallback, link.chosen()) {
            let answered = tokio::time::timeout(window, heard.wait_for(|h| *h)).await.is_ok_and(|r| r.is_ok());
            // UDP's first answer and the end of the window race for the decision.
            if !answered && link.choose(Carrier::Stream) {
                fell_back = true;
                tracing::warn!(
                    "no answer over UDP from {addr} within {window:?}; WireGuard goes over the stream instead"
                );
            }
        }
        if link.chosen() == Some(Carrier::Udp) {
            tracing::info!("WireGuard goes over UDP to {addr}");
            // Nothing more comes on the stream; its end means the agent went away.
            let mut rest = [0u8; 64];
            while rd.read(&mut rest).await? > 0 {}
            return Ok(());
        }
    }
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let writer = tokio::spawn(wio::write_frames(wr, rx));
    let route = Route::Stream(tx);
    wg.set_route(route.clone());
    if fell_back {
        // The handshake lost over UDP still counts as in flight: start anew.
        wg.handshake_again();
    } else {
        wg.handshake();
    }
    let read = wio::read_frames(&mut rd, buf, |d| wg.receive(None, d, &route)).await;
    writer.abort();
    read
}

/// Datagrams from the agent. The first one from its address decides for UDP
/// (unless the fallback window already closed); after a fallback they are dropped.
async fn read_udp(
    sock: Arc<TunnelUdp>,
    sender: UdpSender,
    agent: SocketAddr,
    heard: watch::Sender<bool>,
    wg: Arc<Wg>,
    link: Link,
) {
    sock.read_each(|datagram, from| {
        if from == agent && !*heard.borrow() {
            link.choose(Carrier::Udp);
            heard.send_replace(true);
        }
        if link.chosen() != Some(Carrier::Stream) {
            wg.receive(Some(from.ip()), datagram, &Route::Udp(sender.clone(), from));
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::{TcpListener, UdpSocket};

    /// A fake agent speaking the real hello and framing on a TCP stream.
    async fn agent_on_a_stream(listener: TcpListener, agent: Arc<Wg>) -> io::Result<()> {
        let (sock, _) = listener.accept().await?;
        let (mut rd, mut wr) = sock.into_split();
        wr.write_all(&Hello { role: Role::Agent, public_key: agent.public_key() }.encode()).await?;
        let mut buf = BytesMut::new();
        let hello = wio::read_hello(&mut rd, &mut buf).await?;
        assert!(agent.lock_peer(hello.public_key));
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(wio::write_frames(wr, rx));
        let route = Route::Stream(tx);
        agent.set_route(route.clone());
        wio::read_frames(&mut rd, buf, |d| agent.receive(None, d, &route)).await
    }

    #[tokio::test]
    async fn udp_that_never_answers_falls_back_to_the_hello_stream() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream_at = listener.local_addr().unwrap();
        // Takes the sidecar's datagrams and never answers, like a filtered node port.
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let (got_tx, mut got) = mpsc::unbounded_channel::<Vec<u8>>();
        let agent = Arc::new(Wg::new(None, move |p| drop(got_tx.send(p.to_vec()))));
        tokio::spawn(agent_on_a_stream(listener, agent.clone()));
        tokio::spawn(agent.clone().run_timers());
        let sidecar = Arc::new(Wg::new(Some(25), |_| {}));
        tokio::spawn(sidecar.clone().run_timers());
        let transport = Transport::Udp(silent.local_addr().unwrap());
        let link = Link::new();
        let fallback = Some(Duration::from_millis(300));
        tokio::spawn(run(transport, Endpoint::Tcp(stream_at), fallback, sidecar.clone(), link.clone()));

        let arrived = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                sidecar.send_ip(&tpd_wire::ip::tunnel_test_packet());
                if let Ok(Some(p)) = tokio::time::timeout(Duration::from_millis(200), got.recv()).await {
                    return p;
                }
            }
        })
        .await
        .expect("a packet crosses the tunnel after the fallback");
        assert_eq!(arrived, tpd_wire::ip::tunnel_test_packet());
        assert_eq!(link.chosen(), Some(Carrier::Stream));
        // The first handshake went to the UDP address before the fallback.
        let mut first = [0u8; 256];
        assert_eq!(silent.try_recv(&mut first).ok(), Some(148), "a handshake initiation over UDP");
    }
}
