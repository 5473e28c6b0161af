//! The tunnel's UDP socket, batched both ways. Datagrams for the peer
//! queue for one writer task, which sends each run of equal-sized ones
//! with a single `sendmsg` (UDP GSO); reads take many datagrams per system
//! call (`recvmmsg`, and UDP GRO where the kernel coalesces them). A
//! datagram with nothing queued ahead of it leaves at once from the
//! caller's task, so a request and its answer cost no task wake-ups here.
//! quinn-udp does the socket work: it knows which kernels lack which
//! offload and falls back to one datagram per call.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

/// Receive buffer both ends ask for. Over a veth (and a node's pod network)
/// a window's worth of the agent's connections arrives as one burst of
/// datagrams; the default buffer (about 200 KiB, some 90 datagrams) drops
/// the tail of a few concurrent bursts, and the stack then waits for a
/// retransmission timeout.
pub const TUNNEL_UDP_RECEIVE_BUFFER: usize = 8 << 20;

/// Datagrams waiting for the writer, like a NIC's transmit ring.
const SEND_QUEUE: usize = 4096;
/// Most bytes one GSO send carries (the kernel's limit is 64 KiB).
const GSO_BYTES: usize = 63 * 1024;
/// Buffers one read fills; with GRO each holds up to 64 KiB of datagrams.
const RECV_BUFFERS: usize = 16;
const RECV_BUFFER: usize = 64 * 1024;

/// Lets the kernel fragment datagrams larger than the path again: quinn-udp
/// forbids it (QUIC finds the path MTU itself), but a WireGuard datagram
/// outgrows the path whenever the agent relays a large answer to a small
/// UDP question (DNS over EDNS0 answers up to 4 KiB), and the IP layer is
/// what carries those.
fn allow_fragments(sock: &UdpSocket) {
    use rustix::net::sockopt::{Ipv4PathMtuDiscovery, Ipv6PathMtuDiscovery};
    // The IPv4 option, or the two IPv6 ones, apply by the socket's family.
    let _ = rustix::net::sockopt::set_ip_mtu_discover(sock, Ipv4PathMtuDiscovery::WANT);
    let _ = rustix::net::sockopt::set_ipv6_mtu_discover(sock, Ipv6PathMtuDiscovery::WANT);
    let _ = nix::sys::socket::setsockopt(sock, nix::sys::socket::sockopt::Ipv6DontFrag, &false);
}

/// A bound tunnel UDP socket and what quinn-udp learned about its kernel.
pub struct TunnelUdp {
    sock: UdpSocket,
    state: UdpSocketState,
}

impl TunnelUdp {
    /// Binds `addr` with [`TUNNEL_UDP_RECEIVE_BUFFER`]. SO_RCVBUFFORCE, open
    /// to a process with CAP_NET_ADMIN (the sidecar), goes past the host's
    /// `net.core.rmem_max`; without it (the unprivileged agent) the kernel
    /// caps the size there, which is fine: it is the most it can get.
    pub async fn bind(addr: SocketAddr) -> io::Result<Arc<Self>> {
        let sock = UdpSocket::bind(addr).await?;
        let state = UdpSocketState::new((&sock).into())?;
        allow_fragments(&sock);
        let forced = rustix::net::sockopt::set_socket_recv_buffer_size_force(&sock, TUNNEL_UDP_RECEIVE_BUFFER);
        if forced.is_err() {
            let _ = rustix::net::sockopt::set_socket_recv_buffer_size(&sock, TUNNEL_UDP_RECEIVE_BUFFER);
        }
        let udp = TunnelUdp { sock, state };
        tracing::debug!(
            %addr,
            receive_buffer = udp.receive_buffer(),
            forced = forced.is_ok(),
            gso_segments = udp.state.max_gso_segments(),
            gro_segments = udp.state.gro_segments(),
            "tunnel UDP socket"
        );
        Ok(Arc::new(udp))
    }

    /// The receive buffer the kernel gave the socket, as it reports it
    /// (twice the bytes asked for: the other half is its bookkeeping).
    /// Without CAP_NET_ADMIN in the host's user namespace (rootless
    /// Docker) it stops at `net.core.rmem_max`, 208 KiB by default.
    pub fn receive_buffer(&self) -> usize {
        rustix::net::sockopt::socket_recv_buffer_size(&self.sock).unwrap_or(0)
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.sock.local_addr()
    }

