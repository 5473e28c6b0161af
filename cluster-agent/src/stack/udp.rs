//! UDP of the userspace stack: datagrams are parsed straight out of the
//! tunnelled packets (UDP has no state for a stack to keep), grouped into
//! flows by address pair, and each flow's replies are built as IPv4
//! packets from the flow's destination back to its source.

use std::net::SocketAddrV4;
use std::sync::Arc;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, UdpPacket, UdpRepr};
use tokio::sync::mpsc;
use tpd_tunnel::Endpoint as Wg;

/// Datagrams waiting for one flow's handler.
pub const FLOW_QUEUE: usize = 256;

/// One tunnelled UDP flow: what the developer's app sent from `src` to
/// `dst`, and a way to answer it.
pub struct UdpFlow {
    rx: mpsc::Receiver<Vec<u8>>,
    reply: UdpReply,
}

/// Sends datagrams back to a flow's source, from its destination.
#[derive(Clone)]
pub struct UdpReply {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    wg: Arc<Wg>,
}

impl UdpFlow {
    pub fn new(src: SocketAddrV4, dst: SocketAddrV4, rx: mpsc::Receiver<Vec<u8>>, wg: Arc<Wg>) -> Self {
        UdpFlow { rx, reply: UdpReply { src, dst, wg } }
    }

    pub fn dst(&self) -> SocketAddrV4 {
        self.reply.dst
    }

    /// The next datagram's payload; `None` once the stack dropped the flow.
    pub async fn recv(&mut self) -> Option<Vec<u8>> {
        self.rx.recv().await
    }

    pub fn reply(&self) -> &UdpReply {
        &self.reply
    }
}

impl UdpReply {
    /// Sends `payload` to the flow's source, from its destination.
    pub fn send(&self, payload: &[u8]) {
        if let Some(packet) = udp_packet(self.dst, self.src, payload) {
            self.wg.send_ip(&packet);
        }
    }
}

/// The UDP payload of an IPv4 packet the gate already parsed as UDP.
pub fn payload(packet: &[u8]) -> Option<&[u8]> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let header = ip.header_len() as usize;
    let total = usize::from(ip.total_len());
    let udp = UdpPacket::new_checked(packet.get(header..total)?).ok()?;
    Some(&packet[header + 8..header + usize::from(udp.len())])
}

/// An IPv4 UDP packet; `None` when the payload does not fit one.
pub fn udp_packet(src: SocketAddrV4, dst: SocketAddrV4, payload: &[u8]) -> Option<Vec<u8>> {
    let udp_len = 8 + payload.len();
    if 20 + udp_len > usize::from(u16::MAX) {
        return None;
    }
    let ip = Ipv4Repr {
        src_addr: *src.ip(),
        dst_addr: *dst.ip(),
        next_header: IpProtocol::Udp,
        payload_len: udp_len,
        hop_limit: 64,
    };
    let udp = UdpRepr { src_port: src.port(), dst_port: dst.port() };
    let caps = ChecksumCapabilities::default();
    let mut buf = vec![0u8; 20 + udp_len];
    let mut packet = Ipv4Packet::new_unchecked(&mut buf[..]);
    ip.emit(&mut packet, &caps);
    udp.emit(
        &mut UdpPacket::new_unchecked(packet.payload_mut()),
        &(*src.ip()).into(),
        &(*dst.ip()).into(),
        payload.len(),
        |b| b.copy_from_slice(payload),
        &caps,
    );
    Some(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_packet_parses_back() {
        let src: SocketAddrV4 = "10.0.0.5:9000".parse().unwrap();
        let dst: SocketAddrV4 = "198.18.0.2:40000".parse().unwrap();
        let packet = udp_packet(src, dst, b"pong").unwrap();
        let p = tpd_wire::ip::parse(&packet).unwrap();
        assert_eq!((p.flow.protocol, p.flow.src, p.flow.dst), (tpd_wire::ip::PROTO_UDP, src, dst));
        assert_eq!(payload(&packet), Some(&b"pong"[..]));
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        assert!(ip.verify_checksum());
        let udp = UdpPacket::new_checked(ip.payload()).unwrap();
        assert!(udp.verify_checksum(&(*src.ip()).into(), &(*dst.ip()).into()));
    }
}
