//! The control stream's preamble and its length-prefixed JSON messages: never
//! a panic, and every decoded message re-encodes to one that decodes the same.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tpd_wire::control;
use tpd_wire::preamble::{self, Kind};

fuzz_target!(|data: &[u8]| {
    for kind in [Kind::Transport, Kind::Control, Kind::Inbound] {
        if let Ok(Some(n)) = preamble::decode(data, kind) {
            assert_eq!(&data[..n], &preamble::encode(kind)[..]);
        }
    }
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = control::decode(&mut buf) {
        let mut again = BytesMut::new();
        control::encode(&msg, &mut again).expect("a decoded message encodes");
        assert_eq!(control::decode(&mut again).expect("re-encoded message decodes"), Some(msg));
    }
});