    /// Starts the writer task; it ends when the last clone of the sender drops.
    pub fn sender(self: &Arc<Self>) -> UdpSender {
        let (queue, pending) = mpsc::channel(SEND_QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        tokio::spawn(self.clone().write_batches(pending, queued.clone()));
        UdpSender { udp: self.clone(), queue, queued }
    }

    /// Calls `each` with every datagram and its sender's address, for as
    /// long as the socket lives; errors (an ICMP unreachable reported on
    /// the socket, say) are logged and reading goes on.
    pub async fn read_each(&self, mut each: impl FnMut(&[u8], SocketAddr)) {
        let mut bufs = vec![vec![0u8; RECV_BUFFER]; RECV_BUFFERS];
        let mut metas = [RecvMeta::default(); RECV_BUFFERS];
        loop {
            let read = self
                .sock
                .async_io(Interest::READABLE, || {
                    let mut slices: Vec<IoSliceMut<'_>> = bufs.iter_mut().map(|b| IoSliceMut::new(b)).collect();
                    let n = self.state.recv((&self.sock).into(), &mut slices, &mut metas)?;
                    for (meta, buf) in metas.iter().zip(&bufs).take(n) {
                        // With GRO one buffer holds several datagrams of `stride` bytes.
                        for datagram in buf[..meta.len].chunks(meta.stride.max(1)) {
                            each(datagram, meta.addr);
                        }
                    }
                    // A read that left buffers unfilled emptied the socket:
                    // "would block" makes tokio wait for the next datagram
                    // now instead of asking the kernel again for nothing, a
                    // system call fewer per request (tokio's TCP reads do
                    // the same after a short read). A datagram arriving
                    // meanwhile marks the socket ready anew.
                    if n < RECV_BUFFERS { Err(io::ErrorKind::WouldBlock.into()) } else { Ok(()) }
                })
                .await;
            if let Err(e) = read {
                tracing::debug!("udp transport: {e}");
            }
        }
    }

    /// The queue's writer: sends `datagrams` in runs, waiting while the
    /// socket buffer is full.
    async fn send_all(&self, datagrams: &[(Bytes, SocketAddr)], buf: &mut Vec<u8>) {
        let mut rest = datagrams;
        while !rest.is_empty() {
            let (transmit, n) = self.next_run(rest, buf);
            // quinn-udp logs and swallows every error but "would block".
            let _ = self.sock.async_io(Interest::WRITABLE, || self.state.send((&self.sock).into(), &transmit)).await;
            rest = &rest[n..];
        }
    }

    /// Sends runs of `datagrams` until the socket buffer is full; returns how many went.
    fn send_now(&self, datagrams: &[(Bytes, SocketAddr)]) -> usize {
        let mut buf = Vec::new();
        let mut sent = 0;
        while sent < datagrams.len() {
            let (transmit, n) = self.next_run(&datagrams[sent..], &mut buf);
            if self.sock.try_io(Interest::WRITABLE, || self.state.send((&self.sock).into(), &transmit)).is_err() {
                break;
            }
            sent += n;
        }
        sent
    }

    /// The longest run at the front of `rest` that one send can carry (UDP
    /// GSO: one destination, all of one size but a shorter last one, at most
    /// 64 KiB), and how many datagrams it holds. A lone datagram is not copied.
    fn next_run<'a>(&self, rest: &'a [(Bytes, SocketAddr)], buf: &'a mut Vec<u8>) -> (Transmit<'a>, usize) {
        let (first, to) = &rest[0];
        let size = first.len();
        let most = rest.len().min(self.state.max_gso_segments()).min(GSO_BYTES / size.max(1));
        let mut n = 1;
        while n < most && rest[n].1 == *to && rest[n - 1].0.len() == size && rest[n].0.len() <= size {
            n += 1;
        }
        let contents: &[u8] = if n == 1 {
            first
        } else {
            buf.clear();
            rest[..n].iter().for_each(|(d, _)| buf.extend_from_slice(d));
            buf
        };
        let transmit =
            Transmit { destination: *to, ecn: None, contents, segment_size: (n > 1).then_some(size), src_ip: None };
        (transmit, n)
    }

    async fn write_batches(
        self: Arc<Self>,
        mut pending: mpsc::Receiver<(Bytes, SocketAddr)>,
        queued: Arc<AtomicUsize>,
    ) {
        let mut batch = Vec::with_capacity(64);
        let mut buf = Vec::with_capacity(GSO_BYTES);
        while pending.recv_many(&mut batch, 64).await > 0 {
            self.send_all(&batch, &mut buf).await;
            queued.fetch_sub(batch.len(), Ordering::Release);
            batch.clear();
        }
    }
}

/// The sending half of a tunnel UDP socket. Encryption never waits for a
/// `sendmsg` under the endpoint's lock (on a veth that call also runs the
/// receiving side's path), and a momentarily full socket buffer is waited
/// for by the writer instead of dropping.
#[derive(Clone)]
pub struct UdpSender {
    udp: Arc<TunnelUdp>,
    queue: mpsc::Sender<(Bytes, SocketAddr)>,
    /// Datagrams queued or being sent by the writer: while any are, new
    /// ones queue behind them so the peer gets them in order.
    queued: Arc<AtomicUsize>,
}

