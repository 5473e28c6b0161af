//! Transport hello (and the preamble in front of it).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Some(h)) = tpd_wire::hello::Hello::decode(data) {
        assert_eq!(&h.encode()[..], &data[..tpd_wire::hello::LEN]);
    }
});
