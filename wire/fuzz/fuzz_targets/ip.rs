//! Tunnelled IPv4 packets the agent inspects, and the replies it builds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Some(p) = tpd_wire::ip::parse(data) {
        let rst = tpd_wire::ip::tcp_reset_for(&p);
        assert!(tpd_wire::ip::parse(&rst).is_some());
    }
    let _ = tpd_wire::ip::icmp_host_unreachable(std::net::Ipv4Addr::LOCALHOST, data);
});
