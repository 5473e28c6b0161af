//! One end of the session's WireGuard tunnel, shared by the sidecar and the
//! agent: a boringtun `Tunn`, this process's key pair ([`StaticKey`]: fresh
//! per endpoint, or one shared by several endpoints), and the route
//! datagrams to the peer take. The route is the transport that last
//! delivered an authenticated datagram (or the newest stream), so a
//! redialled transport takes over without ending the session. Plaintext
//! packets go to the `deliver` callback (a TUN device or a userspace stack).

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};
use bytes::Bytes;
use tokio::sync::mpsc;

use crate::udp::UdpSender;

/// Where datagrams to the peer go.
#[derive(Clone, Debug)]
pub enum Route {
    None,
    /// The writer queue of a stream transport.
    Stream(mpsc::Sender<Bytes>),
    /// The sending half of a UDP socket, and the peer's address.
    Udp(UdpSender, SocketAddr),
}

impl Route {
    fn send(&self, datagrams: Vec<Bytes>) {
        match self {
            // Like a full NIC queue: drop, and TCP inside retransmits.
            Route::Stream(tx) => datagrams.into_iter().for_each(|d| drop(tx.try_send(d))),
            Route::Udp(sender, addr) => sender.send(datagrams, *addr),
            Route::None => {}
        }
    }
}

/// What one call asks of the WireGuard session.
enum Op<'p> {
    Encrypt(&'p [u8]),
    Handshake { again: bool },
    Timers,
}

type Deliver = Box<dyn Fn(&[u8]) + Send + Sync>;

/// A static key pair. Several endpoints may share one: an intercept agent
/// says its public key to every sidecar before it learns which sidecar it
/// talks to, so all its sessions' endpoints must hold the same key. The
/// private key never leaves this crate.
#[derive(Clone)]
pub struct StaticKey {
    secret: StaticSecret,
    public: [u8; 32],
}

impl StaticKey {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        let secret = StaticSecret::from(rand::random::<[u8; 32]>());
        let public = PublicKey::from(&secret).to_bytes();
        StaticKey { secret, public }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }
}

impl std::fmt::Debug for StaticKey {
    /// The public half only: the secret must never reach a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKey").field("public", &self.public).finish_non_exhaustive()
    }
}

