//! One end of the session's WireGuard tunnel, shared by the sidecar and the
//! agent: a boringtun `Tunn`, this process's fresh key pair, and the route
//! datagrams to the peer take. The route is the transport that last
//! delivered an authenticated datagram (or the newest stream), so a
//! redialled transport takes over without ending the session. Plaintext
//! packets go to the `deliver` callback (a TUN device or a userspace stack).

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::Bytes;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Where datagrams to the peer go.
#[derive(Clone, Debug)]
pub enum Route {
    None,
    /// The writer queue of a stream transport.
    Stream(mpsc::Sender<Bytes>),
    /// The send queue of a UDP socket, and the peer's address.
    Udp(UdpSender, SocketAddr),
}

/// Datagrams waiting for the UDP socket, like a NIC's transmit ring.
const UDP_QUEUE: usize = 4096;

/// The sending half of a tunnel UDP socket. Datagrams queue here and one
/// task writes them: encryption then never holds the endpoint's lock across
/// a `sendto` (which on a veth also runs the receiving side's path), and a
/// momentarily full socket buffer is waited for instead of dropping.
#[derive(Clone, Debug)]
pub struct UdpSender {
    queue: mpsc::Sender<(Bytes, SocketAddr)>,
}

impl UdpSender {
    /// Starts the task writing to `sock`; it ends when the last clone drops.
    pub fn spawn(sock: Arc<UdpSocket>) -> Self {
        let (queue, mut pending) = mpsc::channel::<(Bytes, SocketAddr)>(UDP_QUEUE);
        tokio::spawn(async move {
            while let Some((datagram, to)) = pending.recv().await {
                if let Err(e) = sock.send_to(&datagram, to).await {
                    tracing::trace!(%to, "udp send: {e}");
                }
            }
        });
        UdpSender { queue }
    }
}

type Deliver = Box<dyn Fn(&[u8]) + Send + Sync>;

pub struct Endpoint {
    secret: StaticSecret,
    public: [u8; 32],
    keepalive: Option<u16>,
    peer: Mutex<Option<([u8; 32], Tunn)>>,
    route: Mutex<Route>,
    deliver: Deliver,
}

thread_local! {
    // Scratch for boringtun's output: a datagram plus its overhead.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 65_536 + 64]);
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The data stays consistent even if a holder panicked; keep serving.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Endpoint {
    /// A fresh key pair (the private key never leaves this value) and no peer yet.
    pub fn new(keepalive: Option<u16>, deliver: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        let secret = StaticSecret::from(rand::random::<[u8; 32]>());
        let public = PublicKey::from(&secret).to_bytes();
        Endpoint {
            secret,
            public,
            keepalive,
            peer: Mutex::new(None),
            route: Mutex::new(Route::None),
            deliver: Box::new(deliver),
        }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The current peer's key, if any.
    pub fn peer_key(&self) -> Option<[u8; 32]> {
        lock(&self.peer).as_ref().map(|(k, _)| *k)
    }

    /// Sets the peer; a different key starts a new WireGuard session. Returns
    /// true when the session was (re)created.
    pub fn set_peer(&self, key: [u8; 32]) -> bool {
        let mut peer = lock(&self.peer);
        if peer.as_ref().is_some_and(|(k, _)| *k == key) {
            return false;
        }
        *peer = Some((key, self.new_tunn(key)));
        true
    }

    /// Takes `key` as the peer if there is none yet; true when `key` is the
    /// peer. The agent locks its session to the first sidecar this way.
    pub fn lock_peer(&self, key: [u8; 32]) -> bool {
        let mut peer = lock(&self.peer);
        match peer.as_ref() {
            Some((k, _)) => *k == key,
            None => {
                *peer = Some((key, self.new_tunn(key)));
                true
            }
        }
    }

    fn new_tunn(&self, key: [u8; 32]) -> Tunn {
        let index = rand::random::<u32>() >> 8;
        Tunn::new(self.secret.clone(), PublicKey::from(key), None, self.keepalive, index, None)
    }

    pub fn set_route(&self, route: Route) {
        *lock(&self.route) = route;
    }

    /// Handles one datagram from the peer that arrived over `from`.
    pub fn receive(&self, src: Option<IpAddr>, datagram: &[u8], from: &Route) {
        let authentic = SCRATCH.with_borrow_mut(|buf| {
            let mut peer = lock(&self.peer);
            // Before a hello there is no session: drop silently.
            let Some((_, t)) = peer.as_mut() else {
                return false;
            };
            let mut res = t.decapsulate(src, datagram, buf);
            loop {
                match res {
                    TunnResult::WriteToNetwork(p) => {
                        send(from, p);
                        // boringtun may have packets queued behind a handshake.
                        res = t.decapsulate(None, &[], buf);
                    }
                    TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                        (self.deliver)(p);
                        return true;
                    }
                    TunnResult::Done => return true,
                    TunnResult::Err(e) => {
                        // Anything not from our peer ends here, silently.
                        tracing::trace!(?e, "dropped a datagram");
                        return false;
                    }
                }
            }
        });
        if authentic {
            self.set_route(from.clone());
        }
    }

    /// Encrypts one IP packet and sends it to the peer.
    pub fn send_ip(&self, packet: &[u8]) {
        self.with_tunn(|t, buf| t.encapsulate(packet, buf));
    }

    /// Starts a handshake now (after a new transport), rather than on the next packet.
    pub fn handshake(&self) {
        self.with_tunn(|t, buf| t.format_handshake_initiation(buf, false));
    }

    /// Starts a new handshake even while one is in flight: after moving to a
    /// transport that may deliver what the previous one lost.
    pub fn handshake_again(&self) {
        self.with_tunn(|t, buf| t.format_handshake_initiation(buf, true));
    }

    /// Drives boringtun's timers (keepalive, rekey, handshake retries); call every 250 ms.
    pub fn tick(&self) {
        self.with_tunn(|t, buf| t.update_timers(buf));
    }

    /// Calls [`Endpoint::tick`] every 250 ms for as long as it is polled.
    pub async fn run_timers(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            self.tick();
        }
    }

    fn with_tunn(&self, f: impl for<'a> FnOnce(&mut Tunn, &'a mut [u8]) -> TunnResult<'a>) {
        SCRATCH.with_borrow_mut(|buf| {
            let mut peer = lock(&self.peer);
            let Some((_, t)) = peer.as_mut() else { return };
            match f(t, buf) {
                TunnResult::WriteToNetwork(p) => send(&lock(&self.route), p),
                TunnResult::Err(e) => tracing::trace!(?e, "wireguard"),
                _ => {}
            }
        });
    }
}

