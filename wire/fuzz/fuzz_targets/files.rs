//! Arbitrary bytes into the file protocol's decoders: never a panic, every
//! decoded frame re-encodes to bytes that decode to the same message, and
//! accepted paths never contain an escaping component.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tpd_wire::files::{self, Message, Request, Response};

fn frames<M: Message + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    loop {
        match files::decode::<M>(&mut buf) {
            Ok(Some((id, msg))) => {
                let mut again = BytesMut::new();
                files::encode(id, &msg, &mut again);
                assert_eq!(files::decode::<M>(&mut again), Ok(Some((id, msg))));
            }
            Ok(None) | Err(files::DecodeError::TooLarge(_)) => return,
            Err(files::DecodeError::Malformed { .. }) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    frames::<Request>(data);
    frames::<Response>(data);
    if let Ok(parts) = files::components(data) {
        assert!(parts.iter().all(|c| !c.is_empty() && *c != b"." && *c != b".." && !c.contains(&b'/')));
    }
    let _ = files::symlink_stays_inside(&[b"a"], data);
});
