//! Control messages: length-prefixed JSON.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tpd_wire::preamble::decode(data, tpd_wire::preamble::Kind::Control);
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = tpd_wire::control::decode(&mut buf) {}
});