fn send(route: &Route, datagram: &[u8]) {
    match route {
        // Like a full NIC queue: drop, and TCP inside retransmits.
        Route::Stream(tx) => drop(tx.try_send(Bytes::copy_from_slice(datagram))),
        Route::Udp(sender, addr) => drop(sender.queue.try_send((Bytes::copy_from_slice(datagram), *addr))),
        Route::None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packets `b` delivered to its stack.
    type Delivered = Arc<Mutex<Vec<Vec<u8>>>>;

    fn pair() -> (Arc<Endpoint>, Arc<Endpoint>, mpsc::Receiver<Bytes>, mpsc::Receiver<Bytes>, Delivered) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let a = Arc::new(Endpoint::new(Some(25), |_| {}));
        let b = Arc::new(Endpoint::new(None, move |p| lock(&sink).push(p.to_vec())));
        a.set_peer(b.public_key());
        b.set_peer(a.public_key());
        let (atx, arx) = mpsc::channel(64);
        let (btx, brx) = mpsc::channel(64);
        a.set_route(Route::Stream(atx));
        b.set_route(Route::Stream(btx));
        (a, b, arx, brx, got)
    }

    fn pump(from: &mut mpsc::Receiver<Bytes>, to: &Endpoint, route: &Route) -> usize {
        let mut n = 0;
        while let Ok(d) = from.try_recv() {
            to.receive(None, &d, route);
            n += 1;
        }
        n
    }

    #[tokio::test]
    async fn packets_cross_after_a_handshake() {
        let (a, b, mut arx, mut brx, got) = pair();
        let broute = lock(&b.route).clone();
        let aroute = lock(&a.route).clone();
        a.send_ip(&crate::ip::tunnel_test_packet());
        for _ in 0..4 {
            // The route a datagram "arrived over" is the receiver's way back.
            pump(&mut arx, &b, &broute);
            pump(&mut brx, &a, &aroute);
        }
        assert_eq!(lock(&got).as_slice(), &[crate::ip::tunnel_test_packet()]);
    }

    #[tokio::test]
    async fn a_stranger_is_dropped_silently() {
        let (_a, b, _arx, mut brx, got) = pair();
        let stranger = Endpoint::new(None, |_| {});
        stranger.set_peer(b.public_key());
        let (stx, mut srx) = mpsc::channel(8);
        stranger.set_route(Route::Stream(stx.clone()));
        stranger.send_ip(&crate::ip::tunnel_test_packet());
        let route = Route::Stream(stx);
        assert!(pump(&mut srx, &b, &route) > 0);
        assert!(brx.try_recv().is_err(), "no answer to a stranger");
        assert!(lock(&got).is_empty());
    }
}
