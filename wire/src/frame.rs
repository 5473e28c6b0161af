//! Length-prefixed frames of WireGuard datagrams over one byte stream (the
//! stream transport, what a Kubernetes port-forward carries): a big-endian
//! u16 length, then that many bytes. Pure: encode into and decode from
//! `BytesMut`, so the IO loops can batch many frames per read or write.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Bytes of the length prefix.
pub const HEADER_LEN: usize = 2;
/// Largest datagram a frame can hold.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("empty frame: every frame must carry a WireGuard datagram")]
    Empty,
    #[error("datagram of {0} bytes does not fit in a frame (max {MAX_PAYLOAD})")]
    TooLong(usize),
}

/// Appends one frame holding `datagram` to `out`.
pub fn encode(datagram: &[u8], out: &mut BytesMut) -> Result<(), Error> {
    let head = header(datagram.len())?;
    out.reserve(HEADER_LEN + datagram.len());
    out.put_slice(&head);
    out.put_slice(datagram);
    Ok(())
}

/// The length prefix of a frame holding `len` bytes, for writers that send
/// the datagram from where it is.
pub fn header(len: usize) -> Result<[u8; HEADER_LEN], Error> {
    match u16::try_from(len) {
        Ok(0) => Err(Error::Empty),
        Ok(n) => Ok(n.to_be_bytes()),
        Err(_) => Err(Error::TooLong(len)),
    }
}

/// Takes one complete frame off the front of `buf`; `Ok(None)` until one has
/// fully arrived. An error means the stream is corrupt and must be closed.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Bytes>, Error> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([head[0], head[1]]));
    if len == 0 {
        return Err(Error::Empty);
    }
    if buf.len() < HEADER_LEN + len {
        buf.reserve(HEADER_LEN + len - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    Ok(Some(buf.split_to(len).freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rejects_empty_and_oversized() {
        let mut out = BytesMut::new();
        assert_eq!(encode(&[], &mut out), Err(Error::Empty));
        assert_eq!(encode(&vec![0; MAX_PAYLOAD + 1], &mut out), Err(Error::TooLong(MAX_PAYLOAD + 1)));
        let mut zero = BytesMut::from(&[0u8, 0, 1][..]);
        assert_eq!(decode(&mut zero), Err(Error::Empty));
    }

    proptest! {
        #[test]
        fn round_trip_in_any_split(
            datagrams in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..2000), 0..8),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = BytesMut::new();
            for d in &datagrams {
                encode(d, &mut wire).unwrap();
            }
            // Deliver the bytes in two reads split anywhere.
            let at = cut.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..at]);
            let mut got = Vec::new();
            while let Some(f) = decode(&mut buf).unwrap() { got.push(f.to_vec()); }
            buf.extend_from_slice(&wire[at..]);
            while let Some(f) = decode(&mut buf).unwrap() { got.push(f.to_vec()); }
            prop_assert_eq!(got, datagrams);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode(&mut buf) {}
        }
    }
}
