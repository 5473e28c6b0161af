//! Tunnelled IPv4 packets the agent inspects or reassembles, and the replies it builds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(p) = tpd_wire::ip::parse(data) {
        let rst = tpd_wire::ip::tcp_reset_for(&p);
        assert!(tpd_wire::ip::parse(&rst).is_some());
    }
    let _ = tpd_wire::ip::icmp_host_unreachable(std::net::Ipv4Addr::LOCALHOST, data);

    // The same bytes as a run of fragments for the agent's reassembly, each
    // prefixed with its length (two bytes, big endian).
    let mut fragments = tpd_wire::ip::fragments::Reassembly::default();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (packet, tail) = rest[2..].split_at(len);
        if let Some(whole) = fragments.push(packet, std::time::Instant::now()) {
            assert!(!tpd_wire::ip::fragments::is_fragment(&whole), "reassembly returned a fragment");
        }
        rest = tail;
    }
});
