//! The header the sidecar sends first on an inbound connection it opens to
//! the agent's inbound port inside the tunnel: the preamble, the id from the
//! agent's `Inbound` control message, and whether the local app accepted.
//! After it, the stream carries the client's bytes both ways.

use crate::preamble::{self, Kind};

/// Length of the header on the wire.
pub const LEN: usize = preamble::LEN + 8 + 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The id of the agent's `Inbound` message this connection answers.
    pub id: u64,
    /// False when nothing listens on the mapped local port: the agent then
    /// resets the cluster client's connection.
    pub accepted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Preamble(#[from] preamble::Error),
    #[error("bad accepted flag {0} in inbound header")]
    BadFlag(u8),
}

impl Header {
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..preamble::LEN].copy_from_slice(&preamble::encode(Kind::Inbound));
        out[preamble::LEN..preamble::LEN + 8].copy_from_slice(&self.id.to_be_bytes());
        out[LEN - 1] = u8::from(self.accepted);
        out
    }

    /// Decodes the header at the start of `buf`; `Ok(None)` until it has fully arrived.
    pub fn decode(buf: &[u8]) -> Result<Option<Header>, Error> {
        if preamble::decode(buf, Kind::Inbound)?.is_none() || buf.len() < LEN {
            return Ok(None);
        }
        let mut id = [0u8; 8];
        id.copy_from_slice(&buf[preamble::LEN..preamble::LEN + 8]);
        let accepted = match buf[LEN - 1] {
            0 => false,
            1 => true,
            other => return Err(Error::BadFlag(other)),
        };
        Ok(Some(Header { id: u64::from_be_bytes(id), accepted }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(id in any::<u64>(), accepted in any::<bool>()) {
            let h = Header { id, accepted };
            let wire = h.encode();
            prop_assert_eq!(Header::decode(&wire).unwrap(), Some(h));
            prop_assert_eq!(Header::decode(&wire[..LEN - 1]).unwrap(), None);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..32)) {
            let _ = Header::decode(&bytes);
        }
    }
}
