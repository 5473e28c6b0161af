//! Stream frames: any byte sequence either yields frames or a clean error.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(frame)) = tpd_wire::frame::decode(&mut buf) {
        assert!(!frame.is_empty());
    }
});
