//! The inbound connection header.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = tpd_wire::inbound::Header::decode(data) {
        assert_eq!(&h.encode()[..], &data[..tpd_wire::inbound::LEN]);
    }
});
