//! The pod's neighbour ports: what the pod's other containers serve on its
//! loopback (a cache on `127.0.0.1:6379`, cloud-sql-proxy, Envoy), which the
//! developer's container reaches on its own `127.0.0.1:<port>`. The sidecar
//! listens there and relays each connection or UDP flow through the tunnel
//! to `names::POD_LOOPBACK_TUNNEL_IP:<port>`, which the agent dials as
//! `127.0.0.1:<port>` in the pod.
//!
//! A port is written as a person would: `6379` (TCP) or `53/udp`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
}

/// One port of the pod's loopback, TCP or UDP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PodPort {
    pub port: u16,
    pub protocol: Protocol,
}

impl PodPort {
    pub fn tcp(port: u16) -> Self {
        PodPort { port, protocol: Protocol::Tcp }
    }

    pub fn udp(port: u16) -> Self {
        PodPort { port, protocol: Protocol::Udp }
    }
}

impl FromStr for PodPort {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a port: write N or N/udp (N from 1 to 65535)");
        let (number, protocol) = match s.split_once('/') {
            None => (s, Protocol::Tcp),
            Some((n, p)) if p.eq_ignore_ascii_case("tcp") => (n, Protocol::Tcp),
            Some((n, p)) if p.eq_ignore_ascii_case("udp") => (n, Protocol::Udp),
            Some(_) => return Err(bad()),
        };
        let port = number.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad)?;
        Ok(PodPort { port, protocol })
    }
}

impl TryFrom<String> for PodPort {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PodPort> for String {
    fn from(p: PodPort) -> String {
        p.to_string()
    }
}

impl fmt::Display for PodPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.protocol {
            Protocol::Tcp => write!(f, "{}", self.port),
            Protocol::Udp => write!(f, "{}/udp", self.port),
        }
    }
}

/// A port the CLI asks the sidecar to carry from the start, and whose it is,
/// for the warning when the developer's side already holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Declared {
    pub port: PodPort,
    /// Who serves it in the pod, as the warning names it: `container redis`,
    /// or `--pod-port` for one the developer named by hand.
    pub owner: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ports_read_as_written() {
        assert_eq!("6379".parse(), Ok(PodPort::tcp(6379)));
        assert_eq!("6379/tcp".parse(), Ok(PodPort::tcp(6379)));
        assert_eq!("53/UDP".parse(), Ok(PodPort::udp(53)));
        assert_eq!(PodPort::udp(53).to_string(), "53/udp");
        assert_eq!(PodPort::tcp(6379).to_string(), "6379");
        for bad in ["", "0", "70000", "53/sctp", "a", "53/"] {
            let err = bad.parse::<PodPort>().unwrap_err();
            assert!(err.contains("N or N/udp"), "{bad}: {err}");
        }
    }

    proptest! {
        #[test]
        fn round_trip(port in 1u16.., udp in any::<bool>(), owner in ".{0,20}") {
            let port = if udp { PodPort::udp(port) } else { PodPort::tcp(port) };
            prop_assert_eq!(port.to_string().parse::<PodPort>(), Ok(port));
            let declared = Declared { port, owner };
            let json = serde_json::to_string(&declared).unwrap();
            prop_assert_eq!(serde_json::from_str::<Declared>(&json).unwrap(), declared);
        }

        #[test]
        fn never_panics(s in ".{0,12}") {
            let _ = s.parse::<PodPort>();
        }
    }
}
