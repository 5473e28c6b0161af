//! TCP of the userspace stack: one smoltcp `Interface` in any-IP mode and
//! a socket per connection, created listening on the destination of each
//! new SYN just before that SYN is processed, so every tunnelled flow is
//! accepted whatever its destination address. smoltcp retransmits on its
//! own timers (the loop below sleeps until the interface's next deadline),
//! and an accepted connection is a tokio stream ([`TcpConn`]) that reads
//! and writes the socket's buffers directly; smoltcp's wakers wake it on
//! any change of the socket, with or without data.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddrV4;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, Checksum, ChecksumCapabilities, DeviceCapabilities, Medium};
use smoltcp::socket::tcp::{Socket, SocketBuffer, State};
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{HardwareAddress, IpAddress, IpCidr, IpListenEndpoint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, mpsc};
use tpd_wire::ip::{self, Flow};

use crate::window::{Grant, PathWindows, SendWindow};

/// A connection with nothing received for this long (keep-alives are
/// answered by a live peer) is aborted.
const TIMEOUT: Duration = Duration::from_secs(180);
const KEEP_ALIVE: Duration = Duration::from_secs(60);
/// A connection its owner dropped gets this long to finish closing.
const ORPHAN_LINGER: std::time::Duration = std::time::Duration::from_secs(60);
/// Packets taken from the queue per round before the stack transmits.
const BATCH: usize = 256;
/// How often closed sockets are swept out.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where the stack's packets go: plaintext IP packets, a round's worth at
/// a time, so the tunnel can send them together.
pub type Output = Box<dyn Fn(&[Vec<u8>]) + Send + Sync>;
/// Called with every new connection (source, destination) as its SYN arrives.
pub type Accept = Box<dyn Fn(TcpConn, SocketAddrV4, SocketAddrV4) + Send + Sync>;

/// The interface's packet queues, standing in for a network device.
#[derive(Default)]
struct Queues {
    rx: VecDeque<Vec<u8>>,
    tx: Vec<Vec<u8>>,
    /// Buffers of packets already sent, written over by the next ones: a
    /// fresh buffer is zeroed before smoltcp writes it, a pass over every
    /// byte sent that cost as much as a copy.
    spare: Vec<Vec<u8>>,
    mtu: usize,
}

/// Sent packets' buffers kept for reuse: a round's worth of full-size
/// segments of one bulk transfer, about 1 MiB at the stream transport's MTU.
const SPARE_BUFFERS: usize = 16;

impl Queues {
    /// Keeps up to [`SPARE_BUFFERS`] of the buffers in `sent` (emptying it).
    fn recycle(&mut self, sent: &mut Vec<Vec<u8>>) {
        let room = SPARE_BUFFERS.saturating_sub(self.spare.len());
        // Dropping the drain empties `sent` of the rest too.
        self.spare.extend(sent.drain(..).take(room));
    }
}

struct RxToken(Vec<u8>);
struct TxToken<'a>(&'a mut Queues);

impl phy::RxToken for RxToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        // Only bytes a reused buffer never held are zeroed.
        let mut packet = self.0.spare.pop().unwrap_or_default();
        packet.resize(len, 0);
        let r = f(&mut packet);
        self.0.tx.push(packet);
        r
    }
}

impl phy::Device for Queues {
    type RxToken<'a> = RxToken;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken, TxToken<'_>)> {
        let packet = self.rx.pop_front()?;
        Some((RxToken(packet), TxToken(self)))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        Some(TxToken(self))
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = self.mtu;
        // WireGuard authenticated every packet: compute checksums, skip verifying them.
        let mut checksum = ChecksumCapabilities::default();
        checksum.ipv4 = Checksum::Tx;
        checksum.tcp = Checksum::Tx;
        caps.checksum = checksum;
        caps
    }
}

struct Entry {
    flow: Flow,
    /// Its send buffer, given back to the path's budget when it goes.
    grant: Grant,
    /// When its [`TcpConn`] was dropped; the socket is then ours to close.
    orphaned: Option<std::time::Instant>,
}

struct Engine {
    iface: Interface,
    sockets: SocketSet<'static>,
    queues: Queues,
    by_flow: HashMap<Flow, SocketHandle>,
    entries: HashMap<SocketHandle, Entry>,
    window: Arc<SendWindow>,
    path: PathWindows,
    /// Connections whose SYN|ACK went out at the instant given and whose
    /// ACK has not come yet: their handshake times the tunnel's round trip.
    handshakes: Vec<(SocketHandle, Instant)>,
}

