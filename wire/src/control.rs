//! The control connection inside the tunnel, from the sidecar to the agent's
//! control port: a [`crate::preamble`] of kind `Control`, then JSON messages,
//! each behind a big-endian u32 length. The agent answers the sidecar's
//! `Hello` with `Info` (version and the env for injection), answers `Ping`
//! with `Pong` (health), pushes `Inbound` when a cluster client connects
//! to one of its ports, and `PodPorts` with the ports the pod's other
//! containers listen on (before `Info`, then whenever they change).

use std::collections::BTreeMap;

use bytes::{Buf, BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::neighbours::PodPort;

/// Largest message accepted; an env of a few thousand variables fits easily.
pub const MAX_MESSAGE: usize = 4 << 20;
const HEADER_LEN: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Sidecar -> agent, first message.
    Hello {
        version: String,
        /// The receive buffer of the sidecar's tunnel UDP socket, in bytes
        /// as the kernel reports it, when the tunnel may run over UDP: the
        /// agent sizes what each connection keeps in flight by it.
        /// Absent from sidecars before it, and over the stream alone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        udp_receive_buffer: Option<u64>,
        /// The session id, which an intercept agent matches with the
        /// session's registration to deliver its requests over this tunnel.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<String>,
    },
    /// Agent -> sidecar: the agent's build and its process environment minus
    /// tpd's own variables. Holds secrets: never log it.
    Info {
        version: String,
        env: BTreeMap<String, String>,
    },
    /// Sidecar -> agent health probe; the agent answers with the same `seq`.
    Ping {
        seq: u64,
    },
    Pong {
        seq: u64,
    },
    /// Agent -> sidecar: a cluster client connected to `port` on the agent;
    /// the sidecar opens an [`crate::inbound`] connection naming `id`.
    Inbound {
        id: u64,
        port: u16,
    },
    /// Agent -> sidecar: every port listening on the pod's loopback or
    /// wildcard address, less the agent's own: the whole set each time, so
    /// a port missing from it has closed.
    PodPorts {
        ports: Vec<PodPort>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control message of {0} bytes is larger than the {MAX_MESSAGE}-byte limit")]
    TooLarge(usize),
    #[error("malformed control message")]
    Json(#[source] serde_json::Error),
}

/// Appends `msg` as one length-prefixed message. The framing is shared by
/// every JSON message stream ([`Message`] here, [`crate::intercept`]'s too).
pub fn encode<T: Serialize>(msg: &T, out: &mut BytesMut) -> Result<(), Error> {
    let json = serde_json::to_vec(msg).map_err(Error::Json)?;
    if json.len() > MAX_MESSAGE {
        return Err(Error::TooLarge(json.len()));
    }
    out.reserve(HEADER_LEN + json.len());
    out.put_u32(json.len() as u32);
    out.put_slice(&json);
    Ok(())
}

/// Takes one message off the front of `buf`; `Ok(None)` until it has fully arrived.
pub fn decode<T: DeserializeOwned>(buf: &mut BytesMut) -> Result<Option<T>, Error> {
    let Some(head) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    if len > MAX_MESSAGE {
        return Err(Error::TooLarge(len));
    }
    if buf.len() < HEADER_LEN + len {
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let body = buf.split_to(len);
    serde_json::from_slice(&body).map(Some).map_err(Error::Json)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (".{0,20}", any::<Option<u64>>(), proptest::option::of("[a-f0-9]{10}")).prop_map(
                |(version, udp_receive_buffer, session)| Message::Hello { version, udp_receive_buffer, session }
            ),
            (".{0,10}", proptest::collection::btree_map(".{0,10}", ".{0,30}", 0..5))
                .prop_map(|(version, env)| Message::Info { version, env }),
            any::<u64>().prop_map(|seq| Message::Ping { seq }),
            any::<u64>().prop_map(|seq| Message::Pong { seq }),
            (any::<u64>(), any::<u16>()).prop_map(|(id, port)| Message::Inbound { id, port }),
            proptest::collection::vec((1u16.., any::<bool>()), 0..5).prop_map(|ports| Message::PodPorts {
                ports: ports.into_iter().map(|(p, udp)| if udp { PodPort::udp(p) } else { PodPort::tcp(p) }).collect()
            }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msgs in proptest::collection::vec(message(), 0..6), cut in any::<prop::sample::Index>()) {
            let mut wire = BytesMut::new();
            for m in &msgs { encode(m, &mut wire).unwrap(); }
            let at = cut.index(wire.len() + 1);
            let mut buf = BytesMut::from(&wire[..at]);
            let mut got = Vec::new();
            while let Some(m) = decode::<Message>(&mut buf).unwrap() { got.push(m); }
            buf.extend_from_slice(&wire[at..]);
            while let Some(m) = decode::<Message>(&mut buf).unwrap() { got.push(m); }
            prop_assert_eq!(got, msgs);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut buf = BytesMut::from(&bytes[..]);
            while let Ok(Some(_)) = decode::<Message>(&mut buf) {}
        }
    }

    /// A sidecar from before the receive buffer was reported still says hello.
    #[test]
    fn a_hello_without_the_receive_buffer_is_understood() {
        let json = br#"{"type":"hello","version":"0.1.0"}"#;
        let mut buf = BytesMut::new();
        buf.put_u32(json.len() as u32);
        buf.put_slice(json);
        let hello = Message::Hello { version: "0.1.0".into(), udp_receive_buffer: None, session: None };
        assert_eq!(decode::<Message>(&mut buf).unwrap(), Some(hello));
    }

    /// What the agent sends, as a person reads it in a capture.
    #[test]
    fn pod_ports_read_as_written() {
        let msg = Message::PodPorts { ports: vec![PodPort::tcp(6379), PodPort::udp(5353)] };
        let json = serde_json::to_string(&msg).unwrap();
        assert_eq!(json, r#"{"type":"pod_ports","ports":["6379","5353/udp"]}"#);
    }

    #[test]
    fn oversized_length_is_refused_before_buffering() {
        let mut buf = BytesMut::from(&[0xff, 0xff, 0xff, 0xff][..]);
        assert!(matches!(decode::<Message>(&mut buf), Err(Error::TooLarge(_))));
    }
}