impl std::fmt::Debug for UdpSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UdpSender").field("queued", &self.queued.load(Ordering::Relaxed)).finish()
    }
}

impl UdpSender {
    /// Sends `datagrams` to `to`: at once if nothing is queued, else (and
    /// whatever the socket buffer had no room for) behind the queue; what
    /// the full queue cannot take is dropped, as by a full NIC ring.
    pub fn send(&self, datagrams: Vec<Bytes>, to: SocketAddr) {
        let mut datagrams: Vec<(Bytes, SocketAddr)> = datagrams.into_iter().map(|d| (d, to)).collect();
        if self.queued.load(Ordering::Acquire) == 0 {
            let sent = self.udp.send_now(&datagrams);
            datagrams.drain(..sent);
        }
        for datagram in datagrams {
            self.queued.fetch_add(1, Ordering::AcqRel);
            if self.queue.try_send(datagram).is_err() {
                self.queued.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The kernel may fragment what the tunnel socket sends, on either
    /// family, whatever quinn-udp asked for.
    #[tokio::test]
    async fn lets_the_kernel_fragment_on_ipv4_and_ipv6() {
        use nix::sys::socket::{getsockopt, sockopt::Ipv6DontFrag};
        use rustix::net::sockopt::{Ipv4PathMtuDiscovery, Ipv6PathMtuDiscovery, ip_mtu_discover, ipv6_mtu_discover};
        let v4 = TunnelUdp::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        assert_eq!(ip_mtu_discover(&v4.sock).unwrap(), Ipv4PathMtuDiscovery::WANT);
        match TunnelUdp::bind((std::net::Ipv6Addr::LOCALHOST, 0).into()).await {
            Ok(v6) => {
                assert_eq!(ipv6_mtu_discover(&v6.sock).unwrap(), Ipv6PathMtuDiscovery::WANT);
                assert!(!getsockopt(&v6.sock, Ipv6DontFrag).unwrap(), "IPV6_DONTFRAG is still set");
            }
            Err(e) if e.kind() == io::ErrorKind::AddrNotAvailable => eprintln!("no IPv6 loopback here: {e}"),
            Err(e) => panic!("binding [::1]: {e}"),
        }
    }

    async fn pair() -> (Arc<TunnelUdp>, Arc<TunnelUdp>) {
        let a = TunnelUdp::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        let b = TunnelUdp::bind(([127, 0, 0, 1], 0).into()).await.unwrap();
        (a, b)
    }

    /// Datagrams of mixed sizes numbered 0..n, the first four bytes the number.
    fn numbered(n: usize) -> Vec<Bytes> {
        (0..n)
            .map(|i| {
                let mut d = vec![0u8; if i % 7 == 6 { 100 + i } else { 1400 }];
                d[..4].copy_from_slice(&u32::try_from(i).unwrap().to_be_bytes());
                Bytes::from(d)
            })
            .collect()
    }

    /// What `b` reads until `n` datagrams have arrived (or 5 s passed).
    async fn read_n(b: Arc<TunnelUdp>, n: usize) -> Vec<Bytes> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            b.read_each(|d, _| {
                let _ = tx.send(Bytes::copy_from_slice(d));
            })
            .await;
        });
        let mut got = Vec::new();
        while got.len() < n {
            match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
                Ok(Some(d)) => got.push(d),
                _ => break,
            }
        }
        reader.abort();
        got
    }

    /// Runs grouped for GSO (equal sizes, a shorter one ending a run) arrive
    /// whole and in order, however the reader's GRO joined them.
    #[tokio::test]
    async fn a_gso_batch_arrives_whole_and_in_order() {
        let (a, b) = pair().await;
        let to = b.local_addr().unwrap();
        let sent = numbered(300);
        let batch: Vec<(Bytes, SocketAddr)> = sent.iter().map(|d| (d.clone(), to)).collect();
        a.send_all(&batch, &mut Vec::new()).await;
        assert_eq!(read_n(b.clone(), sent.len()).await, sent);
        // The sender's own path, at once from the caller.
        a.sender().send(sent.clone(), to);
        assert_eq!(read_n(b, sent.len()).await, sent);
    }

    /// The sender's two paths (at once, and queued behind the writer) keep order.
    #[tokio::test]
    async fn a_burst_through_the_sender_arrives_in_order() {
        let (a, b) = pair().await;
        let to = b.local_addr().unwrap();
        let sender = a.sender();
        let sent = numbered(2000);
        for d in &sent {
            sender.send(vec![d.clone()], to);
        }
        assert_eq!(read_n(b, sent.len()).await, sent);
    }
}