struct Shared {
    engine: Mutex<Engine>,
    /// Wakes the loop after a connection read or wrote.
    poke: Notify,
}

impl Shared {
    fn engine(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The TCP side of the stack; feed it packets with [`Tcp::input`].
pub struct Tcp {
    input: mpsc::Sender<Vec<u8>>,
    shared: Arc<Shared>,
    run: tokio::task::AbortHandle,
}

impl Tcp {
    /// Starts the stack's loop; packets it sends go to `send`, new connections to `accept`.
    pub fn start(
        local: std::net::Ipv4Addr,
        mtu: usize,
        window: Arc<SendWindow>,
        (input, rx): (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>),
        send: Output,
        accept: Accept,
    ) -> Tcp {
        let mut queues = Queues { mtu, ..Queues::default() };
        let mut config = Config::new(HardwareAddress::Ip);
        config.random_seed = rand_seed();
        let mut iface = Interface::new(config, &mut queues, now());
        iface.set_any_ip(true);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(local), 0));
        });
        let _ = iface.routes_mut().add_default_ipv4_route(local);
        let engine = Engine {
            iface,
            sockets: SocketSet::new(Vec::new()),
            queues,
            by_flow: HashMap::new(),
            entries: HashMap::new(),
            window,
            path: PathWindows::default(),
            handshakes: Vec::new(),
        };
        let shared = Arc::new(Shared { engine: Mutex::new(engine), poke: Notify::new() });
        let run = tokio::spawn(run(shared.clone(), rx, send, accept)).abort_handle();
        Tcp { input, shared, run }
    }

    /// Stops the stack's loop and resets every connection: their readers
    /// see the end of the stream and their writers an error, so whatever
    /// serves them ends too.
    pub fn stop(&self) {
        self.run.abort();
        let mut engine = self.shared.engine();
        let e = &mut *engine;
        for &handle in e.entries.keys() {
            // Aborting wakes the connection's reader and writer.
            e.sockets.get_mut::<Socket>(handle).abort();
        }
    }

    /// Queues one IPv4 TCP packet; false when the queue is full (the packet is
    /// dropped, as a full NIC queue would, and TCP retransmits it).
    pub fn input(&self, packet: Vec<u8>) -> bool {
        self.input.try_send(packet).is_ok()
    }
}

/// smoltcp's clock, from a monotonic start (its own `Instant::now` reads the
/// wall clock, which may jump).
fn now() -> Instant {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    let start = *START.get_or_init(std::time::Instant::now);
    Instant::from_micros(i64::try_from(start.elapsed().as_micros()).unwrap_or(i64::MAX))
}

fn rand_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos()));
    h.finish()
}

async fn run(shared: Arc<Shared>, mut input: mpsc::Receiver<Vec<u8>>, send: Output, accept: Accept) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut accepted = Vec::new();
    let mut out = Vec::new();
    let mut delay = None;
    let mut last_sweep = std::time::Instant::now();
    let timer = tokio::time::sleep(SWEEP_EVERY);
    tokio::pin!(timer);
    loop {
        let wait = delay.map_or(SWEEP_EVERY, |d: Duration| std::time::Duration::from(d).min(SWEEP_EVERY));
        rearm(timer.as_mut(), tokio::time::Instant::now() + wait);
        tokio::select! {
            biased;
            n = input.recv_many(&mut batch, BATCH) => if n == 0 { return },
            () = shared.poke.notified() => {}
            () = &mut timer => {}
        }
        {
            let mut guard = shared.engine();
            let e = &mut *guard;
            e.queues.recycle(&mut out);
            let now = now();
            for packet in batch.drain(..) {
                e.ingest(packet, now, &shared, &mut accepted);
            }
            e.time_handshakes(now);
            e.iface.poll_maintenance(now);
            while e.iface.poll_egress(now, &mut e.queues, &mut e.sockets)
                == smoltcp::iface::PollResult::SocketStateChanged
            {}
            if last_sweep.elapsed() >= SWEEP_EVERY {
                e.sweep();
                last_sweep = std::time::Instant::now();
            }
            delay = e.iface.poll_delay(now, &e.sockets);
            std::mem::swap(&mut out, &mut e.queues.tx);
        }
        if !out.is_empty() {
            // Recycled next round.
            send(&out);
        }
        for (conn, src, dst) in accepted.drain(..) {
            accept(conn, src, dst);
        }
    }
}

