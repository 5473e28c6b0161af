//! The six bytes that open every tpd byte stream: `TPD`, a kind byte and the
//! protocol version. They come first so that two processes of different
//! versions fail with "version mismatch" before reading anything else.

use crate::names::PROTOCOL_VERSION;

/// Length of [`Preamble`] on the wire.
pub const LEN: usize = 6;
const MAGIC: &[u8; 3] = b"TPD";

/// What a stream carries after its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The transport: a [`crate::hello::Hello`], then [`crate::frame`]s of WireGuard datagrams.
    Transport,
    /// The control connection inside the tunnel ([`crate::control`]).
    Control,
    /// An inbound connection carried from the agent to the sidecar ([`crate::inbound`]).
    Inbound,
    /// A session registering its intercept routes with an agent ([`crate::intercept`]).
    Register,
    /// One intercepted connection, from the agent that read it to the session's home agent.
    Relay,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Transport => b'w',
            Kind::Control => b'c',
            Kind::Inbound => b'i',
            Kind::Register => b'r',
            Kind::Relay => b'p',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("the peer does not speak the tpd protocol (first bytes {0:02x?})")]
    NotTpd([u8; 3]),
    #[error("wrong kind of tpd stream: expected {expected:?}, got byte {got:#04x}")]
    WrongKind { expected: Kind, got: u8 },
    #[error(
        "version mismatch: this side speaks tpd protocol {ours}, the peer speaks {theirs}; \
         run the sidecar and agent images of the same tpd release"
    )]
    VersionMismatch { ours: u16, theirs: u16 },
}

/// Encodes the preamble for `kind` at this build's protocol version.
pub fn encode(kind: Kind) -> [u8; LEN] {
    let v = PROTOCOL_VERSION.to_be_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], kind.byte(), v[0], v[1]]
}

/// Checks the preamble at the start of `buf`. `Ok(None)` means more bytes are
/// needed; `Ok(Some(LEN))` is the number of bytes it took.
pub fn decode(buf: &[u8], expected: Kind) -> Result<Option<usize>, Error> {
    let Some(head) = buf.get(..LEN) else {
        // Reject garbage as early as the bytes we have allow.
        let n = buf.len().min(MAGIC.len());
        if buf[..n] != MAGIC[..n] {
            let mut got = [0u8; 3];
            got[..n].copy_from_slice(&buf[..n]);
            return Err(Error::NotTpd(got));
        }
        return Ok(None);
    };
    if &head[..3] != MAGIC {
        return Err(Error::NotTpd([head[0], head[1], head[2]]));
    }
    let theirs = u16::from_be_bytes([head[4], head[5]]);
    if theirs != PROTOCOL_VERSION {
        return Err(Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs });
    }
    if head[3] != expected.byte() {
        return Err(Error::WrongKind { expected, got: head[3] });
    }
    Ok(Some(LEN))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_partial() {
        let p = encode(Kind::Control);
        assert_eq!(decode(&p, Kind::Control), Ok(Some(LEN)));
        assert_eq!(decode(&p[..4], Kind::Control), Ok(None));
        assert!(matches!(decode(&p, Kind::Inbound), Err(Error::WrongKind { .. })));
    }

    #[test]
    fn version_mismatch_names_both_versions() {
        let mut p = encode(Kind::Transport);
        p[4..6].copy_from_slice(&(PROTOCOL_VERSION + 1).to_be_bytes());
        let err = decode(&p, Kind::Transport).unwrap_err();
        assert_eq!(err, Error::VersionMismatch { ours: PROTOCOL_VERSION, theirs: PROTOCOL_VERSION + 1 });
        let msg = err.to_string();
        assert!(msg.contains(&format!("speaks tpd protocol {PROTOCOL_VERSION}")), "{msg}");
        assert!(msg.contains(&format!("peer speaks {}", PROTOCOL_VERSION + 1)), "{msg}");
    }

    #[test]
    fn garbage_fails_on_first_byte() {
        assert!(matches!(decode(b"G", Kind::Transport), Err(Error::NotTpd(_))));
        assert!(matches!(decode(b"GET / HTTP/1.1", Kind::Transport), Err(Error::NotTpd(_))));
    }

    proptest! {
        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..16)) {
            let _ = decode(&bytes, Kind::Transport);
        }
    }
}
