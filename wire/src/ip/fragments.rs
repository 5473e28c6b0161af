//! Reassembly of IPv4 fragments. The developer's kernel fragments a UDP
//! datagram larger than the tunnel's MTU (1,420 bytes on the UDP
//! transport), and the agent relays datagrams with an ordinary socket, so
//! it needs each one whole. Bounded like a kernel's reassembly: a datagram
//! waits at most [`TIMEOUT`] for its missing pieces, and at most
//! [`MAX_PENDING`] datagrams and [`MAX_HELD`] bytes wait at once (the
//! oldest is dropped first). Pure: time comes in as an argument.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use super::seal_header;

/// How long the pieces of one datagram wait for the rest (Linux's
/// `ipfrag_time`).
pub const TIMEOUT: Duration = Duration::from_secs(30);
/// Datagrams being reassembled at once.
pub const MAX_PENDING: usize = 256;
/// Payload bytes held for them.
pub const MAX_HELD: usize = 4 << 20;

const MORE_FRAGMENTS: u16 = 0x2000;
const OFFSET: u16 = 0x1fff;

/// Whether `packet` is an IPv4 fragment: more fragments follow it, or it
/// is not the first.
pub fn is_fragment(packet: &[u8]) -> bool {
    packet.len() >= 20
        && packet[0] >> 4 == 4
        && u16::from_be_bytes([packet[6], packet[7]]) & (MORE_FRAGMENTS | OFFSET) != 0
}

/// Fragments belong together when these match (RFC 791).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    id: u16,
    protocol: u8,
}

#[derive(Debug)]
struct Partial {
    since: Instant,
    /// The first fragment's IP header, once it arrived.
    header: Option<Vec<u8>>,
    /// Payload pieces and their byte offsets, as they arrived.
    pieces: Vec<(usize, Vec<u8>)>,
    /// The payload's length, known once the last fragment arrived.
    total: Option<usize>,
    held: usize,
}

/// Datagrams waiting for their missing fragments.
#[derive(Debug, Default)]
pub struct Reassembly {
    pending: HashMap<Key, Partial>,
}

impl Reassembly {
    /// Takes one fragment (see [`is_fragment`]); returns the whole packet,
    /// unfragmented, once the last missing piece of its datagram arrived.
    /// Malformed fragments are dropped.
    pub fn push(&mut self, packet: &[u8], now: Instant) -> Option<Vec<u8>> {
        self.pending.retain(|_, p| now.duration_since(p.since) < TIMEOUT);
        let Fragment { key, header, offset, more, data } = split(packet)?;
        while !self.pending.is_empty()
            && (self.held() + data.len() > MAX_HELD
                || (self.pending.len() >= MAX_PENDING && !self.pending.contains_key(&key)))
        {
            self.drop_oldest();
        }
        let partial = self.pending.entry(key).or_insert_with(|| Partial {
            since: now,
            header: None,
            pieces: Vec::new(),
            total: None,
            held: 0,
        });
        if partial.pieces.iter().any(|(o, _)| *o == offset) {
            return None; // a duplicate
        }
        if offset == 0 {
            partial.header = Some(header.to_vec());
        }
        if !more {
            partial.total = Some(offset + data.len());
        }
        partial.pieces.push((offset, data.to_vec()));
        partial.held += data.len();
        let whole = partial.assemble()?;
        self.pending.remove(&key);
        Some(whole)
    }

    /// Payload bytes waiting.
    fn held(&self) -> usize {
        self.pending.values().map(|p| p.held).sum()
    }

    fn drop_oldest(&mut self) {
        let oldest = self.pending.iter().min_by_key(|(_, p)| p.since).map(|(k, _)| *k);
        if let Some(k) = oldest {
            self.pending.remove(&k);
        }
    }
}

/// One fragment's parts.
struct Fragment<'a> {
    key: Key,
    header: &'a [u8],
    /// Where its payload goes in the datagram's.
    offset: usize,
    /// More fragments follow it.
    more: bool,
    data: &'a [u8],
}

fn split(packet: &[u8]) -> Option<Fragment<'_>> {
    if !is_fragment(packet) {
        return None;
    }
    let ihl = usize::from(packet[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([packet[2], packet[3]]));
    if ihl < 20 || total < ihl || total > packet.len() {
        return None;
    }
    let flags = u16::from_be_bytes([packet[6], packet[7]]);
    let (offset, more) = (usize::from(flags & OFFSET) * 8, flags & MORE_FRAGMENTS != 0);
    let data = &packet[ihl..total];
    // All but the last carry a multiple of 8 bytes; no datagram exceeds 64 KiB.
    if (more && !data.len().is_multiple_of(8)) || data.is_empty() || ihl + offset + data.len() > usize::from(u16::MAX) {
        return None;
    }
    let key = Key {
        src: Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]),
        dst: Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]),
        id: u16::from_be_bytes([packet[4], packet[5]]),
        protocol: packet[9],
    };
    Some(Fragment { key, header: &packet[..ihl], offset, more, data })
}