/// How far the stack's timer may be from the deadline asked for before it
/// is moved: smoltcp's deadlines (a delayed ACK, a retransmission) do not
/// need better than a millisecond.
const TIMER_SLACK: std::time::Duration = std::time::Duration::from_millis(1);

/// Moves the stack's timer to `deadline` unless it is within
/// [`TIMER_SLACK`] of it already. Each move to an earlier time wakes
/// tokio's driver (an eventfd write and an extra `epoll_wait`), and the
/// loop runs several times per request with the same smoltcp deadline:
/// a fresh timer each round cost two wake-ups per request.
fn rearm(timer: Pin<&mut tokio::time::Sleep>, deadline: tokio::time::Instant) {
    let armed = timer.deadline();
    let off = if armed > deadline { armed - deadline } else { deadline - armed };
    if timer.is_elapsed() || off > TIMER_SLACK {
        timer.reset(deadline);
    }
}

impl Engine {
    /// Hands one packet to the interface, first creating the socket a new
    /// connection's SYN will find. One packet at a time, so two SYNs to the
    /// same destination each meet their own listening socket.
    fn ingest(
        &mut self,
        packet: Vec<u8>,
        now: Instant,
        shared: &Arc<Shared>,
        accepted: &mut Vec<(TcpConn, SocketAddrV4, SocketAddrV4)>,
    ) {
        let Some(p) = ip::parse(&packet) else { return };
        if p.flow.protocol != ip::PROTO_TCP {
            return;
        }
        if p.is_tcp_open() && !self.keeps_socket(p.flow) {
            let grant = self.path.open(&self.window);
            let tx = SocketBuffer::new(vec![0u8; grant.tx]);
            let mut socket = Socket::new(SocketBuffer::new(vec![0u8; grant.rx]), tx);
            socket.set_nagle_enabled(false);
            socket.set_congestion_control(grant.congestion);
            socket.set_timeout(Some(TIMEOUT));
            socket.set_keep_alive(Some(KEEP_ALIVE));
            let dst = p.flow.dst;
            let endpoint = IpListenEndpoint { addr: Some(IpAddress::Ipv4(*dst.ip())), port: dst.port() };
            if socket.listen(endpoint).is_err() {
                self.path.close(&grant);
                return;
            }
            let handle = self.sockets.add(socket);
            self.by_flow.insert(p.flow, handle);
            self.entries.insert(handle, Entry { flow: p.flow, grant, orphaned: None });
            // The SYN|ACK goes out this round.
            self.handshakes.push((handle, now));
            accepted.push((TcpConn { shared: shared.clone(), handle }, p.flow.src, p.flow.dst));
        }
        self.queues.rx.push_back(packet);
        while !self.queues.rx.is_empty() {
            self.iface.poll_ingress_single(now, &mut self.queues, &mut self.sockets);
        }
    }

    /// Times the handshakes whose ACK came this round. A socket still
    /// opening waits; one reset before its ACK is dropped.
    fn time_handshakes(&mut self, now: Instant) {
        if self.handshakes.is_empty() {
            return;
        }
        let (sockets, path) = (&self.sockets, &mut self.path);
        // `forget` takes a socket's handshake with it: every handle is valid.
        self.handshakes.retain(|&(handle, sent)| match sockets.get::<Socket>(handle).state() {
            State::Listen | State::SynReceived => true,
            // Reset before its ACK.
            State::Closed => false,
            // Established, or already closing: the ACK may have come in
            // one round with the peer's data and FIN.
            _ => {
                path.on_handshake((now - sent).into());
                false
            }
        });
    }

