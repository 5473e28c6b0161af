//! The userspace TCP/IP side of the agent. Decrypted packets from the peer
//! pass a gate before the stack sees them: a new TCP connection to the
//! cluster is only handed to the stack once the agent's own socket to the
//! real destination has connected, so "connection refused" (RST) and "no
//! route" (ICMP) reach the developer's app exactly as a kernel would report
//! them. Fragmented datagrams are reassembled at the gate. Accepted flows
//! are then spliced to those sockets, or served locally when addressed to
//! the agent's tunnel IP. Flows to `POD_LOOPBACK_TUNNEL_IP` go to the same
//! port on the pod's loopback (the pod's other containers), except the
//! agent's own ports. TCP runs on smoltcp
//! ([`tcp`]); UDP is parsed and answered directly ([`udp`]).

pub mod dns;
mod tcp;
mod udp;

use std::collections::HashMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tpd_tunnel::Endpoint as Wg;
use tpd_wire::ip::fragments::{self, Reassembly};
use tpd_wire::ip::{self, Flow, Packet};
use tpd_wire::names::{AGENT_DNS_PORT, AGENT_TUNNEL_IP, POD_LOOPBACK_TUNNEL_IP, STREAM_TUNNEL_MTU};

use crate::neighbours::{self, Own};
use crate::services::Services;
use crate::window::SendWindow;
pub use tcp::TcpConn;
pub use udp::UdpFlow;

/// Bound on connecting to a cluster destination; past it the app gets "no route to host".
const DIAL_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes one direction of a TCP splice moves per read.
const SPLICE_BUFFER: usize = 256 * 1024;

enum Dial {
    Pending,
    Connected(Option<TcpStream>),
}

/// Where decrypted packets enter the agent. Segments of established TCP
/// connections go straight to the stack's queue, a task hop fewer on every
/// packet's way; what the gate must judge first (a new connection, UDP)
/// goes to the gate.
pub struct Ingress {
    gate: mpsc::Sender<Vec<u8>>,
    tcp: mpsc::Sender<Vec<u8>>,
}

/// The receiving ends of [`Ingress`], for [`Stack::start`].
pub struct IngressQueues {
    gate: mpsc::Receiver<Vec<u8>>,
    tcp: (mpsc::Sender<Vec<u8>>, mpsc::Receiver<Vec<u8>>),
}

/// Packets either queue holds before more are dropped, as by a full NIC ring.
const INGRESS_QUEUE: usize = 4096;

impl Ingress {
    pub fn new() -> (Ingress, IngressQueues) {
        let (gate, gate_rx) = mpsc::channel(INGRESS_QUEUE);
        let (tcp, tcp_rx) = mpsc::channel(INGRESS_QUEUE);
        (Ingress { gate, tcp: tcp.clone() }, IngressQueues { gate: gate_rx, tcp: (tcp, tcp_rx) })
    }

    /// Queues one packet from WireGuard.
    pub fn deliver(&self, packet: &[u8]) {
        let established = !fragments::is_fragment(packet)
            && ip::parse(packet).is_some_and(|p| p.flow.protocol == ip::PROTO_TCP && !p.is_tcp_open());
        let queue = if established { &self.tcp } else { &self.gate };
        if queue.try_send(packet.to_vec()).is_err() {
            tracing::debug!("stack queue full; dropped a packet");
        }
    }
}

pub struct Stack {
    wg: Arc<Wg>,
    services: Services,
    dns_servers: Arc<[SocketAddr]>,
    dials: Mutex<HashMap<Flow, Dial>>,
    udp_flows: Mutex<HashMap<Flow, mpsc::Sender<Vec<u8>>>>,
    tcp: tcp::Tcp,
    /// Ports of the pod's loopback that are the agent's, not a neighbour's.
    own: Own,
    /// The gate's task, for [`Stack::stop`].
    gate: std::sync::OnceLock<tokio::task::AbortHandle>,
}