impl Partial {
    /// The whole packet, if every byte of the payload is here.
    fn assemble(&mut self) -> Option<Vec<u8>> {
        let (total, header) = (self.total?, self.header.as_ref()?);
        if self.held < total {
            return None;
        }
        self.pieces.sort_unstable_by_key(|(o, _)| *o);
        let mut payload = Vec::with_capacity(total);
        for (offset, data) in &self.pieces {
            // A gap: a piece is still missing. Overlaps keep the first bytes.
            let skip = payload.len().checked_sub(*offset)?;
            payload.extend_from_slice(data.get(skip..).unwrap_or_default());
        }
        if payload.len() < total {
            return None;
        }
        payload.truncate(total);
        let mut out = header.clone();
        let len = u16::try_from(out.len() + total).ok()?;
        out[2..4].copy_from_slice(&len.to_be_bytes());
        out[6..8].fill(0);
        seal_header(&mut out);
        out.extend_from_slice(&payload);
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::ip::{PROTO_UDP, checksum, ipv4, parse};

    /// A UDP datagram of `len` payload bytes, as one unfragmented packet.
    fn datagram(len: usize) -> Vec<u8> {
        let mut udp = vec![0u8; 8 + len];
        udp[0..2].copy_from_slice(&40000u16.to_be_bytes());
        udp[2..4].copy_from_slice(&9000u16.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + len) as u16).to_be_bytes());
        for (i, b) in udp[8..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        let mut p = ipv4(Ipv4Addr::new(198, 18, 0, 2), Ipv4Addr::new(10, 0, 0, 9), PROTO_UDP, &udp);
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0; // fragments allowed
        seal_header(&mut p[..20]);
        p
    }

    /// Splits `packet` into fragments of at most `mtu` bytes, as a kernel does.
    fn fragment(packet: &[u8], mtu: usize) -> Vec<Vec<u8>> {
        let payload = &packet[20..];
        let step = (mtu - 20) / 8 * 8;
        payload
            .chunks(step)
            .enumerate()
            .map(|(i, chunk)| {
                let mut f = packet[..20].to_vec();
                let more = (i + 1) * step < payload.len();
                let flags = ((i * step / 8) as u16) | if more { MORE_FRAGMENTS } else { 0 };
                f[2..4].copy_from_slice(&((20 + chunk.len()) as u16).to_be_bytes());
                f[6..8].copy_from_slice(&flags.to_be_bytes());
                seal_header(&mut f);
                f.extend_from_slice(chunk);
                f
            })
            .collect()
    }

    #[test]
    fn a_fragmented_datagram_comes_back_whole_in_any_order() {
        let whole = datagram(4000);
        let mut pieces = fragment(&whole, 1420);
        assert_eq!(pieces.len(), 3);
        assert!(pieces.iter().all(|p| is_fragment(p)) && !is_fragment(&whole));
        pieces.swap(0, 2);
        let mut r = Reassembly::default();
        let now = Instant::now();
        assert_eq!(r.push(&pieces[0], now), None);
        assert_eq!(r.push(&pieces[0], now), None, "a duplicate completes nothing");
        assert_eq!(r.push(&pieces[1], now), None);
        let got = r.push(&pieces[2], now).expect("the last piece completes it");
        assert!(got == whole, "reassembled {} bytes, sent {}", got.len(), whole.len());
        assert_eq!(checksum(&[&got[..20]]), 0, "valid IP checksum");
        assert!(parse(&got).is_some());
        assert_eq!(r.held(), 0);
    }

    #[test]
    fn pieces_expire_and_memory_stays_bounded() {
        let pieces = fragment(&datagram(3000), 1420);
        let mut r = Reassembly::default();
        let t0 = Instant::now();
        assert_eq!(r.push(&pieces[0], t0), None);
        assert_eq!(r.push(&pieces[1], t0), None);
        // The last piece comes too late: the others were dropped.
        assert_eq!(r.push(&pieces[2], t0 + TIMEOUT), None);
        assert_eq!(r.pending.len(), 1);

        // Many datagrams that never complete: the oldest make room.
        let mut r = Reassembly::default();
        for id in 0..(MAX_PENDING as u16 + 50) {
            let mut first = pieces[0].clone();
            first[4..6].copy_from_slice(&id.to_be_bytes());
            let _ = r.push(&first, t0 + Duration::from_millis(u64::from(id)));
        }
        assert_eq!(r.pending.len(), MAX_PENDING);
        assert!(r.held() <= MAX_HELD);
    }

    proptest! {
        /// Whatever bytes arrive, reassembly never panics and holds no more
        /// than its bounds.
        #[test]
        fn arbitrary_fragments_never_panic(packets in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..50)) {
            let mut r = Reassembly::default();
            for mut p in packets {
                if p.len() >= 20 {
                    p[0] = 0x45;
                    p[6] |= 0x20;
                }
                let _ = r.push(&p, Instant::now());
                prop_assert!(r.held() <= MAX_HELD && r.pending.len() <= MAX_PENDING);
            }
        }
    }
}