    /// Removes sockets that are closed and no longer owned, and closes the
    /// ones their owner dropped long ago. Received data nobody will read is
    /// discarded so the peer is not stalled on a full window.
    fn sweep(&mut self) {
        let mut gone = Vec::new();
        for (&handle, entry) in &self.entries {
            let socket = self.sockets.get_mut::<Socket>(handle);
            let Some(since) = entry.orphaned else {
                // A SYN the socket did not take (malformed): nobody will connect.
                if socket.state() == State::Listen {
                    socket.abort();
                }
                continue;
            };
            while socket.can_recv() {
                let _ = socket.recv(|b| (b.len(), ()));
            }
            if since.elapsed() > ORPHAN_LINGER {
                socket.abort();
            }
            if finished(socket.state()) {
                gone.push(handle);
            }
        }
        for handle in gone {
            self.forget(handle);
        }
    }

    /// Whether a SYN for `flow` goes to the socket the flow already has
    /// (a retransmitted SYN). A connection that has ended and whose owner
    /// let go makes way for a new one instead, as RFC 1122 (4.2.2.13) lets
    /// a new SYN reopen a connection in TIME-WAIT; without this the SYN
    /// met the old socket and the new connection failed.
    fn keeps_socket(&mut self, flow: Flow) -> bool {
        let Some(&old) = self.by_flow.get(&flow) else { return false };
        let orphaned = self.entries.get(&old).is_some_and(|e| e.orphaned.is_some());
        if orphaned && finished(self.sockets.get::<Socket>(old).state()) {
            self.forget(old);
            return false;
        }
        true
    }

    /// Removes a socket nobody owns any more.
    fn forget(&mut self, handle: SocketHandle) {
        self.handshakes.retain(|&(h, _)| h != handle);
        if let Some(entry) = self.entries.remove(&handle) {
            self.path.close(&entry.grant);
            if self.by_flow.get(&entry.flow) == Some(&handle) {
                self.by_flow.remove(&entry.flow);
            }
        }
        self.sockets.remove(handle);
    }
}

/// One accepted TCP connection inside the tunnel. Dropping it closes the
/// connection gracefully (FIN once the sent data is acknowledged).
pub struct TcpConn {
    shared: Arc<Shared>,
    handle: SocketHandle,
}

impl TcpConn {
    fn with<R>(&self, f: impl FnOnce(&mut Socket<'static>) -> R) -> R {
        let mut engine = self.shared.engine();
        f(engine.sockets.get_mut::<Socket>(self.handle))
    }
}

/// Whether an orphaned socket has nothing left to do. TIME-WAIT counts:
/// inside the tunnel no segment of the old connection arrives late enough
/// to harm a new one (a resent FIN gets a RST, ending a connection that
/// was ending anyway), and smoltcp looks at every socket for every packet,
/// so 10 s of TIME-WAIT after a burst of short connections slowed every
/// other connection's packets (p50 0.19 -> 0.29 ms after 500 of them).
fn finished(state: State) -> bool {
    matches!(state, State::Closed | State::Listen | State::TimeWait)
}

/// Before the handshake completes a connection can neither read nor write yet.
fn opening(state: State) -> bool {
    matches!(state, State::Listen | State::SynReceived)
}

impl AsyncRead for TcpConn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let poll = self.with(|s| {
            if s.can_recv() {
                let n = s.recv_slice(buf.initialize_unfilled()).unwrap_or(0);
                buf.advance(n);
                return Poll::Ready(Ok(n > 0));
            }
            if s.may_recv() || opening(s.state()) {
                s.register_recv_waker(cx.waker());
                return Poll::Pending;
            }
            // FIN received, or the connection was reset or timed out: EOF.
            Poll::Ready(Ok(false))
        });
        poll.map(|r| {
            // The window opened: let the stack tell the peer.
            if matches!(r, Ok(true)) {
                self.shared.poke.notify_one();
            }
            r.map(|_| ())
        })
    }
}

