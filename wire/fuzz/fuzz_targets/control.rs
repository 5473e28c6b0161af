//! The JSON message streams (control, and the intercept port's registration
//! and relay streams, which the agent reads from the pod network): their
//! preambles and length-prefixed messages never panic, and every decoded
//! message re-encodes to one that decodes the same.
#![no_main]
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tpd_wire::control;
use tpd_wire::intercept;
use tpd_wire::preamble::{self, Kind};

fn round_trips<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(msg)) = control::decode::<T>(&mut buf) {
        let mut again = BytesMut::new();
        control::encode(&msg, &mut again).expect("a decoded message encodes");
        assert_eq!(control::decode::<T>(&mut again).expect("re-encoded message decodes"), Some(msg));
    }
}

fuzz_target!(|data: &[u8]| {
    for kind in [Kind::Transport, Kind::Control, Kind::Inbound, Kind::Register, Kind::Relay] {
        if let Ok(Some(n)) = preamble::decode(data, kind) {
            assert_eq!(&data[..n], &preamble::encode(kind)[..]);
        }
    }
    round_trips::<control::Message>(data);
    round_trips::<intercept::Request>(data);
    round_trips::<intercept::Reply>(data);
    round_trips::<intercept::RelayHeader>(data);
});
