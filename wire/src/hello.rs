//! The hello each side sends first on the transport stream: the preamble,
//! who is speaking, and the session's WireGuard public key. Public keys travel
//! only here, on the stream that Kubernetes authenticates (the port-forward),
//! never in a Deployment, env var or log. Even the UDP transport opens the
//! stream first for this exchange. The sidecar speaks first; the agent
//! answers once it has admitted the sidecar's key.

use crate::preamble::{self, Kind};

/// Length of a hello on the wire.
pub const LEN: usize = preamble::LEN + 1 + 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Sidecar,
    Agent,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Sidecar => 1,
            Role::Agent => 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub role: Role,
    pub public_key: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Preamble(#[from] preamble::Error),
    #[error("unknown role {0} in hello")]
    UnknownRole(u8),
}

impl Hello {
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..preamble::LEN].copy_from_slice(&preamble::encode(Kind::Transport));
        out[preamble::LEN] = self.role.byte();
        out[preamble::LEN + 1..].copy_from_slice(&self.public_key);
        out
    }

    /// Decodes a hello from the start of `buf`; `Ok(None)` until all of it has arrived.
    pub fn decode(buf: &[u8]) -> Result<Option<Hello>, Error> {
        if preamble::decode(buf, Kind::Transport)?.is_none() || buf.len() < LEN {
            return Ok(None);
        }
        let role = match buf[preamble::LEN] {
            1 => Role::Sidecar,
            2 => Role::Agent,
            other => return Err(Error::UnknownRole(other)),
        };
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&buf[preamble::LEN + 1..LEN]);
        Ok(Some(Hello { role, public_key }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(key in any::<[u8; 32]>(), agent in any::<bool>()) {
            let role = if agent { Role::Agent } else { Role::Sidecar };
            let hello = Hello { role, public_key: key };
            let wire = hello.encode();
            prop_assert_eq!(Hello::decode(&wire).unwrap(), Some(hello));
            prop_assert_eq!(Hello::decode(&wire[..LEN - 1]).unwrap(), None);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Hello::decode(&bytes);
        }
    }

    #[test]
    fn bad_role() {
        let mut wire = Hello { role: Role::Agent, public_key: [7; 32] }.encode();
        wire[preamble::LEN] = 9;
        assert_eq!(Hello::decode(&wire), Err(Error::UnknownRole(9)));
    }
}