impl Stack {
    /// Starts the stack; packets from WireGuard arrive through the [`Ingress`] of `queues`.
    /// UDP to the agent's DNS port is answered with `dns_servers`; TCP to
    /// it, like every port of the agent's own, is one of `services`.
    pub fn start(
        wg: Arc<Wg>,
        services: Services,
        own: Own,
        queues: IngressQueues,
        window: Arc<SendWindow>,
        dns_servers: Arc<[SocketAddr]>,
    ) -> Arc<Self> {
        let IngressQueues { gate, tcp: (tcp_tx, tcp_rx) } = queues;
        let stack = Arc::new_cyclic(|me: &std::sync::Weak<Stack>| {
            let out = wg.clone();
            let me = me.clone();
            let tcp = tcp::Tcp::start(
                AGENT_TUNNEL_IP,
                usize::from(STREAM_TUNNEL_MTU),
                window,
                (tcp_tx, tcp_rx),
                Box::new(move |packets| out.send_ips(packets.iter().map(Vec::as_slice))),
                Box::new(move |conn, src, dst| {
                    if let Some(stack) = me.upgrade() {
                        stack.on_tcp(conn, src, dst);
                    }
                }),
            );
            Stack {
                wg,
                services,
                dns_servers,
                dials: Mutex::default(),
                udp_flows: Mutex::default(),
                tcp,
                own,
                gate: std::sync::OnceLock::new(),
            }
        });
        let _ = stack.gate.set(tokio::spawn(stack.clone().gate(gate)).abort_handle());
        stack
    }

    /// Stops the stack's tasks and resets its connections: what a session
    /// that is gone leaves behind. Its UDP flows idle out by themselves.
    pub fn stop(&self) {
        if let Some(gate) = self.gate.get() {
            gate.abort();
        }
        self.tcp.stop();
    }

    fn dials(&self) -> std::sync::MutexGuard<'_, HashMap<Flow, Dial>> {
        self.dials.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn udp_flows(&self) -> std::sync::MutexGuard<'_, HashMap<Flow, mpsc::Sender<Vec<u8>>>> {
        self.udp_flows.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn gate(self: Arc<Self>, mut from_wg: mpsc::Receiver<Vec<u8>>) {
        let mut fragmented = Reassembly::default();
        while let Some(mut packet) = from_wg.recv().await {
            if fragments::is_fragment(&packet) {
                match fragmented.push(&packet, std::time::Instant::now()) {
                    Some(whole) => packet = whole,
                    None => continue,
                }
            }
            // IPv4 TCP and UDP only; ICMP and IPv6 are not carried.
            match ip::parse(&packet) {
                Some(p) if p.is_tcp_open() => self.on_open(p, packet),
                Some(p) if p.flow.protocol == ip::PROTO_TCP => self.pass(packet),
                Some(p) if p.flow.protocol == ip::PROTO_UDP => self.on_udp(p.flow, &packet),
                _ => {}
            }
        }
    }

    fn pass(&self, packet: Vec<u8>) {
        if !self.tcp.input(packet) {
            tracing::debug!("stack queue full; dropped a packet");
        }
    }

    fn on_open(self: &Arc<Self>, p: Packet, packet: Vec<u8>) {
        let dst = p.flow.dst;
        if *dst.ip() == AGENT_TUNNEL_IP {
            if self.services.has(dst.port()) {
                self.pass(packet);
            } else {
                self.wg.send_ip(&ip::tcp_reset_for(&p));
            }
            return;
        }
        if *dst.ip() == POD_LOOPBACK_TUNNEL_IP && self.own.holds(dst.port()) {
            // The swapped container's ports are the developer's; the transport is the agent's.
            return self.wg.send_ip(&ip::tcp_reset_for(&p));
        }
        match self.dials().get(&p.flow) {
            Some(Dial::Pending) => return, // a retransmitted SYN while we dial
            Some(Dial::Connected(_)) => return self.pass(packet),
            None => {}
        }
        self.dials().insert(p.flow, Dial::Pending);
        let this = self.clone();
        tokio::spawn(async move { this.dial(p, packet).await });
    }