pub struct Endpoint {
    key: StaticKey,
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
        Self::with_key(StaticKey::generate(), keepalive, deliver)
    }

    /// An endpoint holding `key`, which other endpoints may hold too; no peer yet.
    pub fn with_key(key: StaticKey, keepalive: Option<u16>, deliver: impl Fn(&[u8]) + Send + Sync + 'static) -> Self {
        Endpoint { key, keepalive, peer: Mutex::new(None), route: Mutex::new(Route::None), deliver: Box::new(deliver) }
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.public
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
        Tunn::new(self.key.secret.clone(), PublicKey::from(key), None, self.keepalive, index, None)
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
                        from.send(vec![Bytes::copy_from_slice(p)]);
                        // boringtun may have packets queued behind a handshake.
                        res = t.decapsulate(None, &[], buf);
                    }
                    TunnResult::WriteToTunnelV4(p, _) | TunnResult::WriteToTunnelV6(p, _) => {
                        // Delivery (a TUN write, a queue) need not hold up the other direction.
                        drop(peer);
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
        self.run([Op::Encrypt(packet)]);
    }

    /// Encrypts IP packets and sends them to the peer together: over UDP a
    /// run of them leaves in one system call.
    pub fn send_ips<'p>(&self, packets: impl IntoIterator<Item = &'p [u8]>) {
        self.run(packets.into_iter().map(Op::Encrypt));
    }

    /// Starts a handshake now (after a new transport), rather than on the next packet.
    pub fn handshake(&self) {
        self.run([Op::Handshake { again: false }]);
    }

    /// Starts a new handshake even while one is in flight: after moving to a
    /// transport that may deliver what the previous one lost.
    pub fn handshake_again(&self) {
        self.run([Op::Handshake { again: true }]);
    }

    /// Drives boringtun's timers (keepalive, rekey, handshake retries); call every 250 ms.
    pub fn tick(&self) {
        self.run([Op::Timers]);
    }

    /// Calls [`Endpoint::tick`] every 250 ms for as long as it is polled.
    pub async fn run_timers(self: std::sync::Arc<Self>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
        loop {
            tick.tick().await;
            self.tick();
        }
    }

    /// Runs `ops` on the session, then sends what they produced outside
    /// the lock, so encryption in other tasks never waits for a send.
    fn run<'p>(&self, ops: impl IntoIterator<Item = Op<'p>>) {
        let out = SCRATCH.with_borrow_mut(|buf| {
            let mut out = Vec::new();
            let mut peer = lock(&self.peer);
            let Some((_, t)) = peer.as_mut() else { return out };
            for op in ops {
                let res = match op {
                    Op::Encrypt(packet) => t.encapsulate(packet, buf),
                    Op::Handshake { again } => t.format_handshake_initiation(buf, again),
                    Op::Timers => t.update_timers(buf),
                };
                match res {
                    TunnResult::WriteToNetwork(p) => out.push(Bytes::copy_from_slice(p)),
                    TunnResult::Err(e) => tracing::trace!(?e, "wireguard"),
                    _ => {}
                }
            }
            out
        });
        if !out.is_empty() {
            let route = lock(&self.route).clone();
            route.send(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
        a.send_ip(&tpd_wire::ip::tunnel_test_packet());
        for _ in 0..4 {
            // The route a datagram "arrived over" is the receiver's way back.
            pump(&mut arx, &b, &broute);
            pump(&mut brx, &a, &aroute);
        }
        assert_eq!(lock(&got).as_slice(), &[tpd_wire::ip::tunnel_test_packet()]);
    }

    /// Two endpoints with one shared key each hold a session with their
    /// own peer, as an intercept agent's sessions do.
    #[tokio::test]
    async fn endpoints_sharing_a_key_each_reach_their_peer() {
        let key = StaticKey::generate();
        let mut got = Vec::new();
        for _ in 0..2 {
            let sink: Delivered = Arc::default();
            let into = sink.clone();
            let agent = Endpoint::with_key(key.clone(), None, move |p| lock(&into).push(p.to_vec()));
            let sidecar = Endpoint::new(Some(25), |_| {});
            assert_eq!(agent.public_key(), key.public_key());
            sidecar.set_peer(agent.public_key());
            agent.set_peer(sidecar.public_key());
            let (stx, mut srx) = mpsc::channel(64);
            let (atx, mut arx) = mpsc::channel(64);
            let (sroute, aroute) = (Route::Stream(stx), Route::Stream(atx));
            sidecar.set_route(sroute.clone());
            agent.set_route(aroute.clone());
            sidecar.send_ip(&tpd_wire::ip::tunnel_test_packet());
            for _ in 0..4 {
                pump(&mut srx, &agent, &aroute);
                pump(&mut arx, &sidecar, &sroute);
            }
            got.push(lock(&sink).clone());
        }
        assert_eq!(got, vec![vec![tpd_wire::ip::tunnel_test_packet()]; 2]);
        assert!(!format!("{key:?}").contains(&format!("{:?}", key.secret.to_bytes())));
    }

    #[tokio::test]
    async fn a_stranger_is_dropped_silently() {
        let (_a, b, _arx, mut brx, got) = pair();
        let stranger = Endpoint::new(None, |_| {});
        stranger.set_peer(b.public_key());
        let (stx, mut srx) = mpsc::channel(8);
        stranger.set_route(Route::Stream(stx.clone()));
        stranger.send_ip(&tpd_wire::ip::tunnel_test_packet());
        let route = Route::Stream(stx);
        assert!(pump(&mut srx, &b, &route) > 0);
        assert!(brx.try_recv().is_err(), "no answer to a stranger");
        assert!(lock(&got).is_empty());
    }
}