impl AsyncWrite for TcpConn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let poll = self.with(|s| {
            if s.can_send() {
                return Poll::Ready(Ok(s.send_slice(buf).unwrap_or(0)));
            }
            if s.may_send() || opening(s.state()) {
                s.register_send_waker(cx.waker());
                return Poll::Pending;
            }
            Poll::Ready(Err(io::Error::from(io::ErrorKind::BrokenPipe)))
        });
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.shared.poke.notify_one();
        }
        poll
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Sends FIN after the data already written, like `shutdown(SHUT_WR)`.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.with(Socket::close);
        self.shared.poke.notify_one();
        Poll::Ready(Ok(()))
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        let mut engine = self.shared.engine();
        engine.sockets.get_mut::<Socket>(self.handle).close();
        if let Some(entry) = engine.entries.get_mut(&self.handle) {
            entry.orphaned = Some(std::time::Instant::now());
        }
        drop(engine);
        self.shared.poke.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const AGENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const SERVER: Ipv4Addr = Ipv4Addr::new(10, 9, 8, 7);

    /// The sidecar's side: a smoltcp client whose packets cross a lossy link.
    struct Peer {
        iface: Interface,
        queues: Queues,
        sockets: SocketSet<'static>,
    }

    impl Peer {
        fn new() -> Self {
            let mut queues = Queues { mtu: 1420, ..Queues::default() };
            let mut iface = Interface::new(Config::new(HardwareAddress::Ip), &mut queues, Instant::now());
            iface.update_ip_addrs(|a| {
                let _ = a.push(IpCidr::new(IpAddress::Ipv4(PEER), 15));
            });
            let _ = iface.routes_mut().add_default_ipv4_route(AGENT);
            Peer { iface, queues, sockets: SocketSet::new(Vec::new()) }
        }

        fn connect(&mut self, port: u16) -> SocketHandle {
            let mut s = Socket::new(SocketBuffer::new(vec![0u8; 65536]), SocketBuffer::new(vec![0u8; 65536]));
            s.connect(self.iface.context(), (IpAddress::Ipv4(SERVER), 80), port).unwrap();
            self.sockets.add(s)
        }
    }

    type Out = mpsc::UnboundedReceiver<Vec<u8>>;
    type Accepted = mpsc::UnboundedReceiver<SocketAddrV4>;

    /// Starts the stack with `serve` running each accepted connection;
    /// returns it, its output and the sources of the connections it accepted.
    fn stack(serve: fn(TcpConn)) -> (Tcp, Out, Accepted) {
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (acc_tx, acc_rx) = mpsc::unbounded_channel();
        let tcp = Tcp::start(
            AGENT,
            1420,
            Arc::default(),
            mpsc::channel(4096),
            Box::new(move |packets| packets.iter().for_each(|p| drop(out_tx.send(p.clone())))),
            Box::new(move |conn, src, dst| {
                assert_eq!(dst, SocketAddrV4::new(SERVER, 80));
                let _ = acc_tx.send(src);
                serve(conn);
            }),
        );
        (tcp, out_rx, acc_rx)
    }

    fn echo(conn: TcpConn) {
        tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(conn);
            let _ = tokio::io::copy(&mut rd, &mut wr).await;
            let _ = wr.shutdown().await;
        });
    }

    /// Runs the peer's connection `h` to its end, dropping every `nth`
    /// packet each way: sends `data` and then FIN (with no data, FIN once
    /// the stack's FIN came). Returns what arrived and how many SYNs the
    /// peer sent (more than one: the stack did not answer the first).
    async fn exchange(
        tcp: &Tcp,
        out: &mut Out,
        peer: &mut Peer,
        h: SocketHandle,
        data: &[u8],
        nth: usize,
    ) -> (Vec<u8>, usize) {
        let (mut sent, mut got, mut count, mut syns) = (0, Vec::new(), 0usize, 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            assert!(std::time::Instant::now() < deadline, "stalled at {} of {} bytes", got.len(), data.len());
            let now = Instant::now();
            peer.iface.poll(now, &mut peer.queues, &mut peer.sockets);
            let s = peer.sockets.get_mut::<Socket>(h);
            if s.can_send() && sent < data.len() {
                sent += s.send_slice(&data[sent..]).unwrap();
            }
            while s.can_recv() {
                s.recv(|b| {
                    got.extend_from_slice(b);
                    (b.len(), ())
                })
                .unwrap();
            }
            if sent == data.len() && s.may_send() && (!data.is_empty() || !s.may_recv()) {
                s.close();
            }
            if matches!(s.state(), State::Closed | State::TimeWait) {
                return (got, syns);
            }
            peer.iface.poll(now, &mut peer.queues, &mut peer.sockets);
            for p in peer.queues.tx.drain(..) {
                count += 1;
                syns += usize::from(ip::parse(&p).is_some_and(|p| p.is_tcp_open()));
                if count % nth != 0 {
                    tcp.input(p);
                }
            }
            while let Ok(p) = out.try_recv() {
                count += 1;
                if count % nth != 0 {
                    peer.queues.rx.push_back(p);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    fn count(accepted: &mut Accepted) -> usize {
        std::iter::from_fn(|| accepted.try_recv().ok()).count()
    }

    /// Sends `data` through an echo connection, dropping every `nth` packet
    /// each way, and returns what came back before the echo's FIN.
    async fn echo_through_loss(data: &[u8], nth: usize) -> (Vec<u8>, usize) {
        let (tcp, mut out, mut accepted) = stack(echo);
        let mut peer = Peer::new();
        let h = peer.connect(40000);
        let (got, _) = exchange(&tcp, &mut out, &mut peer, h, data, nth).await;
        (got, count(&mut accepted))
    }

    /// What [`a_stopped_stack_ends_its_connections`]'s stack accepted.
    static HELD: std::sync::Mutex<Vec<TcpConn>> = std::sync::Mutex::new(Vec::new());

    /// A session's stack that is stopped (the session is gone) ends what
    /// its connections' readers and writers wait on.
    #[tokio::test]
    async fn a_stopped_stack_ends_its_connections() {
        let (tcp, _out, _accepted) = stack(|conn| HELD.lock().unwrap().push(conn));
        let mut peer = Peer::new();
        peer.connect(40001);
        peer.iface.poll(Instant::now(), &mut peer.queues, &mut peer.sockets);
        peer.queues.tx.drain(..).for_each(|syn| assert!(tcp.input(syn)));
        let mut conn = None;
        for _ in 0..1000 {
            conn = HELD.lock().unwrap().pop();
            if conn.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        let mut conn = conn.expect("the SYN was not accepted");
        let reading = tokio::spawn(async move {
            let mut buf = [0u8; 8];
            let n = conn.read(&mut buf).await.unwrap();
            (n, conn.write_all(b"late").await.is_err())
        });
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        tcp.stop();
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), reading).await;
        assert_eq!(ended.expect("the reader was not woken").unwrap(), (0, true), "end of stream, then a write error");
    }

    /// The stack closes first, so its socket waits in TIME-WAIT; the peer
    /// then connects again from the same port, as a kernel may.
    #[tokio::test]
    async fn a_new_connection_reuses_the_address_pair_of_one_in_time_wait() {
        let (tcp, mut out, mut accepted) = stack(|conn| {
            tokio::spawn(async move {
                let mut conn = conn;
                let _ = conn.write_all(b"bye").await;
            });
        });
        let mut peer = Peer::new();
        for round in 0..2 {
            let h = peer.connect(40000);
            let (got, syns) = exchange(&tcp, &mut out, &mut peer, h, b"", usize::MAX).await;
            assert_eq!(got, b"bye", "connection {round}");
            assert_eq!(syns, 1, "connection {round}: its first SYN was not answered");
            peer.sockets.remove(h);
        }
        assert_eq!(count(&mut accepted), 2);
    }

    #[tokio::test]
    async fn echoes_a_connection_to_any_address() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (got, connections) = echo_through_loss(&data, usize::MAX).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        assert_eq!(connections, 1);
    }

    /// The stack times each handshake, SYN|ACK to ACK, to size the send
    /// buffers of the connections after it.
    #[tokio::test]
    async fn a_handshake_times_the_tunnel_round_trip() {
        let (tcp, mut out, _accepted) = stack(echo);
        assert_eq!(tcp.shared.engine().path.rtt(), None);
        let mut peer = Peer::new();
        let h = peer.connect(40002);
        let (got, _) = exchange(&tcp, &mut out, &mut peer, h, b"ping", usize::MAX).await;
        assert_eq!(got, b"ping");
        let rtt = tcp.shared.engine().path.rtt().expect("the handshake was not timed");
        assert!(rtt < std::time::Duration::from_secs(1), "{rtt:?}");
    }

    /// ipstack 1.0 resent only when the peer sent again; a lost last segment
    /// then stalled the connection for good. smoltcp's timers recover it.
    #[tokio::test]
    async fn recovers_lost_segments_either_way_on_its_own() {
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 249) as u8).collect();
        // Every 9th packet lost, the SYN|ACK and SYN retransmissions included.
        let (got, connections) = echo_through_loss(&data, 9).await;
        assert_eq!(got.len(), data.len());
        assert!(got == data);
        assert_eq!(connections, 1, "a retransmitted SYN is the same connection");
    }
}