    async fn dial(&self, p: Packet, packet: Vec<u8>) {
        let dst = p.flow.dst;
        let connect = async {
            match *dst.ip() == POD_LOOPBACK_TUNNEL_IP {
                true => neighbours::dial_loopback(dst.port()).await,
                false => TcpStream::connect(dst).await,
            }
        };
        match tokio::time::timeout(DIAL_TIMEOUT, connect).await {
            Ok(Ok(sock)) => {
                let _ = sock.set_nodelay(true);
                self.dials().insert(p.flow, Dial::Connected(Some(sock)));
                self.pass(packet);
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                self.dials().remove(&p.flow);
                self.wg.send_ip(&ip::tcp_reset_for(&p));
            }
            outcome => {
                self.dials().remove(&p.flow);
                let why = outcome
                    .map_or_else(|_| "timed out".to_string(), |r| r.err().map(|e| e.to_string()).unwrap_or_default());
                tracing::debug!(dst = %p.flow.dst, "dial failed: {why}");
                if let Some(icmp) = ip::icmp_host_unreachable(AGENT_TUNNEL_IP, &packet) {
                    self.wg.send_ip(&icmp);
                }
            }
        }
    }

    /// A connection the stack accepted (its SYN passed the gate).
    fn on_tcp(self: &Arc<Self>, conn: TcpConn, src: SocketAddrV4, dst: SocketAddrV4) {
        if *dst.ip() == AGENT_TUNNEL_IP {
            self.services.spawn(dst.port(), Box::new(conn));
            return;
        }
        let flow = Flow { protocol: ip::PROTO_TCP, src, dst };
        let upstream = match self.dials().get_mut(&flow) {
            Some(Dial::Connected(sock)) => sock.take(),
            _ => None,
        };
        let Some(mut upstream) = upstream else {
            // Not dialled by the gate: dropping `conn` closes it.
            return;
        };
        let this = self.clone();
        tokio::spawn(async move {
            let mut conn = conn;
            let _ =
                tokio::io::copy_bidirectional_with_sizes(&mut conn, &mut upstream, SPLICE_BUFFER, SPLICE_BUFFER).await;
            this.dials().remove(&flow);
        });
    }

    fn on_udp(self: &Arc<Self>, flow: Flow, packet: &[u8]) {
        let Some(payload) = udp::payload(packet) else {
            return;
        };
        if *flow.dst.ip() == POD_LOOPBACK_TUNNEL_IP && self.own.holds(flow.dst.port()) {
            return;
        }
        let mut flows = self.udp_flows();
        if let Some(tx) = flows.get(&flow) {
            match tx.try_send(payload.to_vec()) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    return tracing::debug!("udp flow queue full; dropped a datagram");
                }
                // The flow idled out: start it anew.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
        let (tx, rx) = mpsc::channel(udp::FLOW_QUEUE);
        let _ = tx.try_send(payload.to_vec());
        flows.insert(flow, tx);
        drop(flows);
        let udp = UdpFlow::new(flow.src, flow.dst, rx, self.wg.clone());
        let this = self.clone();
        tokio::spawn(async move {
            if flow.dst == SocketAddrV4::new(AGENT_TUNNEL_IP, AGENT_DNS_PORT) {
                dns::serve(udp, this.dns_servers.clone(), UDP_IDLE_TIMEOUT).await;
            } else if let Err(e) = relay_udp(udp).await {
                tracing::debug!(dst = %flow.dst, "udp flow ended: {e}");
            }
            let mut flows = this.udp_flows();
            if flows.get(&flow).is_some_and(mpsc::Sender::is_closed) {
                flows.remove(&flow);
            }
        });
    }
}

/// Relays one tunnelled UDP flow through an ordinary socket until it
/// idles out (nothing in either direction for [`UDP_IDLE_TIMEOUT`]). A
/// flow to the pod's loopback address goes to 127.0.0.1 in the pod.
async fn relay_udp(mut flow: UdpFlow) -> io::Result<()> {
    let sock = UdpSocket::bind("0.0.0.0:0").await?;
    let dst = flow.dst();
    match *dst.ip() == POD_LOOPBACK_TUNNEL_IP {
        true => sock.connect((std::net::Ipv4Addr::LOCALHOST, dst.port())).await?,
        false => sock.connect(dst).await?,
    }
    let mut down = vec![0u8; 65_536];
    let idle = tokio::time::sleep(UDP_IDLE_TIMEOUT);
    tokio::pin!(idle);
    loop {
        tokio::select! {
            up = flow.recv() => {
                let Some(datagram) = up else { return Ok(()) };
                sock.send(&datagram).await?;
            }
            n = sock.recv(&mut down) => flow.reply().send(&down[..n?]),
            () = &mut idle => return Ok(()),
        }
        idle.as_mut().reset(tokio::time::Instant::now() + UDP_IDLE_TIMEOUT);
    }
}
