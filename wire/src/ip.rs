//! Just enough IPv4/TCP/UDP parsing and building for the agent to decide
//! what to do with a tunnelled packet before its userspace stack sees it: a
//! new TCP connection (a bare SYN) is only accepted once the real destination
//! answered, and is otherwise refused with a RST or an ICMP "host
//! unreachable", exactly what a kernel would send. Pure functions over bytes.

pub mod fragments;

use std::net::{Ipv4Addr, SocketAddrV4};

pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
const PROTO_ICMP: u8 = 1;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// The addressing of an IPv4 TCP or UDP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub protocol: u8,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

/// A parsed IPv4 TCP or UDP packet's header fields the agent acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet {
    pub flow: Flow,
    /// TCP flags (0 for UDP).
    pub tcp_flags: u8,
    pub tcp_seq: u32,
    /// Bytes of TCP payload (0 for UDP).
    pub tcp_payload_len: usize,
}

impl Packet {
    /// A TCP segment that opens a connection: SYN without ACK.
    pub fn is_tcp_open(&self) -> bool {
        self.flow.protocol == PROTO_TCP && self.tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST) == TCP_SYN
    }
}

/// Parses an IPv4 TCP or UDP packet; `None` for anything else or anything
/// malformed (the caller hands those to the stack, which drops them).
pub fn parse(p: &[u8]) -> Option<Packet> {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(p[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if ihl < 20 || total < ihl || total > p.len() {
        return None;
    }
    // Fragments other than the first have no transport header.
    if u16::from_be_bytes([p[6], p[7]]) & 0x1fff != 0 {
        return None;
    }
    let protocol = p[9];
    let src_ip = Ipv4Addr::new(p[12], p[13], p[14], p[15]);
    let dst_ip = Ipv4Addr::new(p[16], p[17], p[18], p[19]);
    let l4 = &p[ihl..total];
    let (min, tcp) = match protocol {
        PROTO_TCP => (20, true),
        PROTO_UDP => (8, false),
        _ => return None,
    };
    if l4.len() < min {
        return None;
    }
    let src_port = u16::from_be_bytes([l4[0], l4[1]]);
    let dst_port = u16::from_be_bytes([l4[2], l4[3]]);
    let (tcp_flags, tcp_seq, tcp_payload_len) = if tcp {
        let off = usize::from(l4[12] >> 4) * 4;
        if off < 20 || off > l4.len() {
            return None;
        }
        (l4[13], u32::from_be_bytes([l4[4], l4[5], l4[6], l4[7]]), l4.len() - off)
    } else {
        (0, 0, 0)
    };
    Some(Packet {
        flow: Flow { protocol, src: SocketAddrV4::new(src_ip, src_port), dst: SocketAddrV4::new(dst_ip, dst_port) },
        tcp_flags,
        tcp_seq,
        tcp_payload_len,
    })
}

/// The RST|ACK a kernel answers a SYN to a closed port with ("connection refused").
pub fn tcp_reset_for(syn: &Packet) -> Vec<u8> {
    let consumed =
        syn.tcp_payload_len as u32 + u32::from(syn.tcp_flags & TCP_SYN != 0) + u32::from(syn.tcp_flags & TCP_FIN != 0);
    let mut tcp = [0u8; 20];
    tcp[0..2].copy_from_slice(&syn.flow.dst.port().to_be_bytes());
    tcp[2..4].copy_from_slice(&syn.flow.src.port().to_be_bytes());
    tcp[8..12].copy_from_slice(&syn.tcp_seq.wrapping_add(consumed).to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = TCP_RST | TCP_ACK;
    let sum = transport_checksum(*syn.flow.dst.ip(), *syn.flow.src.ip(), PROTO_TCP, &tcp);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
    ipv4(*syn.flow.dst.ip(), *syn.flow.src.ip(), PROTO_TCP, &tcp)
}

/// An ICMP "host unreachable" about `original`, sent from `from`: the
/// sender's connect() fails at once with "no route to host".
pub fn icmp_host_unreachable(from: Ipv4Addr, original: &[u8]) -> Option<Vec<u8>> {
    let pkt = parse(original)?;
    let ihl = usize::from(original[0] & 0x0f) * 4;
    let quoted = &original[..(ihl + 8).min(original.len())];
    let mut icmp = vec![3u8, 1, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(quoted);
    let sum = checksum(&[&icmp]);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    Some(ipv4(from, *pkt.flow.src.ip(), PROTO_ICMP, &icmp))
}

fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload: &[u8]) -> Vec<u8> {
    let total = (20 + payload.len()) as u16;
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40; // don't fragment
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    seal_header(&mut h);
    let mut out = h.to_vec();
    out.extend_from_slice(payload);
    out
}

/// Writes the checksum of the IPv4 header `h` into it.
fn seal_header(h: &mut [u8]) {
    h[10..12].fill(0);
    let sum = checksum(&[h]);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
}

fn transport_checksum(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, segment: &[u8]) -> u16 {
    let mut pseudo = [0u8; 12];
    pseudo[0..4].copy_from_slice(&src.octets());
    pseudo[4..8].copy_from_slice(&dst.octets());
    pseudo[9] = protocol;
    pseudo[10..12].copy_from_slice(&(segment.len() as u16).to_be_bytes());
    checksum(&[&pseudo, segment])
}

/// The Internet checksum (RFC 1071) over the concatenation of `parts`.
fn checksum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A minimal IPv4 packet from the sidecar's tunnel address to the agent's
/// (a zeroed UDP header as payload): enough for boringtun to carry it.
/// For tests of the tunnel, here and in the binaries (feature `test-util`).
#[cfg(any(test, feature = "test-util"))]
pub fn tunnel_test_packet() -> Vec<u8> {
    let mut p = vec![0u8; 28];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&28u16.to_be_bytes());
    p[8] = 64;
    p[9] = PROTO_UDP;
    p[12..16].copy_from_slice(&[198, 18, 0, 2]);
    p[16..20].copy_from_slice(&[198, 18, 0, 1]);
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn syn() -> Vec<u8> {
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        tcp[2..4].copy_from_slice(&80u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = TCP_SYN;
        ipv4(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(10, 0, 0, 9), PROTO_TCP, &tcp)
    }

    #[test]
    fn syn_is_an_open_and_reset_answers_it() {
        let p = parse(&syn()).unwrap();
        assert!(p.is_tcp_open());
        let rst = tcp_reset_for(&p);
        assert_eq!(checksum(&[&rst[..20]]), 0, "valid IP checksum");
        let r = parse(&rst).unwrap();
        assert_eq!((r.flow.src, r.flow.dst), (p.flow.dst, p.flow.src));
        assert_eq!(r.tcp_flags, TCP_RST | TCP_ACK);
        assert_eq!(u32::from_be_bytes(rst[28..32].try_into().unwrap()), 1001, "acks the SYN");
        let seg = &rst[20..];
        assert_eq!(transport_checksum(*r.flow.src.ip(), *r.flow.dst.ip(), PROTO_TCP, seg), 0);
    }

    #[test]
    fn unreachable_quotes_the_original() {
        let orig = syn();
        let icmp = icmp_host_unreachable(Ipv4Addr::new(198, 18, 0, 1), &orig).unwrap();
        assert_eq!(icmp[9], PROTO_ICMP);
        assert_eq!(&icmp[20..22], &[3, 1]);
        assert_eq!(&icmp[28..], &orig[..28]);
        assert_eq!(checksum(&[&icmp[20..]]), 0);
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Some(p) = parse(&bytes) {
                let _ = tcp_reset_for(&p);
            }
            let _ = icmp_host_unreachable(Ipv4Addr::LOCALHOST, &bytes);
        }
    }
}
